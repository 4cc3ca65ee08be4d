//! Delivers captures to the analysis service: a bounded queue in front of a few concurrent
//! `Submit` calls over one TLS channel, with retries for transport failures.
//!
//! The queue is the aggregator's memory bound towards a slow analysis service, in captures and in
//! bytes: when either bound is reached, new captures are dropped and counted (never an unbounded
//! backlog, whatever the captures' sizes). On shutdown the queue is closed and drained within the
//! grace period, so what was accepted is delivered.
//!
//! A capture is encoded straight into the gRPC message buffer of the call (the [`EncodeShared`]
//! codec; its exact encoded size reserved first, so the buffer never grows by copying): the one
//! copy of its records and bodies between assembly and TLS. The queue holds the capture itself,
//! shared, and counts its encoded size; a retry encodes it again.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use packet_inspector_proto::analysis::{Capture, SubmitReply};
use prost::Message;
use tokio::{sync::mpsc, task::JoinSet};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
    Code, Status,
};

/// The `Submit` method of the analysis contract.
const SUBMIT: &str = "/packetinspector.analysis.v1.AnalysisService/Submit";

/// Encodes a shared capture into the call's buffer; decodes the reply with prost.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodeShared;

impl Codec for EncodeShared {
    type Encode = Arc<Capture>;
    type Decode = SubmitReply;
    type Encoder = EncodeShared;
    type Decoder = EncodeShared;

    fn encoder(&mut self) -> Self::Encoder {
        EncodeShared
    }
    fn decoder(&mut self) -> Self::Decoder {
        EncodeShared
    }
}

impl Encoder for EncodeShared {
    type Item = Arc<Capture>;
    type Error = Status;

    fn encode(&mut self, item: Arc<Capture>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst).map_err(|err| Status::internal(format!("cannot encode the capture: {err}")))
    }
}

impl Decoder for EncodeShared {
    type Item = SubmitReply;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubmitReply>, Status> {
        SubmitReply::decode(src).map(Some).map_err(|err| Status::internal(format!("undecodable SubmitReply: {err}")))
    }
}

use crate::metrics::{LogLimiter, Metrics};

/// A capture waiting for the analysis service.
struct Queued {
    capture: Arc<Capture>,
    /// Its encoded size: what the queue's byte bound counts.
    size: u64,
    payload: u64,
}

/// Where captures go; cloned into every stream handler.
#[derive(Clone)]
pub struct Forwarder {
    queue: mpsc::Sender<Queued>,
    queued_bytes: Arc<AtomicU64>,
    max_queued_bytes: u64,
    metrics: Arc<Metrics>,
    queue_full_log: Arc<LogLimiter>,
}

/// Attempts per capture before it is given up (and counted).
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_millis(200);

impl Forwarder {
    /// Starts the delivery task. It ends once every `Forwarder` clone is dropped and the queue
    /// is drained.
    /// `capacity` captures and `max_bytes` bytes (encoded) may wait; a single capture larger
    /// than `max_bytes` is still taken when the queue is empty.
    pub fn start(
        channel: Channel,
        capacity: usize,
        max_bytes: u64,
        concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(capacity);
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(deliver(rx, channel, concurrency.max(1), queued_bytes.clone(), metrics.clone()));
        (Self { queue, queued_bytes, max_queued_bytes: max_bytes, metrics, queue_full_log: Arc::default() }, task)
    }

    /// Queues a capture, or drops and counts it when the queue is full (in captures or bytes).
    pub fn submit(&self, capture: Capture) {
        let queued = if self.queue.capacity() == 0 { Err(()) } else { self.enqueue(capture) };
        self.metrics.forward_queue_captures.store(queue_depth(&self.queue), Relaxed);
        self.metrics.forward_queue_bytes.store(self.queued_bytes.load(Relaxed), Relaxed);
        if queued.is_err() {
            Metrics::add(&self.metrics.captures_queue_full_total, 1);
            if let Some(held_back) = self.queue_full_log.allow() {
                tracing::warn!(
                    also_dropped_since_last_warning = held_back,
                    "forwarding queue full (the analysis service is slow or away); captures dropped"
                );
            }
        }
    }

    fn enqueue(&self, capture: Capture) -> Result<(), ()> {
        let payload = payload_bytes(&capture);
        let size = capture.encoded_len() as u64;
        let before = self.queued_bytes.fetch_add(size, Relaxed);
        if before > 0 && before + size > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(size, Relaxed);
            return Err(());
        }
        self.queue.try_send(Queued { capture: Arc::new(capture), size, payload }).map_err(|_| {
            self.queued_bytes.fetch_sub(size, Relaxed);
        })
    }
}

fn queue_depth<T>(queue: &mpsc::Sender<T>) -> u64 {
    (queue.max_capacity() - queue.capacity()) as u64
}

