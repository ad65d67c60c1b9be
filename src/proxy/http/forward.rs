//! The forward phase of a request: a connection from the upstream client, the request
//! rewritten for the endpoint, the exchange, and the response body streamed back (or an
//! upgraded tunnel). With a MeshRetry, attempts repeat (on a copy of the body, see
//! [`crate::upstream::replay`]) until one gives a response that is not to be retried; a
//! response is only ever retried before any of it went to the application.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;

use super::body::{ProxyBody, ResponseBody, StreamIdle, UpstreamBody};
use super::client::{self, SendError, Sender};
use super::reply::{self, Failure};
use super::request::RequestCtx;
use super::retry::AttemptFailure;
use super::rewrite::{check, is_upgrade, prepare_request, strip_hop_by_hop};
use super::routing::MirrorTee;
use super::HttpProxy;
use crate::catalog::Protocol;
use crate::policy::runtime::RetryPolicy;
use crate::proxy::copy;
use crate::upstream::h1;
use crate::upstream::pool::{
    BodyError, Copied, OwnReturn, PoolKey, PoolReturn, RequestBody, ReturnTicket, SharedReturn,
};
use crate::upstream::replay::Replay;
use crate::upstream::{
    ActiveGuard, AppBody, AppBodyError, BodyEnd, ConnectError, Outcome, Permit, RequestSlot, Target, TargetAddr,
};

/// Forwards within the request's time limits: the request timeout, counted as Envoy counts its
/// route timeout from the end of the request body ([`timed_out`]), and the stream's deadline,
/// counted from the request's head.
pub(super) async fn forward(ctx: &RequestCtx, req: Request<AppBody>, proxy: &HttpProxy) -> Response<ProxyBody> {
    let exchange = std::pin::pin!(exchange(ctx, req, proxy));
    let body = ctx.body_end.as_deref();
    // With the request timeout off, a body still to come is bounded by the stream idle timeout.
    let timed = ctx.request_timeout.is_some() || (body.is_some() && ctx.stream_idle.is_some());
    let answered = match (timed, ctx.deadline) {
        (false, None) => return exchange.await,
        (false, Some(deadline)) => within(ctx, deadline_passed(deadline), exchange).await,
        (true, None) => within(ctx, timed_out(body, ctx.request_timeout, ctx.stream_idle), exchange).await,
        (true, Some(deadline)) => {
            // The sooner of the two decides whether the endpoint is to blame.
            let limit = async {
                tokio::select! {
                    why = timed_out(body, ctx.request_timeout, ctx.stream_idle) => why,
                    why = deadline_passed(deadline) => why,
                }
            };
            within(ctx, limit, exchange).await
        }
    };
    answered.unwrap_or_else(|why| why.reply(ctx.grpc))
}

/// Why a time limit of the request passed ([`within`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    /// The request or per-try timeout: the endpoint did not answer in time (counted against it).
    Timeout,
    /// The stream's own deadline (`grpc-timeout`, `maxStreamDuration`): not the endpoint's doing.
    Deadline,
    /// The application stopped sending its request body for the stream idle timeout.
    Stalled,
}

impl Expired {
    pub(super) fn reply(self, grpc: bool) -> Response<ProxyBody> {
        match self {
            Self::Timeout | Self::Deadline => reply::local_reply(grpc, Failure::Timeout, reply::TIMED_OUT),
            Self::Stalled => reply::local_reply(grpc, Failure::StreamIdle, reply::STREAM_IDLE),
        }
    }
}

/// `future` unless `limit` completes first, then why. A request or per-try timeout marks the
/// request timed out before `future` is dropped, so the attempt in flight counts it against its
/// endpoint ([`TimeoutCounts`]); the stream's deadline (the client's `grpc-timeout`,
/// `maxStreamDuration`) and a stalled application do not, as in Envoy. `future`
/// is pinned by the caller: taken by value, it was held twice in this function's state, and
/// the request's future, copied once per request, doubled (callgrind: +12k instructions per
/// h2 request, most of them in `memcpy`).
async fn within<F: std::future::Future>(
    ctx: &RequestCtx,
    limit: impl std::future::Future<Output = Expired>,
    mut future: std::pin::Pin<&mut F>,
) -> Result<F::Output, Expired> {
    tokio::select! {
        biased;
        output = future.as_mut() => Ok(output),
        why = limit => {
            ctx.timed_out.store(why == Expired::Timeout, Ordering::Relaxed);
            Err(why)
        }
    }
}

