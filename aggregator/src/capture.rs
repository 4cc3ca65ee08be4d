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
    tcp::{self, BuildError, Side},
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

/// The raw message for the analysis service, taking the transaction's bytes (a body that came
/// in one chunk moves without a copy).
fn http_message(message: HttpMessage) -> analysis::HttpMessage {
    let body_size = message.body_len() as u64 + message.truncated_bytes;
    let body = match message.body.len() {
        1 => message.body.into_iter().next().map(|(_, chunk)| chunk).unwrap_or_default(),
        _ => {
            // Envoy hands bodies over in chunks of 16 KiB or less: joined with one copy each,
            // into a buffer of the final size.
            let mut body = Vec::with_capacity(message.body_len());
            for (_, chunk) in &message.body {
                body.extend_from_slice(chunk);
            }
            body
        }
    };
    analysis::HttpMessage {
        headers: message.headers,
        body,
        trailers: message.trailers,
        body_truncated: message.truncated_bytes > 0,
        body_size,
    }
}

/// Builds the capture, with the conversation between the downstream peer and the address it
/// connected to (what a tcpdump on the pod would have shown, decrypted).
///
/// # Errors
/// [`CaptureError`] for protocols not synthesized yet, or a packet that cannot be built.
pub fn build(transaction: Transaction, node: &str) -> Result<Capture, CaptureError> {
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
    let pieces: Vec<(Side, http1::Piece)> = client_pieces
        .into_iter()
        .map(|p| (Side::Client, p))
        .chain(server_pieces.into_iter().map(|p| (Side::Server, p)))
        .collect();
    let records =
        tcp::conversation(client, server, pieces, open_ns, transaction.end_ns, open_ns ^ metadata.connection_id)?;
    Ok(Capture {
        diameter: None,
        http: Some(HttpExchange {
            request: Some(http_message(transaction.request)),
            response: transaction.response.map(http_message),
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
    let pieces: Vec<(Side, http1::Piece)> = [&exchange.request, &exchange.answer]
        .into_iter()
        .flatten()
        .map(|seen| {
            (side(seen), http1::Piece { timestamp_ns: seen.at_ns, bytes: seen.message.message.as_slice().into() })
        })
        .collect();
    let end_ns = exchange.answer.as_ref().map_or(open_ns, |answer| answer.at_ns.max(open_ns));
    let records = tcp::conversation(client, server, pieces, open_ns, end_ns, open_ns ^ metadata.connection_id)?;
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
    fn the_raw_body_is_the_chunks_in_order_and_its_size_counts_what_was_not_captured() {
        let raw = http_message(message(&[b"first ", b"", b"second ", &[b'x'; 20_000]], 5));
        assert_eq!(raw.body.len(), 6 + 7 + 20_000);
        assert!(raw.body.starts_with(b"first second x"));
        assert_eq!((raw.body_size, raw.body_truncated), (20_013 + 5, true));
        let one = http_message(message(&[b"only"], 0));
        assert_eq!((one.body.as_slice(), one.body_size, one.body_truncated), (&b"only"[..], 4, false));
        assert!(http_message(message(&[], 0)).body.is_empty());
    }
}
