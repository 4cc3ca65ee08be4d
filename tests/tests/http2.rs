//! End-to-end HTTP/2 and gRPC capture through real Envoy sidecars running the built filter:
//! an h2c client (the `h2` crate) and the sample gRPC service (`samples/grpc-echo`) called with
//! a tonic client. Captures are read the way the README says: tshark with `-d
//! tcp.port==PORT,http2` for the port of the captured conversation's server side.

use bson::Bson;
use packet_inspector_sample_grpc::pb::{echo_client::EchoClient, CountRequest, EchoReply, EchoRequest, FailRequest};
use packet_inspector_tests::{
    clients,
    mesh::{CaptureFiles, Mesh, MeshOptions, SidecarCapture},
    tshark,
};
use prost::Message;

const ROLES: [&str; 2] = ["consumer", "producer"];

/// (name, value) pairs of every header block in a capture, per side (`client` = from the
/// downstream peer).
fn header_pairs(mesh: &Mesh, role: &str, files: &CaptureFiles, from_client: bool) -> Vec<(String, String)> {
    let server_port = if role == "consumer" { mesh.client_listener.port() } else { mesh.server_listener.port() };
    let side =
        if from_client { format!("tcp.dstport == {server_port}") } else { format!("tcp.srcport == {server_port}") };
    let rows = tshark::fields_decoded(
        &files.pcap,
        &mesh.decode_as(role, "http2"),
        &format!("({side}) && (http2.type == 1 || http2.type == 9)"),
        &["http2.header.name", "http2.header.value"],
    )
    .unwrap();
    rows.iter()
        .flat_map(|row| {
            let names: Vec<String> = row[0].split('\u{1f}').map(str::to_owned).collect();
            let values: Vec<String> = row[1].split('\u{1f}').map(str::to_owned).collect();
            names.into_iter().zip(values)
        })
        .collect()
}

fn has(pairs: &[(String, String)], name: &str, value: &str) -> bool {
    pairs.iter().any(|(n, v)| n == name && v == value)
}

/// `grpc.message_length` of every gRPC message one side sent.
fn grpc_lengths(mesh: &Mesh, role: &str, files: &CaptureFiles, from_client: bool) -> Vec<usize> {
    let server_port = if role == "consumer" { mesh.client_listener.port() } else { mesh.server_listener.port() };
    let side = if from_client { "tcp.dstport" } else { "tcp.srcport" };
    let rows = tshark::fields_decoded(
        &files.pcap,
        &mesh.decode_as(role, "http2"),
        &format!("grpc && {side} == {server_port}"),
        &["grpc.message_length"],
    )
    .unwrap();
    rows.iter().flat_map(|row| row[0].split('\u{1f}').filter_map(|v| v.parse().ok()).collect::<Vec<_>>()).collect()
}

fn assert_clean(mesh: &Mesh, role: &str, files: &CaptureFiles) {
    let problems = tshark::problems_decoded(&files.pcap, Some(&mesh.decode_as(role, "http2"))).unwrap();
    assert_eq!(problems, Vec::<String>::new(), "{}: tshark complaints", files.pcap.display());
}

fn protocol_of(files: &CaptureFiles) -> String {
    files.document().unwrap().get_document("metadata").unwrap().get_str("protocol").unwrap().to_owned()
}

#[test]
fn http2_exchanges_decode_standalone() {
    http2_exchanges_decode_standalone_with(SidecarCapture::Sample);
}

#[test]
fn http2_exchanges_decode_standalone_with_the_native_capture() {
    http2_exchanges_decode_standalone_with(SidecarCapture::Native);
}

