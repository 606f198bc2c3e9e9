//! The machine's HTTP ceiling: a server that speaks just enough KV Connect for the load
//! generator's `read` workload (metadata, then an empty snapshot read) and does no other work.
//! HTTP/1.1 and h2c on one port, a tokio worker per thread, hyper like denokv.
//!
//! `denokv-trivial-server --addr 127.0.0.1:0 --threads 2` prints `Listening on http://ADDR`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prost::Message;

fn main() -> anyhow::Result<()> {
    let mut addr: SocketAddr = "127.0.0.1:4600".parse()?;
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--addr" => addr = args.next().unwrap_or_default().parse()?,
            "--threads" => threads = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other} (use --addr ADDR --threads N)"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("Listening on http://{}", listener.local_addr()?);
    let read_reply = Bytes::from(
        denokv::proto::SnapshotReadOutput {
            ranges: vec![denokv::proto::ReadRangeOutput::default()],
            read_disabled: false,
            read_is_strongly_consistent: true,
            status: denokv::proto::SnapshotReadStatus::SrSuccess as i32,
        }
        .encode_to_vec(),
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let read_reply = read_reply.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let read_reply = read_reply.clone();
                async move {
                    // Read the request to its end, as a real server does: answering before
                    // the body has arrived makes hyper reset the h2 stream, and many resets
                    // make it close the connection ("too_many_internal_resets").
                    let path = req.uri().path().to_string();
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(answer(&path, read_reply))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(path: &str, read_reply: Bytes) -> http::Response<Full<Bytes>> {
    let (content_type, body) = if path == "/" {
        let json = r#"{"version":3,"databaseId":"00000000-0000-0000-0000-000000000000","endpoints":[{"url":"/v2","consistency":"strong"}],"token":"trivial-server-token","expiresAt":"2099-01-01T00:00:00.000Z"}"#;
        ("application/json", Bytes::from_static(json.as_bytes()))
    } else {
        ("application/x-protobuf", read_reply)
    };
    http::Response::builder()
        .header("content-type", content_type)
        .body(Full::new(body))
        .expect("static response parts are valid")
}
