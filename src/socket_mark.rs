//! SO_MARK on the proxy's own outgoing sockets (endpoint and passthrough connections, DNS
//! forwards, the resolver of endpoint names, the trace exporters and the TCP access-log
//! collector), matched by a RETURN rule that `transparent-proxy install` writes: the proxy's
//! traffic is never redirected back to it, even when it runs under another uid than the
//! `--proxy-uid` the rules name (without it, passthrough to an unknown address looped through
//! the proxy until it ran out of file descriptors).
//!
//! Setting a mark needs CAP_NET_ADMIN (or CAP_NET_RAW on Linux 5.17+). Without it the first
//! attempt says so once and marking stops; the uid rule still applies.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpSocket, TcpStream, UdpSocket};

/// The default mark, in `run --socket-mark` and `transparent-proxy install --proxy-mark`
/// (0x4d45, "ME").
pub const DEFAULT_MARK: u32 = 0x4d45;

/// 0: off.
static MARK: AtomicU32 = AtomicU32::new(0);

/// Marks the sockets opened from now on with `mark` (`None`: none).
pub fn set(mark: Option<u32>) {
    MARK.store(mark.unwrap_or(0), Ordering::Relaxed);
}

pub fn current() -> Option<u32> {
    Some(MARK.load(Ordering::Relaxed)).filter(|m| *m != 0)
}

/// Marks `socket` when a mark is set.
pub fn apply(socket: socket2::SockRef<'_>) {
    let Some(mark) = current() else { return };
    if let Err(error) = socket.set_mark(mark) {
        // Once: every socket would fail the same way.
        if MARK.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(%error, mark, "cannot set SO_MARK on the proxy's sockets (needs CAP_NET_ADMIN); the transparent-proxy rules tell its traffic apart by uid only");
        }
    }
}

/// A TCP socket for `addr`'s family, marked before its connect (whose first packet is the one
/// the rules look at).
pub fn tcp_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    apply(socket2::SockRef::from(&socket));
    Ok(socket)
}

/// A TCP connection from a marked socket.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    tcp_socket(addr)?.connect(addr).await
}

/// A UDP socket bound to `local`, marked.
pub async fn bind_udp(local: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(local).await?;
    apply(socket2::SockRef::from(&socket));
    Ok(socket)
}

/// A TCP connection from a marked socket to `host:port`, trying its addresses in turn (the
/// exporters and the access-log collector, named by the user).
pub async fn connect_host(host_port: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host(host_port).await? {
        match connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host_port} has no address"))))
}

/// A blocking TCP connection from a marked socket (the access-log writer's thread).
pub fn connect_blocking(addr: SocketAddr, timeout: std::time::Duration) -> io::Result<std::net::TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    apply(socket2::SockRef::from(&socket));
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Parses a mark given as decimal or `0x` hex; `off` is none.
pub fn parse(s: &str) -> Result<Option<u32>, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match parsed {
        Ok(0) | Err(_) => Err(format!("'{s}' is not a mark: a non-zero number (decimal or 0x hex) or `off`")),
        Ok(mark) => Ok(Some(mark)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_parse_in_decimal_and_hex() {
        assert_eq!(super::parse("0x4d45"), Ok(Some(0x4d45)));
        assert_eq!(super::parse("19781"), Ok(Some(0x4d45)));
        assert_eq!(super::parse("off"), Ok(None));
        assert!(super::parse("0").is_err() && super::parse("x").is_err());
    }
}
