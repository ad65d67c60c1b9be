//! TLS origination as a matrix of real handshakes against in-process servers: every mode ×
//! certificate situation, version bounds, mTLS, certificate sources and resumption.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use common::pki::{tls_server, Ca, Leaf, ServerSpec, TlsServer};
use mesh_egress::catalog::{CompileOptions, Ipam, Service};
use mesh_egress::config;
use mesh_egress::resources::{self, Loaded};
use mesh_egress::tls::{self, FailureReason};
use mesh_egress::upstream::TargetAddr;
use rustls::version::{TLS12, TLS13};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

const NAME: &str = "svc.test";

/// A compiled service and the TLS client built for it.
struct TlsService {
    service: Service,
    client: Arc<rustls::ClientConfig>,
}

/// Compiles one service whose single endpoint is `endpoint` and whose `spec.tls` is `tls`.
fn compile(endpoint: &str, tls: &str, extra: &str, options: &CompileOptions) -> TlsService {
    let yaml = format!(
        "{extra}type: MeshExternalService\nname: s\nmesh: default\nspec:\n  match: {{port: 443, protocol: tcp}}\n  endpoints: [{{address: {endpoint}, port: 443}}]\n  tls:\n    enabled: true\n{tls}"
    );
    let mut loaded = Loaded::default();
    resources::load_str(Path::new("tls.yaml"), &yaml, &mut loaded);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    let (compiled, clients) =
        config::compile(&loaded.resources, options, &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap()), None);
    assert!(!compiled.diagnostics.has_errors(), "{}", compiled.diagnostics);
    let service = (*compiled.catalog.services()[0]).clone();
    assert!(service.broken.is_none(), "broken: {:?}", service.broken);
    TlsService { service, client: clients.get(0).unwrap().clone() }
}

/// Handshakes with `server` as the proxy would for an endpoint named `endpoint`, then reads the
/// server's greeting (a TLS 1.3 server rejects a client certificate only after the handshake).
async fn handshake(service: &TlsService, endpoint: &str, server: SocketAddr) -> Result<String, FailureReason> {
    let policy = service.service.tls.as_ref().unwrap();
    let config = &service.client;
    let hostname = endpoint.parse::<std::net::IpAddr>().is_err().then_some(endpoint);
    let tcp = TcpStream::connect(server).await.unwrap();
    let stream = tls::connect(config, tls::server_name(policy, hostname, &TargetAddr::Socket(server)), tcp)
        .await
        .map_err(|e| e.reason)?;
    let mut line = String::new();
    let mut reader = BufReader::new(stream);
    match reader.read_line(&mut line).await {
        Ok(0) => Err(FailureReason::Io),
        Ok(_) => Ok(line.trim_end().to_string()),
        Err(e) => Err(tls::reason_of_io(&e).unwrap_or(FailureReason::Io)),
    }
}

fn inline_ca(ca: &Ca) -> String {
    format!("      caCert:\n        inlineString: |\n{}", indent(&ca.pem, 10))
}

fn indent(text: &str, n: usize) -> String {
    text.lines().map(|l| format!("{}{l}\n", " ".repeat(n))).collect()
}

fn verification(mode: &str, ca: &Ca, more: &str) -> String {
    format!("    verification:\n      mode: {mode}\n{}{more}", inline_ca(ca))
}

struct Pki {
    ca: Ca,
    other_ca: Ca,
}

impl Pki {
    fn new() -> Self {
        Self { ca: Ca::new("trusted"), other_ca: Ca::new("untrusted") }
    }
}

#[derive(Clone, Copy, Debug)]
enum Situation {
    Valid,
    WrongName,
    UntrustedCa,
    ExpiredCert,
    SanPrefix,
    IpSan,
}

