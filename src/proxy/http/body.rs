//! The response body the application reads: the endpoint's body streamed through (counted,
//! cut at the gRPC deadline, its connection returned to the pool once complete) or a local
//! reply; and the access-log record that waits for it to end.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

use super::reply::Failure;
use crate::access_log::{Logs, Record};
use crate::trace::ActiveSpan;
use crate::upstream::h2::ResetReason;
use crate::upstream::pool::ReturnTicket;
use crate::upstream::{h1, h2, ActiveGuard, RequestSlot, TargetAddr};

/// An access log record (and the MeshTrace span) waiting for the response body to end.
pub struct PendingLog {
    pub log: Logs,
    pub span: Option<Box<ActiveSpan>>,
    pub record: Record,
    pub started: Instant,
    /// Request body bytes, counted as they pass.
    pub sent: Arc<AtomicU64>,
}

impl PendingLog {
    pub fn finish(mut self, outcome: &'static str, received: u64) {
        self.record.outcome = outcome;
        self.record.bytes_received = received;
        self.record.bytes_sent = self.sent.load(Ordering::Relaxed);
        self.record.duration = self.started.elapsed();
        if let Some(span) = self.span.take() {
            span.finish(&self.record);
        }
        if self.log.is_on() {
            self.log.log(self.record);
        }
    }
}

/// An endpoint's response body: from hyper's client, or read by the request's own task.
pub enum ResponseBody {
    Hyper(Incoming),
    Own(h1::Body),
    H2(h2::Body),
}

impl ResponseBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        match self {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Cut::from),
            Self::Own(body) => body.poll_frame(cx).map_err(Cut::from),
            Self::H2(body) => body.poll_frame(cx).map_err(Cut::from),
        }
    }

    pub fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Own(body) => body.is_end_stream(),
            Self::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Own(body) => body.size_hint(),
            Self::H2(body) => body.size_hint(),
        }
    }
}

pub struct UpstreamBody {
    pub body: ResponseBody,
    pub pool_return: Option<ReturnTicket>,
    /// The stream's deadline (gRPC `grpc-timeout`, MeshTimeout `maxStreamDuration`): when it
    /// passes mid-response, a gRPC stream ends with DEADLINE_EXCEEDED, another is aborted.
    pub deadline: Option<Pin<Box<Sleep>>>,
    /// MeshTimeout `streamIdleTimeout`: no frame for this long aborts the response (a gRPC one
    /// ends with UNAVAILABLE).
    pub stream_idle: Option<StreamIdle>,
    pub grpc: bool,
    /// No more frames will be given (the upstream's ended, or the deadline's trailers went out).
    pub finished: bool,
    /// For the access log: `ok` once every frame of the response has passed.
    pub outcome: &'static str,
    pub received: u64,
    pub endpoint: TargetAddr,
    /// Boxed: only there when the access log or a sampled span is on.
    pub log: Option<Box<PendingLog>>,
    pub _active: ActiveGuard,
    /// The service's request slot (MeshCircuitBreaker `maxRequests`), held until the end; and
    /// the upstream that counts the response's bytes.
    pub request_slot: RequestSlot,
}

/// The stream idle timer, counted from the response head. It is created lazily, on the body's
/// first wait: a small response, complete as soon as its first frame is, never costs a timer.
pub struct StreamIdle {
    pub idle: Duration,
    pub timer: Option<Pin<Box<Sleep>>>,
}

impl StreamIdle {
    pub fn new(idle: Duration) -> Self {
        Self { idle, timer: None }
    }

    /// `true` when the body has waited longer than the timeout.
    fn expired(&mut self, cx: &mut Context<'_>, ready: bool) -> bool {
        if ready {
            if let Some(timer) = self.timer.as_mut() {
                timer.as_mut().reset(Instant::now() + self.idle);
            }
            return false;
        }
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + self.idle)));
        timer.as_mut().poll(cx).is_ready()
    }
}

