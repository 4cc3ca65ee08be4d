//! `cargo xtask bench`: what capture costs, measured side by side on real parts, with the
//! targets of the benchmark issue printed as PASS/FAIL and written, with every raw run, under
//! `target/bench/` (`runs.json`, `summary.json`). Not a test: nothing asserts a timing.
//!
//! 1. Proxy cost: eight Envoys under test (`--concurrency 1`, pinned to core 0) forward to one
//!    upstream Envoy answering 1 KiB or 64 KiB bodies (`direct_response`): no filter, the
//!    project's no-op Wasm filter (the VM-crossing floor), the read floor (the no-op filter plus
//!    the host calls any capture must make: header maps, bodies, time), the native read floor
//!    (the same reads and the two per-request properties through Envoy's dynamic-module ABI, no
//!    VM: `native-floor/`), the capture filter and the native capture (aggregator running),
//!    Envoy's own tap filter writing every exchange to a file, keeping as much of each body as
//!    capture does; and a second Envoy with the no-op module (`noop-twin`), whose ratios to the
//!    first are an A/A: how far apart this run measures two identical proxies. Load comes from
//!    core 1, in interleaved rounds (A B C D A B C D ...), three ways: `wrk` closed loop (as fast
//!    as each variant goes: its capacity), then at a fixed rate, the same for every variant
//!    (half the slowest variant's capacity): HTTP/1.1 open loop (`openloop.rs`) and HTTP/2 (h2c)
//!    with `h2load`. Envoy CPU per request comes from `/proc/<pid>/stat`. P1 and P2 compare the
//!    open-loop HTTP/1.1 runs (medians of the rounds): the same offered load, so the same
//!    batching and wake-up conditions for every variant.
//! 2. Overload (see `overload.rs`): the analysis service paced to a sixteenth of what the capture
//!    proxy takes, then stopped (SIGSTOP) for a minute, under as much load as that proxy takes.
//! 3. Capture latency: sequential requests through the capture sidecar; the time from the end of
//!    each response to its file appearing at the emulator.
//! 4. Aggregator ingest: a load generator speaking the filter protocol over real mTLS (many
//!    concurrent streams, the filter's ack window) against the aggregator pinned to one core,
//!    the emulator discarding: frames/s and captured MB/s per aggregator CPU-second.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use packet_inspector_tests::{certs::Ca, free_port, mesh::admin_get, process::Process, target_dir, tools, wait_for};
use serde_json::json;

pub const VARIANTS: [&str; 9] =
    ["none", "noop", "floor", "native-floor", "native-capture", "capture", "candidate", "noop-twin", "tap"];
pub const SIZES: [(&str, usize); 2] = [("1KiB", 1024), ("64KiB", 65536)];
pub const PARTS: [&str; 5] = ["filter", "proxy", "overload", "latency", "ingest"];

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    /// The share (%) of a core the host may take in a proxy round before it is run again.
    pub steal_limit_percent: f64,
    /// How many times a round over the limit is run again.
    pub steal_retries: usize,
    /// Rounds of the ingest part (each runs both body sizes).
    pub ingest_rounds: usize,
    pub connections: u32,
    /// Which of [`PARTS`] to run.
    pub parts: Vec<String>,
    /// Which of [`VARIANTS`] the proxy part loads.
    pub variants: Vec<String>,
    /// Which of [`SIZES`] the proxy part loads.
    pub sizes: Vec<String>,
    /// How long the overload part stops the analysis service.
    pub stall_seconds: u64,
    /// The module of the `candidate` variant: another build of the capture filter (by default,
    /// the capture module), Wasm or, ending in `.so`, the native capture.
    pub candidate: Option<PathBuf>,
    /// The `candidate` variant's plugin configuration (by default, capture's).
    pub candidate_configuration: Option<String>,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }

    /// Whether the candidate is a build of the native capture (a shared library) rather than
    /// of the Wasm filter.
    fn native_candidate(&self) -> bool {
        self.candidate.as_deref().is_some_and(|path| path.extension().is_some_and(|ext| ext == "so"))
    }

    /// The variant the candidate is a build of, compared with it and swapping places with it.
    fn candidate_peer(&self) -> &'static str {
        if self.native_candidate() {
            "native-capture"
        } else {
            "capture"
        }
    }
}

/// How a load run loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Load {
    /// `wrk`, HTTP/1.1, as fast as the variant answers.
    Closed,
    /// HTTP/1.1 at a fixed rate, open loop (`openloop.rs`).
    OpenHttp1,
    /// `h2load` (h2c) at a fixed rate; h2load starts its clients' timers together, so the
    /// requests come in small bursts.
    FixedHttp2,
}

impl Load {
    const ALL: [Load; 3] = [Load::Closed, Load::OpenHttp1, Load::FixedHttp2];

    fn name(self) -> &'static str {
        match self {
            Load::Closed => "closed",
            Load::OpenHttp1 => "open-h1",
            Load::FixedHttp2 => "fixed-h2",
        }
    }
}

/// One load run against one Envoy.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    size: String,
    load: Load,
    variant: String,
    round: usize,
    /// Requests per second offered (fixed-rate runs).
    offered: Option<f64>,
    requests: u64,
    /// Requests that did not get a 2xx answer (errors, timeouts, other statuses).
    failed: u64,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    envoy_cpu_us_per_request: f64,
    /// Milliseconds the hypervisor ran something else while core 0 (Envoy's) and core 1 (the
    /// load's, the upstream's) had work: their steal time over the run.
    steal_ms: [f64; 2],
    /// The larger of the two as a share of the run's duration (%).
    stolen_percent: f64,
    /// Which attempt at this round it was (0 the first; see [`least_stolen`]).
    attempt: usize,
    /// Whether this attempt is the round's: only kept runs enter the medians and the targets.
    kept: bool,
}

/// The share (%) of a run that took `elapsed` that the host took from the more stolen of the two
/// cores.
fn stolen_percent(steal_ms: [f64; 2], elapsed: Duration) -> f64 {
    steal_ms[0].max(steal_ms[1]) / (elapsed.as_secs_f64().max(1e-3) * 10.0)
}

/// Which attempt at a round counts: the one the host took least from (the first of equals).
///
/// On a shared VM the hypervisor runs other guests on these cores; the time it takes shows as
/// steal, and a round it took much of measures the host: across a run's rounds, steal explained
/// most of the spread of the p99 (correlations of 0.7-1.0 per variant) and of the CPU per
/// request (0.84-0.99, once -0.25). Every variant gets the same chances, and every attempt is
/// in `runs.json`.
fn least_stolen(stolen_percent: impl IntoIterator<Item = f64>) -> usize {
    stolen_percent
        .into_iter()
        .enumerate()
        .fold((0, f64::MAX), |best, (at, stolen)| if stolen < best.1 { (at, stolen) } else { best })
        .0
}

/// Measures every slot once, in order; then, in up to `retries` later passes, again each slot
/// whose least stolen attempt is over `limit` (%): later, so as not to land in the same busy
/// spell of the host. `measure` gets the slot and the attempt's number. Returns each slot with
/// its attempts and which of them counts ([`least_stolen`]); `what` names the runs in the log.
pub(crate) fn measure_in_passes<S, T>(
    slots: Vec<S>,
    limit: f64,
    retries: usize,
    what: &str,
    stolen: impl Fn(&T) -> f64,
    mut measure: impl FnMut(&S, usize) -> Result<T>,
) -> Result<Vec<(S, Vec<T>, usize)>> {
    let least = |attempts: &[T]| attempts.iter().map(&stolen).fold(f64::MAX, f64::min);
    let mut slots: Vec<(S, Vec<T>)> = slots.into_iter().map(|slot| (slot, Vec::new())).collect();
    for pass in 0..=retries {
        let again = slots.iter().filter(|(_, attempts)| least(attempts) > limit).count();
        if pass > 0 && again > 0 {
            eprintln!(
                "bench: the host took more than {limit}% of a core in {again} of those {what}: running them again"
            );
        }
        for (slot, attempts) in &mut slots {
            if least(attempts) > limit {
                attempts.push(measure(slot, pass)?);
            }
        }
    }
    Ok(slots
        .into_iter()
        .map(|(slot, attempts)| {
            let kept = least_stolen(attempts.iter().map(&stolen));
            (slot, attempts, kept)
        })
        .collect())
}

/// What a load generator reports.
pub struct LoadResult {
    pub requests: u64,
    pub failed: u64,
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Every answered request's latency (µs), when the generator reports them (not `wrk`).
    pub latencies_us: Vec<f64>,
}

pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command; utime and stime are the 14th and 15th fields.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Steal time (in clock ticks) of cores 0 and 1 so far, from `/proc/stat`.
fn steal_ticks() -> Result<[u64; 2]> {
    steal_of(&std::fs::read_to_string("/proc/stat")?)
}

/// What the host takes from cores 0 and 1 during a run: started before it, read after it.
pub(crate) struct StealClock {
    ticks: [u64; 2],
    started: std::time::Instant,
    tick_ms: f64,
}

