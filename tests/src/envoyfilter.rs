//! Applies Istio EnvoyFilter patches to an Envoy bootstrap, as istiod does to a sidecar's
//! configuration, so the config the filter chart renders is the config the tests run.
//!
//! Supported, because the chart uses them: `HTTP_FILTER` and `NETWORK_FILTER` with
//! `INSERT_BEFORE` (matched by context ↔ listener traffic direction, listener port, filter and
//! sub-filter names) and `CLUSTER` with `ADD`. Anything else fails loudly.
//!
//! What a cluster provides and a laptop does not is stood in for, and only that:
//! - Istio's SDS (the sidecar's `default` certificate and the `ROOTCA` bundle, served over
//!   `sds-grpc` by pilot-agent) becomes file-based SDS with the same secret names;
//! - cluster DNS (the aggregator's Service name) resolves to loopback, in Envoy's clusters and
//!   in the native capture's configuration (it resolves the name itself);
//! - paths in the pod that the native capture's configuration names (the node agent's SDS
//!   socket, the downward-API labels file) become the test's stand-ins for them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// What stands in for the cluster around one sidecar.
pub struct Emulation {
    /// Files holding the `default` and `ROOTCA` secrets.
    pub sds_files: Vec<(String, PathBuf)>,
    /// Host name → address.
    pub dns: Vec<(String, String)>,
    /// Path in the pod → the stand-in's path, replaced inside the native capture's
    /// configuration.
    pub pod_paths: Vec<(String, PathBuf)>,
}

impl Emulation {
    /// Writes the sidecar's secrets as file-based SDS resources next to its certificates.
    pub fn for_certs(certs: &Path, dns: Vec<(String, String)>) -> Result<Self> {
        let default = json!({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"filename": certs.join("cert-chain.pem")},
                "private_key": {"filename": certs.join("key.pem")},
            },
        }]});
        let root = json!({"resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "ROOTCA",
            "validation_context": {"trusted_ca": {"filename": certs.join("root-cert.pem")}},
        }]});
        let mut sds_files = Vec::new();
        for (name, secret) in [("default", default), ("ROOTCA", root)] {
            let path = certs.join(format!("sds-{name}.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&secret)?)?;
            sds_files.push((name.to_owned(), path));
        }
        Ok(Self { sds_files, dns, pod_paths: Vec::new() })
    }

    /// Rewrites what the cluster would have provided.
    fn localize(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                if let (Some(Value::String(name)), Some(sds)) = (map.get("name").cloned(), map.get_mut("sds_config")) {
                    if let Some((_, path)) = self.sds_files.iter().find(|(secret, _)| *secret == name) {
                        *sds = json!({"path_config_source": {"path": path}, "resource_api_version": "V3"});
                    }
                }
                if let Some(Value::String(address)) = map.get_mut("address") {
                    if let Some((_, ip)) = self.dns.iter().find(|(host, _)| host == address) {
                        *address = ip.clone();
                    }
                }
                // The native capture's configuration is JSON in a string.
                if let Some(Value::String(config)) = map.get_mut("filter_config").and_then(|c| c.get_mut("value")) {
                    for (host, ip) in &self.dns {
                        *config = config.replace(&format!("\"{host}:"), &format!("\"{ip}:"));
                    }
                    for (path, standin) in &self.pod_paths {
                        *config = config.replace(&format!("\"{path}\""), &format!("\"{}\"", standin.display()));
                    }
                }
                map.values_mut().for_each(|v| self.localize(v));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.localize(v)),
            _ => {}
        }
    }
}

fn is_capture(name: Option<&str>) -> bool {
    name.is_some_and(|n| n.starts_with("packet_inspector"))
}

