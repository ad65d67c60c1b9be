//! A response the endpoint sent before it stopped taking the request: an upload answered early
//! (a 413, a 401) by an endpoint that then closed without reading the rest, which resets the
//! connection. Direct, curl reads that response; hyper's client, writing the body when the reset
//! arrives, fails the request on the write error before it reads what is already in the socket,
//! and the application got a 503 for about one such upload in four.
//!
//! [`EarlyResponseIo`] holds a write error that means the endpoint closed the connection until
//! the read side ends: the writer waits, the reader takes the response first, and the error
//! comes back only when there is nothing left to read. The connection is closed either way, so
//! its read side does end, and wakes the held writer.
//! (Over TLS, [`super::UpstreamIo`] reads what came before the reset.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h1::closed_connection;

/// An endpoint connection whose writes fail only once its reads have ended.
#[derive(Debug)]
pub struct EarlyResponseIo<S> {
    io: S,
    /// The endpoint closed the connection under a write: returned once the read side ends.
    held: Option<io::Error>,
    /// The read side returned its end (EOF) or an error.
    read_ended: bool,
    /// The writer waiting for the read side to end.
    writer: Option<Waker>,
}

impl<S> EarlyResponseIo<S> {
    pub fn new(io: S) -> Self {
        Self { io, held: None, read_ended: false, writer: None }
    }

    /// A write's outcome: an error that closed the connection is held while reads go on.
    fn hold<T>(&mut self, cx: &Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(Err(e)) if !self.read_ended && closed_connection(e.kind()) => {
                self.held = Some(e);
                self.wait(cx)
            }
            other => other,
        }
    }

    /// After a held error: the error once the read side has ended, else wait for it.
    fn wait<T>(&mut self, cx: &Context<'_>) -> Poll<io::Result<T>> {
        match self.held.take() {
            Some(e) if self.read_ended => Poll::Ready(Err(e)),
            held => {
                self.held = held;
                self.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
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
        if self.held.is_some() {
            return self.wait(cx);
        }
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.hold(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.held.is_some() {
            return self.wait(cx);
        }
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.hold(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.is_some() {
            return self.wait(cx);
        }
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.hold(cx, polled)
    }

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
}
