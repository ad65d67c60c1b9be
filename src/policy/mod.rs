//! Which policies apply to each MeshExternalService, merged as Kuma 2.14 merges them.
//!
//! Pure. For one service: take the policies whose top-level `targetRef` selects this sidecar,
//! flatten their `to[]` items, keep the `Mesh` items of the service's mesh and the items that
//! name (or label-select) the service, sort them by Kuma's precedence (lowest first), and merge
//! their `default`s with RFC 7396 JSON merge-patch: objects merge field by field, lists are
//! replaced. The merged value is then read as the kind's typed conf ([`Effective`]), and
//! [`runtime`] turns that into what the data path applies.

pub mod passthrough;
pub mod permission;
pub mod routes;
pub mod runtime;
pub mod trace;

use std::cmp::Reverse;

use serde::Serialize;
use serde_norway::Value;

use crate::model::Protocol;
use crate::resources::egress::{PassthroughConf, PermissionConf};
use crate::resources::kinds::Labels;
use crate::resources::policy::{
    AccessLogConf, CircuitBreakerConf, HealthCheckConf, Policy, PolicyKind, PolicySpec, RetryConf, Role, TargetRef,
    TimeoutConf,
};
use crate::resources::trace::TraceConf;
use crate::resources::{
    Diagnostic, Diagnostics, Kind, Meta, Origin, Resource, LABEL_DISPLAY_NAME, LABEL_NAMESPACE, LABEL_ORIGIN,
};

/// The service a policy entry may target.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub mesh: &'a str,
    pub name: &'a str,
    pub display_name: &'a str,
    pub namespace: &'a str,
    pub labels: &'a Labels,
}

/// A policy item that contributed to a service's conf, in merge order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub kind: PolicyKind,
    /// `mesh/name` of the policy resource.
    pub policy: String,
    /// The `to[]` item, e.g. `to[0] Mesh` or `to[1] MeshExternalService httpbin`.
    pub item: String,
}

/// `%KUMA_DESTINATION_SERVICE%` of passthrough traffic, as Kuma sets it.
pub const PASSTHROUGH_DESTINATION: &str = "external";
/// The `kuma.io/service` Kuma computes passthrough's policies for.
const PASSTHROUGH_SERVICE_TAG: &str = "pass_through";

/// This sidecar's Dataplane, as `%KUMA_SOURCE_SERVICE%` and `%KUMA_SOURCE_ADDRESS%` name it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceDataplane {
    pub name: String,
    pub address: String,
    /// The `kuma.io/service` tag of its first inbound that has one (MeshTrace's service name).
    pub service: Option<String>,
}

/// A policy that selects no part of this sidecar, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ignored {
    pub kind: &'static str,
    pub policy: String,
    pub reason: String,
}

/// What the policies say about one service: the merged conf of each kind (`None` when no
/// policy of that kind applies) and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Effective {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_timeout: Option<TimeoutConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_retry: Option<RetryConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_circuit_breaker: Option<CircuitBreakerConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_health_check: Option<HealthCheckConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_access_log: Option<AccessLogConf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_trace: Option<TraceConf>,
    /// This sidecar's Dataplane in the service's mesh (for `%KUMA_SOURCE_*%`).
    #[serde(skip)]
    pub source: Option<SourceDataplane>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Source>,
}

impl Effective {
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// One `to[]` item of a selected policy, with its precedence.
#[derive(Debug)]
struct Entry {
    kind: PolicyKind,
    mesh: String,
    policy: String,
    /// The policy's namespace (Kubernetes spelling): a `to` name without one means this one.
    namespace: Option<String>,
    index: usize,
    target_ref: TargetRef,
    default: serde_json::Value,
    rank: Rank,
}

/// Kuma's sort key (`outbound.Sort`), compared field by field; higher wins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    top_kind: u8,
    /// Dataplane only: selected by name (2) over by labels (1).
    dataplane_by_name: u8,
    origin: u8,
    role: Role,
    to_kind: u8,
    /// Reverse lexicographic: `aaa` wins over `zzz`.
    name: Reverse<String>,
}

fn kind_rank(kind: &str) -> u8 {
    match kind {
        "Mesh" | "" => 1,
        "Dataplane" => 2,
        "MeshSubset" => 3,
        "MeshGateway" => 4,
        "MeshService" => 5,
        "MeshExternalService" => 6,
        "MeshMultiZoneService" => 7,
        "MeshServiceSubset" => 8,
        "MeshHTTPRoute" => 9,
        _ => 0,
    }
}

/// The Dataplanes this sidecar serves, as policies select them.
#[derive(Debug, Default)]
struct Proxies {
    dataplanes: Vec<DataplaneIdentity>,
}

#[derive(Debug)]
struct DataplaneIdentity {
    mesh: String,
    name: String,
    namespace: Option<String>,
    labels: Labels,
    address: String,
    /// Tags of each inbound.
    inbound_tags: Vec<Labels>,
}

