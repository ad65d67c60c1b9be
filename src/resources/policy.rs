//! Kuma's targetRef policies that can target a MeshExternalService: their shapes and their
//! validation with Kuma 2.14's messages and field paths.
//!
//! The envelope (`targetRef`, `to[]`, `from[]`, `rules[]`) is shared; each item's `default` is
//! kept as JSON so that several policies can be merged (RFC 7396) before the merged value is read
//! as the kind's typed conf ([`TimeoutConf`], [`RetryConf`], [`CircuitBreakerConf`],
//! [`HealthCheckConf`]).

use serde::{Deserialize, Serialize};

use super::kinds::Labels;
use super::validate::Violations;
use super::{Meta, LABEL_NAMESPACE, LABEL_POLICY_ROLE, SYSTEM_NAMESPACE};

/// The policy kinds mesh-egress applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum PolicyKind {
    MeshTimeout,
    MeshRetry,
    MeshCircuitBreaker,
    MeshHealthCheck,
    MeshAccessLog,
    /// One `default` for the whole sidecar, merged per mesh ([`super::trace`]).
    MeshTrace,
    /// Egress control ([`super::egress`]): not merged per service like the kinds above.
    MeshPassthrough,
    MeshTrafficPermission,
}

impl PolicyKind {
    /// The kinds merged per service: their `to[]` items (MeshTrace: its `default`).
    pub const ALL: [PolicyKind; 6] = [
        Self::MeshTimeout,
        Self::MeshRetry,
        Self::MeshCircuitBreaker,
        Self::MeshHealthCheck,
        Self::MeshAccessLog,
        Self::MeshTrace,
    ];

    pub fn parse(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().chain([Self::MeshPassthrough, Self::MeshTrafficPermission]).find(|k| k.as_str() == kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeshTimeout => "MeshTimeout",
            Self::MeshRetry => "MeshRetry",
            Self::MeshCircuitBreaker => "MeshCircuitBreaker",
            Self::MeshHealthCheck => "MeshHealthCheck",
            Self::MeshAccessLog => "MeshAccessLog",
            Self::MeshTrace => "MeshTrace",
            Self::MeshPassthrough => "MeshPassthrough",
            Self::MeshTrafficPermission => "MeshTrafficPermission",
        }
    }

    /// Whether the kind has `from` and `rules` sections (MeshRetry and MeshHealthCheck have
    /// only `to`).
    fn has_inbound_sections(self) -> bool {
        !matches!(self, Self::MeshRetry | Self::MeshHealthCheck)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub kind: PolicyKind,
    pub spec: PolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    pub target_ref: Option<TargetRef>,
    pub to: Option<Vec<PolicyItem>>,
    /// Inbound sections: validated, never applied (an egress sidecar has no inbound traffic).
    pub from: Option<Vec<PolicyItem>>,
    pub rules: Option<Vec<serde_json::Value>>,
    /// MeshPassthrough and MeshTrace: their conf sits at `spec.default`.
    pub default: Option<serde_json::Value>,
}

impl PolicySpec {
    /// Its `to` items' target refs.
    pub fn to_refs(&self) -> impl Iterator<Item = &TargetRef> {
        self.to.iter().flatten().map(|item| &item.target_ref)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyItem {
    #[serde(default)]
    pub target_ref: TargetRef,
    /// Read as the kind's conf only after merging.
    #[serde(default)]
    pub default: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy_types: Option<Vec<String>>,
}

impl TargetRef {
    pub fn mesh() -> Self {
        Self { kind: "Mesh".into(), ..Self::default() }
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    fn has_labels(&self) -> bool {
        self.labels.as_ref().is_some_and(|l| !l.is_empty())
    }
}

// ---------- durations ----------

/// A Go duration string (`300ms`, `1m30s`, `-2h`), as Kuma's `metav1.Duration`; kept signed so
/// a negative value gets Kuma's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration {
    nanos: i128,
}

impl GoDuration {
    pub fn is_negative(self) -> bool {
        self.nanos < 0
    }

    pub fn is_positive(self) -> bool {
        self.nanos > 0
    }

    /// The duration; negative ones (rejected by validation) count as zero.
    pub fn get(self) -> std::time::Duration {
        let nanos = u64::try_from(self.nanos.max(0)).unwrap_or(u64::MAX);
        std::time::Duration::from_nanos(nanos)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let invalid = || format!("time: invalid duration \"{text}\"");
        let (negative, mut rest) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        if rest == "0" {
            return Ok(Self { nanos: 0 });
        }
        if rest.is_empty() {
            return Err(invalid());
        }
        let mut nanos: f64 = 0.0;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
            let (number, tail) = rest.split_at(number_len);
            let value: f64 = number.parse().map_err(|_| invalid())?;
            let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale = match unit {
                "ns" => 1.0,
                "us" | "µs" | "μs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(invalid()),
            };
            nanos += value * scale;
            rest = tail;
        }
        let nanos = nanos.round() as i128;
        Ok(Self { nanos: if negative { -nanos } else { nanos } })
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.get()).to_string().replace(' ', ""))
    }
}