/// A request or per-try timeout ([`within`]): `limit` from the end of the request body, as
/// Envoy counts its route and per-try timeouts (from the attempt's start once the body has
/// ended; `None`: never). Before the end: a body that moves is not timed out; one that waits
/// for the application to send more (a paused client, a gRPC stream waiting for its answer) is
/// not either, up to `stall` without a frame (the stream idle timeout, as Envoy's; `None`: for
/// ever); one that nobody reads for `limit` (queued for a connection, an endpoint that reads
/// nothing) is, as Envoy, which reads a small body whole meanwhile, would time it out. Both are
/// sampled a quarter of the shorter apart (no clock read per frame), so each fires up to that
/// late.
pub(super) async fn timed_out(body: Option<&BodyEnd>, limit: Option<Duration>, stall: Option<Duration>) -> Expired {
    let tick = [limit, stall].into_iter().flatten().min().map(|shorter| shorter / 4);
    if let (Some(body), Some(tick)) = (body, tick.filter(|t| !t.is_zero())) {
        // Time without a frame while the application is waited for, and while nobody reads.
        let (mut seen, mut still, mut unread) = (body.frames(), Duration::ZERO, Duration::ZERO);
        loop {
            tokio::select! {
                () = body.ended() => break,
                () = tokio::time::sleep(tick) => {
                    let now = body.frames();
                    if now != seen {
                        (seen, still, unread) = (now, Duration::ZERO, Duration::ZERO);
                    } else if body.waits_for_application() {
                        still += tick;
                        if stall.is_some_and(|stall| still >= stall) {
                            return Expired::Stalled;
                        }
                    } else {
                        unread += tick;
                        if limit.is_some_and(|limit| unread >= limit) {
                            return Expired::Timeout;
                        }
                    }
                }
            }
        }
    }
    match limit {
        Some(limit) => tokio::time::sleep(limit).await,
        None => std::future::pending().await,
    }
    Expired::Timeout
}

/// The stream's deadline passed: not the endpoint's doing ([`within`]).
async fn deadline_passed(deadline: tokio::time::Instant) -> Expired {
    tokio::time::sleep_until(deadline).await;
    Expired::Deadline
}

/// While an attempt waits for its response: dropped because the request or the attempt timed
/// out, it records a local-origin failure for its endpoint, as Envoy's outlier detection counts
/// a timeout; only once the request went out on a stream of its own (`opened`: not while it
/// waited for one behind the endpoint's stream limit) and had all arrived from the application
/// (a slow upload is not the endpoint's doing). Dropped because the application went away,
/// nothing.
struct TimeoutCounts<'a> {
    ctx: &'a RequestCtx,
    target: &'a Target,
    opened: &'a AtomicBool,
}

impl Drop for TimeoutCounts<'_> {
    fn drop(&mut self) {
        let complete = || self.ctx.body_end.as_ref().map_or(true, |body| body.is_complete());
        if self.ctx.timed_out.load(Ordering::Relaxed) && self.opened.load(Ordering::Relaxed) && complete() {
            self.ctx.route.upstream.record(self.target, Outcome::LocalFailure);
        }
    }
}

/// A response head from an endpoint, with what the response body needs.
struct Exchanged {
    response: Response<ResponseBody>,
    sender: Sender,
    target: Target,
    key: PoolKey,
    active: ActiveGuard,
    shared_return: Option<std::sync::Arc<SharedReturn>>,
}

enum Attempt {
    Answered(Exchanged),
    Failed(AttemptFailure, Response<ProxyBody>),
}

async fn exchange(ctx: &RequestCtx, req: Request<AppBody>, proxy: &HttpProxy) -> Response<ProxyBody> {
    let http2 = matches!(ctx.route.service.protocol, Protocol::Http2 | Protocol::Grpc);
    let mut req = req;
    let upgrade = !http2 && is_upgrade(req.headers(), &proxy.upgrades);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Err(refusal) = check(&parts) {
        return reply::refused(ctx.grpc, refusal);
    }
    let handle = ctx.route.upstream_handle();
    let Some(request_slot) = handle.request_slot() else {
        return reply::overflow(ctx.grpc);
    };
    let retry = ctx.retry().filter(|r| !upgrade && r.admits(&parts));
    let client_version = parts.version;
    let result = match retry {
        None => {
            let mut body = RequestBody::new(body, handle, ctx.sent_counter());
            if let Some(MirrorTee(tee)) = parts.extensions.remove::<MirrorTee>() {
                body.tee(tee);
            }
            attempt(ctx, parts, body, upgrade, &[], None).await
        }
        Some(retry) => {
            // Boxed: inline, the retry loop's state would make every request's future (moved
            // whole when HTTP/2 spawns a stream's task) about 1.5 KiB larger.
            Box::pin(with_retries(ctx, retry, parts, body)).await
        }
    };
    match result {
        Attempt::Answered(exchanged) => respond(ctx, proxy, exchanged, client_upgrade, client_version, request_slot),
        Attempt::Failed(_, reply) => reply,
    }
}

