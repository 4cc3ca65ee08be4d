//! What the capture path allocates once warm: one heap call per exchange (the upstream
//! address's text, which the end frame carries as a `String`), none per frame, and none per
//! batch unless the host takes the batches' buffers (the native capture does, and the outbox
//! needs a new one). The benchmark issue asks for a hot path without per-request allocation
//! churn; this counts the heap calls.
//!
//! Each exchange goes through the calls both edges make (the Wasm plugin and the native
//! capture): the connection's facts from the cache, [`HttpTransaction::open`] (start and
//! request headers), response headers, a body that the host holds in two pieces, trailers, and
//! the end frame with the upstream address parsed from the host's text, as the edges parse it.
//! What the edges themselves allocate is not counted here: the Wasm edge receives each host
//! result in memory the ABI allocates, and the native edge lists the header pairs Envoy hands
//! over.
//!
//! This file is its own test binary, so its counting allocator sees only these tests; the
//! counts are per thread, so tests running side by side do not add to each other's.

// The helpers below fail the test as the tests themselves do, by panicking.
#![allow(clippy::expect_used)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    sync::Arc,
};

use packet_inspector_filter::{
    config::Config,
    connections::{ConnectionCache, ConnectionFacts},
    metadata,
    pipeline::{Fate, Pipeline},
    transaction::{ExchangeStart, HttpTransaction},
    wire::{BodyBytes, SharedMetadata},
};
use packet_inspector_proto::capture::{BatchAck, Direction, Role, SocketAddress, TransactionMetadata};
use prost::Message;

/// The system allocator, counting the calls that get memory (allocations and reallocations)
/// made on each thread.
struct CountingAllocator;

thread_local! {
    static HEAP_CALLS: Cell<u64> = const { Cell::new(0) };
}

fn heap_calls() -> u64 {
    HEAP_CALLS.with(Cell::get)
}

fn count_one() {
    // `try_with`: a thread being torn down may still free and allocate.
    let _ = HEAP_CALLS.try_with(|calls| calls.set(calls.get() + 1));
}

// SAFETY: every call is passed to `System` unchanged; counting touches no memory it returns.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

mod support {
    pub mod counting_host;
}

use support::counting_host::CountingHost;

const REQUEST_HEADERS: [(&[u8], &[u8]); 6] = [
    (b":authority", b"reviews.bookinfo:9080"),
    (b":path", b"/reviews/0"),
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b"content-type", b"application/json"),
    (b"x-request-id", b"0b6c5a7e-1f1e-4a5b-9d3c-1e2f3a4b5c6d"),
];
const RESPONSE_HEADERS: [(&[u8], &[u8]); 3] =
    [(b":status", b"200"), (b"content-type", b"application/json"), (b"server", b"envoy")];
const TRAILERS: [(&[u8], &[u8]); 1] = [(b"x-checksum", b"c0ffee")];
const CONNECTIONS: u64 = 50;

fn connection_facts(connection_id: u64) -> ConnectionFacts {
    let shared = TransactionMetadata {
        pod_name: "reviews-v1-6464c65b66-4c8jl".into(),
        namespace: "bookinfo".into(),
        role: Role::Producer as i32,
        downstream_remote: Some(SocketAddress { ip: "10.0.0.7".into(), port: 40_000 + connection_id as u32 }),
        ..Default::default()
    };
    ConnectionFacts { request_protocol: Some(b"HTTP/1.1".to_vec()), metadata: SharedMetadata::encode(shared) }
}

