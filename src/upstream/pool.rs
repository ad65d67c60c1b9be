//! Pooled HTTP connections to endpoints.
//!
//! Keyed by everything that makes a connection safe to share: the target address, the TLS
//! configuration (verification mode, trust, client certificate, ALPN and SNI all come from it)
//! and the HTTP version. HTTP/1 connections are taken exclusively and returned when a response
//! is complete; one HTTP/2 connection per key carries every stream (single-flight connect).

use std::collections::HashMap;
use std::future::Future;
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::worker::{self, Line};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;

use super::replay::ReplayBody;
use super::{AppBody, AppBodyError, TargetAddr, UpstreamHandle};

/// A request body on its way to an endpoint, its bytes counted as they pass (the upstream's
/// `upstream_bytes_sent`).
pub struct RequestBody {
    inner: Source,
    upstream: UpstreamHandle,
    /// For the access log, when it is on.
    sent: Option<Arc<AtomicU64>>,
    /// When the body is still to be sent: its half of the connection's way back to the pool.
    pool_return: Option<Arc<SharedReturn>>,
    /// A mirror's copy of the body (RequestMirror); dropped when the mirror falls behind.
    tee: Option<Tee>,
}

/// Frames of a body copied for a mirrored request.
pub const MIRROR_QUEUE: usize = 16;

/// A mirrored request's copy of its original's body, frame by frame. Only a copy that got
/// [`Copied::End`] ends cleanly: one cut short (the mirror fell behind, the original's body
/// failed or was handed to a retry) fails, so the mirror's endpoint never takes part of a body
/// for all of it.
#[derive(Debug)]
pub enum Copied {
    Data(Bytes),
    End,
}

/// A mirror's copy of a body as it passes: its frames, then [`Copied::End`] once the body is
/// whole. The queue's last slot is kept for the end.
struct Tee {
    to: tokio::sync::mpsc::Sender<Copied>,
    /// What the body's exact size says is still to come (`None`: not known).
    remaining: Option<u64>,
}

impl Tee {
    /// Copies `data`; false when the mirror fell behind (the copy then fails).
    fn copy(&mut self, data: &Bytes) -> bool {
        if self.to.capacity() <= 1 || self.to.try_send(Copied::Data(data.clone())).is_err() {
            return false;
        }
        self.remaining = self.remaining.map(|r| r.saturating_sub(data.len() as u64));
        true
    }
}

impl Drop for Tee {
    /// The end goes with the last of a body whose exact size has all passed, even when the body
    /// is not polled to its end (hyper's HTTP/1 client stops at its `Content-Length`).
    fn drop(&mut self) {
        if self.remaining == Some(0) {
            let _ = self.to.try_send(Copied::End);
        }
    }
}

/// Why a request body did not reach its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading the application's body failed (malformed framing, its stream reset).
    #[error(transparent)]
    App(#[from] AppBodyError),
    /// Given up before its end: the endpoint must not take what it got for the whole body.
    #[error("the request body was given up before its end: {0}")]
    Abandoned(&'static str),
}

/// Straight from the application, or through a copy kept for retries, or a mirror's copy.
enum Source {
    Direct(AppBody),
    Replay(ReplayBody),
    Mirror(tokio::sync::mpsc::Receiver<Copied>),
    /// A retry of a request that had no body.
    Empty,
}

impl Source {
    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(b) => b.is_end_stream(),
            Self::Replay(b) => b.is_end_stream(),
            Self::Mirror(_) => false,
            Self::Empty => true,
        }
    }
}

impl RequestBody {
    pub fn new(inner: AppBody, upstream: UpstreamHandle, sent: Option<Arc<AtomicU64>>) -> Self {
        Self { inner: Source::Direct(inner), upstream, sent, pool_return: None, tee: None }
    }

    /// Copies the body's data to a mirrored request as it passes.
    pub fn tee(&mut self, to: tokio::sync::mpsc::Sender<Copied>) {
        self.tee = Some(Tee { to, remaining: self.size_hint().exact() });
    }

    /// A mirrored request's body: the frames the primary's body copies.
    pub fn mirror(from: tokio::sync::mpsc::Receiver<Copied>, upstream: UpstreamHandle) -> Self {
        Self { inner: Source::Mirror(from), upstream, sent: None, pool_return: None, tee: None }
    }

