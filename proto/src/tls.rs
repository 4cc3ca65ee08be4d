//! TLS for both contracts, on rustls with the `ring` provider.
//!
//! - [`server_config`]: the aggregator's mTLS server (a client certificate signed by the
//!   configured CA bundle is required) and the analysis emulator's plain TLS server.
//! - [`serve_incoming`]: accepts TCP, handshakes concurrently (a slow or failing peer never
//!   blocks the others) and yields TLS streams for tonic's `serve_with_incoming_shutdown`.
//! - [`connect_lazy`]: the aggregator's client channel to the analysis service, verifying that
//!   the server certificate carries a DNS-name SAN equal to the configured host.
//!
//! - [`Reloading`]: a config rebuilt from its files when they change (Istio rotates workload
//!   certificates daily and Kubernetes swaps secret files in place); new connections use the new
//!   config, a broken update is logged and the last good config kept.
//! - [`ClientTls`]: where a client takes its config from for each new connection: files
//!   ([`Reloading`]) or a secret service pushing certificates ([`crate::sds`]).
//!
//! PEM is parsed with `rustls-pki-types` (`rustls-pemfile` is unmaintained). Everything is done
//! here rather than through tonic's TLS feature so errors name the file and the reason, and so
//! the acceptor and connector take the current config on every connection.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::gather::GatherWrites;
use tonic::transport::{server::Connected, Channel, Endpoint};

/// What can go wrong setting TLS up, each with what a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {source}")]
    Certificates { path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificates { path: PathBuf },
    #[error("cannot read a private key from {path}: {source}")]
    PrivateKey { path: PathBuf, source: rustls_pki_types::pem::Error },
    #[error("a CA certificate in {path} is not usable: {source}")]
    BadCa { path: PathBuf, source: rustls::Error },
    #[error("the certificate chain in {cert} does not fit the key in {key}: {source}")]
    KeyMismatch { cert: PathBuf, key: PathBuf, source: rustls::Error },
    #[error("cannot build a client-certificate verifier from {path}: {source}")]
    Verifier { path: PathBuf, source: rustls::server::VerifierBuilderError },
    #[error("{host:?} is not a DNS name or an IP address; the server certificate is checked for a SAN equal to it")]
    NotADnsName { host: String },
    #[error("invalid endpoint {uri}: {source}")]
    Endpoint { uri: String, source: tonic::transport::Error },
    #[error("{what}: {reason}")]
    Pushed { what: String, reason: String },
}

/// The files of one TLS identity: a PEM certificate chain (leaf first) and its PEM private key.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cert_chain: PathBuf,
    pub private_key: PathBuf,
}

/// ring's suites, AES-128-GCM first: TLS 1.3's mandatory suite, Envoy's first choice (its
/// upstream TLS is 1.2 by default, ECDHE-*-AES128-GCM-SHA256 first: seen in its ClientHello to
/// the aggregator), and cheaper per byte than AES-256-GCM (ten rounds instead of fourteen), which
/// counts on the aggregator's links, each carrying every captured byte. Servers follow the
/// client's order.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Reads every certificate of a PEM file.
///
/// # Errors
/// When the file cannot be read, holds malformed PEM, or holds no certificate.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificates { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: path.to_owned() });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::PrivateKey { path: path.to_owned(), source })
}

/// A root store holding every certificate of a PEM bundle.
///
/// # Errors
/// As [`load_certificates`], or when a certificate is not a usable trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa { path: path.to_owned(), source })?;
    }
    Ok(roots)
}

