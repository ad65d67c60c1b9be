//! HTTP/1.1, HTTP/2 and gRPC: hyper's HTTP/1 server or [`server_h2`] facing the application
//! ([`serve`]) and pooled
//! client connections facing the endpoints ([`client`]: `upstream::h1` or hyper's for HTTP/1.1,
//! `upstream::h2` for HTTP/2). Each request passes the phases
//! of [`request`] (route → admit → forward → log) with one [`request::RequestCtx`]; bodies
//! stream through ([`body`]), nothing is collected.

mod body;
mod client;
mod forward;
mod grpc;
mod heads;
mod linger;
mod passthrough;
mod reply;
mod request;
mod resets;
mod retry;
mod rewind;
mod rewrite;
mod routing;
mod server_h2;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use h2::RecvStream;
use http::{Request, Response};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub use body::ProxyBody;
pub use grpc::grpc_timeout;
pub use passthrough::{PassthroughBody, PassthroughHttp};

use super::{ConnectionTimeouts, Connections, Proxy};
use crate::access_log::AccessLog;
use crate::listen::idle::{Activity, Tracked};
use crate::live::{Live, RouteKey};
use crate::sendmsg::SendmsgStream;
use crate::upstream::AppBody;
use heads::{Heads, Served};
use rewind::Rewind;

/// What an application connection may send: overridable by flags (`--max-request-headers`,
/// `--max-header-bytes`, `--max-concurrent-streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_concurrent_streams: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_headers: MAX_HEADERS,
            max_header_bytes: MAX_HEADER_BYTES,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
        }
    }
}

/// Most request headers accepted from the application (HTTP/1).
pub const MAX_HEADERS: usize = 100;
/// Largest request head (HTTP/1) and header list (HTTP/2) accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per application connection (Envoy's default, 100): each may need
/// an upstream HTTP/1 connection of its own.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Per-connection context. Each request finds its service in the configuration current when
/// it arrives, so a reload applies to open keep-alive connections too.
pub struct HttpProxy {
    live: Arc<Live>,
    key: RouteKey,
    /// The service the connection was accepted for, and its protocol: what a request's log line
    /// names should a reload remove the service while the connection stays open.
    accepted_for: (Arc<str>, &'static str),
    peer: SocketAddr,
    /// Time allowed from the end of the request body until the response headers arrive
    /// (`--request-timeout`; `None`: no limit).
    request_timeout: Option<Duration>,
    access_log: Option<AccessLog>,
    /// Upgraded tunnels count as open connections, so a drain waits for them.
    connections: Arc<Connections>,
    /// `Upgrade` protocols passed through as tunnels (`--upgrade-protocols`).
    upgrades: Arc<[String]>,
    /// The connection's timeouts; its `stream_idle` bounds its silence with a request open, the
    /// longest of the service's and its routes' ([`HttpProxy::widen_for_route`]).
    timeouts: ConnectionTimeouts,
    /// A request's stream idle timeout when neither its route nor its service sets one: the
    /// flag's (`--stream-idle-timeout`; zero: off).
    stream_idle: Duration,
    limits: HttpLimits,
    /// Streams cancelled before their answer (rapid reset).
    resets: resets::ResetBudget,
}

impl HttpProxy {
    pub fn new(proxy: &Proxy, key: RouteKey, accepted_for: (Arc<str>, &'static str), peer: SocketAddr) -> Self {
        Self {
            live: proxy.live.clone(),
            key,
            accepted_for,
            peer,
            request_timeout: proxy.settings.request_timeout,
            access_log: proxy.access_log.clone(),
            connections: proxy.connections.clone(),
            upgrades: proxy.settings.upgrade_protocols.clone(),
            timeouts: proxy.settings.timeouts,
            stream_idle: proxy.settings.timeouts.stream_idle,
            limits: proxy.settings.http_limits,
            resets: resets::ResetBudget::default(),
        }
    }

    /// Time to receive a request head (`Duration::ZERO`: no limit but the idle timeout).
    pub fn set_header_read_timeout(&mut self, timeout: Duration) {
        self.timeouts.set_header_read(timeout);
    }

    /// The service's stream idle timeout (zero: off), for its connections (its requests read
    /// it from the service's policy as each arrives).
    pub fn set_stream_idle_timeout(&mut self, timeout: Duration) {
        self.timeouts.stream_idle = timeout;
    }

    /// A route of the service sets its requests' stream idle timeout (zero: off): the
    /// connection's silence bound with a request open never cuts one sooner.
    pub fn widen_for_route(&mut self, stream_idle: Duration) {
        let current = self.timeouts.stream_idle;
        if !current.is_zero() {
            self.timeouts.stream_idle = if stream_idle.is_zero() { stream_idle } else { current.max(stream_idle) };
        }
    }
}

/// What answers the requests of one application connection: a service's [`HttpProxy`], or
/// passthrough's [`PassthroughHttp`].
trait Handler: Send + Sync + 'static {
    /// One request's phases, to its response head.
    fn phases(&self, req: Request<AppBody>) -> impl Future<Output = Response<ProxyBody>> + Send + '_;
    fn resets(&self) -> &resets::ResetBudget;
    fn peer(&self) -> SocketAddr;
    fn timeouts(&self) -> ConnectionTimeouts;
    fn limits(&self) -> HttpLimits;
}

impl Handler for HttpProxy {
    fn phases(&self, req: Request<AppBody>) -> impl Future<Output = Response<ProxyBody>> + Send + '_ {
        HttpProxy::phases(self, req)
    }

