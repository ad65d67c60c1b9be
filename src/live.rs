//! The live configuration: the catalog plus the per-service runtime state the data path needs
//! (TLS clients and upstreams), swapped atomically on reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls_pki_types::TrustAnchor;

use crate::catalog::{Catalog, Service};
use crate::metrics::{metrics, Counter};
use crate::model::{TlsPolicy, VerificationMode};
use crate::tls::{self, SystemRoots};
use crate::upstream::pool::TlsIdentity;
use crate::upstream::{Settings, TlsSetup, Upstream, UpstreamHandle, UpstreamPolicy};
use crate::worker::{self, Line};

/// One configuration, ready for traffic.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub catalog: Catalog,
    /// Indexed like `catalog.services()`.
    upstreams: Vec<Arc<Upstream>>,
    /// Each upstream's policy as this configuration set it; indexed the same way.
    policies: Vec<Arc<UpstreamPolicy>>,
    tls: TlsClients,
    /// MeshAccessLog backends of passthrough connections and requests.
    pub passthrough_log: Option<Arc<crate::access_log::ServiceLog>>,
    /// Each worker's routes, made on its first request to each service (slot 0: every other
    /// thread): a request clones its own worker's, never an `Arc` every worker writes.
    local: Box<[Line<OnceLock<WorkerRoutes>>]>,
}

/// One worker's routes, indexed like `catalog.services()`, in blocks of [`ROUTE_BLOCK`] made on
/// first use: a worker that serves a few of many services holds a few blocks.
type WorkerRoutes = Box<[OnceLock<Box<[OnceLock<Route>]>>]>;
const ROUTE_BLOCK: usize = 64;

/// The TLS client configuration of every service that originates TLS, built once per
/// configuration and shared by all of its connections.
#[derive(Debug, Default)]
pub struct TlsClients {
    /// Indexed like `catalog.services()`; a reused client keeps its identity.
    clients: Vec<Option<TlsClient>>,
    /// The system roots the clients were built with, when any client uses them.
    system: Option<Arc<RootCertStore>>,
}

impl TlsClients {
    /// Builds the clients of `catalog`'s services, reusing `previous`'s where nothing they are
    /// built from changed (the policy, the protocol, and for system trust the system roots), so
    /// TLS sessions and pooled connections survive a reload. A client that cannot be built
    /// breaks its service, with the reason naming the field.
    pub fn build(catalog: &mut Catalog, system_ca_file: Option<PathBuf>, previous: Option<&Snapshot>) -> Self {
        let previous_system = previous.and_then(|p| p.tls.system.clone());
        let previous_anchors = previous_system.as_ref().map(|s| s.roots.as_slice());
        let roots = SystemRoots::new(system_ca_file).or_previous(previous_system.clone());
        let old: HashMap<String, (&Service, &TlsClient)> = previous
            .map(|p| {
                p.catalog
                    .services()
                    .iter()
                    .zip(&p.tls.clients)
                    .filter_map(|(s, c)| Some((s.key(), (&**s, c.as_ref()?))))
                    .collect()
            })
            .unwrap_or_default();
        // Compared once per configuration, and only if a reusable client trusts the system store.
        let system_unchanged = std::cell::OnceCell::new();
        let mut clients = Vec::with_capacity(catalog.services().len());
        let mut broken = Vec::new();
        for (index, service) in catalog.services().iter().enumerate() {
            let Some(policy) = service.tls.as_ref().filter(|_| service.broken.is_none()) else {
                clients.push(None);
                continue;
            };
            let system_trust = uses_system_roots(policy);
            let reusable = old.get(&service.key()).filter(|(o, _)| {
                o.tls.as_ref() == Some(policy)
                    && o.protocol == service.protocol
                    && (!system_trust || *system_unchanged.get_or_init(|| previous_anchors == system_anchors(&roots)))
            });
            match reusable {
                Some((_, client)) => clients.push(Some((*client).clone())),
                None => match tls::client_config(policy, service.protocol, &roots) {
                    Ok(config) => clients.push(Some(TlsClient::new(config))),
                    Err(reason) => {
                        broken.push((index, reason));
                        clients.push(None);
                    }
                },
            }
        }
        for (index, reason) in broken {
            catalog.mark_broken(index, reason);
        }
        Self { clients, system: roots.loaded().cloned() }
    }

