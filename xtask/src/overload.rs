//! The benchmark's overload part: captures offered at ten times (or more) what the pipeline
//! sustains, and the analysis service stopped (SIGSTOP) for `--stall-seconds` in the middle.
//!
//! One Envoy core cannot offer ten times what the aggregator and emulator forward on this
//! machine's other core, so the part sets what the pipeline sustains instead: a short
//! closed-loop probe measures what the capture proxy takes, and the emulator is restarted taking
//! at most a sixteenth of that (`--max-captures-per-second`; a slower analysis tool, as
//! third-party ones may be). `wrk` then drives the capture proxy as fast as it goes (closed loop) for the
//! lead, the stall, and a tail after the resume (SIGCONT). Sampled every 100 ms: aggregator and
//! Envoy RSS, the aggregator's forwarding queue and counters. Reported: peaks, requests that
//! failed, drops by stage (filter, aggregator queue, forwarding given up) checked against the
//! requests the filter saw, the load as a multiple of the pace the pipeline kept before the
//! stall, and the recovery time: from the resume until captures reach the analysis service as
//! fast as before the stall again (over one second, at least 80% of the pre-stall pace). The
//! unlimited emulator is back when the part ends.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use packet_inspector_tests::{mesh::admin_get, wait_for};
use serde_json::json;

use crate::bench::{rss_bytes, wrk, Options, Setup};

/// Load before the stall, so the stall starts from a steady state.
const LEAD_SECONDS: u64 = 5;
/// Load after the resume; recovery must happen within it.
const TAIL_SECONDS: u64 = 15;
/// The closed-loop probe of what the capture proxy takes.
const PROBE_SECONDS: u64 = 3;
/// Offered load over the analysis service's pace: above the 10 the overload is specified at,
/// with room for the load to come out lower than the probe's (it came out at 0.72x the probe in
/// a full run, 8.6x the pace with a twelfth).
const OVERLOAD_FACTOR: f64 = 16.0;

#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    at_seconds: f64,
    aggregator_rss: u64,
    envoy_rss: u64,
    forward_queue: u64,
    forwarded: u64,
    queue_full: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Overload {
    stall_seconds: u64,
    /// What the capture proxy took in the probe (requests/s).
    probe_requests_per_second: f64,
    /// The analysis service's `--max-captures-per-second`.
    service_pace: u32,
    load_seconds: u64,
    requests: u64,
    failed_requests: u64,
    requests_per_second: f64,
    /// RSS of the no-capture Envoy (the no-op Wasm variant when it ran, else the capture Envoy
    /// before this part).
    envoy_baseline_rss: u64,
    envoy_peak_rss: u64,
    aggregator_peak_rss: u64,
    /// Captures the filter dropped (its buffer was full or the stream down).
    filter_captures_dropped: u64,
    /// Captures the aggregator dropped at its full forwarding queue.
    aggregator_queue_full: u64,
    /// Captures the aggregator gave up forwarding after retries.
    aggregator_forward_failed: u64,
    /// Captures delivered to the analysis service.
    forwarded: u64,
    /// Requests the filter saw, minus everything above (and what the aggregator refused or
    /// could not build): zero when every capture is either delivered or counted as dropped.
    unaccounted: i64,
    /// Captures forwarded per second before the stall (the pipeline's pace under this load).
    forwarded_per_second_before: f64,
    /// Seconds from the resume until a one-second window forwarded at least 80% of the
    /// pre-stall pace; `None` if none did within the load's tail.
    recovery_seconds: Option<f64>,
    samples: Vec<Sample>,
}

