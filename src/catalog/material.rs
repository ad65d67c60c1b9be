//! Certificate and key material from Kuma data sources (`inline`, `inlineString`, `secret`).

use std::collections::HashMap;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::resources::kinds::DataSource;

/// Kuma secrets by `(mesh, name)`.
pub(super) type Secrets = HashMap<(String, String), Vec<u8>>;

/// Reads a data source's bytes. Errors name what is missing, never the data.
fn bytes(source: &DataSource, mesh: &str, secrets: &Secrets) -> Result<Vec<u8>, String> {
    if let Some(inline) = &source.inline {
        return base64::engine::general_purpose::STANDARD
            .decode(inline.trim())
            .map_err(|e| format!("inline: must be base64: {e}"));
    }
    if let Some(text) = &source.inline_string {
        return Ok(text.as_bytes().to_vec());
    }
    match &source.secret {
        Some(name) => secrets
            .get(&(mesh.to_string(), name.clone()))
            .cloned()
            .ok_or_else(|| format!("secret '{name}' not found in mesh '{mesh}'")),
        None => Err("no data source set".to_string()),
    }
}

fn is_pem(data: &[u8]) -> bool {
    data.windows(11).any(|w| w == b"-----BEGIN ")
}

/// One or more certificates: PEM, or a single DER certificate.
pub(super) fn certificates(
    source: &DataSource,
    mesh: &str,
    secrets: &Secrets,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let data = bytes(source, mesh, secrets)?;
    if !is_pem(&data) {
        return match data.first() {
            Some(0x30) => Ok(vec![CertificateDer::from(data)]), // DER starts with a SEQUENCE
            _ => Err("no PEM certificate found".to_string()),
        };
    }
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".to_string());
    }
    for (i, cert) in certs.iter().enumerate() {
        webpki::EndEntityCert::try_from(cert).map_err(|e| format!("certificate #{i} cannot be parsed: {e}"))?;
    }
    Ok(certs)
}

/// A private key in PKCS#8, PKCS#1 (RSA) or SEC1 (EC) PEM.
pub(super) fn private_key(
    source: &DataSource,
    mesh: &str,
    secrets: &Secrets,
) -> Result<PrivateKeyDer<'static>, String> {
    let data = bytes(source, mesh, secrets)?;
    PrivateKeyDer::from_pem_slice(&data)
        .map_err(|e| format!("no private key found (PEM PKCS#8, PKCS#1 or SEC1 expected): {e}"))
}
