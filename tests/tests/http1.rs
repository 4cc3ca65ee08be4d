//! End-to-end HTTP/1.1 capture through real Envoy sidecars running the built filter on V8:
//! client → client sidecar (consumer) → mTLS → server sidecar (producer) → app, with the
//! aggregator and the analysis emulator writing captures that tshark reads back.

use std::time::Duration;

use bson::{Bson, Document};
use packet_inspector_tests::{
    http::Response,
    mesh::{self, CaptureFiles, Mesh, MeshOptions, Sidecar, SidecarCapture},
    tshark, wait_for,
};

const BODY_LIMIT: u64 = 1024;
/// A UTF-8 header value, as it must appear on the synthesized wire.
const NON_ASCII_LINE: &[u8] = "x-note: caf\u{e9} \u{2615}\r\n".as_bytes();

/// What one exchange must look like in its captures.
struct Expect<'a> {
    method: &'a str,
    uri: &'a str,
    status: u16,
    request_header_lines: &'a [&'a str],
    /// Exact bytes the client's side of the conversation must carry (tshark shows non-ASCII
    /// header bytes as replacement characters, so those are checked on the TCP payload).
    request_bytes: &'a [&'a [u8]],
    request_body: &'a [u8],
    response_body: &'a [u8],
    truncated: bool,
}

fn header_values<'d>(message: &'d Document, name: &str) -> Vec<&'d Bson> {
    message
        .get_array("headers")
        .unwrap()
        .iter()
        .filter_map(|h| h.as_document())
        .filter(|h| h.get_str("name").is_ok_and(|n| n == name))
        .filter_map(|h| h.get("value"))
        .collect()
}

fn binary(document: &Document, key: &str) -> Vec<u8> {
    match document.get(key) {
        Some(Bson::Binary(binary)) => binary.bytes.clone(),
        other => panic!("{key} is not binary: {other:?}"),
    }
}

