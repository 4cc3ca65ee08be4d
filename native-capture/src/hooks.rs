//! The Envoy edge: the dynamic-module hooks, each a thin translation between Envoy's calls and
//! the Wasm filter's host-free core (as `filter/src/plugin.rs` is for proxy-wasm).
//!
//! Every hook returns `Continue`: capture never holds traffic. A configuration Envoy cannot use
//! (bad JSON, unreadable certificate files) is refused at load with the reason in Envoy's log.

use std::{
    cell::RefCell,
    ffi::{c_char, c_void},
    ptr::null,
    sync::{mpsc, Arc, Mutex, PoisonError, Weak},
    thread::JoinHandle,
    time::Duration,
};

use packet_inspector_dynamic_module::{
    self as abi, Attribute, Body, ConfigEnvoyPtr, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, FilterModulePtr, HeaderMap,
    LogLevel, CONTINUE,
};
use packet_inspector_filter::{
    config::Config,
    connections::ConnectionFacts,
    metadata::{self, NodeIdentity},
    pairs::Pair,
    pipeline::{Counter, Fate},
    transaction::{ExchangeStart, HttpTransaction},
    wire::{BodyBytes, SharedMetadata},
};
use packet_inspector_proto::capture::{Direction, TransactionMetadata};
use tokio::sync::mpsc::unbounded_channel;
use tokio_util::sync::CancellationToken;

use crate::{
    core::{now_ns, Core},
    identity,
    settings::Settings,
    transport::{self, DRAIN_TIMEOUT},
};

/// How long loading a configuration waits for the transport thread to set TLS up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

fn warn(message: &str) {
    abi::log(LogLevel::Warn, message);
}

fn error(message: &str) {
    abi::log(LogLevel::Error, &format!("packet-inspector: {message}"));
}

/// The pipelines and the transport thread that every filter configuration with the same
/// settings shares. A sidecar has many HTTP connection managers (Istio makes one per outbound
/// port), each with its own copy of the filter's configuration; sharing keeps one stream per
/// Envoy worker to the aggregator, as the Wasm filter's shared VM does.
struct Shared {
    /// The configuration, as Envoy passed it.
    settings: Vec<u8>,
    core: Arc<Core>,
    shutdown: CancellationToken,
    /// The thread, and what tells it finished (in a lock only to make `Shared` shareable).
    transport: Mutex<Option<(JoinHandle<()>, mpsc::Receiver<()>)>>,
}

impl Drop for Shared {
    /// The last configuration is gone: flush, end the streams, stop the thread.
    fn drop(&mut self) {
        self.core.stop();
        let transport = self.transport.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        if let Some((thread, done)) = transport {
            // Bounded: a transport that cannot finish is left behind rather than hang Envoy.
            if done.recv_timeout(DRAIN_TIMEOUT + Duration::from_secs(1)).is_ok() {
                let _ = thread.join();
            }
        }
        self.shutdown.cancel();
    }
}

/// The live [`Shared`]s (configurations are created and destroyed on Envoy's main thread).
static SHARED: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// One Envoy filter configuration.
struct Capture {
    shared: Arc<Shared>,
}

impl Capture {
    /// The key its counter sink is attached under.
    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

/// The [`Shared`] for `settings`: the live one with the same configuration, or a new one with
/// its transport started.
fn shared(bytes: &[u8], settings: Settings) -> Result<Arc<Shared>, String> {
    let mut live = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
    live.retain(|shared| shared.strong_count() > 0);
    if let Some(shared) = live.iter().filter_map(Weak::upgrade).find(|shared| shared.settings == bytes) {
        return Ok(shared);
    }
    // SAFETY: on the main thread (configurations are created there).
    let workers = unsafe { abi::concurrency() } as usize;
    let (commands_tx, commands_rx) = unbounded_channel();
    let core = Arc::new(Core::new(
        settings.capture.clone(),
        identity::read(|name| std::env::var(name).ok(), &settings.pod_labels_file, &settings.capture.labels),
        workers,
        commands_tx,
        warn,
    ));
    let shutdown = CancellationToken::new();
    let transport = start(&settings, &core, commands_rx, &shutdown)
        .map_err(|reason| format!("cannot reach the aggregator at {}: {reason}", settings.capture.cluster))?;
    let shared = Arc::new(Shared { settings: bytes.to_vec(), core, shutdown, transport: Mutex::new(Some(transport)) });
    live.push(Arc::downgrade(&shared));
    Ok(shared)
}

/// Starts the transport thread; returns once its TLS is set up (or why it could not be).
fn start(
    settings: &Settings,
    core: &Arc<Core>,
    commands: tokio::sync::mpsc::UnboundedReceiver<crate::core::Command>,
    shutdown: &CancellationToken,
) -> Result<(JoinHandle<()>, mpsc::Receiver<()>), String> {
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    let (aggregator, core, shutdown) = (settings.aggregator.clone(), core.clone(), shutdown.clone());
    let thread = std::thread::Builder::new()
        .name("pi-capture".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready_tx.send(Err(format!("cannot start the transport runtime: {err}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let channel = match transport::channel(&aggregator, &core, &shutdown) {
                    Ok(channel) => channel,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                transport::run(core, commands, channel).await;
                shutdown.cancel();
            });
            let _ = done_tx.send(());
        })
        .map_err(|err| format!("cannot start the transport thread: {err}"))?;
    match ready_rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(())) => Ok((thread, done_rx)),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("the transport thread did not start in time".to_owned()),
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::abi_version()
}

