//! The admin HTTP server. It runs on a thread of its own, off the data path's workers.
//!
//! Envoy's paths where the meaning matches (`/stats`, `/stats/prometheus`, `/clusters`,
//! `/server_info`, `/listeners`, `/logging`, `/healthcheck/fail|ok`, `/drain_listeners`,
//! `/quitquitquit`) next to mesh-egress's own (`/metrics`, `/config_dump`, `/endpoints`). What
//! changes the proxy answers only POST, and only on a loopback or unix-socket admin. A
//! readiness listener (kuma-dp's `--readiness-port`) answers `/ready` and nothing else.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::catalog::ServiceView;
use crate::listen::idle::{Activity, Tracked};
use crate::live::{Live, Snapshot};

/// How long admin connections may take (`--admin-header-read-timeout`, `--admin-idle-timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminTimeouts {
    /// For a request's head to arrive.
    pub header_read: Duration,
    /// No byte either way for this long closes a connection.
    pub idle: Duration,
}

impl Default for AdminTimeouts {
    fn default() -> Self {
        Self { header_read: Duration::from_secs(10), idle: Duration::from_secs(60) }
    }
}
/// kuma-dp's readiness port.
pub const DEFAULT_READINESS_PORT: u16 = 9902;

/// What the admin asks of the process (the run loop carries it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminCommand {
    /// `POST /drain_listeners`: stop accepting; open connections finish.
    DrainListeners,
    /// `POST /quitquitquit`: drain and exit, as on SIGTERM.
    Quit,
}

/// Changing the log filter at run time (`POST /logging`).
pub trait LogControl: Send + Sync + std::fmt::Debug {
    /// The active filter, in `RUST_LOG` syntax.
    fn current(&self) -> String;
    /// Replaces the filter; the new one, or why `directives` is refused.
    fn set(&self, directives: &str) -> Result<String, String>;
}

/// What the admin endpoints read.
pub struct AdminState {
    pub ready: AtomicBool,
    pub live: Arc<Live>,
    /// `POST /healthcheck/fail` until `/healthcheck/ok`: `/ready` answers 503.
    pub failing: AtomicBool,
    /// Listeners are draining (`/drain_listeners`, SIGTERM): `/server_info` says DRAINING.
    pub draining: AtomicBool,
    pub started: Instant,
    /// The process's command line, for `/server_info`.
    pub command_line: Vec<String>,
    /// `kind address` of each listener, for `/listeners`; set by the server.
    pub listeners: Mutex<Vec<String>>,
    pub commands: mpsc::UnboundedSender<AdminCommand>,
    pub log: Option<Arc<dyn LogControl>>,
    pub timeouts: AdminTimeouts,
}

impl AdminState {
    pub fn new(
        live: Arc<Live>,
        command_line: Vec<String>,
        log: Option<Arc<dyn LogControl>>,
    ) -> (Self, mpsc::UnboundedReceiver<AdminCommand>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let state = Self {
            ready: AtomicBool::new(false),
            live,
            failing: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            command_line,
            listeners: Mutex::default(),
            commands,
            log,
            timeouts: AdminTimeouts::default(),
        };
        (state, receiver)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.failing.load(Ordering::Acquire)
    }
}

/// Where the admin listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    /// `unix:///path`: off the network, as Kuma 2.14 puts Envoy's admin.
    Unix(PathBuf),
}

