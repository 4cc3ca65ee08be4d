//! `cargo xtask bench`: what capture costs, measured side by side on real parts, with the
//! targets of the benchmark issue printed as PASS/FAIL and written, with every raw run, under
//! `target/bench/` (`runs.json`, `summary.json`). Not a test: nothing asserts a timing.
//!
//! 1. Proxy cost: four Envoys under test (`--concurrency 1`, pinned to core 0) forward HTTP/1.1
//!    to one upstream Envoy answering 1 KiB or 64 KiB bodies (`direct_response`): no filter, the
//!    project's no-op Wasm filter (the VM-crossing floor), the capture filter (aggregator
//!    running), and Envoy's own tap filter writing every exchange to a file. `wrk` loads them from
//!    core 1, in interleaved rounds (A B C D A B C D ...). Envoy CPU per request comes from
//!    `/proc/<pid>/stat`.
//! 2. Aggregator ingest: a load generator speaking the filter protocol over real mTLS (many
//!    concurrent streams, the filter's ack window) against the aggregator pinned to one core,
//!    the emulator discarding: frames/s and captured MB/s per aggregator CPU-second.
//! 3. Capture latency: sequential requests through the capture sidecar; the time from the end of
//!    each response to its file appearing at the emulator.
//!
//! Overload (the analysis service stalled under 10x load: RSS, drops, recovery) is not
//! measured yet; its target is reported as not measured.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use packet_inspector_tests::{certs::Ca, free_port, mesh::admin_get, process::Process, target_dir, tools, wait_for};
use serde_json::json;

const VARIANTS: [&str; 4] = ["none", "noop", "capture", "tap"];
const SIZES: [(&str, usize); 2] = [("1KiB", 1024), ("64KiB", 65536)];

pub struct Options {
    pub rounds: usize,
    pub seconds: u64,
    pub connections: u32,
}

/// One wrk run against one Envoy.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    size: String,
    variant: String,
    round: usize,
    requests: u64,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    envoy_cpu_us_per_request: f64,
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command; utime and stime are the 14th and 15th fields.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat")?.1.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).context("VmRSS")?.trim().trim_end_matches(" kB").trim();
    Ok(kib.parse::<u64>()? * 1024)
}

fn ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
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

/// (requests, requests/s, p50 µs, p99 µs) from `wrk --latency` output.
fn parse_wrk(output: &str) -> Result<(u64, f64, f64, f64)> {
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
    Ok((requests, rps, percentile("50%")?, percentile("99%")?))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn pinned(core: u32, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", &core.to_string()]).arg(program);
    command
}

struct Bench {
    dir: PathBuf,
    processes: Vec<Process>,
}

impl Bench {
    fn spawn(&mut self, name: &str, command: Command) -> Result<u32> {
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
                configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: '{configuration}' }}
                vm_config: {{ vm_id: bench, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }} }}"#,
        module.display()
    )
}

