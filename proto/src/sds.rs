//! A workload's certificate from Envoy's Secret Discovery Service, as Istio's node agent serves
//! it to the sidecar's Envoy: what lets the native capture present the sidecar's own identity
//! to the aggregator without certificate files in the pod.
//!
//! [`follow`] opens one `StreamSecrets` stream per secret over the agent's Unix socket (as
//! Envoy does): Istio's `default` (the workload's certificate chain and key) and `ROOTCA` (the
//! mesh's roots). Each response is acknowledged (ACK: its version and nonce) or, when it cannot
//! be used, refused (NACK: the last accepted version, the nonce and why), and every time both
//! secrets are known a client config is built from them and published: Istio rotates workload
//! certificates about daily, and new connections take the new one. A stream that breaks is
//! reopened with backoff; what went wrong goes to the caller's `warn`.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

use prost::Message;
use rustls::ClientConfig;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tokio::{
    net::UnixStream,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::tls;

/// The generated subset of Envoy's SDS (`proto/envoy/service/secret/v3/sds_subset.proto`).
#[allow(clippy::all, missing_docs)]
pub mod v3 {
    include!(concat!(env!("OUT_DIR"), "/envoy.service.secret.v3.rs"));
}

use v3::{
    data_source::Specifier, secret::Type, secret_discovery_service_client::SecretDiscoveryServiceClient, DataSource,
    DiscoveryRequest, DiscoveryResponse, Node, RpcStatus, Secret,
};

/// The type URL of the resources SDS serves.
pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Istio's name for the workload's certificate chain and key.
pub const WORKLOAD_SECRET: &str = "default";
/// Istio's name for the mesh's root certificates.
pub const ROOT_SECRET: &str = "ROOTCA";
/// Where Istio's node agent serves SDS in the `istio-proxy` container.
pub const ISTIO_SDS_SOCKET: &str = "/var/run/secrets/workload-spiffe-uds/socket";

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// gRPC's INVALID_ARGUMENT, the code of a NACK's detail.
const INVALID_ARGUMENT: i32 = 3;

/// Why a pushed secret was refused (the NACK's message says the same).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("the response holds {0} resources, expected one")]
    Count(usize),
    #[error("the resource is a {0}, expected a {SECRET_TYPE_URL}")]
    Type(String),
    #[error("the resource does not decode as a Secret: {0}")]
    Decode(String),
    #[error("the secret is named {found:?}, expected {expected:?}")]
    Name { expected: &'static str, found: String },
    #[error("secret {0:?} holds no {1}")]
    Missing(&'static str, &'static str),
    #[error("secret {secret:?}: cannot read its {what}: {reason}")]
    Source { secret: &'static str, what: &'static str, reason: String },
    #[error("secret {secret:?}: its {what} is not usable PEM: {reason}")]
    Pem { secret: &'static str, what: &'static str, reason: String },
}

/// What one secret contributes, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Workload { chain: Vec<u8>, key: Vec<u8> },
    Roots(Vec<u8>),
}

fn read(source: Option<&DataSource>, secret: &'static str, what: &'static str) -> Result<Vec<u8>, SecretError> {
    let fail = |reason: String| SecretError::Source { secret, what, reason };
    match source.and_then(|source| source.specifier.as_ref()) {
        Some(Specifier::InlineBytes(bytes)) => Ok(bytes.clone()),
        Some(Specifier::InlineString(text)) => Ok(text.clone().into_bytes()),
        Some(Specifier::Filename(path)) => std::fs::read(path).map_err(|err| fail(format!("{path}: {err}"))),
        Some(Specifier::EnvironmentVariable(name)) => {
            std::env::var(name).map(String::into_bytes).map_err(|err| fail(format!("${name}: {err}")))
        }
        None => Err(SecretError::Missing(secret, what)),
    }
}

