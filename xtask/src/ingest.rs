//! The benchmark's aggregator phases: ingest throughput over the real filter protocol and mTLS,
//! and the time from a response's end to its capture on disk.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use packet_inspector_proto::{
    capture::{
        capture_service_client::CaptureServiceClient, frame::Kind, BodyChunk, Direction, EndReason, Frame, FrameBatch,
        Header, Headers, Protocol, Role, SocketAddress, TransactionEnd, TransactionMetadata, TransactionStart,
    },
    tls,
};
use packet_inspector_tests::{http, process::Process, wait_for};

/// Ingest figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestRun {
    pub body_bytes: usize,
    pub frames: u64,
    pub payload_bytes: u64,
    pub aggregator_cpu_seconds: f64,
    pub wall_seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Ingest {
    pub runs: Vec<IngestRun>,
    /// Small frames (1 KiB bodies): frames per aggregator CPU-second.
    pub frames_per_core_second: f64,
    /// Large bodies (64 KiB): captured payload MB per aggregator CPU-second.
    pub megabytes_per_core_second: f64,
}

const STREAMS: usize = 8;
const TRANSACTIONS_PER_BATCH: u64 = 32;
const WINDOW: usize = 4;

/// A batch of complete transactions (6 frames each: start, request headers and body, response
/// headers and body, end). Ids repeat from batch to batch: each transaction ends in its batch.
fn batch(body_bytes: usize) -> FrameBatch {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let header = |name: &str, value: &str| Header { name: name.into(), value: value.into() };
    let mut frames = Vec::new();
    for id in 1..=TRANSACTIONS_PER_BATCH {
        let frame = |kind| Frame { transaction_id: id, timestamp_ns: now, kind: Some(kind) };
        let metadata = TransactionMetadata {
            pod_name: "bench-client-0".into(),
            namespace: "bench".into(),
            role: Role::Consumer as i32,
            protocol: Protocol::Http1 as i32,
            request_id: format!("bench-{id}"),
            downstream_remote: Some(SocketAddress { ip: "10.0.0.1".into(), port: 40000 }),
            downstream_local: Some(SocketAddress { ip: "10.0.0.2".into(), port: 8080 }),
            start_time_ns: now,
            ..Default::default()
        };
        frames.push(frame(Kind::Start(TransactionStart { metadata: Some(metadata) })));
        for (direction, headers) in [
            (
                Direction::Request,
                vec![header(":method", "POST"), header(":path", "/bench"), header(":authority", "svc")],
            ),
            (Direction::Response, vec![header(":status", "200"), header("content-type", "application/octet-stream")]),
        ] {
            frames.push(frame(Kind::Headers(Headers { direction: direction as i32, headers, end_of_stream: false })));
            frames.push(frame(Kind::Body(BodyChunk {
                direction: direction as i32,
                data: vec![b'x'; body_bytes],
                truncated_bytes: 0,
                end_of_stream: true,
            })));
        }
        frames.push(frame(Kind::End(TransactionEnd { reason: EndReason::Complete as i32, upstream: None })));
    }
    FrameBatch { sequence: 0, frames, captures_dropped: 0 }
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    Ok((fields[11].parse::<u64>()? + fields[12].parse::<u64>()?) as f64 / 100.0)
}

pub fn pin(pid: u32, core: u32) -> Result<()> {
    let status = Command::new("taskset").args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()]).output()?.status;
    if !status.success() {
        bail!("cannot pin {pid} to core {core}");
    }
    Ok(())
}

