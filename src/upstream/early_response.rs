//! A response the endpoint sent before it stopped taking the request: an upload answered early
//! (a 413, a 401) by an endpoint that then closed without reading the rest, which resets the
//! connection. Direct, curl reads that response; hyper's client, writing the body when the reset
//! arrives, failed the request on the write error before it read what was already in the
//! socket, and the application got a 503.
//!
//! [`EarlyResponseIo`] holds a write error that means the endpoint closed the connection until
//! the read side ends: the writer waits, the reader takes the response first, and the error
//! comes back once there is nothing left to read. The kernel hands over what arrived before a
//! reset first, so the response is in the socket when the write fails and the reader needs only
//! its turn; the hold is bounded ([`HOLD_AT_MOST`]) for where no one reads any more (a tunnel's
//! finished direction, hyper's reader with a whole response it keeps for a slow application).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h1::closed_connection;

/// The longest a write error is held.
const HOLD_AT_MOST: Duration = Duration::from_secs(1);

/// An endpoint connection whose writes fail only once its reads have ended (or [`HOLD_AT_MOST`]
/// has passed).
#[derive(Debug)]
pub struct EarlyResponseIo<S> {
    io: S,
    held: Option<Held>,
    /// The read side returned its end (EOF) or an error.
    read_ended: bool,
    /// The writer waiting for the read side to end.
    writer: Option<Waker>,
}

/// A write error that said the endpoint closed the connection, and when it is returned at last.
#[derive(Debug)]
struct Held {
    error: io::Error,
    until: Pin<Box<tokio::time::Sleep>>,
}

impl<S> EarlyResponseIo<S> {
    pub fn new(io: S) -> Self {
        Self { io, held: None, read_ended: false, writer: None }
    }
}

impl<S: AsyncWrite + Unpin> EarlyResponseIo<S> {
    /// A write (`op`), unless an error is held: then the error once the read side has ended or
    /// the hold is over, else wait.
    fn write<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let mut held = match self.held.take() {
            Some(held) => held,
            None => match op(Pin::new(&mut self.io), cx) {
                Poll::Ready(Err(error)) if !self.read_ended && closed_connection(error.kind()) => {
                    Held { error, until: Box::pin(tokio::time::sleep(HOLD_AT_MOST)) }
                }
                polled => return polled,
            },
        };
        if self.read_ended || held.until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(held.error));
        }
        self.held = Some(held);
        self.writer = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EarlyResponseIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let ended = match &polled {
            Poll::Ready(Ok(())) => buf.filled().len() == before && buf.remaining() > 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            self.read_ended = true;
            if let Some(writer) = self.writer.take() {
                writer.wake();
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EarlyResponseIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.write(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write(cx, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write(cx, |io, cx| io.poll_flush(cx))
    }

    /// Not held: hyper shuts a connection down once it is done with it, reads included.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use std::sync::{Arc, Mutex};

    /// An endpoint that answered and reset the connection, in the order hyper's client would
    /// meet it when the reset comes under a body write: the write fails while the response is
    /// not yet seen by a read (its readiness not yet reported).
    #[derive(Default)]
    struct Script {
        /// Bytes of the request that got through.
        written: Vec<u8>,
        /// Writes taken before the reset.
        writes_left: usize,
        /// What reads give once a write has failed, in turn; then the reset.
        reads: std::collections::VecDeque<io::Result<&'static [u8]>>,
        reset: bool,
        reader: Option<Waker>,
    }

    #[derive(Clone)]
    struct ScriptedIo(Arc<Mutex<Script>>);

    impl AsyncRead for ScriptedIo {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let mut s = self.0.lock().unwrap();
            if !s.reset {
                s.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            match s.reads.pop_front() {
                Some(Ok(bytes)) => {
                    buf.put_slice(bytes);
                    Poll::Ready(Ok(()))
                }
                Some(Err(e)) => Poll::Ready(Err(e)),
                None => Poll::Ready(Err(io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    impl AsyncWrite for ScriptedIo {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let mut s = self.0.lock().unwrap();
            if s.writes_left == 0 {
                s.reset = true;
                if let Some(reader) = s.reader.take() {
                    reader.wake();
                }
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            s.writes_left -= 1;
            s.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A chunked upload that goes on for good, through hyper's client over `io`.
    async fn upload<S>(io: S) -> Result<http::Response<hyper::body::Incoming>, hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.unwrap();
        tokio::spawn(connection);
        let chunks = futures_util::stream::repeat_with(|| Ok::<_, io::Error>(Frame::data(Bytes::from_static(b"x"))));
        let request = http::Request::post("/upload").body(StreamBody::new(chunks)).unwrap();
        sender.send_request(request).await
    }

    fn endpoint(writes_left: usize, reads: impl IntoIterator<Item = io::Result<&'static [u8]>>) -> ScriptedIo {
        let reads = reads.into_iter().collect();
        ScriptedIo(Arc::new(Mutex::new(Script { writes_left, reads, ..Script::default() })))
    }

    const TOO_LARGE: &[u8] =
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big\n";

    #[tokio::test]
    async fn a_response_sent_before_the_reset_is_read_after_a_failed_write() {
        let io = endpoint(1, [Ok(TOO_LARGE)]);
        let response = upload(EarlyResponseIo::new(io.clone())).await.expect("the early response");
        assert_eq!(response.status(), 413);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"too big\n");
        assert!(io.0.lock().unwrap().written.starts_with(b"POST /upload HTTP/1.1\r\n"));

        // What the wrapper is for: hyper's client alone fails the request on the write.
        let error = upload(endpoint(1, [Ok(TOO_LARGE)])).await.expect_err("a write error");
        assert!(std::error::Error::source(&error).is_some_and(|e| e.is::<io::Error>()), "{error:?}");
    }

    #[tokio::test]
    async fn with_no_response_the_request_fails_once_the_read_side_ends() {
        let error = upload(EarlyResponseIo::new(endpoint(1, []))).await.expect_err("no response");
        let io = std::error::Error::source(&error).and_then(|e| e.downcast_ref::<io::Error>());
        // The read's reset, or the held write's broken pipe: the endpoint closed, either way.
        assert!(io.is_some_and(|e| closed_connection(e.kind())), "{error:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_held_error_comes_back_once_the_read_side_ends_or_the_hold_is_over() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Nothing reads (a tunnel's finished direction): the hold's end.
        let started = tokio::time::Instant::now();
        let mut io = EarlyResponseIo::new(endpoint(0, []));
        assert_eq!(io.write_all(b"x").await.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(started.elapsed(), HOLD_AT_MOST);

        // The reader meets the endpoint's close: the writer gets its error then, not later.
        let started = tokio::time::Instant::now();
        let (mut read, mut write) = tokio::io::split(EarlyResponseIo::new(endpoint(0, [Ok(&b""[..])])));
        let writer = tokio::spawn(async move { write.write_all(b"x").await });
        assert_eq!(read.read(&mut [0u8; 8]).await.unwrap(), 0);
        assert_eq!(writer.await.unwrap().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
