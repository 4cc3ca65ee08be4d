//! Frames as the filter queues them, encoded once, straight into the batch that will carry them.
//!
//! The frames of every request (headers, trailers, body chunks) are encoded from what the host
//! handed over, borrowed: the header pairs buffer and the body bytes, in as many pieces as the
//! host's buffer holds them ([`BodyBytes`]). Building `Frame` messages first would copy every
//! header name and value into its own allocation only to copy it again into the batch. The
//! bytes are exactly prost's encoding of the equivalent `Frame` (tested below), so the contract
//! stays the `.proto`. An HTTP exchange's start is encoded from the metadata its connection
//! shares, encoded once per connection ([`SharedMetadata`]), plus its own few fields: no
//! per-request copies of names, labels and addresses. Rarer frames (ends, Diameter messages) are
//! built as messages and encoded by prost.

use packet_inspector_proto::capture::{Direction, Frame, Protocol, TransactionMetadata};
use prost::{
    encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType},
    Message,
};

use crate::pairs::Pair;

/// `FrameBatch` field numbers.
pub const BATCH_SEQUENCE: u32 = 1;
pub const BATCH_FRAMES: u32 = 2;
pub const BATCH_CAPTURES_DROPPED: u32 = 3;

/// `Frame` field numbers.
const FRAME_TRANSACTION_ID: u32 = 1;
const FRAME_TIMESTAMP: u32 = 2;
const FRAME_START: u32 = 10;
const FRAME_HEADERS: u32 = 11;
const FRAME_BODY: u32 = 12;
const FRAME_TRAILERS: u32 = 13;

/// `TransactionStart.metadata`.
const START_METADATA: u32 = 1;
/// `TransactionMetadata` fields a start frame writes itself.
const METADATA_PROTOCOL: u32 = 8;
const METADATA_REQUEST_ID: u32 = 12;
const METADATA_CONNECTION_ID: u32 = 13;
const METADATA_START_TIME: u32 = 14;

/// The `TransactionMetadata` fields every exchange of a downstream connection shares, encoded
/// once: identity, labels, role and gateway (fields 1-7), and the addresses (9-10), apart so
/// that a start frame writes its protocol (8) between them and the whole comes out in field
/// order, as prost would write it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedMetadata {
    head: Vec<u8>,
    addresses: Vec<u8>,
}

impl SharedMetadata {
    /// Encodes the shared fields of `metadata`; the per-exchange ones (protocol, upstream,
    /// request id, connection id, start time) are left out whatever they hold.
    pub fn encode(metadata: TransactionMetadata) -> Self {
        let TransactionMetadata {
            pod_name,
            namespace,
            workload,
            node,
            labels,
            role,
            gateway,
            downstream_remote,
            downstream_local,
            ..
        } = metadata;
        let head =
            TransactionMetadata { pod_name, namespace, workload, node, labels, role, gateway, ..Default::default() };
        let addresses = TransactionMetadata { downstream_remote, downstream_local, ..Default::default() };
        Self { head: head.encode_to_vec(), addresses: addresses.encode_to_vec() }
    }
}

/// What an HTTP exchange's start frame holds beyond its connection's [`SharedMetadata`].
#[derive(Debug, Clone, Copy)]
pub struct StartRef<'a> {
    pub shared: &'a SharedMetadata,
    pub protocol: Protocol,
    pub request_id: &'a str,
    pub connection_id: u64,
    pub start_time_ns: u64,
}