/// A server config offering HTTP/2 (gRPC). With `client_ca`, every client must present a
/// certificate that chains to one of its certificates (mTLS); without it, none is asked for.
///
/// # Errors
/// When a file is unreadable or malformed, or the key does not match the certificate.
pub fn server_config(identity: &Identity, client_ca: Option<&Path>) -> Result<ServerConfig, TlsError> {
    let certs = load_certificates(&identity.cert_chain)?;
    let key = load_key(&identity.private_key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(|source| {
            TlsError::KeyMismatch { cert: identity.cert_chain.clone(), key: identity.private_key.clone(), source }
        })?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider())
                .build()
                .map_err(|source| TlsError::Verifier { path: ca.to_owned(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|source| TlsError::KeyMismatch {
        cert: identity.cert_chain.clone(),
        key: identity.private_key.clone(),
        source,
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

type Build<T> = Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>;

/// A TLS config kept in step with the files it is built from.
pub struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Build<T>,
    current: RwLock<Arc<T>>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

fn modified(paths: &[PathBuf]) -> Vec<Option<SystemTime>> {
    // `metadata` follows symlinks: a Kubernetes secret update swaps the link's target.
    paths.iter().map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the config once (so bad files are a start-up error) and remembers the files.
    ///
    /// # Errors
    /// The first build's error.
    pub fn new(
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let stamps = modified(&paths);
        let current = build()?;
        Ok(Arc::new(Self {
            paths,
            build: Box::new(build),
            current: RwLock::new(Arc::new(current)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// The config new connections use.
    pub fn current(&self) -> Arc<T> {
        self.current.read().map_or_else(|poisoned| poisoned.into_inner().clone(), |c| c.clone())
    }

    /// Rebuilds the config if a file changed; returns whether it did.
    ///
    /// # Errors
    /// The rebuild's error; the previous config stays in use (and the change is retried on the
    /// next call, since a half-written update may complete).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = modified(&self.paths);
        let mut stamps = self.stamps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *stamps == now {
            return Ok(false);
        }
        let rebuilt = (self.build)()?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(rebuilt);
        *stamps = now;
        Ok(true)
    }

    /// Checks the files every `interval` until `shutdown`, logging reloads and failures.
    pub fn watch(self: &Arc<Self>, what: &'static str, interval: Duration, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                match this.reload_if_changed() {
                    Ok(true) => tracing::info!(config = what, "certificates changed on disk; reloaded"),
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(config = what, error = %err, "certificates changed on disk but cannot be loaded; keeping the previous ones")
                    }
                }
            }
        });
    }
}

/// A server config ([`server_config`]) that follows its files.
///
/// # Errors
/// As [`server_config`].
pub fn reloading_server_config(
    identity: Identity,
    client_ca: Option<PathBuf>,
) -> Result<Arc<Reloading<ServerConfig>>, TlsError> {
    let mut paths = vec![identity.cert_chain.clone(), identity.private_key.clone()];
    paths.extend(client_ca.clone());
    Reloading::new(paths, move || server_config(&identity, client_ca.as_deref()))
}

/// A client config ([`client_config`]) that follows its files.
///
/// # Errors
/// As [`client_config`].
pub fn reloading_client_config(
    ca: PathBuf,
    identity: Option<Identity>,
    check: ServerCheck,
) -> Result<Arc<Reloading<ClientConfig>>, TlsError> {
    let mut paths = vec![ca.clone()];
    if let Some(identity) = &identity {
        paths.extend([identity.cert_chain.clone(), identity.private_key.clone()]);
    }
    Reloading::new(paths, move || client_config(&ca, identity.as_ref(), check))
}

/// A TLS connection accepted by [`serve_incoming`], usable by tonic.
pub struct TlsConnection(TlsStream<TcpStream>);

/// What a service learns about the peer of a [`TlsConnection`].
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// Subject of the client certificate's leaf, DER-encoded (present on mTLS servers).
    pub client_certificate: Option<Vec<u8>>,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (tcp, session) = self.0.get_ref();
        PeerInfo {
            remote_addr: tcp.peer_addr().ok(),
            client_certificate: session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// How long a peer may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPTED_BACKLOG: usize = 64;

/// Accepts connections on `listener` until `shutdown`, handshaking each in its own task with
/// the config current at that moment. Failed handshakes (no client certificate, an unknown CA,
/// plain TCP) are logged with the peer address and dropped; they never reach the service.
pub fn serve_incoming(
    listener: TcpListener,
    config: Arc<Reloading<ServerConfig>>,
    shutdown: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConnection>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConnection(tls))).await;
                    }
                    // A peer that closes before saying anything is a port probe, not an attack.
                    Ok(Err(err)) if err.kind() == io::ErrorKind::UnexpectedEof => {
                        tracing::debug!(%peer, "connection closed before the TLS handshake")
                    }
                    Ok(Err(err)) => tracing::warn!(%peer, error = %err, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// What a client checks of the server certificate beyond its chain to the roots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerCheck {
    /// A SAN equal to the name dialled (rustls's default; never the subject CN).
    #[default]
    Name,
    /// Nothing more: any certificate the roots vouch for, whatever it names. Istio's workload
    /// certificates carry a SPIFFE URI, not a DNS name; this is what Envoy's upstream TLS does
    /// without subject-alt-name matchers, as the Wasm filter's cluster to the aggregator.
    ChainOnly,
}

/// A client config that trusts `ca`, offers HTTP/2 and, with `identity`, presents a client
/// certificate (as filters do towards the aggregator).
///
/// # Errors
/// As [`load_roots`], or when the identity's files are unusable.
pub fn client_config(ca: &Path, identity: Option<&Identity>, check: ServerCheck) -> Result<ClientConfig, TlsError> {
    let roots = load_roots(ca)?;
    let Some(identity) = identity else {
        return build_client_config(roots, None, check)
            .map_err(|source| TlsError::BadCa { path: ca.to_owned(), source });
    };
    let material = (load_certificates(&identity.cert_chain)?, load_key(&identity.private_key)?);
    build_client_config(roots, Some(material), check).map_err(|source| TlsError::KeyMismatch {
        cert: identity.cert_chain.clone(),
        key: identity.private_key.clone(),
        source,
    })
}

/// [`client_config`] from PEM held in memory (certificates a secret service pushed): `roots`
/// to trust, and the identity's certificate chain and private key. `what` names the source in
/// errors.
///
/// # Errors
/// [`TlsError::Pushed`] for malformed or empty PEM, an unusable CA, or a key that does not fit
/// the chain.
pub fn client_config_from_pem(
    what: &str,
    roots: &[u8],
    chain: &[u8],
    key: &[u8],
    check: ServerCheck,
) -> Result<ClientConfig, TlsError> {
    let fail = |reason: String| TlsError::Pushed { what: what.to_owned(), reason };
    let certificates = |pem: &[u8], which: &str| {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| fail(format!("its {which}: {err}")))?;
        if certs.is_empty() {
            return Err(fail(format!("its {which} holds no PEM certificate")));
        }
        Ok(certs)
    };
    let mut store = RootCertStore::empty();
    for cert in certificates(roots, "root certificates")? {
        store.add(cert).map_err(|err| fail(format!("a root certificate is not usable: {err}")))?;
    }
    let chain = certificates(chain, "certificate chain")?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|err| fail(format!("its private key: {err}")))?;
    build_client_config(store, Some((chain, key)), check)
        .map_err(|err| fail(format!("the certificate chain does not fit the private key: {err}")))
}

fn build_client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    check: ServerCheck,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match check {
        ServerCheck::Name => builder.with_root_certificates(roots),
        ServerCheck::ChainOnly => {
            let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|err| rustls::Error::General(err.to_string()))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
        }
    };
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// [`ServerCheck::ChainOnly`]: webpki's verification, whose name check comes last, with a
/// certificate that only fails that check accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, signature)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, signature)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Where a client connection takes its TLS config from, anew for each connection.
#[derive(Clone)]
pub enum ClientTls {
    /// Files, reloaded when they change.
    Files(Arc<Reloading<ClientConfig>>),
    /// Configs a secret service pushes ([`crate::sds::follow`]); none until its first push.
    Pushed(watch::Receiver<Option<Arc<ClientConfig>>>),
}