/// Kuma's `IntOrString` for numbers that may be decimals (`"1.5"`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl IntOrString {
    pub fn decimal(&self) -> Option<f64> {
        match self {
            Self::Int(i) => Some(*i as f64),
            Self::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        }
    }
}

// ---------- MeshTimeout ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TimeoutConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTimeouts>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpTimeouts {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_stream_duration: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_duration: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers_timeout: Option<GoDuration>,
}

// ---------- MeshRetry ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpRetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRetry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<HttpRetry>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRetry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connect_attempt: Option<i64>,
}

/// The `http` section; `grpc` uses the same shape without the header and host fields
/// (validation rejects them there).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_off: Option<BackOff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limited_back_off: Option<RateLimitedBackOff>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriable_response_headers: Option<Vec<HeaderMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriable_request_headers: Option<Vec<HeaderMatch>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_selection: Option<Vec<HostSelection>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_selection_max_attempts: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackOff {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitedBackOff {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_headers: Option<Vec<ResetHeader>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<GoDuration>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResetHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub format: String,
}

/// Kuma's `HeaderMatch`: `type` Exact (default), Present, RegularExpression, Absent, Prefix.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSelection {
    #[serde(default)]
    pub predicate: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Labels>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_frequency: Option<i64>,
}

pub const HTTP_RETRY_ON: [&str; 8] = [
    "5xx",
    "GatewayError",
    "Reset",
    "Retriable4xx",
    "ConnectFailure",
    "EnvoyRatelimited",
    "RefusedStream",
    "Http3PostConnectFailure",
];
pub const HTTP_METHOD_RETRY_ON: [&str; 9] = [
    "HttpMethodConnect",
    "HttpMethodDelete",
    "HttpMethodGet",
    "HttpMethodHead",
    "HttpMethodOptions",
    "HttpMethodPatch",
    "HttpMethodPost",
    "HttpMethodPut",
    "HttpMethodTrace",
];
pub const GRPC_RETRY_ON: [&str; 5] = ["Canceled", "DeadlineExceeded", "Internal", "ResourceExhausted", "Unavailable"];
pub const HEADER_MATCH_TYPES: [&str; 5] = ["Exact", "Present", "RegularExpression", "Absent", "Prefix"];

// ---------- MeshCircuitBreaker ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_pools: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_external_and_local_errors: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detectors: Option<Detectors>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_panic_threshold: Option<IntOrString>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Detectors {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_failures: Option<Consecutive>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_failures: Option<Consecutive>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_origin_failures: Option<Consecutive>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<SuccessRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<FailurePercentage>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Consecutive {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive: Option<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SuccessRate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standard_deviation_factor: Option<IntOrString>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FailurePercentage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimum_hosts: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_volume: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i64>,
}

// ---------- MeshHealthCheck ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheckConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_jitter: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_jitter: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_jitter_percent: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_panic_threshold: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_traffic_on_panic: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_log_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub always_log_health_check_failures: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_traffic_interval: Option<GoDuration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_connection: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpHealthCheck {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpHealthCheck {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers_to_add: Option<HeaderModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_statuses: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set: Option<Vec<HeaderKeyValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add: Option<Vec<HeaderKeyValue>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderKeyValue {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcHealthCheck {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

