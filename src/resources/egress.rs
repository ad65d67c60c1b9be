//! The egress-control kinds: MeshPassthrough (what transparent traffic to destinations that are
//! no MeshExternalService may do) and MeshTrafficPermission on a MeshExternalService (which
//! workloads may use it; an extension of Kuma's schema). Shapes and validation with Kuma 2.14's
//! messages (typos kept), from `pkg/plugins/policies/meshpassthrough/api/v1alpha1/validator.go`
//! and `meshtrafficpermission/api/v1alpha1/validator.go`.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::policy::{target_ref_violations, typed, PolicySpec, TargetRef};
use super::validate::{is_dns_name, Violations};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum PassthroughMode {
    All,
    Matched,
    None,
}

/// MeshPassthrough `default`. Merged as Kuma merges it: `passthroughMode` from the most
/// specific policy that sets it, `appendMatch` appended across policies (Kuma's "Append"
/// prefix rule).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassthroughConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passthrough_mode: Option<PassthroughMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append_match: Option<Vec<PassthroughMatch>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PassthroughMatch {
    #[serde(rename = "type")]
    pub type_: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Kuma's schema default: `tcp`.
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".into()
}

pub const PASSTHROUGH_PROTOCOLS: [&str; 6] = ["tcp", "tls", "grpc", "http", "http2", "mysql"];
const L7: [&str; 3] = ["grpc", "http", "http2"];

/// MeshTrafficPermission `from[].default`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PermissionConf {
    pub action: Option<Action>,
}

/// Ordered so that, at equal specificity, the stricter action wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub enum Action {
    Allow,
    AllowWithShadowDeny,
    Deny,
}