impl StealClock {
    pub(crate) fn start() -> Result<Self> {
        let tick_ms = 1000.0 / ticks_per_second();
        Ok(Self { ticks: steal_ticks()?, started: std::time::Instant::now(), tick_ms })
    }

    /// Milliseconds stolen from each core since the start, and the larger as a share (%) of the
    /// time since the start: the run as it took, not as asked (a stall of the VM can hold it
    /// many times longer).
    pub(crate) fn read(&self) -> Result<([f64; 2], f64)> {
        let now = steal_ticks()?;
        let steal_ms = [0, 1].map(|c| now[c].saturating_sub(self.ticks[c]) as f64 * self.tick_ms);
        Ok((steal_ms, stolen_percent(steal_ms, self.started.elapsed())))
    }
}

fn steal_of(stat: &str) -> Result<[u64; 2]> {
    let mut steal = [0; 2];
    for (core, slot) in steal.iter_mut().enumerate() {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&format!("cpu{core}")))
            .with_context(|| format!("no cpu{core} in /proc/stat"))?;
        // cpuN user nice system idle iowait irq softirq steal ...
        *slot = line.split_whitespace().nth(8).context("no steal in /proc/stat")?.parse()?;
    }
    Ok(steal)
}

pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).context("VmRSS")?.trim().trim_end_matches(" kB").trim();
    Ok(kib.parse::<u64>()? * 1024)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, asked once).
pub fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn duration_us(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    Some(number.parse::<f64>().ok()? * factor)
}

/// A `wrk --latency` report.
fn parse_wrk(output: &str) -> Result<LoadResult> {
    let percentile = |p: &str| {
        output
            .lines()
            .find_map(|l| l.trim().strip_prefix(p).and_then(|rest| duration_us(rest.trim())))
            .context(format!("wrk {p} latency"))
    };
    let requests = output
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .context("wrk request count")?;
    let rps =
        output.lines().find_map(|l| l.strip_prefix("Requests/sec:")).context("wrk Requests/sec")?.trim().parse()?;
    let non_2xx: u64 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    // "Socket errors: connect 0, read 0, write 0, timeout 0"
    let socket_errors: u64 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|rest| rest.split(',').filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    Ok(LoadResult {
        requests,
        failed: non_2xx + socket_errors,
        requests_per_second: rps,
        p50_us: percentile("50%")?,
        p99_us: percentile("99%")?,
        latencies_us: Vec::new(),
    })
}

/// An `h2load` report plus its per-request log (start µs, status, duration µs).
fn parse_h2load(output: &str, log: &str) -> Result<LoadResult> {
    let field = |line_prefix: &str, label: &str| -> Result<u64> {
        let line = output
            .lines()
            .find_map(|l| l.trim().strip_prefix(line_prefix))
            .with_context(|| format!("h2load output has no {line_prefix:?} line:\n{output}"))?;
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(label).and_then(|n| n.trim().parse().ok()))
            .with_context(|| format!("h2load {line_prefix} {label}"))
    };
    // Requests still in flight when the duration ends are started but not done: not failures.
    let done = field("requests:", "done")?;
    let ok = field("status codes:", "2xx")?;
    let seconds: f64 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in ")?.split_once("s,").map(|(s, _)| s.trim().parse().ok()))
        .flatten()
        .context("h2load duration")?;
    let mut durations: Vec<f64> =
        log.lines().filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok()).collect();
    if durations.is_empty() {
        bail!("h2load logged no request");
    }
    durations.sort_by(|a, b| a.total_cmp(b));
    Ok(LoadResult {
        requests: ok,
        failed: done.saturating_sub(ok),
        requests_per_second: ok as f64 / seconds.max(0.001),
        p50_us: percentile(&durations, 0.50),
        p99_us: percentile(&durations, 0.99),
        latencies_us: durations,
    })
}

/// The `q` quantile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The metrics a table row compares, each `[median, min, max]` over the rounds.
const COMPARED: [&str; 4] = ["requests_per_second", "p50_us", "p99_us", "envoy_cpu_us_per_request"];

/// Adds to every row of the proxy table its medians as ratios to those of the no-op Wasm filter
/// (`to_noop`) and of Envoy's tap (`to_tap`) under the same size and load, when those ran.
fn add_ratios(table: &mut [serde_json::Value]) {
    let reference = |table: &[serde_json::Value], row: &serde_json::Value, variant: &str| {
        table
            .iter()
            .find(|r| r["size"] == row["size"] && r["load"] == row["load"] && r["variant"] == variant)
            .map(|r| COMPARED.map(|key| r[key][0].as_f64()))
    };
    let ratios: Vec<_> = table
        .iter()
        .map(|row| {
            ["noop", "tap"].map(|variant| {
                reference(table, row, variant).map(|of| {
                    let mut ratios = serde_json::Map::new();
                    for (key, base) in COMPARED.iter().zip(of) {
                        let ratio = row[*key][0].as_f64().zip(base).map(|(value, base)| value / base);
                        ratios.insert((*key).to_owned(), json!(ratio));
                    }
                    serde_json::Value::Object(ratios)
                })
            })
        })
        .collect();
    for (row, [to_noop, to_tap]) in table.iter_mut().zip(ratios) {
        row["to_noop"] = json!(to_noop);
        row["to_tap"] = json!(to_tap);
    }
}

/// The median of the kept rounds, and their range.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values.
    pub(crate) fn of(mut values: Vec<f64>) -> Option<Self> {
        let (&min, &max) = (values.iter().min_by(|a, b| a.total_cmp(b))?, values.iter().max_by(|a, b| a.total_cmp(b))?);
        Some(Self { median: median(&mut values), min, max })
    }
}

/// `f(a) / f(b)` in every round where both variants kept a run, as a median and range: the two
/// ran seconds apart in each round, so a drift of the machine's speed over the whole run, which
/// moves both variants' medians, cancels in each pair. Context beside the ratio of medians the
/// targets take; `None` when no round has both.
fn per_round_ratio(runs: &[Run], size: &str, load: Load, a: &str, b: &str, f: fn(&Run) -> f64) -> Option<Spread> {
    let kept = |variant: &str| -> BTreeMap<usize, f64> {
        runs.iter()
            .filter(|r| r.kept && r.size == size && r.load == load && r.variant == variant)
            .map(|r| (r.round, f(r)))
            .collect()
    };
    let (of_a, of_b) = (kept(a), kept(b));
    Spread::of(of_a.iter().filter_map(|(round, x)| Some(x / of_b.get(round)?)).collect())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub fn pinned(core: u32, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", &core.to_string()]).arg(program);
    command
}

/// Pinned to `core`, and scheduled only when that core would otherwise idle (`SCHED_IDLE`): the
/// capture pipeline's back end shares core 1 with the load generator and the upstream here,
/// while in a mesh it runs on its own node budget. Without this, its bursts of work delay the
/// client and the upstream, and the proxy's latency would be charged for them.
pub fn pinned_idle(core: u32, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", &core.to_string(), "chrt", "--idle", "0"]).arg(program);
    command
}

pub struct Bench {
    pub dir: PathBuf,
    pub processes: Vec<Process>,
}

impl Bench {
    pub fn spawn(&mut self, name: &str, command: Command) -> Result<u32> {
        let process = Process::spawn(name, command, &self.dir.join(format!("{name}.log")))?;
        let pid = process.pid().context("pid")?;
        self.processes.push(process);
        Ok(pid)
    }

    fn envoy(&mut self, name: &str, config: &str, core: u32, admin: u16) -> Result<u32> {
        let path = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config)?;
        let mut command = pinned(core, &tools::envoy()?);
        command.arg("-c").arg(&path).args(["--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]);
        // The pod's identity where the native capture reads it (the node metadata has it too).
        command
            .env("POD_NAME", "bench-client-0")
            .env("POD_NAMESPACE", "bench")
            .env("ISTIO_META_WORKLOAD_NAME", "bench-client");
        let pid = self.spawn(name, command)?;
        let ready = wait_for(&format!("{name} to be ready"), Duration::from_secs(60), || {
            let process = self.processes.last_mut()?;
            if process.exited().is_some() {
                return Some(false);
            }
            admin_get(admin, "/ready").ok().filter(|b| b.trim() == "LIVE").map(|_| true)
        });
        match ready {
            Ok(true) => Ok(pid),
            Ok(false) => bail!("{name} exited:\n{}", self.processes.last().map(|p| p.tail(20)).unwrap_or_default()),
            Err(err) => bail!("{err}:\n{}", self.processes.last().map(|p| p.tail(20)).unwrap_or_default()),
        }
    }
}

fn listener(name: &str, port: u16, cluster: &str, filters: &str) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    traffic_direction: OUTBOUND
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: {cluster} }} }}] }}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#
    )
}

fn static_cluster(name: &str, port: u16) -> String {
    format!(
        r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]"#
    )
}

fn wasm_filter(module: &Path, configuration: &str) -> String {
    format!(
        r#"
          - name: wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                root_id: packet_inspector
                failure_policy: FAIL_OPEN
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{}' }}
                vm_config: {{ vm_id: bench, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }} }}"#,
        // A single-quoted YAML scalar: a quote inside is doubled.
        configuration.replace('\'', "''"),
        module.display()
    )
}

