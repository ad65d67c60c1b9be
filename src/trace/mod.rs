//! MeshTrace at run time: one client span per HTTP request to a service, sampled and
//! propagated as Envoy's HTTP connection manager does for an outbound listener, exported to an
//! OTLP/gRPC receiver or a Zipkin collector by a thread per destination ([`export`]).
//!
//! Per request: [`Tracer::begin`] reads the caller's context (W3C for OpenTelemetry, B3 for
//! Zipkin), decides sampling, names our span in the request's headers and keeps what the span
//! needs; [`ActiveSpan::finish`] completes it from the access-log record when the response
//! body ends. Unsampled requests keep nothing after their headers are written.

pub mod context;
mod export;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use rand::Rng as _;

use crate::access_log::sink::response_flags;
use crate::access_log::Record;
use crate::policy::trace::{TagValue, TracePlan, TraceTarget};
use context::{Extracted, Outgoing, Propagation};
use export::Exporter;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");
const X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
const X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER: HeaderName = HeaderName::from_static("x-envoy-downstream-service-cluster");
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// Envoy cuts `http.url`'s path here.
const MAX_PATH_TAG: usize = 256;

/// What the service's spans share: the exporter, the sampling thresholds and the tags.
#[derive(Debug)]
pub struct Tracer {
    exporter: Arc<Exporter>,
    propagation: Propagation,
    zipkin_128bit: bool,
    random: u32,
    overall: u32,
    client: u32,
    tags: Vec<(String, Tag)>,
    node_id: String,
    upstream_cluster: String,
    resource: Arc<str>,
}

#[derive(Debug)]
enum Tag {
    Literal(String),
    Header(HeaderName, Option<String>),
}

/// A sampled span between its request and the end of its response.
#[derive(Debug)]
pub struct ActiveSpan {
    tracer: Arc<Tracer>,
    span: Span,
}

/// What a span is, from its start on.
#[derive(Debug)]
struct Span {
    trace_id: u128,
    narrow: bool,
    span_id: u64,
    parent_span_id: Option<u64>,
    trace_state: Option<HeaderValue>,
    name: String,
    start: SystemTime,
    attributes: Vec<(Cow<'static, str>, String)>,
}

/// A finished span, as the exporters take it.
#[derive(Debug)]
struct Finished {
    resource: Arc<str>,
    span: Span,
    end: SystemTime,
    error: bool,
}

impl Tracer {
    /// The tracer of service `key` (`mesh/name`); `None` (logged) when its exporter cannot start.
    pub fn start(key: &str, plan: &TracePlan) -> Option<Arc<Self>> {
        let exporter = match Exporter::get(&plan.backend) {
            Ok(exporter) => exporter,
            Err(error) => {
                tracing::error!(service = %key, backend = ?plan.backend, %error, "MeshTrace backend cannot start; requests are not traced");
                return None;
            }
        };
        let (propagation, zipkin_128bit) = match &plan.backend {
            TraceTarget::Otlp(_) => (Propagation::W3c, true),
            TraceTarget::Zipkin(z) => (Propagation::B3, z.trace_id_128bit),
        };
        let tags = plan
            .tags
            .iter()
            .filter_map(|t| {
                let tag = match &t.value {
                    TagValue::Literal(value) => Tag::Literal(value.clone()),
                    TagValue::Header { name, default } => {
                        Tag::Header(HeaderName::from_bytes(name.as_bytes()).ok()?, default.clone())
                    }
                };
                Some((t.name.clone(), tag))
            })
            .collect();
        Some(Arc::new(Self {
            exporter,
            propagation,
            zipkin_128bit,
            random: plan.random,
            overall: plan.overall,
            client: plan.client,
            tags,
            node_id: plan.node_id.clone(),
            upstream_cluster: key.replace('/', "_"),
            resource: plan.service_name.as_str().into(),
        }))
    }

    /// Starts the span of `req`: its context goes into the request's headers (sampled or not);
    /// `None` when there is nothing to export (not sampled), or when the caller's context does
    /// not parse (as Envoy, no span and no headers then).
    pub fn begin<B>(self: &Arc<Self>, req: &mut Request<B>, peer: SocketAddr) -> Option<Box<ActiveSpan>> {
        let parent = match self.propagation.extract(req.headers()) {
            Extracted::Invalid => return None,
            Extracted::Absent => None,
            Extracted::SamplingOnly(sampled) => Some((None, Some(sampled))),
            Extracted::Parent(parent) => {
                let sampled = parent.sampled;
                Some((Some(parent), sampled))
            }
        };
        let request_id = ensure_request_id(req.headers_mut());
        let (parent, caller_decision) = parent.unwrap_or((None, None));
        let sampled = caller_decision.unwrap_or_else(|| self.decide(req.headers(), request_id));
        let mut rng = rand::rng();
        let (trace_id, narrow) = match &parent {
            Some(p) => (p.trace_id, p.narrow),
            None if self.zipkin_128bit => (rng.random::<u128>() | 1, false),
            None => (u128::from(rng.random::<u64>() | 1), true),
        };
        // Zipkin: a root span's id is the trace id's low half, as Envoy's driver makes it.
        let span_id = match (&parent, self.propagation) {
            (None, Propagation::B3) => trace_id as u64,
            _ => rng.random::<u64>() | 1,
        };
        let parent_span_id = parent.as_ref().map(|p| p.span_id);
        let trace_state = parent.and_then(|p| p.trace_state);
        let outgoing =
            Outgoing { trace_id, narrow, span_id, parent_span_id, sampled, trace_state: trace_state.as_ref() };
        let start = SystemTime::now();
        let attributes = sampled.then(|| self.attributes(req, peer));
        self.propagation.inject(req.headers_mut(), &outgoing);
        let attributes = attributes?;
        let authority = authority(req);
        let name = match self.propagation {
            Propagation::W3c => format!("egress {authority}"),
            Propagation::B3 => authority.to_string(),
        };
        let span = Span { trace_id, narrow, span_id, parent_span_id, trace_state, name, start, attributes };
        Some(Box::new(ActiveSpan { tracer: self.clone(), span }))
    }

