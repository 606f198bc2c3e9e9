//! Built-in TLS (`--tls-cert`, `--tls-key`): HTTP/1.1 and h2 chosen by ALPN, plain HTTP
//! refused, the handshake within the connection deadlines, and the certificate swapped on
//! SIGHUP. A test CA and server certificates are made with the `openssl` command.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (these tests make their certificates with it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA in a temporary folder, and server certificates it signs.
struct Pki {
    dir: tempfile::TempDir,
}

struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-noenc",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=denokv test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
        std::fs::write(
            dir.path().join("leaf.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `localhost` and 127.0.0.1, signed by the CA.
    fn leaf(&self, name: &str) -> Leaf {
        let d = self.dir.path();
        let (key, csr, cert) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-noenc",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                "/CN=localhost",
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &cert,
                "-extfile",
                "leaf.ext",
            ],
        );
        Leaf {
            cert: d.join(cert),
            key: d.join(key),
        }
    }
}

impl Leaf {
    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.cert).unwrap()
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

fn tls_server(leaf: &Leaf, extra: &[&str]) -> Server {
    let args = leaf.args();
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Server::start(&all)
}

fn client_config(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls_connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The server's certificate on a connection.
fn served(stream: &Tls) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// The metadata exchange, the first request a Deno client makes.
fn metadata_request() -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method("POST")
        .uri("https://localhost/")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"supportedVersions":[1,2,3]}"#,
        )))
        .unwrap()
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    async fn new(stream: Tls, proto: Proto) -> Sender {
        let io = TokioIo::new(stream);
        match proto {
            Proto::H1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                Sender::H1(send)
            }
            Proto::H2 => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                Sender::H2(send)
            }
        }
    }

    /// The metadata exchange: its status, HTTP version and body.
    async fn metadata(&mut self) -> (u16, http::Version, String) {
        // A connection's sender takes a request only once it is ready (else hyper answers
        // "connection was not ready", seen once in CI).
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(metadata_request()).await
            }
            Sender::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(metadata_request()).await
            }
        }
        .unwrap();
        let (status, version) = (resp.status().as_u16(), resp.version());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, version, String::from_utf8_lossy(&body).into_owned())
    }
}

/// The metric line `name{labels} value` of a scrape, as a number (0 when absent).
fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, _, body) = s.scrape();
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_chooses_h2_or_http1_and_the_metadata_exchange_works_on_both() {
    let pki = Pki::new();
    let leaf = pki.leaf("server");
    let s = tls_server(&leaf, &[]);
    // What the client offers, what ALPN agrees on, the client to use, the answer's version.
    type Case = (
        &'static [&'static [u8]],
        Option<&'static [u8]>,
        Proto,
        http::Version,
    );
    let cases: [Case; 3] = [
        (
            &[b"h2", b"http/1.1"],
            Some(b"h2"),
            Proto::H2,
            http::Version::HTTP_2,
        ),
        (
            &[b"http/1.1"],
            Some(b"http/1.1"),
            Proto::H1,
            http::Version::HTTP_11,
        ),
        // No ALPN: the preface tells.
        (&[], None, Proto::H2, http::Version::HTTP_2),
    ];
    for (offered, agreed, proto, version) in cases {
        let stream = tls_connect(s.addr, client_config(&pki.ca(), offered))
            .await
            .unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), agreed);
        assert_eq!(served(&stream), leaf.der());
        let mut sender = Sender::new(stream, proto).await;
        for _ in 0..2 {
            let (status, got, body) = sender.metadata().await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(got, version);
            assert!(body.contains("\"endpoints\""), "{body}");
        }
    }
    let no_alpn_h1 = tls_connect(s.addr, client_config(&pki.ca(), &[]))
        .await
        .unwrap();
    let (status, got, _) = Sender::new(no_alpn_h1, Proto::H1).await.metadata().await;
    assert_eq!((status, got), (200, http::Version::HTTP_11));
    assert_eq!(
        metric(
            &s,
            "denokv_tls_handshake_failures_total{reason=\"handshake\"}"
        ),
        0.0
    );
}