/// Medians of the runs of one (size, load, variant).
#[derive(Debug, Clone, Copy)]
struct Medians {
    cpu_us: f64,
    p99_us: f64,
    /// p99 of every request of every round kept together (fixed-rate loads; see [`proxy`]).
    pooled_p99_us: Option<f64>,
}

/// What every part needs: the processes, and where they listen.
pub struct Setup {
    pub dir: PathBuf,
    pub bench: Bench,
    pub certs: PathBuf,
    pub release: PathBuf,
    pub emulator_port: u16,
    pub aggregator_port: u16,
    pub aggregator_admin: u16,
    pub aggregator_pid: u32,
    /// Per variant: pid, admin port, one listener port per size.
    pub under_test: BTreeMap<String, (u32, u16, Vec<u16>)>,
    pub tap_dir: TapDir,
    /// The native capture's secret service, serving while the Envoys run (held, not read).
    pub _secrets: packet_inspector_tests::sds::SdsServer,
}

/// Where the tap variant writes: a file per exchange, hundreds of thousands per bench (gigabytes
/// with 64 KiB bodies), on disk as an Envoy user's tap would. Two things keep the tap's disk
/// work out of the other variants' figures: after each tap run the files are flushed (`syncfs`,
/// unmeasured), because the kernel's write-back otherwise ran during the next variants' runs
/// and gave their p99 stalls of tens of milliseconds; and they are deleted only when the bench
/// ends, because mass deletes (ext4 mounted with `discard` here) made the tap's next runs
/// create files several times slower. (In memory, `/dev/shm`, the tap cost 1.8x the CPU of no
/// filter, closed loop, instead of 2.6-2.9x on disk: its disk work is part of what a tap costs.)
pub struct TapDir(PathBuf);

impl TapDir {
    fn create(run_dir: &Path) -> Result<Self> {
        // What earlier benches that were killed (no destructor ran) left: gigabytes, no result.
        if let Some(runs) = run_dir.parent() {
            for entry in std::fs::read_dir(runs).into_iter().flatten().flatten() {
                let stale = entry.path().join("tap");
                if entry.path() != run_dir && stale.is_dir() {
                    eprintln!("bench: deleting {} (left by an earlier, interrupted bench)", stale.display());
                    let _ = std::fs::remove_dir_all(stale);
                }
            }
        }
        let dir = run_dir.join("tap");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Writes what the tap wrote so far to disk.
    fn flush(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(&self.0)?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open for the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error()).context("syncfs on the tap's directory");
        }
        Ok(())
    }
}

