//! The forward phase of a request: a connection from the upstream client, the request
//! rewritten for the endpoint, the exchange, and the response body streamed back (or an
//! upgraded tunnel).

use http::{Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;

use super::body::{ProxyBody, UpstreamBody};
use super::client::{self, Sender};
use super::reply::{self, Failure};
use super::request::RequestCtx;
use super::rewrite::{check, is_upgrade, prepare_request, strip_hop_by_hop};
use super::HttpProxy;
use crate::catalog::Protocol;
use crate::proxy::copy;
use crate::upstream::pool::{PoolReturn, RequestBody, ReturnTicket};

/// Forwards within the request's time limit.
pub(super) async fn forward(ctx: &RequestCtx, req: Request<Incoming>, proxy: &HttpProxy) -> Response<ProxyBody> {
    let exchange = exchange(ctx, req, proxy);
    match ctx.limit {
        Some(limit) => match tokio::time::timeout(limit, exchange).await {
            Ok(response) => response,
            Err(_) => reply::local_reply(ctx.grpc, Failure::Timeout, reply::TIMED_OUT),
        },
        None => exchange.await,
    }
}

async fn exchange(ctx: &RequestCtx, req: Request<Incoming>, proxy: &HttpProxy) -> Response<ProxyBody> {
    let (upstream, grpc) = (&ctx.route.upstream, ctx.grpc);
    let http2 = matches!(ctx.route.service.protocol, Protocol::Http2 | Protocol::Grpc);
    let tls = ctx.route.tls();
    let mut req = req;
    let upgrade = !http2 && is_upgrade(req.headers(), &proxy.upgrades);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Err(refusal) = check(&parts) {
        return reply::refused(grpc, refusal);
    }
    let client_version = parts.version;
    let (mut sender, target, key) = match client::connection(upstream, tls, http2).await {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "no upstream connection");
            return reply::local_reply(grpc, Failure::Unavailable, reply::UPSTREAM_FAILED);
        }
    };
    if let Err(refusal) = prepare_request(&mut parts, &target, tls.is_some(), http2, upgrade) {
        return reply::refused(grpc, refusal);
    }
    let active = target.health.track();
    let mut body = RequestBody::new(body, upstream.metrics.bytes_sent.clone(), ctx.sent_counter());
    let shared_return = match &sender {
        Sender::H1(_) => body.share_pool_return(),
        Sender::H2(_) => None,
    };
    let request = Request::from_parts(parts, body);
    let result = match &mut sender {
        Sender::H1(s) => s.send_request(request).await,
        Sender::H2(s) => s.send_request(request).await,
    };
    let mut response = match result {
        Ok(r) => r,
        Err(error) if request_body_failed(&error) => {
            tracing::debug!(service = %upstream.service(), %error, "the application's request body is malformed");
            return reply::local_reply(grpc, Failure::BadRequest, reply::BAD_REQUEST_BODY);
        }
        Err(error) => {
            tracing::warn!(service = %upstream.service(), endpoint = %target.addr, %error, "upstream request failed before the response");
            return reply::local_reply(grpc, Failure::Unavailable, reply::UPSTREAM_FAILED);
        }
    };
    if let (Some(client_upgrade), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, response.status()) {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(tunnel(client_upgrade, upstream_upgrade, proxy.timeouts.flow(), proxy.connections.open()));
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, ProxyBody::empty());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if grpc {
        // The proxy may end a gRPC response early with its own trailers (deadline, upstream
        // reset): a Content-Length would then be a lie the client must treat as an error.
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    parts.version = client_version;
    let pool_return = match sender {
        Sender::H1(sender) => {
            let connection = PoolReturn { pool: upstream.clone(), key, sender };
            Some(match shared_return {
                Some(shared) => {
                    shared.set(connection);
                    ReturnTicket::Shared(shared)
                }
                None => ReturnTicket::Alone(connection),
            })
        }
        Sender::H2(_) => None,
    };
    let mut body = UpstreamBody {
        body,
        pool_return,
        deadline: ctx.deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        grpc,
        finished: false,
        outcome: "aborted",
        received: 0,
        counter: upstream.metrics.bytes_received.clone(),
        endpoint: target.addr.clone(),
        log: None,
        _active: active,
    };
    if body.body.is_end_stream() {
        body.return_to_pool(); // hyper will not poll an empty body
    }
    Response::from_parts(parts, ProxyBody::Upstream(body))
}

/// The exchange failed because reading the application's request body did (malformed chunked
/// framing, say): the error hyper's client reports wraps the server side's `hyper::Error`.
fn request_body_failed(error: &hyper::Error) -> bool {
    std::error::Error::source(error).is_some_and(|source| source.downcast_ref::<hyper::Error>().is_some())
}

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