impl AdminAddr {
    /// `IP:PORT` or `unix:///path`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("'{s}': a unix admin socket needs an absolute path (unix:///run/admin.sock)"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse().map(Self::Tcp).map_err(|e| format!("'{s}' is not IP:PORT, unix:///path or `off`: {e}"))
    }
}

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin server: cannot bind {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("admin server: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// A bound admin listener: the full admin, or the readiness port.
pub enum AdminListener {
    Tcp { listener: std::net::TcpListener, ready_only: bool, mutations: bool },
    Unix(std::os::unix::net::UnixListener),
}

impl AdminListener {
    pub fn bind_tcp(addr: SocketAddr, ready_only: bool) -> Result<(Self, SocketAddr), AdminError> {
        let err = |error| AdminError::Bind { addr: addr.to_string(), error };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        let bound = listener.local_addr().map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        // Only a loopback admin may change the proxy.
        let mutations = addr.ip().is_loopback();
        Ok((Self::Tcp { listener, ready_only, mutations }, bound))
    }

    /// Binds `path` (a stale socket file there is replaced), readable by owner and group only.
    pub fn bind_unix(path: &Path) -> Result<Self, AdminError> {
        use std::os::unix::fs::PermissionsExt as _;
        let err = |error| AdminError::Bind { addr: format!("unix://{}", path.display()), error };
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt as _;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self::Unix(listener))
    }
}

/// Serves `listeners` on a dedicated thread.
pub fn spawn(listeners: Vec<AdminListener>, state: Arc<AdminState>) -> Result<(), AdminError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AdminError::Thread)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(serve(listeners, state)))
        .map_err(AdminError::Thread)?;
    Ok(())
}

async fn serve(listeners: Vec<AdminListener>, state: Arc<AdminState>) {
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let state = state.clone();
        match listener {
            AdminListener::Tcp { listener, ready_only, mutations } => {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    tracing::error!("admin server cannot listen");
                    continue;
                };
                tasks.spawn(async move {
                    loop {
                        let (stream, _) = crate::listen::accept(&listener, "admin").await;
                        tokio::spawn(connection(stream, state.clone(), ready_only, mutations));
                    }
                });
            }
            AdminListener::Unix(listener) => {
                let Ok(listener) = tokio::net::UnixListener::from_std(listener) else {
                    tracing::error!("admin server cannot listen on its unix socket");
                    continue;
                };
                tasks.spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => {
                                tokio::spawn(connection(stream, state.clone(), false, true));
                            }
                            Err(error) => {
                                tracing::debug!(%error, "admin unix accept failed");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn connection<S>(stream: S, state: Arc<AdminState>, ready_only: bool, mutations: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = state.timeouts;
    let quit = Arc::new(AtomicBool::new(false));
    let service = {
        let (state, quit) = (state.clone(), quit.clone());
        service_fn(move |req| {
            let (state, quit) = (state.clone(), quit.clone());
            async move {
                let response = if ready_only { readiness(&state, &req) } else { route(&state, &req, mutations) };
                if response.extensions().get::<QuitAfterResponse>().is_some() {
                    quit.store(true, Ordering::Release);
                }
                Ok::<_, Infallible>(response)
            }
        })
    };
    // A scraper or a stuck client must not hold a connection forever.
    let activity = Activity::new();
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .serve_connection(io, service);
    tokio::select! {
        _ = connection => {}
        () = activity.idle_for(timeouts.idle) => {}
    }
    if quit.load(Ordering::Acquire) {
        let _ = state.commands.send(AdminCommand::Quit);
    }
}

/// Marks the `/quitquitquit` answer: its connection closes once it is written, and only then
/// has the process exit (sent at once, the exit could beat the answer: the client saw nothing).
#[derive(Clone, Copy)]
struct QuitAfterResponse;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// A 200 response with its own content type.
fn typed(content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    typed("application/json", serde_json::to_string_pretty(value).unwrap_or_default())
}

/// The live configuration. Built from [`ServiceView`]s, which carry no certificate, key or
/// secret data: only where trust comes from and whether a client certificate is set.
fn config_dump(snapshot: &Snapshot) -> serde_json::Value {
    let services: Vec<ServiceView> = snapshot.catalog.services().iter().map(|s| ServiceView::from(&**s)).collect();
    let outbounds: Vec<serde_json::Value> = snapshot
        .catalog
        .outbounds()
        .iter()
        .map(|o| {
            let service = snapshot.catalog.service(o.service).map(|s| s.key());
            serde_json::json!({ "address": o.address.to_string(), "dataplane": o.dataplane, "service": service })
        })
        .collect();
    let ignored = snapshot.catalog.ignored_policies();
    let passthrough = &**snapshot.catalog.passthrough();
    serde_json::json!({
        "services": services,
        "outbounds": outbounds,
        "passthrough": passthrough,
        "ignoredPolicies": ignored,
    })
}

/// Per service: configured endpoints and the addresses traffic can go to, with their health.
fn endpoints(snapshot: &Snapshot) -> serde_json::Value {
    let services: Vec<serde_json::Value> = snapshot
        .routes()
        .map(|route| {
            let configured: Vec<serde_json::Value> = route
                .upstream
                .endpoints()
                .iter()
                .map(|e| serde_json::json!({ "address": e.to_string(), "priority": e.priority }))
                .collect();
            let targets: Vec<serde_json::Value> = route
                .upstream
                .targets()
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "address": t.addr.to_string(),
                        "hostname": route.upstream.hostname(t),
                        "priority": t.priority,
                        "healthy": t.health.is_healthy(),
                        "failingHealthCheck": t.health.failing_active_check(),
                        "active": t.health.active(),
                    })
                })
                .collect();
            serde_json::json!({
                "service": route.upstream.service().as_ref(),
                "protocol": route.service.protocol,
                "endpoints": configured,
                "targets": targets,
            })
        })
        .collect();
    serde_json::json!({ "services": services })
}

