//! The config the filter chart renders is the config that runs: its EnvoyFilters, rendered with
//! the Helm SDK, are applied to Istio-like sidecar bootstraps the way istiod applies them (see
//! `packet_inspector_tests::envoyfilter`), real Envoy runs them, fetches the module from the
//! aggregator (pinned by sha256), and captures HTTP and Diameter. Without the chart (no capture
//! instance), the same sidecars pass the same traffic and capture nothing.

use packet_inspector_tests::{
    mesh::{self, Mesh, MeshOptions, Sidecar, SidecarCapture},
    tshark,
};
use serde_json::json;

#[test]
fn the_filter_charts_envoyfilters_capture_in_real_envoy() {
    let values = json!({"diameterCapture": {"enabled": true, "port": mesh::DIAMETER_PORT}});
    let mesh = Mesh::start(MeshOptions { capture: SidecarCapture::Chart { values }, ..Default::default() }).unwrap();
    // Each sidecar: the HTTP filter on its one HTTP listener, the network filter on its Diameter
    // listener, the aggregator and module clusters. (The chart's inbound patches find no listener
    // in the client sidecar, nor its outbound ones in the server sidecar, as in Istio.)
    assert_eq!(mesh.patches_applied, vec![("server-sidecar".to_owned(), 4), ("client-sidecar".to_owned(), 4)]);

    let response = mesh.request("GET /chart HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: chart-1", b"").unwrap();
    assert_eq!(response.status, 200);
    for role in ["consumer", "producer"] {
        let files = mesh.wait_for_capture(role, "chart-1").unwrap();
        a_get_decodes(&files, "/chart", role);
    }

    let answers = mesh.run_diameter_client(1).unwrap();
    assert_eq!(answers.len(), 1);
    diameter_is_captured_on_both_sides(&mesh);
    mesh.shutdown().unwrap();
}

/// A captured `GET uri` answered 200 decodes as HTTP on the server port, found in the file as the
/// README says (see tests/http1.rs).
fn a_get_decodes(files: &mesh::CaptureFiles, uri: &str, role: &str) {
    let rule = tshark::decode_rule(&files.pcap, "http").unwrap();
    let fields = ["http.request.method", "http.request.uri", "http.response.code"];
    let rows = tshark::fields_decoded(&files.pcap, &rule, "http", &fields).unwrap();
    assert_eq!(rows[0][..2], ["GET", uri], "{role}");
    assert_eq!(rows[1][2], "200", "{role}");
}

/// The Diameter exchanges of one client run, captured in both pods and decoded without problems.
fn diameter_is_captured_on_both_sides(mesh: &Mesh) {
    for pod in [mesh::CLIENT_POD, mesh::SERVER_POD] {
        let captures =
            packet_inspector_tests::wait_for("Diameter captures", std::time::Duration::from_secs(30), || {
                let captures = mesh.diameter_captures(pod);
                (captures.len() >= 4).then_some(captures)
            })
            .unwrap();
        assert!(captures.iter().all(|f| tshark::problems(&f.pcap).unwrap().is_empty()), "{pod}");
    }
}