/// Removes Packet Inspector from a sidecar's config: what an Istio sidecar looks like with no
/// capture instance installed.
pub fn strip_capture(config: &mut Value) {
    let name = |v: &Value| v.get("name").and_then(Value::as_str).map(str::to_owned);
    if let Some(clusters) = config.pointer_mut("/static_resources/clusters").and_then(Value::as_array_mut) {
        clusters.retain(|c| !is_capture(name(c).as_deref()));
    }
    for listener in
        config.pointer_mut("/static_resources/listeners").and_then(Value::as_array_mut).into_iter().flatten()
    {
        for chain in listener.get_mut("filter_chains").and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(filters) = chain.get_mut("filters").and_then(Value::as_array_mut) else { continue };
            filters.retain(|f| !is_capture(name(f).as_deref()));
            for filter in filters {
                if let Some(http) = filter.pointer_mut("/typed_config/http_filters").and_then(Value::as_array_mut) {
                    http.retain(|f| !is_capture(name(f).as_deref()));
                }
            }
        }
    }
}

fn direction(context: &str) -> Result<&'static str> {
    Ok(match context {
        "SIDECAR_INBOUND" => "INBOUND",
        "SIDECAR_OUTBOUND" => "OUTBOUND",
        other => bail!("context {other} has no listener in a sidecar bootstrap"),
    })
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

/// Inserts `value` before the element named `before` in every matching list; returns how many.
fn insert_before(list: &mut Vec<Value>, before: &str, value: &Value) -> usize {
    match list.iter().position(|f| str_at(f, "/name") == Some(before)) {
        Some(index) => {
            list.insert(index, value.clone());
            1
        }
        None => 0,
    }
}

