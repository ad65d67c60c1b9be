//! Moving bytes both ways between the application and the endpoint.
//!
//! Each direction has one buffer that starts small (idle connections stay cheap) and grows when
//! reads keep filling it (bulk flows get large reads), as ztunnel does. Between two plain TCP
//! sockets its last step is a pipe instead ([`crate::splice`]): a bulk flow's bytes then move
//! without being copied through the proxy. A FIN from one side is passed on with `shutdown`
//! while the other direction keeps flowing (half-close).

use std::future::{poll_fn, Future as _};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::splice::{Pipe, Splice};

/// Why a flow was ended by one of its [`FlowTimeouts`] (inside a `TimedOut` I/O error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowTimedOut {
    #[error("idle timeout")]
    Idle,
    #[error("half-close timeout")]
    HalfClose,
}

impl FlowTimedOut {
    /// The timeout behind `error`, if a flow timeout ended it.
    pub fn of(error: &io::Error) -> Option<Self> {
        error.get_ref().and_then(|e| e.downcast_ref::<Self>()).copied()
    }
}

/// Buffer sizes a direction steps through. The last, between two plain TCP sockets, is a pipe.
const SIZES: [usize; 3] = [1024, 16 * 1024, 256 * 1024];
/// Consecutive full reads before a buffer grows.
const FULL_READS_TO_GROW: u8 = 2;

/// Bytes moved each way, for access logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    /// Of both, the bytes that went through a pipe (spliced), not a buffer.
    pub spliced: u64,
}

struct Direction {
    buf: Vec<u8>,
    /// Both ends are plain TCP sockets: a bulk flow may go through a pipe.
    can_splice: bool,
    /// Once it does, the pipe its bytes go through instead of `buf`.
    pipe: Option<Pipe>,
    size_step: usize,
    pos: usize,
    filled: usize,
    full_reads: u8,
    read_done: bool,
    need_flush: bool,
    done: bool,
    bytes: u64,
    /// Of `bytes`, those spliced.
    spliced: u64,
    /// The peer went away abruptly (reset, broken pipe) and this direction ended there.
    reset: Option<io::ErrorKind>,
}

impl Direction {
    fn new(can_splice: bool) -> Self {
        Self {
            buf: vec![0; SIZES[0]],
            can_splice,
            pipe: None,
            size_step: 0,
            pos: 0,
            filled: 0,
            full_reads: 0,
            read_done: false,
            need_flush: false,
            done: false,
            bytes: 0,
            spliced: 0,
            reset: None,
        }
    }

    fn grow_if_busy(&mut self) {
        if self.full_reads < FULL_READS_TO_GROW || self.size_step + 1 >= SIZES.len() {
            return;
        }
        self.size_step += 1;
        self.full_reads = 0;
        if self.can_splice && self.size_step + 1 == SIZES.len() {
            match Pipe::new() {
                Ok(Some(pipe)) => {
                    self.pipe = Some(pipe);
                    self.buf = Vec::new();
                    return;
                }
                // The process's pipes are all in use, or the user's quota is: a buffer.
                Ok(None) => {}
                // Out of file descriptors, say: the flow goes on through a buffer.
                Err(error) => tracing::debug!(%error, "no pipe to splice through; copying"),
            }
        }
        self.buf = vec![0; SIZES[self.size_step]];
    }

    /// Nothing read is waiting to be written.
    fn is_drained(&self) -> bool {
        match &self.pipe {
            Some(pipe) => pipe.held() == 0,
            None => self.pos == self.filled,
        }
    }