/// Attempts until a response or failure that the policy does not retry, or until the retries,
/// the body copy or the retry budget (`maxRetries`) run out.
async fn with_retries(ctx: &RequestCtx, retry: &RetryPolicy, mut parts: Parts, body: AppBody) -> Attempt {
    let upstream = &ctx.route.upstream;
    // A mirror copies the first attempt's body; a copy that attempt does not finish fails.
    let mut mirror = parts.extensions.remove::<MirrorTee>();
    // A request without a body (most GETs) needs no copy: retries send an empty body.
    let mut bodies = if body.is_end_stream() {
        Bodies::Empty(Some(body))
    } else {
        Bodies::Replay(Replay::new(body, ctx.sent_counter()))
    };
    let template = Template::of(&parts);
    let mut next_parts = Some(parts);
    let mut tried: Vec<TargetAddr> = Vec::new();
    let mut retries = 0;
    let mut _retry_slot: Option<Permit> = None;
    loop {
        let parts = next_parts.take().unwrap_or_else(|| template.parts());
        let (counted, sent) = (ctx.route.upstream_handle(), ctx.sent_counter());
        let mut body = match &mut bodies {
            Bodies::Empty(first) => match first.take() {
                Some(body) => RequestBody::new(body, counted, sent),
                None => RequestBody::empty(counted, sent),
            },
            // The copy counts the application's bytes for the access log, once.
            Bodies::Replay(replay) => RequestBody::replay(replay.attempt(), counted, None),
        };
        if let Some(MirrorTee(to)) = mirror.take() {
            body.tee(to);
        }
        ctx.timed_out.store(false, Ordering::Relaxed);
        // The endpoints the attempt picked, known also when it failed or timed out.
        let mut picked = Vec::new();
        let result = {
            let exclude = if retry.omit_previous_hosts { &tried[..] } else { &[] };
            let attempt = std::pin::pin!(attempt(ctx, parts, body, false, exclude, Some(&mut picked)));
            match retry.per_try_timeout {
                Some(limit) => {
                    let limit = timed_out(ctx.body_end.as_deref(), Some(limit), ctx.stream_idle);
                    within(ctx, limit, attempt).await.unwrap_or_else(|why| {
                        // A timed-out attempt is retried as a reset; a stalled application is not.
                        let failure =
                            if why == Expired::Stalled { AttemptFailure::Local } else { AttemptFailure::Reset };
                        Attempt::Failed(failure, why.reply(ctx.grpc))
                    })
                }
                None => attempt.await,
            }
        };
        let (again, headers) = match &result {
            Attempt::Answered(e) => (retry.retries_response(&e.response), Some(e.response.headers())),
            Attempt::Failed(failure, _) => (retry.retries_failure(*failure), None),
        };
        let replayable = |stop: bool| match &bodies {
            Bodies::Empty(_) => true,
            Bodies::Replay(replay) if stop => replay.stop_reading(),
            Bodies::Replay(replay) => replay.replayable(),
        };
        if !again || retries >= retry.num_retries || !replayable(false) {
            return result;
        }
        // The previous retry's slot is given back first: one request holds at most one.
        _retry_slot = None;
        let Some(slot) = upstream.retry_permit() else { return result };
        // The attempt given up reads no more of the application's body (it went on until the
        // next attempt began, and past the copy's limit a retry sent the body without its
        // start); what the copy holds now is what the retry sends.
        if !replayable(true) {
            return result;
        }
        retries += 1;
        let wait: Duration = retry.back_off(retries, headers.cloned().as_ref());
        drop(result);
        tried.extend(picked);
        _retry_slot = Some(slot);
        upstream.metrics.retries.inc();
        tracing::debug!(service = %upstream.service(), retry = retries, ?wait, "retrying the request");
        tokio::time::sleep(wait).await;
    }
}

