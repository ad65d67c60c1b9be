//! HTTP/1's header-read timeout (`--header-read-timeout`, MeshTimeout
//! `requestHeadersTimeout`): a request head must arrive within it, counted from the end of the
//! previous exchange (its response or its request body, whichever ends last; as hyper, which
//! reads no head before both) or from the connection's first byte, so it is also how long a
//! keep-alive connection waits for its next request. A drain does not lift it.
//!
//! Kept by the connection's watcher task rather than by hyper: hyper allocates, registers and
//! cancels a timer for every request head, 4% of an HTTP/1.1 request's instructions. Here a
//! request costs a counter up and down and a clock read, and the watcher's timer fires once per
//! timeout. HTTP/2 has no such deadline (as with hyper): its connections, told apart by the
//! client preface, are only held to the idle timeout.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::ProxyBody;
use crate::listen::idle::Activity;
use crate::upstream::EndWatch;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// The HTTP/2 client preface, whole: `PRI` is also a valid HTTP/1 method, and hyper-util serves
/// a connection as HTTP/2 only when all of it came (`PRI / HTTP/1.1` is HTTP/1, with a deadline).
pub(super) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const UNDECIDED: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

/// One application connection's requests, as the head deadline sees them.
pub(super) struct Heads {
    /// Responses and request bodies that have not ended.
    open: AtomicU32,
    /// Stamped when a response or a request body ends (and when the connection turns out to
    /// speak HTTP/1): the next head is due a timeout later.
    waiting_since: Arc<Activity>,
    protocol: AtomicU8,
    /// Set once a response switched the connection's protocol (a 101): what follows is a tunnel.
    upgraded: AtomicBool,
}

impl Heads {
    /// `http2`: the listener speaks HTTP/2 only.
    pub(super) fn new(http2: bool) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicU32::new(0),
            waiting_since: Activity::new(),
            protocol: AtomicU8::new(if http2 { HTTP2 } else { UNDECIDED }),
            upgraded: AtomicBool::new(false),
        })
    }

    /// The connection is a tunnel from now on (its response was a 101).
    pub(super) fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// A request begins; it ends when the returned guard (moved into its response body) drops.
    /// Counted on HTTP/2 too: a connection with a request open is not idle.
    pub(super) fn open(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenRequest(self.clone())
    }

    /// A request body begins ([`crate::upstream::AppBody`]): its request stays open until it
    /// ends too, as hyper reads no next head before, and an endpoint may answer an upload before
    /// it has all of it. `None` on HTTP/2.
    pub(super) fn open_body(self: &Arc<Self>) -> Option<Arc<dyn EndWatch>> {
        if self.protocol.load(Ordering::Relaxed) == HTTP2 {
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(self.clone())
    }

    /// Completes when an HTTP/1 connection has had no request open for `timeout` and no head
    /// has arrived.
    pub(super) async fn overdue(&self, timeout: Duration) {
        loop {
            self.waiting_since.idle_for(timeout).await;
            match self.protocol.load(Ordering::Relaxed) {
                HTTP2 => return std::future::pending().await,
                // A request that ended since the stamp was read stamped it again before it
                // left `open`: read the stamp once more.
                HTTP1 if self.open.load(Ordering::Acquire) == 0 => {
                    if self.waiting_since.quiet_for(timeout) {
                        return;
                    }
                }
                // No byte yet (the idle timeout applies), or a response still on its way: look
                // again a timeout later (a response that ends restarts the count).
                _ => tokio::time::sleep(timeout).await,
            }
        }
    }

    /// Completes when the connection is idle for `timeout`: as Envoy's HTTP connection manager
    /// `idle_timeout` (Kuma's MeshTimeout `idleTimeout`), no request open for that long, and no
    /// byte moved either (a request body that outlives its response is not idle). A request
    /// waiting for its response (a long poll) keeps the connection, up to `with_requests`
    /// without a byte either way: the bound on a connection whose requests are stuck where no
    /// stream timer sees them (a client that stopped reading, an endpoint that never answers
    /// with the request timeout off).
    pub(super) async fn idle(&self, activity: &Activity, timeout: Duration, with_requests: Duration) {
        loop {
            activity.idle_for(timeout).await;
            if self.open.load(Ordering::Acquire) == 0 {
                // A request that ended since stamped the clock before it left `open`.
                self.waiting_since.idle_for(timeout).await;
                if self.open.load(Ordering::Acquire) == 0 && activity.quiet_for(timeout) {
                    return;
                }
            } else {
                // Look again after another `timeout`, or close once silent for the bound.
                tokio::select! {
                    () = activity.idle_for(with_requests) => {
                        if self.open.load(Ordering::Acquire) > 0 {
                            return;
                        }
                    }
                    () = tokio::time::sleep(timeout) => {}
                }
            }
        }
    }

    /// The connection's first bytes told its protocol.
    pub(super) fn decide(&self, http2: bool) {
        if !http2 {
            self.waiting_since.touch();
        }
        self.protocol.store(if http2 { HTTP2 } else { HTTP1 }, Ordering::Relaxed);
    }
}

