//! The capture filter as a native Envoy dynamic module.
//!
//! The same capture as the proxy-wasm filter (`filter/`), made without the VM: the frames, the
//! transactions, the batching, the stream's state machine and the drop accounting are the Wasm
//! filter's host-free core, unchanged; only the edges differ.
//! - Envoy side ([`hooks`]): Envoy's dynamic-module ABI (`dynamic-module/`). Reading a header
//!   map, a body chunk or an attribute is a plain C call that returns pointers into Envoy's
//!   own buffers, where proxy-wasm copies each result into the VM through an allocation call.
//!   The bench (`cargo xtask bench`, variants `native-floor` and `native-capture`) measures what
//!   that saves Envoy per exchange.
//! - Aggregator side ([`transport`]): a thread of the library's own with one mTLS gRPC stream
//!   per Envoy worker, since dynamic modules get no per-worker gRPC streams; the aggregator sees
//!   the same `CaptureService/StreamFrames` streams as from the Wasm filter.
//!
//! It captures HTTP (HTTP/1.1, HTTP/2, gRPC); Diameter stays with the Wasm network filter. Its
//! configuration is the Wasm filter's plus the aggregator's address and mTLS files
//! ([`settings`]), and its counters are the Wasm filter's, under Envoy's dynamic-module stats
//! namespace. The pod's identity comes from where Istio puts it in the sidecar's pod
//! ([`identity`]), since the node metadata is not an attribute of this ABI.

pub mod core;
pub mod identity;
pub mod settings;
pub mod transport;

#[cfg(not(test))]
mod hooks;