/// Envoy's `/clusters` text form: `service::target::stat::value`, one service per cluster.
fn clusters(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for route in snapshot.routes() {
        let name = route.upstream.service();
        let policy = route.upstream.policy();
        let _ = writeln!(out, "{name}::default_priority::max_connections::{}", policy.max_connections);
        let _ = writeln!(out, "{name}::default_priority::max_pending_requests::{}", policy.max_pending_requests);
        let _ = writeln!(out, "{name}::default_priority::max_requests::{}", policy.max_requests);
        let _ = writeln!(out, "{name}::default_priority::max_retries::{}", policy.max_retries);
        let _ = writeln!(out, "{name}::added_via_api::false");
        for t in route.upstream.targets().iter() {
            let addr = &t.addr;
            let flags = match (t.health.is_healthy(), t.health.failing_active_check()) {
                (true, false) => "healthy".to_string(),
                (healthy, failing) => {
                    let mut flags = Vec::new();
                    if failing {
                        flags.push("/failed_active_hc");
                    }
                    if !healthy && !failing {
                        flags.push("/failed_outlier_check");
                    }
                    flags.concat()
                }
            };
            let _ = writeln!(out, "{name}::{addr}::rq_active::{}", t.health.active());
            let _ = writeln!(out, "{name}::{addr}::health_flags::{flags}");
            let _ = writeln!(out, "{name}::{addr}::priority::{}", t.priority);
            let _ = writeln!(out, "{name}::{addr}::hostname::{}", route.upstream.hostname(t).unwrap_or(""));
        }
    }
    out
}

/// Envoy's `/stats` text form: `name{labels}: value`, sorted.
fn stats() -> String {
    let encoded = crate::metrics::metrics().encode();
    let mut lines: Vec<String> = encoded
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(name, value)| format!("{name}: {value}")))
        .collect();
    lines.sort();
    lines.join("\n") + "\n"
}

fn server_info(state: &AdminState) -> serde_json::Value {
    let uptime = format!("{}s", state.started.elapsed().as_secs());
    let status = if state.draining.load(Ordering::Acquire) {
        "DRAINING"
    } else if state.ready.load(Ordering::Acquire) {
        "LIVE"
    } else {
        "PRE_INITIALIZING"
    };
    serde_json::json!({
        "version": concat!("mesh-egress/", env!("CARGO_PKG_VERSION")),
        "state": status,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "command_line_options": { "argv": state.command_line },
    })
}

