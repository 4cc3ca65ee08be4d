//! A tiny plain-HTTP admin endpoint, off the data path: `GET /metrics` (Prometheus text),
//! `GET /healthz`, and, when the aggregator was given the filter module, `GET /filter.wasm` and
//! `GET /filter.wasm.sha256`: proxies fetch the module from the aggregator of their node (pinned
//! by that sha256 in the filter chart), so no OCI registry is needed.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The filter module served to proxies, with its SHA-256 (lower-case hex).
#[derive(Debug, Clone)]
pub struct FilterModule {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
}

impl FilterModule {
    /// Reads the module.
    ///
    /// # Errors
    /// When the file cannot be read.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { bytes: Arc::new(bytes), sha256 })
    }
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    module: Option<FilterModule>,
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
        let (metrics, module) = (metrics.clone(), module.clone());
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_secs(5), socket.read(&mut request)).await
            else {
                return;
            };
            let line = String::from_utf8_lossy(&request[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body): (&str, &str, Vec<u8>) = match (path, &module) {
                ("/metrics", _) => ("200 OK", "text/plain; version=0.0.4", metrics.render().into_bytes()),
                ("/healthz", _) => ("200 OK", "text/plain", b"ok\n".to_vec()),
                ("/filter.wasm", Some(module)) => ("200 OK", "application/wasm", module.bytes.to_vec()),
                ("/filter.wasm.sha256", Some(module)) => {
                    ("200 OK", "text/plain", format!("{}\n", module.sha256).into_bytes())
                }
                _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
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
