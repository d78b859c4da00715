//! TLS for meshfed's servers (rustls, ring provider): server certificates read from PEM files and
//! reloaded when the files change, optional client-certificate verification (mTLS) against a CA bundle,
//! and the SPIFFE identity (`spiffe://TRUST_DOMAIN/ns/NS/sa/SA`) of a verified client.
//!
//! The certificate and key are served through [`ReloadingCert`], a rustls [`ResolvesServerCert`] that
//! holds the current [`CertifiedKey`] in an [`ArcSwap`]: [`ReloadingCert::reload`] (run every
//! [`DEFAULT_RELOAD_INTERVAL`] by [`watch_files`]) swaps in a new pair when the files change, so new
//! handshakes use the new certificate while established connections keep theirs. A pair that does not
//! parse, or whose key does not match the certificate (e.g. a rotation caught between the two writes),
//! is reported and skipped: the last good pair keeps being served. The client CA bundle is read at
//! start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tracing::{info, warn};

/// ALPN of Istio mTLS between sidecars (what meshfed's sidecars offer; istiod's offer them for TCP).
pub const ISTIO_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
/// ALPN istiod's sidecars offer for mTLS to HTTP ports (Istio's ALPN filter sets them per upstream
/// protocol).
pub const ISTIO_HTTP_ALPN: [&str; 3] = ["istio-http/1.0", "istio-http/1.1", "istio-h2"];
/// Every ALPN an Istio mTLS client may offer: what an inbound mTLS filter chain matches, so that both
/// meshfed's and istiod's sidecars reach it.
pub const INBOUND_MTLS_ALPN: [&str; 5] =
    ["istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"];

/// How often [`watch_files`] checks the certificate and key files by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Cap of a TLS handshake: a client that has not completed it by then is disconnected.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: no PEM certificate found", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {reason}", .path.display())]
    Pem { path: PathBuf, reason: String },
    #[error("{}: unusable private key: {reason}", .path.display())]
    Key { path: PathBuf, reason: String },
    #[error("the private key {} does not match the certificate {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("client CA bundle {}: {reason}", .path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("mesh root CA bundle {}: {reason}", .path.display())]
    MeshRoot { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider meshfed uses everywhere (ring, as kube-rs in this build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })
}

/// Every certificate of a PEM file (a chain: leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    parse_certs(&read(path)?, path)
}

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem { path: path.to_path_buf(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    parse_key(&read(path)?, path)
}

fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| Error::Pem { path: path.to_path_buf(), reason: e.to_string() })
}

/// A certificate chain and its key, read from PEM files, checked to belong together.
pub fn load_certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, Error> {
    certified_key_from_pem(&read(cert)?, cert, &read(key)?, key, provider)
}

fn certified_key_from_pem(
    cert_pem: &[u8],
    cert: &Path,
    key_pem: &[u8],
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let chain = parse_certs(cert_pem, cert)?;
    let der = parse_key(key_pem, key)?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| Error::Key { path: key.to_path_buf(), reason: e.to_string() })?;
    let ck = CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(_)) => {
            Err(Error::KeyMismatch { cert: cert.to_path_buf(), key: key.to_path_buf() })
        }
        // the key type cannot tell (no SubjectPublicKeyInfo): accept, the handshake will tell
        Err(_) => Ok(ck),
    }
}

/// A server certificate read from files and swapped atomically when they change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// the file contents the current pair was built from
    loaded: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

impl ReloadingCert {
    /// Reads the pair; fails if it is unusable (at start, a bad pair is fatal).
    pub fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<ReloadingCert, Error> {
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let ck = certified_key_from_pem(&cert_pem, cert, &key_pem, key, &provider)?;
        Ok(ReloadingCert {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee(ck),
            loaded: std::sync::Mutex::new((cert_pem, key_pem)),
        })
    }