/// Why the proxy cut a response short.
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("the stream's maximum duration passed")]
    MaxStreamDuration,
    #[error("no data for the stream idle timeout")]
    StreamIdle,
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    #[error(transparent)]
    UpstreamH1(#[from] h1::Error),
    #[error(transparent)]
    UpstreamH2(#[from] ::h2::Error),
}

/// A response body cut on its way to an HTTP/2 application resets its stream with the reason
/// of an HTTP/2 error behind the cut, else `INTERNAL_ERROR` (as hyper's server did).
impl ResetReason for Cut {
    fn reset_reason(&self) -> ::h2::Reason {
        h2::reason_in(self).unwrap_or(::h2::Reason::INTERNAL_ERROR)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        self.request_slot.upstream().metrics.bytes_received.inc_by(self.received);
        if let Some(mut pending) = self.log.take().map(|p| *p) {
            pending.record.endpoint = Some(self.endpoint.to_string());
            pending.finish(self.outcome, self.received);
        }
    }
}

impl UpstreamBody {
    /// Ends the response with gRPC trailers; the access log gets `outcome`.
    fn end_with_grpc_status(
        &mut self,
        outcome: &'static str,
        status: &'static str,
        message: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        self.finished = true;
        self.outcome = outcome;
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        trailers.insert("grpc-message", HeaderValue::from_static(message));
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    pub fn return_to_pool(&mut self) {
        match self.pool_return.take() {
            Some(ReturnTicket::Own(to)) => {
                if let ResponseBody::Own(body) = &mut self.body {
                    if let Some(conn) = body.reusable() {
                        to.put(conn);
                    }
                }
            }
            Some(ticket) => ticket.response_done(),
            None => {}
        }
    }
}

/// The response body the application reads.
pub enum ProxyBody {
    Upstream(Box<UpstreamBody>),
    /// The proxy's own answer; `Some` says why it could not forward the request.
    Local(Full<Bytes>, Option<Failure>),
    /// A passthrough response, as the destination sends it.
    Passthrough(super::passthrough::PassthroughBody),
}

impl ProxyBody {
    pub fn empty() -> Self {
        Self::Local(Full::default(), None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let up = match self.get_mut() {
            Self::Local(full, _) => return Pin::new(full).poll_frame(cx).map_err(|never| match never {}),
            Self::Passthrough(body) => return Pin::new(body).poll_frame(cx).map_err(Cut::from),
            Self::Upstream(up) => up,
        };
        if up.finished {
            return Poll::Ready(None);
        }
        if let Some(deadline) = up.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                if up.grpc {
                    return up.end_with_grpc_status("deadline_exceeded", "4", "deadline exceeded");
                }
                up.finished = true;
                up.outcome = "max_stream_duration";
                return Poll::Ready(Some(Err(Cut::MaxStreamDuration)));
            }
        }
        let frame = up.body.poll_frame(cx);
        if let Some(stream_idle) = up.stream_idle.as_mut() {
            if stream_idle.expired(cx, frame.is_ready()) {
                if up.grpc {
                    return up.end_with_grpc_status("stream_idle_timeout", "14", "stream idle timeout");
                }
                up.finished = true;
                up.outcome = "stream_idle_timeout";
                return Poll::Ready(Some(Err(Cut::StreamIdle)));
            }
        }
        if matches!(frame, Poll::Ready(Some(Err(_)))) {
            // The headers are out, so a gRPC client learns of an upstream failure from the
            // trailers (UNAVAILABLE), as from Envoy, not from a bare stream reset.
            if up.grpc {
                return up.end_with_grpc_status("upstream_reset", "14", "upstream reset the stream");
            }
            up.outcome = "upstream_reset";
        }
        // hyper stops polling once a body says it has ended, so the response is complete (and
        // the connection goes back to the pool) as soon as the last frame is out, not only on
        // the final `None`.
        let complete = match &frame {
            Poll::Ready(None) => {
                up.finished = true;
                true
            }
            Poll::Ready(Some(Ok(f))) => {
                up.received += f.data_ref().map_or(0, |d| d.len() as u64);
                // An HTTP/1 body does not count its trailers as its end; hyper stops after them.
                f.is_trailers() || up.body.is_end_stream()
            }
            _ => false,
        };
        if complete {
            up.outcome = "ok";
            up.return_to_pool();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Local(full, _) => full.is_end_stream(),
            Self::Passthrough(body) => body.is_end_stream(),
            Self::Upstream(up) => up.finished || up.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Local(full, _) => full.size_hint(),
            Self::Passthrough(body) => body.size_hint(),
            // A gRPC response may end early with the proxy's trailers: no exact length (hyper
            // would send it as Content-Length).
            Self::Upstream(up) if up.grpc => SizeHint::default(),
            Self::Upstream(up) => up.body.size_hint(),
        }
    }
}
