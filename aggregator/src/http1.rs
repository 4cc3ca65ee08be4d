//! HTTP/1.1 text of an assembled exchange, cut into timed pieces for the TCP synthesizer.
//!
//! Envoy hands the filter headers as a map (pseudo-headers for the request line and status),
//! so the text is rebuilt: request line from `:method` and `:path`, `host` from `:authority`
//! when absent, the other headers in their order. Framing is made consistent with what was
//! captured so Wireshark reassembles it: a truncated body gets a `content-length` matching the
//! captured bytes and an `x-packet-inspector-truncated` header saying how much was cut; a body
//! with trailers is sent chunked. Bytes HTTP cannot carry are mended by [`crate::wire`].

use std::borrow::Cow;

use packet_inspector_proto::capture::Header;

use crate::{
    assembly::HttpMessage,
    tcp::{BodySpan, Piece},
    wire,
};

/// Header added when the body was cut by the filter's limit.
pub const TRUNCATED_HEADER: &str = "x-packet-inspector-truncated";

fn is_pseudo(header: &Header) -> bool {
    header.name.first() == Some(&b':')
}

fn is_framing(header: &Header) -> bool {
    header.name.eq_ignore_ascii_case(b"content-length") || header.name.eq_ignore_ascii_case(b"transfer-encoding")
}

/// How the body is framed in the synthesized text.
enum Framing {
    None,
    Length(usize),
    Chunked,
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(&wire::token(name));
    out.extend_from_slice(b": ");
    out.extend_from_slice(&wire::value(value));
    out.extend_from_slice(b"\r\n");
}

/// Header added when a response may not carry the body the proxy reported (status 1xx, 204,
/// 304, or a response to HEAD).
pub const OMITTED_HEADER: &str = "x-packet-inspector-omitted";

/// Writes the header block (after the start line) and returns the pieces of the message.
/// `bodyless`: the message cannot carry a body (see [`OMITTED_HEADER`]).
fn message_pieces<'a>(
    mut head: Vec<u8>,
    message: &'a HttpMessage,
    is_request: bool,
    extra_host: Option<&[u8]>,
    bodyless: bool,
) -> Vec<Piece<'a>> {
    if bodyless {
        return bodyless_pieces(head, message);
    }
    let body_len = message.body_len();
    let chunked_on_wire = message
        .header(b"transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().windows(7).any(|w| w == b"chunked"));
    let framing = if chunked_on_wire || !message.trailers.is_empty() {
        Framing::Chunked
    } else if message.header(b"content-length").is_some() || message.truncated_bytes > 0 || (is_request && body_len > 0)
    {
        Framing::Length(body_len)
    } else {
        // A response without length: delimited by the end of the connection, as on the wire.
        Framing::None
    };
    if let Some(host) = extra_host {
        write_header(&mut head, b"host", host);
    }
    for header in message.headers.iter().filter(|h| !is_pseudo(h) && !is_framing(h)) {
        write_header(&mut head, &header.name, &header.value);
    }
    match framing {
        Framing::Length(len) => write_header(&mut head, b"content-length", len.to_string().as_bytes()),
        Framing::Chunked => write_header(&mut head, b"transfer-encoding", b"chunked"),
        Framing::None => {}
    }
    if message.truncated_bytes > 0 {
        let note = format!("{} of {} bytes captured", body_len, body_len as u64 + message.truncated_bytes);
        write_header(&mut head, TRUNCATED_HEADER.as_bytes(), note.as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let mut pieces = vec![Piece::new(message.headers_ns, head)];
    let mut body_offset = 0;
    for (at, chunk) in &message.body {
        let (bytes, start) = match framing {
            Framing::Chunked => {
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                let start = framed.len();
                framed.extend_from_slice(chunk);
                framed.extend_from_slice(b"\r\n");
                (Cow::Owned(framed), start)
            }
            _ => (Cow::Borrowed(chunk.as_slice()), 0),
        };
        let body = vec![BodySpan { body_offset, within: start..start + chunk.len() }];
        body_offset += chunk.len();
        pieces.push(Piece { timestamp_ns: *at, bytes, body });
    }
    if let Framing::Chunked = framing {
        let mut last = b"0\r\n".to_vec();
        for trailer in &message.trailers {
            write_header(&mut last, &trailer.name, &trailer.value);
        }
        last.extend_from_slice(b"\r\n");
        let at = if message.trailers.is_empty() {
            message.body.last().map_or(message.headers_ns, |(at, _)| *at)
        } else {
            message.trailers_ns
        };
        pieces.push(Piece::new(at, last));
    }
    pieces
}

/// A message without a body: headers only (framing headers dropped, since nothing follows), and
/// a note of the body bytes the proxy reported, which the `.bson` keeps.
fn bodyless_pieces(mut head: Vec<u8>, message: &HttpMessage) -> Vec<Piece<'static>> {
    for header in message.headers.iter().filter(|h| !is_pseudo(h) && !is_framing(h)) {
        write_header(&mut head, &header.name, &header.value);
    }
    let reported = message.body_len() as u64 + message.truncated_bytes;
    if reported > 0 {
        write_header(
            &mut head,
            OMITTED_HEADER.as_bytes(),
            format!("{reported} body bytes (no body allowed)").as_bytes(),
        );
    }
    head.extend_from_slice(b"\r\n");
    vec![Piece::new(message.headers_ns, head)]
}

fn pseudo<'a>(message: &'a HttpMessage, name: &[u8]) -> Option<&'a [u8]> {
    message.header(name)
}

