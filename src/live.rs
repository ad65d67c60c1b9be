//! The live configuration: the catalog plus the per-service runtime state the data path needs
//! (TLS clients and upstreams), swapped atomically on reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ClientConfig;
use rustls_pki_types::TrustAnchor;

use crate::catalog::{Catalog, Service};
use crate::model::{TlsPolicy, VerificationMode};
use crate::tls::{self, SystemRoots};
use crate::upstream::pool::TlsIdentity;
use crate::upstream::{Settings, TlsSetup, Upstream, UpstreamPolicy};

/// One configuration, ready for traffic.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub catalog: Catalog,
    /// Indexed like `catalog.services()`.
    upstreams: Vec<Arc<Upstream>>,
    tls: TlsClients,
}

/// The TLS client configuration of every service that originates TLS, built once per
/// configuration and shared by all of its connections.
#[derive(Debug, Default)]
pub struct TlsClients {
    /// Indexed like `catalog.services()`.
    clients: Vec<Option<Arc<ClientConfig>>>,
    /// The system trust anchors the clients were built with, when any client uses them.
    system: Option<Vec<TrustAnchor<'static>>>,
}

impl TlsClients {
    /// Builds the clients of `catalog`'s services, reusing `previous`'s where nothing they are
    /// built from changed (the policy, the protocol, and for system trust the system roots), so
    /// TLS sessions and pooled connections survive a reload. A client that cannot be built
    /// breaks its service, with the reason naming the field.
    pub fn build(catalog: &mut Catalog, system_ca_file: Option<PathBuf>, previous: Option<&Snapshot>) -> Self {
        let roots = SystemRoots::new(system_ca_file);
        let old: HashMap<String, (&Service, &Arc<ClientConfig>)> = previous
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
                    && (!system_trust
                        || *system_unchanged
                            .get_or_init(|| previous.and_then(|p| p.tls.system.as_deref()) == system_anchors(&roots)))
            });
            match reusable {
                Some((_, client)) => clients.push(Some(Arc::clone(client))),
                None => match tls::client_config(policy, service.protocol, &roots) {
                    Ok(client) => clients.push(Some(client)),
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
        Self { clients, system: roots.loaded().map(<[_]>::to_vec) }
    }

    /// The client of the service at `index` in the catalog it was built for.
    pub fn get(&self, index: usize) -> Option<&Arc<ClientConfig>> {
        self.clients.get(index).and_then(Option::as_ref)
    }
}

/// Secured and SkipSAN without `caCert` trust the system store.
fn uses_system_roots(policy: &TlsPolicy) -> bool {
    policy.ca.is_none() && matches!(policy.mode, VerificationMode::Secured | VerificationMode::SkipSAN)
}

/// Loads the system roots (once per configuration) and returns them; `None` when they cannot be.
fn system_anchors(roots: &SystemRoots) -> Option<&[TrustAnchor<'static>]> {
    roots.get().ok()?;
    roots.loaded()
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

/// A service as a connection or request holds on to it once the snapshot is released: its
/// compiled settings, its upstream and its TLS client.
#[derive(Debug, Clone)]
pub struct Route {
    pub service: Arc<Service>,
    pub upstream: Arc<Upstream>,
    tls_client: Option<Arc<ClientConfig>>,
}

impl Route {
    /// What TLS origination needs, when the service originates TLS.
    pub fn tls(&self) -> Option<TlsSetup<'_>> {
        self.service.tls.as_ref().zip(self.tls_client.as_ref()).map(|(policy, config)| TlsSetup { policy, config })
    }
}

impl Snapshot {
    /// Builds upstreams for `catalog`, reusing those of `previous` whose service kept its
    /// endpoints (their DNS answers, health and pooled connections carry over).
    pub fn new(catalog: Catalog, tls: TlsClients, previous: Option<&Snapshot>, settings: &Arc<Settings>) -> Self {
        let mut reusable: HashMap<String, (&Arc<Upstream>, Option<&Arc<ClientConfig>>)> = HashMap::new();
        if let Some(prev) = previous {
            for (index, (service, upstream)) in prev.catalog.services().iter().zip(&prev.upstreams).enumerate() {
                reusable.insert(service.key(), (upstream, prev.tls.get(index)));
            }
        }
        let upstreams = catalog
            .services()
            .iter()
            .enumerate()
            .map(|(index, s)| {
                let key = s.key();
                let mut policy = UpstreamPolicy::new(settings, &s.policies, s.protocol, &key);
                policy.tls = s.tls.clone().zip(tls.get(index).cloned());
                match reusable.get(&key) {
                    Some((up, old_tls)) if up.endpoints() == s.endpoints.as_slice() && up.protocol() == s.protocol => {
                        // Connections made under other TLS settings must never serve this
                        // configuration's requests: the pool key already tells them apart;
                        // this closes them.
                        if TlsIdentity::of(*old_tls) != TlsIdentity::of(tls.get(index)) {
                            up.pool.clear();
                        }
                        up.set_policy(policy);
                        Arc::clone(up)
                    }
                    _ => Upstream::new(Arc::from(key), s.protocol, s.endpoints.clone(), settings.clone(), policy),
                }
            })
            .collect();
        Self { catalog, upstreams, tls }
    }

    /// The route of the service at `index` in the catalog (a route's backend).
    pub fn route_by_index(&self, index: usize) -> Option<Route> {
        self.route_at(index)
    }

    fn route_at(&self, index: usize) -> Option<Route> {
        Some(Route {
            service: self.catalog.service(index)?.clone(),
            upstream: self.upstreams.get(index)?.clone(),
            tls_client: self.tls.get(index).cloned(),
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

    /// Every service with its upstream (for the admin API).
    pub fn routes(&self) -> impl Iterator<Item = Route> + '_ {
        (0..self.catalog.services().len()).filter_map(|index| self.route_at(index))
    }
}

/// The current snapshot; readers never block, a reload replaces it whole.
pub type Live = ArcSwap<Snapshot>;
