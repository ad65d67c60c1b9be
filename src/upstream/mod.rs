//! Endpoints of a service: resolution, balancing, passive health and connecting.
//!
//! An [`Upstream`] is built per service and reused across reloads while the service's endpoints
//! do not change, so DNS answers and health survive a configuration swap.

pub mod active;
mod app_body;
mod connect;
pub mod early_response;
pub mod h1;
pub mod h2;
pub mod health;
pub mod outlier;
pub mod pool;
pub mod replay;
pub mod resolve;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng as _;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

pub use app_body::{AppBody, AppBodyError, BodyEnd, EndWatch};
pub use connect::{TargetAddr, UpstreamIo, UpstreamStream};
pub use health::{ActiveGuard, EjectionPolicy, Health};
pub use outlier::Outcome;
pub use resolve::DnsResolver;

use crate::metrics::{metrics, Limit, ServiceMetrics};
use crate::model::{Endpoint, EndpointAddress, Protocol, TlsPolicy};
use crate::policy::runtime::{self as policy_runtime, Outlier};
use crate::policy::Effective;
use crate::tls::{self, TlsError};
use crate::worker::Line;

/// What TLS origination needs for one service.
#[derive(Debug, Clone, Copy)]
pub struct TlsSetup<'a> {
    pub policy: &'a TlsPolicy,
    pub config: &'a Arc<rustls::ClientConfig>,
    /// The configuration's identity, in the keys of the connections made with it.
    pub identity: pool::TlsIdentity,
}

/// Open upstream connections per service by default (Envoy's `max_connections` default).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Kuma's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where DNS names are resolved: fixed servers, or the system's (created on first use).
#[derive(Debug, Default)]
pub struct ResolverSource {
    nameservers: Vec<SocketAddr>,
    resolver: OnceLock<Result<DnsResolver, String>>,
}

impl ResolverSource {
    /// `nameservers` empty means the system's resolvers from `/etc/resolv.conf`.
    pub fn new(nameservers: Vec<SocketAddr>) -> Self {
        Self { nameservers, resolver: OnceLock::new() }
    }

    /// Looks `name` up; `Err` says why not (no resolver, or the lookup failed).
    pub async fn resolve(&self, name: &str) -> Result<resolve::Resolved, String> {
        let resolver = self.get().map_err(|e| format!("no resolver: {e}"))?;
        resolver.resolve(name).await.map_err(|e| e.to_string())
    }

    fn get(&self) -> Result<&DnsResolver, &str> {
        self.resolver
            .get_or_init(|| {
                if self.nameservers.is_empty() {
                    DnsResolver::system().map_err(|e| e.to_string())
                } else {
                    Ok(DnsResolver::with_nameservers(&self.nameservers))
                }
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

/// The process defaults (flags); a service's policies override them ([`UpstreamPolicy`]).
#[derive(Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    /// Open upstream connections per service (Envoy's circuit-breaker default, 1024); more
    /// connects fail at once without counting against an endpoint.
    pub max_connections: usize,
    /// Idle HTTP/1 upstream connections, and HTTP/2 ones no request used, are closed after this
    /// long.
    pub idle_timeout: Duration,
    pub ejection: EjectionPolicy,
    pub resolver: ResolverSource,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: pool::DEFAULT_IDLE_TIMEOUT,
            ejection: EjectionPolicy::default(),
            resolver: ResolverSource::default(),
        }
    }
}

/// What a service's policies, over the process defaults, say about reaching its endpoints.
/// Replaced on every reload, also for an upstream that is kept.
#[derive(Debug, Clone)]
pub struct UpstreamPolicy {
    pub connect_timeout: Duration,
    /// MeshCircuitBreaker `connectionLimits`.
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_requests: usize,
    pub max_retries: usize,
    /// `maxConnectionPools`: HTTP connection pools (one per endpoint and address, TLS client,
    /// protocol and worker); `None`: unlimited.
    pub max_connection_pools: Option<usize>,
    /// Idle pooled connections close after this long (`None`: never).
    pub pool_idle_timeout: Option<Duration>,
    /// MeshTimeout `http.maxConnectionDuration`: a connection takes no new request after this.
    pub max_connection_duration: Option<Duration>,
    /// TCP: endpoints tried per connection (MeshRetry `tcp.maxConnectAttempt`; else 2: one
    /// retry on another endpoint).
    pub connect_attempts: u32,
    pub outlier: Outlier,
    /// MeshTimeout as set by policies (the HTTP and TCP layers apply their own defaults).
    pub timeouts: policy_runtime::Timeouts,
    /// MeshRetry for HTTP-family services.
    pub retry: Option<Arc<policy_runtime::RetryPolicy>>,
    /// MeshHealthCheck: active checks of every address.
    pub health_check: Option<Arc<policy_runtime::HealthCheck>>,
    /// The service's TLS origination, for health checks (set by the live snapshot).
    pub tls: Option<(TlsPolicy, Arc<rustls::ClientConfig>)>,
    /// MeshAccessLog backends.
    pub access_log: Option<Arc<crate::access_log::ServiceLog>>,
    /// Per MeshHTTPRoute rule of the service, the backends of a MeshAccessLog that names the
    /// rule's route, in place of the service's (set by the live snapshot; see
    /// [`policy_runtime::RouteLevel::access_log`]).
    pub rule_access_logs: Box<[Option<Arc<crate::access_log::ServiceLog>>]>,
    /// MeshTrace: HTTP-family services only.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
}

impl UpstreamPolicy {
    /// The policy of service `key` (`mesh/name`).
    pub fn new(settings: &Settings, policies: &Effective, protocol: Protocol, key: &str) -> Self {
        let timeouts = policies.timeouts();
        let limits = policies.limits();
        Self {
            connect_timeout: timeouts.connect.unwrap_or(settings.connect_timeout),
            max_connections: limits.max_connections.unwrap_or(settings.max_connections),
            max_pending_requests: limits.max_pending_requests.unwrap_or(policy_runtime::DEFAULT_MAX_PENDING_REQUESTS),
            max_requests: limits.max_requests.unwrap_or(policy_runtime::DEFAULT_MAX_REQUESTS),
            max_retries: limits.max_retries.unwrap_or(policy_runtime::DEFAULT_MAX_RETRIES),
            max_connection_pools: limits.max_connection_pools,
            pool_idle_timeout: policy_runtime::timeout_over(timeouts.idle, Some(settings.idle_timeout)),
            max_connection_duration: policy_runtime::timeout_over(timeouts.max_connection, None),
            connect_attempts: policies.tcp_connect_attempts().unwrap_or(2).max(1),
            outlier: policies.outlier(),
            timeouts,
            retry: policies.retry(protocol).map(Arc::new),
            health_check: policies.health_check(protocol).map(Arc::new),
            tls: None,
            access_log: {
                let (mesh, name) = key.split_once('/').unwrap_or(("", key));
                let plan = policies.access_log(mesh, name, protocol, "");
                plan.and_then(|plan| crate::access_log::ServiceLog::start(key, &plan))
            },
            rule_access_logs: Box::default(),
            tracer: {
                let mesh = key.split_once('/').map_or("", |(mesh, _)| mesh);
                let plan = policies.trace(mesh).filter(|_| protocol != Protocol::Tcp);
                plan.and_then(|plan| crate::trace::Tracer::start(key, &plan))
            },
        }
    }

