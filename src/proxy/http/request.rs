//! The phases of one HTTP request, with one [`RequestCtx`]: **route** (the service in the
//! snapshot current when the request arrives) → **admit** → **forward** ([`super::forward`]) →
//! **log** (metrics, the access-log record and the MeshTrace span, which wait for the response
//! body to end).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use tokio::time::Instant;

use super::body::{PendingLog, ProxyBody};
use super::grpc::{grpc_timeout, is_grpc};
use super::reply::{self, Failure};
use super::routing::{self, MatchedRule, Routed};
use super::{forward, HttpProxy};
use crate::access_log::{Headers, Logs, Record, ServiceLog};
use crate::catalog::Protocol;
use crate::live::Route;
use crate::policy::runtime::{timeout_over, RetryPolicy, RouteLevel};
use crate::proxy::admit::admit;
use crate::upstream::{AppBody, BodyEnd};

/// One request as it passes the phases.
pub(super) struct RequestCtx {
    /// The service the request goes to, with its policies as its configuration set them: its
    /// endpoints, TLS, pool, limits, outlier detection and `maxStreamDuration` (Envoy's cluster).
    pub route: Route,
    /// The service the application dialled, when a MeshHTTPRoute sent the request to another:
    /// its request timeout, stream idle timeout, retries, access log and tracing apply, as Kuma
    /// configures them on the dialled service's listener and routes.
    pub dialled: Option<Route>,
    /// What `to: MeshHTTPRoute` policy items set for the matched rule's route: over the
    /// dialled service's request timeout, stream idle timeout and retries.
    pub rule_level: Option<Arc<RouteLevel>>,
    /// gRPC by the service's protocol or the request's content type: failures are answered
    /// with a gRPC status.
    pub grpc: bool,
    /// The stream's deadline, the sooner of the gRPC one (`grpc-timeout`) and MeshTimeout
    /// `http.maxStreamDuration`: the response is cut when it passes.
    pub deadline: Option<Instant>,
    /// Time allowed from the end of the request body until the response headers arrive
    /// (MeshTimeout `http.requestTimeout`, else `--request-timeout`); the deadline, if sooner,
    /// applies as well.
    pub request_timeout: Option<Duration>,
    /// MeshTimeout `http.streamIdleTimeout`, else `--stream-idle-timeout`, counted from the
    /// response head; `None`: off.
    pub stream_idle: Option<Duration>,
    pub started: Instant,
    /// Set when a timeout gives up the attempt in flight, before it is dropped: the attempt
    /// then counts a local-origin failure against its endpoint ([`super::forward`]).
    pub timed_out: AtomicBool,
    /// How far the request body has come, for the timeouts that count from its end; `None`: it
    /// had all arrived with the head, or no timeout counts from it.
    pub body_end: Option<Arc<BodyEnd>>,
    /// Boxed: only there when the access log or a sampled span is on.
    pub log: Option<Box<PendingLog>>,
}

