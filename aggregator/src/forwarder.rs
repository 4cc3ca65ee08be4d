//! Delivers captures to the analysis service: a bounded queue in front of a few long-lived
//! `SubmitStream` calls over one TLS channel, each with a bounded number of captures in flight,
//! with retries for transport failures. Against a service that does not implement
//! `SubmitStream` (it answers UNIMPLEMENTED), the same workers make one `Submit` call per capture.
//!
//! The queue is the aggregator's memory bound towards a slow analysis service, in captures and in
//! bytes: when either bound is reached, new captures are dropped and counted (never an unbounded
//! backlog, whatever the captures' sizes). On shutdown the queue is closed and drained within the
//! grace period, so what was accepted is delivered: each call's sending side is closed once the
//! queue is empty, and the call ends when the service has answered everything.
//!
//! Delivery is at least once. The captures a broken call left unanswered are sent again on the
//! next call (after a backoff); the oldest of them, where the call stopped, is charged an
//! attempt, and a capture is given up (and counted) after [`ATTEMPTS`]. A capture the service
//! refuses is counted as failed and not sent again.
//!
//! A capture is encoded straight into the gRPC message buffer of the call (the [`EncodeShared`]
//! codec; its exact encoded size reserved first, so the buffer never grows by copying): the one
//! copy of its records and bodies between assembly and TLS. The queue holds the capture itself,
//! shared, and counts its encoded size; a retry encodes it again.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, LazyLock,
    },
    time::Duration,
};

use packet_inspector_proto::analysis::{Capture, SubmitReply};
use prost::Message;
use tokio::{
    sync::{mpsc, Mutex},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
    Code, Status,
};

use crate::metrics::{LogLimiter, Metrics};

/// The methods of the analysis contract.
const SUBMIT: &str = "/packetinspector.analysis.v1.AnalysisService/Submit";
const SUBMIT_STREAM: &str = "/packetinspector.analysis.v1.AnalysisService/SubmitStream";

/// Attempts per capture before it is given up (and counted).
pub const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(5);
/// Captures one `SubmitStream` call may have unanswered, and their bytes (encoded): what a
/// broken call leaves to send again, and how far ahead of a slow service a call runs.
/// With the default 8 calls, at most 32 MiB in flight on top of the queue's bound.
const CALL_WINDOW_CAPTURES: usize = 64;
const CALL_WINDOW_BYTES: u64 = 4 * 1024 * 1024;

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

/// A capture waiting for the analysis service.
struct Queued {
    capture: Arc<Capture>,
    /// Its encoded size: what the queue's byte bound counts.
    size: u64,
    payload: u64,
    /// Calls it was sent on that broke before it was answered.
    attempts: u32,
}

impl Queued {
    fn request_id(&self) -> &str {
        self.capture.metadata.as_ref().map_or("", |m| m.request_id.as_str())
    }
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

impl Forwarder {
    /// Starts `calls` delivery workers, each keeping one `SubmitStream` call open while there
    /// is something to send (or, against a service without it, making one `Submit` call at a
    /// time). The returned task ends once every `Forwarder` clone is dropped and the queue is
    /// delivered.
    /// `capacity` captures and `max_bytes` bytes (encoded) may wait; a single capture larger
    /// than `max_bytes` is still taken when the queue is empty.
    pub fn start(
        channel: Channel,
        capacity: usize,
        max_bytes: u64,
        calls: usize,
        metrics: Arc<Metrics>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, rx) = mpsc::channel(capacity);
        let queued_bytes = Arc::new(AtomicU64::new(0));
        let source =
            Arc::new(Source { queue: Mutex::new(rx), queued_bytes: queued_bytes.clone(), metrics: metrics.clone() });
        let task = tokio::spawn(async move {
            let mut workers = JoinSet::new();
            for _ in 0..calls.max(1) {
                workers.spawn(Worker::new(source.clone(), channel.clone()).run());
            }
            while workers.join_next().await.is_some() {}
        });
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
        self.queue.try_send(Queued { capture: Arc::new(capture), size, payload, attempts: 0 }).map_err(|_| {
            self.queued_bytes.fetch_sub(size, Relaxed);
        })
    }
}

fn queue_depth<T>(queue: &mpsc::Sender<T>) -> u64 {
    (queue.max_capacity() - queue.capacity()) as u64
}

fn payload_bytes(capture: &Capture) -> u64 {
    capture.http.as_ref().map_or(0, |http| {
        [http.request.as_ref(), http.response.as_ref()].into_iter().flatten().map(|m| m.captured_body_len()).sum()
    })
}

