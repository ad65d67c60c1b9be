//! An application's request body as the proxy's server reads it, with what waits for its end.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::RecvStream;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h2::RecvBody;

/// Told once that a request body has ended, failed or been dropped (the HTTP/1 head deadline
/// waits for it: hyper reads no next head before the body has ended).
pub trait EndWatch: Send + Sync {
    fn ended(&self);
}

/// An application's request body.
pub struct AppBody {
    inner: Inner,
    watch: Option<Arc<dyn EndWatch>>,
    /// What the request's timeouts await ([`AppBody::end_watch`]).
    end: Option<Arc<BodyEnd>>,
}

/// How far a request body has come, for the timeouts that count from its end (Envoy's route
/// and per-try timeouts start when the request has all arrived) and for outlier detection (a
/// timeout during a slow upload is not the endpoint's doing).
#[derive(Debug, Default)]
pub struct BodyEnd {
    /// Frames arrived so far: a timeout waiting for the end sees whether the body still moves.
    frames: AtomicU32,
    /// The last read found no frame: the body waits for the application, not for a reader.
    waiting_for_application: AtomicBool,
    state: AtomicU8,
    /// Something waits (or has waited) in [`BodyEnd::ended`]: the end must notify.
    watched: AtomicBool,
    ended: tokio::sync::Notify,
}

/// Read by hyper's HTTP/1 server, or from h2's stream (`proxy::http`'s HTTP/2 server).
enum Inner {
    Http1(Incoming),
    Http2(RecvBody),
}

/// Why an application's request body failed.
#[derive(Debug, thiserror::Error)]
pub enum AppBodyError {
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    /// The application reset its stream, or its connection failed.
    #[error("the application's HTTP/2 stream failed: {0}")]
    Http2(#[source] h2::Error),
}

impl AppBodyError {
    /// The HTTP/2 reason behind the failure (an application that cancelled its stream: `CANCEL`).
    pub fn http2_reason(&self) -> Option<h2::Reason> {
        match self {
            Self::Http2(error) => error.reason(),
            Self::Http1(error) => super::h2::reason_in(error),
        }
    }
}

const ARRIVING: u8 = 0;
const COMPLETE: u8 = 1;
const CUT: u8 = 2;

impl BodyEnd {
    /// The whole body arrived (not: it failed, or was dropped first).
    pub fn is_complete(&self) -> bool {
        self.state.load(Ordering::SeqCst) == COMPLETE
    }

    pub fn frames(&self) -> u32 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Whether the body's reader waits for the application to send more (rather than the body
    /// waiting, unread, for its reader: an endpoint that does not read, a request queued).
    pub fn waits_for_application(&self) -> bool {
        self.waiting_for_application.load(Ordering::Relaxed)
    }

    /// Completes once the body has ended, whole or not.
    pub async fn ended(&self) {
        // Most bodies (a gRPC call's one message) have ended before anything waits.
        if self.state.load(Ordering::SeqCst) != ARRIVING {
            return;
        }
        self.watched.store(true, Ordering::SeqCst);
        let notified = self.ended.notified();
        tokio::pin!(notified);
        // Registered before the state is read again, so an end in between still wakes it; an
        // end that saw no watcher yet is seen here.
        notified.as_mut().enable();
        if self.state.load(Ordering::SeqCst) == ARRIVING {
            notified.await;
        }
    }

    fn end(&self, complete: bool) {
        self.state.store(if complete { COMPLETE } else { CUT }, Ordering::SeqCst);
        // No waiter, no lock: `ended` reads the state after saying it waits.
        if self.watched.load(Ordering::SeqCst) {
            self.ended.notify_waiters();
        }
    }
}

impl AppBody {
    /// An HTTP/1 request's body, as hyper reads it. `watch`: told when the body ends (give none
    /// for a body that has already).
    pub fn new(inner: Incoming, watch: Option<Arc<dyn EndWatch>>) -> Self {
        Self { inner: Inner::Http1(inner), watch, end: None }
    }

    /// An HTTP/2 request's body, read from its stream; `content_length`: the request's.
    pub fn http2(recv: RecvStream, content_length: Option<u64>) -> Self {
        Self { inner: Inner::Http2(RecvBody::new(recv, content_length)), watch: None, end: None }
    }

    /// What tells how far the body has come; `None`: it has all arrived already.
    pub fn end_watch(&mut self) -> Option<Arc<BodyEnd>> {
        if self.inner.is_end_stream() {
            return None;
        }
        Some(self.end.insert(Arc::default()).clone())
    }

