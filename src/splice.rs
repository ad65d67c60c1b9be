//! Moving a TCP flow's bytes from one socket to another through a kernel pipe, with splice(2).
//!
//! A copy through user space costs the kernel two copies of every byte: into the proxy's
//! buffer on `recv`, out of it on `send`. Spliced, the bytes go socket → pipe → socket as
//! references to the pages they arrived in, and the proxy never touches them; for a bulk flow
//! that is most of its CPU. `proxy::copy` switches a direction to a pipe once the flow has
//! shown it is bulk, when both of its ends are plain TCP sockets.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::sendmsg::{poll_io, SendmsgStream};

/// The most one splice asks to move into the pipe: the pipe's room (its slots, each a
/// reference to part of a page) is what limits a call in practice.
const MAX_FILL: usize = 1 << 20;
/// A pipe's size: 64 slots instead of Linux's 16. One bulk flow took about 30% less CPU per byte
/// (docs/benchmarks.md); larger gained nothing more.
const PIPE_SIZE: usize = 256 * 1024;
/// Smaller than this, a pipe is not worth it: past the user's `pipe-user-pages-soft` Linux
/// gives new pipes 2 slots, fewer bytes per call than the buffer it would replace.
const MIN_PIPE_SIZE: usize = 64 * 1024;
/// Pipes open at once in the process, at most: 128 × 64 pages is half the default per-user
/// quota (16,384 pages), which the proxy shares with every process of its user. Flows past it
/// copy through buffers.
const MAX_PIPES: usize = 128;

static PIPES: AtomicUsize = AtomicUsize::new(0);

/// Whether splice(2) may be used here, found once: a seccomp profile may refuse the call
/// (EPERM, ENOSYS), and then no flow tries it. The probe splices one byte between two empty
/// pipes, which the kernel answers EAGAIN when the call is allowed.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let probe = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).and_then(|(from, _keep)| {
            let (_keep_too, to) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
            splice(&from, &to, 1)
        });
        match probe {
            Ok(_) | Err(rustix::io::Errno::AGAIN) => true,
            Err(error) => {
                tracing::warn!(%error, "splice(2) is not available; TCP flows are copied through buffers");
                false
            }
        }
    })
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

/// Why a pipe is not used.
#[derive(Debug, thiserror::Error)]
pub enum Unspliceable {
    /// The socket has bytes that splice(2) does not see: urgent data (TCP's out-of-band byte
    /// stops `tcp_read_sock`) or a socket an eBPF sockmap redirects into. The direction goes
    /// back to a buffer, whose recv(2) reads them.
    #[error("the socket has bytes splice(2) cannot read")]
    Unreadable,
    /// The socket type has no splice support (EINVAL).
    #[error("the socket does not splice")]
    Unsupported,
}

/// Whether `error`, from filling an empty pipe, says the direction should go back to a buffer
/// (nothing is lost: the pipe is empty) rather than that the connection failed.
pub fn unspliceable(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|e| e.is::<Unspliceable>())
}

/// One direction's pipe: what was spliced in from the reader and not yet out to the writer.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
    _place: Place,
}

/// One of `max` places counted by `taken` ([`MAX_PIPES`] in [`PIPES`]), given back on drop.
#[derive(Debug)]
struct Place(&'static AtomicUsize);

impl Place {
    fn take(taken: &'static AtomicUsize, max: usize) -> Option<Self> {
        // Relaxed: a count, touched only when a bulk flow starts or ends.
        let took = taken.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1));
        took.is_ok().then(|| Self(taken))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipe {
    /// A non-blocking pipe (two file descriptors, closed on drop with whatever it still holds),
    /// or `None` when the process has [`MAX_PIPES`] already or the pipe would be too small.
    pub fn new() -> io::Result<Option<Self>> {
        let Some(place) = Place::take(&PIPES, MAX_PIPES) else { return Ok(None) };
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        let pipe = Self { read, write, held: 0, _place: place };
        // Refused past the quota (unless privileged): what the pipe has then decides.
        let size = rustix::pipe::fcntl_setpipe_size(&pipe.write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&pipe.write))?;
        Ok((size >= MIN_PIPE_SIZE).then_some(pipe))
    }

    /// Bytes in the pipe, not yet written out.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves what `from` has received into the (empty) pipe, once it has something: the bytes
    /// moved, 0 at the end of the stream. An [`Unspliceable`] error: the socket's bytes must be
    /// read some other way.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>, from: &TcpStream) -> Poll<io::Result<usize>> {
        debug_assert_eq!(self.held, 0, "filled only when empty: a full pipe would read as an empty socket");
        // With the pipe empty, EAGAIN can only mean the socket has nothing splice can take:
        // the readiness tokio saw is then cleared, and it waits for more.
        let n = ready!(poll_io(from, cx, Interest::READABLE, || fill(from, &self.write)))?;
        self.held += n;
        Poll::Ready(Ok(n))
    }

    /// Moves what the pipe holds out to `to`, once it has room: the bytes moved.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<io::Result<usize>> {
        // The pipe holds bytes: EAGAIN can only mean the socket has no room.
        let n = ready!(poll_io(to, cx, Interest::WRITABLE, || Ok(splice(&self.read, to, self.held)?)))?;
        self.held -= n;
        Poll::Ready(Ok(n))
    }
}