/// The queue, shared by the workers.
struct Source {
    queue: Mutex<mpsc::Receiver<Queued>>,
    queued_bytes: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl Source {
    /// The next capture; `None` once the queue is closed and empty. Cancel-safe.
    async fn next(&self) -> Option<Queued> {
        let mut queue = self.queue.lock().await;
        let queued = queue.recv().await?;
        let left = self.queued_bytes.fetch_sub(queued.size, Relaxed) - queued.size;
        self.metrics.forward_queue_captures.store(queue.len() as u64, Relaxed);
        self.metrics.forward_queue_bytes.store(left, Relaxed);
        Some(queued)
    }
}

/// How a `SubmitStream` call ended.
enum CallEnd {
    /// The queue is closed and everything sent was answered.
    Drained,
    /// Broken: what it left unanswered is queued for the next call.
    Broken,
    /// The service does not implement `SubmitStream`; here is what was sent on it.
    Unimplemented(VecDeque<Queued>),
}

/// What a worker's call loop waits for.
enum Event {
    Reply(Result<Option<SubmitReply>, Status>),
    Next(Option<Queued>),
}

/// One delivery worker: one call at a time.
struct Worker {
    source: Arc<Source>,
    channel: Channel,
    /// Sent on a call that broke before answering them: they go first on the next call.
    resend: VecDeque<Queued>,
    backoff: Duration,
}

static REFUSED_LOG: LazyLock<LogLimiter> = LazyLock::new(LogLimiter::default);
static FAILED_LOG: LazyLock<LogLimiter> = LazyLock::new(LogLimiter::default);
static BROKEN_LOG: LazyLock<LogLimiter> = LazyLock::new(LogLimiter::default);
static FALLBACK_LOG: LazyLock<LogLimiter> = LazyLock::new(LogLimiter::default);

impl Worker {
    fn new(source: Arc<Source>, channel: Channel) -> Self {
        Self { source, channel, resend: VecDeque::new(), backoff: FIRST_RETRY }
    }

    async fn run(mut self) {
        // A call is opened for a capture to send, never held open by an idle aggregator.
        while let Some(first) = next_capture(&mut self.resend, &self.source).await {
            match self.call(first).await {
                CallEnd::Drained => return,
                CallEnd::Broken => {
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(LAST_RETRY);
                }
                CallEnd::Unimplemented(sent) => {
                    if FALLBACK_LOG.allow().is_some() {
                        tracing::info!(
                            "the analysis service does not implement SubmitStream; one Submit call per capture"
                        );
                    }
                    sent.into_iter().rev().for_each(|queued| self.resend.push_front(queued));
                    return self.unary().await;
                }
            }
        }
    }

    /// One `SubmitStream` call, opened with `first`, for as long as it works and there is
    /// something to send.
    async fn call(&mut self, first: Queued) -> CallEnd {
        let (sender, outgoing) = mpsc::channel(CALL_WINDOW_CAPTURES);
        let mut unanswered = Unanswered::default();
        // The window is never fuller than the channel, which holds only unanswered captures.
        let _ = sender.try_send(first.capture.clone());
        unanswered.push(first);
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let opened = async {
            grpc.ready().await.map_err(|err| Status::unavailable(format!("analysis service not ready: {err}")))?;
            let path = PathAndQuery::from_static(SUBMIT_STREAM);
            grpc.streaming(tonic::Request::new(ReceiverStream::new(outgoing)), path, EncodeShared).await
        };
        let mut replies: Streaming<SubmitReply> = match opened.await {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::Unimplemented => return CallEnd::Unimplemented(unanswered.captures),
            Err(status) => return self.broken(unanswered, &status),
        };
        let mut sender = Some(sender);
        loop {
            let room = sender.is_some() && unanswered.has_room();
            let event = tokio::select! {
                biased;
                reply = replies.message() => Event::Reply(reply),
                next = next_capture(&mut self.resend, &self.source), if room => Event::Next(next),
            };
            match event {
                Event::Reply(Ok(Some(reply))) => {
                    let Some(answered) = unanswered.pop() else {
                        return self.broken(
                            unanswered,
                            &Status::internal("the analysis service answered more captures than it was sent"),
                        );
                    };
                    self.backoff = FIRST_RETRY;
                    self.answered(&answered, reply);
                }
                Event::Reply(Ok(None)) if sender.is_none() && unanswered.captures.is_empty() => {
                    return CallEnd::Drained
                }
                Event::Reply(Ok(None)) => {
                    return self.broken(unanswered, &Status::unavailable("the analysis service ended the call"));
                }
                Event::Reply(Err(status)) => return self.broken(unanswered, &status),
                Event::Next(Some(queued)) => {
                    let sent = sender.as_ref().is_some_and(|s| s.try_send(queued.capture.clone()).is_ok());
                    unanswered.push(queued);
                    if !sent {
                        return self.broken(unanswered, &Status::unavailable("the call's sending side closed"));
                    }
                }
                // The queue is closed and empty (shutdown): end the sending side; the service
                // answers what it has and ends the call.
                Event::Next(None) => sender = None,
            }
        }
    }

