//! The proxy-wasm contexts: the thin edge between Envoy and the host-free pipeline.
//!
//! One [`CaptureRoot`] per VM (each worker thread and the main thread) owns the config, the
//! node identity and the [`Pipeline`] (with its gRPC stream); every [`CaptureHttp`] context of
//! that VM shares them through `Rc<RefCell<_>>` and records its exchange as it passes. Every
//! callback returns `Continue`: capture never holds traffic.

use std::{cell::RefCell, rc::Rc, time::Duration};

use packet_inspector_proto::capture::{Direction, Frame, Header, Role, TransactionMetadata};
use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::{Action, BufferType, ContextType, LogLevel, MapType},
};

use crate::{
    config::Config,
    host,
    metadata::{self, NodeIdentity},
    pairs,
    pipeline::{Counter, Fate, Host, Pipeline, METHOD, SERVICE},
    transaction::HttpTransaction,
};

proxy_wasm::main! {{
    // Also installs a panic hook that logs through Envoy (a panic would still fail the request).
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(CaptureRoot::default()));
}}

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}

/// [`Host`] over the proxy-wasm ABI.
struct EnvoyHost<'a> {
    counters: &'a [Option<u32>; Counter::ALL.len()],
}

impl Host for EnvoyHost<'_> {
    fn now_ns(&self) -> u64 {
        now_ns()
    }
    fn open_stream(&mut self, cluster: &str) -> Result<u32, String> {
        host::open_grpc_stream(cluster, SERVICE, METHOD).map_err(|status| status.to_string())
    }
    fn send(&mut self, token: u32, message: &[u8]) -> Result<(), String> {
        host::grpc_send(token, message).map_err(|status| status.to_string())
    }
    fn cancel(&mut self, token: u32) {
        let _ = host::grpc_cancel(token);
    }
    fn count(&mut self, counter: Counter, delta: u64) {
        let index = Counter::ALL.iter().position(|c| *c == counter);
        if let Some(Some(id)) = index.and_then(|i| self.counters.get(i)) {
            let _ = host::increment(*id, i64::try_from(delta).unwrap_or(i64::MAX));
        }
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
    counters: [Option<u32>; Counter::ALL.len()],
}

