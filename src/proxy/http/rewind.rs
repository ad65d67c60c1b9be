//! Telling an `http` listener's HTTP/2 (prior knowledge) connections from HTTP/1 ones by their
//! first bytes, as hyper-util's automatic server did: the bytes read to tell are read again
//! by the server that takes the connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::heads::PREFACE;

/// A connection whose first bytes may have been read already: reads give them first.
pub(super) struct Rewind<S> {
    read: BytesMut,
    inner: S,
}

impl<S: AsyncRead + Unpin> Rewind<S> {
    pub(super) fn new(inner: S) -> Self {
        Self { read: BytesMut::new(), inner }
    }

    /// Reads until the first bytes tell the protocol: `true` for HTTP/2's whole preface (`PRI`
    /// is also a valid HTTP/1 method), `false` as soon as a byte differs from it, or at the end
    /// of the stream.
    pub(super) async fn is_http2(&mut self) -> io::Result<bool> {
        self.read.reserve(PREFACE.len());
        loop {
            if !PREFACE.starts_with(&self.read) {
                return Ok(false);
            }
            if self.read.len() == PREFACE.len() {
                return Ok(true);
            }
            let mut next = (&mut self.inner).take((PREFACE.len() - self.read.len()) as u64);
            if next.read_buf(&mut self.read).await? == 0 {
                return Ok(false);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What the first bytes tell when `sent` arrives in those parts, each read on its own, and
    /// everything read from the connection afterwards.
    async fn told(sent: &[&[u8]]) -> (bool, Vec<u8>) {
        let (mut app, proxy) = tokio::io::duplex(1024);
        let parts: Vec<Vec<u8>> = sent.iter().map(|part| part.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for part in parts {
                app.write_all(&part).await.unwrap();
                for _ in 0..3 {
                    tokio::task::yield_now().await; // the reader takes this part alone
                }
            }
        });
        let mut conn = Rewind::new(proxy);
        let http2 = conn.is_http2().await.unwrap();
        writer.await.unwrap();
        let mut all = Vec::new();
        conn.read_to_end(&mut all).await.unwrap();
        (http2, all)
    }

    #[tokio::test]
    async fn the_whole_preface_is_http2_and_is_read_again() {
        let (http2, all) = told(&[&PREFACE[..5], &PREFACE[5..], b"\0\0\0\x04"]).await;
        assert!(http2);
        assert_eq!(all, [PREFACE, b"\0\0\0\x04"].concat());
    }

    /// Part of the preface, and then nothing: it waits for the rest.
    #[tokio::test]
    async fn part_of_the_preface_waits_for_the_rest() {
        let (mut app, proxy) = tokio::io::duplex(1024);
        app.write_all(&PREFACE[..16]).await.unwrap();
        let mut conn = Rewind::new(proxy);
        let telling = conn.is_http2();
        tokio::pin!(telling);
        for _ in 0..3 {
            assert!(futures_util::poll!(telling.as_mut()).is_pending());
            tokio::task::yield_now().await;
        }
        app.write_all(&PREFACE[16..]).await.unwrap();
        assert!(telling.await.unwrap());
    }

    #[tokio::test]
    async fn http1_and_short_streams_are_not_http2_and_nothing_is_lost() {
        for sent in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"PRI / HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0", b""] {
            assert_eq!(told(&[sent]).await, (false, sent.to_vec()), "{:?}", String::from_utf8_lossy(sent));
        }
        // The difference in a later read: `\n` where the preface's last `\r\n` is.
        let (first, rest) = (&PREFACE[..20], b"\r\n\nGET");
        assert_eq!(told(&[first, rest]).await, (false, [first, rest].concat()));
    }
}
