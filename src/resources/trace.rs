//! MeshTrace: its shape and its validation with Kuma 2.14's messages and field paths
//! (`pkg/plugins/policies/meshtrace/api/v1alpha1/validator.go`). Like MeshPassthrough it has a
//! top-level `targetRef` and one `default`; several policies merge by RFC 7396 in Kuma's order
//! (lists replaced whole).

use serde::{Deserialize, Serialize};

use super::policy::{target_ref_violations, typed, IntOrString, PolicySpec, Role};
use super::validate::Violations;
use super::Meta;

/// MeshTrace `spec.default`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceConf {
    /// At most one; `[]` turns tracing off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backends: Option<Vec<TraceBackend>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<Sampling>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<TraceTag>>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceBackend {
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zipkin: Option<ZipkinBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datadog: Option<DatadogBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_telemetry: Option<OtelBackend>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZipkinBackend {
    #[serde(default)]
    pub url: String,
    /// Kuma's default: `false` (64-bit trace ids for new traces).
    #[serde(default, rename = "traceId128bit")]
    pub trace_id_128bit: bool,
    /// `httpJson` (default) or `httpProto`.
    #[serde(default = "http_json")]
    pub api_version: String,
    /// Kuma's default `true`; it only changes server spans, which an egress proxy has none of.
    #[serde(default = "yes")]
    pub shared_span_context: bool,
}

