//! The route phase's MeshHTTPRoute step: the first matching rule (in Kuma's order) of the
//! service the application dialled decides where the request goes (a weighted backend, or the
//! service itself), what changes on the way (headers, host, path) and whether it is answered
//! with a redirect instead. A service without routes skips all of it.

use http::header::{HeaderName, HeaderValue, HOST, LOCATION};
use http::{Request, Response, StatusCode, Uri};

use super::body::ProxyBody;
use super::reply::{self, Failure};
use crate::live::{Route, Snapshot};
use crate::metrics::metrics;
use crate::policy::routes::{pick, HttpRule, Mirror, PathChange, Redirect};
use crate::upstream::pool::MIRROR_QUEUE;
use crate::upstream::AppBody;
use hyper::body::Body as _;
use rand::Rng as _;

/// What the route step decided.
pub(super) enum Routed {
    /// Forward to this route; `rule` is kept for the response's header changes.
    Forward(Route, Option<MatchedRule>),
    /// Answer at once (a redirect, or no usable backend); the route is the service dialled,
    /// whose access log (or its rule's route's) and metrics count the reply.
    Reply(Route, Box<Response<ProxyBody>>, MatchedRule),
}

/// The rule a request matched, held for the response side.
pub(super) struct MatchedRule {
    route: Route,
    rule: usize,
    /// Its RequestMirror's copy, sent only once the request itself is admitted.
    pub(super) mirror: Option<Box<PendingMirror>>,
}

impl MatchedRule {
    /// What `to: MeshHTTPRoute` policy items set for the rule's route.
    pub(super) fn policies(&self) -> Option<std::sync::Arc<crate::policy::runtime::RouteLevel>> {
        self.rule()?.policies.clone()
    }

    /// The access log of the rule's route, when a MeshAccessLog names it: `Some(None)` when its
    /// conf has no backend (the route's requests are not logged); `None`: the service's applies.
    pub(super) fn access_log(&self) -> Option<Option<std::sync::Arc<crate::access_log::ServiceLog>>> {
        self.rule()?.policies.as_ref()?.access_log.as_ref()?;
        Some(self.route.policy.rule_access_logs.get(self.rule).cloned().flatten())
    }

    fn rule(&self) -> Option<&HttpRule> {
        self.route.service.routes.as_ref()?.http.as_ref()?.rules.get(self.rule)
    }

    /// The service the application dialled, when the rule sent the request to another.
    pub(super) fn dialled_if_not(&self, target: &Route) -> Option<Route> {
        (!std::sync::Arc::ptr_eq(&self.route.service, &target.service)).then(|| self.route.clone())
    }

    /// Applies the rule's ResponseHeaderModifier.
    pub(super) fn apply(&self, response: &mut Response<ProxyBody>) {
        if let Some(ops) = self.rule().and_then(|r| r.response_headers.as_ref()) {
            ops.apply(response.headers_mut());
        }
    }
}

pub(super) fn route(snapshot: &Snapshot, route: Route, req: &mut Request<AppBody>, grpc: bool) -> Routed {
    let Some(table) = route.service.routes.as_ref().and_then(|r| r.http.as_ref()) else {
        return Routed::Forward(route, None);
    };
    let uri = req.uri();
    let Some((matched, rule)) = table.find(req.method(), uri.path(), uri.query(), req.headers()) else {
        return Routed::Forward(route, None);
    };
    let prefix = matched.prefix().map(str::to_string);
    let rule_index = matched.rule;
    if let Some(redirect) = &rule.redirect {
        count(&route, rule_index, rule, None, || "redirect".to_string());
        let reply = redirect_reply(redirect, req, prefix.as_deref());
        let matched = MatchedRule { route: route.clone(), rule: rule_index, mirror: None };
        return Routed::Reply(route, Box::new(reply), matched);
    }
    if let Some(ops) = &rule.request_headers {
        ops.apply(req.headers_mut());
    }
    if let Some(rewrite) = &rule.rewrite {
        if let Some(host) = rewrite.hostname.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
            req.headers_mut().insert(HOST, host);
        }
        if let Some(change) = &rewrite.path {
            rewrite_path(req, change, prefix.as_deref());
        }
    }
    let mirror = rule.mirror.as_ref().and_then(|mirror| mirror_request(snapshot, mirror, req));
    let matched = MatchedRule { route: route.clone(), rule: rule_index, mirror };
    if rule.backends.is_empty() {
        count(&route, rule_index, rule, None, || route.service.key());
        return Routed::Forward(route, Some(matched));
    }
    let Some((position, backend)) = pick(&rule.backends) else {
        let reply =
            reply::local_reply(grpc, Failure::NoHealthyUpstream, "no backend of the matched route can take traffic");
        return Routed::Reply(route, Box::new(reply), matched);
    };
    match backend.service.and_then(|i| snapshot.route_by_index(i)) {
        Some(target) => {
            count(&route, rule_index, rule, Some(position), || target.service.key());
            Routed::Forward(target, Some(matched))
        }
        None => {
            let reply = reply::local_reply(grpc, Failure::NoCluster, "the route's backend is not configured");
            Routed::Reply(route, Box::new(reply), matched)
        }
    }
}

