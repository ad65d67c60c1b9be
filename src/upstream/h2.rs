//! The HTTP/2 client for services' endpoints: h2's client, each request's stream opened and its
//! response awaited by the request's own task.
//!
//! hyper's HTTP/2 client passes each request through a channel to the connection's task, which
//! opens the stream and spawns one more task per request to await the response and pass it back
//! through a second channel: per request, a task to create and two more wake-ups. Here the
//! connection's task only reads and writes. What hyper's client adds is kept: its settings
//! (stream window, frame and send-buffer sizes; a larger connection window and header list),
//! `content-length` for a body of known size, the request body piped as the endpoint's flow
//! control allows (eagerly in the request's task, in a task of its own for a body that is not
//! all there yet; unlike hyper, a body's last frame is handed to h2 without waiting for the
//! window), the response body's capacity released as it is read, and `RST_STREAM(NO_ERROR)`
//! after a complete response ending nothing but the request (one before the response's end
//! cuts it short, an error). Unlike hyper, a request body still on its way when its response
//! is dropped (read whole, or given up) is cut and the stream reset, as Envoy does (a last
//! frame already handed to h2 excepted). And a request's handle holds one of the streams the
//! endpoint allows at once, so the pool can open another connection rather than queue it.
//! Connection headers are already gone ([`crate::proxy`]'s `strip_hop_by_hop`).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method, Request, Response};
use hyper::body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::pool::{BodyError, RequestBody};

// hyper 1.x's HTTP/2 client defaults, so endpoints see what they saw before, except the
// connection window and the header list.
/// A response's data is released to the endpoint as its application reads it: a stream whose
/// application stops reading holds up to `STREAM_WINDOW` of the connection's window. With
/// hyper's 5 MiB, three such downloads stalled every other response on the shared connection;
/// 32 MiB takes sixteen, and bounds what unread responses hold per endpoint connection.
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// A response's header list, at most: as `--max-header-bytes`' default for requests (Envoy's
/// `max_response_headers_kb` default is 60 KiB; hyper's 16 KiB refused real responses).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams that may be opened before the endpoint's SETTINGS say how many it allows.
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// One shared connection to an endpoint; each request uses a handle of its own
/// ([`Client::reserve`]), holding one of the endpoint's streams.
pub struct Client {
    /// One handle for all the connection's requests, taken in turn to open a stream: as in
    /// hyper's client, when the endpoint's stream limit is reached at most one stream waits to
    /// open (in h2) and the next requests wait here, so one given up meanwhile (a timeout, the
    /// application gone) never reaches the endpoint. A handle of its own per request would let
    /// every request queue its HEADERS in h2, sent once a stream frees however long ago its
    /// caller gave up.
    send: Arc<tokio::sync::Mutex<SendRequest<Bytes>>>,
    /// Set when the connection's task ends, or once it takes no new stream (GOAWAY).
    closed: Arc<AtomicBool>,
    streams: Arc<Streams>,
    /// A request's handle: its stream's place in `streams`, until its response is dropped.
    held: Option<StreamHeld>,
}

/// The streams the connection's requests hold, against how many the endpoint allows at once
/// (its `SETTINGS_MAX_CONCURRENT_STREAMS`, as read after the connection's last new stream; at
/// least 1, so a connection an endpoint once allowed none is tried again): the pool opens
/// another connection to the endpoint rather than queue a request behind a full one, as
/// Envoy's pool does.
#[derive(Debug)]
struct Streams {
    held: AtomicUsize,
    limit: AtomicUsize,
    /// A stream was taken since the pool's sweeper last asked ([`Client::idle_since_last_asked`]).
    used: AtomicBool,
}

/// One stream's place in [`Streams`], given back when dropped (with the response's body).
#[derive(Debug)]
struct StreamHeld(Arc<Streams>);