fn http_json() -> String {
    "httpJson".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DatadogBackend {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub split_service: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtelBackend {
    /// `host:port` of an OTLP/gRPC receiver (port 4317 when left out).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// A MeshOpenTelemetryBackend: validated, not supported here (a warning says so).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_ref: Option<serde_json::Value>,
}

/// Percentages (`IntOrString`: `50`, `"60.1"`). Unset means 100, as in Envoy.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Sampling {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overall: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<IntOrString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random: Option<IntOrString>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceTag {
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub literal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderTag>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderTag {
    #[serde(default)]
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// MeshTrace: `spec.targetRef` and `spec.default`; nothing else.
pub(super) fn validate_trace(spec: &PolicySpec, meta: &Meta, v: &mut Violations<'_>) {
    if let Some(r) = &spec.target_ref {
        let mut kinds = vec!["Mesh", "MeshSubset", "MeshService", "MeshServiceSubset", "Dataplane"];
        if Role::of(meta, []) == Role::System {
            kinds.push("MeshGateway");
        }
        target_ref_violations("spec.targetRef", r, &kinds, false, v);
        if matches!(r.kind.as_str(), "MeshService" | "MeshServiceSubset" | "MeshSubset") {
            v.warning(
                "spec.targetRef.kind",
                format!("{} value for 'targetRef.kind' is deprecated, use Dataplane with labels instead", r.kind),
            );
        }
    }
    for (field, set) in [("to", spec.to.is_some()), ("from", spec.from.is_some()), ("rules", spec.rules.is_some())] {
        if set {
            v.error(format!("spec.{field}"), format!("unknown field `{field}`: MeshTrace has only `default`"));
        }
    }
    let value = spec.default.clone().unwrap_or_default();
    let Some(conf) = typed::<TraceConf>("spec.default", &value, v) else { return };
    match conf.backends.as_deref() {
        None => v.error("spec.default.backends", "must be defined"),
        Some(backends) if backends.len() > 1 => {
            v.error("spec.default.backends", "must have zero or one backend defined");
        }
        Some(backends) => {
            for (i, b) in backends.iter().enumerate() {
                backend(&format!("spec.default.backends[{i}]"), b, v);
            }
        }
    }
    for (i, tag) in conf.tags.iter().flatten().enumerate() {
        let at = format!("spec.default.tags[{i}]");
        if tag.name.is_empty() {
            v.error(format!("{at}.name"), "must not be empty");
        }
        if tag.header.is_some() == tag.literal.is_some() {
            v.error(at, "tag must have only one type defined: header, literal");
        }
    }
    let sampling = conf.sampling.unwrap_or_default();
    for (field, value) in [("client", &sampling.client), ("random", &sampling.random), ("overall", &sampling.overall)] {
        let Some(value) = value else { continue };
        let at = format!("spec.default.sampling.{field}");
        match value.decimal() {
            None => v.error(at, "string is not a number"),
            Some(p) if !(0.0..=100.0).contains(&p) => v.error(at, "must be between 0 and 100"),
            Some(_) => {}
        }
    }
}

fn backend(at: &str, b: &TraceBackend, v: &mut Violations<'_>) {
    match b.type_.as_str() {
        "Zipkin" => match &b.zipkin {
            None => v.error(format!("{at}.zipkin"), "must be defined"),
            Some(z) if z.url.is_empty() => v.error(format!("{at}.zipkin.url"), "must not be empty"),
            Some(z) => {
                if http::Uri::try_from(z.url.as_str())
                    .ok()
                    .filter(|u| u.scheme().is_some() && u.host().is_some())
                    .is_none()
                {
                    v.error(format!("{at}.zipkin.url"), "must be a valid url");
                }
            }
        },
        "Datadog" => match &b.datadog {
            None => v.error(format!("{at}.datadog"), "must be defined"),
            Some(d) => datadog_url(&format!("{at}.datadog.url"), &d.url, v),
        },
        "OpenTelemetry" => match &b.open_telemetry {
            None => v.error(format!("{at}.openTelemetry"), "must be defined"),
            Some(o) => {
                let at = format!("{at}.openTelemetry");
                match (o.endpoint.is_empty(), &o.backend_ref) {
                    (false, Some(_)) => {
                        v.error(&at, "openTelemetry must have only one type defined: endpoint, backendRef")
                    }
                    (true, None) => v.error(&at, "openTelemetry must have exactly one defined: endpoint, backendRef"),
                    (false, None) => {
                        // Kuma warns that `endpoint` is deprecated in favour of `backendRef`; here
                        // `endpoint` is the way (no MeshOpenTelemetryBackend), so no warning.
                        if o.endpoint.contains(['/', '?', '#']) {
                            v.error(format!("{at}.endpoint"), "must be in host:port format, not a URL");
                        }
                    }
                    (true, Some(r)) => {
                        let has_labels = r.get("labels").and_then(|l| l.as_object()).is_some_and(|l| !l.is_empty());
                        if !has_labels {
                            v.error(format!("{at}.backendRef"), "backendRef must have exactly one defined: labels");
                        }
                        v.warning(
                            format!("{at}.backendRef"),
                            "mesh-egress has no MeshOpenTelemetryBackend: a MeshTrace using backendRef is not applied; use endpoint",
                        );
                    }
                }
            }
        },
        other => v.error(
            format!("{at}.type"),
            format!(r#"value '{other}' is not supported: one of "Zipkin", "Datadog", "OpenTelemetry""#),
        ),
    }
    if b.type_ == "Datadog" {
        v.warning(format!("{at}.type"), "mesh-egress does not export to Datadog: this MeshTrace is not applied");
    }
}

/// Kuma's Datadog URL rules: `http://host:port` and nothing more.
fn datadog_url(at: &str, url: &str, v: &mut Violations<'_>) {
    let Ok(uri) = http::Uri::try_from(url) else { return v.error(at, "must be a valid url") };
    if uri.scheme_str() != Some("http") {
        v.error(at, "scheme must be http");
    }
    match uri.port_u16() {
        None => v.error(at, "port must be defined"),
        Some(0) => v.error(at, "port must be a valid (1-65535)"),
        Some(_) => {}
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        v.error(at, "user must not be defined");
    }
    if !matches!(uri.path(), "" | "/") {
        v.error(at, "path must not be defined");
    }
    if uri.query().is_some() {
        v.error(at, "query must not be defined");
    }
}