    /// The client of the service at `index` in the catalog it was built for.
    pub fn get(&self, index: usize) -> Option<&Arc<ClientConfig>> {
        self.client(index).map(|c| &c.config)
    }

    /// The identity of that client (plaintext's, when the service has none).
    pub fn identity(&self, index: usize) -> TlsIdentity {
        self.client(index).map(|c| c.identity).unwrap_or_default()
    }

    fn client(&self, index: usize) -> Option<&TlsClient> {
        self.clients.get(index).and_then(Option::as_ref)
    }
}

/// A service's TLS client configuration and its identity in pool keys, which only a new
/// configuration gets a new one of: the two never part.
#[derive(Debug, Clone)]
struct TlsClient {
    config: Arc<ClientConfig>,
    identity: TlsIdentity,
}

impl TlsClient {
    fn new(config: Arc<ClientConfig>) -> Self {
        Self { config, identity: TlsIdentity::fresh() }
    }
}

/// Secured and SkipSAN without `caCert` trust the system store.
fn uses_system_roots(policy: &TlsPolicy) -> bool {
    policy.ca.is_none() && matches!(policy.mode, VerificationMode::Secured | VerificationMode::SkipSAN)
}

/// Loads the system roots (once per configuration) and returns them; `None` when they cannot be.
fn system_anchors(roots: &SystemRoots) -> Option<&[TrustAnchor<'static>]> {
    roots.get().ok()?;
    roots.loaded().map(|s| s.roots.as_slice())
}

/// How a connection (and, for HTTP, each of its requests) finds its service in the snapshot
/// current at that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKey {
    /// A Dataplane outbound, by its listener address.
    Outbound(SocketAddr),
    /// A VIP listener address, or a transparent connection's original destination.
    Vip(SocketAddr),
}

/// A service as a connection or request holds on to it once the snapshot is released. One per
/// worker and configuration ([`Snapshot::route`]), so that cloning and dropping it for every
/// request writes a reference count on a cache line only its worker writes: on a machine with
/// many cores, an `Arc` every worker clones is a line that moves between them on each request.
#[derive(Debug, Clone)]
pub struct Route(Arc<RouteParts>);

/// Aligned to a cache line, so the line of the reference counts before it holds nothing else.
#[derive(Debug)]
#[repr(align(64))]
pub struct RouteParts {
    pub service: Arc<Service>,
    pub upstream: Arc<Upstream>,
    /// The upstream's policy as the route's configuration set it.
    pub policy: Arc<UpstreamPolicy>,
    tls_client: Option<TlsClient>,
    /// The service's MeshHTTPRoute counters, of this worker's route.
    pub rule_counters: RuleCounters,
}

/// The requests each MeshHTTPRoute rule of a service sent each way (`route_requests_total`):
/// per rule, one counter per backend and one for the service itself or the rule's redirect.
/// Each is taken from the registry on its first request, so that later ones neither build
/// labels nor lock the registry, which every worker shares.
#[derive(Debug, Default)]
pub struct RuleCounters(Box<[Box<[OnceLock<Counter>]>]>);

impl RuleCounters {
    fn of(service: &Service) -> Self {
        let rules = service.routes.as_ref().and_then(|r| r.http.as_ref()).map_or(&[][..], |t| &t.rules[..]);
        let slots = |backends: usize| std::iter::repeat_with(OnceLock::new).take(backends + 1).collect();
        Self(rules.iter().map(|rule| slots(rule.backends.len())).collect())
    }

    /// Counts a request of rule `rule` (an index in the service's rules) sent to its backend
    /// at `backend` (`None`: to the service itself, or answered by the rule's redirect), the
    /// counter labelled by `labels` (service, rule, backend) on first use.
    pub fn count(&self, rule: usize, backend: Option<usize>, labels: impl FnOnce() -> [String; 3]) {
        let slot = self.0.get(rule).and_then(|slots| slots.get(backend.unwrap_or(slots.len() - 1)));
        debug_assert!(slot.is_some(), "rule {rule} / backend {backend:?} is not the service's");
        let Some(slot) = slot else { return };
        slot.get_or_init(|| {
            let [service, route, backend] = labels();
            metrics().route_counter(&service, &route, &backend)
        })
        .inc();
    }
}

impl Deref for Route {
    type Target = RouteParts;

    fn deref(&self) -> &RouteParts {
        &self.0
    }
}