/// The readiness listener: `/ready` only.
fn readiness(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ready") => ready(state),
        (_, "/ready") => not_allowed("GET"),
        _ => text(StatusCode::NOT_FOUND, "not found: this port answers /ready only\n"),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if state.failing.load(Ordering::Acquire) {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready: healthcheck failed by the admin\n")
    } else if state.is_ready() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed: use {allow}\n"));
    response.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// A query parameter's value, percent-decoded (`None`: absent or not decodable).
fn param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v)).flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

const MUTATING: [&str; 7] = [
    "/logging",
    "/healthcheck/fail",
    "/healthcheck/ok",
    "/drain_listeners",
    "/quitquitquit",
    "/reopen_logs",
    "/reset_counters",
];

fn route(state: &AdminState, req: &Request<Incoming>, mutations: bool) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    tracing::debug!(method = %req.method(), path, "admin request");
    if MUTATING.contains(&path) {
        return mutate(state, req, path, mutations);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return not_allowed("GET");
    }
    match path {
        "/ready" => ready(state),
        "/metrics" | "/stats/prometheus" => {
            typed("application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::metrics().encode())
        }
        "/stats" => text(StatusCode::OK, stats()),
        "/clusters" => text(StatusCode::OK, clusters(&state.live.load())),
        "/server_info" => json(&server_info(state)),
        "/listeners" => {
            let listeners = state.listeners.lock().unwrap_or_else(PoisonError::into_inner);
            if param(req, "format").as_deref() == Some("json") {
                json(&serde_json::json!({ "listeners": *listeners }))
            } else {
                text(StatusCode::OK, listeners.iter().map(|l| format!("{l}\n")).collect::<String>())
            }
        }
        "/config_dump" => json(&config_dump(&state.live.load())),
        "/endpoints" => json(&endpoints(&state.live.load())),
        "/" => {
            let services = state.live.load().catalog.services().len();
            text(
                StatusCode::OK,
                format!(
                    "mesh-egress admin\nservices: {services}\n\
                     GET: /ready /metrics /stats /stats/prometheus /clusters /server_info /listeners /config_dump /endpoints\n\
                     POST: /logging?level=L|paths=module:L,... /healthcheck/fail /healthcheck/ok /drain_listeners /quitquitquit /reopen_logs\n"
                ),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The endpoints that change the proxy: POST only, loopback or unix admin only.
fn mutate(state: &AdminState, req: &Request<Incoming>, path: &str, mutations: bool) -> Response<Full<Bytes>> {
    if path == "/logging" && req.method() == Method::GET {
        return match &state.log {
            Some(log) => text(StatusCode::OK, format!("active filter: {}\n", log.current())),
            None => text(StatusCode::NOT_FOUND, "no log control in this process\n"),
        };
    }
    if req.method() != Method::POST {
        return not_allowed("POST");
    }
    if !mutations {
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: endpoints that change the proxy need a loopback or unix-socket admin\n",
        );
    }
    let not_taking_commands = || text(StatusCode::SERVICE_UNAVAILABLE, "the process is not taking commands\n");
    let command = |c: AdminCommand, said: &'static str| {
        if state.commands.send(c).is_err() {
            return not_taking_commands();
        }
        text(StatusCode::OK, said)
    };
    match path {
        "/logging" => logging(state, req),
        "/healthcheck/fail" => {
            state.failing.store(true, Ordering::Release);
            tracing::info!("admin: healthcheck failed; /ready answers 503");
            text(StatusCode::OK, "OK\n")
        }
        "/healthcheck/ok" => {
            state.failing.store(false, Ordering::Release);
            tracing::info!("admin: healthcheck ok");
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" => command(AdminCommand::DrainListeners, "OK\n"),
        "/quitquitquit" => {
            if state.commands.is_closed() {
                return not_taking_commands();
            }
            // Sent by the connection once this answer is written: the process may exit at once.
            let mut response = text(StatusCode::OK, "OK\n");
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            response.extensions_mut().insert(QuitAfterResponse);
            response
        }
        "/reopen_logs" => {
            crate::access_log::reopen_files();
            tracing::info!("admin: access log files are opened again before their next line");
            text(StatusCode::OK, "OK\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not supported: counters are Prometheus counters and never reset\n"),
    }
}

const LEVELS: &str = "one of trace, debug, info, warning (warn), error, critical, off";

/// Envoy's level names, as `tracing`'s.
fn level_name(level: &str) -> Option<&'static str> {
    Some(match level {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warning" | "warn" => "warn",
        "error" | "critical" => "error",
        "off" => "off",
        _ => return None,
    })
}

/// `current` (a filter) with each `module:LEVEL` of `paths` set (`upstream` is
/// `mesh_egress::upstream`); the rest kept, in order.
fn merge_paths(current: &str, paths: &str) -> Result<String, String> {
    let mut merged: Vec<(String, String)> = current
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| {
            let (target, level) = d.split_once('=').unwrap_or(("", d));
            (target.to_string(), level.to_string())
        })
        .collect();
    for path in paths.split(',') {
        let (module, level) = path.rsplit_once(':').ok_or_else(|| format!("'{path}' is not module:LEVEL"))?;
        let module =
            if module.starts_with("mesh_egress") { module.to_string() } else { format!("mesh_egress::{module}") };
        let level = level_name(level).ok_or_else(|| format!("unknown level '{level}' for {module}: {LEVELS}"))?;
        merged.retain(|(t, _)| *t != module);
        merged.push((module, level.to_string()));
    }
    let directives: Vec<String> =
        merged.into_iter().map(|(t, l)| if t.is_empty() { l } else { format!("{t}={l}") }).collect();
    Ok(directives.join(","))
}

/// `?level=L` sets every target's level; `?paths=a:L,b:L` sets those modules' (`upstream` is
/// `mesh_egress::upstream`), the rest of the filter kept.
fn logging(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(log) = &state.log else { return text(StatusCode::NOT_FOUND, "no log control in this process\n") };
    let directives = match (param(req, "level").as_deref(), param(req, "paths").as_deref()) {
        (Some(level), None) => match level_name(level) {
            Some(level) => level.to_string(),
            None => return text(StatusCode::BAD_REQUEST, format!("unknown level '{level}': {LEVELS}\n")),
        },
        (None, Some(paths)) => match merge_paths(&log.current(), paths) {
            Ok(directives) => directives,
            Err(why) => return text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        },
        _ => return text(StatusCode::BAD_REQUEST, "give ?level=LEVEL or ?paths=module:LEVEL,...\n"),
    };
    match log.set(&directives) {
        Ok(active) => {
            tracing::info!(filter = %active, "admin: log filter changed");
            text(StatusCode::OK, format!("active filter: {active}\n"))
        }
        Err(why) => text(StatusCode::BAD_REQUEST, format!("invalid filter '{directives}': {why}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `/quitquitquit` has the process exit only once its answer is written: while the client
    /// has not read it (a 16-byte pipe holds less than the answer), no command is sent. It was
    /// sent before the answer, and an exit could leave the client with nothing.
    #[tokio::test]
    async fn quit_is_sent_once_its_answer_is_written() {
        let (state, mut commands) = AdminState::new(Arc::default(), Vec::new(), None);
        let (mut client, server) = tokio::io::duplex(16);
        tokio::spawn(connection(server, Arc::new(state), false, true));
        client.write_all(b"POST /quitquitquit HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        assert!(commands.try_recv().is_err(), "quit sent before its answer was written");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("OK\n"), "{answer}");
        assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
        assert!(matches!(commands.recv().await, Some(AdminCommand::Quit)));
    }
}
