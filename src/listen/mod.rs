//! Listening sockets and their accept loops, for the three ways traffic reaches the proxy:
//! manual outbounds, VIP listeners and the transparent (iptables-redirected) listener.

pub mod idle;
mod original_dst;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;

pub use original_dst::{OriginalDst, SoOriginalDst};

const BACKLOG: i32 = 4096;

/// How an accepted connection is matched to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ListenerKind {
    /// A Dataplane outbound: the listener address names the service.
    Outbound = 0,
    /// `VIP:port` bound locally: the listener address is the service's VIP.
    Vip = 1,
    /// iptables-redirected traffic: the original destination names the service.
    Transparent = 2,
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Outbound => "outbound",
            Self::Vip => "vip",
            Self::Transparent => "transparent",
        })
    }
}

/// A listener's kind, which a reload may change without closing the socket (so connections
/// queued on it are not reset).
#[derive(Debug)]
pub struct KindCell(AtomicU8);

impl KindCell {
    pub fn new(kind: ListenerKind) -> Arc<Self> {
        Arc::new(Self(AtomicU8::new(kind as u8)))
    }

    pub fn get(&self) -> ListenerKind {
        match self.0.load(Ordering::Relaxed) {
            0 => ListenerKind::Outbound,
            1 => ListenerKind::Vip,
            _ => ListenerKind::Transparent,
        }
    }

    pub fn set(&self, kind: ListenerKind) {
        self.0.store(kind as u8, Ordering::Relaxed);
    }
}

/// What a listener does with each connection it accepts (the proxy, in `run`).
pub trait Accept: Send + Sync + 'static {
    fn accept(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        kind: ListenerKind,
    ) -> impl Future<Output = ()> + Send;
}

/// Binds a listening socket. `freebind` allows addresses not (yet) configured on the host,
/// such as VIPs routed to `lo` by a `local` route.
pub fn bind(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, freebind, false)?)
}

/// Binds a listening socket for a runtime to adopt later. With `reuse_port`, several sockets
/// share the address (one per worker) and the kernel spreads connections among them.
pub fn bind_std(addr: SocketAddr, freebind: bool, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = listening_socket(addr, freebind)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A TCP socket with the options every listener has (SO_REUSEADDR, IPv6-only for IPv6), and
/// IP_FREEBIND when asked.
fn listening_socket(addr: SocketAddr, freebind: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if freebind {
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
        }
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// Binds (without listening, without SO_REUSEPORT) and releases `addr`: fails with
/// `AddrInUse` when anything listens there. Returns the address bound (port 0 made concrete).
fn exclusive_probe(addr: SocketAddr, freebind: bool) -> io::Result<SocketAddr> {
    let socket = listening_socket(addr, freebind)?;
    socket.bind(&addr.into())?;
    socket.local_addr()?.as_socket().ok_or_else(|| io::Error::other("bound address is not an IP address"))
}

/// Binds `addr` once per worker runtime and accepts on each once `open` says so (connections
/// wait in the backlog until then); returns the bound address and the accept tasks. Each
/// connection is handled as the kind in `kind` says when it is accepted.
pub fn serve<A: Accept>(
    addr: SocketAddr,
    kind: &Arc<KindCell>,
    workers: &[tokio::runtime::Handle],
    handler: &Arc<A>,
    open: &tokio::sync::watch::Receiver<bool>,
) -> io::Result<(SocketAddr, Vec<tokio::task::JoinHandle<()>>)> {
    let freebind = kind.get() == ListenerKind::Vip;
    let reuse_port = workers.len() > 1;
    // SO_REUSEPORT would let a second process (of the same user) join the address and take a
    // share of the traffic: first make sure nobody holds it, with a socket that does not share.
    let addr = if reuse_port { exclusive_probe(addr, freebind)? } else { addr };
    let first = bind_std(addr, freebind, reuse_port)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..workers.len() {
        sockets.push(bind_std(local, freebind, reuse_port)?);
    }
    let tasks = workers
        .iter()
        .zip(sockets)
        .map(|(worker, socket)| {
            let (handler, kind, mut open) = (handler.clone(), kind.clone(), open.clone());
            // The socket joins the reactor of the runtime that runs its accept loop.
            worker.spawn(async move {
                if open.wait_for(|open| *open).await.is_err() {
                    return; // never opened: the configuration that wanted it was not applied
                }
                match TcpListener::from_std(socket) {
                    Ok(listener) => accept_loop(listener, kind, handler).await,
                    Err(error) => tracing::error!(kind = %kind.get(), listener = %local, %error, "cannot accept"),
                }
            })
        })
        .collect();
    Ok((local, tasks))
}

/// Accepts until the task is aborted; each connection runs on its own task.
pub async fn accept_loop<A: Accept>(listener: TcpListener, kind: Arc<KindCell>, handler: Arc<A>) {
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::error!(kind = %kind.get(), error = %e, "listener has no local address");
            return;
        }
    };
    loop {
        let (stream, peer) = accept(&listener, "proxy").await;
        tokio::spawn(handler.clone().accept(stream, peer, local, kind.get()));
    }
}

/// Longest pause after failed accepts.
const MAX_ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_secs(1);

/// The next connection. A failed accept (EMFILE and ENFILE at the descriptor limit, above all)
/// is retried after a pause that doubles up to [`MAX_ACCEPT_BACKOFF`] while failures go on, so
/// a loop at the limit neither spins nor floods the log.
pub async fn accept(listener: &TcpListener, what: &'static str) -> (tokio::net::TcpStream, SocketAddr) {
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                if pause >= MAX_ACCEPT_BACKOFF / 2 {
                    tracing::warn!(listener = what, %error, "accept failing; backing off");
                } else {
                    tracing::debug!(listener = what, %error, "accept failed");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}
