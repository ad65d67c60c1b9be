//! MeshHTTPRoute and MeshTCPRoute per service: the routes whose top-level targetRef selects this
//! sidecar and whose `to` item names the service, merged as Kuma merges them (HTTP rules keyed
//! by their whole `matches`, defaults merged by RFC 7396 in precedence order; TCP `rules[0]`),
//! then compiled into a table the data path evaluates per request (HTTP) or connection (TCP).
//!
//! Pure: backends are left as references; the catalog resolves them to its services.

use http::{HeaderMap, Method};
use rand::Rng as _;
use serde::Serialize;

use super::runtime::HeaderMatcher;
use super::{rank, selects_service, Ignored, Proxies, Rank, Target};
use crate::resources::policy::TargetRef;
use crate::resources::route::{
    BackendRef, Filter, HeaderModifier, HttpMatch, HttpRuleConf, PathRewrite, Route, RouteKind, TcpRuleConf,
};
use crate::resources::{Diagnostic, Diagnostics, Kind, Origin, Resource, LABEL_DISPLAY_NAME, LABEL_NAMESPACE};

/// A backend of a rule: a MeshExternalService reference, resolved by the catalog.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    #[serde(rename = "ref")]
    pub reference: BackendRef,
    pub weight: u32,
    /// The catalog index of the service, once resolved; `None`: it names nothing usable.
    #[serde(skip)]
    pub service: Option<usize>,
}

/// One compiled HTTP rule.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRule {
    /// `policy rules[j]`, for metrics and inspect.
    pub name: String,
    /// The MeshHTTPRoute the rule is named after (the strongest that has its `matches`): what
    /// `to: MeshHTTPRoute` policy items name.
    #[serde(skip)]
    pub route: RouteId,
    /// What `to: MeshHTTPRoute` items of MeshTimeout and MeshRetry set for this rule's requests.
    #[serde(skip)]
    pub policies: Option<std::sync::Arc<super::runtime::RouteLevel>>,
    pub matches: Vec<HttpMatch>,
    /// Empty: the targeted service itself.
    pub backends: Vec<Backend>,
    #[serde(skip)]
    pub request_headers: Option<HeaderOps>,
    #[serde(skip)]
    pub response_headers: Option<HeaderOps>,
    #[serde(skip)]
    pub redirect: Option<Redirect>,
    #[serde(skip)]
    pub rewrite: Option<Rewrite>,
    /// RequestMirror: a copy of a share of the requests goes to another service.
    #[serde(skip)]
    pub mirror: Option<Mirror>,
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub backend: Backend,
    /// Share of requests mirrored, 0–100.
    pub percentage: f64,
}

/// `set`, `add` and `remove` of a header modifier.
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
    pub remove: Vec<http::HeaderName>,
}

impl HeaderOps {
    fn compile(m: &HeaderModifier) -> Self {
        let pairs = |list: &Option<Vec<crate::resources::policy::HeaderKeyValue>>| {
            list.iter()
                .flatten()
                .filter_map(|h| {
                    Some((
                        http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
                        http::HeaderValue::from_str(&h.value).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            set: pairs(&m.set),
            add: pairs(&m.add),
            remove: m.remove.iter().flatten().filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok()).collect(),
        }
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathChange>,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathChange>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PathChange {
    Full(String),
    /// Replace the prefix the request matched.
    Prefix(String),
}

impl PathChange {
    fn compile(p: &PathRewrite) -> Option<Self> {
        match p.type_.as_str() {
            "ReplaceFullPath" => p.replace_full_path.clone().map(Self::Full),
            "ReplacePrefixMatch" => p.replace_prefix_match.clone().map(Self::Prefix),
            _ => None,
        }
    }

    /// The new path (query kept) for `path?query`, whose matched prefix is `prefix`.
    pub fn apply(&self, path: &str, query: Option<&str>, prefix: Option<&str>) -> String {
        let new_path = match self {
            Self::Full(full) => full.clone(),
            Self::Prefix(replacement) => {
                let rest = prefix.and_then(|p| path.strip_prefix(p.trim_end_matches('/'))).unwrap_or(path);
                // `/prefix` + `/rest`, without doubling or losing the `/` between them.
                match (replacement.trim_end_matches('/'), rest) {
                    ("", "") => "/".to_string(),
                    (base, "") => base.to_string(),
                    (base, rest) if rest.starts_with('/') => format!("{base}{rest}"),
                    (base, rest) => format!("{base}/{rest}"),
                }
            }
        };
        match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        }
    }
}

/// One `matches` item, compiled, pointing at its rule; the table keeps them in Kuma's order.
#[derive(Debug, Clone)]
pub struct CompiledMatch {
    path: Option<PathTest>,
    method: Option<Method>,
    headers: Vec<HeaderMatcher>,
    query: Vec<(String, QueryTest)>,
    pub rule: usize,
}

#[derive(Debug, Clone)]
enum PathTest {
    Exact(String),
    /// `/`-separated prefix (Envoy: `path "/x"` or `prefix "/x/"`).
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
enum QueryTest {
    Exact(String),
    Regex(regex::Regex),
}

impl CompiledMatch {
    fn matches(&self, method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathTest::Exact(p)) => path == p,
            Some(PathTest::Prefix(p)) if p == "/" => true,
            Some(PathTest::Prefix(p)) => {
                path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(PathTest::Regex(re)) => re.is_match(path),
        };
        path_ok
            && self.method.as_ref().map_or(true, |want| want == method)
            && self.headers.iter().all(|h| h.matches(headers))
            && self.query.iter().all(|(name, test)| {
                let value = query.and_then(|q| {
                    q.split('&').find_map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        (k == name).then_some(v)
                    })
                });
                match (test, value) {
                    (QueryTest::Exact(want), Some(v)) => v == want,
                    (QueryTest::Regex(re), Some(v)) => re.is_match(v),
                    (_, None) => false,
                }
            })
    }

    /// The matched prefix, for `ReplacePrefixMatch`.
    pub fn prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathTest::Prefix(p)) => Some(p),
            _ => None,
        }
    }
}