/// The part a response for `name` carries.
fn parse(name: &'static str, response: &DiscoveryResponse) -> Result<Part, SecretError> {
    let [resource] = response.resources.as_slice() else {
        return Err(SecretError::Count(response.resources.len()));
    };
    if resource.type_url != SECRET_TYPE_URL {
        return Err(SecretError::Type(resource.type_url.clone()));
    }
    let secret = Secret::decode(resource.value.as_slice()).map_err(|err| SecretError::Decode(err.to_string()))?;
    if secret.name != name {
        return Err(SecretError::Name { expected: name, found: secret.name });
    }
    match (name, secret.r#type) {
        (ROOT_SECRET, Some(Type::ValidationContext(context))) => {
            let roots = read(context.trusted_ca.as_ref(), name, "trusted CA")?;
            check_certificates(&roots, name, "trusted CA")?;
            Ok(Part::Roots(roots))
        }
        (ROOT_SECRET, _) => Err(SecretError::Missing(name, "validation context")),
        (_, Some(Type::TlsCertificate(certificate))) => {
            let chain = read(certificate.certificate_chain.as_ref(), name, "certificate chain")?;
            check_certificates(&chain, name, "certificate chain")?;
            let key = read(certificate.private_key.as_ref(), name, "private key")?;
            PrivateKeyDer::from_pem_slice(&key).map_err(|err| SecretError::Pem {
                secret: name,
                what: "private key",
                reason: err.to_string(),
            })?;
            Ok(Part::Workload { chain, key })
        }
        (_, _) => Err(SecretError::Missing(name, "TLS certificate")),
    }
}

/// PEM holding at least one certificate (a secret refused here is NACKed, not half used).
fn check_certificates(pem: &[u8], secret: &'static str, what: &'static str) -> Result<(), SecretError> {
    let fail = |reason: String| SecretError::Pem { secret, what, reason };
    let certificates =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|err| fail(err.to_string()))?;
    if certificates.is_empty() {
        return Err(fail("no PEM certificate".to_owned()));
    }
    Ok(())
}

/// A gRPC channel over the agent's Unix socket, connecting on first use.
fn channel(socket: PathBuf) -> Channel {
    // The authority is not looked at; the socket is the address.
    Endpoint::from_static("http://sds.local").connect_with_connector_lazy(tower::service_fn(move |_| {
        let socket = socket.clone();
        async move { Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(UnixStream::connect(socket).await?)) }
    }))
}

/// Where to ask, and as whom.
#[derive(Debug, Clone)]
pub struct Source {
    /// The agent's Unix socket ([`ISTIO_SDS_SOCKET`] in Istio).
    pub socket: PathBuf,
    /// The node id sent with the first request of each stream.
    pub node_id: String,
    /// What the configs built from the secrets check of the server certificate.
    pub check: tls::ServerCheck,
}

/// Follows the workload certificate and the roots at `source` until `shutdown`, publishing a
/// client config (as [`tls::client_config_from_pem`] builds it) each time both are known and
/// one changed. Problems (the socket unreachable, a refused secret, a chain that does not fit
/// its key) go to `warn`; the last good config stays published. Must run inside a Tokio
/// runtime.
pub fn follow(
    source: Source,
    warn: Arc<dyn Fn(String) + Send + Sync>,
    shutdown: CancellationToken,
) -> watch::Receiver<Option<Arc<ClientConfig>>> {
    let (publish, configs) = watch::channel(None);
    let (parts, mut received) = mpsc::channel(4);
    let channel = channel(source.socket.clone());
    let node = Node { id: source.node_id.clone(), cluster: String::new() };
    for name in [WORKLOAD_SECRET, ROOT_SECRET] {
        let follower = Follower {
            channel: channel.clone(),
            node: node.clone(),
            name,
            parts: parts.clone(),
            warn: warn.clone(),
            socket: source.socket.clone(),
        };
        tokio::spawn(follower.run(shutdown.clone()));
    }
    tokio::spawn(async move {
        let (mut workload, mut roots) = (None, None);
        while let Some(part) = received.recv().await {
            match part {
                Part::Workload { chain, key } => workload = Some((chain, key)),
                Part::Roots(pem) => roots = Some(pem),
            }
            let (Some((chain, key)), Some(roots)) = (&workload, &roots) else { continue };
            let what = format!("the certificates from the secret service at {}", source.socket.display());
            match tls::client_config_from_pem(&what, roots, chain, key, source.check) {
                Ok(config) => {
                    publish.send_replace(Some(Arc::new(config)));
                }
                Err(err) => warn(format!("{err}; keeping the previous certificates")),
            }
        }
    });
    configs
}

