//! The read floor of the native capture: a measurement build, not a filter anyone deploys.
//!
//! The bench shows that most of what the proxy-wasm capture filter costs Envoy is the crossing
//! into and out of the VM: every host call that returns data makes Envoy call back into the
//! module for the result's memory. The native capture (`native-capture/`) makes the same reads
//! through Envoy's dynamic-module ABI, plain C calls. This library makes those reads for every
//! exchange, and copies what it reads into a per-thread
//! buffer of a batch's size, as encoding into a batch would:
//! - the request headers and the connection id (attribute `connection.id`), on request headers;
//! - request and response body chunks and trailers, as they pass;
//! - the response headers;
//! - the upstream address (attribute `upstream.address`), when the stream completes;
//! - the time, once per event, as capture stamps its frames.
//!
//! It never sends the buffer anywhere: what it measures is what the native capture must pay
//! Envoy before encoding and sending. It is the counterpart of the Wasm read floor (`filter`'s
//! `read-floor` feature) with the two per-request attributes capture adds to that floor.
//! `cargo xtask bench` loads it as the proxy variant `native-floor`, beside `native-capture`.
//!
//! The ABI bindings are `dynamic-module/`'s, shared with the native capture. Envoy refuses to
//! load the library, naming the hook, if one it requires is missing.

use std::{cell::RefCell, ffi::c_char, ffi::c_void, time::SystemTime};

use packet_inspector_dynamic_module::{
    self as abi, Attribute, Body, EnvoyBuffer, EnvoyHeader, FilterEnvoyPtr, FilterModulePtr, HeaderMap, CONTINUE,
};

/// What the capture filter batches before a send (`maxBatchBytes`' default).
const BATCH_BYTES: usize = 64 * 1024;

thread_local! {
    /// Stands for the batch a capture encodes into: filled with what was read, emptied when
    /// full. One per Envoy worker, as capture keeps one per root context.
    static BATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(2 * BATCH_BYTES));
}

fn keep(bytes: &[u8]) {
    BATCH.with_borrow_mut(|batch| {
        if batch.len() + bytes.len() > BATCH_BYTES {
            batch.clear();
        }
        batch.extend_from_slice(bytes);
    });
}

fn stamp() {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    keep(&now.to_le_bytes());
}

thread_local! {
    /// The header and chunk lists of the current event, reused.
    static HEADERS: RefCell<Vec<EnvoyHeader>> = const { RefCell::new(Vec::new()) };
    static CHUNKS: RefCell<Vec<EnvoyBuffer>> = const { RefCell::new(Vec::new()) };
}

/// Reads and keeps one header map (or trailers).
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
unsafe fn read_headers(filter: FilterEnvoyPtr, map: HeaderMap) {
    HEADERS.with_borrow_mut(|headers| {
        // SAFETY: the current hook's filter pointer; the headers are read before it returns.
        unsafe {
            abi::headers(filter, map, headers);
            for header in headers.iter() {
                let (key, value) = header.pair();
                keep(key);
                keep(value);
            }
        }
    });
}

/// Reads and keeps the body chunks of the current event.
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
unsafe fn read_body(filter: FilterEnvoyPtr, body: Body) {
    CHUNKS.with_borrow_mut(|chunks| {
        // SAFETY: the current hook's filter pointer; the chunks are read before it returns.
        unsafe {
            abi::body_chunks(filter, body, chunks);
            for chunk in chunks.iter() {
                keep(chunk.bytes());
            }
        }
    });
}

/// Per exchange: what capture would keep to tie its frames together.
struct Exchange {
    connection_id: u64,
}

/// The ABI version this library was written against: Envoy 1.40's, which Envoy logs as
/// matched. Envoy still loads a library that names another version, with a warning; the
/// end-to-end test insists on the match, so a new Envoy makes someone recheck the declarations.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::abi_version()
}

/// The filter configuration: this library has none, so one static address serves every
/// filter chain.
static CONFIG: u8 = 0;

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: *mut c_void,
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    std::ptr::from_ref(&CONFIG).cast()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(_config: *const c_void) {}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    _config: *const c_void,
    _filter: FilterEnvoyPtr,
) -> FilterModulePtr {
    Box::into_raw(Box::new(Exchange { connection_id: 0 })).cast()
}

/// # Safety
/// `exchange` must come from [`envoy_dynamic_module_on_http_filter_new`], destroyed once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(exchange: FilterModulePtr) {
    if !exchange.is_null() {
        // SAFETY: allocated by `on_http_filter_new`, and Envoy destroys each filter once.
        drop(unsafe { Box::from_raw(exchange.cast::<Exchange>()) });
    }
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: FilterEnvoyPtr,
    exchange: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_headers(filter, HeaderMap::RequestHeaders) };
    // SAFETY: the current hook's filter pointer.
    if let Some(id) = unsafe { abi::attribute_int(filter, Attribute::ConnectionId) } {
        // SAFETY: our `Exchange`, alive until `on_http_filter_destroy`.
        if let Some(exchange) = unsafe { exchange.cast::<Exchange>().as_mut() } {
            exchange.connection_id = id;
        }
    }
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter: FilterEnvoyPtr,
    _exchange: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_body(filter, Body::ReceivedRequest) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter: FilterEnvoyPtr,
    _exchange: FilterModulePtr,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_headers(filter, HeaderMap::RequestTrailers) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: FilterEnvoyPtr,
    _exchange: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_headers(filter, HeaderMap::ResponseHeaders) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter: FilterEnvoyPtr,
    _exchange: FilterModulePtr,
    _end_of_stream: bool,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_body(filter, Body::ReceivedResponse) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    filter: FilterEnvoyPtr,
    _exchange: FilterModulePtr,
) -> u32 {
    stamp();
    // SAFETY: the current hook's filter pointer.
    unsafe { read_headers(filter, HeaderMap::ResponseTrailers) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: FilterEnvoyPtr,
    exchange: FilterModulePtr,
) {
    // SAFETY: the current hook's filter pointer; the string is kept before it returns.
    if let Some(upstream) = unsafe { abi::attribute_string(filter, Attribute::UpstreamAddress) } {
        keep(upstream);
    }
    // SAFETY: our `Exchange`, alive until `on_http_filter_destroy`.
    if let Some(exchange) = unsafe { exchange.cast::<Exchange>().as_ref() } {
        keep(&exchange.connection_id.to_le_bytes());
    }
    stamp();
}

abi::export_unused_hooks!();
