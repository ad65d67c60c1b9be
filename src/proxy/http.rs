//! HTTP/1.1, HTTP/2 and gRPC: a hyper server facing the application and pooled hyper client
//! connections facing the endpoints. Bodies stream through; nothing is collected.

use std::convert::Infallible;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::access_log::{AccessLog, Record};
use crate::catalog::{Access, Protocol, Service};
use crate::live::{Live, RouteKey};
use crate::upstream::pool::{self, PoolKey, RequestBody};
use crate::upstream::{ActiveGuard, ConnectError, Target, TargetAddr, TlsSetup, Upstream, UpstreamIo};

/// Most request headers accepted from the application (HTTP/1).
pub const MAX_HEADERS: usize = 100;
/// Largest request head (HTTP/1) and header list (HTTP/2) accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per application connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];
const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// Per-connection context. Each request finds its service in the configuration current when
/// it arrives, so a reload applies to open keep-alive connections too.
pub struct HttpProxy {
    pub live: Arc<Live>,
    pub key: RouteKey,
    pub peer: SocketAddr,
    /// Time allowed until the response headers arrive (`None`: no limit).
    pub request_timeout: Option<Duration>,
    pub access_log: Option<AccessLog>,
}

/// Serves one application connection until it closes, or until a drain asks it to finish its
/// requests and close.
pub async fn serve(client: TcpStream, proxy: HttpProxy, protocol: Protocol, mut draining: watch::Receiver<bool>) {
    let proxy = Arc::new(proxy);
    let svc = service_fn(move |req| {
        let proxy = proxy.clone();
        async move { Ok::<_, Infallible>(proxy.forward(req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_headers(MAX_HEADERS).max_buf_size(MAX_HEADER_BYTES).preserve_header_case(false);
    builder.http2().max_concurrent_streams(MAX_CONCURRENT_STREAMS).max_header_list_size(MAX_HEADER_BYTES as u32);
    // The declared protocol wins: http2/grpc listeners speak h2c only; http ones detect
    // HTTP/1.1 or h2c prior knowledge from the first bytes.
    let builder = if protocol != Protocol::Http { builder.http2_only() } else { builder };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(client), svc);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain_requested(&mut draining) => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "application connection ended with an error");
    }
}

async fn drain_requested(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await; // the server is gone without draining: run on
    }
}

/// What the application gets instead of an upstream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Unavailable,
    Timeout,
    Forbidden,
}

impl Failure {
    fn http_status(self) -> StatusCode {
        match self {
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    fn grpc_status(self) -> &'static str {
        match self {
            Self::Unavailable => "14",
            Self::Timeout => "4",
            Self::Forbidden => "7",
        }
    }
}

impl HttpProxy {
    async fn forward(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let snapshot = self.live.load();
        let Some(route) = snapshot.route(self.key) else {
            return failure(is_grpc(req.headers()), Failure::Unavailable, "service is no longer configured");
        };
        drop(snapshot);
        let ctx = RequestCtx { service: route.service.clone(), upstream: route.upstream.clone(), route };
        let request_line = self.access_log.as_ref().map(|_| format!("{} {}", req.method(), req.uri().path()));
        let sent = self.access_log.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        let mut response = self.respond(&ctx, req, sent.clone()).await;
        let status = response.status().as_u16();
        let m = &ctx.upstream.metrics;
        m.request(status);
        m.request_duration.observe(started.elapsed().as_secs_f64());
        if let (Some(log), Some(request)) = (&self.access_log, request_line) {
            let record = Record {
                time: SystemTime::now(),
                service: ctx.upstream.service().clone(),
                protocol: ctx.service.protocol.as_str(),
                client: self.peer,
                endpoint: None,
                request: Some(request),
                status: Some(status),
                outcome: "ok",
                bytes_sent: 0,
                bytes_received: 0,
                duration: Duration::ZERO,
            };
            let pending = PendingLog { log: log.clone(), record, started, sent };
            match response.body_mut() {
                ProxyBody::Upstream(body) => body.log = Some(Box::new(pending)),
                ProxyBody::Local(_) => pending.finish("local_reply", 0),
            }
        }
        response
    }