impl AsRef<Upstream> for RouteParts {
    fn as_ref(&self) -> &Upstream {
        &self.upstream
    }
}

impl Route {
    /// What TLS origination needs, when the service originates TLS.
    pub fn tls(&self) -> Option<TlsSetup<'_>> {
        let (policy, client) = self.service.tls.as_ref().zip(self.tls_client.as_ref())?;
        Some(TlsSetup { policy, config: &client.config, identity: client.identity })
    }

    /// A handle on the upstream through this route, for what a request holds until its
    /// response ends.
    pub fn upstream_handle(&self) -> UpstreamHandle {
        UpstreamHandle::new(self.0.clone())
    }
}

impl Snapshot {
    /// Builds upstreams for `catalog`, reusing those of `previous` whose service kept its
    /// endpoints (their DNS answers, health and pooled connections carry over).
    pub fn new(catalog: Catalog, tls: TlsClients, previous: Option<&Snapshot>, settings: &Arc<Settings>) -> Self {
        let mut reusable: HashMap<String, &Arc<Upstream>> = HashMap::new();
        if let Some(prev) = previous {
            for (service, upstream) in prev.catalog.services().iter().zip(&prev.upstreams) {
                reusable.insert(service.key(), upstream);
            }
        }
        let (upstreams, policies) = catalog
            .services()
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let key = s.key();
                let mut policy = UpstreamPolicy::new(settings, &s.policies, s.protocol, &key);
                policy.start_rule_access_logs(s);
                policy.tls = s.tls.clone().zip(tls.get(index).cloned());
                let up = match reusable.get(&key) {
                    Some(up) if up.endpoints() == s.endpoints.as_slice() && up.protocol() == s.protocol => {
                        up.set_policy(policy);
                        Arc::clone(up)
                    }
                    _ => Upstream::new(Arc::from(key), s.protocol, s.endpoints.clone(), settings.clone(), policy),
                };
                // Connections made under other TLS settings must never serve this
                // configuration's requests: the pool key already tells them apart; this closes
                // them, and keeps requests still under the old settings from pooling theirs.
                up.pool.use_tls(tls.identity(index));
                let policy = up.policy_arc();
                (up, policy)
            })
            .unzip();
        let local = std::iter::repeat_with(Line::default).take(worker::slots()).collect();
        let passthrough_log =
            catalog.passthrough_access_log().and_then(|plan| crate::access_log::ServiceLog::start("passthrough", plan));
        Self { catalog, upstreams, policies, tls, passthrough_log, local }
    }

    /// The route of the service at `index` in the catalog (a route's backend).
    pub fn route_by_index(&self, index: usize) -> Option<Route> {
        self.route_at(index)
    }

    /// This worker's route of the service at `index`, made on first use.
    fn route_at(&self, index: usize) -> Option<Route> {
        let make = self.route_maker(index)?;
        if self.local.is_empty() {
            return Some(make()); // a snapshot not built by `new`
        }
        let Line(table) = &self.local[worker::slot_in(self.local.len())];
        let blocks =
            || std::iter::repeat_with(OnceLock::new).take(self.upstreams.len().div_ceil(ROUTE_BLOCK)).collect();
        let block = table.get_or_init(blocks).get(index / ROUTE_BLOCK)?;
        let block = block.get_or_init(|| std::iter::repeat_with(OnceLock::new).take(ROUTE_BLOCK).collect());
        Some(block.get(index % ROUTE_BLOCK)?.get_or_init(make).clone())
    }

    /// What makes a route of the service at `index` (`None`: there is none).
    fn route_maker(&self, index: usize) -> Option<impl FnOnce() -> Route + '_> {
        let (service, upstream) = (self.catalog.service(index)?, self.upstreams.get(index)?);
        let policy = self.policies.get(index)?;
        Some(move || {
            Route(Arc::new(RouteParts {
                service: service.clone(),
                upstream: upstream.clone(),
                policy: policy.clone(),
                tls_client: self.tls.client(index).cloned(),
                rule_counters: RuleCounters::of(service),
            }))
        })
    }

    /// The service behind a listener address (outbound) or a destination (VIP:port).
    pub fn route(&self, key: RouteKey) -> Option<Route> {
        let index = match key {
            RouteKey::Vip(addr) => self.catalog.index_by_vip(addr)?,
            RouteKey::Outbound(addr) => self.catalog.outbounds().iter().find(|o| o.address == addr)?.service,
        };
        self.route_at(index)
    }

    /// Every service with its upstream (for the admin API; made for the caller, not kept).
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        (0..self.catalog.services().len()).filter_map(|index| self.route_maker(index).map(|make| make()))
    }
}

