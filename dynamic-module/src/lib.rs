//! Envoy's dynamic-module ABI, as far as Packet Inspector's native libraries use it.
//!
//! Envoy 1.40 loads native shared libraries as HTTP filters (`envoy.filters.http.dynamic_modules`):
//! Envoy calls the library's exported hooks (`envoy_dynamic_module_on_*`) and the library calls
//! back into Envoy (`envoy_dynamic_module_callback_*`), both plain C calls. The ABI is
//! Envoy's (`source/extensions/dynamic_modules/abi/abi.h`), pre-1.0 and tied to the Envoy
//! release: the declarations here follow Envoy 1.40.0 (ABI v0.2.0), and the end-to-end tests load
//! both libraries into that Envoy and check what each call returns (header and body-chunk
//! counts returned, strings written into a buffer struct, the attribute ids below naming the
//! connection id, the addresses and the protocol, the counters showing in Envoy's stats).
//!
//! The callbacks resolve against the Envoy binary when it loads the library; nothing here may be
//! called outside Envoy. Every wrapper takes the filter pointer of the hook being run, which is
//! what makes the borrowed results valid: Envoy's buffers live until that hook returns.

use std::{
    ffi::{c_char, c_void},
    ptr::null,
};

/// The ABI version the declarations follow; Envoy logs whether the library's matches its own.
pub const ABI_VERSION: &std::ffi::CStr = c"v0.2.0";

/// A buffer owned by Envoy, valid until the hook that received it returns.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

impl EnvoyBuffer {
    pub const EMPTY: Self = Self { ptr: null(), length: 0 };

    /// A buffer over bytes the library owns, to hand to Envoy for the length of one call.
    pub fn of(bytes: &[u8]) -> Self {
        Self { ptr: bytes.as_ptr(), length: bytes.len() }
    }

    /// # Safety
    /// `ptr` must point to `length` readable bytes for the returned slice's lifetime.
    pub unsafe fn bytes<'a>(self) -> &'a [u8] {
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
#[derive(Clone, Copy, Debug)]
pub struct EnvoyHeader {
    key: EnvoyBuffer,
    value: EnvoyBuffer,
}

/// Envoy's object for one HTTP stream's filter; valid during the hooks of that stream.
pub type FilterEnvoyPtr = *mut c_void;
/// The library's object for one HTTP stream's filter (what `on_http_filter_new` returned).
pub type FilterModulePtr = *mut c_void;
/// Envoy's object for one filter configuration; valid until `on_http_filter_config_destroy`.
pub type ConfigEnvoyPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_header_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum HeaderMap {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

/// `envoy_dynamic_module_type_http_body_type`: the chunks of the current body event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Body {
    ReceivedRequest = 0,
    ReceivedResponse = 2,
}

/// `envoy_dynamic_module_type_attribute_id` (the CEL attribute names in the comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Attribute {
    /// `request.protocol`: `HTTP/1.1`, `HTTP/2`, ...
    RequestProtocol = 10,
    /// `source.address`: the downstream peer, `ip:port`.
    SourceAddress = 24,
    /// `destination.address`: the downstream connection's local address, `ip:port`.
    DestinationAddress = 26,
    /// `connection.id`.
    ConnectionId = 28,
    /// `upstream.address`: the upstream host, `ip:port`, once one was picked.
    UpstreamAddress = 41,
    /// `xds.listener_direction`: the listener's `traffic_direction` (1 inbound, 2 outbound).
    XdsListenerDirection = 59,
}

/// The `Continue` of every `on_http_filter_*` status enum.
pub const CONTINUE: u32 = 0;

/// `envoy_dynamic_module_type_log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LogLevel {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

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
    fn envoy_dynamic_module_callback_http_filter_get_worker_index(filter: FilterEnvoyPtr) -> u32;
    fn envoy_dynamic_module_callback_get_concurrency() -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: EnvoyBuffer,
        label_names: *const EnvoyBuffer,
        label_names_length: usize,
        id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *const EnvoyBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *const EnvoyBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_log(level: u32, message: EnvoyBuffer);
}

/// The number of headers in a map (0 when the map does not exist yet).
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
pub unsafe fn header_count(filter: FilterEnvoyPtr, map: HeaderMap) -> usize {
    // SAFETY: the caller's contract.
    unsafe { envoy_dynamic_module_callback_http_get_headers_size(filter, map as u32) }
}

/// The headers of a map, in Envoy's order, written over `into` (reused between calls).
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook, and the headers must not
/// be read after it returns.
pub unsafe fn headers(filter: FilterEnvoyPtr, map: HeaderMap, into: &mut Vec<EnvoyHeader>) {
    into.clear();
    // SAFETY: the caller's contract.
    let count = unsafe { header_count(filter, map) };
    if count == 0 {
        return;
    }
    into.resize(count, EnvoyHeader { key: EnvoyBuffer::EMPTY, value: EnvoyBuffer::EMPTY });
    // SAFETY: room for the `count` headers Envoy just reported.
    if !unsafe { envoy_dynamic_module_callback_http_get_headers(filter, map as u32, into.as_mut_ptr()) } {
        into.clear();
    }
}