/// The bytes the client sent, reassembled from tshark's per-segment `tcp.payload` hex.
fn client_payload(files: &CaptureFiles, rule: &str, client_port: &str) -> Vec<u8> {
    let filter = format!("tcp.srcport == {client_port} && tcp.len > 0");
    let rows = tshark::fields_decoded(&files.pcap, rule, &filter, &["tcp.payload"]).unwrap();
    let hex: String = rows.into_iter().flatten().collect::<Vec<_>>().concat();
    (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect()
}

/// Checks one stored capture with tshark and by reading its BSON back.
fn check_capture(
    mesh: &Mesh,
    files: &CaptureFiles,
    role: &str,
    request_id: &str,
    response: &Response,
    expect: &Expect,
) {
    let context = format!("{role} capture {}", files.pcap.display());
    // The packets, as Wireshark decodes them with HTTP on the server port: the client's port is
    // whatever the kernel picked, and Wireshark gives some ports to other protocols (34980 is
    // EtherCAT's) before it tries its HTTP heuristic. The README's way of finding that port, from
    // the file alone, must find the mesh's listener.
    let rule = mesh.decode_as(role, "http");
    assert_eq!(tshark::decode_rule(&files.pcap, "http").unwrap(), rule, "{context}: the README's rule");
    let requests = tshark::fields_decoded(
        &files.pcap,
        &rule,
        "http.request",
        &[
            "ip.src",
            "tcp.srcport",
            "ip.dst",
            "tcp.dstport",
            "http.request.method",
            "http.request.uri",
            "http.request.line",
            "http.file_data",
        ],
    )
    .unwrap();
    assert_eq!(requests.len(), 1, "{context}: one request expected, got {requests:?}");
    let request = &requests[0];
    assert_eq!((request[4].as_str(), request[5].as_str()), (expect.method, expect.uri), "{context}");
    let lines: Vec<&str> = request[6].split('\u{1f}').collect();
    for wanted in expect.request_header_lines {
        assert!(
            lines.iter().any(|line| line.trim_end() == *wanted),
            "{context}: no header line {wanted:?} in {lines:?}"
        );
    }
    assert!(lines.iter().any(|line| line.starts_with(&format!("x-request-id: {request_id}"))), "{context}: {lines:?}");
    let client_payload = client_payload(files, &rule, &request[1]);
    for wanted in expect.request_bytes {
        assert!(
            client_payload.windows(wanted.len()).any(|w| w == *wanted),
            "{context}: {:?} not on the wire",
            String::from_utf8_lossy(wanted)
        );
    }
    let captured_request: &[u8] =
        if expect.truncated { &expect.request_body[..BODY_LIMIT as usize] } else { expect.request_body };
    assert_eq!(request[7].as_bytes(), captured_request, "{context}: request body");

    let responses = tshark::fields_decoded(
        &files.pcap,
        &rule,
        "http.response",
        &["http.response.code", "http.file_data", "http.response.line"],
    )
    .unwrap();
    assert_eq!(responses.len(), 1, "{context}: one response expected, got {responses:?}");
    assert_eq!(responses[0][0], expect.status.to_string(), "{context}");
    let captured_response: &[u8] =
        if expect.truncated { &expect.response_body[..BODY_LIMIT as usize] } else { expect.response_body };
    assert_eq!(responses[0][1].as_bytes(), captured_response, "{context}: response body");
    if expect.truncated {
        let note =
            format!("x-packet-inspector-truncated: {BODY_LIMIT} of {} bytes captured", expect.response_body.len());
        assert!(responses[0][2].contains(&note), "{context}: {:?}", responses[0][2]);
    }
    assert_eq!(
        tshark::problems_decoded(&files.pcap, Some(&rule)).unwrap(),
        Vec::<String>::new(),
        "{context}: tshark complaints"
    );

    // The real endpoints of the downstream connection.
    let (client, server) = ((request[0].as_str(), request[1].as_str()), (request[2].as_str(), request[3].as_str()));
    assert_eq!(client.0, "127.0.0.1", "{context}");
    assert_eq!(server.0, "127.0.0.1", "{context}");
    match role {
        "consumer" => {
            assert_eq!(client.1, response.local_addr.port().to_string(), "{context}: the client's own port");
            assert_eq!(server.1, mesh.client_listener.port().to_string(), "{context}: the client sidecar's listener");
        }
        _ => assert_eq!(
            server.1,
            mesh.server_listener.port().to_string(),
            "{context}: the server sidecar's inbound listener"
        ),
    }

    // The metadata and raw exchange, as the emulator stored them.
    let document = files.document().unwrap();
    let metadata = document.get_document("metadata").unwrap();
    let (pod, workload) = if role == "consumer" {
        (mesh::CLIENT_POD, mesh::CLIENT_WORKLOAD)
    } else {
        (mesh::SERVER_POD, mesh::SERVER_WORKLOAD)
    };
    assert_eq!(metadata.get_str("podName").unwrap(), pod, "{context}");
    assert_eq!(metadata.get_str("namespace").unwrap(), mesh::NAMESPACE, "{context}");
    assert_eq!(metadata.get_str("workload").unwrap(), workload, "{context}");
    assert_eq!(metadata.get_str("role").unwrap(), role, "{context}");
    assert_eq!(metadata.get_str("requestId").unwrap(), request_id, "{context}");
    assert_eq!(metadata.get_str("protocol").unwrap(), "http1", "{context}");
    assert_eq!(metadata.get_str("node").unwrap(), "demo-node-1", "{context}");
    // The pod's labels: from the node metadata (Wasm) or the downward-API file (native).
    assert_eq!(metadata.get_document("labels").unwrap().get_str("app").unwrap(), workload, "{context}");
    let remote_port = metadata.get_document("downstreamRemote").unwrap().get_i32("port").unwrap();
    assert_eq!(remote_port.to_string(), client.1, "{context}: BSON and pcap agree on the client port");
    let stored_request = document.get_document("request").unwrap();
    assert_eq!(binary(stored_request, "body"), captured_request, "{context}");
    assert_eq!(stored_request.get_bool("bodyTruncated").unwrap(), expect.truncated, "{context}");
    assert_eq!(stored_request.get_i64("bodySize").unwrap(), expect.request_body.len() as i64, "{context}");
    let stored_response = document.get_document("response").unwrap();
    assert_eq!(header_values(stored_response, ":status"), vec![&Bson::String(expect.status.to_string())], "{context}");
    assert_eq!(binary(stored_response, "body"), captured_response, "{context}");
    assert_eq!(stored_response.get_bool("bodyTruncated").unwrap(), expect.truncated, "{context}");
    assert_eq!(document.get_str("endReason").unwrap(), "complete", "{context}");
}

#[test]
fn http1_exchanges_are_captured_on_both_sides() {
    exchanges_are_captured_on_both_sides(SidecarCapture::Sample);
}

/// The same exchanges and the same checks with the native capture in both sidecars.
#[test]
fn http1_exchanges_are_captured_on_both_sides_by_the_native_capture() {
    exchanges_are_captured_on_both_sides(SidecarCapture::Native);
}

fn exchanges_are_captured_on_both_sides(capture: SidecarCapture) {
    let mesh = Mesh::start(MeshOptions { max_body_bytes: BODY_LIMIT, capture, ..Default::default() }).unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let json = br#"{"reviewer":"kim","rating":5,"text":"grand"}"#;
    let cases: Vec<(&str, String, Vec<u8>, Expect)> = vec![
        (
            "get-headers",
            "GET /productpage?user=kim&lang=fr HTTP/1.1\r\nhost: reviews:9080\r\nx-multi: one\r\nx-multi: two\r\nx-note: caf\u{e9} \u{2615}".to_owned(),
            Vec::new(),
            Expect {
                method: "GET",
                uri: "/productpage?user=kim&lang=fr",
                status: 200,
                request_header_lines: &["x-multi: one", "x-multi: two", "host: reviews:9080"],
                request_bytes: &[NON_ASCII_LINE, b"x-multi: one\r\nx-multi: two\r\n"],
                request_body: b"",
                response_body: b"hello from reviews-v1\n",
                truncated: false,
            },
        ),
        (
            "post-json",
            "POST /reviews/1 HTTP/1.1\r\nhost: reviews:9080\r\ncontent-type: application/json".to_owned(),
            json.to_vec(),
            Expect {
                method: "POST",
                uri: "/reviews/1",
                status: 200,
                request_header_lines: &["content-type: application/json", "content-length: 44"],
                request_bytes: &[],
                request_body: json,
                response_body: json,
                truncated: false,
            },
        ),
        (
            "not-found",
            "GET /status/404 HTTP/1.1\r\nhost: reviews:9080".to_owned(),
            Vec::new(),
            Expect {
                method: "GET",
                uri: "/status/404",
                status: 404,
                request_header_lines: &[],
                request_bytes: &[b"GET /status/404 HTTP/1.1\r\n"],
                request_body: b"",
                response_body: b"status 404\n",
                truncated: false,
            },
        ),
        (
            "over-limit",
            "POST /upload HTTP/1.1\r\nhost: reviews:9080\r\ncontent-type: application/octet-stream".to_owned(),
            big.clone(),
            Expect {
                method: "POST",
                uri: "/upload",
                status: 200,
                request_header_lines: &["content-length: 1024", "x-packet-inspector-truncated: 1024 of 5000 bytes captured"],
                request_bytes: &[],
                request_body: &big,
                response_body: &big,
                truncated: true,
            },
        ),
    ];
    for (name, head, body, expect) in &cases {
        let request_id = format!("e2e-{name}-{}", std::process::id());
        let response = mesh.request(&format!("{head}\r\nx-request-id: {request_id}"), body).unwrap();
        // Capture never changes the traffic.
        assert_eq!(response.status, expect.status, "{name}: status through the mesh");
        assert_eq!(response.body, expect.response_body, "{name}: body through the mesh");
        let consumer = mesh.wait_for_capture("consumer", &request_id).unwrap();
        let producer = mesh.wait_for_capture("producer", &request_id).unwrap();
        check_capture(&mesh, &consumer, "consumer", &request_id, &response, expect);
        check_capture(&mesh, &producer, "producer", &request_id, &response, expect);
        // Repeated headers are kept, in order, in the raw request too.
        if *name == "get-headers" {
            let document = consumer.document().unwrap();
            let request = document.get_document("request").unwrap();
            let values = header_values(request, "x-multi");
            assert_eq!(values, vec![&Bson::String("one".into()), &Bson::String("two".into())]);
            assert_eq!(header_values(request, "x-note"), vec![&Bson::String("caf\u{e9} \u{2615}".into())]);
            assert_eq!(header_values(request, ":method"), vec![&Bson::String("GET".into())]);
        }
    }
    // Exactly one consumer and one producer capture per request: nothing duplicated.
    let mut consumer_connections = Vec::new();
    for (name, ..) in &cases {
        let request_id = format!("e2e-{name}-{}", std::process::id());
        let consumer = mesh.captures("consumer", &request_id);
        assert_eq!(consumer.len(), 1, "{name}");
        assert_eq!(mesh.captures("producer", &request_id).len(), 1, "{name}");
        let document = consumer[0].document().unwrap();
        consumer_connections.push(document.get_document("metadata").unwrap().get_i64("connectionId").unwrap());
    }
    // Envoy's connection ids: each request came on a connection of its own.
    let distinct: std::collections::BTreeSet<i64> = consumer_connections.iter().copied().collect();
    assert!(!distinct.contains(&0), "every capture names its connection: {consumer_connections:?}");
    assert_eq!(distinct.len(), cases.len(), "one connection per request: {consumer_connections:?}");
    assert_eq!(mesh.counter(Sidecar::Client, "captures_dropped").unwrap(), 0);
    if mesh.is_native() {
        // Every HTTP connection manager of a sidecar has its own copy of the configuration; the
        // copies share one stream per worker.
        assert!(mesh.patches_applied.iter().any(|(_, n)| *n >= 2), "{:?}", mesh.patches_applied);
        for sidecar in [Sidecar::Client, Sidecar::Server] {
            assert_eq!(mesh.counter(sidecar, "streams_opened").unwrap(), 1, "{sidecar:?}");
        }
        // The library was written against this Envoy's ABI.
        for name in ["client-sidecar", "server-sidecar"] {
            assert!(mesh.log_of(name).contains("Dynamic module ABI version v0.2.0 matched"), "{name}");
        }
    }
    mesh.shutdown().unwrap();
}

#[test]
fn aggregator_outage_costs_captures_never_requests() {
    aggregator_outage_costs_captures_never_requests_with(SidecarCapture::Sample);
}

/// The native capture's own transport through the same outage.
#[test]
fn aggregator_outage_costs_captures_never_requests_with_the_native_capture() {
    aggregator_outage_costs_captures_never_requests_with(SidecarCapture::Native);
}

fn aggregator_outage_costs_captures_never_requests_with(capture: SidecarCapture) {
    let mut mesh = Mesh::start(MeshOptions { capture, ..Default::default() }).unwrap();
    let closed_before = mesh.counter(Sidecar::Client, "streams_closed").unwrap();
    assert!(mesh.stop_aggregator(), "the aggregator exits cleanly on SIGTERM");
    wait_for("the client sidecar to notice the aggregator is gone", Duration::from_secs(20), || {
        (mesh.counter(Sidecar::Client, "streams_closed").unwrap() > closed_before).then_some(())
    })
    .unwrap();
    let dropped_before = mesh.counter(Sidecar::Client, "captures_dropped").unwrap();
    for n in 0..20 {
        let response = mesh
            .request(
                &format!("POST /outage/{n} HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: outage-{n}"),
                b"still served",
            )
            .unwrap();
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"still served"[..]),
            "request {n} during the outage"
        );
    }
    // The filter hands its counts to Envoy on its flush tick (50 ms here).
    wait_for("drops during the outage to be counted in Envoy stats", Duration::from_secs(10), || {
        (mesh.counter(Sidecar::Client, "captures_dropped").unwrap() > dropped_before).then_some(())
    })
    .unwrap();

    // Reconnect attempts fail while the aggregator is away; Envoy answers each with (empty)
    // response headers and a close, which must not count as a ready stream.
    let sidecars = [Sidecar::Client, Sidecar::Server];
    let ready_before = sidecars.map(|sidecar| mesh.counter(sidecar, "streams_ready").unwrap());
    let opened_before = mesh.counter(Sidecar::Client, "streams_opened").unwrap();
    wait_for("failed reconnect attempts", Duration::from_secs(20), || {
        let opened = mesh.counter(Sidecar::Client, "streams_opened").unwrap();
        (opened >= opened_before + 2 * mesh.capture_streams()).then_some(())
    })
    .unwrap();
    assert_eq!(
        mesh.counter(Sidecar::Client, "streams_ready").unwrap(),
        ready_before[0],
        "a failed connect is not a ready stream"
    );

    // Every root context (per thread and per plugin) reconnects by itself.
    mesh.start_aggregator().unwrap();
    for (sidecar, before) in sidecars.into_iter().zip(ready_before) {
        wait_for(&format!("{sidecar:?} sidecar's capture streams to come back"), Duration::from_secs(30), || {
            (mesh.counter(sidecar, "streams_ready").unwrap() >= before + mesh.capture_streams()).then_some(())
        })
        .unwrap();
    }
    // Once every stream is ready again, the very next request is captured on both sides.
    let response =
        mesh.request("GET /after HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: after-outage", b"").unwrap();
    assert_eq!(response.status, 200);
    wait_for("both captures of the first request after the outage", Duration::from_secs(10), || {
        Some((mesh.captures("consumer", "after-outage").pop()?, mesh.captures("producer", "after-outage").pop()?))
    })
    .unwrap();
    mesh.shutdown().unwrap();
}

