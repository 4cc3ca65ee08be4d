//! An HTTP/2 exchange as a standalone cleartext HTTP/2 conversation (RFC 9113), cut into timed
//! pieces for the TCP synthesizer.
//!
//! Client: the connection preface, SETTINGS, a connection WINDOW_UPDATE; server: SETTINGS, the
//! same WINDOW_UPDATE, SETTINGS ACK; client: SETTINGS ACK. Both sides announce the largest
//! stream window and widen the connection window to match, so any captured body fits the flow
//! control without further updates. The exchange is stream 1: HEADERS (split into
//! CONTINUATION frames beyond the receiver's maximum frame size), DATA split at that size,
//! trailers as a final HEADERS; END_STREAM on the last frame of each direction.
//!
//! The maximum frame size is HTTP/2's default (16 KiB), except in gRPC conversations, where each
//! side announces one large enough for the other side's header blocks: Wireshark 4.0's gRPC
//! dissector loses a call's path and content type when its header block is continued in
//! CONTINUATION frames (it fails an assertion), and the file would not decode. Header blocks
//! are HPACK never-indexed literals (see [`crate::hpack`]), so each file decodes with no
//! earlier state.

use packet_inspector_proto::capture::Header;

use crate::{
    assembly::HttpMessage,
    hpack,
    http1::TRUNCATED_HEADER,
    tcp::{BodySpan, Piece},
    wire,
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE's default, which both sides keep.
pub const MAX_FRAME_SIZE: usize = 16_384;
const MAX_WINDOW: u32 = (1 << 31) - 1;
const DEFAULT_WINDOW: u32 = 65_535;
const STREAM: u32 = 1;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
/// The largest frame size announced: HTTP/2 allows 2^24 - 1, but Wireshark 4.0 reads frame
/// lengths over 65,535 modulo 65,536. Envoy's default header limit (60 KiB) keeps real header
/// blocks below it; a larger gRPC block still goes into CONTINUATION frames.
const LARGEST_FRAME_SIZE: usize = 65_535;

/// Appends one frame (9-octet header, then the payload).
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
}

/// SETTINGS (and the connection WINDOW_UPDATE) of one side, which receives frames of at most
/// `max_frame_size`.
fn settings(out: &mut Vec<u8>, push: bool, max_frame_size: usize) {
    let mut payload = Vec::new();
    let mut setting = |id: u16, value: u32| {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    };
    if !push {
        setting(SETTINGS_ENABLE_PUSH, 0);
    }
    setting(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW);
    if max_frame_size != MAX_FRAME_SIZE {
        setting(SETTINGS_MAX_FRAME_SIZE, max_frame_size as u32);
    }
    frame(out, SETTINGS, 0, 0, &payload);
    frame(out, WINDOW_UPDATE, 0, 0, &(MAX_WINDOW - DEFAULT_WINDOW).to_be_bytes());
}

/// A header block as HEADERS plus CONTINUATION frames of at most `max_frame_size`.
fn header_frames(out: &mut Vec<u8>, block: &[u8], end_stream: bool, max_frame_size: usize) {
    let mut chunks = block.chunks(max_frame_size).peekable();
    let first = chunks.next().unwrap_or(&[]);
    let only = chunks.peek().is_none();
    let flags = if end_stream { END_STREAM } else { 0 } | if only { END_HEADERS } else { 0 };
    frame(out, HEADERS, flags, STREAM, first);
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame(out, CONTINUATION, if last { END_HEADERS } else { 0 }, STREAM, chunk);
    }
}

fn is_grpc(message: &HttpMessage) -> bool {
    message.header(b"content-type").is_some_and(|ct| ct.starts_with(b"application/grpc"))
}

/// Length of the longest run of whole gRPC messages (5-byte prefix + length) at the start of
/// `body`: a truncated gRPC body is cut there so the gRPC framing in the pcap stays valid.
pub fn whole_grpc_messages(body: &[u8]) -> usize {
    let mut at = 0;
    while let Some(prefix) = body.get(at..at + 5) {
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        match at.checked_add(5 + len) {
            Some(end) if end <= body.len() => at = end,
            _ => break,
        }
    }
    at
}

