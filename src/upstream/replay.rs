//! A request body that can be sent again: each attempt reads what earlier attempts already read
//! from a copy, then the rest from the application, so a retry does not wait for the whole body
//! first (a gRPC stream that waits for its first answer still works).
//!
//! The copy is bounded ([`RETRY_BUFFER_LIMIT`], as Envoy's per-request buffer limit): once a
//! body has passed more than that, the copy is dropped and the request can no longer be retried.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::pool::BodyError;
use super::AppBody;

/// Request bytes kept for a retry; a larger body is sent once.
pub const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

#[derive(Debug)]
struct State {
    source: AppBody,
    hint: SizeHint,
    copy: Vec<Bytes>,
    copied: usize,
    trailers: Option<HeaderMap>,
    /// The application's body has ended.
    done: bool,
    /// More than the limit passed: the copy is gone.
    overflowed: bool,
    /// Only the current attempt's body may read the source.
    attempt: u32,
    /// The access log's count of the body's bytes: counted as the application's body is read,
    /// once however many attempts send them.
    received: Option<Arc<AtomicU64>>,
    /// The task of the attempt waiting for the application's body: the application's body
    /// wakes only the last task that polled it, so an attempt given up is woken here to see
    /// that it is (its body then fails) rather than wait for ever.
    waiting: Option<Waker>,
}

impl State {
    /// A newer attempt takes the source over.
    fn supersede(&mut self) {
        self.attempt += 1;
        // The given-up attempt's wait for the application is no one's now: until the next
        // attempt reads, the body waits for its reader (the timeouts then run).
        self.source.reader_gone();
        if let Some(waiting) = self.waiting.take() {
            waiting.wake();
        }
    }
}

/// The shared state of one request's body across its attempts.
#[derive(Debug, Clone)]
pub struct Replay(Arc<Mutex<State>>);

impl Replay {
    pub fn new(source: AppBody, received: Option<Arc<AtomicU64>>) -> Self {
        let hint = source.size_hint();
        let done = source.is_end_stream();
        let state = State {
            source,
            hint,
            copy: Vec::new(),
            copied: 0,
            trailers: None,
            done,
            overflowed: false,
            attempt: 0,
            received,
            waiting: None,
        };
        Self(Arc::new(Mutex::new(state)))
    }

    /// Whether another attempt can send the whole body.
    pub fn replayable(&self) -> bool {
        self.0.lock().is_ok_and(|s| !s.overflowed)
    }

    /// Stops the current attempt's body from reading the application's any further (it ends);
    /// then whether another attempt can send the whole body.
    pub fn stop_reading(&self) -> bool {
        // An overflowed copy: no retry, and the current attempt, whose response is then the
        // answer, reads on.
        self.0.lock().is_ok_and(|mut s| {
            if !s.overflowed {
                s.supersede();
            }
            !s.overflowed
        })
    }

    /// The body of the next attempt; earlier attempts' bodies end.
    pub fn attempt(&self) -> ReplayBody {
        let attempt = match self.0.lock() {
            Ok(mut s) => {
                s.supersede();
                s.attempt
            }
            Err(_) => 0,
        };
        ReplayBody { state: self.clone(), attempt, position: 0, trailers_sent: false }
    }
}

