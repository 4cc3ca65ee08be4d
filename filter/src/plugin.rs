//! The proxy-wasm contexts: the thin edge between Envoy and the host-free pipeline.
//!
//! One [`CaptureRoot`] per VM (each worker thread and the main thread) owns the config, the
//! node identity and the [`Pipeline`] (with its gRPC stream); every [`CaptureHttp`] (HTTP
//! filter) or [`CaptureDiameter`] (network filter) context of that VM shares them through
//! `Rc<RefCell<_>>` and records its traffic as it passes. Every callback returns `Continue`:
//! capture never holds traffic.

use std::{cell::RefCell, rc::Rc, sync::Arc, time::Duration};

use packet_inspector_proto::capture::{
    frame::Kind, DiameterMessage, Direction, Frame, Protocol, Role, TransactionMetadata,
};
use proxy_wasm::{
    traits::{Context, HttpContext, RootContext, StreamContext},
    types::{Action, BufferType, ContextType, LogLevel, MapType},
};

use crate::{
    config::{CaptureProtocol, Config, RoleSetting},
    connections::{ConnectionCache, ConnectionFacts},
    diameter::{self, Event, Framer},
    host,
    metadata::{self, NodeIdentity},
    pairs::{self, Pair},
    pipeline::{Counter, Fate, Host, PendingCounts, Pipeline, METHOD, SERVICE},
    transaction::{ExchangeStart, HttpTransaction},
    wire::{BodyBytes, FrameRef, SharedMetadata},
};

/// Downstream connections whose facts are kept (see [`ConnectionCache`]).
const CONNECTIONS_CACHED: usize = 4096;

proxy_wasm::main! {{
    // Also installs a panic hook that logs through Envoy (a panic would still fail the request).
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(CaptureRoot::default()));
}}

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}

/// Envoy's ids of the module's counters, and the increments not yet handed to them.
struct Counters {
    ids: [Option<u32>; Counter::ALL.len()],
    pending: PendingCounts,
}

impl Counters {
    fn define() -> Self {
        Self { ids: Counter::ALL.map(|counter| host::define_counter(counter.name()).ok()), pending: Default::default() }
    }

    /// Hands the pending increments to Envoy.
    fn publish(&mut self) {
        for (counter, delta) in self.pending.take() {
            if let Some(Some(id)) = self.ids.get(counter as usize) {
                let _ = host::increment(*id, i64::try_from(delta).unwrap_or(i64::MAX));
            }
        }
    }
}

/// [`Host`] over the proxy-wasm ABI.
struct EnvoyHost<'a> {
    counters: &'a mut Counters,
}

impl Host for EnvoyHost<'_> {
    fn now_ns(&self) -> u64 {
        now_ns()
    }
    fn open_stream(&mut self, cluster: &str) -> Result<u32, String> {
        host::open_grpc_stream(cluster, SERVICE, METHOD).map_err(|status| status.to_string())
    }
    /// Envoy copies the batch out of the VM: the buffer stays for the next one.
    fn send(&mut self, token: u32, batch: &mut Vec<u8>) -> Result<(), String> {
        let sent = host::grpc_send(token, batch).map_err(|status| status.to_string());
        // The stats keep up with what reaches the aggregator.
        self.counters.publish();
        sent
    }
    fn cancel(&mut self, token: u32) {
        let _ = host::grpc_cancel(token);
    }
    fn count(&mut self, counter: Counter, delta: u64) {
        self.counters.pending.add(counter, delta);
    }
    fn warn(&mut self, message: &str) {
        log(LogLevel::Warn, message);
    }
}

fn now_ns() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What the contexts of one VM share.
struct Shared {
    config: Config,
    node: NodeIdentity,
    pipeline: Pipeline,
    connections: ConnectionCache,
    counters: Counters,
}