    /// Re-reads the files: `Ok(true)` if a new pair is now served, `Ok(false)` if they did not change,
    /// an error (the previous pair stays) if they cannot be used.
    pub fn reload(&self) -> Result<bool, Error> {
        let (cert_pem, key_pem) = (read(&self.cert_path)?, read(&self.key_path)?);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if loaded.0 == cert_pem && loaded.1 == key_pem {
            return Ok(false);
        }
        let ck = certified_key_from_pem(&cert_pem, &self.cert_path, &key_pem, &self.key_path, &self.provider)?;
        self.current.store(Arc::new(ck));
        *loaded = (cert_pem, key_pem);
        Ok(true)
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A client presents the current pair too (meshfed's mesh certificate, when it dials through a gateway).
impl ResolvesClientCert for ReloadingCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks `cert` every `interval` until the returned task is aborted; logs each reload and each error
/// (the previous certificate stays in use).
pub fn watch_files(cert: Arc<ReloadingCert>, interval: Duration, what: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last_error: Option<String> = None;
        loop {
            tick.tick().await;
            match cert.reload() {
                Ok(true) => {
                    info!(server = what, cert = %cert.cert_path().display(), "TLS certificate reloaded");
                    last_error = None;
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(server = what, error = %msg, "TLS certificate not reloaded; the previous one stays in use");
                    }
                    last_error = Some(msg);
                }
            }
        }
    })
}

/// The TLS settings of one server.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: Arc<ReloadingCert>,
    /// with a client CA: mTLS, every client must present a certificate it issued
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered (e.g. `h2` for gRPC)
    pub alpn: Vec<Vec<u8>>,
}

impl ServerTls {
    /// Builds the rustls configuration (the certificate is resolved per handshake, so reloads apply).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let certs = load_certs(path).map_err(|e| match e {
                    Error::Read { .. } => e,
                    other => Error::ClientCa { path: path.clone(), reason: other.to_string() },
                })?;
                for c in certs {
                    roots.add(c).map_err(|e| Error::ClientCa { path: path.clone(), reason: e.to_string() })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::ClientCa { path: path.clone(), reason: e.to_string() })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(self.cert.clone());
        config.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(config))
    }
}

/// A TLS listener for axum (the debug server): handshakes run in their own tasks, bounded by
/// [`HANDSHAKE_TIMEOUT`], so a slow client never holds up the others. Dropping it stops accepting.
pub struct TlsListener {
    local: std::net::SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
    task: tokio::task::JoinHandle<()>,
}

/// Handshakes in progress at most; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

impl TlsListener {
    pub fn new(listener: tokio::net::TcpListener, config: Arc<ServerConfig>) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let (tcp, remote) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, remote)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, rx, task })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // the accept task ended (only when the runtime shuts down): accept nothing more
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

// ---------------------------------------------------------------------------------------------
// Mesh mTLS as a client
// ---------------------------------------------------------------------------------------------

/// meshfed's mesh identity: its workload certificate (reloaded as it rotates) and the mesh root, as
/// istio-agent writes them (`OUTPUT_CERTS`).
#[derive(Clone, Debug)]
pub struct MeshCertificate {
    pub cert: Arc<ReloadingCert>,
    /// the mesh root CA bundle (None: not known, e.g. xDS over TLS without client certificates)
    pub root: Option<PathBuf>,
}

/// The roots of a mesh root CA bundle file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let bad = |reason: String| Error::MeshRoot { path: path.to_path_buf(), reason };
    let certs = load_certs(path).map_err(|e| match e {
        Error::Read { .. } => e,
        other => bad(other.to_string()),
    })?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

/// Verifies a server as Istio's sidecars verify each other: the certificate chains to the mesh root and
/// names a workload of the trust domain (a `spiffe://TRUST_DOMAIN/ns/NS/sa/SA` URI SAN). There is no DNS
/// name to check: the SNI (`outbound_.PORT_._.FQDN`) names a route, not the server.
#[derive(Debug)]
pub struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl MeshServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str, provider: Arc<CryptoProvider>) -> MeshServerVerifier {
        MeshServerVerifier { roots, trust_domain: trust_domain.to_string(), provider }
    }

    /// The workload identity a server certificate chain proves (leaf first), or why it proves none.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let uris = uri_sans(end_entity).map_err(rustls::Error::General)?;
        uris.iter().filter_map(|u| SpiffeId::parse(u)).find(|id| id.trust_domain == self.trust_domain).ok_or_else(
            || {
                rustls::Error::General(format!(
                    "the server certificate names no workload of trust domain {:?} (no spiffe://{}/ns/NS/sa/SA URI SAN; URI SANs: {uris:?})",
                    self.trust_domain, self.trust_domain
                ))
            },
        )
    }
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify_chain(end_entity, intermediates, now).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client configuration for Istio mTLS: presents `cert`, verifies servers with [`MeshServerVerifier`]
/// against `roots` in `trust_domain`, offers `alpn`, and never resumes a session (each handshake is a
/// full one, with the server's certificate verified).
pub fn mesh_client_config(
    cert: Arc<dyn ResolvesClientCert>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    alpn: &[&str],
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(MeshServerVerifier::new(roots, trust_domain, provider.clone()));
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Peer identities
// ---------------------------------------------------------------------------------------------

/// A workload identity: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl SpiffeId {
    /// Parses an Istio workload SPIFFE id; None for anything else.
    pub fn parse(uri: &str) -> Option<SpiffeId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Some(SpiffeId {
                trust_domain: td.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => None,
        }
    }
}

