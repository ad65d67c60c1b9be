//! Trust roots: the service's `caCert`, or the system's (the file named by
//! `KUMA_DATAPLANE_RUNTIME_DYNAMIC_SYSTEM_CA_PATH`, else the OS store).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use crate::catalog::SYSTEM_CA_ENV;

/// Builds a store from configured CA certificates.
pub fn from_certs(certs: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| format!("certificate #{i} is not a usable CA: {e}"))?;
    }
    Ok(Arc::new(store))
}

/// The system roots, loaded on first use and shared by every service of one configuration.
#[derive(Debug, Default)]
pub struct SystemRoots {
    /// The file from [`SYSTEM_CA_ENV`], if set.
    ca_file: Option<PathBuf>,
    store: OnceLock<Result<Arc<RootCertStore>, String>>,
    /// The roots read for the configuration before, used when these cannot be read.
    fallback: Option<Arc<RootCertStore>>,
}

impl SystemRoots {
    pub fn new(ca_file: Option<PathBuf>) -> Self {
        Self { ca_file, store: OnceLock::new(), fallback: None }
    }

    /// Unreadable (a CA file being rotated, missing or half written), the roots read for the
    /// configuration before stay in force, with a warning; the next configuration reads them
    /// again. Without them the services that need the roots are broken.
    pub fn or_previous(self, previous: Option<Arc<RootCertStore>>) -> Self {
        Self { fallback: previous, ..self }
    }

    /// Reads [`SYSTEM_CA_ENV`].
    pub fn from_env() -> Self {
        Self::new(std::env::var_os(SYSTEM_CA_ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    pub fn get(&self) -> Result<Arc<RootCertStore>, String> {
        self.store
            .get_or_init(|| {
                self.load().or_else(|error| match &self.fallback {
                    Some(roots) => {
                        tracing::warn!(%error, "the system CA roots could not be read; the roots read before stay in force");
                        Ok(roots.clone())
                    }
                    None => Err(error),
                })
            })
            .clone()
    }

    /// The roots, when they were loaded (and could be), for telling whether they changed.
    pub fn loaded(&self) -> Option<&Arc<RootCertStore>> {
        self.store.get().and_then(|r| r.as_ref().ok())
    }

    fn load(&self) -> Result<Arc<RootCertStore>, String> {
        let mut store = RootCertStore::empty();
        if let Some(path) = &self.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{SYSTEM_CA_ENV}={}: {e}", path.display()))?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{SYSTEM_CA_ENV}={}: no usable CA certificate", path.display()));
            }
        } else {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(native.certs);
            if added == 0 {
                let errors: Vec<String> = native.errors.iter().map(ToString::to_string).collect();
                return Err(format!("no system CA certificates found ({})", errors.join("; ")));
            }
        }
        Ok(Arc::new(store))
    }
}
