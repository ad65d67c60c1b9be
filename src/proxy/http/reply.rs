//! Local replies: what the application gets instead of an upstream response, as an HTTP status
//! with a text body or a gRPC trailers-only response.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::body::ProxyBody;
use super::grpc::GRPC_CONTENT_TYPE;
use super::rewrite::Refusal;
use crate::proxy::admit::Denial;

/// Why the proxy answered a request itself: its HTTP status, its gRPC status and the response
/// flag Envoy logs for it (`%RESPONSE_FLAGS%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection to an endpoint could be made: 503, UF.
    UpstreamFailed,
    /// The endpoint's connection ended before its response began: 503, UC.
    UpstreamReset,
    /// The endpoint reset the request's HTTP/2 stream before its response began: 503, UR.
    StreamReset,
    /// The endpoint's response broke the protocol (a malformed HTTP/1 head, obs-fold included;
    /// HTTP/2 frames or headers h2 refuses): 502, UPE, as Envoy since 1.22.
    UpstreamProtocolError,
    /// No backend of the matched route can take traffic: 503, UH.
    NoHealthyUpstream,
    /// The service, or the route's backend, is not configured or is broken: 503, NC.
    NoCluster,
    /// No MeshPassthrough rule matches the destination: 503, NR.
    NoRoute,
    /// The destination's name did not resolve: 503, DF.
    DnsFailed,
    /// The response headers did not arrive in time: 504, UT.
    Timeout,
    /// The application stopped sending its request body for the stream idle timeout: 408, SI.
    StreamIdle,
    /// A MeshCircuitBreaker limit was reached: 503, UO.
    Overflow,
    /// The Mesh or a MeshTrafficPermission refuses the service: 403, RBAC.
    Forbidden,
    /// The request cannot be forwarded as it is: 400, DPE.
    BadRequest,
    /// CONNECT: 405.
    MethodNotAllowed,
}

impl Failure {
    /// The HTTP status, the gRPC status (as Envoy maps them: 400 INTERNAL, 405 UNIMPLEMENTED)
    /// and Envoy's response flag.
    fn codes(self) -> (StatusCode, &'static str, &'static str) {
        const UNAVAILABLE: (StatusCode, &str) = (StatusCode::SERVICE_UNAVAILABLE, "14");
        let ((http, grpc), flag) = match self {
            Self::UpstreamFailed => (UNAVAILABLE, "UF"),
            Self::UpstreamReset => (UNAVAILABLE, "UC"),
            Self::StreamReset => (UNAVAILABLE, "UR"),
            // gRPC's HTTP mapping: 502 is UNAVAILABLE.
            Self::UpstreamProtocolError => ((StatusCode::BAD_GATEWAY, "14"), "UPE"),
            Self::NoHealthyUpstream => (UNAVAILABLE, "UH"),
            Self::NoCluster => (UNAVAILABLE, "NC"),
            Self::NoRoute => (UNAVAILABLE, "NR"),
            Self::DnsFailed => (UNAVAILABLE, "DF"),
            Self::Overflow => (UNAVAILABLE, "UO"),
            Self::Timeout => ((StatusCode::GATEWAY_TIMEOUT, "4"), "UT"),
            Self::StreamIdle => ((StatusCode::REQUEST_TIMEOUT, "4"), "SI"),
            Self::Forbidden => ((StatusCode::FORBIDDEN, "7"), "RBAC"),
            Self::BadRequest => ((StatusCode::BAD_REQUEST, "13"), "DPE"),
            Self::MethodNotAllowed => ((StatusCode::METHOD_NOT_ALLOWED, "12"), "-"),
        };
        (http, grpc, flag)
    }

    /// Envoy's response flag for this reply.
    pub fn flag(self) -> &'static str {
        self.codes().2
    }
}

pub(super) const NOT_CONFIGURED: &str = "service is no longer configured";
const UPSTREAM_FAILED: &str = "upstream connect error or disconnect/reset before headers";
const PROTOCOL_ERROR: &str = "upstream connect error or disconnect/reset before headers. reset reason: protocol error";
pub(super) const TIMED_OUT: &str = "upstream did not answer in time";
pub(super) const STREAM_IDLE: &str = "stream timeout";
pub(super) const BAD_REQUEST_BODY: &str = "malformed request body";
pub(super) const OVERFLOW: &str = "upstream overflow: a MeshCircuitBreaker connection limit was reached";

/// The reply to a request whose endpoint gave no response (no connection, a reset, a broken
/// answer): Envoy's text, with its reset reason for a protocol error.
pub(super) fn upstream_failed(grpc: bool, failure: Failure) -> Response<ProxyBody> {
    let message = if failure == Failure::UpstreamProtocolError { PROTOCOL_ERROR } else { UPSTREAM_FAILED };
    local_reply(grpc, failure, message)
}

/// A connection limit was reached: 503 (gRPC UNAVAILABLE) at once, marked as Envoy marks it.
pub(super) fn overflow(grpc: bool) -> Response<ProxyBody> {
    let mut response = local_reply(grpc, Failure::Overflow, OVERFLOW);
    response.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    response
}

/// The reply to a request that cannot be forwarded as it is.
pub(super) fn refused(grpc: bool, refusal: Refusal) -> Response<ProxyBody> {
    match refusal {
        Refusal::BadRequest(message) => local_reply(grpc, Failure::BadRequest, message),
        Refusal::Method => {
            local_reply(grpc, Failure::MethodNotAllowed, "CONNECT is not supported: mesh-egress is no forward proxy")
        }
        Refusal::Unavailable(message) => local_reply(grpc, Failure::UpstreamFailed, message),
    }
}

/// The reply to a request the admit phase refused.
pub(super) fn denied(grpc: bool, denial: Denial) -> Response<ProxyBody> {
    match denial {
        Denial::Broken => {
            local_reply(grpc, Failure::NoCluster, "service is not available: its configuration is broken")
        }
        Denial::Forbidden => {
            local_reply(grpc, Failure::Forbidden, "access to external services is forbidden by the Mesh")
        }
        Denial::Denied => local_reply(
            grpc,
            Failure::Forbidden,
            "access to this external service is denied by a MeshTrafficPermission",
        ),
    }
}

pub(super) fn local_reply(grpc: bool, failure: Failure, message: &'static str) -> Response<ProxyBody> {
    if grpc {
        let mut response = Response::new(ProxyBody::Local(Full::default(), Some(failure)));
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
        h.insert("grpc-status", HeaderValue::from_static(failure.codes().1));
        // A header value has no line breaks; bodies may end with one.
        h.insert("grpc-message", HeaderValue::from_static(message.trim_end()));
        return response;
    }
    let body = Full::new(Bytes::from_static(message.as_bytes()));
    let mut response = Response::new(ProxyBody::Local(body, Some(failure)));
    *response.status_mut() = failure.codes().0;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