impl Drop for TapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(options: &Options) -> Result<()> {
    for part in &options.parts {
        if !PARTS.contains(&part.as_str()) {
            bail!("unknown part {part:?}; one of {PARTS:?}");
        }
    }
    for variant in &options.variants {
        if !VARIANTS.contains(&variant.as_str()) {
            bail!("unknown variant {variant:?}; one of {VARIANTS:?}");
        }
    }
    if options.ingest_rounds == 0 && options.runs("ingest") {
        bail!("--ingest-rounds must be at least 1 for the ingest part");
    }
    if !(options.steal_limit_percent > 0.0 && options.steal_limit_percent <= 100.0) {
        bail!("--steal-limit is a share of a core in percent, above 0 and at most 100 (100: never run a round again)");
    }
    match (&options.candidate, &options.candidate_configuration) {
        (Some(module), _) if !module.is_file() => bail!("--candidate {}: no such file", module.display()),
        (Some(_), Some(_)) if options.native_candidate() => {
            bail!("--candidate-config configures a Wasm candidate; a native candidate runs with the native capture's settings")
        }
        (_, Some(configuration)) if serde_json::from_str::<serde_json::Value>(configuration).is_err() => {
            bail!("--candidate-config is not JSON: {configuration}")
        }
        (None, None) if options.variants.iter().any(|v| v == "candidate") => {
            bail!("the candidate variant needs a module or a configuration: --candidate PATH.wasm, --candidate-config JSON")
        }
        _ => {}
    }
    for size in &options.sizes {
        if !SIZES.iter().any(|(name, _)| name == size) {
            bail!("unknown size {size:?}; one of 1KiB, 64KiB");
        }
    }
    let out = target_dir().join("bench");
    let dir = out.join(format!("run-{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs()));
    std::fs::create_dir_all(&dir)?;
    let machine = crate::machine::Machine::read(tools::envoy().ok().as_deref(), which("node").ok().as_deref());
    eprintln!("bench: {}", machine.summary());
    // First, while nothing else runs.
    let filter_part = if options.runs("filter") { Some(filter_part(&dir)?) } else { None };
    let mut setup = start(&dir, options)?;
    // This process generates open-loop load and ingest load: off the measured core.
    crate::ingest::pin(std::process::id(), 1)?;

    let mut runs = Vec::new();
    let mut medians: BTreeMap<(String, Load, String), Medians> = BTreeMap::new();
    let mut table = Vec::new();
    if options.runs("proxy") {
        let mut latencies = BTreeMap::new();
        proxy(&setup, options, &mut runs, &mut latencies)?;
        for (size, _) in SIZES {
            for load in Load::ALL {
                for variant in VARIANTS {
                    let of: Vec<&Run> = runs
                        .iter()
                        .filter(|r| r.kept && r.size == size && r.load == load && r.variant == variant)
                        .collect();
                    if of.is_empty() {
                        continue;
                    }
                    let pick = |f: fn(&Run) -> f64| {
                        Spread::of(of.iter().map(|r| f(r)).collect())
                            .map(|s| (s.median, s.min, s.max))
                            .context("a row without kept runs")
                    };
                    let (rps, cpu, p50, p99) = (
                        pick(|r| r.requests_per_second)?,
                        pick(|r| r.envoy_cpu_us_per_request)?,
                        pick(|r| r.p50_us)?,
                        pick(|r| r.p99_us)?,
                    );
                    let failed: u64 = of.iter().map(|r| r.failed).sum();
                    let stolen = pick(|r| r.stolen_percent)?;
                    let pooled_p99_us = latencies
                        .get_mut(&(size.to_owned(), load, variant.to_owned()))
                        .filter(|all: &&mut Vec<f64>| !all.is_empty())
                        .map(|all| {
                            all.sort_by(|a, b| a.total_cmp(b));
                            percentile(all, 0.99)
                        });
                    medians.insert(
                        (size.to_owned(), load, variant.to_owned()),
                        Medians { cpu_us: cpu.0, p99_us: p99.0, pooled_p99_us },
                    );
                    table.push(json!({"size": size, "load": load, "variant": variant, "offered": of[0].offered,
                        "requests_per_second": rps, "envoy_cpu_us_per_request": cpu, "p50_us": p50, "p99_us": p99,
                        "p99_all_rounds_us": pooled_p99_us, "failed": failed, "stolen_percent": stolen}));
                }
            }
        }
        add_ratios(&mut table);
    }
    let rss = json!({
        "envoy_capture": setup.under_test.get("capture").and_then(|(pid, ..)| rss_bytes(*pid).ok()),
        "envoy_noop": setup.under_test.get("noop").and_then(|(pid, ..)| rss_bytes(*pid).ok()),
        "aggregator": rss_bytes(setup.aggregator_pid).ok(),
    });

    let overload = if options.runs("overload") { Some(crate::overload::run(&mut setup, options)?) } else { None };
    // Before the latency part, which replaces the discarding emulator with one writing files:
    // ingest forwards every capture, and must forward to a sink that discards.
    let ingest = if options.runs("ingest") {
        crate::ingest::wait_drained(setup.aggregator_admin)?;
        Some(crate::ingest::run(
            &setup.certs,
            setup.aggregator_port,
            setup.aggregator_admin,
            setup.aggregator_pid,
            options,
        )?)
    } else {
        None
    };
    let latency = if options.runs("latency") {
        crate::ingest::wait_drained(setup.aggregator_admin)?;
        let capture_port = setup.under_test.get("capture").context("the latency part needs the capture variant")?.2[0];
        let latency = crate::ingest::capture_latency(
            &setup.dir,
            &setup.certs,
            &setup.release,
            setup.emulator_port,
            capture_port,
            &mut setup.bench.processes,
        )
        .with_context(|| pipeline_state(&setup))?;
        eprintln!(
            "bench: capture on disk after the response: p50 {:.3} s, p99 {:.3} s",
            latency.p50_seconds, latency.p99_seconds
        );
        Some(latency)
    } else {
        None
    };

    let fixed = |variant: &str| medians.get(&("1KiB".to_owned(), Load::OpenHttp1, variant.to_owned())).copied();
    let ratio = |a: Option<Medians>, b: Option<Medians>, f: fn(&Medians) -> f64| match (a, b) {
        (Some(a), Some(b)) => Some(f(&a) / f(&b)),
        _ => None,
    };
    let paired = |a: &str, b: &str, f: fn(&Run) -> f64| {
        per_round_ratio(&runs, "1KiB", Load::OpenHttp1, a, b, f).map(|s| json!([s.median, s.min, s.max]))
    };
    let cpu: fn(&Run) -> f64 = |r| r.envoy_cpu_us_per_request;
    let p99: fn(&Run) -> f64 = |r| r.p99_us;
    // P1 and P2 for the Wasm capture, then for the native capture.
    let mut targets: Vec<serde_json::Value> = [("capture", "capture"), ("native-capture", "native capture")]
        .into_iter()
        .flat_map(|(variant, name)| {
            [
                json!({"target": "P1", "what": format!("Envoy CPU/request, {name} / no-op Wasm (HTTP/1.1, 1 KiB, same offered load)"),
                    "value": ratio(fixed(variant), fixed("noop"), |m| m.cpu_us), "limit": 1.15,
                    "a_a": ratio(fixed("noop-twin"), fixed("noop"), |m| m.cpu_us),
                    "per_round": paired(variant, "noop", cpu), "per_round_a_a": paired("noop-twin", "noop", cpu)}),
                json!({"target": "P1", "what": format!("Envoy CPU/request, {name} / native tap (HTTP/1.1, 1 KiB, same offered load)"),
                    "value": ratio(fixed(variant), fixed("tap"), |m| m.cpu_us), "limit": 0.5,
                    "per_round": paired(variant, "tap", cpu)}),
                json!({"target": "P2", "what": format!("p99 latency, {name} / no-op Wasm (HTTP/1.1, 1 KiB, same offered load)"),
                    "value": ratio(fixed(variant), fixed("noop"), |m| m.p99_us), "limit": 1.10,
                    "a_a": ratio(fixed("noop-twin"), fixed("noop"), |m| m.p99_us),
                    "per_round": paired(variant, "noop", p99), "per_round_a_a": paired("noop-twin", "noop", p99),
                    "all_requests": ratio(fixed(variant), fixed("noop"), |m| m.pooled_p99_us.unwrap_or(m.p99_us)),
                    "all_requests_a_a": ratio(fixed("noop-twin"), fixed("noop"), |m| m.pooled_p99_us.unwrap_or(m.p99_us))}),
            ]
        })
        .collect();
    targets.extend([
        json!({"target": "P3", "what": "aggregator frames/s per core (thousands; median of the ingest rounds, 1 KiB bodies)",
            "value": ingest.as_ref().map(|i| i.frames_per_core_second.median / 1000.0),
            "range": ingest.as_ref().map(|i| [i.frames_per_core_second.min / 1000.0, i.frames_per_core_second.max / 1000.0]),
            "limit": 200.0, "at_least": true}),
        json!({"target": "P3", "what": "aggregator captured MB/s per core (median of the ingest rounds, 64 KiB bodies)",
            "value": ingest.as_ref().map(|i| i.megabytes_per_core_second.median),
            "range": ingest.as_ref().map(|i| [i.megabytes_per_core_second.min, i.megabytes_per_core_second.max]),
            "limit": 250.0, "at_least": true}),
    ]);
    match &overload {
        Some(o) => targets.extend(o.targets()),
        None => targets
            .push(json!({"target": "P4", "what": "overload (stalled analysis service)", "value": null, "limit": null})),
    }
    targets.push(json!({"target": "P5", "what": "capture on disk after the response ends, p99 (s)",
        "value": latency.as_ref().map(|l| l.p99_seconds), "limit": 1.0}));
    let summary: Vec<serde_json::Value> = targets
        .into_iter()
        .map(|mut t| {
            if t.get("pass").is_none() {
                t["pass"] = match (t["value"].as_f64(), t["limit"].as_f64()) {
                    (Some(value), Some(limit)) if t.get("at_least").is_some() => json!(value >= limit),
                    (Some(value), Some(limit)) => json!(value <= limit),
                    _ => serde_json::Value::Null,
                };
            }
            t
        })
        .collect();

    std::fs::write(
        out.join("runs.json"),
        serde_json::to_vec_pretty(&json!({
            "machine": machine,
            "runs": runs, "medians": table, "ingest": ingest, "capture_latency": latency, "overload": overload,
            "filter_part": filter_part,
            "rss_bytes_after_proxy_part": rss,
        }))?,
    )?;
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;

    if !table.is_empty() {
        println!(
            "\n{:<7} {:<11} {:<14} {:>7} {:>7} {:>21} {:>7} {:>19} {:>10} {:>6} {:>7}",
            "SIZE",
            "LOAD",
            "VARIANT",
            "OFFERED",
            "REQ/S",
            "CPU µs/REQ (MIN-MAX)",
            "P50 µs",
            "P99 µs (MIN-MAX)",
            "P99 ALL µs",
            "FAILED",
            "HOST %"
        );
        for row in &table {
            let stat = |key: &str, at: usize| row[key][at].as_f64().unwrap_or(0.0);
            println!(
                "{:<7} {:<11} {:<14} {:>7} {:>7.0} {:>21} {:>7.0} {:>19} {:>10} {:>6} {:>7.1}",
                row["size"].as_str().unwrap_or(""),
                row["load"].as_str().unwrap_or(""),
                row["variant"].as_str().unwrap_or(""),
                row["offered"].as_f64().map_or("-".to_owned(), |o| format!("{o:.0}")),
                stat("requests_per_second", 0),
                format!(
                    "{:.1} ({:.1}-{:.1})",
                    stat("envoy_cpu_us_per_request", 0),
                    stat("envoy_cpu_us_per_request", 1),
                    stat("envoy_cpu_us_per_request", 2)
                ),
                stat("p50_us", 0),
                format!("{:.0} ({:.0}-{:.0})", stat("p99_us", 0), stat("p99_us", 1), stat("p99_us", 2)),
                row["p99_all_rounds_us"].as_f64().map_or("-".to_owned(), |p| format!("{p:.0}")),
                row["failed"],
                stat("stolen_percent", 0)
            );
        }
        println!(
            "\n(medians of {} interleaved rounds of {} s, with their min-max; P99 ALL over every round's requests; \
             every run in target/bench/runs.json)",
            options.rounds, options.seconds
        );
        let (again, over) = (
            runs.iter().filter(|r| r.attempt > 0).count(),
            runs.iter().filter(|r| r.kept && r.stolen_percent > options.steal_limit_percent).count(),
        );
        println!(
            "(HOST %: the median share of a core the host took in the rounds kept (steal time); a round over {}% \
             was run again up to {} times, the least stolen kept: {again} runs again, {over} of the rounds kept still over)",
            options.steal_limit_percent, options.steal_retries
        );
        println!(
            "\n{:<7} {:<11} {:<14}   {:>27}   {:>27}",
            "RATIOS", "", "", "TO THE NO-OP WASM FILTER", "TO ENVOY'S NATIVE TAP"
        );
        println!(
            "{:<7} {:<11} {:<14}   {:>6} {:>6} {:>6} {:>6}   {:>6} {:>6} {:>6} {:>6}",
            "SIZE", "LOAD", "VARIANT", "REQ/S", "P50", "P99", "CPU", "REQ/S", "P50", "P99", "CPU"
        );
        let ratio = |row: &serde_json::Value, to: &str, key: &str| {
            row[to][key].as_f64().map_or("-".to_owned(), |r| format!("{r:.2}"))
        };
        for row in &table {
            println!(
                "{:<7} {:<11} {:<14}   {:>6} {:>6} {:>6} {:>6}   {:>6} {:>6} {:>6} {:>6}",
                row["size"].as_str().unwrap_or(""),
                row["load"].as_str().unwrap_or(""),
                row["variant"].as_str().unwrap_or(""),
                ratio(row, "to_noop", "requests_per_second"),
                ratio(row, "to_noop", "p50_us"),
                ratio(row, "to_noop", "p99_us"),
                ratio(row, "to_noop", "envoy_cpu_us_per_request"),
                ratio(row, "to_tap", "requests_per_second"),
                ratio(row, "to_tap", "p50_us"),
                ratio(row, "to_tap", "p99_us"),
                ratio(row, "to_tap", "envoy_cpu_us_per_request"),
            );
        }
        println!("(medians over the reference's medians, same size and load)");
        // Where capture's CPU goes: the ABI's unavoidable reads, and the filter's own work.
        for ((size, load, variant), peer) in &medians {
            if variant != options.candidate_peer() {
                continue;
            }
            if let Some(candidate) = medians.get(&(size.clone(), *load, "candidate".to_owned())) {
                println!(
                    "{size} {}: candidate / {variant}: CPU µs/request {:.3} ({:+.1}), p99 {:.3}",
                    load.name(),
                    candidate.cpu_us / peer.cpu_us,
                    candidate.cpu_us - peer.cpu_us,
                    candidate.p99_us / peer.p99_us
                );
            }
        }
        for ((size, load, variant), capture) in &medians {
            if variant != "capture" {
                continue;
            }
            let of = |v: &str| medians.get(&(size.clone(), *load, v.to_owned())).map(|m| m.cpu_us);
            if let (Some(noop), Some(floor)) = (of("noop"), of("floor")) {
                println!(
                    "{size} {}: CPU µs/request above the no-op filter: read floor {:+.1}, capture {:+.1} ({:+.1} beyond the floor)",
                    load.name(),
                    floor - noop,
                    capture.cpu_us - noop,
                    capture.cpu_us - floor
                );
            }
            // What the same reads cost without the VM: the native read floor against the Wasm
            // no-op, which only crosses into the VM and back.
            if let (Some(none), Some(noop), Some(native)) = (of("none"), of("noop"), of("native-floor")) {
                println!(
                    "{size} {}: CPU µs/request above no filter: native read floor {:+.1}, Wasm no-op {:+.1}, \
                     capture {:+.1}",
                    load.name(),
                    native - none,
                    noop - none,
                    capture.cpu_us - none
                );
            }
            // The native capture: the same capture without the VM.
            if let (Some(none), Some(noop), Some(native)) = (of("none"), of("noop"), of("native-capture")) {
                println!(
                    "{size} {}: CPU µs/request above no filter: native capture {:+.1} ({:.3}x the Wasm no-op, \
                     {:.3}x capture)",
                    load.name(),
                    native - none,
                    native / noop,
                    native / capture.cpu_us
                );
            }
            // Context, not a target: what each adds to a proxy that runs no filter at all.
            if let (Some(none), Some(tap)) = (of("none"), of("tap")) {
                println!(
                    "{size} {}: CPU µs/request above no filter: capture {:+.1}, native tap {:+.1} ({:.2}x)",
                    load.name(),
                    capture.cpu_us - none,
                    tap - none,
                    (capture.cpu_us - none) / (tap - none)
                );
            }
        }
    }
    if let Some(logic) = &filter_part {
        let us = |key: &str| logic[key]["nanoseconds_per_exchange"].as_f64().unwrap_or(0.0) / 1000.0;
        println!(
            "\nthe module's own work per HTTP/1.1 exchange (1 KiB response), µs, warm / cold \
             ({} KiB evicted before each exchange):",
            FILTER_LOGIC_EVICTED_BYTES / 1024
        );
        println!(
            "  filter logic without host calls: native {:.2} / {:.2}, in V8 {:.2} / {:.2} ({:.0} bytes sent)",
            us("logic_native_warm"),
            us("logic_native_cold"),
            us("logic_v8_warm"),
            us("logic_v8_cold"),
            logic["logic_native_warm"]["bytes_sent_per_exchange"].as_f64().unwrap_or(0.0)
        );
        println!(
            "  whole module in V8, host calls answered at no cost: no-op {:.2} / {:.2}, read floor {:.2} / {:.2}, \
             capture {:.2} / {:.2}",
            us("module_noop_v8_warm"),
            us("module_noop_v8_cold"),
            us("module_floor_v8_warm"),
            us("module_floor_v8_cold"),
            us("module_capture_v8_warm"),
            us("module_capture_v8_cold")
        );
        if let Some(in_envoy) = medians
            .get(&("1KiB".to_owned(), Load::OpenHttp1, "capture".to_owned()))
            .zip(medians.get(&("1KiB".to_owned(), Load::OpenHttp1, "floor".to_owned())))
            .map(|(capture, floor)| capture.cpu_us - floor.cpu_us)
        {
            println!(
                "  capture beyond the read floor: {:.2} / {:.2} in V8 alone, {in_envoy:.1} in Envoy (open-loop HTTP/1.1): \
                 the rest is Envoy's side of the host calls and the batch stream",
                us("module_capture_v8_warm") - us("module_floor_v8_warm"),
                us("module_capture_v8_cold") - us("module_floor_v8_cold"),
            );
        }
    }
    if let Some(overload) = &overload {
        overload.print();
    }
    println!();
    for t in &summary {
        let value = t["value"].as_f64().map_or("-".to_owned(), |v| format!("{v:.3}"));
        let limit = t["limit"]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{}{v}", if t.get("at_least").is_some() { ">= " } else { "<= " }));
        let verdict = match t["pass"].as_bool() {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "----",
        };
        println!(
            "{verdict} {:<4} {:<88} {:>10} {:>10}",
            t["target"].as_str().unwrap_or(""),
            t["what"].as_str().unwrap_or(""),
            value,
            limit
        );
        let context = |key: &str, what: &str| {
            if let Some(value) = t[key].as_f64() {
                println!("     {:<4} {:<86} {value:>10.3}", "", format!("  (context) {what}"));
            }
        };
        context("a_a", "the same for a second Envoy with the no-op module (A/A: this run's resolution)");
        context("all_requests", "the same over all the rounds' requests together");
        context("all_requests_a_a", "and its A/A");
        let spread = |key: &str, what: &str| {
            if let Some([median, min, max]) =
                t[key].as_array().and_then(|s| Some([s.first()?.as_f64()?, s.get(1)?.as_f64()?, s.get(2)?.as_f64()?]))
            {
                println!(
                    "     {:<4} {:<86} {:>10}",
                    "",
                    format!("  (context) {what}, median of the rounds' own ratios ({min:.3}-{max:.3})"),
                    format!("{median:.3}")
                );
            }
        };
        spread("per_round", "the same round by round");
        spread("per_round_a_a", "and its A/A");
        if let Some([min, max]) = t["range"].as_array().and_then(|r| Some([r.first()?.as_f64()?, r.get(1)?.as_f64()?]))
        {
            println!(
                "     {:<4} {:<86} {:>10}",
                "",
                "  (context) the kept rounds' range",
                format!("{min:.1}-{max:.1}")
            );
        }
    }
    println!("\nmeasured on: {}", machine.summary());
    println!("written: {}, {}", out.join("summary.json").display(), out.join("runs.json").display());
    Ok(())
}

/// What the filter part evicts before each exchange in its cold runs: more than this
/// CPU's L2 cache per core (1 MiB), as Envoy's own work between two callbacks evicts.
const FILTER_LOGIC_EVICTED_BYTES: usize = 2 * 1024 * 1024;

/// `node exchange_cost_runner.mjs exchange_cost.wasm ARGS...`: the example in V8.
const EXCHANGE_COST_RUNNER: &str = include_str!("../js/exchange_cost_runner.mjs");

/// `node module_host.mjs MODULE.wasm EXCHANGES EVICT_BYTES`: a build of the filter module in V8,
/// driven through HTTP/1.1 exchanges by a host whose calls cost next to nothing.
const MODULE_HOST: &str = include_str!("../js/module_host.mjs");

/// Exchanges `module_host.mjs` measures warm, and cold (each after an eviction, which costs far
/// more than the exchange).
const MODULE_HOST_EXCHANGES_WARM: usize = 200_000;
const MODULE_HOST_EXCHANGES_COLD: usize = 50_000;

/// The filter part, run first and alone, on the core the proxies use later; each measurement
/// warm and cold (the caches emptied before every exchange). Context for the proxy part, which
/// measures the module inside Envoy together with Envoy's side of the host calls:
/// - the filter's logic without host calls (`filter/examples/exchange_cost.rs`), natively and
///   in V8 (Node.js, TurboFan only, as Envoy's V8 compiles);
/// - the three builds of the module (no-op, read floor, capture) in V8, driven by a host whose
///   calls cost next to nothing (`xtask/js/module_host.mjs`): all the module's own cost, the
///   SDK and the allocations for host results included.
fn filter_part(dir: &Path) -> Result<serde_json::Value> {
    let node = which("node")?;
    let native = target_dir().join("release/examples/exchange_cost");
    let wasm = target_dir().join("wasm32-wasip1/release/examples/exchange_cost.wasm");
    let (runner, host) = (dir.join("exchange_cost_runner.mjs"), dir.join("module_host.mjs"));
    std::fs::write(&runner, EXCHANGE_COST_RUNNER)?;
    std::fs::write(&host, MODULE_HOST)?;
    let in_v8 = |script: &Path| {
        let mut command = pinned(0, &node);
        command.args(["--experimental-wasi-unstable-preview1", "--no-warnings", "--no-liftoff"]).arg(script);
        command
    };
    let modules = [
        ("noop", target_dir().join("noop/wasm32-wasip1/release/packet_inspector_filter.wasm")),
        ("floor", target_dir().join("read-floor/wasm32-wasip1/release/packet_inspector_filter.wasm")),
        ("capture", tools::wasm()?),
    ];
    let mut report = serde_json::Map::new();
    for (cold, evicted) in [("warm", 0), ("cold", FILTER_LOGIC_EVICTED_BYTES)] {
        let mut runs: Vec<(String, Command)> = Vec::new();
        let mut command = pinned(0, &native);
        command.args(["--evict", &evicted.to_string()]);
        runs.push((format!("logic_native_{cold}"), command));
        let mut command = in_v8(&runner);
        command.arg(&wasm).args(["--evict", &evicted.to_string()]);
        runs.push((format!("logic_v8_{cold}"), command));
        for (variant, module) in &modules {
            let mut command = in_v8(&host);
            let exchanges = if evicted == 0 { MODULE_HOST_EXCHANGES_WARM } else { MODULE_HOST_EXCHANGES_COLD };
            command.arg(module).args([exchanges.to_string(), evicted.to_string()]);
            runs.push((format!("module_{variant}_v8_{cold}"), command));
        }
        for (key, mut command) in runs {
            let output = command.output().with_context(|| format!("running the filter part's {key}"))?;
            if !output.status.success() {
                bail!("the filter part's {key} failed: {}", String::from_utf8_lossy(&output.stderr));
            }
            let run: serde_json::Value =
                serde_json::from_slice(&output.stdout).with_context(|| format!("the filter part's {key} report"))?;
            eprintln!(
                "bench: filter part, {key}: {:.0} ns per exchange",
                run["nanoseconds_per_exchange"].as_f64().unwrap_or(0.0)
            );
            report.insert(key, run);
        }
    }
    Ok(serde_json::Value::Object(report))
}

/// The filter's and the aggregator's counters, for errors that need them.
pub fn pipeline_state(setup: &Setup) -> String {
    let filter = setup
        .under_test
        .get("capture")
        .and_then(|(_, admin, _)| admin_get(*admin, "/stats?filter=packet_inspector").ok())
        .unwrap_or_default();
    let aggregator = admin_get(setup.aggregator_admin, "/metrics").unwrap_or_default();
    let aggregator: Vec<&str> = aggregator.lines().filter(|l| !l.starts_with('#')).collect();
    format!("capture filter stats:\n{filter}\naggregator metrics:\n{}", aggregator.join("\n"))
}

/// The capture filter's configuration, for `capture` and `candidate`.
const CAPTURE_CONFIGURATION: &str =
    r#"{"cluster":"packet_inspector_aggregator","role":"consumer","flushIntervalMs":100}"#;

/// The native capture's filter, configured as [`CAPTURE_CONFIGURATION`] configures the Wasm one,
/// with its certificate from a secret service as the filter chart deploys it.
fn native_capture_filter(library: &Path, sds_socket: &Path, aggregator_port: u16) -> String {
    let settings = json!({
        "aggregator": {
            "address": format!("127.0.0.1:{aggregator_port}"),
            "serverName": "localhost",
            "sdsSocket": sds_socket,
        },
        "role": "consumer",
        "flushIntervalMs": 100,
    });
    format!(
        r#"
          - name: packet_inspector_native
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ module: {{ local: {{ filename: {} }} }}, do_not_close: true }}
              filter_name: packet_inspector
              filter_config: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: {} }}"#,
        library.display(),
        serde_json::Value::String(settings.to_string())
    )
}

