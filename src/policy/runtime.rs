//! The merged policy confs turned into what the data path applies, once per configuration.
//!
//! Each value is `None` when no policy sets it: the process defaults (flags, which default to
//! Kuma's code defaults) then apply.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use http::{HeaderMap, Method};

use super::Effective;
use crate::log_format::{Format, KumaValues, DEFAULT_HTTP_FORMAT, DEFAULT_TCP_FORMAT};
use crate::model::Protocol;
use crate::resources::policy::{AccessLogConf, HeaderMatch, HttpRetry};

/// MeshTimeout, per service. A zero duration turns its timeout off (except `connect`, which
/// validation keeps positive).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Option<Duration>,
    pub idle: Option<Duration>,
    pub request: Option<Duration>,
    pub stream_idle: Option<Duration>,
    pub max_stream: Option<Duration>,
    pub max_connection: Option<Duration>,
    pub request_headers: Option<Duration>,
}

/// What `to: MeshHTTPRoute` items set for the requests of one route's rules: for each kind, when
/// an item names the route, the merge of the Mesh items and those items replaces the service's
/// conf (Kuma's route-level conf, which leaves the MeshExternalService items out).
#[derive(Debug, Clone, Default)]
pub struct RouteLevel {
    /// A MeshTimeout item names the route: its `requestTimeout` and `streamIdleTimeout`.
    pub timeouts: Option<Timeouts>,
    /// A MeshRetry item names the route and makes a retry policy (one that makes none, as
    /// `numRetries: 0`, leaves the service's, as Kuma).
    pub retry: Option<Arc<RetryPolicy>>,
    /// A MeshAccessLog item names the route: its requests are logged by this conf's backends
    /// only (none, when it has none), not the service's, as Kuma's per-route access logs.
    pub access_log: Option<AccessLogConf>,
}

/// A policy's timeout (`set`) over the process default; a zero duration turns it off.
pub fn timeout_over(set: Option<Duration>, default: Option<Duration>) -> Option<Duration> {
    set.map_or(default, |d| Some(d).filter(|d| !d.is_zero()))
}

/// MeshCircuitBreaker `connectionLimits`, per service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: Option<usize>,
    pub max_pending_requests: Option<usize>,
    pub max_requests: Option<usize>,
    pub max_retries: Option<usize>,
    pub max_connection_pools: Option<usize>,
}

/// Envoy's circuit-breaker defaults (what Kuma's `mesh-circuit-breaker-all` sets too).
pub const DEFAULT_MAX_PENDING_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_REQUESTS: usize = 1024;
pub const DEFAULT_MAX_RETRIES: usize = 3;

/// MeshCircuitBreaker `outlierDetection`, per service.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Outlier {
    /// No policy: the process's `--eject-after` connect-failure ejection.
    #[default]
    Default,
    /// `disabled: true`: nothing is ejected.
    Disabled,
    Detect(OutlierDetection),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// How often success rate and failure percentage are evaluated (Envoy's default 10 s).
    pub interval: Duration,
    /// Ejection time is this times the number of ejections in a row (Envoy's default 30 s),
    /// at most [`MAX_EJECTION_TIME`].
    pub base_ejection_time: Duration,
    /// At most this share of a service's addresses is ejected at once (Envoy: 10), but one
    /// address always can be.
    pub max_ejection_percent: u8,
    /// Locally originated failures (connect failures, resets, timeouts) are counted apart from
    /// the endpoint's responses.
    pub split_local_errors: bool,
    pub consecutive_total: Option<u32>,
    pub consecutive_gateway: Option<u32>,
    pub consecutive_local: Option<u32>,
    pub success_rate: Option<SuccessRate>,
    pub failure_percentage: Option<FailurePercentage>,
    /// Below this share of healthy addresses the balancer ignores health; `None`: unset (then
    /// MeshHealthCheck's, else Envoy's 50).
    pub healthy_panic_threshold: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuccessRate {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    pub stdev_factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailurePercentage {
    pub minimum_hosts: u32,
    pub request_volume: u32,
    pub threshold: u32,
}

/// Envoy's `max_ejection_time` default.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// MeshRetry for HTTP-family services, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    pub rate_limited: Vec<ResetHeader>,
    pub rate_limited_max: Duration,
    pub on: RetryOn,
    pub status_codes: Vec<u16>,
    /// gRPC status codes (from the response headers of a trailers-only response).
    pub grpc_statuses: Vec<u32>,
    /// `HttpMethod*` items: only requests with one of these methods are retried.
    pub methods: Vec<Method>,
    pub retriable_response_headers: Vec<HeaderMatcher>,
    pub retriable_request_headers: Vec<HeaderMatcher>,
    pub omit_previous_hosts: bool,
}

