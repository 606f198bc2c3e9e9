//! Built-in TLS (`--tls-cert`, `--tls-key`): the certificate and key, re-read on SIGHUP, and
//! the handshake of each connection.
//!
//! rustls (on ring) is driven by tokio-rustls over the same poll-based socket hyper reads
//! (`monoio`'s poll IO implements tokio's IO traits; tokio-rustls needs nothing of tokio's
//! runtime). monoio-rustls works on monoio's owned-buffer traits instead, so hyper would need
//! a second adapter on top of it.

use std::fmt::Write as _;
use std::future::poll_fn;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use anyhow::{anyhow, bail, Context as _};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The protocols offered in ALPN, preferred first.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The first byte of a TLS record that carries a handshake message (a ClientHello).
const HANDSHAKE_RECORD: u8 = 0x16;

/// Where the certificate chain and the key are read from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate and key read and checked, ready to serve.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// For the log: how many certificates, and the leaf's SHA-256 fingerprint.
    pub description: String,
}

impl TlsFiles {
    /// Reads the PEM certificate chain (leaf first) and the private key (PKCS#8, PKCS#1 RSA or
    /// SEC1 EC), and checks that they belong together.
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let cert_pem = read(&self.cert, "certificate")?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow!("cannot parse the TLS certificate {}: {e}", show(&self.cert)))?;
        let Some(leaf) = chain.first() else {
            bail!(
                "no certificate (-----BEGIN CERTIFICATE-----) in the TLS certificate file {}",
                show(&self.cert)
            );
        };
        let fingerprint = Sha256::digest(leaf.as_ref())
            .iter()
            .fold(String::new(), |mut s, b| {
                let _ = write!(s, "{}{b:02X}", if s.is_empty() { "" } else { ":" });
                s
            });
        let description = format!(
            "{} certificate(s) from {} (leaf SHA-256 {fingerprint})",
            chain.len(),
            self.cert.display()
        );
        let key_pem = read(&self.key, "key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => anyhow!(
                "no private key (PKCS#8 `BEGIN PRIVATE KEY`, RSA or EC) in the TLS key file {}",
                show(&self.key)
            ),
            e => anyhow!("cannot parse the TLS key {}: {e}", show(&self.key)),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS: no protocol version")?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| {
                anyhow!(
                    "the TLS key {} does not fit the certificate {}: {e}",
                    show(&self.key),
                    show(&self.cert)
                )
            })?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Loaded {
            config: Arc::new(config),
            description,
        })
    }
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow!("cannot read the TLS {what} file {}: {e}", show(path)))
}

/// The certificate and key in use, shared by every core; a reload swaps them for new
/// connections (open ones keep theirs).
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn new(files: TlsFiles) -> anyhow::Result<(Tls, String)> {
        let loaded = files.load()?;
        Ok((
            Tls {
                files,
                current: RwLock::new(loaded.config),
            },
            loaded.description,
        ))
    }

    /// What a new connection's handshake uses.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files: on success new connections use them; on error nothing changes.
    pub fn reload(&self) -> anyhow::Result<String> {
        let loaded = self.files.load()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = loaded.config;
        Ok(loaded.description)
    }
}

/// Why a handshake failed: the `reason` of `denokv_tls_handshake_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The client spoke something else than TLS (plain HTTP gets a 400 that says so).
    NotTls,
    /// The TLS handshake failed (no common version or cipher, an untrusted certificate, …).
    Handshake,
}

impl HandshakeFailure {
    pub const COUNT: usize = 2;
    pub const ALL: [HandshakeFailure; Self::COUNT] =
        [HandshakeFailure::NotTls, HandshakeFailure::Handshake];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::NotTls => "not_tls",
            HandshakeFailure::Handshake => "handshake",
        }
    }
}

/// What ALPN agreed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    H2,
    Http1,
    /// The client offered no ALPN: the preface tells.
    Unknown,
}

/// A server-side TLS connection.
pub type TlsStream<IO> = tokio_rustls::server::TlsStream<Prefixed<IO>>;

/// What a plain HTTP client on the TLS port is told.
const NOT_TLS_BODY: &str = "This port speaks HTTPS (denokv --tls-cert): use an https:// URL\n";

fn not_tls_response() -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{NOT_TLS_BODY}",
        NOT_TLS_BODY.len()
    )
    .into_bytes()
}

/// Handshakes on a new connection. A client whose first byte cannot start a TLS record is
/// not handed to rustls: one that looks like plain HTTP gets a plain 400 saying to use
/// https://, anything else is closed.
pub async fn accept<IO>(
    config: Arc<ServerConfig>,
    mut io: IO,
) -> Result<(TlsStream<IO>, Protocol), (HandshakeFailure, io::Error)>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut first = [0u8; 1];
    let n = poll_fn(|cx| {
        let mut buf = ReadBuf::new(&mut first);
        Pin::new(&mut io)
            .poll_read(cx, &mut buf)
            .map_ok(|()| buf.filled().len())
    })
    .await
    .map_err(|e| (HandshakeFailure::Handshake, e))?;
    if n == 0 {
        return Err((
            HandshakeFailure::Handshake,
            io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a ClientHello"),
        ));
    }
    if first[0] != HANDSHAKE_RECORD {
        if first[0].is_ascii_uppercase() {
            refuse_plain_http(&mut io).await;
        }
        return Err((
            HandshakeFailure::NotTls,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("not TLS (first byte {:#04x})", first[0]),
            ),
        ));
    }
    let io = Prefixed {
        first: Some(first[0]),
        io,
    };
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(io)
        .await
        .map_err(|e| (HandshakeFailure::Handshake, e))?;
    let protocol = match stream.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::H2,
        Some(b"http/1.1") => Protocol::Http1,
        _ => Protocol::Unknown,
    };
    Ok((stream, protocol))
}