    async fn respond(
        &self,
        ctx: &RequestCtx,
        req: Request<Incoming>,
        sent: Option<Arc<AtomicU64>>,
    ) -> Response<ProxyBody> {
        let grpc = ctx.service.protocol == Protocol::Grpc || is_grpc(req.headers());
        if let Some(reason) = &ctx.service.broken {
            tracing::warn!(service = %ctx.upstream.service(), %reason, "service is broken");
            return failure(grpc, Failure::Unavailable, "service is not available: its configuration is broken");
        }
        if ctx.service.access == Access::Forbidden {
            return failure(grpc, Failure::Forbidden, "access to external services is forbidden by the Mesh");
        }
        let grpc_deadline = if grpc { grpc_timeout(req.headers()) } else { None };
        let limit = match (grpc_deadline, self.request_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let deadline = grpc_deadline.map(|d| Instant::now() + d);
        let exchange = ctx.exchange(req, grpc, deadline, sent);
        match limit {
            Some(limit) => match tokio::time::timeout(limit, exchange).await {
                Ok(response) => response,
                Err(_) => failure(grpc, Failure::Timeout, "upstream did not answer in time"),
            },
            None => exchange.await,
        }
    }
}

/// The service one request goes to.
struct RequestCtx {
    service: Arc<Service>,
    upstream: Arc<Upstream>,
    route: crate::live::Route,
}

impl RequestCtx {
    async fn exchange(
        &self,
        req: Request<Incoming>,
        grpc: bool,
        deadline: Option<Instant>,
        sent: Option<Arc<AtomicU64>>,
    ) -> Response<ProxyBody> {
        let http2 = matches!(self.service.protocol, Protocol::Http2 | Protocol::Grpc);
        let tls = self.route.tls();
        let mut req = req;
        let upgrade = !http2 && is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;
        let (mut sender, target, key) = match self.sender(tls, http2).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "no upstream connection");
                return failure(
                    grpc,
                    Failure::Unavailable,
                    "upstream connect error or disconnect/reset before headers",
                );
            }
        };
        if let Err(reason) = prepare_request(&mut parts, &target, tls.is_some(), http2, upgrade) {
            return failure(grpc, Failure::Unavailable, reason);
        }
        let active = target.health.track();
        let body = RequestBody::new(body, self.upstream.metrics.bytes_sent.clone(), sent);
        let request = Request::from_parts(parts, body);
        let result = match &mut sender {
            Sender::H1(s) => s.send_request(request).await,
            Sender::H2(s) => s.send_request(request).await,
        };
        let mut response = match result {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(service = %self.upstream.service(), endpoint = %target.addr, %error, "upstream request failed before the response");
                return failure(
                    grpc,
                    Failure::Unavailable,
                    "upstream connect error or disconnect/reset before headers",
                );
            }
        };
        if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, response.status()) {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, ProxyBody::empty());
        }
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = client_version;
        let pool_return = match sender {
            Sender::H1(sender) => Some(PoolReturn { upstream: self.upstream.clone(), key, sender }),
            Sender::H2(_) => None,
        };
        let mut body = UpstreamBody {
            body,
            pool_return,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            grpc,
            finished: false,
            outcome: "aborted",
            received: 0,
            counter: self.upstream.metrics.bytes_received.clone(),
            endpoint: target.addr.clone(),
            log: None,
            _active: active,
        };
        if body.body.is_end_stream() {
            body.return_to_pool(); // hyper will not poll an empty body
        }
        Response::from_parts(parts, ProxyBody::Upstream(body))
    }

    /// A connection for one request: pooled when possible, else new; a failed connect is
    /// retried once on another target.
    async fn sender(&self, tls: Option<TlsSetup<'_>>, http2: bool) -> Result<(Sender, Target, PoolKey), ConnectError> {
        self.upstream.wait_for_first_resolution().await;
        let tls_id = pool::TlsIdentity::of(tls.map(|t| t.config));
        let mut failed: Option<(Target, ConnectError)> = None;
        for _ in 0..2 {
            let Some(target) = self.upstream.pick(failed.as_ref().map(|(t, _)| &t.addr)) else { break };
            let key =
                PoolKey { target: target.addr.clone(), tls: tls_id.clone(), http2, worker: pool::current_worker() };
            // New connections are boxed: their connect, TLS and handshake state is large, and
            // inline it would make every request's future (moved on each spawn) that large.
            let result = if http2 {
                let connect = || {
                    Box::pin(async {
                        let io = self.upstream.connect_target(&target, tls).await?.stream;
                        handshake_h2(io).await.map_err(|e| self.handshake_error(&target, e))
                    })
                };
                self.upstream.pool.h2(&key, connect).await.map(Sender::H2)
            } else {
                let pooled = match self.upstream.pool.take_h1(&key) {
                    Some(mut sender) => sender.ready().await.ok().map(|()| sender),
                    None => None,
                };
                match pooled {
                    Some(sender) => Ok(Sender::H1(sender)),
                    None => {
                        Box::pin(async {
                            let connected = self.upstream.connect_target(&target, tls).await?;
                            handshake_h1(connected.stream)
                                .await
                                .map(Sender::H1)
                                .map_err(|e| self.handshake_error(&target, e))
                        })
                        .await
                    }
                }
            };
            match result {
                Ok(sender) => return Ok((sender, target, key)),
                Err(error) => {
                    tracing::debug!(%error, "upstream connection failed; trying another endpoint");
                    failed = Some((target, error));
                }
            }
        }
        Err(failed.map_or_else(|| self.upstream.no_endpoint(), |(_, e)| e))
    }

    fn handshake_error(&self, target: &Target, source: hyper::Error) -> ConnectError {
        ConnectError::Io {
            service: self.upstream.service().clone(),
            target: target.addr.clone(),
            source: std::io::Error::other(source),
        }
    }
}

