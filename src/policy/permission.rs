//! Per-workload access to a MeshExternalService: MeshTrafficPermission with a top-level
//! `targetRef` `MeshExternalService` (mesh-egress's extension; Kuma 2.14 rejects that kind).
//!
//! Pure. The workload is this sidecar's Dataplane in the service's mesh. Of the `from` items of
//! every such policy that selects the service and whose `targetRef` matches the workload, the
//! most specific wins (Dataplane by name > Dataplane by labels > MeshServiceSubset >
//! MeshService > MeshSubset > Mesh; more tags or labels first within a kind); at equal
//! specificity the stricter action wins (Deny > AllowWithShadowDeny > Allow). No item: the
//! Mesh's `routing.defaultForbidMeshExternalServiceAccess` decides, as before.

use serde::Serialize;

use super::{describe, subset, DataplaneIdentity, Target};
use crate::resources::egress::Action;
use crate::resources::policy::TargetRef;

/// Whether this sidecar's workload may use a service. Decided once per configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    Allowed,
    /// The Mesh sets `routing.defaultForbidMeshExternalServiceAccess: true`.
    Forbidden,
    /// A MeshTrafficPermission denies it.
    Denied,
    /// Allowed, but a MeshTrafficPermission's `AllowWithShadowDeny` says a Deny would block it:
    /// each use is logged and counted.
    ShadowDenied,
}

/// The decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessDecision {
    pub access: Access,
    /// `MeshTrafficPermission mesh/name from[i] <targetRef>`, or the Mesh switch; `None`: the
    /// default (allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// One `from` item of a MeshTrafficPermission on a MeshExternalService.
#[derive(Debug)]
pub(super) struct PermissionEntry {
    pub(super) mesh: String,
    pub(super) policy: String,
    pub(super) namespace: Option<String>,
    pub(super) top: TargetRef,
    pub(super) index: usize,
    pub(super) from: TargetRef,
    pub(super) action: Action,
}

/// Specificity of a `from` targetRef that matches `workload`; `None`: it does not match.
fn specificity(
    from: &TargetRef,
    policy_namespace: Option<&str>,
    workload: Option<&DataplaneIdentity>,
) -> Option<(u8, usize)> {
    let tags = from.tags.as_ref();
    let count = |m: Option<&crate::resources::Labels>| m.map_or(0, |m| m.len());
    match from.kind.as_str() {
        "Mesh" | "" => Some((0, 0)),
        kind => {
            let d = workload?;
            let any_inbound = |f: &dyn Fn(&crate::resources::Labels) -> bool| d.inbound_tags.iter().any(f);
            let empty = crate::resources::Labels::new();
            match kind {
                "MeshSubset" => any_inbound(&|t| subset(tags.unwrap_or(&empty), t)).then(|| (1, count(tags))),
                "MeshService" | "MeshServiceSubset" => {
                    let name = from.name.as_deref().unwrap_or_default();
                    let rank = if kind == "MeshService" { 2 } else { 3 };
                    any_inbound(&|t| {
                        t.get("kuma.io/service").map(String::as_str) == Some(name) && subset(tags.unwrap_or(&empty), t)
                    })
                    .then(|| (rank, count(tags)))
                }
                "Dataplane" => {
                    // A namespace, given or the policy's own, must be the workload's (a
                    // Universal Dataplane has none and matches on the rest).
                    let namespace = from.namespace.as_deref().filter(|n| !n.is_empty()).or(policy_namespace);
                    let ns_ok = match (namespace, d.namespace.as_deref()) {
                        (Some(want), Some(have)) => want == have,
                        _ => true,
                    };
                    match (from.name.as_deref().filter(|n| !n.is_empty()), from.labels.as_ref()) {
                        (Some(name), _) => (ns_ok && name == d.name).then_some((5, 0)),
                        (None, labels) => {
                            (ns_ok && subset(labels.unwrap_or(&empty), &d.labels)).then(|| (4, count(labels)))
                        }
                    }
                }
                _ => None,
            }
        }
    }
}