/// Envoy's `retry_on` conditions that do not name a status code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub envoy_ratelimited: bool,
}

#[derive(Debug, Clone)]
pub struct ResetHeader {
    pub name: HeaderName,
    /// `UnixTimestamp` rather than `Seconds`.
    pub unix_timestamp: bool,
}

/// Envoy's `retry_back_off` default base interval.
pub const DEFAULT_BASE_INTERVAL: Duration = Duration::from_millis(25);
/// Envoy's `rate_limited_retry_back_off` default max interval.
pub const DEFAULT_RATE_LIMITED_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    pub name: HeaderName,
    pub test: HeaderTest,
}

#[derive(Debug, Clone)]
pub enum HeaderTest {
    Exact(String),
    Prefix(String),
    /// Over the value's bytes, as RE2 reads them in Envoy: a value that is not UTF-8 can still
    /// match, where the expression allows its bytes (`(?-u:.)`, `(?-u:\xe9)`).
    Regex(regex::bytes::Regex),
    Present,
    Absent,
}

impl HeaderMatcher {
    pub(crate) fn compile(m: &HeaderMatch) -> Option<Self> {
        let name = HeaderName::from_bytes(m.name.as_bytes()).ok()?;
        let value = m.value.clone().unwrap_or_default();
        let test = match m.type_.as_deref().unwrap_or("Exact") {
            "Present" => HeaderTest::Present,
            "Absent" => HeaderTest::Absent,
            // Envoy: a prefix match with an empty prefix is a presence match.
            "Prefix" if value.is_empty() => HeaderTest::Present,
            "Prefix" => HeaderTest::Prefix(value),
            "RegularExpression" => HeaderTest::Regex(crate::resources::full_match_bytes_regex(&value).ok()?),
            _ => HeaderTest::Exact(value),
        };
        Some(Self { name, test })
    }

    /// As Envoy matches: a header sent more than once is tested as its values joined by `,`
    /// (`cookie`, which HTTP/2 clients split, by `; `); Present and Absent ask only whether the
    /// header was sent, whatever its bytes.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let Some(value) = joined_values(headers, &self.name) else {
            return matches!(self.test, HeaderTest::Absent);
        };
        match &self.test {
            HeaderTest::Absent => false,
            HeaderTest::Present => true,
            HeaderTest::Exact(want) => *value == *want.as_bytes(),
            HeaderTest::Prefix(want) => value.starts_with(want.as_bytes()),
            HeaderTest::Regex(re) => re.is_match(&value),
        }
    }
}

/// A header's values as one, as Envoy reads a header sent more than once: joined by `,`, and
/// `cookie` (which HTTP/2 clients split, RFC 9113 §8.2.3) by `; `. Borrowed when it was sent
/// once, owned when joined; `None` when it was not sent.
pub fn joined_values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else { return Some(Cow::Borrowed(first.as_bytes())) };
    let separator: &[u8] = if name == http::header::COOKIE { b"; " } else { b"," };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.extend_from_slice(separator);
        joined.extend_from_slice(value.as_bytes());
    }
    Some(Cow::Owned(joined))
}