#[test]
fn bad_plugin_configuration_is_refused_with_a_clear_log_line() {
    let options = MeshOptions {
        filter_config: Some(r#"{"cluster":"packet_inspector_aggregator","maxBodyBytes":99999999999}"#.to_owned()),
        ..Default::default()
    };
    let error = match Mesh::start(options) {
        Ok(_) => panic!("Envoy accepted a filter with an out-of-range body limit"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(
            "packet-inspector: invalid plugin configuration: `maxBodyBytes` is 99999999999; at most 16777216"
        ),
        "the sidecar's log must name the key and the reason:\n{error}"
    );
}

/// The native capture refuses what it cannot act on, and Envoy says why.
#[test]
fn bad_native_capture_configuration_is_refused_with_a_clear_log_line() {
    let cases = [
        (
            r#"{"maxBodyBytes":99999999999}"#,
            "packet-inspector: invalid native capture configuration: `maxBodyBytes` is 99999999999; at most 16777216",
        ),
        (
            r#"{"aggregator":{"sdsSocket":null,"caFile":"/nonexistent/root-cert.pem","certFile":"/nonexistent/c.pem","keyFile":"/nonexistent/k.pem"}}"#,
            "cannot read certificates from /nonexistent/root-cert.pem",
        ),
        (
            r#"{"aggregator":{"caFile":"/nonexistent/root-cert.pem"}}"#,
            "`aggregator` needs either `sdsSocket` or all of `caFile`, `certFile` and `keyFile`, not both",
        ),
        (r#"{"cluster":"packet_inspector_aggregator"}"#, "`cluster` is the Wasm filter's key"),
    ];
    for (overrides, expected) in cases {
        let options = MeshOptions {
            capture: SidecarCapture::Native,
            filter_config: Some(overrides.to_owned()),
            ..Default::default()
        };
        let error = match Mesh::start(options) {
            Ok(_) => panic!("Envoy accepted the native capture with {overrides}"),
            Err(error) => format!("{error:#}"),
        };
        assert!(error.contains(expected), "{overrides}: the sidecar's log must say {expected:?}:\n{error}");
    }
}

/// The native capture takes the sidecar's certificate from the secret service as Envoy does:
/// it acknowledges each push under the sidecar's node id, refuses an unusable one with the
/// reason (and says so in Envoy's log) while keeping the last good certificate, takes the next
/// good one, and reconnects with it after the aggregator comes back.
#[test]
fn the_native_capture_follows_the_certificate_the_secret_service_pushes() {
    let mut mesh = Mesh::start(MeshOptions { capture: SidecarCapture::Native, ..Default::default() }).unwrap();
    let answered = |mesh: &Mesh, secret: &str, nonce: &str| {
        let answers = mesh.secret_service(Sidecar::Client).unwrap().answers();
        answers.into_iter().find(|a| a.secret == secret && a.nonce == nonce)
    };
    let wait = |what: &str, secret: &str, nonce: &str| {
        wait_for(what, Duration::from_secs(10), || answered(&mesh, secret, nonce)).unwrap()
    };
    for secret in ["default", "ROOTCA"] {
        let ack = wait("the first push acknowledged", secret, &format!("{secret}-1"));
        assert_eq!((ack.version.as_str(), ack.refused.as_deref()), ("v1", None), "{secret}");
        assert!(ack.node_id.starts_with("sidecar~"), "{ack:?}");
        assert!(ack.node_id.contains(&format!("~{}.{}~", mesh::CLIENT_POD, mesh::NAMESPACE)), "{ack:?}");
    }

    let broken = mesh.secret_service(Sidecar::Client).unwrap().push_unusable_key();
    let nack = wait("the unusable push refused", "default", &format!("default-{broken}"));
    assert_eq!(nack.version, "v1", "a NACK names the version still in use");
    let reason = nack.refused.unwrap_or_default();
    assert!(reason.contains("private key is not usable PEM"), "{reason}");
    let logged = wait_for("the refusal in Envoy's log", Duration::from_secs(10), || {
        mesh.log_of("client-sidecar")
            .contains(&format!("refused version \"v{broken}\" of secret \"default\""))
            .then_some(())
    });
    assert!(logged.is_ok(), "{}", mesh.log_tails(20));

    let good = mesh.secret_service(Sidecar::Client).unwrap().rotate();
    let ack = wait("the next good push acknowledged", "default", &format!("default-{good}"));
    assert_eq!((ack.version, ack.refused), (format!("v{good}"), None));

    // A new connection to the aggregator is made with the pushed certificate.
    let ready_before = mesh.counter(Sidecar::Client, "streams_ready").unwrap();
    assert!(mesh.stop_aggregator());
    mesh.start_aggregator().unwrap();
    wait_for("the capture stream back", Duration::from_secs(30), || {
        (mesh.counter(Sidecar::Client, "streams_ready").unwrap() > ready_before).then_some(())
    })
    .unwrap();
    let response = mesh.request("GET /rotated HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: rotated-1", b"").unwrap();
    assert_eq!(response.status, 200);
    mesh.wait_for_capture("consumer", "rotated-1").unwrap();
    mesh.shutdown().unwrap();
}

/// What the native capture holds when Envoy stops cleanly still reaches the analysis service:
/// with a flush tick far away, the exchange's frames are only in the worker's buffer when the
/// sidecars get SIGTERM, and the last configuration's teardown sends them. (With the
/// certificate files configured, so that way of giving the identity is run end to end too.)
#[test]
fn the_native_capture_delivers_what_it_holds_when_envoy_stops() {
    // The mesh removes its own directory when it stops; the captures must outlive it.
    let output_dir = std::env::temp_dir().join(format!("packet-inspector-last-{}", std::process::id()));
    std::fs::create_dir_all(&output_dir).unwrap();
    let options = MeshOptions {
        capture: SidecarCapture::NativeFromFiles,
        filter_config: Some(r#"{"flushIntervalMs": 5000}"#.to_owned()),
        output_dir: Some(output_dir.clone()),
        ..Default::default()
    };
    let mesh = Mesh::start(options).unwrap();
    let response = mesh.request("GET /last HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: native-last", b"").unwrap();
    assert_eq!(response.status, 200);
    let logs = mesh.log_tails(30);
    mesh.shutdown().unwrap();
    for role in ["consumer", "producer"] {
        let marker = format!("-{role}-native-last-");
        let stored = std::fs::read_dir(&output_dir)
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().contains(&marker))
            .count();
        assert_eq!(stored, 2, "the {role} capture's .pcap and .bson after a clean stop\n{logs}");
    }
    std::fs::remove_dir_all(output_dir).unwrap();
}
