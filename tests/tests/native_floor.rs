//! The bench's native read floor (`native-floor/`) in a real Envoy: Envoy 1.40 loads the
//! library (so its ABI declarations and required hooks match this Envoy), and traffic through
//! it (request bodies in several chunks, responses, connection after connection) comes out
//! untouched while it reads every header map, body chunk and attribute on the way.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{anyhow, bail, Context, Result};
use packet_inspector_tests::{free_port, http, mesh::admin_get, process::Process, tools, wait_for};

/// What the upstream listener answers (`direct_response`, under Envoy's 4 KiB limit).
fn response_body() -> String {
    (0..3000).map(|i| char::from(b'a' + (i % 26) as u8)).collect()
}

fn config(admin: u16, front: u16, back: u16, library: &Path) -> String {
    let router = r#"{ name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } }"#;
    let hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    format!(
        r#"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }} }}
static_resources:
  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {front} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: front
          route_config: {{ virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: back }} }}] }}] }}
          http_filters:
          - name: native_floor
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config: {{ module: {{ local: {{ filename: {library} }} }} }}
              filter_name: native_floor
          - {router}
  - name: back
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {back} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {hcm}
          stat_prefix: back
          route_config: {{ virtual_hosts: [{{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, direct_response: {{ status: 200, body: {{ inline_string: "{body}" }} }} }}] }}] }}
          http_filters: [{router}]
  clusters:
  - name: back
    type: STATIC
    connect_timeout: 2s
    load_assignment: {{ cluster_name: back, endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {back} }} }} }} }}] }}] }}
"#,
        library = library.display(),
        body = response_body(),
    )
}

fn exchanges(front: SocketAddr, admin: u16) -> Result<()> {
    let expected = response_body();
    let requests: [(&str, Vec<u8>); 3] = [
        ("GET /first HTTP/1.1\r\nhost: test\r\nx-request-id: native-floor-1", Vec::new()),
        ("POST /upload HTTP/1.1\r\nhost: test\r\ncontent-type: application/octet-stream", vec![7; 200 * 1024]),
        ("GET /third?q=1 HTTP/1.1\r\nhost: test\r\nx-note: caf\u{e9}", Vec::new()),
    ];
    for (head, body) in &requests {
        let response = http::send(front, head, body)?;
        if response.status != 200 || response.body != expected.as_bytes() {
            bail!(
                "{}: answered {} with {} bytes, not 200 with the upstream's {} bytes",
                head.lines().next().unwrap_or_default(),
                response.status,
                response.body.len(),
                expected.len()
            );
        }
    }
    let stats = admin_get(admin, "/stats?filter=^http\\.front\\.downstream_rq_2xx$")?;
    if !stats.contains(&format!("http.front.downstream_rq_2xx: {}", requests.len())) {
        bail!("front listener stats: {stats}");
    }
    Ok(())
}

#[test]
fn envoy_loads_the_native_floor_and_traffic_passes_untouched() {
    let library = tools::native_floor().unwrap();
    let dir = std::env::temp_dir().join(format!("pi-native-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (admin, front, back) = (free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let config_path = dir.join("envoy.yaml");
    std::fs::write(&config_path, config(admin, front, back, &library)).unwrap();
    let mut command = Command::new(tools::envoy().unwrap());
    command.arg("-c").arg(&config_path).args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"]);
    let mut envoy = Process::spawn("envoy", command, &dir.join("envoy.log")).unwrap();

    // Ready, or gone (a library Envoy cannot load stops it at once).
    let outcome = wait_for("Envoy to be ready", Duration::from_secs(30), || match envoy.exited() {
        Some(status) => Some(Err(anyhow!("Envoy exited ({status}) while starting"))),
        None => admin_get(admin, "/ready").ok().filter(|r| r.trim() == "LIVE").map(|_| Ok(())),
    })
    .and_then(|ready| ready)
    .and_then(|()| exchanges(SocketAddr::from(([127, 0, 0, 1], front)), admin))
    .and_then(|()| match envoy.exited() {
        Some(status) => bail!("Envoy exited ({status}) after the exchanges"),
        None => Ok(()),
    })
    .context("through the native read floor");
    let log = envoy.log_text();
    envoy.stop(Duration::from_secs(5));
    if let Err(err) = outcome {
        panic!("{err:#}\n--- Envoy's log (last 40 lines) ---\n{}", envoy.tail(40));
    }
    // The declarations follow this Envoy's ABI: a newer Envoy must have them checked again.
    assert!(
        log.contains("Dynamic module ABI version v0.2.0 matched"),
        "Envoy did not load the library as ABI v0.2.0 (the version native-floor/ was written against):\n{log}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
