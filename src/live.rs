//! The live configuration: the catalog plus the per-service runtime state the data path needs,
//! swapped atomically on reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::catalog::{Catalog, Service};
use crate::upstream::pool::TlsIdentity;
use crate::upstream::{Settings, Upstream};

/// One configuration, ready for traffic.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub catalog: Catalog,
    /// Indexed like `catalog.services()`.
    upstreams: Vec<Arc<Upstream>>,
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

/// What a listener found for a connection.
pub struct Route<'a> {
    pub service: &'a Arc<Service>,
    pub upstream: &'a Arc<Upstream>,
}

impl Snapshot {
    /// Builds upstreams for `catalog`, reusing those of `previous` whose service kept its
    /// endpoints (their DNS answers, health and pooled connections carry over), and the TLS
    /// clients of services whose TLS settings did not change.
    pub fn new(mut catalog: Catalog, previous: Option<&Snapshot>, settings: &Arc<Settings>) -> Self {
        if let Some(prev) = previous {
            catalog.reuse_tls_clients(&prev.catalog);
        }
        let mut reusable: HashMap<String, (&Arc<Service>, &Arc<Upstream>)> = HashMap::new();
        if let Some(prev) = previous {
            for (service, upstream) in prev.catalog.services().iter().zip(&prev.upstreams) {
                reusable.insert(service.key(), (service, upstream));
            }
        }
        let upstreams = catalog
            .services()
            .iter()
            .map(|s| {
                let key = s.key();
                match reusable.get(&key) {
                    Some((old, up)) if up.endpoints() == s.endpoints.as_slice() && up.protocol() == s.protocol => {
                        // Connections made under other TLS settings must never serve this
                        // configuration's requests: the pool key already tells them apart;
                        // this closes them.
                        if TlsIdentity::of(old.tls_client.as_ref()) != TlsIdentity::of(s.tls_client.as_ref()) {
                            up.pool.clear();
                        }
                        Arc::clone(up)
                    }
                    _ => Upstream::new(Arc::from(key), s.protocol, s.endpoints.clone(), settings.clone()),
                }
            })
            .collect();
        Self { catalog, upstreams }
    }

    /// The service behind a listener address (outbound) or a destination (VIP:port).
    pub fn route(&self, key: RouteKey) -> Option<Route<'_>> {
        let index = match key {
            RouteKey::Vip(addr) => self.catalog.index_by_vip(addr)?,
            RouteKey::Outbound(addr) => self.catalog.outbounds().iter().find(|o| o.address == addr)?.service,
        };
        Some(Route { service: self.catalog.service(index)?, upstream: self.upstreams.get(index)? })
    }

    /// Every service with its upstream (for the admin API).
    pub fn routes(&self) -> impl Iterator<Item = Route<'_>> {
        self.catalog.services().iter().zip(&self.upstreams).map(|(service, upstream)| Route { service, upstream })
    }
}

/// The current snapshot; readers never block, a reload replaces it whole.
pub type Live = ArcSwap<Snapshot>;
