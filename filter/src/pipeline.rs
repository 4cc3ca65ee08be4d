//! The per-VM capture pipeline: the gRPC stream's state machine (connect, ready, acks, close,
//! backoff), the outbox, and the accounting of dropped captures.
//!
//! It talks to Envoy only through [`Host`], so the whole policy is tested natively with a mock;
//! the wasm module implements [`Host`] over the proxy-wasm ABI. Nothing here can block or fail
//! traffic: every outcome for the HTTP side is "recorded" or "dropped and counted".
//!
//! Frames not yet sent survive a lost stream and go out on the next one; batches in flight are
//! lost with it (`batches_lost`). A transaction whose frames straddle a lost stream therefore
//! reaches the aggregator in two parts: it delivers the first part flagged `aborted` and counts
//! the rest as orphan frames (`frames_rejected_total`).

use packet_inspector_proto::capture::BatchAck;
use prost::Message;

use crate::{config::Config, outbox::Outbox, pairs::Pair, wire::FrameRef};

/// The gRPC method the filter calls on the aggregator.
pub const SERVICE: &str = "packetinspector.capture.v1.CaptureService";
pub const METHOD: &str = "StreamFrames";

/// Counters the pipeline reports; the wasm module maps them to Envoy stats
/// (`wasmcustom.packet_inspector.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    CapturesStarted,
    /// Captures lost in whole or in part (stream down, buffer full, batch lost with a stream).
    CapturesDropped,
    FramesDropped,
    BatchesSent,
    BatchesAcked,
    BatchesLost,
    StreamsOpened,
    StreamsReady,
    StreamsClosed,
    /// Diameter messages framed (captured or dropped).
    DiameterMessages,
    /// Diameter messages over `maxDiameterMessageBytes`, let through uncaptured.
    DiameterOversized,
    /// Connection directions whose bytes stopped being Diameter (capture stops there).
    DiameterFramingErrors,
    /// Connections that ended inside a Diameter message.
    DiameterTruncated,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::CapturesStarted,
        Counter::CapturesDropped,
        Counter::FramesDropped,
        Counter::BatchesSent,
        Counter::BatchesAcked,
        Counter::BatchesLost,
        Counter::StreamsOpened,
        Counter::StreamsReady,
        Counter::StreamsClosed,
        Counter::DiameterMessages,
        Counter::DiameterOversized,
        Counter::DiameterFramingErrors,
        Counter::DiameterTruncated,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::CapturesStarted => "packet_inspector.captures_started",
            Counter::CapturesDropped => "packet_inspector.captures_dropped",
            Counter::FramesDropped => "packet_inspector.frames_dropped",
            Counter::BatchesSent => "packet_inspector.batches_sent",
            Counter::BatchesAcked => "packet_inspector.batches_acked",
            Counter::BatchesLost => "packet_inspector.batches_lost",
            Counter::StreamsOpened => "packet_inspector.streams_opened",
            Counter::StreamsReady => "packet_inspector.streams_ready",
            Counter::StreamsClosed => "packet_inspector.streams_closed",
            Counter::DiameterMessages => "packet_inspector.diameter_messages",
            Counter::DiameterOversized => "packet_inspector.diameter_oversized",
            Counter::DiameterFramingErrors => "packet_inspector.diameter_framing_errors",
            Counter::DiameterTruncated => "packet_inspector.diameter_truncated",
        }
    }
}

/// Counter increments not yet handed to Envoy.
///
/// Incrementing an Envoy stat is a host call, and `captures_started` alone moves on every
/// request: one more crossing out of the VM per request for a figure that is scraped every few
/// seconds. The module adds increments here and publishes them on every tick and with every
/// batch sent, so the stats lag the traffic by at most one flush interval.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingCounts([u64; Counter::ALL.len()]);

impl PendingCounts {
    pub fn add(&mut self, counter: Counter, delta: u64) {
        // `Counter::ALL` lists the variants in declaration order (tested).
        if let Some(pending) = self.0.get_mut(counter as usize) {
            *pending = pending.saturating_add(delta);
        }
    }

