//! Generates the Rust types of the contracts under `proto/` with a pure-Rust protobuf compiler
//! (`protox`), so no system `protoc` is needed. With the `grpc` feature the tonic client and
//! server are generated too; without it (the wasm filter) only prost messages are.

use std::{env, io, path::PathBuf};

const PROTOS: &[&str] = &["packetinspector/capture/v1/capture.proto", "packetinspector/analysis/v1/analysis.proto"];
/// Envoy's Secret Discovery Service, as far as the native capture takes its certificate from it
/// (gRPC builds only: the Wasm filter has Envoy for that).
const SDS: &str = "envoy/service/secret/v3/sds_subset.proto";

/// Packets are built into one buffer per capture and each record shares it (`Bytes`): no
/// allocation per packet, and every record is freed with the capture.
const PCAP_RECORD_DATA: &str = ".packetinspector.analysis.v1.PcapRecord.data";

fn main() -> io::Result<()> {
    let include = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?).join("proto");
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    let mut protos = PROTOS.to_vec();
    if grpc {
        protos.push(SDS);
    }
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", include.join(proto).display());
    }
    let descriptors = protox::compile(&protos, [&include]).map_err(io::Error::other)?;
    if grpc {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .bytes(PCAP_RECORD_DATA)
            .compile_fds(descriptors)
    } else {
        prost_build::Config::new().bytes([PCAP_RECORD_DATA]).compile_fds(descriptors)
    }
}