impl Drop for StreamHeld {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Client {
    /// The connection runs on its own task, which holds `slot` (a connection-limit permit, or
    /// nothing) until it closes. It closes once no handle and no stream is left. Until the
    /// endpoint's SETTINGS arrive, up to `expected_streams` streams may be open (what another
    /// connection to it learnt; else 100): more would be refused by an endpoint allowing fewer.
    pub async fn handshake<S>(
        io: S,
        slot: impl Send + 'static,
        expected_streams: Option<usize>,
    ) -> Result<Self, h2::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let expected_streams = expected_streams.unwrap_or(INITIAL_MAX_SEND_STREAMS).max(1);
        let (send, connection) = h2::client::Builder::new()
            .initial_max_send_streams(expected_streams)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .enable_push(false)
            .handshake(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP/2 connection closed with an error");
            }
            ended.store(true, Ordering::Release);
        });
        let streams = Arc::new(Streams {
            held: AtomicUsize::new(0),
            limit: AtomicUsize::new(expected_streams),
            used: AtomicBool::new(false),
        });
        Ok(Self { send: Arc::new(tokio::sync::Mutex::new(send)), closed, streams, held: None })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// A handle for one request, if the endpoint allows one more stream than the connection's
    /// requests hold.
    pub fn reserve(&self) -> Option<Self> {
        let limit = self.streams.limit.load(Ordering::Relaxed);
        self.streams
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| (held < limit).then_some(held + 1))
            .ok()?;
        Some(self.handle())
    }

    /// A handle for one request even when the endpoint's streams are all held: the request
    /// waits for one to end (no other connection could be opened).
    pub fn reserve_waiting(&self) -> Self {
        self.streams.held.fetch_add(1, Ordering::Relaxed);
        self.handle()
    }

    /// How many streams the endpoint allows at once, as last seen.
    pub fn stream_limit(&self) -> usize {
        self.streams.limit.load(Ordering::Relaxed)
    }

    /// How many streams the connection's requests hold.
    pub fn streams_held(&self) -> usize {
        self.streams.held.load(Ordering::Relaxed)
    }

    /// No request holds a stream, and none took one since the last time this was asked.
    pub fn idle_since_last_asked(&self) -> bool {
        let used = self.streams.used.swap(false, Ordering::Relaxed);
        !used && self.streams.held.load(Ordering::Relaxed) == 0
    }

    fn handle(&self) -> Self {
        self.streams.used.store(true, Ordering::Relaxed);
        Self {
            send: self.send.clone(),
            closed: self.closed.clone(),
            streams: self.streams.clone(),
            held: Some(StreamHeld(self.streams.clone())),
        }
    }

    /// Waits until `send` may open a stream (the last one opened is open). A GOAWAY or a
    /// connection error: no new stream may go on this connection, even while earlier streams
    /// finish on it, so it counts as closed and the pool opens another for the next request (as
    /// it did when hyper's client, noticing the same, ended its dispatch task).
    async fn ready(&self, send: &mut SendRequest<Bytes>) -> Result<(), h2::Error> {
        let ready = poll_fn(|cx| send.poll_ready(cx)).await;
        if ready.is_err() {
            self.closed.store(true, Ordering::Release);
        }
        ready
    }

    /// Opens a stream for `request` and waits for the response head.
    pub async fn send(&mut self, request: Request<RequestBody>) -> Result<Response<Body>, h2::Error> {
        self.send_noting_open(request, &AtomicBool::new(false)).await.map_err(Failure::into_error)
    }

    /// [`Client::send`], setting `opened` once the stream is open (it may first wait for the
    /// endpoint's stream limit).
    pub async fn send_noting_open(
        &mut self,
        request: Request<RequestBody>,
        opened: &AtomicBool,
    ) -> Result<Response<Body>, Failure> {
        let (response, stream, body) = {
            let mut send = self.send.lock().await;
            if let Err(error) = self.ready(&mut send).await {
                return Err(Failure::Unsent(error, Unsent(Box::new(request))));
            }
            let (mut parts, body) = request.into_parts();
            if let Some(len) = body.size_hint().exact() {
                if len != 0 || !matches!(parts.method, Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT) {
                    parts.headers.entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(len));
                }
            }
            let end_of_stream = body.is_end_stream();
            let opened_stream = send.send_request(Request::from_parts(parts, ()), end_of_stream)?;
            // The endpoint's SETTINGS may have changed it since the last request.
            self.streams.limit.store(send.current_max_send_streams().max(1), Ordering::Relaxed);
            // As hyper, nothing else waits on a stream until it is open (h2 keeps one waker per
            // stream): the body's pipe starts, and the next request may wait behind this one,
            // only once it is. A GOAWAY meanwhile fails this wait whether or not the endpoint
            // takes the stream (it may be at or below the GOAWAY's last stream id): the stream's
            // fate comes with its response (h2 fails the streams the endpoint did not take), and
            // the connection counts as closed for the next requests. Only a stream known to be
            // open is the request's own (a timeout then counts against the endpoint).
            if self.ready(&mut send).await.is_ok() {
                opened.store(true, Ordering::Relaxed);
            }
            let (response, stream) = opened_stream;
            (response, stream, body)
        };
        // Dropped with this future before the response (a timeout, the application gone), the
        // guard tells a spawned pipe to reset the stream.
        let mut pipe_guard = None;
        if !body.is_end_stream() {
            let mut pipe = Pipe::new(body, stream);
            match poll_fn(|cx| Poll::Ready(pipe.poll_send(cx))).await {
                // All handed to h2, which may hold the last frame until the endpoint's window
                // opens: a stream closed at both ends, so h2 resets nothing when the response
                // is dropped, and cutting it then would cost every request a reset (h2 keeps a
                // reset stream for a while). Left as it is: an endpoint that answers whole and
                // never opens its window holds one frame until its connection closes.
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => tracing::debug!(%error, "request body not sent to the endpoint"),
                Poll::Pending => {
                    let (guard, dropped) = oneshot::channel();
                    pipe_guard = Some(guard);
                    tokio::spawn(Box::pin(SpawnedPipe { pipe, dropped, sent: false }));
                }
            }
        }
        let response = response.await?;
        let length = content_length(response.headers());
        // Answered: the pipe goes on until the response is dropped (read to its end, the
        // application gone, a stream idle timeout), which resets the stream if the body is still
        // on its way, as Envoy's router does (`allow_multiplexed_upstream_half_close` is off by
        // default): else a body the endpoint never takes would hold its stream and memory until
        // the endpoint closes the connection.
        let held = self.held.take();
        Ok(response.map(|recv| Body { recv: RecvBody::new(recv, length), _pipe_guard: pipe_guard, _held: held }))
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub enum Failure {
    /// The connection takes no new stream (the endpoint's GOAWAY, or it closed): nothing was
    /// sent, and the request comes back as it was given.
    Unsent(h2::Error, Unsent),
    /// The stream failed, or the connection under it.
    Failed(h2::Error),
}

