//! The benchmark's aggregator phases: ingest throughput over the real filter protocol and mTLS,
//! and the time from a response's end to its capture on disk.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes};
use packet_inspector_proto::{
    capture::{
        frame::Kind, BatchAck, BodyChunk, Direction, EndReason, Frame, FrameBatch, Header, Headers, Protocol, Role,
        SocketAddress, TransactionEnd, TransactionMetadata, TransactionStart,
    },
    tls,
};
use packet_inspector_tests::{http, process::Process, wait_for};

use crate::bench::{Options, Spread};
use prost::Message;

/// Ingest figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestRun {
    pub body_bytes: usize,
    pub round: usize,
    /// Which attempt at this round it was (0 the first): a round the host took too much from is
    /// run again, as in the proxy part.
    pub attempt: usize,
    /// Whether this attempt is the round's: only kept runs enter the medians and P3.
    pub kept: bool,
    pub frames: u64,
    pub payload_bytes: u64,
    /// Until the last capture was forwarded (or dropped), not only until the last batch was
    /// acknowledged: forwarding is part of the aggregator's work.
    pub aggregator_cpu_seconds: f64,
    pub wall_seconds: f64,
    pub frames_per_core_second: f64,
    /// Captured payload MB per aggregator CPU-second.
    pub megabytes_per_core_second: f64,
    /// Captures the aggregator built, forwarded to the discarding emulator, and dropped because
    /// its forwarding queue was full (the emulator did not keep up: their forwarding cost is
    /// then missing from the CPU time, and the figure flatters the aggregator).
    pub captures_built: u64,
    pub captures_forwarded: u64,
    pub captures_dropped_at_queue: u64,
    /// Milliseconds the host took from core 0 (the aggregator's) and core 1 (the generator's and
    /// the emulator's) during the run (steal time), and the larger as a share of the run (%).
    pub steal_ms: [f64; 2],
    pub stolen_percent: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Ingest {
    /// Every attempt of every round, kept or not.
    pub runs: Vec<IngestRun>,
    /// Small frames (1 KiB bodies): frames per aggregator CPU-second, over the kept rounds.
    pub frames_per_core_second: Spread,
    /// Large bodies (64 KiB): captured payload MB per aggregator CPU-second, over the kept rounds.
    pub megabytes_per_core_second: Spread,
}

/// The shortest ingest run: long enough that opening the stream and draining the forwarding
/// queue at the end are a small part of it.
const MIN_SECONDS: u64 = 5;
/// The body sizes of P3: frames/s is measured with small bodies, MB/s with large ones.
const SMALL_BODY: usize = 1024;
const LARGE_BODY: usize = 65_536;

const STREAMS: usize = 8;
/// Batches in flight per stream (with [`STREAMS`] and [`transactions_per_batch`]: at most 512
/// captures with 1 KiB bodies, 16 with 64 KiB). How far the generator runs ahead of forwarding
/// is bounded separately ([`AHEAD_CAPTURES`]).
const WINDOW: usize = 2;

/// Transactions per batch: about 64 KiB of bodies, as the filter's default `maxBatchBytes` cuts
/// them (at least one transaction).
fn transactions_per_batch(body_bytes: usize) -> u64 {
    (65_536 / (2 * body_bytes.max(1))).max(1) as u64
}

