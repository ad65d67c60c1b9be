//! Vectored writes to TCP sockets as one sendmsg(2), not the writev(2) tokio makes.
//!
//! writev passes through the file layer (the file's position lock, `rw_verify_area`,
//! fsnotify) before it reaches the socket; sendmsg goes to the socket directly, as the send(2)
//! of tokio's single-buffer writes already does. hyper writes an HTTP/1 response's head and
//! body, and h2 its frames, as vectored writes: one per response on the application side.
//! With sendmsg the kernel spent about 0.4 µs less per HTTP/1.1 request (docs/benchmarks.md).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Linux's limit on the buffers of one sendmsg.
const IOV_MAX: usize = 1024;

/// Makes a system call tokio has no method for (`call`) on `stream` once it is ready for
/// `interest` (readable or writable), waiting as tokio's own reads and writes do: a
/// `WouldBlock` from the call clears the readiness tokio saw (`try_io`), and it waits again.
pub fn poll_io<T>(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut call: impl FnMut() -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        if interest.is_writable() {
            ready!(stream.poll_write_ready(cx))?;
        } else {
            ready!(stream.poll_read_ready(cx))?;
        }
        match stream.try_io(interest, &mut call) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// Writes `bufs` to `stream` with one sendmsg, once the socket has room. MSG_NOSIGNAL: a closed
/// peer is an `EPIPE` error, never a signal. At most IOV_MAX buffers per call, as std's
/// `write_vectored` takes (the rest is a partial write).
fn poll_send_vectored(stream: &TcpStream, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
    let bufs = &bufs[..bufs.len().min(IOV_MAX)];
    poll_io(stream, cx, Interest::WRITABLE, || SockRef::from(stream).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL))
}

/// A TCP connection whose vectored writes are one sendmsg each: the application's (HTTP
/// listeners) and the endpoint's (`upstream::UpstreamStream`).
#[derive(Debug)]
pub struct SendmsgStream(pub TcpStream);

impl AsyncRead for SendmsgStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendmsgStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_send_vectored(&self.0, cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (SendmsgStream, TcpStream) {
        let (client, server) = crate::test_support::tcp_pair().await;
        (SendmsgStream(client), server)
    }

    /// Every buffer arrives, in order, also when the socket fills and the write has to wait for
    /// the peer to read (the wait and the partial writes are the part tokio did before).
    #[tokio::test]
    async fn vectored_writes_arrive_whole_and_in_order_past_a_full_socket() {
        let (mut sender, mut receiver) = pair().await;
        let head = [b'h'; 100];
        let body: Vec<u8> = (0..8 * 1024 * 1024).map(|i: u32| i.to_le_bytes()[0] ^ (i >> 13) as u8).collect();
        let expected: Vec<u8> = head.iter().chain(&body).copied().collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let (mut head_at, mut body_at) = (0, 0);
        while head_at < head.len() || body_at < body.len() {
            let bufs = [IoSlice::new(&head[head_at..]), IoSlice::new(&body[body_at..])];
            let mut n = sender.write_vectored(&bufs).await.unwrap();
            let from_head = n.min(head.len() - head_at);
            head_at += from_head;
            n -= from_head;
            body_at += n;
        }
        sender.shutdown().await.unwrap();
        assert!(reader.await.unwrap() == expected, "the bytes received differ from those sent");
    }

    /// A peer that is gone is an error to the writer. (Rust programs ignore SIGPIPE, so this
    /// cannot show MSG_NOSIGNAL at work; it shows the error reaches the caller.)
    #[tokio::test]
    async fn a_closed_peer_is_an_error() {
        let (mut sender, receiver) = pair().await;
        // Closed with a reset at once, rather than a FIN that a write must first draw a reset to.
        SockRef::from(&receiver).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(receiver);
        let bufs = [IoSlice::new(b"head"), IoSlice::new(b"body")];
        let error = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let Err(error) = sender.write_vectored(&bufs).await {
                    return error;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("writes to a closed peer kept succeeding for 30 s");
        assert!(matches!(error.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset), "{error}");
    }

    /// More buffers than one sendmsg takes are a partial write, not an error.
    #[tokio::test]
    async fn more_buffers_than_iov_max_are_a_partial_write() {
        let (mut sender, _receiver) = pair().await;
        let bufs = vec![IoSlice::new(b"x"); IOV_MAX + 10];
        assert_eq!(sender.write_vectored(&bufs).await.unwrap(), IOV_MAX);
    }
}