/// One secret's stream, reopened until shutdown.
struct Follower {
    channel: Channel,
    node: Node,
    name: &'static str,
    parts: mpsc::Sender<Part>,
    warn: Arc<dyn Fn(String) + Send + Sync>,
    socket: PathBuf,
}

impl Follower {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return,
                outcome = self.stream(&mut backoff) => outcome,
            };
            let why = match outcome {
                Ok(()) => "the stream ended".to_owned(),
                Err(status) => status.message().to_owned(),
            };
            (self.warn)(format!(
                "the secret service at {} (secret {:?}): {why}; retrying in {backoff:?}",
                self.socket.display(),
                self.name
            ));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One stream: the request, then an ACK or NACK for every response. A response taken
    /// resets `backoff`.
    async fn stream(&self, backoff: &mut Duration) -> Result<(), tonic::Status> {
        let request = |version: &str, nonce: &str, error: Option<RpcStatus>| DiscoveryRequest {
            version_info: version.to_owned(),
            node: None,
            resource_names: vec![self.name.to_owned()],
            type_url: SECRET_TYPE_URL.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: error,
        };
        let (requests, outgoing) = mpsc::unbounded_channel();
        let first = DiscoveryRequest { node: Some(self.node.clone()), ..request("", "", None) };
        let _ = requests.send(first);
        let mut client = SecretDiscoveryServiceClient::new(self.channel.clone());
        let mut responses = client
            .stream_secrets(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing))
            .await
            .map_err(|status| tonic::Status::new(status.code(), connect_message(&status)))?
            .into_inner();
        let mut accepted = String::new();
        while let Some(response) = responses.message().await? {
            let error = match parse(self.name, &response) {
                Ok(part) => {
                    *backoff = BACKOFF_MIN;
                    accepted.clone_from(&response.version_info);
                    if self.parts.send(part).await.is_err() {
                        return Ok(());
                    }
                    None
                }
                Err(err) => {
                    (self.warn)(format!(
                        "refused version {:?} of secret {:?} from the secret service: {err}",
                        response.version_info, self.name
                    ));
                    Some(RpcStatus { code: INVALID_ARGUMENT, message: err.to_string() })
                }
            };
            if requests.send(request(&accepted, &response.nonce, error)).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// tonic says "transport error" for an unreachable socket; the cause is what a user acts on.
fn connect_message(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use prost_types::Any;

    use super::*;

    fn response(name: &str, secret: Type) -> DiscoveryResponse {
        let secret = Secret { name: name.to_owned(), r#type: Some(secret) };
        DiscoveryResponse {
            version_info: "v1".into(),
            resources: vec![Any { type_url: SECRET_TYPE_URL.into(), value: secret.encode_to_vec() }],
            type_url: SECRET_TYPE_URL.into(),
            nonce: "n1".into(),
        }
    }

    fn inline(bytes: &[u8]) -> Option<DataSource> {
        Some(DataSource { specifier: Some(Specifier::InlineBytes(bytes.to_vec())) })
    }

    /// A self-signed certificate and its key, PEM.
    fn pem() -> (Vec<u8>, Vec<u8>) {
        let certified = rcgen::generate_simple_self_signed(vec!["workload.test".to_owned()]).unwrap();
        (certified.cert.pem().into_bytes(), certified.signing_key.serialize_pem().into_bytes())
    }

    #[test]
    fn the_two_secrets_become_their_parts_and_a_config() {
        let (cert, key) = pem();
        let workload = response(
            "default",
            Type::TlsCertificate(v3::TlsCertificate { certificate_chain: inline(&cert), private_key: inline(&key) }),
        );
        assert_eq!(parse(WORKLOAD_SECRET, &workload), Ok(Part::Workload { chain: cert.clone(), key: key.clone() }));
        let roots = response(
            "ROOTCA",
            Type::ValidationContext(v3::CertificateValidationContext {
                trusted_ca: Some(DataSource {
                    specifier: Some(Specifier::InlineString(String::from_utf8(cert.clone()).unwrap())),
                }),
            }),
        );
        assert_eq!(parse(ROOT_SECRET, &roots), Ok(Part::Roots(cert.clone())));
        for check in [tls::ServerCheck::Name, tls::ServerCheck::ChainOnly] {
            assert!(tls::client_config_from_pem("pushed", &cert, &cert, &key, check).is_ok());
        }
        let (_, other_key) = pem();
        let mismatch = tls::client_config_from_pem("pushed", &cert, &cert, &other_key, tls::ServerCheck::Name)
            .unwrap_err()
            .to_string();
        assert!(mismatch.starts_with("pushed: the certificate chain does not fit the private key"), "{mismatch}");
    }

    #[test]
    fn unusable_responses_are_refused_with_the_reason() {
        let roots =
            response("ROOTCA", Type::ValidationContext(v3::CertificateValidationContext { trusted_ca: inline(b"R") }));
        assert_eq!(
            parse(WORKLOAD_SECRET, &roots),
            Err(SecretError::Name { expected: "default", found: "ROOTCA".into() })
        );
        let named_default =
            response("default", Type::ValidationContext(v3::CertificateValidationContext { trusted_ca: inline(b"R") }));
        assert_eq!(parse(WORKLOAD_SECRET, &named_default), Err(SecretError::Missing("default", "TLS certificate")));
        let (cert, _) = pem();
        let no_key = response(
            "default",
            Type::TlsCertificate(v3::TlsCertificate { certificate_chain: inline(&cert), private_key: None }),
        );
        assert_eq!(parse(WORKLOAD_SECRET, &no_key), Err(SecretError::Missing("default", "private key")));
        let bad_key = response(
            "default",
            Type::TlsCertificate(v3::TlsCertificate {
                certificate_chain: inline(&cert),
                private_key: inline(b"garbage"),
            }),
        );
        assert!(matches!(parse(WORKLOAD_SECRET, &bad_key), Err(SecretError::Pem { what: "private key", .. })));
        let not_pem =
            response("ROOTCA", Type::ValidationContext(v3::CertificateValidationContext { trusted_ca: inline(b"R") }));
        assert!(matches!(parse(ROOT_SECRET, &not_pem), Err(SecretError::Pem { what: "trusted CA", .. })));
        let mut wrong_type = roots.clone();
        wrong_type.resources[0].type_url = "type.googleapis.com/other".into();
        assert!(matches!(parse(ROOT_SECRET, &wrong_type), Err(SecretError::Type(_))));
        let mut two = roots.clone();
        two.resources.push(two.resources[0].clone());
        assert_eq!(parse(ROOT_SECRET, &two), Err(SecretError::Count(2)));
        let from_file = response(
            "ROOTCA",
            Type::ValidationContext(v3::CertificateValidationContext {
                trusted_ca: Some(DataSource { specifier: Some(Specifier::Filename("/nonexistent/root.pem".into())) }),
            }),
        );
        assert!(matches!(parse(ROOT_SECRET, &from_file), Err(SecretError::Source { what: "trusted CA", .. })));
    }
}
