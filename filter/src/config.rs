//! The plugin configuration: parsed and validated once in `on_configure`, then shared by every
//! context of the VM. Keys are camelCase JSON; unknown keys are errors (a typo must not silently
//! fall back to a default).

use serde::Deserialize;

/// Why a plugin configuration was refused; the message names the key and the reason.
#[derive(Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// Not JSON, a mistyped value, or an unknown key.
    Syntax(String),
    /// A value outside its range.
    Invalid { key: &'static str, reason: String },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Syntax(detail) => write!(f, "invalid plugin configuration: {detail}"),
            Self::Invalid { key, reason } => write!(f, "invalid plugin configuration: `{key}` {reason}"),
        }
    }
}

/// Which side of the mesh conversation this proxy is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RoleSetting {
    /// From Envoy's listener direction: OUTBOUND → consumer, INBOUND → producer.
    Auto,
    Consumer,
    Producer,
}

/// What the plugin captures, and so how Envoy must load it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CaptureProtocol {
    /// HTTP/1.1, HTTP/2 and gRPC: loaded as an HTTP filter (`envoy.filters.http.wasm`).
    Http,
    /// Diameter over TCP: loaded as a network filter before `tcp_proxy`
    /// (`envoy.filters.network.wasm`).
    Diameter,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The Envoy cluster that reaches the aggregator (it carries the mTLS).
    pub cluster: String,
    /// Body bytes captured per direction of one exchange; the rest is counted as truncated.
    pub max_body_bytes: u64,
    /// How often buffered frames are sent, and the stream reconnected when down.
    pub flush_interval_ms: u32,
    /// Upper bound of one batch, well under the 4 MiB gRPC message limit.
    pub max_batch_bytes: usize,
    /// Upper bound of frames waiting to be sent; beyond it captures are dropped and counted.
    pub max_buffer_bytes: usize,
    /// Batches sent but not yet acknowledged by the aggregator.
    pub max_batches_in_flight: usize,
    pub role: RoleSetting,
    /// Whether this proxy is a gateway (reported in the metadata).
    pub gateway: bool,
    /// Pod labels copied into the metadata of each capture.
    pub labels: Vec<String>,
    pub protocol: CaptureProtocol,
    /// Diameter is captured on connections to this port (the listener's, which is the original
    /// destination port in a mesh); 0 captures every connection the filter sees.
    pub diameter_port: u16,
    /// Longer Diameter messages are let through uncaptured (and counted).
    pub max_diameter_message_bytes: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    cluster: String,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: u64,
    #[serde(default = "defaults::flush_interval_ms")]
    flush_interval_ms: u32,
    #[serde(default = "defaults::max_batch_bytes")]
    max_batch_bytes: usize,
    #[serde(default = "defaults::max_buffer_bytes")]
    max_buffer_bytes: usize,
    #[serde(default = "defaults::max_batches_in_flight")]
    max_batches_in_flight: usize,
    #[serde(default = "defaults::role")]
    role: RoleSetting,
    #[serde(default)]
    gateway: bool,
    #[serde(default = "defaults::labels")]
    labels: Vec<String>,
    #[serde(default = "defaults::protocol")]
    protocol: CaptureProtocol,
    #[serde(default = "defaults::diameter_port")]
    diameter_port: u16,
    #[serde(default = "defaults::max_diameter_message_bytes")]
    max_diameter_message_bytes: usize,
}

mod defaults {
    pub fn max_body_bytes() -> u64 {
        64 * 1024
    }
    pub fn flush_interval_ms() -> u32 {
        100
    }
    /// Small batches: Envoy sends a batch (copy, HTTP/2 framing, TLS) on the worker thread in
    /// one go, between requests; a 1 MiB batch is about a millisecond of worker time at once,
    /// 64 KiB a few tens of microseconds, at the same total cost.
    pub fn max_batch_bytes() -> usize {
        64 * 1024
    }
    pub fn max_buffer_bytes() -> usize {
        8 * 1024 * 1024
    }
    /// With 64 KiB batches, 1 MiB unacknowledged.
    pub fn max_batches_in_flight() -> usize {
        16
    }
    pub fn role() -> super::RoleSetting {
        super::RoleSetting::Auto
    }
    pub fn protocol() -> super::CaptureProtocol {
        super::CaptureProtocol::Http
    }
    pub fn diameter_port() -> u16 {
        3868
    }
    pub fn max_diameter_message_bytes() -> usize {
        1024 * 1024
    }
    pub fn labels() -> Vec<String> {
        ["app", "version", "app.kubernetes.io/name", "app.kubernetes.io/version"].map(String::from).to_vec()
    }
}

/// gRPC's default maximum message size; a batch must stay below it with room to spare.
const GRPC_MESSAGE_LIMIT: usize = 4 * 1024 * 1024;

