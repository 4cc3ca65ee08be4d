//! Generates the Rust types of the contracts under `proto/` with a pure-Rust protobuf compiler
//! (`protox`), so no system `protoc` is needed. With the `grpc` feature the tonic client and
//! server are generated too; without it (the wasm filter) only prost messages are.

use std::{env, io, path::PathBuf};

const PROTOS: &[&str] = &["packetinspector/capture/v1/capture.proto", "packetinspector/analysis/v1/analysis.proto"];

/// Packets are built into one buffer per capture and each record shares it (`Bytes`): no
/// allocation per packet, and every record is freed with the capture.
const PCAP_RECORD_DATA: &str = ".packetinspector.analysis.v1.PcapRecord.data";

fn main() -> io::Result<()> {
    let include = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?).join("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", include.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&include]).map_err(io::Error::other)?;
    if env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .bytes(PCAP_RECORD_DATA)
            .compile_fds(descriptors)
    } else {
        prost_build::Config::new().bytes([PCAP_RECORD_DATA]).compile_fds(descriptors)
    }
}