impl Failure {
    pub fn into_error(self) -> h2::Error {
        match self {
            Self::Unsent(error, _) | Self::Failed(error) => error,
        }
    }
}

impl From<h2::Error> for Failure {
    fn from(error: h2::Error) -> Self {
        Self::Failed(error)
    }
}

/// A request no stream was opened for.
pub struct Unsent(pub Box<Request<RequestBody>>);

impl std::fmt::Debug for Unsent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Unsent({} {})", self.0.method(), self.0.uri())
    }
}

/// The reset a stream gets when the body sent on it fails.
pub trait ResetReason {
    fn reset_reason(&self) -> Reason;
}

/// A request body that failed: the HTTP/2 reason behind the failure (an application that
/// cancelled its stream: `CANCEL`), else `INTERNAL_ERROR`, as hyper's client; `CANCEL` for a
/// body we gave up.
impl ResetReason for BodyError {
    fn reset_reason(&self) -> Reason {
        let BodyError::App(error) = self else { return Reason::CANCEL };
        error.http2_reason().unwrap_or(Reason::INTERNAL_ERROR)
    }
}

/// The reason of the first HTTP/2 error in `error`'s chain, itself included.
pub fn reason_in(error: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cause = error.source();
    }
    None
}

/// A message's `Content-Length` for its body's size hint ([`RecvBody`]); unknown when it is
/// malformed or its values differ (h2 itself refuses a body that does not match it).
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    super::h1::content_length(headers).ok().flatten()
}

