//! The analysis emulator: stands in for a third-party analysis tool. It serves the
//! `AnalysisService` contract over TLS (`Submit` and `SubmitStream`) and stores each capture as
//! `<stem>.bson` and `<stem>.pcap` under an output directory ([`store`], named by [`naming`]).
//! [`pace`] makes it a slower tool on demand, for load tests of the aggregator.

pub mod naming;
pub mod pace;
pub mod store;

use std::{
    path::PathBuf,
    sync::{atomic::AtomicU64, atomic::Ordering::Relaxed, Arc},
};

use clap::Parser;
use packet_inspector_proto::{
    analysis::{
        analysis_service_server::{AnalysisService, AnalysisServiceServer},
        Capture, SubmitReply,
    },
    tls,
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::pace::Pacer;

/// Stands in for an analysis tool: a TLS gRPC server that writes one .bson and one .pcap per capture.
#[derive(Debug, Clone, Parser)]
#[command(name = "packet-inspector-analysis-emulator", version)]
pub struct Args {
    /// Address the TLS gRPC server listens on.
    #[arg(long, env = "PI_LISTEN", default_value = "0.0.0.0:21000")]
    pub listen: String,
    /// PEM certificate chain presented to the aggregator; it must carry a DNS-name SAN equal to
    /// the host the aggregator is configured with.
    #[arg(long, env = "PI_TLS_CERT", default_value = "/etc/analysis/certs/cert-chain.pem")]
    pub tls_cert: PathBuf,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PI_TLS_KEY", default_value = "/etc/analysis/certs/key.pem")]
    pub tls_key: PathBuf,
    /// Directory the captures are written to.
    #[arg(long, env = "PI_OUTPUT_DIR", default_value = "/tmp")]
    pub output_dir: PathBuf,
    /// Acknowledge captures without storing them (a sink for benchmarks); they are counted and
    /// the count logged at shutdown.
    #[arg(long, env = "PI_DISCARD")]
    pub discard: bool,
    /// Take at most this many captures a second, over all calls (0: as fast as they are
    /// stored). Stands in for a slower analysis tool: the aggregator's back-pressure, queue and
    /// drop counters can then be load-tested at a known multiple of what the service sustains.
    #[arg(long, env = "PI_MAX_CAPTURES_PER_SECOND", default_value_t = 0)]
    pub max_captures_per_second: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("--output-dir {path}: {reason}")]
    OutputDir { path: PathBuf, reason: String },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How many captures of one `SubmitStream` call are stored at once (they are answered in order).
const STORES_PER_STREAM: usize = 16;

#[derive(Clone)]
struct Emulator {
    output_dir: Arc<PathBuf>,
    discard: bool,
    discarded: Arc<AtomicU64>,
    /// `--max-captures-per-second`, when set.
    pacer: Option<Arc<Pacer>>,
    /// Ends the `SubmitStream` calls, which would otherwise hold a graceful shutdown open.
    shutdown: CancellationToken,
}

/// A capture of a stream being stored, or already answered.
enum Answer {
    Storing(tokio::task::JoinHandle<Result<String, Status>>),
    Ready(Result<String, Status>),
}

impl Emulator {
    /// Waits for the next capture's turn under `--max-captures-per-second`.
    async fn take_turn(&self) {
        if let Some(pacer) = &self.pacer {
            pacer.wait().await;
        }
    }

    /// Stores one capture (off the async threads: file writes block), or only counts it with
    /// `--discard`. A capture that cannot be stored is an error status saying why.
    fn start_storing(&self, capture: Capture) -> Answer {
        if self.discard {
            self.discarded.fetch_add(1, Relaxed);
            return Answer::Ready(Ok(String::new()));
        }
        let dir = self.output_dir.clone();
        Answer::Storing(tokio::task::spawn_blocking(move || match store::store(&dir, &capture) {
            Ok(stem) => {
                tracing::info!(file = %stem, "capture stored");
                Ok(stem)
            }
            Err(err @ (store::StoreError::NoMetadata | store::StoreError::NoExchange | store::StoreError::Body(_))) => {
                tracing::warn!(error = %err, "capture refused");
                Err(Status::invalid_argument(err.to_string()))
            }
            Err(err) => {
                tracing::error!(error = %err, "capture not stored");
                Err(Status::internal(err.to_string()))
            }
        }))
    }
}

impl Answer {
    async fn stored(self) -> Result<String, Status> {
        match self {
            Answer::Ready(answer) => answer,
            Answer::Storing(task) => {
                task.await.unwrap_or_else(|err| Err(Status::internal(format!("storing task failed: {err}"))))
            }
        }
    }
}

#[tonic::async_trait]
impl AnalysisService for Emulator {
    async fn submit(&self, request: Request<Capture>) -> Result<Response<SubmitReply>, Status> {
        self.take_turn().await;
        let stored_as = self.start_storing(request.into_inner()).stored().await?;
        Ok(Response::new(SubmitReply { stored_as, refused: String::new() }))
    }

    type SubmitStreamStream = ReceiverStream<Result<SubmitReply, Status>>;

    /// Stores up to [`STORES_PER_STREAM`] captures at once and answers them in order. On
    /// shutdown it stops reading, answers what it read, and ends the call with UNAVAILABLE (the
    /// aggregator sends anything unanswered again, elsewhere or later).
    async fn submit_stream(
        &self,
        request: Request<Streaming<Capture>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        let mut captures = request.into_inner();
        let (answers, mut answers_rx) = mpsc::channel::<Result<Answer, Status>>(STORES_PER_STREAM);
        let (replies, replies_rx) = mpsc::channel(STORES_PER_STREAM);
        let emulator = self.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = emulator.shutdown.cancelled() => {
                        let _ = answers.send(Err(Status::unavailable("the analysis emulator is shutting down"))).await;
                        return;
                    }
                    next = captures.message() => next,
                };
                match next {
                    Ok(Some(capture)) => {
                        // Not reading while waiting: HTTP/2 flow control holds the aggregator.
                        emulator.take_turn().await;
                        if answers.send(Ok(emulator.start_storing(capture))).await.is_err() {
                            return;
                        }
                    }
                    // The aggregator ended its side: answer what is left, then end the call.
                    Ok(None) => return,
                    Err(status) => {
                        tracing::debug!(error = %status, "SubmitStream call broken by the aggregator");
                        return;
                    }
                }
            }
        });
        tokio::spawn(async move {
            while let Some(answer) = answers_rx.recv().await {
                let reply = match answer {
                    Ok(answer) => Ok(match answer.stored().await {
                        Ok(stored_as) => SubmitReply { stored_as, refused: String::new() },
                        Err(status) => SubmitReply { stored_as: String::new(), refused: status.message().to_owned() },
                    }),
                    Err(end) => Err(end),
                };
                if replies.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(replies_rx)))
    }
}

