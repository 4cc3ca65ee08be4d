//! The aggregator's TLS boundaries, in process on port 0: filters must present a certificate
//! from the configured CA, and captures are forwarded only to an analysis service whose
//! certificate carries a DNS-name SAN equal to the configured host.

use std::{path::Path, time::Duration};

use clap::Parser;
use packet_inspector_aggregator::config::Args;
use packet_inspector_proto::{
    capture::{
        capture_service_client::CaptureServiceClient, frame::Kind, Direction, EndReason, Frame, FrameBatch, Header,
        Headers, Protocol, Role, SocketAddress, TransactionEnd, TransactionMetadata, TransactionStart,
    },
    tls,
};
use packet_inspector_tests::certs::Ca;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

struct Running {
    port: u16,
    admin_port: u16,
    output: std::path::PathBuf,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("clean stop").unwrap();
        }
    }
}

/// Starts an emulator whose certificate names `analysis_san`, and an aggregator told to
/// forward to `localhost`.
async fn start(dir: &Path, ca: &Ca, analysis_san: &str) -> Running {
    ca.issue(&dir.join("aggregator"), &["localhost"]).unwrap();
    ca.issue(&dir.join("analysis"), &[analysis_san]).unwrap();
    let output = dir.join("captures");
    std::fs::create_dir_all(&output).unwrap();
    let shutdown = CancellationToken::new();

    let emulator_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let emulator_port = emulator_listener.local_addr().unwrap().port();
    let analysis = dir.join("analysis");
    let emulator_args = packet_inspector_analysis_emulator::Args::parse_from([
        "emulator".as_ref(),
        "--tls-cert".as_ref(),
        analysis.join("cert-chain.pem").as_os_str(),
        "--tls-key".as_ref(),
        analysis.join("key.pem").as_os_str(),
        "--output-dir".as_ref(),
        output.as_os_str(),
    ]);
    let emulator = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { packet_inspector_analysis_emulator::run(emulator_args, emulator_listener, shutdown).await.unwrap() }
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (port, admin_port) = (listener.local_addr().unwrap().port(), admin.local_addr().unwrap().port());
    let certs = dir.join("aggregator");
    let args = Args::parse_from([
        "aggregator".to_owned(),
        format!("--tls-cert={}", certs.join("cert-chain.pem").display()),
        format!("--tls-key={}", certs.join("key.pem").display()),
        format!("--client-ca={}", certs.join("root-cert.pem").display()),
        format!("--analysis-address=localhost:{emulator_port}"),
        format!("--analysis-ca={}", certs.join("root-cert.pem").display()),
        "--shutdown-grace-seconds=10".to_owned(),
    ]);
    let aggregator = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { packet_inspector_aggregator::run(args, listener, Some(admin), shutdown).await.unwrap() }
    });
    Running { port, admin_port, output, shutdown, tasks: vec![aggregator, emulator] }
}

fn identity(dir: &Path) -> tls::Identity {
    tls::Identity { cert_chain: dir.join("cert-chain.pem"), private_key: dir.join("key.pem") }
}

/// One complete HTTP/1.1 transaction, as a filter would stream it.
fn transaction(request_id: &str) -> FrameBatch {
    let frame = |kind| Frame { transaction_id: 1, timestamp_ns: 1_700_000_000_000_000_000, kind: Some(kind) };
    let header = |name: &str, value: &str| Header { name: name.into(), value: value.into() };
    let metadata = TransactionMetadata {
        pod_name: "client-pod".into(),
        namespace: "ns".into(),
        role: Role::Consumer as i32,
        protocol: Protocol::Http1 as i32,
        request_id: request_id.into(),
        downstream_remote: Some(SocketAddress { ip: "10.1.0.5".into(), port: 40000 }),
        downstream_local: Some(SocketAddress { ip: "10.1.0.9".into(), port: 9080 }),
        ..Default::default()
    };
    FrameBatch {
        sequence: 1,
        captures_dropped: 0,
        frames: vec![
            frame(Kind::Start(TransactionStart { metadata: Some(metadata) })),
            frame(Kind::Headers(Headers {
                direction: Direction::Request as i32,
                headers: vec![header(":method", "GET"), header(":path", "/"), header(":authority", "svc")],
                end_of_stream: true,
            })),
            frame(Kind::Headers(Headers {
                direction: Direction::Response as i32,
                headers: vec![header(":status", "204")],
                end_of_stream: true,
            })),
            frame(Kind::End(TransactionEnd { reason: EndReason::Complete as i32, upstream: None })),
        ],
    }
}

