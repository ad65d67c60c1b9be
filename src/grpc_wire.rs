//! The little of gRPC and protobuf that the proxy speaks itself, as a client: unary calls
//! (health checks, OTLP log export) with hand-encoded messages. Not for the data path, where
//! gRPC passes through untouched.

use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;

pub const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// `application/grpc` and `application/grpc+proto` as Envoy decides, and with parameters
/// (`application/grpc;charset=...`, which Envoy does not count); not gRPC-Web
/// (`application/grpc-web`), whose failures a browser client reads as HTTP.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(http::header::CONTENT_TYPE) else { return false };
    value
        .as_bytes()
        .strip_prefix(GRPC_CONTENT_TYPE.as_bytes())
        .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
}

/// Appends a protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-delimited field (string, bytes or an embedded message).
pub fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, u64::from(field << 3 | 2));
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

pub fn put_fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, u64::from(field << 3 | 1));
    out.extend_from_slice(&value.to_le_bytes());
}

/// OTLP's `AnyValue { string_value = 1 }`.
pub fn any_string(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, text.as_bytes());
    out
}

/// OTLP's `KeyValue { key = 1; value = 2 }` with a string value.
pub fn key_value(key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, key.as_bytes());
    put_bytes(&mut out, 2, &any_string(value));
    out
}

/// A unary call of `path` (`/package.Service/Method`) carrying one encoded message.
pub fn unary_request(authority: &str, path: &str, message: &[u8]) -> Result<Request<Full<Bytes>>, String> {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(0);
    framed.put_u32(u32::try_from(message.len()).map_err(|_| "message too large".to_string())?);
    framed.put_slice(message);
    Request::post(format!("http://{authority}{path}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(Full::new(framed.freeze()))
        .map_err(|e| e.to_string())
}

/// The most of a unary answer's body read: health checks' and OTLP export's answers are a few
/// bytes, and a server must not make the proxy hold more (it would read until the call's
/// timeout, as fast as the server sends).
pub const MAX_UNARY_RESPONSE: usize = 64 * 1024;

/// The answer's body (still framed), when its `grpc-status` (trailers, or the headers of a
/// trailers-only answer) is 0.
pub async fn unary_response(response: http::Response<Incoming>) -> Result<Bytes, UnaryError> {
    let (parts, body) = response.into_parts();
    let collected = http_body_util::Limited::new(body, MAX_UNARY_RESPONSE).collect().await.map_err(|error| {
        if error.is::<http_body_util::LengthLimitError>() {
            UnaryError::TooLarge
        } else {
            UnaryError::Body(error)
        }
    })?;
    let status = collected.trailers().or(Some(&parts.headers)).and_then(|h| h.get("grpc-status"));
    match status.map(http::HeaderValue::as_bytes) {
        Some(b"0") => Ok(collected.to_bytes()),
        other => Err(UnaryError::Status(other.map(|s| String::from_utf8_lossy(s).into_owned()))),
    }
}

/// Why a unary call gave no message.
#[derive(Debug, thiserror::Error)]
pub enum UnaryError {
    /// The answer's body broke off.
    #[error("body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The answer's body is larger than [`MAX_UNARY_RESPONSE`].
    #[error("answer larger than {MAX_UNARY_RESPONSE} bytes")]
    TooLarge,
    /// The server answered with another status than OK (or none).
    #[error("grpc-status {0:?}")]
    Status(Option<String>),
}

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// Unary calls over one h2c connection to `endpoint` (`host:port`), opened on first use and
/// again after it closes or a call fails (OTLP export).
#[derive(Debug)]
pub struct GrpcClient {
    endpoint: String,
    sender: Option<H2>,
}

impl GrpcClient {
    pub fn new(endpoint: String) -> Self {
        Self { endpoint, sender: None }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Calls `path` with `message`; the answer's framed body when its `grpc-status` is 0.
    pub async fn unary(&mut self, path: &str, message: &[u8]) -> Result<Bytes, String> {
        let result = self.try_unary(path, message).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_unary(&mut self, path: &str, message: &[u8]) -> Result<Bytes, String> {
        use std::time::Duration;
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            slot => {
                let connect = crate::socket_mark::connect_host(self.endpoint.as_str());
                let tcp = tokio::time::timeout(Duration::from_secs(5), connect)
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| format!("connect: {e}"))?;
                let _ = tcp.set_nodelay(true);
                let io = hyper_util::rt::TokioIo::new(tcp);
                let (sender, connection) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
                tokio::spawn(connection);
                slot.insert(sender)
            }
        };
        let request = unary_request(&self.endpoint, path, message)?;
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .map_err(|_| "no answer in 10s".to_string())?
            .map_err(|e| e.to_string())?;
        unary_response(response).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut field = Vec::new();
        put_bytes(&mut field, 1, b"abc");
        assert_eq!(field, [0x0a, 3, b'a', b'b', b'c']);
    }
}