impl Shared {
    /// Runs `f` on the pipeline with the host.
    fn with_pipeline<R>(&mut self, f: impl FnOnce(&mut Pipeline, &mut EnvoyHost<'_>) -> R) -> R {
        let mut host = EnvoyHost { counters: &mut self.counters };
        f(&mut self.pipeline, &mut host)
    }

    /// Queues a frame of a transaction whose fate is `fate`; returns the new fate.
    fn record(&mut self, fate: Fate, frame: &FrameRef<'_>) -> Fate {
        self.with_pipeline(|p, h| p.record(h, fate, frame))
    }

    /// The id and facts of the current request's downstream connection, from the cache when
    /// known.
    fn connection(&mut self) -> (u64, Arc<ConnectionFacts>) {
        let id = connection_id();
        let Self { connections, node, config, .. } = self;
        let facts = connections.facts(id, || ConnectionFacts {
            request_protocol: property(&["request", "protocol"]),
            metadata: SharedMetadata::encode(shared_metadata(node, config)),
        });
        (id, facts)
    }
}

/// Envoy's id of the current downstream connection; 0 when it does not say.
///
/// Read on every request. The top-level `connection_id` is the same id as `connection.id`, and
/// Envoy answers it straight from the connection, without building the `connection` map first.
fn connection_id() -> u64 {
    property(&["connection_id"])
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(0, u64::from_le_bytes)
}

/// What every capture of the current connection shares: identity, role, addresses; the
/// per-exchange fields are left empty.
fn shared_metadata(node: &NodeIdentity, config: &Config) -> TransactionMetadata {
    TransactionMetadata {
        pod_name: node.pod_name.clone(),
        namespace: node.namespace.clone(),
        workload: node.workload.clone(),
        labels: node.labels.clone(),
        role: read_role(config.role) as i32,
        gateway: config.gateway,
        downstream_remote: metadata::socket_address(property(&["source", "address"]).as_deref()),
        downstream_local: metadata::socket_address(property(&["destination", "address"]).as_deref()),
        ..Default::default()
    }
}

/// The configured role, or the listener's direction when the setting is `auto`.
fn read_role(setting: RoleSetting) -> Role {
    let role = match setting {
        RoleSetting::Auto => metadata::role(
            RoleSetting::Auto,
            metadata::property_i64(property(&["xds", "listener_direction"]).as_deref()),
        ),
        setting => metadata::role(setting, None),
    };
    if role == Role::Unspecified {
        // Still captured; the capture is named "unknown" instead of consumer/producer.
        log(LogLevel::Debug, "packet-inspector: no listener direction; role unspecified");
    }
    role
}

#[derive(Default)]
struct CaptureRoot {
    shared: Option<Rc<RefCell<Shared>>>,
}

impl Context for CaptureRoot {
    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _headers: u32) {
        if let Some(shared) = &self.shared {
            let buffer = header_buffer(MapType::GrpcReceiveInitialMetadata);
            let headers = decode_pairs(&buffer);
            shared.borrow_mut().with_pipeline(|p, h| p.on_stream_headers(h, token, &headers));
        }
    }

    fn on_grpc_stream_message(&mut self, token: u32, size: usize) {
        let Some(shared) = &self.shared else { return };
        match host::buffer(BufferType::GrpcReceiveBuffer, 0, size) {
            Ok(message) => shared.borrow_mut().with_pipeline(|p, h| p.on_stream_message(h, token, &message)),
            Err(status) => log(LogLevel::Warn, &format!("cannot read the aggregator's ack: {status}")),
        }
    }

    fn on_grpc_stream_close(&mut self, token: u32, status: u32) {
        if let Some(shared) = &self.shared {
            shared.borrow_mut().with_pipeline(|p, h| p.on_stream_closed(h, token, status));
        }
    }
}

impl RootContext for CaptureRoot {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = match host::buffer(BufferType::PluginConfiguration, 0, size) {
            Ok(bytes) => bytes,
            Err(status) => {
                log(LogLevel::Error, &format!("packet-inspector: cannot read the plugin configuration: {status}"));
                return false;
            }
        };
        let config = match Config::from_json(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log(LogLevel::Error, &format!("packet-inspector: {err}"));
                return false;
            }
        };
        let counters = Counters::define();
        let node = read_node_identity(&config);
        let flush_interval = Duration::from_millis(u64::from(config.flush_interval_ms));
        let shared = Rc::new(RefCell::new(Shared {
            pipeline: Pipeline::new(&config),
            config,
            node,
            connections: ConnectionCache::new(CONNECTIONS_CACHED),
            counters,
        }));
        shared.borrow_mut().with_pipeline(|p, h| p.on_tick(h));
        self.shared = Some(shared);
        if let Err(status) = proxy_wasm::hostcalls::set_tick_period(flush_interval) {
            log(LogLevel::Error, &format!("packet-inspector: cannot set the flush tick: {status:?}"));
            return false;
        }
        true
    }

    fn on_tick(&mut self) {
        if let Some(shared) = &self.shared {
            let mut shared = shared.borrow_mut();
            shared.with_pipeline(|p, h| p.on_tick(h));
            shared.counters.publish();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // `None` would make the SDK panic; without a configuration (which Envoy does not let
        // happen) traffic still passes.
        Some(match self.shared.clone() {
            Some(shared) => Box::new(CaptureHttp { shared, transaction: None }),
            None => Box::new(PassThrough),
        })
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(match self.shared.clone() {
            Some(shared) => Box::new(CaptureDiameter::new(shared)),
            None => Box::new(PassThrough),
        })
    }

    fn get_type(&self) -> Option<ContextType> {
        let protocol = self.shared.as_ref().map_or(CaptureProtocol::Http, |shared| shared.borrow().config.protocol);
        Some(match protocol {
            CaptureProtocol::Http => ContextType::HttpContext,
            CaptureProtocol::Diameter => ContextType::StreamContext,
        })
    }
}