impl StartRef<'_> {
    /// The length of the encoded `TransactionMetadata`.
    fn metadata_len(&self) -> usize {
        self.shared.head.len()
            + varint_field_len(METADATA_PROTOCOL, self.protocol as i32 as u64)
            + self.shared.addresses.len()
            + bytes_field_len(METADATA_REQUEST_ID, self.request_id.len())
            + varint_field_len(METADATA_CONNECTION_ID, self.connection_id)
            + varint_field_len(METADATA_START_TIME, self.start_time_ns)
    }

    fn encode_metadata(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.shared.head);
        put_varint_field(METADATA_PROTOCOL, self.protocol as i32 as u64, out);
        out.extend_from_slice(&self.shared.addresses);
        put_bytes_field(METADATA_REQUEST_ID, self.request_id.as_bytes(), out);
        put_varint_field(METADATA_CONNECTION_ID, self.connection_id, out);
        put_varint_field(METADATA_START_TIME, self.start_time_ns, out);
    }
}

/// The captured part of one body event: the first `len` bytes of the pieces the host's buffer
/// holds them in (a native host hands over Envoy's buffer slices; proxy-wasm one copy). They are
/// copied once, by [`FrameRef::encode`], straight into the batch: gathering the pieces first
/// would copy every captured byte twice.
#[derive(Debug, Clone, Copy)]
pub struct BodyBytes<'a> {
    pieces: &'a [&'a [u8]],
    len: usize,
}

impl<'a> BodyBytes<'a> {
    /// The first `wanted` bytes of `pieces`, or all of them when they hold fewer.
    pub fn prefix(pieces: &'a [&'a [u8]], wanted: usize) -> Self {
        let held: usize = pieces.iter().map(|piece| piece.len()).sum();
        Self { pieces, len: wanted.min(held) }
    }

    /// All of `piece`.
    pub fn whole(piece: &'a &'a [u8]) -> Self {
        Self::prefix(std::slice::from_ref(piece), piece.len())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends the bytes to `out`.
    fn put(&self, out: &mut Vec<u8>) {
        let mut left = self.len;
        for piece in self.pieces {
            if left == 0 {
                break;
            }
            // The whole piece, or its first `left` bytes when it holds more.
            let taken = piece.get(..left).unwrap_or(piece);
            out.extend_from_slice(taken);
            left -= taken.len();
        }
    }
}

/// One frame, ready to be encoded into a batch.
// Built on the stack and passed by reference, one at a time: boxing the large variant would
// cost an allocation per frame and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum FrameRef<'a> {
    /// A frame built as a message.
    Message(Frame),
    /// An HTTP exchange's `TransactionStart` frame.
    Start { transaction_id: u64, timestamp_ns: u64, start: StartRef<'a> },
    /// A `Headers` frame (kind `headers`, or `trailers` when `trailers`).
    Headers {
        transaction_id: u64,
        timestamp_ns: u64,
        trailers: bool,
        direction: Direction,
        pairs: &'a [Pair<'a>],
        end_of_stream: bool,
    },
    /// A `BodyChunk` frame.
    Body {
        transaction_id: u64,
        timestamp_ns: u64,
        direction: Direction,
        data: BodyBytes<'a>,
        truncated_bytes: u64,
        end_of_stream: bool,
    },
}

fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value)
    }
}

fn bytes_field_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        0
    } else {
        delimited_len(tag, len)
    }
}

fn bool_field_len(tag: u32, value: bool) -> usize {
    if value {
        key_len(tag) + 1
    } else {
        0
    }
}

/// A length-delimited field that is always written (an embedded message).
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_varint_field(tag: u32, value: u64, out: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(value, out);
    }
}

fn put_bytes_field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    if !bytes.is_empty() {
        put_delimited_head(tag, bytes.len(), out);
        out.extend_from_slice(bytes);
    }
}

fn put_bool_field(tag: u32, value: bool, out: &mut Vec<u8>) {
    if value {
        encode_key(tag, WireType::Varint, out);
        out.push(1);
    }
}