// ---------- MeshAccessLog ----------

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessLogConf {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<LogBackend>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogBackend {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpLogBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<FileLogBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OtelLogBackend>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpLogBackend {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
    #[serde(default)]
    pub address: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileLogBackend {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormat>,
    #[serde(default)]
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelLogBackend {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_ref: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Vec<OtelAttribute>>,
    /// A format string, or any JSON value (Kuma's AnyValue); strings in it are formats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelAttribute {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LogFormat {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<Vec<JsonField>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub omit_empty_values: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JsonField {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub value: String,
}

// ---------- validation ----------

const NAME_CHARS: &str = "invalid characters: must consist of lower case alphanumeric characters, '-', '.' and '_'.";
const GT_ZERO_DURATION: &str = "must be greater than zero when defined";
const NOT_NEGATIVE: &str = "must not be negative when defined";
const GT_ZERO: &str = "must be greater than 0";
const UINT_PERCENT: &str = "must be in inclusive range [0, 100]";
const PERCENT: &str = "must be in inclusive range [0.0, 100.0]";

/// The top-level kinds each policy accepts from a non-system policy; a system policy (every
/// Universal one) also accepts MeshGateway and, except for MeshCircuitBreaker, MeshHTTPRoute.
fn top_level_kinds(kind: PolicyKind, system: bool) -> Vec<&'static str> {
    let mut kinds = vec!["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane"];
    match kind {
        PolicyKind::MeshCircuitBreaker | PolicyKind::MeshHealthCheck | PolicyKind::MeshAccessLog => {
            kinds.push("MeshGateway");
        }
        _ if system => kinds.extend(["MeshGateway", "MeshHTTPRoute"]),
        _ => {}
    }
    kinds
}

fn to_kinds(kind: PolicyKind, top: &str) -> &'static [&'static str] {
    match (kind, top) {
        (PolicyKind::MeshCircuitBreaker | PolicyKind::MeshHealthCheck, _) => {
            &["Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService"]
        }
        (PolicyKind::MeshAccessLog, "MeshGateway") => &["Mesh"],
        (PolicyKind::MeshAccessLog, _) => {
            &["Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute"]
        }
        (_, "MeshGateway" | "MeshHTTPRoute") => &["Mesh", "MeshExternalService"],
        _ => &["Mesh", "MeshService", "MeshExternalService", "MeshMultiZoneService", "MeshHTTPRoute"],
    }
}

/// Kuma's policy roles, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Role {
    System,
    Producer,
    Consumer,
    WorkloadOwner,
}

impl Role {
    /// The `kuma.io/policy-role` label when set; else what Kuma's webhook computes
    /// (`ComputePolicyRole`): a Universal policy or one in the system namespace is `system`; one
    /// with `to` items is `producer` when each names a MeshService or MeshHTTPRoute by name in the
    /// policy's own namespace, else `consumer` (validation refuses a mix: [`Role::refused`]); the
    /// rest are `workload-owner`.
    pub fn of<'a>(meta: &Meta, to: impl IntoIterator<Item = &'a TargetRef>) -> Self {
        match meta.labels.get(LABEL_POLICY_ROLE).map(String::as_str) {
            Some("system") => return Self::System,
            Some("producer") => return Self::Producer,
            Some("consumer") => return Self::Consumer,
            Some("workload-owner") => return Self::WorkloadOwner,
            _ => {}
        }
        let Some(namespace) = meta.labels.get(LABEL_NAMESPACE).filter(|ns| *ns != SYSTEM_NAMESPACE) else {
            return Self::System;
        };
        match producer_items(namespace, to) {
            (0, 0) => Self::WorkloadOwner,
            (_, 0) => Self::Producer,
            _ => Self::Consumer,
        }
    }

    /// What Kuma's webhook refuses in a namespaced policy (outside the system namespace), in
    /// its words: `to` and `from` both, or `to` items that are producer and consumer items both.
    pub fn refused<'a>(
        meta: &Meta,
        to: impl IntoIterator<Item = &'a TargetRef>,
        has_from: bool,
    ) -> Option<&'static str> {
        let namespace = meta.labels.get(LABEL_NAMESPACE).filter(|ns| *ns != SYSTEM_NAMESPACE)?;
        match producer_items(namespace, to) {
            (0, 0) => None,
            _ if has_from => Some("it's not allowed to mix 'to' and 'from' arrays in the same policy"),
            (1.., 1..) => Some("it's not allowed to mix producer and consumer items in the same policy"),
            _ => None,
        }
    }
}

/// How many `to` items are producer items (a MeshService or MeshHTTPRoute named in `namespace`,
/// or with no namespace), and how many are not.
fn producer_items<'a>(namespace: &str, to: impl IntoIterator<Item = &'a TargetRef>) -> (usize, usize) {
    to.into_iter().fold((0, 0), |(producer, consumer), r| {
        let named = r.name.as_deref().is_some_and(|n| !n.is_empty());
        let own_namespace = r.namespace.as_deref().map_or(true, |ns| ns.is_empty() || ns == namespace);
        if matches!(r.kind.as_str(), "MeshService" | "MeshHTTPRoute") && named && own_namespace {
            (producer + 1, consumer)
        } else {
            (producer, consumer + 1)
        }
    })
}

/// Validates a policy with Kuma's messages, all problems at once.
pub(super) fn validate(policy: &Policy, meta: &Meta, v: &mut Violations<'_>) {
    match policy.kind {
        PolicyKind::MeshPassthrough => return super::egress::validate_passthrough(&policy.spec, v),
        PolicyKind::MeshTrafficPermission => return super::egress::validate_permission(&policy.spec, v),
        PolicyKind::MeshTrace => return super::trace::validate_trace(&policy.spec, meta, v),
        _ => {}
    }
    if policy.spec.default.is_some() {
        v.error("spec.default", format!("unknown field `default`: {} sets `default` per item", policy.kind.as_str()));
    }
    let system = Role::of(meta, policy.spec.to_refs()) == Role::System;
    let has_from = policy.spec.from.as_ref().is_some_and(|from| !from.is_empty());
    if let Some(message) = Role::refused(meta, policy.spec.to_refs(), has_from) {
        v.error("spec.to", message);
    }
    let spec = &policy.spec;
    let kind = policy.kind;
    let top = spec.target_ref.clone().unwrap_or_else(TargetRef::mesh);
    let to = spec.to.as_deref().unwrap_or_default();
    let from = spec.from.as_deref().unwrap_or_default();
    let rules = spec.rules.as_deref().unwrap_or_default();
    if let Some(target_ref) = &spec.target_ref {
        let inbound = kind.has_inbound_sections() && !(from.is_empty() && rules.is_empty());
        target_ref_violations("spec.targetRef", target_ref, &top_level_kinds(kind, system), inbound, v);
    }
    if kind.has_inbound_sections() {
        if !rules.is_empty() && (!to.is_empty() || !from.is_empty()) {
            v.error("spec", "fields 'to' and 'from' must be empty when 'rules' is defined");
        }
        if rules.is_empty() && to.is_empty() && from.is_empty() {
            v.error("spec", "at least one of 'from', 'to' or 'rules' has to be defined");
        }
    } else {
        for (field, set) in [("from", spec.from.is_some()), ("rules", spec.rules.is_some())] {
            if set {
                v.error(format!("spec.{field}"), format!("unknown field `{field}`: {} has only `to`", kind.as_str()));
            }
        }
    }
    for (i, item) in from.iter().enumerate() {
        let path = format!("spec.from[{i}]");
        if matches!(top.kind.as_str(), "MeshHTTPRoute" | "MeshGateway") && kind == PolicyKind::MeshTimeout {
            v.error("spec.from", "must not be defined");
            break;
        }
        target_ref_violations(&format!("{path}.targetRef"), &item.target_ref, &["Mesh"], false, v);
        conf(kind, &format!("{path}.default"), &item.default, &top.kind, v);
    }
    for (i, item) in to.iter().enumerate() {
        let path = format!("spec.to[{i}]");
        target_ref_violations(&format!("{path}.targetRef"), &item.target_ref, to_kinds(kind, &top.kind), false, v);
        conf(kind, &format!("{path}.default"), &item.default, &top.kind, v);
    }
}