    /// Starts the access logs of `service`'s MeshHTTPRoute rules whose route a MeshAccessLog
    /// names: once per distinct conf (a route's rules share theirs), so a backend that cannot
    /// start is reported once.
    pub fn start_rule_access_logs(&mut self, service: &crate::catalog::Service) {
        let Some(table) = service.routes.as_ref().and_then(|r| r.http.as_ref()) else { return };
        let key = service.key();
        let mut started: Vec<(&crate::resources::policy::AccessLogConf, Option<Arc<crate::access_log::ServiceLog>>)> =
            Vec::new();
        let mut logs = Vec::with_capacity(table.rules.len());
        for rule in &table.rules {
            let Some(conf) = rule.policies.as_ref().and_then(|level| level.access_log.as_ref()) else {
                logs.push(None);
                continue;
            };
            let log = match started.iter().find(|(seen, _)| *seen == conf) {
                Some((_, log)) => log.clone(),
                None => {
                    let plan = service.policies.access_log_of(conf, &service.mesh, &service.name, service.protocol, "");
                    let log = plan.and_then(|plan| crate::access_log::ServiceLog::start(&key, &plan));
                    started.push((conf, log.clone()));
                    log
                }
            };
            logs.push(log);
        }
        self.rule_access_logs = logs.into_boxed_slice();
    }

    fn has_interval_detectors(&self) -> bool {
        matches!(&self.outlier, Outlier::Detect(d) if d.success_rate.is_some() || d.failure_percentage.is_some())
    }
}

/// One of a limited number of things in use (connections, requests, retries), released when
/// dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

/// One worker's handle on an upstream, for what a request holds until its response ends (its
/// bodies, its request slot, its pooled connection's way back). On the data path it is the
/// worker's own route (`live::RouteParts`, one per worker and configuration), so cloning and
/// dropping it writes a reference count only that worker writes, not the `Arc<Upstream>` every
/// worker shares.
#[derive(Clone)]
pub struct UpstreamHandle(Arc<dyn AsRef<Upstream> + Send + Sync>);

impl UpstreamHandle {
    pub fn new(owner: Arc<dyn AsRef<Upstream> + Send + Sync>) -> Self {
        Self(owner)
    }

    /// A request slot (`maxRequests`, the upstream's newest policy's, as the other limits),
    /// held until its response ends; counted when refused.
    pub fn request_slot(&self) -> Option<RequestSlot> {
        self.mark_traffic();
        let taken = self.take_slot(&self.requests.0, self.policy().max_requests, Limit::MaxRequests);
        taken.then(|| RequestSlot(self.clone()))
    }

    /// The handle of a TCP service named `detached/detached` with no endpoints, made once per
    /// process: for bodies sent outside any service (tests, fuzzing).
    #[doc(hidden)]
    pub fn detached() -> Self {
        static DETACHED: OnceLock<UpstreamHandle> = OnceLock::new();
        DETACHED
            .get_or_init(|| {
                let (settings, key) = (Settings::default(), "detached/detached");
                let policy = UpstreamPolicy::new(&settings, &Effective::default(), Protocol::Tcp, key);
                let upstream = Upstream::new(Arc::from(key), Protocol::Tcp, Vec::new(), Arc::new(settings), policy);
                Self(Arc::new(upstream))
            })
            .clone()
    }
}

impl std::ops::Deref for UpstreamHandle {
    type Target = Upstream;

    fn deref(&self) -> &Upstream {
        (*self.0).as_ref()
    }
}

impl std::fmt::Debug for UpstreamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&**self, f)
    }
}

/// A request's slot among the service's requests in flight (MeshCircuitBreaker `maxRequests`),
/// released when dropped.
#[derive(Debug)]
pub struct RequestSlot(UpstreamHandle);