fn put_delimited_head(tag: u32, len: usize, out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

fn header_len(name: &[u8], value: &[u8]) -> usize {
    bytes_field_len(1, name.len()) + bytes_field_len(2, value.len())
}

impl FrameRef<'_> {
    /// Whether this frame starts a transaction.
    pub fn is_start(&self) -> bool {
        matches!(
            self,
            FrameRef::Start { .. }
                | FrameRef::Message(Frame { kind: Some(packet_inspector_proto::capture::frame::Kind::Start(_)), .. })
        )
    }

    /// Whether this frame ends a transaction.
    pub fn is_end(&self) -> bool {
        matches!(
            self,
            FrameRef::Message(Frame { kind: Some(packet_inspector_proto::capture::frame::Kind::End(_)), .. })
        )
    }

    /// (transaction id, timestamp, kind field, kind message length).
    fn parts(&self) -> (u64, u64, u32, usize) {
        match self {
            FrameRef::Message(_) => (0, 0, 0, 0),
            FrameRef::Start { transaction_id, timestamp_ns, start } => {
                (*transaction_id, *timestamp_ns, FRAME_START, delimited_len(START_METADATA, start.metadata_len()))
            }
            FrameRef::Headers { transaction_id, timestamp_ns, trailers, direction, pairs, end_of_stream } => {
                let headers: usize = pairs.iter().map(|(name, value)| delimited_len(2, header_len(name, value))).sum();
                let len = varint_field_len(1, *direction as i32 as u64) + headers + bool_field_len(3, *end_of_stream);
                (*transaction_id, *timestamp_ns, if *trailers { FRAME_TRAILERS } else { FRAME_HEADERS }, len)
            }
            FrameRef::Body { transaction_id, timestamp_ns, direction, data, truncated_bytes, end_of_stream } => {
                let len = varint_field_len(1, *direction as i32 as u64)
                    + bytes_field_len(2, data.len())
                    + varint_field_len(3, *truncated_bytes)
                    + bool_field_len(4, *end_of_stream);
                (*transaction_id, *timestamp_ns, FRAME_BODY, len)
            }
        }
    }

    /// The length of the encoded `Frame` message.
    fn frame_len(&self) -> usize {
        match self {
            FrameRef::Message(frame) => frame.encoded_len(),
            _ => {
                let (id, timestamp, kind, kind_len) = self.parts();
                varint_field_len(FRAME_TRANSACTION_ID, id)
                    + varint_field_len(FRAME_TIMESTAMP, timestamp)
                    + delimited_len(kind, kind_len)
            }
        }
    }

    /// Bytes this frame adds to an encoded `FrameBatch` (field tag, length prefix, message).
    pub fn framed_len(&self) -> usize {
        delimited_len(BATCH_FRAMES, self.frame_len())
    }

    /// The most bytes a body frame carrying `data_len` bytes adds to a batch, whatever its ids,
    /// times and truncation: what a batch buffer must hold for one at the body limit.
    pub fn max_body_framed_len(data_len: usize) -> usize {
        let body = varint_field_len(1, Direction::Response as i32 as u64)
            + bytes_field_len(2, data_len)
            + varint_field_len(3, u64::MAX)
            + bool_field_len(4, true);
        let frame = varint_field_len(FRAME_TRANSACTION_ID, u64::MAX)
            + varint_field_len(FRAME_TIMESTAMP, u64::MAX)
            + delimited_len(FRAME_BODY, body);
        delimited_len(BATCH_FRAMES, frame)
    }

    /// Appends this frame as one `FrameBatch.frames` entry; writes exactly [`Self::framed_len`]
    /// bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let frame_len = self.frame_len();
        put_delimited_head(BATCH_FRAMES, frame_len, out);
        match self {
            FrameRef::Message(frame) => frame.encode_raw(out),
            FrameRef::Headers { pairs, direction, end_of_stream, .. } => {
                let (id, timestamp, kind, kind_len) = self.parts();
                put_varint_field(FRAME_TRANSACTION_ID, id, out);
                put_varint_field(FRAME_TIMESTAMP, timestamp, out);
                put_delimited_head(kind, kind_len, out);
                put_varint_field(1, *direction as i32 as u64, out);
                for (name, value) in pairs.iter() {
                    put_delimited_head(2, header_len(name, value), out);
                    put_bytes_field(1, name, out);
                    put_bytes_field(2, value, out);
                }
                put_bool_field(3, *end_of_stream, out);
            }
            FrameRef::Start { start, .. } => {
                let (id, timestamp, kind, kind_len) = self.parts();
                put_varint_field(FRAME_TRANSACTION_ID, id, out);
                put_varint_field(FRAME_TIMESTAMP, timestamp, out);
                put_delimited_head(kind, kind_len, out);
                put_delimited_head(START_METADATA, start.metadata_len(), out);
                start.encode_metadata(out);
            }
            FrameRef::Body { direction, data, truncated_bytes, end_of_stream, .. } => {
                let (id, timestamp, kind, kind_len) = self.parts();
                put_varint_field(FRAME_TRANSACTION_ID, id, out);
                put_varint_field(FRAME_TIMESTAMP, timestamp, out);
                put_delimited_head(kind, kind_len, out);
                put_varint_field(1, *direction as i32 as u64, out);
                if !data.is_empty() {
                    put_delimited_head(2, data.len(), out);
                    data.put(out);
                }
                put_varint_field(3, *truncated_bytes, out);
                put_bool_field(4, *end_of_stream, out);
            }
        }
    }
}

