//! Throwaway CAs and certificates (rcgen) and an in-process TLS server for tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pub pem: String,
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let pem = cert.pem();
        Self { cert, key, pem }
    }

    /// A server certificate for `names` (DNS names or IPs).
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.issue(names, false, ExtendedKeyUsagePurpose::ServerAuth, KeyPair::generate().unwrap())
    }

    /// A server certificate that expired long ago.
    pub fn expired_server(&self, names: &[&str]) -> Leaf {
        self.issue(names, true, ExtendedKeyUsagePurpose::ServerAuth, KeyPair::generate().unwrap())
    }

    pub fn client(&self, name: &str) -> Leaf {
        self.client_with_key(name, KeyPair::generate().unwrap())
    }

    pub fn client_with_key(&self, name: &str, key: KeyPair) -> Leaf {
        self.issue(&[name], false, ExtendedKeyUsagePurpose::ClientAuth, key)
    }

    fn issue(&self, names: &[&str], expired: bool, usage: ExtendedKeyUsagePurpose, key: KeyPair) -> Leaf {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2001, 1, 1);
            params.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().unwrap()
}

/// How the test TLS server behaves.
pub struct ServerSpec<'a> {
    pub leaf: &'a Leaf,
    pub versions: &'a [&'static SupportedProtocolVersion],
    /// Require a client certificate signed by this CA.
    pub client_ca: Option<&'a Ca>,
    pub alpn: Vec<Vec<u8>>,
}

impl<'a> ServerSpec<'a> {
    pub fn new(leaf: &'a Leaf) -> Self {
        Self { leaf, versions: rustls::ALL_VERSIONS, client_ca: None, alpn: Vec::new() }
    }
}

/// A TLS server that greets each client with `hello <negotiated version>\n`, then echoes.
pub struct TlsServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn tls_server(spec: ServerSpec<'_>) -> TlsServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(spec.versions).unwrap();
    let builder = match spec.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(certs(&ca.pem).remove(0)).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let key = PrivateKeyDer::from_pem_slice(spec.leaf.key_pem.as_bytes()).unwrap();
    let mut config = builder.with_single_cert(certs(&spec.leaf.cert_pem), key).unwrap();
    config.alpn_protocols = spec.alpn;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let version = format!("{:?}", tls.get_ref().1.protocol_version());
                if tls.write_all(format!("hello {version}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    TlsServer { addr, task }
}