    /// Envoy's decision (`mutateTracingRequestHeader`): `x-client-trace-id` with client
    /// sampling, `x-envoy-force-trace`, else random sampling on the request id; then overall
    /// sampling on the same id.
    fn decide(&self, headers: &HeaderMap, request_id: u32) -> bool {
        let traced = if headers.contains_key(X_CLIENT_TRACE_ID) {
            rand::rng().random_range(0..100) < self.client
        } else {
            headers.contains_key(X_ENVOY_FORCE_TRACE) || request_id < self.random
        };
        traced && request_id < self.overall
    }

    /// Envoy's tags for an egress span, in its order, then the custom tags.
    fn attributes<B>(&self, req: &Request<B>, peer: SocketAddr) -> Vec<(Cow<'static, str>, String)> {
        let headers = req.headers();
        let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let dash = |name: &HeaderName| text(name).unwrap_or("-").to_string();
        let mut out: Vec<(Cow<'static, str>, String)> = Vec::with_capacity(16 + self.tags.len());
        let mut put = |key: &'static str, value: String| out.push((Cow::Borrowed(key), value));
        put("node_id", self.node_id.clone());
        if let Some(id) = text(&X_REQUEST_ID) {
            put("guid:x-request-id", id.to_string());
        }
        let path =
            text(&X_ENVOY_ORIGINAL_PATH).unwrap_or_else(|| req.uri().path_and_query().map_or("/", |p| p.as_str()));
        let path = &path[..floor_char_boundary(path, MAX_PATH_TAG)];
        put("http.url", format!("http://{}{path}", authority(req)));
        put("http.method", req.method().to_string());
        put("downstream_cluster", dash(&X_ENVOY_DOWNSTREAM_SERVICE_CLUSTER));
        put("user_agent", dash(&http::header::USER_AGENT));
        put("http.protocol", protocol(req.version()).to_string());
        put("peer.address", peer.ip().to_string());
        if let Some(id) = text(&X_CLIENT_TRACE_ID) {
            put("guid:x-client-trace-id", id.to_string());
        }
        if crate::grpc_wire::is_grpc(req.headers()) {
            put("grpc.path", req.uri().path().to_string());
            put("grpc.authority", authority(req).to_string());
            put("grpc.content_type", dash(&http::header::CONTENT_TYPE));
            put("grpc.timeout", dash(&GRPC_TIMEOUT));
        }
        put("component", "proxy".to_string());
        put("upstream_cluster", self.upstream_cluster.clone());
        put("upstream_cluster.name", self.upstream_cluster.clone());
        for (name, tag) in &self.tags {
            let value = match tag {
                Tag::Literal(value) => Some(value.clone()),
                Tag::Header(header, default) => text(header).map(str::to_string).or_else(|| default.clone()),
            };
            if let Some(value) = value {
                out.push((Cow::Owned(name.clone()), value));
            }
        }
        out
    }
}

impl ActiveSpan {
    /// Ends the span with what the access-log record says of the exchange, and queues it.
    pub fn finish(self, record: &Record) {
        let Self { tracer, mut span } = self;
        let status = record.status.unwrap_or(0);
        let mut put = |key: &'static str, value: String| span.attributes.push((Cow::Borrowed(key), value));
        put("request_size", record.bytes_sent.to_string());
        put("response_size", record.bytes_received.to_string());
        if let Some(endpoint) = &record.endpoint {
            put("upstream_address", endpoint.clone());
        }
        put("http.status_code", status.to_string());
        put("response_flags", response_flags(record).to_string());
        let error = status == 0 || status >= 500;
        if error {
            put("error", "true".to_string());
        }
        let end = span.start + record.duration;
        tracer.exporter.send(Finished { resource: tracer.resource.clone(), span, end, error });
    }
}

/// Envoy's names (`Http::Utility::getProtocolString`).
fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

fn authority<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())
        .unwrap_or("-")
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    (0..=max).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0)
}

