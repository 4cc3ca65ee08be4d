//! Raw proxy-wasm ABI calls that return errors instead of panicking.
//!
//! The SDK's wrappers panic on any host status they do not expect and on non-UTF-8 header
//! names; a panic in the VM answers 503 to the request being filtered. These wrappers take
//! the host's status as a plain integer and turn everything but success into an error.

use std::ptr::null_mut;

use proxy_wasm::types::{BufferType, MapType};

/// A non-OK status from the host (proxy-wasm `WasmResult` numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostStatus(pub u32);

impl std::fmt::Display for HostStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            1 => "not found",
            2 => "bad argument",
            3 => "serialization failure",
            4 => "parse failure",
            10 => "internal failure",
            12 => "unimplemented",
            _ => "error",
        };
        write!(f, "host status {} ({name})", self.0)
    }
}

const OK: u32 = 0;
const NOT_FOUND: u32 = 1;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_property(path: *const u8, path_len: usize, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map_type: u32, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_get_buffer_bytes(buffer_type: u32, start: usize, max: usize, data: *mut *mut u8, len: *mut usize) -> u32;
    fn proxy_grpc_send(token: u32, message: *const u8, message_len: usize, end_stream: u32) -> u32;
    fn proxy_grpc_cancel(token: u32) -> u32;
    fn proxy_define_metric(metric_type: u32, name: *const u8, name_len: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, offset: i64) -> u32;
}

/// Takes ownership of a host-allocated buffer (allocated through the SDK's
/// `proxy_on_memory_allocate`, i.e. this module's allocator).
fn owned(data: *mut u8, len: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        None
    } else {
        // SAFETY: the host wrote `len` bytes into memory it obtained from our allocator for
        // exactly `len` bytes, and hands ownership to us.
        Some(unsafe { Vec::from_raw_parts(data, len, len) })
    }
}

fn check(status: u32) -> Result<(), HostStatus> {
    if status == OK {
        Ok(())
    } else {
        Err(HostStatus(status))
    }
}

/// A property by path (e.g. `["xds", "node", "metadata", "NAME"]`); `Ok(None)` when absent.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostStatus> {
    let mut serialized = Vec::with_capacity(path.iter().map(|p| p.len() + 1).sum());
    for part in path {
        serialized.extend_from_slice(part.as_bytes());
        serialized.push(0);
    }
    serialized.pop();
    let (mut data, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals and a live buffer of the stated length.
    let status = unsafe { proxy_get_property(serialized.as_ptr(), serialized.len(), &mut data, &mut len) };
    match status {
        OK => Ok(owned(data, len)),
        NOT_FOUND => Ok(None),
        other => Err(HostStatus(other)),
    }
}

/// A header map, pairs-encoded (see [`crate::pairs`]).
pub fn header_map(map_type: MapType) -> Result<Vec<u8>, HostStatus> {
    let (mut data, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals.
    check(unsafe { proxy_get_header_map_pairs(map_type as u32, &mut data, &mut len) })?;
    Ok(owned(data, len).unwrap_or_default())
}

/// Up to `max` bytes of a buffer from `start`.
pub fn buffer(buffer_type: BufferType, start: usize, max: usize) -> Result<Vec<u8>, HostStatus> {
    let (mut data, mut len) = (null_mut(), 0);
    // SAFETY: pointers to live locals.
    let status = unsafe { proxy_get_buffer_bytes(buffer_type as u32, start, max, &mut data, &mut len) };
    match status {
        OK => Ok(owned(data, len).unwrap_or_default()),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(HostStatus(other)),
    }
}

/// Opens a gRPC stream from the current (root) context.
///
/// This one goes through the SDK: its dispatcher routes the stream's callbacks by a token it
/// registers only there. Envoy answers it with Ok, ParseFailure (unknown cluster) or
/// InternalFailure, all of which the SDK returns as values rather than panicking on.
pub fn open_grpc_stream(cluster: &str, service: &str, method: &str) -> Result<u32, HostStatus> {
    proxy_wasm::hostcalls::open_grpc_stream(cluster, service, method, Vec::new())
        .map_err(|status| HostStatus(status as u32))
}

pub fn grpc_send(token: u32, message: &[u8]) -> Result<(), HostStatus> {
    // SAFETY: a live buffer of the stated length.
    check(unsafe { proxy_grpc_send(token, message.as_ptr(), message.len(), 0) })
}

pub fn grpc_cancel(token: u32) -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_grpc_cancel(token) })
}

/// Defines a counter (`MetricType::Counter` = 0); Envoy names it `wasmcustom.<name>`.
pub fn define_counter(name: &str) -> Result<u32, HostStatus> {
    let mut id = 0;
    // SAFETY: a live buffer of the stated length and a live local.
    check(unsafe { proxy_define_metric(0, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment(id: u32, delta: i64) -> Result<(), HostStatus> {
    // SAFETY: no pointers.
    check(unsafe { proxy_increment_metric(id, delta) })
}