/// The request as HTTP/1.1 text pieces.
pub fn request(message: &HttpMessage) -> Vec<Piece<'_>> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(&wire::token(pseudo(message, b":method").unwrap_or(b"GET")));
    head.push(b' ');
    head.extend_from_slice(&wire::target(pseudo(message, b":path").unwrap_or(b"/")));
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let host = match (message.header(b"host"), pseudo(message, b":authority")) {
        (None, Some(authority)) => Some(wire::authority(authority)),
        _ => None,
    };
    message_pieces(head, message, true, host.as_deref(), false)
}

/// The response as HTTP/1.1 text pieces; `request_method` decides whether it may carry a body
/// (a response to HEAD never does).
pub fn response<'a>(message: &'a HttpMessage, request_method: Option<&[u8]>) -> Vec<Piece<'a>> {
    let status = wire::status(pseudo(message, b":status"));
    let reason = http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Unknown");
    let head = format!("HTTP/1.1 {status} {reason}\r\n").into_bytes();
    let bodyless = matches!(status, 100..=199 | 204 | 304) || request_method == Some(b"HEAD");
    message_pieces(head, message, false, None, bodyless)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, value: &[u8]) -> Header {
        Header { name: name.into(), value: value.to_vec() }
    }

    fn text(pieces: &[Piece]) -> String {
        String::from_utf8_lossy(&pieces.iter().flat_map(|p| p.bytes.to_vec()).collect::<Vec<_>>()).into_owned()
    }

    #[test]
    fn get_request_golden() {
        let message = HttpMessage {
            headers: vec![
                h(":authority", b"reviews:9080"),
                h(":path", b"/r/1?x=1"),
                h(":method", b"GET"),
                h("accept", b"*/*"),
                h("x-dup", b"1"),
                h("x-dup", b"2"),
            ],
            headers_ns: 5,
            ..Default::default()
        };
        let pieces = request(&message);
        assert_eq!(pieces.len(), 1);
        assert_eq!(
            text(&pieces),
            "GET /r/1?x=1 HTTP/1.1\r\nhost: reviews:9080\r\naccept: */*\r\nx-dup: 1\r\nx-dup: 2\r\n\r\n"
        );
        assert_eq!(pieces[0].timestamp_ns, 5);
    }

    #[test]
    fn post_body_keeps_timing_and_length() {
        let message = HttpMessage {
            headers: vec![h(":method", b"POST"), h(":path", b"/p"), h("host", b"h"), h("content-length", b"5")],
            headers_ns: 1,
            body: vec![(2, b"he".to_vec()), (3, b"llo".to_vec())],
            ..Default::default()
        };
        let pieces = request(&message);
        assert_eq!(text(&pieces), "POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n\r\nhello");
        assert_eq!(pieces.iter().map(|p| p.timestamp_ns).collect::<Vec<_>>(), vec![1, 2, 3]);
    }

    #[test]
    fn truncated_body_gets_consistent_length_and_a_note() {
        let message = HttpMessage {
            headers: vec![h(":status", b"200"), h("content-length", b"100")],
            body: vec![(2, b"0123456789".to_vec())],
            truncated_bytes: 90,
            ..Default::default()
        };
        assert_eq!(
            text(&response(&message, None)),
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\nx-packet-inspector-truncated: 10 of 100 bytes captured\r\n\r\n0123456789"
        );
    }

    #[test]
    fn chunked_with_trailers() {
        let message = HttpMessage {
            headers: vec![h(":status", b"404"), h("transfer-encoding", b"chunked")],
            body: vec![(2, b"abc".to_vec())],
            trailers: vec![h("x-checksum", b"1")],
            trailers_ns: 3,
            ..Default::default()
        };
        let pieces = response(&message, None);
        assert_eq!(
            text(&pieces),
            "HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-checksum: 1\r\n\r\n"
        );
        assert_eq!(pieces.last().unwrap().timestamp_ns, 3);
    }

    #[test]
    fn statuses_without_a_body_drop_it_and_say_so() {
        let message = HttpMessage {
            headers: vec![h(":status", b"204"), h("content-length", b"3")],
            body: vec![(2, b"abc".to_vec())],
            ..Default::default()
        };
        assert_eq!(
            text(&response(&message, None)),
            "HTTP/1.1 204 No Content\r\nx-packet-inspector-omitted: 3 body bytes (no body allowed)\r\n\r\n"
        );
    }

    #[test]
    fn hostile_bytes_cannot_break_framing() {
        let message = HttpMessage {
            headers: vec![
                h(":method", b"GET"),
                h(":path", b"/a b\r\n"),
                h("x-evil", b"a\r\nInjected: 1"),
                h(":status", b"bogus"),
            ],
            ..Default::default()
        };
        let text = text(&request(&message));
        assert!(text.starts_with("GET /a%20b%0D%0A HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("x-evil: a  Injected: 1\r\n"), "{text}");
        assert!(self::text(&response(&message, None)).starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
    }
}
