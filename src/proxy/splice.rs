//! Zero-copy forwarding for bulk TCP flows: `splice(2)` through a pipe moves socket pages from
//! one connection to the other in the kernel, so the bytes are never copied into the proxy.
//! Used only once a direction has proven to be bulk, because each pipe costs two descriptors.

use std::io;
use std::os::fd::OwnedFd;
use std::task::{ready, Context, Poll};

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity asked for; the kernel keeps its default (64 KiB) if the user's pipe budget
/// (`/proc/sys/fs/pipe-user-pages-soft`) does not allow more.
const PIPE_SIZE: usize = 256 * 1024;

const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

/// One direction's kernel buffer.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes read from the source and not yet written to the destination.
    pending: usize,
}

impl Pipe {
    /// A new pipe, or the error (usually EMFILE) that tells the caller to keep copying instead.
    pub fn new() -> io::Result<Self> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Self { read, write, capacity, pending: 0 })
    }

    /// Moves bytes `from` → `to` until the source has nothing more for now (`Pending`), has sent
    /// its FIN and everything before it was written (`Ready(Ok)`), or fails. `bytes` counts what
    /// reached `to`.
    pub fn poll_forward(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        bytes: &mut u64,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pending == 0 {
                ready!(from.poll_read_ready(cx))?;
                // The pipe is empty here, so WouldBlock can only mean the socket has no data,
                // which is what `try_io` needs to clear the right readiness.
                match from
                    .try_io(Interest::READABLE, || Ok(splice(from, None, &self.write, None, self.capacity, FLAGS)?))
                {
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(n) => self.pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            while self.pending > 0 {
                ready!(to.poll_write_ready(cx))?;
                // The pipe holds data here, so WouldBlock can only mean the socket is full.
                match to.try_io(Interest::WRITABLE, || Ok(splice(&self.read, None, to, None, self.pending, FLAGS)?)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        self.pending -= n;
                        *bytes += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }
}
