//! The admit phase: whether a service may carry traffic at all. Every connection (TCP) and
//! every request (HTTP) passes here after routing; limits and access policies join here.

use crate::catalog::{Access, Service};

/// Why traffic to a service is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The service's configuration is broken (missing secret, bad certificate, no VIP, ...).
    Broken,
    /// The Mesh sets `routing.defaultForbidMeshExternalServiceAccess: true`.
    Forbidden,
}

impl Denial {
    /// The access log's outcome.
    pub fn outcome(self) -> &'static str {
        match self {
            Self::Broken => "broken_service",
            Self::Forbidden => "forbidden",
        }
    }
}

pub fn admit(service: &Service) -> Result<(), Denial> {
    if let Some(reason) = &service.broken {
        tracing::warn!(service = %service.key(), %reason, "service is broken");
        return Err(Denial::Broken);
    }
    if service.access == Access::Forbidden {
        tracing::info!(service = %service.key(), "access forbidden by Mesh (defaultForbidMeshExternalServiceAccess)");
        return Err(Denial::Forbidden);
    }
    Ok(())
}
