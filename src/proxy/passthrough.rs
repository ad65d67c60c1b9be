//! Transparent traffic to a destination no service claims: sent where it was going, when
//! passthrough is on.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{copy, ProxySettings};
use crate::live::Snapshot;
use crate::upstream::{TargetAddr, UpstreamStream};

/// Destinations passthrough never goes to: the proxy itself (a loop), and VIPs no service has
/// (they lead nowhere outside).
pub(super) fn refused(settings: &ProxySettings, snapshot: &Snapshot, dst: SocketAddr) -> Option<&'static str> {
    if settings.vip_cidr.is_some_and(|cidr| cidr.contains(&dst.ip())) {
        return Some("in the VIP range but no service's");
    }
    let own = |addr: &SocketAddr| addr.port() == dst.port() && (addr.ip() == dst.ip() || addr.ip().is_unspecified());
    if settings.own_listeners.iter().any(own) || snapshot.catalog.outbounds().iter().any(|o| own(&o.address)) {
        return Some("one of the proxy's own listeners");
    }
    None
}

pub(super) async fn forward(settings: &ProxySettings, mut client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    if !settings.passthrough {
        tracing::debug!(%peer, %dst, "unknown destination and passthrough is off; closing");
        return;
    }
    let target = TargetAddr::Socket(dst);
    let mut upstream = match tokio::time::timeout(settings.connect_timeout, UpstreamStream::connect(&target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => return tracing::debug!(%peer, %dst, %error, "passthrough connect failed"),
        Err(_) => return tracing::debug!(%peer, %dst, "passthrough connect timed out"),
    };
    let (bytes, _) = copy::bidirectional(&mut client, &mut upstream, settings.timeouts.flow()).await;
    tracing::debug!(%peer, %dst, sent = bytes.client_to_upstream, received = bytes.upstream_to_client, "passthrough closed");
}