/// One splice from `from` into the empty pipe. When it finds nothing (EAGAIN) or the end of
/// the stream, a peek (recv with MSG_PEEK) checks that the socket has no bytes splice(2) cannot
/// see ([`Unspliceable::Unreadable`]): without it such a flow would stall, then end short. Bytes
/// the peek sees may also have arrived just after the splice, so a second splice decides: only
/// this task reads the socket, so what the peek saw is still there for it.
fn fill(from: &TcpStream, pipe: &OwnedFd) -> io::Result<usize> {
    let at_end = match splice_in(from, pipe)? {
        Spliced::Bytes(n) => return Ok(n),
        Spliced::End => true,
        Spliced::Nothing => false,
    };
    let mut byte = [std::mem::MaybeUninit::uninit()];
    match socket2::SockRef::from(from).recv_with_flags(&mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        // The end of the stream (a FIN may have come since the splice).
        Ok(0) => Ok(0),
        Ok(_) => match splice_in(from, pipe)? {
            Spliced::Bytes(n) => Ok(n),
            Spliced::End | Spliced::Nothing => Err(io::Error::other(Unspliceable::Unreadable)),
        },
        // After the end, the end: an EAGAIN here must not wait for a socket that stays readable.
        Err(e) if at_end && e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        // Nothing there (try_io clears the readiness), or the connection's error.
        Err(e) => Err(e),
    }
}

/// What one splice from a socket into the empty pipe did.
enum Spliced {
    Bytes(usize),
    /// It returned 0: the end of the stream, as far as splice(2) can see.
    End,
    /// EAGAIN: nothing it can take now.
    Nothing,
}

fn splice_in(from: &TcpStream, pipe: &OwnedFd) -> io::Result<Spliced> {
    match splice(from, pipe, MAX_FILL) {
        Ok(0) => Ok(Spliced::End),
        Ok(n) => Ok(Spliced::Bytes(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(Spliced::Nothing),
        Err(rustix::io::Errno::INVAL) => Err(io::Error::other(Unspliceable::Unsupported)),
        Err(error) => Err(error.into()),
    }
}

/// One splice(2) of up to `len` bytes, never blocking on the pipe. A socket written to after
/// its peer has gone answers `EPIPE` (and raises SIGPIPE, which Rust's runtime ignores).
fn splice(from: impl std::os::fd::AsFd, to: impl std::os::fd::AsFd, len: usize) -> rustix::io::Result<usize> {
    rustix::pipe::splice(from, None, to, None, len, SpliceFlags::NONBLOCK | SpliceFlags::MOVE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::test_support::tcp_pair as pair;

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
        let mut pipe = Pipe::new().unwrap().expect("a pipe");
        // 256 KiB, unless the user is past its pipe quota or fs.pipe-max-size is lower.
        assert!(rustix::pipe::fcntl_getpipe_size(&pipe.write).unwrap() >= MIN_PIPE_SIZE);
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
    fn splice_is_available_here_and_pipes_are_capped() {
        assert!(available(), "the probe found splice(2) refused on this machine");
        static TAKEN: AtomicUsize = AtomicUsize::new(0);
        let places: Vec<_> = (0..3).map_while(|_| Place::take(&TAKEN, 2)).collect();
        assert_eq!(places.len(), 2, "no place past the cap");
        drop(places);
        assert_eq!(TAKEN.load(Ordering::Relaxed), 0, "places are given back");
    }

    #[tokio::test]
    async fn a_writer_whose_peer_is_gone_is_an_error() {
        let (mut sender, from) = pair().await;
        let (to, receiver) = pair().await;
        // The receiver resets: an RST (SO_LINGER 0) instead of a FIN.
        socket2::SockRef::from(&receiver).set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(receiver);
        sender.write_all(&[7; 64 * 1024]).await.unwrap();
        let mut pipe = Pipe::new().unwrap().expect("a pipe");
        let error = async {
            loop {
                if pipe.held() == 0 && poll_fn(|cx| pipe.poll_fill(cx, &from)).await.unwrap() == 0 {
                    panic!("the sender did not close");
                }
                if let Err(error) = poll_fn(|cx| pipe.poll_drain(cx, &to)).await {
                    return error;
                }
            }
        };
        let error = tokio::time::timeout(std::time::Duration::from_secs(10), error).await.expect("no error");
        assert!(matches!(error.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe), "{error:?}");
    }
}
