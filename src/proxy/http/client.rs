//! The upstream client: a connection for one request, pooled when possible, else new (a failed
//! connect is retried once on another endpoint).
//!
//! A request that needs a new connection waits for it as a pending request
//! (MeshCircuitBreaker `maxPendingRequests`).

use std::sync::atomic::{AtomicBool, Ordering};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;

use crate::upstream::early_response::EarlyResponseIo;
use crate::upstream::pool::H1Sender;
use crate::upstream::pool::{PoolKey, RequestBody};
use crate::upstream::{h1, h2, ConnectError, Connected, Target, TargetAddr, TlsSetup, Upstream};
use http::Response;

use super::body::ResponseBody;

pub(super) enum Sender {
    /// Held exclusively for one request, then returned to the pool.
    H1(H1Sender),
    /// Shared: every request opens a stream on it ([`h2`]).
    H2(h2::Client),
    /// For a request without a body, written and read by its own task ([`h1`]); the response
    /// body takes it (`None` after the exchange).
    Own(Option<h1::Conn>),
}

/// Why an exchange failed before its response head.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Own(#[from] h1::Error),
    #[error(transparent)]
    H2(#[from] ::h2::Error),
    /// Not sent: the shared HTTP/2 connection takes no new stream (the endpoint's GOAWAY).
    #[error("the endpoint's HTTP/2 connection takes no new streams: {0}")]
    H2Unsent(::h2::Error, h2::Unsent),
}

impl From<h2::Failure> for SendError {
    fn from(failure: h2::Failure) -> Self {
        match failure {
            h2::Failure::Unsent(error, request) => Self::H2Unsent(error, request),
            h2::Failure::Failed(error) => Self::H2(error),
        }
    }
}

impl Sender {
    /// Sends `request` and waits for the response head; `opened` is set once the request has
    /// a connection or stream of its own (an HTTP/2 one may first wait for the endpoint's stream
    /// limit).
    pub(super) async fn send(
        &mut self,
        request: http::Request<RequestBody>,
        opened: &AtomicBool,
    ) -> Result<Response<ResponseBody>, SendError> {
        if !matches!(self, Self::H2(_)) {
            opened.store(true, Ordering::Relaxed);
        }
        let response = match self {
            Self::H1(s) => s.sender.send_request(request).await?,
            Self::H2(client) => return Ok(client.send_noting_open(request, opened).await?.map(ResponseBody::H2)),
            Self::Own(_) => return self.exchange(&request.into_parts().0, opened).await,
        };
        Ok(response.map(ResponseBody::Hyper))
    }

    /// Sends a request without a body on one of [`h1`]'s connections, its head from `parts`
    /// (kept by the caller, to send again on another connection).
    pub(super) async fn exchange(
        &mut self,
        parts: &http::request::Parts,
        opened: &AtomicBool,
    ) -> Result<Response<ResponseBody>, SendError> {
        opened.store(true, Ordering::Relaxed);
        let Self::Own(conn) = self else {
            return Err(h1::Error::Invalid("not a connection of upstream::h1").into());
        };
        let conn = conn.take().ok_or(h1::Error::Invalid("connection already used"))?;
        Ok(conn.exchange(parts).await?.map(ResponseBody::Own))
    }

    /// How long the connection sat in the pool before this request (`None`: new, or shared).
    pub(super) fn idle_for(&self) -> Option<std::time::Duration> {
        match self {
            Self::H1(h1) => h1.idle_for,
            Self::Own(conn) => conn.as_ref().and_then(h1::Conn::idle_for),
            Self::H2(_) => None,
        }
    }
}