/// The DATA chunks to write: the captured body, cut to whole gRPC messages when a gRPC body
/// was truncated.
fn body_chunks(message: &HttpMessage, grpc: bool) -> Vec<(u64, &[u8])> {
    let mut budget = if grpc && message.truncated_bytes > 0 {
        let body: Vec<u8> = message.body.iter().flat_map(|(_, c)| c.iter().copied()).collect();
        whole_grpc_messages(&body)
    } else {
        usize::MAX
    };
    let mut chunks = Vec::new();
    for (at, chunk) in &message.body {
        let take = chunk.len().min(budget);
        if take > 0 {
            chunks.push((*at, &chunk[..take]));
        }
        budget -= take;
    }
    chunks
}

/// A field as HTTP/2 can carry it (see [`crate::wire`]); pseudo-headers that Wireshark parses
/// get their own rules.
fn field(header: &Header) -> (Vec<u8>, Vec<u8>) {
    let name = wire::name(&header.name).to_ascii_lowercase();
    let value = match name.as_slice() {
        b":method" => wire::token(&header.value).into_owned(),
        b":path" => wire::target(&header.value).into_owned(),
        b":authority" | b":scheme" => wire::authority(&header.value).into_owned(),
        b":status" => wire::status(Some(&header.value)).to_string().into_bytes(),
        _ => wire::value(&header.value).into_owned(),
    };
    (name, value)
}

fn headers_of(message: &HttpMessage, body_len: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = message
        .headers
        .iter()
        // Connection-specific fields are not allowed in HTTP/2 (RFC 9113 §8.2.2).
        .filter(|h| !matches!(h.name.as_slice(), b"connection" | b"transfer-encoding" | b"keep-alive" | b"upgrade"))
        .filter(|h| !(message.truncated_bytes > 0 && h.name == b"content-length"))
        .map(field)
        .collect();
    if message.truncated_bytes > 0 {
        let note = format!("{body_len} of {} bytes captured", message.body_len() as u64 + message.truncated_bytes);
        fields.push((TRUNCATED_HEADER.as_bytes().to_vec(), note.into_bytes()));
    }
    fields
}

/// One direction's header blocks, encoded once: they size the frames the receiver announces.
struct Blocks {
    headers: Vec<u8>,
    trailers: Option<Vec<u8>>,
}