/// The chart with HTTP captured by the native capture: Envoy fetches the library from the
/// aggregator (pinned by its sha256) as it fetches the Wasm module, the library takes the
/// sidecar's certificate from the node agent's SDS socket and the pod's labels from the
/// downward-API file, as Istio provides them in the pod, and its captures decode and carry the
/// pod's identity; Diameter stays with the Wasm network filter, side by side.
#[test]
fn the_filter_charts_native_capture_runs_in_real_envoy() {
    // No identities to check the aggregator's certificate for: any of the mesh CA's will do, as
    // with Istio's own workload certificates (SPIFFE URIs, no DNS name).
    let values = json!({
        "httpCapture": {"module": "native"},
        "diameterCapture": {"enabled": true, "port": mesh::DIAMETER_PORT},
        "aggregator": {"subjectAltNames": []},
    });
    let mesh = Mesh::start(MeshOptions { capture: SidecarCapture::Chart { values }, ..Default::default() }).unwrap();
    // The native HTTP filter, the Diameter network filter, and the clusters of the aggregator
    // (Diameter's streams) and of the two modules.
    assert_eq!(mesh.patches_applied, vec![("server-sidecar".to_owned(), 5), ("client-sidecar".to_owned(), 5)]);
    for name in ["client-sidecar", "server-sidecar"] {
        assert!(mesh.log_of(name).contains("Dynamic module ABI version v0.2.0 matched"), "{name}");
    }

    let response =
        mesh.request("GET /native HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: chart-native-1", b"").unwrap();
    assert_eq!(response.status, 200);
    for (role, pod, workload) in
        [("consumer", mesh::CLIENT_POD, mesh::CLIENT_WORKLOAD), ("producer", mesh::SERVER_POD, mesh::SERVER_WORKLOAD)]
    {
        let files = mesh.wait_for_capture(role, "chart-native-1").unwrap();
        a_get_decodes(&files, "/native", role);
        let document = files.document().unwrap();
        let metadata = document.get_document("metadata").unwrap();
        assert_eq!(metadata.get_str("podName").unwrap(), pod, "{role}");
        assert_eq!(metadata.get_str("role").unwrap(), role);
        assert_eq!(metadata.get_document("labels").unwrap().get_str("app").unwrap(), workload, "{role}");
    }
    for sidecar in [Sidecar::Client, Sidecar::Server] {
        assert_eq!(mesh.stat(sidecar, mesh::NATIVE_STATS, "streams_opened").unwrap(), 1, "{sidecar:?}");
        assert_eq!(mesh.stat(sidecar, mesh::WASM_STATS, "captures_started").unwrap(), 0, "HTTP is not captured twice");
    }
    let client_acks = mesh.secret_service(Sidecar::Client).unwrap().answers();
    assert!(client_acks.iter().any(|a| a.secret == "default" && a.refused.is_none()), "{client_acks:?}");

    assert_eq!(mesh.run_diameter_client(1).unwrap().len(), 1);
    diameter_is_captured_on_both_sides(&mesh);
    mesh.shutdown().unwrap();
}

/// Capture never costs traffic: when Envoy cannot take the native capture (here its sha256 does
/// not match what the aggregator serves), it says so in its log and runs the listeners without
/// it; requests pass and nothing is captured.
#[test]
fn a_native_capture_envoy_cannot_fetch_leaves_traffic_passing_uncaptured() {
    let values = json!({"httpCapture": {"module": "native"}, "nativeModule": {"sha256": "0".repeat(64)}});
    let options =
        MeshOptions { capture: SidecarCapture::Chart { values }, expect_capture_streams: false, ..Default::default() };
    let mesh = Mesh::start(options).unwrap();
    let response =
        mesh.request("POST /unfetched HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: unfetched-1", b"passes").unwrap();
    assert_eq!((response.status, response.body.as_slice()), (200, &b"passes"[..]));
    for name in ["client-sidecar", "server-sidecar"] {
        let log = mesh.log_of(name);
        assert!(log.contains("Remote dynamic module fetch returned empty data"), "{name}:\n{}", mesh.log_tails(20));
        assert!(!log.contains("ABI version v0.2.0 matched"), "{name} never loaded it");
    }
    assert_eq!(mesh.aggregator_metric("streams_total").unwrap(), 0);
    mesh.shutdown().unwrap();
}

#[test]
fn without_a_capture_instance_traffic_passes_and_nothing_is_captured() {
    let mesh = Mesh::start(MeshOptions { capture: SidecarCapture::Bare, ..Default::default() }).unwrap();
    let response =
        mesh.request("POST /bare HTTP/1.1\r\nhost: reviews:9080\r\nx-request-id: bare-1", b"passes").unwrap();
    assert_eq!((response.status, response.body.as_slice()), (200, &b"passes"[..]));
    assert_eq!(mesh.run_diameter_client(1).unwrap().len(), 1);
    // No filter ever opened a stream, so nothing can have been captured.
    assert_eq!(mesh.aggregator_metric("streams_total").unwrap(), 0);
    assert_eq!(mesh.counter(mesh::Sidecar::Client, "captures_started").unwrap(), 0);
    assert!(std::fs::read_dir(&mesh.output_dir).unwrap().next().is_none(), "no capture file");
    mesh.shutdown().unwrap();
}