/// A request counted open by [`Heads`].
pub(super) struct OpenRequest(Arc<Heads>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.ended();
    }
}

impl EndWatch for Heads {
    fn ended(&self) {
        // Stamp first: the watcher reads the stamp once it sees nothing open.
        self.waiting_since.touch();
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that ends its request for [`Heads`] when it is dropped (hyper drops it once
/// it is written, or when the exchange is abandoned).
pub(super) struct Served {
    pub(super) body: ProxyBody,
    pub(super) _open: OpenRequest,
}

impl Body for Served {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose first bytes told its protocol.
    fn decided(http2: bool) -> Arc<Heads> {
        let heads = Heads::new(false);
        heads.decide(http2);
        heads
    }

    /// The deadline counts from the end of the last response, never while one is open.
    #[tokio::test(start_paused = true)]
    async fn a_head_is_due_a_timeout_after_the_last_response_ends() {
        use futures_util::FutureExt as _;
        let timeout = Duration::from_secs(30);
        let heads = decided(false);
        let request = heads.open();
        let overdue = heads.overdue(timeout);
        tokio::pin!(overdue);
        // A response streams for 100 s: not overdue.
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(overdue.as_mut().now_or_never().is_none(), "a response is still open");
        drop(request);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(overdue.as_mut().now_or_never().is_none(), "29 s after the response ended");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(overdue.as_mut().now_or_never().is_some(), "31 s after the response ended");
    }

    /// Idle as Envoy counts it: not while a request waits for its response, whatever the
    /// protocol; from the end of the last one.
    #[tokio::test(start_paused = true)]
    async fn a_connection_with_a_request_open_is_not_idle() {
        use futures_util::FutureExt as _;
        let timeout = Duration::from_secs(30);
        for heads in [decided(false), decided(true)] {
            let activity = Activity::new();
            let request = heads.open();
            let idle = heads.idle(&activity, timeout, Duration::from_secs(600));
            tokio::pin!(idle);
            tokio::time::sleep(Duration::from_secs(100)).await;
            assert!(idle.as_mut().now_or_never().is_none(), "a long poll, nothing moving for 100 s");
            drop(request);
            tokio::time::sleep(Duration::from_secs(29)).await;
            assert!(idle.as_mut().now_or_never().is_none(), "29 s after the request ended");
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(idle.as_mut().now_or_never().is_some(), "31 s after the request ended");
        }
        // A request open, nothing moving at all: closed once the connection has been silent
        // for the bound.
        let heads = decided(false);
        let activity = Activity::new();
        let _stuck = heads.open();
        let idle = heads.idle(&activity, timeout, Duration::from_secs(610));
        tokio::pin!(idle);
        tokio::time::sleep(Duration::from_secs(605)).await;
        assert!(idle.as_mut().now_or_never().is_none(), "605 s silent");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(idle.as_mut().now_or_never().is_some(), "611 s silent with a request open");
    }

    #[tokio::test(start_paused = true)]
    async fn http2_and_silent_connections_have_no_head_deadline() {
        use futures_util::FutureExt as _;
        let timeout = Duration::from_secs(30);
        for heads in [decided(true), Heads::new(false), Heads::new(true)] {
            let overdue = heads.overdue(timeout);
            tokio::pin!(overdue);
            tokio::time::sleep(Duration::from_secs(120)).await;
            assert!(overdue.as_mut().now_or_never().is_none());
        }
    }
}
