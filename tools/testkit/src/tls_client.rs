//! The client side of meshfed's TLS listeners, for tests: a rustls client configuration and a gRPC channel
//! over it.

use std::path::Path;
use std::sync::Arc;

use meshfed::tls::{Error, load_certs, load_key, provider};
use rustls::RootCertStore;

/// A client configuration trusting `ca` (PEM file), presenting `identity` (cert, key PEM files) if
/// given, offering ALPN `h2`.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| Error::ClientCa { path: ca.to_path_buf(), reason: e.to_string() })?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC channel to `addr` over TLS (`server_name`: the name or IP checked against the server's
/// certificate). Connects lazily, on first use, as tonic channels do.
pub fn grpc_channel(
    addr: std::net::SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tonic::transport::Channel, Error> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| Error::Config(rustls::Error::General(format!("server name {server_name:?}: {e}"))))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Error::Config(rustls::Error::General(e.to_string())))?;
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    })))
}