/// Kuma's `ValidateTargetRef` for the kinds a policy about MeshExternalServices can use.
/// `inbound`: the policy has `from` or `rules` items (Kuma's `AffectsInbounds`), so a
/// `Dataplane` may name one of its inbounds by `sectionName`.
pub(super) fn target_ref_violations(
    path: &str,
    r: &TargetRef,
    supported: &[&str],
    inbound: bool,
    v: &mut Violations<'_>,
) {
    let at = |field: &str| format!("{path}.{field}");
    if r.kind.is_empty() {
        return v.error(at("kind"), "must be defined");
    }
    if !supported.contains(&r.kind.as_str()) {
        return v.error(at("kind"), format!("value '{}' is not supported", r.kind));
    }
    let kind = r.kind.as_str();
    let name_set = !r.name().is_empty();
    let namespace_set = r.namespace.as_deref().is_some_and(|n| !n.is_empty());
    let set = |field: &str| match field {
        "name" => name_set,
        "namespace" => namespace_set,
        "labels" => r.has_labels(),
        "tags" => r.tags.as_ref().is_some_and(|t| !t.is_empty()),
        "mesh" => r.mesh.as_deref().is_some_and(|m| !m.is_empty()),
        "sectionName" => r.section_name.as_deref().is_some_and(|s| !s.is_empty()),
        "proxyTypes" => r.proxy_types.as_ref().is_some_and(|p| !p.is_empty()),
        _ => false,
    };
    // The fields each kind rejects with "must not be set with kind X".
    let disallowed: &[&str] = match kind {
        "Mesh" => &["mesh", "tags", "labels", "namespace", "sectionName"],
        "Dataplane" => &["tags", "mesh", "proxyTypes"],
        "MeshSubset" => &["name", "mesh", "labels", "namespace", "sectionName"],
        "MeshServiceSubset" | "MeshGateway" => &["mesh", "proxyTypes", "labels", "namespace", "sectionName"],
        "MeshExternalService" | "MeshHTTPRoute" => &["mesh", "tags", "proxyTypes", "sectionName"],
        _ => &["mesh", "tags", "proxyTypes"],
    };
    for field in disallowed.iter().filter(|f| set(f)) {
        v.error(at(field), format!("must not be set with kind {kind}"));
    }
    match kind {
        "Mesh" => {
            if name_set {
                v.error(at("name"), "using name with kind Mesh is not yet supported");
            }
            proxy_types(&at("proxyTypes"), r, v);
        }
        "Dataplane" => {
            if r.has_labels() && (name_set || namespace_set) {
                v.error(at("labels"), "either labels or name and namespace must be specified");
            }
            if set("sectionName") && !inbound {
                v.error(at("sectionName"), "can only be used with inbound policies");
            }
        }
        "MeshSubset" => proxy_types(&at("proxyTypes"), r, v),
        "MeshServiceSubset" | "MeshGateway" => {
            if !name_set {
                v.error(at("name"), format!("must be set when kind is {kind}"));
            }
            name_chars(path, r, v);
        }
        // MeshService, MeshHTTPRoute, MeshExternalService, MeshMultiZoneService
        _ => {
            name_chars(path, r, v);
            if !r.has_labels() && !name_set {
                v.error(path, format!("name or labels must be set when kind is {kind}"));
            }
            if r.has_labels() && (name_set || namespace_set) {
                let message = if kind == "MeshExternalService" {
                    "either labels or name must be specified"
                } else {
                    "either labels or name and namespace must be specified"
                };
                v.error(at("labels"), message);
            }
        }
    }
}

/// Kuma's `ValidatePercentageOrNil`: a decimal in [0, 100].
fn percentage(path: &str, value: Option<&IntOrString>, v: &mut Violations<'_>) {
    match value.map(IntOrString::decimal) {
        Some(None) => v.error(path, "string must be a valid number"),
        Some(Some(p)) if !(0.0..=100.0).contains(&p) => v.error(path, PERCENT),
        _ => {}
    }
}

fn name_chars(path: &str, r: &TargetRef, v: &mut Violations<'_>) {
    let valid = r.name().bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !valid {
        v.error(format!("{path}.name"), NAME_CHARS);
    }
}