/// Starts the emulator (discarding), the aggregator, the upstream and the Envoys under test.
fn start(dir: &Path, options: &Options) -> Result<Setup> {
    let mut bench = Bench { dir: dir.to_owned(), processes: Vec::new() };
    let release = target_dir().join("release");
    let capture_module = tools::wasm()?;
    let noop_module = target_dir().join("noop/wasm32-wasip1/release/packet_inspector_filter.wasm");
    let floor_module = target_dir().join("read-floor/wasm32-wasip1/release/packet_inspector_filter.wasm");
    let native_capture = release.join("libpacket_inspector_native_capture.so");
    for module in [&noop_module, &floor_module] {
        if !module.is_file() {
            bail!("{} is missing (cargo xtask bench builds it)", module.display());
        }
    }

    // Certificates, the emulator (discarding) and the aggregator, off the measured core.
    let ca = Ca::new("bench mesh CA")?;
    let certs = ca.issue(&dir.join("certs"), &["localhost"])?;
    // What Istio's node agent is to the native capture: its certificate over SDS.
    let secrets = packet_inspector_tests::sds::SdsServer::start(&dir.join("sds.sock"), &certs)?;
    let (emulator_port, aggregator_port, aggregator_admin) = (free_port()?, free_port()?, free_port()?);
    spawn_emulator(&mut bench, &release, &certs, emulator_port, 0)?;
    let mut aggregator = pinned_idle(1, &release.join("packet-inspector-aggregator"));
    aggregator
        .args([
            "--listen",
            &format!("127.0.0.1:{aggregator_port}"),
            "--admin-listen",
            &format!("127.0.0.1:{aggregator_admin}"),
        ])
        .arg(format!("--tls-cert={}", certs.join("cert-chain.pem").display()))
        .arg(format!("--tls-key={}", certs.join("key.pem").display()))
        .arg(format!("--client-ca={}", certs.join("root-cert.pem").display()))
        .arg(format!("--analysis-ca={}", certs.join("root-cert.pem").display()))
        .args(["--analysis-address", &format!("localhost:{emulator_port}")])
        .env("RUST_LOG", "warn");
    let aggregator_pid = bench.spawn("aggregator", aggregator)?;
    wait_for("the aggregator", Duration::from_secs(30), || admin_get(aggregator_admin, "/healthz").ok())?;

    // The upstream: one listener per body size, answering directly.
    let upstream_admin = free_port()?;
    let upstream_ports: Vec<u16> = SIZES.iter().map(|_| free_port()).collect::<Result<_>>()?;
    let mut upstream = format!("admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_admin} }} }} }}\nstatic_resources:\n  listeners:");
    for ((size, bytes), port) in SIZES.iter().zip(&upstream_ports) {
        upstream.push_str(&format!(
            r#"
  - name: upstream_{size}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: upstream
          route_config:
            max_direct_response_body_size_bytes: 1048576
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, direct_response: {{ status: 200, body: {{ inline_string: "{}" }} }} }}] }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#,
            "x".repeat(*bytes)
        ));
    }
    bench.envoy("upstream", &upstream, 1, upstream_admin)?;

    // The Envoys under test, all on core 0 (one is loaded at a time).
    let tap_dir = TapDir::create(dir)?;
    let mut under_test = BTreeMap::new();
    let mut wanted: Vec<&str> = VARIANTS.iter().copied().filter(|v| options.variants.iter().any(|w| w == v)).collect();
    if options.parts.iter().any(|p| !["filter", "proxy", "ingest"].contains(&p.as_str()))
        && !wanted.contains(&"capture")
    {
        wanted.push("capture");
    }
    // The tap keeps as much of each body as capture does: by default it keeps 1 KiB and marks
    // the rest truncated, which at 64 KiB compared capture's whole bodies with the tap's first KiB.
    let body_bytes = packet_inspector_filter::config::Config::from_json(CAPTURE_CONFIGURATION.as_bytes())
        .map_err(|err| anyhow::anyhow!("capture's configuration: {err}"))?
        .max_body_bytes;
    for variant in wanted {
        let filters = match variant {
            "none" => String::new(),
            "noop" | "noop-twin" => wasm_filter(&noop_module, "{}"),
            "floor" => wasm_filter(&floor_module, "{}"),
            "native-floor" => format!(
                r#"
          - name: native_floor
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ module: {{ local: {{ filename: {} }} }} }}
              filter_name: native_floor"#,
                release.join("libpacket_inspector_native_floor.so").display()
            ),
            "capture" => wasm_filter(&capture_module, CAPTURE_CONFIGURATION),
            "native-capture" => native_capture_filter(&native_capture, &secrets.socket, aggregator_port),
            "candidate" if options.native_candidate() => native_capture_filter(
                options.candidate.as_deref().unwrap_or(&native_capture),
                &secrets.socket,
                aggregator_port,
            ),
            "candidate" => wasm_filter(
                options.candidate.as_deref().unwrap_or(&capture_module),
                options.candidate_configuration.as_deref().unwrap_or(CAPTURE_CONFIGURATION),
            ),
            _ => format!(
                r#"
          - name: envoy.filters.http.tap
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.tap.v3.Tap
              common_config:
                static_config:
                  match: {{ any_match: true }}
                  output_config:
                    max_buffered_rx_bytes: {body_bytes}
                    max_buffered_tx_bytes: {body_bytes}
                    sinks:
                    - format: JSON_BODY_AS_BYTES
                      file_per_tap: {{ path_prefix: {}/{variant} }}"#,
                tap_dir.0.display()
            ),
        };
        let admin = free_port()?;
        let ports: Vec<u16> = SIZES.iter().map(|_| free_port()).collect::<Result<_>>()?;
        let mut config = format!(
            "node: {{ id: bench, cluster: bench, metadata: {{ NAME: bench-client-0, NAMESPACE: bench, WORKLOAD_NAME: bench-client }} }}\n\
             admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}\nstatic_resources:\n  listeners:"
        );
        for ((size, _), port) in SIZES.iter().zip(&ports) {
            config.push_str(&listener(&format!("{variant}_{size}"), *port, &format!("upstream_{size}"), &filters));
        }
        config.push_str("\n  clusters:");
        for ((size, _), port) in SIZES.iter().zip(&upstream_ports) {
            config.push_str(&static_cluster(&format!("upstream_{size}"), *port));
        }
        config.push_str(&format!(
            r#"
  - name: packet_inspector_aggregator
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: packet_inspector_aggregator
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {aggregator_port} }} }} }} }}] }}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: [h2]
          tls_certificates: [{{ certificate_chain: {{ filename: {0}/cert-chain.pem }}, private_key: {{ filename: {0}/key.pem }} }}]
          validation_context: {{ trusted_ca: {{ filename: {0}/root-cert.pem }} }}"#,
            certs.display()
        ));
        let pid = bench.envoy(&format!("envoy-{variant}"), &config, 0, admin)?;
        // The Wasm filter has a stream per root context (the worker's and the main thread's),
        // the native capture one per worker, whatever the number of listeners (they share it).
        let streams = match variant {
            "capture" => Some("streams_ready: 2"),
            // Another build of capture, or of anything else (the no-op module, for an A/A of the
            // method): a module that defines no such counter opens no stream to wait for.
            "candidate" if options.native_candidate() => Some("streams_ready: 1\n"),
            "candidate" => admin_get(admin, "/stats?filter=streams_ready")
                .is_ok_and(|s| s.contains("streams_ready"))
                .then_some("streams_ready: 2"),
            "native-capture" => Some("streams_ready: 1\n"),
            _ => None,
        };
        if let Some(streams) = streams {
            wait_for("the capture filter's streams", Duration::from_secs(30), || {
                admin_get(admin, "/stats?filter=streams_ready").ok().filter(|s| s.contains(streams))
            })?;
        }
        under_test.insert(variant.to_owned(), (pid, admin, ports));
    }
    Ok(Setup {
        dir: dir.to_owned(),
        bench,
        certs,
        release,
        emulator_port,
        aggregator_port,
        aggregator_admin,
        aggregator_pid,
        under_test,
        tap_dir,
        _secrets: secrets,
    })
}

