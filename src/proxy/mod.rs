//! What happens to an accepted connection, in named phases with one context each:
//!
//! - per connection ([`conn::ConnCtx`]): **classify** (listener kind, original destination) →
//!   **route** (the service in the snapshot current now; else [`passthrough`]) → **admit**
//!   ([`admit`]: broken, forbidden) → **forward** ([`tcp`]: connect, copy) → **log**;
//! - per HTTP request ([`http`]): the same route → admit → forward → log, with the configuration
//!   current when each request arrives.
//!
//! A policy joins by adding to one phase: admission checks to [`admit`], connect and retry
//! behaviour to the forward phases, records to the log phase.

pub mod admit;
pub mod conn;
pub mod copy;
pub mod http;
pub(crate) mod passthrough;
mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

pub use conn::Connections;

use crate::access_log::{AccessLog, Logs};
use crate::catalog::Protocol;
use crate::listen::{Accept, ListenerKind, OriginalDst};
use crate::live::{Live, RouteKey};
use conn::{ConnCtx, GaugeGuard};

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Send transparent traffic for unknown destinations where it was going.
    pub passthrough: bool,
    pub connect_timeout: Duration,
    /// HTTP: time allowed until the response headers arrive.
    pub request_timeout: Option<Duration>,
    /// HTTP/1 `Upgrade` protocols passed through as tunnels.
    pub upgrade_protocols: Arc<[String]>,
    pub timeouts: ConnectionTimeouts,
    pub http_limits: http::HttpLimits,
    /// The VIP range: passthrough never goes there.
    pub vip_cidr: Option<ipnet::IpNet>,
    /// The admin, DNS and transparent addresses: passthrough never goes there either.
    pub own_listeners: Vec<SocketAddr>,
}

/// How long application connections may go quiet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// No byte either way for this long closes an application connection: TCP flows, tunnels,
    /// passthrough; an HTTP connection, no request open and no byte for this long (Kuma's
    /// MeshTimeout `idleTimeout` default, 1 h).
    pub idle: Duration,
    /// Once one side of a TCP flow has closed, the other has this long to finish.
    pub half_close: Duration,
    /// HTTP/1: time to receive a request's head; also how long a keep-alive connection waits
    /// for its next request.
    pub header_read: Duration,
    /// HTTP: a response body without a frame for this long is cut (Kuma's MeshTimeout
    /// `streamIdleTimeout` default, 30 min; zero: off), counted from the response head. The
    /// timer is armed only once a body has to wait.
    pub stream_idle: Duration,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(3600),
            half_close: Duration::from_secs(60),
            header_read: Duration::from_secs(30),
            stream_idle: Duration::from_secs(30 * 60),
        }
    }
}

impl ConnectionTimeouts {
    pub fn flow(&self) -> copy::FlowTimeouts {
        copy::FlowTimeouts { idle: Some(self.idle), half_close: Some(self.half_close) }
    }

    /// How long an HTTP connection with a request open may go without a byte either way: the
    /// longer of the idle and stream idle timeouts (a long poll lives as long as a stream may
    /// be silent); for ever when the stream idle timeout is off, as in Envoy.
    pub fn idle_with_requests(&self) -> Duration {
        if self.stream_idle.is_zero() {
            Duration::MAX
        } else {
            self.idle.max(self.stream_idle)
        }
    }

    /// Sets the time to receive a request head; zero (`--header-read-timeout 0`, MeshTimeout
    /// `requestHeadersTimeout: 0s`): no limit but the idle timeout.
    pub fn set_header_read(&mut self, timeout: Duration) {
        self.header_read = if timeout.is_zero() { self.idle } else { timeout };
    }
}

pub struct Proxy {
    pub live: Arc<Live>,
    pub settings: ProxySettings,
    pub original_dst: Arc<dyn OriginalDst>,
    pub access_log: Option<AccessLog>,
    pub connections: Arc<Connections>,
    /// Becomes `true` when the proxy drains: HTTP connections finish their requests and close.
    pub draining: watch::Receiver<bool>,
    /// The upstream defaults; passthrough resolves allowed domains with their resolver.
    pub upstream_settings: Arc<crate::upstream::Settings>,
}

impl Accept for Proxy {
    async fn accept(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, local: SocketAddr, kind: ListenerKind) {
        self.handle(stream, peer, local, kind).await;
    }
}

