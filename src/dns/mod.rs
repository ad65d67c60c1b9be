//! The DNS proxy: answers generated hostnames from the live catalog, forwards the rest.
//!
//! A query for a generated hostname (exact, case-insensitive) gets the service's VIP (A, or
//! AAAA for an IPv6 VIP), authoritative, TTL 30; other types for a known name get NOERROR with
//! no records. Everything else is forwarded verbatim to the system's resolvers, SERVFAIL when
//! none answers. Malformed packets are dropped and counted.

mod tcp_slots;
mod udp;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::catalog::Catalog;
use crate::live::Live;
use crate::metrics::{metrics, DnsResult};

pub const TTL: u32 = 30;
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// A DNS-over-TCP connection waiting this long for its next query is closed.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_UDP: usize = 4096;

/// DNS-over-TCP connections served at once; more are closed as they come (each holds a task
/// and a descriptor).
pub const MAX_TCP_CONNECTIONS: usize = 256;

/// Forwarded queries waiting for an answer at once; more are answered SERVFAIL at once (a flood
/// must not take a socket and a task per query).
pub const MAX_FORWARDS_IN_FLIGHT: usize = 256;

/// The DNS proxy's limits (`--dns-forward-timeout`, `--dns-max-in-flight`,
/// `--dns-tcp-idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsLimits {
    /// For one upstream nameserver's answer.
    pub forward_timeout: Duration,
    pub max_in_flight: usize,
    pub tcp_idle: Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self { forward_timeout: FORWARD_TIMEOUT, max_in_flight: MAX_FORWARDS_IN_FLIGHT, tcp_idle: TCP_IDLE_TIMEOUT }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS proxy: cannot listen on {addr}: {error}")]
    Bind { addr: SocketAddr, error: io::Error },
    #[error("--dns-upstream {server} is this DNS proxy's own address ({bound}): its queries would come back to it")]
    OwnAddress { server: SocketAddr, bound: SocketAddr },
}

/// Where unknown names go.
#[derive(Debug, Clone, Default)]
pub struct Forwarders(Vec<SocketAddr>);

impl Forwarders {
    /// `servers`, none of which may be the proxy's own address `bound` (in any form that
    /// reaches it: the same IP, a wildcard, or loopback for loopback).
    pub fn new(servers: Vec<SocketAddr>, bound: SocketAddr) -> Result<Self, DnsError> {
        match servers.iter().find(|s| reaches(**s, bound)) {
            Some(&server) => Err(DnsError::OwnAddress { server, bound }),
            None => Ok(Self(servers)),
        }
    }

    /// The nameservers of `/etc/resolv.conf`, without `exclude` (our own address: no loop).
    pub fn system(exclude: SocketAddr) -> Self {
        let servers = match hickory_resolver::system_conf::read_system_conf() {
            Ok((config, _)) => config.name_servers().iter().map(|ns| ns.socket_addr).collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read /etc/resolv.conf; unknown names will get SERVFAIL");
                Vec::new()
            }
        };
        let mut unique: Vec<SocketAddr> = Vec::new();
        for s in servers {
            if !reaches(s, exclude) && !unique.contains(&s) {
                unique.push(s);
            }
        }
        Self(unique)
    }
}

/// Whether a query sent to `server` would arrive at a socket bound to `bound`.
fn reaches(server: SocketAddr, bound: SocketAddr) -> bool {
    let (s, b) = (server.ip(), bound.ip());
    server.port() == bound.port()
        && (s == b || s.is_unspecified() || b.is_unspecified() || (s.is_loopback() && b.is_loopback()))
}

pub struct DnsProxy {
    live: Arc<Live>,
    forwarders: Forwarders,
    in_flight: Arc<tokio::sync::Semaphore>,
    tcp_slots: Arc<tcp_slots::TcpSlots>,
    udp: udp::UdpForwarder,
    limits: DnsLimits,
}