    fn resets(&self) -> &resets::ResetBudget {
        &self.resets
    }

    fn peer(&self) -> SocketAddr {
        self.peer
    }

    fn timeouts(&self) -> ConnectionTimeouts {
        self.timeouts
    }

    fn limits(&self) -> HttpLimits {
        self.limits
    }
}

/// Serves one application connection of a service until it closes, or until a drain asks it
/// to finish its requests and close. Whatever the service's protocol, the connection may speak
/// HTTP/1.1 or HTTP/2 with prior knowledge (as with Envoy's `codec_type: AUTO`), told apart by
/// its first bytes.
pub async fn serve(client: TcpStream, proxy: HttpProxy, draining: watch::Receiver<bool>) {
    serve_with(client, proxy, None, draining).await;
}

/// Serves a passthrough connection that speaks HTTP (`http2`: with prior knowledge).
pub async fn serve_passthrough(
    client: TcpStream,
    passthrough: PassthroughHttp,
    http2: bool,
    draining: watch::Receiver<bool>,
) {
    serve_with(client, passthrough, Some(http2), draining).await;
}

/// `http2`: whether the connection speaks HTTP/2, when known already (else its first bytes tell).
async fn serve_with<H: Handler>(
    client: TcpStream,
    handler: H,
    http2: Option<bool>,
    mut draining: watch::Receiver<bool>,
) {
    let (timeouts, limits) = (handler.timeouts(), handler.limits());
    let proxy = Arc::new(handler);
    let watched = proxy.clone();
    let peer = proxy.peer();
    let heads = Heads::new(http2 == Some(true));
    let watched_heads = heads.clone();
    let activity = Activity::new();
    let client = Tracked::new(SendmsgStream(client), activity.clone());
    // For a connection that drains: still held to its idle and head deadlines.
    let on_drain = Draining { activity: activity.clone(), heads: watched_heads.clone(), timeouts };
    let mut io = Rewind::new(linger::Lingering::new(client, watched_heads.clone()));
    // What ends a connection early is watched by a task of its own, so the connection's task,
    // woken several times per request, polls one oneshot instead of a timer and two notifiers.
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(async move {
        let why = tokio::select! {
            () = watched_heads.idle(&activity, timeouts.idle, timeouts.idle_with_requests()) => Stop::Idle,
            () = drain_requested(&mut draining) => Stop::Drain,
            () = watched.resets().exceeded() => Stop::RapidReset,
            () = watched_heads.overdue(timeouts.header_read) => Stop::HeadOverdue,
        };
        let _ = stop_tx.send(why);
    });
    let ended = async {
        // The first bytes tell HTTP/2 (no head deadline) from HTTP/1.
        let http2 = match http2 {
            Some(http2) => http2,
            None => tokio::select! {
                http2 = io.is_http2() => match http2 {
                    Ok(http2) => http2,
                    Err(error) => return Some(Err(error.to_string())),
                },
                Ok(why) = &mut stop => return why.closed_at_once(),
            },
        };
        heads.decide(http2);
        if http2 {
            let new_stream = |request: Request<RecvStream>, respond| {
                let (proxy, heads) = (proxy.clone(), heads.clone());
                server_h2::serve_stream(respond, move || answer_http2(proxy, heads, request))
            };
            let mut connection = server_h2::Connection::new(io, limits, new_stream);
            let ended = serve_until_stopped(&mut connection, &mut stop, &on_drain, peer).await;
            // The streams the connection's end reset end at their next poll.
            connection.finish().await;
            ended
        } else {
            let svc = service_fn(move |req: Request<Incoming>| {
                // Kept this small, the closure is inlined into hyper's caller and its future built in
                // place: more work here cost a copy of the whole future (5.6 KB) per request.
                let (proxy, heads) = (proxy.clone(), heads.clone());
                async move {
                    let open = heads.open();
                    let watch = if req.body().is_end_stream() { None } else { heads.open_body() };
                    let req = req.map(|body| AppBody::new(body, watch));
                    // A request dropped before its answer counts against the connection's reset
                    // budget.
                    let stream = proxy.resets().stream(false);
                    let response = proxy.phases(req).await;
                    stream.answered();
                    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                        heads.upgraded(); // the connection's shutdown is now the tunnel's (`linger`)
                    }
                    Ok::<_, Infallible>(response.map(|body| Served { body, _open: open }))
                }
            });
            let mut connection = hyper::server::conn::http1::Builder::new()
                .max_headers(limits.max_headers)
                .max_buf_size(limits.max_header_bytes)
                .preserve_header_case(false)
                .timer(TokioTimer::new())
                // The connection's watcher keeps it instead (see `heads`).
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            serve_until_stopped(&mut connection, &mut stop, &on_drain, peer).await
        }
    }
    .await;
    watcher.abort();
    if let Some(Err(error)) = ended {
        tracing::debug!(%error, "application connection ended with an error");
    }
}

