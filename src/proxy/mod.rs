//! What happens to an accepted connection: find its service, check access, pick an endpoint,
//! and move the traffic.

pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

use crate::access_log::{AccessLog, Record};
use crate::catalog::{Access, Protocol};
use crate::listen::{ListenerKind, OriginalDst};
use crate::live::{Live, RouteKey};
use crate::metrics::metrics;
use crate::tls;
use crate::upstream::{Connected, TargetAddr, UpstreamStream};

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Send transparent traffic for unknown destinations where it was going.
    pub passthrough: bool,
    pub connect_timeout: Duration,
    /// HTTP: time allowed until the response headers arrive.
    pub request_timeout: Option<Duration>,
}

/// Counts open application connections so a drain can wait for them.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    closed: Notify,
}

impl Connections {
    fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
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
}

impl crate::listen::Accept for Proxy {
    fn accept(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        kind: ListenerKind,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move { self.handle(stream, peer, local, kind).await }
    }
}

impl Proxy {
    pub async fn handle(&self, mut client: TcpStream, peer: SocketAddr, local: SocketAddr, kind: ListenerKind) {
        let _open = self.connections.open();
        let _ = client.set_nodelay(true);
        let key = match kind {
            ListenerKind::Outbound => RouteKey::Outbound(local),
            ListenerKind::Vip => RouteKey::Vip(local),
            ListenerKind::Transparent => match self.original_dst.original_dst(&client) {
                Ok(dst) if dst != local => RouteKey::Vip(dst),
                Ok(_) => return tracing::debug!(%peer, "connection to the transparent listener itself; closing"),
                Err(error) => return tracing::warn!(%peer, %error, "no original destination; closing"),
            },
        };
        let snapshot = self.live.load();
        let Some(route) = snapshot.route(key) else {
            drop(snapshot);
            return match (kind, key) {
                (ListenerKind::Transparent, RouteKey::Vip(dst)) => Box::pin(self.passthrough(client, peer, dst)).await,
                _ => tracing::debug!(%peer, listener = %local, %kind, "no service for this address; closing"),
            };
        };
        drop(snapshot);
        let (service, upstream) = (&route.service, &route.upstream);
        upstream.metrics.connections.inc();
        let _active = GaugeGuard::inc(&upstream.metrics.connections_active);
        // HTTP answers broken/forbidden per request (503/403, or gRPC status) and routes each
        // request with the configuration current when it arrives.
        if service.protocol != Protocol::Tcp {
            let proxy = http::HttpProxy {
                live: self.live.clone(),
                key,
                peer,
                request_timeout: self.settings.request_timeout,
                access_log: self.access_log.clone(),
            };
            // Boxed: the HTTP machinery would otherwise make every TCP connection's task as big.
            return Box::pin(http::serve(client, proxy, service.protocol, self.draining.clone())).await;
        }
        let started = Instant::now();
        let log = |endpoint: Option<String>, outcome: &'static str, sent: u64, received: u64| {
            if let Some(log) = &self.access_log {
                log.log(Record {
                    time: SystemTime::now(),
                    service: upstream.service().clone(),
                    protocol: "tcp",
                    client: peer,
                    endpoint,
                    request: None,
                    status: None,
                    outcome,
                    bytes_sent: sent,
                    bytes_received: received,
                    duration: started.elapsed(),
                });
            }
        };
        if let Some(reason) = &service.broken {
            tracing::warn!(service = %upstream.service(), %peer, reason = %reason, "service is broken; closing");
            return log(None, "broken_service", 0, 0);
        }
        if service.access == Access::Forbidden {
            tracing::info!(service = %upstream.service(), %peer, "access forbidden by Mesh (defaultForbidMeshExternalServiceAccess); closing");
            return log(None, "forbidden", 0, 0);
        }
        let tls = route.tls();
        // Boxed: the connect (and TLS handshake) state is large and only lives until connected;
        // inline, every open connection's task would keep room for it.
        let Connected { mut stream, target, active: _target_active } = match Box::pin(upstream.connect(tls)).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%peer, %error, "upstream connect failed; closing");
                return log(None, "connect_failed", 0, 0);
            }
        };
        let (bytes, result) = tcp::proxy(&mut client, &mut stream).await;
        upstream.metrics.bytes_sent.inc_by(bytes.client_to_upstream);
        upstream.metrics.bytes_received.inc_by(bytes.upstream_to_client);
        // TLS 1.3 servers reject a client certificate after the handshake: count it too.
        if let Some(reason) = result.as_ref().err().and_then(tls::reason_of_io) {
            metrics().tls_failure(upstream.service(), reason);
        }
        let outcome = if result.is_ok() { "closed" } else { "reset" };
        log(Some(target.addr.to_string()), outcome, bytes.client_to_upstream, bytes.upstream_to_client);
    }

    async fn passthrough(&self, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
        if !self.settings.passthrough {
            tracing::debug!(%peer, %dst, "unknown destination and passthrough is off; closing");
            return;
        }
        let target = TargetAddr::Socket(dst);
        let mut upstream =
            match tokio::time::timeout(self.settings.connect_timeout, UpstreamStream::connect(&target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => return tracing::debug!(%peer, %dst, %error, "passthrough connect failed"),
                Err(_) => return tracing::debug!(%peer, %dst, "passthrough connect timed out"),
            };
        let (bytes, _) = tcp::proxy(&mut client, &mut upstream).await;
        tracing::debug!(%peer, %dst, sent = bytes.client_to_upstream, received = bytes.upstream_to_client, "passthrough closed");
    }
}

/// Holds a gauge up by one until dropped.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn inc(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
