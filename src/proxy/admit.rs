//! The admit phase: whether a service may carry traffic at all. Every connection (TCP) and
//! every request (HTTP) passes here after routing; limits and access policies join here.

use crate::catalog::{Access, Service};
use crate::metrics::metrics;

/// Why traffic to a service is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The service's configuration is broken (missing secret, bad certificate, no VIP, ...).
    Broken,
    /// The Mesh sets `routing.defaultForbidMeshExternalServiceAccess: true`.
    Forbidden,
    /// A MeshTrafficPermission denies this workload the service.
    Denied,
}

impl Denial {
    /// The access log's outcome.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Broken => "broken_service",
            Self::Forbidden => "forbidden",
            Self::Denied => "denied",
        }
    }
}

pub fn admit(service: &Service) -> Result<(), Denial> {
    if let Some(reason) = &service.broken {
        tracing::warn!(service = %service.key(), %reason, "service is broken");
        return Err(Denial::Broken);
    }
    let by = service.access_by.as_deref().unwrap_or_default();
    match service.access {
        Access::Allowed => Ok(()),
        Access::Forbidden => {
            tracing::info!(service = %service.key(), "access forbidden by {by}");
            metrics().access_refused(&service.key(), "forbidden");
            Err(Denial::Forbidden)
        }
        Access::Denied => {
            tracing::info!(service = %service.key(), "access denied by {by}");
            metrics().access_refused(&service.key(), "denied");
            Err(Denial::Denied)
        }
        Access::ShadowDenied => {
            tracing::info!(service = %service.key(), "shadow deny: {by} would deny this; allowed");
            metrics().access_refused(&service.key(), "shadow_denied");
            Ok(())
        }
    }
}
