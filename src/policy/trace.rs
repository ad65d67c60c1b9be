//! MeshTrace, merged and compiled: where a service's spans go, how requests are sampled and
//! which tags each span gets. Pure; [`crate::trace`] runs it.

use super::runtime::otlp_endpoint;
use super::Effective;
use crate::resources::policy::IntOrString;
use crate::resources::trace::TraceBackend;

#[derive(Debug, Clone, PartialEq)]
pub struct TracePlan {
    pub backend: TraceTarget,
    /// Envoy's thresholds: `random` and `overall` in 1/10,000 (60.1 % → 6010), `client` in whole
    /// percent (the fraction dropped), as `mutateTracingRequestHeader` compares them.
    pub random: u32,
    pub overall: u32,
    pub client: u32,
    /// Custom tags, then Kuma's automatic `kuma.mesh` (unless a custom tag has that name).
    pub tags: Vec<TagPlan>,
    /// The Dataplane's `kuma.io/service` (Envoy's `node.cluster`), else its name, else
    /// `mesh-egress`.
    pub service_name: String,
    /// `mesh.dataplane`, as Kuma names Envoy's node.
    pub node_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TraceTarget {
    /// `host:port` of an OTLP/gRPC receiver.
    Otlp(String),
    Zipkin(ZipkinTarget),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ZipkinTarget {
    /// `host:port` to connect to (the scheme's port when the URL has none).
    pub address: String,
    /// The `Host` header: the URL's authority.
    pub authority: String,
    pub path: String,
    pub tls: bool,
    /// `httpProto` instead of `httpJson`.
    pub proto: bool,
    pub trace_id_128bit: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TagPlan {
    pub name: String,
    pub value: TagValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TagValue {
    Literal(String),
    /// A request header (lowercase name), or `default` when the request lacks it (no tag when
    /// there is no default either).
    Header {
        name: String,
        default: Option<String>,
    },
}

impl Effective {
    /// The tracing of a service in `mesh`; `None` without a MeshTrace, with `backends: []`, or
    /// with a backend mesh-egress does not export to (validation warns about those).
    pub fn trace(&self, mesh: &str) -> Option<TracePlan> {
        let conf = self.mesh_trace.as_ref()?;
        let backend = target(conf.backends.as_deref()?.first()?)?;
        let sampling = conf.sampling.clone().unwrap_or_default();
        let percent = |v: &Option<IntOrString>| v.as_ref().and_then(|v| v.decimal()).unwrap_or(100.0).clamp(0.0, 100.0);
        let mut tags: Vec<TagPlan> = conf
            .tags
            .iter()
            .flatten()
            .filter_map(|t| {
                let value = match (&t.literal, &t.header) {
                    (Some(literal), _) => TagValue::Literal(literal.clone()),
                    (None, Some(h)) => {
                        TagValue::Header { name: h.name.to_ascii_lowercase(), default: h.default.clone() }
                    }
                    (None, None) => return None,
                };
                Some(TagPlan { name: t.name.clone(), value })
            })
            .collect();
        if !tags.iter().any(|t| t.name == "kuma.mesh") {
            tags.push(TagPlan { name: "kuma.mesh".into(), value: TagValue::Literal(mesh.to_string()) });
        }
        let source = self.source.as_ref();
        Some(TracePlan {
            backend,
            random: (percent(&sampling.random) * 100.0).round() as u32,
            overall: (percent(&sampling.overall) * 100.0).round() as u32,
            client: percent(&sampling.client) as u32,
            tags,
            service_name: source
                .map(|s| s.service.clone().unwrap_or_else(|| s.name.clone()))
                .unwrap_or_else(|| "mesh-egress".into()),
            node_id: source.map_or_else(|| "mesh-egress".into(), |s| format!("{mesh}.{}", s.name)),
        })
    }
}

fn target(backend: &TraceBackend) -> Option<TraceTarget> {
    if let Some(otel) = backend.open_telemetry.as_ref().filter(|o| o.backend_ref.is_none() && !o.endpoint.is_empty()) {
        return Some(TraceTarget::Otlp(otlp_endpoint(&otel.endpoint)));
    }
    let zipkin = backend.zipkin.as_ref()?;
    let uri = http::Uri::try_from(zipkin.url.as_str()).ok()?;
    let tls = match uri.scheme_str()? {
        "http" => false,
        "https" => true,
        _ => return None,
    };
    let authority = uri.authority()?.as_str().to_string();
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Some(TraceTarget::Zipkin(ZipkinTarget {
        address: format!("{host}:{port}"),
        authority,
        path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        tls,
        proto: zipkin.api_version == "httpProto",
        trace_id_128bit: zipkin.trace_id_128bit,
    }))
}
