//! A printable view of a compiled service, for `inspect` and the admin API. Holds no secrets.

use std::net::IpAddr;

use serde::Serialize;

use crate::policy::routes::{HttpRule, TcpRoute};
use crate::policy::Effective;

use super::{Access, Condition, Protocol, SanMatch, Service, TlsVersion, TrustSource, VerificationMode};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub name: String,
    pub mesh: String,
    pub hostnames: Vec<String>,
    pub vip: Option<IpAddr>,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<EndpointView>,
    pub tls: Option<TlsView>,
    pub extension: Option<String>,
    pub access: Access,
    /// What decided `access` (a MeshTrafficPermission item, or the Mesh switch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_by: Option<String>,
    pub conditions: Vec<Condition>,
    pub broken: Option<String>,
    /// The merged policies and the items they came from (absent when none applies).
    #[serde(skip_serializing_if = "Effective::is_empty")]
    pub policies: Effective,
    /// MeshHTTPRoute rules in match order's rules, and the MeshTCPRoute.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<RoutesView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoutesView {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpRoute>,
}

impl PartialEq for RoutesView {
    fn eq(&self, other: &Self) -> bool {
        self.http.iter().map(|r| &r.name).eq(other.http.iter().map(|r| &r.name)) && self.tcp == other.tcp
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EndpointView {
    pub address: String,
    pub priority: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsView {
    pub mode: VerificationMode,
    pub min: TlsVersion,
    pub max: TlsVersion,
    pub server_name: Option<String>,
    pub subject_alt_names: Vec<SanMatch>,
    pub trust: TrustSource,
    pub client_certificate: bool,
}

impl From<&Service> for ServiceView {
    fn from(s: &Service) -> Self {
        Self {
            name: s.name.clone(),
            mesh: s.mesh.clone(),
            hostnames: s.hostnames.clone(),
            vip: s.vip,
            port: s.port,
            protocol: s.protocol,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointView { address: e.to_string(), priority: e.priority })
                .collect(),
            tls: s.tls.as_ref().map(|t| TlsView {
                mode: t.mode,
                min: t.min,
                max: t.max,
                server_name: t.server_name.clone(),
                subject_alt_names: t.subject_alt_names.clone(),
                trust: if t.ca.is_some() { TrustSource::Configured } else { TrustSource::System },
                client_certificate: t.client.is_some(),
            }),
            extension: s.extension.clone(),
            access: s.access,
            access_by: s.access_by.clone(),
            conditions: s.conditions.clone(),
            broken: s.broken.clone(),
            policies: (*s.policies).clone(),
            routes: s.routes.as_ref().map(|r| RoutesView {
                http: r.http.as_ref().map(|t| t.rules.clone()).unwrap_or_default(),
                tcp: r.tcp.clone(),
            }),
        }
    }
}