async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => return tracing::debug!(%error, "upgrade failed"),
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let _ = super::tcp::proxy(&mut client, &mut upstream).await;
}

enum Sender {
    /// Held exclusively for one request, then returned to the pool.
    H1(http1::SendRequest<RequestBody>),
    /// Shared: every request opens a stream on it.
    H2(http2::SendRequest<RequestBody>),
}

async fn handshake_h1(io: UpstreamIo) -> Result<http1::SendRequest<RequestBody>, hyper::Error> {
    let (sender, connection) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream HTTP/1 connection closed with an error");
        }
    });
    Ok(sender)
}

async fn handshake_h2(io: UpstreamIo) -> Result<http2::SendRequest<RequestBody>, hyper::Error> {
    let (sender, connection) = http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection closed with an error");
        }
    });
    Ok(sender)
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with(GRPC_CONTENT_TYPE))
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated options of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE` survives
/// only as `trailers` (gRPC needs it).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is nothing to do: one pass over the names says so without hashing.
    let needs_work =
        headers.iter().any(|(name, value)| HOP_BY_HOP.contains(name) || (name == header::TE && value != "trailers"));
    if !needs_work {
        return;
    }
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Rewrites the request for the endpoint: hop-by-hop headers, Host / `:authority` (the
/// endpoint's DNS name for DNS endpoints, as Kuma's `autoHostRewrite`), URI form and version.
fn prepare_request(
    parts: &mut http::request::Parts,
    target: &Target,
    tls: bool,
    http2: bool,
    upgrade: bool,
) -> Result<(), &'static str> {
    let upgrade_value = upgrade.then(|| parts.headers.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(value) = upgrade_value {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
    let scheme = if tls { Scheme::HTTPS } else { Scheme::HTTP };
    if target.hostname.is_none() {
        // IP and unix endpoints keep the application's authority. Mostly the request already
        // has the form the endpoint gets; only the other cases are rebuilt below.
        let has_host = parts.headers.contains_key(header::HOST);
        if http2 && !has_host && parts.uri.scheme() == Some(&scheme) && parts.uri.authority().is_some() {
            parts.version = Version::HTTP_2;
            return Ok(());
        }
        if !http2 && has_host {
            if parts.uri.authority().is_some() {
                parts.uri =
                    Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
            }
            parts.version = Version::HTTP_11;
            return Ok(());
        }
    }
    let authority: Authority = match (&target.hostname, &target.addr) {
        (Some(name), crate::upstream::TargetAddr::Socket(addr)) => {
            let default_port = if tls { 443 } else { 80 };
            let text = if addr.port() == default_port { name.to_string() } else { format!("{name}:{}", addr.port()) };
            text.parse().map_err(|_| "endpoint name is not a valid authority")?
        }
        _ => match parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            Some(host) => host.parse().map_err(|_| "invalid Host header")?,
            None => parts.uri.authority().cloned().ok_or("request has no Host")?,
        },
    };
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if http2 {
        parts.headers.remove(header::HOST);
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| "invalid request URI")?;
        parts.version = Version::HTTP_2;
    } else {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| "invalid Host")?;
        parts.headers.insert(header::HOST, host);
        parts.uri = Uri::from(path);
        parts.version = Version::HTTP_11;
    }
    Ok(())
}

/// A local answer: HTTP status with a text body, or a gRPC trailers-only response.
fn failure(grpc: bool, failure: Failure, message: &'static str) -> Response<ProxyBody> {
    if grpc {
        let mut response = Response::new(ProxyBody::empty());
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
        h.insert("grpc-status", HeaderValue::from_static(failure.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(message));
        return response;
    }
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::from_static(message.as_bytes()))));
    *response.status_mut() = failure.http_status();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Gives an HTTP/1 connection back to the pool once its response has been read to the end.
struct PoolReturn {
    upstream: Arc<Upstream>,
    key: PoolKey,
    sender: http1::SendRequest<RequestBody>,
}

/// An access log record waiting for its response body to end.
struct PendingLog {
    log: AccessLog,
    record: Record,
    started: Instant,
    sent: Option<Arc<AtomicU64>>,
}

impl PendingLog {
    fn finish(mut self, outcome: &'static str, received: u64) {
        self.record.outcome = outcome;
        self.record.bytes_received = received;
        self.record.bytes_sent = self.sent.map_or(0, |s| s.load(Ordering::Relaxed));
        self.record.duration = self.started.elapsed();
        self.log.log(self.record);
    }
}

pub struct UpstreamBody {
    body: Incoming,
    pool_return: Option<PoolReturn>,
    /// The gRPC deadline: when it passes mid-response, the stream ends with DEADLINE_EXCEEDED.
    deadline: Option<Pin<Box<Sleep>>>,
    grpc: bool,
    /// No more frames will be given (the upstream's ended, or the deadline's trailers went out).
    finished: bool,
    /// For the access log: `ok` once every frame of the response has passed.
    outcome: &'static str,
    received: u64,
    counter: Counter,
    endpoint: TargetAddr,
    /// Boxed: only there when the access log is on.
    log: Option<Box<PendingLog>>,
    _active: ActiveGuard,
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.counter.inc_by(self.received);
        if let Some(mut pending) = self.log.take().map(|p| *p) {
            pending.record.endpoint = Some(self.endpoint.to_string());
            pending.finish(self.outcome, self.received);
        }
    }
}

impl UpstreamBody {
    fn return_to_pool(&mut self) {
        if let Some(r) = self.pool_return.take() {
            r.upstream.pool.put_h1(r.key, r.sender);
        }
    }
}

/// The response body the application reads.
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Local(Full<Bytes>),
}

impl ProxyBody {
    fn empty() -> Self {
        Self::Local(Full::new(Bytes::new()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let up = match self.get_mut() {
            Self::Local(full) => return Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            Self::Upstream(up) => up,
        };
        if up.finished {
            return Poll::Ready(None);
        }
        if let Some(deadline) = up.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() && up.grpc {
                up.finished = true;
                up.outcome = "deadline_exceeded";
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("4"));
                trailers.insert("grpc-message", HeaderValue::from_static("deadline exceeded"));
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        }
        let frame = Pin::new(&mut up.body).poll_frame(cx);
        // hyper stops polling once a body says it has ended, so the response is complete (and
        // the connection goes back to the pool) as soon as the last frame is out, not only on
        // the final `None`.
        let complete = match &frame {
            Poll::Ready(None) => {
                up.finished = true;
                true
            }
            Poll::Ready(Some(Ok(f))) => {
                up.received += f.data_ref().map_or(0, |d| d.len() as u64);
                up.body.is_end_stream()
            }
            _ => false,
        };
        if complete {
            up.outcome = "ok";
            up.return_to_pool();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(full) => full.is_end_stream(),
            Self::Upstream(up) => up.finished || up.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(full) => full.size_hint(),
            Self::Upstream(up) => up.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(addr: &str, hostname: Option<&str>) -> Target {
        Target {
            addr: crate::upstream::TargetAddr::Socket(addr.parse().unwrap()),
            priority: 0,
            hostname: hostname.map(Arc::from),
            health: Arc::default(),
        }
    }

    #[test]
    fn requests_take_the_form_the_endpoint_gets() {
        use Version as V;
        // (application's version, URI, Host; endpoint's DNS name, port, TLS, h2) → (URI, Host)
        type Case = (V, &'static str, Option<&'static str>, Option<&'static str>, u16, bool, bool);
        let cases: [(Case, (&str, Option<&str>)); 8] = [
            // HTTP/1 to an IP endpoint: the application's Host and path stay.
            (
                (V::HTTP_11, "/p?q=1", Some("app.example:8080"), None, 80, false, false),
                ("/p?q=1", Some("app.example:8080")),
            ),
            (
                (V::HTTP_11, "http://app.example/p", Some("app.example"), None, 80, false, false),
                ("/p", Some("app.example")),
            ),
            // h2 to an IP endpoint: the URI stays as it is when its scheme fits.
            ((V::HTTP_2, "http://10.0.0.1:81/M", None, None, 81, false, true), ("http://10.0.0.1:81/M", None)),
            ((V::HTTP_2, "http://10.0.0.1:81/M", None, None, 81, true, true), ("https://10.0.0.1:81/M", None)),
            // HTTP/1 from the application, h2 to the endpoint: Host becomes the authority.
            ((V::HTTP_11, "/M", Some("app.example"), None, 81, false, true), ("http://app.example/M", None)),
            // DNS endpoints: Host / :authority is the endpoint's name, with its port unless default.
            (
                (V::HTTP_11, "/p", Some("app.example"), Some("api.example.com"), 443, true, false),
                ("/p", Some("api.example.com")),
            ),
            (
                (V::HTTP_11, "/p", Some("app"), Some("api.example.com"), 8443, true, false),
                ("/p", Some("api.example.com:8443")),
            ),
            (
                (V::HTTP_2, "http://app.example/M", None, Some("grpc.example.com"), 443, true, true),
                ("https://grpc.example.com/M", None),
            ),
        ];
        for (i, ((version, uri, host, hostname, port, tls, http2), (want_uri, want_host))) in
            cases.into_iter().enumerate()
        {
            let mut builder = Request::builder().version(version).uri(uri);
            if let Some(host) = host {
                builder = builder.header(header::HOST, host);
            }
            let (mut parts, ()) = builder.body(()).unwrap().into_parts();
            prepare_request(&mut parts, &target(&format!("10.0.0.1:{port}"), hostname), tls, http2, false).unwrap();
            assert_eq!(parts.uri.to_string(), want_uri, "case {i}");
            assert_eq!(parts.headers.get(header::HOST).map(|h| h.to_str().unwrap()), want_host, "case {i}");
            assert_eq!(parts.version, if http2 { V::HTTP_2 } else { V::HTTP_11 }, "case {i}");
        }
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        for (v, want) in [
            ("100m", Some(Duration::from_millis(100))),
            ("2S", Some(Duration::from_secs(2))),
            ("1H", Some(Duration::from_secs(3600))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789S", None),
            ("m", None),
            ("10x", None),
        ] {
            h.insert("grpc-timeout", HeaderValue::from_static(v));
            assert_eq!(grpc_timeout(&h), want, "{v}");
        }
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "gRPC's headers pass as they are");
    }
}
