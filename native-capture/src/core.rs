//! What Envoy's threads and the transport thread share: one capture pipeline per Envoy worker,
//! each behind its own lock, and the [`Host`] the pipelines run on.
//!
//! In the Wasm filter every worker has its own VM, and the pipeline's stream callbacks and ticks
//! arrive on that worker. Here the stream is the transport thread's, so the pipeline of a worker
//! is shared by two threads: the worker, which records frames as its exchanges pass, and the
//! transport thread, which delivers the stream's readiness, acks and close and runs the flush
//! tick. Each takes the worker's lock for one call; the worker's lock is otherwise uncontended
//! (no other worker touches it), so recording costs one uncontended lock per event.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering::Relaxed},
        Mutex, MutexGuard, PoisonError,
    },
    time::SystemTime,
};

use bytes::Bytes;
use packet_inspector_filter::{
    config::Config,
    connections::ConnectionCache,
    metadata::NodeIdentity,
    pipeline::{Counter, Host, PendingCounts, Pipeline},
};
use tokio::sync::mpsc::UnboundedSender;

/// Downstream connections whose facts each worker keeps (see [`ConnectionCache`]).
const CONNECTIONS_CACHED: usize = 4096;

/// What the workers ask of the transport thread.
#[derive(Debug)]
pub enum Command {
    /// Open the capture stream `token` for worker `worker`.
    Open { token: u32, worker: usize },
    /// Send one encoded batch on stream `token`.
    Send { token: u32, batch: Bytes },
    /// Drop stream `token` without waiting for it.
    Cancel { token: u32 },
    /// Flush every worker, end the streams, and stop.
    Shutdown,
}

/// One Envoy worker's capture state.
#[derive(Debug)]
pub struct WorkerState {
    pub pipeline: Pipeline,
    pub connections: ConnectionCache,
    /// Counter increments not yet handed to Envoy (published from the worker's own hooks).
    pub pending: PendingCounts,
}

/// How the library logs: through Envoy once loaded; tests capture the messages.
pub type Logger = fn(&str);

/// Where counter increments go: Envoy's stats once loaded.
pub type CounterSink = Box<dyn Fn(Counter, u64) + Send + Sync>;

/// Shared by Envoy's threads and the transport thread for the life of a filter configuration.
pub struct Core {
    pub config: Config,
    pub node: NodeIdentity,
    workers: Vec<Mutex<WorkerState>>,
    commands: UnboundedSender<Command>,
    next_token: AtomicU32,
    warn: Logger,
    /// One sink per Envoy filter configuration using this core, by the configuration's key;
    /// the first takes the increments (they name the same counters: Envoy's stats are by name).
    counters: Mutex<Vec<(usize, CounterSink)>>,
}

impl Core {
    /// A core for `workers` Envoy workers (at least one).
    pub fn new(
        config: Config,
        node: NodeIdentity,
        workers: usize,
        commands: UnboundedSender<Command>,
        warn: Logger,
    ) -> Self {
        let workers = (0..workers.max(1))
            .map(|_| {
                Mutex::new(WorkerState {
                    pipeline: Pipeline::new(&config),
                    connections: ConnectionCache::new(CONNECTIONS_CACHED),
                    pending: PendingCounts::default(),
                })
            })
            .collect();
        Self { config, node, workers, commands, next_token: AtomicU32::new(1), warn, counters: Mutex::new(Vec::new()) }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The state of worker `index` (Envoy's worker index; out-of-range indexes share the last
    /// worker's state rather than fail), locked. A poisoned lock is taken over: the state is
    /// plain bookkeeping, consistent between calls.
    pub fn lock(&self, index: usize) -> Option<MutexGuard<'_, WorkerState>> {
        let worker = self.workers.get(index).or_else(|| self.workers.last())?;
        Some(worker.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Runs `f` on worker `index`'s pipeline and connection cache with the host; `None` only
    /// if there is no worker at all.
    pub fn with_worker<R>(
        &self,
        index: usize,
        f: impl FnOnce(&mut Pipeline, &mut ConnectionCache, &mut NativeHost<'_>) -> R,
    ) -> Option<R> {
        let mut state = self.lock(index)?;
        let WorkerState { pipeline, connections, pending } = &mut *state;
        let mut host = NativeHost { core: self, worker: index, pending };
        Some(f(pipeline, connections, &mut host))
    }

    /// Runs `f` on worker `index`'s pipeline with the host.
    pub fn with_pipeline<R>(&self, index: usize, f: impl FnOnce(&mut Pipeline, &mut NativeHost<'_>) -> R) -> Option<R> {
        self.with_worker(index, |pipeline, _, host| f(pipeline, host))
    }

    /// Asks the transport thread to flush every worker and stop.
    pub fn stop(&self) {
        let _ = self.commands.send(Command::Shutdown);
    }

    /// Hands worker `index`'s pending counter increments to the sink (on every tick, as the
    /// Wasm filter publishes its own: the stats lag by at most one flush interval, and no hook
    /// pays a stats call).
    pub fn publish(&self, index: usize) {
        let sinks = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        // Without a sink (the configuration is still being set up) the increments wait.
        let Some((_, sink)) = sinks.first() else { return };
        let pending: Vec<(Counter, u64)> =
            self.lock(index).map(|mut state| state.pending.take().collect()).unwrap_or_default();
        for (counter, delta) in pending {
            sink(counter, delta);
        }
    }

    /// Publishes through `sink` too (a filter configuration starts using this core).
    pub fn attach_counters(&self, key: usize, sink: CounterSink) {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner).push((key, sink));
    }

    /// Stops publishing through the sink of `key` (its configuration is going away). Returns
    /// once no publication through it is in progress.
    pub fn detach_counters(&self, key: usize) {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner).retain(|(k, _)| *k != key);
    }

    pub fn warn(&self, message: &str) {
        (self.warn)(message);
    }
}

/// [`Host`] for one worker's pipeline: streams and sends go to the transport thread as
/// commands (never blocking the caller), counts to the worker's pending increments.
pub struct NativeHost<'a> {
    core: &'a Core,
    worker: usize,
    pending: &'a mut PendingCounts,
}

/// The capture stream is gone for good: the transport thread stopped.
const TRANSPORT_STOPPED: &str = "the capture transport thread has stopped";

impl Host for NativeHost<'_> {
    fn now_ns(&self) -> u64 {
        now_ns()
    }

    fn open_stream(&mut self, _cluster: &str) -> Result<u32, String> {
        let token = self.core.next_token.fetch_add(1, Relaxed);
        self.core
            .commands
            .send(Command::Open { token, worker: self.worker })
            .map(|()| token)
            .map_err(|_| TRANSPORT_STOPPED.to_owned())
    }

    /// Takes the batch's buffer: it goes out as it is, without a copy (the outbox starts the
    /// next batch in a new one).
    fn send(&mut self, token: u32, batch: &mut Vec<u8>) -> Result<(), String> {
        // Not with the defaults' bounds (batches of at most `maxBatchBytes`, frames bounded by
        // the body limit), but the length must fit gRPC's 4-byte prefix.
        if u32::try_from(batch.len()).is_err() {
            return Err(format!("a batch of {} bytes is too large for a gRPC message", batch.len()));
        }
        let batch = Bytes::from(std::mem::take(batch));
        self.core.commands.send(Command::Send { token, batch }).map_err(|_| TRANSPORT_STOPPED.to_owned())
    }

    fn cancel(&mut self, token: u32) {
        let _ = self.core.commands.send(Command::Cancel { token });
    }

    fn count(&mut self, counter: Counter, delta: u64) {
        self.pending.add(counter, delta);
    }

    fn warn(&mut self, message: &str) {
        self.core.warn(message);
    }
}

/// Nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use packet_inspector_filter::config::Config;

