//! What the filter's own logic costs per HTTP exchange, natively (outside the Wasm VM), run by
//! `cargo xtask bench --parts filter`: the host-free code the capture module runs for one
//! HTTP/1.1 GET with a 1 KiB response (decoding the header pairs Envoy hands over, the
//! connection's facts from the cache, encoding the five frames into batches, cutting and
//! acknowledging batches), through the same `ConnectionCache`, `Pipeline` and
//! `HttpTransaction` the module uses, with a host that only counts what it is sent, over 50
//! keep-alive connections. What the proxy-wasm host calls cost is measured by the proxy part
//! instead.
//!
//! `--evict BYTES` writes one byte in every 64 of a `BYTES`-long buffer before each exchange
//! (not timed): in Envoy, the proxy's own work between two callbacks pushes the module's code
//! and data out of the CPU's caches, and this puts the logic in the same state. The same
//! program builds for `wasm32-wasip1`, and the bench runs it in V8 as well (Node.js), so the
//! logic's cost inside the VM is known apart from the host calls around it.
//!
//! Prints one JSON object: exchanges, bytes evicted before each, nanoseconds per exchange,
//! bytes sent per exchange.

use std::{
    collections::HashMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use packet_inspector_filter::{
    config::Config,
    connections::{ConnectionCache, ConnectionFacts},
    metadata, pairs,
    pipeline::{Fate, Pipeline},
    transaction::HttpTransaction,
    wire::{BodyBytes, SharedMetadata, StartRef},
};
use packet_inspector_proto::capture::{BatchAck, Direction, Role, SocketAddress, TransactionMetadata};
use prost::Message;

/// Exchanges run before measuring, and measured (warm, cold): fewer when each is preceded by
/// an eviction, which costs far more than the exchange.
const WARM_UP: (u64, u64) = (100_000, 20_000);
const MEASURED: (u64, u64) = (1_000_000, 100_000);

#[path = "../tests/support/counting_host.rs"]
mod counting_host;

use counting_host::CountingHost;

struct Exchange {
    request_headers: Vec<u8>,
    response_headers: Vec<u8>,
    body: Vec<u8>,
    labels: HashMap<String, String>,
}

impl Exchange {
    /// What Envoy hands a sidecar's filter for `wrk`'s GET and a 1 KiB answer.
    fn typical() -> Self {
        Self {
            request_headers: pairs::encode(&[
                (":authority", "127.0.0.1:10000"),
                (":path", "/"),
                (":method", "GET"),
                (":scheme", "http"),
                ("x-forwarded-proto", "http"),
                ("x-request-id", "0b6c5a7e-1f1e-4a5b-9d3c-1e2f3a4b5c6d"),
            ]),
            response_headers: pairs::encode(&[
                (":status", "200"),
                ("content-length", "1024"),
                ("content-type", "text/plain"),
                ("date", "Sat, 21 Nov 2026 21:00:00 GMT"),
                ("server", "envoy"),
                ("x-envoy-upstream-service-time", "0"),
            ]),
            body: vec![b'x'; 1024],
            labels: [("app", "reviews"), ("version", "v1")].map(|(k, v)| (k.to_owned(), v.to_owned())).into(),
        }
    }

    /// What the module learns on a connection's first request.
    fn connection(&self, connection_id: u64) -> ConnectionFacts {
        let shared = TransactionMetadata {
            pod_name: "reviews-v1-6464c65b66-4c8jl".into(),
            namespace: "bookinfo".into(),
            workload: "reviews-v1".into(),
            labels: self.labels.clone(),
            role: Role::Producer as i32,
            downstream_remote: Some(SocketAddress { ip: "10.0.0.7".into(), port: 40_000 + connection_id as u32 }),
            downstream_local: Some(SocketAddress { ip: "10.0.0.9".into(), port: 9080 }),
            ..Default::default()
        };
        ConnectionFacts { request_protocol: Some(b"HTTP/1.1".to_vec()), metadata: SharedMetadata::encode(shared) }
    }

    /// Records one exchange as the module's callbacks do, in their order.
    fn record(
        &self,
        pipeline: &mut Pipeline,
        connections: &mut ConnectionCache,
        host: &mut CountingHost,
        connection_id: u64,
    ) -> Result<(), String> {
        host.now_ns += 1_000;
        let now = host.now_ns;
        let request = pairs::decode(&self.request_headers).map_err(|err| format!("{err:?}"))?;
        let id = pipeline.begin(host).ok_or("the pipeline refused a capture")?;
        let connection = connections.facts(connection_id, || self.connection(connection_id));
        let start = StartRef {
            shared: &connection.metadata,
            protocol: metadata::protocol(connection.request_protocol.as_deref(), &request),
            request_id: metadata::header_value(&request, b"x-request-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default(),
            connection_id,
            start_time_ns: now,
        };
        let mut transaction = HttpTransaction::new(id, 64 * 1024);
        let fate = pipeline.record(host, Fate::Recording, &transaction.start(now, start));
        let frame = transaction.headers(now, Direction::Request, &request, true);
        transaction.fate = pipeline.record(host, fate, &frame);
        let response = pairs::decode(&self.response_headers).map_err(|err| format!("{err:?}"))?;
        let frame = transaction.headers(now, Direction::Response, &response, false);
        transaction.fate = pipeline.record(host, transaction.fate, &frame);
        let body = self.body.as_slice();
        if let Some(frame) = transaction.body(now, Direction::Response, BodyBytes::whole(&body), body.len(), true) {
            transaction.fate = pipeline.record(host, transaction.fate, &frame);
        }
        let end = transaction.end(now, Some(SocketAddress { ip: "127.0.0.1".into(), port: 9080 }));
        if pipeline.record(host, transaction.fate, &end) != Fate::Recording {
            return Err("a capture was dropped: the benchmark would not measure the whole path".into());
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("exchange_cost: {err}");
            ExitCode::FAILURE
        }
    }
}

/// What the CPU cache does not keep of one exchange to the next: `--evict BYTES`.
fn evicted_bytes() -> Result<usize, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => Ok(0),
        [flag, bytes] if flag == "--evict" => {
            bytes.parse().map_err(|_| format!("--evict takes a number of bytes, not {bytes:?}"))
        }
        _ => Err(format!("usage: exchange_cost [--evict BYTES]; got {args:?}")),
    }
}