    fn answered(&self, queued: &Queued, reply: SubmitReply) {
        if reply.refused.is_empty() {
            Metrics::add(&self.source.metrics.captures_forwarded_total, 1);
            Metrics::add(&self.source.metrics.forwarded_payload_bytes_total, queued.payload);
            tracing::debug!(request_id = queued.request_id(), stored_as = %reply.stored_as, "capture forwarded");
            return;
        }
        Metrics::add(&self.source.metrics.captures_forward_failed_total, 1);
        if let Some(held_back) = REFUSED_LOG.allow() {
            tracing::error!(
                also_refused_since_last_error = held_back,
                request_id = queued.request_id(),
                reason = %reply.refused,
                "the analysis service refused a capture"
            );
        }
    }

    /// Queues what `unanswered` holds to be sent again, but for captures out of attempts.
    fn broken(&mut self, unanswered: Unanswered, status: &Status) -> CallEnd {
        if let Some(held_back) = BROKEN_LOG.allow() {
            tracing::warn!(
                also_broken_since_last_warning = held_back,
                code = ?status.code(),
                error = status.message(),
                unanswered = unanswered.captures.len(),
                "SubmitStream call to the analysis service broken; unanswered captures will be sent again"
            );
        }
        // Answers come in order, so the call stopped at the oldest unanswered capture: it is
        // charged the attempt. The others go again uncharged, so that a capture the service
        // cannot take (it breaks every call) is given up alone, not with those queued behind it.
        let mut captures = unanswered.captures;
        if let Some(front) = captures.front_mut() {
            front.attempts += 1;
            if front.attempts >= ATTEMPTS {
                let attempts = front.attempts;
                if let Some(front) = captures.pop_front() {
                    self.given_up(&front, attempts, status);
                }
            }
        }
        Metrics::add(&self.source.metrics.captures_forward_retried_total, captures.len() as u64);
        for queued in captures.into_iter().rev() {
            self.resend.push_front(queued);
        }
        CallEnd::Broken
    }

    fn given_up(&self, queued: &Queued, attempts: u32, status: &Status) {
        Metrics::add(&self.source.metrics.captures_forward_failed_total, 1);
        if let Some(held_back) = FAILED_LOG.allow() {
            tracing::error!(
                also_failed_since_last_error = held_back,
                request_id = queued.request_id(),
                attempts,
                code = ?status.code(),
                error = status.message(),
                "capture not delivered to the analysis service"
            );
        }
    }

    /// Against a service without `SubmitStream`: one `Submit` call per capture.
    async fn unary(mut self) {
        while let Some(queued) = next_capture(&mut self.resend, &self.source).await {
            self.submit(queued).await;
        }
    }