/// MeshPassthrough: `spec.targetRef` and `spec.default`; nothing else.
pub(super) fn validate_passthrough(spec: &PolicySpec, v: &mut Violations<'_>) {
    if let Some(r) = &spec.target_ref {
        target_ref_violations("spec.targetRef", r, &["Mesh", "MeshSubset", "Dataplane"], false, v);
    }
    for (field, set) in [("to", spec.to.is_some()), ("from", spec.from.is_some()), ("rules", spec.rules.is_some())] {
        if set {
            v.error(format!("spec.{field}"), format!("unknown field `{field}`: MeshPassthrough has only `default`"));
        }
    }
    let value = spec.default.clone().unwrap_or_default();
    let Some(conf) = typed::<PassthroughConf>("spec.default", &value, v) else { return };
    // Port → the protocol of the last match on it, for the same-port rule (order-dependent,
    // as Kuma's); (port, protocol) → values, for duplicates.
    let mut port_protocols: HashMap<u32, &str> = HashMap::new();
    let mut seen: HashMap<(u32, &str), Vec<&str>> = HashMap::new();
    for (i, m) in conf.append_match.iter().flatten().enumerate() {
        let at = |field: &str| format!("spec.default.appendMatch[{i}].{field}");
        let protocol = m.protocol.as_str();
        if protocol == "mysql" && m.port.is_none() {
            v.error(at("port"), "port must be defined for Mysql protocol");
        }
        if let Some(port) = m.port {
            if port == 0 || port > 65535 {
                v.error(at("port"), "port must be a valid (1-65535)");
            }
            if port_protocols.get(&port).is_some_and(|p| *p != protocol) && L7.contains(&protocol) {
                v.error(
                    at("port"),
                    "using the same port in multiple matches requires the same protocol for the following protocols: [grpc http http2]",
                );
            }
            port_protocols.insert(port, protocol);
            let values = seen.entry((port, protocol)).or_default();
            if values.contains(&m.value.as_str()) {
                v.error(at("value"), format!("value {} is already defiend for this port and protocol", m.value));
            }
            values.push(&m.value);
        }
        if !PASSTHROUGH_PROTOCOLS.contains(&protocol) {
            v.error(at("protocol"), r#""protocol" must be one of ["tcp", "tls", "grpc", "http", "http2", "mysql"]"#);
        }
        match m.type_.as_str() {
            "CIDR" if m.value.parse::<ipnet::IpNet>().is_err() => {
                v.error(at("value"), "provided CIDR has incorrect value");
            }
            "IP" if m.value.parse::<IpAddr>().is_err() => v.error(at("value"), "provided IP has incorrect value"),
            "Domain" => domain(m, &at, v),
            "CIDR" | "IP" => {}
            other => v.error(
                at("type"),
                format!("provided type {other} is not supported, one of Domain, IP, or CIDR is supported"),
            ),
        }
    }
}

fn domain(m: &PassthroughMatch, at: &dyn Fn(&str) -> String, v: &mut Violations<'_>) {
    if matches!(m.protocol.as_str(), "tcp" | "mysql") {
        v.error(at("protocol"), format!("protocol {} is not supported for a domain", m.protocol));
    }
    let value = m.value.as_str();
    if value.starts_with('*') && value.len() > 1 && !value.starts_with("*.") {
        v.error(at("value"), "provided DNS has incorrect value, partial wildcard is currently not supported");
    }
    if m.port.is_none() && value.starts_with('*') && L7.contains(&m.protocol.as_str()) {
        v.error(at("port"), "wildcard domains doesn't work for all ports and layer 7 protocol");
    }
    let rest = value.strip_prefix("*.").unwrap_or(value);
    // Kuma checks the name only when what follows `*.` is no wildcard again.
    if !rest.starts_with('*') && (!is_dns_name(rest) || rest.parse::<IpAddr>().is_ok()) {
        v.error(at("value"), "provided DNS has incorrect value");
    }
}

/// MeshTrafficPermission. Kuma's top-level kinds plus `MeshExternalService` (mesh-egress's
/// extension: who may use that service); `from` may then also name a `Dataplane`.
pub(super) fn validate_permission(spec: &PolicySpec, v: &mut Violations<'_>) {
    let top = spec.target_ref.clone().unwrap_or_else(TargetRef::mesh);
    let on_service = top.kind == "MeshExternalService";
    if let Some(r) = &spec.target_ref {
        let kinds = ["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane", "MeshExternalService"];
        // Every valid MeshTrafficPermission is inbound (`from` or `rules`).
        let inbound =
            spec.from.as_ref().is_some_and(|f| !f.is_empty()) || spec.rules.as_ref().is_some_and(|r| !r.is_empty());
        target_ref_violations("spec.targetRef", r, &kinds, inbound, v);
    }
    if spec.to.is_some() {
        v.error("spec.to", "unknown field `to`: MeshTrafficPermission has `from` and `rules`");
    }
    if spec.default.is_some() {
        v.error("spec.default", "unknown field `default`: MeshTrafficPermission sets `default` per `from` item");
    }
    let from = spec.from.as_deref().unwrap_or_default();
    let rules = spec.rules.as_deref().unwrap_or_default();
    if !rules.is_empty() && !from.is_empty() {
        v.error("spec", "field 'from' must be empty when 'rules' is defined");
    }
    if rules.is_empty() && from.is_empty() {
        v.error("spec", "at least one of 'from' or 'rules' has to be defined");
    }
    if on_service && !rules.is_empty() {
        v.error("spec.rules", "a MeshTrafficPermission on a MeshExternalService takes `from` items, not `rules`");
    }
    let mut from_kinds = vec!["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset"];
    if on_service {
        from_kinds.push("Dataplane");
    }
    for (i, item) in from.iter().enumerate() {
        let path = format!("spec.from[{i}]");
        target_ref_violations(&format!("{path}.targetRef"), &item.target_ref, &from_kinds, false, v);
        if let Some(conf) = typed::<PermissionConf>(&format!("{path}.default"), &item.default, v) {
            if conf.action.is_none() {
                v.error(format!("{path}.default.action"), "must be defined");
            }
        }
    }
}
