//! Helpers shared by the aggregator's in-process tests: an emulator and an aggregator on
//! port 0, a filter-like client, metrics.

#![allow(dead_code)]

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

pub struct Running {
    pub port: u16,
    pub admin_port: u16,
    pub output: std::path::PathBuf,
    aggregator: (CancellationToken, tokio::task::JoinHandle<()>),
    emulator: (CancellationToken, tokio::task::JoinHandle<()>),
}

impl Running {
    /// Stops the aggregator (which delivers what it accepted), then the emulator.
    pub async fn stop(self) {
        for (shutdown, task) in [self.aggregator, self.emulator] {
            shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("clean stop").unwrap();
        }
    }

    /// Stops the emulator while the aggregator runs, within `within`; then the aggregator.
    pub async fn stop_emulator_first(self, within: Duration) {
        let (shutdown, task) = self.emulator;
        shutdown.cancel();
        tokio::time::timeout(within, task).await.expect("the emulator stops promptly").unwrap();
        let (shutdown, task) = self.aggregator;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("clean stop").unwrap();
    }
}

/// Starts an emulator whose certificate names `analysis_san`, and an aggregator told to
/// forward to `localhost`.
pub async fn start(dir: &Path, ca: &Ca, analysis_san: &str) -> Running {
    start_with(dir, ca, analysis_san, &[]).await
}

/// As [`start`], with more aggregator flags.
pub async fn start_with(dir: &Path, ca: &Ca, analysis_san: &str, extra: &[String]) -> Running {
    ca.issue(&dir.join("aggregator"), &["localhost"]).unwrap();
    ca.issue(&dir.join("analysis"), &[analysis_san]).unwrap();
    let output = dir.join("captures");
    std::fs::create_dir_all(&output).unwrap();

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
    let emulator_shutdown = CancellationToken::new();
    let emulator = tokio::spawn({
        let shutdown = emulator_shutdown.clone();
        async move { packet_inspector_analysis_emulator::run(emulator_args, emulator_listener, shutdown).await.unwrap() }
    });

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (port, admin_port) = (listener.local_addr().unwrap().port(), admin.local_addr().unwrap().port());
    let certs = dir.join("aggregator");
    let args = Args::parse_from(
        [
            "aggregator".to_owned(),
            format!("--tls-cert={}", certs.join("cert-chain.pem").display()),
            format!("--tls-key={}", certs.join("key.pem").display()),
            format!("--client-ca={}", certs.join("root-cert.pem").display()),
            format!("--analysis-address=localhost:{emulator_port}"),
            format!("--analysis-ca={}", certs.join("root-cert.pem").display()),
            "--shutdown-grace-seconds=10".to_owned(),
        ]
        .into_iter()
        .chain(extra.iter().cloned()),
    );
    let aggregator_shutdown = CancellationToken::new();
    let aggregator = tokio::spawn({
        let shutdown = aggregator_shutdown.clone();
        async move { packet_inspector_aggregator::run(args, listener, Some(admin), shutdown).await.unwrap() }
    });
    Running {
        port,
        admin_port,
        output,
        aggregator: (aggregator_shutdown, aggregator),
        emulator: (emulator_shutdown, emulator),
    }
}

pub fn identity(dir: &Path) -> tls::Identity {
    tls::Identity { cert_chain: dir.join("cert-chain.pem"), private_key: dir.join("key.pem") }
}

/// One complete HTTP/1.1 transaction, as a filter would stream it.
pub fn transaction(request_id: &str) -> FrameBatch {
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
pub async fn send_batch(
    port: u16,
    ca: &Path,
    client: Option<&tls::Identity>,
    batch: FrameBatch,
) -> Result<u64, String> {
    let config = tls::reloading_client_config(ca.to_owned(), client.cloned(), tls::ServerCheck::Name)
        .map_err(|e| e.to_string())?;
    let channel = tls::connect_lazy("localhost", port, config, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let mut client = CaptureServiceClient::new(channel);
    let call = async {
        let response = client.stream_frames(tokio_stream::iter(vec![batch])).await.map_err(|s| s.to_string())?;
        let ack = response.into_inner().message().await.map_err(|s| s.to_string())?;
        ack.map(|ack| ack.sequence).ok_or_else(|| "stream ended without an ack".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(20), call).await.map_err(|_| "timed out".to_owned())?
}

/// GET on the admin endpoint: (status line, body).
pub async fn admin_get(admin_port: u16, path: &str) -> (String, Vec<u8>) {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", admin_port)).await.unwrap();
    socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&raw[..split]).lines().next().unwrap_or_default().to_owned();
    (status, raw[split + 4..].to_vec())
}

pub async fn metric(admin_port: u16, name: &str) -> u64 {
    let text = String::from_utf8(admin_get(admin_port, "/metrics").await.1).unwrap();
    let prefix = format!("packet_inspector_aggregator_{name} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap()
}

/// Polls `check` every 50 ms until it holds, failing after `timeout`.
pub async fn eventually<F: std::future::Future<Output = bool>>(
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

pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("packet-inspector-tls-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn stored(output: &Path) -> Vec<String> {
    std::fs::read_dir(output).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// A gRPC message: the 5-byte prefix (uncompressed), then a protobuf message whose field 1 is
/// `text` (Wireshark dissects the payload as protobuf, so it must be valid).
pub fn grpc_message(text: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x0a];
    let mut len = text.len();
    while len >= 0x80 {
        payload.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    payload.push(len as u8);
    payload.extend_from_slice(text);
    let mut out = vec![0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}
