//! TLS origination through the proxy: the docs' `mes-tcp-tls` and `mes-tcp-mtls` shapes against
//! local TLS servers, a peer no one here wrote (`openssl s_server`), failure metrics, and Kuma's
//! system-CA variable honoured by the real binary.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::pki::{tls_server, Ca, Leaf, ServerSpec};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The docs' TLS example pointed at a local server (SNI `tcpbin.test`, trust from `caCert`), with
/// the mTLS example's client certificate when `client` is given. Returns the YAML and the
/// outbound address the application dials.
fn mes_tcp_tls(name: &str, server: SocketAddr, ca: &Ca, client: Option<&Leaf>) -> (String, SocketAddr) {
    let mut tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: tcpbin.test\n      caCert:\n        inline: {}\n",
        b64(&ca.pem)
    );
    if let Some(client) = client {
        tls.push_str(&format!(
            "      clientCert:\n        inline: {}\n      clientKey:\n        inline: {}\n",
            b64(&client.cert_pem),
            b64(&client.key_pem)
        ));
    }
    let outbound = free_addr("127.0.0.1");
    (service_with_outbound(name, outbound, &endpoint("127.0.0.1", server.port(), 0), &tls), outbound)
}

async fn exchange(addr: SocketAddr, send: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(send).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mes_tcp_tls_and_mtls_shapes_end_to_end() {
    let ca = Ca::new("server-ca");
    let client_ca = Ca::new("client-ca");
    let leaf = ca.server(&["tcpbin.test"]);
    let tls = tls_server(ServerSpec::new(&leaf)).await;
    let mtls = tls_server(ServerSpec { client_ca: Some(&client_ca), ..ServerSpec::new(&leaf) }).await;
    let client = client_ca.client("app");

    let (tls_yaml, tls_out) = mes_tcp_tls("mes-tcp-tls", tls.addr, &ca, None);
    let (mtls_yaml, mtls_out) = mes_tcp_tls("mes-tcp-mtls", mtls.addr, &ca, Some(&client));
    let (_dir, config) = config_dir(&format!("{tls_yaml}---\n{mtls_yaml}"));
    let _proxy = start(options(config)).await;

    assert_eq!(exchange(tls_out, b"ping").await, "hello Some(TLSv1_3)\nping");
    assert_eq!(exchange(mtls_out, b"ping").await, "hello Some(TLSv1_3)\nping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_close_the_connection_and_are_counted_by_reason() {
    let ca = Ca::new("server-ca");
    let stranger = Ca::new("stranger");
    let leaf = stranger.server(&["tcpbin.test"]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    let (yaml, outbound) = mes_tcp_tls("untrusted", server.addr, &ca, None);
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    assert_eq!(exchange(outbound, b"ping").await, "", "closed without data");
    let text = mesh_egress::metrics::metrics().encode();
    assert!(
        text.contains(r#"mesh_egress_tls_handshake_failures_total{service="default/untrusted",reason="unknown_ca"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_server_with_client_verification() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server-ca");
    let client_ca = Ca::new("client-ca");
    let leaf = ca.server(&["tcpbin.test"]);
    let files = [("cert.pem", &leaf.cert_pem), ("key.pem", &leaf.key_pem), ("clients.pem", &client_ca.pem)];
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let port = free_addr("127.0.0.1").port();
    let server = Command::new("openssl")
        .args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-cert", "cert.pem", "-key", "key.pem"])
        .args(["-CAfile", "clients.pem", "-Verify", "1", "-verify_return_error", "-www", "-quiet"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl must be installed (.ci/run installs it)");
    let _server = KillOnDrop(server);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("openssl s_server listens", Duration::from_secs(10), || async {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;

    let (with_cert, a) = mes_tcp_tls("with-cert", addr, &ca, Some(&client_ca.client("app")));
    let (without, b) = mes_tcp_tls("without-cert", addr, &ca, None);
    let (_cfg, config) = config_dir(&format!("{with_cert}---\n{without}"));
    let _proxy = start(options(config)).await;

    let page = exchange(a, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(page.starts_with("HTTP/1.0 200 ok"), "{page}");
    assert!(page.contains("Client certificate"), "s_server saw our certificate:\n{page}");
    let refused = exchange(b, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(!refused.contains("200 ok"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_honours_kumas_system_ca_variable() {
    let ca = Ca::new("private-root");
    let leaf = ca.server(&["tcpbin.test"]);
    let server = tls_server(ServerSpec::new(&leaf)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("roots.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let outbound = free_addr("127.0.0.1");
    let tls = "  tls:\n    enabled: true\n    verification:\n      serverName: tcpbin.test\n";
    let (_cfg, config) =
        config_dir(&service_with_outbound("sys", outbound, &endpoint("127.0.0.1", server.addr.port(), 0), tls));
    let admin = free_addr("127.0.0.1");
    let _child = spawn_proxy(&config, admin, &[], &[("KUMA_DATAPLANE_RUNTIME_DYNAMIC_SYSTEM_CA_PATH", &ca_file)]);
    eventually("proxy listens", Duration::from_secs(20), || async { TcpStream::connect(outbound).await.is_ok() }).await;
    assert_eq!(exchange(outbound, b"ping").await, "hello Some(TLSv1_3)\nping");
}
