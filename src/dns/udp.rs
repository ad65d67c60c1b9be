//! Forwarding over UDP on shared sockets: a few sockets per address family (each query takes
//! one at random, so a spoofer must guess the port as well as the ID) for every query in
//! flight, each query sent under an ID of its own (random, unused on that socket), the answer
//! matched by server, ID and question and handed back under the client's ID. A flood of
//! queries costs entries in a table, not a socket and a task each.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use hickory_proto::op::Message;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use super::answers;

/// A query waiting for its answer.
struct Pending {
    server: SocketAddr,
    query: Message,
    /// Taken by the answer; the entry (and its ID) stays until the exchange ends, so an ID
    /// is never reused while its query is still waiting.
    answer: Option<oneshot::Sender<Vec<u8>>>,
}

/// Sockets per address family.
const SOCKETS: usize = 4;
/// Largest answer read (EDNS allows up to 64 KiB over UDP).
const MAX_ANSWER: usize = 65535;

struct Shared {
    socket: UdpSocket,
    /// By the ID the query was sent under.
    pending: Mutex<HashMap<u16, Pending>>,
}

/// The shared sockets, opened on first use.
#[derive(Default)]
pub(super) struct UdpForwarder {
    v4: tokio::sync::OnceCell<Vec<Arc<Shared>>>,
    v6: tokio::sync::OnceCell<Vec<Arc<Shared>>>,
}

impl UdpForwarder {
    /// Sends `packet` (the client's query, parsed as `query`) to `server`; the answer comes back
    /// with the client's ID. Cancelling the future (a timeout) forgets the query.
    pub(super) async fn exchange(&self, server: SocketAddr, packet: &[u8], query: &Message) -> io::Result<Vec<u8>> {
        let (cell, local): (_, SocketAddr) = if server.is_ipv4() {
            (&self.v4, (Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&self.v6, (Ipv6Addr::UNSPECIFIED, 0).into())
        };
        let sockets = cell
            .get_or_try_init(|| async {
                let mut sockets = Vec::with_capacity(SOCKETS);
                for _ in 0..SOCKETS {
                    sockets.push(Shared::open(local).await?);
                }
                Ok::<_, io::Error>(sockets)
            })
            .await?;
        let shared = &sockets[rand::random_range(0..sockets.len())];
        let (tx, rx) = oneshot::channel();
        let id = shared.register(Pending { server, query: query.clone(), answer: Some(tx) })?;
        let _forget = Forget { shared, id };
        let mut out = packet.to_vec();
        out[..2].copy_from_slice(&id.to_be_bytes());
        shared.socket.send_to(&out, server).await?;
        let mut answer = rx.await.map_err(|_| io::Error::other("the forwarding socket closed"))?;
        answer[..2].copy_from_slice(&packet[..2]);
        Ok(answer)
    }
}

impl Shared {
    async fn open(local: SocketAddr) -> io::Result<Arc<Self>> {
        let socket = crate::socket_mark::bind_udp(local).await?;
        let shared = Arc::new(Self { socket, pending: Mutex::default() });
        tokio::spawn(receive(shared.clone()));
        Ok(shared)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A random ID no query in flight has (the in-flight cap keeps the table far from full).
    fn register(&self, pending: Pending) -> io::Result<u16> {
        let mut table = self.pending();
        for _ in 0..64 {
            let id: u16 = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = table.entry(id) {
                slot.insert(pending);
                return Ok(id);
            }
        }
        Err(io::Error::other("no free DNS query ID"))
    }
}

/// Removes a query from the table when its exchange ends, answered or not.
struct Forget<'a> {
    shared: &'a Shared,
    id: u16,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.shared.pending().remove(&self.id);
    }
}

/// Hands each datagram to the query it answers: same server, same ID, same question. Anything
/// else (late, spoofed, or for a forgotten query) is dropped. Runs as long as the process.
async fn receive(this: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_ANSWER];
    loop {
        let Ok((n, from)) = this.socket.recv_from(&mut buf).await else { continue };
        if n < 2 {
            continue;
        }
        let id = u16::from_be_bytes([buf[0], buf[1]]);
        let mut table = this.pending();
        if let Some(p) = table.get_mut(&id).filter(|p| p.server == from && answers(&buf[..n], &p.query)) {
            if let Some(answer) = p.answer.take() {
                let _ = answer.send(buf[..n].to_vec());
            }
        }
    }
}