impl From<Arc<Reloading<ClientConfig>>> for ClientTls {
    fn from(files: Arc<Reloading<ClientConfig>>) -> Self {
        Self::Files(files)
    }
}

impl ClientTls {
    /// The config for a connection made now; a pushed one is awaited for at most `wait`.
    async fn current(&self, wait: Duration) -> io::Result<Arc<ClientConfig>> {
        match self {
            Self::Files(files) => Ok(files.current()),
            Self::Pushed(pushed) => {
                let mut pushed = pushed.clone();
                let first = tokio::time::timeout(wait, pushed.wait_for(Option::is_some)).await;
                match first {
                    Ok(Ok(config)) => config.clone().ok_or_else(|| io::Error::other("no certificate")),
                    Ok(Err(_)) => Err(io::Error::other("the secret service's follower has stopped")),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no workload certificate from the secret service yet",
                    )),
                }
            }
        }
    }
}

/// A gRPC channel to `host:port` over TLS that connects on first use and reconnects after
/// failures, each connection with the config current at that moment. The server certificate
/// must chain to the configured CA and carry a DNS-name SAN equal to `host` (rustls never falls
/// back to the subject CN).
///
/// # Errors
/// When `host` is not a DNS name or an IP address.
pub fn connect_lazy(
    host: &str,
    port: u16,
    config: impl Into<ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    connect_lazy_as(host, port, host, config, connect_timeout)
}

