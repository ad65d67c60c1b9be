//! Fast local upstreams for the benchmark harness (`benches/compare.py`):
//!
//! - `--http ADDR`: HTTP/1.1 and h2c; answers `hello world` (after reading the request's body),
//!   `/chunked` with 32 KiB of `c` in 8 pieces and no length, and echoes gRPC unary calls
//!   (`content-type: application/grpc`) with `grpc-status: 0`.
//! - `--https ADDR`: the same over TLS (ALPN h2 and http/1.1), with a throwaway certificate for
//!   `bench.test` whose CA is written to `--ca-out FILE`.
//! - `--tcp ADDR`: TCP echo.
//!
//! `--workers N` sets the runtime's threads (default 1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a harness: failing loudly is right

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use tokio::net::{TcpListener, TcpStream};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let grpc = req.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc && req.uri().path() == "/chunked" {
        // No length: chunked on HTTP/1.1, in several DATA frames on h2.
        let frames = (0..8).map(|_| Ok(Frame::data(Bytes::from_static(&[b'c'; 4096]))));
        return Ok(Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed()));
    }
    if !grpc {
        // A body is read to its end first, as most servers do (the trainer's POSTs); a GET has
        // none to wait for.
        if !req.body().is_end_stream() {
            let _ = req.into_body().collect().await;
        }
        let mut response = Response::new(Full::new(Bytes::from_static(b"hello world\n")).boxed());
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(response);
    }
    let message = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames = futures_util::stream::iter([Ok(Frame::data(message)), Ok(Frame::trailers(trailers))]);
    let mut response = Response::new(StreamBody::new(frames).boxed());
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(response)
}

async fn serve_http(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), service_fn(handle)).await;
                }
            }
        });
    }
}

async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

fn tls_acceptor(ca_out: &str) -> tokio_rustls::TlsAcceptor {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: BoringSSL (Envoy) takes a leaf whose issuer equals its subject for self-signed.
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "bench CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    std::fs::write(ca_out, ca.pem()).expect("write the CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf_params = rcgen::CertificateParams::new(vec!["bench.test".to_string()]).expect("params");
    leaf_params.distinguished_name.push(rcgen::DnType::CommonName, "bench.test");
    let leaf = leaf_params.signed_by(&key, &ca, &ca_key).expect("leaf");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("certificate");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let addr = |name: &str| arg(name).map(|a| a.parse::<SocketAddr>().expect("IP:PORT"));
    let workers = arg("--workers").and_then(|w| w.parse().ok()).unwrap_or(1);
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build().expect("runtime");
    runtime.block_on(async {
        if let Some(a) = addr("--http") {
            tokio::spawn(serve_http(TcpListener::bind(a).await.expect("bind --http"), None));
        }
        if let Some(a) = addr("--https") {
            let acceptor = tls_acceptor(&arg("--ca-out").unwrap_or_else(|| "bench-ca.pem".into()));
            tokio::spawn(serve_http(TcpListener::bind(a).await.expect("bind --https"), Some(acceptor)));
        }
        if let Some(a) = addr("--tcp") {
            let listener = TcpListener::bind(a).await.expect("bind --tcp");
            tokio::spawn(async move {
                loop {
                    if let Ok((s, _)) = listener.accept().await {
                        tokio::spawn(echo(s));
                    }
                }
            });
        }
        println!("ready");
        std::future::pending::<()>().await;
    });
}
