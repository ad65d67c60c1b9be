//! Moving bytes both ways between the application and the endpoint.
//!
//! Each direction has one buffer that starts small (idle connections stay cheap) and grows when
//! reads keep filling it (bulk flows get large reads), as ztunnel does. A FIN from one side is
//! passed on with `shutdown` while the other direction keeps flowing (half-close). Between two
//! plain TCP sockets, a direction that outgrows the middle size switches to `splice(2)` instead
//! of the largest buffer, so bulk flows are not copied through user space at all.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::splice::Pipe;
use crate::upstream::{UpstreamIo, UpstreamStream};

/// A byte stream the proxy forwards; plain TCP sockets say so, which allows splicing.
pub trait Stream: AsyncRead + AsyncWrite + Unpin {
    fn as_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Stream for TcpStream {
    fn as_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Stream for UpstreamStream {
    fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Tcp(stream) => Some(stream),
            Self::Unix(_) => None,
        }
    }
}

impl Stream for UpstreamIo {
    fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Self::Plain(stream) => stream.as_tcp(),
            Self::Tls(_) => None,
        }
    }
}

/// Buffer sizes a direction steps through.
const SIZES: [usize; 3] = [1024, 16 * 1024, 256 * 1024];
/// Consecutive full reads before a buffer grows.
const FULL_READS_TO_GROW: u8 = 2;

/// Bytes moved each way, for access logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
}

