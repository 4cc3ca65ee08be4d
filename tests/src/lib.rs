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
pub mod sds;
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

/// A TCP port free on loopback right now, for a process about to listen on it.
///
/// Taken below the kernel's ephemeral range when there is room: a port the kernel hands out for
/// `bind(0)` is an ephemeral one, and between our probe and Envoy's bind any outgoing
/// connection (another test's client, an Envoy upstream) may take it as its source port
/// ("Address already in use"). Below that range only listeners that chose the port take it, and
/// in this process each port is handed out once (a cursor, started at a place that depends on
/// the process id so that concurrent processes start apart).
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    const LOWEST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(0);
    let span = ephemeral_low.saturating_sub(LOWEST);
    if span < 1_000 {
        return Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = CURSOR.fetch_add(1, Ordering::Relaxed) % span;
        let Ok(port) = u16::try_from(LOWEST + offset) else { continue };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port between {LOWEST} and {ephemeral_low} on loopback")
}

thread_local! {
    /// The last panic on this thread, as the panic hook printed it.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Makes every panic also remembered (per thread) by [`last_panic`], keeping the default report.
///
/// A failing end-to-end test prints its components' logs while it unwinds, after the panic
/// message; a CI report that keeps only the end of the output would then show logs without the
/// failure. Owners of processes repeat the message after the logs with this.
pub fn remember_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(info.to_string()));
            previous(info);
        }));
    });
}

/// The message of the last panic on this thread, once [`remember_panics`] was called.
pub fn last_panic() -> Option<String> {
    LAST_PANIC.with(|last| last.borrow().clone())
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
