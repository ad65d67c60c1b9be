//! TLS origination: one `rustls::ClientConfig` per service (built once per configuration),
//! the server name per connection, and failure reasons that say what went wrong.

pub mod roots;
mod verifier;

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use rustls::version::{TLS12, TLS13};
use rustls::{AlertDescription, CertificateError, ClientConfig, SupportedProtocolVersion};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;

pub use roots::SystemRoots;
pub use verifier::MeshVerifier;

use crate::model::{Protocol, TargetAddr, TlsPolicy, TlsVersion, VerificationMode};

/// Builds the client configuration of one service. The error names the field at fault.
pub fn client_config(
    policy: &TlsPolicy,
    protocol: Protocol,
    system: &SystemRoots,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static SupportedProtocolVersion> = [(TlsVersion::Tls12, &TLS12), (TlsVersion::Tls13, &TLS13)]
        .into_iter()
        .filter(|(v, _)| (policy.min..=policy.max).contains(v))
        .map(|(_, version)| version)
        .collect();
    let roots = match policy.mode {
        VerificationMode::Secured | VerificationMode::SkipSAN => Some(match &policy.ca {
            Some(certs) => roots::from_certs(certs).map_err(|e| format!("spec.tls.verification.caCert: {e}"))?,
            None => system.get()?,
        }),
        VerificationMode::SkipCA | VerificationMode::SkipAll => None,
    };
    let verifier = MeshVerifier::new(
        policy.mode,
        roots,
        policy.subject_alt_names.clone(),
        provider.signature_verification_algorithms,
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| format!("spec.tls.version: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match (&policy.client, policy.mode) {
        // SkipAll sends no client certificate (Kuma's semantics).
        (Some(identity), mode) if mode != VerificationMode::SkipAll => builder
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .map_err(|e| format!("spec.tls.verification.clientKey: does not fit clientCert: {e}"))?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        Protocol::Http2 | Protocol::Grpc => vec![b"h2".to_vec()],
        Protocol::Http => vec![b"http/1.1".to_vec()],
        Protocol::Tcp => Vec::new(),
    };
    // Resumption is on by default (in-memory cache, shared by this service's connections).
    Ok(Arc::new(config))
}

/// The name to connect with: `serverName`, else the endpoint's DNS name (sent as SNI); else the
/// endpoint's IP (no SNI is sent for an IP). Unix endpoints without `serverName` use `localhost`.
/// `hostname` is the endpoint's DNS name, `None` for IP and unix endpoints.
pub fn server_name(policy: &TlsPolicy, hostname: Option<&str>, addr: &TargetAddr) -> ServerName<'static> {
    let dns = policy.server_name.as_deref().or(hostname);
    if let Some(name) = dns.and_then(|n| ServerName::try_from(n.to_string()).ok()) {
        return name;
    }
    match addr {
        TargetAddr::Socket(addr) => ServerName::IpAddress(addr.ip().into()),
        TargetAddr::Unix(_) => {
            ServerName::try_from("localhost").unwrap_or(ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()))
        }
    }
}

/// Performs the handshake over an established connection.
pub async fn connect<S>(
    config: &Arc<ClientConfig>,
    name: ServerName<'static>,
    stream: S,
) -> Result<TlsStream<S>, TlsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream).await.map_err(TlsError::from_io)
}

/// Why a TLS session failed, as the metric label and log field say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    UnknownCa,
    NameMismatch,
    Expired,
    ProtocolVersion,
    MissingClientCertificate,
    AlertReceived,
    BadCertificate,
    Io,
    Other,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCa => "unknown_ca",
            Self::NameMismatch => "name_mismatch",
            Self::Expired => "expired",
            Self::ProtocolVersion => "protocol_version",
            Self::MissingClientCertificate => "missing_client_certificate",
            Self::AlertReceived => "alert_received",
            Self::BadCertificate => "bad_certificate",
            Self::Io => "io",
            Self::Other => "other",
        }
    }

    pub fn of(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    Self::NameMismatch
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                _ => Self::BadCertificate,
            },
            E::PeerIncompatible(_) => Self::ProtocolVersion,
            E::AlertReceived(AlertDescription::ProtocolVersion) => Self::ProtocolVersion,
            E::AlertReceived(AlertDescription::CertificateRequired) => Self::MissingClientCertificate,
            E::AlertReceived(_) => Self::AlertReceived,
            _ => Self::Other,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("TLS {}: {source}", reason.as_str())]
pub struct TlsError {
    pub reason: FailureReason,
    pub source: io::Error,
}

impl TlsError {
    pub fn from_io(source: io::Error) -> Self {
        Self { reason: reason_of_io(&source).unwrap_or(FailureReason::Io), source }
    }
}

/// The TLS reason behind an I/O error from a TLS stream, if it was a TLS error.
pub fn reason_of_io(error: &io::Error) -> Option<FailureReason> {
    error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).map(FailureReason::of)
}