/// The request's `x-request-id`, made (a UUIDv4, as Envoy makes it) when there is none; as
/// Envoy reads it for sampling: its first 8 hex digits, modulo 10,000.
fn ensure_request_id(headers: &mut HeaderMap) -> u32 {
    let from = |value: &HeaderValue| {
        let text = value.to_str().ok()?;
        u64::from_str_radix(text.get(..8)?, 16).ok().map(|n| (n % 10_000) as u32)
    };
    if let Some(n) = headers.get(X_REQUEST_ID).and_then(from) {
        return n;
    }
    let bytes: [u8; 16] = rand::rng().random();
    let mut hex = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        let b = match i {
            6 => (b & 0x0f) | 0x40, // version 4
            8 => (b & 0x3f) | 0x80, // RFC 4122 variant
            _ => *b,
        };
        if matches!(i, 4 | 6 | 8 | 10) {
            hex.push('-');
        }
        hex.push_str(&format!("{b:02x}"));
    }
    let value = HeaderValue::from_str(&hex).unwrap_or(HeaderValue::from_static("-"));
    let n = from(&value).unwrap_or(0);
    headers.insert(X_REQUEST_ID, value);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::trace::{TagPlan, TracePlan};

    fn tracer(random: u32, overall: u32, client: u32) -> Arc<Tracer> {
        let plan = TracePlan {
            // Nothing listens there: these tests never finish a span.
            backend: TraceTarget::Otlp("127.0.0.1:9".into()),
            random,
            overall,
            client,
            tags: vec![TagPlan { name: "t".into(), value: TagValue::Header { name: "x-t".into(), default: None } }],
            service_name: "web".into(),
            node_id: "default.web-1".into(),
        };
        Tracer::start("default/api", &plan).unwrap()
    }

    fn request(headers: &[(&'static str, &'static str)]) -> Request<()> {
        let mut req = Request::post("http://api.test/pkg.Svc/Call").version(http::Version::HTTP_2);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap()
    }

    const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 40000);

    #[test]
    fn sampling_follows_envoys_decision() {
        // x-request-id 0x1388 % 10000 = 5000.
        let id = ("x-request-id", "00001388-0000-4000-8000-000000000000");
        let decide = |t: &Arc<Tracer>, extra: &[(&'static str, &'static str)]| {
            let mut headers = vec![id];
            headers.extend_from_slice(extra);
            let mut req = request(&headers);
            let sampled = t.begin(&mut req, PEER).is_some();
            (sampled, req.headers()["traceparent"].to_str().unwrap().ends_with("-01"))
        };
        assert_eq!(decide(&tracer(5001, 10_000, 100), &[]), (true, true), "5000 < 50.01 %");
        assert_eq!(decide(&tracer(5000, 10_000, 100), &[]), (false, false), "5000 is not < 50 %");
        assert_eq!(decide(&tracer(0, 10_000, 100), &[("x-client-trace-id", "c")]), (true, true));
        assert_eq!(decide(&tracer(0, 10_000, 0), &[("x-client-trace-id", "c")]), (false, false));
        assert_eq!(decide(&tracer(0, 10_000, 0), &[("x-envoy-force-trace", "1")]), (true, true));
        assert_eq!(decide(&tracer(10_000, 5000, 100), &[]), (false, false), "overall cuts on the same id");
        // The caller's sampled flag wins.
        let parent = ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(decide(&tracer(0, 0, 0), &[parent]), (true, true));
    }

    #[test]
    fn grpc_requests_get_envoys_grpc_tags() {
        let mut req = request(&[("content-type", "application/grpc"), ("grpc-timeout", "5S"), ("x-t", "v")]);
        let span = tracer(10_000, 10_000, 100).begin(&mut req, PEER).unwrap();
        let get = |k: &str| span.span.attributes.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("http.protocol"), Some("HTTP/2"));
        assert_eq!(get("grpc.path"), Some("/pkg.Svc/Call"));
        assert_eq!(get("grpc.authority"), Some("api.test"));
        assert_eq!(get("grpc.timeout"), Some("5S"));
        assert_eq!(get("upstream_cluster"), Some("default_api"));
        assert_eq!(get("t"), Some("v"));
        assert_eq!(span.span.name, "egress api.test");
        assert!(req.headers().contains_key("x-request-id"));
    }

    #[test]
    fn a_made_request_id_is_a_uuid_v4() {
        let mut headers = HeaderMap::new();
        let n = ensure_request_id(&mut headers);
        let id = headers[X_REQUEST_ID].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(n < 10_000);
        // An existing id is kept and read.
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("00002710-0000-4000-8000-000000000000"));
        assert_eq!(ensure_request_id(&mut headers), 0); // 0x2710 = 10,000
        assert_eq!(headers[X_REQUEST_ID], "00002710-0000-4000-8000-000000000000");
    }

    #[test]
    fn the_path_tag_is_cut_on_a_char_boundary() {
        let path = "é".repeat(200);
        let cut = floor_char_boundary(&path, MAX_PATH_TAG);
        assert!(cut <= MAX_PATH_TAG && path.is_char_boundary(cut));
    }
}
