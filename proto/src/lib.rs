//! The project's two wire contracts, generated from the `.proto` files under `proto/proto/`
//! (the single source of truth; read them for the semantics of every field), plus what both
//! ends of a contract need alike: the libpcap file layout of [`analysis::Capture`] records
//! ([`pcap`]), an HTTP message's body sent inline or as slices of those records ([`body`]),
//! and, with the `grpc` feature, TLS for the gRPC servers and clients ([`tls`]), a
//! workload certificate from Envoy's Secret Discovery Service ([`sds`]) and the daemons' shared
//! start-up ([`daemon`]).
//!
//! - [`capture`]: filter → aggregator, a bidirectional stream of frame batches and acks.
//! - [`analysis`]: aggregator → analysis service, one call per finished capture.

/// The generated code, nested as the protobuf packages are (the analysis package refers to
/// capture types by relative path).
#[allow(clippy::all, missing_docs)]
mod packetinspector {
    pub mod capture {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/packetinspector.capture.v1.rs"));
        }
    }
    pub mod analysis {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/packetinspector.analysis.v1.rs"));
        }
    }
}

/// `packetinspector.analysis.v1`: finished captures with their pcap records.
pub use packetinspector::analysis::v1 as analysis;
/// `packetinspector.capture.v1`: frames of HTTP transactions as the filter saw them.
pub use packetinspector::capture::v1 as capture;

pub mod body;
pub mod pcap;

#[cfg(feature = "grpc")]
pub mod daemon;
#[cfg(feature = "grpc")]
pub mod gather;
#[cfg(feature = "grpc")]
pub mod sds;
#[cfg(feature = "grpc")]
pub mod tls;
