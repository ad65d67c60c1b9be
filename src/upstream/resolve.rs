//! Asynchronous DNS for endpoint names (hickory).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, Instant};

use hickory_proto::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_proto::runtime::{RuntimeProvider, TokioRuntimeProvider};
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::GenericConnector;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::Resolver;
use tokio::net::{TcpStream, UdpSocket};

/// Re-resolution never happens more often than this, whatever the record TTL.
pub const MIN_REFRESH: Duration = Duration::from_secs(5);
/// Back-off after a failed lookup starts here and doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
pub const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
#[error("resolving {name}: {message}")]
pub struct ResolveError {
    pub name: String,
    pub message: String,
}

pub struct Resolved {
    pub addresses: Vec<IpAddr>,
    /// When to ask again: the record TTL, at least [`MIN_REFRESH`] from now.
    pub refresh_at: Instant,
}

#[derive(Clone)]
pub struct DnsResolver {
    inner: Resolver<GenericConnector<MarkedRuntime>>,
}

/// hickory's tokio runtime with the proxy's own sockets marked ([`crate::socket_mark`]), so
/// that the transparent-proxy rules never send the resolver's queries back to the proxy.
#[derive(Clone, Default)]
struct MarkedRuntime(TokioRuntimeProvider);

/// hickory's own bound on a TCP connect to a name server when its options give none.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl RuntimeProvider for MarkedRuntime {
    type Handle = <TokioRuntimeProvider as RuntimeProvider>::Handle;
    type Timer = <TokioRuntimeProvider as RuntimeProvider>::Timer;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.0.create_handle()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        Box::pin(async move {
            let socket = crate::socket_mark::tcp_socket(server)?;
            if let Some(bind) = bind {
                socket.bind(bind)?;
            }
            socket.set_nodelay(true)?;
            let wait_for = wait_for.unwrap_or(TCP_CONNECT_TIMEOUT);
            match tokio::time::timeout(wait_for, socket.connect(server)).await {
                Ok(stream) => Ok(AsyncIoTokioAsStd(stream?)),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {server} timed out"))),
            }
        })
    }

    fn bind_udp(
        &self,
        local: SocketAddr,
        _server: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<UdpSocket>>>> {
        Box::pin(crate::socket_mark::bind_udp(local))
    }
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver")
    }
}

impl DnsResolver {
    /// The system's resolvers, from `/etc/resolv.conf`.
    pub fn system() -> Result<Self, ResolveError> {
        let builder = Resolver::builder(GenericConnector::new(MarkedRuntime::default()))
            .map_err(|e| ResolveError { name: "/etc/resolv.conf".into(), message: e.to_string() })?;
        Ok(Self { inner: builder.build() })
    }

    /// Plain-text DNS over UDP and TCP to `servers` only.
    pub fn with_nameservers(servers: &[SocketAddr]) -> Self {
        let configs: Vec<NameServerConfig> = servers
            .iter()
            .flat_map(|&addr| [NameServerConfig::new(addr, Protocol::Udp), NameServerConfig::new(addr, Protocol::Tcp)])
            .collect();
        let config = ResolverConfig::from_parts(None, Vec::new(), configs);
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let provider = GenericConnector::new(MarkedRuntime::default());
        let inner = Resolver::builder_with_config(config, provider).with_options(opts).build();
        Self { inner }
    }

    pub async fn resolve(&self, name: &str) -> Result<Resolved, ResolveError> {
        // A final dot makes the name absolute: no search domains are tried.
        let fqdn = if name.ends_with('.') { name.to_string() } else { format!("{name}.") };
        let err = |message: String| ResolveError { name: name.to_string(), message };
        let lookup = self.inner.lookup_ip(fqdn.as_str()).await.map_err(|e| err(e.to_string()))?;
        let addresses: Vec<IpAddr> = lookup.iter().collect();
        if addresses.is_empty() {
            return Err(err("no addresses".into()));
        }
        let refresh_at = lookup.valid_until().max(Instant::now() + MIN_REFRESH);
        Ok(Resolved { addresses, refresh_at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The resolver's sockets, UDP and TCP, carry the proxy's mark. Setting SO_MARK needs
    /// CAP_NET_ADMIN: run as root (as `.ci/run` does).
    #[tokio::test]
    async fn the_resolvers_sockets_are_marked() {
        const MARK: u32 = 0x4d45;
        crate::socket_mark::set(Some(MARK));
        let runtime = MarkedRuntime::default();
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let udp = runtime.bind_udp(local, local).await.unwrap();
        let listener = tokio::net::TcpListener::bind(local).await.unwrap();
        let tcp = runtime.connect_tcp(listener.local_addr().unwrap(), None, None).await.unwrap();
        let marks = (socket2::SockRef::from(&udp).mark().unwrap(), socket2::SockRef::from(&tcp.0).mark().unwrap());
        assert_eq!(marks, (MARK, MARK), "SO_MARK needs CAP_NET_ADMIN: run the tests as root");
    }
}
