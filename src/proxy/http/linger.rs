//! The lingering close of an application's HTTP connection (RFC 9112 §9.6).
//!
//! When the proxy ends a connection first (an answer before the whole upload was read, such as
//! an endpoint's early 413; `Connection: close`; a drain), the application may still be
//! sending. Closed at once, the socket answers what arrives with a reset, and the reset can
//! reach the application before it read the answer: curl then fails with "Send failure", and a
//! client may lose the answer itself. Here, when hyper or h2 shuts the connection down, the
//! write side is closed (FIN, after the answer) and what the application still sends is read
//! and dropped until it closes its side, for at most [`LINGER_AT_MOST`] (Envoy's
//! `delayed_close_timeout` default). A connection the application already closed ends at the
//! first read, without a timer. A connection upgraded to a tunnel (a 101) is no longer HTTP:
//! its shutdown is the tunnel's half-close, passed through.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::heads::Heads;

/// How long an application still sending after the proxy's close is read from.
pub(super) const LINGER_AT_MOST: Duration = Duration::from_secs(1);

/// Bytes read (and dropped) per read while lingering: on the stack, so a lingering connection
/// holds a timer and no buffer.
const SCRATCH: usize = 4 * 1024;

/// An application connection whose shutdown lingers; reads and writes pass through.
pub(super) struct Lingering<S> {
    inner: S,
    /// Tells whether the connection was upgraded.
    heads: Arc<Heads>,
    state: Shutdown,
}

enum Shutdown {
    Open,
    /// The write side is closed; the first read tells whether to linger.
    WriteClosed,
    /// The application is still sending: read until it closes or the deadline passes.
    Lingering(Pin<Box<Sleep>>),
    Done,
}

impl<S> Lingering<S> {
    pub(super) fn new(inner: S, heads: Arc<Heads>) -> Self {
        Self { inner, heads, state: Shutdown::Open }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lingering<S> {
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                Shutdown::Open => {
                    std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
                    // A tunnel's half-close: the other direction may still be carrying data.
                    self.state = if self.heads.is_upgraded() { Shutdown::Done } else { Shutdown::WriteClosed };
                }
                Shutdown::WriteClosed => match self.poll_discard(cx) {
                    Poll::Ready(true) => self.state = Shutdown::Done,
                    // Still sending, or neither sending nor closed yet.
                    Poll::Ready(false) | Poll::Pending => {
                        self.state = Shutdown::Lingering(Box::pin(tokio::time::sleep(LINGER_AT_MOST)));
                    }
                },
                Shutdown::Lingering(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        tracing::debug!(
                            "application still sending {LINGER_AT_MOST:?} after the proxy's close; closing"
                        );
                        self.state = Shutdown::Done;
                        continue;
                    }
                    if std::task::ready!(self.poll_discard(cx)) {
                        self.state = Shutdown::Done;
                    }
                }
                Shutdown::Done => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Reads and drops what the application sent: `true` once it closed (or the read failed).
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let mut scratch = [0u8; SCRATCH];
        let mut buf = ReadBuf::new(&mut scratch);
        match std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf)) {
            Ok(()) => Poll::Ready(buf.filled().is_empty()),
            Err(_) => Poll::Ready(true),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lingering<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_linger(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_shutdown_reads_what_the_peer_still_sends_until_it_closes() {
        let (ours, mut peer) = tokio::io::duplex(SCRATCH);
        let mut ours = Lingering::new(ours, Heads::new(false));
        let shutdown = tokio::spawn(async move { ours.shutdown().await });
        // Far more than the pipe holds: written only because the lingering side reads it.
        peer.write_all(&vec![b'x'; 256 * 1024]).await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "our side's write half is closed");
        drop(peer);
        shutdown.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_neither_sends_nor_closes_is_waited_for_at_most_the_linger() {
        let (ours, _peer) = tokio::io::duplex(64);
        let mut ours = Lingering::new(ours, Heads::new(false));
        let started = tokio::time::Instant::now();
        ours.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER_AT_MOST);
    }

    #[tokio::test]
    async fn a_peer_already_closed_ends_it_at_once() {
        let (ours, peer) = tokio::io::duplex(64);
        drop(peer);
        let mut ours = Lingering::new(ours, Heads::new(false));
        ours.shutdown().await.unwrap();
        assert!(matches!(ours.state, Shutdown::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_s_shutdown_is_only_its_half_close() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let heads = Heads::new(false);
        heads.upgraded();
        let mut ours = Lingering::new(ours, heads);
        peer.write_all(b"still the tunnel's").await.unwrap();
        ours.shutdown().await.unwrap();
        // The application's bytes are still the tunnel's to read, not dropped by a linger.
        let mut read = [0u8; 18];
        let reading = tokio::time::timeout(Duration::from_secs(5), ours.read_exact(&mut read)).await;
        assert!(reading.is_ok(), "the bytes sent before the half-close were dropped");
        assert_eq!(&read, b"still the tunnel's");
    }
}