fn proxy_types(path: &str, r: &TargetRef, v: &mut Violations<'_>) {
    if r.proxy_types.as_ref().is_some_and(Vec::is_empty) {
        v.error(path, "must be undefined or have at least one element");
    }
}

/// Reads `value` as `T`; a shape error (unknown field, wrong type) is reported at its path.
pub(super) fn typed<T: serde::de::DeserializeOwned>(
    path: &str,
    value: &serde_json::Value,
    v: &mut Violations<'_>,
) -> Option<T> {
    let value = if value.is_null() { serde_json::Value::Object(Default::default()) } else { value.clone() };
    match serde_path_to_error::deserialize(value) {
        Ok(conf) => Some(conf),
        Err(e) => {
            let inner = e.path().to_string();
            let at = if inner == "." { path.to_string() } else { format!("{path}.{inner}") };
            v.error(at, e.inner().to_string());
            None
        }
    }
}

fn conf(kind: PolicyKind, path: &str, value: &serde_json::Value, top: &str, v: &mut Violations<'_>) {
    match kind {
        PolicyKind::MeshTimeout => {
            if let Some(c) = typed::<TimeoutConf>(path, value, v) {
                timeout_conf(path, &c, top, v);
            }
        }
        PolicyKind::MeshRetry => {
            if let Some(c) = typed::<RetryConf>(path, value, v) {
                retry_conf(path, &c, v);
            }
        }
        PolicyKind::MeshCircuitBreaker => {
            if let Some(c) = typed::<CircuitBreakerConf>(path, value, v) {
                circuit_breaker_conf(path, &c, v);
            }
        }
        PolicyKind::MeshHealthCheck => {
            if let Some(c) = typed::<HealthCheckConf>(path, value, v) {
                health_check_conf(path, &c, v);
            }
        }
        PolicyKind::MeshAccessLog => {
            if let Some(c) = typed::<AccessLogConf>(path, value, v) {
                access_log_conf(path, &c, v);
            }
        }
        PolicyKind::MeshPassthrough | PolicyKind::MeshTrafficPermission | PolicyKind::MeshTrace => {}
    }
}

fn access_log_conf(path: &str, c: &AccessLogConf, v: &mut Violations<'_>) {
    let Some(backends) = &c.backends else {
        return v.error(format!("{path}.backends"), "must be defined");
    };
    for (i, b) in backends.iter().enumerate() {
        let at = |field: &str| format!("{path}.backends[{i}].{field}");
        match b.type_.as_str() {
            "File" => match &b.file {
                None => v.error(at("file"), "must be defined"),
                Some(file) => {
                    if let Some(format) = &file.format {
                        log_format(&at("file.format"), format, v);
                    }
                    if file.path.is_empty() || file.path.contains('\0') {
                        v.error(at("file.path"), "file backend requires a valid path");
                    }
                }
            },
            "Tcp" => match &b.tcp {
                None => v.error(at("tcp"), "must be defined"),
                Some(tcp) => {
                    if let Some(format) = &tcp.format {
                        log_format(&at("tcp.format"), format, v);
                    }
                    if !is_host_port(&tcp.address) {
                        v.error(at("tcp.address"), "tcp backend requires valid address");
                    }
                }
            },
            "OpenTelemetry" => match &b.open_telemetry {
                None => v.error(at("openTelemetry"), "must be defined"),
                Some(otel) => {
                    if otel.endpoint.as_deref().is_some_and(|e| !e.is_empty()) == otel.backend_ref.is_some() {
                        v.error(
                            at("openTelemetry"),
                            "openTelemetry must have exactly one defined: endpoint, backendRef",
                        );
                    }
                    for (j, a) in otel.attributes.iter().flatten().enumerate() {
                        if !is_otel_attribute_name(&a.key) {
                            v.error(
                                at(&format!("openTelemetry.attributes[{j}].key")),
                                "must start with a lowercase letter, use only lowercase letters, digits, '.' or '_', avoid consecutive delimiters, and end with a letter or digit",
                            );
                        }
                        format_string(&at(&format!("openTelemetry.attributes[{j}].value")), &a.value, v);
                    }
                    if let Some(serde_json::Value::String(body)) = &otel.body {
                        format_string(&at("openTelemetry.body"), body, v);
                    }
                }
            },
            other => v.error(at("type"), format!("unknown backend type '{other}': one of Tcp, File, OpenTelemetry")),
        }
    }
}

fn log_format(path: &str, f: &LogFormat, v: &mut Violations<'_>) {
    match f.type_.as_str() {
        "Plain" => match &f.plain {
            None => v.error(format!("{path}.plain"), "must be defined"),
            Some(plain) if plain.is_empty() => v.error(format!("{path}.plain"), "must not be empty"),
            Some(plain) => format_string(&format!("{path}.plain"), plain, v),
        },
        "Json" => match &f.json {
            None => v.error(format!("{path}.json"), "must be defined"),
            Some(fields) => {
                if fields.is_empty() {
                    v.error(format!("{path}.json"), "must not be empty");
                }
                for (i, field) in fields.iter().enumerate() {
                    let at = format!("{path}.json[{i}]");
                    if field.key.is_empty() {
                        v.error(format!("{at}.key"), "key cannot be empty");
                    }
                    if field.value.is_empty() {
                        v.error(format!("{at}.value"), "value cannot be empty");
                    }
                    // Kuma's check: the pair spliced into `{"key": "value"}` must be JSON.
                    if serde_json::from_str::<serde_json::Value>(&format!("{{\"{}\": \"{}\"}}", field.key, field.value))
                        .is_err()
                    {
                        v.error(&at, "is not a valid JSON object");
                    } else if !field.value.is_empty() {
                        format_string(&format!("{at}.value"), &field.value, v);
                    }
                }
            }
        },
        other => v.error(format!("{path}.type"), format!("unknown format type '{other}': one of Plain, Json")),
    }
}

