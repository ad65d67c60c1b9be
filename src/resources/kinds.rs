//! Serde shapes of the Kuma kinds we read, in both spellings.
//!
//! Fields of a kind we understand are strict (`deny_unknown_fields`) so typos fail loudly; fields
//! Kuma defines but this proxy does not use are accepted as opaque values.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_norway::Value;

pub use crate::model::Labels;

// ---------- MeshExternalService ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshExternalServiceSpec {
    #[serde(rename = "match")]
    pub match_: Option<Match>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    pub extension: Option<Extension>,
    pub tls: Option<TlsSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Kept wide so that an out-of-range value gets Kuma's message, not a serde one.
    pub port: Option<i64>,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: Option<String>,
    pub port: Option<i64>,
    pub priority: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Extension {
    #[serde(rename = "type", default)]
    pub type_: String,
    pub config: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub allow_renegotiation: bool,
    pub version: Option<TlsVersionSpec>,
    pub verification: Option<VerificationSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsVersionSpec {
    pub min: Option<String>,
    pub max: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VerificationSpec {
    pub mode: Option<String>,
    pub server_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<SanMatchSpec>,
    pub ca_cert: Option<DataSource>,
    pub client_cert: Option<DataSource>,
    pub client_key: Option<DataSource>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SanMatchSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub value: String,
}

/// Kuma's `DataSource`: exactly one of the three must be set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataSource {
    pub inline: Option<String>,
    pub inline_string: Option<String>,
    pub secret: Option<String>,
}

// ---------- HostnameGenerator ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostnameGeneratorSpec {
    #[serde(default)]
    pub selector: Selector,
    #[serde(default)]
    pub template: String,
    pub extension: Option<Extension>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    pub mesh_service: Option<LabelSelector>,
    pub mesh_external_service: Option<LabelSelector>,
    pub mesh_multi_zone_service: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

// ---------- Mesh ----------

/// The Mesh fields. Only `routing.defaultForbidMeshExternalServiceAccess` matters here.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    #[serde(default)]
    pub routing: Routing,
    pub mtls: Option<Value>,
    pub tracing: Option<Value>,
    pub logging: Option<Value>,
    pub metrics: Option<Value>,
    pub networking: Option<Value>,
    pub constraints: Option<Value>,
    pub skip_creating_initial_policies: Option<Value>,
    pub mesh_services: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Routing {
    #[serde(default)]
    pub default_forbid_mesh_external_service_access: bool,
    pub locality_aware_load_balancing: Option<Value>,
    pub zone_egress: Option<Value>,
}

// ---------- Dataplane ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataplaneSpec {
    #[serde(default)]
    pub networking: DataplaneNetworking,
    pub metrics: Option<Value>,
    pub probes: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataplaneNetworking {
    pub address: Option<String>,
    pub advertised_address: Option<String>,
    pub inbound: Option<Value>,
    #[serde(default)]
    pub outbound: Vec<OutboundSpec>,
    pub gateway: Option<Value>,
    pub transparent_proxying: Option<Value>,
    pub admin: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundSpec {
    pub address: Option<String>,
    pub port: Option<i64>,
    pub tags: Option<Value>,
    pub backend_ref: Option<BackendRef>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    pub port: Option<i64>,
    pub labels: Option<Labels>,
}

// ---------- envelopes ----------

/// Universal spelling of kinds that nest their fields under `spec`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UniversalWithSpec<S> {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub name: String,
    pub mesh: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    pub spec: Option<S>,
    pub status: Option<Value>,
    pub creation_time: Option<Value>,
    pub modification_time: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UniversalSecret {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub name: String,
    pub mesh: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub data: String,
    pub creation_time: Option<Value>,
    pub modification_time: Option<Value>,
}

/// Kubernetes object. `metadata` is Kubernetes' own and is read leniently.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeObject<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<S>,
    pub status: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

/// Core `v1` Secret of `type: system.kuma.io/secret`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeSecret {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    pub immutable: Option<bool>,
}
