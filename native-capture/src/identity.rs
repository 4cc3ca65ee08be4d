//! Who the sidecar is, for the native capture: the Wasm filter reads the node metadata Istio
//! puts in Envoy's bootstrap, which this ABI does not expose, so the native capture reads the
//! same facts where Istio also puts them in the sidecar's pod: the environment (`POD_NAME`,
//! `POD_NAMESPACE`, `ISTIO_META_WORKLOAD_NAME`) and the pod's labels, which Istio's injection
//! mounts through the downward API at [`ISTIO_POD_LABELS`] (`key="value"` lines, values quoted
//! as Go quotes them).

use std::{collections::HashMap, path::Path};

use packet_inspector_filter::{metadata::NodeIdentity, pairs::Pair};

/// Where Istio's sidecar injection mounts the pod's labels (the `istio-podinfo` volume).
pub const ISTIO_POD_LABELS: &str = "/etc/istio/pod/labels";

/// The identity from `variable` (the environment) and the labels file at `labels_file`, keeping
/// the `selected` labels. A missing or unreadable labels file means no labels: the captures are
/// still made.
pub fn read(variable: impl Fn(&str) -> Option<String>, labels_file: &Path, selected: &[String]) -> NodeIdentity {
    let labels = std::fs::read_to_string(labels_file).map(|text| labels(&text, selected)).unwrap_or_default();
    let var = |name| variable(name).unwrap_or_default();
    NodeIdentity {
        pod_name: var("POD_NAME"),
        namespace: var("POD_NAMESPACE"),
        workload: var("ISTIO_META_WORKLOAD_NAME"),
        labels,
    }
}

/// The node id the sidecar's Envoy presents to Istio's agent (`sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local`),
/// which the native capture presents too when it asks the agent's secret service for the
/// workload certificate. `instance_ip` is `INSTANCE_IP` from the sidecar's environment.
pub fn sds_node_id(node: &NodeIdentity, instance_ip: Option<&str>) -> String {
    let ip = instance_ip.filter(|ip| !ip.is_empty()).unwrap_or("0.0.0.0");
    let (pod, namespace) = (&node.pod_name, &node.namespace);
    format!("sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local")
}

/// The `selected` labels of a downward-API labels file; malformed lines are skipped.
pub fn labels(text: &str, selected: &[String]) -> HashMap<String, String> {
    let parsed: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| {
            let (key, quoted) = line.split_once('=')?;
            Some((key.trim().to_owned(), unquote(quoted.trim())?))
        })
        .collect();
    let pairs: Vec<Pair<'_>> = parsed.iter().map(|(key, value)| (key.as_bytes(), value.as_bytes())).collect();
    packet_inspector_filter::metadata::select_labels(&pairs, selected)
}

/// A Go-quoted string's value (the escapes label values can hold); `None` if not quoted.
fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut value = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            value.push(c);
            continue;
        }
        match chars.next()? {
            'n' => value.push('\n'),
            't' => value.push('\t'),
            other => value.push(other),
        }
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selected() -> Vec<String> {
        ["app", "version", "app.kubernetes.io/name"].map(String::from).to_vec()
    }

    #[test]
    fn reads_the_selected_labels_of_a_downward_api_file() {
        let text = "app=\"reviews\"\npod-template-hash=\"7d9f\"\nversion=\"v1\"\napp.kubernetes.io/name=\"say \\\"hi\\\"\"\nbroken line\nsecurity.istio.io/tlsMode=\"istio\"\n";
        let labels = labels(text, &selected());
        assert_eq!(labels.len(), 3, "{labels:?}");
        assert_eq!(labels["app"], "reviews");
        assert_eq!(labels["version"], "v1");
        assert_eq!(labels["app.kubernetes.io/name"], "say \"hi\"");
    }

    #[test]
    fn identity_from_the_environment_and_no_labels_without_the_file() {
        let environment = |name: &str| match name {
            "POD_NAME" => Some("reviews-v1-7d9f-x2x".to_owned()),
            "POD_NAMESPACE" => Some("bookinfo".to_owned()),
            "ISTIO_META_WORKLOAD_NAME" => Some("reviews-v1".to_owned()),
            _ => None,
        };
        let node = read(environment, Path::new("/nonexistent/labels"), &selected());
        assert_eq!(
            (node.pod_name.as_str(), node.namespace.as_str(), node.workload.as_str()),
            ("reviews-v1-7d9f-x2x", "bookinfo", "reviews-v1")
        );
        assert!(node.labels.is_empty());
        assert_eq!(
            sds_node_id(&node, Some("10.1.2.3")),
            "sidecar~10.1.2.3~reviews-v1-7d9f-x2x.bookinfo~bookinfo.svc.cluster.local"
        );
        assert!(sds_node_id(&node, None).starts_with("sidecar~0.0.0.0~"));
        let dir = std::env::temp_dir().join(format!("pi-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("labels"), "app=\"reviews\"\n").unwrap();
        let node = read(|_| None, &dir.join("labels"), &selected());
        assert_eq!(node.labels["app"], "reviews");
        assert_eq!(node.pod_name, "", "an unset variable is empty, not an error");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