impl Proxies {
    /// The Dataplanes in `resources`; only the one named `workload` when given.
    fn new(resources: &[Resource], workload: Option<&str>) -> Self {
        let dataplanes = resources
            .iter()
            .filter_map(|r| {
                let Kind::Dataplane(spec) = &r.kind else { return None };
                if workload.is_some_and(|w| w != r.meta.name) {
                    return None;
                }
                Some(DataplaneIdentity {
                    mesh: r.meta.mesh.clone(),
                    name: r.meta.name.clone(),
                    namespace: r.meta.labels.get(LABEL_NAMESPACE).cloned(),
                    labels: r.meta.labels.clone(),
                    address: spec.networking.address.clone().unwrap_or_default(),
                    inbound_tags: inbound_tags(spec.networking.inbound.as_ref()),
                })
            })
            .collect();
        Self { dataplanes }
    }

    /// The workload this sidecar serves in `mesh`: its only Dataplane there.
    fn workload(&self, mesh: &str) -> Option<&DataplaneIdentity> {
        let mut in_mesh = self.dataplanes.iter().filter(|d| d.mesh == mesh);
        match (in_mesh.next(), in_mesh.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    /// `None` when a policy (or route) of `role` in `namespace` with top-level `top` selects
    /// this sidecar; else why not.
    fn why_not_selected(&self, mesh: &str, namespace: Option<&str>, top: &TargetRef, role: Role) -> Option<String> {
        self.not_selected(mesh, namespace, top).or_else(|| self.outside_namespace(mesh, role, namespace))
    }

    /// Kuma: consumer and workload-owner policies select only proxies of their own namespace.
    /// `Some(reason)` when this sidecar's Dataplanes have namespaces and none is `namespace`.
    fn outside_namespace(&self, mesh: &str, role: Role, namespace: Option<&str>) -> Option<String> {
        let namespace = namespace.filter(|_| matches!(role, Role::Consumer | Role::WorkloadOwner))?;
        let namespaces: Vec<&str> =
            self.dataplanes.iter().filter(|d| d.mesh == mesh).filter_map(|d| d.namespace.as_deref()).collect();
        (!namespaces.is_empty() && !namespaces.contains(&namespace))
            .then(|| format!("a {role:?} policy in namespace {namespace} selects only proxies of its own namespace"))
    }

    /// `None` when the top-level targetRef selects this sidecar; else why not.
    fn not_selected(&self, mesh: &str, policy_namespace: Option<&str>, top: &TargetRef) -> Option<String> {
        let in_mesh = || self.dataplanes.iter().filter(move |d| d.mesh == mesh);
        let none = |what: String| Some(format!("no Dataplane in the configuration matches {what}"));
        match top.kind.as_str() {
            "" | "Mesh" => match &top.proxy_types {
                Some(types) if !types.iter().any(|t| t == "Sidecar") => {
                    Some("proxyTypes does not include Sidecar".to_string())
                }
                _ => None,
            },
            "Dataplane" => {
                let found = match (&top.name, &top.labels) {
                    (Some(name), _) if !name.is_empty() => {
                        let namespace = top.namespace.as_deref().or(policy_namespace);
                        // A Dataplane without a namespace (Universal) matches by name alone.
                        in_mesh().any(|d| {
                            &d.name == name
                                && (namespace.is_none() || d.namespace.is_none() || d.namespace.as_deref() == namespace)
                        })
                    }
                    (_, Some(labels)) => in_mesh().any(|d| subset(labels, &d.labels)),
                    _ => in_mesh().next().is_some(),
                };
                if found {
                    None
                } else {
                    none(format!("targetRef {}", describe(top)))
                }
            }
            "MeshSubset" => {
                let tags = top.tags.clone().unwrap_or_default();
                let found = in_mesh().any(|d| tags.is_empty() || d.inbound_tags.iter().any(|t| subset(&tags, t)));
                if found {
                    None
                } else {
                    none(format!("targetRef {}", describe(top)))
                }
            }
            "MeshService" | "MeshServiceSubset" => {
                let name = top.name.clone().unwrap_or_default();
                let tags = top.tags.clone().unwrap_or_default();
                let found = in_mesh().any(|d| {
                    d.inbound_tags.iter().any(|t| t.get("kuma.io/service") == Some(&name) && subset(&tags, t))
                });
                if found {
                    None
                } else {
                    none(format!("targetRef {} (by the kuma.io/service tag of an inbound)", describe(top)))
                }
            }
            "MeshGateway" => Some("a top-level MeshGateway selects gateways, not this sidecar".to_string()),
            "MeshHTTPRoute" => Some(
                "a top-level MeshHTTPRoute is deprecated in Kuma: use `to: MeshHTTPRoute` items of a MeshTimeout or MeshRetry"
                    .into(),
            ),
            other => Some(format!("top-level kind {other} cannot select a sidecar")),
        }
    }
}

fn inbound_tags(inbound: Option<&Value>) -> Vec<Labels> {
    let Some(list) = inbound.and_then(Value::as_sequence) else { return Vec::new() };
    list.iter()
        .filter_map(|i| i.get("tags"))
        .filter_map(|t| serde_norway::from_value::<Labels>(t.clone()).ok())
        .collect()
}

fn subset(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn describe(r: &TargetRef) -> String {
    let mut out = if r.kind.is_empty() { "Mesh".to_string() } else { r.kind.clone() };
    if let Some(name) = r.name.as_deref().filter(|n| !n.is_empty()) {
        out.push(' ');
        out.push_str(name);
        if let Some(ns) = r.namespace.as_deref().filter(|n| !n.is_empty()) {
            out.push('.');
            out.push_str(ns);
        }
    }
    for (what, map) in [("labels", &r.labels), ("tags", &r.tags)] {
        if let Some(map) = map.as_ref().filter(|m| !m.is_empty()) {
            let pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!(" {what} {{{}}}", pairs.join(",")));
        }
    }
    out
}

/// Every selected policy's entries, sorted lowest precedence first.
#[derive(Debug, Default)]
pub struct PolicySet {
    entries: Vec<Entry>,
    ignored: Vec<Ignored>,
    proxies: Proxies,
    passthrough: passthrough::Passthrough,
    permissions: Vec<permission::PermissionEntry>,
}

impl PolicySet {
    /// Selects and sorts the policies in `resources` for this sidecar: its Dataplanes in the
    /// configuration, or only the one named `workload`. Entries naming a MeshExternalService
    /// that does not exist are reported (as warnings) by [`PolicySet::check_references`].
    pub fn new(resources: &[Resource], workload: Option<&str>) -> Self {
        let proxies = Proxies::new(resources, workload);
        let mut set = Self::default();
        let mut passthroughs = Vec::new();
        for r in resources {
            let Kind::Policy(Policy { kind, spec }) = &r.kind else { continue };
            let policy = format!("{}/{}", r.meta.mesh, r.meta.name);
            let namespace = r.meta.labels.get(LABEL_NAMESPACE).cloned();
            let top = spec.target_ref.clone().unwrap_or_else(TargetRef::mesh);
            if *kind == PolicyKind::MeshTrafficPermission {
                set.add_permission(&r.meta, spec, policy, namespace, top);
                continue;
            }
            let role = Role::of(&r.meta, spec.to_refs());
            // MeshCircuitBreaker and MeshHealthCheck act on the real endpoints, where Kuma's
            // ZoneEgress applies every policy's `to` items whatever its top-level targetRef
            // (`processToResourceRules`): so does mesh-egress, which talks to them itself.
            let endpoint_side = matches!(kind, PolicyKind::MeshCircuitBreaker | PolicyKind::MeshHealthCheck);
            let not_selected = proxies.why_not_selected(&r.meta.mesh, namespace.as_deref(), &top, role);
            if let Some(reason) = not_selected.filter(|_| !endpoint_side) {
                set.ignored.push(Ignored { kind: kind.as_str(), policy, reason });
                continue;
            }
            if *kind == PolicyKind::MeshPassthrough {
                let conf: PassthroughConf =
                    spec.default.clone().and_then(|d| serde_json::from_value(d).ok()).unwrap_or_default();
                passthroughs.push((rank(&r.meta, role, &top, &TargetRef::mesh()), policy, conf));
                continue;
            }
            if *kind == PolicyKind::MeshTrace {
                // One conf for every service of the mesh: an entry like a `to: Mesh` item.
                set.entries.push(Entry {
                    kind: *kind,
                    mesh: r.meta.mesh.clone(),
                    policy,
                    namespace,
                    index: 0,
                    target_ref: TargetRef::mesh(),
                    default: spec.default.clone().unwrap_or_default(),
                    rank: rank(&r.meta, role, &top, &TargetRef::mesh()),
                });
                continue;
            }
            if !spec.to.as_ref().is_some_and(|to| !to.is_empty()) {
                let reason =
                    "no `to` items: its `from`/`rules` apply to inbound traffic, which an egress sidecar has none of";
                set.ignored.push(Ignored { kind: kind.as_str(), policy, reason: reason.to_string() });
                continue;
            }
            for (index, item) in spec.to.iter().flatten().enumerate() {
                set.entries.push(Entry {
                    kind: *kind,
                    mesh: r.meta.mesh.clone(),
                    policy: policy.clone(),
                    namespace: namespace.clone(),
                    index,
                    target_ref: item.target_ref.clone(),
                    default: item.default.clone(),
                    rank: rank(&r.meta, role, &top, &item.target_ref),
                });
            }
        }
        // Stable: equal ranks keep file order.
        set.entries.sort_by(|a, b| a.rank.cmp(&b.rank));
        passthroughs.sort_by(|a, b| a.0.cmp(&b.0));
        set.passthrough = passthrough::Passthrough::merge(passthroughs.iter().map(|(_, p, c)| (p.clone(), c)));
        set.proxies = proxies;
        set
    }

    /// A MeshTrafficPermission: on a MeshExternalService, its `from` items decide who may use
    /// it; on anything else it is about inbound traffic, which an egress sidecar has none of.
    fn add_permission(
        &mut self,
        meta: &Meta,
        spec: &PolicySpec,
        policy: String,
        namespace: Option<String>,
        top: TargetRef,
    ) {
        if top.kind != "MeshExternalService" {
            let reason = format!(
                "a MeshTrafficPermission on {} governs inbound traffic, which an egress sidecar has none of",
                describe(&top)
            );
            return self.ignored.push(Ignored { kind: PolicyKind::MeshTrafficPermission.as_str(), policy, reason });
        }
        for (index, item) in spec.from.iter().flatten().enumerate() {
            let Some(action) =
                serde_json::from_value::<PermissionConf>(item.default.clone()).ok().and_then(|c| c.action)
            else {
                continue;
            };
            self.permissions.push(permission::PermissionEntry {
                mesh: meta.mesh.clone(),
                policy: policy.clone(),
                namespace: namespace.clone(),
                top: top.clone(),
                index,
                from: item.target_ref.clone(),
                action,
            });
        }
    }

    /// The transparent listener's passthrough.
    pub fn passthrough(&self) -> &passthrough::Passthrough {
        &self.passthrough
    }

    /// Whether this sidecar's workload may use `service`; `mesh_forbids`: its Mesh sets
    /// `defaultForbidMeshExternalServiceAccess`.
    pub fn access(&self, service: &Target<'_>, mesh_forbids: bool) -> permission::AccessDecision {
        permission::decide(&self.permissions, service, self.proxies.workload(service.mesh), mesh_forbids)
    }

    /// Why a MeshTrafficPermission's Dataplane and MeshSubset items cannot match: the mesh has
    /// several Dataplanes and none was named with `--dataplane`.
    pub fn workload_unknown(&self) -> Vec<String> {
        let mut meshes: Vec<String> = self
            .permissions
            .iter()
            .filter(|e| !matches!(e.from.kind.as_str(), "Mesh" | ""))
            .filter(|e| self.proxies.workload(&e.mesh).is_none())
            .map(|e| e.mesh.clone())
            .collect();
        meshes.sort();
        meshes.dedup();
        meshes
    }

    /// The routes in `resources`, selected for the same Dataplanes.
    pub fn routes(&self, resources: &[Resource]) -> routes::RouteSet {
        routes::RouteSet::new(resources, &self.proxies)
    }

    /// Policies that apply to no part of this sidecar.
    pub fn ignored(&self) -> &[Ignored] {
        &self.ignored
    }

    /// Warns about `to` items that name a MeshExternalService no resource defines: valid, and
    /// applied to nothing.
    pub fn check_references(&self, services: &[Target<'_>], origin_of: impl Fn(&str) -> Option<Origin>) -> Diagnostics {
        let mut out = Diagnostics::default();
        for e in &self.entries {
            if e.target_ref.kind != "MeshExternalService"
                || !e.target_ref.name.as_deref().is_some_and(|n| !n.is_empty())
            {
                continue;
            }
            if !services.iter().any(|s| s.mesh == e.mesh && e.selects(s)) {
                let Some(origin) = origin_of(&e.policy) else { continue };
                let message = format!(
                    "{} is not defined in mesh {}: this item applies to nothing",
                    describe(&e.target_ref),
                    e.mesh
                );
                out.push(
                    Diagnostic::warning(&origin, format!("spec.to[{}].targetRef", e.index), message).about(format!(
                        "{} {}",
                        e.kind.as_str(),
                        e.policy
                    )),
                );
            }
        }
        out
    }

    /// The merged confs for `service`; a merged conf that cannot be read (it should not happen:
    /// every item was validated) is reported in `diagnostics` and left out.
    pub fn effective(&self, service: &Target<'_>, origin: &Origin, diagnostics: &mut Diagnostics) -> Effective {
        let mut effective = Effective::default();
        for kind in PolicyKind::ALL {
            let mut merged: Option<serde_json::Value> = None;
            for e in self.entries.iter().filter(|e| e.kind == kind && e.mesh == service.mesh) {
                let applies = match e.target_ref.kind.as_str() {
                    "Mesh" | "" => true,
                    "MeshExternalService" => e.selects(service),
                    _ => false,
                };
                if !applies {
                    continue;
                }
                let into = merged.get_or_insert_with(|| serde_json::Value::Object(Default::default()));
                json_patch::merge(into, &e.default);
                let item = match kind {
                    PolicyKind::MeshTrace => "default".to_string(),
                    _ => format!("to[{}] {}", e.index, describe(&e.target_ref)),
                };
                effective.sources.push(Source { kind, policy: e.policy.clone(), item });
            }
            let Some(merged) = merged else { continue };
            let read = match kind {
                PolicyKind::MeshTimeout => serde_json::from_value(merged).map(|c| effective.mesh_timeout = Some(c)),
                PolicyKind::MeshRetry => serde_json::from_value(merged).map(|c| effective.mesh_retry = Some(c)),
                PolicyKind::MeshCircuitBreaker => {
                    serde_json::from_value(merged).map(|c| effective.mesh_circuit_breaker = Some(c))
                }
                PolicyKind::MeshHealthCheck => {
                    serde_json::from_value(merged).map(|c| effective.mesh_health_check = Some(c))
                }
                PolicyKind::MeshAccessLog => {
                    serde_json::from_value(merged).map(|c| effective.mesh_access_log = Some(c))
                }
                PolicyKind::MeshTrace => serde_json::from_value(merged).map(|c| effective.mesh_trace = Some(c)),
                PolicyKind::MeshPassthrough | PolicyKind::MeshTrafficPermission => continue,
            };
            if let Err(e) = read {
                let message = format!("the merged {} does not read: {e}", kind.as_str());
                diagnostics.push(Diagnostic::error(origin, "", message));
            }
        }
        if effective.mesh_access_log.is_some() || effective.mesh_trace.is_some() {
            effective.source = self.source(service.mesh);
        }
        effective
    }

    /// This sidecar's Dataplane of `mesh`, for the values the access log and traces carry.
    fn source(&self, mesh: &str) -> Option<SourceDataplane> {
        self.proxies.dataplanes.iter().find(|d| d.mesh == mesh).map(|d| {
            let service = d.inbound_tags.iter().find_map(|tags| tags.get("kuma.io/service")).cloned();
            SourceDataplane { name: d.name.clone(), address: d.address.clone(), service }
        })
    }

    /// MeshAccessLog for passthrough traffic: the merge of the `to: Mesh` items of this
    /// sidecar's mesh (its first Dataplane's, else `default`) and of `to: MeshService` items
    /// named `pass_through`, as Kuma computes it for the transparent proxy's passthrough
    /// listeners (`kuma.io/service: pass_through`, which no MeshExternalService item names):
    /// destination service `external`, Kuma's TCP format by default. A policy with a
    /// `MeshHTTPRoute` item is left out, as Kuma's legacy rules leave it out. `None`: no item,
    /// or no backend.
    pub fn passthrough_access_log(&self) -> Option<runtime::AccessLogPlan> {
        let mesh = self.proxies.dataplanes.first().map_or("default", |d| d.mesh.as_str());
        let of_kind = || self.entries.iter().filter(|e| e.kind == PolicyKind::MeshAccessLog && e.mesh == mesh);
        // Kuma's legacy rules (`legacyBuildToRules`) leave out a policy with a route item.
        let with_routes: Vec<&str> =
            of_kind().filter(|e| e.target_ref.kind == "MeshHTTPRoute").map(|e| e.policy.as_str()).collect();
        // Its items for every service, and one for the service `pass_through` (Universal).
        let for_passthrough = |r: &TargetRef| match r.kind.as_str() {
            "Mesh" | "" => true,
            "MeshService" => r.name.as_deref() == Some(PASSTHROUGH_SERVICE_TAG),
            _ => false,
        };
        let mesh_items =
            of_kind().filter(|e| for_passthrough(&e.target_ref) && !with_routes.contains(&e.policy.as_str()));
        let conf: AccessLogConf = serde_json::from_value(merge_defaults(mesh_items)?).ok()?;
        let effective = Effective { source: self.source(mesh), ..Effective::default() };
        effective.access_log_of(&conf, mesh, PASSTHROUGH_DESTINATION, Protocol::Tcp, "")
    }

    /// What `to: MeshHTTPRoute` items of MeshTimeout, MeshRetry and MeshAccessLog set for the
    /// requests of the route `route` on a service of `protocol`: per kind, when an item names
    /// the route, the merge of the Mesh items and those items, in precedence order (Kuma's
    /// route-level conf; the MeshExternalService items are not part of it). An item names a
    /// route by `name` (its resource name or `kuma.io/display-name`, and `namespace`, defaulting
    /// to the policy's) or by `labels`. `None`: no item names the route.
    pub fn route_level(&self, route: &routes::RouteId, protocol: Protocol) -> Option<runtime::RouteLevel> {
        let (mesh, name) = route.policy.split_once('/')?;
        // Named as a service is: the same name, display name, namespace and labels rules.
        let target = Target {
            mesh,
            name,
            display_name: route.display_name.as_deref().unwrap_or(name),
            namespace: route.namespace.as_deref().unwrap_or_default(),
            labels: &route.labels,
        };
        let names_route = |e: &Entry| {
            e.target_ref.kind == "MeshHTTPRoute" && selects_service(&e.target_ref, e.namespace.as_deref(), &target)
        };
        let merged = |kind: PolicyKind| {
            let entries = || self.entries.iter().filter(move |e| e.kind == kind && e.mesh == mesh);
            if !entries().any(names_route) {
                return None;
            }
            merge_defaults(entries().filter(|e| matches!(e.target_ref.kind.as_str(), "Mesh" | "") || names_route(e)))
        };
        let mut level = runtime::RouteLevel::default();
        if let Some(conf) = merged(PolicyKind::MeshTimeout).and_then(|v| serde_json::from_value(v).ok()) {
            level.timeouts = Some(Effective { mesh_timeout: Some(conf), ..Effective::default() }.timeouts());
        }
        if let Some(conf) = merged(PolicyKind::MeshRetry).and_then(|v| serde_json::from_value(v).ok()) {
            // A route conf that makes no retry policy (`numRetries: 0`, no section for the
            // protocol) leaves the service's in place, as Kuma's `configureRoute`.
            let retry = Effective { mesh_retry: Some(conf), ..Effective::default() }.retry(protocol);
            level.retry = retry.map(std::sync::Arc::new);
        }
        level.access_log = merged(PolicyKind::MeshAccessLog).and_then(|v| serde_json::from_value(v).ok());
        (level.timeouts.is_some() || level.retry.is_some() || level.access_log.is_some()).then_some(level)
    }
}

impl Entry {
    /// Whether this `to: MeshExternalService` item targets `service`.
    fn selects(&self, service: &Target<'_>) -> bool {
        selects_service(&self.target_ref, self.namespace.as_deref(), service)
    }
}

/// The RFC 7396 merge of `entries`' confs in their order (lowest precedence first); `None`
/// when there is none.
fn merge_defaults<'a>(entries: impl Iterator<Item = &'a Entry>) -> Option<serde_json::Value> {
    entries.fold(None, |merged, e| {
        let mut merged = merged.unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        json_patch::merge(&mut merged, &e.default);
        Some(merged)
    })
}

/// Whether a MeshExternalService reference (`name`, with `namespace` defaulting to the
/// policy's, or `labels`) names `service`.
pub fn selects_service(r: &TargetRef, policy_namespace: Option<&str>, service: &Target<'_>) -> bool {
    if let Some(name) = r.name.as_deref().filter(|n| !n.is_empty()) {
        let namespace = r.namespace.as_deref().or(policy_namespace);
        let name_matches = name == service.name || name == service.display_name;
        let namespace_matches = namespace.map_or(true, |ns| service.namespace.is_empty() || ns == service.namespace);
        return name_matches && namespace_matches;
    }
    r.labels.as_ref().is_some_and(|labels| subset(labels, service.labels))
}

fn rank(meta: &Meta, role: Role, top: &TargetRef, item: &TargetRef) -> Rank {
    let dataplane_by_name = match top.kind.as_str() {
        "Dataplane" if top.name.as_deref().is_some_and(|n| !n.is_empty()) => 2,
        "Dataplane" => 1,
        _ => 0,
    };
    let origin = match meta.labels.get(LABEL_ORIGIN).map(String::as_str) {
        Some("global") => 0,
        Some("zone") => 2,
        _ => 1,
    };
    Rank {
        top_kind: kind_rank(&top.kind),
        dataplane_by_name,
        origin,
        role,
        to_kind: kind_rank(&item.kind),
        name: Reverse(meta.labels.get(LABEL_DISPLAY_NAME).cloned().unwrap_or_else(|| meta.name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::load_str;
    use crate::resources::Loaded;
    use std::path::Path;

    fn set(yaml: &str) -> (Vec<Resource>, PolicySet) {
        let mut loaded = Loaded::default();
        load_str(Path::new("test.yaml"), yaml, &mut loaded);
        assert!(!loaded.diagnostics.has_errors(), "{:?}", loaded.diagnostics);
        let set = PolicySet::new(&loaded.resources, None);
        (loaded.resources, set)
    }

    fn effective(set: &PolicySet, name: &str, labels: &Labels) -> Effective {
        let origin = Origin { file: Path::new("x").into(), line: None };
        let target = Target { mesh: "default", name, display_name: name, namespace: "", labels };
        let mut diagnostics = Diagnostics::default();
        let e = set.effective(&target, &origin, &mut diagnostics);
        assert!(diagnostics.0.is_empty(), "{diagnostics:?}");
        e
    }

    /// MeshCircuitBreaker and MeshHealthCheck apply whatever their top-level targetRef selects,
    /// as on Kuma's ZoneEgress, which faces the real endpoints; a MeshTimeout (a sidecar
    /// policy) with the same top-level targetRef is not applied.
    #[test]
    fn endpoint_side_policies_ignore_the_top_level_target_ref() {
        let (_, set) = set(r#"
type: MeshHealthCheck
name: hc
mesh: default
spec:
  targetRef: {kind: Dataplane, name: another-workload}
  to:
  - targetRef: {kind: MeshExternalService, name: httpbin}
    default: {interval: 7s, timeout: 1s, unhealthyThreshold: 2, healthyThreshold: 1, tcp: {}}
---
type: MeshCircuitBreaker
name: cb
mesh: default
spec:
  targetRef: {kind: Mesh, proxyTypes: [Gateway]}
  to:
  - targetRef: {kind: MeshExternalService, name: httpbin}
    default: {connectionLimits: {maxConnections: 7}}
---
type: MeshTimeout
name: t
mesh: default
spec:
  targetRef: {kind: Dataplane, name: another-workload}
  to:
  - targetRef: {kind: MeshExternalService, name: httpbin}
    default: {idleTimeout: 7s}
"#);
        let e = effective(&set, "httpbin", &Labels::new());
        assert_eq!(e.mesh_health_check.unwrap().interval.unwrap().get().as_secs(), 7);
        assert_eq!(e.mesh_circuit_breaker.unwrap().connection_limits.unwrap().max_connections, Some(7));
        assert!(e.mesh_timeout.is_none(), "a sidecar policy for another workload applied");
        assert_eq!(set.ignored.iter().map(|i| i.kind).collect::<Vec<_>>(), ["MeshTimeout"]);
    }

    /// Kuma's `mretry_with_mes` testdata: the MES item overrides the Mesh item field by field,
    /// and lists (retryOn) are kept from the Mesh item since the MES item has none.
    #[test]
    fn mes_item_merges_over_the_mesh_item() {
        let (_, set) = set(r#"
type: MeshRetry
name: mesh-wide
mesh: default
spec:
  targetRef: {kind: Mesh}
  to:
  - targetRef: {kind: MeshExternalService, name: httpbin}
    default: {http: {numRetries: 10, backOff: {baseInterval: 15s, maxInterval: 20m}}}
  - targetRef: {kind: Mesh}
    default: {http: {numRetries: 99, backOff: {baseInterval: 55s}, retryOn: [5xx]}}
"#);
        let e = effective(&set, "httpbin", &Labels::new());
        let http = e.mesh_retry.unwrap().http.unwrap();
        assert_eq!(http.num_retries, Some(10));
        let back_off = http.back_off.unwrap();
        assert_eq!(back_off.base_interval.unwrap().get().as_secs(), 15);
        assert_eq!(back_off.max_interval.unwrap().get().as_secs(), 1200);
        assert_eq!(http.retry_on, Some(vec!["5xx".to_string()]));
        // Merge order: the Mesh item first (lower precedence), then the MES item.
        assert_eq!(
            e.sources.iter().map(|s| s.item.as_str()).collect::<Vec<_>>(),
            ["to[1] Mesh", "to[0] MeshExternalService httpbin"]
        );
        let other = effective(&set, "other", &Labels::new());
        assert_eq!(other.mesh_retry.unwrap().http.unwrap().num_retries, Some(99));
    }

    #[test]
    fn precedence_follows_kumas_sort_and_lists_are_replaced() {
        let (_, set) = set(r#"
type: MeshTimeout
name: bbb
mesh: default
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {connectionTimeout: 1s, idleTimeout: 1m}
---
type: MeshTimeout
name: aaa
mesh: default
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {connectionTimeout: 2s}
---
type: MeshRetry
name: one
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, labels: {team: a}}
    default: {http: {retryOn: [5xx, Reset]}}
---
type: MeshRetry
name: two
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, labels: {team: a}}
    default: {http: {retryOn: [ConnectFailure]}}
"#);
        let labels: Labels = [("team".to_string(), "a".to_string())].into();
        let e = effective(&set, "svc", &labels);
        let timeout = e.mesh_timeout.unwrap();
        // `aaa` outranks `bbb` (reverse lexicographic), so its 2s wins; idleTimeout stays.
        assert_eq!(timeout.connection_timeout.unwrap().get().as_secs(), 2);
        assert_eq!(timeout.idle_timeout.unwrap().get().as_secs(), 60);
        // `one` outranks `two`: its list replaces the other wholesale.
        assert_eq!(e.mesh_retry.unwrap().http.unwrap().retry_on, Some(vec!["5xx".into(), "Reset".into()]));
        assert!(effective(&set, "svc", &Labels::new()).mesh_retry.is_none(), "labels must match");
    }

    #[test]
    fn consumer_policies_select_only_proxies_of_their_namespace() {
        let (_, set) = set(r#"
apiVersion: kuma.io/v1alpha1
kind: Dataplane
metadata: {name: app, namespace: shop, labels: {kuma.io/mesh: default}}
spec: {networking: {address: 10.0.0.1}}
---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: other-team, namespace: billing, labels: {kuma.io/mesh: default}}
spec:
  to: [{targetRef: {kind: MeshExternalService, name: svc}, default: {connectionTimeout: 1s}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: same-team, namespace: shop, labels: {kuma.io/mesh: default}}
spec:
  to: [{targetRef: {kind: MeshExternalService, name: svc}, default: {connectionTimeout: 2s}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: system, namespace: kuma-system, labels: {kuma.io/mesh: default}}
spec:
  to: [{targetRef: {kind: MeshExternalService, name: svc}, default: {idleTimeout: 1m}}]
---
apiVersion: kuma.io/v1alpha1
kind: MeshTimeout
metadata: {name: route-owner, namespace: billing, labels: {kuma.io/mesh: default}}
spec:
  to: [{targetRef: {kind: MeshHTTPRoute, name: r}, default: {http: {requestTimeout: 3s}}}]
"#);
        let e = effective(&set, "svc", &Labels::new());
        let t = e.mesh_timeout.unwrap();
        assert_eq!(t.connection_timeout.unwrap().get().as_secs(), 2);
        assert_eq!(t.idle_timeout.unwrap().get().as_secs(), 60, "system policies select every proxy");
        // Items that all name a route of the policy's namespace make it a producer policy (Kuma's
        // `ComputePolicyRole`), which selects proxies of every namespace.
        assert_eq!(set.ignored().iter().map(|i| i.policy.as_str()).collect::<Vec<_>>(), ["default/other-team"]);
    }

    /// Passthrough is logged by the merge of the mesh's `to: Mesh` MeshAccessLog items, leaving
    /// out a policy with a route item as Kuma's legacy rules do.
    #[test]
    fn passthrough_is_logged_by_the_mesh_items_of_policies_without_route_items() {
        let (_, with_routes) = set(r#"
type: MeshAccessLog
name: everything
mesh: default
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {backends: [{type: File, file: {path: /tmp/all.log}}]}
---
type: MeshAccessLog
name: a-routes
mesh: default
spec:
  to:
  - targetRef: {kind: Mesh}
    default: {backends: [{type: File, file: {path: /tmp/routes.log}}]}
  - targetRef: {kind: MeshHTTPRoute, name: r}
    default: {backends: []}
"#);
        let sinks = |set: &PolicySet| {
            let plan = set.passthrough_access_log().expect("a plan");
            plan.backends.iter().map(|b| format!("{:?}", b.sink)).collect::<Vec<_>>()
        };
        let from_mesh = sinks(&with_routes);
        assert!(from_mesh.len() == 1 && from_mesh[0].contains("/tmp/all.log"), "{from_mesh:?}");
        // A Universal `MeshService` item for `pass_through` ranks above the Mesh items.
        let (_, named) = set(r#"
type: MeshAccessLog
name: everything
mesh: default
spec:
  to:
  - targetRef: {kind: MeshService, name: pass_through}
    default: {backends: [{type: File, file: {path: /tmp/passthrough.log}}]}
  - targetRef: {kind: Mesh}
    default: {backends: [{type: File, file: {path: /tmp/all.log}}]}
  - targetRef: {kind: MeshService, name: backend}
    default: {backends: [{type: File, file: {path: /tmp/backend.log}}]}
"#);
        let named = sinks(&named);
        assert!(named.len() == 1 && named[0].contains("/tmp/passthrough.log"), "{named:?}");
    }

    #[test]
    fn the_role_follows_the_to_items_as_kuma_computes_it() {
        let meta = |namespace: Option<&str>| Meta {
            name: "p".into(),
            mesh: "default".into(),
            labels: namespace.map(|ns| [(LABEL_NAMESPACE.to_string(), ns.to_string())].into()).unwrap_or_default(),
            origin: crate::resources::Origin::flag("test"),
        };
        let to = |kind: &str, name: Option<&str>, namespace: Option<&str>| TargetRef {
            kind: kind.into(),
            name: name.map(Into::into),
            namespace: namespace.map(Into::into),
            ..TargetRef::mesh()
        };
        let shop = meta(Some("shop"));
        let route = to("MeshHTTPRoute", Some("r"), None);
        let service = to("MeshService", Some("s"), Some("shop"));
        assert_eq!(Role::of(&shop, [&route, &service]), Role::Producer);
        assert_eq!(Role::of(&shop, [&to("MeshHTTPRoute", Some("r"), Some("other"))]), Role::Consumer);
        assert_eq!(Role::of(&shop, [&to("MeshHTTPRoute", None, None)]), Role::Consumer, "by labels");
        assert_eq!(Role::of(&shop, [&to("MeshExternalService", Some("x"), None)]), Role::Consumer);
        assert_eq!(Role::of(&shop, []), Role::WorkloadOwner);
        assert_eq!(Role::of(&meta(None), [&route]), Role::System, "Universal");
        assert_eq!(Role::of(&meta(Some("kuma-system")), [&route]), Role::System);
        let mesh = to("Mesh", None, None);
        assert!(Role::refused(&shop, [&route, &mesh], false).is_some_and(|m| m.contains("producer and consumer")));
        assert!(Role::refused(&shop, [&mesh], true).is_some_and(|m| m.contains("'to' and 'from'")));
        assert_eq!(Role::refused(&shop, [&mesh], false), None);
        assert_eq!(Role::refused(&meta(None), [&route, &mesh], true), None, "Universal: no role to compute");
    }

    #[test]
    fn top_level_selection() {
        let (resources, set) = set(r#"
type: Dataplane
name: app-1
mesh: default
labels: {app: web}
networking:
  address: 127.0.0.1
  inbound: [{port: 8080, tags: {kuma.io/service: web, version: v2}}]
---
type: MeshTimeout
name: by-dataplane-labels
mesh: default
spec:
  targetRef: {kind: Dataplane, labels: {app: web}}
  to: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 3s}}]
---
type: MeshTimeout
name: other-dataplane
mesh: default
spec:
  targetRef: {kind: Dataplane, name: app-2}
  to: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 9s}}]
---
type: MeshTimeout
name: subset
mesh: default
spec:
  targetRef: {kind: MeshSubset, tags: {version: v2}}
  to: [{targetRef: {kind: Mesh}, default: {idleTimeout: 7s}}]
---
type: MeshTimeout
name: gateway
mesh: default
spec:
  targetRef: {kind: MeshGateway, name: edge}
  to: [{targetRef: {kind: Mesh}, default: {connectionTimeout: 8s}}]
"#);
        assert_eq!(resources.len(), 5);
        let e = effective(&set, "svc", &Labels::new());
        let t = e.mesh_timeout.unwrap();
        assert_eq!(t.connection_timeout.unwrap().get().as_secs(), 3);
        assert_eq!(t.idle_timeout.unwrap().get().as_secs(), 7);
        let ignored: Vec<&str> = set.ignored().iter().map(|i| i.policy.as_str()).collect();
        assert_eq!(ignored, ["default/other-dataplane", "default/gateway"]);
    }
}
