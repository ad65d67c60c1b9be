//! Prometheus metrics (prometheus-client), one registry for the process.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DnsResult {
    Local,
    Forwarded,
    Servfail,
    Malformed,
}

impl DnsResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Forwarded => "forwarded",
            Self::Servfail => "servfail",
            Self::Malformed => "malformed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub result: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    pub dns_queries: Family<DnsLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("mesh_egress");
        let tls_handshake_failures = Family::<TlsFailureLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS sessions with an endpoint that failed, by service and reason",
            tls_handshake_failures.clone(),
        );
        let dns_queries = Family::<DnsLabels, Counter>::default();
        registry.register("dns_queries", "DNS queries by result", dns_queries.clone());
        Self { registry, tls_handshake_failures, dns_queries }
    }

    pub fn dns_query(&self, result: DnsResult) {
        self.dns_queries.get_or_create(&DnsLabels { result: result.as_str() }).inc();
    }

    pub fn tls_failure(&self, service: &str, reason: crate::tls::FailureReason) {
        let labels = TlsFailureLabels { service: service.to_string(), reason: reason.as_str() };
        self.tls_handshake_failures.get_or_create(&labels).inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