/// A service's HTTP routes.
#[derive(Debug, Clone, Default)]
pub struct HttpRouteTable {
    pub rules: Vec<HttpRule>,
    matches: Vec<CompiledMatch>,
}

impl HttpRouteTable {
    /// The first match (in Kuma's order) of a request, with its rule; `None`: the service itself.
    pub fn find(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<(&CompiledMatch, &HttpRule)> {
        let m = self.matches.iter().find(|m| m.matches(method, path, query, headers))?;
        Some((m, self.rules.get(m.rule)?))
    }

    /// Every backend, mirrors included (for the catalog to resolve).
    pub fn backends_mut(&mut self) -> impl Iterator<Item = &mut Backend> {
        self.rules.iter_mut().flat_map(|r| r.backends.iter_mut().chain(r.mirror.as_mut().map(|m| &mut m.backend)))
    }
}

/// A service's TCP route: connections are split across the backends.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TcpRoute {
    pub name: String,
    pub backends: Vec<Backend>,
}

/// Routes for one service.
#[derive(Debug, Clone, Default)]
pub struct ServiceRoutes {
    pub http: Option<HttpRouteTable>,
    pub tcp: Option<TcpRoute>,
}

/// What names a MeshHTTPRoute in a policy's `to` item: its mesh and name (`policy`,
/// `mesh/name`), namespace, `kuma.io/display-name` and labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteId {
    pub policy: String,
    pub namespace: Option<String>,
    pub display_name: Option<String>,
    pub labels: crate::resources::kinds::Labels,
}

/// One `to` item of a selected route.
#[derive(Debug)]
struct RouteEntry {
    kind: RouteKind,
    mesh: String,
    /// Its route's `mesh/name`, namespace and the rest a policy item may name it by.
    id: RouteId,
    target_ref: TargetRef,
    rules: Vec<crate::resources::route::RouteRule>,
    rank: Rank,
    origin: Origin,
}

/// Every selected route, sorted lowest precedence first.
#[derive(Debug, Default)]
pub struct RouteSet {
    entries: Vec<RouteEntry>,
    pub ignored: Vec<Ignored>,
}

impl RouteSet {
    /// The routes in `resources` that select this sidecar (`proxies`: its Dataplanes).
    pub(super) fn new(resources: &[Resource], proxies: &Proxies) -> Self {
        let mut set = Self::default();
        for r in resources {
            let Kind::Route(Route { kind, spec }) = &r.kind else { continue };
            let policy = format!("{}/{}", r.meta.mesh, r.meta.name);
            let namespace = r.meta.labels.get(LABEL_NAMESPACE).cloned();
            let top = spec.target_ref.clone().unwrap_or_else(TargetRef::mesh);
            let to = spec.to.iter().flatten().map(|to| &to.target_ref);
            let role = crate::resources::policy::Role::of(&r.meta, to);
            if let Some(reason) = proxies.why_not_selected(&r.meta.mesh, namespace.as_deref(), &top, role) {
                set.ignored.push(Ignored { kind: kind.as_str(), policy, reason });
                continue;
            }
            let id = RouteId {
                policy,
                namespace,
                display_name: r.meta.labels.get(LABEL_DISPLAY_NAME).cloned(),
                labels: r.meta.labels.clone(),
            };
            for to in spec.to.iter().flatten() {
                set.entries.push(RouteEntry {
                    id: id.clone(),
                    kind: *kind,
                    mesh: r.meta.mesh.clone(),
                    target_ref: to.target_ref.clone(),
                    rules: to.rules.clone(),
                    rank: rank(&r.meta, role, &top, &to.target_ref),
                    origin: r.meta.origin.clone(),
                });
            }
        }
        set.entries.sort_by(|a, b| a.rank.cmp(&b.rank));
        set
    }