/// The retry policy's HTTP `retryOn` default when none (or only methods) is given.
const HTTP_DEFAULT_RETRY_ON: RetryOn =
    RetryOn { gateway_error: true, connect_failure: true, refused_stream: true, ..NONE };
/// The gRPC default: `cancelled,connect-failure,gateway-error,refused-stream,reset,resource-exhausted,unavailable`.
const GRPC_DEFAULT: (RetryOn, &[u32]) =
    (RetryOn { gateway_error: true, connect_failure: true, refused_stream: true, reset: true, ..NONE }, &[1, 8, 14]);
const NONE: RetryOn = RetryOn {
    five_xx: false,
    gateway_error: false,
    reset: false,
    retriable_4xx: false,
    connect_failure: false,
    refused_stream: false,
    envoy_ratelimited: false,
};

fn grpc_status(name: &str) -> Option<u32> {
    Some(match name {
        "Canceled" => 1,
        "DeadlineExceeded" => 4,
        "ResourceExhausted" => 8,
        "Internal" => 13,
        "Unavailable" => 14,
        _ => return None,
    })
}

impl Effective {
    pub fn timeouts(&self) -> Timeouts {
        let Some(c) = &self.mesh_timeout else { return Timeouts::default() };
        let http = c.http.clone().unwrap_or_default();
        let get = |d: Option<crate::resources::policy::GoDuration>| d.map(|d| d.get());
        Timeouts {
            connect: get(c.connection_timeout),
            idle: get(c.idle_timeout),
            request: get(http.request_timeout),
            stream_idle: get(http.stream_idle_timeout),
            max_stream: get(http.max_stream_duration),
            max_connection: get(http.max_connection_duration),
            request_headers: get(http.request_headers_timeout),
        }
    }

    pub fn limits(&self) -> Limits {
        let Some(l) = self.mesh_circuit_breaker.as_ref().and_then(|c| c.connection_limits.as_ref()) else {
            return Limits::default();
        };
        let get = |n: Option<i64>| n.and_then(|n| usize::try_from(n).ok());
        Limits {
            max_connections: get(l.max_connections),
            max_pending_requests: get(l.max_pending_requests),
            max_requests: get(l.max_requests),
            max_retries: get(l.max_retries),
            max_connection_pools: get(l.max_connection_pools),
        }
    }

    pub fn outlier(&self) -> Outlier {
        let Some(o) = self.mesh_circuit_breaker.as_ref().and_then(|c| c.outlier_detection.as_ref()) else {
            return Outlier::Default;
        };
        if o.disabled == Some(true) {
            return Outlier::Disabled;
        }
        let d = o.detectors.clone().unwrap_or_default();
        let count = |n: Option<i64>, default: u32| n.and_then(|n| u32::try_from(n).ok()).unwrap_or(default);
        // A consecutive detector without its count is off, as Kuma configures it (enforcing 0).
        let consecutive = |c: &Option<crate::resources::policy::Consecutive>| {
            c.as_ref().and_then(|c| c.consecutive).and_then(|n| u32::try_from(n).ok())
        };
        Outlier::Detect(OutlierDetection {
            interval: o.interval.map_or(Duration::from_secs(10), |d| d.get()),
            base_ejection_time: o.base_ejection_time.map_or(Duration::from_secs(30), |d| d.get()),
            max_ejection_percent: o.max_ejection_percent.and_then(|p| u8::try_from(p).ok()).unwrap_or(10),
            split_local_errors: o.split_external_and_local_errors.unwrap_or(false),
            consecutive_total: consecutive(&d.total_failures),
            consecutive_gateway: consecutive(&d.gateway_failures),
            consecutive_local: consecutive(&d.local_origin_failures),
            success_rate: d.success_rate.as_ref().map(|s| SuccessRate {
                minimum_hosts: count(s.minimum_hosts, 5),
                request_volume: count(s.request_volume, 100),
                stdev_factor: s.standard_deviation_factor.as_ref().and_then(|f| f.decimal()).unwrap_or(1.9),
            }),
            failure_percentage: d.failure_percentage.as_ref().map(|f| FailurePercentage {
                minimum_hosts: count(f.minimum_hosts, 5),
                request_volume: count(f.request_volume, 50),
                threshold: count(f.threshold, 85),
            }),
            healthy_panic_threshold: o.healthy_panic_threshold.as_ref().and_then(|p| p.decimal()),
        })
    }

