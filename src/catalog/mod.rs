//! The compiled, immutable view of a configuration that the data path reads.
//!
//! Everything a connection needs (which service a listener address belongs to, its endpoints,
//! its TLS material, whether access is allowed) is computed here once per configuration.

mod compile;
pub mod extension;
pub mod ipam;
mod material;
mod view;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

pub use compile::{compile, CompileOptions, Compiled, SYSTEM_CA_ENV};
pub use ipam::Ipam;
pub use view::ServiceView;

pub use crate::model::{
    ClientIdentity, Endpoint, EndpointAddress, Protocol, SanMatch, TlsPolicy, TlsVersion, TrustSource, VerificationMode,
};

use crate::policy::passthrough::Passthrough;
use crate::policy::routes::ServiceRoutes;
use crate::policy::runtime::AccessLogPlan;
use crate::policy::{Effective, Ignored};
use crate::resources::{Labels, Origin};

pub use crate::policy::permission::Access;

/// A status condition, as Kuma reports on `status.hostnameGenerators[].conditions`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    /// The HostnameGenerator the condition is about.
    pub generator: String,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub mesh: String,
    pub display_name: String,
    pub namespace: String,
    pub labels: Labels,
    pub origin: Origin,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub tls: Option<TlsPolicy>,
    /// `spec.extension.type`, when the service is driven by an extension.
    pub extension: Option<String>,
    pub access: Access,
    /// What decided `access` (a MeshTrafficPermission item, or the Mesh switch).
    pub access_by: Option<String>,
    pub vip: Option<IpAddr>,
    pub hostnames: Vec<String>,
    pub conditions: Vec<Condition>,
    /// Why the service cannot carry traffic (missing secret, bad certificate, no VIP, ...).
    pub broken: Option<String>,
    /// The policies that apply to it, merged.
    pub policies: Arc<Effective>,
    /// MeshHTTPRoute / MeshTCPRoute rules, with backends resolved to this catalog's services.
    pub routes: Option<Arc<ServiceRoutes>>,
}

impl Service {
    /// `mesh/name`: unique within a catalog.
    pub fn key(&self) -> String {
        format!("{}/{}", self.mesh, self.name)
    }
}

/// A listener the application dials by hand (Dataplane `networking.outbound`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub address: SocketAddr,
    pub dataplane: String,
    pub service: usize,
}

#[derive(Debug, Default)]
pub struct Catalog {
    services: Vec<Arc<Service>>,
    by_vip: HashMap<SocketAddr, usize>,
    by_hostname: HashMap<String, usize>,
    outbounds: Vec<Outbound>,
    ignored_policies: Vec<Ignored>,
    passthrough: Arc<Passthrough>,
    passthrough_access_log: Option<AccessLogPlan>,
}

impl Catalog {
    /// MeshPassthrough, merged: what the transparent listener does with other destinations.
    pub fn passthrough(&self) -> &Arc<Passthrough> {
        &self.passthrough
    }

    /// MeshAccessLog for passthrough connections and requests (the mesh's `to: Mesh` items).
    pub fn passthrough_access_log(&self) -> Option<&AccessLogPlan> {
        self.passthrough_access_log.as_ref()
    }

    /// Policies that select no part of this sidecar, and why.
    pub fn ignored_policies(&self) -> &[Ignored] {
        &self.ignored_policies
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    pub fn service(&self, index: usize) -> Option<&Arc<Service>> {
        self.services.get(index)
    }

    /// The service listening on `VIP:port`, for VIP and transparent listeners.
    pub fn by_vip(&self, addr: SocketAddr) -> Option<&Arc<Service>> {
        self.index_by_vip(addr).map(|i| &self.services[i])
    }

    pub fn index_by_vip(&self, addr: SocketAddr) -> Option<usize> {
        self.by_vip.get(&addr).copied()
    }

    /// The service a generated hostname belongs to; `name` must be lowercase, without a final dot.
    pub fn by_hostname(&self, name: &str) -> Option<&Arc<Service>> {
        self.by_hostname.get(name).map(|&i| &self.services[i])
    }

    pub fn vip_listeners(&self) -> impl Iterator<Item = (SocketAddr, &Arc<Service>)> {
        self.by_vip.iter().map(|(addr, &i)| (*addr, &self.services[i]))
    }

    pub fn outbounds(&self) -> &[Outbound] {
        &self.outbounds
    }

    /// Takes a service out of traffic (for problems found past compiling, such as TLS material
    /// the TLS library refuses).
    pub fn mark_broken(&mut self, index: usize, reason: String) {
        if let Some(service) = self.services.get_mut(index) {
            let service = Arc::make_mut(service);
            service.broken = service.broken.take().or(Some(reason));
        }
    }
}