fn count(route: &Route, index: usize, rule: &HttpRule, backend: Option<usize>, key: impl FnOnce() -> String) {
    route.rule_counters.count(index, backend, || [route.service.key(), rule.name.clone(), key()]);
}

/// The request's path and query before a URLRewrite changed them, as Envoy's router passes it on.
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

fn rewrite_path(req: &mut Request<AppBody>, change: &PathChange, prefix: Option<&str>) {
    let uri = req.uri();
    let path_and_query = change.apply(uri.path(), uri.query(), prefix);
    let original = uri.path_and_query().and_then(|pq| HeaderValue::from_str(pq.as_str()).ok());
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new) = Uri::from_parts(parts) {
            *req.uri_mut() = new;
            if let Some(original) = original {
                req.headers_mut().insert(X_ENVOY_ORIGINAL_PATH, original);
            }
        }
    }
}

/// The redirect's `Location`: each part from the filter when it sets it, else the request's.
fn redirect_reply(redirect: &Redirect, req: &Request<AppBody>, prefix: Option<&str>) -> Response<ProxyBody> {
    let uri = req.uri();
    let authority = uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_string));
    let (request_host, request_port) = match authority.as_deref().map(|a| a.rsplit_once(':')) {
        Some(Some((host, port))) if port.parse::<u16>().is_ok() => (host.to_string(), port.parse().ok()),
        _ => (authority.unwrap_or_default(), None),
    };
    let request_scheme = uri.scheme_str().unwrap_or("http");
    let scheme = redirect.scheme.clone().unwrap_or_else(|| request_scheme.to_string());
    let is_default = |scheme: &str, port: u16| matches!((scheme, port), ("http", 80) | ("https", 443));
    // As Envoy's `newUri`: a new hostname takes no port from the request; the request's host
    // keeps its port unless a port is set, or the scheme changes and the port was the old
    // scheme's default. Default ports are left out (Gateway API).
    let (host, request_port) = match redirect.hostname.clone() {
        Some(host) => (host, None),
        None => {
            let dropped = |p: &u16| scheme != request_scheme && is_default(request_scheme, *p);
            (request_host, request_port.filter(|p| !dropped(p)))
        }
    };
    let port = redirect.port.or(request_port).filter(|&p| !is_default(&scheme, p));
    let path_and_query = match &redirect.path {
        Some(change) => change.apply(uri.path(), uri.query(), prefix),
        None => uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string()),
    };
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{path_and_query}"),
        None => format!("{scheme}://{host}{path_and_query}"),
    };
    let mut response = Response::new(ProxyBody::empty());
    *response.status_mut() = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// RequestMirror: a copy of the request goes to the mirror service on a task of its own; its
/// answer is dropped and nothing about it reaches the application. A body is copied frame by
/// frame as the primary sends it (a [`MirrorTee`] for the forward phase); a mirror that falls
/// behind loses its copy, and never slows the primary.
fn mirror_request(snapshot: &Snapshot, mirror: &Mirror, req: &mut Request<AppBody>) -> Option<Box<PendingMirror>> {
    if rand::rng().random_range(0.0..100.0) >= mirror.percentage {
        return None;
    }
    let route = mirror.backend.service.and_then(|i| snapshot.route_by_index(i))?;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = req.method().clone();
    parts.uri = req.uri().clone();
    parts.version = req.version();
    parts.headers = req.headers().clone();
    let body = if req.body().is_end_stream() {
        None
    } else {
        // One more slot than frames: the last is kept for the end.
        let (sender, receiver) = tokio::sync::mpsc::channel(MIRROR_QUEUE + 1);
        req.extensions_mut().insert(MirrorTee(sender));
        Some(receiver)
    };
    Some(Box::new(PendingMirror { route, parts, body }))
}

/// A RequestMirror copy, to send once the request itself is admitted.
pub(super) struct PendingMirror {
    route: Route,
    parts: http::request::Parts,
    body: Option<tokio::sync::mpsc::Receiver<crate::upstream::pool::Copied>>,
}

impl PendingMirror {
    /// Sends the copy on a task of its own, if the mirror's service is admitted too: a broken
    /// one (no TLS client: the copy would go in clear), or one the mesh or a
    /// MeshTrafficPermission refuses, gets nothing.
    pub(super) fn send(self) {
        let Self { route, parts, body } = self;
        if crate::proxy::admit::admit(&route.service).is_err() {
            return;
        }
        tokio::spawn(async move {
            let sent = tokio::time::timeout(MIRROR_TIMEOUT, super::forward::send_copy(&route, parts, body)).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!(service = %route.service.key(), "mirrored request failed");
            }
            metrics().route_request(&route.service.key(), "mirror", &route.service.key());
        });
    }
}

/// The mirror's end of a request body copy, carried in the request's extensions.
#[derive(Clone)]
pub(super) struct MirrorTee(pub tokio::sync::mpsc::Sender<crate::upstream::pool::Copied>);

/// How long a mirrored request may take before it is abandoned.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