async fn ingest_once(certs: &Path, port: u16, body_bytes: usize, seconds: u64, aggregator: u32) -> Result<IngestRun> {
    let identity = tls::Identity { cert_chain: certs.join("cert-chain.pem"), private_key: certs.join("key.pem") };
    let config = tls::reloading_client_config(certs.join("root-cert.pem"), Some(identity))?;
    let channel = tls::connect_lazy("localhost", port, config, Duration::from_secs(5))?;
    let template = batch(body_bytes);
    let frames_per_batch = template.frames.len() as u64;
    let payload_per_batch = TRANSACTIONS_PER_BATCH * 2 * body_bytes as u64;
    let (frames, payload) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let cpu_before = cpu_seconds(aggregator)?;
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (mut client, template) =
            (CaptureServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20), template.clone());
        let (frames, payload) = (frames.clone(), payload.clone());
        streams.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<FrameBatch>(WINDOW);
            let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
            let sender = {
                let window = window.clone();
                tokio::spawn(async move {
                    let mut sequence = 0;
                    while Instant::now() < deadline {
                        let Ok(permit) = window.clone().acquire_owned().await else { break };
                        permit.forget();
                        sequence += 1;
                        let mut batch = template.clone();
                        batch.sequence = sequence;
                        if tx.send(batch).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let mut acks = client.stream_frames(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            while let Some(_ack) = acks.message().await? {
                frames.fetch_add(frames_per_batch, Relaxed);
                payload.fetch_add(payload_per_batch, Relaxed);
                window.add_permits(1);
            }
            sender.await?;
            anyhow::Ok(())
        }));
    }
    for stream in streams {
        stream.await??;
    }
    Ok(IngestRun {
        body_bytes,
        frames: frames.load(Relaxed),
        payload_bytes: payload.load(Relaxed),
        aggregator_cpu_seconds: cpu_seconds(aggregator)? - cpu_before,
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// Ingest with small and with large bodies, the aggregator alone on core 0 and the load
/// generator (this process) on core 1.
pub fn run(certs: &Path, port: u16, aggregator: u32, seconds: u64) -> Result<Ingest> {
    pin(aggregator, 0)?;
    pin(std::process::id(), 1)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut runs = Vec::new();
    for body in [1024, 65536] {
        let run = runtime.block_on(ingest_once(certs, port, body, seconds, aggregator))?;
        eprintln!(
            "bench: ingest {body:>6} B bodies: {} frames, {:.1} MB in {:.1} s wall, {:.2} s aggregator CPU",
            run.frames,
            run.payload_bytes as f64 / 1e6,
            run.wall_seconds,
            run.aggregator_cpu_seconds
        );
        runs.push(run);
    }
    pin(aggregator, 1)?;
    let per_core = |run: &IngestRun, amount: f64| amount / run.aggregator_cpu_seconds.max(0.01);
    Ok(Ingest {
        frames_per_core_second: per_core(&runs[0], runs[0].frames as f64),
        megabytes_per_core_second: per_core(&runs[1], runs[1].payload_bytes as f64 / 1e6),
        runs,
    })
}

/// Waits until the pipeline is quiet: no frame reached the aggregator for 2 s (the filters'
/// buffers are empty) and every capture it built was forwarded, failed or dropped (each counted
/// in its metrics).
pub fn wait_drained(admin: u16) -> Result<()> {
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("packet_inspector_aggregator_{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let mut last_frames = None;
    let mut quiet_since = Instant::now();
    wait_for("the capture pipeline to be quiet", Duration::from_secs(300), || {
        let text = packet_inspector_tests::mesh::admin_get(admin, "/metrics").ok()?;
        let frames = metric(&text, "frames_received_total");
        if last_frames != Some(frames) {
            last_frames = Some(frames);
            quiet_since = Instant::now();
        }
        let built = metric(&text, "captures_built_total");
        let settled = ["captures_forwarded_total", "captures_forward_failed_total", "captures_queue_full_total"]
            .iter()
            .map(|name| metric(&text, name))
            .sum::<u64>();
        (settled >= built && quiet_since.elapsed() >= Duration::from_secs(2)).then_some(())
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_seconds: f64,
    pub p99_seconds: f64,
    pub max_seconds: f64,
}

/// Replaces the discarding emulator with one writing files, sends sequential requests through
/// the capture sidecar's listener, and measures response end → capture file on disk.
pub fn capture_latency(
    dir: &Path,
    certs: &Path,
    release: &Path,
    emulator_port: u16,
    capture_port: u16,
    processes: &mut Vec<Process>,
) -> Result<Latency> {
    if let Some(index) = processes.iter().position(|p| p.name == "emulator") {
        processes.remove(index).stop(Duration::from_secs(10));
    }
    let output = dir.join("captures");
    std::fs::create_dir_all(&output)?;
    let mut command = Command::new("taskset");
    command
        .args(["-c", "1"])
        .arg(release.join("packet-inspector-analysis-emulator"))
        .args(["--listen", &format!("127.0.0.1:{emulator_port}")])
        .arg("--tls-cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("--tls-key")
        .arg(certs.join("key.pem"))
        .arg("--output-dir")
        .arg(&output);
    processes.push(Process::spawn("emulator-writing", command, &dir.join("emulator-writing.log"))?);
    wait_for("the writing emulator", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", emulator_port)).ok()
    })?;
    const SAMPLES: usize = 100;
    let to = std::net::SocketAddr::from(([127, 0, 0, 1], capture_port));
    let mut ended: Vec<(String, SystemTime)> = Vec::new();
    for n in 0..SAMPLES {
        let id = format!("latency-{n}");
        let response = http::send(to, &format!("GET /latency HTTP/1.1\r\nhost: bench\r\nx-request-id: {id}"), b"")?;
        if response.status != 200 {
            bail!("request {n} answered {}", response.status);
        }
        ended.push((id, SystemTime::now()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let files: Vec<PathBuf> = wait_for("every latency capture", Duration::from_secs(60), || {
        let files: Vec<PathBuf> = std::fs::read_dir(&output)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pcap"))
            .collect();
        (files.len() >= SAMPLES).then_some(files)
    })?;
    let mut delays: Vec<f64> = ended
        .iter()
        .filter_map(|(id, at)| {
            let file = files
                .iter()
                .find(|f| f.file_name().is_some_and(|n| n.to_string_lossy().contains(&format!("-{id}-"))))?;
            let written = std::fs::metadata(file).ok()?.modified().ok()?;
            Some(written.duration_since(*at).map_or(0.0, |d| d.as_secs_f64()))
        })
        .collect();
    if delays.len() < SAMPLES {
        bail!("only {} of {SAMPLES} captures found", delays.len());
    }
    delays.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| delays[((delays.len() as f64 * q) as usize).min(delays.len() - 1)];
    Ok(Latency { samples: delays.len(), p50_seconds: at(0.5), p99_seconds: at(0.99), max_seconds: at(1.0) })
}
