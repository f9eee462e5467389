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

/// TLS to clients as a config snapshot holds it.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    /// `tls-server-end-point` channel binding data (RFC 5929): the hash of pgrouter's
    /// certificate, for SCRAM-SHA-256-PLUS.
    pub end_point: Arc<[u8]>,
}

/// The acceptor for `[proxy.tls]` (None when TLS is disabled), or what is wrong with the
/// certificate or key, under its key path.
pub fn acceptor(tls: &TlsConfig) -> Result<Option<ClientTls>, String> {
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
    let end_point = end_point(&certs[0]);
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("proxy.tls.key: cannot read {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("proxy.tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("proxy.tls: the certificate and key do not work together: {e}"))?;
    Ok(Some(ClientTls { acceptor: TlsAcceptor::from(Arc::new(config)), end_point }))
}

/// RFC 5929's `tls-server-end-point`: the certificate hashed with its signature's hash
/// function, SHA-256 when that is MD5 or SHA-1 (and for other algorithms, as PostgreSQL's
/// own choice is also SHA-256 there). The signature algorithm is found by its OID.
fn end_point(cert: &CertificateDer<'_>) -> Arc<[u8]> {
    use sha2::Digest;
    const SHA384: [&[u8]; 2] = [
        &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let der: &[u8] = cert.as_ref();
    let signed_with = |oids: &[&[u8]]| oids.iter().any(|oid| der.windows(oid.len()).any(|w| w == *oid));
    if signed_with(&SHA384) {
        sha2::Sha384::digest(der).to_vec().into()
    } else if signed_with(&SHA512) {
        sha2::Sha512::digest(der).to_vec().into()
    } else {
        sha2::Sha256::digest(der).to_vec().into()
    }
}

/// Serves a new connection: when TLS is on, an SSLRequest (after any GSSENCRequest, which
/// gets 'N') is answered 'S' and the handshake runs before the client is served over TLS.
pub async fn serve_connection(app: Arc<App>, mut tcp: TcpStream, peer: SocketAddr) {
    let Some(ClientTls { acceptor, end_point }) = app.now().tls.clone() else {
        return serve_client(app, tcp, peer, None).await;
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
    match crate::timer::timeout(limit, handshake).await {
        Ok(Ok(Negotiated::Tls(tls))) => serve_client(app, tls, peer, Some(end_point)).await,
        Ok(Ok(Negotiated::Plain(tcp))) => serve_client(app, tcp, peer, None).await,
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
        crate::timer::sleep(Duration::from_millis(5)).await;
    }
}
