//! What happens to an accepted connection: find its service, check access, pick an endpoint,
//! and move the traffic.

pub mod http;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::catalog::{Access, Protocol};
use crate::listen::{ListenerKind, OriginalDst};
use crate::live::Live;
use crate::metrics::metrics;
use crate::tls;
use crate::upstream::{Connected, TargetAddr, TlsSetup, UpstreamStream};

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Send transparent traffic for unknown destinations where it was going.
    pub passthrough: bool,
    pub connect_timeout: Duration,
    /// HTTP: time allowed until the response headers arrive.
    pub request_timeout: Option<Duration>,
}

pub struct Proxy {
    pub live: Arc<Live>,
    pub settings: ProxySettings,
    pub original_dst: Arc<dyn OriginalDst>,
}

impl Proxy {
    pub async fn handle(&self, mut client: TcpStream, peer: SocketAddr, local: SocketAddr, kind: ListenerKind) {
        let _ = client.set_nodelay(true);
        let snapshot = self.live.load();
        let route = match kind {
            ListenerKind::Outbound => snapshot.by_outbound(local),
            ListenerKind::Vip => snapshot.by_vip(local),
            ListenerKind::Transparent => {
                let dst = match self.original_dst.original_dst(&client) {
                    Ok(dst) if dst != local => dst,
                    Ok(_) => {
                        tracing::debug!(%peer, "connection to the transparent listener itself; closing");
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%peer, %error, "no original destination; closing");
                        return;
                    }
                };
                match snapshot.by_vip(dst) {
                    Some(route) => Some(route),
                    None => {
                        drop(snapshot);
                        return self.passthrough(client, peer, dst).await;
                    }
                }
            }
        };
        let Some(route) = route else {
            tracing::debug!(%peer, listener = %local, %kind, "no service for this address; closing");
            return;
        };
        let service = route.service.clone();
        let upstream = route.upstream.clone();
        drop(snapshot);
        // HTTP answers broken/forbidden per request (503/403, or gRPC status).
        if service.protocol != Protocol::Tcp {
            let request_timeout = self.settings.request_timeout;
            return http::serve(client, http::HttpProxy { service, upstream, request_timeout }).await;
        }
        if let Some(reason) = &service.broken {
            tracing::warn!(service = %upstream.service(), %peer, reason = %reason, "service is broken; closing");
            return;
        }
        if service.access == Access::Forbidden {
            tracing::info!(service = %upstream.service(), %peer, "access forbidden by Mesh (defaultForbidMeshExternalServiceAccess); closing");
            return;
        }
        let tls =
            service.tls.as_ref().zip(service.tls_client.as_ref()).map(|(policy, config)| TlsSetup { policy, config });
        let Connected { mut stream, target, active: _active } = match upstream.connect(tls).await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%peer, %error, "upstream connect failed; closing");
                return;
            }
        };
        let (bytes, result) = tcp::proxy(&mut client, &mut stream).await;
        // TLS 1.3 servers reject a client certificate after the handshake: count it too.
        if let Some(reason) = result.as_ref().err().and_then(tls::reason_of_io) {
            metrics().tls_failure(upstream.service(), reason);
        }
        tracing::debug!(
            service = %upstream.service(), %peer, endpoint = %target.addr,
            sent = bytes.client_to_upstream, received = bytes.upstream_to_client,
            error = result.err().map(|e| e.to_string()), "connection closed"
        );
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
