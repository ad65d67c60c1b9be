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
use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use compile::{compile, CompileOptions, Compiled};
pub use ipam::Ipam;
pub use view::ServiceView;

use crate::resources::{Labels, Origin};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "tcp" => Self::Tcp,
            "http" => Self::Http,
            "http2" => Self::Http2,
            "grpc" => Self::Grpc,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
            Self::Http2 => "http2",
            Self::Grpc => "grpc",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(IpAddr),
    Dns(String),
    Unix(PathBuf),
}

impl std::fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ip(ip) => write!(f, "{ip}"),
            Self::Dns(name) => f.write_str(name),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: EndpointAddress,
    /// 0 for unix sockets.
    pub port: u16,
    /// Lower is preferred.
    pub priority: u8,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.address {
            EndpointAddress::Unix(_) => write!(f, "{}", self.address),
            EndpointAddress::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            other => write!(f, "{other}:{}", self.port),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum TlsVersion {
    #[serde(rename = "TLS12")]
    Tls12,
    #[serde(rename = "TLS13")]
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum VerificationMode {
    Secured,
    SkipSAN,
    SkipCA,
    SkipAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(tag = "type", content = "value")]
pub enum SanMatch {
    Exact(String),
    Prefix(String),
}

/// Where trust comes from when `caCert` is not set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum TrustSource {
    /// `caCert` of the resource.
    Configured,
    /// The OS store, or the file in `KUMA_DATAPLANE_RUNTIME_DYNAMIC_SYSTEM_CA_PATH`.
    System,
}

/// A client certificate chain and its key. The key is never printed.
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity").field("chain_len", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

/// TLS origination settings of one service, with its certificate material already parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsPolicy {
    pub min: TlsVersion,
    pub max: TlsVersion,
    pub mode: VerificationMode,
    pub server_name: Option<String>,
    pub subject_alt_names: Vec<SanMatch>,
    pub ca: Option<Vec<CertificateDer<'static>>>,
    pub client: Option<ClientIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Access {
    Allowed,
    /// The Mesh sets `routing.defaultForbidMeshExternalServiceAccess: true`.
    Forbidden,
}

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
    /// Built from `tls` once per configuration; shared by every connection of the service.
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
    /// `spec.extension.type`, when the service is driven by an extension.
    pub extension: Option<String>,
    pub access: Access,
    pub vip: Option<IpAddr>,
    pub hostnames: Vec<String>,
    pub conditions: Vec<Condition>,
    /// Why the service cannot carry traffic (missing secret, bad certificate, no VIP, ...).
    pub broken: Option<String>,
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
}

impl Catalog {
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

    /// Keeps the previous configuration's TLS client for services whose TLS settings did not
    /// change, so their pooled connections (keyed by it) and TLS sessions survive a reload.
    pub fn reuse_tls_clients(&mut self, previous: &Catalog) {
        let old: HashMap<String, &Arc<Service>> = previous.services.iter().map(|s| (s.key(), s)).collect();
        for service in &mut self.services {
            let Some(old) = old.get(&service.key()) else { continue };
            let same = old.tls == service.tls && old.protocol == service.protocol;
            if same && old.tls_client.is_some() && service.tls_client.is_some() {
                Arc::make_mut(service).tls_client = old.tls_client.clone();
            }
        }
    }
}