/// The request body of each attempt.
enum Bodies {
    /// No body: the first attempt takes the (finished) original, retries send nothing.
    Empty(Option<AppBody>),
    Replay(Replay),
}

/// What a retry needs to build the request again (the first attempt uses the original).
struct Template {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: HeaderMap,
}

impl Template {
    fn of(parts: &Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn parts(&self) -> Parts {
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method.clone();
        parts.uri = self.uri.clone();
        parts.version = self.version;
        parts.headers = self.headers.clone();
        parts
    }
}

/// One attempt: a connection, the rewritten request, and its response head. The endpoints it
/// picks go to `picked` as it picks them.
async fn attempt(
    ctx: &RequestCtx,
    mut parts: Parts,
    mut body: RequestBody,
    upgrade: bool,
    exclude: &[TargetAddr],
    picked: Option<&mut Vec<TargetAddr>>,
) -> Attempt {
    let (upstream, grpc) = (&ctx.route.upstream, ctx.grpc);
    let http2 = matches!(ctx.route.service.protocol, Protocol::Http2 | Protocol::Grpc);
    let tls = ctx.route.tls();
    let failed = |failure, reply| Attempt::Failed(failure, reply);
    let bodiless = !upgrade && parts.method != http::Method::CONNECT && hyper::body::Body::is_end_stream(&body);
    let (mut sender, target, key) = match client::connection(upstream, tls, http2, bodiless, exclude, picked).await {
        Ok(s) => s,
        Err(error) => return no_connection(error, grpc),
    };
    if let Err(refusal) =
        prepare_request(&mut parts, &target.addr, upstream.hostname(&target), tls.is_some(), http2, upgrade)
    {
        return failed(AttemptFailure::Local, reply::refused(grpc, refusal));
    }
    let active = target.health.track();
    let shared_return = match &sender {
        Sender::H1(_) => body.share_pool_return(),
        Sender::H2(_) | Sender::Own(_) => None,
    };
    // A pooled HTTP/1 connection may be closed by the endpoint (its keep-alive timeout, or a
    // close right after its last answer) just as this request goes out: an idempotent request
    // without a body is then sent once more on a new connection (RFC 9110 §9.2.2). One of
    // `upstream::h1`'s sends the request's head from `parts`, which stay here: it is resent
    // after any reuse, at no cost. hyper's client takes the request, so for it a copy is kept,
    // only after an idle time of STALE_IDLE or more.
    let resendable = parts.method.is_idempotent() && hyper::body::Body::is_end_stream(&body);
    let opened = AtomicBool::new(false);
    let timeout_counts = TimeoutCounts { ctx, target: &target, opened: &opened };
    let mut sent;
    if let Sender::Own(_) = sender {
        drop(body); // none to send
        let reused = sender.idle_for().is_some();
        sent = sender.exchange(&parts, &opened).await;
        if matches!(&sent, Err(error) if reused && resendable && closed_before_response(error)) {
            sender = match resend_connection(ctx, &key, &target, tls, bodiless, &opened).await {
                Ok(fresh) => fresh,
                Err(error) => return no_connection(error, grpc),
            };
            sent = sender.exchange(&parts, &opened).await;
        }
    } else {
        let resend = (sender.idle_for().is_some_and(|d| d >= STALE_IDLE) && resendable)
            .then(|| (Template::of(&parts), body.upstream(), body.sent()));
        sent = sender.send(Request::from_parts(parts, body), &opened).await;
        if let (Err(error), Some((template, counted, bytes))) = (&sent, resend) {
            if closed_before_response(error) {
                sender = match resend_connection(ctx, &key, &target, tls, bodiless, &opened).await {
                    Ok(fresh) => fresh,
                    Err(error) => return no_connection(error, grpc),
                };
                let request = Request::from_parts(template.parts(), RequestBody::empty(counted, bytes));
                sent = sender.send(request, &opened).await;
            }
        }
    }
    // A shared HTTP/2 connection the endpoint is closing (its GOAWAY: a restart, a limit of
    // requests per connection) takes no new stream; the request, not sent, goes on another.
    // When every connection tried takes none, that counts against the endpoint.
    let mut refused_again = false;
    if let Err(SendError::H2Unsent(error, unsent)) = sent {
        tracing::debug!(service = %upstream.service(), endpoint = %target.addr, %error, "the HTTP/2 connection takes no new streams; sending the request on another");
        (sender, sent) = match Box::pin(client::resend_unsent(upstream, &key, &target, tls, unsent, &opened)).await {
            Ok(resent) => resent,
            Err(connect) => return no_connection(connect, grpc),
        };
        refused_again = matches!(sent, Err(SendError::H2Unsent(..)));
    }
    drop(timeout_counts);
    match sent {
        Ok(response) => {
            upstream.record(&target, Outcome::Response(response.status().as_u16()));
            Attempt::Answered(Exchanged { response, sender, target, key, active, shared_return })
        }
        Err(error) if request_body_failed(&error) => {
            tracing::debug!(service = %upstream.service(), %error, "the application's request body is malformed");
            failed(AttemptFailure::Local, reply::local_reply(grpc, Failure::BadRequest, reply::BAD_REQUEST_BODY))
        }
        Err(error) => {
            tracing::warn!(service = %upstream.service(), endpoint = %target.addr, %error, "upstream request failed before the response");
            // A request the endpoint's GOAWAY turned away is not its failure: it is closing
            // the connection in good order.
            if refused_again || !refused_by_goaway(&error) {
                upstream.record(&target, Outcome::LocalFailure);
            }
            let failure = if refused_stream(&error) { AttemptFailure::RefusedStream } else { AttemptFailure::Reset };
            let why = if reset_by_endpoint(&error) {
                Failure::StreamReset
            } else if protocol_error(&error) {
                Failure::UpstreamProtocolError
            } else {
                Failure::UpstreamReset
            };
            failed(failure, reply::upstream_failed(grpc, why))
        }
    }
}

/// The attempt's end when it got no connection: a local limit or no endpoint (not retried), or
/// a failed connect.
fn no_connection(error: ConnectError, grpc: bool) -> Attempt {
    tracing::warn!(%error, "no upstream connection");
    let unavailable = |failure| reply::upstream_failed(grpc, failure);
    match error {
        ConnectError::Overflow { .. } | ConnectError::Pending { .. } | ConnectError::Pools { .. } => {
            Attempt::Failed(AttemptFailure::Local, reply::overflow(grpc))
        }
        ConnectError::NoEndpoint { .. } => {
            Attempt::Failed(AttemptFailure::Local, unavailable(Failure::NoHealthyUpstream))
        }
        _ => Attempt::Failed(AttemptFailure::Connect, unavailable(Failure::UpstreamFailed)),
    }
}

/// A new connection for a request the pooled one closed under as it went out. Failing, the
/// request gets the connect failure's answer (a local limit's, or 503), which recorded itself:
/// the endpoint that closed an idle connection is not at fault. The new connection is not the
/// request's until it is made (`opened`).
async fn resend_connection(
    ctx: &RequestCtx,
    key: &PoolKey,
    target: &Target,
    tls: Option<crate::upstream::TlsSetup<'_>>,
    bodiless: bool,
    opened: &AtomicBool,
) -> Result<Sender, ConnectError> {
    let upstream = &ctx.route.upstream;
    tracing::debug!(service = %upstream.service(), endpoint = %target.addr, "the pooled connection closed as the request went out; sending it again on a new one");
    opened.store(false, Ordering::Relaxed);
    Box::pin(client::new_h1(upstream, key, target, tls, bodiless)).await
}

/// The response for the application: the endpoint's head with its body streamed through, or
/// an upgraded tunnel.
fn respond(
    ctx: &RequestCtx,
    proxy: &HttpProxy,
    exchanged: Exchanged,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    client_version: http::Version,
    request_slot: RequestSlot,
) -> Response<ProxyBody> {
    let grpc = ctx.grpc;
    let Exchanged { mut response, sender, target, key, active, shared_return } = exchanged;
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, response.status()) {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, proxy.timeouts.flow(), proxy.connections.open()));
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, ProxyBody::empty());
    }
    let (mut parts, body) = response.into_parts();
    // An endpoint that will close the connection after this response (hyper's client then takes
    // no other request on it) must not have it pooled: the next request would wait on it.
    let reusable = matches!(sender, Sender::H1(_))
        && h1::keeps_alive(parts.version, parts.headers.get_all(http::header::CONNECTION).iter());
    // Transfer-Encoding wins over a Content-Length beside it (RFC 9112 §6.3): the body was read
    // chunked, and the application's side must not cut it at the other length.
    if parts.headers.contains_key(http::header::TRANSFER_ENCODING) {
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    if grpc {
        // The proxy may end a gRPC response early with its own trailers (deadline, upstream
        // reset): a Content-Length would then be a lie the client must treat as an error.
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    parts.version = client_version;
    let pool_return = match sender {
        Sender::H1(_) if !reusable => None,
        Sender::H1(sender) => {
            let connection = PoolReturn { pool: ctx.route.upstream_handle(), key, sender };
            Some(match shared_return {
                Some(shared) => {
                    shared.set(connection);
                    ReturnTicket::Shared(shared)
                }
                None => ReturnTicket::Alone(connection),
            })
        }
        Sender::Own(_) => Some(ReturnTicket::Own(OwnReturn { pool: ctx.route.upstream_handle(), key })),
        Sender::H2(_) => None,
    };
    let stream_idle = ctx.stream_idle.map(StreamIdle::new);
    let mut body = Box::new(UpstreamBody {
        body,
        pool_return,
        deadline: ctx.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        stream_idle,
        grpc,
        finished: false,
        outcome: "aborted",
        received: 0,
        endpoint: target.addr.clone(),
        log: None,
        _active: active,
        request_slot,
    });
    if body.body.is_end_stream() {
        // hyper will not poll an empty body: it is complete now.
        body.outcome = "ok";
        body.return_to_pool();
    }
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

/// The exchange failed because reading the application's request body did (malformed chunked
/// framing, say): the error hyper's client reports wraps the server side's `hyper::Error`.
fn request_body_failed(error: &SendError) -> bool {
    matches!(error, SendError::Hyper(error) if application_body_failed(error))
}

/// hyper's client failed because the application's body did (a user body error): its error
/// (a passthrough request's body), or a [`BodyError::App`] (a service's), is the source. Not a
/// cancelled request (a reused connection that failed), whose source is a `hyper::Error` too.
pub(super) fn application_body_failed(error: &hyper::Error) -> bool {
    error.is_user()
        && std::error::Error::source(error).is_some_and(|source| {
            source.is::<AppBodyError>()
                || source.downcast_ref::<BodyError>().is_some_and(|b| matches!(b, BodyError::App(_)))
        })
}

/// A pooled connection idle this long may be closed by the endpoint as it is reused.
const STALE_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The connection ended before any response byte: closed, reset, or the request never left.
fn closed_before_response(error: &SendError) -> bool {
    let error = match error {
        SendError::Hyper(error) => error,
        SendError::Own(error) => return error.closed_before_response(),
        SendError::H2(_) | SendError::H2Unsent(..) => return false,
    };
    if error.is_incomplete_message() || error.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return crate::upstream::h1::closed_connection(io.kind());
        }
        source = e.source();
    }
    false
}

