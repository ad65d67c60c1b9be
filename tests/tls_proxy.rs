//! TLS origination through the proxy: the docs' `mes-tcp-tls` and `mes-tcp-mtls` shapes against
//! local TLS servers, a peer no one here wrote (`openssl s_server`), failure metrics, and Kuma's
//! system-CA variable honoured by the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

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

/// One request on a fresh application connection; HTTP/1.1, or h2c prior knowledge.
async fn status_of(addr: SocketAddr, h2c: bool) -> u16 {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let req = || http::Request::get(format!("http://{addr}/")).body(Empty::<bytes::Bytes>::new()).unwrap();
    let response = if h2c {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req()).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        sender.send_request(req()).await.unwrap()
    };
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

/// A pooled connection made under `SkipAll` must never serve a request once a reload asks for
/// verification. The pool key once was the address of the TLS client configuration: a TLS 1.2
/// connection does not keep its configuration alive, so a later configuration could be
/// allocated at the same address and find the old connections (here about every other reload).
/// HTTP/1 pools and the shared HTTP/2 connection, one service per run so that its
/// configurations are the only ones allocated; the real binary, reloaded by SIGHUP, keeping
/// idle connections for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_stricter_tls_never_reuses_a_connection_made_under_looser_tls() {
    for (protocol, h2c) in [("http", false), ("http2", true)] {
        let accepted = reload_skip_all_to_secured(protocol, h2c).await;
        assert!(
            accepted.is_empty(),
            "{protocol}: (reload, status) served over a connection verified under SkipAll: {accepted:?}"
        );
    }
}

/// Starts under Secured, reloads to SkipAll and sends one request, then reloads to Secured with
/// a new serverName 40 times, one request each. Returns the requests that were not refused.
async fn reload_skip_all_to_secured(protocol: &str, h2c: bool) -> Vec<(usize, u16)> {
    use common::http_upstream::http_upstream;
    let untrusted = Ca::new("self-signed");
    let trusted = Ca::new("trusted");
    let upstream = http_upstream(Some(tls12_only(&untrusted.server(&["upstream.test"])))).await;
    let [outbound, admin]: [SocketAddr; 2] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let config_with = |tls: &str| {
        service_with_protocol("s", protocol, outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), tls)
    };
    let secured = |reload: usize| {
        // A new serverName each time, so each reload builds a new TLS client.
        format!(
            "  tls:\n    enabled: true\n    verification:\n      mode: Secured\n      serverName: n{reload}.upstream.test\n      caCert:\n        inline: {}\n",
            b64(&trusted.pem)
        )
    };
    let (_dir, config) = config_dir(&config_with(&secured(0)));
    let proxy = spawn_proxy(&config, admin, &["--no-watch", "--idle-timeout", "1h", "--workers", "1"], &[]);
    eventually("proxy listens", Duration::from_secs(20), || async { TcpStream::connect(outbound).await.is_ok() }).await;
    let reload_to = |tls: String, reload: usize| {
        std::fs::write(&config, config_with(&tls)).unwrap();
        let hup = Command::new("kill").args(["-HUP", &proxy.0.id().to_string()]).status().unwrap();
        assert!(hup.success());
        let reloaded = format!("mesh_egress_config_reloads_total{{result=\"success\"}} {reload}\n");
        async move {
            eventually("the reload is done", Duration::from_secs(10), || async {
                admin_text(admin, "/metrics").await.contains(&reloaded)
            })
            .await
        }
    };
    // Reloaded (not started) with SkipAll: its configuration is built where later ones are.
    reload_to("  tls:\n    enabled: true\n    verification:\n      mode: SkipAll\n".into(), 1).await;
    assert_eq!(status_of(outbound, h2c).await, 200, "{protocol}: SkipAll accepts the self-signed upstream");
    let mut accepted = Vec::new();
    for reload in 2..=40 {
        reload_to(secured(reload), reload).await;
        let status = status_of(outbound, h2c).await;
        if status != 503 {
            accepted.push((reload, status));
        }
    }
    accepted
}

/// A TLS 1.2-only upstream configuration (ALPN h2 and http/1.1).
fn tls12_only(leaf: &Leaf) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(common::pki::certs(&leaf.cert_pem), key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

async fn admin_text(admin: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(admin).await else { return String::new() };
    let _ = s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes()).await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// An endpoint's keep-alive timeout closing a pooled TLS connection just as a request goes out,
/// without close_notify (rustls then reads "unexpected EOF"), is a connection closed before any
/// response byte like a FIN on plaintext: an idempotent request without a body is sent again on
/// a new connection instead of failing with a 502, however short the connection sat idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_tls_connection_closed_without_close_notify_is_resent() {
    let ca = Ca::new("ca");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls12_only(&ca.server(&["upstream.test"])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                // The first request is answered; the connection closes (dropped: no
                // close_notify) once the second has arrived.
                for answered in 0.. {
                    if read_head(&mut tls).await.is_err() || answered == 1 {
                        return;
                    }
                    let ok = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    if ok.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let outbound = free_addr("127.0.0.1");
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: upstream.test\n      caCert:\n        inline: {}\n",
        b64(&ca.pem)
    );
    let yaml = service_with_protocol("s", "http", outbound, &endpoint("127.0.0.1", upstream.port(), 0), &tls);
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    assert_eq!(status_of(outbound, false).await, 200);
    assert_eq!(status_of(outbound, false).await, 200, "the request was not sent again on a new connection");
}

/// An idle pooled TLS connection the proxy closes (here: past MeshTimeout's `idleTimeout`) ends
/// with close_notify, as Envoy's do: the endpoint reads a clean end, not a truncation (rustls:
/// "unexpected EOF"). The endpoint reports how each connection ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_tls_connection_closes_with_close_notify() {
    let ca = Ca::new("ca");
    let acceptor = tokio_rustls::TlsAcceptor::from(common::http_upstream::tls_config(&ca.server(&["upstream.test"])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, ended_tx) = (acceptor.clone(), ended_tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            Ok(_) if head.is_empty() => return drop(ended_tx.send("close_notify".into())),
                            Ok(_) => return drop(ended_tx.send("closed mid-head".into())),
                            Err(error) => return drop(ended_tx.send(format!("{:?}", error.kind()))),
                        }
                    }
                    if tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let outbound = free_addr("127.0.0.1");
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: upstream.test\n      caCert:\n        inline: {}\n",
        b64(&ca.pem)
    );
    let idle = "---\ntype: MeshTimeout\nname: idle\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 200ms}\n";
    let yaml = service_with_protocol("idle-tls", "http", outbound, &endpoint("127.0.0.1", upstream.port(), 0), &tls);
    let (_dir, config) = config_dir(&format!("{yaml}{idle}"));
    let _proxy = start(options(config)).await;
    assert_eq!(status_of(outbound, false).await, 200);
    let how = tokio::time::timeout(Duration::from_secs(10), ended.recv()).await;
    assert_eq!(how.expect("the idle connection was never closed").unwrap(), "close_notify");
}
