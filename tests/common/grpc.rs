//! A tonic gRPC service with the four call kinds, on raw-bytes messages (no codegen):
//! `/test.Echo/Unary` (echo; `sleep:<ms>` sleeps first; `fail:<key>:<n>` answers UNAVAILABLE to
//! the first n calls with that key), `/test.Echo/ServerStream` (`<n>` →
//! n messages; `slow:<n>` 200 ms apart), `/test.Echo/ClientStream` (→ `got <count>`), `/test.Echo/Bidi` (echo each); and the standard health service, SERVING unless asked with `:authority` not-serving.test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::{Stream, StreamExt};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

// One unit struct per method, as tonic's code generator does.
struct UnarySvc;
struct ServerStreamSvc;
struct ClientStreamSvc;
struct BidiSvc;
struct HealthSvc;
struct NotServingSvc;

impl tonic::server::UnaryService<Bytes> for NotServingSvc {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;
    /// `HealthCheckResponse { status: NOT_SERVING }`.
    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        Box::pin(async { Ok(Response::new(Bytes::from_static(&[0x08, 0x02]))) })
    }
}

impl tonic::server::UnaryService<Bytes> for HealthSvc {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;
    /// `grpc.health.v1.HealthCheckResponse { status: SERVING }`, whatever the request.
    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        Box::pin(async { Ok(Response::new(Bytes::from_static(&[0x08, 0x01]))) })
    }
}

impl tonic::server::UnaryService<Bytes> for UnarySvc {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;
    fn call(&mut self, r: Request<Bytes>) -> Self::Future {
        unary(r)
    }
}

impl tonic::server::ServerStreamingService<Bytes> for ServerStreamSvc {
    type Response = Bytes;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<Result<Response<MessageStream>, Status>>;
    fn call(&mut self, r: Request<Bytes>) -> Self::Future {
        server_stream(r)
    }
}

impl tonic::server::ClientStreamingService<Bytes> for ClientStreamSvc {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;
    fn call(&mut self, r: Request<Streaming<Bytes>>) -> Self::Future {
        client_stream(r)
    }
}

impl tonic::server::StreamingService<Bytes> for BidiSvc {
    type Response = Bytes;
    type ResponseStream = MessageStream;
    type Future = BoxFuture<Result<Response<MessageStream>, Status>>;
    fn call(&mut self, r: Request<Streaming<Bytes>>) -> Self::Future {
        bidi(r)
    }
}

fn unary(r: Request<Bytes>) -> BoxFuture<Result<Response<Bytes>, Status>> {
    Box::pin(async move {
        let msg = r.into_inner();
        if let Some((key, n)) = std::str::from_utf8(&msg).ok().and_then(|s| s.strip_prefix("fail:")?.split_once(':')) {
            static SEEN: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> =
                std::sync::Mutex::new(None);
            let attempt = {
                let mut seen = SEEN.lock().unwrap();
                let n = seen.get_or_insert_with(Default::default).entry(key.to_string()).or_default();
                *n += 1;
                *n
            };
            if attempt <= n.parse().unwrap_or(0) {
                return Err(Status::unavailable(format!("failing attempt {attempt}")));
            }
            return Ok(Response::new(Bytes::from(format!("attempt {attempt}"))));
        }
        if let Some(ms) = std::str::from_utf8(&msg).ok().and_then(|s| s.strip_prefix("sleep:")) {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        }
        Ok(Response::new(msg))
    })
}

fn server_stream(r: Request<Bytes>) -> BoxFuture<Result<Response<MessageStream>, Status>> {
    Box::pin(async move {
        let text = String::from_utf8_lossy(&r.into_inner()).into_owned();
        // `slow:<n>`: n messages, 200 ms apart.
        let (n, pause) = match text.strip_prefix("slow:") {
            Some(n) => (n.parse().unwrap_or(0), Duration::from_millis(200)),
            None => (text.parse().unwrap_or(0), Duration::ZERO),
        };
        let s: MessageStream = Box::pin(futures_util::stream::iter(0..n).then(move |i: usize| async move {
            tokio::time::sleep(pause).await;
            Ok(Bytes::from(format!("msg-{i}")))
        }));
        Ok(Response::new(s))
    })
}

fn client_stream(r: Request<Streaming<Bytes>>) -> BoxFuture<Result<Response<Bytes>, Status>> {
    Box::pin(async move {
        let mut stream = r.into_inner();
        let mut count = 0;
        while let Some(msg) = stream.next().await {
            msg?;
            count += 1;
        }
        Ok(Response::new(Bytes::from(format!("got {count}"))))
    })
}

fn bidi(r: Request<Streaming<Bytes>>) -> BoxFuture<Result<Response<MessageStream>, Status>> {
    Box::pin(async move {
        let s: MessageStream = Box::pin(r.into_inner());
        Ok(Response::new(s))
    })
}

async fn route(req: http::Request<hyper::body::Incoming>) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(RawCodec);
    Ok(match req.uri().path() {
        "/test.Echo/Unary" => grpc.unary(UnarySvc, req).await,
        "/test.Echo/ServerStream" => grpc.server_streaming(ServerStreamSvc, req).await,
        "/test.Echo/ClientStream" => grpc.client_streaming(ClientStreamSvc, req).await,
        "/test.Echo/Bidi" => grpc.streaming(BidiSvc, req).await,
        "/grpc.health.v1.Health/Check" if req.uri().authority().is_some_and(|a| a.as_str() == "not-serving.test") => {
            grpc.unary(NotServingSvc, req).await
        }
        "/grpc.health.v1.Health/Check" => grpc.unary(HealthSvc, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    })
}

pub struct GrpcServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// h2c, or TLS with ALPN h2 when `tls` is given.
pub async fn grpc_server(tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> GrpcServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let tls = tls.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http2_only();
                let service = service_fn(route);
                match tls {
                    Some(config) => {
                        let Ok(stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await else { return };
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    }
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                    }
                }
            });
        }
    });
    GrpcServer { addr, task }
}

/// A tonic client to `addr` (h2c).
pub async fn client(addr: SocketAddr) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    tonic::client::Grpc::new(channel)
}

pub fn path(method: &str) -> http::uri::PathAndQuery {
    http::uri::PathAndQuery::try_from(format!("/test.Echo/{method}")).unwrap()
}