    /// A retry's body when the request had none.
    pub fn empty(upstream: UpstreamHandle, sent: Option<Arc<AtomicU64>>) -> Self {
        Self { inner: Source::Empty, upstream, sent, pool_return: None, tee: None }
    }

    /// One attempt's body of a request that may be retried.
    pub fn replay(inner: ReplayBody, upstream: UpstreamHandle, sent: Option<Arc<AtomicU64>>) -> Self {
        Self { inner: Source::Replay(inner), upstream, sent, pool_return: None, tee: None }
    }

    /// Where its bytes are counted, for another body of the same request.
    pub fn upstream(&self) -> UpstreamHandle {
        self.upstream.clone()
    }

    pub fn sent(&self) -> Option<Arc<AtomicU64>> {
        self.sent.clone()
    }

    /// Makes the connection's return to the pool wait for this body to be sent too (a slow
    /// upload must not hold up the next request that takes the connection). Returns the
    /// response side's half; `None` when the body is already complete.
    pub fn share_pool_return(&mut self) -> Option<Arc<SharedReturn>> {
        if self.inner.is_end_stream() {
            return None;
        }
        let shared = Arc::new(SharedReturn::default());
        self.pool_return = Some(shared.clone());
        Some(shared)
    }
}

/// An HTTP/1 connection that goes back to its pool once it is idle.
pub struct PoolReturn {
    pub pool: UpstreamHandle,
    pub key: PoolKey,
    pub sender: H1Sender,
}

impl PoolReturn {
    fn put(self) {
        self.pool.pool.put_h1(self.key, self.sender);
    }
}

/// An HTTP/1 connection and when it was opened (for `maxConnectionDuration`).
pub struct H1Sender {
    pub sender: http1::SendRequest<RequestBody>,
    pub opened: Instant,
    /// How long it sat in the pool before this use; `None`: a new connection.
    pub idle_for: Option<Duration>,
}

/// A connection's way back to the pool when both the response and the request body must be
/// complete first: whichever finishes second returns it.
#[derive(Default)]
pub struct SharedReturn {
    finished: AtomicU8,
    connection: Mutex<Option<PoolReturn>>,
}

impl SharedReturn {
    /// The response side hands the connection over once the response head has arrived.
    pub fn set(&self, connection: PoolReturn) {
        if let Ok(mut slot) = self.connection.lock() {
            *slot = Some(connection);
        }
    }

    /// One side is complete; the second one returns the connection.
    pub fn finish(&self) {
        if self.finished.fetch_add(1, Ordering::AcqRel) == 1 {
            if let Some(connection) = self.connection.lock().ok().and_then(|mut slot| slot.take()) {
                connection.put();
            }
        }
    }
}

/// Where a connection of [`super::h1`] goes back once its response body has ended.
pub struct OwnReturn {
    pub pool: UpstreamHandle,
    pub key: PoolKey,
}

impl OwnReturn {
    pub fn put(self, conn: super::h1::Conn) {
        self.pool.pool.put_own(self.key, conn);
    }
}

/// How a response gives its HTTP/1 connection back.
pub enum ReturnTicket {
    /// The request body was complete: the connection goes back when the response is.
    Alone(PoolReturn),
    /// The request body may still be streaming.
    Shared(Arc<SharedReturn>),
    /// A connection of [`super::h1`]: the response body holds it and gives it back.
    Own(OwnReturn),
}

