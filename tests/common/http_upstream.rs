//! An HTTP/1.1 + h2c (optionally TLS) upstream whose behaviour is set by request headers:
//! `x-status`, `x-delay-ms`, `x-size` (streamed body), `x-reset: before|mid`, `x-trailers`
//! (a body then trailers), `x-challenge`
//! (answers with `Proxy-Authenticate`), `x-fail-first: <n>` with `x-key: <k>` (the first n
//! requests with that key get `x-fail-status`, default 503, and `x-fail-header` as a response
//! header, after `x-fail-delay-ms` and after reading the whole body; later ones succeed; every response says `x-attempt`), `x-drip: <n>` (n one-byte
//! chunks, `x-drip-ms` apart); `/early` answers before reading the body; `/upload` counts the
//! request body; an `Upgrade` request is answered 101 and then echoed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpUpstream {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

pub async fn http_upstream(tls: Option<Arc<rustls::ServerConfig>>) -> HttpUpstream {
    http_upstream_on("127.0.0.1:0".parse().unwrap(), tls).await
}

pub async fn http_upstream_on(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> HttpUpstream {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let id = count.fetch_add(1, Ordering::SeqCst) + 1;
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(id, req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(config) => {
                        let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else { return };
                        let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
                    }
                    None => {
                        let _ = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service).await;
                    }
                }
            });
        }
    });
    HttpUpstream { addr, connections, task }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn full(text: String) -> BoxBody {
    http_body_util::Full::new(Bytes::from(text)).map_err(|never| match never {}).boxed()
}

async fn count_body(mut body: Incoming) -> Result<u64, std::io::Error> {
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(std::io::Error::other)?.into_data() {
            received += data.len() as u64;
        }
    }
    Ok(received)
}

/// The trace context the request carries (MeshTrace tests), one `name: value` line each.
fn trace_headers(req: &Request<Incoming>) -> String {
    let names = [
        "traceparent",
        "tracestate",
        "x-request-id",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "b3",
    ];
    names.iter().map(|name| format!("{name}: {}\n", header(req, name).unwrap_or("-"))).collect()
}

/// Requests seen per `x-key`, across every upstream of the test process.
fn seen() -> std::sync::MutexGuard<'static, std::collections::HashMap<String, usize>> {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, usize>>> =
        std::sync::OnceLock::new();
    SEEN.get_or_init(Default::default).lock().unwrap()
}

/// Counts a request with `x-key: key`; returns its attempt number.
fn attempts(key: &str) -> usize {
    let mut seen = seen();
    let n = seen.entry(key.to_string()).or_default();
    *n += 1;
    *n
}

/// How many requests with `x-key: key` have reached an upstream so far.
pub fn attempts_seen(key: &str) -> usize {
    seen().get(key).copied().unwrap_or(0)
}

