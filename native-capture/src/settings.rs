//! The native capture's configuration: the Wasm filter's plugin configuration (same keys, same
//! validation, see `filter::config`) plus where and how to reach the aggregator, which the
//! library connects to itself rather than through an Envoy cluster.
//!
//! Its mTLS identity comes from one of two places:
//!
//! - the sidecar's secret service, as Envoy's own does (`sdsSocket`; Istio's node agent serves
//!   the workload certificate there, see [`packet_inspector_proto::sds`]): nothing to mount;
//! - files (`caFile`, `certFile`, `keyFile`), reloaded when they change.
//!
//! ```json
//! {
//!   "aggregator": {
//!     "address": "packet-inspector-1-aggregator.istio-system.svc.cluster.local:15500",
//!     "serverName": "packet-inspector-1-aggregator.istio-system.svc",
//!     "sdsSocket": "/var/run/secrets/workload-spiffe-uds/socket"
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
        "invalid native capture configuration: `aggregator` is required (the aggregator's address, and `sdsSocket` or the mTLS files)"
    )]
    NoAggregator,
    #[error("invalid native capture configuration: `aggregator` needs either `sdsSocket` or all of `caFile`, `certFile` and `keyFile`{0}")]
    Credentials(&'static str),
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

/// Where the mTLS identity presented to the aggregator, and the roots it is checked against,
/// come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The secret service on this Unix socket (Istio's `default` and `ROOTCA` secrets).
    Sds { socket: PathBuf },
    /// PEM files.
    Files { ca_file: PathBuf, cert_file: PathBuf, key_file: PathBuf },
}

/// Where the aggregator is and how to prove who we are to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregator {
    pub host: String,
    pub port: u16,
    /// The DNS name the aggregator's certificate must carry (`serverName`, the host when not
    /// given); `None` (`serverName: ""`): any certificate the roots vouch for, as the Wasm
    /// filter's cluster without subject-alt-name matchers (Istio's workload certificates name a
    /// SPIFFE identity, not a DNS name).
    pub server_name: Option<String>,
    pub credentials: Credentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAggregator {
    address: String,
    server_name: Option<String>,
    sds_socket: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

impl RawAggregator {
    fn credentials(self) -> Result<Credentials, SettingsError> {
        match (self.sds_socket, self.ca_file, self.cert_file, self.key_file) {
            (Some(socket), None, None, None) => Ok(Credentials::Sds { socket }),
            (None, Some(ca_file), Some(cert_file), Some(key_file)) => {
                Ok(Credentials::Files { ca_file, cert_file, key_file })
            }
            (Some(_), ..) => Err(SettingsError::Credentials(", not both")),
            (None, None, None, None) => Err(SettingsError::Credentials("")),
            (None, ..) => Err(SettingsError::Credentials(" (some of the files are missing)")),
        }
    }
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
        let server_name = match raw.server_name.clone() {
            None => Some(host.to_owned()),
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name),
        };
        let aggregator = Aggregator { host: host.to_owned(), port, server_name, credentials: raw.credentials()? };
        Ok(Self { capture, aggregator, pod_labels_file })
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
        assert_eq!(settings.aggregator.server_name.as_deref(), Some("agg.svc"));
        let Credentials::Files { key_file, .. } = &settings.aggregator.credentials else { panic!("files") };
        assert_eq!(key_file, &PathBuf::from("/certs/key.pem"));
        assert_eq!(settings.capture.max_body_bytes, 10);
        assert_eq!(settings.capture.flush_interval_ms, 20);
        assert_eq!(settings.capture.cluster, "10.0.0.7:15010");
    }

    #[test]
    fn the_identity_can_come_from_the_secret_service() {
        let settings = parse(r#"{"aggregator": {"address": "a:1", "sdsSocket": "/run/sds.sock"}}"#).unwrap();
        assert_eq!(settings.aggregator.credentials, Credentials::Sds { socket: PathBuf::from("/run/sds.sock") });
    }

    #[test]
    fn the_server_name_defaults_to_the_host() {
        let settings = parse(&format!(r#"{{"aggregator": {{"address": "aggregator.local:9", {FILES}}}}}"#)).unwrap();
        assert_eq!(settings.aggregator.server_name.as_deref(), Some("aggregator.local"));
        let any = parse(&format!(r#"{{"aggregator": {{"address": "a:9", "serverName": "", {FILES}}}}}"#)).unwrap();
        assert_eq!(any.aggregator.server_name, None, "an empty serverName checks the chain only");
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
        assert!(missing.contains("`sdsSocket` or all of `caFile`"), "{missing}");
        let partial = parse(r#"{"aggregator": {"address": "a:1", "caFile": "/ca.pem"}}"#);
        assert_eq!(partial, Err(SettingsError::Credentials(" (some of the files are missing)")));
        let both = parse(&format!(r#"{{"aggregator": {{"address": "a:1", "sdsSocket": "/s", {FILES}}}}}"#));
        assert_eq!(both, Err(SettingsError::Credentials(", not both")));
        let typo = parse(&format!(r#"{{"maxBodyByte": 1, "aggregator": {{"address": "a:1", {FILES}}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(typo.starts_with("invalid native capture configuration") && typo.contains("maxBodyByte"), "{typo}");
    }
}