/// A connection for one request, the endpoint it goes to and its pool key; `exclude` are
/// endpoints earlier attempts used (MeshRetry `OmitPreviousHosts`), and each endpoint picked
/// goes to `picked` at once (a connect that fails or is given up counts as tried).
/// `bodiless`: the request has no body and no upgrade, so an HTTP/1 exchange may be made by the
/// request's own task ([`h1`]).
pub(super) async fn connection(
    upstream: &Upstream,
    tls: Option<TlsSetup<'_>>,
    http2: bool,
    bodiless: bool,
    exclude: &[TargetAddr],
    mut picked: Option<&mut Vec<TargetAddr>>,
) -> Result<(Sender, Target, PoolKey), ConnectError> {
    upstream.wait_for_first_resolution().await;
    let tls_id = tls.map(|t| t.identity).unwrap_or_default();
    let mut failed: Option<(Target, ConnectError)> = None;
    for _ in 0..2 {
        // Prefer endpoints neither earlier attempts nor this one used; else any but the one
        // that just failed.
        let failed_addr = failed.as_ref().map(|(t, _)| std::slice::from_ref(&t.addr)).unwrap_or_default();
        let mut avoid = exclude.to_vec();
        avoid.extend_from_slice(failed_addr);
        let pick = upstream.pick(&avoid).or_else(|| upstream.pick(failed_addr).filter(|_| !exclude.is_empty()));
        let Some(target) = pick else { break };
        if let Some(picked) = picked.as_deref_mut() {
            picked.push(target.addr.clone());
        }
        let key = PoolKey::new(&target, tls_id, http2);
        // New connections are boxed: their connect, TLS and handshake state is large, and
        // inline it would make every request's future (moved on each spawn) that large.
        let result = if http2 {
            shared_h2(upstream, &key, &target, tls).await
        } else {
            // Any idle connection serves any request (idle connections hold the service's
            // connection slots): each kind prefers its own.
            match pooled_h1(upstream, &key, bodiless).await {
                Some(sender) => Ok(sender),
                None => Box::pin(new_h1(upstream, &key, &target, tls, bodiless)).await,
            }
        };
        match result {
            Ok(sender) => return Ok((sender, target, key)),
            Err(error) if !error.is_connect_failure() => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "upstream connection failed; trying another endpoint");
                failed = Some((target, error));
            }
        }
    }
    Err(failed.map_or_else(|| upstream.no_endpoint(), |(_, e)| e))
}

/// `key`'s shared HTTP/2 connection, opened to `target` when there is none that takes new
/// streams.
async fn shared_h2(
    upstream: &Upstream,
    key: &PoolKey,
    target: &Target,
    tls: Option<TlsSetup<'_>>,
) -> Result<Sender, ConnectError> {
    let connect = |expected_streams| {
        Box::pin(async move {
            let connected = open(upstream, key, target, tls).await?;
            h2::Client::handshake(connected.stream, connected.slot, expected_streams)
                .await
                .map_err(|e| handshake_error(upstream, target, e))
        })
    };
    upstream.pool.h2(key, connect).await.map(Sender::H2)
}

/// How many of `key`'s HTTP/2 connections a request handed back unsent may try in turn.
const UNSENT_RESENDS: usize = 8;

/// Sends `unsent`, which a shared HTTP/2 connection handed back (the endpoint's GOAWAY: a
/// restart, a limit of requests per connection), on another of `key`'s connections or a new
/// one. Each connection that hands it back counts as closed from then on, so the next try
/// passes over it: a burst may have left several connections, all closing. The result is the
/// last try's; a request still handed back was refused by every connection tried.
pub(super) async fn resend_unsent(
    upstream: &Upstream,
    key: &PoolKey,
    target: &Target,
    tls: Option<TlsSetup<'_>>,
    mut unsent: h2::Unsent,
    opened: &AtomicBool,
) -> Result<(Sender, Result<Response<ResponseBody>, SendError>), ConnectError> {
    let mut tries = 1;
    loop {
        let mut sender = shared_h2(upstream, key, target, tls).await?;
        match sender.send(*unsent.0, opened).await {
            Err(SendError::H2Unsent(_, again)) if tries < UNSENT_RESENDS => {
                unsent = again;
                tries += 1;
            }
            sent => return Ok((sender, sent)),
        }
    }
}