impl ReturnTicket {
    /// The response is complete.
    pub fn response_done(self) {
        match self {
            Self::Alone(connection) => connection.put(),
            Self::Shared(shared) => shared.finish(),
            Self::Own(_) => {}
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = match &mut self.inner {
            Source::Direct(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::App),
            Source::Replay(b) => Pin::new(b).poll_frame(cx),
            Source::Mirror(r) => match r.poll_recv(cx) {
                Poll::Ready(Some(Copied::Data(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Poll::Ready(Some(Copied::End)) => {
                    self.inner = Source::Empty;
                    Poll::Ready(None)
                }
                Poll::Ready(None) => Poll::Ready(Some(Err(BodyError::Abandoned("the original's copy was cut short")))),
                Poll::Pending => Poll::Pending,
            },
            Source::Empty => Poll::Ready(None),
        };
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if let Some(data) = f.data_ref() {
                // A mirror that cannot keep up loses its copy, never delays the primary.
                if self.tee.as_mut().is_some_and(|tee| !tee.copy(data)) {
                    self.tee = None;
                }
                self.upstream.metrics.bytes_sent.inc_by(data.len() as u64);
                if let Some(sent) = &self.sent {
                    sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
        }
        // Complete (not failed): the request side is done with the connection.
        let complete = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            _ => false,
        };
        if complete {
            if let Some(shared) = self.pool_return.take() {
                shared.finish();
            }
            if let Some(mut tee) = self.tee.take() {
                tee.remaining = Some(0); // whole: the end goes as it drops
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Direct(b) => b.size_hint(),
            Source::Replay(b) => b.size_hint(),
            Source::Mirror(_) => SizeHint::default(),
            Source::Empty => SizeHint::with_exact(0),
        }
    }
}

/// How long an idle HTTP/1 connection is kept: Envoy's default idle timeout, and Kuma's
/// MeshTimeout `idleTimeout` default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Idle HTTP/1 connections kept per key.
const MAX_IDLE_PER_KEY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub target: TargetAddr,
    /// The endpoint the address comes from (its position): two DNS endpoints of one service
    /// that resolve to one address get connections of their own, each made (SNI, certificate
    /// check) for its own name, as Envoy's hosts each have their own pools.
    endpoint: usize,
    pub tls: TlsIdentity,
    pub http2: bool,
    /// The worker's slot ([`crate::worker::slot`]): a connection's driver task lives on the
    /// runtime that opened it, so sharing it across workers would hand every request to another
    /// thread.
    pub worker: usize,
}

impl PoolKey {
    /// The key of this worker's connections to `target` made with the TLS client `tls`.
    pub fn new(target: &super::Target, tls: TlsIdentity, http2: bool) -> Self {
        Self { target: target.addr.clone(), endpoint: target.endpoint, tls, http2, worker: worker::slot() }
    }
}

/// The TLS client a connection was made with: a number each client configuration gets when it
/// is built and no other ever gets (`None`: plaintext). Unlike the configuration's address, which
/// a later configuration with other verification settings could be given once it is freed, it
/// can never match a connection made under other settings; and unlike an `Arc` of it, a key
/// made for every request writes no reference count that every worker shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TlsIdentity(Option<NonZeroU64>);

impl TlsIdentity {
    /// An identity no configuration had before.
    pub fn fresh() -> Self {
        static LAST: AtomicU64 = AtomicU64::new(0);
        Self(NonZeroU64::new(LAST.fetch_add(1, Ordering::Relaxed) + 1))
    }

    /// 0 for plaintext.
    fn number(self) -> u64 {
        self.0.map_or(0, NonZeroU64::get)
    }
}

/// A pool's connections of one worker. foldhash: a key is hashed twice per request (take and
/// return), and SipHash of a key was 3% of an HTTP/1.1 request's instructions.
#[derive(Default)]
struct Shard {
    h1: IdleMap<H1Sender>,
    /// Connections for requests without a body, read by the request's own task ([`super::h1`]).
    own: IdleMap<super::h1::Conn>,
    h2: Mutex<HashMap<PoolKey, H2Slot, FastHash>>,
}

type FastHash = foldhash::fast::RandomState;

/// A key's HTTP/2 connections: one, unless the endpoint's stream limit made the pool open more.
type H2Slot = Arc<tokio::sync::Mutex<H2Conns>>;

#[derive(Default)]
struct H2Conns {
    open: Vec<H2Conn>,
    /// Set when another connection could not be opened (a limit, a failed connect): until
    /// then, requests wait for a stream on an open one rather than each try, and wait for, a
    /// connect of its own in turn.
    no_more_until: Option<Instant>,
}

/// How long requests wait on open connections after another one could not be opened.
const NO_MORE_CONNECTIONS_FOR: Duration = Duration::from_secs(5);

/// A shared HTTP/2 connection in the pool.
struct H2Conn {
    client: super::h2::Client,
    opened: Instant,
    /// When the sweeper last saw it used: one unused for the idle timeout is closed.
    used_at: Instant,
}

impl H2Conn {
    /// For the sweeper: open, and used since it last looked or within the idle timeout.
    fn still_wanted(&mut self, now: Instant, idle_timeout: Duration) -> bool {
        let used = !self.client.idle_since_last_asked();
        if used {
            self.used_at = now;
        }
        !self.client.is_closed() && (used || now.saturating_duration_since(self.used_at) < idle_timeout)
    }
}
/// Idle HTTP/1 connections of one kind, each with when it became idle.
type IdleMap<C> = Mutex<HashMap<PoolKey, Vec<(C, Instant)>, FastHash>>;

/// An HTTP/1 connection that can wait in the pool: hyper's client, or [`super::h1`]'s.
trait IdleConn {
    fn opened(&self) -> Instant;
    /// The endpoint closed it, as far as can be seen without waiting.
    fn closed(&mut self) -> bool;
    fn set_idle_for(&mut self, idle: Duration);
}

impl IdleConn for H1Sender {
    fn opened(&self) -> Instant {
        self.opened
    }

    fn closed(&mut self) -> bool {
        self.sender.is_closed()
    }

    fn set_idle_for(&mut self, idle: Duration) {
        self.idle_for = Some(idle);
    }
}

impl IdleConn for super::h1::Conn {
    fn opened(&self) -> Instant {
        super::h1::Conn::opened(self)
    }

    fn closed(&mut self) -> bool {
        super::h1::Conn::closed(self)
    }

    fn set_idle_for(&mut self, idle: Duration) {
        super::h1::Conn::set_idle_for(self, idle);
    }
}

/// No limit, in [`Pool`]'s nanosecond settings.
const UNLIMITED: u64 = u64::MAX;

pub struct Pool {
    /// Nanoseconds an idle connection is kept (MeshTimeout `idleTimeout`, else `--idle-timeout`).
    idle_timeout: AtomicU64,
    /// Told when the idle timeout changes: the sweeper, asleep for half the old one (up to a
    /// minute), goes by the new one at once.
    idle_timeout_changed: Arc<tokio::sync::Notify>,
    /// Nanoseconds a connection is used for new requests (`http.maxConnectionDuration`).
    max_lifetime: AtomicU64,
    /// One per worker slot: a worker takes and returns connections under its own lock, on its
    /// own cache lines (its keys hold its slot, so no connection is in another worker's shard).
    shards: Box<[Line<Shard>]>,
    /// The connection pools in use (MeshCircuitBreaker `maxConnectionPools`): one per key.
    pools: Mutex<std::collections::HashSet<PoolKey>>,
    /// The TLS client of the configuration in force ([`Pool::use_tls`]). Requests that began
    /// under an earlier one still finish on connections made with theirs, but those are not
    /// kept: no later request could take them, and idle they would hold connection slots
    /// (`maxConnections`, `maxConnectionPools`) until the idle timeout.
    tls: AtomicU64,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_TIMEOUT)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle_timeout", &self.idle_timeout().0).finish()
    }
}

fn nanos(d: Option<Duration>) -> u64 {
    d.map_or(UNLIMITED, |d| u64::try_from(d.as_nanos()).unwrap_or(UNLIMITED))
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Self {
        Self::with_shards(idle_timeout, worker::slots())
    }

    fn with_shards(idle_timeout: Duration, shards: usize) -> Self {
        Self {
            idle_timeout: AtomicU64::new(nanos(Some(idle_timeout))),
            idle_timeout_changed: Arc::default(),
            max_lifetime: AtomicU64::new(UNLIMITED),
            shards: (0..shards.max(1)).map(|_| Line::default()).collect(),
            pools: Mutex::default(),
            tls: AtomicU64::new(0),
        }
    }

    /// Makes `tls` the TLS client of new connections; when it is another one than before, the
    /// pooled connections, made with the other, are closed (idle HTTP/1 ones at once, shared
    /// HTTP/2 ones once their last in-flight stream ends).
    pub fn use_tls(&self, tls: TlsIdentity) {
        if self.tls.swap(tls.number(), Ordering::AcqRel) != tls.number() {
            self.clear();
        }
    }

    /// Whether connections of `key` were made with the TLS client in force.
    fn current(&self, key: &PoolKey) -> bool {
        key.tls.number() == self.tls.load(Ordering::Acquire)
    }

    /// The calling worker's connections.
    fn shard(&self) -> &Shard {
        self.shard_at(worker::slot())
    }

    /// The connections of the worker in `slot` (a key's `worker`).
    fn shard_at(&self, slot: usize) -> &Shard {
        &self.shards[slot % self.shards.len()].0
    }

    fn each_shard(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().map(|line| &line.0)
    }

    /// Whether a new connection for `key` may be made: its pool exists, or fewer than `max`
    /// pools do (then it is created).
    pub fn admit(&self, key: &PoolKey, max: Option<usize>) -> bool {
        let Some(max) = max else { return true };
        let Ok(mut pools) = self.pools.lock() else { return true };
        if pools.contains(key) {
            return true;
        }
        if pools.len() >= max {
            return false;
        }
        pools.insert(key.clone());
        true
    }

    /// Applies a configuration's timeouts (`None`: no limit).
    pub fn set_timeouts(&self, idle: Option<Duration>, max_lifetime: Option<Duration>) {
        if self.idle_timeout.swap(nanos(idle), Ordering::Relaxed) != nanos(idle) {
            self.idle_timeout_changed.notify_one();
        }
        self.max_lifetime.store(nanos(max_lifetime), Ordering::Relaxed);
    }

    /// The idle timeout, and what tells when it changes.
    pub fn idle_timeout(&self) -> (Duration, Arc<tokio::sync::Notify>) {
        (Duration::from_nanos(self.idle_timeout.load(Ordering::Relaxed)), self.idle_timeout_changed.clone())
    }

    fn young(&self, opened: Instant) -> bool {
        let max = self.max_lifetime.load(Ordering::Relaxed);
        max == UNLIMITED || opened.elapsed() < Duration::from_nanos(max)
    }

    /// An idle hyper HTTP/1 connection that is still open and not past the idle timeout.
    pub fn take_h1(&self, key: &PoolKey) -> Option<H1Sender> {
        self.take(&self.shard().h1, key)
    }

    /// An idle connection for a request without a body, still open, not past the idle timeout.
    pub fn take_own(&self, key: &PoolKey) -> Option<super::h1::Conn> {
        self.take(&self.shard().own, key)
    }

    pub fn put_h1(&self, key: PoolKey, sender: H1Sender) {
        // hyper's connection task has already noticed a close: no need to keep it.
        if !sender.sender.is_closed() {
            self.put(&self.shard().h1, key, sender);
        }
    }

    pub fn put_own(&self, key: PoolKey, conn: super::h1::Conn) {
        self.put(&self.shard().own, key, conn);
    }

    fn take<C: IdleConn>(&self, map: &IdleMap<C>, key: &PoolKey) -> Option<C> {
        let mut idle = map.lock().ok()?;
        let list = idle.get_mut(key)?;
        while let Some((mut conn, since)) = list.pop() {
            if self.reusable(&mut conn, since) {
                conn.set_idle_for(since.elapsed());
                return Some(conn);
            }
        }
        None
    }

    fn put<C: IdleConn>(&self, map: &IdleMap<C>, key: PoolKey, conn: C) {
        if !self.young(conn.opened()) {
            return;
        }
        let Ok(mut idle) = map.lock() else { return };
        // Checked under the lock: `use_tls` clears the map after it changes the client in force,
        // so a connection put here is either current or cleared.
        if !self.current(&key) {
            return;
        }
        let list = idle.entry(key).or_default();
        if list.len() < MAX_IDLE_PER_KEY {
            list.push((conn, Instant::now()));
        }
    }

    /// Closes the connections of `map` that are no longer [`Pool::reusable`].
    fn sweep_idle<C: IdleConn>(&self, map: &IdleMap<C>) {
        if let Ok(mut idle) = map.lock() {
            idle.retain(|_, list| {
                list.retain_mut(|(conn, since)| self.reusable(conn, *since));
                !list.is_empty()
            });
        }
    }

    /// Not idle past the timeout, not older than the connection lifetime, and still open (the
    /// cheap checks first: [`super::h1::Conn::closed`] polls the socket).
    fn reusable<C: IdleConn>(&self, conn: &mut C, since: Instant) -> bool {
        since.elapsed() < Duration::from_nanos(self.idle_timeout.load(Ordering::Relaxed))
            && self.young(conn.opened())
            && !conn.closed()
    }

    /// A stream on one of `key`'s shared HTTP/2 connections, connecting when there is none, or
    /// when all hold as many streams as their endpoint allows at once (as Envoy's pool does);
    /// the requests that come meanwhile wait for that connect. If that connection cannot be had
    /// (a limit, a failed connect), the request waits for a stream on the least busy open one,
    /// as do the next ones for [`NO_MORE_CONNECTIONS_FOR`].
    pub async fn h2<E, F, Fut>(&self, key: &PoolKey, connect: F) -> Result<super::h2::Client, E>
    where
        F: FnOnce(Option<usize>) -> Fut,
        Fut: Future<Output = Result<super::h2::Client, E>>,
    {
        // A request begun under an earlier TLS client gets a connection of its own, not kept.
        let slot = match self.shard().h2.lock() {
            Ok(mut map) if self.current(key) => map.entry(key.clone()).or_default().clone(),
            _ => H2Slot::default(),
        };
        let mut conns = slot.lock().await;
        let H2Conns { open, no_more_until } = &mut *conns;
        // A closed or old connection is only forgotten: it closes once its last stream ends.
        open.retain(|conn| !conn.client.is_closed() && self.young(conn.opened));
        if let Some(stream) = open.iter().find_map(|conn| conn.client.reserve()) {
            return Ok(stream);
        }
        let least_busy = |open: &[H2Conn]| {
            let conn = open.iter().min_by_key(|conn| conn.client.streams_held())?;
            Some(conn.client.reserve_waiting())
        };
        if no_more_until.is_some_and(|until| Instant::now() < until) {
            if let Some(stream) = least_busy(open) {
                return Ok(stream);
            }
        }
        // Another connection to the endpoint knows how many streams it allows.
        match connect(open.first().map(|conn| conn.client.stream_limit())).await {
            Ok(client) => {
                let stream = client.reserve_waiting();
                let now = Instant::now();
                open.push(H2Conn { client, opened: now, used_at: now });
                *no_more_until = None;
                Ok(stream)
            }
            Err(error) => {
                let waiting = least_busy(open).ok_or(error)?;
                *no_more_until = Some(Instant::now() + NO_MORE_CONNECTIONS_FOR);
                Ok(waiting)
            }
        }
    }

    /// Forgets every pooled connection (idle HTTP/1 ones close; shared HTTP/2 ones close once
    /// their last in-flight stream ends). Called when the service's TLS settings change.
    pub fn clear(&self) {
        if let Ok(mut pools) = self.pools.lock() {
            pools.clear();
        }
        for shard in self.each_shard() {
            if let Ok(mut idle) = shard.h1.lock() {
                idle.clear();
            }
            if let Ok(mut idle) = shard.own.lock() {
                idle.clear();
            }
            if let Ok(mut h2) = shard.h2.lock() {
                h2.clear();
            }
        }
    }

    /// Closes idle HTTP/1 connections past the idle timeout, forgets closed HTTP/2 ones and
    /// closes those no request used for the idle timeout (as Envoy's pool; before, they stayed
    /// open until the endpoint closed them, and those a burst beyond an endpoint's stream limit
    /// opened would have stayed all).
    pub fn sweep(&self) {
        let idle_timeout = Duration::from_nanos(self.idle_timeout.load(Ordering::Relaxed));
        let now = Instant::now();
        for shard in self.each_shard() {
            self.sweep_idle(&shard.h1);
            self.sweep_idle(&shard.own);
            if let Ok(mut h2) = shard.h2.lock() {
                h2.retain(|_, slot| {
                    // Busy with a new connection: looked at on the next sweep.
                    let Ok(mut conns) = slot.try_lock() else { return true };
                    conns.open.retain_mut(|conn| conn.still_wanted(now, idle_timeout));
                    // A request that took the slot but has not locked it yet keeps it.
                    !conns.open.is_empty() || Arc::strong_count(slot) > 1
                });
            }
        }
        // A pool with nothing idle and no shared connection is gone. A key's connections are
        // only in the shard of the worker it names.
        if let Ok(mut pools) = self.pools.lock() {
            pools.retain(|key| {
                let shard = self.shard_at(key.worker);
                shard.h1.lock().is_ok_and(|h1| h1.contains_key(key))
                    || shard.own.lock().is_ok_and(|own| own.contains_key(key))
                    || shard.h2.lock().is_ok_and(|h2| h2.contains_key(key))
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mirror's copy ends with its body even when the queue's frames fill it (the end has a
    /// slot kept), and when the body is not polled to its end but its exact size has passed;
    /// a copy that falls behind, or whose body was cut short, gets no end.
    #[test]
    fn a_mirror_copy_ends_only_when_the_body_is_whole() {
        let frames = |n: usize| (0..n).map(|_| Bytes::from_static(b"0123456789")).collect::<Vec<_>>();
        let received = |mut from: tokio::sync::mpsc::Receiver<Copied>| {
            let mut got = (0, false);
            while let Ok(copied) = from.try_recv() {
                match copied {
                    Copied::Data(_) => got.0 += 1,
                    Copied::End => got.1 = true,
                }
            }
            got
        };
        let tee = |size: Option<u64>| {
            let (to, from) = tokio::sync::mpsc::channel(MIRROR_QUEUE + 1);
            (Tee { to, remaining: size }, from)
        };
        // A full queue's worth of frames, the whole body.
        let (mut whole, from) = tee(Some(10 * MIRROR_QUEUE as u64));
        assert!(frames(MIRROR_QUEUE).iter().all(|f| whole.copy(f)));
        drop(whole);
        assert_eq!(received(from), (MIRROR_QUEUE, true));
        // One frame more than the queue holds: the mirror fell behind.
        let (mut behind, from) = tee(None);
        assert!(!frames(MIRROR_QUEUE + 1).iter().all(|f| behind.copy(f)));
        drop(behind);
        assert_eq!(received(from), (MIRROR_QUEUE, false));
        // Cut short: half of its size came.
        let (mut short, from) = tee(Some(40));
        assert!(frames(2).iter().all(|f| short.copy(f)));
        drop(short);
        assert_eq!(received(from), (2, false));
    }

    /// An idle connection for the pool tests: never closed.
    struct Idle(Instant);

    impl IdleConn for Idle {
        fn opened(&self) -> Instant {
            self.0
        }
        fn closed(&mut self) -> bool {
            false
        }
        fn set_idle_for(&mut self, _: Duration) {}
    }

    /// After a reload changes the TLS client, a request still under the old one finishes on a
    /// connection made with it, which is then closed instead of kept: no later request could
    /// take it, and idle it would hold connection slots until the idle timeout.
    #[tokio::test]
    async fn connections_of_a_replaced_tls_client_are_not_kept() {
        let pool = Pool::with_shards(DEFAULT_IDLE_TIMEOUT, 1);
        let (old, new) = (TlsIdentity::fresh(), TlsIdentity::fresh());
        let key = |tls| test_key(tls, false);
        let map = IdleMap::<Idle>::default();
        let h2_kept = |tls| pool.shard().h2.lock().unwrap().contains_key(&key(tls));
        let no_h2 = |_| async { Err::<super::super::h2::Client, ()>(()) };
        pool.use_tls(old);
        pool.put(&map, key(old), Idle(Instant::now()));
        assert!(pool.take(&map, &key(old)).is_some(), "the client in force pools its connections");
        assert!(pool.h2(&key(old), no_h2).await.is_err());
        assert!(h2_kept(old));
        pool.use_tls(new);
        assert!(!h2_kept(old), "a new TLS client clears the pool");
        pool.put(&map, key(old), Idle(Instant::now()));
        assert!(pool.take(&map, &key(old)).is_none(), "a connection of the replaced client was kept");
        pool.put(&map, key(new), Idle(Instant::now()));
        assert!(pool.take(&map, &key(new)).is_some());
        // HTTP/2: a request under the old client gets a connection of its own, not kept.
        assert!(pool.h2(&key(old), no_h2).await.is_err());
        assert!(!h2_kept(old));
        assert!(pool.h2(&key(new), no_h2).await.is_err());
        assert!(h2_kept(new));
    }

    /// The pool tests' key: one endpoint, this worker's.
    fn test_key(tls: TlsIdentity, http2: bool) -> PoolKey {
        PoolKey {
            target: TargetAddr::Socket("127.0.0.1:443".parse().unwrap()),
            endpoint: 0,
            tls,
            http2,
            worker: worker::slot(),
        }
    }

    /// An HTTP/2 endpoint on an in-memory pipe, running until the connection closes.
    fn h2_endpoint() -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let endpoint = tokio::spawn(async move {
            let mut server = h2::server::Builder::new().handshake::<_, Bytes>(server_io).await.unwrap();
            while let Some(Ok(_)) = server.accept().await {}
        });
        (client_io, endpoint)
    }

    /// When all of a key's HTTP/2 connections hold as many streams as the endpoint allows and
    /// another cannot be had, the request waits on an open one, and so do the next ones for a
    /// while without trying a connect each (one after another, each up to the connect timeout,
    /// and each failure counted against the endpoint).
    #[tokio::test]
    async fn after_a_connection_could_not_be_had_requests_wait_on_an_open_one() {
        let pool = Pool::with_shards(DEFAULT_IDLE_TIMEOUT, 1);
        let key = test_key(TlsIdentity::default(), true);
        let (client_io, _endpoint) = h2_endpoint();
        // One stream at a time, as if learnt from the endpoint's SETTINGS.
        let first = pool.h2(&key, |_| super::super::h2::Client::handshake(client_io, (), Some(1))).await.unwrap();
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let failing = |_| {
            tries.fetch_add(1, Ordering::Relaxed);
            async { Err::<super::super::h2::Client, ()>(()) }
        };
        let second = pool.h2(&key, &failing).await.expect("waits on the open connection");
        let third = pool.h2(&key, &failing).await.expect("waits on the open connection");
        assert_eq!(tries.load(Ordering::Relaxed), 1, "one connect tried, then none for a while");
        assert_eq!(first.streams_held(), 3);
        drop((second, third));
    }

    /// The sweeper closes an HTTP/2 connection no request used for the idle timeout (here 0:
    /// any time unused counts), and keeps one a request holds a stream of, or took one of
    /// since the last sweep. Before, an HTTP/2 connection stayed until the endpoint closed it.
    #[tokio::test]
    async fn an_http2_connection_unused_for_the_idle_timeout_is_closed() {
        let pool = Pool::with_shards(Duration::ZERO, 1);
        let key = test_key(TlsIdentity::default(), true);
        let (client_io, endpoint) = h2_endpoint();
        let connect = |_| super::super::h2::Client::handshake(client_io, (), None);
        let stream = pool.h2(&key, connect).await.unwrap();
        let kept = || {
            pool.shard()
                .h2
                .lock()
                .unwrap()
                .get(&key)
                .is_some_and(|slot| slot.try_lock().is_ok_and(|conns| !conns.open.is_empty()))
        };
        pool.sweep();
        assert!(kept(), "used since the last sweep");
        pool.sweep();
        assert!(kept(), "a request holds a stream");
        drop(stream);
        pool.sweep();
        assert!(!kept(), "unused since the last sweep, for the idle timeout");
        // No handle left: the connection closes, and the endpoint's accept loop ends.
        tokio::time::timeout(Duration::from_secs(10), endpoint).await.expect("the connection stayed open").unwrap();
    }

    /// Two workers and the control plane each get their own shard, on a cache line of its own:
    /// a worker's take and return lock and write nothing another worker touches.
    #[test]
    fn each_worker_pools_in_its_own_shard_on_its_own_cache_line() {
        let pool = Pool::with_shards(DEFAULT_IDLE_TIMEOUT, 3);
        let shard_of = |pool: &Pool| std::ptr::from_ref(pool.shard()) as usize;
        let workers: Vec<usize> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..2)
                .map(|index| {
                    let pool = &pool;
                    s.spawn(move || {
                        worker::enter(index);
                        shard_of(pool)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("worker thread")).collect()
        });
        let control = shard_of(&pool);
        let mut all = vec![control, workers[0], workers[1]];
        all.sort_unstable();
        assert!(all.windows(2).all(|w| w[1] - w[0] >= 64), "shards share a cache line: {all:x?}");
        assert!(all.iter().all(|a| a % 64 == 0), "a shard is not line-aligned: {all:x?}");
        let expected: Vec<usize> = pool.each_shard().map(|s| std::ptr::from_ref(s) as usize).collect();
        assert_eq!(
            [control, workers[0], workers[1]].to_vec(),
            expected,
            "slot 0 is the control plane, then each worker"
        );
    }
}
