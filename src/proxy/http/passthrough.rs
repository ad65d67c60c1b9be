//! Passthrough HTTP (MeshPassthrough `Matched` with `http`, `http2` or `grpc` domain rules):
//! each request is allowed by its Host / `:authority` and the original destination's port,
//! then sent to an address the allowed name resolves to (pinned, see
//! [`crate::proxy::passthrough`]) in the HTTP version the application speaks. A request no rule
//! allows gets 503, as from Kuma's sidecar. Connections to destinations are kept for the
//! application connection's later requests.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};

use super::body::ProxyBody;
use super::grpc::is_grpc;
use super::reply::{self, Failure};
use super::request::{capture_request, capture_response};
use super::resets::ResetBudget;
use super::rewrite::{self, strip_hop_by_hop};
use super::{ConnectionTimeouts, Handler};
use crate::access_log::{Logs, Record};
use crate::metrics::metrics;
use crate::proxy::{passthrough, Proxy};
use crate::upstream::{AppBody, AppBodyError, TargetAddr, UpstreamStream};

/// Kuma's answer when no MeshPassthrough domain matches, with our name in place of Kuma's.
pub(super) const NO_MATCH: &str = "This response comes from mesh-egress. No routes matched this domain - check configuration of your MeshPassthrough policy.\n";
const UNRESOLVED: &str =
    "mesh-egress: the MeshPassthrough rule allows this domain, but it does not resolve to a usable address\n";

/// A passthrough request's access-log line, written when it is dropped: with its response body
/// ([`PassthroughBody`]), at once for the proxy's own reply, or before the response head (the
/// application went away: `cancelled`).
struct PendingLine {
    logs: Logs,
    record: Option<Record>,
    started: std::time::Instant,
    /// Request body bytes, counted as they pass ([`CountedBody`]).
    sent: Arc<AtomicU64>,
    received: u64,
    outcome: &'static str,
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.outcome = self.outcome;
            record.bytes_sent = self.sent.load(Ordering::Relaxed);
            record.bytes_received = self.received;
            record.duration = self.started.elapsed();
            self.logs.log(record);
        }
    }
}

