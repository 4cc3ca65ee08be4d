//! Packet synthesis judged by tshark: assembled transactions become pcap files that Wireshark
//! decodes as HTTP with no complaints, on IPv4 and IPv6, with bodies over many segments,
//! chunked bodies with trailers, and truncated bodies.

use packet_inspector_aggregator::{
    assembly::{HttpMessage, Transaction},
    capture,
};
use packet_inspector_proto::{
    capture::{EndReason, Header, Protocol, Role, SocketAddress, TransactionMetadata},
    pcap,
};
use packet_inspector_tests::tshark;

fn header(name: &str, value: &str) -> Header {
    Header { name: name.into(), value: value.into() }
}

fn transaction(client: (&str, u32), server: (&str, u32), request: HttpMessage, response: HttpMessage) -> Transaction {
    Transaction {
        metadata: TransactionMetadata {
            pod_name: "pod".into(),
            role: Role::Producer as i32,
            protocol: Protocol::Http1 as i32,
            downstream_remote: Some(SocketAddress { ip: client.0.into(), port: client.1 }),
            downstream_local: Some(SocketAddress { ip: server.0.into(), port: server.1 }),
            start_time_ns: 1_700_000_000_000_000_000,
            ..Default::default()
        },
        request,
        response: Some(response),
        end_ns: 1_700_000_000_050_000_000,
        end_reason: EndReason::Complete,
    }
}

fn write(name: &str, transaction: Transaction) -> std::path::PathBuf {
    let capture = capture::build(transaction, "node-a").unwrap();
    let path = std::env::temp_dir().join(format!("pi-synthesis-{name}-{}.pcap", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    pcap::write_file(&mut file, capture.link_type, &capture.records).unwrap();
    assert_eq!(tshark::problems(&path).unwrap(), Vec::<String>::new(), "{name}: tshark complaints");
    path
}

#[test]
fn ipv6_chunked_response_with_trailers_over_many_segments() {
    let body: Vec<u8> = (0..20_000u32).map(|i| b'0' + (i % 10) as u8).collect();
    let request = HttpMessage {
        headers: vec![header(":method", "GET"), header(":path", "/big"), header(":authority", "svc.ns:8080")],
        headers_ns: 1_700_000_000_001_000_000,
        ..Default::default()
    };
    let response = HttpMessage {
        headers: vec![header(":status", "200"), header("transfer-encoding", "chunked")],
        headers_ns: 1_700_000_000_002_000_000,
        body: vec![
            (1_700_000_000_003_000_000, body[..7000].to_vec()),
            (1_700_000_000_004_000_000, body[7000..].to_vec()),
        ],
        trailers: vec![header("x-checksum", "abc")],
        trailers_ns: 1_700_000_000_005_000_000,
        ..Default::default()
    };
    let path = write("v6", transaction(("fd00::5", 41000), ("fd00::9", 8080), request, response));
    let requests = tshark::fields(
        &path,
        "http.request",
        &["ipv6.src", "ipv6.dst", "tcp.dstport", "http.host", "http.request.uri"],
    )
    .unwrap();
    assert_eq!(requests, vec![vec!["fd00::5", "fd00::9", "8080", "svc.ns:8080", "/big"]]);
    let responses = tshark::fields(&path, "http.response", &["http.response.code", "http.file_data"]).unwrap();
    assert_eq!(responses.len(), 1);
    assert_eq!(responses[0][0], "200");
    assert_eq!(responses[0][1].as_bytes(), body.as_slice(), "Wireshark reassembles and de-chunks the body");
    let segments = tshark::fields(&path, "tcp.srcport == 8080 && tcp.len > 0", &["tcp.len"]).unwrap();
    assert!(segments.len() >= 14, "20 kB over a 1440-byte MSS: {} segments", segments.len());
    let trailer = tshark::fields(&path, "http.response", &["http.chunked_trailer_part"]).unwrap();
    assert_eq!(trailer[0][0].trim_end(), "x-checksum: abc");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn truncated_post_on_ipv4_still_decodes() {
    let request = HttpMessage {
        headers: vec![
            header(":method", "POST"),
            header(":path", "/upload"),
            header("host", "h"),
            header("content-length", "9000"),
        ],
        body: vec![(1_700_000_000_001_000_000, vec![b'x'; 100])],
        truncated_bytes: 8900,
        ..Default::default()
    };
    let response =
        HttpMessage { headers: vec![header(":status", "201"), header("content-length", "0")], ..Default::default() };
    let path = write("v4", transaction(("10.1.0.5", 40000), ("10.1.0.9", 9080), request, response));
    let requests = tshark::fields(
        &path,
        "http.request",
        &["ip.src", "tcp.srcport", "http.request.method", "http.content_length", "http.file_data"],
    )
    .unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(&requests[0][..4], &["10.1.0.5", "40000", "POST", "100"]);
    assert_eq!(requests[0][4], "x".repeat(100));
    let responses = tshark::fields(&path, "http.response", &["http.response.code"]).unwrap();
    assert_eq!(responses, vec![vec!["201"]]);
    std::fs::remove_file(path).unwrap();
}
