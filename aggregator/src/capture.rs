//! A finished transaction becomes an [`analysis::Capture`]: the raw exchange, the metadata,
//! and the pcap records of its synthesized TCP conversation, carrying HTTP/1.1 text
//! ([`crate::http1`]) or an HTTP/2 conversation ([`crate::http2`]) as the proxy's downstream
//! spoke it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use packet_inspector_proto::{
    analysis::{self, Capture, DiameterExchange, HttpExchange},
    capture::{Direction, EndReason, Protocol, SocketAddress},
    pcap::LINKTYPE_ETHERNET,
};

use crate::{
    assembly::{HttpMessage, Transaction},
    diameter::{Exchange, Seen},
    http1, http2,
    tcp::{self, BodyTrail, BuildError, Packets, Piece, Side},
};

/// Why a transaction could not become a capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("protocol {0:?} is not synthesized yet")]
    Unsupported(Protocol),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("a Diameter exchange with neither request nor answer")]
    EmptyExchange,
}

/// Stand-ins when the proxy reported no address (documentation range, RFC 5737).
const UNKNOWN_CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 49152);
const UNKNOWN_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 80);

fn socket_addr(address: Option<&SocketAddress>) -> Option<SocketAddr> {
    let address = address?;
    Some(SocketAddr::new(address.ip.parse().ok()?, u16::try_from(address.port).ok()?))
}

/// How HTTP bodies go to the analysis service (`--inline-bodies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyForm {
    /// As slices of the records that carry them (`HttpMessage.body_in_records`), so their bytes
    /// are sent once; inline when the packets do not carry them as they are.
    #[default]
    InRecords,
    /// Always inline in `HttpMessage.body`, as well as in the packets: for analysis tools that
    /// read only `body`.
    Inline,
}

/// The raw message for the analysis service. Its body goes as the slices of the records that
/// carry it, when they carry it whole and in order (`in_records`) and `form` allows; otherwise
/// inline, taking the transaction's bytes (a body that came in one chunk moves without a copy).
fn http_message(message: HttpMessage, in_records: BodyTrail, form: BodyForm) -> analysis::HttpMessage {
    let body_size = message.body_len() as u64 + message.truncated_bytes;
    let body_truncated = message.truncated_bytes > 0;
    let slices = match form {
        BodyForm::InRecords => in_records.covering(message.body_len()),
        BodyForm::Inline => None,
    };
    let (body, body_in_records) = match slices {
        Some(slices) => (Vec::new(), slices),
        None => (inline_body(message.body), Vec::new()),
    };
    analysis::HttpMessage {
        headers: message.headers,
        body,
        trailers: message.trailers,
        body_truncated,
        body_size,
        body_in_records,
    }
}

fn inline_body(chunks: Vec<(u64, Vec<u8>)>) -> Vec<u8> {
    if chunks.len() == 1 {
        return chunks.into_iter().next().map(|(_, chunk)| chunk).unwrap_or_default();
    }
    // Envoy hands bodies over in chunks of 16 KiB or less: joined with one copy each, into a
    // buffer of the final size.
    let mut body = Vec::with_capacity(chunks.iter().map(|(_, chunk)| chunk.len()).sum());
    for (_, chunk) in &chunks {
        body.extend_from_slice(chunk);
    }
    body
}