impl RequestCtx {
    /// The context of a request to `route`, sent there by the MeshHTTPRoute rule `matched`.
    fn new(route: Route, matched: Option<&MatchedRule>, req: &mut Request<AppBody>, proxy: &HttpProxy) -> Self {
        let dialled = matched.and_then(|m| m.dialled_if_not(&route));
        let rule_level = matched.and_then(MatchedRule::policies);
        let started = Instant::now();
        // The dialled service's listener settings (or its route's), the target's cluster settings.
        let policy = &dialled.as_ref().unwrap_or(&route).policy;
        let rule_timeouts = rule_level.as_ref().and_then(|l| l.timeouts.as_ref());
        let timeouts = rule_timeouts.unwrap_or(&policy.timeouts);
        let grpc = route.service.protocol == Protocol::Grpc || is_grpc(req.headers());
        let grpc_deadline = if grpc { grpc_timeout(req.headers()) } else { None };
        let stream_limit = sooner(grpc_deadline, timeout_over(route.policy.timeouts.max_stream, None));
        let request_timeout = timeout_over(timeouts.request, proxy.request_timeout);
        // A route's conf always sets the request timeout (its own, else the default), its stream
        // idle timeout only when it has one (Kuma's `ConfigureRouteAction`): else the service's.
        let stream_idle = timeouts.stream_idle.or(policy.timeouts.stream_idle);
        let stream_idle = Some(stream_idle.unwrap_or(proxy.stream_idle)).filter(|d| !d.is_zero());
        let service_log = matched.and_then(MatchedRule::access_log).unwrap_or_else(|| policy.access_log.clone());
        let logs = Logs { global: proxy.access_log.clone(), service: service_log };
        // MeshTrace: the context goes into the request now, before it is forwarded.
        let span = policy.tracer.as_ref().and_then(|tracer| tracer.begin(req, proxy.peer));
        let log = (logs.is_on() || span.is_some()).then(|| {
            let headers = logs.service.as_ref().map(|service| capture_request(req, service));
            Box::new(PendingLog {
                log: logs,
                span,
                record: Record {
                    headers,
                    ..Record::http(route.upstream.service().clone(), route.service.protocol.as_str(), proxy.peer, req)
                },
                started,
                sent: Arc::new(AtomicU64::new(0)),
            })
        });
        let deadline = stream_limit.map(|d| started + d);
        let timed_out = AtomicBool::new(false);
        Self {
            route,
            dialled,
            rule_level,
            grpc,
            deadline,
            request_timeout,
            stream_idle,
            started,
            timed_out,
            body_end: None,
            log,
        }
    }

    /// Before forwarding: watches the request body's end when a timeout counts from it, the
    /// stream idle timeout bounds it, or an outlier detector counts timeouts (only once the body
    /// is complete).
    fn watch_body(&mut self, req: &mut Request<AppBody>) {
        let counts_timeouts = matches!(self.route.policy.outlier, crate::policy::runtime::Outlier::Detect(_));
        let per_try = self.retry().is_some_and(|r| r.per_try_timeout.is_some());
        if counts_timeouts || per_try || self.request_timeout.is_some() || self.stream_idle.is_some() {
            self.body_end = req.body_mut().end_watch();
        }
    }

    /// The retry policy: the matched rule's route's, else the dialled service's, as Kuma sets
    /// them on the routes of that service's listener.
    pub(super) fn retry(&self) -> Option<&RetryPolicy> {
        let rule = self.rule_level.as_ref().and_then(|l| l.retry.as_deref());
        rule.or_else(|| self.dialled.as_ref().unwrap_or(&self.route).policy.retry.as_deref())
    }

    /// The request body's byte counter for the access log, when it is on.
    pub(super) fn sent_counter(&self) -> Option<Arc<AtomicU64>> {
        self.log.as_ref().map(|l| l.sent.clone())
    }

    /// The log phase: counts the request and hands the access-log record to the response body
    /// (written when the body ends) or writes it now for a local reply.
    fn log(mut self, response: &mut Response<ProxyBody>) {
        let status = response.status().as_u16();
        let metrics = &self.route.upstream.metrics;
        metrics.request(status);
        metrics.request_duration.observe(self.started.elapsed().as_secs_f64());
        if let Some(mut pending) = self.log.take() {
            pending.record.time = SystemTime::now();
            pending.record.status = Some(status);
            if let Some(service) = pending.log.service.as_ref() {
                capture_response(&mut pending.record, service, response);
            }
            match response.body_mut() {
                ProxyBody::Upstream(body) => body.log = Some(pending),
                ProxyBody::Local(_, failure) => {
                    pending.record.flag = failure.map(|f| f.flag());
                    let outcome = if failure.is_some() { "local_reply" } else { "ok" };
                    pending.finish(outcome, 0);
                }
                ProxyBody::Passthrough(_) => pending.finish("local_reply", 0),
            }
        }
    }
}