    /// Its reader gave up (a retry's body takes over): no read waits for the application now.
    pub fn reader_gone(&self) {
        if let Some(end) = &self.end {
            end.waiting_for_application.store(false, Ordering::Relaxed);
        }
    }

    /// The body ended (`complete`: all of it arrived).
    fn end(&mut self, complete: bool) {
        if let Some(watch) = self.watch.take() {
            watch.ended();
        }
        if let Some(end) = self.end.take() {
            end.end(complete);
        }
    }
}

/// A body nothing waits for.
#[cfg(test)]
impl From<Incoming> for AppBody {
    fn from(inner: Incoming) -> Self {
        Self::new(inner, None)
    }
}

impl Drop for AppBody {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl std::fmt::Debug for AppBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let http2 = matches!(self.inner, Inner::Http2(_));
        f.debug_struct("AppBody").field("http2", &http2).field("watched", &self.watch.is_some()).finish()
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = AppBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.inner.poll_frame(cx);
        if let Some(end) = &self.end {
            end.waiting_for_application.store(polled.is_pending(), Ordering::Relaxed);
        }
        let frame = ready!(polled);
        match &frame {
            Some(Err(_)) => self.end(false),
            None => self.end(true),
            // Trailers end a body, though hyper's `is_end_stream` may not say so yet.
            Some(Ok(frame)) if frame.is_trailers() || self.inner.is_end_stream() => self.end(true),
            Some(Ok(_)) => {
                if let Some(end) = &self.end {
                    // One writer: no read-modify-write needed.
                    end.frames.store(end.frames().wrapping_add(1), Ordering::Relaxed);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Inner {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, AppBodyError>>> {
        match self {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(AppBodyError::Http1),
            // RST_STREAM(NO_ERROR) asks for no more of the request (RFC 9113 §8.1): it ends the
            // body without failing it, as hyper's server had it.
            Self::Http2(body) => match ready!(body.poll_frame(cx)) {
                Some(Err(error)) if error.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
                frame => Poll::Ready(frame.map(|frame| frame.map_err(AppBodyError::Http2))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request body of `sent` bytes, then `end`, read by `AppBody::http2` on h2's
    /// server (a 64 KiB stream window): what it read, and whether it failed.
    async fn read_http2_body(sent: usize, end: Option<h2::Reason>) -> (usize, bool) {
        let (app, proxy) = tokio::io::duplex(256 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(proxy).await.unwrap();
            let (request, _respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut body = AppBody::http2(request.into_body(), None);
            let (mut read, mut failed) = (0, false);
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                match frame {
                    Ok(frame) => read += frame.data_ref().map_or(0, Bytes::len),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            (read, failed)
        });
        let (mut client, connection) = h2::client::handshake(app).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("http://app/").body(()).unwrap();
        let (_response, mut stream) = client.send_request(request, false).unwrap();
        // Sent whole: h2 holds what the window does not allow yet.
        stream.send_data(Bytes::from(vec![b'x'; sent]), false).unwrap();
        match end {
            Some(reason) => stream.send_reset(reason),
            None => stream.send_data(Bytes::new(), true).unwrap(),
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), server).await.unwrap().unwrap()
    }

    /// The stream's window is given back as the body is read (200 KiB through a 64 KiB window),
    /// and `RST_STREAM(NO_ERROR)` ends a body without failing it, as hyper's server had it.
    #[tokio::test]
    async fn an_http2_body_gives_its_window_back_and_ends_at_a_no_error_reset() {
        assert_eq!(read_http2_body(200 * 1024, None).await, (200 * 1024, false));
        // (h2 may drop what the reset stream had buffered: only the failure is compared.)
        assert!(!read_http2_body(1024, Some(h2::Reason::NO_ERROR)).await.1);
        assert!(read_http2_body(1024, Some(h2::Reason::CANCEL)).await.1);
    }

    /// A waiter is woken by the end, and one that comes after it does not wait.
    #[tokio::test]
    async fn the_end_wakes_its_waiter_and_a_late_one_does_not_wait() {
        let body = Arc::new(BodyEnd::default());
        let waiter = tokio::spawn({
            let body = body.clone();
            async move { body.ended().await }
        });
        tokio::task::yield_now().await; // the waiter registers
        body.end(true);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert!(body.is_complete());
        tokio::time::timeout(std::time::Duration::from_secs(10), body.ended()).await.unwrap();
        let cut = BodyEnd::default();
        cut.end(false);
        cut.ended().await;
        assert!(!cut.is_complete());
    }
}
