//! An application's request body as the proxy's server reads it, with what waits for its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::watch;

/// Told once that a request body has ended, failed or been dropped (the HTTP/1 head deadline
/// waits for it: hyper reads no next head before the body has ended).
pub trait EndWatch: Send + Sync {
    fn ended(&self);
}

/// An application's request body.
pub struct AppBody {
    inner: Incoming,
    watch: Option<Arc<dyn EndWatch>>,
    /// Told how the body ended ([`AppBody::watch_end`]).
    end: Option<watch::Sender<BodyEnd>>,
}

/// How far an application's request body has come ([`AppBody::watch_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    Arriving,
    /// All of it arrived.
    Complete,
    /// It failed, or was dropped before its end.
    Cut,
}

impl AppBody {
    /// `watch`: told when the body ends (give none for a body that has already).
    pub fn new(inner: Incoming, watch: Option<Arc<dyn EndWatch>>) -> Self {
        Self { inner, watch, end: None }
    }

    /// How the body ends, as it does; `None`: it has all arrived already. (A timeout counts
    /// against the endpoint only once the body is complete: a slow upload is not its doing.)
    pub fn watch_end(&mut self) -> Option<watch::Receiver<BodyEnd>> {
        if self.inner.is_end_stream() {
            return None;
        }
        let (tx, rx) = watch::channel(BodyEnd::Arriving);
        self.end = Some(tx);
        Some(rx)
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(watch) = self.watch.take() {
            watch.ended();
        }
        if let Some(end) = self.end.take() {
            end.send_replace(how);
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
        self.end(BodyEnd::Cut);
    }
}

impl std::fmt::Debug for AppBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppBody").field("inner", &self.inner).field("watched", &self.watch.is_some()).finish()
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.end(BodyEnd::Cut),
            None => self.end(BodyEnd::Complete),
            // Trailers end a body, though hyper's `is_end_stream` may not say so yet.
            Some(Ok(frame)) if frame.is_trailers() || self.inner.is_end_stream() => self.end(BodyEnd::Complete),
            Some(Ok(_)) => {}
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