/// The analysis emulator, discarding what it receives, on core 1; taking at most
/// `max_captures_per_second` (0: as many as it is sent).
pub fn spawn_emulator(
    bench: &mut Bench,
    release: &Path,
    certs: &Path,
    port: u16,
    max_captures_per_second: u32,
) -> Result<u32> {
    let mut emulator = pinned_idle(1, &release.join("packet-inspector-analysis-emulator"));
    emulator
        .args(["--listen", &format!("127.0.0.1:{port}"), "--discard"])
        .args(["--max-captures-per-second", &max_captures_per_second.to_string()])
        .arg("--tls-cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("--tls-key")
        .arg(certs.join("key.pem"))
        .arg("--output-dir")
        .arg(&bench.dir);
    let pid = bench.spawn("emulator", emulator)?;
    wait_for("the emulator", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).ok())?;
    Ok(pid)
}

/// Replaces the discarding emulator with another on the same port, taking at most
/// `max_captures_per_second` (0: no limit); returns its pid.
pub fn restart_emulator(setup: &mut Setup, max_captures_per_second: u32) -> Result<u32> {
    if let Some(index) = setup.bench.processes.iter().position(|p| p.name == "emulator") {
        setup.bench.processes.remove(index).stop(Duration::from_secs(10));
    }
    spawn_emulator(&mut setup.bench, &setup.release, &setup.certs, setup.emulator_port, max_captures_per_second)
}

