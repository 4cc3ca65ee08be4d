//! The end-to-end harness: real Envoy running the built filter, the aggregator and emulator
//! binaries, a sample upstream app, and tshark to read what was written. Shared by the tests
//! under `tests/tests/` and by `cargo xtask demo`.
//!
//! Everything it starts is owned: free ports are picked per run, readiness is polled with a
//! deadline, every process is stopped (SIGTERM, then SIGKILL) when its owner is dropped, and
//! when a test fails the tail of every component's log is printed.

pub mod app;
pub mod certs;
pub mod clients;
pub mod envoyfilter;
pub mod http;
pub mod mesh;
pub mod process;
pub mod tools;
pub mod tshark;

use std::{
    net::TcpListener,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_default()
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// A TCP port free on loopback right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `check` until it returns `Some`, or fails after `timeout` saying what was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