/// The access `service` has for `workload` (this sidecar's Dataplane in its mesh, if known).
pub(super) fn decide(
    entries: &[PermissionEntry],
    service: &Target<'_>,
    workload: Option<&DataplaneIdentity>,
    mesh_forbids: bool,
) -> AccessDecision {
    let best = entries
        .iter()
        .filter(|e| e.mesh == service.mesh && super::selects_service(&e.top, e.namespace.as_deref(), service))
        .filter_map(|e| specificity(&e.from, e.namespace.as_deref(), workload).map(|s| (s, e.action, e)))
        .max_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    match best {
        Some((_, action, e)) => AccessDecision {
            access: match action {
                Action::Allow => Access::Allowed,
                Action::AllowWithShadowDeny => Access::ShadowDenied,
                Action::Deny => Access::Denied,
            },
            by: Some(format!("MeshTrafficPermission {} from[{}] {}", e.policy, e.index, describe(&e.from))),
        },
        None if mesh_forbids => AccessDecision {
            access: Access::Forbidden,
            by: Some(format!("Mesh {}: routing.defaultForbidMeshExternalServiceAccess", service.mesh)),
        },
        None => AccessDecision { access: Access::Allowed, by: None },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::PolicySet;
    use crate::resources::{load_str, Labels, Loaded};

    const WORKLOAD: &str = "\
type: Dataplane
name: web-1
mesh: default
labels: {team: shop, tier: front}
networking:
  address: 10.0.0.1
  inbound: [{port: 8080, tags: {kuma.io/service: web, version: v2}}]
";

    fn permission(name: &str, from: &str, action: &str) -> String {
        format!(
            "---\ntype: MeshTrafficPermission\nname: {name}\nmesh: default\nspec:\n  targetRef: {{kind: MeshExternalService, name: httpbin}}\n  from:\n  - targetRef: {from}\n    default: {{action: {action}}}\n"
        )
    }

    fn decide_for(yaml: &str, workload: Option<&str>, mesh_forbids: bool) -> AccessDecision {
        let mut loaded = Loaded::default();
        load_str(Path::new("test.yaml"), yaml, &mut loaded);
        assert!(!loaded.diagnostics.has_errors(), "{:?}", loaded.diagnostics);
        let set = PolicySet::new(&loaded.resources, workload);
        let labels = Labels::new();
        let service =
            Target { mesh: "default", name: "httpbin", display_name: "httpbin", namespace: "", labels: &labels };
        set.access(&service, mesh_forbids)
    }

    #[test]
    fn each_from_kind_matches_this_workload() {
        let cases = [
            ("{kind: Mesh}", true),
            ("{kind: MeshSubset, tags: {version: v2}}", true),
            ("{kind: MeshSubset, tags: {version: v1}}", false),
            ("{kind: MeshService, name: web}", true),
            ("{kind: MeshService, name: api}", false),
            ("{kind: MeshServiceSubset, name: web, tags: {version: v2}}", true),
            ("{kind: Dataplane, name: web-1}", true),
            ("{kind: Dataplane, name: web-2}", false),
            ("{kind: Dataplane, labels: {team: shop}}", true),
            ("{kind: Dataplane, labels: {team: bank}}", false),
        ];
        for (from, matches) in cases {
            let d = decide_for(&format!("{WORKLOAD}{}", permission("p", from, "Deny")), None, false);
            let expected = if matches { Access::Denied } else { Access::Allowed };
            assert_eq!(d.access, expected, "{from}: {d:?}");
        }
    }

    #[test]
    fn a_dataplane_item_keeps_to_its_namespace() {
        let in_shop =
            WORKLOAD.replace("labels: {team: shop, tier: front}", "labels: {team: shop, k8s.kuma.io/namespace: shop}");
        for (from, matches) in [
            ("{kind: Dataplane, namespace: shop}", true),
            ("{kind: Dataplane, namespace: bank}", false),
            ("{kind: Dataplane, name: web-1, namespace: bank}", false),
        ] {
            let d = decide_for(&format!("{in_shop}{}", permission("p", from, "Deny")), None, false);
            let expected = if matches { Access::Denied } else { Access::Allowed };
            assert_eq!(d.access, expected, "{from}: {d:?}");
        }
    }

    #[test]
    fn the_most_specific_item_wins_then_the_stricter_action() {
        let yaml = format!(
            "{WORKLOAD}{}{}{}",
            permission("mesh-deny", "{kind: Mesh}", "Deny"),
            permission("subset-allow", "{kind: MeshSubset, tags: {version: v2}}", "Allow"),
            permission("dp-shadow", "{kind: Dataplane, labels: {team: shop}}", "AllowWithShadowDeny"),
        );
        let d = decide_for(&yaml, None, false);
        assert_eq!(d.access, Access::ShadowDenied, "{d:?}");
        assert_eq!(
            d.by.as_deref(),
            Some("MeshTrafficPermission default/dp-shadow from[0] Dataplane labels {team=shop}")
        );
        // By name beats by labels.
        let by_name = format!("{yaml}{}", permission("dp-allow", "{kind: Dataplane, name: web-1}", "Allow"));
        assert_eq!(decide_for(&by_name, None, false).access, Access::Allowed);
        // Equal specificity: Deny over Allow, whatever the order.
        for (a, b) in [("Allow", "Deny"), ("Deny", "Allow")] {
            let yaml = format!(
                "{WORKLOAD}{}{}",
                permission("one", "{kind: MeshService, name: web}", a),
                permission("two", "{kind: MeshService, name: web}", b)
            );
            assert_eq!(decide_for(&yaml, None, false).access, Access::Denied, "{a} then {b}");
        }
    }

    #[test]
    fn the_mesh_switch_is_the_default_a_permission_overrides() {
        assert_eq!(decide_for(WORKLOAD, None, true).access, Access::Forbidden);
        assert_eq!(decide_for(WORKLOAD, None, false), AccessDecision { access: Access::Allowed, by: None });
        let allow = format!("{WORKLOAD}{}", permission("allow-web", "{kind: MeshService, name: web}", "Allow"));
        let d = decide_for(&allow, None, true);
        assert_eq!(d.access, Access::Allowed, "an Allow opens what the Mesh forbids: {d:?}");
        // Another service's permission changes nothing here.
        let other = allow.replace("name: httpbin", "name: other");
        assert_eq!(decide_for(&other, None, true).access, Access::Forbidden);
    }

    #[test]
    fn the_workload_is_the_named_or_the_only_dataplane() {
        let second = WORKLOAD.replace("web-1", "api-1").replace("kuma.io/service: web", "kuma.io/service: api");
        let yaml = format!("{WORKLOAD}---\n{second}{}", permission("p", "{kind: MeshService, name: web}", "Deny"));
        assert_eq!(decide_for(&yaml, None, false).access, Access::Allowed, "two Dataplanes: which one is unknown");
        assert_eq!(decide_for(&yaml, Some("web-1"), false).access, Access::Denied);
        assert_eq!(decide_for(&yaml, Some("api-1"), false).access, Access::Allowed);
    }
}