impl RequestSlot {
    pub fn upstream(&self) -> &UpstreamHandle {
        &self.0
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.requests.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One address traffic can go to.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: TargetAddr,
    pub priority: u8,
    /// The endpoint it comes from, by its position among the upstream's (its DNS name is read
    /// from there, [`Upstream::hostname`]: a copy of the target made for each request then
    /// writes no reference count but its health's).
    endpoint: usize,
    pub health: Arc<Health>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("service {service}: no healthy endpoint")]
    NoEndpoint { service: Arc<str> },
    #[error("service {service}: connect to {target} timed out after {timeout:?}")]
    Timeout { service: Arc<str>, target: TargetAddr, timeout: Duration },
    #[error("service {service}: connect to {target}: {source}")]
    Io { service: Arc<str>, target: TargetAddr, source: io::Error },
    #[error("service {service}: endpoint {target}: {source}")]
    Tls { service: Arc<str>, target: TargetAddr, source: TlsError },
    #[error("service {service}: {max} upstream connections are open, the most allowed (maxConnections)")]
    Overflow { service: Arc<str>, max: usize },
    #[error("service {service}: {max} requests are waiting for a connection, the most allowed (maxPendingRequests)")]
    Pending { service: Arc<str>, max: usize },
    #[error("service {service}: {max} connection pools are in use, the most allowed (maxConnectionPools)")]
    Pools { service: Arc<str>, max: usize },
}

impl ConnectError {
    /// Failed before or during the TCP/TLS connect with the endpoint, not because of a local
    /// limit.
    pub fn is_connect_failure(&self) -> bool {
        !matches!(self, Self::Overflow { .. } | Self::Pending { .. } | Self::Pools { .. } | Self::NoEndpoint { .. })
    }
}

/// A connection to an endpoint, counted as active on its target until dropped.
#[derive(Debug)]
pub struct Connected {
    pub stream: UpstreamIo,
    pub target: Target,
    pub active: ActiveGuard,
    /// Holds one of the service's connection slots for as long as the connection lives.
    pub slot: Permit,
}

pub struct Upstream {
    service: Arc<str>,
    protocol: Protocol,
    endpoints: Vec<Endpoint>,
    /// This service's metric handles.
    pub metrics: Arc<ServiceMetrics>,
    settings: Arc<Settings>,
    targets: ArcSwap<Vec<Target>>,
    state: Mutex<ResolutionState>,
    /// Bumped whenever a DNS endpoint was resolved (or failed to be), to wake waiting connects.
    generation: watch::Sender<u64>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// HTTP connections; kept with the upstream so they survive reloads that keep it.
    pub pool: pool::Pool,
    policy: ArcSwap<UpstreamPolicy>,
    /// Open upstream connections, requests in flight, requests waiting for a connection and
    /// retries in flight (MeshCircuitBreaker `connectionLimits`).
    open: Arc<AtomicUsize>,
    /// Written by every request of every worker (the limit is the service's): on a line of its
    /// own, so the fields beside it that requests only read stay in the other workers' caches.
    requests: Line<AtomicUsize>,
    pending: Arc<AtomicUsize>,
    retries: Arc<AtomicUsize>,
    /// The interval-detector task runs.
    interval_task: std::sync::atomic::AtomicBool,
    /// The active health checker of the current policy's check.
    checker: Mutex<Option<AbortHandle>>,
    /// Some request or connection went to this service (for MeshHealthCheck `noTrafficInterval`).
    traffic: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct ResolutionState {
    /// Addresses per endpoint index: `None` until its first answer.
    resolved: Vec<Option<Vec<IpAddr>>>,
    /// DNS endpoints whose first lookup has finished (well or not).
    attempted: Vec<bool>,
    health: HashMap<TargetAddr, Arc<Health>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("service", &self.service).field("endpoints", &self.endpoints).finish()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            tasks.iter().for_each(AbortHandle::abort);
        }
    }
}

impl Upstream {
    /// Builds the upstream and, for DNS endpoints, starts their resolution (needs a tokio runtime).
    pub fn new(
        service: Arc<str>,
        protocol: Protocol,
        endpoints: Vec<Endpoint>,
        settings: Arc<Settings>,
        policy: UpstreamPolicy,
    ) -> Arc<Self> {
        let n = endpoints.len();
        let upstream = Arc::new(Self {
            metrics: metrics().service(&service, protocol),
            pool: pool::Pool::new(settings.idle_timeout),
            policy: ArcSwap::from_pointee(policy.clone()),
            requests: Line::default(),
            pending: Arc::default(),
            retries: Arc::default(),
            interval_task: Default::default(),
            checker: Mutex::new(None),
            traffic: Default::default(),
            service,
            protocol,
            endpoints,
            settings,
            targets: ArcSwap::from_pointee(Vec::new()),
            state: Mutex::new(ResolutionState {
                resolved: vec![None; n],
                attempted: vec![false; n],
                ..Default::default()
            }),
            generation: watch::Sender::new(0),
            tasks: Mutex::new(Vec::new()),
            open: Arc::default(),
        });
        upstream.rebuild();
        let mut tasks = Vec::new();
        for (index, endpoint) in upstream.endpoints.iter().enumerate() {
            if let EndpointAddress::Dns(name) = &endpoint.address {
                let task = refresh_loop(Arc::downgrade(&upstream), index, name.clone());
                tasks.push(tokio::spawn(task).abort_handle());
            }
        }
        if let Ok(mut slot) = upstream.tasks.lock() {
            *slot = tasks;
        }
        upstream.set_policy(policy);
        // Only HTTP services pool connections: TCP ones need no sweeper. Started once the
        // policy's idle timeout is in force: its first wait is half of that timeout.
        if protocol != Protocol::Tcp && tokio::runtime::Handle::try_current().is_ok() {
            let sweeper = tokio::spawn(sweep_loop(Arc::downgrade(&upstream))).abort_handle();
            if let Ok(mut slot) = upstream.tasks.lock() {
                slot.push(sweeper);
            }
        }
        upstream
    }