/// Streams one batch as a filter (with `client` as its identity, if any); returns the ack's
/// sequence, or the error the call ended with.
async fn send_batch(port: u16, ca: &Path, client: Option<&tls::Identity>, batch: FrameBatch) -> Result<u64, String> {
    let config = tls::client_config(ca, client).map_err(|e| e.to_string())?;
    let channel = tls::connect_lazy("localhost", port, config, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut client = CaptureServiceClient::new(channel);
    let call = async {
        let response = client.stream_frames(tokio_stream::iter(vec![batch])).await.map_err(|s| s.to_string())?;
        let ack = response.into_inner().message().await.map_err(|s| s.to_string())?;
        ack.map(|ack| ack.sequence).ok_or_else(|| "stream ended without an ack".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(20), call).await.map_err(|_| "timed out".to_owned())?
}

async fn metric(admin_port: u16, name: &str) -> u64 {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", admin_port)).await.unwrap();
    socket.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let mut text = String::new();
    socket.read_to_string(&mut text).await.unwrap();
    let prefix = format!("packet_inspector_aggregator_{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap()
}

/// Polls `check` every 50 ms until it holds, failing after `timeout`.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("packet-inspector-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stored(output: &Path) -> Vec<String> {
    std::fs::read_dir(output).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_must_present_a_certificate_from_the_mesh_ca() {
    let dir = temp_dir("mtls");
    let ca = Ca::new("mesh").unwrap();
    let rogue = Ca::new("rogue").unwrap();
    let running = start(&dir, &ca, "localhost").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let impostor = identity(&rogue.issue(&dir.join("impostor"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");

    let without = send_batch(running.port, &root, None, transaction("no-cert")).await;
    assert!(without.is_err(), "a client without a certificate was served: {without:?}");
    let other_ca = send_batch(running.port, &root, Some(&impostor), transaction("other-ca")).await;
    assert!(other_ca.is_err(), "a client signed by another CA was served: {other_ca:?}");
    assert_eq!(metric(running.admin_port, "streams_total").await, 0, "refused clients never reach the service");

    // The positive control: the same call with a mesh certificate is served and stored.
    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("mesh-cert")).await, Ok(1));
    let expected = format!("client-pod-consumer-mesh-cert-{}.pcap", 1_700_000_000_000_000_000u64);
    eventually("the capture to be stored", Duration::from_secs(20), || {
        let found = stored(&running.output).contains(&expected);
        async move { found }
    })
    .await;
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn captures_are_not_forwarded_to_a_service_whose_san_does_not_match() {
    let dir = temp_dir("san");
    let ca = Ca::new("mesh").unwrap();
    let running = start(&dir, &ca, "analysis.elsewhere.example").await;
    let filter = identity(&ca.issue(&dir.join("filter"), &["filter.ns.svc"]).unwrap());
    let root = dir.join("aggregator/root-cert.pem");

    assert_eq!(send_batch(running.port, &root, Some(&filter), transaction("san-mismatch")).await, Ok(1));
    eventually("the forward to be given up", Duration::from_secs(30), || async {
        metric(running.admin_port, "captures_forward_failed_total").await == 1
    })
    .await;
    assert_eq!(metric(running.admin_port, "captures_forwarded_total").await, 0);
    assert!(stored(&running.output).is_empty(), "nothing may reach a service with the wrong name");
    running.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}