/// Runs `wrk` (closed loop) on core 1.
pub fn wrk(port: u16, connections: u32, seconds: u64) -> Result<LoadResult> {
    let output = pinned(1, &which("wrk")?)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse_wrk(&String::from_utf8_lossy(&output.stdout))
}

/// Runs `h2load` (HTTP/2 over cleartext) on core 1 at `rate` requests/s in total over
/// `connections` connections.
fn h2load(dir: &Path, port: u16, connections: u32, rate: f64, seconds: u64) -> Result<LoadResult> {
    let log = dir.join("h2load.log");
    let mut command = pinned(1, &which("h2load")?);
    command
        .args(["-c", &connections.to_string(), "-m", "1", "-t", "1", "-D", &seconds.to_string()])
        .arg(format!("--rps={:.3}", rate / f64::from(connections)))
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://127.0.0.1:{port}/"));
    let output = command.output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("h2load failed: {}{stdout}", String::from_utf8_lossy(&output.stderr));
    }
    let result = parse_h2load(&stdout, &std::fs::read_to_string(&log).unwrap_or_default());
    let _ = std::fs::remove_file(&log);
    result
}

/// The order the variants run in, in one round. The variants compared as pairs swap places
/// every other round (`candidate` and the variant it is a build of, `noop` and `noop-twin`): in a run where the
/// same module was loaded as both capture and candidate (an A/A), the second of the two cost
/// 1.1-2.6 µs more per request (median of five paired rounds, by load), which would be taken
/// for the change being measured. Over an even number of rounds the bias cancels.
fn round_order<'a>(variants: &[&'a str], round: usize, candidate_peer: &str) -> Vec<&'a str> {
    let mut order = variants.to_vec();
    for (a, b) in [(candidate_peer, "candidate"), ("noop", "noop-twin")] {
        let at = |name: &str| order.iter().position(|v| *v == name);
        if let (Some(a), Some(b), true) = (at(a), at(b), round % 2 == 1) {
            order.swap(a, b);
        }
    }
    order
}

/// The proxy part: closed loop to find each variant's capacity, then the same fixed rate for
/// every variant over HTTP/1.1 and HTTP/2.
///
/// `latencies` collects every answered request's latency per (size, load, variant), over the
/// rounds kept, for the p99 of all their requests together (`P99 ALL`). P2 takes the median of
/// the rounds' p99s instead: this machine stalls for tens of milliseconds now and then, whatever
/// runs, and a stall in one round decides a pooled p99. Rerunning the rounds the host took most
/// from (steal time; see [`least_stolen`]) does not remove them: in an A/A of two Envoys with the
/// same no-op module, interleaved, the pooled p99s came out 0.35x apart and the medians of the
/// rounds' p99s 1.13x (16 rounds of 2 s), and a steal timeline sampled every 5 ms marked 1-1.5% of
/// the requests, whose removal left the stalled rounds' p99s where they were. `noop-twin` repeats
/// that A/A in every run, so that P1 and P2 come with the resolution of their own run.
fn proxy(
    setup: &Setup,
    options: &Options,
    runs: &mut Vec<Run>,
    latencies: &mut BTreeMap<(String, Load, String), Vec<f64>>,
) -> Result<()> {
    let tick_us = 1_000_000.0 / ticks_per_second();
    let variants: Vec<&str> = VARIANTS.iter().copied().filter(|v| options.variants.iter().any(|w| w == v)).collect();
    let sizes: Vec<(usize, &str)> = SIZES
        .iter()
        .enumerate()
        .filter(|(_, (s, _))| options.sizes.iter().any(|w| w == s))
        .map(|(i, (s, _))| (i, *s))
        .collect();
    eprintln!("bench: warming up");
    for variant in &variants {
        for (index, _) in &sizes {
            wrk(setup.under_test[*variant].2[*index], options.connections, 1)?;
        }
    }
    for (index, size) in sizes {
        let mut rate = None;
        for load in Load::ALL {
            if load != Load::Closed && rate.is_none() {
                // Half the slowest variant's capacity: every variant keeps up, none idles.
                let slowest = runs
                    .iter()
                    .filter(|r| r.kept && r.size == size && r.load == Load::Closed)
                    .map(|r| r.requests_per_second)
                    .fold(f64::MAX, f64::min);
                rate = Some((slowest / 2.0).floor().max(1.0));
            }
            // Every (round, variant) once, interleaved; then again those the host took too much
            // from (see `measure_in_passes`).
            let slots: Vec<(usize, &str)> = (0..options.rounds)
                .flat_map(|round| {
                    round_order(&variants, round, options.candidate_peer()).into_iter().map(move |v| (round, v))
                })
                .collect();
            let measured = measure_in_passes(
                slots,
                options.steal_limit_percent,
                options.steal_retries,
                "runs",
                |(run, _): &Measured| run.stolen_percent,
                |&(round, variant), attempt| {
                    Attempt { size, index, load, rate, variant, round, attempt }.measure(setup, options, tick_us)
                },
            )?;
            for ((_, variant), attempts, kept) in measured {
                for (at, (mut run, round_latencies)) in attempts.into_iter().enumerate() {
                    if at == kept {
                        run.kept = true;
                        latencies
                            .entry((size.to_owned(), load, variant.to_owned()))
                            .or_default()
                            .extend(round_latencies);
                    }
                    runs.push(run);
                }
            }
        }
    }
    Ok(())
}

/// A run and its requests' latencies (µs).
type Measured = (Run, Vec<f64>);

/// One load run of a proxy round.
struct Attempt<'a> {
    size: &'a str,
    /// Which of [`SIZES`] (the listener port's index).
    index: usize,
    load: Load,
    /// Requests/s for the fixed-rate loads.
    rate: Option<f64>,
    variant: &'a str,
    round: usize,
    attempt: usize,
}

