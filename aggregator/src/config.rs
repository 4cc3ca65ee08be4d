//! Command-line flags (each also read from the environment) and their validation.

use std::{path::PathBuf, time::Duration};

use clap::Parser;

/// Per-node daemon of Packet Inspector: receives frames from the capture filters over mTLS gRPC,
/// synthesizes a pcap capture per transaction and forwards it to the analysis service over TLS.
#[derive(Debug, Clone, Parser)]
#[command(name = "packet-inspector-aggregator", version)]
pub struct Args {
    /// Address the mTLS gRPC server for filters listens on.
    #[arg(long, env = "PI_LISTEN", default_value = "0.0.0.0:15500")]
    pub listen: String,
    /// Address of the plain-HTTP admin endpoint (/metrics, /healthz); empty disables it.
    #[arg(long, env = "PI_ADMIN_LISTEN", default_value = "0.0.0.0:15501")]
    pub admin_listen: String,
    /// PEM certificate chain the server presents to filters (leaf first).
    #[arg(long, env = "PI_TLS_CERT", default_value = "/etc/packet-inspector/certs/cert-chain.pem")]
    pub tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PI_TLS_KEY", default_value = "/etc/packet-inspector/certs/key.pem")]
    pub tls_key: PathBuf,
    /// PEM CA bundle filter client certificates must chain to (mTLS is always required).
    #[arg(long, env = "PI_CLIENT_CA", default_value = "/etc/packet-inspector/certs/root-cert.pem")]
    pub client_ca: PathBuf,
    /// How often (seconds) the certificate files are checked for changes; changed ones are loaded
    /// for new connections.
    #[arg(long, env = "PI_TLS_RELOAD_INTERVAL_SECONDS", default_value_t = 10)]
    pub tls_reload_interval_seconds: u64,
    /// The analysis service, host:port; its certificate must carry a DNS-name SAN equal to host.
    #[arg(
        long,
        env = "PI_ANALYSIS_ADDRESS",
        default_value = "packet-inspector-1-analysis-emulator.analysis-emulator.svc.cluster.local:21000"
    )]
    pub analysis_address: String,
    /// Send every HTTP body inline in the capture (`HttpMessage.body`), as well as in its
    /// packets, rather than as slices of the packets (`body_in_records`): for analysis tools
    /// that read only `body`. Costs the aggregator about a third more CPU at large bodies.
    #[arg(long, env = "PI_INLINE_BODIES")]
    pub inline_bodies: bool,
    /// PEM CA bundle the analysis service's certificate must chain to.
    #[arg(long, env = "PI_ANALYSIS_CA", default_value = "/etc/packet-inspector/certs/root-cert.pem")]
    pub analysis_ca: PathBuf,
    /// The filter module (.wasm) to serve to proxies at /filter.wasm on the admin endpoint.
    #[arg(long, env = "PI_FILTER_MODULE")]
    pub filter_module: Option<PathBuf>,
    /// The native capture (the dynamic module's .so) to serve to proxies at /native-capture.so
    /// on the admin endpoint.
    #[arg(long, env = "PI_NATIVE_MODULE")]
    pub native_module: Option<PathBuf>,
    /// Name of the node this aggregator runs on (for captures whose proxy did not report it).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// Captures waiting for the analysis service; beyond this they are dropped and counted.
    #[arg(long, env = "PI_FORWARD_QUEUE", default_value_t = 1024)]
    pub forward_queue: usize,
    /// ... and at most this many bytes of them (encoded); beyond it they are dropped and
    /// counted too. Large captures reach this bound before the count.
    #[arg(long, env = "PI_FORWARD_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub forward_queue_bytes: usize,
    /// SubmitStream calls kept open to the analysis service while there is something to send
    /// (each with at most 64 captures or 4 MiB unanswered), or concurrent Submit calls against
    /// a service without SubmitStream.
    #[arg(long, env = "PI_FORWARD_CONCURRENCY", default_value_t = 8)]
    pub forward_concurrency: usize,
    /// Open transactions per filter stream; at the bound the stalest one is delivered as
    /// aborted (and counted) to make room.
    #[arg(long, env = "PI_MAX_OPEN_TRANSACTIONS", default_value_t = 4096)]
    pub max_open_transactions: usize,
    /// Bytes one transaction may hold (headers and captured bodies).
    #[arg(long, env = "PI_MAX_TRANSACTION_BYTES", default_value_t = 40 * 1024 * 1024)]
    pub max_transaction_bytes: usize,
    /// An HTTP/2 or gRPC stream still open this long (milliseconds) after its last capture
    /// segment is captured so far, as a segment of its own; the stream goes on.
    #[arg(long, env = "PI_SEGMENT_INTERVAL_MS", default_value_t = 10_000)]
    pub segment_interval_ms: u64,
    /// ... or once this many body bytes have arrived since its last segment.
    #[arg(long, env = "PI_SEGMENT_BYTES", default_value_t = 1024 * 1024)]
    pub segment_bytes: usize,
    /// A Diameter request unanswered this long (milliseconds) is captured without its answer.
    #[arg(long, env = "PI_DIAMETER_ANSWER_TIMEOUT_MS", default_value_t = 10_000)]
    pub diameter_answer_timeout_ms: u64,
    /// Seconds a SIGTERM/SIGINT shutdown may take to deliver what was accepted.
    #[arg(long, env = "PI_SHUTDOWN_GRACE_SECONDS", default_value_t = 20)]
    pub shutdown_grace_seconds: u64,
}