    async fn submit(&self, queued: Queued) {
        let mut delay = FIRST_RETRY;
        for attempt in queued.attempts + 1..=ATTEMPTS {
            match call(&self.channel, queued.capture.clone()).await {
                Ok(reply) => return self.answered(&queued, reply),
                // Transport trouble (unreachable, TLS refused, reset) is worth retrying; a
                // refusal by the service itself is not.
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::Unknown | Code::DeadlineExceeded)
                        && attempt < ATTEMPTS =>
                {
                    tracing::debug!(request_id = queued.request_id(), attempt, error = %status, "analysis service unavailable; retrying");
                    Metrics::add(&self.source.metrics.captures_forward_retried_total, 1);
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(status) => return self.given_up(&queued, attempt, &status),
            }
        }
    }
}

/// The next capture to send: one left unanswered by a broken call, else a queued one.
async fn next_capture(resend: &mut VecDeque<Queued>, source: &Source) -> Option<Queued> {
    match resend.pop_front() {
        Some(queued) => Some(queued),
        None => source.next().await,
    }
}

/// The captures sent on a call and not answered yet, oldest first.
#[derive(Default)]
struct Unanswered {
    captures: VecDeque<Queued>,
    bytes: u64,
}

impl Unanswered {
    fn has_room(&self) -> bool {
        self.captures.len() < CALL_WINDOW_CAPTURES && self.bytes < CALL_WINDOW_BYTES
    }
    fn push(&mut self, queued: Queued) {
        self.bytes += queued.size;
        self.captures.push_back(queued);
    }
    fn pop(&mut self) -> Option<Queued> {
        let queued = self.captures.pop_front()?;
        self.bytes -= queued.size;
        Some(queued)
    }
}

/// One `Submit` call.
async fn call(channel: &Channel, capture: Arc<Capture>) -> Result<SubmitReply, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|err| Status::unavailable(format!("analysis service not ready: {err}")))?;
    let response = grpc.unary(tonic::Request::new(capture), PathAndQuery::from_static(SUBMIT), EncodeShared).await?;
    Ok(response.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::{
        analysis::{
            analysis_service_server::{AnalysisService, AnalysisServiceServer},
            PcapRecord,
        },
        capture::TransactionMetadata,
    };
    use std::sync::Mutex as SyncMutex;
    use tokio_stream::wrappers::TcpListenerStream;

    /// How the test service behaves.
    #[derive(Clone, Copy, Default)]
    struct Script {
        /// End every SubmitStream call that this request id comes on, without answering it.
        breaks_on: Option<&'static str>,
        /// Answer SubmitStream with UNIMPLEMENTED (a service with `Submit` only).
        no_streams: bool,
        /// End the first SubmitStream call with UNAVAILABLE when this many captures came on
        /// it, answering all but the last.
        break_first_call_after: Option<usize>,
    }

    /// An analysis service recording the request ids it stored, by method; refuses ids
    /// starting with "bad".
    #[derive(Clone, Default)]
    struct Service {
        script: Script,
        streamed: Arc<SyncMutex<Vec<String>>>,
        unary: Arc<SyncMutex<Vec<String>>>,
        calls: Arc<AtomicU64>,
    }

    fn id(capture: &Capture) -> String {
        capture.metadata.as_ref().map(|m| m.request_id.clone()).unwrap_or_default()
    }

    #[tonic::async_trait]
    impl AnalysisService for Service {
        async fn submit(&self, request: tonic::Request<Capture>) -> Result<tonic::Response<SubmitReply>, Status> {
            let id = id(request.get_ref());
            if id.starts_with("bad") {
                return Err(Status::invalid_argument("a bad capture"));
            }
            self.unary.lock().unwrap().push(id.clone());
            Ok(tonic::Response::new(SubmitReply { stored_as: id, refused: String::new() }))
        }

        type SubmitStreamStream = ReceiverStream<Result<SubmitReply, Status>>;

        async fn submit_stream(
            &self,
            request: tonic::Request<Streaming<Capture>>,
        ) -> Result<tonic::Response<Self::SubmitStreamStream>, Status> {
            if self.script.no_streams {
                return Err(Status::unimplemented("no SubmitStream here"));
            }
            let call = self.calls.fetch_add(1, Relaxed);
            let break_after = self.script.break_first_call_after.filter(|_| call == 0);
            let script = self.script;
            let mut captures = request.into_inner();
            let (replies, rx) = mpsc::channel(16);
            let streamed = self.streamed.clone();
            tokio::spawn(async move {
                let mut received = 0;
                while let Ok(Some(capture)) = captures.message().await {
                    received += 1;
                    let id = id(&capture);
                    if break_after == Some(received) || script.breaks_on == Some(id.as_str()) {
                        let _ = replies.send(Err(Status::unavailable("going away"))).await;
                        return;
                    }
                    let reply = if id.starts_with("bad") {
                        SubmitReply { stored_as: String::new(), refused: "a bad capture".into() }
                    } else {
                        streamed.lock().unwrap().push(id.clone());
                        SubmitReply { stored_as: id, refused: String::new() }
                    };
                    if replies.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        }
    }

    async fn serve(service: Service) -> Channel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AnalysisServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy()
    }

    fn identified(request_id: &str) -> Capture {
        let metadata = TransactionMetadata { request_id: request_id.into(), ..Default::default() };
        Capture { metadata: Some(metadata), ..capture(100) }
    }

    /// Submits `ids` through a forwarder with `calls` workers, then shuts it down, which
    /// delivers everything queued.
    async fn deliver(service: &Service, calls: usize, ids: &[String]) -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::default());
        let (forwarder, task) = Forwarder::start(serve(service.clone()).await, 1024, u64::MAX, calls, metrics.clone());
        for id in ids {
            forwarder.submit(identified(id));
        }
        drop(forwarder);
        tokio::time::timeout(Duration::from_secs(20), task).await.expect("the forwarder drains").unwrap();
        metrics
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("capture-{i}")).collect()
    }

    #[tokio::test]
    async fn captures_go_on_streams_in_order_and_shutdown_waits_for_every_answer() {
        let service = Service::default();
        let sent = ids(600);
        let metrics = deliver(&service, 1, &sent).await;
        assert_eq!(*service.streamed.lock().unwrap(), sent, "one call, in queue order");
        assert!(service.unary.lock().unwrap().is_empty());
        assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 600);
        assert_eq!(metrics.captures_forward_failed_total.load(Relaxed), 0);
        assert_eq!(service.calls.load(Relaxed), 1, "600 captures, many windows' worth, on one call");
    }

    #[tokio::test]
    async fn a_broken_call_has_its_unanswered_captures_sent_again() {
        let service =
            Service { script: Script { break_first_call_after: Some(10), ..Default::default() }, ..Default::default() };
        let sent = ids(50);
        let metrics = deliver(&service, 1, &sent).await;
        let mut stored = service.streamed.lock().unwrap().clone();
        stored.sort();
        stored.dedup();
        let mut expected = sent.clone();
        expected.sort();
        assert_eq!(stored, expected, "every capture stored, the one the broken call left unanswered included");
        assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 50);
        assert_eq!(service.calls.load(Relaxed), 2);
        // The call broke at the 10th capture; the 10th and whatever followed it on that call
        // went again.
        let retried = metrics.captures_forward_retried_total.load(Relaxed);
        assert!((1..=41).contains(&retried), "{retried} captures sent again");
        assert_eq!(
            service.streamed.lock().unwrap().len(),
            50,
            "none stored twice: the broken call stored none of those"
        );
    }

    #[tokio::test]
    async fn a_capture_that_breaks_every_call_is_given_up_alone() {
        let service =
            Service { script: Script { breaks_on: Some("capture-3"), ..Default::default() }, ..Default::default() };
        let sent = ids(20);
        let metrics = deliver(&service, 1, &sent).await;
        let expected: Vec<String> = sent.iter().filter(|id| *id != "capture-3").cloned().collect();
        assert_eq!(*service.streamed.lock().unwrap(), expected, "the others stored, in order");
        assert_eq!(metrics.captures_forward_failed_total.load(Relaxed), 1);
        assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 19);
        assert_eq!(service.calls.load(Relaxed), ATTEMPTS as u64 + 1, "one call per attempt, then one for the rest");
    }

    #[tokio::test]
    async fn a_service_without_streams_gets_one_submit_call_per_capture() {
        let service = Service { script: Script { no_streams: true, ..Default::default() }, ..Default::default() };
        let sent = ids(20);
        let metrics = deliver(&service, 2, &sent).await;
        let mut stored = service.unary.lock().unwrap().clone();
        stored.sort();
        let mut expected = sent.clone();
        expected.sort();
        assert_eq!(stored, expected, "the captures sent on the refused stream included");
        assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 20);
    }

    #[tokio::test]
    async fn a_refused_capture_is_counted_and_not_sent_again() {
        for no_streams in [false, true] {
            let service = Service { script: Script { no_streams, ..Default::default() }, ..Default::default() };
            let sent = vec!["good-1".to_owned(), "bad-2".to_owned(), "good-3".to_owned()];
            let metrics = deliver(&service, 1, &sent).await;
            assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 2, "streams: {}", !no_streams);
            assert_eq!(metrics.captures_forward_failed_total.load(Relaxed), 1);
            let stored = if no_streams { &service.unary } else { &service.streamed };
            assert_eq!(*stored.lock().unwrap(), ["good-1", "good-3"]);
        }
    }

    #[tokio::test]
    async fn captures_an_unreachable_service_never_takes_are_given_up_and_counted() {
        let metrics = Arc::new(Metrics::default());
        let (forwarder, task) = Forwarder::start(unreachable_service(), 16, u64::MAX, 2, metrics.clone());
        for id in ids(2) {
            forwarder.submit(identified(&id));
        }
        drop(forwarder);
        // Five attempts with backoffs of 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s.
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("gives up within the attempts").unwrap();
        assert_eq!(metrics.captures_forward_failed_total.load(Relaxed), 2);
        assert_eq!(metrics.captures_forwarded_total.load(Relaxed), 0);
        assert_eq!(metrics.captures_forward_retried_total.load(Relaxed), 2 * (ATTEMPTS as u64 - 1));
    }

    fn capture(bytes: usize) -> Capture {
        Capture {
            records: vec![PcapRecord { data: vec![0; bytes].into(), ..Default::default() }],
            ..Default::default()
        }
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