    /// Reads into the buffer, or splices into the pipe: the bytes read, 0 at the end.
    fn poll_fill<R>(&mut self, cx: &mut Context<'_>, reader: Pin<&mut R>) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + Splice + ?Sized,
    {
        if let Some(pipe) = &mut self.pipe {
            match ready!(pipe.poll_fill(cx, tcp_of(reader.as_ref().get_ref())?)) {
                // The pipe is empty when filled: nothing is lost going back to a buffer.
                Err(e) if crate::splice::unspliceable(&e) => {
                    tracing::debug!(error = %e, "splicing stopped; copying");
                    self.pipe = None;
                    self.buf = vec![0; SIZES[self.size_step]];
                }
                result => return Poll::Ready(result),
            }
        }
        let mut read_buf = ReadBuf::new(&mut self.buf);
        ready!(reader.poll_read(cx, &mut read_buf))?;
        let n = read_buf.filled().len();
        self.full_reads = if n == self.buf.len() { self.full_reads.saturating_add(1) } else { 0 };
        (self.pos, self.filled) = (0, n);
        Poll::Ready(Ok(n))
    }

    /// Writes from the buffer, or splices out of the pipe: the bytes written.
    fn poll_drain<W>(&mut self, cx: &mut Context<'_>, writer: Pin<&mut W>) -> Poll<io::Result<usize>>
    where
        W: AsyncWrite + Splice + ?Sized,
    {
        if let Some(pipe) = &mut self.pipe {
            return pipe.poll_drain(cx, tcp_of(writer.as_ref().get_ref())?);
        }
        let n = ready!(writer.poll_write(cx, &self.buf[self.pos..self.filled]))?;
        self.pos += n;
        Poll::Ready(Ok(n))
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Splice + ?Sized,
        W: AsyncWrite + Splice + ?Sized,
    {
        loop {
            if self.is_drained() && !self.read_done {
                self.grow_if_busy();
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Pending => {
                        // Nothing to read now: make sure what was written is not held back.
                        if self.need_flush {
                            match ready!(writer.as_mut().poll_flush(cx)) {
                                Err(e) if is_disconnect(e.kind()) => return self.end_reset(e.kind()),
                                result => result?,
                            }
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    // A TLS peer that closes without close_notify has still said all it had
                    // to say (as ztunnel treats it): an end of this direction, not a reset.
                    // (An endpoint's `UpstreamIo` already reads it so; other TLS streams may not.)
                    Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => self.read_done = true,
                    // The reader is gone: what was read still goes out, then the FIN; the
                    // other direction finishes on its own (as ztunnel's copy does).
                    Poll::Ready(Err(e)) if is_disconnect(e.kind()) => {
                        self.read_done = true;
                        self.reset = Some(e.kind());
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(n)) => self.read_done = n == 0,
                }
            }
            while !self.is_drained() {
                let n = match ready!(self.poll_drain(cx, writer.as_mut())) {
                    // The writer is gone: nothing more can go this way.
                    Ok(0) => return self.end_reset(io::ErrorKind::WriteZero),
                    Ok(n) => n,
                    Err(e) if is_disconnect(e.kind()) => return self.end_reset(e.kind()),
                    Err(e) => return Poll::Ready(Err(e)),
                };
                self.bytes += n as u64;
                if self.pipe.is_some() {
                    self.spliced += n as u64;
                }
                self.need_flush = true;
            }
            if self.read_done {
                // Pass the FIN on; the other direction keeps going. A writer already gone
                // needs none.
                match ready!(writer.as_mut().poll_shutdown(cx)) {
                    Err(e) if !is_disconnect(e.kind()) => return Poll::Ready(Err(e)),
                    _ => {}
                }
                self.finish();
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// This direction is over. Its pipe (two descriptors, one of the process's places) and
    /// buffer go now, not with the flow: the other direction of a half-closed flow may go on
    /// for hours.
    fn finish(&mut self) {
        self.done = true;
        self.pipe = None;
        self.buf = Vec::new();
    }

    /// This direction ends: its writer is gone.
    fn end_reset(&mut self, kind: io::ErrorKind) -> Poll<io::Result<()>> {
        self.finish();
        self.reset = self.reset.or(Some(kind));
        Poll::Ready(Ok(()))
    }
}

/// The socket of a stream in a direction that splices: both ends were plain TCP when it began.
fn tcp_of(stream: &(impl Splice + ?Sized)) -> io::Result<&tokio::net::TcpStream> {
    stream.tcp().ok_or_else(|| io::Error::other("splicing a stream that is not a plain socket"))
}

/// How a flow ended, for the access log: `closed`, `idle_timeout`, `half_close_timeout` or
/// `reset`.
pub fn outcome(result: &io::Result<()>) -> &'static str {
    match result {
        Ok(()) => "closed",
        Err(e) => match FlowTimedOut::of(e) {
            Some(FlowTimedOut::Idle) => "idle_timeout",
            Some(FlowTimedOut::HalfClose) => "half_close_timeout",
            None => "reset",
        },
    }
}

/// The ways a peer can vanish mid-flow: a reset or a closed pipe ends that direction, not the
/// whole flow.
fn is_disconnect(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    matches!(kind, ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | WriteZero)
}

/// How long a flow may go quiet. `None`: as long as it takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowTimeouts {
    /// No byte either way for this long ends the flow.
    pub idle: Option<Duration>,
    /// Once one direction has finished, the other may go this long without a byte (HAProxy's
    /// `timeout client-fin`/`server-fin`): a download after the application's FIN goes on as
    /// long as it moves.
    pub half_close: Option<Duration>,
}

/// Copies `client` ⇄ `upstream` until both directions have finished. A direction whose peer
/// resets ends alone (what it read still goes out) and the flow's result is that reset once the
/// other direction has finished too; any other error ends both at once. A flow past one of its
/// `timeouts` ends with a `TimedOut` error carrying a [`FlowTimedOut`].
pub async fn bidirectional<C, U>(
    client: &mut C,
    upstream: &mut U,
    timeouts: FlowTimeouts,
) -> (Transferred, io::Result<()>)
where
    C: AsyncRead + AsyncWrite + Splice + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Splice + Unpin + ?Sized,
{
    let can_splice = crate::splice::available() && client.tcp().is_some() && upstream.tcp().is_some();
    let mut up = Direction::new(can_splice);
    let mut down = Direction::new(can_splice);
    // One timer per flow, re-armed only when it fires (not on every byte): the idle deadline,
    // or the half-close one once a direction has finished.
    let mut timer: Option<Pin<Box<Sleep>>> = None;
    let (mut last_progress, mut moved) = (Instant::now(), 0u64);
    let mut half_closed_at: Option<Instant> = None;
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
            return Poll::Ready(match up.reset.or(down.reset) {
                Some(kind) => Err(kind.into()),
                None => Ok(()),
            });
        }
        let now_moved = up.bytes + down.bytes;
        if now_moved != moved {
            (moved, last_progress) = (now_moved, Instant::now());
        }
        if (up.done || down.done) && half_closed_at.is_none() {
            half_closed_at = Some(Instant::now());
        }
        let idle_at = timeouts.idle.and_then(|d| last_progress.checked_add(d));
        let half_close_at =
            half_closed_at.zip(timeouts.half_close).and_then(|(at, d)| at.max(last_progress).checked_add(d));
        let Some(deadline) = idle_at.into_iter().chain(half_close_at).min() else { return Poll::Pending };
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        // A timer that fires early (bytes moved since it was set) is re-armed for the deadline.
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                let why = if half_close_at == Some(deadline) { FlowTimedOut::HalfClose } else { FlowTimedOut::Idle };
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
    .await;
    let spliced = up.spliced + down.spliced;
    (Transferred { client_to_upstream: up.bytes, upstream_to_client: down.bytes, spliced }, result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn half_close_keeps_the_other_direction_open() {
        let (mut app, mut proxy_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut server) = tokio::io::duplex(64);
        let task =
            tokio::spawn(
                async move { bidirectional(&mut proxy_side, &mut upstream_side, FlowTimeouts::default()).await },
            );
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
        assert_eq!(bytes, Transferred { client_to_upstream: 4, upstream_to_client: 14, spliced: 0 });
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_and_half_closed_flows_end_with_their_timeout() {
        let timeouts = FlowTimeouts {
            idle: Some(std::time::Duration::from_secs(60)),
            half_close: Some(std::time::Duration::from_secs(5)),
        };
        // Nothing moves: the idle timeout.
        let (_app, mut proxy_side) = tokio::io::duplex(64);
        let (mut upstream_side, _server) = tokio::io::duplex(64);
        let (_, result) = bidirectional(&mut proxy_side, &mut upstream_side, timeouts).await;
        assert_eq!(result.as_ref().err().and_then(FlowTimedOut::of), Some(FlowTimedOut::Idle), "{result:?}");
        // The application closes its half; the upstream never answers: the half-close timeout.
        let (mut app, mut proxy_side) = tokio::io::duplex(64);
        let (mut upstream_side, _server) = tokio::io::duplex(64);
        app.shutdown().await.unwrap();
        let (_, result) = bidirectional(&mut proxy_side, &mut upstream_side, timeouts).await;
        assert_eq!(result.as_ref().err().and_then(FlowTimedOut::of), Some(FlowTimedOut::HalfClose), "{result:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_flow_goes_on_while_the_other_direction_moves() {
        let timeouts = FlowTimeouts { idle: None, half_close: Some(std::time::Duration::from_secs(5)) };
        let (mut app, mut proxy_side) = tokio::io::duplex(64);
        let (mut upstream_side, mut server) = tokio::io::duplex(64);
        app.shutdown().await.unwrap();
        let server = tokio::spawn(async move {
            // A download of 20 s after the application's FIN, a chunk every 2 s.
            for _ in 0..10 {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                server.write_all(b"chunk").await.unwrap();
            }
            server.shutdown().await.unwrap();
            server
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            got.len()
        });
        let (moved, result) = bidirectional(&mut proxy_side, &mut upstream_side, timeouts).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(moved.upstream_to_client, 50);
        drop(proxy_side);
        assert_eq!(reader.await.unwrap(), 50);
        drop(server.await.unwrap());
    }

    /// An application that resets: its read side fails at once, and what the upstream had
    /// already sent still reaches it.
    struct ResetReader {
        written: Vec<u8>,
    }

    impl Splice for ResetReader {}
    impl Splice for tokio::io::DuplexStream {}

    impl AsyncRead for ResetReader {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for ResetReader {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_reset_ends_its_direction_and_the_other_finishes() {
        let mut client = ResetReader { written: Vec::new() };
        let (mut upstream_side, mut server) = tokio::io::duplex(64);
        server.write_all(b"last words").await.unwrap();
        server.shutdown().await.unwrap();
        let (bytes, result) = bidirectional(&mut client, &mut upstream_side, FlowTimeouts::default()).await;
        assert_eq!(client.written, b"last words", "the other direction was finished");
        assert_eq!(bytes.upstream_to_client, 10);
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionReset, "and the flow says it was reset");
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the upstream got a FIN for the reset side");
    }

    /// app ⇄ (client, upstream) ⇄ server, over loopback TCP.
    async fn tcp_flow() -> [tokio::net::TcpStream; 4] {
        use crate::test_support::tcp_pair;
        let ((app, client), (upstream, server)) = (tcp_pair().await, tcp_pair().await);
        [app, client, upstream, server]
    }

    #[tokio::test]
    async fn a_bulk_flow_between_sockets_is_spliced_both_ways_and_half_closes() {
        let [mut app, mut client, mut upstream, mut server] = tcp_flow().await;
        let flow =
            tokio::spawn(async move { bidirectional(&mut client, &mut upstream, FlowTimeouts::default()).await });
        let upload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let download: Vec<u8> = upload.iter().rev().copied().collect();
        let sent = upload.clone();
        let uploading = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            got
        });
        // The server reads to the application's FIN, then answers: the half-closed flow goes on.
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == upload, "the upload arrives whole and in order");
        server.write_all(&download).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(uploading.await.unwrap() == download, "the download arrives whole and in order");
        let (bytes, result) = flow.await.unwrap();
        result.unwrap();
        assert_eq!((bytes.client_to_upstream, bytes.upstream_to_client), (5_000_000, 5_000_000));
        // Each way, the first few reads go through the buffers before it shows it is bulk.
        assert!(bytes.spliced > 9_000_000, "{bytes:?}");
    }

    /// A sender on another thread keeps sending: bytes that arrive between a splice that found
    /// none and the peek after it are not mistaken for bytes splice cannot read.
    #[tokio::test]
    async fn a_bulk_flow_from_a_busy_sender_stays_spliced() {
        const TOTAL: usize = 64 << 20;
        let [app, mut client, mut upstream, mut server] = tcp_flow().await;
        let app = app.into_std().unwrap();
        app.set_nonblocking(false).unwrap();
        let sender = std::thread::spawn(move || {
            use std::io::Write;
            let chunk = vec![1u8; 64 * 1024];
            let mut app = app;
            for _ in 0..TOTAL / chunk.len() {
                app.write_all(&chunk).unwrap();
            }
            app.shutdown(std::net::Shutdown::Write).unwrap();
            app
        });
        let reader = tokio::spawn(async move {
            let mut buf = vec![0; 1 << 20];
            let mut total = 0;
            loop {
                match server.read(&mut buf).await.unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let (bytes, result) = bidirectional(&mut client, &mut upstream, FlowTimeouts::default()).await;
        result.unwrap();
        drop(upstream);
        assert_eq!(reader.await.unwrap(), TOTAL);
        drop(sender.join().unwrap());
        assert!(bytes.spliced as usize > TOTAL - (1 << 20), "{bytes:?}");
    }

    /// TCP urgent data stops splice(2) at the urgent byte for good: the direction goes back to
    /// a buffer, whose recv(2) drops that byte (as before splicing) and reads on.
    #[tokio::test]
    async fn urgent_data_in_a_spliced_flow_sends_it_back_to_a_buffer() {
        let [mut app, mut client, mut upstream, mut server] = tcp_flow().await;
        let flow =
            tokio::spawn(async move { bidirectional(&mut client, &mut upstream, FlowTimeouts::default()).await });
        let bulk = vec![5u8; 2_000_000];
        app.write_all(&bulk).await.unwrap();
        let mut got = vec![0; bulk.len()];
        server.read_exact(&mut got).await.unwrap();
        socket2::SockRef::from(&app).send_out_of_band(b"!").unwrap();
        app.write_all(b"tail").await.unwrap();
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut rest)).await;
        assert_eq!(rest, b"tail", "the bytes after the urgent one arrive ({read:?})");
        drop((app, server));
        let (bytes, _) = flow.await.unwrap();
        assert_eq!(bytes.client_to_upstream, 2_000_004);
        assert!(bytes.spliced > 1_000_000, "{bytes:?}");
    }

    #[tokio::test]
    async fn a_request_response_flow_between_sockets_is_not_spliced() {
        let [mut app, mut client, mut upstream, mut server] = tcp_flow().await;
        let flow =
            tokio::spawn(async move { bidirectional(&mut client, &mut upstream, FlowTimeouts::default()).await });
        for _ in 0..100 {
            app.write_all(b"ping").await.unwrap();
            let mut buf = [0; 4];
            server.read_exact(&mut buf).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            app.read_exact(&mut buf).await.unwrap();
        }
        drop((app, server));
        let (bytes, _) = flow.await.unwrap();
        assert_eq!(bytes, Transferred { client_to_upstream: 400, upstream_to_client: 400, spliced: 0 });
    }

    #[test]
    fn buffers_grow_only_under_sustained_full_reads() {
        let mut d = Direction::new(false);
        d.grow_if_busy();
        assert_eq!(d.buf.len(), SIZES[0]);
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy();
        assert_eq!(d.buf.len(), SIZES[1]);
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy();
        d.full_reads = FULL_READS_TO_GROW;
        d.grow_if_busy();
        assert_eq!(d.buf.len(), SIZES[2], "stops at the largest size");
        assert!(d.pipe.is_none());
        // Between two sockets, the last step is a pipe.
        let mut d = Direction::new(true);
        for _ in 0..3 {
            d.full_reads = FULL_READS_TO_GROW;
            d.grow_if_busy();
        }
        assert!(d.pipe.is_some() && d.buf.is_empty());
        d.finish();
        assert!(d.pipe.is_none(), "a finished direction gives its pipe back");
    }
}
