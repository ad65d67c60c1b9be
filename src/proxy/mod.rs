//! What happens to an accepted connection: find its service, check access, pick an endpoint,
//! and move the traffic.

pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::catalog::Access;
use crate::listen::{ListenerKind, OriginalDst};
use crate::live::Live;
use crate::metrics::metrics;
use crate::tls;
use crate::upstream::{Connected, TargetAddr, UpstreamStream};

#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Send transparent traffic for unknown destinations where it was going.
    pub passthrough: bool,
    pub connect_timeout: Duration,
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
        if let Some(reason) = &service.broken {
            tracing::warn!(service = %upstream.service(), %peer, reason = %reason, "service is broken; closing");
            return;
        }
        if service.access == Access::Forbidden {
            tracing::info!(service = %upstream.service(), %peer, "access forbidden by Mesh (defaultForbidMeshExternalServiceAccess); closing");
            return;
        }
        let Connected { stream, target, active: _active } = match upstream.connect().await {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(%peer, %error, "upstream connect failed; closing");
                return;
            }
        };
        let (bytes, result) = match (&service.tls, &service.tls_client) {
            (Some(policy), Some(config)) => {
                let mut tls = match tls::connect(config, tls::server_name(policy, &target), stream).await {
                    Ok(tls) => tls,
                    Err(error) => {
                        metrics().tls_failure(upstream.service(), error.reason);
                        tracing::warn!(service = %upstream.service(), %peer, endpoint = %target.addr, %error, "TLS handshake failed; closing");
                        return;
                    }
                };
                let (bytes, result) = tcp::proxy(&mut client, &mut tls).await;
                // TLS 1.3 servers reject a client certificate after the handshake: count it too.
                if let Some(reason) = result.as_ref().err().and_then(tls::reason_of_io) {
                    metrics().tls_failure(upstream.service(), reason);
                }
                (bytes, result)
            }
            _ => {
                let mut stream = stream;
                tcp::proxy(&mut client, &mut stream).await
            }
        };
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