async fn deliver(
    mut rx: mpsc::Receiver<Queued>,
    channel: Channel,
    concurrency: usize,
    queued_bytes: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
) {
    let mut in_flight = JoinSet::new();
    while let Some(queued) = rx.recv().await {
        let left = queued_bytes.fetch_sub(queued.size, Relaxed) - queued.size;
        metrics.forward_queue_captures.store(rx.len() as u64, Relaxed);
        metrics.forward_queue_bytes.store(left, Relaxed);
        while in_flight.len() >= concurrency {
            in_flight.join_next().await;
        }
        in_flight.spawn(submit(channel.clone(), queued, metrics.clone()));
    }
    while in_flight.join_next().await.is_some() {}
}

fn payload_bytes(capture: &Capture) -> u64 {
    capture.http.as_ref().map_or(0, |http| {
        [http.request.as_ref(), http.response.as_ref()].into_iter().flatten().map(|m| m.body.len() as u64).sum()
    })
}

/// One `Submit` call.
async fn call(channel: &Channel, capture: Arc<Capture>) -> Result<SubmitReply, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|err| Status::unavailable(format!("analysis service not ready: {err}")))?;
    let response = grpc.unary(tonic::Request::new(capture), PathAndQuery::from_static(SUBMIT), EncodeShared).await?;
    Ok(response.into_inner())
}

async fn submit(channel: Channel, queued: Queued, metrics: Arc<Metrics>) {
    let Queued { capture, payload, .. } = queued;
    let request_id = || capture.metadata.as_ref().map_or("", |m| m.request_id.as_str());
    let mut delay = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        match call(&channel, capture.clone()).await {
            Ok(reply) => {
                Metrics::add(&metrics.captures_forwarded_total, 1);
                Metrics::add(&metrics.forwarded_payload_bytes_total, payload);
                tracing::debug!(request_id = request_id(), stored_as = %reply.stored_as, "capture forwarded");
                return;
            }
            // Transport trouble (unreachable, TLS refused, reset) is worth retrying; a refusal
            // by the service itself is not.
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded)
                    && attempt < ATTEMPTS =>
            {
                tracing::debug!(request_id = request_id(), attempt, error = %status, "analysis service unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(status) => {
                Metrics::add(&metrics.captures_forward_failed_total, 1);
                static FAILED_LOG: std::sync::LazyLock<LogLimiter> = std::sync::LazyLock::new(LogLimiter::default);
                let Some(held_back) = FAILED_LOG.allow() else { return };
                tracing::error!(
                    also_failed_since_last_error = held_back,
                    request_id = request_id(),
                    attempts = attempt,
                    code = ?status.code(),
                    error = status.message(),
                    "capture not delivered to the analysis service"
                );
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::analysis::PcapRecord;

    fn capture(bytes: usize) -> Capture {
        Capture { records: vec![PcapRecord { data: vec![0; bytes], ..Default::default() }], ..Default::default() }
    }

    fn unreachable_service() -> Channel {
        // Nothing listens on port 1: every call fails and is retried, so queued captures stay
        // queued while the test looks.
        tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_as_well_as_in_captures() {
        let metrics = Arc::new(Metrics::default());
        let size = capture(10_000).encoded_len() as u64;
        let (forwarder, _task) = Forwarder::start(unreachable_service(), 100, size * 5 / 2, 1, metrics.clone());
        // The delivery task has not run yet (single-threaded runtime, no await so far).
        for _ in 0..5 {
            forwarder.submit(capture(10_000));
        }
        assert_eq!(metrics.captures_queue_full_total.load(Relaxed), 3, "two fit in 2.5 captures' bytes");
        assert_eq!(metrics.forward_queue_bytes.load(Relaxed), 2 * size);
        assert_eq!(metrics.forward_queue_captures.load(Relaxed), 2);
    }

    #[tokio::test]
    async fn a_capture_larger_than_the_byte_bound_goes_when_the_queue_is_empty() {
        let metrics = Arc::new(Metrics::default());
        let (forwarder, _task) = Forwarder::start(unreachable_service(), 100, 1000, 1, metrics.clone());
        forwarder.submit(capture(50_000));
        forwarder.submit(capture(10));
        assert_eq!(metrics.captures_queue_full_total.load(Relaxed), 1);
        assert_eq!(metrics.forward_queue_captures.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_captures() {
        let metrics = Arc::new(Metrics::default());
        let (forwarder, _task) = Forwarder::start(unreachable_service(), 3, u64::MAX, 1, metrics.clone());
        for _ in 0..5 {
            forwarder.submit(capture(10));
        }
        assert_eq!(metrics.captures_queue_full_total.load(Relaxed), 2);
    }
}
