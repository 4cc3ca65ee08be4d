//! A local stand-in for two meshed pods and a node's capture pipeline:
//!
//! ```text
//! client ─▶ client sidecar (OUTBOUND, consumer) ─mTLS─▶ server sidecar (INBOUND, producer) ─▶ app
//!                  └──────────── filter frames, mTLS gRPC ─────────────┘
//!                                        ▼
//!                                   aggregator ─TLS─▶ analysis emulator ─▶ <output>/*.{bson,pcap}
//! ```
//!
//! Both sidecars are real Envoys configured from `samples/local-demo/*.yaml`, carrying Istio's
//! node metadata and running the built filter on V8: as an HTTP filter (HTTP/1.1 and HTTP/2 to
//! the sample HTTP app and the sample gRPC service) and as a network filter on TCP proxies for
//! Diameter (real `python-diameter` peers, `samples/diameter-peers/peer.py`). The Diameter
//! listeners use port 3868, where Wireshark decodes Diameter with no options, on loopback
//! addresses of their own for each run.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    app::{GrpcApp, SampleApp},
    certs::Ca,
    free_port, http,
    process::Process,
    tools, wait_for, workspace_root,
};

pub const NAMESPACE: &str = "bookinfo";
pub const CLIENT_POD: &str = "productpage-v1-6b746f74dc-9stvs";
pub const CLIENT_WORKLOAD: &str = "productpage-v1";
pub const SERVER_POD: &str = "reviews-v1-545db77b95-hkh9p";
pub const SERVER_WORKLOAD: &str = "reviews-v1";
/// The aggregator's certificate name, checked by the sidecars.
pub const AGGREGATOR_SAN: &str = "packet-inspector-aggregator.istio-system.svc";
/// The analysis service's host as the aggregator is told it (and as its certificate says).
pub const ANALYSIS_HOST: &str = "localhost";
/// Capture streams per sidecar: each root context has its own, and there is one per thread
/// (the one worker of `--concurrency 1` and the main thread) and per plugin (HTTP, Diameter).
pub const CAPTURE_STREAMS: u64 = 4;
/// The Diameter port, where Wireshark decodes Diameter without options.
pub const DIAMETER_PORT: u16 = 3868;
/// Where Envoy puts the native capture's counters.
pub const NATIVE_STATS: &str = "dynamicmodulescustom";
/// Where Envoy puts the Wasm filter's counters.
pub const WASM_STATS: &str = "wasmcustom";
const STARTUP: Duration = Duration::from_secs(60);

/// How the sidecars capture.
#[derive(Debug, Clone, Default)]
pub enum SidecarCapture {
    /// As `samples/local-demo/*.yaml` configure it.
    #[default]
    Sample,
    /// Not at all: the sample sidecars without Packet Inspector, as with no capture instance.
    Bare,
    /// As the filter chart configures it: its EnvoyFilters, rendered with these values (the run
    /// fills in the aggregator's ports and the module's URL and sha256), applied to the bare
    /// sidecars the way istiod applies them (see [`crate::envoyfilter`]).
    Chart { values: serde_json::Value },
    /// By the native capture (`native-capture/`) instead of the Wasm filters: the bare sidecars
    /// with the dynamic module before the router of every HTTP connection manager (`role:
    /// auto`), connecting to the aggregator with the sidecar's certificate, which a stand-in
    /// for Istio's node agent serves over SDS ([`crate::sds`]), the pod's labels in a
    /// downward-API file. It captures HTTP only (Diameter stays uncaptured).
    Native,
    /// [`SidecarCapture::Native`] with the certificate files configured instead of SDS.
    NativeFromFiles,
}

#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Where the emulator writes; a fresh directory under the run's when `None`.
    pub output_dir: Option<PathBuf>,
    pub max_body_bytes: u64,
    /// DNS name in the analysis emulator's certificate (a mismatch must stop forwarding).
    pub analysis_san: String,
    /// The filter's plugin configuration (JSON) instead of the default one; with the native
    /// capture, keys merged over the run's configuration instead.
    pub filter_config: Option<String>,
    /// The aggregator's `--segment-interval-ms` (its own default when `None`).
    pub segment_interval_ms: Option<u64>,
    pub capture: SidecarCapture,
    /// Whether startup waits for every sidecar's capture streams (not when the test expects the
    /// capture not to start).
    pub expect_capture_streams: bool,
}

impl Default for MeshOptions {
    fn default() -> Self {
        Self {
            output_dir: None,
            max_body_bytes: 64 * 1024,
            analysis_san: ANALYSIS_HOST.to_owned(),
            filter_config: None,
            segment_interval_ms: None,
            capture: SidecarCapture::Sample,
            expect_capture_streams: true,
        }
    }
}

/// Which sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sidecar {
    Client,
    Server,
}

/// The two files of one stored capture.
#[derive(Debug, Clone)]
pub struct CaptureFiles {
    pub pcap: PathBuf,
    pub bson: PathBuf,
}