/// The endpoint refused the HTTP/2 stream: it did not process the request. Its
/// `REFUSED_STREAM`, or its GOAWAY (which refuses the streams it did not take, as nghttp2 tells
/// Envoy with `REFUSED_STREAM`).
fn refused_stream(error: &SendError) -> bool {
    refused_by_goaway(error) || h2_error(error).is_some_and(|e| e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// The endpoint reset the request's stream (RST_STREAM), rather than its connection failing:
/// Envoy's UR, not UC.
fn reset_by_endpoint(error: &SendError) -> bool {
    h2_error(error).is_some_and(|e| e.is_reset() && e.is_remote())
}

/// The endpoint's answer broke the protocol: a response head our HTTP/1 client or hyper's
/// cannot parse, or HTTP/2 that h2 refused (and answered with its own RST_STREAM or GOAWAY).
fn protocol_error(error: &SendError) -> bool {
    match error {
        SendError::Own(error) => error.is_protocol_error(),
        SendError::Hyper(error) => hyper_protocol_error(error),
        SendError::H2(error) => h2_protocol_error(error),
        SendError::H2Unsent(..) => false,
    }
}

/// hyper's client's error says the answer broke the protocol (also a passthrough
/// destination's).
pub(super) fn hyper_protocol_error(error: &hyper::Error) -> bool {
    error.is_parse() || h2_source(error).is_some_and(h2_protocol_error)
}

fn h2_protocol_error(error: &h2::Error) -> bool {
    use h2::Reason;
    error.is_library()
        && error.reason().is_some_and(|reason| {
            matches!(
                reason,
                Reason::PROTOCOL_ERROR
                    | Reason::FLOW_CONTROL_ERROR
                    | Reason::FRAME_SIZE_ERROR
                    | Reason::COMPRESSION_ERROR
            )
        })
}

/// The HTTP/2 error under a failed send, if it is one.
fn h2_error(error: &SendError) -> Option<&h2::Error> {
    match error {
        SendError::Hyper(error) => h2_source(error),
        SendError::H2(error) => Some(error),
        SendError::H2Unsent(..) | SendError::Own(_) => None,
    }
}

/// The destination reset a passthrough request's HTTP/2 stream (UR, not UC).
pub(super) fn h2_reset_by_peer(error: &hyper::Error) -> bool {
    h2_source(error).is_some_and(|e| e.is_reset() && e.is_remote())
}

/// The HTTP/2 error under hyper's, if it is one.
fn h2_source(error: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = e.source();
    }
    None
}

/// The endpoint's graceful GOAWAY turned the request away: no stream was opened for it, or
/// h2 failed its stream as one above the GOAWAY's last stream id (a GOAWAY with an error
/// reason fails every stream alike, processed or not, and is not told from a crash).
fn refused_by_goaway(error: &SendError) -> bool {
    match error {
        SendError::H2Unsent(..) => true,
        SendError::H2(error) => error.is_go_away() && error.is_remote() && error.reason() == Some(h2::Reason::NO_ERROR),
        SendError::Hyper(_) | SendError::Own(_) => false,
    }
}

/// hyper may hold bytes of an upgraded connection it read ahead: never spliced.
impl crate::splice::Splice for TokioIo<hyper::upgrade::Upgraded> {}

/// Moves an upgraded connection's bytes; counted as an open connection until it closes.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    timeouts: copy::FlowTimeouts,
    _open: crate::proxy::conn::ConnectionGuard,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(error) => return tracing::debug!(%error, "upgrade failed"),
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let _ = copy::bidirectional(&mut client, &mut upstream, timeouts).await;
}

