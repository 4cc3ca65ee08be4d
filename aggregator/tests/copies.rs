//! The binary's start-up copy tuning: on AMD CPUs it re-executes itself with glibc's `rep movsb`
//! threshold raised, and it keeps a threshold the operator set.

use std::process::Command;

/// Runs the aggregator with a listen address that cannot parse (so it stops right after
/// start-up, exit 64) and returns what it logged.
fn start_up_log(tunables: Option<&str>) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_packet-inspector-aggregator"));
    command.args(["--listen", "not-an-address"]).env_remove("RUST_LOG");
    match tunables {
        Some(tunables) => command.env("GLIBC_TUNABLES", tunables),
        None => command.env_remove("GLIBC_TUNABLES"),
    };
    let output = command.output().expect("run the aggregator");
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(64), "{log}");
    log
}

fn glibc_on_amd() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vendor = cpuinfo.lines().find_map(|line| line.strip_prefix("vendor_id")).unwrap_or_default();
    let vendor = vendor.trim_start_matches([' ', '\t', ':']);
    cfg!(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))
        && matches!(vendor, "AuthenticAMD" | "HygonGenuine")
}

#[test]
fn amd_cpus_get_the_raised_threshold_by_re_execution() {
    // The variable is unset when the binary starts: only the re-executed process can see it.
    let log = start_up_log(None);
    assert_eq!(log.contains("memory copies use rep movsb from 0x100000 bytes"), glibc_on_amd(), "{log}");
    assert!(log.contains("cannot listen on --listen not-an-address"), "{log}");
    assert!(!log.contains("cannot re-execute"), "{log}");
}

#[test]
fn an_operators_threshold_is_kept() {
    let log = start_up_log(Some("glibc.malloc.arena_max=2:glibc.cpu.x86_rep_movsb_threshold=8192"));
    assert_eq!(log.contains("memory copies use rep movsb from 8192 bytes"), glibc_on_amd(), "{log}");
    assert!(!log.contains("0x100000"), "{log}");
}