/// Builds the capture, with the conversation between the downstream peer and the address it
/// connected to (what a tcpdump on the pod would have shown, decrypted).
///
/// # Errors
/// [`CaptureError`] for protocols not synthesized yet, or a packet that cannot be built.
pub fn build(transaction: Transaction, node: &str, bodies: BodyForm) -> Result<Capture, CaptureError> {
    let mut metadata = transaction.metadata;
    let protocol = metadata.protocol();
    if metadata.node.is_empty() {
        metadata.node = node.to_owned();
    }
    let client = socket_addr(metadata.downstream_remote.as_ref()).unwrap_or(UNKNOWN_CLIENT);
    let server = socket_addr(metadata.downstream_local.as_ref()).unwrap_or(UNKNOWN_SERVER);
    // A later segment of a stream opens its own conversation when its data starts.
    let open_ns = transaction.segment_start_ns.max(metadata.start_time_ns);
    let (client_pieces, server_pieces) = match protocol {
        Protocol::Http1 | Protocol::Unspecified => (
            http1::request(&transaction.request),
            transaction
                .response
                .as_ref()
                .map(|response| http1::response(response, transaction.request.header(b":method")))
                .unwrap_or_default(),
        ),
        Protocol::Http2 | Protocol::Grpc => http2::conversation(
            &transaction.request,
            transaction.response.as_ref(),
            open_ns,
            transaction.end_ns,
            transaction.end_reason == EndReason::Complete,
        ),
        other => return Err(CaptureError::Unsupported(other)),
    };
    let pieces: Vec<(Side, Piece)> = client_pieces
        .into_iter()
        .map(|p| (Side::Client, p))
        .chain(server_pieces.into_iter().map(|p| (Side::Server, p)))
        .collect();
    let Packets { records, client_body, server_body } =
        tcp::conversation(client, server, pieces, open_ns, transaction.end_ns, open_ns ^ metadata.connection_id)?;
    Ok(Capture {
        diameter: None,
        http: Some(HttpExchange {
            request: Some(http_message(transaction.request, client_body, bodies)),
            response: transaction.response.map(|response| http_message(response, server_body, bodies)),
        }),
        metadata: Some(metadata),
        link_type: LINKTYPE_ETHERNET,
        records,
        end_time_ns: transaction.end_ns,
        end_reason: transaction.end_reason as i32,
        segment: transaction.segment,
        last_segment: transaction.last_segment,
        segment_start_ns: open_ns,
    })
}

