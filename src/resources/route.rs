//! MeshHTTPRoute and MeshTCPRoute: their shapes and their validation with Kuma 2.14's
//! messages. Rules keep their `default` as JSON so that rules with equal `matches` from several
//! routes can be merged (RFC 7396) before being read as [`HttpRuleConf`].

use serde::{Deserialize, Serialize};

use super::kinds::Labels;
use super::policy::{header_match, typed, HeaderKeyValue, HeaderMatch, TargetRef};
use super::validate::Violations;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    MeshHTTPRoute,
    MeshTCPRoute,
}

impl RouteKind {
    pub fn parse(kind: &str) -> Option<Self> {
        match kind {
            "MeshHTTPRoute" => Some(Self::MeshHTTPRoute),
            "MeshTCPRoute" => Some(Self::MeshTCPRoute),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeshHTTPRoute => "MeshHTTPRoute",
            Self::MeshTCPRoute => "MeshTCPRoute",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub kind: RouteKind,
    pub spec: RouteSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec {
    pub target_ref: Option<TargetRef>,
    pub to: Option<Vec<RouteTo>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTo {
    #[serde(default)]
    pub target_ref: TargetRef,
    pub hostnames: Option<Vec<String>>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// MeshHTTPRoute only; the merge key.
    pub matches: Option<Vec<HttpMatch>>,
    #[serde(default)]
    pub default: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query_params: Option<Vec<QueryParamMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<HeaderMatch>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QueryParamMatch {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// A rule's `default`, after merging.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<Filter>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_refs: Option<Vec<BackendRef>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default)]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<Vec<HeaderKeyValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add: Option<Vec<HeaderKeyValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathRewrite {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathRewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_to_backend_hostname: Option<bool>,
}

/// MeshTCPRoute's rule `default`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRuleConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_refs: Option<Vec<BackendRef>>,
}

pub const METHODS: [&str; 9] = ["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"];
const BACKEND_KINDS: [&str; 4] = ["MeshService", "MeshServiceSubset", "MeshExternalService", "MeshMultiZoneService"];
const REDIRECT_CODES: [i64; 5] = [301, 302, 303, 307, 308];

/// Validates a route with Kuma's messages, all problems at once.
pub(super) fn validate(route: &Route, v: &mut Violations<'_>) {
    let top_kinds = ["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane", "MeshGateway"];
    if let Some(top) = &route.spec.target_ref {
        super::policy::target_ref_violations("spec.targetRef", top, &top_kinds, false, v);
    }
    let gateway = route.spec.target_ref.as_ref().is_some_and(|t| t.kind == "MeshGateway");
    for (i, to) in route.spec.to.iter().flatten().enumerate() {
        let path = format!("spec.to[{i}]");
        let kinds: &[&str] =
            if gateway { &["Mesh"] } else { &["MeshService", "MeshExternalService", "MeshMultiZoneService"] };
        super::policy::target_ref_violations(&format!("{path}.targetRef"), &to.target_ref, kinds, false, v);
        if to.hostnames.is_some() && !gateway {
            v.error(format!("{path}.hostnames"), "must not be defined");
        }
        match route.kind {
            RouteKind::MeshHTTPRoute => {
                for (j, rule) in to.rules.iter().enumerate() {
                    http_rule(&format!("{path}.rules[{j}]"), rule, gateway, v);
                }
            }
            RouteKind::MeshTCPRoute => {
                if to.rules.len() > 1 {
                    v.error(format!("{path}.rules"), "must have at most 1 item");
                }
                for (j, rule) in to.rules.iter().enumerate() {
                    let at = format!("{path}.rules[{j}].default");
                    if rule.matches.is_some() {
                        v.error(format!("{path}.rules[{j}].matches"), "unknown field `matches`");
                    }
                    if let Some(conf) = typed::<TcpRuleConf>(&at, &rule.default, v) {
                        // Kuma: an empty list is as undefined (`len(Deref(backendRefs)) == 0`).
                        match conf.backend_refs.as_deref() {
                            None | Some([]) => v.error(format!("{at}.backendRefs"), "must be defined"),
                            Some(refs) => backend_refs(&format!("{at}.backendRefs"), refs, v),
                        }
                    }
                }
            }
        }
    }
}

fn http_rule(path: &str, rule: &RouteRule, gateway: bool, v: &mut Violations<'_>) {
    let matches = rule.matches.as_deref().unwrap_or_default();
    if matches.is_empty() {
        v.error(format!("{path}.matches"), "must not be empty");
    }
    for (i, m) in matches.iter().enumerate() {
        let at = format!("{path}.matches[{i}]");
        if let Some(p) = &m.path {
            match p.type_.as_str() {
                "Exact" | "PathPrefix" if !p.value.starts_with('/') => {
                    v.error(format!("{at}.path.value"), "must be an absolute path");
                }
                "PathPrefix" if p.value != "/" && p.value.ends_with('/') => v.error(
                    format!("{at}.path.value"),
                    "does not need a trailing slash because only a `/`-separated prefix or an entire path is matched",
                ),
                "RegularExpression" if super::full_match_regex(&p.value).is_err() => {
                    v.error(format!("{at}.path.value"), "must be a valid regular expression");
                }
                "Exact" | "PathPrefix" | "RegularExpression" => {}
                _ => v.error(format!("{at}.path.type"), "must be one of: Exact, PathPrefix, RegularExpression"),
            }
        }
        if let Some(method) = &m.method {
            if !METHODS.contains(&method.as_str()) {
                v.error(format!("{at}.method"), format!("must be one of: {}", METHODS.join(", ")));
            }
        }
        for (j, h) in m.headers.iter().flatten().enumerate() {
            header_match(&format!("{at}.headers[{j}]"), h, v);
        }
        let mut names = std::collections::HashSet::new();
        for (j, q) in m.query_params.iter().flatten().enumerate() {
            if !["Exact", "RegularExpression"].contains(&q.type_.as_str()) {
                v.error(format!("{at}.queryParams[{j}].type"), "must be one of: Exact, RegularExpression");
            }
            if q.type_ == "RegularExpression" && super::full_match_regex(&q.value).is_err() {
                v.error(format!("{at}.queryParams[{j}].value"), "must be a valid regular expression");
            }
            if !names.insert(q.name.as_str()) {
                v.error(format!("{at}.queryParams"), format!("multiple entries for name {}", q.name));
            }
        }
    }
    let at = format!("{path}.default");
    let Some(conf) = typed::<HttpRuleConf>(&at, &rule.default, v) else { return };
    let all_prefix =
        !matches.is_empty() && matches.iter().all(|m| m.path.as_ref().is_some_and(|p| p.type_ == "PathPrefix"));
    for (i, f) in conf.filters.iter().flatten().enumerate() {
        filter(&format!("{at}.filters[{i}]"), f, all_prefix, gateway, v);
    }
    if let Some(refs) = &conf.backend_refs {
        backend_refs(&format!("{at}.backendRefs"), refs, v);
    }
}

fn filter(path: &str, f: &Filter, all_prefix: bool, gateway: bool, v: &mut Violations<'_>) {
    let missing = |field: &str, v: &mut Violations<'_>| v.error(format!("{path}.{field}"), "must be defined");
    match f.type_.as_str() {
        "RequestHeaderModifier" => match &f.request_header_modifier {
            None => missing("requestHeaderModifier", v),
            Some(m) => header_modifier(&format!("{path}.requestHeaderModifier"), m, v),
        },
        "ResponseHeaderModifier" => match &f.response_header_modifier {
            None => missing("responseHeaderModifier", v),
            Some(m) => header_modifier(&format!("{path}.responseHeaderModifier"), m, v),
        },
        "RequestRedirect" => match &f.request_redirect {
            None => missing("requestRedirect", v),
            Some(r) => {
                let at = format!("{path}.requestRedirect");
                if r.scheme.as_deref().is_some_and(|s| s != "http" && s != "https") {
                    v.error(format!("{at}.scheme"), "must be one of: http, https");
                }
                if let Some(host) = &r.hostname {
                    hostname(&format!("{at}.hostname"), host, v);
                }
                if r.port.is_some_and(|p| !(1..=65535).contains(&p)) {
                    v.error(format!("{at}.port"), "port must be a valid (1-65535)");
                }
                if r.status_code.is_some_and(|c| !REDIRECT_CODES.contains(&c)) {
                    v.error(format!("{at}.statusCode"), "must be one of: 301, 302, 303, 307, 308");
                }
                if let Some(p) = &r.path {
                    path_rewrite(&format!("{at}.path"), p, all_prefix, v);
                }
            }
        },
        "URLRewrite" => match &f.url_rewrite {
            None => missing("urlRewrite", v),
            Some(r) => {
                let at = format!("{path}.urlRewrite");
                if let Some(host) = &r.hostname {
                    hostname(&format!("{at}.hostname"), host, v);
                }
                if r.host_to_backend_hostname.is_some() && !gateway {
                    v.error(format!("{at}.hostToBackendHostname"), "can only be set with MeshGateway");
                }
                if let Some(p) = &r.path {
                    path_rewrite(&format!("{at}.path"), p, all_prefix, v);
                }
            }
        },
        "RequestMirror" => match &f.request_mirror {
            None => missing("requestMirror", v),
            Some(m) => {
                let at = format!("{path}.requestMirror");
                match m.get("backendRef").map(|r| serde_json::from_value::<BackendRef>(r.clone())) {
                    None => v.error(format!("{at}.backendRef"), "must be defined"),
                    Some(Err(e)) => v.error(format!("{at}.backendRef"), e.to_string()),
                    Some(Ok(r)) => backend_refs(&format!("{at}.backendRef"), std::slice::from_ref(&r), v),
                }
                let percentage = match m.get("percentage") {
                    None => Some(100.0),
                    Some(serde_json::Value::Number(n)) => n.as_f64(),
                    Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
                    Some(_) => None,
                };
                match percentage {
                    None => v.error(format!("{at}.percentage"), "string must be a valid number"),
                    Some(p) if !(0.0..=100.0).contains(&p) => {
                        v.error(format!("{at}.percentage"), "must be in inclusive range [0.0, 100.0]");
                    }
                    Some(_) => {}
                }
            }
        },
        "" => v.error(format!("{path}.type"), "must be defined"),
        other => v.error(format!("{path}.type"), format!("unknown filter type '{other}'")),
    }
}

fn header_modifier(path: &str, m: &HeaderModifier, v: &mut Violations<'_>) {
    let (set, add, remove) = (
        m.set.as_deref().unwrap_or_default(),
        m.add.as_deref().unwrap_or_default(),
        m.remove.as_deref().unwrap_or_default(),
    );
    if set.is_empty() && add.is_empty() && remove.is_empty() {
        return v.error(path, "must have at least one defined: set, add, remove");
    }
    for (field, len) in [("set", set.len()), ("add", add.len()), ("remove", remove.len())] {
        if len > 16 {
            v.error(format!("{path}.{field}"), "must have at most 16 items");
        }
    }
    let mut seen = std::collections::HashSet::new();
    let names = set
        .iter()
        .map(|h| h.name.as_str())
        .chain(add.iter().map(|h| h.name.as_str()))
        .chain(remove.iter().map(String::as_str));
    for name in names {
        if !seen.insert(name.to_ascii_lowercase()) {
            v.error(path, format!("duplicate header name {name}"));
        }
    }
}

fn hostname(path: &str, host: &str, v: &mut Violations<'_>) {
    if host.parse::<std::net::IpAddr>().is_ok() {
        v.error(path, "cannot be an IP address");
    } else if !super::validate::is_dns_name(host) {
        v.error(path, "must be a valid DNS-1123 subdomain");
    }
}

fn path_rewrite(path: &str, p: &PathRewrite, all_prefix: bool, v: &mut Violations<'_>) {
    match p.type_.as_str() {
        "ReplaceFullPath" if p.replace_full_path.is_none() => {
            v.error(format!("{path}.replaceFullPath"), "must be defined")
        }
        "ReplacePrefixMatch" if p.replace_prefix_match.is_none() => {
            v.error(format!("{path}.replacePrefixMatch"), "must be defined");
        }
        "ReplacePrefixMatch" if !all_prefix => {
            v.error(format!("{path}.replacePrefixMatch"), "can only appear if all matches match a path prefix");
        }
        "ReplaceFullPath" | "ReplacePrefixMatch" => {}
        _ => v.error(format!("{path}.type"), "must be one of: ReplaceFullPath, ReplacePrefixMatch"),
    }
}

fn backend_refs(path: &str, refs: &[BackendRef], v: &mut Violations<'_>) {
    for (i, r) in refs.iter().enumerate() {
        let at = format!("{path}[{i}]");
        if !BACKEND_KINDS.contains(&r.kind.as_str()) {
            v.error(format!("{at}.kind"), format!("value '{}' is not supported", r.kind));
        }
        if r.kind == "MeshMultiZoneService" && r.port.is_none() {
            v.error(format!("{at}.port"), "must be defined with kind MeshMultiZoneService");
        }
        if r.weight.is_some_and(|w| w < 0) {
            v.error(format!("{at}.weight"), "must not be negative");
        }
        if r.name.as_deref().map_or(true, str::is_empty) && r.labels.is_none() {
            v.error(&at, format!("name or labels must be set when kind is {}", r.kind));
        }
    }
}
