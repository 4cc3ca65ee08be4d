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
    /// `None` once Envoy destroyed the configuration the counters belong to.
    counters: Mutex<Option<CounterSink>>,
}

impl Core {
    /// A core for `workers` Envoy workers (at least one).
    pub fn new(
        config: Config,
        node: NodeIdentity,
        workers: usize,
        commands: UnboundedSender<Command>,
        warn: Logger,
        counters: CounterSink,
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
        Self {
            config,
            node,
            workers,
            commands,
            next_token: AtomicU32::new(1),
            warn,
            counters: Mutex::new(Some(counters)),
        }
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
        let pending: Vec<(Counter, u64)> =
            self.lock(index).map(|mut state| state.pending.take().collect()).unwrap_or_default();
        let sink = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sink) = sink.as_ref() {
            for (counter, delta) in pending {
                sink(counter, delta);
            }
        }
    }

    /// Stops publishing: the counters' owner is going away. Returns once no publication is in
    /// progress.
    pub fn detach_counters(&self) {
        *self.counters.lock().unwrap_or_else(PoisonError::into_inner) = None;
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

    fn send(&mut self, token: u32, message: &[u8]) -> Result<(), String> {
        let batch = Bytes::copy_from_slice(message);
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