/// One exchange, recorded as the edges record it; `body` arrives in two pieces.
fn record_exchange(
    pipeline: &mut Pipeline,
    connections: &mut ConnectionCache,
    host: &mut CountingHost,
    connection_id: u64,
    body: (&[u8], &[u8]),
) {
    host.now_ns += 1_000;
    let now_ns = host.now_ns;
    let id = pipeline.begin(host).expect("the pipeline takes the exchange");
    let connection: Arc<ConnectionFacts> = connections.facts(connection_id, || connection_facts(connection_id));
    let start = ExchangeStart {
        id,
        now_ns,
        connection_id,
        connection: &connection,
        request_headers: &REQUEST_HEADERS,
        end_of_stream: true,
    };
    let mut transaction = HttpTransaction::open(pipeline, host, 64 * 1024, start);
    let frame = transaction.headers(now_ns, Direction::Response, &RESPONSE_HEADERS, false);
    transaction.fate = pipeline.record(host, transaction.fate, &frame);
    let pieces = [body.0, body.1];
    let body_len = body.0.len() + body.1.len();
    let budget = transaction.body_budget(Direction::Response, body_len);
    let frame = transaction
        .body(now_ns, Direction::Response, BodyBytes::prefix(&pieces, budget), body_len, false)
        .expect("a non-empty body makes a frame");
    transaction.fate = pipeline.record(host, transaction.fate, &frame);
    let frame = transaction.trailers(now_ns, Direction::Response, &TRAILERS);
    transaction.fate = pipeline.record(host, transaction.fate, &frame);
    let upstream = metadata::socket_address(Some(b"10.0.0.9:9080"));
    let frame = transaction.end(now_ns, upstream);
    assert_eq!(pipeline.record(host, transaction.fate, &frame), Fate::Recording, "a capture was dropped");
}

/// What `measured` exchanges cost the heap, after as many to warm up (the cache's connections
/// known, the outbox's buffers grown), with every batch acknowledged at once.
struct Measured {
    heap_calls: u64,
    exchanges: u64,
    /// Batches cut while measuring, and their bytes.
    batches: u64,
    bytes: u64,
}

fn measure(takes_batches: bool, body_bytes: usize, measured: u64) -> Measured {
    let config = Config::from_json(br#"{"cluster":"aggregator"}"#).expect("the default configuration");
    let mut pipeline = Pipeline::new(&config);
    let mut host = CountingHost { takes_batches, ..CountingHost::default() };
    pipeline.on_tick(&mut host);
    pipeline.on_stream_headers(&mut host, 1, &[(b":status", b"200")]);
    assert!(pipeline.is_ready(), "the stream is ready: {:?}", host.warnings);
    let mut connections = ConnectionCache::new(4096);
    let body = vec![b'x'; body_bytes];
    let (first, second) = body.split_at(body_bytes / 3);
    let mut acked = 0;
    let mut ack = Vec::with_capacity(16);
    let mut run = |count: u64, host: &mut CountingHost| {
        for n in 0..count {
            record_exchange(&mut pipeline, &mut connections, host, n % CONNECTIONS + 1, (first, second));
            while acked < host.batches {
                acked += 1;
                ack.clear();
                BatchAck { sequence: acked }.encode(&mut ack).expect("a Vec grows");
                pipeline.on_stream_message(host, 1, &ack);
            }
        }
    };
    run(measured, &mut host);
    let (calls_before, batches_before, bytes_before) = (heap_calls(), host.batches, host.bytes);
    run(measured, &mut host);
    let heap_calls = heap_calls() - calls_before;
    assert!(host.warnings.is_empty(), "the pipeline warned: {:?}", host.warnings);
    Measured {
        heap_calls,
        exchanges: measured,
        batches: host.batches - batches_before,
        bytes: host.bytes - bytes_before,
    }
}

#[test]
fn a_warm_exchange_allocates_only_its_upstream_address_when_the_host_copies_batches() {
    for body_bytes in [1024, 64 * 1024] {
        let run = measure(false, body_bytes, 2_000);
        assert!(run.batches > 10, "{body_bytes}-byte bodies: the run cut {} batches", run.batches);
        assert_eq!(run.heap_calls, run.exchanges, "{body_bytes}-byte bodies: heap calls, one per exchange");
    }
    // Small exchanges fill their batches: no batch goes out nearly empty between two ticks.
    let run = measure(false, 1024, 2_000);
    let default_batch =
        Config::from_json(br#"{"cluster":"aggregator"}"#).expect("the default configuration").max_batch_bytes;
    assert!(run.bytes >= run.batches * default_batch as u64 * 9 / 10, "{} batches of {} bytes", run.batches, run.bytes);
}

#[test]
fn a_host_that_takes_the_batches_costs_one_buffer_per_batch_more() {
    for body_bytes in [1024, 64 * 1024] {
        let run = measure(true, body_bytes, 2_000);
        assert!(run.batches > 10, "{body_bytes}-byte bodies: the run cut {} batches", run.batches);
        assert_eq!(
            run.heap_calls,
            run.exchanges + run.batches,
            "{body_bytes}-byte bodies: heap calls, one per exchange and one per batch"
        );
    }
}