/// Lets traffic through untouched.
struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}
impl StreamContext for PassThrough {}

fn property(path: &[&str]) -> Option<Vec<u8>> {
    host::property(path).ok().flatten()
}

fn read_node_identity(config: &Config) -> NodeIdentity {
    let text = |key| metadata::property_text(property(&["xds", "node", "metadata", key]).as_deref());
    let labels = property(&["xds", "node", "metadata", "LABELS"])
        .map(|bytes| match pairs::decode(&bytes) {
            Ok(pairs) => metadata::select_labels(&pairs, &config.labels),
            Err(_) => {
                log(LogLevel::Warn, "packet-inspector: node metadata LABELS is not a string map; ignoring it");
                Default::default()
            }
        })
        .unwrap_or_default();
    NodeIdentity { pod_name: text("NAME"), namespace: text("NAMESPACE"), workload: text("WORKLOAD_NAME"), labels }
}

/// The metadata of a Diameter connection's captures.
fn diameter_metadata(shared: &Shared, now: u64) -> TransactionMetadata {
    TransactionMetadata {
        protocol: Protocol::Diameter as i32,
        connection_id: connection_id(),
        start_time_ns: now,
        ..shared_metadata(&shared.node, &shared.config)
    }
}

/// A header map as the host serialized it (pairs); empty when the host refuses.
fn header_buffer(map_type: MapType) -> Vec<u8> {
    host::header_map(map_type).unwrap_or_default()
}

/// The pairs of a header buffer; a malformed one (which Envoy does not produce) reads as none.
fn decode_pairs(buffer: &[u8]) -> Vec<Pair<'_>> {
    pairs::decode(buffer).unwrap_or_default()
}

struct CaptureHttp {
    shared: Rc<RefCell<Shared>>,
    /// `None` when this exchange is not captured (no stream) or its capture was abandoned.
    transaction: Option<HttpTransaction>,
}

impl CaptureHttp {
    /// The live transaction, unless there is none or it was abandoned.
    fn live(transaction: &mut Option<HttpTransaction>) -> Option<&mut HttpTransaction> {
        transaction.as_mut().filter(|t| t.fate != Fate::Abandoned)
    }

    fn begin(&mut self, request_headers: &[Pair<'_>], end_of_stream: bool) {
        let mut shared = self.shared.borrow_mut();
        let Some(id) = shared.with_pipeline(|p, h| p.begin(h)) else { return };
        let now_ns = now_ns();
        let (connection_id, connection) = shared.connection();
        let max_body_bytes = shared.config.max_body_bytes;
        let start =
            ExchangeStart { id, now_ns, connection_id, connection: &connection, request_headers, end_of_stream };
        self.transaction = Some(shared.with_pipeline(|p, h| HttpTransaction::open(p, h, max_body_bytes, start)));
    }

    fn body(&mut self, direction: Direction, buffer: BufferType, size: usize, end_of_stream: bool) {
        let Some(transaction) = Self::live(&mut self.transaction) else { return };
        let budget = transaction.body_budget(direction, size);
        let data = if budget > 0 { host::buffer(buffer, 0, budget).unwrap_or_default() } else { Vec::new() };
        let data = data.as_slice();
        if let Some(frame) = transaction.body(now_ns(), direction, BodyBytes::whole(&data), size, end_of_stream) {
            transaction.fate = self.shared.borrow_mut().record(transaction.fate, &frame);
        }
    }

    fn headers(&mut self, direction: Direction, map_type: MapType, end_of_stream: bool) {
        let Some(transaction) = Self::live(&mut self.transaction) else { return };
        let buffer = header_buffer(map_type);
        let pairs = decode_pairs(&buffer);
        let frame = transaction.headers(now_ns(), direction, &pairs, end_of_stream);
        transaction.fate = self.shared.borrow_mut().record(transaction.fate, &frame);
    }

    fn trailers(&mut self, direction: Direction, map_type: MapType) {
        let Some(transaction) = Self::live(&mut self.transaction) else { return };
        let buffer = header_buffer(map_type);
        let pairs = decode_pairs(&buffer);
        let frame = transaction.trailers(now_ns(), direction, &pairs);
        transaction.fate = self.shared.borrow_mut().record(transaction.fate, &frame);
    }
}

impl Context for CaptureHttp {}

impl HttpContext for CaptureHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        let buffer = header_buffer(MapType::HttpRequestHeaders);
        self.begin(&decode_pairs(&buffer), end_of_stream);
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Request, BufferType::HttpRequestBody, size, end_of_stream);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.trailers(Direction::Request, MapType::HttpRequestTrailers);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.headers(Direction::Response, MapType::HttpResponseHeaders, end_of_stream);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Response, BufferType::HttpResponseBody, size, end_of_stream);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.trailers(Direction::Response, MapType::HttpResponseTrailers);
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(transaction) = Self::live(&mut self.transaction) else { return };
        // `upstream.address` is only known from the log phase on.
        let upstream = metadata::socket_address(property(&["upstream", "address"]).as_deref());
        // An exchange that ended normally ended with its last frame; only a reset or an abort
        // ends here.
        let ended_ns = transaction.completed_at_ns().unwrap_or_else(now_ns);
        let frame = transaction.end(ended_ns, upstream);
        self.shared.borrow_mut().record(transaction.fate, &frame);
        self.transaction = None;
    }
}