/// The server certificate, the endpoint address and the extra verification lines of a situation.
fn situation(pki: &Pki, s: Situation) -> (Leaf, &'static str, &'static str) {
    match s {
        Situation::Valid => (pki.ca.server(&[NAME]), NAME, ""),
        Situation::WrongName => (pki.ca.server(&["other.test"]), NAME, ""),
        Situation::UntrustedCa => (pki.other_ca.server(&[NAME]), NAME, ""),
        Situation::ExpiredCert => (pki.ca.expired_server(&[NAME]), NAME, ""),
        Situation::SanPrefix => (
            pki.ca.server(&["api-7.backend.test"]),
            NAME,
            "      subjectAltNames:\n        - type: Prefix\n          value: api-\n",
        ),
        Situation::IpSan => (pki.ca.server(&["127.0.0.1"]), "127.0.0.1", ""),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_against_every_certificate_situation() {
    use FailureReason::*;
    use Situation::*;
    let ok = Ok(());
    #[rustfmt::skip]
    let matrix: Vec<(&str, Situation, Result<(), FailureReason>)> = vec![
        ("Secured", Valid, ok), ("Secured", WrongName, Err(NameMismatch)), ("Secured", UntrustedCa, Err(UnknownCa)),
        ("Secured", ExpiredCert, Err(Expired)), ("Secured", SanPrefix, ok), ("Secured", IpSan, ok),
        ("SkipSAN", Valid, ok), ("SkipSAN", WrongName, ok), ("SkipSAN", UntrustedCa, Err(UnknownCa)),
        ("SkipSAN", ExpiredCert, Err(Expired)), ("SkipSAN", SanPrefix, ok), ("SkipSAN", IpSan, ok),
        ("SkipCA", Valid, ok), ("SkipCA", WrongName, Err(NameMismatch)), ("SkipCA", UntrustedCa, ok),
        ("SkipCA", ExpiredCert, ok), ("SkipCA", SanPrefix, ok), ("SkipCA", IpSan, ok),
        ("SkipAll", Valid, ok), ("SkipAll", WrongName, ok), ("SkipAll", UntrustedCa, ok),
        ("SkipAll", ExpiredCert, ok), ("SkipAll", SanPrefix, ok), ("SkipAll", IpSan, ok),
    ];
    let pki = Pki::new();
    let mut failures = Vec::new();
    for (mode, s, want) in &matrix {
        let (leaf, endpoint, more) = situation(&pki, *s);
        let server = tls_server(ServerSpec::new(&leaf)).await;
        let service = compile(endpoint, &verification(mode, &pki.ca, more), "", &CompileOptions::default());
        let got = handshake(&service, endpoint, server.addr).await.map(|_| ());
        if got != *want {
            failures.push(format!("{mode} × {s:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), matrix.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_must_not_match() {
    let pki = Pki::new();
    // A Prefix that the certificate does not start with.
    let leaf = pki.ca.server(&["api-7.backend.test"]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    let more = "      subjectAltNames:\n        - type: Prefix\n          value: web-\n";
    let service = compile(NAME, &verification("Secured", &pki.ca, more), "", &CompileOptions::default());
    assert_eq!(handshake(&service, NAME, server.addr).await, Err(FailureReason::NameMismatch));
    // Prefix and Exact compare DNS names without regard to case.
    let leaf = pki.ca.server(&["api-7.backend.test"]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    for more in [
        "      subjectAltNames:\n        - type: Prefix\n          value: API-\n",
        "      subjectAltNames:\n        - type: Exact\n          value: API-7.Backend.TEST\n",
    ] {
        let service = compile(NAME, &verification("Secured", &pki.ca, more), "", &CompileOptions::default());
        assert!(handshake(&service, NAME, server.addr).await.is_ok(), "{more}");
    }
    // An IP endpoint whose certificate has only a DNS name.
    let leaf = pki.ca.server(&[NAME]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    let service = compile("127.0.0.1", &verification("Secured", &pki.ca, ""), "", &CompileOptions::default());
    assert_eq!(handshake(&service, "127.0.0.1", server.addr).await, Err(FailureReason::NameMismatch));
    // An Exact SAN rescues it; serverName overrides the endpoint name.
    let more = "      subjectAltNames:\n        - type: Exact\n          value: svc.test\n";
    let service = compile("127.0.0.1", &verification("Secured", &pki.ca, more), "", &CompileOptions::default());
    assert!(handshake(&service, "127.0.0.1", server.addr).await.is_ok());
    let more = "      serverName: svc.test\n";
    let service = compile("127.0.0.1", &verification("Secured", &pki.ca, more), "", &CompileOptions::default());
    assert!(handshake(&service, "127.0.0.1", server.addr).await.is_ok());
}

async fn server_with_versions(leaf: &Leaf, versions: &[&'static rustls::SupportedProtocolVersion]) -> TlsServer {
    tls_server(ServerSpec { versions, ..ServerSpec::new(leaf) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_bounds_are_applied() {
    let pki = Pki::new();
    let leaf = pki.ca.server(&[NAME]);
    let only12 = server_with_versions(&leaf, &[&TLS12]).await;
    let only13 = server_with_versions(&leaf, &[&TLS13]).await;
    let v = |min: &str, max: &str| {
        format!("    version: {{min: {min}, max: {max}}}\n{}", verification("Secured", &pki.ca, ""))
    };
    let opts = CompileOptions::default();
    let min13 = compile(NAME, &v("TLS13", "TLSAuto"), "", &opts);
    assert_eq!(handshake(&min13, NAME, only12.addr).await, Err(FailureReason::ProtocolVersion));
    let max12 = compile(NAME, &v("TLSAuto", "TLS12"), "", &opts);
    assert_eq!(handshake(&max12, NAME, only13.addr).await, Err(FailureReason::ProtocolVersion));
    let auto = compile(NAME, &v("TLSAuto", "TLSAuto"), "", &opts);
    assert_eq!(handshake(&auto, NAME, only12.addr).await.as_deref(), Ok("hello Some(TLSv1_2)"));
    assert_eq!(handshake(&auto, NAME, only13.addr).await.as_deref(), Ok("hello Some(TLSv1_3)"));
    // TLS10 as a minimum loads (with a warning) as TLS 1.2.
    let min10 = compile(NAME, &v("TLS10", "TLS12"), "", &opts);
    assert_eq!(handshake(&min10, NAME, only12.addr).await.as_deref(), Ok("hello Some(TLSv1_2)"));
}

fn client_identity(leaf: &Leaf) -> String {
    format!(
        "      clientCert:\n        inlineString: |\n{}      clientKey:\n        inlineString: |\n{}",
        indent(&leaf.cert_pem, 10),
        indent(&leaf.key_pem, 10)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls() {
    let pki = Pki::new();
    let client_ca = Ca::new("clients");
    let leaf = pki.ca.server(&[NAME]);
    let client = client_ca.client("app.client.test");
    let opts = CompileOptions::default();
    for versions in [&[&TLS12][..], &[&TLS13][..]] {
        let server = tls_server(ServerSpec { versions, client_ca: Some(&client_ca), ..ServerSpec::new(&leaf) }).await;
        let with_cert = compile(NAME, &verification("Secured", &pki.ca, &client_identity(&client)), "", &opts);
        assert!(handshake(&with_cert, NAME, server.addr).await.is_ok(), "{versions:?}");
        let without = compile(NAME, &verification("Secured", &pki.ca, ""), "", &opts);
        let got = handshake(&without, NAME, server.addr).await;
        assert!(
            matches!(got, Err(FailureReason::MissingClientCertificate | FailureReason::AlertReceived)),
            "{versions:?}: {got:?}"
        );
        // SkipAll sends no client certificate, even when one is configured.
        let skip_all = compile(NAME, &verification("SkipAll", &pki.ca, &client_identity(&client)), "", &opts);
        assert!(handshake(&skip_all, NAME, server.addr).await.is_err(), "{versions:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_key_types_and_encodings() {
    let pki = Pki::new();
    let client_ca = Ca::new("clients");
    let leaf = pki.ca.server(&[NAME]);
    let server = tls_server(ServerSpec { client_ca: Some(&client_ca), ..ServerSpec::new(&leaf) }).await;
    let opts = CompileOptions::default();
    let keys = [
        ("ECDSA PKCS#8", rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(), None),
        ("Ed25519 PKCS#8", rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(), None),
        ("ECDSA SEC1", rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(), Some("ec")),
        ("RSA PKCS#1", rsa_key(), Some("rsa")),
        ("RSA PKCS#8", rsa_key(), None),
    ];
    for (what, key, traditional) in keys {
        let mut client = client_ca.client_with_key("app.client.test", key);
        if traditional.is_some() {
            client.key_pem = openssl_traditional(&client.key_pem);
            let header = if traditional == Some("rsa") { "BEGIN RSA PRIVATE KEY" } else { "BEGIN EC PRIVATE KEY" };
            assert!(client.key_pem.contains(header), "{what}: {}", client.key_pem);
        }
        let service = compile(NAME, &verification("Secured", &pki.ca, &client_identity(&client)), "", &opts);
        assert!(handshake(&service, NAME, server.addr).await.is_ok(), "{what}");
    }
}

/// rcgen cannot generate RSA keys with ring: openssl makes one (PKCS#8).
fn rsa_key() -> rcgen::KeyPair {
    let out = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(out.status.success());
    rcgen::KeyPair::from_pem(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

/// PKCS#8 → PKCS#1 (RSA) or SEC1 (EC), via openssl.
fn openssl_traditional(pkcs8: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("openssl")
        .args(["pkey", "-traditional"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl must be installed (.ci/run installs it)");
    child.stdin.take().unwrap().write_all(pkcs8.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_certificate_source() {
    let pki = Pki::new();
    let leaf = pki.ca.server(&[NAME]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&pki.ca.pem);
    let opts = CompileOptions::default();

    let inline = compile(NAME, &format!("    verification:\n      caCert:\n        inline: {b64}\n"), "", &opts);
    assert!(handshake(&inline, NAME, server.addr).await.is_ok(), "inline");

    let string = compile(NAME, &format!("    verification:\n{}", inline_ca(&pki.ca)), "", &opts);
    assert!(handshake(&string, NAME, server.addr).await.is_ok(), "inlineString");

    let secret = format!("type: Secret\nname: ca\nmesh: default\ndata: {b64}\n---\n");
    let from_secret = compile(NAME, "    verification:\n      caCert:\n        secret: ca\n", &secret, &opts);
    assert!(handshake(&from_secret, NAME, server.addr).await.is_ok(), "secret");

    // No caCert: the system store, here replaced by the file Kuma's variable names.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ca.pem");
    std::fs::write(&file, &pki.ca.pem).unwrap();
    let with_file = CompileOptions { system_ca_file: Some(file), ..CompileOptions::default() };
    let system = compile(NAME, "", "", &with_file);
    assert!(handshake(&system, NAME, server.addr).await.is_ok(), "system CA file");
    let other = tls_server(ServerSpec::new(&pki.other_ca.server(&[NAME]))).await;
    assert_eq!(handshake(&system, NAME, other.addr).await, Err(FailureReason::UnknownCa));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_resumed() {
    let pki = Pki::new();
    let leaf = pki.ca.server(&[NAME]);
    for versions in [&[&TLS12][..], &[&TLS13][..]] {
        let server = tls_server(ServerSpec { versions, ..ServerSpec::new(&leaf) }).await;
        let service = compile(NAME, &verification("Secured", &pki.ca, ""), "", &CompileOptions::default());
        let config = service.client.clone();
        let policy = service.service.tls.clone().unwrap();
        let addr = TargetAddr::Socket(server.addr);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let stream = tls::connect(&config, tls::server_name(&policy, Some(NAME), &addr), tcp).await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap(); // also takes in TLS 1.3 session tickets
            kinds.push(reader.get_ref().get_ref().1.handshake_kind());
        }
        assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)], "{versions:?}");
    }
}

#[test]
fn certificate_data_that_cannot_be_used_breaks_only_its_service() {
    let pki = Pki::new();
    let yaml = format!(
        "type: MeshExternalService\nname: bad\nspec:\n  match: {{port: 1}}\n  endpoints: [{{address: 10.0.0.1, port: 1}}]\n  tls:\n    enabled: true\n    verification:\n      clientCert:\n        inlineString: |\n{}      clientKey:\n        inlineString: |\n{}---\ntype: MeshExternalService\nname: good\nspec:\n  match: {{port: 1}}\n  endpoints: [{{address: 10.0.0.2, port: 1}}]\n  tls:\n    enabled: true\n    verification:\n      mode: SkipCA\n",
        indent(&pki.ca.client("a").cert_pem, 10),
        indent(&pki.ca.client("b").key_pem, 10),
    );
    let mut loaded = Loaded::default();
    resources::load_str(Path::new("x.yaml"), &yaml, &mut loaded);
    let (compiled, _) = config::compile(
        &loaded.resources,
        &CompileOptions::default(),
        &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap()),
        None,
    );
    let by_name = |n: &str| compiled.catalog.services().iter().find(|s| s.name == n).unwrap().clone();
    let bad = by_name("bad").broken.clone().unwrap();
    assert!(bad.starts_with("spec.tls.verification.clientKey: does not fit clientCert"), "{bad}");
    assert!(by_name("good").broken.is_none());
}