    /// `tcp.maxConnectAttempt`, for TCP services.
    pub fn tcp_connect_attempts(&self) -> Option<u32> {
        let n = self.mesh_retry.as_ref()?.tcp.as_ref()?.max_connect_attempt?;
        u32::try_from(n).ok()
    }

    /// The retry policy for an HTTP-family service: `grpc` for gRPC services, `http` for HTTP/1
    /// and HTTP/2 ones (Kuma 2.14 emits none for http2: we apply `http`, see docs/policies.md).
    /// `None` when no policy applies or `numRetries` is 0.
    pub fn retry(&self, protocol: Protocol) -> Option<RetryPolicy> {
        let conf = self.mesh_retry.as_ref()?;
        let (section, grpc) = match protocol {
            Protocol::Grpc => (conf.grpc.as_ref()?, true),
            Protocol::Http | Protocol::Http2 => (conf.http.as_ref()?, false),
            Protocol::Tcp => return None,
        };
        compile_retry(section, grpc)
    }
}

fn compile_retry(r: &HttpRetry, grpc: bool) -> Option<RetryPolicy> {
    let num_retries = r.num_retries.map_or(Some(1), |n| u32::try_from(n).ok())?;
    if num_retries == 0 {
        return None;
    }
    let back_off = r.back_off.clone().unwrap_or_default();
    let base_interval = back_off.base_interval.map_or(DEFAULT_BASE_INTERVAL, |d| d.get());
    let max_interval = back_off.max_interval.map_or(base_interval * 10, |d| d.get());
    let mut on = NONE;
    let mut status_codes = Vec::new();
    let mut grpc_statuses = Vec::new();
    let mut methods = Vec::new();
    let mut conditions = 0;
    for item in r.retry_on.iter().flatten() {
        if let Some(method) = item.strip_prefix("HttpMethod").filter(|_| !grpc) {
            if let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) {
                methods.push(m);
            }
            continue;
        }
        // A status code is no condition of its own: with only codes (and methods), the
        // default conditions still apply, and `retriable-status-codes` is added to them (Kuma's
        // `genHttpRetryPolicy`).
        if let Some(code) = item.parse::<u16>().ok().filter(|_| !grpc) {
            status_codes.push(code);
            continue;
        }
        conditions += 1;
        match item.as_str() {
            "5xx" => on.five_xx = true,
            "GatewayError" => on.gateway_error = true,
            "Reset" => on.reset = true,
            "Retriable4xx" => on.retriable_4xx = true,
            "ConnectFailure" => on.connect_failure = true,
            "RefusedStream" => on.refused_stream = true,
            "EnvoyRatelimited" => on.envoy_ratelimited = true,
            other if grpc => grpc_statuses.extend(grpc_status(other)),
            _ => {}
        }
    }
    if conditions == 0 {
        if grpc {
            on = GRPC_DEFAULT.0;
            grpc_statuses = GRPC_DEFAULT.1.to_vec();
        } else {
            on = HTTP_DEFAULT_RETRY_ON;
        }
    }
    let headers = |list: &Option<Vec<HeaderMatch>>| list.iter().flatten().filter_map(HeaderMatcher::compile).collect();
    let rate_limited = r.rate_limited_back_off.clone().unwrap_or_default();
    Some(RetryPolicy {
        num_retries,
        per_try_timeout: r.per_try_timeout.map(|d| d.get()).filter(|d| !d.is_zero()),
        base_interval,
        max_interval,
        rate_limited: rate_limited
            .reset_headers
            .iter()
            .flatten()
            .filter_map(|h| {
                let name = HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?;
                Some(ResetHeader { name, unix_timestamp: h.format == "UnixTimestamp" })
            })
            .collect(),
        rate_limited_max: rate_limited.max_interval.map_or(DEFAULT_RATE_LIMITED_MAX, |d| d.get()),
        on,
        status_codes,
        grpc_statuses,
        methods,
        retriable_response_headers: headers(&r.retriable_response_headers),
        retriable_request_headers: headers(&r.retriable_request_headers),
        omit_previous_hosts: r.host_selection.iter().flatten().any(|p| p.predicate == "OmitPreviousHosts"),
    })
}