struct Direction {
    buf: Vec<u8>,
    size_step: usize,
    pos: usize,
    filled: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
    /// Set once the direction is spliced; `buf` is then empty.
    pipe: Option<Pipe>,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0; SIZES[0]],
            size_step: 0,
            pos: 0,
            filled: 0,
            full_reads: 0,
            read_done: false,
            need_flush: false,
            done: false,
            bytes: 0,
            pipe: None,
        }
    }

    /// Grows the buffer after sustained full reads; returns true when the direction switched to
    /// splicing instead (only called with an empty buffer, so nothing is left behind in it).
    fn grow_if_busy(&mut self, can_splice: bool) -> bool {
        if self.full_reads < FULL_READS_TO_GROW || self.size_step + 1 == SIZES.len() {
            return false;
        }
        self.full_reads = 0;
        if can_splice && self.size_step + 2 == SIZES.len() {
            match Pipe::new() {
                Ok(pipe) => {
                    self.pipe = Some(pipe);
                    self.buf = Vec::new();
                    return true;
                }
                // Out of descriptors, say: copying still works.
                Err(error) => tracing::debug!(%error, "no pipe for splicing; copying instead"),
            }
        }
        self.size_step += 1;
        self.buf = vec![0; SIZES[self.size_step]];
        false
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: Stream + ?Sized,
        W: Stream + ?Sized,
    {
        if self.pipe.is_some() {
            return self.poll_splice(cx, reader, writer);
        }
        loop {
            if self.pos == self.filled && !self.read_done {
                let can_splice = reader.as_tcp().is_some() && writer.as_tcp().is_some();
                if self.grow_if_busy(can_splice) {
                    return self.poll_splice(cx, reader, writer);
                }
                let mut read_buf = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut read_buf) {
                    Poll::Pending => {
                        // Nothing to read now: make sure what was written is not held back.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = read_buf.filled().len();
                        if n == 0 {
                            self.read_done = true;
                        } else {
                            self.full_reads = if n == self.buf.len() { self.full_reads.saturating_add(1) } else { 0 };
                            self.pos = 0;
                            self.filled = n;
                        }
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(writer.as_mut().poll_write(cx, &self.buf[self.pos..self.filled]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.bytes += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                // Pass the FIN on; the other direction keeps going.
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_splice<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: Stream + ?Sized,
        W: Stream + ?Sized,
    {
        if !self.read_done {
            let (Some(pipe), Some(from), Some(to)) = (self.pipe.as_mut(), reader.as_tcp(), writer.as_tcp()) else {
                return Poll::Ready(Err(io::Error::other("splicing needs TCP on both sides")));
            };
            ready!(pipe.poll_forward(cx, from, to, &mut self.bytes))?;
            self.read_done = true;
        }
        ready!(writer.as_mut().poll_shutdown(cx))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }
}

/// Copies `client` ⇄ `upstream` until both directions have finished or one fails.
pub async fn proxy<C, U>(client: &mut C, upstream: &mut U) -> (Transferred, io::Result<()>)
where
    C: Stream + ?Sized,
    U: Stream + ?Sized,
{
    let mut up = Direction::new();
    let mut down = Direction::new();
    let result = poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(Err(e)) = up.poll_copy(cx, Pin::new(&mut *client), Pin::new(&mut *upstream)) {
                return Poll::Ready(Err(e));
            }
        }
        if !down.done {
            if let Poll::Ready(Err(e)) = down.poll_copy(cx, Pin::new(&mut *upstream), Pin::new(&mut *client)) {
                return Poll::Ready(Err(e));
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    (Transferred { client_to_upstream: up.bytes, upstream_to_client: down.bytes }, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    impl Stream for DuplexStream {}

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let (mut app, mut proxy_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { proxy(&mut proxy_side, &mut upstream_side).await });
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // sees the FIN
        assert_eq!(got, b"ping");
        server.write_all(b"pong after fin").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong after fin");
        let (bytes, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(bytes, Transferred { client_to_upstream: 4, upstream_to_client: 14 });
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (connected, accepted) = tokio::join!(connect, listener.accept());
        (connected.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Writes `data`, sends a FIN, and returns everything the peer sends until its FIN.
    async fn exchange(mut stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&data).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, received) = tokio::join!(send, read.read_to_end(&mut got));
        received.unwrap();
        got
    }

    #[tokio::test]
    async fn bulk_tcp_is_spliced_both_ways_with_half_close() {
        const LEN: usize = 8 << 20;
        let (app, mut client) = tcp_pair().await;
        let (mut upstream, server) = tcp_pair().await;
        let (app_sends, server_sends) = (pattern(LEN, 0), pattern(LEN + 7, 0x5a));
        let mut up = Direction::new();
        let mut down = Direction::new();
        let forward = poll_fn(|cx| {
            let up_result = if up.done {
                Poll::Ready(Ok(()))
            } else {
                up.poll_copy(cx, Pin::new(&mut client), Pin::new(&mut upstream))
            };
            let down_result = if down.done {
                Poll::Ready(Ok(()))
            } else {
                down.poll_copy(cx, Pin::new(&mut upstream), Pin::new(&mut client))
            };
            match (up_result, down_result) {
                (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(()),
                (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => panic!("forwarding failed: {e}"),
                _ => Poll::Pending,
            }
        });
        let (_, app_got, server_got) =
            tokio::join!(forward, exchange(app, app_sends.clone()), exchange(server, server_sends.clone()));
        assert!(server_got == app_sends, "upstream got {} bytes, not what the app sent", server_got.len());
        assert!(app_got == server_sends, "app got {} bytes, not what the upstream sent", app_got.len());
        assert_eq!((up.bytes, down.bytes), (LEN as u64, LEN as u64 + 7));
        assert!(up.pipe.is_some() && down.pipe.is_some(), "bulk directions between TCP sockets are spliced");
    }

    #[tokio::test]
    async fn streams_that_are_not_tcp_never_splice() {
        let (mut app, mut proxy_side) = tokio::io::duplex(1 << 20);
        let (mut upstream_side, mut server) = tokio::io::duplex(1 << 20);
        let mut up = Direction::new();
        let forward = poll_fn(|cx| up.poll_copy(cx, Pin::new(&mut proxy_side), Pin::new(&mut upstream_side)));
        let send = async {
            app.write_all(&pattern(1 << 20, 1)).await.unwrap();
            app.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (forwarded, _, read) = tokio::join!(forward, send, server.read_to_end(&mut got));
        forwarded.unwrap();
        read.unwrap();
        assert!(got == pattern(1 << 20, 1));
        assert!(up.pipe.is_none());
        assert_eq!(up.buf.len(), SIZES[2], "the largest buffer instead");
    }

    #[test]
    fn buffers_grow_only_under_sustained_full_reads() {
        let mut d = Direction::new();
        assert!(!d.grow_if_busy(false));
        assert_eq!(d.buf.len(), SIZES[0]);
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy(false);
        assert_eq!(d.buf.len(), SIZES[1]);
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy(false);
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy(false);
        assert_eq!(d.buf.len(), SIZES[2], "stops at the largest size");
    }
}