    /// The counters that moved since the last call, with how much; leaves none pending.
    pub fn take(&mut self) -> impl Iterator<Item = (Counter, u64)> {
        let pending = std::mem::take(&mut self.0);
        Counter::ALL.into_iter().zip(pending).filter(|(_, delta)| *delta > 0)
    }
}

/// What the pipeline needs from Envoy.
pub trait Host {
    fn now_ns(&self) -> u64;
    /// Opens the bidirectional stream; returns its token.
    fn open_stream(&mut self, cluster: &str) -> Result<u32, String>;
    /// Sends one encoded `FrameBatch`. A host that sends the bytes as they are takes the buffer
    /// (`std::mem::take`); one that copies them out leaves it, and the outbox fills it again.
    fn send(&mut self, token: u32, batch: &mut Vec<u8>) -> Result<(), String>;
    fn cancel(&mut self, token: u32);
    /// Adds to a counter (the module publishes them in bulk: [`PendingCounts`]).
    fn count(&mut self, counter: Counter, delta: u64);
    fn warn(&mut self, message: &str);
}

/// Whether a capture stream's response headers mean the aggregator accepted the stream.
///
/// Envoy reports response headers ("initial metadata") for every answer, failed connects
/// included: a trailers-only answer, such as its own `UNAVAILABLE` when the aggregator cannot be
/// reached, arrives as an empty map, and any non-200 answer is closed right after. Taking those
/// for readiness would count a stream as ready that is about to close (and back off for up to
/// `MAX_BACKOFF_NS` while captures are dropped). A map without `:status` (which Envoy does not
/// produce) is taken as accepted rather than refused forever.
pub fn stream_accepted(headers: &[Pair<'_>]) -> bool {
    !headers.is_empty()
        && headers.iter().find(|(name, _)| *name == b":status").is_none_or(|(_, value)| *value == b"200")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    /// No stream; try again at `retry_at_ns`.
    Down {
        retry_at_ns: u64,
    },
    /// Opened, waiting for the aggregator's response headers.
    Connecting {
        token: u32,
        since_ns: u64,
    },
    Ready {
        token: u32,
    },
}

const INITIAL_BACKOFF_NS: u64 = 100_000_000;
const MAX_BACKOFF_NS: u64 = 5_000_000_000;
/// A stream that shows no response headers by then is cancelled and retried.
const CONNECT_TIMEOUT_NS: u64 = 10_000_000_000;
/// Warnings about the stream are logged at most this often.
const WARN_INTERVAL_NS: u64 = 10_000_000_000;

/// Per-transaction bookkeeping the pipeline needs from the HTTP side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Frames are being recorded.
    Recording,
    /// A frame after the start was dropped: the capture will end flagged.
    Damaged,
    /// The start was dropped: nothing more is sent for it.
    Abandoned,
}

/// The largest body frame the configuration lets through: one chunk at the body limit.
fn largest_body_frame(config: &Config) -> usize {
    FrameRef::max_body_framed_len(usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX))
}

#[derive(Debug)]
pub struct Pipeline {
    cluster: String,
    outbox: Outbox,
    stream: Stream,
    backoff_ns: u64,
    next_transaction_id: u64,
    /// Captures dropped since the last batch, reported to the aggregator in the next one.
    unreported_drops: u64,
    last_warning_ns: Option<u64>,
}

impl Pipeline {
    pub fn new(config: &Config) -> Self {
        Self {
            cluster: config.cluster.clone(),
            outbox: Outbox::new(config.max_buffer_bytes, config.max_batch_bytes, config.max_batches_in_flight)
                .with_frames_up_to(largest_body_frame(config)),
            stream: Stream::Down { retry_at_ns: 0 },
            backoff_ns: INITIAL_BACKOFF_NS,
            next_transaction_id: 1,
            unreported_drops: 0,
            last_warning_ns: None,
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.stream, Stream::Ready { .. })
    }