/// MeshHealthCheck, compiled for a service's protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub initial_jitter: Duration,
    pub interval_jitter: Duration,
    pub interval_jitter_percent: u32,
    /// Used instead of `interval` while the service had no traffic since the last check.
    pub no_traffic_interval: Duration,
    /// When no address is healthy, fail requests instead of trying unhealthy addresses.
    pub fail_traffic_on_panic: bool,
    /// Deprecated here (Kuma moved it to MeshCircuitBreaker), still honoured when set.
    pub healthy_panic_threshold: Option<f64>,
    pub event_log_path: Option<std::path::PathBuf>,
    pub always_log_failures: bool,
    /// Keep a check's HTTP/gRPC connection for the next check (Envoy's default).
    pub reuse_connection: bool,
    pub check: Check,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// An HTTP GET (HTTP/2 for http2 services); healthy when the status is expected.
    Http { path: String, http2: bool, set: Vec<(String, String)>, add: Vec<(String, String)>, expected: Vec<u16> },
    /// `grpc.health.v1.Health/Check`; healthy when it answers SERVING.
    Grpc { service_name: String, authority: Option<String> },
    /// A connect, optionally a payload sent and blocks expected back, in order.
    Tcp { send: Option<Vec<u8>>, receive: Vec<Vec<u8>> },
}

