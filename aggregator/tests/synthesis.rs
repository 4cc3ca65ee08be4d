//! Packet synthesis judged by tshark: assembled transactions become pcap files that Wireshark
//! decodes as HTTP with no complaints, on IPv4 and IPv6, with bodies over many segments,
//! chunked bodies with trailers, and truncated bodies.

mod common;

use common::grpc_message;
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
        segment: 1,
        last_segment: true,
        segment_start_ns: 1_700_000_000_000_000_000,
    }
}

/// The pcap file of `transaction`, under the temporary directory.
fn synthesize(name: &str, transaction: Transaction) -> std::path::PathBuf {
    let capture = capture::build(transaction, "node-a", capture::BodyForm::InRecords).unwrap();
    let path = std::env::temp_dir().join(format!("pi-synthesis-{name}-{}.pcap", std::process::id()));
    let mut file = std::fs::File::create(&path).unwrap();
    pcap::write_file(&mut file, capture.link_type, &capture.records).unwrap();
    path
}

/// As [`synthesize`], and tshark reads the file as it is without a complaint.
fn write(name: &str, transaction: Transaction) -> std::path::PathBuf {
    let path = synthesize(name, transaction);
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

#[test]
fn grpc_streaming_exchange_decodes_as_http2_and_grpc() {
    let at = |ms: u64| 1_700_000_000_000_000_000 + ms * 1_000_000;
    let request = HttpMessage {
        headers: vec![
            header(":method", "POST"),
            header(":scheme", "http"),
            header(":path", "/packetinspector.sample.v1.Echo/Chat"),
            header(":authority", "echo:50051"),
            header("content-type", "application/grpc"),
            header("te", "trailers"),
            // gRPC carries binary metadata base64-encoded on the wire (bytes 00 01 fe ff).
            header("x-trace-bin", "AAH+/w=="),
        ],
        headers_ns: at(1),
        body: vec![(at(2), grpc_message(b"one")), (at(4), grpc_message(&[7; 30_000]))],
        ..Default::default()
    };
    let response = HttpMessage {
        headers: vec![header(":status", "200"), header("content-type", "application/grpc")],
        headers_ns: at(3),
        body: vec![(at(3), grpc_message(b"ONE")), (at(5), [grpc_message(b"a"), grpc_message(b"bc")].concat())],
        trailers: vec![header("grpc-status", "0"), header("grpc-message", "")],
        trailers_ns: at(6),
        ..Default::default()
    };
    let mut txn = transaction(("10.1.0.5", 40000), ("10.1.0.9", 50051), request, response);
    txn.metadata.protocol = Protocol::Grpc as i32;
    let path = write("grpc", txn);
    let decode = "tcp.port==50051,http2";
    let names =
        tshark::fields_decoded(&path, decode, "http2.type == 1", &["http2.header.name", "http2.header.value"]).unwrap();
    let all_names = names.iter().map(|r| r[0].clone()).collect::<Vec<_>>().join("\u{1f}");
    for wanted in [":method", ":path", "content-type", "te", "x-trace-bin", ":status", "grpc-status", "grpc-message"] {
        assert!(all_names.split('\u{1f}').any(|n| n == wanted), "{wanted} missing from {all_names:?}");
    }
    let values = names.iter().map(|r| r[1].clone()).collect::<Vec<_>>().join("\u{1f}");
    assert!(values.contains("/packetinspector.sample.v1.Echo/Chat"), "{values}");
    assert!(values.split('\u{1f}').any(|v| v == "AAH+/w=="), "the -bin value survives byte for byte: {values}");
    let lengths = tshark::fields_decoded(&path, decode, "grpc", &["tcp.srcport", "grpc.message_length"]).unwrap();
    let by_side = |port: &str| -> Vec<String> {
        lengths
            .iter()
            .filter(|r| r[0] == port)
            .flat_map(|r| r[1].split('\u{1f}').map(str::to_owned).collect::<Vec<_>>())
            .collect()
    };
    assert_eq!(by_side("40000"), vec!["5", "30004"]);
    assert_eq!(by_side("50051"), vec!["5", "3", "4"]);
    assert_eq!(tshark::problems_decoded(&path, Some(decode)).unwrap(), Vec::<String>::new());
    std::fs::remove_file(path).unwrap();
}

/// A Diameter message with the given AVPs (code, UTF-8 or Unsigned32 data), padded as RFC 6733
/// requires.
fn diameter_message(request: bool, command: u32, hbh: u32, e2e: u32, avps: &[(u32, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (code, data) in avps {
        body.extend_from_slice(&code.to_be_bytes());
        body.push(0x40); // M
        body.extend_from_slice(&((8 + data.len()) as u32).to_be_bytes()[1..]);
        body.extend_from_slice(data);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    let mut out = vec![1];
    out.extend_from_slice(&((20 + body.len()) as u32).to_be_bytes()[1..]);
    out.push(if request { 0xc0 } else { 0x40 }); // R, P
    out.extend_from_slice(&command.to_be_bytes()[1..]);
    out.extend_from_slice(&4u32.to_be_bytes()); // Credit-Control application
    out.extend_from_slice(&hbh.to_be_bytes());
    out.extend_from_slice(&e2e.to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[test]
fn diameter_exchange_decodes_on_3868_without_options() {
    use packet_inspector_aggregator::diameter::{Exchange, Seen};
    use packet_inspector_proto::capture::{DiameterMessage, Direction};
    let at = 1_700_000_000_000_000_000u64;
    let metadata = TransactionMetadata {
        pod_name: "diameter-client".into(),
        protocol: Protocol::Diameter as i32,
        downstream_remote: Some(SocketAddress { ip: "10.1.0.5".into(), port: 45000 }),
        downstream_local: Some(SocketAddress { ip: "10.1.0.9".into(), port: 3868 }),
        connection_id: 7,
        ..Default::default()
    };
    let seen = |request: bool, direction: Direction, bytes: Vec<u8>, at_ns: u64| Seen {
        message: DiameterMessage {
            metadata: Some(metadata.clone()),
            direction: direction as i32,
            message: bytes,
            command_code: 272,
            application_id: 4,
            request,
            hop_by_hop_id: 1857878061,
            end_to_end_id: 1339708294,
        },
        at_ns,
    };
    let ccr = diameter_message(
        true,
        272,
        1857878061,
        1339708294,
        &[(263, b"client;1;1".to_vec()), (264, b"client.example".to_vec())],
    );
    let cca = diameter_message(
        false,
        272,
        1857878061,
        1339708294,
        &[(263, b"client;1;1".to_vec()), (268, 2001u32.to_be_bytes().to_vec())],
    );
    let exchange = Exchange {
        request: Some(seen(true, Direction::Request, ccr, at)),
        answer: Some(seen(false, Direction::Response, cca, at + 2_000_000)),
    };
    let capture = capture::build_diameter(exchange, "node-a").unwrap();
    assert!(capture.diameter.as_ref().unwrap().answered);
    let path = std::env::temp_dir().join(format!("pi-synthesis-diameter-{}.pcap", std::process::id()));
    pcap::write_file(&mut std::fs::File::create(&path).unwrap(), capture.link_type, &capture.records).unwrap();
    assert_eq!(tshark::problems(&path).unwrap(), Vec::<String>::new());
    let rows = tshark::fields(
        &path,
        "diameter",
        &[
            "tcp.srcport",
            "diameter.cmd.code",
            "diameter.flags.request",
            "diameter.hopbyhopid",
            "diameter.endtoendid",
            "diameter.Result-Code",
        ],
    )
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (hbh, e2e) = (format!("{:#010x}", 1857878061u32), format!("{:#010x}", 1339708294u32));
    assert_eq!(rows[0][..5], ["45000", "272", "1", &hbh, &e2e]);
    assert_eq!(rows[1][..6], ["3868", "272", "0", &hbh, &e2e, "2001"]);
    std::fs::remove_file(path).unwrap();
}

/// The client's port is whatever its kernel picked, and Wireshark gives a few such ports to other
/// protocols, trying them before its HTTP heuristic: from 34980 (EtherCAT's) to an unassigned
/// server port, the exchange reads as EtherCAT. HTTP on the server port, found from the file as
/// the README says, reads it as the HTTP it is. (Seen in CI: a consumer capture from an
/// application that happened to connect from 34980.)
#[test]
fn a_client_port_wireshark_assigns_elsewhere_reads_as_http_with_the_servers_rule() {
    let request = HttpMessage {
        headers: vec![header(":method", "GET"), header(":path", "/status/404"), header(":authority", "reviews:9080")],
        headers_ns: 1_700_000_000_001_000_000,
        ..Default::default()
    };
    let response = HttpMessage {
        headers: vec![header(":status", "404"), header("content-length", "11")],
        headers_ns: 1_700_000_000_002_000_000,
        body: vec![(1_700_000_000_003_000_000, b"status 404\n".to_vec())],
        ..Default::default()
    };
    let path = synthesize("ecat-port", transaction(("127.0.0.1", 34980), ("127.0.0.1", 15439), request, response));
    assert!(tshark::fields(&path, "http", &["frame.number"]).unwrap().is_empty(), "read as it is: not HTTP");
    let rule = tshark::decode_rule(&path, "http").unwrap();
    assert_eq!(rule, "tcp.port==15439,http");
    let requests = tshark::fields_decoded(
        &path,
        &rule,
        "http.request",
        &["tcp.srcport", "http.request.method", "http.request.uri"],
    )
    .unwrap();
    assert_eq!(requests, vec![vec!["34980", "GET", "/status/404"]]);
    let responses =
        tshark::fields_decoded(&path, &rule, "http.response", &["http.response.code", "http.file_data"]).unwrap();
    assert_eq!(responses, vec![vec!["404", "status 404\n"]]);
    assert_eq!(tshark::problems_decoded(&path, Some(&rule)).unwrap(), Vec::<String>::new());
    std::fs::remove_file(path).unwrap();
}