    /// Called on every tick: (re)connects when due, gives up on a stalled connect, flushes.
    pub fn on_tick<H: Host>(&mut self, host: &mut H) {
        let now = host.now_ns();
        match self.stream {
            Stream::Down { retry_at_ns } if now >= retry_at_ns => match host.open_stream(&self.cluster) {
                Ok(token) => {
                    host.count(Counter::StreamsOpened, 1);
                    self.stream = Stream::Connecting { token, since_ns: now };
                }
                Err(err) => {
                    self.warn(host, &format!("cannot open the capture stream on cluster {:?}: {err}", self.cluster));
                    self.back_off(now);
                }
            },
            Stream::Connecting { token, since_ns } if now.saturating_sub(since_ns) >= CONNECT_TIMEOUT_NS => {
                host.cancel(token);
                self.warn(host, "the aggregator did not answer the capture stream in time; retrying");
                self.lose_stream(host, now);
            }
            _ => {}
        }
        self.flush(host);
    }

    /// Starts a transaction. Without a stream (aggregator absent) the capture is dropped at
    /// once and counted, rather than buffered for an aggregator that may not come back.
    pub fn begin(&mut self, host: &mut impl Host) -> Option<u64> {
        if matches!(self.stream, Stream::Down { .. }) {
            self.drop_capture(host);
            return None;
        }
        host.count(Counter::CapturesStarted, 1);
        let id = self.next_transaction_id;
        self.next_transaction_id += 1;
        Some(id)
    }