/// Frames the Diameter messages of one TCP connection, each direction on its own.
struct CaptureDiameter {
    shared: Rc<RefCell<Shared>>,
    /// `None` until the connection is known to be captured.
    metadata: Option<TransactionMetadata>,
    framers: [Framer; 2],
}

impl CaptureDiameter {
    fn new(shared: Rc<RefCell<Shared>>) -> Self {
        let max = shared.borrow().config.max_diameter_message_bytes;
        Self { shared, metadata: None, framers: [Framer::new(max), Framer::new(max)] }
    }

    fn data(&mut self, direction: Direction, buffer: BufferType, size: usize, end_of_stream: bool) {
        let Some(metadata) = &self.metadata else { return };
        let framer = match direction {
            Direction::Response => &mut self.framers[1],
            _ => &mut self.framers[0],
        };
        if framer.is_broken() {
            return;
        }
        let events =
            if size > 0 { framer.push(&host::buffer(buffer, 0, size).unwrap_or_default()) } else { Vec::new() };
        let truncated = end_of_stream && framer.finish() > 0;
        let mut shared = self.shared.borrow_mut();
        let now = now_ns();
        shared.with_pipeline(|pipeline, host| {
            for event in events {
                match event {
                    Event::Message(message) => {
                        host.count(Counter::DiameterMessages, 1);
                        let Some(header) = diameter::header(&message) else { continue };
                        let Some(id) = pipeline.begin(host) else { continue };
                        let frame = Frame {
                            transaction_id: id,
                            timestamp_ns: now,
                            kind: Some(Kind::Diameter(DiameterMessage {
                                metadata: Some(metadata.clone()),
                                direction: direction as i32,
                                message,
                                command_code: header.command_code,
                                application_id: header.application_id,
                                request: header.request,
                                hop_by_hop_id: header.hop_by_hop_id,
                                end_to_end_id: header.end_to_end_id,
                            })),
                        };
                        pipeline.record(host, Fate::Recording, &FrameRef::Message(frame));
                    }
                    Event::Oversized { length } => {
                        host.count(Counter::DiameterOversized, 1);
                        log(LogLevel::Debug, &format!("packet-inspector: Diameter message of {length} bytes not captured (maxDiameterMessageBytes)"));
                    }
                    Event::Broken(error) => {
                        host.count(Counter::DiameterFramingErrors, 1);
                        let message = format!("packet-inspector: not Diameter any more ({error}); capture stops for this connection direction");
                        pipeline.warn(host, &message);
                    }
                }
            }
            if truncated {
                host.count(Counter::DiameterTruncated, 1);
            }
        });
    }
}

impl Context for CaptureDiameter {}

impl StreamContext for CaptureDiameter {
    fn on_new_connection(&mut self) -> Action {
        let shared = self.shared.borrow();
        let port = shared.config.diameter_port;
        let local_port = metadata::property_i64(property(&["destination", "port"]).as_deref());
        if port == 0 || local_port == Some(i64::from(port)) {
            self.metadata = Some(diameter_metadata(&shared, now_ns()));
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.data(Direction::Request, BufferType::DownstreamData, size, end_of_stream);
        Action::Continue
    }

    fn on_upstream_data(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.data(Direction::Response, BufferType::UpstreamData, size, end_of_stream);
        Action::Continue
    }
}