impl Shared {
    /// Runs `f` on the pipeline with the host.
    fn with_pipeline<R>(&mut self, f: impl FnOnce(&mut Pipeline, &mut EnvoyHost<'_>) -> R) -> R {
        let mut host = EnvoyHost { counters: &self.counters };
        f(&mut self.pipeline, &mut host)
    }
}

#[derive(Default)]
struct CaptureRoot {
    shared: Option<Rc<RefCell<Shared>>>,
}

impl Context for CaptureRoot {
    fn on_grpc_stream_initial_metadata(&mut self, token: u32, _headers: u32) {
        if let Some(shared) = &self.shared {
            shared.borrow_mut().with_pipeline(|p, h| p.on_stream_ready(h, token));
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
        let counters = Counter::ALL.map(|counter| host::define_counter(counter.name()).ok());
        let node = read_node_identity(&config);
        let flush_interval = Duration::from_millis(u64::from(config.flush_interval_ms));
        let shared = Rc::new(RefCell::new(Shared { pipeline: Pipeline::new(&config), config, node, counters }));
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
            shared.borrow_mut().with_pipeline(|p, h| p.on_tick(h));
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(CaptureHttp { shared, transaction: None }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

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

fn headers(map_type: MapType) -> Vec<Header> {
    let Ok(bytes) = host::header_map(map_type) else { return Vec::new() };
    match pairs::decode(&bytes) {
        Ok(pairs) => {
            pairs.into_iter().map(|(name, value)| Header { name: name.to_vec(), value: value.to_vec() }).collect()
        }
        Err(_) => Vec::new(),
    }
}

struct CaptureHttp {
    shared: Rc<RefCell<Shared>>,
    transaction: Option<HttpTransaction>,
}

impl CaptureHttp {
    /// Builds a frame with the live transaction and records it; no-op when not capturing.
    fn record(&mut self, build: impl FnOnce(&mut HttpTransaction, u64) -> Option<Frame>) {
        let Some(transaction) = self.transaction.as_mut() else { return };
        if transaction.fate == Fate::Abandoned {
            return;
        }
        let Some(frame) = build(transaction, now_ns()) else { return };
        let fate = transaction.fate;
        transaction.fate = self.shared.borrow_mut().with_pipeline(|p, h| p.record(h, fate, frame));
    }

    fn begin(&mut self, request_headers: Vec<Header>, end_of_stream: bool) {
        let mut shared = self.shared.borrow_mut();
        let Some(id) = shared.with_pipeline(|p, h| p.begin(h)) else { return };
        let now = now_ns();
        let role = match shared.config.role {
            crate::config::RoleSetting::Auto => metadata::role(
                shared.config.role,
                metadata::property_i64(property(&["xds", "listener_direction"]).as_deref()),
            ),
            setting => metadata::role(setting, None),
        };
        let node = &shared.node;
        let meta = TransactionMetadata {
            pod_name: node.pod_name.clone(),
            namespace: node.namespace.clone(),
            workload: node.workload.clone(),
            node: String::new(),
            labels: node.labels.clone(),
            role: role as i32,
            gateway: shared.config.gateway,
            protocol: metadata::protocol(property(&["request", "protocol"]).as_deref(), &request_headers) as i32,
            downstream_remote: metadata::socket_address(property(&["source", "address"]).as_deref()),
            downstream_local: metadata::socket_address(property(&["destination", "address"]).as_deref()),
            upstream: None,
            request_id: metadata::header_value(&request_headers, b"x-request-id")
                .and_then(|v| std::str::from_utf8(v).ok())
                .unwrap_or_default()
                .to_owned(),
            connection_id: property(&["connection", "id"])
                .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
                .map_or(0, u64::from_le_bytes),
            start_time_ns: now,
        };
        if role == Role::Unspecified && shared.config.role == crate::config::RoleSetting::Auto {
            // Still captured; the capture is named "unknown" instead of consumer/producer.
            log(LogLevel::Debug, "packet-inspector: no listener direction; role unspecified");
        }
        let max_body = shared.config.max_body_bytes;
        drop(shared);
        let mut transaction = HttpTransaction::new(id, max_body);
        let start = transaction.start(now, meta);
        let headers = transaction.headers(now, Direction::Request, request_headers, end_of_stream);
        self.transaction = Some(transaction);
        self.record(|_, _| Some(start));
        self.record(|_, _| Some(headers));
    }

    fn body(&mut self, direction: Direction, buffer: BufferType, size: usize, end_of_stream: bool) {
        self.record(|txn, now| {
            let budget = txn.body_budget(direction, size);
            let data = if budget > 0 { host::buffer(buffer, 0, budget).unwrap_or_default() } else { Vec::new() };
            txn.body(now, direction, data, size, end_of_stream)
        });
    }
}

impl Context for CaptureHttp {}

impl HttpContext for CaptureHttp {
    fn on_http_request_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.begin(headers(MapType::HttpRequestHeaders), end_of_stream);
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Request, BufferType::HttpRequestBody, size, end_of_stream);
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.record(|txn, now| Some(txn.trailers(now, Direction::Request, headers(MapType::HttpRequestTrailers))));
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, end_of_stream: bool) -> Action {
        self.record(|txn, now| {
            Some(txn.headers(now, Direction::Response, headers(MapType::HttpResponseHeaders), end_of_stream))
        });
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.body(Direction::Response, BufferType::HttpResponseBody, size, end_of_stream);
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _trailers: usize) -> Action {
        self.record(|txn, now| Some(txn.trailers(now, Direction::Response, headers(MapType::HttpResponseTrailers))));
        Action::Continue
    }

    fn on_log(&mut self) {
        // `upstream.address` is only known from the log phase on.
        let upstream = metadata::socket_address(property(&["upstream", "address"]).as_deref());
        self.record(|txn, now| Some(txn.end(now, upstream)));
        self.transaction = None;
    }
}
