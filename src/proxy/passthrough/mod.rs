//! Transparent traffic to a destination no service claims, as MeshPassthrough decides:
//!
//! - `All`: sent where it was going; `None`: closed;
//! - `Matched`: an IP/CIDR match on the original destination passes it whatever it speaks;
//!   else its first bytes are peeked ([`sniff`]): a TLS ClientHello whose SNI a `tls` rule
//!   allows, or HTTP (decided per request, [`crate::proxy::http::serve_passthrough`]) whose
//!   Host an HTTP rule allows.
//!
//! A domain match is **pinned**: the connection goes to an address the allowed name resolves
//! to (the original destination when it is one of them), never blindly to the address the
//! application dialled, so a client cannot present an allowed SNI or Host to reach any IP.

pub(crate) mod sniff;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{copy, Proxy, ProxySettings};
use crate::access_log::{Logs, Record};
use crate::live::Snapshot;
use crate::metrics::metrics;
use crate::policy::passthrough::Allowed;
use crate::resources::egress::PassthroughMode;
use crate::upstream::{TargetAddr, UpstreamStream};
use sniff::Sniffed;

/// Destinations passthrough never goes to: the proxy itself (a loop), and VIPs no service has
/// (they lead nowhere outside).
pub(super) fn refused(settings: &ProxySettings, snapshot: &Snapshot, dst: SocketAddr) -> Option<&'static str> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if settings.vip_cidr.is_some_and(|cidr| cidr.contains(&dst.ip())) {
        return Some("in the VIP range but no service's");
    }
    let own = |addr: &SocketAddr| listens_for(*addr, dst);
    if settings.own_listeners.iter().any(own) || snapshot.catalog.outbounds().iter().any(|o| own(&o.address)) {
        return Some("one of the proxy's own listeners");
    }
    None
}

/// Whether the proxy's `listener` is what a connection to `dst` would reach: the same address,
/// or a wildcard one (the readiness port's `0.0.0.0:9902`) and `dst` one of this host's own
/// addresses. Any other host's port 9902 is not the proxy's.
fn listens_for(listener: SocketAddr, dst: SocketAddr) -> bool {
    if listener.port() != dst.port() {
        return false;
    }
    let wildcard = listener.ip().is_unspecified() && listener.is_ipv4() == dst.is_ipv4();
    listener.ip() == dst.ip() || (wildcard && is_local(dst.ip()))
}

/// An address of this host: one a socket can bind (only asked for a wildcard listener's port).
/// Under `net.ipv4.ip_nonlocal_bind=1` every address binds: such a port is then refused for
/// every host, the safe side.
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

fn deny(peer: SocketAddr, dst: SocketAddr, reason: &'static str, detail: &str) {
    metrics().passthrough("connection", false, reason);
    tracing::info!(%peer, %dst, reason, "passthrough denied{detail}");
}

pub(super) async fn forward(proxy: &Arc<Proxy>, client: TcpStream, peer: SocketAddr, dst: SocketAddr) {
    let (settings, started) = (&proxy.settings, std::time::Instant::now());
    if !settings.passthrough {
        return deny(peer, dst, "passthrough_off", " (--no-passthrough)");
    }
    let plan = proxy.live.load().catalog.passthrough().clone();
    if let Some(allowed) = plan.allows_address(dst) {
        let reason = match allowed {
            Allowed::All => "mode_all",
            Allowed::Address => "address",
        };
        metrics().passthrough("connection", true, reason);
        return tunnel(proxy, client, peer, dst, started).await;
    }
    if plan.mode == PassthroughMode::None {
        return deny(peer, dst, "mode_none", " (MeshPassthrough passthroughMode: None)");
    }
    if !plan.has_domain_rules(dst.port()) {
        return deny(peer, dst, "no_match", ": no MeshPassthrough rule matches this address and port");
    }
    match sniff::sniff(&client, settings.timeouts.header_read).await {
        Sniffed::Tls { sni: Some(name) } if plan.allows_sni(&name, dst.port()) => match pin(proxy, &name, dst).await {
            Ok(target) => {
                metrics().passthrough("connection", true, "sni");
                tunnel(proxy, client, peer, target, started).await;
            }
            Err(why) => deny(peer, dst, "unresolved", &format!(": SNI {name} is allowed but {why}")),
        },
        Sniffed::Tls { sni } => {
            let sni = sni.unwrap_or_else(|| "(none)".into());
            deny(peer, dst, "no_match", &format!(": no MeshPassthrough tls rule matches SNI {sni}"))
        }
        Sniffed::Http1 | Sniffed::Http2 if !plan.has_http_rules(dst.port()) => {
            deny(peer, dst, "no_match", ": HTTP, and only tls MeshPassthrough rules match this port")
        }
        sniffed @ (Sniffed::Http1 | Sniffed::Http2) => {
            let passthrough = super::http::PassthroughHttp::new(proxy, peer, dst);
            Box::pin(super::http::serve_passthrough(
                client,
                passthrough,
                sniffed == Sniffed::Http2,
                proxy.draining.clone(),
            ))
            .await;
        }
        Sniffed::Opaque => deny(peer, dst, "no_match", ": neither TLS nor HTTP, and no IP or CIDR rule matches"),
    }
}