/// The current snapshot; readers never block, a reload replaces it whole.
pub type Live = ArcSwap<Snapshot>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{self, CompileOptions, Ipam};

    fn catalog(tls: &str) -> Catalog {
        let mut loaded = crate::resources::Loaded::default();
        let yaml = format!("type: MeshExternalService\nname: httpbin\nspec:\n  match: {{port: 80, protocol: http}}\n  endpoints: [{{address: 10.0.0.1, port: 80}}]\n{tls}");
        crate::resources::load_str(std::path::Path::new("t.yaml"), &yaml, &mut loaded);
        assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
        let options = CompileOptions::default();
        catalog::compile(&loaded.resources, &options, &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap())).catalog
    }

    fn snapshot() -> Snapshot {
        let mut snapshot = Snapshot::new(catalog(""), TlsClients::default(), None, &Arc::default());
        // Two workers and the control plane (`worker::set_workers` is process-wide).
        snapshot.local = std::iter::repeat_with(Line::default).take(3).collect();
        snapshot
    }

    /// What a request writes to hold its service: each worker clones a route of its own, on a
    /// cache line of its own, and no clone (of the route, of its upstream handle, with a
    /// request slot) writes the reference counts every worker shares. The request slot's
    /// count is written by all workers by meaning (`maxRequests` is the service's).
    #[test]
    fn each_worker_clones_a_route_of_its_own() {
        let snapshot = snapshot();
        let shared =
            |r: &Route| (Arc::strong_count(&r.service), Arc::strong_count(&r.upstream), Arc::strong_count(&r.policy));
        let control = snapshot.route_by_index(0).unwrap();
        let ready = std::sync::Barrier::new(2);
        let routes: Vec<usize> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|index| {
                    let (snapshot, ready) = (&snapshot, &ready);
                    s.spawn(move || {
                        worker::enter(index);
                        let first = snapshot.route_by_index(0).unwrap();
                        ready.wait(); // both workers made theirs: the shared counts stay put now
                        let before = shared(&first);
                        let held: Vec<(Route, UpstreamHandle)> = (0..100)
                            .map(|_| {
                                let route = snapshot.route_by_index(0).unwrap();
                                let handle = route.upstream_handle();
                                (route, handle)
                            })
                            .collect();
                        let slot = held[0].1.request_slot().unwrap();
                        assert!(held.iter().all(|(route, _)| Arc::ptr_eq(&route.0, &first.0)));
                        assert_eq!(Arc::strong_count(&first.0), 2 + 2 * 100 + 1, "the table's, these and the slot's");
                        assert_eq!(shared(&first), before, "a request wrote a count every worker shares");
                        drop((slot, held));
                        ready.wait();
                        Arc::as_ptr(&first.0) as usize
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let all = [routes[0], routes[1], Arc::as_ptr(&control.0) as usize];
        assert!(all.iter().all(|address| address % 64 == 0), "each route's counts have a line of their own");
        assert!(all[0] != all[1] && all[1] != all[2] && all[0] != all[2], "one route per worker: {all:?}");
    }

    /// Pool keys tell TLS clients apart by an identity that a reload keeps for a client it
    /// reuses (its pooled connections stay usable) and that a rebuilt client never shares with
    /// any earlier one, even once that one is freed.
    #[test]
    fn a_tls_client_keeps_its_identity_only_while_it_is_reused() {
        let tls = |server: &str| {
            format!("  tls:\n    enabled: true\n    verification:\n      mode: SkipAll\n      serverName: {server}\n")
        };
        let build = |tls: &str, previous: Option<&Snapshot>| {
            let mut catalog = catalog(tls);
            let clients = TlsClients::build(&mut catalog, None, previous);
            Snapshot::new(catalog, clients, previous, &Arc::default())
        };
        let first = build(&tls("a.test"), None);
        let identity = first.tls.identity(0);
        assert_ne!(identity, TlsIdentity::default(), "a TLS client is not plaintext");
        let same = build(&tls("a.test"), Some(&first));
        assert_eq!(same.tls.identity(0), identity, "an unchanged client is reused with its identity");
        let mut seen = vec![identity];
        let mut previous = same;
        for server in ["b.test", "a.test", "b.test"] {
            let next = build(&tls(server), Some(&previous));
            assert!(!seen.contains(&next.tls.identity(0)), "{server}: a rebuilt client took an old identity");
            seen.push(next.tls.identity(0));
            previous = next;
        }
        let plain = build("", Some(&previous));
        assert_eq!(plain.tls.identity(0), TlsIdentity::default());
    }

    /// A MeshHTTPRoute rule counts each way its requests go (each backend; the service itself
    /// or the rule's redirect) in a counter of its own, labelled when first used.
    #[test]
    fn route_rules_count_each_way_in_a_counter_of_its_own() {
        let yaml = "---\ntype: MeshHTTPRoute\nname: split\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: httpbin}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /a}}]\n      default: {backendRefs: [{kind: MeshExternalService, name: httpbin, weight: 1}, {kind: MeshExternalService, name: httpbin, weight: 1}]}\n";
        let snapshot = Snapshot::new(catalog(yaml), TlsClients::default(), None, &Arc::default());
        let route = snapshot.route_by_index(0).unwrap();
        assert_eq!(route.rule_counters.0.len(), 1, "{:?}", route.service.routes);
        let count = |backend: Option<usize>, label: &str| {
            let labels = || ["counted/svc".to_string(), "split rules[0]".to_string(), label.to_string()];
            route.rule_counters.count(0, backend, labels);
        };
        count(Some(0), "first");
        count(Some(1), "second");
        count(Some(1), "not relabelled");
        count(None, "itself");
        let text = metrics().encode();
        let value = |backend: &str| {
            text.lines()
                .find(|l| l.contains("service=\"counted/svc\"") && l.contains(&format!("backend=\"{backend}\"")))
                .map(|l| l.rsplit(' ').next().unwrap().to_string())
        };
        assert_eq!(value("first").as_deref(), Some("1"));
        assert_eq!(value("second").as_deref(), Some("2"));
        assert_eq!(value("itself").as_deref(), Some("1"));
        assert_eq!(value("not relabelled"), None);
    }

    /// A request routed by a configuration gets that configuration's policy, even when the
    /// next one, which keeps the upstream and sets it a new policy, is already built.
    #[test]
    fn a_route_holds_its_own_configuration_s_policy() {
        let first = Snapshot::new(catalog(""), TlsClients::default(), None, &Arc::default());
        let next = Snapshot::new(catalog(""), TlsClients::default(), Some(&first), &Arc::default());
        assert!(Arc::ptr_eq(&first.upstreams[0], &next.upstreams[0]), "the upstream is kept");
        let (old, new) = (first.route_by_index(0).unwrap(), next.route_by_index(0).unwrap());
        assert!(Arc::ptr_eq(&old.policy, &first.policies[0]) && Arc::ptr_eq(&new.policy, &next.policies[0]));
        assert!(!Arc::ptr_eq(&old.policy, &new.policy));
        assert!(Arc::ptr_eq(&new.upstream.policy_arc(), &new.policy), "the upstream holds the newest");
    }

    /// A reload that gives a service a new TLS client gives its health check a new task, whose
    /// kept connections (`reuseConnection`) are made under the new TLS settings; one that keeps
    /// the client keeps the task.
    #[test]
    fn a_new_tls_client_restarts_the_health_check() {
        let config = |server: &str| {
            format!("  tls:\n    enabled: true\n    verification:\n      mode: SkipAll\n      serverName: {server}\n---\ntype: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{interval: 1h, http: {{path: /}}}}\n")
        };
        let build = |server: &str, previous: Option<&Snapshot>| {
            let mut catalog = catalog(&config(server));
            let clients = TlsClients::build(&mut catalog, None, previous);
            Snapshot::new(catalog, clients, previous, &Arc::default())
        };
        let check = |s: &Snapshot| s.upstreams[0].policy().health_check.clone().expect("a health check");
        let first = build("a.test", None);
        let before = check(&first);
        let kept = build("a.test", Some(&first));
        assert!(Arc::ptr_eq(&before, &check(&kept)), "same check, same TLS client: the task stays");
        let moved = build("b.test", Some(&kept));
        assert!(Arc::ptr_eq(&first.upstreams[0], &moved.upstreams[0]), "the upstream is kept");
        assert!(!Arc::ptr_eq(&before, &check(&moved)), "a new TLS client: a new task");
    }
}