impl Config {
    /// Parses and validates the JSON plugin configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the offending key.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|err| ConfigError::Syntax(err.to_string()))?;
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if raw.cluster.trim().is_empty() {
            return invalid("cluster", "must name the Envoy cluster that reaches the aggregator".into());
        }
        if raw.max_body_bytes > 16 * 1024 * 1024 {
            return invalid("maxBodyBytes", format!("is {}; at most 16777216", raw.max_body_bytes));
        }
        if !(10..=10_000).contains(&raw.flush_interval_ms) {
            return invalid("flushIntervalMs", format!("is {}; must be 10 to 10000", raw.flush_interval_ms));
        }
        if !(4096..=GRPC_MESSAGE_LIMIT * 3 / 4).contains(&raw.max_batch_bytes) {
            return invalid(
                "maxBatchBytes",
                format!("is {}; must be 4096 to {}", raw.max_batch_bytes, GRPC_MESSAGE_LIMIT * 3 / 4),
            );
        }
        if raw.max_buffer_bytes < raw.max_batch_bytes || raw.max_buffer_bytes > 256 * 1024 * 1024 {
            return invalid(
                "maxBufferBytes",
                format!(
                    "is {}; must be at least maxBatchBytes ({}) and at most 268435456",
                    raw.max_buffer_bytes, raw.max_batch_bytes
                ),
            );
        }
        if !(1..=64).contains(&raw.max_batches_in_flight) {
            return invalid("maxBatchesInFlight", format!("is {}; must be 1 to 64", raw.max_batches_in_flight));
        }
        if !(20..=16 * 1024 * 1024).contains(&raw.max_diameter_message_bytes) {
            return invalid(
                "maxDiameterMessageBytes",
                format!("is {}; must be 20 (a bare header) to 16777216", raw.max_diameter_message_bytes),
            );
        }
        if raw.labels.iter().any(|label| label.is_empty()) {
            return invalid("labels", "must not contain an empty label name".into());
        }
        Ok(Self {
            cluster: raw.cluster,
            max_body_bytes: raw.max_body_bytes,
            flush_interval_ms: raw.flush_interval_ms,
            max_batch_bytes: raw.max_batch_bytes,
            max_buffer_bytes: raw.max_buffer_bytes,
            max_batches_in_flight: raw.max_batches_in_flight,
            role: raw.role,
            gateway: raw.gateway,
            labels: raw.labels,
            protocol: raw.protocol,
            diameter_port: raw.diameter_port,
            max_diameter_message_bytes: raw.max_diameter_message_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::from_json(br#"{"cluster": "packet_inspector"}"#).unwrap();
        assert_eq!(config.cluster, "packet_inspector");
        assert_eq!(config.max_body_bytes, 65536);
        assert_eq!(config.role, RoleSetting::Auto);
        assert_eq!((config.max_batch_bytes, config.max_batches_in_flight), (65536, 16));
        assert!(config.labels.contains(&"app".to_string()));
    }

    #[test]
    fn full_config_is_read() {
        let config = Config::from_json(
            br#"{"cluster":"c","maxBodyBytes":10,"flushIntervalMs":50,"maxBatchBytes":8192,
                 "maxBufferBytes":16384,"maxBatchesInFlight":2,"role":"producer","gateway":true,"labels":["tier"]}"#,
        )
        .unwrap();
        assert_eq!((config.max_body_bytes, config.flush_interval_ms, config.max_batch_bytes), (10, 50, 8192));
        assert_eq!((config.max_buffer_bytes, config.max_batches_in_flight), (16384, 2));
        assert_eq!(
            (config.role, config.gateway, config.labels),
            (RoleSetting::Producer, true, vec!["tier".to_string()])
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_syntax_errors() {
        let err = Config::from_json(br#"{"cluster":"c","maxBodyByte":10}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `maxBodyByte`"), "{err}");
        let err = Config::from_json(br#"{"cluster":"c","maxBodyBytes":"10"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err}");
        assert!(matches!(Config::from_json(b"not json"), Err(ConfigError::Syntax(_))));
        assert!(matches!(Config::from_json(b"{}"), Err(ConfigError::Syntax(ref m)) if m.contains("cluster")));
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let cases: [(&[u8], &str); 6] = [
            (br#"{"cluster":" "}"#, "cluster"),
            (br#"{"cluster":"c","flushIntervalMs":0}"#, "flushIntervalMs"),
            (br#"{"cluster":"c","maxBatchBytes":4194304}"#, "maxBatchBytes"),
            (br#"{"cluster":"c","maxBatchBytes":65536,"maxBufferBytes":4096}"#, "maxBufferBytes"),
            (br#"{"cluster":"c","maxBatchesInFlight":0}"#, "maxBatchesInFlight"),
            (br#"{"cluster":"c","maxBodyBytes":99999999}"#, "maxBodyBytes"),
        ];
        for (json, key) in cases {
            match Config::from_json(json) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key),
                other => panic!("{key}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn diameter_mode() {
        let config = Config::from_json(br#"{"cluster":"c","protocol":"diameter","diameterPort":3869}"#).unwrap();
        assert_eq!(
            (config.protocol, config.diameter_port, config.max_diameter_message_bytes),
            (CaptureProtocol::Diameter, 3869, 1 << 20)
        );
        assert_eq!(Config::from_json(br#"{"cluster":"c"}"#).unwrap().diameter_port, 3868);
        assert!(matches!(Config::from_json(br#"{"cluster":"c","protocol":"sip"}"#), Err(ConfigError::Syntax(_))));
        assert!(matches!(Config::from_json(br#"{"cluster":"c","diameterPort":70000}"#), Err(ConfigError::Syntax(_))));
        assert!(matches!(
            Config::from_json(br#"{"cluster":"c","maxDiameterMessageBytes":4}"#),
            Err(ConfigError::Invalid { key: "maxDiameterMessageBytes", .. })
        ));
    }

    #[test]
    fn unknown_role_is_refused() {
        assert!(matches!(Config::from_json(br#"{"cluster":"c","role":"gateway"}"#), Err(ConfigError::Syntax(_))));
    }
}