impl Effective {
    /// The active check for a service of `protocol`: the matching checker (http for http and
    /// http2, grpc for grpc, tcp for tcp), else tcp when it is enabled and the matching one is
    /// there but disabled, as Kuma chooses.
    pub fn health_check(&self, protocol: Protocol) -> Option<HealthCheck> {
        let c = self.mesh_health_check.as_ref()?;
        let enabled = |disabled: Option<bool>| disabled != Some(true);
        let tcp = c.tcp.as_ref().filter(|t| enabled(t.disabled)).map(|t| Check::Tcp {
            send: t.send.as_ref().map(|s| s.as_bytes().to_vec()),
            receive: t.receive.iter().flatten().map(|r| r.as_bytes().to_vec()).collect(),
        });
        let matching = match protocol {
            Protocol::Http | Protocol::Http2 => c.http.as_ref().filter(|h| enabled(h.disabled)).map(|h| {
                let pairs = |list: &Option<Vec<crate::resources::policy::HeaderKeyValue>>| {
                    list.iter().flatten().map(|kv| (kv.name.clone(), kv.value.clone())).collect()
                };
                let headers = h.request_headers_to_add.clone().unwrap_or_default();
                Check::Http {
                    path: h.path.clone().unwrap_or_else(|| "/".to_string()),
                    http2: protocol == Protocol::Http2,
                    set: pairs(&headers.set),
                    add: pairs(&headers.add),
                    expected: h
                        .expected_statuses
                        .as_ref()
                        .map_or_else(|| vec![200], |s| s.iter().filter_map(|&c| u16::try_from(c).ok()).collect()),
                }
            }),
            Protocol::Grpc => c.grpc.as_ref().filter(|g| enabled(g.disabled)).map(|g| Check::Grpc {
                service_name: g.service_name.clone().unwrap_or_default(),
                authority: g.authority.clone(),
            }),
            Protocol::Tcp => None,
        };
        // tcp stands in only for the protocol's own checker given and disabled (Kuma's
        // `selectHealthCheckType`): absent, there is no check.
        let own_disabled = match protocol {
            Protocol::Http | Protocol::Http2 => c.http.as_ref().is_some_and(|h| !enabled(h.disabled)),
            Protocol::Grpc => c.grpc.as_ref().is_some_and(|g| !enabled(g.disabled)),
            Protocol::Tcp => true,
        };
        let check = matching.or(tcp.filter(|_| own_disabled))?;
        let duration =
            |d: Option<crate::resources::policy::GoDuration>, default: Duration| d.map_or(default, |d| d.get());
        let count = |n: Option<i64>, default: u32| n.and_then(|n| u32::try_from(n).ok()).unwrap_or(default);
        Some(HealthCheck {
            interval: duration(c.interval, Duration::from_secs(60)),
            timeout: duration(c.timeout, Duration::from_secs(15)),
            unhealthy_threshold: count(c.unhealthy_threshold, 5).max(1),
            healthy_threshold: count(c.healthy_threshold, 1).max(1),
            initial_jitter: duration(c.initial_jitter, Duration::ZERO),
            interval_jitter: duration(c.interval_jitter, Duration::ZERO),
            interval_jitter_percent: count(c.interval_jitter_percent, 0),
            no_traffic_interval: duration(c.no_traffic_interval, Duration::from_secs(60)),
            fail_traffic_on_panic: c.fail_traffic_on_panic.unwrap_or(false),
            healthy_panic_threshold: c.healthy_panic_threshold.as_ref().and_then(|p| p.decimal()),
            event_log_path: c.event_log_path.as_ref().map(std::path::PathBuf::from),
            always_log_failures: c.always_log_health_check_failures.unwrap_or(false),
            reuse_connection: c.reuse_connection.unwrap_or(true),
            check,
        })
    }
}