impl Proxy {
    pub async fn handle(
        self: &Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        kind: ListenerKind,
    ) {
        let _open = self.connections.open();
        let _ = client.set_nodelay(true);
        let Some(key) = self.classify(&client, peer, local, kind) else { return };
        let snapshot = self.live.load();
        let Some(route) = snapshot.route(key) else {
            return match (kind, key) {
                (ListenerKind::Transparent, RouteKey::Vip(dst)) => {
                    if let Some(why) = passthrough::refused(&self.settings, &snapshot, dst) {
                        return tracing::warn!(%peer, %dst, "passthrough refused: the destination is {why}");
                    }
                    drop(snapshot);
                    Box::pin(passthrough::forward(self, client, peer, dst)).await
                }
                _ => tracing::debug!(%peer, listener = %local, %kind, "no service for this address; closing"),
            };
        };
        // MeshTCPRoute: the connection goes to one of the route's backends, as bytes whatever the
        // protocols (Kuma's tcp_proxy: on an HTTP-based service a MeshTCPRoute applies only
        // when no MeshHTTPRoute does).
        let tcp_routed = route.service.routes.as_ref().is_some_and(|r| r.tcp.is_some());
        let route = match route.service.routes.as_ref().and_then(|r| r.tcp.as_ref()) {
            None => route,
            Some(tcp) => {
                match crate::policy::routes::pick(&tcp.backends).and_then(|(_, b)| snapshot.route_by_index(b.service?))
                {
                    Some(target) => {
                        crate::metrics::metrics().route_request(&route.service.key(), &tcp.name, &target.service.key());
                        target
                    }
                    None => {
                        return tracing::warn!(%peer, service = %route.service.key(), "no backend of the MeshTCPRoute can take traffic; closing")
                    }
                }
            }
        };
        drop(snapshot);
        route.upstream.metrics.connections.inc();
        let _active = GaugeGuard::inc(&route.upstream.metrics.connections_active);
        // HTTP admits and routes each request with the configuration current when it arrives.
        let policy = route.policy.clone();
        if route.service.protocol != Protocol::Tcp && !tcp_routed {
            let protocol = route.service.protocol;
            let accepted_for = (route.upstream.service().clone(), protocol.as_str());
            let mut proxy = http::HttpProxy::new(self, key, accepted_for, peer);
            // MeshTimeout `http.requestHeadersTimeout` (0: off) for this connection's requests.
            if let Some(t) = policy.timeouts.request_headers {
                proxy.set_header_read_timeout(t);
            }
            // MeshTimeout `http.streamIdleTimeout`: also how long the connection may be silent
            // with a request open, for the longest of the service's routes' too.
            if let Some(t) = policy.timeouts.stream_idle {
                proxy.set_stream_idle_timeout(t);
            }
            let rules = route.service.routes.as_ref().and_then(|r| r.http.as_ref()).map_or(&[][..], |t| &t.rules);
            for rule in rules {
                let level = rule.policies.as_ref().and_then(|l| l.timeouts.as_ref());
                if let Some(t) = level.and_then(|t| t.stream_idle) {
                    proxy.widen_for_route(t);
                }
            }
            // Each request finds its route again: the connection keeps none, so a reload that
            // drops or replaces the service frees the old one (and stops its health checks).
            drop((route, policy));
            // Boxed: the HTTP machinery would otherwise make every TCP connection's task as big.
            return Box::pin(http::serve(client, proxy, self.draining.clone())).await;
        }
        let mut ctx = ConnCtx::new(kind, peer, route);
        let mut flow = self.settings.timeouts.flow();
        flow.idle = crate::policy::runtime::timeout_over(policy.timeouts.idle, flow.idle);
        let logs = Logs { global: self.access_log.clone(), service: policy.access_log.clone() };
        drop(policy);
        match admit::admit(&ctx.route.service) {
            Ok(()) => tcp::forward(&mut ctx, &mut client, flow).await,
            Err(denial) => ctx.outcome = denial.outcome(),
        }
        if logs.is_on() {
            logs.log(ctx.record());
        }
    }

    /// The classify phase: how the connection names its service.
    fn classify(
        &self,
        client: &TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        kind: ListenerKind,
    ) -> Option<RouteKey> {
        match kind {
            ListenerKind::Outbound => Some(RouteKey::Outbound(local)),
            ListenerKind::Vip => Some(RouteKey::Vip(local)),
            ListenerKind::Transparent => match self.original_dst.original_dst(client) {
                Ok(dst) if dst != local => Some(RouteKey::Vip(dst)),
                Ok(_) => {
                    tracing::debug!(%peer, "connection to the transparent listener itself; closing");
                    None
                }
                Err(error) => {
                    tracing::warn!(%peer, %error, "no original destination; closing");
                    None
                }
            },
        }
    }
}
