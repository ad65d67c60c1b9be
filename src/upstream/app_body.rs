//! An application's request body as the proxy's server reads it, with what waits for its end.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Told once that a request body has ended, failed or been dropped (the HTTP/1 head deadline
/// waits for it: hyper reads no next head before the body has ended).
pub trait EndWatch: Send + Sync {
    fn ended(&self);
}

/// An application's request body.
pub struct AppBody {
    inner: Incoming,
    watch: Option<Arc<dyn EndWatch>>,
    /// Set once the whole body has arrived ([`AppBody::complete_flag`]).
    complete: Option<Arc<AtomicBool>>,
}

impl AppBody {
    /// `watch`: told when the body ends (give none for a body that has already).
    pub fn new(inner: Incoming, watch: Option<Arc<dyn EndWatch>>) -> Self {
        Self { inner, watch, complete: None }
    }

    /// A flag set once the whole body has arrived (not when it fails or is dropped first);
    /// `None`: it has all arrived already. (A timeout counts against the endpoint only once the
    /// body is complete: a slow upload is not its doing.)
    pub fn complete_flag(&mut self) -> Option<Arc<AtomicBool>> {
        if self.inner.is_end_stream() {
            return None;
        }
        Some(self.complete.insert(Arc::default()).clone())
    }

    /// The body ended (`complete`: all of it arrived).
    fn end(&mut self, complete: bool) {
        if let Some(watch) = self.watch.take() {
            watch.ended();
        }
        if let Some(flag) = self.complete.take() {
            flag.store(complete, Ordering::Relaxed);
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
        f.debug_struct("AppBody").field("inner", &self.inner).field("watched", &self.watch.is_some()).finish()
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.end(false),
            None => self.end(true),
            // Trailers end a body, though hyper's `is_end_stream` may not say so yet.
            Some(Ok(frame)) if frame.is_trailers() || self.inner.is_end_stream() => self.end(true),
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
