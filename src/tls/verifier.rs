//! Server certificate verification for Kuma's four modes.
//!
//! - `Secured`: the chain to a trusted root (with expiry) and the name.
//! - `SkipSAN`: the chain only.
//! - `SkipCA`: the name only (the documented meaning; Kuma's code verifies nothing here).
//! - `SkipAll`: neither.
//!
//! The name matches when the certificate is valid for the name we connected with (SNI or the
//! endpoint address), or for any `subjectAltNames` entry: `Exact` (wildcard-aware, DNS or IP)
//! or `Prefix` (a prefix of any DNS or IP SAN). Handshake signatures are verified in every mode.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::model::{SanMatch, VerificationMode};

#[derive(Debug)]
pub struct MeshVerifier {
    mode: VerificationMode,
    /// Present when the mode checks the chain.
    roots: Option<Arc<RootCertStore>>,
    subject_alt_names: Vec<SanMatch>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl MeshVerifier {
    pub fn new(
        mode: VerificationMode,
        roots: Option<Arc<RootCertStore>>,
        subject_alt_names: Vec<SanMatch>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self { mode, roots, subject_alt_names, algorithms }
    }

    fn checks_chain(&self) -> bool {
        matches!(self.mode, VerificationMode::Secured | VerificationMode::SkipSAN)
    }

    fn checks_name(&self) -> bool {
        matches!(self.mode, VerificationMode::Secured | VerificationMode::SkipCA)
    }

    fn verify_name(
        &self,
        cert: &ParsedCertificate<'_>,
        der: &CertificateDer<'_>,
        name: &ServerName<'_>,
    ) -> Result<(), Error> {
        if verify_server_name(cert, name).is_ok() {
            return Ok(());
        }
        let mut cert_names: Option<Vec<String>> = None; // parsed only if a Prefix needs them
        for san in &self.subject_alt_names {
            let matched = match san {
                SanMatch::Exact(value) => {
                    ServerName::try_from(value.as_str()).is_ok_and(|n| verify_server_name(cert, &n).is_ok())
                }
                // DNS names compare without regard to case (RFC 4343); Exact goes through
                // webpki, which already does.
                SanMatch::Prefix(prefix) => cert_names
                    .get_or_insert_with(|| subject_alt_names(der))
                    .iter()
                    .any(|n| n.get(..prefix.len()).is_some_and(|head| head.eq_ignore_ascii_case(prefix))),
            };
            if matched {
                return Ok(());
            }
        }
        Err(Error::InvalidCertificate(CertificateError::NotValidForName))
    }
}

/// The DNS and IP SANs of a certificate, as text.
fn subject_alt_names(der: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes).ok().map(|b| std::net::Ipv4Addr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes).ok().map(|b| std::net::Ipv6Addr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for MeshVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        if self.checks_chain() {
            let roots = self.roots.as_deref().ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)?;
        }
        if self.checks_name() {
            self.verify_name(&cert, end_entity, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