/// Envoy rejects a format with an unknown command operator; so does validation.
fn format_string(path: &str, text: &str, v: &mut Violations<'_>) {
    if let Err(e) = crate::log_format::Format::parse(text, &Default::default()) {
        v.error(path, e.to_string());
    }
}

fn is_host_port(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else { return false };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    port.parse::<u16>().is_ok_and(|p| p > 0)
        && (host.parse::<std::net::IpAddr>().is_ok() || super::validate::is_dns_name(host))
}

fn is_otel_attribute_name(key: &str) -> bool {
    let bytes = key.as_bytes();
    let Some((&first, rest)) = bytes.split_first() else { return false };
    first.is_ascii_lowercase()
        && rest.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'.' || *b == b'_')
        && !key.contains("..")
        && !key.contains("__")
        && !key.contains("._")
        && !key.contains("_.")
        && bytes.last().is_some_and(|b| b.is_ascii_alphanumeric())
}

fn health_check_conf(path: &str, c: &HealthCheckConf, v: &mut Violations<'_>) {
    let at = |field: &str| format!("{path}.{field}");
    for (field, value) in [
        ("interval", c.interval),
        ("timeout", c.timeout),
        ("initialJitter", c.initial_jitter),
        ("intervalJitter", c.interval_jitter),
        ("noTrafficInterval", c.no_traffic_interval),
    ] {
        if value.is_some_and(|d| !d.is_positive()) {
            v.error(at(field), GT_ZERO_DURATION);
        }
    }
    for (field, value) in [("unhealthyThreshold", c.unhealthy_threshold), ("healthyThreshold", c.healthy_threshold)] {
        if value.is_some_and(|n| n <= 0) {
            v.error(at(field), GT_ZERO_DURATION);
        }
    }
    if c.interval_jitter_percent.is_some_and(|p| !(0..=100).contains(&p)) {
        v.error(at("intervalJitterPercent"), UINT_PERCENT);
    }
    percentage(&at("healthyPanicThreshold"), c.healthy_panic_threshold.as_ref(), v);
    if c.event_log_path.as_deref().is_some_and(|p| p.is_empty() || p.contains('\0')) {
        v.error(at("eventLogPath"), "must be a valid path when defined");
    }
    if let Some(http) = &c.http {
        if http.path.as_deref() == Some("") {
            v.error(at("http.path"), "must be defined");
        }
        for (i, status) in http.expected_statuses.iter().flatten().enumerate() {
            if !(100..=599).contains(status) {
                v.error(format!("{path}.http.expectedStatuses[{i}]"), "must be in inclusive range [100, 599]");
            }
        }
    }
    if c.http.is_none() && c.tcp.is_none() && c.grpc.is_none() {
        v.error(path, "must have at least one defined: http, tcp, grpc");
    }
}

fn timeout_conf(path: &str, c: &TimeoutConf, top: &str, v: &mut Violations<'_>) {
    if c.connection_timeout.is_none() && c.idle_timeout.is_none() && c.http.is_none() {
        return v.error(path, "at least one timeout should be configured");
    }
    if top == "MeshHTTPRoute" {
        let message = "can't be specified when top-level TargetRef is referencing MeshHTTPRoute";
        let http = c.http.clone().unwrap_or_default();
        for (field, set) in [
            ("connectionTimeout", c.connection_timeout.is_some()),
            ("idleTimeout", c.idle_timeout.is_some()),
            ("http.maxStreamDuration", http.max_stream_duration.is_some()),
            ("http.maxConnectionDuration", http.max_connection_duration.is_some()),
        ] {
            if set {
                v.error(format!("{path}.{field}"), message);
            }
        }
    }
    if c.connection_timeout.is_some_and(|d| !d.is_positive()) {
        v.error(format!("{path}.connectionTimeout"), GT_ZERO_DURATION);
    }
    not_negative(&format!("{path}.idleTimeout"), c.idle_timeout, v);
    let Some(http) = &c.http else { return };
    let http_path = format!("{path}.http");
    if http.request_timeout.is_none()
        && http.stream_idle_timeout.is_none()
        && http.max_stream_duration.is_none()
        && http.max_connection_duration.is_none()
    {
        v.error(&http_path, "at least one timeout in this section should be configured");
    }
    for (field, value) in [
        ("requestTimeout", http.request_timeout),
        ("streamIdleTimeout", http.stream_idle_timeout),
        ("maxStreamDuration", http.max_stream_duration),
        ("maxConnectionDuration", http.max_connection_duration),
        ("requestHeadersTimeout", http.request_headers_timeout),
    ] {
        not_negative(&format!("{http_path}.{field}"), value, v);
    }
}