impl Attempt<'_> {
    /// Runs the load against the variant's Envoy; returns the run (not yet kept) and its
    /// requests' latencies.
    fn measure(&self, setup: &Setup, options: &Options, tick_us: f64) -> Result<Measured> {
        let (pid, _, ports) = &setup.under_test[self.variant];
        let port = ports[self.index];
        let rate = self.rate.unwrap_or(1.0);
        let before = cpu_ticks(*pid)?;
        let steal = StealClock::start()?;
        let result = match self.load {
            Load::Closed => wrk(port, options.connections, options.seconds)?,
            Load::OpenHttp1 => crate::openloop::run(port, options.connections, rate, options.seconds)?,
            Load::FixedHttp2 => h2load(&setup.dir, port, options.connections, rate, options.seconds)?,
        };
        let cpu_us = (cpu_ticks(*pid)? - before) as f64 * tick_us;
        let (steal_ms, stolen_percent) = steal.read()?;
        let run = Run {
            size: self.size.to_owned(),
            load: self.load,
            variant: self.variant.to_owned(),
            round: self.round,
            attempt: self.attempt,
            kept: false,
            offered: if self.load == Load::Closed { None } else { self.rate },
            requests: result.requests,
            failed: result.failed,
            requests_per_second: result.requests_per_second,
            p50_us: result.p50_us,
            p99_us: result.p99_us,
            envoy_cpu_us_per_request: cpu_us / result.requests.max(1) as f64,
            steal_ms,
            stolen_percent,
        };
        eprintln!(
            "bench: {:5} {:8} round {} {:12} {:>8.0} req/s  p50 {:>7.0} µs  p99 {:>7.0} µs  {:>6.1} µs CPU/req  {} failed  host took {:.1}%{}",
            run.size,
            self.load.name(),
            run.round,
            run.variant,
            run.requests_per_second,
            run.p50_us,
            run.p99_us,
            run.envoy_cpu_us_per_request,
            run.failed,
            run.stolen_percent,
            if self.attempt > 0 { format!(" (again, {})", self.attempt) } else { String::new() }
        );
        if self.variant == "tap" {
            setup.tap_dir.flush()?;
        }
        Ok((run, result.latencies_us))
    }
}

pub fn which(program: &str) -> Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{
        least_stolen, measure_in_passes, per_round_ratio, round_order, steal_of, stolen_percent, Load, Run, Spread,
    };

    #[test]
    fn steal_is_read_per_core_and_the_least_stolen_attempt_counts() {
        let stat = "cpu  2178742 56 550614 2213604 30240 0 95854 225320 0 0\n\
                    cpu0 1097806 0 257360 1133329 6307 0 43621 107675 0 0\n\
                    cpu1 1080935 56 293254 1080274 23932 0 52232 117645 0 0\nintr 1 2\n";
        assert_eq!(steal_of(stat).unwrap(), [107675, 117645]);
        assert!(steal_of("cpu  1 2 3 4 5 6 7 8\ncpu0 1 2 3 4 5 6 7 8\n").is_err(), "no cpu1");
        assert!(steal_of("cpu0 1 2 3\ncpu1 1 2 3\n").is_err(), "no steal column");
        // 10 s runs: the more stolen core counts, as a share of the run.
        assert_eq!(stolen_percent([300.0, 1200.0], Duration::from_secs(10)), 12.0);
        assert_eq!(stolen_percent([19_700.0, 0.0], Duration::from_secs(25)), 78.8, "never more than the run");
        assert_eq!(least_stolen([12.0, 3.5, 7.0]), 1);
        assert_eq!(least_stolen([4.0, 4.0]), 0, "the first of equals");
        assert_eq!(least_stolen([2.0]), 0);
    }

    #[test]
    fn a_spread_is_the_median_and_the_range_of_the_kept_rounds() {
        let spread = Spread::of(vec![274.0, 249.0, 301.0, 262.0, 280.0]).unwrap();
        assert_eq!((spread.median, spread.min, spread.max), (274.0, 249.0, 301.0));
        assert!(Spread::of(Vec::new()).is_none(), "no kept round, no figure");
    }

    #[test]
    fn runs_the_host_took_too_much_from_are_run_again_later_and_the_least_stolen_counts() {
        // What the host takes from each (slot, attempt): slot "a" is calm, "b" busy twice then
        // calm, "c" busy every time.
        let steal = |slot: &str, attempt: usize| match (slot, attempt) {
            ("a", _) => 0.5,
            ("b", 0) => 9.0,
            ("b", 1) => 4.0,
            ("b", _) => 1.0,
            _ => 30.0 - attempt as f64,
        };
        let mut order = Vec::new();
        let measured = measure_in_passes(
            vec!["a", "b", "c"],
            2.0,
            2,
            "runs",
            |s: &f64| *s,
            |slot, attempt| {
                order.push((*slot, attempt));
                Ok(steal(slot, attempt))
            },
        )
        .unwrap();
        // Every slot once first; then only those still over the limit, a pass at a time.
        assert_eq!(order, [("a", 0), ("b", 0), ("c", 0), ("b", 1), ("c", 1), ("b", 2), ("c", 2)]);
        let kept: Vec<(&str, usize, usize)> =
            measured.iter().map(|(slot, runs, kept)| (*slot, runs.len(), *kept)).collect();
        assert_eq!(kept, [("a", 1, 0), ("b", 3, 2), ("c", 3, 2)], "c never gets under: its least stolen counts");
        assert!(
            measure_in_passes(vec![1], 2.0, 2, "runs", |s: &f64| *s, |_, _| anyhow::bail!("no load generator"))
                .is_err(),
            "a failed measurement fails the part"
        );
    }

    #[test]
    fn per_round_ratios_pair_each_round_kept_by_both_variants() {
        let run = |variant: &str, round: usize, kept: bool, cpu: f64| Run {
            size: "1KiB".to_owned(),
            load: Load::OpenHttp1,
            variant: variant.to_owned(),
            round,
            offered: Some(1000.0),
            requests: 2000,
            failed: 0,
            requests_per_second: 1000.0,
            p50_us: 100.0,
            p99_us: 1000.0,
            envoy_cpu_us_per_request: cpu,
            steal_ms: [0.0, 0.0],
            stolen_percent: 0.0,
            attempt: 0,
            kept,
        };
        // The machine slows down over the run: both variants' medians move, their pairs do not.
        let runs = vec![
            run("noop", 0, true, 50.0),
            run("capture", 0, true, 60.0),
            run("noop", 1, true, 100.0),
            run("capture", 1, false, 500.0),
            run("capture", 1, true, 110.0),
            run("noop", 2, true, 200.0),
            run("capture", 2, true, 260.0),
            run("capture", 3, true, 900.0),
            Run { size: "64KiB".to_owned(), ..run("noop", 3, true, 1.0) },
        ];
        let cpu = |r: &Run| r.envoy_cpu_us_per_request;
        let spread = per_round_ratio(&runs, "1KiB", Load::OpenHttp1, "capture", "noop", cpu).unwrap();
        // Rounds 0-2 pair (1.2, 1.1, 1.3); the unkept attempt, the unpaired round 3 and the other
        // size do not count.
        assert_eq!((spread.median, spread.min, spread.max), (1.2, 1.1, 1.3));
        assert!(per_round_ratio(&runs, "1KiB", Load::Closed, "capture", "noop", cpu).is_none());
    }

    #[test]
    fn rows_get_their_ratios_to_noop_and_tap_of_the_same_size_and_load() {
        let row = |size: &str, load: &str, variant: &str, cpu: f64| {
            serde_json::json!({"size": size, "load": load, "variant": variant, "requests_per_second": [1000.0, 0, 0],
                "p50_us": [100.0, 0, 0], "p99_us": [cpu * 10.0, 0, 0], "envoy_cpu_us_per_request": [cpu, 1.0, 2.0]})
        };
        let mut table = vec![
            row("1KiB", "closed", "noop", 50.0),
            row("1KiB", "closed", "capture", 75.0),
            row("1KiB", "closed", "tap", 150.0),
            row("1KiB", "open-http1", "noop", 100.0),
            row("1KiB", "open-http1", "capture", 130.0),
        ];
        super::add_ratios(&mut table);
        assert_eq!(table[1]["to_noop"]["envoy_cpu_us_per_request"], 1.5);
        assert_eq!(table[1]["to_noop"]["p99_us"], 1.5);
        assert_eq!(table[1]["to_noop"]["requests_per_second"], 1.0);
        assert_eq!(table[1]["to_tap"]["envoy_cpu_us_per_request"], 0.5);
        assert_eq!(table[0]["to_noop"]["envoy_cpu_us_per_request"], 1.0);
        assert_eq!(table[4]["to_noop"]["envoy_cpu_us_per_request"], 1.3, "the open loop's own no-op");
        assert!(table[4]["to_tap"].is_null(), "no tap ran under that load");
    }

    #[test]
    fn paired_variants_swap_places_every_other_round() {
        let all = ["none", "noop", "floor", "capture", "candidate", "noop-twin", "tap"];
        assert_eq!(round_order(&all, 0, "capture"), all);
        assert_eq!(
            round_order(&all, 1, "capture"),
            ["none", "noop-twin", "floor", "candidate", "capture", "noop", "tap"]
        );
        assert_eq!(round_order(&all, 2, "capture"), all);
        let without = ["noop", "capture", "tap"];
        assert_eq!(round_order(&without, 1, "capture"), without, "nothing to swap without a candidate");
        let native = ["noop", "native-capture", "capture", "candidate"];
        assert_eq!(
            round_order(&native, 1, "native-capture"),
            ["noop", "candidate", "capture", "native-capture"],
            "a native candidate swaps with the native capture"
        );
    }
}
