//! The application's HTTP/2 connections, served by h2's server directly.
//!
//! hyper's HTTP/2 server wrapped each stream's future in one of its own, moved whole (5.6 KB)
//! twice on its way to the executor, removed from every response the connection headers the
//! request pipeline had already removed (five hashed lookups), and claimed window before
//! handing a response's last frame to h2. Here a stream is one future ([`serve_stream`]): the
//! request's phases, raced against the application's `RST_STREAM`, then the response; the
//! connection runs its streams in its own task ([`Connection`]). What
//! hyper's server did is kept: its settings, a `Date` on a response without one,
//! `Content-Length` for a body of known size, the body sent as the application's flow control
//! allows (its last frame handed to h2 at once, as the endpoint side does), a body that fails
//! resetting the stream with the HTTP/2 reason behind it (else `INTERNAL_ERROR`), and a
//! request body's window given back as it is read ([`crate::upstream::AppBody::http2`]).

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::{Handshake, SendResponse};
use h2::{Reason, RecvStream};
use http::header::{CONTENT_LENGTH, DATE, TE};
use http::{HeaderValue, Request, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use super::rewrite::strip_hop_by_hop;
use super::HttpLimits;
use crate::upstream::h2::{Pipe, ResetReason};

// hyper 1.x's HTTP/2 server settings, so applications see what they saw before.
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const STREAM_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// One application connection speaking HTTP/2, and its streams: each it accepts is made by
/// `new_stream` ([`serve_stream`]) and run in the connection's task.
///
/// Spawned, each stream was a task of its own: one task created per request, and each response
/// a wake-up of the stream's task and then one of the connection's, whose write to the
/// application then held only the responses ready at that moment. Here the connection's task
/// polls its streams itself (in a `FuturesUnordered`, which polls only the streams woken), so
/// the responses readied in one wake-up leave in one write.
pub(super) struct Connection<S, N, F> {
    state: State<S>,
    new_stream: N,
    streams: FuturesUnordered<Isolated<F>>,
    /// A drain asked for GOAWAY before the handshake was over.
    shutdown_requested: bool,
}

enum State<S> {
    Handshaking(Handshake<S, Bytes>),
    Serving(h2::server::Connection<S, Bytes>),
    Ended,
}

impl<S, N, F> Connection<S, N, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    N: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
    F: Future<Output = ()>,
{
    pub(super) fn new(io: S, limits: HttpLimits, new_stream: N) -> Self {
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .handshake(io);
        let state = State::Handshaking(handshake);
        Self { state, new_stream, streams: FuturesUnordered::new(), shutdown_requested: false }
    }

    /// GOAWAY: streams already open finish, no new one is taken.
    pub(super) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Handshaking(_) => self.shutdown_requested = true,
            State::Serving(connection) => connection.graceful_shutdown(),
            State::Ended => {}
        }
    }

    /// Closes the connection, if it has not ended, and runs the streams left to their end: the
    /// close resets them, so each ends at its next poll, none dropped midway.
    pub(super) async fn finish(&mut self) {
        self.state = State::Ended;
        while self.streams.next().await.is_some() {}
    }

    /// Polls the streams woken since the last poll; `FuturesUnordered` yields (waking the task)
    /// once it has polled as many as it holds, so one busy connection cannot hold its thread.
    fn poll_streams(&mut self, cx: &mut Context<'_>) {
        // Empty, a poll would still register the task's waker.
        if !self.streams.is_empty() {
            while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(cx) {}
        }
    }
}