/// Serves on `listener` until `shutdown`; calls under way finish first (their files are
/// complete or absent, never partial).
///
/// # Errors
/// [`EmulatorError`] for unusable certificates or output directory, or a failed server.
pub async fn run(args: Args, listener: TcpListener, shutdown: CancellationToken) -> Result<(), EmulatorError> {
    let output_dir = &args.output_dir;
    let metadata = std::fs::metadata(output_dir)
        .map_err(|err| EmulatorError::OutputDir { path: output_dir.clone(), reason: err.to_string() })?;
    if !metadata.is_dir() {
        return Err(EmulatorError::OutputDir { path: output_dir.clone(), reason: "not a directory".into() });
    }
    let identity = tls::Identity { cert_chain: args.tls_cert.clone(), private_key: args.tls_key.clone() };
    let config = tls::reloading_server_config(identity, None)?;
    config.watch("analysis server", std::time::Duration::from_secs(10), shutdown.clone());
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        output_dir = %output_dir.display(),
        max_captures_per_second = args.max_captures_per_second,
        "analysis emulator serving"
    );
    let incoming = tls::serve_incoming(listener, config, shutdown.clone());
    let discarded = Arc::new(AtomicU64::new(0));
    let service = Emulator {
        output_dir: Arc::new(args.output_dir.clone()),
        discard: args.discard,
        discarded: discarded.clone(),
        pacer: Pacer::per_second(args.max_captures_per_second).map(Arc::new),
        shutdown: shutdown.clone(),
    };
    tonic::transport::Server::builder()
        .add_service(AnalysisServiceServer::new(service).max_decoding_message_size(64 * 1024 * 1024))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
        .await?;
    if args.discard {
        tracing::info!(discarded = discarded.load(Relaxed), "analysis emulator stopped cleanly");
    } else {
        tracing::info!("analysis emulator stopped cleanly");
    }
    Ok(())
}
