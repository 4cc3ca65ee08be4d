//! The read floor of a *native* capture: a measurement build, not a filter anyone deploys.
//!
//! The capture filter is a proxy-wasm module, and the bench shows that most of what it costs
//! Envoy is the crossing into and out of the VM: every host call that returns data makes Envoy
//! call back into the module for the result's memory. Envoy 1.40 also loads native shared
//! libraries as HTTP filters (`envoy.filters.http.dynamic_modules`), whose hooks and host calls
//! are plain C calls. This library makes, through that ABI, the same reads the capture filter
//! makes through proxy-wasm for every exchange, and copies what it reads into a per-thread
//! buffer of a batch's size, as encoding into a batch would:
//! - the request headers and the connection id (attribute `connection.id`), on request headers;
//! - request and response body chunks and trailers, as they pass;
//! - the response headers;
//! - the upstream address (attribute `upstream.address`), when the stream completes;
//! - the time, once per event, as capture stamps its frames.
//!
//! It never sends the buffer anywhere: what it measures is what any native capture must pay to
//! Envoy before encoding and sending. It is the counterpart of the Wasm read floor (`filter`'s
//! `read-floor` feature) with the two per-request attributes capture adds to that floor.
//! `cargo xtask bench` loads it as the proxy variant `native-floor`.
//!
//! The ABI is Envoy's (`source/extensions/dynamic_modules/abi/abi.h`), pre-1.0 and tied to the
//! Envoy release. The declarations here follow Envoy 1.40.0 (ABI v0.2.0) and were checked
//! against it: the header and body-chunk counts are returned (not written through a pointer), a
//! string attribute is written into a buffer struct, and the attribute ids below read the
//! connection id and `127.0.0.1:<port>` of the upstream. Envoy refuses to load the library,
//! naming the hook, if one it requires is missing.

use std::{
    cell::RefCell,
    ffi::{c_char, c_void},
    ptr::null,
    time::SystemTime,
};

/// A buffer owned by Envoy, valid until the hook that received it returns.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

impl EnvoyBuffer {
    const EMPTY: Self = Self { ptr: null(), length: 0 };

    /// # Safety
    /// `ptr` must point to `length` readable bytes for the returned slice's lifetime.
    unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: the caller's contract.
            unsafe { std::slice::from_raw_parts(self.ptr, self.length) }
        }
    }
}

/// A header owned by Envoy's header map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

type FilterEnvoyPtr = *mut c_void;
type FilterModulePtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
const REQUEST_HEADERS: u32 = 0;
const REQUEST_TRAILERS: u32 = 1;
const RESPONSE_HEADERS: u32 = 2;
const RESPONSE_TRAILERS: u32 = 3;
/// `envoy_dynamic_module_type_http_body_type`: the chunk of the current event.
const RECEIVED_REQUEST_BODY: u32 = 0;
const RECEIVED_RESPONSE_BODY: u32 = 2;
/// `envoy_dynamic_module_type_attribute_id`.
const ATTRIBUTE_CONNECTION_ID: u32 = 28;
const ATTRIBUTE_UPSTREAM_ADDRESS: u32 = 41;
/// The `Continue` of every `on_http_filter_*` status enum.
const CONTINUE: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: FilterEnvoyPtr, header_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(filter: FilterEnvoyPtr, body_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterEnvoyPtr,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: FilterEnvoyPtr,
        attribute: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
}

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

/// Reads and keeps one header map (or trailers).
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
unsafe fn read_headers(filter: FilterEnvoyPtr, header_type: u32) {
    // SAFETY: the filter pointer of the current hook.
    let count = unsafe { envoy_dynamic_module_callback_http_get_headers_size(filter, header_type) };
    if count == 0 {
        return;
    }
    let mut headers = vec![EnvoyHeader { key: EnvoyBuffer::EMPTY, value: EnvoyBuffer::EMPTY }; count];
    // SAFETY: room for the `count` headers Envoy just reported.
    if unsafe { envoy_dynamic_module_callback_http_get_headers(filter, header_type, headers.as_mut_ptr()) } {
        for header in &headers {
            // SAFETY: Envoy's header map, unchanged until this hook returns.
            unsafe {
                keep(header.key.bytes());
                keep(header.value.bytes());
            }
        }
    }
}

/// Reads and keeps the body chunks of the current event.
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
unsafe fn read_body(filter: FilterEnvoyPtr, body_type: u32) {
    // SAFETY: the filter pointer of the current hook.
    let count = unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body_type) };
    if count == 0 {
        return;
    }
    let mut chunks = vec![EnvoyBuffer::EMPTY; count];
    // SAFETY: room for the `count` chunks Envoy just reported.
    if unsafe { envoy_dynamic_module_callback_http_get_body_chunks(filter, body_type, chunks.as_mut_ptr()) } {
        for chunk in &chunks {
            // SAFETY: Envoy's buffer, unchanged until this hook returns.
            keep(unsafe { chunk.bytes() });
        }
    }
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
    c"v0.2.0".as_ptr()
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
    unsafe { read_headers(filter, REQUEST_HEADERS) };
    let mut id = 0;
    // SAFETY: the current hook's filter pointer and a live local.
    if unsafe { envoy_dynamic_module_callback_http_filter_get_attribute_int(filter, ATTRIBUTE_CONNECTION_ID, &mut id) }
    {
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
    unsafe { read_body(filter, RECEIVED_REQUEST_BODY) };
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
    unsafe { read_headers(filter, REQUEST_TRAILERS) };
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
    unsafe { read_headers(filter, RESPONSE_HEADERS) };
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
    unsafe { read_body(filter, RECEIVED_RESPONSE_BODY) };
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
    unsafe { read_headers(filter, RESPONSE_TRAILERS) };
    CONTINUE
}

/// # Safety
/// Called by Envoy with its filter pointer and the pointer `on_http_filter_new` returned.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: FilterEnvoyPtr,
    exchange: FilterModulePtr,
) {
    let mut upstream = EnvoyBuffer::EMPTY;
    // SAFETY: the current hook's filter pointer and a live local.
    if unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_string(
            filter,
            ATTRIBUTE_UPSTREAM_ADDRESS,
            &mut upstream,
        )
    } {
        // SAFETY: Envoy's string, valid until this hook returns.
        keep(unsafe { upstream.bytes() });
    }
    // SAFETY: our `Exchange`, alive until `on_http_filter_destroy`.
    if let Some(exchange) = unsafe { exchange.cast::<Exchange>().as_ref() } {
        keep(&exchange.connection_id.to_le_bytes());
    }
    stamp();
}

// Hooks Envoy 1.40 requires of every HTTP filter module, for features this library does not use
// (it starts no callouts, streams or scheduled events, and reacts to no watermark). Envoy passes
// more arguments to some of them; C callees may leave trailing arguments unread.

/// Exports each named hook as one that does nothing.
macro_rules! unused_hooks {
    ($($hook:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $hook(_: FilterEnvoyPtr, _: FilterModulePtr) {}
        )*
    };
}

unused_hooks!(
    envoy_dynamic_module_on_http_filter_http_callout_done,
    envoy_dynamic_module_on_http_filter_http_stream_headers,
    envoy_dynamic_module_on_http_filter_http_stream_data,
    envoy_dynamic_module_on_http_filter_http_stream_trailers,
    envoy_dynamic_module_on_http_filter_http_stream_complete,
    envoy_dynamic_module_on_http_filter_http_stream_reset,
    envoy_dynamic_module_on_http_filter_scheduled,
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark,
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark,
);
