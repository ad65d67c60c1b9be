//! Moving a TCP flow's bytes from one socket to another through a kernel pipe, with splice(2).
//!
//! A copy through user space costs the kernel two copies of every byte: into the proxy's
//! buffer on `recv`, out of it on `send`. Spliced, the bytes go socket → pipe → socket as
//! references to the pages they arrived in, and the proxy never touches them; for a bulk flow
//! that is most of its CPU. `proxy::copy` switches a direction to a pipe once the flow has
//! shown it is bulk, when both of its ends are plain TCP sockets.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::sendmsg::SendmsgStream;

/// The most one splice asks to move into the pipe: the pipe's room (its slots, each a
/// reference to part of a page) is what limits a call in practice.
const MAX_FILL: usize = 1 << 20;
/// A pipe's size: 64 slots instead of Linux's 16. Bulk flows took about 30% less CPU per byte
/// (docs/benchmarks.md); larger gained nothing more. The pages are the received data's own,
/// held only until written out.
const PIPE_SIZE: usize = 256 * 1024;

/// Set once splice(2) is found refused (a seccomp profile, a kernel without it): flows copy
/// through buffers from then on.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether flows may splice: not once the kernel has refused it.
pub fn available() -> bool {
    !REFUSED.load(Ordering::Relaxed)
}

/// Whether `error`, from filling a pipe, says splicing is not allowed or not possible here
/// rather than that the connection failed; if so, the first one is logged and splicing is off
/// for the process.
pub fn refused(error: &io::Error) -> bool {
    let refused = is_refusal(error);
    if refused && !REFUSED.swap(true, Ordering::Relaxed) {
        tracing::warn!(%error, "splice(2) is refused here; TCP flows are copied through buffers instead");
    }
    refused
}

/// A stream whose bytes may be spliced: a plain TCP socket, with nothing layered on it that
/// reads or writes its bytes (TLS, a buffered prefix).
pub trait Splice {
    /// The socket itself, when its bytes can move without passing through user space.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Splice for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Splice for SendmsgStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(&self.0)
    }
}

/// One direction's pipe: what was spliced in from the reader and not yet out to the writer.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
}

impl Pipe {
    /// A non-blocking pipe (two file descriptors, closed on drop with whatever it still holds).
    pub fn new() -> io::Result<Self> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Refused past the user's pipe-user-pages-soft (unless privileged): the default size
        // still works, with more calls per byte.
        let _ = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Self { read, write, held: 0 })
    }

    /// Bytes in the pipe, not yet written out.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves what `from` has received into the (empty) pipe, once it has something: the bytes
    /// moved, 0 at the end of the stream.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, from: &TcpStream) -> Poll<io::Result<usize>> {
        debug_assert_eq!(self.held, 0, "filled only when empty: a full pipe would read as an empty socket");
        loop {
            ready!(from.poll_read_ready(cx))?;
            // With the pipe empty, EAGAIN can only mean the socket has nothing: try_io then
            // clears the readiness tokio saw, and the loop waits for more.
            match from.try_io(Interest::READABLE, || Ok(splice(from, &self.write, MAX_FILL)?)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => {
                    self.held += n;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }

    /// Moves what the pipe holds out to `to`, once it has room: the bytes moved.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            ready!(to.poll_write_ready(cx))?;
            // The pipe holds bytes: EAGAIN can only mean the socket has no room.
            match to.try_io(Interest::WRITABLE, || Ok(splice(&self.read, to, self.held)?)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(n) => {
                    self.held -= n;
                    return Poll::Ready(Ok(n));
                }
            }
        }
    }
}

/// A seccomp profile answers EPERM or ENOSYS (sometimes EACCES), a socket that cannot splice
/// EINVAL or EOPNOTSUPP.
fn is_refusal(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::EINVAL | libc::EOPNOTSUPP))
}

/// One splice(2) of up to `len` bytes, never blocking on the pipe. A socket written to after
/// its peer has gone answers `EPIPE`: Rust's runtime ignores SIGPIPE, as it does for `send`.
fn splice(from: impl std::os::fd::AsFd, to: impl std::os::fd::AsFd, len: usize) -> rustix::io::Result<usize> {
    rustix::pipe::splice(from, None, to, None, len, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn bytes_go_from_one_socket_to_another_through_the_pipe() {
        let (mut sender, from) = pair().await;
        let (to, mut receiver) = pair().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let writer = tokio::spawn({
            let data = data.clone();
            async move {
                sender.write_all(&data).await.unwrap();
                sender.shutdown().await.unwrap();
            }
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::new().unwrap();
        assert_eq!(rustix::pipe::fcntl_getpipe_size(&pipe.write).unwrap(), PIPE_SIZE);
        let mut moved = 0;
        loop {
            let n = poll_fn(|cx| pipe.poll_fill(cx, &from)).await.unwrap();
            if n == 0 {
                break;
            }
            while pipe.held() > 0 {
                moved += poll_fn(|cx| pipe.poll_drain(cx, &to)).await.unwrap();
            }
        }
        drop(to);
        writer.await.unwrap();
        assert_eq!(moved, data.len());
        assert!(reader.await.unwrap() == data, "the bytes arrive whole and in order");
    }

    #[test]
    fn a_refusal_is_told_from_a_failed_connection() {
        for errno in [libc::EPERM, libc::ENOSYS, libc::EINVAL, libc::EOPNOTSUPP, libc::EACCES] {
            assert!(is_refusal(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::ECONNRESET, libc::EPIPE, libc::EAGAIN, libc::ENOMEM] {
            assert!(!is_refusal(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_refusal(&io::ErrorKind::UnexpectedEof.into()));
    }

    #[tokio::test]
    async fn a_writer_whose_peer_is_gone_is_an_error_not_a_signal() {
        let (mut sender, from) = pair().await;
        let (to, receiver) = pair().await;
        // The receiver resets: an RST (SO_LINGER 0) instead of a FIN.
        socket2::SockRef::from(&receiver).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(receiver);
        sender.write_all(&[7; 64 * 1024]).await.unwrap();
        let mut pipe = Pipe::new().unwrap();
        let error = loop {
            if pipe.held() == 0 && poll_fn(|cx| pipe.poll_fill(cx, &from)).await.unwrap() == 0 {
                panic!("the sender did not close");
            }
            if let Err(error) = poll_fn(|cx| pipe.poll_drain(cx, &to)).await {
                break error;
            }
        };
        assert!(matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{error:?}");
    }
}
