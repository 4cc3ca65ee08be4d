//! What Istio's node agent is to the native capture: a Secret Discovery Service on a Unix socket
//! serving the sidecar's certificate files as Istio's secrets (`default`: the chain and key;
//! `ROOTCA`: the roots), inline, as the agent sends them. [`SdsServer::rotate`] pushes the
//! files again under a new version to every open stream, as the agent does when it renews the
//! workload certificate; what the client answered to each push (ACK or NACK) is recorded.

use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
};

use anyhow::{Context, Result};
use packet_inspector_proto::sds::{
    v3::{
        data_source::Specifier,
        secret::Type,
        secret_discovery_service_server::{SecretDiscoveryService, SecretDiscoveryServiceServer},
        CertificateValidationContext, DataSource, DiscoveryRequest, DiscoveryResponse, Secret, TlsCertificate,
    },
    ROOT_SECRET, SECRET_TYPE_URL, WORKLOAD_SECRET,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

/// A client's answer to one push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub secret: String,
    /// The version the client says it runs (the pushed one for an ACK).
    pub version: String,
    /// The nonce it answers.
    pub nonce: String,
    /// Why it refused the push (a NACK), if it did.
    pub refused: Option<String>,
    /// The node id of the stream's first request.
    pub node_id: String,
}

struct Files {
    certs: PathBuf,
    /// Versions from this one on carry a key that is not PEM.
    unusable_from: Arc<AtomicU64>,
    version: watch::Receiver<u64>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl Files {
    fn secret(&self, name: &str, version: u64) -> Result<Secret, Status> {
        let read = |file: &str| {
            if file == "key.pem" && version >= self.unusable_from.load(Ordering::Relaxed) {
                return Ok(Some(DataSource { specifier: Some(Specifier::InlineBytes(b"not a key".to_vec())) }));
            }
            std::fs::read(self.certs.join(file))
                .map(|bytes| Some(DataSource { specifier: Some(Specifier::InlineBytes(bytes)) }))
                .map_err(|err| Status::internal(format!("{file}: {err}")))
        };
        let r#type = match name {
            WORKLOAD_SECRET => Type::TlsCertificate(TlsCertificate {
                certificate_chain: read("cert-chain.pem")?,
                private_key: read("key.pem")?,
            }),
            ROOT_SECRET => Type::ValidationContext(CertificateValidationContext { trusted_ca: read("root-cert.pem")? }),
            other => return Err(Status::not_found(format!("no secret {other:?}"))),
        };
        Ok(Secret { name: name.to_owned(), r#type: Some(r#type) })
    }

    fn response(&self, name: &str, version: u64) -> Result<DiscoveryResponse, Status> {
        let secret = self.secret(name, version)?;
        Ok(DiscoveryResponse {
            version_info: format!("v{version}"),
            resources: vec![prost_types::Any { type_url: SECRET_TYPE_URL.to_owned(), value: secret.encode_to_vec() }],
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: format!("{name}-{version}"),
        })
    }
}

#[derive(Clone)]
struct Service(Arc<Files>);

#[tonic::async_trait]
impl SecretDiscoveryService for Service {
    type StreamSecretsStream = ReceiverStream<Result<DiscoveryResponse, Status>>;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let mut requests = request.into_inner();
        let first = requests.message().await?.ok_or_else(|| Status::invalid_argument("no request"))?;
        let node_id = first.node.map(|node| node.id).unwrap_or_default();
        let [name] = first.resource_names.as_slice() else {
            return Err(Status::invalid_argument("one secret per stream"));
        };
        let name = name.clone();
        if first.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!("unexpected type {:?}", first.type_url)));
        }
        let (responses, stream) = mpsc::channel(4);
        let (this, mut version) = (self.0.clone(), self.0.version.clone());
        tokio::spawn(async move {
            let mut current = *version.borrow_and_update();
            if responses.send(this.response(&name, current)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = version.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        current = *version.borrow_and_update();
                        if responses.send(this.response(&name, current)).await.is_err() {
                            return;
                        }
                    }
                    request = requests.message() => {
                        let Ok(Some(request)) = request else { return };
                        this.answers.lock().unwrap_or_else(|p| p.into_inner()).push(Answer {
                            secret: name.clone(),
                            version: request.version_info,
                            nonce: request.response_nonce,
                            refused: request.error_detail.map(|status| status.message),
                            node_id: node_id.clone(),
                        });
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}

/// The stand-in agent, serving until dropped.
pub struct SdsServer {
    pub socket: PathBuf,
    unusable_from: Arc<AtomicU64>,
    version: watch::Sender<u64>,
    answers: Arc<Mutex<Vec<Answer>>>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl SdsServer {
    /// Serves the certificate files in `certs` (`cert-chain.pem`, `key.pem`, `root-cert.pem`)
    /// on a new Unix socket at `socket`.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn start(socket: &Path, certs: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let std_listener = std::os::unix::net::UnixListener::bind(socket)
            .with_context(|| format!("binding the secret service at {}", socket.display()))?;
        std_listener.set_nonblocking(true)?;
        let (version, versions) = watch::channel(1);
        let answers = Arc::new(Mutex::new(Vec::new()));
        let unusable_from = Arc::new(AtomicU64::new(u64::MAX));
        let files = Files {
            certs: certs.to_owned(),
            unusable_from: unusable_from.clone(),
            version: versions,
            answers: answers.clone(),
        };
        let service = Service(Arc::new(files));
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name("sds-standin".to_owned()).spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = tokio::net::UnixListener::from_std(std_listener) else { return };
                let serve = tonic::transport::Server::builder()
                    .add_service(SecretDiscoveryServiceServer::new(service))
                    .serve_with_incoming(UnixListenerStream::new(listener));
                // Not a graceful stop: open streams end with the runtime, as when the agent
                // goes away.
                tokio::select! {
                    _ = serve => {}
                    () = stop.cancelled() => {}
                }
            });
        })?;
        Ok(Self { socket: socket.to_owned(), unusable_from, version, answers, shutdown, thread: Some(thread) })
    }

    /// Pushes the files again, as a new version, to every open stream; returns the version.
    pub fn rotate(&self) -> u64 {
        self.unusable_from.store(u64::MAX, Ordering::Relaxed);
        self.version.send_modify(|version| *version += 1);
        *self.version.borrow()
    }

    /// Pushes a new version whose private key is not PEM (a broken renewal), and returns it; a
    /// later [`SdsServer::rotate`] serves the files again.
    pub fn push_unusable_key(&self) -> u64 {
        let next = *self.version.borrow() + 1;
        self.unusable_from.store(next, Ordering::Relaxed);
        self.version.send_replace(next);
        next
    }

    /// The clients' answers so far.
    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for SdsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Streams still open are ended with the runtime.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