impl<S, N, F> Future for Connection<S, N, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    N: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> F + Unpin,
    F: Future<Output = ()>,
{
    /// Ready when the connection ends; streams still running stay ([`Connection::finish`]).
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            let accepted = match &mut this.state {
                State::Handshaking(handshake) => {
                    let mut connection = ready!(Pin::new(handshake).poll(cx))?;
                    if this.shutdown_requested {
                        connection.graceful_shutdown();
                    }
                    this.state = State::Serving(connection);
                    continue;
                }
                State::Serving(connection) => connection.poll_accept(cx),
                State::Ended => Poll::Ready(None),
            };
            match accepted {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    let stream = (this.new_stream)(request, respond);
                    this.streams.push(Isolated { stream });
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    this.poll_streams(cx);
                    return Poll::Pending;
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream whose panic ends only that stream, as when it was a task of its own (tokio
    /// caught it there): the connection and its other streams go on. The stream is dropped,
    /// which resets it.
    struct Isolated<F> {
        #[pin]
        stream: F,
    }
}

impl<F: Future<Output = ()>> Future for Isolated<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let stream = self.project().stream;
        match std::panic::catch_unwind(AssertUnwindSafe(|| stream.poll(cx))) {
            Ok(poll) => poll,
            Err(_) => {
                tracing::error!("an HTTP/2 stream panicked; that stream is reset, its connection goes on");
                Poll::Ready(())
            }
        }
    }
}

/// Runs one stream: its answer (the request's phases, made by `answer`) until it gives the
/// response, unless the application resets the stream first (the answer is dropped then), and
/// then the response. The answer, a future of several KiB, is made here and boxed: passed in,
/// or pinned in place, it would make this future as large, and it is moved into the
/// connection's set of streams.
pub(super) async fn serve_stream<A, B>(mut respond: SendResponse<Bytes>, answer: impl FnOnce() -> A)
where
    A: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Unpin,
    B::Error: ResetReason + std::fmt::Display,
{
    let response = {
        let mut answer = Box::pin(answer());
        poll_fn(|cx| {
            if let Poll::Ready(response) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            respond.poll_reset(cx).map(|_| None)
        })
        .await
    };
    let Some(response) = response else { return };
    let (parts, body) = response.into_parts();
    let mut head = Response::from_parts(parts, ());
    // h2 refuses a response with connection headers; the pipeline removed them already, so this
    // is one pass over the names. `TE` belongs to requests only (RFC 9113 §8.2.2).
    strip_hop_by_hop(head.headers_mut());
    head.headers_mut().remove(TE);
    if !head.headers().contains_key(DATE) {
        if let Some(date) = date() {
            head.headers_mut().insert(DATE, date);
        }
    }
    let end = body.is_end_stream();
    if !end {
        if let Some(length) = body.size_hint().exact() {
            head.headers_mut().entry(CONTENT_LENGTH).or_insert_with(|| HeaderValue::from(length));
        }
    }
    let stream = match respond.send_response(head, end) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%error, "response not sent to the application");
            respond.send_reset(Reason::INTERNAL_ERROR);
            return;
        }
    };
    if !end {
        let mut pipe = Pipe::new(body, stream);
        if let Err(error) = poll_fn(|cx| pipe.poll_send(cx)).await {
            tracing::debug!(%error, "response body not sent to the application");
        }
    }
}