    /// The routes of `service`; `http_based` services take HTTP routes, and their TCP route
    /// only when they have no HTTP route (as Kuma).
    pub fn for_service(&self, service: &Target<'_>, http_based: bool, diagnostics: &mut Diagnostics) -> ServiceRoutes {
        let relevant = |kind: RouteKind| {
            self.entries.iter().filter(move |e| {
                e.kind == kind
                    && e.mesh == service.mesh
                    && e.target_ref.kind == "MeshExternalService"
                    && selects_service(&e.target_ref, e.id.namespace.as_deref(), service)
            })
        };
        let mut routes = ServiceRoutes::default();
        if http_based {
            // Rules keyed by their whole `matches`, placed where the highest-precedence route
            // that has the key puts it (Kuma's reverse, merge by key, reverse: ties in match
            // order go to the stronger route), their defaults merged lowest precedence first.
            let entries: Vec<&RouteEntry> = relevant(RouteKind::MeshHTTPRoute).collect();
            let mut merged: Vec<MergedRule> = Vec::new();
            for e in entries.iter().rev() {
                for rule in &e.rules {
                    let matches = rule.matches.clone().unwrap_or_default();
                    if !merged.iter().any(|m| m.matches == matches) {
                        merged.push(MergedRule {
                            matches,
                            default: serde_json::Value::Object(Default::default()),
                            name: String::new(),
                            route: e.id.clone(),
                            origin: e.origin.clone(),
                        });
                    }
                }
            }
            for e in &entries {
                for (j, rule) in e.rules.iter().enumerate() {
                    let matches = rule.matches.clone().unwrap_or_default();
                    if let Some(m) = merged.iter_mut().find(|m| m.matches == matches) {
                        json_patch::merge(&mut m.default, &rule.default);
                        m.name = format!("{} rules[{j}]", e.id.policy);
                        m.route = e.id.clone();
                    }
                }
            }
            if !merged.is_empty() {
                routes.http = Some(compile_http(merged, diagnostics));
            }
        }
        if routes.http.is_none() {
            let mut tcp: Option<(serde_json::Value, String)> = None;
            for e in relevant(RouteKind::MeshTCPRoute) {
                if let Some(rule) = e.rules.first() {
                    let slot =
                        tcp.get_or_insert_with(|| (serde_json::Value::Object(Default::default()), String::new()));
                    json_patch::merge(&mut slot.0, &rule.default);
                    slot.1 = format!("{} rules[0]", e.id.policy);
                }
            }
            if let Some((default, name)) = tcp {
                let conf: TcpRuleConf = serde_json::from_value(default).unwrap_or_default();
                routes.tcp = Some(TcpRoute { name, backends: backends(conf.backend_refs.as_deref()) });
            }
        }
        routes
    }
}