/// A request whose application went away before its response began (hyper drops the request's
/// future) still gets its access-log line, as from Envoy: no status, flag DC.
impl Drop for RequestCtx {
    fn drop(&mut self) {
        if let Some(pending) = self.log.take() {
            pending.finish("cancelled", 0);
        }
    }
}

/// The response headers `log`'s formats read, into a record that captured its request's.
pub(super) fn capture_response(record: &mut Record, log: &ServiceLog, response: &Response<ProxyBody>) {
    let Some(headers) = record.headers.as_mut() else { return };
    for name in &log.response_headers {
        if let Some(value) = response.headers().get(name).and_then(|v| v.to_str().ok()) {
            headers.response.insert(name.as_str().to_string(), value.to_string());
        }
    }
}

/// The request headers `log`'s formats read, and the pseudo-headers.
pub(super) fn capture_request(req: &Request<AppBody>, log: &ServiceLog) -> Box<Headers> {
    let mut headers = Headers::default();
    let uri = req.uri();
    headers.request.insert(":method".into(), req.method().to_string());
    headers.request.insert(":path".into(), uri.path_and_query().map_or("/", |p| p.as_str()).to_string());
    let authority =
        uri.authority().map(|a| a.as_str()).or_else(|| req.headers().get(http::header::HOST)?.to_str().ok());
    if let Some(authority) = authority {
        headers.request.insert(":authority".into(), authority.to_string());
    }
    for name in &log.request_headers {
        if let Some(value) = req.headers().get(name).and_then(|v| v.to_str().ok()) {
            headers.request.insert(name.as_str().to_string(), value.to_string());
        }
    }
    Box::new(headers)
}

fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl HttpProxy {
    /// A request on a connection whose service a reload removed: 503 with Envoy's NC, and its
    /// line in `--access-log` (the service's own MeshAccessLog went with it).
    fn service_gone(&self, req: &Request<AppBody>) -> Response<ProxyBody> {
        let response = reply::local_reply(is_grpc(req.headers()), Failure::NoCluster, reply::NOT_CONFIGURED);
        if let Some(log) = &self.access_log {
            let (service, protocol) = &self.accepted_for;
            let mut record = Record::http(service.clone(), protocol, self.peer, req);
            record.status = Some(response.status().as_u16());
            record.flag = Some(Failure::NoCluster.flag());
            record.outcome = "local_reply";
            log.log(Arc::new(record));
        }
        response
    }

    pub(super) async fn phases(&self, mut req: Request<AppBody>) -> Response<ProxyBody> {
        let snapshot = self.live.load();
        let Some(route) = snapshot.route(self.key) else {
            return self.service_gone(&req);
        };
        super::rewrite::normalize_path(req.uri_mut());
        // MeshHTTPRoute: the rule may send the request to another service, or answer it.
        let grpc = is_grpc(req.headers());
        let (route, mut matched) = match routing::route(&snapshot, route, &mut req, grpc) {
            Routed::Forward(route, matched) => (route, matched),
            Routed::Reply(route, response, matched) => {
                let mut response = *response;
                RequestCtx::new(route, Some(&matched), &mut req, self).log(&mut response);
                return response;
            }
        };
        drop(snapshot);
        let mut ctx = RequestCtx::new(route, matched.as_ref(), &mut req, self);
        let mut response = match admit(&ctx.route.service) {
            Ok(()) => {
                if let Some(mirror) = matched.as_mut().and_then(|m| m.mirror.take()) {
                    mirror.send();
                }
                ctx.watch_body(&mut req);
                forward::forward(&ctx, req, self).await
            }
            Err(denial) => reply::denied(ctx.grpc, denial),
        };
        if let Some(matched) = matched {
            matched.apply(&mut response);
        }
        ctx.log(&mut response);
        response
    }
}