/// The `Date` header's value, formatted once a second per thread (as hyper's server did).
fn date() -> Option<HeaderValue> {
    thread_local!(static CACHED: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) });
    let now = SystemTime::now();
    let second = now.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        match &*cached {
            Some((at, value)) if *at == second => Some(value.clone()),
            _ => {
                let value = HeaderValue::from_maybe_shared(Bytes::from(httpdate::fmt_http_date(now))).ok()?;
                *cached = Some((second, value.clone()));
                Some(value)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::sync::oneshot;

    type Stream = Pin<Box<dyn Future<Output = ()> + Send>>;

    impl ResetReason for std::convert::Infallible {
        fn reset_reason(&self) -> Reason {
            match *self {}
        }
    }

    /// An application's HTTP/2 client on one end of a pipe, a [`Connection`] making its streams
    /// with `new_stream` on the other, driven by a task that finishes the streams left after
    /// the connection ends and then says so.
    async fn connected(
        new_stream: impl FnMut(Request<RecvStream>, SendResponse<Bytes>) -> Stream + Unpin + Send + 'static,
    ) -> (h2::client::SendRequest<Bytes>, oneshot::Receiver<()>) {
        let (app, proxy) = tokio::io::duplex(64 * 1024);
        let (finished_tx, finished) = oneshot::channel();
        tokio::spawn(async move {
            let mut connection = Connection::new(proxy, HttpLimits::default(), new_stream);
            let _ = (&mut connection).await;
            connection.finish().await;
            let _ = finished_tx.send(());
        });
        let (client, connection) = h2::client::handshake(app).await.unwrap();
        tokio::spawn(connection);
        (client, finished)
    }

    fn get(path: &str) -> Request<()> {
        Request::get(format!("http://app{path}")).body(()).unwrap()
    }

    async fn status(client: &mut h2::client::SendRequest<Bytes>, path: &str) -> Result<u16, h2::Error> {
        let (response, _) = client.send_request(get(path), true)?;
        Ok(response.await?.status().as_u16())
    }

    fn answer(respond: SendResponse<Bytes>, response: Response<Full<Bytes>>) -> Stream {
        Box::pin(serve_stream(respond, move || async move { response }))
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let (mut client, _finished) = connected(|request, respond| {
            if request.uri().path() == "/panic" {
                return Box::pin(async move {
                    let _respond = respond;
                    tokio::task::yield_now().await;
                    #[allow(clippy::panic)]
                    {
                        panic!("a bug in one stream");
                    }
                });
            }
            answer(respond, Response::new(Full::new(Bytes::from_static(b"ok"))))
        })
        .await;
        assert!(status(&mut client, "/panic").await.is_err(), "the panicking stream is reset");
        assert_eq!(status(&mut client, "/").await.unwrap(), 200, "the connection goes on");
    }

    /// A stream still running when its connection ends is run to its end, not dropped midway.
    #[tokio::test]
    async fn streams_left_when_the_connection_ends_run_to_their_end() {
        let (release, released) = oneshot::channel::<()>();
        let ran_to_end = Arc::new(AtomicBool::new(false));
        let mut released = Some(released);
        let ran = ran_to_end.clone();
        let (mut client, finished) = connected(move |_, respond| {
            let (released, ran) = (released.take(), ran.clone());
            Box::pin(async move {
                let _respond = respond;
                if let Some(released) = released {
                    let _ = released.await;
                }
                ran.store(true, Ordering::SeqCst);
            })
        })
        .await;
        let (waiting, _) = client.send_request(get("/"), true).unwrap();
        tokio::task::yield_now().await;
        drop((client, waiting));
        let mut finished = finished;
        for _ in 0..3 {
            tokio::task::yield_now().await;
            assert!(futures_util::poll!(&mut finished).is_pending(), "the stream still waits");
        }
        let _ = release.send(());
        tokio::time::timeout(std::time::Duration::from_secs(10), finished).await.unwrap().unwrap();
        assert!(ran_to_end.load(Ordering::SeqCst));
    }

    /// As hyper's server: a `Date` on a response without one, `Content-Length` for a body of
    /// known size, and connection headers (h2 would refuse the response) and `TE` left out.
    #[tokio::test]
    async fn responses_get_what_hyper_s_server_gave_them() {
        let (mut client, _finished) = connected(|request, respond| {
            let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
            if request.uri().path() == "/dated" {
                response.headers_mut().insert(DATE, HeaderValue::from_static("Tue, 01 Dec 2026 00:00:00 GMT"));
            }
            response.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("keep-alive"));
            response.headers_mut().insert(TE, HeaderValue::from_static("trailers"));
            answer(respond, response)
        })
        .await;
        for path in ["/", "/dated"] {
            let (response, _) = client.send_request(get(path), true).unwrap();
            let response = response.await.unwrap();
            let headers = response.headers();
            assert_eq!(headers[CONTENT_LENGTH], "5");
            assert!(!headers.contains_key(http::header::CONNECTION) && !headers.contains_key(TE));
            let date = headers[DATE].to_str().unwrap();
            assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
            assert_eq!(path == "/dated", date == "Tue, 01 Dec 2026 00:00:00 GMT");
            let mut body = response.into_body();
            assert_eq!(body.data().await.unwrap().unwrap(), "hello");
        }
    }

    /// An application that resets its stream before the answer has its answer dropped there
    /// (the answer's rapid-reset guard then counts it).
    #[tokio::test]
    async fn a_stream_reset_before_its_answer_drops_the_answer() {
        struct Dropped(Option<oneshot::Sender<()>>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        let (dropped_tx, dropped) = oneshot::channel();
        let mut dropped_tx = Some(dropped_tx);
        let (mut client, _finished) = connected(move |_, respond| {
            let guard = Dropped(dropped_tx.take());
            Box::pin(serve_stream(respond, move || async move {
                let _guard = guard;
                std::future::pending::<Response<Full<Bytes>>>().await
            }))
        })
        .await;
        let (_response, mut stream) = client.send_request(get("/"), false).unwrap();
        tokio::task::yield_now().await;
        stream.send_reset(Reason::CANCEL);
        tokio::time::timeout(std::time::Duration::from_secs(10), dropped).await.unwrap().unwrap();
    }

    /// Streams whose answer never comes end once their connection does (`finish` does not wait
    /// for them forever): the close wakes their wait for a reset.
    #[tokio::test]
    async fn waiting_streams_end_when_their_connection_does() {
        let (mut client, finished) =
            connected(|_, respond| Box::pin(serve_stream(respond, std::future::pending::<Response<Full<Bytes>>>)))
                .await;
        let (waiting, _) = client.send_request(get("/"), true).unwrap();
        tokio::task::yield_now().await;
        drop((client, waiting));
        tokio::time::timeout(std::time::Duration::from_secs(10), finished).await.unwrap().unwrap();
    }

    /// A drain's GOAWAY: the stream in flight is answered, and the connection then ends by
    /// itself. Asked for before the handshake is over, the GOAWAY follows it and the connection
    /// ends with no stream.
    #[tokio::test]
    async fn a_graceful_shutdown_finishes_the_stream_in_flight_and_ends() {
        for before_handshake in [false, true] {
            let (app, proxy) = tokio::io::duplex(64 * 1024);
            let (release, released) = oneshot::channel::<()>();
            let (opened_tx, opened) = oneshot::channel::<()>();
            let mut waits = Some((opened_tx, released));
            let mut connection = Connection::new(proxy, HttpLimits::default(), move |_, respond| -> Stream {
                let waits = waits.take();
                Box::pin(serve_stream(respond, move || async move {
                    if let Some((opened, released)) = waits {
                        let _ = opened.send(());
                        let _ = released.await;
                    }
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                }))
            });
            if before_handshake {
                connection.graceful_shutdown();
            }
            let (shutdown, shutdown_asked) = oneshot::channel::<()>();
            let server = tokio::spawn(async move {
                let ended = tokio::select! {
                    ended = &mut connection => ended,
                    _ = shutdown_asked => {
                        connection.graceful_shutdown();
                        (&mut connection).await
                    }
                };
                connection.finish().await;
                ended
            });
            let (mut client, client_connection) = h2::client::handshake(app).await.unwrap();
            tokio::spawn(client_connection);
            if !before_handshake {
                let (in_flight, _) = client.send_request(get("/"), true).unwrap();
                opened.await.unwrap();
                shutdown.send(()).unwrap();
                let _ = release.send(());
                assert_eq!(in_flight.await.unwrap().status(), 200, "the stream in flight is answered");
            }
            // It ends, cleanly or not: the client may close first once it has the last GOAWAY.
            let ended = tokio::time::timeout(std::time::Duration::from_secs(10), server).await;
            assert!(
                ended.is_ok(),
                "the connection did not end by itself (GOAWAY before the handshake: {before_handshake})"
            );
            drop(client);
        }
    }
}
