//! The per-connection context and what counts open connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Gauge;
use tokio::sync::Notify;

use super::copy::Transferred;
use crate::access_log::Record;
use crate::listen::ListenerKind;
use crate::live::Route;
use crate::upstream::TargetAddr;

/// One application connection to a TCP service, as it passes the phases: who connected on
/// which listener, the service it was routed to, the endpoint chosen, the bytes moved and how
/// it ended.
pub struct ConnCtx {
    pub kind: ListenerKind,
    pub peer: SocketAddr,
    pub route: Route,
    pub started: Instant,
    pub endpoint: Option<TargetAddr>,
    pub bytes: Transferred,
    /// For the access log: `closed`, `reset`, `connect_failed`, `forbidden`, `broken_service`.
    pub outcome: &'static str,
}

impl ConnCtx {
    pub fn new(kind: ListenerKind, peer: SocketAddr, route: Route) -> Self {
        Self {
            kind,
            peer,
            route,
            started: Instant::now(),
            endpoint: None,
            bytes: Transferred::default(),
            outcome: "closed",
        }
    }

    /// The access-log record of the connection as it ended.
    pub fn record(&self) -> Record {
        Record::tcp(
            self.route.upstream.service().clone(),
            self.peer,
            self.endpoint.as_ref().map(ToString::to_string),
            self.outcome,
            (self.bytes.client_to_upstream, self.bytes.upstream_to_client),
            self.started,
        )
    }
}

/// Counts open application connections so a drain can wait for them.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    closed: Notify,
}

impl Connections {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection (or upgraded tunnel), until dropped.
pub struct ConnectionGuard(Arc<Connections>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// Holds a gauge up by one until dropped.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn inc(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