/// A batch of complete transactions (6 frames each: start, request headers and body, response
/// headers and body, end). Ids repeat from batch to batch: each transaction ends in its batch.
fn batch(body_bytes: usize) -> FrameBatch {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let header = |name: &str, value: &str| Header { name: name.into(), value: value.into() };
    let mut frames = Vec::new();
    for id in 1..=transactions_per_batch(body_bytes) {
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

/// The filter protocol's stream with batches encoded once, up front: the generator must outrun
/// the aggregator it measures, so a batch costs it one copy and TLS, not a deep clone and a
/// re-encode of every frame. Each batch is its `sequence` field followed by the shared encoding
/// of its frames (protobuf fields may come in any order).
#[derive(Clone, Copy, Default)]
struct PreEncoded;

struct PreEncodedEncoder;

impl tonic::codec::Encoder for PreEncodedEncoder {
    type Item = (u64, Bytes);
    type Error = tonic::Status;

    fn encode(
        &mut self,
        (sequence, frames): Self::Item,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        prost::encoding::uint64::encode(1, &sequence, dst);
        dst.put_slice(&frames);
        Ok(())
    }
}

impl tonic::codec::Codec for PreEncoded {
    type Encode = (u64, Bytes);
    type Decode = BatchAck;
    type Encoder = PreEncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<BatchAck>;

    fn encoder(&mut self) -> Self::Encoder {
        PreEncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

const STREAM_FRAMES: &str = "/packetinspector.capture.v1.CaptureService/StreamFrames";

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

/// The aggregator's counter `name` (without prefix) from its `/metrics` text; 0 when absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("packet_inspector_aggregator_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

const BUILT: &str = "captures_built_total";
const FORWARDED: &str = "captures_forwarded_total";
const FORWARD_FAILED: &str = "captures_forward_failed_total";
const QUEUE_FULL: &str = "captures_queue_full_total";

/// Captures the aggregator is done with: forwarded, given up, or dropped at its queue.
fn settled_captures(text: &str) -> u64 {
    [FORWARDED, FORWARD_FAILED, QUEUE_FULL].iter().map(|name| metric(text, name)).sum()
}

fn metrics(admin: u16) -> Result<String> {
    packet_inspector_tests::mesh::admin_get(admin, "/metrics")
}

/// Keeps the generator at most a bounded number of captures ahead of what the aggregator has
/// forwarded: the discarding emulator shares a core with the generator, and unpaced, the
/// aggregator dropped most captures at its forwarding queue (by design, under overload) and so
/// never did the forwarding work the figure must include. The bound fits the aggregator's
/// default queue (1,024 captures, 64 MiB) with room to spare; forwarded counts read late only
/// hold the generator back longer, never let it overrun.
const AHEAD_CAPTURES: u64 = 768;
const AHEAD_BYTES: u64 = 32 << 20;

/// Polls the aggregator's settled captures (forwarded, failed, dropped) since `baseline`.
async fn watch_settled(admin: u16, baseline: u64, settled: Arc<AtomicU64>, done: Arc<AtomicBool>) {
    while !done.load(Relaxed) {
        if let Ok(Ok(text)) = tokio::task::spawn_blocking(move || metrics(admin)).await {
            settled.store(settled_captures(&text).saturating_sub(baseline), Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn ingest_once(
    certs: &Path,
    port: u16,
    admin: u16,
    body_bytes: usize,
    seconds: u64,
    aggregator: u32,
) -> Result<IngestRun> {
    let identity = tls::Identity { cert_chain: certs.join("cert-chain.pem"), private_key: certs.join("key.pem") };
    let config = tls::reloading_client_config(certs.join("root-cert.pem"), Some(identity), tls::ServerCheck::Name)?;
    let channel = tls::connect_lazy("localhost", port, config, Duration::from_secs(5))?;
    let template = batch(body_bytes);
    let frames_per_batch = template.frames.len() as u64;
    // `sequence` 0 is not encoded: this is the frames (and nothing else) of every batch.
    let template = Bytes::from(template.encode_to_vec());
    let captures_per_batch = transactions_per_batch(body_bytes);
    let payload_per_batch = captures_per_batch * 2 * body_bytes as u64;
    let (frames, payload) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let before = metrics(admin)?;
    // A capture queued for forwarding holds its bodies twice (raw, and in the pcap records).
    let capture_bytes = 4 * body_bytes as u64 + 2048;
    let ahead = AHEAD_CAPTURES.min(AHEAD_BYTES / capture_bytes).max(captures_per_batch);
    let baseline = settled_captures(&before);
    let (sent, settled, done) =
        (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let watcher = tokio::spawn(watch_settled(admin, baseline, settled.clone(), done.clone()));
    let cpu_before = cpu_seconds(aggregator)?;
    let started = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (mut client, template) = (tonic::client::Grpc::new(channel.clone()), template.clone());
        let (frames, payload, sent, settled) = (frames.clone(), payload.clone(), sent.clone(), settled.clone());
        streams.push(tokio::spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(WINDOW);
            let window = Arc::new(tokio::sync::Semaphore::new(WINDOW));
            let sender = {
                let window = window.clone();
                tokio::spawn(async move {
                    let mut sequence = 0;
                    while Instant::now() < deadline {
                        let Ok(permit) = window.clone().acquire_owned().await else { break };
                        // Claim the batch's captures, or wait for the aggregator to forward.
                        let claimed = sent.fetch_add(captures_per_batch, Relaxed) + captures_per_batch;
                        if claimed > settled.load(Relaxed) + ahead {
                            sent.fetch_sub(captures_per_batch, Relaxed);
                            drop(permit);
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                        permit.forget();
                        sequence += 1;
                        if tx.send((sequence, template.clone())).await.is_err() {
                            break;
                        }
                    }
                })
            };
            client.ready().await.map_err(|err| anyhow::anyhow!("the aggregator's channel: {err}"))?;
            let request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let path = ::http::uri::PathAndQuery::from_static(STREAM_FRAMES);
            let mut acks = client.streaming(request, path, PreEncoded).await?.into_inner();
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
    let wall_seconds = started.elapsed().as_secs_f64();
    // Every capture built is forwarded (or dropped) before the CPU time is read.
    let after = tokio::task::spawn_blocking(move || {
        wait_for("the aggregator to forward what it built", Duration::from_secs(120), || {
            let text = metrics(admin).ok()?;
            (settled_captures(&text) >= metric(&text, BUILT)).then_some(text)
        })
    })
    .await??;
    done.store(true, Relaxed);
    watcher.await?;
    let delta = |name| metric(&after, name).saturating_sub(metric(&before, name));
    let (frames, payload_bytes) = (frames.load(Relaxed), payload.load(Relaxed));
    let aggregator_cpu_seconds = cpu_seconds(aggregator)? - cpu_before;
    let per_core = |amount: f64| amount / aggregator_cpu_seconds.max(0.01);
    Ok(IngestRun {
        body_bytes,
        round: 0,
        attempt: 0,
        kept: false,
        frames,
        payload_bytes,
        aggregator_cpu_seconds,
        wall_seconds,
        frames_per_core_second: per_core(frames as f64),
        megabytes_per_core_second: per_core(payload_bytes as f64 / 1e6),
        captures_built: delta(BUILT),
        captures_forwarded: delta(FORWARDED),
        captures_dropped_at_queue: delta(QUEUE_FULL),
        steal_ms: [0.0; 2],
        stolen_percent: 0.0,
    })
}

/// Ingest with small and with large bodies, the aggregator alone on core 0 and the load
/// generator (this process) on core 1, in `--ingest-rounds` rounds of both sizes.
///
/// Like the proxy part's rounds, a run the host took more than the steal limit from is run
/// again in a later pass, and the least stolen attempt is the round's: with 64 KiB bodies, the
/// figure per core fell as the host took more (a correlation of -0.91 over 21 runs: 347 MB/s at
/// up to 2% stolen, 243 above 10%), and a single run per size had missed P3 twice.
pub fn run(certs: &Path, port: u16, admin: u16, aggregator: u32, options: &Options) -> Result<Ingest> {
    pin(aggregator, 0)?;
    pin(std::process::id(), 1)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let seconds = options.seconds.max(MIN_SECONDS);
    let slots: Vec<(usize, usize)> = (0..options.ingest_rounds)
        .flat_map(|round| {
            let sizes = if round % 2 == 0 { [SMALL_BODY, LARGE_BODY] } else { [LARGE_BODY, SMALL_BODY] };
            sizes.map(|body| (round, body))
        })
        .collect();
    let measured = crate::bench::measure_in_passes(
        slots,
        options.steal_limit_percent,
        options.steal_retries,
        "ingest runs",
        |run: &IngestRun| run.stolen_percent,
        |&(round, body), attempt| {
            let steal = crate::bench::StealClock::start()?;
            let mut run = runtime.block_on(ingest_once(certs, port, admin, body, seconds, aggregator))?;
            (run.steal_ms, run.stolen_percent) = steal.read()?;
            (run.round, run.attempt) = (round, attempt);
            eprintln!(
                "bench: ingest {body:>6} B bodies, round {round}: {} frames, {:.1} MB in {:.1} s wall, {:.2} s aggregator CPU \
                 ({:.0} frames/s, {:.1} MB/s per core); captures built {}, forwarded {}, dropped at the forwarding queue {}; \
                 host took {:.1}%{}",
                run.frames,
                run.payload_bytes as f64 / 1e6,
                run.wall_seconds,
                run.aggregator_cpu_seconds,
                run.frames_per_core_second,
                run.megabytes_per_core_second,
                run.captures_built,
                run.captures_forwarded,
                run.captures_dropped_at_queue,
                run.stolen_percent,
                if attempt > 0 { format!(" (again, {attempt})") } else { String::new() }
            );
            Ok(run)
        },
    )?;
    pin(aggregator, 1)?;
    let mut runs = Vec::new();
    for (_, attempts, kept) in measured {
        runs.extend(attempts.into_iter().enumerate().map(|(at, run)| IngestRun { kept: at == kept, ..run }));
    }
    let kept = |body: usize, figure: fn(&IngestRun) -> f64| {
        Spread::of(runs.iter().filter(|r| r.kept && r.body_bytes == body).map(figure).collect())
            .context("no ingest run was kept")
    };
    let frames_per_core_second = kept(SMALL_BODY, |r| r.frames_per_core_second)?;
    let megabytes_per_core_second = kept(LARGE_BODY, |r| r.megabytes_per_core_second)?;
    eprintln!(
        "bench: ingest per aggregator core, median (min-max) of {} rounds: {:.0} ({:.0}-{:.0}) frames/s with 1 KiB bodies, \
         {:.1} ({:.1}-{:.1}) MB/s with 64 KiB bodies",
        options.ingest_rounds,
        frames_per_core_second.median,
        frames_per_core_second.min,
        frames_per_core_second.max,
        megabytes_per_core_second.median,
        megabytes_per_core_second.min,
        megabytes_per_core_second.max
    );
    Ok(Ingest { runs, frames_per_core_second, megabytes_per_core_second })
}

/// Waits until the pipeline is quiet: no frame reached the aggregator for 2 s (the filters'
/// buffers are empty) and every capture it built was forwarded, failed or dropped (each counted
/// in its metrics).
pub fn wait_drained(admin: u16) -> Result<()> {
    let mut last_frames = None;
    let mut quiet_since = Instant::now();
    wait_for("the capture pipeline to be quiet", Duration::from_secs(300), || {
        let text = metrics(admin).ok()?;
        let frames = metric(&text, "frames_received_total");
        if last_frames != Some(frames) {
            last_frames = Some(frames);
            quiet_since = Instant::now();
        }
        let built = metric(&text, BUILT);
        let settled = settled_captures(&text);
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
    // Enough that the p99 is not the slowest sample: with 100 it was, and one stall of the
    // host decided P5 (0.27 s in a run whose next two latency-only runs gave 0.10-0.11 s).
    const SAMPLES: usize = 500;
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