/// An idle HTTP/1 connection from `key`'s pool: for a request without a body one of
/// [`h1`]'s, else one of hyper's client; when there is none of that kind, one of the other
/// (one of [`h1`]'s is handed to hyper's client, which keeps it).
async fn pooled_h1(upstream: &Upstream, key: &PoolKey, bodiless: bool) -> Option<Sender> {
    let own = || upstream.pool.take_own(key);
    if bodiless {
        if let Some(conn) = own() {
            return Some(Sender::Own(Some(conn)));
        }
    }
    if let Some(mut h1) = upstream.pool.take_h1(key) {
        if h1.sender.ready().await.is_ok() {
            return Some(Sender::H1(h1));
        }
    }
    if bodiless {
        return None;
    }
    let conn = own()?;
    let (opened, idle_for) = (conn.opened(), conn.idle_for());
    let (io, slot) = conn.into_io();
    let sender = handshake_h1(io, slot).await.ok()?;
    Some(Sender::H1(H1Sender { sender, opened, idle_for }))
}

/// A new HTTP/1 connection to `target` for `key`'s pool (`bodiless`: for [`h1`]).
pub(super) async fn new_h1(
    upstream: &Upstream,
    key: &PoolKey,
    target: &Target,
    tls: Option<TlsSetup<'_>>,
    bodiless: bool,
) -> Result<Sender, ConnectError> {
    let connected = open(upstream, key, target, tls).await?;
    if bodiless {
        return Ok(Sender::Own(Some(h1::Conn::new(connected.stream, connected.slot))));
    }
    let opened = tokio::time::Instant::now().into_std();
    handshake_h1(connected.stream, connected.slot)
        .await
        .map(|sender| Sender::H1(H1Sender { sender, opened, idle_for: None }))
        .map_err(|e| handshake_error(upstream, target, e))
}

/// A new connection for `key`'s pool, within `maxConnectionPools`, the request waiting for it
/// as a pending request (`maxPendingRequests`).
async fn open(
    upstream: &Upstream,
    key: &PoolKey,
    target: &Target,
    tls: Option<TlsSetup<'_>>,
) -> Result<Connected, ConnectError> {
    upstream.pool_admits(key)?;
    let _pending = upstream.pending_permit().ok_or_else(|| ConnectError::Pending {
        service: upstream.service().clone(),
        max: upstream.policy().max_pending_requests,
    })?;
    upstream.connect_target(target, tls).await
}

fn handshake_error<E>(upstream: &Upstream, target: &Target, source: E) -> ConnectError
where
    E: std::error::Error + Send + Sync + 'static,
{
    ConnectError::Io {
        service: upstream.service().clone(),
        target: target.addr.clone(),
        source: std::io::Error::other(source),
    }
}

/// The connection runs on its own task, which holds `slot` (a connection-limit permit, or
/// nothing) until it closes. A response the endpoint sent before it reset the connection under
/// a request body is read, not lost to the write's error ([`EarlyResponseIo`]).
pub(super) async fn handshake_h1<B, S>(io: S, slot: impl Send + 'static) -> Result<http1::SendRequest<B>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // A header folded over lines (obs-fold) is unfolded (RFC 9112 §5.2), as Envoy does.
    let (sender, connection) = http1::Builder::new()
        .allow_obsolete_multiline_headers_in_responses(true)
        .handshake(TokioIo::new(EarlyResponseIo::new(io)))
        .await?;
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream HTTP/1 connection closed with an error");
        }
    });
    Ok(sender)
}

pub(super) async fn handshake_h2<B, S>(io: S, slot: impl Send + 'static) -> Result<http2::SendRequest<B>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, connection) = http2::Builder::new(BoxingExecutor).handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection closed with an error");
        }
    });
    Ok(sender)
}

/// Spawns each future hyper's HTTP/2 client hands over, boxed. Tokio keeps a task's future
/// inline in the task and rewrites the whole slot when the task finishes, so a future of
/// several KiB cost a few KiB of memcpy per task; boxed, the task holds a pointer.
#[derive(Clone, Copy, Debug, Default)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(Box::pin(future));
    }
}