impl CaptureFiles {
    pub fn document(&self) -> Result<bson::Document> {
        let bytes = std::fs::read(&self.bson).with_context(|| format!("reading {}", self.bson.display()))?;
        Ok(bson::Document::from_reader(&mut bytes.as_slice())?)
    }
}

pub struct Mesh {
    pub dir: PathBuf,
    pub output_dir: PathBuf,
    /// Where a client in the "client pod" sends its requests.
    pub client_listener: SocketAddr,
    /// The server sidecar's inbound (mTLS) listener.
    pub server_listener: SocketAddr,
    /// Where the client pod's Diameter peer connects (the client sidecar's TCP proxy).
    pub client_diameter: SocketAddr,
    /// The server sidecar's inbound Diameter listener (mTLS).
    pub server_diameter: SocketAddr,
    diameter_app_port: u16,
    diameter_app: Option<Process>,
    pub aggregator_port: u16,
    pub aggregator_admin_port: u16,
    client_admin: u16,
    server_admin: u16,
    emulator: Option<Process>,
    aggregator: Option<Process>,
    client_envoy: Option<Process>,
    server_envoy: Option<Process>,
    _app: SampleApp,
    _grpc_app: GrpcApp,
    analysis_port: u16,
    segment_interval_ms: Option<u64>,
    /// Set until startup succeeds, so a failed start keeps its logs for inspection.
    failed: bool,
    capture: SidecarCapture,
    max_body_bytes: u64,
    /// Merged over the native capture's configuration.
    native_overrides: Option<String>,
    /// Patches applied per sidecar (chart and native modes).
    pub patches_applied: Vec<(String, usize)>,
    /// Native mode: each sidecar's stand-in for Istio's node agent, serving its certificate
    /// over SDS, by sidecar name.
    secret_services: Vec<(String, crate::sds::SdsServer)>,
}

fn render(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut text = template.to_owned();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), value);
    }
    if let Some(at) = text.find("{{") {
        bail!("unfilled placeholder in sidecar template: {}", &text[at..(at + 40).min(text.len())]);
    }
    Ok(text)
}