    use super::*;

    fn core(workers: usize) -> (Core, tokio::sync::mpsc::UnboundedReceiver<Command>) {
        let config = Config::from_json(br#"{"cluster":"127.0.0.1:1"}"#).unwrap();
        let (commands, received) = tokio::sync::mpsc::unbounded_channel();
        (Core::new(config, NodeIdentity::default(), workers, commands, |_| {}), received)
    }

    fn recording_sink(into: &Arc<Mutex<Vec<(Counter, u64)>>>) -> CounterSink {
        let into = into.clone();
        Box::new(move |counter, delta| into.lock().unwrap().push((counter, delta)))
    }

    #[test]
    fn increments_wait_for_a_sink_and_go_to_the_first() {
        let (core, _commands) = core(1);
        core.with_pipeline(0, |_, host| host.count(Counter::StreamsOpened, 1));
        core.publish(0);
        let (first, second) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        core.attach_counters(1, recording_sink(&first));
        core.attach_counters(2, recording_sink(&second));
        core.with_pipeline(0, |_, host| host.count(Counter::StreamsOpened, 2));
        core.publish(0);
        assert_eq!(*first.lock().unwrap(), [(Counter::StreamsOpened, 3)], "nothing lost before the sink came");
        core.detach_counters(1);
        core.with_pipeline(0, |_, host| host.count(Counter::CapturesStarted, 1));
        core.publish(0);
        assert_eq!(*second.lock().unwrap(), [(Counter::CapturesStarted, 1)]);
        assert_eq!(first.lock().unwrap().len(), 1, "a detached sink hears nothing more");
    }

    #[test]
    fn streams_and_batches_become_commands_in_order() {
        let (core, mut commands) = core(2);
        let token = core.with_pipeline(1, |_, host| host.open_stream("ignored").unwrap()).unwrap();
        let mut batch = b"batch".to_vec();
        core.with_pipeline(1, |_, host| host.send(token, &mut batch).unwrap());
        assert!(batch.is_empty(), "the batch's buffer goes with it");
        core.with_pipeline(1, |_, host| host.cancel(token));
        assert!(matches!(commands.try_recv(), Ok(Command::Open { token: t, worker: 1 }) if t == token));
        assert!(
            matches!(commands.try_recv(), Ok(Command::Send { token: t, batch }) if t == token && &batch[..] == b"batch")
        );
        assert!(matches!(commands.try_recv(), Ok(Command::Cancel { token: t }) if t == token));
        // Another open gets another token; with the transport gone, sending is an error.
        let next = core.with_pipeline(0, |_, host| host.open_stream("ignored").unwrap()).unwrap();
        assert_ne!(next, token);
        drop(commands);
        assert!(core.with_pipeline(0, |_, host| host.send(next, &mut b"x".to_vec())).unwrap().is_err());
    }

    #[test]
    fn a_worker_index_past_the_last_shares_the_last_worker() {
        let (core, _commands) = core(2);
        core.with_pipeline(7, |_, host| host.count(Counter::CapturesStarted, 1));
        let taken: Vec<_> = core.lock(1).unwrap().pending.take().collect();
        assert_eq!(taken, [(Counter::CapturesStarted, 1)]);
        assert_eq!(core.worker_count(), 2);
    }
}
