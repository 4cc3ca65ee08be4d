//! Diameter message framing over a TCP byte stream (RFC 6733 §3): each direction of a
//! connection has a [`Framer`] fed with the bytes as Envoy hands them over, whatever their
//! split, and giving back whole messages.
//!
//! The header is 20 bytes: version (1), message length (3, header included), flags (1),
//! command code (3), application id (4), hop-by-hop id (4), end-to-end id (4). A version other
//! than 1, or a length that is not a multiple of 4 or shorter than the header, means the stream
//! is not (or no longer) Diameter: framing stops for that direction ([`Event::Broken`]); there
//! is no reliable marker to resynchronise on, and guessing would produce wrong captures. A
//! message longer than the limit is skipped over without being buffered ([`Event::Oversized`]).
//! At most one message is ever buffered.

/// The fixed header length.
pub const HEADER_LEN: usize = 20;
const REQUEST_FLAG: u8 = 0x80;

/// The header fields a capture is filed and paired by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub length: u32,
    pub request: bool,
    pub command_code: u32,
    pub application_id: u32,
    pub hop_by_hop_id: u32,
    pub end_to_end_id: u32,
}

fn be24(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes([0, *bytes.first()?, *bytes.get(1)?, *bytes.get(2)?]))
}

fn be32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// Parses the header of a whole message (`None` when shorter than the header).
pub fn header(message: &[u8]) -> Option<Header> {
    Some(Header {
        length: be24(message.get(1..4)?)?,
        request: message.get(4)? & REQUEST_FLAG != 0,
        command_code: be24(message.get(5..8)?)?,
        application_id: be32(message.get(8..12)?)?,
        hop_by_hop_id: be32(message.get(12..16)?)?,
        end_to_end_id: be32(message.get(16..20)?)?,
    })
}

/// Why a direction stopped being framed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    BadVersion(u8),
    BadLength(u32),
}

impl std::fmt::Display for FramingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BadVersion(version) => write!(f, "Diameter version {version} (expected 1)"),
            Self::BadLength(length) => {
                write!(f, "Diameter message length {length} (not a multiple of 4 of at least 20)")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Vec<u8>),
    /// A message longer than the limit went by uncaptured.
    Oversized {
        length: u32,
    },
    /// Framing stopped for this direction.
    Broken(FramingError),
}

#[derive(Debug)]
pub struct Framer {
    buffer: Vec<u8>,
    /// Bytes of an oversized message still to let pass.
    skip: usize,
    broken: bool,
    max_message: usize,
}

