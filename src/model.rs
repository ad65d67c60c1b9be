//! The vocabulary every layer shares: protocols, endpoints, TLS policy and the address a
//! connection goes to. Plain data, no behaviour beyond parsing and printing; the bottom layer.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Resource labels (and Dataplane tags), ordered for stable output.
pub type Labels = BTreeMap<String, String>;

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

/// Where a connection goes: an address from an IP or DNS endpoint, or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    Socket(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}