    pub fn policy(&self) -> arc_swap::Guard<Arc<UpstreamPolicy>> {
        self.policy.load()
    }

    /// The policy, to hold across awaits.
    pub fn policy_arc(&self) -> Arc<UpstreamPolicy> {
        self.policy.load_full()
    }

    /// Applies a configuration's policy to this (possibly kept) upstream.
    pub fn set_policy(self: &Arc<Self>, policy: UpstreamPolicy) {
        self.pool.set_timeouts(policy.pool_idle_timeout, policy.max_connection_duration);
        let interval = policy.has_interval_detectors();
        let old_check = self.policy().health_check.clone();
        let check = policy.health_check.clone();
        // An unchanged check keeps its task (and timers); the new policy carries the same Arc.
        // A new TLS client is a new check: the old one's kept connections (`reuseConnection`)
        // were made under the old TLS settings.
        let same_tls = match (&self.policy().tls, &policy.tls) {
            (Some((_, old)), Some((_, new))) => Arc::ptr_eq(old, new),
            (old, new) => old.is_none() && new.is_none(),
        };
        let check_unchanged = old_check.as_deref() == check.as_deref() && same_tls;
        let policy = UpstreamPolicy { health_check: if check_unchanged { old_check } else { check.clone() }, ..policy };
        self.policy.store(Arc::new(policy));
        if !check_unchanged || self.checker.lock().is_ok_and(|c| c.is_none()) {
            self.restart_checker();
        }
        if interval && !self.interval_task.swap(true, Ordering::AcqRel) && tokio::runtime::Handle::try_current().is_ok()
        {
            let task = tokio::spawn(interval_loop(Arc::downgrade(self)));
            if let Ok(mut tasks) = self.tasks.lock() {
                tasks.push(task.abort_handle());
            }
        }
    }

    /// Stops the active checker and starts the current policy's, if it has one.
    fn restart_checker(self: &Arc<Self>) {
        let Ok(mut checker) = self.checker.lock() else { return };
        if let Some(old) = checker.take() {
            old.abort();
        }
        match self.policy().health_check.clone() {
            Some(check) if tokio::runtime::Handle::try_current().is_ok() => {
                *checker = Some(tokio::spawn(active::run(Arc::downgrade(self), check)).abort_handle());
            }
            Some(_) => {}
            None => self.targets().iter().for_each(|t| t.health.clear_active()),
        }
    }

    fn had_traffic(&self) -> bool {
        self.traffic.load(Ordering::Relaxed)
    }

    fn mark_traffic(&self) {
        if !self.traffic.load(Ordering::Relaxed) {
            self.traffic.store(true, Ordering::Relaxed);
        }
    }

    /// A slot for a request waiting for a new connection (`maxPendingRequests`).
    pub fn pending_permit(&self) -> Option<Permit> {
        self.permit(&self.pending, self.policy().max_pending_requests, Limit::MaxPendingRequests)
    }

    /// Whether a new connection may open the pool of `key` (`maxConnectionPools`); counted when not.
    pub fn pool_admits(&self, key: &pool::PoolKey) -> Result<(), ConnectError> {
        let max = self.policy().max_connection_pools;
        if self.pool.admit(key, max) {
            return Ok(());
        }
        self.metrics.overflow(Limit::MaxConnectionPools);
        Err(ConnectError::Pools { service: self.service.clone(), max: max.unwrap_or(0) })
    }

    /// A slot for a retry in flight (`maxRetries`).
    pub fn retry_permit(&self) -> Option<Permit> {
        self.permit(&self.retries, self.policy().max_retries, Limit::MaxRetries)
    }

    fn permit(&self, count: &Arc<AtomicUsize>, max: usize, limit: Limit) -> Option<Permit> {
        self.take_slot(count, max, limit).then(|| Permit(count.clone()))
    }

    /// Counts one more in `count` unless `max` are taken; a refusal counts as `limit`'s overflow.
    fn take_slot(&self, count: &AtomicUsize, max: usize, limit: Limit) -> bool {
        let taken = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok();
        if !taken {
            self.metrics.overflow(limit);
        }
        taken
    }

    /// Counts what an exchange with `target` told us (outlier detection).
    pub fn record(&self, target: &Target, outcome: Outcome) {
        outlier::record(self, target, outcome);
    }