fn not_negative(path: &str, value: Option<GoDuration>, v: &mut Violations<'_>) {
    if value.is_some_and(GoDuration::is_negative) {
        v.error(path, NOT_NEGATIVE);
    }
}

fn retry_conf(path: &str, c: &RetryConf, v: &mut Violations<'_>) {
    if c.tcp.is_none() && c.http.is_none() && c.grpc.is_none() {
        v.error(path, "at least one of the 'tcp', 'http', 'grpc' must be specified");
    }
    if let Some(tcp) = &c.tcp {
        match tcp.max_connect_attempt {
            None => v.error(format!("{path}.tcp"), "must not be empty"),
            Some(n) if n <= 0 => v.error(format!("{path}.tcp.maxConnectAttempt"), GT_ZERO),
            Some(_) => {}
        }
    }
    if let Some(http) = &c.http {
        http_retry(&format!("{path}.http"), http, false, v);
    }
    if let Some(grpc) = &c.grpc {
        http_retry(&format!("{path}.grpc"), grpc, true, v);
    }
}

fn http_retry(path: &str, r: &HttpRetry, grpc: bool, v: &mut Violations<'_>) {
    let at = |field: &str| format!("{path}.{field}");
    if grpc {
        for (field, set) in [
            ("retriableResponseHeaders", r.retriable_response_headers.is_some()),
            ("retriableRequestHeaders", r.retriable_request_headers.is_some()),
            ("hostSelection", r.host_selection.is_some()),
            ("hostSelectionMaxAttempts", r.host_selection_max_attempts.is_some()),
        ] {
            if set {
                v.error(at(field), format!("unknown field `{field}`"));
            }
        }
    }
    let empty = r.num_retries.is_none()
        && r.per_try_timeout.is_none()
        && r.back_off.is_none()
        && r.retry_on.is_none()
        && r.rate_limited_back_off.is_none()
        && (grpc
            || (r.retriable_request_headers.is_none()
                && r.retriable_response_headers.is_none()
                && r.host_selection.is_none()));
    if empty {
        v.error(path, "must not be empty");
    }
    if r.num_retries.is_some_and(|n| n < 0 || n > i64::from(u32::MAX)) {
        v.error(at("numRetries"), "must be in range [0, 4294967295]");
    }
    not_negative(&at("perTryTimeout"), r.per_try_timeout, v);
    if let Some(back_off) = &r.back_off {
        if back_off.base_interval.is_none() && back_off.max_interval.is_none() {
            v.error(at("backOff"), "must not be empty");
        }
        not_negative(&at("backOff.baseInterval"), back_off.base_interval, v);
        not_negative(&at("backOff.maxInterval"), back_off.max_interval, v);
    }
    if let Some(rl) = &r.rate_limited_back_off {
        if rl.max_interval.is_some_and(|d| !d.is_positive()) {
            v.error(at("rateLimitedBackOff.maxInterval"), GT_ZERO_DURATION);
        }
        match &rl.reset_headers {
            None => v.error(at("rateLimitedBackOff.resetHeaders"), "must be defined"),
            Some(headers) => {
                for (i, h) in headers.iter().enumerate() {
                    let header = format!("{path}.rateLimitedBackOff.resetHeaders[{i}]");
                    if h.name.is_empty() {
                        v.error(format!("{header}.name"), "must be defined");
                    }
                    if !["Seconds", "UnixTimestamp"].contains(&h.format.as_str()) {
                        v.error(format!("{header}.format"), "must be one of: Seconds, UnixTimestamp");
                    }
                }
            }
        }
    }
    for (i, item) in r.retry_on.iter().flatten().enumerate() {
        let known = if grpc {
            GRPC_RETRY_ON.contains(&item.as_str())
        } else {
            HTTP_RETRY_ON.contains(&item.as_str())
                || HTTP_METHOD_RETRY_ON.contains(&item.as_str())
                || item
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| http::StatusCode::from_u16(c).ok())
                    .is_some_and(|c| c.canonical_reason().is_some())
        };
        if !known {
            v.error(format!("{path}.retryOn[{i}]"), format!("unknown item '{item}'"));
        }
    }
    for (field, list) in [
        ("retriableResponseHeaders", &r.retriable_response_headers),
        ("retriableRequestHeaders", &r.retriable_request_headers),
    ] {
        for (i, m) in list.iter().flatten().enumerate() {
            header_match(&format!("{path}.{field}[{i}]"), m, v);
        }
    }
    let mut priorities = false;
    for (i, p) in r.host_selection.iter().flatten().enumerate() {
        let at = |field: &str| format!("{path}.hostSelection[{i}].{field}");
        match p.predicate.as_str() {
            "OmitPreviousHosts" => {}
            "OmitHostsWithTags" if p.tags.is_none() => v.error(at("tags"), "must be defined"),
            "OmitHostsWithTags" => {}
            "OmitPreviousPriorities" => {
                if priorities {
                    v.error(at("predicate"), "OmitPreviousPriorities must only be specified once");
                }
                if p.update_frequency.unwrap_or(0) <= 0 {
                    v.error(at("updateFrequency"), "must be defined and greater than zero");
                }
                priorities = true;
            }
            other => v.error(at("predicate"), format!("unknown predicate type '{other}'")),
        }
    }
}

