//! The libpcap file format (the classic one, nanosecond variant) for the records of an
//! [`analysis::Capture`](crate::analysis::Capture).
//!
//! Nanosecond timestamps keep the times the filter saw the data exact; Wireshark and tshark
//! read this variant natively (magic `0xa1b23c4d`).

use std::io::{self, Write};

use crate::analysis::PcapRecord;

/// `LINKTYPE_ETHERNET`.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Magic number of a libpcap file with nanosecond timestamps, written in native byte order.
pub const MAGIC_NANOS: u32 = 0xa1b2_3c4d;
/// Largest record the files declare; synthesized packets stay far below it.
pub const SNAPLEN: u32 = 262_144;

/// Writes the 24-byte global header.
pub fn write_header<W: Write>(out: &mut W, link_type: u32) -> io::Result<()> {
    out.write_all(&MAGIC_NANOS.to_le_bytes())?;
    out.write_all(&2u16.to_le_bytes())?; // version major
    out.write_all(&4u16.to_le_bytes())?; // version minor
    out.write_all(&0i32.to_le_bytes())?; // thiszone: timestamps are UTC
    out.write_all(&0u32.to_le_bytes())?; // sigfigs
    out.write_all(&SNAPLEN.to_le_bytes())?;
    out.write_all(&link_type.to_le_bytes())
}

/// Writes one record: its 16-byte header, then the whole packet (never snapped).
///
/// # Errors
/// `InvalidInput` when the packet is larger than [`SNAPLEN`], rather than writing a record
/// readers would reject.
pub fn write_record<W: Write>(out: &mut W, record: &PcapRecord) -> io::Result<()> {
    let len = u32::try_from(record.data.len()).ok().filter(|len| *len <= SNAPLEN).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("pcap record of {} bytes exceeds the snap length {SNAPLEN}", record.data.len()),
        )
    })?;
    let seconds = u32::try_from(record.timestamp_ns / 1_000_000_000).unwrap_or(u32::MAX);
    let nanos = (record.timestamp_ns % 1_000_000_000) as u32;
    out.write_all(&seconds.to_le_bytes())?;
    out.write_all(&nanos.to_le_bytes())?;
    out.write_all(&len.to_le_bytes())?; // captured length
    out.write_all(&len.to_le_bytes())?; // original length
    out.write_all(&record.data)
}

/// Writes a whole file: header, then every record in order.
pub fn write_file<W: Write>(out: &mut W, link_type: u32, records: &[PcapRecord]) -> io::Result<()> {
    write_header(out, link_type)?;
    records.iter().try_for_each(|record| write_record(out, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_golden_header_and_record() {
        let mut out = Vec::new();
        let record = PcapRecord { timestamp_ns: 1_675_782_061_987_009_574, data: vec![0xde, 0xad].into() };
        write_file(&mut out, LINKTYPE_ETHERNET, &[record]).unwrap();
        let expected: Vec<u8> = [
            &[0x4d, 0x3c, 0xb2, 0xa1, 2, 0, 4, 0][..],
            &[0; 8],
            &[0x00, 0x00, 0x04, 0x00, 1, 0, 0, 0],
            &1_675_782_061u32.to_le_bytes(),
            &987_009_574u32.to_le_bytes(),
            &[2, 0, 0, 0, 2, 0, 0, 0, 0xde, 0xad],
        ]
        .concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn rejects_records_over_the_snap_length() {
        let record = PcapRecord { timestamp_ns: 0, data: vec![0; SNAPLEN as usize + 1].into() };
        let err = write_record(&mut Vec::new(), &record).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
