//! The native capture's configuration: the Wasm filter's plugin configuration (same keys, same
//! validation, see `filter::config`) plus where and how to reach the aggregator, which the
//! library connects to itself rather than through an Envoy cluster.
//!
//! ```json
//! {
//!   "aggregator": {
//!     "address": "10.96.0.12:15010",
//!     "serverName": "packet-inspector-aggregator.istio-system.svc",
//!     "caFile": "/etc/packet-inspector/root-cert.pem",
//!     "certFile": "/etc/packet-inspector/cert-chain.pem",
//!     "keyFile": "/etc/packet-inspector/key.pem"
//!   },
//!   "podLabelsFile": "/etc/istio/pod/labels",
//!   "maxBodyBytes": 65536
//! }
//! ```

use std::path::PathBuf;

use packet_inspector_filter::config::{CaptureProtocol, Config, ConfigError};
use serde::Deserialize;

/// Why a configuration was refused; each names the key and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("invalid native capture configuration: {0}")]
    Syntax(String),
    #[error(
        "invalid native capture configuration: `aggregator` is required (the aggregator's address and the mTLS files)"
    )]
    NoAggregator,
    #[error("invalid native capture configuration: `cluster` is the Wasm filter's key; the native capture connects by itself (set `aggregator`)")]
    Cluster,
    #[error("invalid native capture configuration: `aggregator.address` {0:?} is not host:port")]
    Address(String),
    #[error("invalid native capture configuration: `protocol` must be `http`; Diameter is captured by the Wasm network filter")]
    Protocol,
    #[error("{0}")]
    Capture(String),
}

impl From<ConfigError> for SettingsError {
    fn from(error: ConfigError) -> Self {
        Self::Capture(error.to_string().replace("invalid plugin configuration", "invalid native capture configuration"))
    }
}

/// Where the aggregator is and the files of the mTLS identity presented to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregator {
    pub host: String,
    pub port: u16,
    /// The DNS name the aggregator's certificate must carry.
    pub server_name: String,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAggregator {
    address: String,
    server_name: Option<String>,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The capture settings shared with the Wasm filter (its `cluster` holds the aggregator's
    /// address, which is what the pipeline's messages name).
    pub capture: Config,
    pub aggregator: Aggregator,
    /// The pod's labels as Istio mounts them (`podLabelsFile`; see [`crate::identity`]).
    pub pod_labels_file: PathBuf,
}

impl Settings {
    /// Parses and validates a configuration.
    ///
    /// # Errors
    /// [`SettingsError`] naming the key at fault.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SettingsError> {
        let mut value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|err| SettingsError::Syntax(err.to_string()))?;
        let object = value.as_object_mut().ok_or_else(|| SettingsError::Syntax("expected a JSON object".to_owned()))?;
        if object.contains_key("cluster") {
            return Err(SettingsError::Cluster);
        }
        let raw = object.remove("aggregator").ok_or(SettingsError::NoAggregator)?;
        let pod_labels_file = match object.remove("podLabelsFile") {
            None => PathBuf::from(crate::identity::ISTIO_POD_LABELS),
            Some(serde_json::Value::String(path)) if !path.is_empty() => PathBuf::from(path),
            Some(other) => {
                return Err(SettingsError::Syntax(format!("`podLabelsFile`: expected a path, found {other}")))
            }
        };
        let raw: RawAggregator =
            serde_json::from_value(raw).map_err(|err| SettingsError::Syntax(format!("`aggregator`: {err}")))?;
        let (host, port) = raw
            .address
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host.trim_start_matches('[').trim_end_matches(']'), port.parse().ok()?)))
            .filter(|(host, port)| !host.is_empty() && *port != 0)
            .ok_or_else(|| SettingsError::Address(raw.address.clone()))?;
        object.insert("cluster".to_owned(), serde_json::Value::String(raw.address.clone()));
        let capture = Config::from_json(value.to_string().as_bytes())?;
        if capture.protocol != CaptureProtocol::Http {
            return Err(SettingsError::Protocol);
        }
        Ok(Self {
            capture,
            aggregator: Aggregator {
                host: host.to_owned(),
                port,
                server_name: raw.server_name.unwrap_or_else(|| host.to_owned()),
                ca_file: raw.ca_file,
                cert_file: raw.cert_file,
                key_file: raw.key_file,
            },
            pod_labels_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILES: &str = r#""caFile": "/certs/root.pem", "certFile": "/certs/chain.pem", "keyFile": "/certs/key.pem""#;

    fn parse(json: &str) -> Result<Settings, SettingsError> {
        Settings::from_json(json.as_bytes())
    }

    #[test]
    fn reads_the_aggregator_and_the_capture_keys() {
        let settings = parse(&format!(
            r#"{{"aggregator": {{"address": "10.0.0.7:15010", "serverName": "agg.svc", {FILES}}}, "maxBodyBytes": 10, "flushIntervalMs": 20}}"#
        ))
        .unwrap();
        assert_eq!(settings.aggregator.host, "10.0.0.7");
        assert_eq!(settings.aggregator.port, 15010);
        assert_eq!(settings.aggregator.server_name, "agg.svc");
        assert_eq!(settings.aggregator.key_file, PathBuf::from("/certs/key.pem"));
        assert_eq!(settings.capture.max_body_bytes, 10);
        assert_eq!(settings.capture.flush_interval_ms, 20);
        assert_eq!(settings.capture.cluster, "10.0.0.7:15010");
    }

    #[test]
    fn the_server_name_defaults_to_the_host() {
        let settings = parse(&format!(r#"{{"aggregator": {{"address": "aggregator.local:9", {FILES}}}}}"#)).unwrap();
        assert_eq!(settings.aggregator.server_name, "aggregator.local");
        assert_eq!(settings.capture.max_body_bytes, 64 * 1024, "the Wasm filter's defaults apply");
        assert_eq!(settings.pod_labels_file, PathBuf::from("/etc/istio/pod/labels"));
    }

    #[test]
    fn refuses_what_it_cannot_act_on() {
        assert_eq!(parse("{}"), Err(SettingsError::NoAggregator));
        assert_eq!(
            parse(&format!(r#"{{"cluster": "x", "aggregator": {{"address": "a:1", {FILES}}}}}"#)),
            Err(SettingsError::Cluster)
        );
        for address in ["nohost", ":15010", "host:0", "host:port"] {
            assert_eq!(
                parse(&format!(r#"{{"aggregator": {{"address": "{address}", {FILES}}}}}"#)),
                Err(SettingsError::Address(address.to_owned())),
                "{address}"
            );
        }
        assert_eq!(
            parse(&format!(r#"{{"protocol": "diameter", "aggregator": {{"address": "a:1", {FILES}}}}}"#)),
            Err(SettingsError::Protocol)
        );
        let labels = parse(&format!(r#"{{"podLabelsFile": 3, "aggregator": {{"address": "a:1", {FILES}}}}}"#));
        assert!(labels.unwrap_err().to_string().contains("podLabelsFile"));
        let missing = parse(r#"{"aggregator": {"address": "a:1"}}"#).unwrap_err().to_string();
        assert!(missing.contains("caFile"), "{missing}");
        let typo = parse(&format!(r#"{{"maxBodyByte": 1, "aggregator": {{"address": "a:1", {FILES}}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(typo.starts_with("invalid native capture configuration") && typo.contains("maxBodyByte"), "{typo}");
    }
}