/// Builds the capture of a Diameter exchange: the request and its answer carried as they were
/// on the wire, each by the peer that sent it, in a TCP conversation on the connection's real
/// addresses (Wireshark decodes port 3868 as Diameter without options).
///
/// # Errors
/// [`CaptureError`] when the exchange is empty or a packet cannot be built.
pub fn build_diameter(exchange: Exchange, node: &str) -> Result<Capture, CaptureError> {
    let first = exchange.first().ok_or(CaptureError::EmptyExchange)?;
    let mut metadata = first.message.metadata.clone().unwrap_or_default();
    if metadata.node.is_empty() {
        metadata.node = node.to_owned();
    }
    metadata.protocol = Protocol::Diameter as i32;
    let open_ns = first.at_ns;
    metadata.start_time_ns = open_ns;
    let client = socket_addr(metadata.downstream_remote.as_ref()).unwrap_or(UNKNOWN_CLIENT);
    let server = socket_addr(metadata.downstream_local.as_ref()).unwrap_or(UNKNOWN_SERVER);
    let side =
        |seen: &Seen| if seen.message.direction == Direction::Response as i32 { Side::Server } else { Side::Client };
    // Diameter messages are small: they go inline as well as in the packets.
    let pieces: Vec<(Side, Piece)> = [&exchange.request, &exchange.answer]
        .into_iter()
        .flatten()
        .map(|seen| (side(seen), Piece::new(seen.at_ns, seen.message.message.as_slice())))
        .collect();
    let end_ns = exchange.answer.as_ref().map_or(open_ns, |answer| answer.at_ns.max(open_ns));
    let records = tcp::conversation(client, server, pieces, open_ns, end_ns, open_ns ^ metadata.connection_id)?.records;
    let ids = &first.message;
    let diameter = DiameterExchange {
        request: exchange.request.as_ref().map(|r| r.message.message.clone()).unwrap_or_default(),
        answer: exchange.answer.as_ref().map(|a| a.message.message.clone()).unwrap_or_default(),
        answered: exchange.request.is_some() && exchange.answer.is_some(),
        command_code: ids.command_code,
        application_id: ids.application_id,
        hop_by_hop_id: ids.hop_by_hop_id,
        end_to_end_id: ids.end_to_end_id,
        request_direction: exchange.request.as_ref().map_or(Direction::Unspecified as i32, |r| r.message.direction),
        request_time_ns: exchange.request.as_ref().map_or(0, |r| r.at_ns),
        answer_time_ns: exchange.answer.as_ref().map_or(0, |a| a.at_ns),
    };
    let complete = diameter.answered;
    Ok(Capture {
        metadata: Some(metadata),
        http: None,
        diameter: Some(diameter),
        link_type: LINKTYPE_ETHERNET,
        records,
        end_time_ns: end_ns,
        end_reason: if complete { EndReason::Complete } else { EndReason::Aborted } as i32,
        segment: 1,
        last_segment: true,
        segment_start_ns: open_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::{Header, TransactionMetadata};

    fn message(chunks: &[&[u8]], truncated_bytes: u64) -> HttpMessage {
        HttpMessage {
            headers: Vec::new(),
            headers_ns: 1,
            body: chunks.iter().enumerate().map(|(n, chunk)| (n as u64 + 2, chunk.to_vec())).collect(),
            truncated_bytes,
            trailers: Vec::new(),
            trailers_ns: 0,
        }
    }

    #[test]
    fn an_inline_body_is_the_chunks_in_order_and_its_size_counts_what_was_not_captured() {
        let inline = |m| http_message(m, BodyTrail::default(), BodyForm::InRecords);
        let raw = inline(message(&[b"first ", b"", b"second ", &[b'x'; 20_000]], 5));
        assert_eq!(raw.body.len(), 6 + 7 + 20_000);
        assert!(raw.body.starts_with(b"first second x"));
        assert_eq!((raw.body_size, raw.body_truncated), (20_013 + 5, true));
        let one = inline(message(&[b"only"], 0));
        assert_eq!((one.body.as_slice(), one.body_size, one.body_truncated), (&b"only"[..], 4, false));
        let empty = inline(message(&[], 0));
        assert!(empty.body.is_empty() && empty.body_in_records.is_empty());
    }

    fn transaction(protocol: Protocol, status: &[u8], response_body: &[&[u8]]) -> Transaction {
        let header = |name: &str, value: &[u8]| Header { name: name.into(), value: value.to_vec() };
        let mut request = message(&[b"request ", b"body"], 0);
        request.headers = vec![header(":method", b"POST"), header(":path", b"/"), header(":authority", b"svc")];
        let mut response = message(response_body, 0);
        response.headers = vec![header(":status", status)];
        Transaction {
            metadata: TransactionMetadata { protocol: protocol as i32, start_time_ns: 1, ..Default::default() },
            request,
            response: Some(response),
            end_ns: 9,
            end_reason: EndReason::Complete,
            segment: 1,
            last_segment: true,
            segment_start_ns: 1,
        }
    }

    #[test]
    fn bodies_the_packets_carry_are_sent_once_as_slices_of_the_records() {
        let big: Vec<u8> = (0..40_000u32).map(|n| (n % 253) as u8).collect();
        for protocol in [Protocol::Http1, Protocol::Http2] {
            let capture =
                build(transaction(protocol, b"200", &[b"small ", &big]), "node", BodyForm::InRecords).unwrap();
            let http = capture.http.as_ref().unwrap();
            for (message, expected) in
                [(&http.request, [&b"request body"[..]].concat()), (&http.response, [&b"small "[..], &big].concat())]
            {
                let message = message.as_ref().unwrap();
                assert!(message.body.is_empty() && !message.body_in_records.is_empty(), "{protocol:?}: not inline");
                assert_eq!(
                    message.captured_body(&capture.records).unwrap().as_ref(),
                    expected.as_slice(),
                    "{protocol:?}"
                );
                assert_eq!(message.captured_body_len(), expected.len() as u64);
            }
        }
    }

    #[test]
    fn bodies_the_packets_do_not_carry_as_they_are_go_inline() {
        // A 204 carries no body on the wire; the proxy still reported one.
        let capture =
            build(transaction(Protocol::Http1, b"204", &[b"not ", b"sent"]), "node", BodyForm::InRecords).unwrap();
        let response = capture.http.as_ref().unwrap().response.as_ref().unwrap();
        assert_eq!((response.body.as_slice(), response.body_in_records.len()), (&b"not sent"[..], 0));
        // A truncated gRPC body, cut to whole messages in the packets.
        let mut cut = transaction(Protocol::Grpc, b"200", &[&[0, 0, 0, 0, 2, b'o', b'k', 0, 0, 0, 0, 9, b'x']]);
        let response = cut.response.as_mut().unwrap();
        response.headers.push(Header { name: b"content-type".to_vec(), value: b"application/grpc".to_vec() });
        response.truncated_bytes = 8;
        let capture = build(cut, "node", BodyForm::InRecords).unwrap();
        let response = capture.http.as_ref().unwrap().response.as_ref().unwrap();
        assert_eq!((response.body.len(), response.body_in_records.len()), (13, 0));
    }

    #[test]
    fn inline_bodies_go_inline_even_when_the_packets_carry_them() {
        let capture =
            build(transaction(Protocol::Http1, b"200", &[b"in ", b"both"]), "node", BodyForm::Inline).unwrap();
        let http = capture.http.as_ref().unwrap();
        for (message, body) in [(&http.request, &b"request body"[..]), (&http.response, b"in both")] {
            let message = message.as_ref().unwrap();
            assert_eq!((message.body.as_slice(), message.body_in_records.len()), (body, 0));
        }
    }
}