/// Appends a batch's `sequence` and `captures_dropped` after its frames (protobuf fields may
/// come in any order; decoders merge them).
pub fn encode_batch_trailer(sequence: u64, captures_dropped: u64, out: &mut Vec<u8>) {
    put_varint_field(BATCH_SEQUENCE, sequence, out);
    put_varint_field(BATCH_CAPTURES_DROPPED, captures_dropped, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::{
        frame::Kind, BodyChunk, FrameBatch, Header, Headers, Role, SocketAddress, TransactionEnd, TransactionStart,
    };

    /// A small deterministic generator (xorshift), enough to vary the inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// Mostly small numbers, sometimes zero, sometimes huge (varint edge cases).
        fn number(&mut self) -> u64 {
            match self.next() % 4 {
                0 => 0,
                1 => self.next() % 200,
                2 => self.next() % 100_000,
                _ => self.next(),
            }
        }
        fn bytes(&mut self, max: u64) -> Vec<u8> {
            let len = if self.next().is_multiple_of(5) { 0 } else { self.next() % max };
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn direction(n: u64) -> Direction {
        [Direction::Unspecified, Direction::Request, Direction::Response][(n % 3) as usize]
    }

    /// Metadata with every field set (the shared ones from `rng`), and what a start frame
    /// of it holds beyond the shared ones.
    fn metadata(rng: &mut Rng, labels: usize) -> TransactionMetadata {
        let text = |rng: &mut Rng| String::from_utf8_lossy(&rng.bytes(30)).into_owned();
        let address = |rng: &mut Rng| {
            (!rng.next().is_multiple_of(4)).then(|| SocketAddress { ip: text(rng), port: rng.number() as u32 })
        };
        TransactionMetadata {
            pod_name: text(rng),
            namespace: text(rng),
            workload: text(rng),
            node: text(rng),
            labels: (0..labels).map(|_| (text(rng), text(rng))).collect(),
            role: [Role::Unspecified, Role::Consumer, Role::Producer][(rng.next() % 3) as usize] as i32,
            gateway: rng.next().is_multiple_of(2),
            protocol: (rng.next() % 5) as i32,
            downstream_remote: address(rng),
            downstream_local: address(rng),
            upstream: None,
            request_id: text(rng),
            connection_id: rng.number(),
            start_time_ns: rng.number(),
        }
    }

    /// A body's captured bytes, in one vector.
    fn bytes_of(body: &BodyBytes<'_>) -> Vec<u8> {
        let mut bytes = Vec::new();
        body.put(&mut bytes);
        bytes
    }

    fn as_prost(frame: &FrameRef<'_>) -> Frame {
        match frame {
            FrameRef::Message(frame) => frame.clone(),
            FrameRef::Start { .. } => {
                let mut bytes = Vec::new();
                frame.encode(&mut bytes);
                FrameBatch::decode(bytes.as_slice()).unwrap().frames.remove(0)
            }
            FrameRef::Headers { transaction_id, timestamp_ns, trailers, direction, pairs, end_of_stream } => {
                let headers = Headers {
                    direction: *direction as i32,
                    headers: pairs.iter().map(|(n, v)| Header { name: n.to_vec(), value: v.to_vec() }).collect(),
                    end_of_stream: *end_of_stream,
                };
                Frame {
                    transaction_id: *transaction_id,
                    timestamp_ns: *timestamp_ns,
                    kind: Some(if *trailers { Kind::Trailers(headers) } else { Kind::Headers(headers) }),
                }
            }
            FrameRef::Body { transaction_id, timestamp_ns, direction, data, truncated_bytes, end_of_stream } => Frame {
                transaction_id: *transaction_id,
                timestamp_ns: *timestamp_ns,
                kind: Some(Kind::Body(BodyChunk {
                    direction: *direction as i32,
                    data: bytes_of(data),
                    truncated_bytes: *truncated_bytes,
                    end_of_stream: *end_of_stream,
                })),
            },
        }
    }

    #[test]
    fn borrowed_frames_encode_exactly_as_prost_does() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..2000 {
            let owned: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.next() % 6).map(|_| (rng.bytes(40), rng.bytes(300))).collect();
            let pairs: Vec<Pair<'_>> = owned.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            // A body in the pieces a host's buffer may hold it in (empty ones too), of which a
            // prefix that may end inside any piece is captured.
            let data = rng.bytes(20_000);
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut rest = data.as_slice();
            while !rest.is_empty() || (rng.next().is_multiple_of(3) && pieces.len() < 4) {
                let (piece, after) = rest.split_at((rng.next() % 6_000).min(rest.len() as u64) as usize);
                pieces.push(piece);
                rest = after;
            }
            let wanted = match rng.next() % 3 {
                0 => data.len(),
                1 => usize::MAX,
                _ => (rng.next() % (data.len() as u64 + 1)) as usize,
            };
            let body = BodyBytes::prefix(&pieces, wanted);
            assert_eq!(bytes_of(&body), data[..wanted.min(data.len())], "{} pieces", pieces.len());
            let frames = [
                FrameRef::Headers {
                    transaction_id: rng.number(),
                    timestamp_ns: rng.number(),
                    trailers: rng.next().is_multiple_of(2),
                    direction: direction(rng.next()),
                    pairs: &pairs,
                    end_of_stream: rng.next().is_multiple_of(2),
                },
                FrameRef::Body {
                    transaction_id: rng.number(),
                    timestamp_ns: rng.number(),
                    direction: direction(rng.next()),
                    data: body,
                    truncated_bytes: rng.number(),
                    end_of_stream: rng.next().is_multiple_of(2),
                },
                FrameRef::Message(Frame {
                    transaction_id: rng.number(),
                    timestamp_ns: rng.number(),
                    kind: Some(Kind::End(TransactionEnd { reason: (rng.next() % 5) as i32, upstream: None })),
                }),
            ];
            for frame in &frames {
                let mut ours = Vec::new();
                frame.encode(&mut ours);
                let batch = FrameBatch { sequence: 0, frames: vec![as_prost(frame)], captures_dropped: 0 };
                assert_eq!(ours, batch.encode_to_vec(), "{frame:?}");
                assert_eq!(ours.len(), frame.framed_len());
                if let FrameRef::Body { data, .. } = frame {
                    assert!(ours.len() <= FrameRef::max_body_framed_len(data.len()), "{frame:?}");
                }
            }
        }
    }

    /// The bound is what the largest such frame takes, not more.
    #[test]
    fn the_body_frame_bound_is_reached_by_the_largest_frame() {
        for data_len in [0, 1, 127, 128, 65_536, 16 << 20] {
            let data = vec![7; data_len];
            let data = data.as_slice();
            let frame = FrameRef::Body {
                transaction_id: u64::MAX,
                timestamp_ns: u64::MAX,
                direction: Direction::Response,
                data: BodyBytes::whole(&data),
                truncated_bytes: u64::MAX,
                end_of_stream: true,
            };
            assert_eq!(frame.framed_len(), FrameRef::max_body_framed_len(data_len), "{data_len} bytes");
        }
    }

    /// A start frame from shared metadata encodes as prost encodes the whole metadata (at most
    /// one label: a map's entries come in the map's order), and decodes to it with several.
    #[test]
    fn start_frames_encode_exactly_as_prost_does() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..2000 {
            let labels = if case % 10 == 0 { 5 } else { (rng.next() % 2) as usize };
            let metadata = metadata(&mut rng, labels);
            let shared = SharedMetadata::encode(metadata.clone());
            let frame = FrameRef::Start {
                transaction_id: rng.number(),
                timestamp_ns: rng.number(),
                start: StartRef {
                    shared: &shared,
                    protocol: metadata.protocol(),
                    request_id: &metadata.request_id,
                    connection_id: metadata.connection_id,
                    start_time_ns: metadata.start_time_ns,
                },
            };
            let (transaction_id, timestamp_ns) = match frame {
                FrameRef::Start { transaction_id, timestamp_ns, .. } => (transaction_id, timestamp_ns),
                _ => unreachable!(),
            };
            let expected = Frame {
                transaction_id,
                timestamp_ns,
                kind: Some(Kind::Start(TransactionStart { metadata: Some(metadata.clone()) })),
            };
            let mut ours = Vec::new();
            frame.encode(&mut ours);
            assert_eq!(ours.len(), frame.framed_len());
            let batch = FrameBatch { sequence: 0, frames: vec![expected.clone()], captures_dropped: 0 };
            if labels <= 1 {
                assert_eq!(ours, batch.encode_to_vec(), "{metadata:?}");
            }
            assert_eq!(FrameBatch::decode(ours.as_slice()).unwrap(), batch);
            assert!(frame.is_start() && !frame.is_end());
        }
    }

    #[test]
    fn shared_metadata_leaves_out_what_each_exchange_has_of_its_own() {
        let mut rng = Rng(7);
        let mut metadata = metadata(&mut rng, 2);
        metadata.upstream = Some(SocketAddress { ip: "10.0.0.1".into(), port: 80 });
        let shared = SharedMetadata::encode(metadata.clone());
        let mut other = metadata.clone();
        (other.protocol, other.upstream, other.request_id, other.connection_id, other.start_time_ns) =
            (0, None, "another".into(), 99, 1);
        assert_eq!(SharedMetadata::encode(other), shared);
    }

    #[test]
    fn a_batch_of_frames_and_trailer_decodes_to_what_was_queued() {
        let pairs: Vec<Pair<'_>> = vec![(b":status", b"200"), (b"x-empty", b"")];
        let start = Frame { transaction_id: 7, timestamp_ns: 1, kind: Some(Kind::Start(TransactionStart::default())) };
        let frames = [
            FrameRef::Message(start.clone()),
            FrameRef::Headers {
                transaction_id: 7,
                timestamp_ns: 2,
                trailers: false,
                direction: Direction::Response,
                pairs: &pairs,
                end_of_stream: false,
            },
        ];
        let mut bytes = Vec::new();
        for frame in &frames {
            frame.encode(&mut bytes);
        }
        encode_batch_trailer(42, 3, &mut bytes);
        let batch = FrameBatch::decode(bytes.as_slice()).unwrap();
        assert_eq!((batch.sequence, batch.captures_dropped), (42, 3));
        assert_eq!(batch.frames, vec![start, as_prost(&frames[1])]);
    }
}
