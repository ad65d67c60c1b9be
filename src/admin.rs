//! The admin HTTP server. It runs on a thread of its own, off the data path's workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Time for an admin request's head to arrive.
const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An admin connection with no byte either way for this long is closed.
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::catalog::ServiceView;
use crate::listen::idle::{Activity, Tracked};
use crate::live::{Live, Snapshot};

/// What the admin endpoints read.
pub struct AdminState {
    pub ready: AtomicBool,
    pub live: Arc<Live>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin server: cannot bind {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("admin server: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// Binds `addr` and serves on a dedicated thread; returns the bound address.
pub fn spawn(addr: SocketAddr, state: Arc<AdminState>) -> Result<SocketAddr, AdminError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| AdminError::Bind { addr, error })?;
    let bound = listener.local_addr().map_err(|error| AdminError::Bind { addr, error })?;
    listener.set_nonblocking(true).map_err(|error| AdminError::Bind { addr, error })?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AdminError::Thread)?;
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || runtime.block_on(serve(listener, state)))
        .map_err(AdminError::Thread)?;
    Ok(bound)
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "admin server cannot listen"),
    };
    loop {
        let (stream, _) = crate::listen::accept(&listener, "admin").await;
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            // A scraper or a stuck client must not hold a connection forever.
            let activity = Activity::new();
            let io = TokioIo::new(Tracked::new(stream, activity.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_READ_TIMEOUT)
                .serve_connection(io, service);
            tokio::select! {
                _ = connection => {}
                () = activity.idle_for(ADMIN_IDLE_TIMEOUT) => {}
            }
        });
    }
}

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
                        "hostname": t.hostname.as_deref(),
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

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/ready" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            typed("application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::metrics().encode())
        }
        "/config_dump" => json(&config_dump(&state.live.load())),
        "/endpoints" => json(&endpoints(&state.live.load())),
        "/" => {
            let services = state.live.load().catalog.services().len();
            text(
                StatusCode::OK,
                format!(
                    "mesh-egress admin\nservices: {services}\nendpoints: /ready /metrics /config_dump /endpoints\n"
                ),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