impl Blocks {
    fn of(message: &HttpMessage) -> Self {
        let body_len: usize = body_chunks(message, is_grpc(message)).iter().map(|(_, c)| c.len()).sum();
        let fields = headers_of(message, body_len);
        let headers = hpack::encode_block(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let trailers = (!message.trailers.is_empty()).then(|| {
            let fields: Vec<(Vec<u8>, Vec<u8>)> = message.trailers.iter().map(field).collect();
            hpack::encode_block(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
        });
        Self { headers, trailers }
    }

    /// The frame size a receiver of these blocks announces (see the module docs).
    fn frame_size(&self, grpc: bool) -> usize {
        let largest = self.headers.len().max(self.trailers.as_ref().map_or(0, Vec::len));
        if grpc {
            largest.clamp(MAX_FRAME_SIZE, LARGEST_FRAME_SIZE)
        } else {
            MAX_FRAME_SIZE
        }
    }
}

/// The frames of one direction on stream 1, as timed pieces.
fn message_pieces(message: &HttpMessage, blocks: &Blocks, aborted: bool, max_frame_size: usize) -> Vec<Piece<'static>> {
    let chunks = body_chunks(message, is_grpc(message));
    let mut head = Vec::new();
    header_frames(
        &mut head,
        &blocks.headers,
        chunks.is_empty() && blocks.trailers.is_none() && !aborted,
        max_frame_size,
    );
    let mut pieces = vec![Piece::new(message.headers_ns, head)];
    let last_chunk = chunks.len().saturating_sub(1);
    let mut body_offset = 0;
    for (index, (at, chunk)) in chunks.iter().enumerate() {
        let mut bytes = Vec::with_capacity(chunk.len() + 9 * (chunk.len() / max_frame_size + 1));
        let frames: Vec<&[u8]> = chunk.chunks(max_frame_size).collect();
        let mut body = Vec::with_capacity(frames.len());
        for (n, data) in frames.iter().enumerate() {
            let last = index == last_chunk && n + 1 == frames.len() && blocks.trailers.is_none() && !aborted;
            frame(&mut bytes, DATA, if last { END_STREAM } else { 0 }, STREAM, data);
            body.push(BodySpan { body_offset, within: bytes.len() - data.len()..bytes.len() });
            body_offset += data.len();
        }
        pieces.push(Piece { timestamp_ns: *at, bytes: bytes.into(), body });
    }
    if let Some(trailers) = &blocks.trailers {
        let mut bytes = Vec::new();
        header_frames(&mut bytes, trailers, true, max_frame_size);
        pieces.push(Piece::new(message.trailers_ns, bytes));
    }
    pieces
}

/// The whole conversation as (client pieces, server pieces): each side's SETTINGS at `open_ns`
/// (the client acknowledging the server's at once), then the request and the response. An
/// exchange cut short without a response ends with RST_STREAM (CANCEL) at `end_ns`; when not
/// `complete` (aborted, or a segment of a stream still open) no END_STREAM is sent.
pub fn conversation(
    request: &HttpMessage,
    response: Option<&HttpMessage>,
    open_ns: u64,
    end_ns: u64,
    complete: bool,
) -> (Vec<Piece<'static>>, Vec<Piece<'static>>) {
    let grpc = is_grpc(request) || response.is_some_and(is_grpc);
    let request_blocks = Blocks::of(request);
    let response_blocks = response.map(Blocks::of);
    // Each side announces what it receives: the server sizes request frames, the client
    // response frames.
    let request_frame_size = request_blocks.frame_size(grpc);
    let response_frame_size = response_blocks.as_ref().map_or(MAX_FRAME_SIZE, |b| b.frame_size(grpc));

    let mut start = PREFACE.to_vec();
    settings(&mut start, false, response_frame_size);
    let mut ack = Vec::new();
    frame(&mut ack, SETTINGS, ACK, 0, &[]);
    let mut client = vec![Piece::new(open_ns, start), Piece::new(open_ns, ack)];
    client.extend(message_pieces(request, &request_blocks, !complete, request_frame_size));

    let mut start = Vec::new();
    settings(&mut start, true, request_frame_size);
    frame(&mut start, SETTINGS, ACK, 0, &[]);
    let mut server = vec![Piece::new(open_ns, start)];
    match (response, &response_blocks) {
        (Some(response), Some(blocks)) => {
            server.extend(message_pieces(response, blocks, !complete, response_frame_size))
        }
        _ => {
            let mut reset = Vec::new();
            frame(&mut reset, RST_STREAM, 0, STREAM, &0x8u32.to_be_bytes());
            server.push(Piece::new(end_ns, reset));
        }
    }
    (client, server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &[u8]) -> Header {
        Header { name: name.into(), value: value.to_vec() }
    }

    /// (type, flags, stream, payload length) of every frame in `bytes`.
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + 9 <= bytes.len() {
            let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
            let stream = u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]]);
            out.push((bytes[at + 3], bytes[at + 4], stream, len));
            at += 9 + len;
        }
        assert_eq!(at, bytes.len(), "frames fill the bytes exactly");
        out
    }

    #[test]
    fn frame_header_golden() {
        let mut out = Vec::new();
        frame(&mut out, DATA, END_STREAM, 1, b"hi");
        assert_eq!(out, [0, 0, 2, 0, 1, 0, 0, 0, 1, b'h', b'i']);
    }

    #[test]
    fn client_side_frames() {
        let request = HttpMessage {
            headers: vec![h(":method", b"POST"), h(":path", b"/x"), h("te", b"trailers")],
            body: vec![(5, vec![1; 40_000])],
            trailers: vec![h("x-sum", b"1")],
            ..Default::default()
        };
        let (pieces, _) = conversation(&request, None, 1, 2, true);
        assert!(pieces[0].bytes.starts_with(PREFACE));
        let all: Vec<u8> = pieces.iter().flat_map(|p| p.bytes.to_vec()).collect();
        let kinds = frames(&all[PREFACE.len()..]);
        assert_eq!(kinds[0], (SETTINGS, 0, 0, 12));
        assert_eq!(kinds[1], (WINDOW_UPDATE, 0, 0, 4));
        assert_eq!(kinds[2], (SETTINGS, ACK, 0, 0));
        assert_eq!(kinds[3].0, HEADERS);
        assert_eq!(kinds[3].1, END_HEADERS, "no END_STREAM: a body follows");
        let data: Vec<_> = kinds.iter().filter(|k| k.0 == DATA).collect();
        assert_eq!(data.iter().map(|k| k.3).collect::<Vec<_>>(), vec![16_384, 16_384, 7_232]);
        assert!(data.iter().all(|k| k.1 == 0), "END_STREAM is on the trailers");
        assert_eq!(kinds.last().unwrap().0, HEADERS);
        assert_eq!(kinds.last().unwrap().1, END_HEADERS | END_STREAM);
    }

    #[test]
    fn big_header_block_uses_continuation() {
        let request =
            HttpMessage { headers: vec![h(":method", b"GET"), h("x-big", &vec![b'v'; 40_000])], ..Default::default() };
        let (pieces, _) = conversation(&request, None, 1, 2, true);
        let all: Vec<u8> = pieces.iter().skip(2).flat_map(|p| p.bytes.to_vec()).collect();
        let kinds = frames(&all);
        assert_eq!(
            kinds.iter().map(|k| (k.0, k.1)).collect::<Vec<_>>(),
            vec![(HEADERS, END_STREAM), (CONTINUATION, 0), (CONTINUATION, END_HEADERS),]
        );
    }

    #[test]
    fn grpc_sides_announce_frames_large_enough_for_header_blocks() {
        let request = HttpMessage {
            headers: vec![
                h(":method", b"POST"),
                h("content-type", b"application/grpc"),
                h("x-big", &vec![b'v'; 40_000]),
            ],
            ..Default::default()
        };
        let response = HttpMessage {
            headers: vec![h(":status", b"200"), h("content-type", b"application/grpc")],
            ..Default::default()
        };
        let (client, server) = conversation(&request, Some(&response), 1, 2, true);
        let request_frames = frames(&client[2].bytes);
        assert_eq!(request_frames.len(), 1, "one HEADERS frame, no CONTINUATION");
        let server_settings = frames(&server[0].bytes)[0];
        assert_eq!(server_settings.0, SETTINGS);
        let payload = &server[0].bytes[9..9 + server_settings.3];
        let announced = payload.chunks(6).find(|s| s[..2] == SETTINGS_MAX_FRAME_SIZE.to_be_bytes()).unwrap();
        assert_eq!(u32::from_be_bytes(announced[2..].try_into().unwrap()) as usize, request_frames[0].3);
        // The client receives small response blocks: it keeps the default.
        let client_settings = &client[0].bytes[PREFACE.len() + 9..PREFACE.len() + 9 + 12];
        assert!(!client_settings.chunks(6).any(|s| s[..2] == SETTINGS_MAX_FRAME_SIZE.to_be_bytes()));
    }

    #[test]
    fn trailers_only_response_and_reset() {
        let response = HttpMessage {
            headers: vec![h(":status", b"200"), h("content-type", b"application/grpc"), h("grpc-status", b"5")],
            ..Default::default()
        };
        let (_, pieces) = conversation(&HttpMessage::default(), Some(&response), 1, 2, true);
        let kinds = frames(&pieces[1].bytes);
        assert_eq!(kinds, vec![(HEADERS, END_HEADERS | END_STREAM, 1, kinds[0].3)]);
        let (_, reset) = conversation(&HttpMessage::default(), None, 1, 2, false);
        assert_eq!(frames(&reset[1].bytes), vec![(RST_STREAM, 0, 1, 4)]);
    }

    #[test]
    fn truncated_grpc_body_is_cut_at_a_message_boundary() {
        let mut body = vec![0, 0, 0, 0, 3, b'a', b'b', b'c'];
        body.extend_from_slice(&[0, 0, 0, 0, 10, b'x']); // 10 announced, 1 captured
        assert_eq!(whole_grpc_messages(&body), 8);
        let response = HttpMessage {
            headers: vec![h(":status", b"200"), h("content-type", b"application/grpc"), h("content-length", b"99")],
            body: vec![(3, body)],
            truncated_bytes: 9,
            ..Default::default()
        };
        let (_, pieces) = conversation(&HttpMessage::default(), Some(&response), 1, 2, true);
        let data = frames(&pieces[2].bytes);
        assert_eq!(data, vec![(DATA, END_STREAM, 1, 8)]);
        let head = &pieces[1].bytes;
        assert!(head.windows(28).any(|w| w == TRUNCATED_HEADER.as_bytes()));
        assert!(!head.windows(14).any(|w| w == b"content-length"), "the stale length is dropped");
    }
}