/// [`connect_lazy`] to `host:port`, checking the server certificate for `server_name` instead
/// of `host` (an address the certificate does not name, as a sidecar dials a Service's cluster
/// IP and checks its DNS name).
///
/// # Errors
/// When `server_name` is not a DNS name or an IP address.
pub fn connect_lazy_as(
    host: &str,
    port: u16,
    server_name: &str,
    config: impl Into<ClientTls>,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    let config = config.into();
    let server_name = match ServerName::try_from(server_name.to_owned()) {
        Ok(name @ (ServerName::DnsName(_) | ServerName::IpAddress(_))) => name,
        _ => return Err(TlsError::NotADnsName { host: server_name.to_owned() }),
    };
    // The URI only names the authority; TLS is ours, so tonic sees plain `http`.
    let uri = format!("http://{host}:{port}");
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|source| TlsError::Endpoint { uri, source })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let address = (host.to_owned(), port);
    let connect = tower::service_fn(move |_uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let address = address.clone();
        async move {
            let connector = TlsConnector::from(config.current(connect_timeout).await?);
            let tcp = TcpStream::connect(address).await?;
            tcp.set_nodelay(true)?;
            // Captures are small and many: their TLS records leave together when h2 flushes
            // (see `gather`), not one system call per h2 frame.
            let tls = connector.connect(server_name, GatherWrites::new(tcp)).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
    use rustls::{client::danger::ServerCertVerifier, client::WebPkiServerVerifier, CipherSuite, RootCertStore};
    use rustls_pki_types::{ServerName, UnixTime};

    use super::ChainOnly;

    #[test]
    fn chain_only_takes_any_name_its_roots_vouch_for_and_nothing_else() {
        let ca = || {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, Issuer::new(params, key))
        };
        // An Istio workload certificate: a SPIFFE identity, no DNS name.
        let workload = |issuer: &Issuer<'static, KeyPair>| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            let spiffe = "spiffe://cluster.local/ns/istio-system/sa/packet-inspector".try_into().unwrap();
            params.subject_alt_names = vec![SanType::URI(spiffe)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.signed_by(&KeyPair::generate().unwrap(), issuer).unwrap()
        };
        let ((mesh_root, mesh), (_, other)) = (ca(), ca());
        let mut roots = RootCertStore::empty();
        roots.add(mesh_root.der().clone()).unwrap();
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), super::provider()).build().unwrap();
        let chain_only = ChainOnly(webpki.clone());
        let name = ServerName::try_from("packet-inspector-1-aggregator.istio-system.svc").unwrap();
        let ours = workload(&mesh);
        assert!(webpki.verify_server_cert(ours.der(), &[], &name, &[], UnixTime::now()).is_err(), "no DNS name");
        assert!(chain_only.verify_server_cert(ours.der(), &[], &name, &[], UnixTime::now()).is_ok());
        let theirs = workload(&other);
        let refused = chain_only.verify_server_cert(theirs.der(), &[], &name, &[], UnixTime::now());
        assert!(refused.is_err(), "another CA's certificate: {refused:?}");
    }

    #[test]
    fn aes_128_gcm_is_offered_first_and_nothing_is_lost() {
        let suites: Vec<CipherSuite> = super::provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let default = rustls::crypto::ring::default_provider().cipher_suites.len();
        assert_eq!(suites.len(), default);
        assert!(suites.contains(&CipherSuite::TLS13_AES_256_GCM_SHA384));
    }
}
