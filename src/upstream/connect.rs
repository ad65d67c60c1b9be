//! Opening a connection to one upstream address (TCP or unix socket).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio_rustls::client::TlsStream;

pub use crate::model::TargetAddr;
use crate::sendmsg::SendmsgStream;
use crate::splice::Splice;

/// A connected upstream byte stream.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Vectored writes (h2 frames, TLS records) as one sendmsg each.
    Tcp(SendmsgStream),
    Unix(UnixStream),
}

impl UpstreamStream {
    pub async fn connect(addr: &TargetAddr) -> io::Result<Self> {
        match addr {
            TargetAddr::Socket(addr) => {
                let stream = crate::socket_mark::connect(*addr).await?;
                stream.set_nodelay(true)?;
                Ok(Self::Tcp(SendmsgStream(stream)))
            }
            TargetAddr::Unix(path) => Ok(Self::Unix(UnixStream::connect(path).await?)),
        }
    }

    /// Writes what the socket takes now, without waiting.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.0.try_write(buf),
            Self::Unix(s) => s.try_write(buf),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamStream::Tcp($s) => $e,
            UpstreamStream::Unix($s) => $e,
        }
    };
}

impl Splice for UpstreamStream {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            Self::Tcp(stream) => stream.tcp(),
            Self::Unix(_) => None,
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }
}

/// An upstream connection, with or without TLS.
#[derive(Debug)]
pub enum UpstreamIo {
    Plain(UpstreamStream),
    Tls(Box<TlsStream<UpstreamStream>>),
}

impl Drop for UpstreamIo {
    /// A TLS connection closes with close_notify, as Envoy's do: the endpoint sees a clean
    /// close, not a truncation. hyper's client, h2 and the TCP copy send it when they shut a
    /// connection down; this covers one dropped without that (an idle pooled connection past
    /// its timeout, a reload's). Written without waiting: a socket with no room for the alert
    /// loses it, as a closing one would. Nothing more once it was sent.
    fn drop(&mut self) {
        let Self::Tls(tls) = self else { return };
        let (stream, session) = tls.get_mut();
        if session.is_handshaking() {
            return;
        }
        session.send_close_notify();
        let mut alert = Vec::new();
        if session.write_tls(&mut alert).is_ok() && !alert.is_empty() {
            let _ = stream.try_write(&alert);
        }
    }
}

macro_rules! delegate_io {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            UpstreamIo::Plain($s) => $e,
            UpstreamIo::Tls($s) => $e,
        }
    };
}

/// TLS reads and writes the bytes itself: only a plain connection splices.
impl Splice for UpstreamIo {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        match self {
            Self::Plain(stream) => stream.tcp(),
            Self::Tls(_) => None,
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            // An endpoint that closes without close_notify (many do) has still said all it had to
            // say: its end, as curl, browsers and ztunnel read it. A response framed by a length
            // or chunks still tells when it is cut short; one delimited by the close ends there.
            UpstreamIo::Tls(s) => match Pin::new(s).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
                polled => polled,
            },
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate_io!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate_io!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate_io!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
}
