//! The Packet Inspector aggregator: one per node, off the mesh.
//!
//! Filters stream frames to it over mTLS gRPC ([`service`]); each stream's frames are assembled
//! into transactions ([`assembly`]) or paired into Diameter exchanges ([`diameter`]), rendered
//! as HTTP/1.1 text ([`http1`]) or HTTP/2 frames ([`http2`]) carried by a synthesized TCP
//! conversation ([`tcp`]) and packed as an analysis capture ([`capture`]),
//! which the [`forwarder`] delivers to the analysis service over TLS. [`run`] wires them up
//! for a listener and a shutdown token, so tests bind port 0 and stop it cleanly.

pub mod admin;
pub mod assembly;
pub mod capture;
pub mod config;
pub mod diameter;
pub mod forwarder;
pub mod hpack;
pub mod http1;
pub mod http2;
pub mod metrics;
pub mod service;
pub mod tcp;
pub mod wire;

use std::{sync::Arc, time::Duration};

use packet_inspector_proto::{capture::capture_service_server::CaptureServiceServer, tls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    assembly::{Limits, Segmenting},
    capture::BodyForm,
    config::Args,
    forwarder::Forwarder,
    metrics::Metrics,
    service::CaptureServer,
};

/// What can stop the aggregator.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot read --{flag} {path}: {source}")]
    FilterModule { flag: &'static str, path: std::path::PathBuf, source: std::io::Error },
}

/// Serves filters on `listener` (and the admin endpoint on `admin`) until `shutdown`, then
/// delivers what was accepted within the grace period.
///
/// # Errors
/// [`AggregatorError`] for unusable configuration or certificates, or a failed server.
pub async fn run(
    args: Args,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AggregatorError> {
    args.validate()?;
    let identity = tls::Identity { cert_chain: args.tls_cert.clone(), private_key: args.tls_key.clone() };
    let server_tls = tls::reloading_server_config(identity, Some(args.client_ca.clone()))?;
    let client_tls = tls::reloading_client_config(args.analysis_ca.clone(), None, tls::ServerCheck::Name)?;
    let reload_every = Duration::from_secs(args.tls_reload_interval_seconds.max(1));
    server_tls.watch("filter server", reload_every, shutdown.clone());
    client_tls.watch("analysis client", reload_every, shutdown.clone());
    let (host, port) = config::host_port("analysis-address", &args.analysis_address)?;
    let channel = tls::connect_lazy(&host, port, client_tls, Duration::from_secs(5))?;

    let mut modules = Vec::new();
    for (flag, path, url_path, content_type) in [
        ("filter-module", &args.filter_module, admin::WASM_PATH, "application/wasm"),
        ("native-module", &args.native_module, admin::NATIVE_PATH, "application/octet-stream"),
    ] {
        let Some(path) = path else { continue };
        let module = admin::ServedModule::load(path, url_path, content_type)
            .map_err(|source| AggregatorError::FilterModule { flag, path: path.clone(), source })?;
        tracing::info!(path = %path.display(), sha256 = %module.sha256, "serving a capture module at {url_path}");
        modules.push(module);
    }
    let metrics = Arc::new(Metrics::default());
    let (forwarder, delivery) = Forwarder::start(
        channel,
        args.forward_queue,
        args.forward_queue_bytes as u64,
        args.forward_concurrency,
        metrics.clone(),
    );
    if let Some(admin) = admin {
        tokio::spawn(admin::serve(admin, metrics.clone(), modules, shutdown.clone()));
    }
    let service = CaptureServer {
        forwarder,
        metrics: metrics.clone(),
        limits: Limits {
            max_open_transactions: args.max_open_transactions,
            max_transaction_bytes: args.max_transaction_bytes,
            segmenting: Segmenting {
                interval_ns: args.segment_interval_ms.saturating_mul(1_000_000),
                max_bytes: args.segment_bytes,
            },
        },
        diameter_answer_timeout_ns: args.diameter_answer_timeout_ms.saturating_mul(1_000_000),
        node: args.node_name.clone(),
        bodies: if args.inline_bodies { BodyForm::Inline } else { BodyForm::InRecords },
        shutdown: shutdown.clone(),
    };
    tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), analysis = %args.analysis_address, "aggregator serving");
    let incoming = tls::serve_incoming(listener, server_tls, shutdown.clone());
    tonic::transport::Server::builder()
        .add_service(CaptureServiceServer::new(service).max_decoding_message_size(8 * 1024 * 1024))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    tracing::info!("no longer accepting frames; delivering what was accepted");
    match tokio::time::timeout(args.shutdown_grace(), delivery).await {
        Ok(_) => tracing::info!(
            forwarded = metrics.captures_forwarded_total.load(std::sync::atomic::Ordering::Relaxed),
            "aggregator stopped cleanly"
        ),
        Err(_) => tracing::warn!("shutdown grace period over; captures still queued were dropped"),
    }
    Ok(())
}