/// A weighted random backend among the resolved ones with a weight above 0, and its position.
pub fn pick(backends: &[Backend]) -> Option<(usize, &Backend)> {
    let usable = || backends.iter().enumerate().filter(|(_, b)| b.weight > 0 && b.service.is_some());
    let total: u64 = usable().map(|(_, b)| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = rand::rng().random_range(0..total);
    usable().find(|(_, b)| {
        let w = u64::from(b.weight);
        if at < w {
            true
        } else {
            at -= w;
            false
        }
    })
}

fn backends(refs: Option<&[BackendRef]>) -> Vec<Backend> {
    refs.unwrap_or_default()
        .iter()
        .map(|r| Backend {
            reference: r.clone(),
            weight: r.weight.and_then(|w| u32::try_from(w).ok()).unwrap_or(1),
            service: None,
        })
        .collect()
}

/// One rule key of a service's merged MeshHTTPRoutes.
struct MergedRule {
    matches: Vec<HttpMatch>,
    default: serde_json::Value,
    name: String,
    /// The strongest route with these `matches`.
    route: RouteId,
    origin: Origin,
}

fn compile_http(merged: Vec<MergedRule>, diagnostics: &mut Diagnostics) -> HttpRouteTable {
    let mut table = HttpRouteTable::default();
    for MergedRule { matches, default, name, route, origin } in merged {
        let conf: HttpRuleConf = match serde_json::from_value(default) {
            Ok(conf) => conf,
            Err(e) => {
                diagnostics.push(Diagnostic::error(&origin, "", format!("{name}: the merged rule does not read: {e}")));
                continue;
            }
        };
        let rule_index = table.rules.len();
        let filters = conf.filters.clone().unwrap_or_default();
        let mut rule = HttpRule {
            name,
            route,
            policies: None,
            matches: matches.clone(),
            backends: backends(conf.backend_refs.as_deref()),
            request_headers: None,
            response_headers: None,
            redirect: None,
            rewrite: None,
            mirror: None,
            filters: filters.clone(),
        };
        for f in &filters {
            match f.type_.as_str() {
                "RequestHeaderModifier" => {
                    rule.request_headers = f.request_header_modifier.as_ref().map(HeaderOps::compile)
                }
                "ResponseHeaderModifier" => {
                    rule.response_headers = f.response_header_modifier.as_ref().map(HeaderOps::compile)
                }
                "RequestRedirect" => {
                    rule.redirect = f.request_redirect.as_ref().map(|r| Redirect {
                        scheme: r.scheme.clone(),
                        hostname: r.hostname.clone(),
                        port: r.port.and_then(|p| u16::try_from(p).ok()),
                        path: r.path.as_ref().and_then(PathChange::compile),
                        status: r.status_code.and_then(|c| u16::try_from(c).ok()).unwrap_or(302),
                    });
                }
                "RequestMirror" => {
                    rule.mirror = f.request_mirror.as_ref().and_then(|m| {
                        let reference: BackendRef = serde_json::from_value(m.get("backendRef")?.clone()).ok()?;
                        let percentage = match m.get("percentage") {
                            None => 100.0,
                            Some(serde_json::Value::Number(n)) => n.as_f64()?,
                            Some(serde_json::Value::String(s)) => s.trim().parse().ok()?,
                            Some(_) => return None,
                        };
                        Some(Mirror { backend: Backend { reference, weight: 1, service: None }, percentage })
                    });
                }
                "URLRewrite" => {
                    rule.rewrite = f.url_rewrite.as_ref().map(|r| Rewrite {
                        hostname: r.hostname.clone(),
                        path: r.path.as_ref().and_then(PathChange::compile),
                    })
                }
                _ => {}
            }
        }
        table.rules.push(rule);
        // A rule without matches is a catch-all (`/`), as Kuma makes it.
        let items = if matches.is_empty() { vec![HttpMatch::default()] } else { matches };
        for m in items {
            table.matches.push(compile_match(&m, rule_index));
        }
    }
    // Kuma's route order: Exact > PathPrefix > RegularExpression > none, longer values first,
    // then with a method, then more headers, then more query parameters. Stable.
    table.matches.sort_by_key(|m| std::cmp::Reverse(order_key(m)));
    table
}

fn order_key(m: &CompiledMatch) -> (u8, usize, bool, usize, usize) {
    let (kind, len) = match &m.path {
        Some(PathTest::Exact(p)) => (3, p.len()),
        Some(PathTest::Prefix(p)) => (2, p.len()),
        Some(PathTest::Regex(re)) => (1, re.as_str().len()),
        None => (0, 0),
    };
    (kind, len, m.method.is_some(), m.headers.len(), m.query.len())
}

fn compile_match(m: &HttpMatch, rule: usize) -> CompiledMatch {
    let path = m.path.as_ref().and_then(|p| match p.type_.as_str() {
        "Exact" => Some(PathTest::Exact(p.value.clone())),
        "PathPrefix" => Some(PathTest::Prefix(p.value.clone())),
        "RegularExpression" => crate::resources::full_match_regex(&p.value).ok().map(PathTest::Regex),
        _ => None,
    });
    CompiledMatch {
        path,
        method: m.method.as_deref().and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
        headers: m.headers.iter().flatten().filter_map(HeaderMatcher::compile).collect(),
        query: m
            .query_params
            .iter()
            .flatten()
            .filter_map(|q| {
                let test = match q.type_.as_str() {
                    "RegularExpression" => QueryTest::Regex(crate::resources::full_match_regex(&q.value).ok()?),
                    _ => QueryTest::Exact(q.value.clone()),
                };
                Some((q.name.clone(), test))
            })
            .collect(),
        rule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_keep_the_separator_and_the_query() {
        let p = |r: &str| PathChange::Prefix(r.to_string());
        assert_eq!(p("/v2").apply("/v1/users", Some("a=1"), Some("/v1")), "/v2/users?a=1");
        assert_eq!(p("/").apply("/v1/users", None, Some("/v1")), "/users");
        assert_eq!(p("/v2").apply("/v1", None, Some("/v1")), "/v2");
        assert_eq!(p("/").apply("/v1", None, Some("/v1")), "/");
        assert_eq!(p("/api/").apply("/x/y", None, Some("/x")), "/api/y");
        assert_eq!(PathChange::Full("/new".into()).apply("/old/a", Some("q"), None), "/new?q");
    }
}