fn unique_dir() -> Result<PathBuf> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("packet-inspector-e2e-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Mesh {
    /// Starts everything and waits until each part is ready.
    ///
    /// A failed start keeps the components' logs, and its error says where; the error of the
    /// component that failed carries the tail of its log.
    pub fn start(options: MeshOptions) -> Result<Self> {
        crate::remember_panics();
        let dir = unique_dir()?;
        let kept = dir.clone();
        Self::start_in(dir, options)
            .with_context(|| format!("starting the mesh (component logs kept under {})", kept.display()))
    }

    fn start_in(dir: PathBuf, options: MeshOptions) -> Result<Self> {
        let output_dir = options.output_dir.clone().unwrap_or_else(|| dir.join("captures"));
        std::fs::create_dir_all(&output_dir)?;
        let ca = Ca::new("packet-inspector demo mesh CA")?;
        let certs = dir.join("certs");
        ca.issue(&certs.join("client"), &["productpage.bookinfo.svc.cluster.local"])?;
        ca.issue(&certs.join("server"), &["server.bookinfo.svc.cluster.local"])?;
        ca.issue(&certs.join("aggregator"), &[AGGREGATOR_SAN])?;
        ca.issue(&certs.join("analysis"), &[options.analysis_san.as_str()])?;

        let app = SampleApp::start(SERVER_WORKLOAD)?;
        let grpc_app = GrpcApp::start()?;
        let (client_diameter, server_diameter) = diameter_addresses()?;
        let mut mesh = Self {
            output_dir,
            client_listener: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            server_listener: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            client_diameter,
            server_diameter,
            diameter_app_port: free_port()?,
            diameter_app: None,
            aggregator_port: free_port()?,
            aggregator_admin_port: free_port()?,
            client_admin: free_port()?,
            server_admin: free_port()?,
            analysis_port: free_port()?,
            emulator: None,
            aggregator: None,
            client_envoy: None,
            server_envoy: None,
            _app: app,
            _grpc_app: grpc_app,
            segment_interval_ms: options.segment_interval_ms,
            dir,
            failed: true,
            capture: options.capture.clone(),
            max_body_bytes: options.max_body_bytes,
            native_overrides: options.filter_config.clone(),
            patches_applied: Vec::new(),
            secret_services: Vec::new(),
        };
        mesh.start_emulator()?;
        mesh.start_aggregator()?;
        mesh.start_diameter_app()?;
        let filter_config = options.filter_config.clone().unwrap_or_else(|| {
            format!(
                r#"{{"cluster":"packet_inspector_aggregator","maxBodyBytes":{},"flushIntervalMs":50}}"#,
                options.max_body_bytes
            )
        });
        let diameter_config = format!(
            r#"{{"cluster":"packet_inspector_aggregator","protocol":"diameter","diameterPort":{DIAMETER_PORT},"flushIntervalMs":50}}"#
        );
        let wasm = tools::wasm()?;
        let common = |certs: &Path, admin: u16, listen: u16, upstream: u16| {
            vec![
                ("NAMESPACE", NAMESPACE.to_owned()),
                ("ADMIN_PORT", admin.to_string()),
                ("LISTEN_PORT", listen.to_string()),
                ("UPSTREAM_PORT", upstream.to_string()),
                ("AGGREGATOR_PORT", mesh.aggregator_port.to_string()),
                ("AGGREGATOR_SAN", AGGREGATOR_SAN.to_owned()),
                ("CERTS", certs.display().to_string()),
                ("WASM", wasm.display().to_string()),
                ("FILTER_CONFIG", filter_config.clone()),
                ("DIAMETER_FILTER_CONFIG", diameter_config.clone()),
            ]
        };
        let mut server_values =
            common(&certs.join("server"), mesh.server_admin, mesh.server_listener.port(), mesh._app.port);
        server_values.extend([
            ("POD_NAME", SERVER_POD.to_owned()),
            ("WORKLOAD", SERVER_WORKLOAD.to_owned()),
            ("GRPC_PORT", mesh._grpc_app.port.to_string()),
            ("DIAMETER_LISTEN_IP", mesh.server_diameter.ip().to_string()),
            ("DIAMETER_APP_PORT", mesh.diameter_app_port.to_string()),
        ]);
        let mut client_values =
            common(&certs.join("client"), mesh.client_admin, mesh.client_listener.port(), mesh.server_listener.port());
        client_values.extend([
            ("POD_NAME", CLIENT_POD.to_owned()),
            ("WORKLOAD", CLIENT_WORKLOAD.to_owned()),
            ("DIAMETER_LISTEN_IP", mesh.client_diameter.ip().to_string()),
            ("DIAMETER_UPSTREAM_IP", mesh.server_diameter.ip().to_string()),
        ]);
        let samples = workspace_root().join("samples/local-demo");
        let (server_certs, client_certs) = (certs.join("server"), certs.join("client"));
        let (server_admin, client_admin) = (mesh.server_admin, mesh.client_admin);
        let server = mesh.start_envoy(
            "server-sidecar",
            &samples.join("server-sidecar.yaml"),
            &server_values,
            server_admin,
            &server_certs,
        )?;
        mesh.server_envoy = Some(server);
        let client = mesh.start_envoy(
            "client-sidecar",
            &samples.join("client-sidecar.yaml"),
            &client_values,
            client_admin,
            &client_certs,
        )?;
        mesh.client_envoy = Some(client);
        let sidecars = if matches!(mesh.capture, SidecarCapture::Bare) || !options.expect_capture_streams {
            vec![]
        } else {
            vec![Sidecar::Client, Sidecar::Server]
        };
        for sidecar in sidecars {
            for (namespace, streams) in mesh.expected_streams() {
                let ready = wait_for(&format!("{sidecar:?} sidecar's {namespace} capture streams"), STARTUP, || {
                    mesh.stat(sidecar, namespace, "streams_ready").ok().filter(|n| *n >= streams)
                });
                if let Err(err) = ready {
                    bail!("{err}\n{}", mesh.log_tails(40));
                }
            }
        }
        mesh.failed = false;
        Ok(mesh)
    }

    /// The sidecar's configuration file: the sample as it is, or bare, or chart-patched.
    fn sidecar_config(&mut self, name: &str, rendered: String, certs: &Path) -> Result<PathBuf> {
        if let SidecarCapture::Sample = self.capture {
            let path = self.dir.join(format!("{name}.yaml"));
            std::fs::write(&path, rendered)?;
            return Ok(path);
        }
        let mut config = yaml_to_json(&rendered)?;
        crate::envoyfilter::strip_capture(&mut config);
        if let SidecarCapture::Chart { values } = self.capture.clone() {
            let envoy_filters = self.render_filter_chart(values)?;
            let mut emulation = crate::envoyfilter::Emulation::for_certs(
                certs,
                vec![(CHART_AGGREGATOR_HOST.to_owned(), "127.0.0.1".to_owned())],
            )?;
            if self.chart_is_native() {
                // What Istio gives the native capture in the pod: the node agent's SDS socket and
                // the downward-API labels file.
                let secrets = crate::sds::SdsServer::start(&self.dir.join(format!("{name}-sds.sock")), certs)?;
                emulation.pod_paths = vec![
                    (ISTIO_SDS_SOCKET.to_owned(), secrets.socket.clone()),
                    (ISTIO_POD_LABELS.to_owned(), self.write_labels_file(&config)?),
                ];
                self.secret_services.push((name.to_owned(), secrets));
            }
            let applied = crate::envoyfilter::apply(&mut config, &envoy_filters, &emulation)?;
            self.patches_applied.push((name.to_owned(), applied));
        }
        if matches!(self.capture, SidecarCapture::Native | SidecarCapture::NativeFromFiles) {
            let credentials = if matches!(self.capture, SidecarCapture::NativeFromFiles) {
                serde_json::json!({
                    "caFile": certs.join("root-cert.pem"),
                    "certFile": certs.join("cert-chain.pem"),
                    "keyFile": certs.join("key.pem"),
                })
            } else {
                let secrets = crate::sds::SdsServer::start(&self.dir.join(format!("{name}-sds.sock")), certs)?;
                let socket = serde_json::json!({"sdsSocket": secrets.socket});
                self.secret_services.push((name.to_owned(), secrets));
                socket
            };
            let applied = self.insert_native_capture(&mut config, credentials)?;
            self.patches_applied.push((name.to_owned(), applied));
        }
        let path = self.dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(path)
    }

    /// Puts the native capture before the router of every HTTP connection manager; returns
    /// how many.
    fn insert_native_capture(&self, config: &mut serde_json::Value, credentials: serde_json::Value) -> Result<usize> {
        let library = tools::native_capture()?;
        let labels_file = self.write_labels_file(config)?;
        // Every connection manager gets the same configuration (`role: auto` tells inbound
        // from outbound).
        let mut settings = serde_json::json!({
            "aggregator": {
                "address": format!("127.0.0.1:{}", self.aggregator_port),
                "serverName": AGGREGATOR_SAN,
            },
            "podLabelsFile": labels_file,
            "maxBodyBytes": self.max_body_bytes,
            "flushIntervalMs": 50,
            "role": "auto",
        });
        merge(&mut settings, serde_json::json!({"aggregator": credentials}));
        if let Some(overrides) = &self.native_overrides {
            merge(&mut settings, serde_json::from_str(overrides).context("native capture overrides")?);
        }
        let filter = serde_json::json!({
            "name": "packet_inspector_native",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"module": {"local": {"filename": library}}, "do_not_close": true},
                "filter_name": "packet_inspector",
                "filter_config": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": settings.to_string()},
            },
        });
        let mut inserted = 0;
        for listener in
            config.pointer_mut("/static_resources/listeners").and_then(|v| v.as_array_mut()).into_iter().flatten()
        {
            for chain in listener.get_mut("filter_chains").and_then(|v| v.as_array_mut()).into_iter().flatten() {
                for network_filter in chain.get_mut("filters").and_then(|v| v.as_array_mut()).into_iter().flatten() {
                    let Some(http_filters) =
                        network_filter.pointer_mut("/typed_config/http_filters").and_then(|v| v.as_array_mut())
                    else {
                        continue;
                    };
                    let router = http_filters
                        .iter()
                        .position(|f| f.get("name").and_then(|n| n.as_str()) == Some("envoy.filters.http.router"));
                    if let Some(router) = router {
                        http_filters.insert(router, filter.clone());
                        inserted += 1;
                    }
                }
            }
        }
        // Istio gives a sidecar an HTTP connection manager per port, each with its own copy of
        // the filter configuration: a second one (a copy of the first HTTP listener, on a port
        // nothing uses) shows whether the copies share the capture streams.
        let listeners = config.pointer_mut("/static_resources/listeners").and_then(|v| v.as_array_mut());
        let copy = listeners.as_ref().and_then(|listeners| {
            listeners.iter().find(|l| l.to_string().contains("packet_inspector_native")).cloned()
        });
        if let (Some(listeners), Some(mut copy)) = (listeners, copy) {
            copy["name"] = serde_json::json!("packet_inspector_native_second_port");
            copy["address"] =
                serde_json::json!({"socket_address": {"address": "127.0.0.1", "port_value": free_port()?}});
            listeners.push(copy);
            inserted += 1;
        }
        Ok(inserted)
    }

    /// The pod's labels where Istio's injection mounts them (downward API, Go-quoted values): the
    /// same labels as the node metadata the Wasm filter reads. Returns the file.
    fn write_labels_file(&self, config: &serde_json::Value) -> Result<PathBuf> {
        let labels: String = config
            .pointer("/node/metadata/LABELS")
            .and_then(|v| v.as_object())
            .into_iter()
            .flatten()
            .map(|(key, value)| {
                format!("{key}={}\n", serde_json::Value::String(value.as_str().unwrap_or_default().to_owned()))
            })
            .collect();
        let pod_name = config.pointer("/node/metadata/NAME").and_then(|v| v.as_str()).unwrap_or("pod");
        let labels_file = self.dir.join(format!("{pod_name}-labels"));
        std::fs::write(&labels_file, labels)?;
        Ok(labels_file)
    }

    /// Whether the filter chart is rendered with HTTP captured by the native capture.
    fn chart_is_native(&self) -> bool {
        let SidecarCapture::Chart { values } = &self.capture else { return false };
        values.pointer("/httpCapture/module").and_then(|v| v.as_str()) == Some("native")
    }

    /// The filter chart's EnvoyFilters for this run: `values` plus the aggregator's ports and
    /// the built module's URL (served by the aggregator) and sha256.
    fn render_filter_chart(&self, mut values: serde_json::Value) -> Result<Vec<serde_json::Value>> {
        let wasm = std::fs::read(tools::wasm()?)?;
        let sha256: String =
            ring::digest::digest(&ring::digest::SHA256, &wasm).as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let run = serde_json::json!({
            "aggregator": {
                "host": CHART_AGGREGATOR_HOST,
                "port": self.aggregator_port,
                "adminPort": self.aggregator_admin_port,
                "subjectAltNames": [AGGREGATOR_SAN],
            },
            "module": {"url": format!("http://127.0.0.1:{}/filter.wasm", self.aggregator_admin_port), "sha256": sha256},
            "flushIntervalMs": 50,
        });
        // The identities the test gives, if any (an empty list: any certificate of the mesh CA).
        let given_names = values.pointer("/aggregator/subjectAltNames").cloned();
        merge(&mut values, run);
        if let Some(names) = given_names {
            merge(&mut values, serde_json::json!({"aggregator": {"subjectAltNames": names}}));
        }
        if self.chart_is_native() {
            let native = std::fs::read(tools::native_capture()?)?;
            let sha256: String = ring::digest::digest(&ring::digest::SHA256, &native)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let url = format!("http://127.0.0.1:{}/native-capture.so", self.aggregator_admin_port);
            // The library's sha256 unless the test gives one (a mismatch, to see Envoy refuse it).
            let given = values.pointer("/nativeModule/sha256").and_then(|v| v.as_str()).map(str::to_owned);
            let sha256 = given.unwrap_or(sha256);
            merge(&mut values, serde_json::json!({"nativeModule": {"url": url, "sha256": sha256}}));
        }
        let output = Command::new(tools::python()?)
            .arg(workspace_root().join("tests/charts/render.py"))
            .arg(workspace_root().join("manifests/charts/packet-inspector-1-filter"))
            .args(["capture-bookinfo", NAMESPACE, &values.to_string()])
            .output()?;
        if !output.status.success() {
            bail!("rendering the filter chart failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    fn start_envoy(
        &mut self,
        name: &str,
        template: &Path,
        values: &[(&str, String)],
        admin: u16,
        certs: &Path,
    ) -> Result<Process> {
        let template = std::fs::read_to_string(template).with_context(|| format!("reading {}", template.display()))?;
        let config = self.sidecar_config(name, render(&template, values)?, certs)?;
        let mut command = Command::new(tools::envoy()?);
        // The pod's identity as Istio puts it in the sidecar's environment (the native capture
        // reads it there; the Wasm filter reads the node metadata).
        for (key, variable) in
            [("POD_NAME", "POD_NAME"), ("NAMESPACE", "POD_NAMESPACE"), ("WORKLOAD", "ISTIO_META_WORKLOAD_NAME")]
        {
            if let Some((_, value)) = values.iter().find(|(k, _)| *k == key) {
                command.env(variable, value);
            }
        }
        command.arg("-c").arg(&config).args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "info",
            "--component-log-level",
            "wasm:debug,dynamic_modules:debug",
        ]);
        let mut process = Process::spawn(name, command, &self.dir.join(format!("{name}.log")))?;
        let ready = wait_for(&format!("{name} to be ready"), STARTUP, || {
            if process.exited().is_some() {
                return Some(false);
            }
            admin_get(admin, "/ready").ok().filter(|body| body.trim() == "LIVE").map(|_| true)
        });
        match ready {
            Ok(true) => Ok(process),
            Ok(false) => bail!("{name} exited during startup:\n{}", process.tail(40)),
            Err(err) => bail!("{err}:\n{}", process.tail(40)),
        }
    }

    fn start_emulator(&mut self) -> Result<()> {
        let certs = self.dir.join("certs/analysis");
        let mut command = Command::new(tools::binary("packet-inspector-analysis-emulator")?);
        command
            .args(["--listen", &format!("127.0.0.1:{}", self.analysis_port)])
            .arg("--tls-cert")
            .arg(certs.join("cert-chain.pem"))
            .arg("--tls-key")
            .arg(certs.join("key.pem"))
            .arg("--output-dir")
            .arg(&self.output_dir);
        let process = Process::spawn("analysis-emulator", command, &self.dir.join("analysis-emulator.log"))?;
        self.emulator = Some(wait_listening(process, self.analysis_port)?);
        Ok(())
    }

    fn start_diameter_app(&mut self) -> Result<()> {
        let mut command = Command::new(tools::python()?);
        command.arg(workspace_root().join("samples/diameter-peers/peer.py")).args([
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            &self.diameter_app_port.to_string(),
        ]);
        let process = Process::spawn("diameter-server", command, &self.dir.join("diameter-server.log"))?;
        self.diameter_app = Some(wait_listening(process, self.diameter_app_port)?);
        Ok(())
    }

    /// Runs the client pod's Diameter peer to the end through the client sidecar: CER/CEA,
    /// `requests` CCR/CCA, DWR/DWA while it lingers, DPR/DPA. Returns its answers.
    pub fn run_diameter_client(&self, requests: u32) -> Result<Vec<DiameterAnswer>> {
        let log = self.dir.join("diameter-client.log");
        let mut command = Command::new(tools::python()?);
        command.arg(workspace_root().join("samples/diameter-peers/peer.py")).args([
            "client",
            "--host",
            &self.client_diameter.ip().to_string(),
            "--port",
            &DIAMETER_PORT.to_string(),
            "--requests",
            &requests.to_string(),
        ]);
        let mut process = Process::spawn("diameter-client", command, &log)?;
        let status = wait_for("the Diameter client to finish", Duration::from_secs(60), || process.exited());
        let output = process.log_text();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => bail!("the Diameter client failed ({status}):\n{}", process.tail(40)),
            Err(err) => bail!("{err}:\n{}", process.tail(40)),
        }
        output
            .lines()
            .filter_map(|line| line.strip_prefix("CCA "))
            .map(|line| {
                let field = |name: &str| -> Result<u32> {
                    let value = line
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix(name))
                        .context(format!("{name} in {line:?}"))?;
                    Ok(value.parse()?)
                };
                Ok(DiameterAnswer {
                    result_code: field("result=")?,
                    hop_by_hop_id: field("hop_by_hop=")?,
                    end_to_end_id: field("end_to_end=")?,
                })
            })
            .collect()
    }

    /// Every stored Diameter capture of `pod`.
    pub fn diameter_captures(&self, pod: &str) -> Vec<CaptureFiles> {
        let mut found: Vec<CaptureFiles> = std::fs::read_dir(&self.output_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.starts_with(&format!("{pod}-")) && name.ends_with(".pcap")
            })
            .map(|pcap| CaptureFiles { bson: pcap.with_extension("bson"), pcap })
            .filter(|files| files.bson.is_file())
            .filter(|files| files.document().is_ok_and(|d| d.get_document("diameter").is_ok()))
            .collect();
        found.sort_by(|a, b| a.pcap.cmp(&b.pcap));
        found
    }

    /// Starts (or restarts, on the same ports) the aggregator.
    pub fn start_aggregator(&mut self) -> Result<()> {
        let certs = self.dir.join("certs/aggregator");
        let mut command = Command::new(tools::binary("packet-inspector-aggregator")?);
        command
            .args(["--listen", &format!("127.0.0.1:{}", self.aggregator_port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.aggregator_admin_port)])
            .arg("--tls-cert")
            .arg(certs.join("cert-chain.pem"))
            .arg("--tls-key")
            .arg(certs.join("key.pem"))
            .arg("--client-ca")
            .arg(certs.join("root-cert.pem"))
            .args(["--analysis-address", &format!("{ANALYSIS_HOST}:{}", self.analysis_port)])
            .arg("--analysis-ca")
            .arg(certs.join("root-cert.pem"))
            .args(["--node-name", "demo-node-1"])
            .arg("--filter-module")
            .arg(tools::wasm()?);
        if self.chart_is_native() {
            command.arg("--native-module").arg(tools::native_capture()?);
        }
        if let Some(interval) = self.segment_interval_ms {
            command.args(["--segment-interval-ms", &interval.to_string()]);
        }
        let process = Process::spawn("aggregator", command, &self.dir.join("aggregator.log"))?;
        self.aggregator = Some(wait_listening(process, self.aggregator_port)?);
        Ok(())
    }

    /// Capture streams per sidecar: [`CAPTURE_STREAMS`], or the native capture's one per worker
    /// (HTTP only).
    pub fn capture_streams(&self) -> u64 {
        if self.is_native() {
            1
        } else {
            CAPTURE_STREAMS
        }
    }

    /// Whether the sidecars capture HTTP with the native capture (its counters are then the
    /// ones [`Mesh::counter`] reads).
    pub fn is_native(&self) -> bool {
        matches!(self.capture, SidecarCapture::Native | SidecarCapture::NativeFromFiles) || self.chart_is_native()
    }

    /// The capture streams each sidecar opens, by the stats namespace of the module opening
    /// them: the Wasm filter's [`CAPTURE_STREAMS`], the native capture's one per worker, or, with
    /// the chart capturing HTTP natively, that one plus the Wasm Diameter filter's two (worker
    /// and main thread) when Diameter is captured.
    fn expected_streams(&self) -> Vec<(&'static str, u64)> {
        if !self.is_native() {
            return vec![(WASM_STATS, CAPTURE_STREAMS)];
        }
        let mut streams = vec![(NATIVE_STATS, 1)];
        if let SidecarCapture::Chart { values } = &self.capture {
            if values.pointer("/diameterCapture/enabled").and_then(|v| v.as_bool()) == Some(true) {
                streams.push((WASM_STATS, CAPTURE_STREAMS / 2));
            }
        }
        streams
    }

    /// The stand-in node agent serving a sidecar's certificate (native mode with SDS).
    pub fn secret_service(&self, sidecar: Sidecar) -> Option<&crate::sds::SdsServer> {
        let name = match sidecar {
            Sidecar::Client => "client-sidecar",
            Sidecar::Server => "server-sidecar",
        };
        self.secret_services.iter().find(|(n, _)| n == name).map(|(_, server)| server)
    }

    /// Stops the aggregator with SIGTERM; returns whether it exited cleanly.
    pub fn stop_aggregator(&mut self) -> bool {
        self.aggregator.take().and_then(|mut p| p.stop(Duration::from_secs(30))).is_some_and(|s| s.success())
    }

    /// A filter counter from a sidecar's stats (`wasmcustom.packet_inspector.<name>`, or the
    /// native capture's `dynamicmodulescustom.packet_inspector.<name>`).
    pub fn counter(&self, sidecar: Sidecar, name: &str) -> Result<u64> {
        self.stat(sidecar, if self.is_native() { NATIVE_STATS } else { WASM_STATS }, name)
    }

    /// A counter of a sidecar's capture module, by stats namespace ([`WASM_STATS`] or
    /// [`NATIVE_STATS`]).
    pub fn stat(&self, sidecar: Sidecar, namespace: &str, name: &str) -> Result<u64> {
        let admin = match sidecar {
            Sidecar::Client => self.client_admin,
            Sidecar::Server => self.server_admin,
        };
        let stat = format!("{namespace}.packet_inspector.{name}");
        let stats = admin_get(admin, &format!("/stats?filter=^{}$", stat.replace('.', "\\.")))?;
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{stat}: ")))
            .map(|value| value.trim().parse().context("stat value"))
            .unwrap_or(Ok(0))
    }

    /// A counter from the aggregator's /metrics.
    pub fn aggregator_metric(&self, name: &str) -> Result<u64> {
        let metrics = admin_get(self.aggregator_admin_port, "/metrics")?;
        let prefix = format!("packet_inspector_aggregator_{name} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .context(format!("no metric {name}"))?
            .trim()
            .parse()
            .context("metric value")
    }

    /// Sends a request through the client sidecar, as the client pod's app would.
    pub fn request(&self, head: &str, body: &[u8]) -> Result<http::Response> {
        http::send(self.client_listener, head, body)
    }

    /// Every stored capture for `request_id` with `role` (`consumer` or `producer`).
    pub fn captures(&self, role: &str, request_id: &str) -> Vec<CaptureFiles> {
        let marker = format!("-{role}-{request_id}-");
        let mut found: Vec<CaptureFiles> = std::fs::read_dir(&self.output_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.contains(&marker) && name.ends_with(".pcap")
            })
            .map(|pcap| CaptureFiles { bson: pcap.with_extension("bson"), pcap })
            .filter(|files| files.bson.is_file())
            .collect();
        found.sort_by(|a, b| a.pcap.cmp(&b.pcap));
        found
    }

    /// Waits for the capture of `request_id` seen with `role`.
    pub fn wait_for_capture(&self, role: &str, request_id: &str) -> Result<CaptureFiles> {
        wait_for(&format!("the {role} capture of request {request_id}"), Duration::from_secs(20), || {
            self.captures(role, request_id).into_iter().next()
        })
    }

    /// Waits until the last segment of `request_id`'s capture with `role` is stored, and
    /// returns every segment in order (one for an exchange that was not split).
    pub fn wait_for_all_segments(&self, role: &str, request_id: &str) -> Result<Vec<CaptureFiles>> {
        wait_for(&format!("the last {role} segment of request {request_id}"), Duration::from_secs(30), || {
            let mut segments: Vec<(i64, bool, CaptureFiles)> = self
                .captures(role, request_id)
                .into_iter()
                .filter_map(|files| {
                    let document = files.document().ok()?;
                    Some((document.get_i64("segment").ok()?, document.get_bool("lastSegment").ok()?, files))
                })
                .collect();
            segments.sort_by_key(|(segment, ..)| *segment);
            let complete = segments.last().is_some_and(|(n, last, _)| *last && *n == segments.len() as i64);
            complete.then(|| segments.into_iter().map(|(.., files)| files).collect())
        })
    }

    /// The "decode as" rule for an HTTP capture of `role` (tshark `-d`, Wireshark *Decode
    /// As…*): `protocol` (`http`, `http2`) on the server port of the captured conversation, known
    /// here without reading the file (see [`crate::tshark::decode_rule`]).
    pub fn decode_as(&self, role: &str, protocol: &str) -> String {
        let port = if role == "consumer" { self.client_listener.port() } else { self.server_listener.port() };
        format!("tcp.port=={port},{protocol}")
    }

    /// Stops everything with SIGTERM, in dependency order; fails if a component did not exit
    /// cleanly. (Dropping a `Mesh` also stops everything, without the check.)
    pub fn shutdown(mut self) -> Result<()> {
        let mut unclean = Vec::new();
        for slot in [
            &mut self.client_envoy,
            &mut self.server_envoy,
            &mut self.diameter_app,
            &mut self.aggregator,
            &mut self.emulator,
        ] {
            if let Some(mut process) = slot.take() {
                match process.stop(Duration::from_secs(30)) {
                    Some(status) if status.success() => {}
                    status => unclean.push(format!("{} ({status:?})", process.name)),
                }
            }
        }
        if !unclean.is_empty() {
            bail!("not stopped cleanly: {}", unclean.join(", "));
        }
        Ok(())
    }

    fn processes(&self) -> impl Iterator<Item = &Process> {
        [&self.client_envoy, &self.server_envoy, &self.diameter_app, &self.aggregator, &self.emulator]
            .into_iter()
            .flatten()
    }

    /// The tail of every component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.processes().map(|p| format!("----- {} ({})\n{}\n", p.name, p.log.display(), p.tail(lines))).collect()
    }

    pub fn log_of(&self, name: &str) -> String {
        self.processes().find(|p| p.name == name).map(Process::log_text).unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // A failed start is reported by its error (see `start`), which may be what a test expects.
        if std::thread::panicking() {
            eprintln!(
                "end-to-end failure; component logs (kept under {}):\n{}",
                self.dir.display(),
                self.log_tails(40)
            );
            if let Some(message) = crate::last_panic() {
                eprintln!("end-to-end failure, repeated after the logs: {message}");
            }
        }
        if !std::thread::panicking() && !self.failed {
            for slot in [
                &mut self.client_envoy,
                &mut self.server_envoy,
                &mut self.diameter_app,
                &mut self.aggregator,
                &mut self.emulator,
            ] {
                slot.take();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The aggregator's Service name the chart is rendered with (resolved to loopback in the run).
/// Where Istio's node agent serves SDS in the pod, and where its injection mounts the labels.
const ISTIO_SDS_SOCKET: &str = "/var/run/secrets/workload-spiffe-uds/socket";
const ISTIO_POD_LABELS: &str = "/etc/istio/pod/labels";

pub const CHART_AGGREGATOR_HOST: &str = "packet-inspector-1-aggregator.istio-system.svc.cluster.local";

/// `overlay` merged into `base`, objects key by key.
fn merge(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(base), serde_json::Value::Object(overlay)) => {
            for (key, value) in overlay {
                merge(base.entry(key).or_insert(serde_json::Value::Null), value);
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// YAML to JSON with the virtualenv's PyYAML (the sidecar templates are YAML; Envoy takes both).
fn yaml_to_json(text: &str) -> Result<serde_json::Value> {
    use std::io::Write;
    let mut child = Command::new(tools::python()?)
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("YAML conversion failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// One Credit-Control answer the client peer received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiameterAnswer {
    pub result_code: u32,
    pub hop_by_hop_id: u32,
    pub end_to_end_id: u32,
}

/// Two loopback addresses (client side, server side) whose port 3868 is free, different for
/// each run so meshes of parallel tests do not collide.
fn diameter_addresses() -> Result<(SocketAddr, SocketAddr)> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::process::id() % 200 + 20;
    for _ in 0..50 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (second, third) = ((base + n / 250) % 250 + 2, n % 250 + 2);
        let client = SocketAddr::from(([127, second as u8, third as u8, 1], DIAMETER_PORT));
        let server = SocketAddr::from(([127, second as u8, third as u8, 2], DIAMETER_PORT));
        if std::net::TcpListener::bind(client).is_ok() && std::net::TcpListener::bind(server).is_ok() {
            return Ok((client, server));
        }
    }
    bail!("no loopback address with port {DIAMETER_PORT} free")
}

fn wait_listening(mut process: Process, port: u16) -> Result<Process> {
    let up = wait_for(&format!("{} to listen on {port}", process.name), STARTUP, || {
        if process.exited().is_some() {
            return Some(false);
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| true)
    });
    match up {
        Ok(true) => Ok(process),
        Ok(false) => bail!("{} exited during startup:\n{}", process.name, process.tail(40)),
        Err(err) => bail!("{err}:\n{}", process.tail(40)),
    }
}

/// GET on a local plain-HTTP admin endpoint; the body as text.
pub fn admin_get(port: u16, path: &str) -> Result<String> {
    let response =
        http::send(SocketAddr::from(([127, 0, 0, 1], port)), &format!("GET {path} HTTP/1.1\r\nhost: admin"), b"")?;
    if response.status != 200 {
        bail!("GET {path} on :{port} answered {}", response.status);
    }
    Ok(String::from_utf8_lossy(&response.body).into_owned())
}
