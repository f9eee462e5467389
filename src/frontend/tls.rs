//! TLS to clients (`[proxy.tls]`, rustls with the ring provider). A client asks with an
//! SSLRequest before its startup message; when TLS is on, pgrouter answers 'S' and the
//! handshake follows on the same socket, then everything else runs over the TLS stream.
//! `require` refuses a client that logs in without it. The certificate and key are read
//! when the config is loaded, and again on each reload, so a rotated certificate takes
//! effect with SIGHUP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::login::serve_client;
use crate::app::App;
use crate::config::{TlsConfig, TlsMode};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

/// The acceptor for `[proxy.tls]` (None when TLS is disabled), or what is wrong with the
/// certificate or key, under its key path.
pub fn acceptor(tls: &TlsConfig) -> Result<Option<TlsAcceptor>, String> {
    if tls.mode == TlsMode::Disable {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Err("proxy.tls: cert and key are required unless mode is \"disable\"".into());
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("proxy.tls.cert: cannot read {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("proxy.tls.cert: no certificate in {}", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("proxy.tls.key: cannot read {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("proxy.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("proxy.tls: the certificate and key do not work together: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Serves a new connection: when TLS is on, an SSLRequest (after any GSSENCRequest, which
/// gets 'N') is answered 'S' and the handshake runs before the client is served over TLS.
pub async fn serve_connection(app: Arc<App>, mut tcp: TcpStream, peer: SocketAddr) {
    let Some(acceptor) = app.now().tls.clone() else {
        return serve_client(app, tcp, peer, false).await;
    };
    let limit = app.now().config.proxy.client_login_timeout;
    let handshake = async move {
        loop {
            match first_packet(&tcp).await? {
                Some(p) if p == GSSENC_REQUEST => {
                    tcp.read_exact(&mut [0u8; 8]).await?;
                    tcp.write_all(b"N").await?;
                }
                Some(p) if p == SSL_REQUEST => {
                    tcp.read_exact(&mut [0u8; 8]).await?;
                    tcp.write_all(b"S").await?;
                    return acceptor.accept(tcp).await.map(|tls| Negotiated::Tls(Box::new(tls)));
                }
                _ => return Ok(Negotiated::Plain(tcp)),
            }
        }
    };
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(Negotiated::Tls(tls))) => serve_client(app, tls, peer, true).await,
        Ok(Ok(Negotiated::Plain(tcp))) => serve_client(app, tcp, peer, false).await,
        Ok(Err(e)) => tracing::info!(client = %peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::info!(client = %peer, "no TLS handshake within client_login_timeout"),
    }
}

/// How a connection continues after the encryption requests.
enum Negotiated {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

/// The first 8 bytes the client sent, without taking them (None if it sent fewer and closed).
async fn first_packet(tcp: &TcpStream) -> std::io::Result<Option<[u8; 8]>> {
    let mut first = [0u8; 8];
    loop {
        let n = tcp.peek(&mut first).await?;
        if n == first.len() {
            return Ok(Some(first));
        }
        if n == 0 {
            return Ok(None);
        }
        // fewer than 8 bytes so far: wait for more
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