/// Where a connection for the allowed `name` goes: the original destination when `name`
/// resolves to it, else the first address it resolves to (on the same port); `Err`: why none.
pub(crate) async fn pin(proxy: &Proxy, name: &str, dst: SocketAddr) -> Result<SocketAddr, String> {
    // An address (a Host of `[2001:db8::1]` or `192.0.2.1`, allowed by a bare `*`) is its own.
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let resolved = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => proxy.upstream_settings.resolver.resolve(name).await?.addresses,
    };
    let resolved: Vec<std::net::IpAddr> = resolved.into_iter().map(|ip| ip.to_canonical()).collect();
    // The unspecified address is no destination: Linux connects it to loopback, where the
    // proxy's own listeners are (the loopback ones are refused below, like every own listener).
    if let Some(ip) = resolved.iter().find(|ip| ip.is_unspecified()) {
        return Err(format!("it resolves to {ip}, the unspecified address"));
    }
    let target = if resolved.contains(&dst.ip()) {
        dst
    } else {
        let ip = *resolved.first().ok_or_else(|| format!("{name} resolves to no address"))?;
        tracing::debug!(%dst, name, %ip, "the allowed name does not resolve to the dialled address; pinned to its own");
        SocketAddr::new(ip, dst.port())
    };
    if let Some(why) = refused(&proxy.settings, &proxy.live.load(), target) {
        return Err(format!("it resolves to {target}, which is {why}"));
    }
    Ok(target)
}

/// Connects to `target` and copies both ways; one access-log line (service `passthrough`, as
/// Kuma's passthrough cluster) when the access log is on, its time counted from `started`, when
/// the connection was taken (before its first bytes were looked at).
async fn tunnel(
    proxy: &Proxy,
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
    started: std::time::Instant,
) {
    // As a service's flow: the logs of the configuration it began under.
    let logs = proxy.passthrough_logs();
    let settings = &proxy.settings;
    let addr = TargetAddr::Socket(target);
    let (bytes, outcome) = match tokio::time::timeout(settings.connect_timeout, UpstreamStream::connect(&addr)).await {
        Ok(Ok(mut upstream)) => {
            let (bytes, result) = copy::bidirectional(&mut client, &mut upstream, settings.timeouts.flow()).await;
            (bytes, copy::outcome(&result))
        }
        Ok(Err(error)) => {
            tracing::debug!(%peer, %target, %error, "passthrough connect failed");
            (copy::Transferred::default(), "connect_failed")
        }
        Err(_) => {
            tracing::debug!(%peer, %target, "passthrough connect timed out");
            (copy::Transferred::default(), "connect_failed")
        }
    };
    tracing::debug!(%peer, %target, sent = bytes.client_to_upstream, received = bytes.upstream_to_client, outcome, "passthrough closed");
    if logs.is_on() {
        let endpoint = (outcome != "connect_failed").then(|| target.to_string());
        let bytes = (bytes.client_to_upstream, bytes.upstream_to_client);
        logs.log(Record::tcp(Arc::from(PASSTHROUGH_SERVICE), peer, endpoint, outcome, bytes, started));
    }
}

impl Proxy {
    /// Where passthrough traffic is logged: `--access-log`, and the backends of the mesh's
    /// MeshAccessLog `to: Mesh` items (as Kuma logs its passthrough listeners), as the current
    /// configuration has them.
    pub(crate) fn passthrough_logs(&self) -> Logs {
        Logs { global: self.access_log.clone(), service: self.live.load().passthrough_log.clone() }
    }
}

/// The access log's service for passthrough connections.
pub(crate) const PASSTHROUGH_SERVICE: &str = "passthrough";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_reached_only_through_this_host_s_addresses() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(listens_for(addr("0.0.0.0:9902"), addr("127.0.0.1:9902")));
        assert!(listens_for(addr("127.0.0.1:9902"), addr("127.0.0.1:9902")));
        // TEST-NET-1: no host has it; the bind that tells is never used to send.
        assert!(!listens_for(addr("0.0.0.0:9902"), addr("192.0.2.1:9902")), "another host's 9902");
        assert!(!listens_for(addr("0.0.0.0:9902"), addr("127.0.0.1:9903")));
        assert!(!listens_for(addr("[::]:9902"), addr("127.0.0.1:9902")), "an IPv6-only wildcard");
    }
}