/// Kuma's HeaderMatch rules (the CRD schema's, enforced here since files skip the API server).
pub(super) fn header_match(path: &str, m: &HeaderMatch, v: &mut Violations<'_>) {
    let type_ = m.type_.as_deref().unwrap_or("Exact");
    if !HEADER_MATCH_TYPES.contains(&type_) {
        v.error(format!("{path}.type"), format!("must be one of: {}", HEADER_MATCH_TYPES.join(", ")));
    }
    let token = !m.name.is_empty()
        && m.name.len() <= 256
        && m.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        v.error(format!("{path}.name"), "must be a lowercase HTTP header name of at most 256 characters");
    }
    match (type_, &m.value) {
        ("Present" | "Absent", Some(_)) => v.error(format!("{path}.value"), "must not be defined"),
        ("RegularExpression", Some(re)) if super::full_match_bytes_regex(re).is_err() => {
            v.error(format!("{path}.value"), "must be a valid regular expression");
        }
        _ => {}
    }
}

fn circuit_breaker_conf(path: &str, c: &CircuitBreakerConf, v: &mut Violations<'_>) {
    if c.connection_limits.is_none() && c.outlier_detection.is_none() {
        return v.error(path, "at least one of: 'connectionLimits' or 'outlierDetection' should be configured");
    }
    let positive = |field: String, value: Option<i64>, v: &mut Violations<'_>| {
        if value.is_some_and(|n| n <= 0) {
            v.error(field, GT_ZERO);
        }
    };
    if let Some(l) = &c.connection_limits {
        let at = |field: &str| format!("{path}.connectionLimits.{field}");
        positive(at("maxConnections"), l.max_connections, v);
        positive(at("maxConnectionPools"), l.max_connection_pools, v);
        positive(at("maxPendingRequests"), l.max_pending_requests, v);
        positive(at("maxRetries"), l.max_retries, v);
        positive(at("maxRequests"), l.max_requests, v);
    }
    let Some(o) = &c.outlier_detection else { return };
    let at = |field: &str| format!("{path}.outlierDetection.{field}");
    if o.interval.is_some_and(|d| !d.is_positive()) {
        v.error(at("interval"), GT_ZERO_DURATION);
    }
    if o.base_ejection_time.is_some_and(|d| !d.is_positive()) {
        v.error(at("baseEjectionTime"), GT_ZERO_DURATION);
    }
    if o.max_ejection_percent.is_some_and(|p| !(0..=100).contains(&p)) {
        v.error(at("maxEjectionPercent"), UINT_PERCENT);
    }
    percentage(&at("healthyPanicThreshold"), o.healthy_panic_threshold.as_ref(), v);
    let Some(d) = &o.detectors else {
        return v.error(at("detectors"), "must be defined");
    };
    if d.total_failures.is_none()
        && d.gateway_failures.is_none()
        && d.local_origin_failures.is_none()
        && d.success_rate.is_none()
        && d.failure_percentage.is_none()
    {
        return v.error(
            at("detectors"),
            "must have at least one defined: totalFailures, gatewayFailures, localOriginFailures, successRate, failurePercentage",
        );
    }
    for (name, detector) in [
        ("totalFailures", &d.total_failures),
        ("gatewayFailures", &d.gateway_failures),
        ("localOriginFailures", &d.local_origin_failures),
    ] {
        positive(at(&format!("detectors.{name}.consecutive")), detector.as_ref().and_then(|c| c.consecutive), v);
    }
    if let Some(s) = &d.success_rate {
        positive(at("detectors.successRate.minimumHosts"), s.minimum_hosts, v);
        positive(at("detectors.successRate.requestVolume"), s.request_volume, v);
        if let Some(factor) = &s.standard_deviation_factor {
            match factor.decimal() {
                None => v.error(at("detectors.successRate.standardDeviationFactor"), "invalid number"),
                Some(f) if f <= 0.0 => v.error(at("detectors.successRate.standardDeviationFactor"), GT_ZERO),
                Some(_) => {}
            }
        }
    }
    if let Some(f) = &d.failure_percentage {
        positive(at("detectors.failurePercentage.minimumHosts"), f.minimum_hosts, v);
        positive(at("detectors.failurePercentage.requestVolume"), f.request_volume, v);
        if f.threshold.is_some_and(|t| !(0..=100).contains(&t)) {
            v.error(at("detectors.failurePercentage.threshold"), UINT_PERCENT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ns = |s: &str| GoDuration::parse(s).map(|d| d.nanos);
        assert_eq!(ns("5s"), Ok(5_000_000_000));
        assert_eq!(ns("1m30s"), Ok(90_000_000_000));
        assert_eq!(ns("1.5h"), Ok(5_400_000_000_000));
        assert_eq!(ns("300ms"), Ok(300_000_000));
        assert_eq!(ns("-2s"), Ok(-2_000_000_000));
        assert_eq!(ns("0"), Ok(0));
        assert_eq!(ns("0s"), Ok(0));
        for bad in ["", "5", "5x", "s", "1..5s", "-"] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
