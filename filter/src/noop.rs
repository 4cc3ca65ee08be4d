//! The benchmark's floors. Feature `noop`: an HTTP filter that Envoy calls for every header,
//! body and trailer callback, like the capture filter, and that does nothing. Capture cost is
//! measured against it, so what is left is the cost of capturing, not of running Wasm.
//!
//! Feature `read-floor` (implies `noop`): the same, but each callback also fetches what any
//! capture through the proxy-wasm ABI must fetch (the header map, or the body chunk, and the
//! time) and throws it away: the cost of capture that no filter logic can remove.

use proxy_wasm::{
    traits::{Context, HttpContext, RootContext},
    types::{Action, ContextType, LogLevel},
};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| Box::new(NoopRoot));
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop;

impl Context for Noop {}

/// What the read floor fetches in a header callback.
#[cfg(feature = "read-floor")]
fn fetch_headers(map: proxy_wasm::types::MapType) {
    std::hint::black_box((crate::host::header_map(map).ok(), proxy_wasm::hostcalls::get_current_time().ok()));
}

/// What the read floor fetches in a body callback.
#[cfg(feature = "read-floor")]
fn fetch_body(buffer: proxy_wasm::types::BufferType, size: usize) {
    std::hint::black_box((crate::host::buffer(buffer, 0, size).ok(), proxy_wasm::hostcalls::get_current_time().ok()));
}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        #[cfg(feature = "read-floor")]
        fetch_headers(proxy_wasm::types::MapType::HttpRequestHeaders);
        Action::Continue
    }
    fn on_http_request_body(&mut self, _size: usize, _: bool) -> Action {
        #[cfg(feature = "read-floor")]
        fetch_body(proxy_wasm::types::BufferType::HttpRequestBody, _size);
        Action::Continue
    }
    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        #[cfg(feature = "read-floor")]
        fetch_headers(proxy_wasm::types::MapType::HttpResponseHeaders);
        Action::Continue
    }
    fn on_http_response_body(&mut self, _size: usize, _: bool) -> Action {
        #[cfg(feature = "read-floor")]
        fetch_body(proxy_wasm::types::BufferType::HttpResponseBody, _size);
        Action::Continue
    }
}