/// Applies every patch of `envoy_filters` to `config`; returns how many places were patched.
pub fn apply(config: &mut Value, envoy_filters: &[Value], emulation: &Emulation) -> Result<usize> {
    let mut applied = 0;
    for envoy_filter in envoy_filters.iter().filter(|o| str_at(o, "/kind") == Some("EnvoyFilter")) {
        let patches = envoy_filter.pointer("/spec/configPatches").and_then(Value::as_array).context("configPatches")?;
        for patch in patches {
            let apply_to = str_at(patch, "/applyTo").context("applyTo")?;
            let operation = str_at(patch, "/patch/operation").context("operation")?;
            let mut value = patch.pointer("/patch/value").cloned().context("patch value")?;
            emulation.localize(&mut value);
            match (apply_to, operation) {
                ("CLUSTER", "ADD") => {
                    let clusters = config
                        .pointer_mut("/static_resources/clusters")
                        .and_then(Value::as_array_mut)
                        .context("static_resources.clusters")?;
                    clusters.push(value);
                    applied += 1;
                }
                ("HTTP_FILTER" | "NETWORK_FILTER", "INSERT_BEFORE") => {
                    let want = direction(str_at(patch, "/match/context").context("match.context")?)?;
                    let port = patch.pointer("/match/listener/portNumber").and_then(Value::as_u64);
                    let filter = str_at(patch, "/match/listener/filterChain/filter/name").context("filter name")?;
                    let sub_filter = str_at(patch, "/match/listener/filterChain/filter/subFilter/name");
                    let listeners = config
                        .pointer_mut("/static_resources/listeners")
                        .and_then(Value::as_array_mut)
                        .context("listeners")?;
                    for listener in listeners {
                        let matches = str_at(listener, "/traffic_direction") == Some(want)
                            && port.is_none_or(|p| {
                                listener.pointer("/address/socket_address/port_value").and_then(Value::as_u64)
                                    == Some(p)
                            });
                        if !matches {
                            continue;
                        }
                        for chain in
                            listener.get_mut("filter_chains").and_then(Value::as_array_mut).into_iter().flatten()
                        {
                            let Some(filters) = chain.get_mut("filters").and_then(Value::as_array_mut) else {
                                continue;
                            };
                            if apply_to == "NETWORK_FILTER" {
                                applied += insert_before(filters, filter, &value);
                                continue;
                            }
                            for network_filter in filters.iter_mut().filter(|f| str_at(f, "/name") == Some(filter)) {
                                let http = network_filter
                                    .pointer_mut("/typed_config/http_filters")
                                    .and_then(Value::as_array_mut);
                                if let (Some(http), Some(sub_filter)) = (http, sub_filter) {
                                    applied += insert_before(http, sub_filter, &value);
                                }
                            }
                        }
                    }
                }
                other => bail!("patch {other:?} is not supported by this emulation of istiod"),
            }
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Value {
        json!({"static_resources": {
            "listeners": [
                {"name": "out", "traffic_direction": "OUTBOUND", "address": {"socket_address": {"port_value": 9080}},
                 "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {"http_filters": [{"name": "packet_inspector"}, {"name": "envoy.filters.http.router"}]}}]}]},
                {"name": "dia", "traffic_direction": "OUTBOUND", "address": {"socket_address": {"port_value": 3868}},
                 "filter_chains": [{"filters": [{"name": "packet_inspector_diameter"}, {"name": "envoy.filters.network.tcp_proxy"}]}]}
            ],
            "clusters": [{"name": "app"}, {"name": "packet_inspector_aggregator"}]
        }})
    }

    #[test]
    fn strips_and_patches_like_istiod() {
        let mut config = sidecar();
        strip_capture(&mut config);
        assert_eq!(config.pointer("/static_resources/clusters").unwrap().as_array().unwrap().len(), 1);
        let filters = vec![json!({"kind": "EnvoyFilter", "spec": {"configPatches": [
            {"applyTo": "HTTP_FILTER", "match": {"context": "SIDECAR_OUTBOUND", "listener": {"filterChain": {"filter": {
                "name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": "envoy.filters.http.router"}}}}},
             "patch": {"operation": "INSERT_BEFORE", "value": {"name": "capture", "typed_config": {"filter_config": {
                "value": r#"{"aggregator":{"address":"agg.ns.svc:15500","serverName":"agg.ns.svc","sdsSocket":"/var/run/sds"}}"#}}}}},
            {"applyTo": "HTTP_FILTER", "match": {"context": "SIDECAR_INBOUND", "listener": {"filterChain": {"filter": {
                "name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": "envoy.filters.http.router"}}}}},
             "patch": {"operation": "INSERT_BEFORE", "value": {"name": "never"}}},
            {"applyTo": "NETWORK_FILTER", "match": {"context": "SIDECAR_OUTBOUND", "listener": {"portNumber": 3868,
                "filterChain": {"filter": {"name": "envoy.filters.network.tcp_proxy"}}}},
             "patch": {"operation": "INSERT_BEFORE", "value": {"name": "capture_diameter"}}},
            {"applyTo": "CLUSTER", "match": {"context": "SIDECAR_OUTBOUND"}, "patch": {"operation": "ADD", "value": {
                "name": "agg", "address": "agg.ns.svc", "sds": {"name": "default", "sds_config": {"ads": {}}}}}}
        ]}})];
        let emulation = Emulation {
            sds_files: vec![("default".into(), "/s/default.json".into())],
            dns: vec![("agg.ns.svc".into(), "127.0.0.1".into())],
            pod_paths: vec![("/var/run/sds".into(), "/tmp/standin.sock".into())],
        };
        assert_eq!(apply(&mut config, &filters, &emulation).unwrap(), 3, "the inbound patch finds no inbound listener");
        let http: Vec<&str> = config
            .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(http, ["capture", "envoy.filters.http.router"]);
        let native = config
            .pointer("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters/0/typed_config/filter_config/value")
            .unwrap();
        assert_eq!(
            native,
            r#"{"aggregator":{"address":"127.0.0.1:15500","serverName":"agg.ns.svc","sdsSocket":"/tmp/standin.sock"}}"#,
            "the address resolved, the certificate's name kept, the socket stood in for"
        );
        assert_eq!(
            config.pointer("/static_resources/listeners/1/filter_chains/0/filters/0/name").unwrap(),
            "capture_diameter"
        );
        let cluster = config.pointer("/static_resources/clusters/1").unwrap();
        assert_eq!(cluster["address"], "127.0.0.1");
        assert_eq!(cluster.pointer("/sds/sds_config/path_config_source/path").unwrap(), "/s/default.json");
        let unsupported = vec![
            json!({"kind": "EnvoyFilter", "spec": {"configPatches": [{"applyTo": "LISTENER", "patch": {"operation": "MERGE", "value": {}}}]}}),
        ];
        assert!(apply(&mut config, &unsupported, &emulation).is_err());
    }
}
