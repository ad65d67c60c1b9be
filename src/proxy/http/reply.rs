//! Local replies: what the application gets instead of an upstream response, as an HTTP status
//! with a text body or a gRPC trailers-only response.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::body::ProxyBody;
use super::grpc::GRPC_CONTENT_TYPE;
use crate::proxy::admit::Denial;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    Unavailable,
    Timeout,
    Forbidden,
}

impl Failure {
    fn http_status(self) -> StatusCode {
        match self {
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Forbidden => StatusCode::FORBIDDEN,
        }
    }

    fn grpc_status(self) -> &'static str {
        match self {
            Self::Unavailable => "14",
            Self::Timeout => "4",
            Self::Forbidden => "7",
        }
    }
}

pub(super) const NOT_CONFIGURED: &str = "service is no longer configured";
pub(super) const UPSTREAM_FAILED: &str = "upstream connect error or disconnect/reset before headers";
pub(super) const TIMED_OUT: &str = "upstream did not answer in time";

/// The reply to a request the admit phase refused.
pub(super) fn denied(grpc: bool, denial: Denial) -> Response<ProxyBody> {
    match denial {
        Denial::Broken => {
            local_reply(grpc, Failure::Unavailable, "service is not available: its configuration is broken")
        }
        Denial::Forbidden => {
            local_reply(grpc, Failure::Forbidden, "access to external services is forbidden by the Mesh")
        }
    }
}

pub(super) fn local_reply(grpc: bool, failure: Failure, message: &'static str) -> Response<ProxyBody> {
    if grpc {
        let mut response = Response::new(ProxyBody::empty());
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
        h.insert("grpc-status", HeaderValue::from_static(failure.grpc_status()));
        h.insert("grpc-message", HeaderValue::from_static(message));
        return response;
    }
    let mut response = Response::new(ProxyBody::Local(Full::new(Bytes::from_static(message.as_bytes()))));
    *response.status_mut() = failure.http_status();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