/// The bound sockets; serving starts with [`DnsProxy::serve`].
pub struct DnsSockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl DnsProxy {
    pub fn new(live: Arc<Live>, forwarders: Forwarders, limits: DnsLimits) -> Arc<Self> {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(limits.max_in_flight));
        let tcp_slots = tcp_slots::TcpSlots::new(MAX_TCP_CONNECTIONS);
        Arc::new(Self { live, forwarders, in_flight, tcp_slots, udp: udp::UdpForwarder::default(), limits })
    }

    /// Binds UDP and TCP on the same port. With port 0, the port UDP got may be taken for TCP:
    /// then another one is tried.
    pub async fn bind(addr: SocketAddr) -> Result<DnsSockets, DnsError> {
        let err = |error| DnsError::Bind { addr, error };
        let mut attempts = if addr.port() == 0 { 10 } else { 1 };
        loop {
            let udp = UdpSocket::bind(addr).await.map_err(err)?;
            let bound = udp.local_addr().map_err(err)?;
            match crate::listen::bind(bound, false) {
                Ok(tcp) => return Ok(DnsSockets { udp, tcp }),
                Err(e) if attempts > 1 && e.kind() == io::ErrorKind::AddrInUse => attempts -= 1,
                Err(e) => return Err(err(e)),
            }
        }
    }

    /// Serves both sockets until the tasks are aborted.
    pub fn serve(self: &Arc<Self>, sockets: DnsSockets) -> [tokio::task::JoinHandle<()>; 2] {
        let udp = tokio::spawn(self.clone().serve_udp(Arc::new(sockets.udp)));
        let tcp = tokio::spawn(self.clone().serve_tcp(sockets.tcp));
        [udp, tcp]
    }

    async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(error) => {
                    tracing::debug!(%error, "DNS recv failed");
                    continue;
                }
            };
            let packet = &buf[..n];
            match self.answer_locally(packet) {
                Answer::Local(bytes) => {
                    let _ = socket.send_to(&bytes, peer).await;
                }
                Answer::Malformed => {}
                Answer::Forward(query) => {
                    let (this, socket, packet) = (self.clone(), socket.clone(), packet.to_vec());
                    tokio::spawn(async move {
                        let response = this.forward(&packet, &query, Transport::Udp).await;
                        let _ = socket.send_to(&response, peer).await;
                    });
                }
            }
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = crate::listen::accept(&listener, "dns-tcp").await;
            let this = self.clone();
            // A slot may take a moment to free (an idle connection is told to close): the
            // accept loop does not wait for it. At most one task waits per connection told.
            tokio::spawn(async move {
                let Some(held) = this.tcp_slots.take().await else {
                    tracing::debug!(%peer, max = MAX_TCP_CONNECTIONS, "DNS-over-TCP connections at their limit, all busy; closing");
                    return;
                };
                let _ = this.serve_tcp_connection(stream, &held.slot).await;
            });
        }
    }

    /// Answers queries until the client closes the connection (or sends garbage, or stops
    /// reading its answers for the idle timeout), or a new connection needs its slot.
    async fn serve_tcp_connection(&self, mut stream: TcpStream, slot: &tcp_slots::Slot) -> io::Result<()> {
        loop {
            slot.set_idle(true);
            // RFC 7766 §6.2.3: close idle TCP connections after a few seconds.
            let packet = tokio::select! {
                read = tokio::time::timeout(self.limits.tcp_idle, read_framed(&mut stream)) => match read {
                    Ok(packet) => packet?,
                    Err(_) => return Ok(()),
                },
                () = slot.evicted() => return Ok(()),
            };
            slot.set_idle(false);
            let response = match self.answer_locally(&packet) {
                Answer::Local(bytes) => bytes,
                Answer::Malformed => return Ok(()),
                Answer::Forward(query) => self.forward(&packet, &query, Transport::Tcp).await,
            };
            let written = tokio::time::timeout(self.limits.tcp_idle, write_framed(&mut stream, &response)).await;
            written.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        }
    }

    /// Answers from the catalog, or says the query must be forwarded.
    fn answer_locally(&self, packet: &[u8]) -> Answer {
        answer(&self.live.load().catalog, packet)
    }

    /// Forwards the query to each forwarder in turn over `transport`; SERVFAIL when none answers.
    async fn forward(&self, packet: &[u8], query: &Message, transport: Transport) -> Vec<u8> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            tracing::debug!("too many DNS queries being forwarded; SERVFAIL");
            metrics().dns_query(DnsResult::Servfail);
            return servfail(query);
        };
        for &server in &self.forwarders.0 {
            let result = match transport {
                Transport::Udp => {
                    tokio::time::timeout(self.limits.forward_timeout, self.udp.exchange(server, packet, query)).await
                }
                Transport::Tcp => tokio::time::timeout(self.limits.forward_timeout, exchange_tcp(server, packet)).await,
            };
            match result {
                Ok(Ok(response)) => {
                    metrics().dns_query(DnsResult::Forwarded);
                    return response;
                }
                Ok(Err(error)) => tracing::debug!(%server, ?transport, %error, "DNS forward failed"),
                Err(_) => tracing::debug!(%server, ?transport, "DNS forward timed out"),
            }
        }
        metrics().dns_query(DnsResult::Servfail);
        servfail(query)
    }
}