pub fn run(options: &Options) -> Result<()> {
    let out = target_dir().join("bench");
    let dir = out.join(format!("run-{}", SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_secs()));
    std::fs::create_dir_all(&dir)?;
    let mut bench = Bench { dir: dir.clone(), processes: Vec::new() };
    let release = target_dir().join("release");
    let capture_module = tools::wasm()?;
    let noop_module = target_dir().join("noop/wasm32-wasip1/release/packet_inspector_filter.wasm");
    if !noop_module.is_file() {
        bail!("{} is missing (cargo xtask bench builds it)", noop_module.display());
    }

    // Certificates, the emulator (discarding) and the aggregator, off the measured core.
    let ca = Ca::new("bench mesh CA")?;
    let certs = ca.issue(&dir.join("certs"), &["localhost"])?;
    let (emulator_port, aggregator_port, aggregator_admin) = (free_port()?, free_port()?, free_port()?);
    let mut emulator = pinned(1, &release.join("packet-inspector-analysis-emulator"));
    emulator
        .args(["--listen", &format!("127.0.0.1:{emulator_port}"), "--discard"])
        .arg("--tls-cert")
        .arg(certs.join("cert-chain.pem"))
        .arg("--tls-key")
        .arg(certs.join("key.pem"))
        .arg("--output-dir")
        .arg(&dir);
    bench.spawn("emulator", emulator)?;
    let mut aggregator = pinned(1, &release.join("packet-inspector-aggregator"));
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
    let tap_dir = dir.join("tap");
    std::fs::create_dir_all(&tap_dir)?;
    let mut under_test: BTreeMap<&str, (u32, Vec<u16>)> = BTreeMap::new();
    for variant in VARIANTS {
        let filters = match variant {
            "none" => String::new(),
            "noop" => wasm_filter(&noop_module, "{}"),
            "capture" => wasm_filter(
                &capture_module,
                r#"{"cluster":"packet_inspector_aggregator","role":"consumer","flushIntervalMs":100}"#,
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
                    sinks:
                    - format: JSON_BODY_AS_BYTES
                      file_per_tap: {{ path_prefix: {}/{variant} }}"#,
                tap_dir.display()
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
        if variant == "capture" {
            wait_for("the capture filter's streams", Duration::from_secs(30), || {
                admin_get(admin, "/stats?filter=streams_ready").ok().filter(|s| s.contains("streams_ready: 2"))
            })?;
        }
        under_test.insert(variant, (pid, ports));
    }

    let wrk = which("wrk")?;
    let tick_us = 1_000_000.0 / ticks_per_second();
    let load = |port: u16, seconds: u64| -> Result<(u64, f64, f64, f64)> {
        let output = pinned(1, &wrk)
            .args(["-t1", &format!("-c{}", options.connections), &format!("-d{seconds}s"), "--latency"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()?;
        if !output.status.success() {
            bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        parse_wrk(&String::from_utf8_lossy(&output.stdout))
    };
    eprintln!("bench: warming up");
    for (_, ports) in under_test.values() {
        for port in ports {
            load(*port, 1)?;
        }
    }
    let mut runs = Vec::new();
    for (index, (size, _)) in SIZES.iter().enumerate() {
        for round in 0..options.rounds {
            for variant in VARIANTS {
                let (pid, ports) = &under_test[variant];
                let before = cpu_ticks(*pid)?;
                let (requests, rps, p50, p99) = load(ports[index], options.seconds)?;
                let cpu_us = (cpu_ticks(*pid)? - before) as f64 * tick_us;
                let run = Run {
                    size: size.to_string(),
                    variant: variant.to_string(),
                    round,
                    requests,
                    requests_per_second: rps,
                    p50_us: p50,
                    p99_us: p99,
                    envoy_cpu_us_per_request: cpu_us / requests.max(1) as f64,
                };
                eprintln!("bench: {size} round {round} {variant:8} {rps:>10.0} req/s  p50 {p50:>8.0} µs  p99 {p99:>8.0} µs  {:>6.1} µs CPU/req", run.envoy_cpu_us_per_request);
                runs.push(run);
            }
        }
    }
    let capture_rss = rss_bytes(under_test["capture"].0)?;
    let noop_rss = rss_bytes(under_test["noop"].0)?;
    let aggregator_rss = rss_bytes(aggregator_pid)?;
    let dropped = admin_get(under_test_admin(&dir, "capture")?, "/stats?filter=captures_dropped").unwrap_or_default();

    // Summaries: median and range per (size, variant).
    let mut table = Vec::new();
    let mut medians: BTreeMap<(String, String), (f64, f64, f64, f64)> = BTreeMap::new();
    for (size, _) in SIZES {
        for variant in VARIANTS {
            let of: Vec<&Run> = runs.iter().filter(|r| r.size == size && r.variant == variant).collect();
            let pick = |f: fn(&Run) -> f64| {
                let mut values: Vec<f64> = of.iter().map(|r| f(r)).collect();
                let (min, max) =
                    (values.iter().cloned().fold(f64::MAX, f64::min), values.iter().cloned().fold(f64::MIN, f64::max));
                (median(&mut values), min, max)
            };
            let (rps, cpu, p50, p99) = (
                pick(|r| r.requests_per_second),
                pick(|r| r.envoy_cpu_us_per_request),
                pick(|r| r.p50_us),
                pick(|r| r.p99_us),
            );
            medians.insert((size.to_string(), variant.to_string()), (rps.0, cpu.0, p50.0, p99.0));
            table.push(json!({"size": size, "variant": variant, "requests_per_second": rps, "envoy_cpu_us_per_request": cpu, "p50_us": p50, "p99_us": p99}));
        }
    }

    // Ingest and capture latency.
    // Capture latency (with the aggregator drained, and before ingest, whose backlog would
    // queue ahead of it), then ingest.
    crate::ingest::wait_drained(aggregator_admin)?;
    let capture_port = under_test["capture"].1[0];
    let latency =
        crate::ingest::capture_latency(&dir, &certs, &release, emulator_port, capture_port, &mut bench.processes)
            .with_context(|| {
                let filter =
                    admin_get(under_test_admin(&dir, "capture").unwrap_or(0), "/stats?filter=packet_inspector")
                        .unwrap_or_default();
                let aggregator = admin_get(aggregator_admin, "/metrics").unwrap_or_default();
                let aggregator: Vec<&str> = aggregator.lines().filter(|l| !l.starts_with('#')).collect();
                format!("capture filter stats:\n{filter}\naggregator metrics:\n{}", aggregator.join("\n"))
            })?;
    eprintln!(
        "bench: capture on disk after the response: p50 {:.3} s, p99 {:.3} s",
        latency.p50_seconds, latency.p99_seconds
    );
    let ingest = crate::ingest::run(&certs, aggregator_port, aggregator_pid, options.seconds.max(5))?;

    let m = |variant: &str, i: usize| {
        let v = medians[&("1KiB".to_string(), variant.to_string())];
        [v.0, v.1, v.2, v.3][i]
    };
    let targets = vec![
        json!({"target": "P1", "what": "Envoy CPU/request, capture / no-op Wasm (1 KiB)", "value": m("capture", 1) / m("noop", 1), "limit": 1.15}),
        json!({"target": "P1", "what": "Envoy CPU/request, capture / native tap (1 KiB)", "value": m("capture", 1) / m("tap", 1), "limit": 0.5}),
        json!({"target": "P2", "what": "p99 latency, capture / no-op Wasm (1 KiB, same wrk load, closed loop)", "value": m("capture", 3) / m("noop", 3), "limit": 1.10}),
        json!({"target": "P3", "what": "aggregator frames/s per core (thousands)", "value": ingest.frames_per_core_second / 1000.0, "limit": 200.0, "at_least": true}),
        json!({"target": "P3", "what": "aggregator captured MB/s per core", "value": ingest.megabytes_per_core_second, "limit": 250.0, "at_least": true}),
        json!({"target": "P4", "what": "overload (stalled analysis service)", "value": null, "limit": null, "pass": false, "note": "not measured yet"}),
        json!({"target": "P5", "what": "capture on disk after the response ends, p99 (s)", "value": latency.p99_seconds, "limit": 1.0}),
    ];
    let summary: Vec<serde_json::Value> = targets
        .into_iter()
        .map(|mut t| {
            if t.get("pass").is_none() {
                let (value, limit) = (t["value"].as_f64().unwrap_or(f64::NAN), t["limit"].as_f64().unwrap_or(f64::NAN));
                let pass = if t.get("at_least").is_some() { value >= limit } else { value <= limit };
                t["pass"] = json!(pass);
            }
            t
        })
        .collect();

    std::fs::write(
        out.join("runs.json"),
        serde_json::to_vec_pretty(&json!({
            "runs": runs, "medians": table, "ingest": ingest, "capture_latency": latency,
            "rss_bytes": {"envoy_capture": capture_rss, "envoy_noop": noop_rss, "aggregator": aggregator_rss},
            "capture_drops": dropped.trim(),
        }))?,
    )?;
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;

    println!("\n{:<7} {:<8} {:>12} {:>14} {:>10} {:>10}", "SIZE", "VARIANT", "REQ/S", "CPU µs/REQ", "P50 µs", "P99 µs");
    for row in &table {
        let median = |key: &str| row[key][0].as_f64().unwrap_or(0.0);
        println!(
            "{:<7} {:<8} {:>12.0} {:>14.1} {:>10.0} {:>10.0}",
            row["size"].as_str().unwrap_or(""),
            row["variant"].as_str().unwrap_or(""),
            median("requests_per_second"),
            median("envoy_cpu_us_per_request"),
            median("p50_us"),
            median("p99_us")
        );
    }
    println!(
        "\n(medians of {} interleaved rounds of {} s; ranges in target/bench/runs.json)\n",
        options.rounds, options.seconds
    );
    for t in &summary {
        let value = t["value"].as_f64().map_or("-".to_owned(), |v| format!("{v:.3}"));
        let limit = t["limit"]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{}{v}", if t.get("at_least").is_some() { ">= " } else { "<= " }));
        println!(
            "{} {:<4} {:<75} {:>10} {:>10}",
            if t["pass"] == json!(true) { "PASS" } else { "FAIL" },
            t["target"].as_str().unwrap_or(""),
            t["what"].as_str().unwrap_or(""),
            value,
            limit
        );
    }
    println!("\nwritten: {}, {}", out.join("summary.json").display(), out.join("runs.json").display());
    drop(bench);
    Ok(())
}

/// The admin port of an Envoy under test, from its config file.
fn under_test_admin(dir: &Path, variant: &str) -> Result<u16> {
    let config = std::fs::read_to_string(dir.join(format!("envoy-{variant}.yaml")))?;
    let after = config
        .split("admin: { address: { socket_address: { address: 127.0.0.1, port_value: ")
        .nth(1)
        .context("admin port")?;
    Ok(after.split(' ').next().context("admin port")?.parse()?)
}

pub fn which(program: &str) -> Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| PathBuf::from(dir).join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found on PATH"))
}
