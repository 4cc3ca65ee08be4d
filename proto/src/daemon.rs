//! What both daemons' `main` share: the copy tuning they re-execute for, logging set-up, and
//! stopping on SIGTERM/SIGINT.

use std::ffi::{OsStr, OsString};
use tokio_util::sync::CancellationToken;

/// The glibc tunable below which `memcpy`/`memmove` copy with vector loads and stores, and from
/// which with `rep movsb`.
const REP_MOVSB_TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";

/// 1 MiB (Zen 4's L2 size). Debian 12's glibc (2.36, also the distroless image's) switches to
/// `rep movsb` at 2 KiB on AMD Zen, where it runs many times slower when source and destination
/// are not aligned alike (glibc bug 30994, since fixed upstream by switching later on Zen).
/// The daemons' copies are exactly that: payload into 5-byte-prefixed TLS records, bodies into
/// protobuf fields. Raising the threshold gave the aggregator's 64 KiB ingest +10% to +38% MB/s
/// per core on a Zen 4 (six interleaved A/B pairs).
const REP_MOVSB_THRESHOLD: &str = "0x100000";

/// What the start-up copy tuning did; [`CopyTuning::log`] reports it once logging is up.
#[derive(Debug)]
pub enum CopyTuning {
    /// Not glibc on an AMD x86-64 CPU: glibc's default is right.
    NotNeeded,
    /// `GLIBC_TUNABLES` sets the threshold: this process after its re-exec, or the operator's
    /// own value, which is kept.
    InEffect(String),
    /// The re-exec failed; the daemon runs with glibc's default copies.
    Failed(std::io::Error),
}

impl CopyTuning {
    pub fn log(&self) {
        match self {
            CopyTuning::NotNeeded => {}
            CopyTuning::InEffect(threshold) => {
                tracing::info!("memory copies use rep movsb from {threshold} bytes ({REP_MOVSB_TUNABLE})")
            }
            CopyTuning::Failed(err) => tracing::warn!(
                "cannot re-execute with {REP_MOVSB_TUNABLE}={REP_MOVSB_THRESHOLD} ({err}); large copies stay on \
                 glibc's default path, which is slow on AMD Zen"
            ),
        }
    }
}

/// The value `GLIBC_TUNABLES` sets for the `rep movsb` threshold, if it sets one.
pub fn rep_movsb_threshold(tunables: &OsStr) -> Option<String> {
    tunables.to_string_lossy().split(':').find_map(|tunable| {
        let (name, value) = tunable.split_once('=')?;
        (name == REP_MOVSB_TUNABLE).then(|| value.to_owned())
    })
}

/// `GLIBC_TUNABLES` with [`REP_MOVSB_THRESHOLD`] added after the tunables it already sets.
pub fn with_rep_movsb_threshold(tunables: Option<&OsStr>) -> OsString {
    let mut raised = tunables.unwrap_or_default().to_owned();
    if !raised.is_empty() {
        raised.push(":");
    }
    raised.push(format!("{REP_MOVSB_TUNABLE}={REP_MOVSB_THRESHOLD}"));
    raised
}

/// Call first in `main`, before any thread starts. On glibc and an AMD (or Hygon) x86-64 CPU,
/// re-executes this binary, same arguments and process id, with [`REP_MOVSB_THRESHOLD`] added
/// to `GLIBC_TUNABLES`; glibc reads tunables only when a program starts. Returns at once when
/// the variable already sets the threshold, so it re-executes at most once.
pub fn tune_copies() -> CopyTuning {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let leaf = std::arch::x86_64::__cpuid(0);
        let vendor: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        if vendor != b"AuthenticAMD" && vendor != b"HygonGenuine" {
            return CopyTuning::NotNeeded;
        }
        let current = std::env::var_os("GLIBC_TUNABLES");
        if let Some(threshold) = current.as_deref().and_then(rep_movsb_threshold) {
            return CopyTuning::InEffect(threshold);
        }
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(name) = args.next() {
            command.arg0(name);
        }
        // `exec` returns only if it failed.
        let raised = with_rep_movsb_threshold(current.as_deref());
        CopyTuning::Failed(command.args(args).env("GLIBC_TUNABLES", raised).exec())
    }
    #[cfg(not(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu")))]
    CopyTuning::NotNeeded
}

/// Structured logs on stderr, filtered by `RUST_LOG` (default `info`); colours only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_added_after_other_tunables_and_an_existing_one_is_found() {
        assert_eq!(with_rep_movsb_threshold(None), "glibc.cpu.x86_rep_movsb_threshold=0x100000");
        assert_eq!(
            with_rep_movsb_threshold(Some(OsStr::new("glibc.malloc.arena_max=2"))),
            "glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=0x100000"
        );
        let operator = OsStr::new("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=4096");
        assert_eq!(rep_movsb_threshold(operator).as_deref(), Some("4096"));
        assert_eq!(rep_movsb_threshold(OsStr::new("glibc.malloc.arena_max=2")), None);
        // A tunable whose name only contains the threshold's is another tunable.
        assert_eq!(rep_movsb_threshold(OsStr::new("x.glibc.cpu.x86_rep_movsb_threshold=1")), None);
    }
}