/// Captures forwarded per second from the first second of load to the stall.
fn pace(samples: &[Sample]) -> f64 {
    let first = samples.iter().find(|s| s.at_seconds >= 1.0);
    let last = samples.iter().rev().find(|s| s.at_seconds <= LEAD_SECONDS as f64);
    match (first, last) {
        (Some(first), Some(last)) if last.at_seconds > first.at_seconds => {
            (last.forwarded - first.forwarded) as f64 / (last.at_seconds - first.at_seconds)
        }
        _ => 0.0,
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("packet_inspector_aggregator_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn envoy_counter(admin: u16, name: &str) -> Result<u64> {
    let text = admin_get(admin, &format!("/stats?filter={name}$"))?;
    Ok(text.lines().filter_map(|l| l.split_once(": ")?.1.trim().parse::<u64>().ok()).sum())
}

/// Sends SIGCONT when dropped, so an error never leaves the analysis service stopped.
struct Stopped(u32);

impl Stopped {
    fn stop(pid: u32) -> Result<Self> {
        signal(pid, "STOP")?;
        Ok(Self(pid))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal(self.0, "CONT");
    }
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

pub fn run(setup: &mut Setup, options: &Options) -> Result<Overload> {
    let (envoy_pid, envoy_admin, ports) =
        setup.under_test.get("capture").context("overload needs the capture variant")?.clone();
    let (port, connections) = (ports[0], options.connections);
    crate::ingest::wait_drained(setup.aggregator_admin).with_context(|| crate::bench::pipeline_state(setup))?;
    let probe = wrk(port, connections, PROBE_SECONDS)?;
    if probe.requests_per_second < OVERLOAD_FACTOR {
        bail!(
            "the capture proxy took {:.0} requests/s in the overload probe: too few to overload",
            probe.requests_per_second
        );
    }
    let service_pace = (probe.requests_per_second / OVERLOAD_FACTOR) as u32;
    eprintln!(
        "bench: overload: the capture proxy takes {:.0} requests/s; the analysis service now takes at most {service_pace} captures/s",
        probe.requests_per_second
    );
    let pacing = Pacing {
        emulator_pid: crate::bench::restart_emulator(setup, service_pace)?,
        probe_requests_per_second: probe.requests_per_second,
        service_pace,
    };
    let result = overload(setup, options, (envoy_pid, envoy_admin, port), &pacing);
    // The parts after this one need a service that takes everything.
    crate::bench::restart_emulator(setup, 0)?;
    result
}

/// The paced analysis service of the overload.
struct Pacing {
    emulator_pid: u32,
    probe_requests_per_second: f64,
    service_pace: u32,
}

fn overload(
    setup: &mut Setup,
    options: &Options,
    (envoy_pid, envoy_admin, port): (u32, u16, u16),
    pacing: &Pacing,
) -> Result<Overload> {
    crate::ingest::wait_drained(setup.aggregator_admin).with_context(|| crate::bench::pipeline_state(setup))?;
    let envoy_baseline_rss = match setup.under_test.get("noop") {
        Some((pid, ..)) => rss_bytes(*pid)?,
        None => rss_bytes(envoy_pid)?,
    };
    let aggregator_before = admin_get(setup.aggregator_admin, "/metrics")?;
    let filter_started_before = envoy_counter(envoy_admin, "packet_inspector.captures_started")?;
    let filter_dropped_before = envoy_counter(envoy_admin, "packet_inspector.captures_dropped")?;

    let stall = options.stall_seconds;
    let load_seconds = LEAD_SECONDS + stall + TAIL_SECONDS;
    let connections = options.connections;
    eprintln!("bench: overload: {load_seconds} s of closed-loop load, the analysis service stopped for {stall} s");
    let load = std::thread::spawn(move || wrk(port, connections, load_seconds));

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut stopped = None;
    let mut resumed_at = None;
    let mut recovery_seconds = None;
    while started.elapsed() < Duration::from_secs(load_seconds) {
        let at = started.elapsed().as_secs_f64();
        if stopped.is_none() && resumed_at.is_none() && at >= LEAD_SECONDS as f64 {
            stopped = Some(Stopped::stop(pacing.emulator_pid)?);
            eprintln!("bench: overload: analysis service stopped");
        }
        if stopped.is_some() && at >= (LEAD_SECONDS + stall) as f64 {
            drop(stopped.take());
            resumed_at = Some(at);
            eprintln!("bench: overload: analysis service resumed");
        }
        let metrics = admin_get(setup.aggregator_admin, "/metrics").unwrap_or_default();
        let sample = Sample {
            at_seconds: at,
            aggregator_rss: rss_bytes(setup.aggregator_pid).unwrap_or(0),
            envoy_rss: rss_bytes(envoy_pid).unwrap_or(0),
            forward_queue: metric(&metrics, "forward_queue_captures"),
            forwarded: metric(&metrics, "captures_forwarded_total"),
            queue_full: metric(&metrics, "captures_queue_full_total"),
        };
        samples.push(sample);
        if let (Some(resumed), None) = (resumed_at, recovery_seconds) {
            let window = samples.iter().rev().find(|s| s.at_seconds <= at - 1.0 && s.at_seconds >= resumed);
            if let (Some(window), Some(last)) = (window, samples.last()) {
                let rate = (last.forwarded - window.forwarded) as f64 / (last.at_seconds - window.at_seconds);
                if rate >= 0.8 * pace(&samples) {
                    recovery_seconds = Some(at - resumed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stopped);
    let result = load.join().map_err(|_| anyhow::anyhow!("the wrk thread panicked"))??;

    // Let the pipeline settle, then balance the books.
    crate::ingest::wait_drained(setup.aggregator_admin).with_context(|| crate::bench::pipeline_state(setup))?;
    let after = admin_get(setup.aggregator_admin, "/metrics")?;
    let delta = |name: &str| metric(&after, name).saturating_sub(metric(&aggregator_before, name));
    let filter_captures_dropped =
        envoy_counter(envoy_admin, "packet_inspector.captures_dropped")? - filter_dropped_before;
    let started_captures = envoy_counter(envoy_admin, "packet_inspector.captures_started")? - filter_started_before;
    let (aggregator_queue_full, aggregator_forward_failed, forwarded) =
        (delta("captures_queue_full_total"), delta("captures_forward_failed_total"), delta("captures_forwarded_total"));
    // Every request the filter saw was started or dropped at once; every started capture was
    // built, or refused/unbuildable at the aggregator, or lost with its batch (counted by the
    // filter as dropped). Built ones were forwarded, dropped at the queue, or failed.
    let seen = started_captures + filter_captures_dropped;
    let accounted = forwarded
        + aggregator_queue_full
        + aggregator_forward_failed
        + delta("captures_unbuildable_total")
        + filter_captures_dropped;
    let _ = wait_for("the emulator to answer again", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", setup.emulator_port)).ok()
    });
    Ok(Overload {
        stall_seconds: stall,
        probe_requests_per_second: pacing.probe_requests_per_second,
        service_pace: pacing.service_pace,
        load_seconds,
        requests: result.requests,
        failed_requests: result.failed,
        requests_per_second: result.requests_per_second,
        envoy_baseline_rss,
        envoy_peak_rss: samples.iter().map(|s| s.envoy_rss).max().unwrap_or(0),
        aggregator_peak_rss: samples.iter().map(|s| s.aggregator_rss).max().unwrap_or(0),
        filter_captures_dropped,
        aggregator_queue_full,
        aggregator_forward_failed,
        forwarded,
        unaccounted: seen as i64 - accounted as i64,
        forwarded_per_second_before: pace(&samples),
        recovery_seconds,
        samples,
    })
}

const MIB: f64 = 1024.0 * 1024.0;

impl Overload {
    pub fn targets(&self) -> Vec<serde_json::Value> {
        let growth = self.envoy_peak_rss.saturating_sub(self.envoy_baseline_rss) as f64 / MIB;
        vec![
            json!({"target": "P4", "what": "overload: offered load / the pace the pipeline kept before the stall",
                "value": self.load_factor(), "limit": 10.0, "at_least": true}),
            json!({"target": "P4", "what": "overload: aggregator peak RSS (MiB)", "value": self.aggregator_peak_rss as f64 / MIB, "limit": 256.0}),
            json!({"target": "P4", "what": "overload: Envoy peak RSS over the no-capture Envoy (MiB)", "value": growth, "limit": 32.0}),
            json!({"target": "P4", "what": "overload: failed client requests", "value": self.failed_requests, "limit": 0.0}),
            json!({"target": "P4", "what": "overload: captures neither delivered nor counted as dropped", "value": self.unaccounted.unsigned_abs(), "limit": 0.0}),
            json!({"target": "P4", "what": "overload: recovery after the stall (s)", "value": self.recovery_seconds, "limit": 5.0}),
        ]
    }

    /// The load over the pace the pipeline kept before the stall.
    fn load_factor(&self) -> f64 {
        self.requests_per_second / self.forwarded_per_second_before.max(1.0)
    }

    pub fn print(&self) {
        println!(
            "\noverload: {} s stall in {} s of closed-loop load: {} requests ({:.0}/s), {} failed; \
             Envoy RSS {:.1} MiB peak (no-capture Envoy {:.1} MiB), aggregator RSS {:.1} MiB peak; \
             captures forwarded {} ({:.0}/s before the stall), dropped by the filter {}, at the \
             aggregator's queue {}, given up {}; unaccounted {}; load {:.1}x the pipeline's pace \
             (the service paced at {}/s, the proxy probed at {:.0}/s); recovery {}",
            self.stall_seconds,
            self.load_seconds,
            self.requests,
            self.requests_per_second,
            self.failed_requests,
            self.envoy_peak_rss as f64 / MIB,
            self.envoy_baseline_rss as f64 / MIB,
            self.aggregator_peak_rss as f64 / MIB,
            self.forwarded,
            self.forwarded_per_second_before,
            self.filter_captures_dropped,
            self.aggregator_queue_full,
            self.aggregator_forward_failed,
            self.unaccounted,
            self.load_factor(),
            self.service_pace,
            self.probe_requests_per_second,
            self.recovery_seconds.map_or("none within the load".to_owned(), |s| format!("{s:.1} s")),
        );
    }
}