/// Sends a copy of a request to `route` and drops the answer (RequestMirror).
pub(super) async fn send_copy(
    route: &crate::live::Route,
    mut parts: Parts,
    body: Option<tokio::sync::mpsc::Receiver<Copied>>,
) -> Result<(), String> {
    let upstream = &route.upstream;
    let http2 = matches!(route.service.protocol, Protocol::Http2 | Protocol::Grpc);
    let tls = route.tls();
    let (mut sender, target, key) =
        client::connection(upstream, tls, http2, body.is_none(), &[], None).await.map_err(|e| e.to_string())?;
    prepare_request(&mut parts, &target.addr, upstream.hostname(&target), tls.is_some(), http2, false)
        .map_err(|_| "refused".to_string())?;
    let counted = route.upstream_handle();
    let body = match body {
        Some(receiver) => RequestBody::mirror(receiver, counted),
        None => RequestBody::empty(counted, None),
    };
    let request = Request::from_parts(parts, body);
    let mut sent = sender.send(request, &AtomicBool::new(false)).await;
    // As for the request itself: an HTTP/2 connection closing (GOAWAY) hands the copy back
    // unsent, and it goes on another.
    if let Err(SendError::H2Unsent(_, unsent)) = sent {
        let opened = AtomicBool::new(false);
        let resent = client::resend_unsent(upstream, &key, &target, tls, unsent, &opened).await;
        sent = resent.map_err(|e| e.to_string())?.1;
    }
    let response = sent.map_err(|e| e.to_string())?;
    upstream.record(&target, Outcome::Response(response.status().as_u16()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MeshRetry's `RefusedStream` and the stale-connection resend read these: an endpoint's
    /// `REFUSED_STREAM` from h2's client is told from other stream errors, and no HTTP/2 error
    /// is taken for an HTTP/1 connection closed under a request.
    #[test]
    fn http2_stream_errors_are_classified() {
        let refused = SendError::H2(h2::Reason::REFUSED_STREAM.into());
        let reset = SendError::H2(h2::Reason::INTERNAL_ERROR.into());
        assert!(refused_stream(&refused));
        assert!(!refused_stream(&reset));
        assert!(!closed_before_response(&refused) && !closed_before_response(&reset));
        assert!(!request_body_failed(&refused));
    }
}
