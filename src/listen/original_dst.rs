//! The destination a connection had before iptables redirected it to us.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::TcpStream;

/// Reads a redirected connection's original destination. Behind a trait so tests can inject
/// one without iptables.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST` (IPv6) from netfilter's conntrack.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let socket = SockRef::from(stream);
        let addr = if stream.local_addr()?.is_ipv6() { socket.original_dst_v6()? } else { socket.original_dst_v4()? };
        addr.as_socket().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
    }
}