    pub fn service(&self) -> &Arc<str> {
        &self.service
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The DNS name of the endpoint `target` of this upstream comes from, for SNI and Host
    /// rewriting; `None` for IP and unix endpoints.
    pub fn hostname(&self, target: &Target) -> Option<&str> {
        match &self.endpoints.get(target.endpoint)?.address {
            EndpointAddress::Dns(name) => Some(name),
            EndpointAddress::Ip(_) | EndpointAddress::Unix(_) => None,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The addresses traffic can go to now.
    pub fn targets(&self) -> Arc<Vec<Target>> {
        self.targets.load_full()
    }

    fn set_resolved(&self, index: usize, addresses: Option<Vec<IpAddr>>) {
        if let Ok(mut state) = self.state.lock() {
            state.attempted[index] = true;
            if let Some(addresses) = addresses {
                state.resolved[index] = Some(addresses);
            }
        }
        self.rebuild();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Recomputes the target list, keeping the health of addresses that stay.
    fn rebuild(&self) {
        let Ok(mut state) = self.state.lock() else { return };
        let state = &mut *state;
        let mut targets = Vec::new();
        let mut health = HashMap::new();
        for (index, (endpoint, resolved)) in self.endpoints.iter().zip(&state.resolved).enumerate() {
            let addrs: Vec<TargetAddr> = match &endpoint.address {
                EndpointAddress::Ip(ip) => vec![TargetAddr::Socket(SocketAddr::new(*ip, endpoint.port))],
                EndpointAddress::Unix(path) => vec![TargetAddr::Unix(path.clone())],
                EndpointAddress::Dns(_) => resolved
                    .iter()
                    .flatten()
                    .map(|ip| TargetAddr::Socket(SocketAddr::new(*ip, endpoint.port)))
                    .collect(),
            };
            for addr in addrs {
                let h = state.health.get(&addr).cloned().unwrap_or_default();
                health.insert(addr.clone(), h.clone());
                targets.push(Target { addr, priority: endpoint.priority, endpoint: index, health: h });
            }
        }
        state.health = health;
        self.targets.store(Arc::new(targets));
    }

    /// Least-request with two random choices among the healthy targets of the most preferred
    /// priority level that has one. When every target is ejected, the most preferred level is
    /// tried anyway rather than failing outright.
    pub fn pick(&self, exclude: &[TargetAddr]) -> Option<Target> {
        let targets = self.targets.load();
        let allowed = |t: &&Target| !exclude.contains(&t.addr);
        let preferred = targets.iter().filter(allowed).filter(|t| t.health.is_healthy()).map(|t| t.priority).min();
        let (level, only_healthy) = match preferred {
            // In panic, as Envoy, the level's health is ignored.
            Some(level) if !in_panic(&targets, level, || self.panic_threshold()) => (level, true),
            panicked => {
                // MeshHealthCheck `failTrafficOnPanic`: panic (no healthy address, or too few)
                // fails the request.
                if self.policy().health_check.as_ref().is_some_and(|c| c.fail_traffic_on_panic) {
                    return None;
                }
                (panicked.or_else(|| targets.iter().filter(allowed).map(|t| t.priority).min())?, false)
            }
        };
        let eligible = |t: &&Target| allowed(t) && t.priority == level && (!only_healthy || t.health.is_healthy());
        let count = targets.iter().filter(eligible).count();
        let nth = |n: usize| targets.iter().filter(eligible).nth(n);
        let chosen = if count <= 1 {
            nth(0)
        } else {
            let mut rng = rand::rng();
            let a = rng.random_range(0..count);
            let b = (a + rng.random_range(1..count)) % count;
            match (nth(a), nth(b)) {
                (Some(x), Some(y)) if y.health.active() < x.health.active() => Some(y),
                (x, _) => x,
            }
        };
        chosen.cloned()
    }

    /// `healthyPanicThreshold` of MeshCircuitBreaker's outlier detection, else of MeshHealthCheck
    /// (deprecated there), else Envoy's default: Kuma sets each only when given, and Envoy
    /// keeps one threshold per cluster.
    fn panic_threshold(&self) -> f64 {
        let policy = self.policy();
        let outlier = match &policy.outlier {
            Outlier::Detect(d) => d.healthy_panic_threshold,
            _ => None,
        };
        outlier
            .or_else(|| policy.health_check.as_ref().and_then(|c| c.healthy_panic_threshold))
            .unwrap_or(DEFAULT_PANIC_THRESHOLD)
    }

    /// Connects (and handshakes TLS) to a picked target; a failed connect is tried again on
    /// another target, up to the policy's attempts (MeshRetry `tcp.maxConnectAttempt`; else one
    /// retry). When every target was tried, tried ones are picked again.
    pub async fn connect(&self, tls: Option<TlsSetup<'_>>) -> Result<Connected, ConnectError> {
        self.wait_for_first_resolution().await;
        let attempts = self.policy().connect_attempts;
        let mut tried: Vec<TargetAddr> = Vec::new();
        let mut last = None;
        for attempt in 0..attempts {
            let target = match self.pick(&tried) {
                Some(t) => t,
                None if attempt > 0 && attempts > 2 => {
                    tried.clear();
                    match self.pick(&tried) {
                        Some(t) => t,
                        None => break,
                    }
                }
                None => break,
            };
            if attempt > 0 {
                self.metrics.retries.inc();
            }
            match self.connect_target(&target, tls).await {
                Ok(connected) => return Ok(connected),
                Err(error) if error.is_connect_failure() => {
                    tracing::debug!(service = %self.service, target = %target.addr, %error, "connect failed; trying another endpoint");
                    tried.push(target.addr);
                    last = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last.unwrap_or_else(|| self.no_endpoint()))
    }

    pub fn no_endpoint(&self) -> ConnectError {
        ConnectError::NoEndpoint { service: self.service.clone() }
    }

    /// Connects to one target. A failed TCP connect counts against the target's health; a
    /// failed TLS handshake is counted in the TLS failure metric.
    pub async fn connect_target(&self, target: &Target, tls: Option<TlsSetup<'_>>) -> Result<Connected, ConnectError> {
        let started = Instant::now();
        let result = self.connect_target_inner(target, tls).await;
        match &result {
            Ok(_) => self.metrics.connect_duration.observe(started.elapsed().as_secs_f64()),
            Err(_) => {
                self.metrics.connect_errors.inc();
            }
        }
        result
    }

    /// A connection slot, unless the service has as many connections open as it may.
    fn reserve_slot(&self) -> Result<Permit, ConnectError> {
        self.mark_traffic();
        let max = self.policy().max_connections;
        self.permit(&self.open, max, Limit::MaxConnections)
            .ok_or_else(|| ConnectError::Overflow { service: self.service.clone(), max })
    }

    async fn connect_target_inner(
        &self,
        target: &Target,
        tls: Option<TlsSetup<'_>>,
    ) -> Result<Connected, ConnectError> {
        let slot = self.reserve_slot()?;
        let active = target.health.track();
        let timeout = self.policy().connect_timeout;
        // The connect timeout bounds the TLS handshake too: an endpoint that accepts and then
        // says nothing must not hold the connection (and its slot) for ever.
        let deadline = Instant::now() + timeout;
        let result = tokio::time::timeout_at(deadline, UpstreamStream::connect(&target.addr)).await;
        let error = match result {
            Ok(Ok(stream)) => {
                let stream = match tls {
                    None => UpstreamIo::Plain(stream),
                    Some(setup) => {
                        let name = tls::server_name(setup.policy, self.hostname(target), &target.addr);
                        match tokio::time::timeout_at(deadline, tls::connect(setup.config, name, stream)).await {
                            Ok(Ok(tls)) => UpstreamIo::Tls(Box::new(tls)),
                            Ok(Err(source)) => {
                                // A failed handshake is a failed connect (as Envoy's outlier
                                // detection counts it), not a connection made.
                                self.record(target, Outcome::ConnectFailed);
                                metrics().tls_failure(&self.service, source.reason);
                                let target = target.addr.clone();
                                return Err(ConnectError::Tls { service: self.service.clone(), target, source });
                            }
                            Err(_) => {
                                self.record(target, Outcome::ConnectFailed);
                                let target = target.addr.clone();
                                return Err(ConnectError::Timeout { service: self.service.clone(), target, timeout });
                            }
                        }
                    }
                };
                self.record(target, Outcome::Connected);
                return Ok(Connected { stream, target: target.clone(), active, slot });
            }
            Ok(Err(source)) => ConnectError::Io { service: self.service.clone(), target: target.addr.clone(), source },
            Err(_) => ConnectError::Timeout { service: self.service.clone(), target: target.addr.clone(), timeout },
        };
        // Out of local descriptors, buffers or ports says nothing about the endpoint.
        if let ConnectError::Io { source, .. } = &error {
            if is_local_resource_error(source) {
                return Err(error);
            }
        }
        self.record(target, Outcome::ConnectFailed);
        Err(error)
    }

    /// A connection arriving right after start waits (up to the connect timeout) for the
    /// first DNS answers instead of failing.
    pub async fn wait_for_first_resolution(&self) {
        let pending = || {
            self.targets.load().is_empty()
                && self.state.lock().is_ok_and(|s| {
                    self.endpoints
                        .iter()
                        .zip(&s.attempted)
                        .any(|(e, done)| matches!(e.address, EndpointAddress::Dns(_)) && !done)
                })
        };
        if !pending() {
            return;
        }
        let deadline = Instant::now() + self.policy().connect_timeout;
        let mut changes = self.generation.subscribe();
        while pending() {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                return;
            }
        }
    }
}

/// Errors of this host, not of the endpoint (Linux errno values): EMFILE, ENFILE, ENOMEM,
/// ENOBUFS, EADDRNOTAVAIL (no local port left).
fn is_local_resource_error(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(24 | 23 | 12 | 105 | 99))
}

/// Share of addresses not ejected, in percent.
/// Envoy's `healthy_panic_threshold` default (percent).
const DEFAULT_PANIC_THRESHOLD: f64 = 50.0;
/// Envoy's default overprovisioning factor: a level counts as fully healthy from 1/1.4 of it.
const OVERPROVISIONING: f64 = 1.4;

/// Whether `level` is in panic, as Envoy decides it per priority: the priority set's normalized
/// health (each level's healthy share × 1.4, capped at 100, summed, capped at 100) is below 100,
/// and the level's own healthy share is below `threshold`.
fn in_panic(targets: &[Target], level: u8, threshold: impl FnOnce() -> f64) -> bool {
    // The threshold (the policy read) only once a target is unhealthy: not on every pick.
    if targets.iter().all(|t| t.health.is_healthy()) {
        return false;
    }
    let threshold = threshold();
    if threshold <= 0.0 {
        return false;
    }
    let share = |priority: u8| {
        let (healthy, total) = targets
            .iter()
            .filter(|t| t.priority == priority)
            .fold((0u32, 0u32), |(h, n), t| (h + u32::from(t.health.is_healthy()), n + 1));
        if total == 0 {
            0.0
        } else {
            f64::from(healthy) * 100.0 / f64::from(total)
        }
    };
    if share(level) >= threshold {
        return false;
    }
    // Each level once (at its first target): no allocation on a path taken while degraded.
    let normalized: f64 = targets
        .iter()
        .enumerate()
        .filter(|(i, t)| !targets[..*i].iter().any(|earlier| earlier.priority == t.priority))
        .map(|(_, t)| (share(t.priority) * OVERPROVISIONING).min(100.0))
        .sum();
    normalized < 100.0
}

/// Closes idle pooled connections past their idle timeout (checked at half of it, at most
/// every minute; a reload that changes it wakes the loop to go by the new one).
async fn sweep_loop(upstream: Weak<Upstream>) {
    loop {
        let Some((idle, changed)) = upstream.upgrade().map(|u| u.pool.idle_timeout()) else { return };
        let period = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = changed.notified() => continue,
        }
        let Some(up) = upstream.upgrade() else { return };
        up.pool.sweep();
    }
}

/// Runs the success-rate and failure-percentage detectors every `interval`, while the policy
/// has them.
async fn interval_loop(upstream: Weak<Upstream>) {
    loop {
        let interval = {
            let Some(up) = upstream.upgrade() else { return };
            let policy = up.policy();
            match &policy.outlier {
                Outlier::Detect(d) if policy.has_interval_detectors() => d.interval,
                _ => {
                    up.interval_task.store(false, Ordering::Release);
                    return;
                }
            }
        };
        tokio::time::sleep(interval).await;
        let Some(up) = upstream.upgrade() else { return };
        if let Outlier::Detect(d) = &up.policy().outlier {
            outlier::evaluate_interval(&up, d);
        }
    }
}

async fn refresh_loop(upstream: Weak<Upstream>, index: usize, name: String) {
    let mut retry = resolve::FIRST_RETRY;
    loop {
        let Some(up) = upstream.upgrade() else { return };
        let resolved = up.settings.resolver.resolve(&name).await;
        let next = match resolved {
            Ok(r) => {
                up.set_resolved(index, Some(r.addresses));
                retry = resolve::FIRST_RETRY;
                Instant::from_std(r.refresh_at)
            }
            Err(error) => {
                // Keep the last good answer; ask again soon.
                tracing::warn!(service = %up.service, endpoint = %name, %error, "DNS resolution failed; keeping the last answer");
                up.set_resolved(index, None);
                let at = Instant::now() + retry;
                retry = (retry * 2).min(resolve::MAX_RETRY);
                at
            }
        };
        drop(up);
        tokio::time::sleep_until(next).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_endpoint(port: u16, priority: u8) -> Endpoint {
        Endpoint { address: EndpointAddress::Ip("127.0.0.1".parse().unwrap()), port, priority }
    }

    fn upstream(endpoints: Vec<Endpoint>) -> Arc<Upstream> {
        let settings = Settings {
            ejection: EjectionPolicy { consecutive_failures: 1, base_time: Duration::from_secs(600) },
            ..Settings::default()
        };
        let policy = UpstreamPolicy::new(&settings, &Effective::default(), Protocol::Tcp, "default/test");
        Upstream::new(Arc::from("default/test"), Protocol::Tcp, endpoints, Arc::new(settings), policy)
    }

    fn port(t: &Target) -> u16 {
        match &t.addr {
            TargetAddr::Socket(a) => a.port(),
            TargetAddr::Unix(_) => 0,
        }
    }

    /// SNI and Host come from the endpoint a target was resolved from, whatever its place
    /// among the targets (an IP endpoint's have no name; a name resolved to two addresses gives
    /// two targets of one name). Lookups go to an unused loopback port, never the system's
    /// resolver; the spawned refreshes never run, as nothing here awaits.
    #[tokio::test]
    async fn each_target_names_the_endpoint_it_comes_from() {
        let settings =
            Settings { resolver: ResolverSource::new(vec!["127.0.0.1:9".parse().unwrap()]), ..Settings::default() };
        let dns = |name: &str, port| Endpoint { address: EndpointAddress::Dns(name.into()), port, priority: 0 };
        let endpoints = vec![ip_endpoint(1, 0), dns("a.test", 2), dns("b.test", 3)];
        let policy = UpstreamPolicy::new(&settings, &Effective::default(), Protocol::Tcp, "default/names");
        let up = Upstream::new(Arc::from("default/names"), Protocol::Tcp, endpoints, Arc::new(settings), policy);
        up.set_resolved(2, Some(vec!["127.0.0.3".parse().unwrap()]));
        up.set_resolved(1, Some(vec!["127.0.0.2".parse().unwrap(), "127.0.0.4".parse().unwrap()]));
        let targets = up.targets();
        let names: Vec<(u16, Option<&str>)> = targets.iter().map(|t| (port(t), up.hostname(t))).collect();
        assert_eq!(names, [(1, None), (2, Some("a.test")), (2, Some("a.test")), (3, Some("b.test"))]);
    }

    /// Two names that resolve to one address share no pooled connection: each was made, SNI and
    /// certificate check included, for its own name.
    #[tokio::test]
    async fn two_names_at_one_address_pool_apart() {
        let settings =
            Settings { resolver: ResolverSource::new(vec!["127.0.0.1:9".parse().unwrap()]), ..Settings::default() };
        let dns = |name: &str| Endpoint { address: EndpointAddress::Dns(name.into()), port: 443, priority: 0 };
        let policy = UpstreamPolicy::new(&settings, &Effective::default(), Protocol::Http, "default/cdn");
        let up = Upstream::new(
            Arc::from("default/cdn"),
            Protocol::Http,
            vec![dns("a.test"), dns("b.test")],
            Arc::new(settings),
            policy,
        );
        for index in 0..2 {
            up.set_resolved(index, Some(vec!["127.0.0.2".parse().unwrap()]));
        }
        let targets = up.targets();
        let (a, b) = (&targets[0], &targets[1]);
        assert_eq!((a.addr.clone(), up.hostname(a), up.hostname(b)), (b.addr.clone(), Some("a.test"), Some("b.test")));
        let tls = pool::TlsIdentity::fresh();
        assert_ne!(pool::PoolKey::new(a, tls, false), pool::PoolKey::new(b, tls, false));
        assert_eq!(pool::PoolKey::new(a, tls, false), pool::PoolKey::new(a, tls, false));
        assert_ne!(active::kept_key(a), active::kept_key(b), "health checks keep a connection per name too");
    }

    #[test]
    fn policies_override_the_process_defaults() {
        use crate::resources::policy::{
            CircuitBreakerConf, ConnectionLimits, GoDuration, HttpTimeouts, RetryConf, TcpRetry, TimeoutConf,
        };
        let d = |s: &str| Some(GoDuration::parse(s).unwrap());
        let settings = Settings::default();
        let defaults = UpstreamPolicy::new(&settings, &Effective::default(), Protocol::Http, "default/x");
        assert_eq!(defaults.connect_timeout, settings.connect_timeout);
        assert_eq!(defaults.pool_idle_timeout, Some(settings.idle_timeout));
        assert_eq!((defaults.max_connections, defaults.max_requests, defaults.max_retries), (1024, 1024, 3));
        assert_eq!(defaults.connect_attempts, 2);
        let effective = Effective {
            mesh_timeout: Some(TimeoutConf {
                connection_timeout: d("2s"),
                idle_timeout: d("0s"),
                http: Some(HttpTimeouts { max_connection_duration: d("1m"), ..HttpTimeouts::default() }),
            }),
            mesh_circuit_breaker: Some(CircuitBreakerConf {
                connection_limits: Some(ConnectionLimits {
                    max_connections: Some(7),
                    max_pending_requests: Some(8),
                    max_requests: Some(9),
                    max_retries: Some(10),
                    max_connection_pools: None,
                }),
                outlier_detection: None,
            }),
            mesh_retry: Some(RetryConf {
                tcp: Some(TcpRetry { max_connect_attempt: Some(4) }),
                ..RetryConf::default()
            }),
            ..Effective::default()
        };
        let p = UpstreamPolicy::new(&settings, &effective, Protocol::Tcp, "default/x");
        assert_eq!(p.connect_timeout, Duration::from_secs(2));
        assert_eq!(p.pool_idle_timeout, None, "idleTimeout 0s: never");
        assert_eq!(p.max_connection_duration, Some(Duration::from_secs(60)));
        assert_eq!((p.max_connections, p.max_pending_requests, p.max_requests, p.max_retries), (7, 8, 9, 10));
        assert_eq!(p.connect_attempts, 4);
    }

    #[test]
    fn prefers_the_lowest_priority_level_with_a_healthy_target() {
        let up = upstream(vec![ip_endpoint(1, 1), ip_endpoint(2, 0), ip_endpoint(3, 0)]);
        for _ in 0..50 {
            assert_ne!(port(&up.pick(&[]).unwrap()), 1);
        }
        let targets = up.targets();
        for t in targets.iter().filter(|t| t.priority == 0) {
            t.health.record_failure(&up.settings.ejection);
        }
        assert_eq!(port(&up.pick(&[]).unwrap()), 1, "fails over when level 0 has no healthy target");
    }

    /// Envoy's panic mode, with its default threshold (50%): one healthy target of three (33%)
    /// puts the level in panic, and health is ignored; across levels, a healthy fallback level
    /// keeps the set out of panic (normalized health 100).
    #[test]
    fn below_half_healthy_a_level_ignores_health() {
        let up = upstream(vec![ip_endpoint(1, 0), ip_endpoint(2, 0), ip_endpoint(3, 0)]);
        for t in up.targets().iter().filter(|t| port(t) != 3) {
            t.health.record_failure(&up.settings.ejection);
        }
        let picked: std::collections::HashSet<u16> = (0..200).map(|_| port(&up.pick(&[]).unwrap())).collect();
        assert!(picked.contains(&1) || picked.contains(&2), "panic: the ejected are picked too ({picked:?})");
        let two_of_four = upstream((1..=4).map(|p| ip_endpoint(p, 0)).collect());
        for t in two_of_four.targets().iter().filter(|t| port(t) <= 2) {
            t.health.record_failure(&two_of_four.settings.ejection);
        }
        for _ in 0..50 {
            assert!(port(&two_of_four.pick(&[]).unwrap()) > 2, "half healthy is not panic");
        }
        // A third of level 0 healthy, level 1 all healthy: together at full health (33 × 1.4
        // + 100), so level 0 is not in panic and its one healthy target takes the traffic.
        let failover = upstream(vec![ip_endpoint(1, 0), ip_endpoint(2, 0), ip_endpoint(3, 0), ip_endpoint(4, 1)]);
        for t in failover.targets().iter().filter(|t| matches!(port(t), 1 | 2)) {
            t.health.record_failure(&failover.settings.ejection);
        }
        for _ in 0..50 {
            assert_eq!(port(&failover.pick(&[]).unwrap()), 3, "normalized health 100: no panic");
        }
    }

    #[test]
    fn excluding_the_failed_target_picks_another() {
        let up = upstream(vec![ip_endpoint(1, 0), ip_endpoint(2, 0)]);
        let first = up.pick(&[]).unwrap();
        let second = up.pick(std::slice::from_ref(&first.addr)).unwrap();
        assert_ne!(first.addr, second.addr);
        let single = upstream(vec![ip_endpoint(1, 0)]);
        let only = single.pick(&[]).unwrap();
        assert!(single.pick(std::slice::from_ref(&only.addr)).is_none());
    }

    #[test]
    fn all_ejected_still_tries_the_preferred_level() {
        let up = upstream(vec![ip_endpoint(1, 0), ip_endpoint(2, 1)]);
        for t in up.targets().iter() {
            t.health.record_failure(&up.settings.ejection);
        }
        assert_eq!(port(&up.pick(&[]).unwrap()), 1);
    }

    #[test]
    fn two_choices_prefer_the_less_loaded_target() {
        let up = upstream(vec![ip_endpoint(1, 0), ip_endpoint(2, 0)]);
        let targets = up.targets();
        let busy = targets.iter().find(|t| port(t) == 1).unwrap();
        let _guards: Vec<_> = (0..5).map(|_| busy.health.track()).collect();
        for _ in 0..50 {
            assert_eq!(port(&up.pick(&[]).unwrap()), 2);
        }
    }
}
