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
//! first read, without a timer or a buffer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// How long an application still sending after the proxy's close is read from.
pub const LINGER_AT_MOST: Duration = Duration::from_secs(1);

/// Bytes read (and dropped) per read while lingering.
const SCRATCH: usize = 16 * 1024;

/// An application connection whose shutdown lingers; reads and writes pass through.
#[derive(Debug)]
pub struct Lingering<S> {
    inner: S,
    state: Shutdown,
}

#[derive(Debug)]
enum Shutdown {
    Open,
    /// The write side is closed; the first read tells whether to linger.
    WriteClosed,
    /// The application is still sending: read until it closes or the deadline passes.
    Lingering(Box<Linger>),
    Done,
}

#[derive(Debug)]
struct Linger {
    deadline: Pin<Box<Sleep>>,
    scratch: Box<[u8]>,
}

impl<S> Lingering<S> {
    pub fn new(inner: S) -> Self {
        Self { inner, state: Shutdown::Open }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Lingering<S> {
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                Shutdown::Open => {
                    std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
                    self.state = Shutdown::WriteClosed;
                }
                Shutdown::WriteClosed => {
                    let mut probe = [0u8; 64];
                    let mut buf = ReadBuf::new(&mut probe);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        // Closed (or failed): nothing to wait for.
                        Poll::Ready(Ok(())) if buf.filled().is_empty() => self.state = Shutdown::Done,
                        Poll::Ready(Err(_)) => self.state = Shutdown::Done,
                        Poll::Ready(Ok(())) | Poll::Pending => {
                            self.state = Shutdown::Lingering(Box::new(Linger {
                                deadline: Box::pin(tokio::time::sleep(LINGER_AT_MOST)),
                                scratch: vec![0; SCRATCH].into_boxed_slice(),
                            }));
                        }
                    }
                }
                Shutdown::Lingering(linger) => {
                    if linger.deadline.as_mut().poll(cx).is_ready() {
                        tracing::debug!(
                            "application still sending {LINGER_AT_MOST:?} after the proxy's close; closing"
                        );
                        self.state = Shutdown::Done;
                        continue;
                    }
                    let mut buf = ReadBuf::new(&mut linger.scratch);
                    match std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf)) {
                        Ok(()) if !buf.filled().is_empty() => {}
                        _ => self.state = Shutdown::Done,
                    }
                }
                Shutdown::Done => return Poll::Ready(Ok(())),
            }
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
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut ours = Lingering::new(ours);
        let shutdown = tokio::spawn(async move { ours.shutdown().await });
        // Far more than the pipe holds: written only because the lingering side reads it.
        peer.write_all(&vec![b'x'; 1 << 20]).await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "our side's write half is closed");
        drop(peer);
        shutdown.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_neither_sends_nor_closes_is_waited_for_at_most_the_linger() {
        let (ours, _peer) = tokio::io::duplex(64);
        let mut ours = Lingering::new(ours);
        let started = tokio::time::Instant::now();
        ours.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER_AT_MOST);
    }

    #[tokio::test]
    async fn a_peer_already_closed_ends_it_at_once() {
        let (ours, peer) = tokio::io::duplex(64);
        drop(peer);
        let mut ours = Lingering::new(ours);
        ours.shutdown().await.unwrap();
        assert!(matches!(ours.state, Shutdown::Done));
    }
}