/// Answers a plain HTTP request with a 400, then reads (a little) until the client closes, so
/// that closing with its request unread does not reset the connection before the answer
/// arrives. The caller's deadlines bound the whole.
async fn refuse_plain_http<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO) {
    let response = not_tls_response();
    let mut written = 0;
    while written < response.len() {
        match poll_fn(|cx| Pin::new(&mut *io).poll_write(cx, &response[written..])).await {
            Ok(0) | Err(_) => return,
            Ok(n) => written += n,
        }
    }
    if poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx))
        .await
        .is_err()
    {
        return;
    }
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        let mut buf = ReadBuf::new(&mut sink);
        match poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut buf)).await {
            Ok(()) if !buf.filled().is_empty() => {}
            _ => return,
        }
    }
}

/// A socket with its first byte, already read, put back in front.
pub struct Prefixed<IO> {
    first: Option<u8>,
    io: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() > 0 {
            if let Some(b) = self.first.take() {
                buf.put_slice(&[b]);
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection's socket in the clear, or its TLS stream.
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for MaybeTls<P, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_read(cx, buf),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<P, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write(cx, buf),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(io) => io.is_write_vectored(),
            MaybeTls::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_flush(cx),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(io) => Pin::new(io).poll_shutdown(cx),
            MaybeTls::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("the openssl command (the tests make their certificates with it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed certificate `NAME.pem` for a key `NAME.key` made by `keygen`.
    fn self_signed(dir: &Path, name: &str, keygen: &[&str]) -> TlsFiles {
        openssl(dir, keygen);
        let (key, cert) = (format!("{name}.key"), format!("{name}.pem"));
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-key",
                &key,
                "-out",
                &cert,
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
            ],
        );
        TlsFiles {
            cert: dir.join(cert),
            key: dir.join(key),
        }
    }

    fn pkcs8(dir: &Path, name: &str) -> TlsFiles {
        let key = format!("{name}.key");
        self_signed(
            dir,
            name,
            &["genpkey", "-algorithm", "ed25519", "-out", &key],
        )
    }

    #[test]
    fn pkcs8_rsa_and_ec_keys_load_and_alpn_offers_h2_then_http1() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let keys = [
            pkcs8(d, "p8"),
            self_signed(
                d,
                "rsa",
                &["genrsa", "-traditional", "-out", "rsa.key", "2048"],
            ),
            self_signed(
                d,
                "ec",
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    "ec.key",
                ],
            ),
        ];
        assert!(std::fs::read_to_string(&keys[1].key)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY"));
        assert!(std::fs::read_to_string(&keys[2].key)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY"));
        for files in keys {
            let loaded = files.load().unwrap_or_else(|e| panic!("{files:?}: {e:#}"));
            assert_eq!(
                loaded.config.alpn_protocols,
                [b"h2".to_vec(), b"http/1.1".to_vec()]
            );
            assert!(loaded.description.starts_with("1 certificate(s) from "));
        }
    }

    #[test]
    fn missing_empty_and_mismatched_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let a = pkcs8(d, "a");
        let b = pkcs8(d, "b");
        let err = |files: TlsFiles| format!("{:#}", files.load().err().expect("an error"));

        let missing = TlsFiles {
            cert: d.join("nope.pem"),
            key: a.key.clone(),
        };
        let e = err(missing);
        assert!(
            e.contains("cannot read the TLS certificate file") && e.contains("nope.pem"),
            "{e}"
        );

        std::fs::write(d.join("empty.pem"), "").unwrap();
        let e = err(TlsFiles {
            cert: d.join("empty.pem"),
            key: a.key.clone(),
        });
        assert!(
            e.contains("no certificate") && e.contains("empty.pem"),
            "{e}"
        );

        // The certificate where the key should be.
        let e = err(TlsFiles {
            cert: a.cert.clone(),
            key: a.cert.clone(),
        });
        assert!(e.contains("no private key") && e.contains("a.pem"), "{e}");

        let e = err(TlsFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        });
        assert!(e.contains("does not fit the certificate"), "{e}");
    }

    #[test]
    fn a_reload_swaps_the_certificate_and_a_bad_one_keeps_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let first = pkcs8(d, "first");
        let second = pkcs8(d, "second");
        let live = TlsFiles {
            cert: d.join("live.pem"),
            key: d.join("live.key"),
        };
        let install = |from: &TlsFiles| {
            std::fs::copy(&from.cert, &live.cert).unwrap();
            std::fs::copy(&from.key, &live.key).unwrap();
        };
        install(&first);
        let (tls, described) = Tls::new(live.clone()).unwrap();
        let before = tls.config();

        // A key that does not fit: the old configuration stays.
        std::fs::copy(&second.cert, &live.cert).unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.config()));

        install(&second);
        let now = tls.reload().unwrap();
        assert_ne!(now, described, "the leaf fingerprint changes");
        assert!(!Arc::ptr_eq(&before, &tls.config()));
        assert_eq!(
            now,
            second
                .load()
                .unwrap()
                .description
                .replace("second.pem", "live.pem")
        );
    }

    #[test]
    fn the_plain_http_answer_is_well_formed() {
        let response = String::from_utf8(not_tls_response()).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