/// # Safety
/// Called by Envoy on its main thread with buffers valid for the call.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    // SAFETY: Envoy's buffer, valid for this call.
    let bytes = unsafe { config.bytes() };
    let settings = match Settings::from_json(bytes) {
        Ok(settings) => settings,
        Err(err) => {
            error(&err.to_string());
            return null();
        }
    };
    let shared = match shared(bytes, settings) {
        Ok(shared) => shared,
        Err(reason) => {
            error(&reason);
            return null();
        }
    };
    let capture = Box::new(Capture { shared });
    // SAFETY: the configuration being created, on the main thread.
    let ids = Counter::ALL.map(|counter| unsafe { abi::define_counter(config_envoy, counter.name()) });
    let config_envoy = EnvoyConfig(config_envoy);
    capture.shared.core.attach_counters(
        capture.key(),
        Box::new(move |counter: Counter, delta: u64| {
            if let Some(Some(id)) = ids.get(counter as usize) {
                // SAFETY: the sink is detached before Envoy destroys the configuration.
                unsafe { abi::config_increment_counter(config_envoy.pointer(), *id, delta) };
            }
        }),
    );
    Box::into_raw(capture).cast_const().cast()
}

/// # Safety
/// `config` must come from [`envoy_dynamic_module_on_http_filter_config_new`], destroyed once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if config.is_null() {
        return;
    }
    // SAFETY: allocated by `on_http_filter_config_new`; Envoy destroys each configuration once,
    // after every filter created from it.
    let capture = unsafe { Box::from_raw(config.cast_mut().cast::<Capture>()) };
    // Whatever the transport thread still does, it no longer touches this configuration.
    capture.shared.core.detach_counters(capture.key());
    // The last configuration of its settings stops the transport (`Shared::drop`).
    drop(capture);
}

/// Envoy's configuration pointer, handed to the transport thread for counter increments only.
#[derive(Clone, Copy)]
struct EnvoyConfig(ConfigEnvoyPtr);

// SAFETY: Envoy's counters are atomic and the configuration's counter table is fixed once
// created; the pointer is used only until `Core::detach_counters`.
unsafe impl Send for EnvoyConfig {}
// SAFETY: as above.
unsafe impl Sync for EnvoyConfig {}

impl EnvoyConfig {
    fn pointer(self) -> ConfigEnvoyPtr {
        self.0
    }
}

/// One HTTP exchange.
struct Exchange {
    capture: *const Capture,
    worker: usize,
    /// `None` when not captured (no stream) or once its capture was abandoned or ended.
    transaction: Option<HttpTransaction>,
}

/// # Safety
/// Called by Envoy with the configuration pointer `on_http_filter_config_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    filter: FilterEnvoyPtr,
) -> FilterModulePtr {
    // SAFETY: the current hook's filter pointer.
    let worker = unsafe { abi::worker_index(filter) } as usize;
    let exchange = Exchange { capture: config.cast(), worker, transaction: None };
    Box::into_raw(Box::new(exchange)).cast()
}

/// # Safety
/// `exchange` must come from [`envoy_dynamic_module_on_http_filter_new`], destroyed once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(exchange: FilterModulePtr) {
    if !exchange.is_null() {
        // SAFETY: allocated by `on_http_filter_new`; Envoy destroys each filter once.
        drop(unsafe { Box::from_raw(exchange.cast::<Exchange>()) });
    }
}

