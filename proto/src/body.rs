//! Reading an [`HttpMessage`]'s captured body, which the aggregator sends once: inline, or as
//! slices of the capture's pcap records ([`HttpMessage::body_in_records`]) when the packets
//! carry it byte for byte. Both ends use this: the aggregator to count what it captured, an
//! analysis service (the emulator) to get the body back, with a clear error for slices that
//! point outside the records.

use std::borrow::Cow;

use crate::analysis::{HttpMessage, PcapRecord};

/// A `body_in_records` slice that does not lie within the capture's records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body slice {slice} names record {record}, but the capture has {records} records")]
    NoSuchRecord { slice: usize, record: u32, records: usize },
    #[error("body slice {slice} ({offset}+{length}) overruns record {record} ({len} bytes)")]
    OutOfRecord { slice: usize, record: u32, offset: u32, length: u32, len: usize },
    #[error("the message has both an inline body ({inline} bytes) and body slices")]
    Both { inline: usize },
}

impl HttpMessage {
    /// How many body bytes were captured, wherever they are sent.
    pub fn captured_body_len(&self) -> u64 {
        self.body.len() as u64 + self.body_in_records.iter().map(|s| u64::from(s.length)).sum::<u64>()
    }

    /// The captured body: borrowed when inline, gathered from `records` otherwise.
    ///
    /// # Errors
    /// [`BodyError`] when a slice lies outside `records`, or the body is both inline and in
    /// slices (the contract sets one of the two).
    pub fn captured_body<'a>(&'a self, records: &[PcapRecord]) -> Result<Cow<'a, [u8]>, BodyError> {
        if self.body_in_records.is_empty() {
            return Ok(Cow::Borrowed(&self.body));
        }
        if !self.body.is_empty() {
            return Err(BodyError::Both { inline: self.body.len() });
        }
        let mut body = Vec::with_capacity(usize::try_from(self.captured_body_len()).unwrap_or(0));
        for (slice, at) in self.body_in_records.iter().enumerate() {
            let data = &records
                .get(at.record as usize)
                .ok_or(BodyError::NoSuchRecord { slice, record: at.record, records: records.len() })?
                .data;
            let start = at.offset as usize;
            let bytes = start.checked_add(at.length as usize).and_then(|end| data.get(start..end)).ok_or(
                BodyError::OutOfRecord {
                    slice,
                    record: at.record,
                    offset: at.offset,
                    length: at.length,
                    len: data.len(),
                },
            )?;
            body.extend_from_slice(bytes);
        }
        Ok(Cow::Owned(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::RecordSlice;

    fn records() -> Vec<PcapRecord> {
        vec![
            PcapRecord { timestamp_ns: 1, data: b"headers-hello".to_vec().into() },
            PcapRecord { timestamp_ns: 2, data: b"hdr-, world".to_vec().into() },
        ]
    }

    fn slice(record: u32, offset: u32, length: u32) -> RecordSlice {
        RecordSlice { record, offset, length }
    }

    #[test]
    fn slices_gather_the_body_in_their_order() {
        let message = HttpMessage { body_in_records: vec![slice(0, 8, 5), slice(1, 4, 7)], ..Default::default() };
        assert_eq!(message.captured_body(&records()).unwrap().as_ref(), b"hello, world");
        assert_eq!(message.captured_body_len(), 12);
    }

    #[test]
    fn an_inline_body_is_borrowed() {
        let message = HttpMessage { body: b"inline".to_vec(), ..Default::default() };
        assert!(matches!(message.captured_body(&[]).unwrap(), Cow::Borrowed(b"inline")));
        assert_eq!(message.captured_body_len(), 6);
        assert!(HttpMessage::default().captured_body(&[]).unwrap().is_empty());
    }

    #[test]
    fn slices_outside_the_records_are_errors_not_panics() {
        let bad = |s: RecordSlice| HttpMessage { body_in_records: vec![slice(0, 0, 1), s], ..Default::default() };
        assert_eq!(
            bad(slice(2, 0, 1)).captured_body(&records()),
            Err(BodyError::NoSuchRecord { slice: 1, record: 2, records: 2 })
        );
        assert_eq!(
            bad(slice(1, 5, 7)).captured_body(&records()),
            Err(BodyError::OutOfRecord { slice: 1, record: 1, offset: 5, length: 7, len: 11 })
        );
        assert!(bad(slice(1, u32::MAX, u32::MAX)).captured_body(&records()).is_err());
        let both = HttpMessage { body: b"x".to_vec(), body_in_records: vec![slice(0, 0, 1)], ..Default::default() };
        assert_eq!(both.captured_body(&records()), Err(BodyError::Both { inline: 1 }));
    }
}