/// Answers a query from `catalog`, or says it must be forwarded. Pure but for metrics (the DNS
/// fuzz target drives it).
pub fn answer(catalog: &Catalog, packet: &[u8]) -> Answer {
    let Ok(query) = Message::from_vec(packet) else {
        metrics().dns_query(DnsResult::Malformed);
        return Answer::Malformed;
    };
    let Some(question) = query.queries().first().filter(|_| query.message_type() == MessageType::Query) else {
        metrics().dns_query(DnsResult::Malformed);
        return Answer::Malformed;
    };
    let name = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let Some(vip) = catalog.by_hostname(&name).and_then(|s| s.vip) else {
        return Answer::Forward(query);
    };
    let mut response = reply(&query, ResponseCode::NoError);
    response.set_authoritative(true);
    let rdata = match (question.query_type(), vip) {
        (RecordType::A, IpAddr::V4(ip)) => Some(RData::A(A(ip))),
        (RecordType::AAAA, IpAddr::V6(ip)) => Some(RData::AAAA(AAAA(ip))),
        _ => None, // NOERROR, no records: the name exists
    };
    if let Some(rdata) = rdata {
        response.add_answer(Record::from_rdata(question.name().clone(), TTL, rdata));
    }
    metrics().dns_query(DnsResult::Local);
    match response.to_vec() {
        Ok(bytes) => Answer::Local(bytes),
        Err(_) => Answer::Local(servfail(&query)),
    }
}

#[derive(Debug, Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// A response whose question section is the query's (or an error answer without one, which a
/// server may send for a query it could not read).
fn answers(response: &[u8], query: &Message) -> bool {
    Message::from_vec(response).is_ok_and(|r| {
        r.message_type() == MessageType::Response
            && (r.queries() == query.queries()
                || (r.queries().is_empty() && r.response_code() != ResponseCode::NoError))
    })
}

/// One query to `server` over TCP.
async fn exchange_tcp(server: SocketAddr, packet: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = crate::socket_mark::connect(server).await?;
    write_framed(&mut stream, packet).await?;
    read_framed(&mut stream).await
}

/// A DNS message over TCP: two bytes of length, then the message (RFC 1035 4.2.2).
async fn read_framed(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = usize::from(stream.read_u16().await?);
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| io::Error::other("DNS message too large for TCP"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// What to do with a query.
pub enum Answer {
    Local(Vec<u8>),
    Forward(Message),
    Malformed,
}

fn reply(query: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for q in query.queries() {
        response.add_query(q.clone());
    }
    response
}

fn servfail(query: &Message) -> Vec<u8> {
    reply(query, ResponseCode::ServFail).to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{self, CompileOptions, Ipam};
    use crate::live::{Snapshot, TlsClients};
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn proxy() -> Arc<DnsProxy> {
        let mut loaded = crate::resources::Loaded::default();
        let yaml = "type: MeshExternalService\nname: httpbin\nspec:\n  match: {port: 80}\n  endpoints: [{address: 10.0.0.1, port: 80}]\n";
        crate::resources::load_str(std::path::Path::new("t.yaml"), yaml, &mut loaded);
        let compiled = catalog::compile(
            &loaded.resources,
            &CompileOptions::default(),
            &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap()),
        );
        let snapshot = Snapshot::new(compiled.catalog, TlsClients::default(), None, &Arc::default());
        DnsProxy::new(Arc::new(arc_swap::ArcSwap::from_pointee(snapshot)), Forwarders::default(), DnsLimits::default())
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    fn local(answer: Answer) -> Message {
        match answer {
            Answer::Local(bytes) => Message::from_vec(&bytes).unwrap(),
            Answer::Forward(_) => panic!("forwarded"),
            Answer::Malformed => panic!("malformed"),
        }
    }

    #[test]
    fn known_name_gets_its_vip_case_insensitively() {
        let m = local(proxy().answer_locally(&query("HttpBin.ExtSvc.Mesh.Local.", RecordType::A)));
        assert_eq!(m.id(), 4242);
        assert!(m.authoritative());
        assert_eq!(m.response_code(), ResponseCode::NoError);
        let answers = m.answers();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].ttl(), TTL);
        assert_eq!(answers[0].data(), &RData::A(A("242.0.0.1".parse().unwrap())));
    }

    #[test]
    fn aaaa_for_a_known_name_is_empty_noerror() {
        let m = local(proxy().answer_locally(&query("httpbin.extsvc.mesh.local.", RecordType::AAAA)));
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
    }

    #[test]
    fn unknown_names_are_forwarded_and_fail_without_resolvers() {
        let p = proxy();
        let Answer::Forward(q) = p.answer_locally(&query("example.com.", RecordType::A)) else {
            panic!("not forwarded")
        };
        let bytes = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(p.forward(
            &query("example.com.", RecordType::A),
            &q,
            Transport::Udp,
        ));
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!(m.response_code(), ResponseCode::ServFail);
        assert_eq!(m.id(), 4242);
    }

    #[test]
    fn malformed_packets_are_dropped() {
        assert!(matches!(proxy().answer_locally(b"\x00\x01garbage"), Answer::Malformed));
        assert!(matches!(proxy().answer_locally(&[]), Answer::Malformed));
    }
}