thread_local! {
    /// The header and chunk lists of the current event, reused from event to event.
    static HEADERS: RefCell<Vec<EnvoyHeader>> = const { RefCell::new(Vec::new()) };
    static CHUNKS: RefCell<Vec<EnvoyBuffer>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a header map's pairs, borrowed from Envoy.
///
/// # Safety
/// `filter` must be the current hook's filter pointer.
unsafe fn with_pairs<R>(filter: FilterEnvoyPtr, map: HeaderMap, f: impl FnOnce(&[Pair<'_>]) -> R) -> R {
    HEADERS.with_borrow_mut(|headers| {
        // SAFETY: the caller's contract; the pairs do not outlive `f`, within the hook.
        let pairs: Vec<Pair<'_>> = unsafe {
            abi::headers(filter, map, headers);
            headers.iter().map(|header| header.pair()).collect()
        };
        f(&pairs)
    })
}

/// Runs `f` with the current body event's chunks, borrowed from Envoy.
///
/// # Safety
/// `filter` must be the current hook's filter pointer.
unsafe fn with_chunks<R>(filter: FilterEnvoyPtr, body: Body, f: impl FnOnce(&[&[u8]]) -> R) -> R {
    CHUNKS.with_borrow_mut(|chunks| {
        // SAFETY: the caller's contract; the slices do not outlive `f`, within the hook.
        let slices: Vec<&[u8]> = unsafe {
            abi::body_chunks(filter, body, chunks);
            chunks.iter().map(|chunk| chunk.bytes()).collect()
        };
        f(&slices)
    })
}

/// What every capture of the current connection shares.
///
/// # Safety
/// `filter` must be the current hook's filter pointer.
unsafe fn shared_metadata(filter: FilterEnvoyPtr, node: &NodeIdentity, config: &Config) -> TransactionMetadata {
    // SAFETY: the caller's contract; the strings are parsed within the hook.
    let address = |attribute| metadata::socket_address(unsafe { abi::attribute_string(filter, attribute) });
    TransactionMetadata {
        pod_name: node.pod_name.clone(),
        namespace: node.namespace.clone(),
        workload: node.workload.clone(),
        labels: node.labels.clone(),
        // SAFETY: the caller's contract.
        role: metadata::role(
            config.role,
            unsafe { abi::attribute_int(filter, Attribute::XdsListenerDirection) }.and_then(|d| i64::try_from(d).ok()),
        ) as i32,
        gateway: config.gateway,
        downstream_remote: address(Attribute::SourceAddress),
        downstream_local: address(Attribute::DestinationAddress),
        ..Default::default()
    }
}

impl Exchange {
    /// The configuration the filter was made from; not tied to `self`'s borrow, so the
    /// transaction can be changed while the core is used.
    fn capture<'a>(&self) -> &'a Capture {
        // SAFETY: Envoy keeps the configuration alive while any filter made from it exists,
        // and the exchange never outlives its filter.
        unsafe { &*self.capture }
    }

    fn core<'a>(&self) -> &'a Core {
        &self.capture().shared.core
    }

    /// Starts the capture with the request headers.
    ///
    /// # Safety
    /// `filter` must be the current hook's filter pointer.
    unsafe fn begin(&mut self, filter: FilterEnvoyPtr, end_of_stream: bool) {
        let core = self.core();
        // SAFETY: the caller's contract.
        let transaction = unsafe {
            with_pairs(filter, HeaderMap::RequestHeaders, |headers| {
                core.with_worker(self.worker, |pipeline, connections, host| {
                    let id = pipeline.begin(host)?;
                    let now = now_ns();
                    let connection_id = abi::attribute_int(filter, Attribute::ConnectionId).unwrap_or(0);
                    let facts = connections.facts(connection_id, || ConnectionFacts {
                        request_protocol: abi::attribute_string(filter, Attribute::RequestProtocol).map(<[u8]>::to_vec),
                        metadata: SharedMetadata::encode(shared_metadata(filter, &core.node, &core.config)),
                    });
                    let start = ExchangeStart {
                        id,
                        now_ns: now,
                        connection_id,
                        connection: &facts,
                        request_headers: headers,
                        end_of_stream,
                    };
                    Some(HttpTransaction::open(pipeline, host, core.config.max_body_bytes, start))
                })
            })
        };
        self.transaction = transaction.flatten();
    }

    /// The live transaction, unless there is none or it was abandoned.
    fn live(&mut self) -> Option<&mut HttpTransaction> {
        self.transaction.as_mut().filter(|t| t.fate != Fate::Abandoned)
    }

    /// # Safety
    /// `filter` must be the current hook's filter pointer.
    unsafe fn headers(&mut self, filter: FilterEnvoyPtr, direction: Direction, map: HeaderMap, end_of_stream: bool) {
        let (core, worker) = (self.core(), self.worker);
        let Some(transaction) = self.live() else { return };
        // SAFETY: the caller's contract.
        unsafe {
            with_pairs(filter, map, |pairs| {
                let frame = transaction.headers(now_ns(), direction, pairs, end_of_stream);
                record(core, worker, transaction, &frame);
            });
        }
    }

    /// # Safety
    /// `filter` must be the current hook's filter pointer.
    unsafe fn trailers(&mut self, filter: FilterEnvoyPtr, direction: Direction, map: HeaderMap) {
        let (core, worker) = (self.core(), self.worker);
        let Some(transaction) = self.live() else { return };
        // SAFETY: the caller's contract.
        unsafe {
            with_pairs(filter, map, |pairs| {
                let frame = transaction.trailers(now_ns(), direction, pairs);
                record(core, worker, transaction, &frame);
            });
        }
    }

    /// # Safety
    /// `filter` must be the current hook's filter pointer.
    unsafe fn body(&mut self, filter: FilterEnvoyPtr, direction: Direction, body: Body, end_of_stream: bool) {
        let (core, worker) = (self.core(), self.worker);
        let Some(transaction) = self.live() else { return };
        // SAFETY: the caller's contract.
        unsafe {
            with_chunks(filter, body, |chunks| {
                let total = chunks.iter().map(|chunk| chunk.len()).sum();
                // The captured bytes go from Envoy's slices straight into the batch.
                let data = BodyBytes::prefix(chunks, transaction.body_budget(direction, total));
                if let Some(frame) = transaction.body(now_ns(), direction, data, total, end_of_stream) {
                    record(core, worker, transaction, &frame);
                }
            });
        }
    }

    /// Ends the capture.
    ///
    /// # Safety
    /// `filter` must be the current hook's filter pointer.
    unsafe fn end(&mut self, filter: FilterEnvoyPtr) {
        let (core, worker) = (self.core(), self.worker);
        if let Some(transaction) = self.live() {
            // SAFETY: the caller's contract; the string is parsed within the hook.
            let upstream =
                metadata::socket_address(unsafe { abi::attribute_string(filter, Attribute::UpstreamAddress) });
            let ended_ns = transaction.completed_at_ns().unwrap_or_else(now_ns);
            let frame = transaction.end(ended_ns, upstream);
            core.with_pipeline(worker, |pipeline, host| pipeline.record(host, transaction.fate, &frame));
        }
        self.transaction = None;
    }
}

fn record(
    core: &Core,
    worker: usize,
    transaction: &mut HttpTransaction,
    frame: &packet_inspector_filter::wire::FrameRef<'_>,
) {
    if let Some(fate) = core.with_pipeline(worker, |pipeline, host| pipeline.record(host, transaction.fate, frame)) {
        transaction.fate = fate;
    }
}

/// The exchange behind a filter module pointer.
///
/// # Safety
/// `exchange` must come from `on_http_filter_new` and not be destroyed yet.
unsafe fn exchange<'a>(exchange: FilterModulePtr) -> Option<&'a mut Exchange> {
    // SAFETY: the caller's contract; Envoy runs one hook of a filter at a time.
    unsafe { exchange.cast::<Exchange>().as_mut() }
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.begin(filter, end_of_stream) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.body(filter, Direction::Request, Body::ReceivedRequest, end_of_stream) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.trailers(filter, Direction::Request, HeaderMap::RequestTrailers) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.headers(filter, Direction::Response, HeaderMap::ResponseHeaders, end_of_stream) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.body(filter, Direction::Response, Body::ReceivedResponse, end_of_stream) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
) -> u32 {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.trailers(filter, Direction::Response, HeaderMap::ResponseTrailers) };
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: FilterEnvoyPtr,
    exchange_ptr: FilterModulePtr,
) {
    // SAFETY: Envoy's contract for this hook.
    if let Some(exchange) = unsafe { exchange(exchange_ptr) } {
        unsafe { exchange.end(filter) };
    }
}

abi::export_unused_hooks!();