impl Framer {
    pub fn new(max_message: usize) -> Self {
        Self { buffer: Vec::new(), skip: 0, broken: false, max_message: max_message.max(HEADER_LEN) }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Feeds the next bytes of the stream; returns what they completed.
    pub fn push(&mut self, mut data: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        while !self.broken {
            if self.skip > 0 {
                if data.is_empty() {
                    break;
                }
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
                continue;
            }
            // Bytes wanted: the version and length first, then the whole message.
            let want = match self.buffer.get(..4).and_then(|h| Some((*h.first()?, be24(h.get(1..)?)?))) {
                None => 4,
                Some((version, _)) if version != 1 => return self.fail(events, FramingError::BadVersion(version)),
                Some((_, length)) if length < HEADER_LEN as u32 || length % 4 != 0 => {
                    return self.fail(events, FramingError::BadLength(length));
                }
                Some((_, length)) if length as usize > self.max_message => {
                    self.skip = length as usize - self.buffer.len();
                    self.buffer.clear();
                    events.push(Event::Oversized { length });
                    continue;
                }
                Some((_, length)) => length as usize,
            };
            if want > 4 && self.buffer.len() == want {
                events.push(Event::Message(std::mem::take(&mut self.buffer)));
                continue;
            }
            if data.is_empty() {
                break;
            }
            let n = (want - self.buffer.len()).min(data.len());
            self.buffer.extend_from_slice(data.get(..n).unwrap_or_default());
            data = data.get(n..).unwrap_or_default();
        }
        events
    }

    fn fail(&mut self, mut events: Vec<Event>, error: FramingError) -> Vec<Event> {
        self.broken = true;
        self.buffer = Vec::new();
        events.push(Event::Broken(error));
        events
    }

    /// The stream ended: bytes of an incomplete message (0 when it ended between messages).
    pub fn finish(&mut self) -> usize {
        let partial = self.buffer.len() + self.skip;
        self.buffer = Vec::new();
        self.skip = 0;
        partial
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of `length` bytes (a multiple of 4, at least 20) with recognisable ids.
    fn message(length: u32, request: bool, id: u32) -> Vec<u8> {
        let mut out = vec![1];
        out.extend_from_slice(&length.to_be_bytes()[1..]);
        out.push(if request { 0x80 } else { 0 });
        out.extend_from_slice(&272u32.to_be_bytes()[1..]); // Credit-Control
        out.extend_from_slice(&4u32.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&(id + 1).to_be_bytes());
        out.resize(length as usize, 0xab);
        out
    }

    fn messages(events: &[Event]) -> Vec<Vec<u8>> {
        events.iter().filter_map(|e| if let Event::Message(m) = e { Some(m.clone()) } else { None }).collect()
    }

    #[test]
    fn header_fields() {
        let parsed = header(&message(64, true, 7)).unwrap();
        assert_eq!(
            parsed,
            Header {
                length: 64,
                request: true,
                command_code: 272,
                application_id: 4,
                hop_by_hop_id: 7,
                end_to_end_id: 8
            }
        );
        assert_eq!(header(&[1, 0, 0]), None);
    }

    #[test]
    fn split_at_every_byte() {
        let whole = message(52, true, 1);
        for cut in 1..whole.len() {
            let mut framer = Framer::new(1 << 20);
            let mut events = framer.push(&whole[..cut]);
            assert!(events.is_empty(), "cut {cut}");
            events.extend(framer.push(&whole[cut..]));
            assert_eq!(messages(&events), vec![whole.clone()], "cut {cut}");
        }
    }

    #[test]
    fn several_messages_in_one_read_and_byte_by_byte() {
        let stream = [message(20, true, 1), message(40, false, 1), message(100, true, 2)].concat();
        let mut framer = Framer::new(1 << 20);
        assert_eq!(messages(&framer.push(&stream)).len(), 3);
        let mut framer = Framer::new(1 << 20);
        let events: Vec<Event> = stream.iter().flat_map(|b| framer.push(&[*b])).collect();
        assert_eq!(messages(&events), vec![message(20, true, 1), message(40, false, 1), message(100, true, 2)]);
        assert_eq!(framer.finish(), 0);
    }

    #[test]
    fn large_message_over_many_reads() {
        let whole = message(200_000, true, 9);
        let mut framer = Framer::new(1 << 20);
        let events: Vec<Event> = whole.chunks(16_384).flat_map(|c| framer.push(c)).collect();
        assert_eq!(messages(&events), vec![whole]);
    }

    #[test]
    fn oversized_messages_are_skipped_and_framing_goes_on() {
        let stream = [message(400, true, 1), message(20, false, 1)].concat();
        let mut framer = Framer::new(100);
        let events: Vec<Event> = stream.chunks(7).flat_map(|c| framer.push(c)).collect();
        assert_eq!(events, vec![Event::Oversized { length: 400 }, Event::Message(message(20, false, 1))]);
    }

    #[test]
    fn truncated_stream_reports_the_partial_bytes() {
        let mut framer = Framer::new(1 << 20);
        assert!(framer.push(&message(64, true, 1)[..30]).is_empty());
        assert_eq!(framer.finish(), 30);
    }

    /// The fuzz target's property on seeded random streams: however a stream is split, the
    /// framer yields the same events, and every message has a valid header and its length.
    #[test]
    fn framing_does_not_depend_on_how_the_stream_is_split() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..500 {
            let mut stream = Vec::new();
            for _ in 0..next() % 6 {
                let length = 20 + 4 * (next() % 60) as u32;
                stream.extend(message(length, next() % 2 == 0, next() as u32));
            }
            if case % 3 == 0 {
                let garbage: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
                stream.extend(garbage);
            }
            let mut whole = Framer::new(200);
            let mut expected = whole.push(&stream);
            expected.push(Event::Oversized { length: whole.finish() as u32 });
            let mut pieces = Framer::new(200);
            let mut events = Vec::new();
            let mut rest = stream.as_slice();
            while !rest.is_empty() {
                let n = ((next() % 50) as usize + 1).min(rest.len());
                events.extend(pieces.push(&rest[..n]));
                rest = &rest[n..];
            }
            events.push(Event::Oversized { length: pieces.finish() as u32 });
            assert_eq!(events, expected, "case {case}");
            for message in messages(&events) {
                assert_eq!(header(&message).unwrap().length as usize, message.len(), "case {case}");
            }
        }
    }

    #[test]
    fn bad_version_and_lengths_stop_framing() {
        let mut bad_version = message(20, true, 1);
        bad_version[0] = 2;
        let mut framer = Framer::new(1 << 20);
        assert_eq!(framer.push(&bad_version), vec![Event::Broken(FramingError::BadVersion(2))]);
        assert!(framer.is_broken());
        assert!(framer.push(&message(20, true, 1)).is_empty(), "a broken direction stays broken");
        for length in [0u32, 8, 19, 22] {
            let mut framer = Framer::new(1 << 20);
            let header = [1, (length >> 16) as u8, (length >> 8) as u8, length as u8];
            assert_eq!(framer.push(&header), vec![Event::Broken(FramingError::BadLength(length))], "length {length}");
        }
        // Garbage after good messages: what came before is kept.
        let mut framer = Framer::new(1 << 20);
        let events = framer.push(&[message(20, true, 1), b"GET / HTTP/1.1\r\n".to_vec()].concat());
        assert_eq!(events[0], Event::Message(message(20, true, 1)));
        assert!(matches!(events[1], Event::Broken(FramingError::BadVersion(b'G'))));
    }
}