/// A flag with a value the aggregator cannot use.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag} {value:?}: {reason}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

/// `host:port` split, with the port checked.
pub fn host_port(flag: &'static str, value: &str) -> Result<(String, u16), ConfigError> {
    let error = |reason: &str| ConfigError { flag, value: value.to_owned(), reason: reason.to_owned() };
    let (host, port) = value.rsplit_once(':').ok_or_else(|| error("expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| error("the port is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(error("the port is not a number from 1 to 65535"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(error("the host is empty"));
    }
    Ok((host.to_owned(), port))
}

impl Args {
    /// Checks what clap cannot.
    ///
    /// # Errors
    /// [`ConfigError`] naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        host_port("analysis-address", &self.analysis_address)?;
        let positive = |flag, value: usize| {
            if value == 0 {
                Err(ConfigError { flag, value: "0".into(), reason: "must be at least 1".into() })
            } else {
                Ok(())
            }
        };
        positive("forward-queue", self.forward_queue)?;
        positive("forward-queue-bytes", self.forward_queue_bytes)?;
        positive("forward-concurrency", self.forward_concurrency)?;
        positive("max-open-transactions", self.max_open_transactions)?;
        positive("max-transaction-bytes", self.max_transaction_bytes)?;
        positive("segment-bytes", self.segment_bytes)?;
        positive("diameter-answer-timeout-ms", usize::try_from(self.diameter_answer_timeout_ms).unwrap_or(usize::MAX))?;
        positive("segment-interval-ms", usize::try_from(self.segment_interval_ms).unwrap_or(usize::MAX))?;
        Ok(())
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_accepts_names_and_ipv6() {
        assert_eq!(host_port("f", "analysis.local:21000").unwrap(), ("analysis.local".into(), 21000));
        assert_eq!(host_port("f", "[::1]:80").unwrap(), ("::1".into(), 80));
    }

    #[test]
    fn host_port_errors_name_the_flag() {
        for bad in ["nohost", "h:0", "h:99999", ":80", "h:x"] {
            let err = host_port("analysis-address", bad).unwrap_err();
            assert!(err.to_string().starts_with("invalid --analysis-address"), "{err}");
        }
    }

    #[test]
    fn defaults_are_valid_and_zero_limits_are_not() {
        let args = Args::parse_from(["aggregator"]);
        args.validate().unwrap();
        let args = Args::parse_from(["aggregator", "--forward-queue", "0"]);
        assert_eq!(args.validate().unwrap_err().flag, "forward-queue");
    }
}
