//! The Packet Inspector proxy-wasm filter.
//!
//! Envoy loads the `wasm32-wasip1` build of this crate as an HTTP filter or, configured with
//! `"protocol": "diameter"`, as a network filter in front of a TCP proxy. As an HTTP filter it
//! records, for every exchange, request/response headers (pseudo-headers included), bodies up
//! to a per-direction limit and trailers; as a network filter it frames the Diameter messages
//! of each connection. Either way it tags them with the pod's identity and the connection's
//! addresses, and streams them to the aggregator of its node over a gRPC stream (see `proto/`). It never
//! pauses, delays or fails traffic: when the aggregator is absent or slow, captures are dropped
//! and counted in Envoy's stats.
//!
//! Everything but `plugin` and `host` (the wasm edge) is host-free and tested natively:
//! [`config`], [`connections`], [`diameter`], [`pairs`], [`metadata`], [`outbox`], [`pipeline`],
//! [`transaction`], [`wire`].

pub mod config;
pub mod connections;
pub mod diameter;
pub mod metadata;
pub mod outbox;
pub mod pairs;
pub mod pipeline;
pub mod transaction;
pub mod wire;

#[cfg(all(target_arch = "wasm32", any(not(feature = "noop"), feature = "read-floor")))]
#[cfg_attr(feature = "read-floor", allow(dead_code))]
mod host;
#[cfg(all(target_arch = "wasm32", feature = "noop"))]
mod noop;
#[cfg(all(target_arch = "wasm32", not(feature = "noop")))]
mod plugin;
