//! Idle timeouts for application-facing connections: a stream wrapper that stamps the time of
//! its last byte, and a future that completes once no byte has moved for a while. One shared
//! stamp per connection, read only when its timer fires, so the data path pays a clock read per
//! I/O call and no timer reset.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// When a connection last moved a byte.
#[derive(Debug)]
pub struct Activity(AtomicU64);

impl Activity {
    pub fn new() -> Arc<Self> {
        let activity = Arc::new(Self(AtomicU64::new(0)));
        activity.touch();
        activity
    }

    pub fn touch(&self) {
        let millis = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.0.load(Ordering::Relaxed))
    }

    /// Whether nothing has moved for `timeout` (one too large to add to a time: never).
    pub fn quiet_for(&self, timeout: Duration) -> bool {
        self.last().checked_add(timeout).is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Completes once nothing has moved for `timeout` (one too large to add to a time: never).
    pub async fn idle_for(&self, timeout: Duration) {
        loop {
            let Some(deadline) = self.last().checked_add(timeout) else { return std::future::pending().await };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose reads and writes stamp its [`Activity`].
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn idle_completes_only_after_a_quiet_period() {
        let activity = Activity::new();
        let (a, mut b) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(a, activity.clone());
        let idle = activity.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        tokio::time::sleep(Duration::from_secs(8)).await;
        b.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tracked.read_exact(&mut byte).await.unwrap();
        // 8 s passed, then a byte: the quiet period starts again.
        assert!(tokio::time::timeout(Duration::from_secs(9), idle.as_mut()).await.is_err());
        assert!(tokio::time::timeout(Duration::from_secs(2), idle.as_mut()).await.is_ok());
    }

    /// A timeout too large to add to a time (`--connection-idle-timeout 400000000000y`) is never
    /// reached; adding it panicked, in the task that watched the connection's deadlines.
    #[tokio::test]
    async fn a_timeout_too_large_to_add_is_never_reached() {
        use futures_util::FutureExt as _;
        let activity = Activity::new();
        assert!(!activity.quiet_for(Duration::MAX));
        assert!(activity.idle_for(Duration::MAX).now_or_never().is_none());
    }
}
