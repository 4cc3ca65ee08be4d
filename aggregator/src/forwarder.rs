//! Delivers captures to the analysis service: a bounded queue in front of a few concurrent
//! `Submit` calls over one TLS channel, with retries for transport failures.
//!
//! The queue is the aggregator's memory bound towards a slow analysis service: when it is full,
//! new captures are dropped and counted (never an unbounded backlog). On shutdown the queue is
//! closed and drained within the grace period, so what was accepted is delivered.

use std::{sync::Arc, time::Duration};

use packet_inspector_proto::analysis::{analysis_service_client::AnalysisServiceClient, Capture};
use tokio::{sync::mpsc, task::JoinSet};
use tonic::{transport::Channel, Code};

use crate::metrics::{LogLimiter, Metrics};

/// Where captures go; cloned into every stream handler.
#[derive(Clone)]
pub struct Forwarder {
    queue: mpsc::Sender<Capture>,
    metrics: Arc<Metrics>,
    queue_full_log: Arc<LogLimiter>,
}

/// Attempts per capture before it is given up (and counted).
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_millis(200);

impl Forwarder {
    /// Starts the delivery task. It ends once every `Forwarder` clone is dropped and the queue
    /// is drained.
    pub fn start(
        channel: Channel,
        capacity: usize,
        concurrency: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(capacity);
        let client = AnalysisServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let task = tokio::spawn(deliver(rx, client, concurrency.max(1), metrics.clone()));
        (Self { queue, metrics, queue_full_log: Arc::default() }, task)
    }

    /// Queues a capture, or drops and counts it when the queue is full.
    pub fn submit(&self, capture: Capture) {
        if self.queue.try_send(capture).is_err() {
            Metrics::add(&self.metrics.captures_queue_full_total, 1);
            if let Some(held_back) = self.queue_full_log.allow() {
                tracing::warn!(
                    also_dropped_since_last_warning = held_back,
                    "forwarding queue full (the analysis service is slow or away); captures dropped"
                );
            }
        }
    }
}

async fn deliver(
    mut rx: mpsc::Receiver<Capture>,
    client: AnalysisServiceClient<Channel>,
    concurrency: usize,
    metrics: Arc<Metrics>,
) {
    let mut in_flight = JoinSet::new();
    while let Some(capture) = rx.recv().await {
        while in_flight.len() >= concurrency {
            in_flight.join_next().await;
        }
        in_flight.spawn(submit(client.clone(), capture, metrics.clone()));
    }
    while in_flight.join_next().await.is_some() {}
}

fn payload_bytes(capture: &Capture) -> u64 {
    capture.http.as_ref().map_or(0, |http| {
        [http.request.as_ref(), http.response.as_ref()].into_iter().flatten().map(|m| m.body.len() as u64).sum()
    })
}

async fn submit(mut client: AnalysisServiceClient<Channel>, capture: Capture, metrics: Arc<Metrics>) {
    let payload = payload_bytes(&capture);
    let request_id = capture.metadata.as_ref().map(|m| m.request_id.clone()).unwrap_or_default();
    let mut delay = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        match client.submit(capture.clone()).await {
            Ok(reply) => {
                Metrics::add(&metrics.captures_forwarded_total, 1);
                Metrics::add(&metrics.forwarded_payload_bytes_total, payload);
                tracing::debug!(%request_id, stored_as = %reply.into_inner().stored_as, "capture forwarded");
                return;
            }
            // Transport trouble (unreachable, TLS refused, reset) is worth retrying; a refusal
            // by the service itself is not.
            Err(status)
                if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded)
                    && attempt < ATTEMPTS =>
            {
                tracing::debug!(%request_id, attempt, error = %status, "analysis service unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(status) => {
                Metrics::add(&metrics.captures_forward_failed_total, 1);
                static FAILED_LOG: std::sync::LazyLock<LogLimiter> = std::sync::LazyLock::new(LogLimiter::default);
                let Some(held_back) = FAILED_LOG.allow() else { return };
                tracing::error!(
                    also_failed_since_last_error = held_back,
                    %request_id,
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