/// A passthrough request body on its way to the destination, its bytes counted when the access
/// log is on.
pub(super) struct CountedBody {
    inner: AppBody,
    sent: Option<Arc<AtomicU64>>,
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let (Some(sent), Some(Ok(frame))) = (&self.sent, &frame) {
            sent.fetch_add(frame.data_ref().map_or(0, |d| d.len() as u64), Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A passthrough response body as the destination sends it. With the access log on, it is
/// counted and carries its request's line, written when it is dropped, with a service's
/// outcomes: `ok` once every frame has passed (or there was none), `upstream_reset` when the
/// destination cut it, `aborted` when the application went away first.
pub struct PassthroughBody {
    body: Incoming,
    line: Option<Box<PendingLine>>,
}

impl Body for PassthroughBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(line) = this.line.as_mut() {
            match &frame {
                None => line.outcome = "ok",
                Some(Err(_)) => line.outcome = "upstream_reset",
                Some(Ok(frame)) => {
                    line.received += frame.data_ref().map_or(0, |d| d.len() as u64);
                    // hyper stops polling once a body says it has ended, and after trailers
                    // (which an HTTP/1 body does not count as its end).
                    if frame.is_trailers() || this.body.is_end_stream() {
                        line.outcome = "ok";
                    }
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Destination connections one application connection keeps open.
const MAX_KEPT: usize = 8;

enum Conn {
    H1(http1::SendRequest<CountedBody>),
    H2(http2::SendRequest<CountedBody>),
}

/// Why a passthrough request got no response from its destination.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("connect to {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error(transparent)]
    Exchange(hyper::Error),
}

impl SendError {
    /// As a service's: no connection UF, a connection that ended before the response UC, a
    /// stream the destination reset UR, a response that broke the protocol UPE (502), the
    /// application's own malformed body 400 (DPE).
    fn failure(&self) -> Failure {
        match self {
            Self::ConnectTimeout(_) | Self::Connect(..) | Self::Handshake(..) => Failure::UpstreamFailed,
            Self::Exchange(error) if super::forward::application_body_failed(error) => Failure::BadRequest,
            Self::Exchange(error) if super::forward::h2_reset_by_peer(error) => Failure::StreamReset,
            Self::Exchange(error) if super::forward::hyper_protocol_error(error) => Failure::UpstreamProtocolError,
            Self::Exchange(_) => Failure::UpstreamReset,
        }
    }
}

/// One passthrough application connection that speaks HTTP.
pub struct PassthroughHttp {
    proxy: Arc<Proxy>,
    peer: SocketAddr,
    /// The original destination: its port is what rules match, its address what the
    /// application dialled.
    dst: SocketAddr,
    /// Open connections to destinations, by address.
    conns: Mutex<Vec<(SocketAddr, Conn)>>,
    resets: ResetBudget,
}

impl PassthroughHttp {
    pub fn new(proxy: &Arc<Proxy>, peer: SocketAddr, dst: SocketAddr) -> Self {
        Self { proxy: proxy.clone(), peer, dst, conns: Mutex::default(), resets: ResetBudget::default() }
    }

    /// The request's phases, and its line in the process's access log (service `passthrough`,
    /// as its TCP connections) and the mesh's MeshAccessLog, written as its response ends.
    async fn phases(&self, req: Request<AppBody>) -> Response<ProxyBody> {
        let logs = self.proxy.passthrough_logs();
        if !logs.is_on() {
            return self.answer(req, &mut None, None).await;
        }
        let protocol = if req.version() == Version::HTTP_2 { "http2" } else { "http" };
        let service = Arc::from(passthrough::PASSTHROUGH_SERVICE);
        let headers = logs.service.as_ref().map(|service| capture_request(&req, service));
        let record = Record { headers, ..Record::http(service, protocol, self.peer, &req) };
        let mut line = PendingLine {
            logs,
            record: Some(record),
            started: std::time::Instant::now(),
            sent: Arc::default(),
            received: 0,
            outcome: "cancelled",
        };
        let mut target = None;
        let mut response = self.answer(req, &mut target, Some(line.sent.clone())).await;
        if let Some(record) = line.record.as_mut() {
            record.time = std::time::SystemTime::now();
            record.status = Some(response.status().as_u16());
            record.endpoint = target.map(|t| t.to_string());
            if let Some(service) = line.logs.service.as_ref() {
                capture_response(record, service, &response);
            }
        }
        match response.body_mut() {
            ProxyBody::Passthrough(body) => {
                // A body that has ended already (HEAD, 204, 304, no content) is never polled.
                line.outcome = if body.body.is_end_stream() { "ok" } else { "aborted" };
                body.line = Some(Box::new(line));
            }
            ProxyBody::Local(_, failure) => {
                line.outcome = if failure.is_some() { "local_reply" } else { "ok" };
                if let (Some(record), Some(failure)) = (line.record.as_mut(), failure) {
                    record.flag = Some(failure.flag());
                }
            }
            ProxyBody::Upstream(_) => line.outcome = "ok",
        }
        response
    }

    /// Answers the request; `target` is the destination once one is chosen.
    async fn answer(
        &self,
        req: Request<AppBody>,
        chosen: &mut Option<SocketAddr>,
        sent: Option<Arc<AtomicU64>>,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let (mut parts, mut body) = req.into_parts();
        if let Err(refusal) = rewrite::check(&parts) {
            return reply::refused(grpc, refusal);
        }
        let authority = parts
            .uri
            .authority()
            .cloned()
            .or_else(|| parts.headers.get(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok()));
        let port = self.dst.port();
        let plan = self.proxy.live.load().catalog.passthrough().clone();
        // The authority decided on is the only one the destination sees (below): no userinfo,
        // and a port, when given, that is the destination's.
        let allowed = authority.as_ref().filter(|a| {
            // A port that does not parse (`:99999`) is no port at all to `port()`: refuse it.
            let port_ok = match a.port() {
                Some(p) => p.as_u16() == port,
                None => a.as_str() == a.host(),
            };
            !a.as_str().contains('@') && port_ok && plan.allows_host(a.host().trim_matches(['[', ']']), port)
        });
        let Some(authority) = allowed else {
            metrics().passthrough("request", false, "no_match");
            let host = authority.as_ref().map_or("(none)", Authority::as_str);
            tracing::info!(peer = %self.peer, dst = %self.dst, host, "passthrough request denied: no MeshPassthrough rule matches this domain");
            return reply::local_reply(grpc, Failure::NoRoute, NO_MATCH);
        };
        let target = match passthrough::pin(&self.proxy, authority.host(), self.dst).await {
            Ok(target) => target,
            Err(why) => {
                metrics().passthrough("request", false, "unresolved");
                tracing::info!(peer = %self.peer, host = authority.host(), "passthrough request denied: {why}");
                return reply::local_reply(grpc, Failure::DnsFailed, UNRESOLVED);
            }
        };
        *chosen = Some(target);
        metrics().passthrough("request", true, "host");
        strip_hop_by_hop(&mut parts.headers);
        let http2 = parts.version == Version::HTTP_2;
        // The destination sees exactly the authority that was allowed: a Host that disagrees
        // with an absolute URI (HTTP/1) or with `:authority` (HTTP/2) must not ride along to a
        // shared server (domain fronting).
        parts.headers.remove(header::HOST);
        if !http2 {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
            if parts.uri.authority().is_some() {
                parts.uri =
                    Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
            }
        }
        // `--request-timeout`, counted as a service's request timeout is (Envoy's 15 s route
        // timeout on Kuma's passthrough routes).
        // With it off, a body still to come is bounded by the stream idle timeout.
        let limit = self.proxy.settings.request_timeout;
        let stall = Some(self.proxy.settings.timeouts.stream_idle).filter(|d| !d.is_zero());
        let body_end = (limit.is_some() || stall.is_some()).then(|| body.end_watch()).flatten();
        let body = CountedBody { inner: body, sent };
        let send = std::pin::pin!(self.send(target, http2, Request::from_parts(parts, body)));
        let sent = match (limit, &body_end) {
            (None, None) => send.await,
            _ => tokio::select! {
                sent = send => sent,
                why = super::forward::timed_out(body_end.as_deref(), limit, stall) => {
                    tracing::debug!(peer = %self.peer, %target, ?why, "passthrough request timed out");
                    return why.reply(grpc);
                }
            },
        };
        match sent {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, ProxyBody::Passthrough(PassthroughBody { body, line: None }))
            }
            Err(error) => {
                tracing::debug!(peer = %self.peer, %target, %error, "passthrough request failed");
                match error.failure() {
                    Failure::BadRequest => reply::local_reply(grpc, Failure::BadRequest, reply::BAD_REQUEST_BODY),
                    failure => reply::upstream_failed(grpc, failure),
                }
            }
        }
    }

    /// Sends on a kept connection to `target`, else on a new one.
    async fn send(
        &self,
        target: SocketAddr,
        http2: bool,
        req: Request<CountedBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let kept = {
            let mut conns = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match conns.iter().position(|(addr, c)| *addr == target && matches!(c, Conn::H2(_)) == http2) {
                // HTTP/2 is shared; an HTTP/1 connection is taken for the request, and a
                // closed HTTP/2 one dropped.
                Some(i) => match &conns[i].1 {
                    Conn::H2(s) if !s.is_closed() => Some(Conn::H2(s.clone())),
                    _ => Some(conns.swap_remove(i).1),
                },
                None => None,
            }
        };
        let reusable = match kept {
            Some(Conn::H1(mut s)) => s.ready().await.is_ok().then_some(Conn::H1(s)),
            Some(Conn::H2(s)) => (!s.is_closed()).then_some(Conn::H2(s)),
            None => None,
        };
        let mut conn = match reusable {
            Some(conn) => conn,
            None => self.connect(target, http2).await?,
        };
        let response = match &mut conn {
            Conn::H1(s) => s.send_request(req).await,
            Conn::H2(s) => s.send_request(req).await,
        };
        if response.is_ok() {
            let mut conns = self.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let known =
                matches!(conn, Conn::H2(_)) && conns.iter().any(|(a, c)| *a == target && matches!(c, Conn::H2(_)));
            if !known {
                // A client that names many destinations keeps only the latest few open.
                if conns.len() >= MAX_KEPT {
                    conns.remove(0);
                }
                conns.push((target, conn));
            }
        }
        response.map_err(SendError::Exchange)
    }

    async fn connect(&self, target: SocketAddr, http2: bool) -> Result<Conn, SendError> {
        let addr = TargetAddr::Socket(target);
        let stream = tokio::time::timeout(self.proxy.settings.connect_timeout, UpstreamStream::connect(&addr))
            .await
            .map_err(|_| SendError::ConnectTimeout(target))?
            .map_err(|e| SendError::Connect(target, e))?;
        let handshake = |e| SendError::Handshake(target, e);
        Ok(if http2 {
            Conn::H2(super::client::handshake_h2(stream, ()).await.map_err(handshake)?)
        } else {
            Conn::H1(super::client::handshake_h1(stream, ()).await.map_err(handshake)?)
        })
    }
}

impl Handler for PassthroughHttp {
    async fn phases(&self, req: Request<AppBody>) -> Response<ProxyBody> {
        PassthroughHttp::phases(self, req).await
    }

    fn resets(&self) -> &ResetBudget {
        &self.resets
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn timeouts(&self) -> ConnectionTimeouts {
        self.proxy.settings.timeouts
    }

    fn limits(&self) -> super::HttpLimits {
        self.proxy.settings.http_limits
    }
}