/// What a connection proved about its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAuth {
    /// no client certificate (plaintext, or TLS without client authentication)
    Anonymous,
    /// a client certificate from the CA, with this workload identity in the mesh's trust domain
    Workload(SpiffeId),
    /// a client certificate from the CA that does not name a workload of this mesh (the reason)
    Unusable(String),
}

/// The URI subject alternative names of a DER certificate.
pub fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("cannot parse certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("bad subjectAltName: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The identity a verified client certificate (`leaf`, DER) proves in `trust_domain`.
pub fn peer_auth(leaf: &[u8], trust_domain: &str) -> PeerAuth {
    let uris = match uri_sans(leaf) {
        Ok(u) => u,
        Err(e) => return PeerAuth::Unusable(e),
    };
    let ids: Vec<SpiffeId> = uris.iter().filter_map(|u| SpiffeId::parse(u)).collect();
    match ids.as_slice() {
        [] => PeerAuth::Unusable(format!(
            "the client certificate has no spiffe://{trust_domain}/ns/NS/sa/SA URI SAN (URI SANs: {uris:?})"
        )),
        [id] if id.trust_domain == trust_domain => PeerAuth::Workload(id.clone()),
        [id] => PeerAuth::Unusable(format!(
            "the client certificate's identity {id} is not in the mesh's trust domain {trust_domain:?}"
        )),
        _ => PeerAuth::Unusable(format!("the client certificate has several SPIFFE ids: {uris:?}")),
    }
}

/// A mesh CA for unit tests (rcgen): a root, and workload certificates with a SPIFFE URI SAN usable for
/// client and server authentication, as Istio's.
#[cfg(test)]
pub(crate) mod test_ca {
    use super::*;

    pub struct Ca {
        pub root: CertificateDer<'static>,
        pub root_pem: String,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    /// A workload's certificate (PEM) and key (PEM).
    pub struct Leaf {
        pub cert_pem: String,
        pub key_pem: String,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            let cert = params.self_signed(&key).unwrap();
            Ca { root: cert.der().clone(), root_pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) }
        }

        pub fn roots(&self) -> Arc<RootCertStore> {
            let mut r = RootCertStore::empty();
            r.add(self.root.clone()).unwrap();
            Arc::new(r)
        }

        /// A leaf with these URI SANs (e.g. `spiffe://cluster.local/ns/shop/sa/reviews`).
        pub fn issue(&self, uris: &[&str]) -> Leaf {
            use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
        }
    }

    impl Leaf {
        pub fn der(&self) -> CertificateDer<'static> {
            parse_certs(self.cert_pem.as_bytes(), Path::new("leaf")).unwrap().remove(0)
        }

        pub fn certified_key(&self) -> Arc<CertifiedKey> {
            let p = Path::new("leaf");
            Arc::new(
                certified_key_from_pem(self.cert_pem.as_bytes(), p, self.key_pem.as_bytes(), p, &provider()).unwrap(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mesh_verifier_accepts_mesh_workloads_and_nothing_else() {
        let mesh = test_ca::Ca::new("mesh root");
        let foreign = test_ca::Ca::new("another root");
        let verifier = MeshServerVerifier::new(mesh.roots(), "cluster.local", provider());
        let now = UnixTime::now();
        let reviews = mesh.issue(&["spiffe://cluster.local/ns/shop/sa/reviews"]);
        assert_eq!(
            verifier.verify_chain(&reviews.der(), &[], now).unwrap(),
            SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/reviews").unwrap()
        );
        // through the rustls trait, with an SNI that names no server (it is not checked)
        let sni = ServerName::try_from("outbound_.9080_._.reviews.shop.svc.cluster.local").unwrap();
        assert!(verifier.verify_server_cert(&reviews.der(), &[], &sni, &[], now).is_ok());
        // a workload of another CA, with the same identity
        let impostor = foreign.issue(&["spiffe://cluster.local/ns/shop/sa/reviews"]);
        let e = verifier.verify_chain(&impostor.der(), &[], now).unwrap_err();
        assert!(matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{e}");
        // the mesh's CA, another trust domain, or no SPIFFE id at all
        for uris in [&["spiffe://other.domain/ns/shop/sa/reviews"][..], &["https://reviews.example"], &[]] {
            let e = verifier.verify_chain(&mesh.issue(uris).der(), &[], now).unwrap_err().to_string();
            assert!(e.contains("no workload of trust domain \"cluster.local\""), "{uris:?}: {e}");
        }
        // garbage
        assert!(verifier.verify_chain(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01]), &[], now).is_err());
        assert!(verifier.verify_chain(&CertificateDer::from(Vec::new()), &[], now).is_err());
    }

    #[test]
    fn parses_spiffe_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/reviews").unwrap();
        assert_eq!(
            (id.trust_domain.as_str(), id.namespace.as_str(), id.service_account.as_str()),
            ("cluster.local", "shop", "reviews")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/reviews");
        for bad in [
            "",
            "spiffe://",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "https://td/ns/a/sa/b",
            "spiffe://td/sa/b/ns/a",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad:?}");
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn self_signed(sans: Vec<rcgen::SanType>) -> (String, String) {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn reloads_only_good_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = self_signed(vec![rcgen::SanType::DnsName("a.example".try_into().unwrap())]);
        let (c2, k2) = self_signed(vec![rcgen::SanType::DnsName("b.example".try_into().unwrap())]);
        let cert = write(dir.path(), "tls.crt", &c1);
        let key = write(dir.path(), "tls.key", &k1);
        let r = ReloadingCert::load(&cert, &key, provider()).unwrap();
        let first = r.current();
        assert!(!r.reload().unwrap(), "unchanged files are not reloaded");
        // half a rotation: the new certificate with the old key is refused, the old pair stays
        std::fs::write(&cert, &c2).unwrap();
        assert!(matches!(r.reload(), Err(Error::KeyMismatch { .. })));
        assert!(Arc::ptr_eq(&first, &r.current()));
        // a truncated file is refused too
        std::fs::write(&key, &k2[..k2.len() / 2]).unwrap();
        assert!(r.reload().is_err());
        assert!(Arc::ptr_eq(&first, &r.current()));
        std::fs::write(&key, &k2).unwrap();
        assert!(r.reload().unwrap());
        assert_ne!(first.cert[0], r.current().cert[0]);
        assert_eq!(r.current().cert[0].as_ref(), parse_certs(c2.as_bytes(), &cert).unwrap()[0].as_ref());
    }

    #[test]
    fn refuses_bad_files_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, k1) = self_signed(vec![]);
        let cert = write(dir.path(), "tls.crt", &c1);
        let key = write(dir.path(), "tls.key", &k1);
        let empty = write(dir.path(), "empty.pem", "");
        assert!(matches!(ReloadingCert::load(&empty, &key, provider()), Err(Error::NoCertificate { .. })));
        assert!(ReloadingCert::load(&cert, &empty, provider()).is_err());
        assert!(matches!(ReloadingCert::load(&dir.path().join("missing"), &key, provider()), Err(Error::Read { .. })));
    }

    #[test]
    fn peer_identity_from_certificate() {
        let (pem, _) =
            self_signed(vec![rcgen::SanType::URI("spiffe://cluster.local/ns/shop/sa/default".try_into().unwrap())]);
        let der = parse_certs(pem.as_bytes(), Path::new("x")).unwrap().remove(0);
        assert_eq!(
            peer_auth(&der, "cluster.local"),
            PeerAuth::Workload(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/default").unwrap())
        );
        assert!(matches!(peer_auth(&der, "other.domain"), PeerAuth::Unusable(r) if r.contains("trust domain")));
        let (pem, _) = self_signed(vec![rcgen::SanType::DnsName("istioctl".try_into().unwrap())]);
        let der = parse_certs(pem.as_bytes(), Path::new("x")).unwrap().remove(0);
        assert!(matches!(peer_auth(&der, "cluster.local"), PeerAuth::Unusable(r) if r.contains("no spiffe")));
        assert!(matches!(peer_auth(b"not a certificate", "cluster.local"), PeerAuth::Unusable(_)));
    }
}
