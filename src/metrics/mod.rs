//! Prometheus metrics (prometheus-client), one registry for the process.
//!
//! The data path never looks labels up per request: each service gets a [`ServiceMetrics`] of
//! pre-resolved handles when its configuration is compiled. The handles are sharded per worker
//! thread ([`sharded`]): a request writes only its own worker's cache lines, a scrape sums them.

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use sharded::{Counter, Gauge, Histogram};

use crate::model::Protocol;

mod sharded;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    pub backend: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub protocol: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub service: String,
    pub protocol: &'static str,
    pub limit: &'static str,
}

/// A MeshCircuitBreaker connection limit that was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    MaxConnections,
    MaxPendingRequests,
    MaxRequests,
    MaxRetries,
    MaxConnectionPools,
}

impl Limit {
    const ALL: [Limit; 5] =
        [Self::MaxConnections, Self::MaxPendingRequests, Self::MaxRequests, Self::MaxRetries, Self::MaxConnectionPools];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "maxConnections",
            Self::MaxPendingRequests => "maxPendingRequests",
            Self::MaxRequests => "maxRequests",
            Self::MaxRetries => "maxRetries",
            Self::MaxConnectionPools => "maxConnectionPools",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub service: String,
    pub route: String,
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthCheckLabels {
    pub service: String,
    pub protocol: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthCheckResult {
    Success,
    Failure,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassthroughLabels {
    /// `connection` (TCP, TLS, or an HTTP connection refused whole) or `request` (HTTP).
    pub unit: &'static str,
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccessLabels {
    pub service: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
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

pub struct Metrics {
    registry: Registry,
    tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    dns_queries: Family<ResultLabels, Counter>,
    config_reloads: Family<ResultLabels, Counter>,
    access_log_dropped: Counter,
    spans: Family<SpanLabels, Counter>,
    connections: Family<ServiceLabels, Counter>,
    connections_active: Family<ServiceLabels, Gauge>,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<ServiceLabels, Histogram>,
    connect_duration: Family<ServiceLabels, Histogram>,
    connect_errors: Family<ServiceLabels, Counter>,
    bytes_sent: Family<ServiceLabels, Counter>,
    bytes_received: Family<ServiceLabels, Counter>,
    bytes_spliced: Family<ServiceLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    health_checks: Family<HealthCheckLabels, Counter>,
    route_requests: Family<RouteLabels, Counter>,
    passthrough: Family<PassthroughLabels, Counter>,
    access_refused: Family<AccessLabels, Counter>,
}

/// Status classes in the order of [`ServiceMetrics::requests`].
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// A service's handles; cloning shares the same series.
#[derive(Clone)]
pub struct ServiceMetrics {
    pub connections: Counter,
    pub connections_active: Gauge,
    requests: [Counter; 6],
    pub request_duration: Histogram,
    pub connect_duration: Histogram,
    pub connect_errors: Counter,
    /// Bytes from the application to the endpoint.
    pub bytes_sent: Counter,
    /// Bytes from the endpoint to the application.
    pub bytes_received: Counter,
    /// Of those, TCP bytes moved socket to socket by splice(2), either way.
    pub bytes_spliced: Counter,
    /// Requests (or connects) sent again by MeshRetry.
    pub retries: Counter,
    /// Indexed like [`Limit::ALL`].
    overflows: [Counter; 5],
    /// Endpoint addresses ejected by outlier detection.
    pub ejections: Counter,
    /// Active health checks by result: success, failure.
    health_checks: [Counter; 2],
}

impl ServiceMetrics {
    pub fn request(&self, status: u16) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.requests[class].inc();
    }

    /// Counts a request, connect or retry refused because `limit` was reached.
    pub fn overflow(&self, limit: Limit) {
        self.overflows[limit as usize].inc();
    }

    pub fn health_check(&self, result: HealthCheckResult) {
        self.health_checks[result as usize].inc();
    }
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("mesh_egress");
        let m = Self {
            registry: Registry::default(),
            tls_handshake_failures: Family::default(),
            dns_queries: Family::default(),
            config_reloads: Family::default(),
            access_log_dropped: Counter::default(),
            spans: Family::default(),
            connections: Family::default(),
            connections_active: Family::default(),
            requests: Family::default(),
            request_duration: Family::default(),
            connect_duration: Family::default(),
            connect_errors: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            bytes_spliced: Family::default(),
            retries: Family::default(),
            overflows: Family::default(),
            ejections: Family::default(),
            health_checks: Family::default(),
            route_requests: Family::default(),
            passthrough: Family::default(),
            access_refused: Family::default(),
        };
        r.register("connections", "Application connections accepted, by service", m.connections.clone());
        r.register("connections_active", "Application connections open now, by service", m.connections_active.clone());
        r.register("requests", "HTTP/gRPC requests by service and response status class", m.requests.clone());
        r.register("request_duration_seconds", "Time from request to response headers", m.request_duration.clone());
        r.register(
            "upstream_connect_duration_seconds",
            "Time to connect (and handshake TLS) to an endpoint",
            m.connect_duration.clone(),
        );
        r.register("upstream_connect_errors", "Failed connects (TCP or TLS) to endpoints", m.connect_errors.clone());
        r.register("upstream_bytes_sent", "Bytes sent to endpoints (TCP payload or HTTP bodies)", m.bytes_sent.clone());
        r.register(
            "upstream_bytes_received",
            "Bytes received from endpoints (TCP payload or HTTP bodies)",
            m.bytes_received.clone(),
        );
        r.register(
            "upstream_bytes_spliced",
            "Of the TCP payload bytes sent and received, those moved socket to socket by splice(2), not copied through the proxy",
            m.bytes_spliced.clone(),
        );
        r.register("upstream_retries", "Requests and TCP connects retried by MeshRetry", m.retries.clone());
        r.register(
            "upstream_overflows",
            "Requests, connects and retries refused because a MeshCircuitBreaker connection limit was reached",
            m.overflows.clone(),
        );
        r.register("upstream_ejections", "Endpoint addresses ejected by outlier detection", m.ejections.clone());
        r.register(
            "route_requests",
            "Requests and connections routed by MeshHTTPRoute / MeshTCPRoute, by route rule and backend",
            m.route_requests.clone(),
        );
        r.register(
            "upstream_health_checks",
            "Active health checks (MeshHealthCheck) by result",
            m.health_checks.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "TLS sessions with an endpoint that failed, by service and reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "passthrough",
            "Transparent traffic to destinations that are no MeshExternalService, allowed or denied (MeshPassthrough), by reason",
            m.passthrough.clone(),
        );
        r.register(
            "access_refused",
            "Uses of a service refused (forbidden by the Mesh, denied by a MeshTrafficPermission) or that a shadow deny would refuse",
            m.access_refused.clone(),
        );
        r.register("dns_queries", "DNS queries by result", m.dns_queries.clone());
        r.register("config_reloads", "Configuration reloads by result", m.config_reloads.clone());
        r.register(
            "access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        r.register(
            "spans",
            "MeshTrace spans by backend and result: exported, dropped (queue full) or failed (the collector did not take them)",
            m.spans.clone(),
        );
        Self { registry: r, ..m }
    }

    /// The handles for one service, created once per configuration.
    pub fn service(&self, service: &str, protocol: Protocol) -> Arc<ServiceMetrics> {
        let labels = ServiceLabels { service: service.to_string(), protocol: protocol.as_str() };
        let requests = STATUS_CLASSES.map(|status_class| {
            let l = RequestLabels { service: labels.service.clone(), protocol: labels.protocol, status_class };
            self.requests.get_or_create(&l).clone()
        });
        Arc::new(ServiceMetrics {
            connections: self.connections.get_or_create(&labels).clone(),
            connections_active: self.connections_active.get_or_create(&labels).clone(),
            requests,
            request_duration: self.request_duration.get_or_create(&labels).clone(),
            connect_duration: self.connect_duration.get_or_create(&labels).clone(),
            connect_errors: self.connect_errors.get_or_create(&labels).clone(),
            bytes_sent: self.bytes_sent.get_or_create(&labels).clone(),
            bytes_received: self.bytes_received.get_or_create(&labels).clone(),
            bytes_spliced: self.bytes_spliced.get_or_create(&labels).clone(),
            retries: self.retries.get_or_create(&labels).clone(),
            overflows: Limit::ALL.map(|limit| {
                let l = OverflowLabels {
                    service: labels.service.clone(),
                    protocol: labels.protocol,
                    limit: limit.as_str(),
                };
                self.overflows.get_or_create(&l).clone()
            }),
            ejections: self.ejections.get_or_create(&labels).clone(),
            health_checks: ["success", "failure"].map(|result| {
                let l = HealthCheckLabels { service: labels.service.clone(), protocol: labels.protocol, result };
                self.health_checks.get_or_create(&l).clone()
            }),
        })
    }

    /// Counts a request (or TCP connection) a route rule sent to `backend`.
    pub fn route_request(&self, service: &str, route: &str, backend: &str) {
        self.route_counter(service, route, backend).inc();
    }

    /// The counter of the requests a route rule sends to `backend`, to keep.
    pub fn route_counter(&self, service: &str, route: &str, backend: &str) -> Counter {
        let labels =
            RouteLabels { service: service.to_string(), route: route.to_string(), backend: backend.to_string() };
        self.route_requests.get_or_create(&labels).clone()
    }

    /// Counts a passthrough decision: `allowed` or `denied`, and why.
    pub fn passthrough(&self, unit: &'static str, allowed: bool, reason: &'static str) {
        let decision = if allowed { "allowed" } else { "denied" };
        self.passthrough.get_or_create(&PassthroughLabels { unit, decision, reason }).inc();
    }

    /// Counts a use of `service` refused (`forbidden`, `denied`) or shadow-denied.
    pub fn access_refused(&self, service: &str, reason: &'static str) {
        self.access_refused.get_or_create(&AccessLabels { service: service.to_string(), reason }).inc();
    }

    pub fn tls_failure(&self, service: &str, reason: crate::tls::FailureReason) {
        let labels = TlsFailureLabels { service: service.to_string(), reason: reason.as_str() };
        self.tls_handshake_failures.get_or_create(&labels).inc();
    }

    pub fn dns_query(&self, result: DnsResult) {
        self.dns_queries.get_or_create(&ResultLabels { result: result.as_str() }).inc();
    }

    pub fn config_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.config_reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// `count` spans for `backend` (`otlp` or `zipkin`) that ended as `result`.
    pub fn spans(&self, backend: &'static str, result: &'static str, count: u64) {
        self.spans.get_or_create(&SpanLabels { backend, result }).inc_by(count);
    }

    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// The registry in the OpenMetrics text format (which Prometheus reads).
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