impl EnvoyHeader {
    /// # Safety
    /// Only during the hook that read the header.
    pub unsafe fn pair<'a>(&self) -> (&'a [u8], &'a [u8]) {
        // SAFETY: the caller's contract.
        unsafe { (self.key.bytes(), self.value.bytes()) }
    }
}

/// The chunks of the current body event, written over `into` (reused between calls).
///
/// # Safety
/// As [`headers`].
pub unsafe fn body_chunks(filter: FilterEnvoyPtr, body: Body, into: &mut Vec<EnvoyBuffer>) {
    into.clear();
    // SAFETY: the caller's contract.
    let count = unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(filter, body as u32) };
    if count == 0 {
        return;
    }
    into.resize(count, EnvoyBuffer::EMPTY);
    // SAFETY: room for the `count` chunks Envoy just reported.
    if !unsafe { envoy_dynamic_module_callback_http_get_body_chunks(filter, body as u32, into.as_mut_ptr()) } {
        into.clear();
    }
}

/// An integer attribute; `None` when Envoy does not have it.
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
pub unsafe fn attribute_int(filter: FilterEnvoyPtr, attribute: Attribute) -> Option<u64> {
    let mut value = 0;
    // SAFETY: the caller's contract and a live local.
    unsafe { envoy_dynamic_module_callback_http_filter_get_attribute_int(filter, attribute as u32, &mut value) }
        .then_some(value)
}

/// A string attribute; `None` when Envoy does not have it.
///
/// # Safety
/// As [`headers`].
pub unsafe fn attribute_string<'a>(filter: FilterEnvoyPtr, attribute: Attribute) -> Option<&'a [u8]> {
    let mut value = EnvoyBuffer::EMPTY;
    // SAFETY: the caller's contract and a live local; Envoy's string outlives the hook.
    unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_string(filter, attribute as u32, &mut value)
            .then(|| value.bytes())
    }
}

/// Which of Envoy's worker threads runs the filter: `0..concurrency`.
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
pub unsafe fn worker_index(filter: FilterEnvoyPtr) -> u32 {
    // SAFETY: the caller's contract.
    unsafe { envoy_dynamic_module_callback_http_filter_get_worker_index(filter) }
}

/// Envoy's worker thread count (`--concurrency`).
///
/// # Safety
/// Only on Envoy's main thread (as in `on_http_filter_config_new`).
pub unsafe fn concurrency() -> u32 {
    // SAFETY: the caller's contract.
    unsafe { envoy_dynamic_module_callback_get_concurrency() }
}

/// Defines a counter of the filter configuration; `None` if Envoy refuses.
///
/// # Safety
/// `config` must be the configuration pointer of the running `on_http_filter_config_new`.
pub unsafe fn define_counter(config: ConfigEnvoyPtr, name: &str) -> Option<usize> {
    let mut id = 0;
    // SAFETY: the caller's contract; the name outlives the call; no labels.
    let result = unsafe {
        envoy_dynamic_module_callback_http_filter_config_define_counter(
            config,
            EnvoyBuffer::of(name.as_bytes()),
            null(),
            0,
            &mut id,
        )
    };
    (result == METRICS_SUCCESS).then_some(id)
}

/// Adds to a counter defined by the configuration the filter was created from.
///
/// # Safety
/// `filter` must be the filter pointer Envoy passed to the current hook.
pub unsafe fn increment_counter(filter: FilterEnvoyPtr, id: usize, value: u64) -> bool {
    // SAFETY: the caller's contract; no labels.
    let result = unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(filter, id, null(), 0, value) };
    result == METRICS_SUCCESS
}

/// Adds to a counter of a filter configuration, from any thread (Envoy's counters are atomic).
///
/// # Safety
/// `config` must be a configuration pointer Envoy has not destroyed yet.
pub unsafe fn config_increment_counter(config: ConfigEnvoyPtr, id: usize, value: u64) -> bool {
    // SAFETY: the caller's contract; no labels.
    let result =
        unsafe { envoy_dynamic_module_callback_http_filter_config_increment_counter(config, id, null(), 0, value) };
    result == METRICS_SUCCESS
}

/// Logs through Envoy's `dynamic_modules` logger (from any thread).
pub fn log(level: LogLevel, message: &str) {
    // SAFETY: the message outlives the call.
    unsafe { envoy_dynamic_module_callback_log(level as u32, EnvoyBuffer::of(message.as_bytes())) }
}

/// `envoy_dynamic_module_on_program_init`'s answer: the ABI version, as Envoy expects it.
pub fn abi_version() -> *const c_char {
    ABI_VERSION.as_ptr()
}

/// Exports each named hook as one that does nothing: the hooks Envoy 1.40 requires of every HTTP
/// filter module for features a library does not use (callouts, streams it never starts,
/// scheduled events, watermarks). Envoy passes more arguments to some of them; C callees may
/// leave trailing arguments unread.
#[macro_export]
macro_rules! unused_hooks {
    ($($hook:ident),* $(,)?) => {
        $(
            #[no_mangle]
            pub extern "C" fn $hook(_: $crate::FilterEnvoyPtr, _: $crate::FilterModulePtr) {}
        )*
    };
}

/// The hooks no Packet Inspector library uses, exported empty (see [`unused_hooks`]).
#[macro_export]
macro_rules! export_unused_hooks {
    () => {
        $crate::unused_hooks!(
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
    };
}