/// One HTTP/2 request's phases, to its response head: what [`server_h2::serve_stream`] runs.
async fn answer_http2<H: Handler>(proxy: Arc<H>, heads: Arc<Heads>, request: Request<RecvStream>) -> Response<Served> {
    let open = heads.open();
    let content_length = crate::upstream::h2::content_length(request.headers());
    let request = request.map(|recv| AppBody::http2(recv, content_length));
    // A stream reset before its answer (this future dropped) counts against the connection's
    // reset budget.
    let stream = proxy.resets().stream(true);
    let response = proxy.phases(request).await;
    stream.answered();
    response.map(|body| Served { body, _open: open })
}

/// A connection's server: hyper's HTTP/1 one or [`server_h2`]'s.
trait AppConnection: Future<Output = Result<(), Self::Error>> + Unpin {
    type Error: std::fmt::Display;
    /// Finish what is open, take nothing new (GOAWAY, `Connection: close`).
    fn graceful_shutdown(&mut self);
}

impl<I, S> AppConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Served> + Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;

    fn graceful_shutdown(&mut self) {
        Pin::new(self).graceful_shutdown();
    }
}

impl<S, N, F> AppConnection for server_h2::Connection<S, N, F>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    N: FnMut(Request<RecvStream>, h2::server::SendResponse<bytes::Bytes>) -> F + Unpin,
    F: Future<Output = ()>,
{
    type Error = h2::Error;

    fn graceful_shutdown(&mut self) {
        server_h2::Connection::graceful_shutdown(self);
    }
}

/// What still ends a draining connection: its idle and head deadlines.
struct Draining {
    activity: Arc<Activity>,
    heads: Arc<Heads>,
    timeouts: ConnectionTimeouts,
}

/// Serves `connection` until it ends, or until the watcher says why it must stop; `None`:
/// closed by the proxy.
async fn serve_until_stopped<C: AppConnection>(
    connection: &mut C,
    stop: &mut tokio::sync::oneshot::Receiver<Stop>,
    draining: &Draining,
    peer: SocketAddr,
) -> Option<Result<(), String>> {
    let (heads, timeouts) = (&draining.heads, draining.timeouts);
    let result = tokio::select! {
        result = &mut *connection => result,
        Ok(why) = stop => {
            match why {
                Stop::Idle | Stop::HeadOverdue => return why.closed_at_once(),
                Stop::Drain => {}
                Stop::RapidReset => {
                    tracing::warn!(peer = %peer, "application connection cancels most of its streams (rapid reset); sending GOAWAY and closing");
                    // h2 takes new streams until the client answers the GOAWAY's PING, which an
                    // attacker need not do: the connection gets a moment to send the GOAWAY and
                    // finish what is in flight, then is closed (Envoy closes it at once).
                    connection.graceful_shutdown();
                    let _ = tokio::time::timeout(RAPID_RESET_GRACE, &mut *connection).await;
                    return None;
                }
            }
            connection.graceful_shutdown();
            tokio::select! {
                result = &mut *connection => result,
                () = heads.idle(&draining.activity, timeouts.idle, timeouts.idle_with_requests()) => return None,
                () = heads.overdue(timeouts.header_read) => return None,
            }
        }
    };
    Some(result.map_err(|error| error.to_string()))
}

/// How long a connection past its rapid-reset budget has to send its GOAWAY and finish its
/// streams before it is closed.
const RAPID_RESET_GRACE: Duration = Duration::from_secs(1);

/// Why a connection is ended before its client ends it.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Nothing moved for the idle timeout: closed at once.
    Idle,
    /// No HTTP/1 request head within the header-read timeout: closed at once.
    HeadOverdue,
    /// The proxy drains: GOAWAY / `Connection: close`, in-flight requests finish.
    Drain,
    /// Too many streams cancelled before their answer: GOAWAY, and closed a moment later.
    RapidReset,
}

impl Stop {
    /// Closes a connection at once for its idle and head deadlines, and for a drain before the
    /// connection said which protocol it speaks: `None`, closed by the proxy.
    fn closed_at_once<T>(self) -> Option<T> {
        match self {
            Self::Idle => tracing::debug!("application connection idle past the idle timeout; closing"),
            Self::HeadOverdue => tracing::debug!("no HTTP/1 request head within the header-read timeout; closing"),
            Self::Drain | Self::RapidReset => {}
        }
        None
    }
}

async fn drain_requested(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await; // the server is gone without draining: run on
    }
}