/// Writes through a buffer, one byte per cache line: what the caches held before is gone.
struct Evictor {
    lines: Vec<u8>,
}

impl Evictor {
    fn evict(&mut self) {
        for byte in self.lines.iter_mut().step_by(64) {
            *byte = byte.wrapping_add(1);
        }
        std::hint::black_box(&mut self.lines);
    }
}

fn run() -> Result<serde_json::Value, String> {
    let mut evictor = Evictor { lines: vec![0; evicted_bytes()?] };
    let (warm_up, measured) = if evictor.lines.is_empty() { (WARM_UP.0, MEASURED.0) } else { (WARM_UP.1, MEASURED.1) };
    let config = Config::from_json(br#"{"cluster":"aggregator"}"#).map_err(|err| err.to_string())?;
    let mut pipeline = Pipeline::new(&config);
    let mut host = CountingHost::default();
    pipeline.on_tick(&mut host);
    let accepted = pairs::encode(&[(":status", "200"), ("content-type", "application/grpc")]);
    pipeline.on_stream_headers(&mut host, 1, &pairs::decode(&accepted).map_err(|err| format!("{err:?}"))?);
    if !pipeline.is_ready() {
        return Err(format!("the stream did not become ready: {:?}", host.warnings));
    }
    let exchange = Exchange::typical();
    let mut connections = ConnectionCache::new(4096);
    let mut acked = 0;
    // Each exchange is timed on its own, so that the eviction before it is not; what reading
    // the clock twice costs (timed the same way, with nothing between) is taken off.
    let mut measure = |count: u64, host: &mut CountingHost| -> Result<f64, String> {
        let (mut exchanges, mut clock) = (Duration::ZERO, Duration::ZERO);
        for n in 0..count {
            evictor.evict();
            let started = Instant::now();
            clock += started.elapsed();
            evictor.evict();
            let started = Instant::now();
            exchange.record(&mut pipeline, &mut connections, host, n % 50 + 1)?;
            // The aggregator acknowledges each batch at once.
            while acked < host.batches {
                acked += 1;
                pipeline.on_stream_message(host, 1, &BatchAck { sequence: acked }.encode_to_vec());
            }
            exchanges += started.elapsed();
        }
        Ok(exchanges.saturating_sub(clock).as_nanos() as f64 / count as f64)
    };
    measure(warm_up, &mut host)?;
    let bytes_before = host.bytes;
    let nanoseconds = measure(measured, &mut host)?;
    if !host.warnings.is_empty() {
        return Err(format!("the pipeline warned: {:?}", host.warnings));
    }
    Ok(serde_json::json!({
        "exchanges": measured,
        "evicted_bytes_before_each": evictor.lines.len(),
        "nanoseconds_per_exchange": nanoseconds,
        "bytes_sent_per_exchange": (host.bytes - bytes_before) as f64 / measured as f64,
    }))
}