fn http2_exchanges_decode_standalone_with(capture: SidecarCapture) {
    let mesh = Mesh::start(MeshOptions { capture, ..Default::default() }).unwrap();
    let big_header = "v".repeat(20_000);
    let upload: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let request = http::Request::get("http://reviews:9080/h2/hello")
        .header("x-request-id", "h2-hello")
        .header("x-trace-bin", "AAH+/w==")
        .header("x-big", big_header.as_str())
        .body(())
        .unwrap();
    let hello = clients::h2_request(mesh.client_listener, request, b"", None).unwrap();
    assert_eq!(hello.status, 200);
    let request = http::Request::post("http://reviews:9080/h2/upload")
        .header("x-request-id", "h2-upload")
        .header("content-type", "application/octet-stream")
        .body(())
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "42".parse().unwrap());
    let echoed = clients::h2_request(mesh.client_listener, request, &upload, Some(trailers)).unwrap();
    assert_eq!(echoed.status, 200);
    // Over the filter's 64 KiB body limit, both ways (the app echoes it).
    let large: Vec<u8> = (0..80_000u32).map(|i| (i % 241) as u8).collect();
    let request = http::Request::post("http://reviews:9080/h2/large")
        .header("x-request-id", "h2-large")
        .header("content-type", "application/octet-stream")
        .header("content-length", large.len().to_string())
        .body(())
        .unwrap();
    let large_echo = clients::h2_request(mesh.client_listener, request, &large, None).unwrap();
    assert_eq!((large_echo.status, large_echo.body == large), (200, true), "traffic is unchanged");
    let (hello, echoed) = (hello.body, echoed.body);
    assert_eq!(hello, b"hello from reviews-v1\n", "traffic is unchanged");
    assert_eq!(echoed, upload, "traffic is unchanged");

    for role in ROLES {
        let files = mesh.wait_for_capture(role, "h2-hello").unwrap();
        assert_eq!(protocol_of(&files), "http2");
        assert_eq!(
            tshark::decode_rule(&files.pcap, "http2").unwrap(),
            mesh.decode_as(role, "http2"),
            "the README's rule"
        );
        assert_clean(&mesh, role, &files);
        let request = header_pairs(&mesh, role, &files, true);
        assert!(has(&request, ":method", "GET") && has(&request, ":path", "/h2/hello"), "{role}: {request:?}");
        assert!(has(&request, "x-trace-bin", "AAH+/w=="), "{role}: the -bin value survives");
        assert!(has(&request, "x-big", &big_header), "{role}: the 20 kB header survives");
        let continuation =
            tshark::fields_decoded(&files.pcap, &mesh.decode_as(role, "http2"), "http2.type == 9", &["frame.number"])
                .unwrap();
        assert!(!continuation.is_empty(), "{role}: a header block over 16 kB needs CONTINUATION");
        let response = header_pairs(&mesh, role, &files, false);
        assert!(has(&response, ":status", "200"), "{role}: {response:?}");

        let files = mesh.wait_for_capture(role, "h2-upload").unwrap();
        assert_clean(&mesh, role, &files);
        let request = header_pairs(&mesh, role, &files, true);
        assert!(
            has(&request, ":method", "POST") && has(&request, "x-checksum", "42"),
            "{role}: trailers kept: {request:?}"
        );
        let data = tshark::fields_decoded(
            &files.pcap,
            &mesh.decode_as(role, "http2"),
            "http2.type == 0",
            &["tcp.srcport", "http2.length"],
        )
        .unwrap();
        let lengths: Vec<usize> =
            data.iter().flat_map(|r| r[1].split('\u{1f}').map(|v| v.parse::<usize>().unwrap())).collect();
        assert!(lengths.iter().all(|len| *len <= 16_384), "{role}: DATA split at the max frame size: {lengths:?}");
        assert_eq!(lengths.iter().sum::<usize>(), 2 * upload.len(), "{role}: request and echoed response bodies");
        let stored = files.document().unwrap();
        let body = match stored.get_document("request").unwrap().get("body") {
            Some(Bson::Binary(binary)) => binary.bytes.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(body, upload, "{role}: the raw body in the BSON");

        // Truncated at the limit: flagged in the BSON, announced on the wire, still decodable.
        let files = mesh.wait_for_capture(role, "h2-large").unwrap();
        assert_clean(&mesh, role, &files);
        let stored = files.document().unwrap();
        for direction in ["request", "response"] {
            let message = stored.get_document(direction).unwrap();
            assert!(message.get_bool("bodyTruncated").unwrap(), "{role} {direction}");
            assert_eq!(message.get_i64("bodySize").unwrap(), large.len() as i64, "{role} {direction}");
            // Envoy hands a body over in events of several slices, and the limit falls inside
            // one: the bytes kept are still the body's first 64 KiB, in order.
            let body = match message.get("body") {
                Some(Bson::Binary(binary)) => &binary.bytes,
                other => panic!("{role} {direction}: {other:?}"),
            };
            assert!(body.as_slice() == &large[..65_536], "{role} {direction}: not the body's first 64 KiB");
        }
        let request = header_pairs(&mesh, role, &files, true);
        assert!(has(&request, "x-packet-inspector-truncated", "65536 of 80000 bytes captured"), "{role}: {request:?}");
        assert!(!request.iter().any(|(n, _)| n == "content-length"), "{role}: the stale length is dropped");
        let data =
            tshark::fields_decoded(&files.pcap, &mesh.decode_as(role, "http2"), "http2.type == 0", &["http2.length"])
                .unwrap();
        let total: usize = data.iter().flat_map(|r| r[0].split('\u{1f}').map(|v| v.parse::<usize>().unwrap())).sum();
        assert_eq!(total, 2 * 65_536, "{role}: the captured bytes of both bodies");
    }
    mesh.shutdown().unwrap();
}

