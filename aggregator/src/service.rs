//! The `CaptureService` gRPC server: one task per filter stream assembles its frames, turns
//! finished transactions into captures and acknowledges each batch once its frames are taken.
//!
//! On shutdown each stream stops reading, finishes its open transactions as aborted (so what
//! was acknowledged is delivered) and ends the call; the filter then reconnects elsewhere.

use std::{sync::Arc, time::Duration};

use packet_inspector_proto::{
    analysis::Capture,
    capture::{capture_service_server::CaptureService, frame::Kind, BatchAck, FrameBatch},
    tls::PeerInfo,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    assembly::{Assembler, Limits, Transaction},
    capture::{self, BodyForm, CaptureError},
    diameter::{Exchange, Pairer},
    forwarder::Forwarder,
    metrics::{LogLimiter, Metrics},
};

pub struct CaptureServer {
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub diameter_answer_timeout_ns: u64,
    /// The node this aggregator runs on, for captures whose proxy did not say.
    pub node: String,
    pub bodies: BodyForm,
    pub shutdown: CancellationToken,
}

/// Acks waiting to be written to one filter; the filter's own window keeps this small.
const ACK_BACKLOG: usize = 64;
/// One limiter for every "not captured" warning of this aggregator.
static UNBUILDABLE_LOG: std::sync::LazyLock<LogLimiter> = std::sync::LazyLock::new(LogLimiter::default);
const SWEEP_MIN: Duration = Duration::from_millis(50);
const SWEEP_MAX: Duration = Duration::from_secs(1);

/// Wall-clock time in the filters' timebase (nanoseconds since the Unix epoch; same node).
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

struct StreamTask {
    forwarder: Forwarder,
    metrics: Arc<Metrics>,
    node: String,
    bodies: BodyForm,
    peer: String,
}

impl StreamTask {
    /// Hands a built capture to the forwarder, or counts (and, rate-limited, logs) why not.
    fn deliver(&self, built: Result<Capture, CaptureError>, what: &'static str) {
        match built {
            Ok(capture) => {
                Metrics::add(&self.metrics.captures_built_total, 1);
                self.forwarder.submit(capture);
            }
            Err(err) => {
                Metrics::add(&self.metrics.captures_unbuildable_total, 1);
                if let Some(held_back) = UNBUILDABLE_LOG.allow() {
                    tracing::warn!(peer = %self.peer, error = %err, also_since_last_warning = held_back, "{what} not captured");
                }
            }
        }
    }

    fn finish(&self, transaction: Transaction) {
        self.deliver(capture::build(transaction, &self.node, self.bodies), "transaction");
    }

    fn finish_diameter(&self, exchanges: Vec<Exchange>) {
        for exchange in exchanges {
            if exchange.request.is_none() || exchange.answer.is_none() {
                Metrics::add(&self.metrics.diameter_unpaired_total, 1);
            }
            self.deliver(capture::build_diameter(exchange, &self.node), "Diameter exchange");
        }
    }

    fn batch(&self, assembler: &mut Assembler, pairer: &mut Pairer, batch: FrameBatch) {
        Metrics::add(&self.metrics.batches_received_total, 1);
        Metrics::add(&self.metrics.frames_received_total, batch.frames.len() as u64);
        Metrics::add(&self.metrics.filter_captures_dropped_total, batch.captures_dropped);
        for frame in batch.frames {
            if let Some(Kind::Diameter(message)) = frame.kind {
                Metrics::add(&self.metrics.diameter_messages_total, 1);
                self.finish_diameter(pairer.offer(message, frame.timestamp_ns));
                continue;
            }
            match assembler.accept(frame) {
                Ok(Some(transaction)) => self.finish(transaction),
                Ok(None) => {}
                Err(err) => {
                    Metrics::add(&self.metrics.frames_rejected_total, 1);
                    tracing::debug!(peer = %self.peer, reason = err.kind(), error = %err, "frame rejected");
                }
            }
            for evicted in assembler.take_evicted() {
                Metrics::add(&self.metrics.transactions_evicted_total, 1);
                self.finish(evicted);
            }
        }
    }
}

#[tonic::async_trait]
impl CaptureService for CaptureServer {
    type StreamFramesStream = ReceiverStream<Result<BatchAck, Status>>;

    async fn stream_frames(
        &self,
        request: Request<Streaming<FrameBatch>>,
    ) -> Result<Response<Self::StreamFramesStream>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|info| info.remote_addr)
            .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
        let mut inbound = request.into_inner();
        let (acks, rx) = mpsc::channel(ACK_BACKLOG);
        let task = StreamTask {
            forwarder: self.forwarder.clone(),
            metrics: self.metrics.clone(),
            node: self.node.clone(),
            bodies: self.bodies,
            peer,
        };
        let (limits, shutdown, diameter_timeout) =
            (self.limits, self.shutdown.clone(), self.diameter_answer_timeout_ns);
        tracing::info!(peer = %task.peer, "filter stream opened");
        Metrics::add(&task.metrics.streams_total, 1);
        Metrics::add(&task.metrics.streams_open, 1);
        tokio::spawn(async move {
            let mut assembler = Assembler::new(limits);
            let mut pairer = Pairer::new(diameter_timeout, limits.max_open_transactions);
            // Quiet long-lived streams are segmented on this tick (see `Assembler::sweep`).
            let sweep_every = Duration::from_nanos(limits.segmenting.interval_ns / 4).clamp(SWEEP_MIN, SWEEP_MAX);
            let mut sweep = tokio::time::interval(sweep_every);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let message = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    message = inbound.message() => message,
                    _ = sweep.tick() => {
                        let now = now_ns();
                        assembler.sweep(now).into_iter().for_each(|segment| task.finish(segment));
                        task.finish_diameter(pairer.sweep(now));
                        continue;
                    }
                };
                match message {
                    Ok(Some(batch)) => {
                        let sequence = batch.sequence;
                        task.batch(&mut assembler, &mut pairer, batch);
                        if acks.send(Ok(BatchAck { sequence })).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(peer = %task.peer, error = %status, "filter stream broken");
                        break;
                    }
                }
            }
            let open = assembler.drain();
            if !open.is_empty() {
                tracing::info!(peer = %task.peer, transactions = open.len(), "stream ended with open transactions; delivering them as aborted");
            }
            open.into_iter().for_each(|transaction| task.finish(transaction));
            task.finish_diameter(pairer.drain());
            task.metrics.streams_open.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(peer = %task.peer, "filter stream closed");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
