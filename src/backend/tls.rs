//! TLS from pgrouter to the servers (`server_tls` per database, rustls with the ring
//! provider), as libpq's sslmode does it: an SSLRequest on the new connection, then the
//! handshake if the server answers 'S'.
//!
//! - `prefer`: TLS when the server offers it, plaintext otherwise; the certificate is not
//!   checked.
//! - `require`: TLS or no connection; the certificate is not checked.
//! - `verify-full`: TLS, the certificate chain checked against `server_tls_ca` and the
//!   server's host name (or IP address) checked against the certificate.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::{DatabaseConfig, ServerTls};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// A database's `server_tls`, ready to connect with.
#[derive(Debug)]
pub struct ServerTlsSettings {
    pub mode: ServerTls,
    ca: Option<PathBuf>,
    config: Arc<rustls::ClientConfig>,
}

impl PartialEq for ServerTlsSettings {
    /// Same mode and CA file: a reload keeps pools whose TLS settings did not change.
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.ca == other.ca
    }
}

impl Eq for ServerTlsSettings {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The settings for `db.server_tls` (None for `disable`), or what is wrong, under its key path.
pub fn settings(db: &DatabaseConfig, at: &str) -> Result<Option<Arc<ServerTlsSettings>>, String> {
    if db.server_tls == ServerTls::Disable {
        return Ok(None);
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{at}.server_tls: {e}"))?;
    let config = if db.server_tls == ServerTls::VerifyFull {
        let ca = db.server_tls_ca.as_ref().ok_or_else(|| format!("{at}.server_tls_ca: required for verify-full"))?;
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| format!("{at}.server_tls_ca: cannot read {}: {e}", ca.display()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(format!("{at}.server_tls_ca: no usable CA certificate in {}", ca.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(Unchecked(provider()))).with_no_client_auth()
    };
    Ok(Some(Arc::new(ServerTlsSettings {
        mode: db.server_tls,
        ca: db.server_tls_ca.clone(),
        config: Arc::new(config),
    })))
}

/// Asks the server for TLS and shakes hands as `tls` says; plaintext when TLS is off, or
/// when the server declines under `prefer`.
pub async fn negotiate(
    mut tcp: TcpStream,
    tls: Option<&ServerTlsSettings>,
    host: &str,
) -> Result<ServerStream, String> {
    let Some(tls) = tls else { return Ok(ServerStream::Plain(tcp)) };
    tcp.write_all(&SSL_REQUEST).await.map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    match (answer[0], tls.mode) {
        (b'S', _) => {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("server name {host}: {e}"))?;
            let stream = TlsConnector::from(Arc::clone(&tls.config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake failed (server_tls = \"{}\"): {e}", tls.mode))?;
            Ok(ServerStream::Tls(Box::new(stream)))
        }
        (b'N', ServerTls::Prefer) => Ok(ServerStream::Plain(tcp)),
        (b'N', mode) => Err(format!("the server does not offer TLS (server_tls = \"{mode}\")")),
        (other, _) => Err(format!("unexpected answer to SSLRequest: 0x{other:02x}")),
    }
}

/// `prefer` and `require` encrypt without checking who is at the other end (as libpq's
/// sslmode=require does without a root certificate); signatures are still checked, so the
/// handshake itself is sound.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A server connection's byte stream: plain TCP or TLS over it.
#[derive(Debug)]
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerStream {
    /// The TCP socket underneath (liveness probes look at it).
    #[must_use]
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