/// MeshAccessLog, compiled: where each record goes and how it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogPlan {
    pub backends: Vec<LogBackendPlan>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogBackendPlan {
    pub sink: SinkTarget,
    pub line: LineFormat,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkTarget {
    File(std::path::PathBuf),
    /// `host:port` of a collector reading one line per entry.
    Tcp(String),
    /// `host:port` of an OTLP/gRPC receiver.
    OpenTelemetry(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum LineFormat {
    Plain {
        format: Format,
        omit_empty: bool,
    },
    Json {
        fields: Vec<(String, Format)>,
        omit_empty: bool,
    },
    /// An OTLP log record: its body (text) and attributes.
    Otel {
        body: Format,
        attributes: Vec<(String, Format)>,
    },
}

/// OTLP/gRPC's port when an endpoint has none.
pub const OTLP_DEFAULT_PORT: u16 = 4317;

/// An OTLP endpoint as `host:port`: `host:port` and `[v6]:port` stay, a bare host (or `[v6]`)
/// gets [`OTLP_DEFAULT_PORT`].
pub fn otlp_endpoint(endpoint: &str) -> String {
    let has_port = endpoint
        .rsplit_once(':')
        .is_some_and(|(host, port)| port.parse::<u16>().is_ok() && (!host.contains(':') || host.starts_with('[')));
    if has_port {
        endpoint.to_string()
    } else {
        format!("{}:{OTLP_DEFAULT_PORT}", endpoint.trim_end_matches(':'))
    }
}

impl Effective {
    /// The access log of service `mesh/name`; `None` without a MeshAccessLog or with an empty
    /// backend list. Backends that cannot be compiled (validation reports them) are left out.
    pub fn access_log(&self, mesh: &str, name: &str, protocol: Protocol, zone: &str) -> Option<AccessLogPlan> {
        self.access_log_of(self.mesh_access_log.as_ref()?, mesh, name, protocol, zone)
    }

    /// [`Effective::access_log`] with `conf` in place of the service's MeshAccessLog (a route's).
    pub fn access_log_of(
        &self,
        conf: &AccessLogConf,
        mesh: &str,
        name: &str,
        protocol: Protocol,
        zone: &str,
    ) -> Option<AccessLogPlan> {
        let source = self.source.clone().unwrap_or_default();
        let kuma = KumaValues {
            mesh: mesh.to_string(),
            source_service: source.name,
            source_address: source.address,
            destination_service: name.to_string(),
            zone: zone.to_string(),
        };
        let default = if protocol == Protocol::Tcp { DEFAULT_TCP_FORMAT } else { DEFAULT_HTTP_FORMAT };
        let parse = |text: &str| Format::parse(text, &kuma).ok();
        let line = |format: &Option<crate::resources::policy::LogFormat>| -> Option<LineFormat> {
            let Some(f) = format else { return Some(LineFormat::Plain { format: parse(default)?, omit_empty: false }) };
            let omit_empty = f.omit_empty_values.unwrap_or(false);
            match f.type_.as_str() {
                "Json" => {
                    let fields = f
                        .json
                        .iter()
                        .flatten()
                        .map(|j| Some((j.key.clone(), parse(&j.value)?)))
                        .collect::<Option<_>>()?;
                    Some(LineFormat::Json { fields, omit_empty })
                }
                _ => Some(LineFormat::Plain { format: parse(f.plain.as_deref()?)?, omit_empty }),
            }
        };
        let mut backends = Vec::new();
        for b in conf.backends.iter().flatten() {
            let plan = match b.type_.as_str() {
                "File" => b.file.as_ref().and_then(|f| {
                    Some(LogBackendPlan { sink: SinkTarget::File(f.path.clone().into()), line: line(&f.format)? })
                }),
                "Tcp" => b.tcp.as_ref().and_then(|t| {
                    Some(LogBackendPlan { sink: SinkTarget::Tcp(t.address.clone()), line: line(&t.format)? })
                }),
                "OpenTelemetry" => b.open_telemetry.as_ref().and_then(|o| {
                    let endpoint = o.endpoint.clone().filter(|e| !e.is_empty())?;
                    let endpoint = otlp_endpoint(&endpoint);
                    let body = match &o.body {
                        Some(serde_json::Value::String(text)) => parse(text)?,
                        Some(other) => parse(&other.to_string())?,
                        None => parse(default)?,
                    };
                    let attributes = o
                        .attributes
                        .iter()
                        .flatten()
                        .map(|a| Some((a.key.clone(), parse(&a.value)?)))
                        .collect::<Option<_>>()?;
                    Some(LogBackendPlan {
                        sink: SinkTarget::OpenTelemetry(endpoint),
                        line: LineFormat::Otel { body, attributes },
                    })
                }),
                _ => None,
            };
            backends.extend(plan);
        }
        (!backends.is_empty()).then_some(AccessLogPlan { backends })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn matcher(test: HeaderTest) -> HeaderMatcher {
        HeaderMatcher { name: HeaderName::from_static("x-v"), test }
    }

    #[test]
    fn a_consecutive_detector_without_its_count_is_off() {
        let conf = |detectors: &str| {
            let yaml = format!("{{outlierDetection: {{detectors: {detectors}}}}}");
            let mesh_circuit_breaker = Some(serde_norway::from_str(&yaml).unwrap());
            match (Effective { mesh_circuit_breaker, ..Effective::default() }).outlier() {
                Outlier::Detect(d) => (d.consecutive_total, d.consecutive_gateway, d.consecutive_local),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(conf("{totalFailures: {}, gatewayFailures: {}, localOriginFailures: {}}"), (None, None, None));
        assert_eq!(conf("{totalFailures: {consecutive: 3}}"), (Some(3), None, None));
    }

    #[test]
    fn tcp_checks_an_http_service_only_in_place_of_a_disabled_http_check() {
        let check = |conf: &str, protocol| {
            let mesh_health_check = Some(serde_norway::from_str(conf).unwrap());
            (Effective { mesh_health_check, ..Effective::default() }).health_check(protocol).map(|c| c.check)
        };
        assert_eq!(check("{tcp: {}}", Protocol::Http), None, "no http section: no check, as Kuma");
        assert_eq!(check("{tcp: {}}", Protocol::Grpc), None);
        let tcp = Some(Check::Tcp { send: None, receive: Vec::new() });
        assert_eq!(check("{http: {disabled: true}, tcp: {}}", Protocol::Http2), tcp);
        assert_eq!(check("{grpc: {disabled: true}, tcp: {}}", Protocol::Grpc), tcp);
        assert_eq!(check("{tcp: {}}", Protocol::Tcp), tcp);
    }

    #[test]
    fn status_codes_alone_keep_the_default_conditions() {
        let retry_on = |items: &[&str]| HttpRetry {
            retry_on: Some(items.iter().map(|s| s.to_string()).collect()),
            ..HttpRetry::default()
        };
        let codes = compile_retry(&retry_on(&["429", "HttpMethodGET"]), false).unwrap();
        assert_eq!(codes.on, HTTP_DEFAULT_RETRY_ON, "Kuma keeps gateway-error,connect-failure,refused-stream");
        assert_eq!(codes.status_codes, [429]);
        let named = compile_retry(&retry_on(&["429", "Reset"]), false).unwrap();
        assert_eq!(named.on, RetryOn { reset: true, ..NONE }, "a named condition replaces the default");
        assert_eq!(named.status_codes, [429]);
    }

    #[test]
    fn a_repeated_header_is_matched_as_its_values_joined_by_commas() {
        let mut headers = HeaderMap::new();
        headers.append("x-v", HeaderValue::from_static("a"));
        headers.append("x-v", HeaderValue::from_static("b"));
        assert!(matcher(HeaderTest::Exact("a,b".into())).matches(&headers));
        assert!(!matcher(HeaderTest::Exact("a".into())).matches(&headers));
        assert!(matcher(HeaderTest::Regex(crate::resources::full_match_bytes_regex(".*,b").unwrap())).matches(&headers));
        assert!(matcher(HeaderTest::Prefix("a,".into())).matches(&headers));

        let mut cookies = HeaderMap::new();
        cookies.append(http::header::COOKIE, HeaderValue::from_static("a=1"));
        cookies.append(http::header::COOKIE, HeaderValue::from_static("b=2"));
        let cookie = HeaderMatcher { name: http::header::COOKIE, test: HeaderTest::Exact("a=1; b=2".into()) };
        assert!(cookie.matches(&cookies), "HTTP/2 split cookies, joined as one cookie header");
    }

    #[test]
    fn a_value_that_is_not_utf8_is_present_not_absent() {
        let mut headers = HeaderMap::new();
        headers.insert("x-v", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert!(!matcher(HeaderTest::Absent).matches(&headers));
        assert!(matcher(HeaderTest::Present).matches(&headers));
        assert!(matcher(HeaderTest::Prefix("caf".into())).matches(&headers));
        let regex = |re: &str| matcher(HeaderTest::Regex(crate::resources::full_match_bytes_regex(re).unwrap()));
        assert!(regex("caf(?-u:.)").matches(&headers), "a byte that is not UTF-8 is matched as a byte");
        assert!(!regex("caf.").matches(&headers), "as RE2's UTF-8 mode: `.` matches a character, not a stray byte");
        assert!(matcher(HeaderTest::Absent).matches(&HeaderMap::new()));
    }
}