/// A body on its way to its stream: a request's to an endpoint, a response's to an application
/// (`proxy::http`'s HTTP/2 server).
pub struct Pipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A data frame waiting for stream capacity, and whether it ends the body.
    data: Option<(Bytes, bool)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipeError<E> {
    #[error("the peer reset the stream: {0}")]
    Reset(Reason),
    #[error(transparent)]
    Stream(#[from] h2::Error),
    #[error("the stream closed before the body was sent")]
    Closed,
    #[error("the body failed: {0}")]
    Body(E),
}

impl<B> Pipe<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: ResetReason,
{
    pub fn new(body: B, stream: SendStream<Bytes>) -> Self {
        Self { body, stream, data: None }
    }

    /// Sends what the body has until it waits; `Ready` once it has all been sent or failed.
    pub fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeError<B::Error>>> {
        loop {
            // Woken by a reset while waiting for the body or for capacity.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx)? {
                return Poll::Ready(Err(PipeError::Reset(reason)));
            }
            if let Some((data, end)) = self.data.take() {
                while self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.data = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error.into())),
                        Poll::Ready(None) => return Poll::Ready(Err(PipeError::Closed)),
                    }
                }
                self.stream.send_data(data, end)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame before any capacity is claimed: capacity held for a body that
            // sends nothing can stall the connection's other streams (hyper #4003).
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.body.is_end_stream();
                        // The body's last frame is in memory already: h2 holds it until the
                        // windows allow (no more than we hold now), so waiting for capacity
                        // first would only cost a task (a gRPC unary message is one frame).
                        if data.is_empty() || end {
                            self.stream.send_data(data, end)?;
                            if end {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            // h2 raises the claim to the whole frame as it sends it.
                            self.stream.reserve_capacity(1);
                            self.data = Some((data, end));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(error)) => {
                    self.stream.send_reset(error.reset_reason());
                    return Poll::Ready(Err(PipeError::Body(error)));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A pipe that outlived its first pass, in a task of its own.
struct SpawnedPipe {
    pipe: Pipe<RequestBody>,
    /// Ready once the request or its response is dropped (its sender is `Body`'s `_pipe_guard`).
    dropped: oneshot::Receiver<()>,
    /// All handed to h2: waiting only to cut a last frame h2 may still hold (a body that needed
    /// a task of its own is large, so the reset this costs a stream closed cleanly is rare).
    sent: bool,
}

impl Future for SpawnedPipe {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Pin::new(&mut self.dropped).poll(cx).is_ready() {
            self.pipe.stream.send_reset(Reason::CANCEL);
            return Poll::Ready(());
        }
        if self.sent {
            return Poll::Pending;
        }
        match ready!(self.pipe.poll_send(cx)) {
            Ok(()) => {
                self.sent = true;
                Poll::Pending // woken by `dropped`, polled above
            }
            Err(error) => {
                tracing::debug!(%error, "request body not sent to the endpoint");
                Poll::Ready(())
            }
        }
    }
}

/// A response body from the endpoint.
pub struct Body {
    recv: RecvBody,
    /// Dropped with the response, it tells the request body's spawned pipe to cut the body if
    /// still on its way.
    _pipe_guard: Option<oneshot::Sender<()>>,
    /// The stream's place among those the endpoint allows, given back with the response.
    _held: Option<StreamHeld>,
}

impl Body {
    /// A reset, `RST_STREAM(NO_ERROR)` included, before the response's `END_STREAM` cuts the
    /// response short: an error (one after it, RFC 9113 §8.1's "no more of the request", h2
    /// keeps out of the response: its data and end are read as sent).
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        self.recv.poll_frame(cx)
    }

    pub fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        self.recv.size_hint()
    }
}

/// An HTTP/2 body read from h2's stream, a response's or (`AppBody`) a request's: its data,
/// the stream's window given back as each frame is read, then its trailers; its
/// `Content-Length` (h2 checks the body against it) is the size hint.
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    /// What `Content-Length` says is left.
    remaining: Option<u64>,
}

impl RecvBody {
    pub fn new(recv: RecvStream, content_length: Option<u64>) -> Self {
        Self { recv, data_done: false, remaining: content_length }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.remaining = self.remaining.map(|r| r.saturating_sub(data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    pub fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::pool::Copied;
    use crate::upstream::UpstreamHandle;
    use tokio::sync::mpsc;

    /// A client on one end of an in-memory pipe and h2's server on the other, with a stream
    /// window of `window` bytes so a larger body must wait for the server to read.
    async fn pair(window: u32) -> (Client, h2::server::Connection<tokio::io::DuplexStream, Bytes>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            h2::server::Builder::new().initial_window_size(window).handshake(server_io).await.unwrap()
        });
        let client = Client::handshake(client_io, (), None).await.unwrap();
        (client, server.await.unwrap())
    }

    fn post<B>(body: B) -> Request<B> {
        Request::post("http://endpoint/upload").body(body).unwrap()
    }

    async fn read_all(body: &mut h2::RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            let _ = body.flow_control().release_capacity(data.len());
            all.extend_from_slice(&data);
        }
        all
    }

