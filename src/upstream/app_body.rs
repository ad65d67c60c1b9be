//! An application's request body as the proxy's server reads it, with what waits for its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;

/// Told once that a request body has ended, failed or been dropped (the HTTP/1 head deadline
/// waits for it: hyper reads no next head before the body has ended).
pub trait EndWatch: Send + Sync {
    fn ended(&self);
}

/// An application's request body.
pub struct AppBody {
    inner: Incoming,
    watch: Option<Arc<dyn EndWatch>>,
    /// Told when the body has all arrived ([`AppBody::on_complete`]).
    complete: Option<oneshot::Sender<()>>,
}

impl AppBody {
    /// `watch`: told when the body ends (give none for a body that has already).
    pub fn new(inner: Incoming, watch: Option<Arc<dyn EndWatch>>) -> Self {
        Self { inner, watch, complete: None }
    }

    /// Completes with `Ok` once the whole body has arrived, with `Err` if it fails or is
    /// dropped first; `None`: it has arrived already. (MeshTimeout's `requestTimeout` counts
    /// from there, as Envoy's route timeout does.)
    pub fn on_complete(&mut self) -> Option<oneshot::Receiver<()>> {
        if self.inner.is_end_stream() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.complete = Some(tx);
        Some(rx)
    }

    fn end(&mut self) {
        if let Some(watch) = self.watch.take() {
            watch.ended();
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
        self.end();
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
        let failed = matches!(frame, Some(Err(_)));
        if failed || frame.is_none() || self.inner.is_end_stream() {
            self.end();
            if let Some(complete) = self.complete.take().filter(|_| !failed) {
                let _ = complete.send(());
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