/// Reads until the server closes; what it sent.
fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("not closed within {limit:?} ({e}); got {got:?}"),
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_gets_a_400_saying_https_and_other_bytes_are_closed() {
    let pki = Pki::new();
    let s = tls_server(&pki.leaf("server"), &[]);
    for request in [
        &b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let mut plain = TcpStream::connect(s.addr).unwrap();
        plain.write_all(request).unwrap();
        let answer = String::from_utf8(read_to_close(&mut plain, Duration::from_secs(5))).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.ends_with("use an https:// URL\n"), "{answer}");
    }
    let mut junk = TcpStream::connect(s.addr).unwrap();
    junk.write_all(&[0, 1, 2, 3]).unwrap();
    assert!(read_to_close(&mut junk, Duration::from_secs(5)).is_empty());
    assert_eq!(
        metric(
            &s,
            "denokv_tls_handshake_failures_total{reason=\"not_tls\"}"
        ),
        3.0
    );

    // A client that does not trust the certificate gives up in the handshake.
    let other = Pki::new();
    let refused = tls_connect(s.addr, client_config(&other.ca(), &[b"h2"])).await;
    assert!(refused.is_err());
    let start = Instant::now();
    while metric(
        &s,
        "denokv_tls_handshake_failures_total{reason=\"handshake\"}",
    ) < 1.0
    {
        assert!(start.elapsed() < Duration::from_secs(5), "not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The server still serves.
    let stream = tls_connect(s.addr, client_config(&pki.ca(), &[b"h2"]))
        .await
        .unwrap();
    assert_eq!(Sender::new(stream, Proto::H2).await.metadata().await.0, 200);
}

/// How long until the server closes the connection.
fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    read_to_close(stream, limit);
    start.elapsed()
}

#[test]
fn a_silent_connection_and_a_partial_client_hello_are_closed_by_the_deadlines() {
    let pki = Pki::new();
    let s = tls_server(
        &pki.leaf("server"),
        &["--first-byte-timeout", "1", "--head-timeout", "2"],
    );
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let took = time_to_close(&mut silent, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_millis(1900), "closed after {took:?}");

    // A handshake record announcing 512 bytes, of which 1 comes: the head deadline (2 s from
    // the first byte) closes it, not the first-byte one.
    let mut partial = TcpStream::connect(s.addr).unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let took = time_to_close(&mut partial, Duration::from_secs(6));
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    assert!(took < Duration::from_millis(3500), "closed after {took:?}");
    assert_eq!(
        metric(
            &s,
            "denokv_connections_closed_total{reason=\"first_byte_timeout\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &s,
            "denokv_connections_closed_total{reason=\"head_timeout\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_the_new_certificate_to_new_connections_and_a_bad_one_is_not_taken() {
    let pki = Pki::new();
    let (first, second) = (pki.leaf("first"), pki.leaf("second"));
    let live = Leaf {
        cert: pki.dir.path().join("live.pem"),
        key: pki.dir.path().join("live.key"),
    };
    let install = |from: &Leaf| {
        std::fs::copy(&from.cert, &live.cert).unwrap();
        std::fs::copy(&from.key, &live.key).unwrap();
    };
    install(&first);
    let s = tls_server(&live, &[]);
    let config = client_config(&pki.ca(), &[b"h2"]);
    let old = tls_connect(s.addr, config.clone()).await.unwrap();
    assert_eq!(served(&old), first.der());
    let mut old = Sender::new(old, Proto::H2).await;
    assert_eq!(old.metadata().await.0, 200);

    install(&second);
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let line = s.wait_for_log("reloaded on SIGHUP", Duration::from_secs(10));
    assert!(line.contains("TLS: 1 certificate(s)"), "{line}");
    let new = tls_connect(s.addr, config.clone()).await.unwrap();
    assert_eq!(served(&new), second.der());
    assert_eq!(Sender::new(new, Proto::H2).await.metadata().await.0, 200);
    // The connection made before keeps working.
    assert_eq!(old.metadata().await.0, 200);

    // A key that does not fit the certificate: loud, and the second one stays.
    std::fs::copy(&first.key, &live.key).unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let line = s.wait_for_log("TLS CERTIFICATE UNCHANGED", Duration::from_secs(10));
    assert!(line.contains("does not fit"), "{line}");
    let after = tls_connect(s.addr, config).await.unwrap();
    assert_eq!(served(&after), second.der());
}

#[test]
fn missing_or_mismatched_files_stop_the_start_with_a_clear_error() {
    let pki = Pki::new();
    let (a, b) = (pki.leaf("a"), pki.leaf("b"));
    let db = pki.dir.path().join("db.sqlite");
    let db = db.to_str().unwrap();
    let start = |cert: &Path, key: &Path| {
        run_binary(
            &[
                "--sqlite-path",
                db,
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
            &[("DENO_KV_ACCESS_TOKEN", TOKEN)],
        )
    };
    let missing = pki.dir.path().join("missing.key");
    let (status, log) = start(&a.cert, &missing);
    assert!(!status.success());
    assert!(
        log.contains("cannot read the TLS key file") && log.contains("missing.key"),
        "{log}"
    );
    let (status, log) = start(&a.cert, &b.key);
    assert!(!status.success());
    assert!(log.contains("does not fit the certificate"), "{log}");
    let (status, log) = run_binary(
        &[
            "--sqlite-path",
            db,
            "serve",
            "--tls-cert",
            a.cert.to_str().unwrap(),
        ],
        &[("DENO_KV_ACCESS_TOKEN", TOKEN)],
    );
    assert!(!status.success());
    assert!(log.contains("--tls-key"), "{log}");
}