    /// Queues a frame of a transaction whose fate is `fate`, and returns the new fate.
    pub fn record<H: Host>(&mut self, host: &mut H, fate: Fate, frame: &FrameRef<'_>) -> Fate {
        let (is_start, is_end) = (frame.is_start(), frame.is_end());
        // A damaged capture still sends its end, so the aggregator emits it flagged.
        if fate == Fate::Abandoned || (fate == Fate::Damaged && !is_end) {
            return fate;
        }
        let pushed = if is_end { self.outbox.push_end(frame) } else { self.outbox.push(frame) };
        match pushed {
            Ok(()) => {
                self.send_full_batches(host);
                fate
            }
            Err(_) => {
                host.count(Counter::FramesDropped, 1);
                match fate {
                    Fate::Recording => {
                        self.drop_capture(host);
                        if is_start {
                            Fate::Abandoned
                        } else {
                            Fate::Damaged
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// The stream's response headers arrived: the stream is ready if they say the aggregator
    /// accepted it (see [`stream_accepted`]); otherwise its close follows and is handled there.
    pub fn on_stream_headers<H: Host>(&mut self, host: &mut H, token: u32, headers: &[Pair<'_>]) {
        if stream_accepted(headers) {
            self.on_stream_ready(host, token);
        }
    }

    fn on_stream_ready<H: Host>(&mut self, host: &mut H, token: u32) {
        if let Stream::Connecting { token: current, .. } = self.stream {
            if current == token {
                self.stream = Stream::Ready { token };
                self.backoff_ns = INITIAL_BACKOFF_NS;
                host.count(Counter::StreamsReady, 1);
                self.flush(host);
            }
        }
    }

    pub fn on_stream_message<H: Host>(&mut self, host: &mut H, token: u32, message: &[u8]) {
        if self.token() != Some(token) {
            return;
        }
        match BatchAck::decode(message) {
            Ok(ack) => {
                let released = self.outbox.ack(ack.sequence);
                host.count(Counter::BatchesAcked, released as u64);
                self.send_full_batches(host);
            }
            Err(err) => self.warn(host, &format!("the aggregator sent an undecodable ack: {err}")),
        }
    }

    pub fn on_stream_closed<H: Host>(&mut self, host: &mut H, token: u32, status: u32) {
        if self.token() != Some(token) {
            return;
        }
        let now = host.now_ns();
        self.warn(host, &format!("capture stream closed (gRPC status {status}); reconnecting"));
        self.lose_stream(host, now);
    }

    /// Sends every waiting batch, the one still being filled included, while the stream is
    /// ready and the ack window allows: on the tick (which bounds how long a frame waits) and
    /// when the stream becomes ready.
    pub fn flush<H: Host>(&mut self, host: &mut H) {
        self.send_batches(host, Outbox::next_batch);
    }

    /// Sends the full batches only, as frames are recorded and acks open the window; the one
    /// still being filled waits for more frames or the tick.
    fn send_full_batches<H: Host>(&mut self, host: &mut H) {
        self.send_batches(host, Outbox::next_full_batch);
    }

    fn send_batches<H: Host>(
        &mut self,
        host: &mut H,
        mut next: impl FnMut(&mut Outbox, u64) -> Option<(u64, Vec<u8>)>,
    ) {
        let Stream::Ready { token } = self.stream else { return };
        while let Some((_, mut encoded)) = next(&mut self.outbox, self.unreported_drops) {
            let sent = host.send(token, &mut encoded);
            self.outbox.recycle(encoded);
            if let Err(err) = sent {
                self.warn(host, &format!("sending to the aggregator failed: {err}"));
                host.cancel(token);
                let now = host.now_ns();
                self.lose_stream(host, now);
                return;
            }
            self.unreported_drops = 0;
            host.count(Counter::BatchesSent, 1);
        }
    }

    fn token(&self) -> Option<u32> {
        match self.stream {
            Stream::Connecting { token, .. } | Stream::Ready { token } => Some(token),
            Stream::Down { .. } => None,
        }
    }

    fn lose_stream(&mut self, host: &mut impl Host, now: u64) {
        host.count(Counter::StreamsClosed, 1);
        let lost = self.outbox.stream_lost() as u64;
        if lost > 0 {
            // What those batches held cannot be told apart any more; count them as such.
            host.count(Counter::BatchesLost, lost);
        }
        self.back_off(now);
    }

    fn back_off(&mut self, now: u64) {
        self.stream = Stream::Down { retry_at_ns: now + self.backoff_ns };
        self.backoff_ns = (self.backoff_ns * 2).min(MAX_BACKOFF_NS);
    }

    fn drop_capture(&mut self, host: &mut impl Host) {
        host.count(Counter::CapturesDropped, 1);
        self.unreported_drops += 1;
    }

    /// Logs a warning, at most once per interval (a flood of failures must not flood the log).
    pub fn warn(&mut self, host: &mut impl Host, message: &str) {
        let now = host.now_ns();
        if self.last_warning_ns.is_none_or(|last| now.saturating_sub(last) >= WARN_INTERVAL_NS) {
            self.last_warning_ns = Some(now);
            host.warn(message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_inspector_proto::capture::{frame::Kind, Frame, FrameBatch, TransactionEnd, TransactionStart};
    use std::collections::HashMap;

    #[derive(Default)]
    struct MockHost {
        now: u64,
        next_token: u32,
        sent: Vec<(u32, FrameBatch)>,
        cancelled: Vec<u32>,
        counters: HashMap<&'static str, u64>,
        warnings: Vec<String>,
        refuse_open: bool,
        /// Takes each batch's buffer, as the native capture's host does.
        takes_batches: bool,
    }

    impl Host for MockHost {
        fn now_ns(&self) -> u64 {
            self.now
        }
        fn open_stream(&mut self, _cluster: &str) -> Result<u32, String> {
            if self.refuse_open {
                return Err("no such cluster".into());
            }
            self.next_token += 1;
            Ok(self.next_token)
        }
        fn send(&mut self, token: u32, batch: &mut Vec<u8>) -> Result<(), String> {
            self.sent.push((token, FrameBatch::decode(batch.as_slice()).unwrap()));
            if self.takes_batches {
                drop(std::mem::take(batch));
            }
            Ok(())
        }
        fn cancel(&mut self, token: u32) {
            self.cancelled.push(token);
        }
        fn count(&mut self, counter: Counter, delta: u64) {
            *self.counters.entry(counter.name()).or_default() += delta;
        }
        fn warn(&mut self, message: &str) {
            self.warnings.push(message.to_owned());
        }
    }

    impl MockHost {
        fn counter(&self, counter: Counter) -> u64 {
            self.counters.get(counter.name()).copied().unwrap_or(0)
        }
    }

    fn config(buffer: usize) -> Config {
        let mut config = Config::from_json(br#"{"cluster":"aggregator"}"#).unwrap();
        config.max_buffer_bytes = buffer;
        config.max_batch_bytes = buffer.min(config.max_batch_bytes);
        config
    }

    fn start(id: u64) -> FrameRef<'static> {
        FrameRef::Message(Frame {
            transaction_id: id,
            timestamp_ns: 1,
            kind: Some(Kind::Start(TransactionStart::default())),
        })
    }

    fn end(id: u64) -> FrameRef<'static> {
        FrameRef::Message(Frame {
            transaction_id: id,
            timestamp_ns: 2,
            kind: Some(Kind::End(TransactionEnd::default())),
        })
    }

    fn ready_pipeline(host: &mut MockHost, buffer: usize) -> Pipeline {
        let mut pipeline = Pipeline::new(&config(buffer));
        pipeline.on_tick(host);
        pipeline.on_stream_ready(host, 1);
        assert!(pipeline.is_ready());
        pipeline
    }

    /// Between ticks only full batches go: the frame that did not fit waits in the next one,
    /// rather than going out alone right after it.
    #[test]
    fn a_full_batch_goes_at_once_and_the_next_waits_for_more_frames_or_the_tick() {
        let mut host = MockHost::default();
        let mut pipeline = ready_pipeline(&mut host, 1 << 20);
        pipeline.outbox = Outbox::new(1 << 20, 60, 8);
        let mut recorded = 0;
        while host.sent.is_empty() {
            let id = pipeline.begin(&mut host).unwrap();
            assert_eq!(pipeline.record(&mut host, Fate::Recording, &start(id)), Fate::Recording);
            recorded += 1;
        }
        assert_eq!(host.sent[0].1.frames.len(), recorded - 1, "the full batch");
        let ack = BatchAck { sequence: 1 }.encode_to_vec();
        pipeline.on_stream_message(&mut host, 1, &ack);
        assert_eq!(host.sent.len(), 1, "an ack sends no batch that is not full");
        pipeline.on_tick(&mut host);
        assert_eq!(host.sent.len(), 2);
        assert_eq!(host.sent[1].1.frames.len(), 1, "the frame that did not fit, on the tick");
    }

    #[test]
    fn frames_flow_once_ready_and_acks_open_the_window() {
        let mut host = MockHost::default();
        let mut pipeline = ready_pipeline(&mut host, 1 << 20);
        let id = pipeline.begin(&mut host).unwrap();
        assert_eq!(pipeline.record(&mut host, Fate::Recording, &start(id)), Fate::Recording);
        pipeline.record(&mut host, Fate::Recording, &end(id));
        pipeline.on_tick(&mut host);
        assert_eq!(host.sent.len(), 1);
        assert_eq!(host.sent[0].1.frames.len(), 2);
        pipeline.on_stream_message(&mut host, 1, &BatchAck { sequence: 1 }.encode_to_vec());
        assert_eq!(host.counter(Counter::BatchesAcked), 1);
    }

    #[test]
    fn a_host_that_takes_the_batches_gets_the_same_batches_as_one_that_copies_them() {
        let sent = |takes_batches| {
            let mut host = MockHost { takes_batches, ..Default::default() };
            let mut pipeline = ready_pipeline(&mut host, 1 << 20);
            for round in 1..=3 {
                for _ in 0..round {
                    let id = pipeline.begin(&mut host).unwrap();
                    pipeline.record(&mut host, Fate::Recording, &start(id));
                    pipeline.record(&mut host, Fate::Recording, &end(id));
                }
                pipeline.on_tick(&mut host);
            }
            host.sent
        };
        let (taken, copied) = (sent(true), sent(false));
        assert_eq!(taken.len(), 3);
        let frames: Vec<usize> = taken.iter().map(|(_, batch)| batch.frames.len()).collect();
        assert_eq!(frames, [2, 4, 6], "each batch starts empty in its new buffer");
        let sequences: Vec<u64> = taken.iter().map(|(_, batch)| batch.sequence).collect();
        assert_eq!(sequences, [1, 2, 3]);
        assert_eq!(taken, copied);
    }

    #[test]
    fn pending_counts_add_up_per_counter_and_are_taken_once() {
        for (index, counter) in Counter::ALL.into_iter().enumerate() {
            assert_eq!(counter as usize, index, "Counter::ALL is in declaration order");
        }
        let mut pending = PendingCounts::default();
        assert_eq!(pending.take().count(), 0);
        pending.add(Counter::CapturesStarted, 1);
        pending.add(Counter::DiameterTruncated, 2);
        pending.add(Counter::CapturesStarted, 3);
        pending.add(Counter::FramesDropped, 0);
        let taken: Vec<(Counter, u64)> = pending.take().collect();
        assert_eq!(taken, [(Counter::CapturesStarted, 4), (Counter::DiameterTruncated, 2)]);
        assert_eq!(pending.take().count(), 0, "taking leaves nothing pending");
        pending.add(Counter::BatchesLost, u64::MAX);
        pending.add(Counter::BatchesLost, 1);
        assert_eq!(pending.take().collect::<Vec<_>>(), [(Counter::BatchesLost, u64::MAX)]);
    }

    #[test]
    fn only_an_answer_with_headers_and_status_200_accepts_the_stream() {
        let grpc: &[Pair<'_>] = &[(b":status", b"200"), (b"content-type", b"application/grpc")];
        assert!(stream_accepted(grpc));
        assert!(!stream_accepted(&[]), "a trailers-only answer (e.g. Envoy's UNAVAILABLE)");
        assert!(!stream_accepted(&[(b":status", b"503"), (b"content-type", b"text/plain")]));
        assert!(stream_accepted(&[(b"content-type", b"application/grpc")]), "no :status is not a refusal");
    }

    #[test]
    fn a_failed_connect_is_not_counted_ready_and_the_next_attempt_comes_soon() {
        let mut host = MockHost::default();
        let mut pipeline = Pipeline::new(&config(1 << 20));
        pipeline.on_tick(&mut host);
        // What Envoy reports when the aggregator cannot be reached: empty initial metadata,
        // then the close.
        pipeline.on_stream_headers(&mut host, 1, &[]);
        assert!(!pipeline.is_ready());
        pipeline.on_stream_closed(&mut host, 1, 14);
        assert_eq!(host.counter(Counter::StreamsReady), 0);
        assert_eq!(pipeline.begin(&mut host), None, "no stream: the capture is dropped and counted");
        host.now += INITIAL_BACKOFF_NS;
        pipeline.on_tick(&mut host);
        let accepted: &[Pair<'_>] = &[(b":status", b"200")];
        pipeline.on_stream_headers(&mut host, 2, accepted);
        assert!(pipeline.is_ready());
        assert_eq!(host.counter(Counter::StreamsReady), 1);
    }

    #[test]
    fn without_a_stream_captures_are_dropped_and_reported_later() {
        let mut host = MockHost { refuse_open: true, ..Default::default() };
        let mut pipeline = Pipeline::new(&config(1 << 20));
        pipeline.on_tick(&mut host);
        assert_eq!(pipeline.begin(&mut host), None);
        assert_eq!(pipeline.begin(&mut host), None);
        assert_eq!(host.counter(Counter::CapturesDropped), 2);
        assert_eq!(host.warnings.len(), 1, "warnings are rate-limited");
        host.refuse_open = false;
        host.now += INITIAL_BACKOFF_NS;
        pipeline.on_tick(&mut host);
        pipeline.on_stream_ready(&mut host, 1);
        let id = pipeline.begin(&mut host).unwrap();
        pipeline.record(&mut host, Fate::Recording, &start(id));
        pipeline.on_tick(&mut host);
        assert_eq!(host.sent[0].1.captures_dropped, 2, "the aggregator learns of the drops");
    }

    #[test]
    fn full_buffer_abandons_or_damages_captures() {
        let mut host = MockHost::default();
        let one = start(1).framed_len();
        let mut pipeline = ready_pipeline(&mut host, one * 2);
        // Hold the window shut so nothing drains.
        pipeline.outbox = Outbox::new(one * 2, one * 2, 1);
        pipeline.outbox.push(&start(99)).unwrap();
        pipeline.outbox.next_batch(0).unwrap();
        let a = pipeline.begin(&mut host).unwrap();
        let fate_a = pipeline.record(&mut host, Fate::Recording, &start(a));
        let b = pipeline.begin(&mut host).unwrap();
        let fate_b = pipeline.record(&mut host, Fate::Recording, &start(b));
        let c = pipeline.begin(&mut host).unwrap();
        let fate_c = pipeline.record(&mut host, Fate::Recording, &start(c));
        assert_eq!((fate_a, fate_b, fate_c), (Fate::Recording, Fate::Recording, Fate::Abandoned));
        // The end of a recording transaction still goes in (the reserve), so it is closed
        // at the aggregator rather than left open.
        let fate_a = pipeline.record(&mut host, Fate::Recording, &end(a));
        assert_eq!(fate_a, Fate::Recording);
        assert_eq!(host.counter(Counter::CapturesDropped), 1);
        assert_eq!(host.counter(Counter::FramesDropped), 1);
        // A later data frame that finds the buffer full damages it; its end still goes.
        let body =
            FrameRef::Message(Frame { transaction_id: b, timestamp_ns: 3, kind: Some(Kind::Body(Default::default())) });
        let fate_b = pipeline.record(&mut host, Fate::Recording, &body);
        assert_eq!(fate_b, Fate::Damaged);
        assert_eq!(pipeline.record(&mut host, fate_b, &end(b)), Fate::Damaged);
        assert_eq!(host.counter(Counter::CapturesDropped), 2);
        assert_eq!(host.counter(Counter::FramesDropped), 2);
    }

    #[test]
    fn stream_close_backs_off_exponentially_and_reconnects() {
        let mut host = MockHost::default();
        let mut pipeline = ready_pipeline(&mut host, 1 << 20);
        let id = pipeline.begin(&mut host).unwrap();
        pipeline.record(&mut host, Fate::Recording, &start(id));
        pipeline.flush(&mut host);
        pipeline.on_stream_closed(&mut host, 1, 14);
        assert_eq!(host.counter(Counter::BatchesLost), 1);
        assert!(!pipeline.is_ready());
        pipeline.on_tick(&mut host);
        assert_eq!(host.counter(Counter::StreamsOpened), 1, "not before the backoff");
        host.now += INITIAL_BACKOFF_NS;
        pipeline.on_tick(&mut host);
        assert_eq!(host.counter(Counter::StreamsOpened), 2);
        // A stale close for the old token changes nothing.
        pipeline.on_stream_closed(&mut host, 1, 14);
        pipeline.on_stream_ready(&mut host, 2);
        assert!(pipeline.is_ready());
    }

    #[test]
    fn stalled_connect_is_cancelled() {
        let mut host = MockHost::default();
        let mut pipeline = Pipeline::new(&config(1 << 20));
        pipeline.on_tick(&mut host);
        host.now += CONNECT_TIMEOUT_NS;
        pipeline.on_tick(&mut host);
        assert_eq!(host.cancelled, vec![1]);
        assert_eq!(host.counter(Counter::StreamsClosed), 1);
    }

    #[test]
    fn captures_flow_again_after_failed_reconnects() {
        let mut host = MockHost::default();
        let mut pipeline = ready_pipeline(&mut host, 1 << 20);
        pipeline.on_stream_closed(&mut host, 1, 0);
        // Reconnect attempts that fail; exchanges seen while connecting are queued.
        for _ in 0..5 {
            host.now += MAX_BACKOFF_NS;
            pipeline.on_tick(&mut host);
            if let Some(id) = pipeline.begin(&mut host) {
                let fate = pipeline.record(&mut host, Fate::Recording, &start(id));
                pipeline.record(&mut host, fate, &end(id));
            }
            let token = host.next_token;
            pipeline.on_stream_closed(&mut host, token, 14);
        }
        host.now += MAX_BACKOFF_NS;
        pipeline.on_tick(&mut host);
        let token = host.next_token;
        pipeline.on_stream_ready(&mut host, token);
        let id = pipeline.begin(&mut host).unwrap();
        pipeline.record(&mut host, Fate::Recording, &start(id));
        pipeline.record(&mut host, Fate::Recording, &end(id));
        pipeline.on_tick(&mut host);
        let on_new_stream: Vec<&FrameBatch> =
            host.sent.iter().filter(|(t, _)| *t == token).map(|(_, batch)| batch).collect();
        let sequences: Vec<u64> = on_new_stream.iter().map(|b| b.sequence).collect();
        assert_eq!(sequences, vec![1, 2], "what waited goes on ready; a new stream numbers from 1");
        assert_eq!(on_new_stream[0].frames.len(), 2 * 5, "five exchanges queued while connecting");
        assert_eq!(on_new_stream[1].frames.iter().map(|f| f.transaction_id).collect::<Vec<_>>(), vec![id, id]);
    }
}
