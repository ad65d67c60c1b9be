//! The admin HTTP server. It runs on a thread of its own, off the data path's workers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::live::Live;

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
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
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

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/ready" if state.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/" => {
            let services = state.live.load().catalog.services().len();
            text(StatusCode::OK, format!("mesh-egress admin\nservices: {services}\nendpoints: /ready\n"))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
