//! A tiny plain-HTTP admin endpoint, off the data path: `GET /metrics` (Prometheus text),
//! `GET /healthz`, and the capture modules the aggregator was given, each with its SHA-256:
//! `GET /filter.wasm` and `/filter.wasm.sha256` (the Wasm filter), `GET /native-capture.so` and
//! `/native-capture.so.sha256` (the native capture). Proxies fetch a module from the aggregator
//! of their node (pinned by that sha256 in the filter chart), so no OCI registry is needed.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A capture module served to proxies at `url_path`, with its SHA-256 (lower-case hex) at
/// `url_path` + `.sha256`.
#[derive(Debug, Clone)]
pub struct ServedModule {
    pub url_path: &'static str,
    pub content_type: &'static str,
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
}

/// Where the Wasm filter is served.
pub const WASM_PATH: &str = "/filter.wasm";
/// Where the native capture is served.
pub const NATIVE_PATH: &str = "/native-capture.so";

impl ServedModule {
    /// Reads the module to serve at `url_path`.
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn load(path: &Path, url_path: &'static str, content_type: &'static str) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { url_path, content_type, bytes: Arc::new(bytes), sha256 })
    }
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    modules: Vec<ServedModule>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let (metrics, modules) = (metrics.clone(), modules.clone());
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request)).await
            else {
                return;
            };
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let module = |suffix: &str| modules.iter().find(|m| path.strip_suffix(suffix) == Some(m.url_path));
            let (status, content_type, body): (&str, &str, Vec<u8>) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render().into_bytes()),
                "/healthz" => ("200 OK", "text/plain", b"ok\n".to_vec()),
                _ => match (module(""), module(".sha256")) {
                    (Some(module), _) => ("200 OK", module.content_type, module.bytes.to_vec()),
                    (None, Some(module)) => ("200 OK", "text/plain", format!("{}\n", module.sha256).into_bytes()),
                    (None, None) => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
                },
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            if socket.write_all(head.as_bytes()).await.is_ok() {
                let _ = socket.write_all(&body).await;
            }
        });
    }
}