fn with_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-request-id", request_id.parse().unwrap());
    request
}

#[test]
fn grpc_calls_of_every_kind_are_captured() {
    grpc_calls_of_every_kind_are_captured_with(SidecarCapture::Sample);
}

#[test]
fn grpc_calls_of_every_kind_are_captured_with_the_native_capture() {
    grpc_calls_of_every_kind_are_captured_with(SidecarCapture::Native);
}

fn grpc_calls_of_every_kind_are_captured_with(capture: SidecarCapture) {
    let mesh = Mesh::start(MeshOptions { segment_interval_ms: Some(1000), capture, ..Default::default() }).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let address = format!("http://{}", mesh.client_listener);
    let count = CountRequest { count: 25, interval_ms: 100, text: "tick".into() };
    let (failure, streamed) = runtime.block_on(async {
        let mut client = EchoClient::connect(address).await.unwrap();
        let reply = client.say(with_id(EchoRequest { text: "hello".into() }, "grpc-say")).await.unwrap();
        assert_eq!(reply.into_inner().text, "hello");
        let failure = client
            .fail(with_id(FailRequest { code: 5, message: "no such review".into() }, "grpc-fail"))
            .await
            .unwrap_err();
        let mut replies = client.count(with_id(count.clone(), "grpc-count")).await.unwrap().into_inner();
        let mut streamed = Vec::new();
        while let Some(reply) = replies.message().await.unwrap() {
            streamed.push(reply);
        }
        let texts = ["a", "bb", "ccc", "dddd", "eeeee"].map(|t| EchoRequest { text: t.into() });
        let joined = client.join(with_id(tokio_stream_iter(texts.to_vec()), "grpc-join")).await.unwrap();
        assert_eq!(joined.into_inner().text, "a bb ccc dddd eeeee");
        let chat = ["x", "y", "z", "w"].map(|t| EchoRequest { text: t.into() });
        let mut answers =
            client.chat(with_id(tokio_stream_iter(chat.to_vec()), "grpc-chat")).await.unwrap().into_inner();
        let mut chatted = 0;
        while answers.message().await.unwrap().is_some() {
            chatted += 1;
        }
        assert_eq!(chatted, 4);
        (failure, streamed)
    });
    assert_eq!((failure.code(), failure.message()), (tonic::Code::NotFound, "no such review"));
    assert_eq!(streamed.len(), 25);

    let reply_len = |text: &str, index: u32| EchoReply { text: text.into(), index }.encoded_len();
    for role in ROLES {
        // Unary, OK.
        let files = mesh.wait_for_capture(role, "grpc-say").unwrap();
        assert_eq!(protocol_of(&files), "grpc");
        assert_clean(&mesh, role, &files);
        let request = header_pairs(&mesh, role, &files, true);
        assert!(has(&request, ":path", "/packetinspector.sample.v1.Echo/Say"), "{role}: {request:?}");
        assert!(has(&request, "content-type", "application/grpc"), "{role}: {request:?}");
        assert_eq!(grpc_lengths(&mesh, role, &files, true), vec![EchoRequest { text: "hello".into() }.encoded_len()]);
        assert_eq!(grpc_lengths(&mesh, role, &files, false), vec![reply_len("hello", 0)]);
        assert!(has(&header_pairs(&mesh, role, &files, false), "grpc-status", "0"), "{role}: trailers");

        // Unary, failing: a trailers-only response (gRPC percent-encodes grpc-message).
        let files = mesh.wait_for_capture(role, "grpc-fail").unwrap();
        assert_clean(&mesh, role, &files);
        let response = header_pairs(&mesh, role, &files, false);
        assert!(
            has(&response, "grpc-status", "5") && has(&response, "grpc-message", "no%20such%20review"),
            "{role}: {response:?}"
        );
        assert!(grpc_lengths(&mesh, role, &files, false).is_empty(), "{role}: no message in a failed call");
        let stored = files.document().unwrap();
        let headers = stored.get_document("response").unwrap().get_array("headers").unwrap().clone();
        assert!(headers.iter().any(|h| h
            .as_document()
            .is_some_and(|h| h.get_str("name").ok() == Some("grpc-status") && h.get_str("value").ok() == Some("5"))));

        // Server streaming for longer than the segment interval: several standalone segments.
        let segments = mesh.wait_for_all_segments(role, "grpc-count").unwrap();
        assert!(
            segments.len() >= 2,
            "{role}: 2.4 s of streaming with a 1 s interval gave {} segment(s)",
            segments.len()
        );
        let mut replies = Vec::new();
        for (index, files) in segments.iter().enumerate() {
            assert_clean(&mesh, role, files);
            let request = header_pairs(&mesh, role, files, true);
            assert!(
                has(&request, ":path", "/packetinspector.sample.v1.Echo/Count"),
                "{role}: every segment repeats the headers"
            );
            let document = files.document().unwrap();
            assert_eq!(document.get_i64("segment").unwrap(), index as i64 + 1);
            assert_eq!(document.get_document("metadata").unwrap().get_str("requestId").unwrap(), "grpc-count");
            replies.extend(grpc_lengths(&mesh, role, files, false));
        }
        let expected: Vec<usize> = (0..25).map(|i| reply_len("tick", i)).collect();
        assert_eq!(replies, expected, "{role}: every streamed message, once, across the segments");
        let last = header_pairs(&mesh, role, segments.last().unwrap(), false);
        assert!(has(&last, "grpc-status", "0"), "{role}: the last segment ends with the trailers");

        // Client streaming and bidirectional.
        let files = mesh.wait_for_capture(role, "grpc-join").unwrap();
        assert_clean(&mesh, role, &files);
        let sent: Vec<usize> =
            ["a", "bb", "ccc", "dddd", "eeeee"].map(|t| EchoRequest { text: t.into() }.encoded_len()).to_vec();
        assert_eq!(grpc_lengths(&mesh, role, &files, true), sent);
        assert_eq!(grpc_lengths(&mesh, role, &files, false), vec![reply_len("a bb ccc dddd eeeee", 5)]);
        let files = mesh.wait_for_capture(role, "grpc-chat").unwrap();
        assert_clean(&mesh, role, &files);
        assert_eq!(grpc_lengths(&mesh, role, &files, true).len(), 4);
        assert_eq!(
            grpc_lengths(&mesh, role, &files, false),
            (0..4).map(|i| reply_len(["X", "Y", "Z", "W"][i as usize], i)).collect::<Vec<_>>()
        );
    }
    mesh.shutdown().unwrap();
}

/// A finite request stream for client- and bidirectional-streaming calls.
fn tokio_stream_iter<T: Send + 'static>(items: Vec<T>) -> impl tokio_stream::Stream<Item = T> + Send + 'static {
    tokio_stream::iter(items)
}