/// One attempt's view of the body.
#[derive(Debug)]
pub struct ReplayBody {
    state: Replay,
    attempt: u32,
    /// Frames of the copy already sent by this attempt.
    position: usize,
    trailers_sent: bool,
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Ok(mut s) = this.state.0.lock() else {
            return Poll::Ready(Some(Err(BodyError::Abandoned("its copy for retries is unusable"))));
        };
        if s.attempt != this.attempt {
            // A newer attempt owns the source: this one's endpoint sees its body fail (a reset,
            // a connection closed mid-body), never a clean end of what it got.
            return Poll::Ready(Some(Err(BodyError::Abandoned("a newer attempt of the request took over"))));
        }
        if this.position < s.copy.len() {
            this.position += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.copy[this.position - 1].clone()))));
        }
        if s.done {
            return match s.trailers.clone().filter(|_| !this.trailers_sent) {
                Some(trailers) => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                None => Poll::Ready(None),
            };
        }
        let frame = match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => {
                match &mut s.waiting {
                    Some(waiting) if waiting.will_wake(cx.waker()) => {}
                    waiting => *waiting = Some(cx.waker().clone()),
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                s.done = true;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(BodyError::App(e)))),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if s.source.is_end_stream() {
            s.done = true;
        }
        if let Some(data) = frame.data_ref() {
            if let Some(received) = &s.received {
                received.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if !s.overflowed {
                s.copied += data.len();
                if s.copied > RETRY_BUFFER_LIMIT {
                    s.overflowed = true;
                    s.copy = Vec::new();
                } else {
                    s.copy.push(data.clone());
                    this.position = s.copy.len();
                }
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            s.trailers = Some(trailers.clone());
            s.done = true;
            this.trailers_sent = true;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.state.0.lock().is_ok_and(|s| {
            s.attempt == self.attempt
                && s.done
                && self.position >= s.copy.len()
                && (self.trailers_sent || s.trailers.is_none())
        })
    }

    fn size_hint(&self) -> SizeHint {
        self.state.0.lock().map(|s| s.hint).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    /// A response body of two frames from a hyper server, as the application's body.
    async fn two_frames() -> AppBody {
        let frames =
            [b"one".as_slice(), b"two"].map(|d| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(d))));
        app_body(futures_util::stream::iter(frames)).await
    }

    /// `frames` as the body of a response from a hyper server, as the application's body.
    async fn app_body<S>(frames: S) -> AppBody
    where
        S: futures_util::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send + Sync + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let frames = std::sync::Mutex::new(Some(frames));
        tokio::spawn(async move {
            let reply = hyper::service::service_fn(move |_| {
                let body = http_body_util::StreamBody::new(frames.lock().unwrap().take().unwrap());
                async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
            });
            let io = hyper_util::rt::TokioIo::new(server_io);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, reply).await;
        });
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client_io)).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::new(http_body_util::Empty::<Bytes>::new());
        send.send_request(request).await.unwrap().into_body().into()
    }

    async fn data(body: &mut ReplayBody) -> Option<Result<Bytes, BodyError>> {
        let frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        Some(frame.map(|frame| frame.into_data().unwrap()))
    }

    /// An attempt given up reads no more of the application's body, and fails rather than
    /// ends (its endpoint must not take the part it got for the whole); the retry gets what it
    /// read from the copy, then the rest from the application, nothing lost in between, and
    /// each byte is counted once for the access log.
    #[tokio::test]
    async fn an_attempt_given_up_stops_reading_and_the_next_sends_it_all() {
        let received = Arc::new(AtomicU64::new(0));
        let replay = Replay::new(two_frames().await, Some(received.clone()));
        let mut first = replay.attempt();
        assert_eq!(data(&mut first).await.unwrap().unwrap(), &b"one"[..]);
        assert!(replay.stop_reading(), "3 bytes copied: replayable");
        assert!(
            matches!(data(&mut first).await, Some(Err(BodyError::Abandoned(_)))),
            "the given-up attempt read on, or ended as if its body were whole"
        );
        let mut second = replay.attempt();
        assert_eq!(data(&mut second).await.unwrap().unwrap(), &b"one"[..]);
        assert_eq!(data(&mut second).await.unwrap().unwrap(), &b"two"[..]);
        assert!(data(&mut second).await.is_none());
        assert_eq!(received.load(Ordering::Relaxed), 6, "the bytes the second attempt sent again were counted again");
    }

    /// An attempt waiting for the application's next frame when it is given up is woken, and
    /// its body fails: the application's body wakes only the last task that polled it, so
    /// unwoken it waited for ever, holding its connection and its endpoint.
    #[tokio::test]
    async fn an_attempt_given_up_while_it_waits_is_woken() {
        let (more, frames) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        more.send(Ok(Frame::data(Bytes::from_static(b"start")))).await.unwrap();
        let replay = Replay::new(app_body(tokio_stream::wrappers::ReceiverStream::new(frames)).await, None);
        let mut first = replay.attempt();
        assert_eq!(data(&mut first).await.unwrap().unwrap(), &b"start"[..]);
        let waiting = tokio::spawn(async move { data(&mut first).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "the application sent nothing more");
        assert!(replay.stop_reading());
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), waiting).await;
        let ended = ended.expect("the given-up attempt was never woken").unwrap();
        assert!(matches!(ended, Some(Err(BodyError::Abandoned(_)))), "{ended:?}");
        drop(more);
    }
}