    /// A body larger than the endpoint's stream window goes in pieces as the endpoint reads it,
    /// sent on by a task of its own once the response has come; the response's data, length
    /// and trailers come back.
    #[tokio::test]
    async fn a_body_larger_than_the_window_is_piped_and_the_response_has_its_trailers() {
        let (mut client, mut server) = pair(16 * 1024).await;
        let (tx, rx) = mpsc::channel(4);
        let chunk = Bytes::from(vec![7u8; 40 * 1024]);
        let endpoint = tokio::spawn(async move {
            let (request, mut respond) = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let response = http::Response::builder().header("content-length", "5").body(()).unwrap();
            let mut stream = respond.send_response(response, false).unwrap();
            stream.send_data(Bytes::from_static(b"hello"), false).unwrap();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            stream.send_trailers(trailers).unwrap();
            read_all(&mut request.into_body()).await.len()
        });
        tx.send(Copied::Data(chunk.clone())).await.unwrap();
        let response = client.send(post(RequestBody::mirror(rx, UpstreamHandle::detached()))).await.unwrap();
        let mut body = response.into_body();
        assert_eq!(body.size_hint().exact(), Some(5));
        let data = poll_fn(|cx| body.poll_frame(cx)).await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), "hello");
        let trailers = poll_fn(|cx| body.poll_frame(cx)).await.unwrap().unwrap();
        assert_eq!(trailers.trailers_ref().unwrap()["grpc-status"], "0");
        assert!(poll_fn(|cx| body.poll_frame(cx)).await.is_none());
        // The rest of the body goes after the response.
        tx.send(Copied::Data(chunk.clone())).await.unwrap();
        tx.send(Copied::End).await.unwrap();
        assert_eq!(endpoint.await.unwrap(), 2 * chunk.len());
    }

    /// A body as the application's side hands it over: `bytes` whose last frame says it is
    /// the end (hyper's `Incoming`, here from hyper's HTTP/1.1 client and server).
    async fn incoming(bytes: &'static [u8]) -> hyper::body::Incoming {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let reply = hyper::service::service_fn(move |_| async move {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from_static(
                    bytes,
                ))))
            });
            let io = hyper_util::rt::TokioIo::new(server_io);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, reply).await;
        });
        let io = hyper_util::rt::TokioIo::new(client_io);
        let (mut send, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let request = Request::new(http_body_util::Empty::<Bytes>::new());
        send.send_request(request).await.unwrap().into_body()
    }

    /// A body's last frame is handed to h2 even while the endpoint's window has no room for it
    /// (h2 holds it until the window opens), so no task is left waiting for capacity: the
    /// pipe finishes before the endpoint opens its window, and every byte arrives after.
    #[tokio::test]
    async fn a_body_s_last_frame_does_not_wait_for_the_window() {
        let (mut client, mut server) = pair(0).await;
        let (open_window, opened) = tokio::sync::oneshot::channel::<()>();
        let (body_tx, received) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // A first exchange, without a body, so the client has the window of 0.
            let (_, mut respond) = server.accept().await.unwrap().unwrap();
            respond.send_response(http::Response::new(()), true).unwrap();
            let (request, _respond) = server.accept().await.unwrap().unwrap();
            let mut body = request.into_body();
            tokio::spawn(async move { body_tx.send(read_all(&mut body).await) });
            opened.await.unwrap();
            server.set_initial_window_size(65_535).unwrap();
            while server.accept().await.is_some() {}
        });
        let empty = RequestBody::empty(UpstreamHandle::detached(), None);
        client.send(Request::get("http://endpoint/").body(empty).unwrap()).await.unwrap();
        let body = RequestBody::new(incoming(b"one message").await.into(), UpstreamHandle::detached(), None);
        let mut send = client.send.lock().await;
        poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
        let (_response, stream) = send.send_request(post(()), false).unwrap();
        drop(send);
        let mut pipe = Pipe { body, stream, data: None };
        let sent = tokio::time::timeout(std::time::Duration::from_secs(10), poll_fn(|cx| pipe.poll_send(cx))).await;
        assert!(matches!(sent, Ok(Ok(()))), "the last frame waited for the window: {sent:?}");
        open_window.send(()).unwrap();
        assert_eq!(received.await.unwrap(), b"one message");
    }

    /// A request given up before its response (a timeout, the application gone) resets its
    /// stream, so the endpoint stops waiting for the rest of the body.
    #[tokio::test]
    async fn a_request_given_up_before_its_response_resets_the_stream() {
        let (mut client, mut server) = pair(65_535).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Copied::Data(Bytes::from_static(b"part"))).await.unwrap();
        let endpoint = tokio::spawn(async move {
            let (request, _respond) = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut body = request.into_body();
            assert_eq!(body.data().await.unwrap().unwrap(), "part");
            body.data().await.unwrap().unwrap_err().reason()
        });
        let send = client.send(post(RequestBody::mirror(rx, UpstreamHandle::detached())));
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), send).await.is_err());
        let reset = tokio::time::timeout(std::time::Duration::from_secs(10), endpoint).await;
        assert_eq!(reset.expect("the endpoint saw no reset").unwrap(), Some(Reason::CANCEL));
        drop(tx);
    }

    /// A response dropped, before its end (the application gone, a stream idle timeout) or
    /// after it, while the request body still waits for a window the endpoint never opens
    /// resets the stream: the endpoint's stream slot and the body's memory are not held until
    /// the connection closes. Before, the answered pipe waited on, after a whole response too.
    #[tokio::test]
    async fn a_response_dropped_resets_a_waiting_upload() {
        for whole in [false, true] {
            let (mut client, mut server) = pair(0).await;
            let (tx, rx) = mpsc::channel(4);
            tx.send(Copied::Data(Bytes::from_static(b"never taken"))).await.unwrap();
            let endpoint = tokio::spawn(async move {
                let (request, mut respond) = server.accept().await.unwrap().unwrap();
                tokio::spawn(async move { while server.accept().await.is_some() {} });
                let _open = respond.send_response(http::Response::new(()), whole).unwrap();
                // Never read, and the window is 0: the body cannot move.
                let mut body = request.into_body();
                body.data().await.and_then(|r| r.err()).and_then(|e| e.reason())
            });
            let response = client.send(post(RequestBody::mirror(rx, UpstreamHandle::detached()))).await.unwrap();
            let mut body = response.into_body();
            if whole {
                assert!(poll_fn(|cx| body.poll_frame(cx)).await.is_none(), "the response ends");
            }
            drop(body);
            let reset = tokio::time::timeout(std::time::Duration::from_secs(10), endpoint).await;
            assert_eq!(reset.expect("the endpoint saw no reset").unwrap(), Some(Reason::CANCEL), "whole: {whole}");
            drop(tx);
        }
    }

    /// An endpoint that answers the first request with a head, then, once told, with `data`
    /// (ending the stream when `end`) and `RST_STREAM(NO_ERROR)` `pause_ms` later.
    fn answer_then_reset(
        mut server: h2::server::Connection<tokio::io::DuplexStream, Bytes>,
        data: &'static [u8],
        end: bool,
        pause_ms: u64,
    ) -> tokio::sync::oneshot::Sender<()> {
        let (head_read, read) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (_request, mut respond) = server.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while server.accept().await.is_some() {} });
            let mut stream = respond.send_response(http::Response::new(()), false).unwrap();
            read.await.unwrap();
            stream.send_data(Bytes::from_static(data), end).unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
            stream.send_reset(Reason::NO_ERROR);
        });
        head_read
    }

    /// `RST_STREAM(NO_ERROR)` after a complete response: the endpoint wants no more of the
    /// request; the response, read after the reset arrived, is whole and ends without an error
    /// (RFC 9113 §8.1).
    #[tokio::test]
    async fn a_no_error_reset_after_the_response_ends_it_normally() {
        let (mut client, server) = pair(65_535).await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Copied::Data(Bytes::from_static(b"unwanted"))).await.unwrap();
        // A reset drops what is still queued: the answer goes out first.
        let head_read = answer_then_reset(server, b"early answer", true, 100);
        let response = client.send(post(RequestBody::mirror(rx, UpstreamHandle::detached()))).await.unwrap();
        head_read.send(()).unwrap();
        // Read only once the reset has arrived.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let mut body = response.into_body();
        let mut read = Vec::new();
        while let Some(frame) = poll_fn(|cx| body.poll_frame(cx)).await {
            read.extend_from_slice(frame.expect("no error").data_ref().unwrap_or(&Bytes::new()));
        }
        assert_eq!(read, b"early answer");
        drop(tx);
    }

    /// `RST_STREAM(NO_ERROR)` before the response's END_STREAM cuts it short: the body ends with
    /// an error, not as if it were whole (RFC 9113 §8.1 allows NO_ERROR only after a complete
    /// response). Before, a truncated JSON document reached the application as a success.
    #[tokio::test]
    async fn a_no_error_reset_before_the_response_ends_is_an_error() {
        let (mut client, server) = pair(65_535).await;
        let head_read = answer_then_reset(server, b"{\"items\": [1, 2", false, 0);
        let get = Request::get("http://endpoint/").body(RequestBody::empty(UpstreamHandle::detached(), None)).unwrap();
        let mut body = client.send(get).await.unwrap().into_body();
        head_read.send(()).unwrap();
        let mut error = None;
        while let Some(frame) = poll_fn(|cx| body.poll_frame(cx)).await {
            if let Err(e) = frame {
                error = Some(e);
                break;
            }
        }
        assert_eq!(error.expect("the cut response ended without an error").reason(), Some(Reason::NO_ERROR));
    }

    /// A request's handle holds one of the streams the endpoint allows from when the pool
    /// hands it out until its response is dropped; at the limit the pool gets none (and opens
    /// another connection), and a handle given up before its request gives its place back.
    #[tokio::test]
    async fn a_handle_holds_a_stream_until_its_response_is_dropped() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(server_io).await.unwrap();
            while let Some(Ok((_, mut respond))) = server.accept().await {
                let _ = respond.send_response(http::Response::new(()), false).map(std::mem::forget);
            }
        });
        // A limit of 0 learnt from another connection counts as 1: else no request would ever
        // go, and the limit never be read again.
        let client = Client::handshake(client_io, (), Some(0)).await.unwrap();
        assert_eq!(client.stream_limit(), 1, "until the endpoint's SETTINGS: another connection's limit, at least 1");
        let given_up = client.reserve().expect("a stream is free");
        assert!(client.reserve().is_none(), "the endpoint's one stream is held");
        drop(given_up);
        let mut first = client.reserve().expect("a handle given up gives its stream back");
        let empty = RequestBody::empty(UpstreamHandle::detached(), None);
        let response = first.send(Request::get("http://endpoint/").body(empty).unwrap()).await.unwrap();
        drop(first);
        assert!(client.reserve().is_none(), "the response holds the stream");
        drop(response);
        assert!(client.reserve().is_some(), "a dropped response gives it back");
    }

    /// After the endpoint's GOAWAY, while an earlier stream still holds the connection open,
    /// a new request fails without being sent, comes back whole for another connection, and
    /// the connection counts as closed, so the pool opens another for the next request.
    #[tokio::test]
    async fn a_goaway_closes_the_connection_for_new_requests() {
        let (mut client, mut server) = pair(65_535).await;
        let pooled = client.reserve_waiting();
        let (first_answered, answered) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (_request, mut respond) = server.accept().await.unwrap().unwrap();
            // The first response never ends: its stream keeps the connection open.
            let _open = respond.send_response(http::Response::new(()), false).unwrap();
            first_answered.send(()).unwrap();
            server.graceful_shutdown();
            while let Some(Ok((_, mut respond))) = server.accept().await {
                let _ = respond.send_response(http::Response::new(()), true);
            }
            drop(_open);
        });
        let get =
            || Request::get("http://endpoint/").body(RequestBody::empty(UpstreamHandle::detached(), None)).unwrap();
        let _first = client.send(get()).await.unwrap();
        answered.await.unwrap();
        let mut refused = None;
        for _ in 0..1000 {
            match client.send_noting_open(get(), &AtomicBool::new(false)).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(failure) => {
                    refused = Some(failure);
                    break;
                }
            }
        }
        let Some(Failure::Unsent(error, Unsent(request))) = refused else {
            panic!("no request came back unsent after the GOAWAY: {refused:?}");
        };
        assert!(error.is_go_away());
        assert_eq!(request.uri(), "http://endpoint/");
        assert!(pooled.is_closed());
    }

    /// An endpoint that takes one stream at a time and holds `/held` until told. Each request's
    /// path is reported when its stream is accepted, and with its body once that is read.
    struct OneStreamEndpoint {
        client: Client,
        accepted: mpsc::UnboundedReceiver<String>,
        read: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
        release: Option<tokio::sync::oneshot::Sender<()>>,
    }

    async fn one_stream_endpoint() -> OneStreamEndpoint {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            h2::server::Builder::new().max_concurrent_streams(1).handshake(server_io).await.unwrap()
        });
        let client = Client::handshake(client_io, (), None).await.unwrap();
        let mut server: h2::server::Connection<_, Bytes> = server.await.unwrap();
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let (read_tx, read) = mpsc::unbounded_channel();
        let (release_tx, release) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut release = Some(release);
            while let Some(Ok((request, mut respond))) = server.accept().await {
                let path = request.uri().path().to_owned();
                let _ = accepted_tx.send(path.clone());
                let hold = if path == "/held" { release.take() } else { None };
                let read_tx = read_tx.clone();
                tokio::spawn(async move {
                    if let Some(hold) = hold {
                        let _ = hold.await;
                    }
                    let body = read_all(&mut request.into_body()).await;
                    let _ = read_tx.send((path, body));
                    let _ = respond.send_response(http::Response::new(()), true);
                });
            }
        });
        // An answered request first, so the client has the endpoint's SETTINGS (one stream).
        client.reserve_waiting().send(get("/first")).await.unwrap();
        OneStreamEndpoint { client, accepted, read, release: Some(release_tx) }
    }

    fn get(path: &str) -> Request<RequestBody> {
        Request::get(format!("http://endpoint{path}"))
            .body(RequestBody::empty(UpstreamHandle::detached(), None))
            .unwrap()
    }

    /// `request` sent on a clone of `client` in a task of its own.
    fn spawn_send(client: &Client, request: Request<RequestBody>) -> tokio::task::JoinHandle<Result<(), h2::Error>> {
        let mut client = client.reserve_waiting();
        tokio::spawn(async move { client.send(request).await.map(|_| ()) })
    }

    fn drain<T>(channel: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
        std::iter::from_fn(|| channel.try_recv().ok()).collect()
    }

    /// With the endpoint's stream limit reached, at most one request waits in h2 to open its
    /// stream, as in hyper's client; the next ones wait for it, and those given up meanwhile
    /// never reach the endpoint (with a handle per request, h2 queued all of them and sent
    /// each once a stream freed).
    #[tokio::test]
    async fn requests_given_up_while_the_stream_limit_is_full_are_never_sent() {
        let mut endpoint = one_stream_endpoint().await;
        let held = spawn_send(&endpoint.client, get("/held"));
        assert_eq!(endpoint.accepted.recv().await.as_deref(), Some("/first"));
        assert_eq!(endpoint.accepted.recv().await.as_deref(), Some("/held"));
        for path in ["/queued", "/given-up-1", "/given-up-2"] {
            let mut waiting = endpoint.client.reserve_waiting();
            let send = tokio::time::timeout(std::time::Duration::from_millis(20), waiting.send(get(path)));
            assert!(send.await.is_err(), "{path} was answered while the only stream was held");
        }
        endpoint.release.take().unwrap().send(()).unwrap();
        held.await.unwrap().unwrap();
        endpoint.client.reserve_waiting().send(get("/last")).await.unwrap();
        let later = drain(&mut endpoint.accepted);
        assert!(
            later.iter().all(|p| !p.starts_with("/given-up")),
            "requests given up while waiting reached the endpoint: {later:?}"
        );
        assert_eq!(later.last().map(String::as_str), Some("/last"));
    }

    /// A request whose stream waits for the endpoint's stream limit, with a body still coming,
    /// and a request behind it: both go through once a stream frees (h2 keeps one waker per
    /// stream, so the body's pipe and the next request must not both wait on the queued one).
    #[tokio::test]
    async fn a_body_and_a_request_queued_behind_the_stream_limit_both_go_through() {
        let mut endpoint = one_stream_endpoint().await;
        let held = spawn_send(&endpoint.client, get("/held"));
        tokio::task::yield_now().await;
        let (tx, rx) = mpsc::channel(4);
        tx.send(Copied::Data(Bytes::from_static(b"one "))).await.unwrap();
        let upload = spawn_send(&endpoint.client, post(RequestBody::mirror(rx, UpstreamHandle::detached())));
        let behind = spawn_send(&endpoint.client, get("/behind"));
        tokio::task::yield_now().await;
        endpoint.release.take().unwrap().send(()).unwrap();
        tx.send(Copied::Data(Bytes::from_static(b"two"))).await.unwrap();
        tx.send(Copied::End).await.unwrap();
        let within = |task| tokio::time::timeout(std::time::Duration::from_secs(10), task);
        within(held).await.expect("the held request hung").unwrap().unwrap();
        within(upload).await.expect("the upload hung").unwrap().unwrap();
        within(behind).await.expect("the request behind the upload hung").unwrap().unwrap();
        let bodies = drain(&mut endpoint.read);
        assert!(bodies.contains(&("/upload".to_owned(), b"one two".to_vec())), "{bodies:?}");
    }

    /// A request body that fails because the application cancelled its HTTP/2 stream resets
    /// the endpoint's stream with `CANCEL`, not `INTERNAL_ERROR`, as hyper's client did.
    #[tokio::test]
    async fn a_cancelled_application_stream_resets_the_endpoint_s_with_cancel() {
        let (app_io, proxy_io) = tokio::io::duplex(64 * 1024);
        let (reason_tx, reason_rx) = tokio::sync::oneshot::channel();
        let reason_tx = std::sync::Mutex::new(Some(reason_tx));
        let reason_tx = Arc::new(reason_tx);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let reason_tx = reason_tx.clone();
                async move {
                    let mut body = request.into_body();
                    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                        if let Err(error) = frame {
                            if let Some(tx) = reason_tx.lock().unwrap().take() {
                                let _ = tx.send(BodyError::App(error.into()).reset_reason());
                            }
                            break;
                        }
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<Bytes>::new()))
                }
            });
            let io = hyper_util::rt::TokioIo::new(proxy_io);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
        let (mut app, connection) = h2::client::handshake(app_io).await.unwrap();
        tokio::spawn(connection);
        let (_response, mut stream) = app.send_request(post(()), false).unwrap();
        stream.send_data(Bytes::from_static(b"part"), false).unwrap();
        tokio::task::yield_now().await;
        stream.send_reset(Reason::CANCEL);
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), reason_rx).await;
        assert_eq!(reason.expect("the body never failed").unwrap(), Reason::CANCEL);
    }

    #[test]
    fn content_length_is_known_only_when_every_value_agrees() {
        let headers = |values: &[&'static str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append(CONTENT_LENGTH, HeaderValue::from_static(v));
            }
            h
        };
        assert_eq!(content_length(&headers(&["12"])), Some(12));
        assert_eq!(content_length(&headers(&["12", "12"])), Some(12));
        assert_eq!(content_length(&headers(&["12, 12"])), Some(12));
        assert_eq!(content_length(&headers(&["12", "13"])), None);
        assert_eq!(content_length(&headers(&["x"])), None);
        assert_eq!(content_length(&headers(&[])), None);
    }
}
