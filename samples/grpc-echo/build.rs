//! Generates the sample service from `proto/echo.proto` with `protox` (no system `protoc`).

use std::{env, io, path::PathBuf};

fn main() -> io::Result<()> {
    let include = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?).join("proto");
    println!("cargo:rerun-if-changed={}", include.join("echo.proto").display());
    let descriptors = protox::compile(["echo.proto"], [&include]).map_err(io::Error::other)?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)
}