async fn handle(conn: usize, mut req: Request<Incoming>) -> Result<Response<BoxBody>, std::io::Error> {
    if let Some(ms) = header(&req, "x-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let (Some(fail_first), Some(key)) =
        (header(&req, "x-fail-first").and_then(|v| v.parse::<usize>().ok()), header(&req, "x-key"))
    {
        let attempt = attempts(key);
        let mut builder = Response::builder().header("x-attempt", attempt.to_string());
        if attempt <= fail_first {
            if let Some(ms) = header(&req, "x-fail-delay-ms").and_then(|v| v.parse().ok()) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let status = header(&req, "x-fail-status").and_then(|s| s.parse().ok()).unwrap_or(503);
            builder = builder.status(status);
            if let Some((name, value)) = header(&req, "x-fail-header").and_then(|h| h.split_once(':')) {
                builder = builder.header(name.trim(), value.trim());
            }
            // The whole body is read first: the failure comes after the upload, deterministically.
            count_body(req.into_body()).await?;
            return Ok(builder.body(full(format!("failed attempt {attempt}\n"))).unwrap());
        }
        // The body is read (and counted) so that a replayed upload can be checked.
        let received = count_body(req.into_body()).await?;
        return Ok(builder.body(full(format!("attempt {attempt} received: {received}\n"))).unwrap());
    }
    if let Some(drips) = header(&req, "x-drip").and_then(|v| v.parse::<usize>().ok()) {
        let pause = Duration::from_millis(header(&req, "x-drip-ms").and_then(|v| v.parse().ok()).unwrap_or(100));
        // `x-drip-late`: the pause comes before the first chunk too (headers, then silence).
        let late = header(&req, "x-drip-late").is_some();
        let chunks = stream::unfold(0, move |i| async move {
            (i < drips).then_some(())?;
            if i > 0 || late {
                tokio::time::sleep(pause).await;
            }
            Some((Ok(Frame::data(Bytes::from_static(b"."))), i + 1))
        });
        return Ok(Response::builder().body(StreamBody::new(chunks).boxed()).unwrap());
    }
    if header(&req, "x-trailers").is_some() {
        // Chunked (HTTP/1, when the request said `TE: trailers`): a data frame, then trailers.
        count_body(req.into_body()).await?;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-checksum", http::HeaderValue::from_static("abc"));
        let frames = stream::iter([Ok(Frame::data(Bytes::from_static(b"abc"))), Ok(Frame::trailers(trailers))]);
        // hyper sends only the trailers the head declares.
        let builder = Response::builder().header(http::header::TRAILER, "x-checksum");
        return Ok(builder.body(StreamBody::new(frames).boxed()).unwrap());
    }
    if header(&req, "x-reset") == Some("before") {
        return Err(std::io::Error::other("reset before the response"));
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::CONNECTION, "upgrade")
            .body(full(String::new()))
            .unwrap();
        return Ok(response);
    }
    let status = header(&req, "x-status").and_then(|s| s.parse().ok()).unwrap_or(200);
    let size: Option<u64> = header(&req, "x-size").and_then(|s| s.parse().ok());
    let reset_mid = header(&req, "x-reset") == Some("mid");
    let description = format!(
        "conn: {conn}\nversion: {:?}\nmethod: {}\npath: {}\nhost: {}\nauthority: {}\nconnection: {}\nte: {}\nx-private: {}\nproxy-authorization: {}\n{}",
        req.version(),
        req.method(),
        req.uri().path(),
        header(&req, "host").unwrap_or("-"),
        req.uri().authority().map_or("-".to_string(), |a| a.to_string()),
        header(&req, "connection").unwrap_or("-"),
        header(&req, "te").unwrap_or("-"),
        header(&req, "x-private").unwrap_or("-"),
        header(&req, "proxy-authorization").unwrap_or("-"),
        trace_headers(&req),
    );
    let mut builder = Response::builder().status(status).header("x-upstream-conn", conn.to_string());
    if header(&req, "x-challenge").is_some() {
        builder = builder.header(http::header::PROXY_AUTHENTICATE, "Basic realm=upstream");
    }
    if req.uri().path() == "/early" {
        // Answers at once and reads the body afterwards: the connection stays busy (and
        // kept alive) until the upload ends.
        let mut body = req.into_body();
        tokio::spawn(async move { while body.frame().await.is_some() {} });
        return Ok(builder.body(full("early\n".to_string())).unwrap());
    }
    if req.uri().path() == "/upload" {
        let received = count_body(req.into_body()).await?;
        return Ok(builder.body(full(format!("received: {received}\n"))).unwrap());
    }
    if reset_mid {
        builder = builder.header(http::header::CONTENT_LENGTH, "1000000");
        // The first chunk goes out with the head; the failure comes a moment later.
        let chunks = stream::unfold(0, |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from_static(&[b'x'; 1000]))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Err(std::io::Error::other("reset mid-response")), 2))
                }
                _ => None,
            }
        });
        return Ok(builder.body(StreamBody::new(chunks).boxed()).unwrap());
    }
    match size {
        Some(size) => {
            const CHUNK: u64 = 64 * 1024;
            let chunk = Bytes::from(vec![b'z'; CHUNK as usize]);
            let frames = stream::unfold(size, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let n = left.min(CHUNK);
                        (Ok(Frame::data(chunk.slice(..n as usize))), left - n)
                    })
                }
            });
            builder = builder.header(http::header::CONTENT_LENGTH, size.to_string());
            Ok(builder.body(StreamBody::new(frames).boxed()).unwrap())
        }
        None => Ok(builder.body(full(description)).unwrap()),
    }
}

/// A rustls server config for the upstream (ALPN h2 and http/1.1).
pub fn tls_config(leaf: &super::pki::Leaf) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(super::pki::certs(&leaf.cert_pem), key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

#[allow(dead_code)]
fn _assert_infallible(_: Infallible) {}
