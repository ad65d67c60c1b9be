//! MeshPassthrough on the transparent listener, in process: the original destination is
//! injected, the "internet" is loopback addresses (127.0.0.2 allowed servers, 127.0.0.3 the
//! same ports elsewhere), names resolve through a DNS server of the test's own. The root
//! network-namespace tier (tests/netns.rs) runs the same modes with iptables and real clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::http_upstream::{http_upstream_on, tls_config};
use common::pki::Ca;
use common::*;
use mesh_egress::server::Server;
use mesh_egress::upstream::ResolverSource;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALLOWED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Reads what the peer sends until it closes (or 10 s pass).
async fn read_all(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// `requests` on one HTTP/1.1 connection, each `(host, path)`; returns each response's status
/// line and body.
async fn http1(mut stream: TcpStream, requests: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, (host, path)) in requests.iter().enumerate() {
        let close = if i + 1 == requests.len() { "Connection: close\r\n" } else { "" };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut stream).await.unwrap_or_else(|head| {
            panic!("closed before a response to {host}{path}: {:?}", String::from_utf8_lossy(&head))
        });
        let head = String::from_utf8_lossy(&head).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        out.push((head.lines().next().unwrap().to_string(), String::from_utf8_lossy(&body).into_owned()));
    }
    out
}

fn tls_connector(ca: &Ca) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(common::pki::certs(&ca.pem).remove(0)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// An HTTPS GET with `sni` over `stream`: the status line, or the TLS error.
async fn https_get(connector: &tokio_rustls::TlsConnector, stream: TcpStream, sni: &str) -> Result<String, String> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = connector.connect(name, stream).await.map_err(|e| e.to_string())?;
    let req = format!("GET /tls HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    Ok(read_all(&mut tls).await)
}

const POLICY: &str = "\
---
type: MeshPassthrough
name: egress
mesh: default
spec:
  targetRef: {kind: Mesh}
  default:
    passthroughMode: MODE
    appendMatch:
      - {type: IP, value: 127.0.0.4, port: ECHO_PORT, protocol: tcp}
      - {type: CIDR, value: 127.0.5.0/24}
      - {type: Domain, value: tls.test, port: TLS_PORT, protocol: tls}
      - {type: Domain, value: '*.wild.test', port: TLS_PORT, protocol: tls}
      - {type: Domain, value: web.test, protocol: http}
      - {type: Domain, value: '*.web.test', port: HTTP_PORT, protocol: http}
";

struct World {
    proxy: Server,
    injected: Arc<InjectedOriginalDst>,
    listener: SocketAddr,
    config: std::path::PathBuf,
    policy: String,
    mes: String,
    _dir: tempfile::TempDir,
}

impl World {
    async fn dial(&self, dst: SocketAddr) -> TcpStream {
        self.injected.connect(self.listener, dst).await
    }

    async fn set_mode(&mut self, mode: &str) {
        std::fs::write(&self.config, format!("{}{}", self.mes, self.policy.replace("MODE", mode))).unwrap();
        self.proxy.reload().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matched_mode_allows_only_what_the_rules_name_and_pins_domains() {
    let dns = dns_server(30).await;
    for name in ["tls.test", "a.wild.test", "b.c.wild.test", "web.test", "api.web.test", "other.test"] {
        dns.set(name, ALLOWED);
    }
    dns.set("wild.test", ALLOWED);
    let ca = Ca::new("passthrough-ca");
    let leaf = ca.server(&["tls.test", "*.wild.test", "b.c.wild.test", "wild.test", "other.test"]);
    let https = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), Some(tls_config(&leaf))).await;
    let https_elsewhere =
        http_upstream_on(SocketAddr::new(ELSEWHERE.into(), https.addr.port()), Some(tls_config(&leaf))).await;
    let web = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let web_elsewhere = http_upstream_on(SocketAddr::new(ELSEWHERE.into(), web.addr.port()), None).await;
    let echo = echo_server("127.0.0.4:0".parse().unwrap(), "echo").await;
    let cidr_echo = echo_server("127.0.5.9:0".parse().unwrap(), "cidr").await;
    let not_listed = echo_server("127.0.6.1:0".parse().unwrap(), "unlisted").await;
    let mes_echo = echo_server("127.0.0.1:0".parse().unwrap(), "mes").await;

    let outbound = free_addr("127.0.0.1");
    let mes = service_with_outbound("mes", outbound, &endpoint("127.0.0.1", mes_echo.addr.port(), 0), "");
    let policy = POLICY
        .replace("ECHO_PORT", &echo.addr.port().to_string())
        .replace("TLS_PORT", &https.addr.port().to_string())
        .replace("HTTP_PORT", &web.addr.port().to_string());
    let (dir, config) = config_dir(&format!("{mes}{}", policy.replace("MODE", "Matched")));
    let mut opts = options(config.clone());
    opts.upstream.resolver = ResolverSource::new(vec![dns.addr]);
    let (proxy, injected) = start_transparent(opts).await;
    let listener = proxy.transparent_addr().unwrap();
    let mut world = World { proxy, injected, listener, config, policy, mes, _dir: dir };
    let connector = tls_connector(&ca);
    let round_trip = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        read_all(&mut s).await
    };

    // IP and CIDR: by address (and port), whatever the bytes.
    assert_eq!(round_trip(world.dial(echo.addr).await).await, "echo\nping<eof>");
    assert_eq!(round_trip(world.dial(cidr_echo.addr).await).await, "cidr\nping<eof>");
    assert_eq!(round_trip(world.dial(not_listed.addr).await).await, "", "no rule: closed");

    // TLS by SNI, never terminated: the client verifies the destination's own certificate.
    let tls_dst = https.addr;
    let ok = https_get(&connector, world.dial(tls_dst).await, "tls.test").await.unwrap();
    assert!(ok.starts_with("HTTP/1.1 200") && ok.contains("path: /tls"), "{ok}");
    for sni in ["a.wild.test", "b.c.wild.test"] {
        let ok = https_get(&connector, world.dial(tls_dst).await, sni).await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200"), "{sni}: {ok}");
    }
    for sni in ["wild.test", "other.test"] {
        let denied = https_get(&connector, world.dial(tls_dst).await, sni).await;
        assert!(denied.is_err(), "{sni}: *.wild.test and tls.test only, got {denied:?}");
    }
    // Pinned: an allowed SNI dialled at another address goes to the name's own address.
    let before = (https.connections(), https_elsewhere.connections());
    let pinned = https_get(&connector, world.dial(https_elsewhere.addr).await, "tls.test").await.unwrap();
    assert!(pinned.starts_with("HTTP/1.1 200"), "{pinned}");
    assert_eq!((https.connections(), https_elsewhere.connections()), (before.0 + 1, before.1), "never the dialled IP");

    // HTTP by Host, per request on one keep-alive connection; 503 with Kuma's text otherwise.
    let host = |name: &str| format!("{name}:{}", web.addr.port());
    let responses = http1(
        world.dial(web.addr).await,
        &[
            (&host("web.test"), "/one"),
            (&host("other.test"), "/two"),
            (&host("api.web.test"), "/three"),
            ("web.test", "/four"),
        ],
    )
    .await;
    assert!(responses[0].0.contains(" 200 ") && responses[0].1.contains("path: /one"), "{responses:?}");
    assert!(responses[1].0.contains(" 503 "), "{responses:?}");
    assert!(responses[1]
        .1
        .contains("No routes matched this domain - check configuration of your MeshPassthrough policy"));
    assert!(responses[2].0.contains(" 200 ") && responses[2].1.contains("path: /three"), "{responses:?}");
    assert!(responses[3].0.contains(" 200 "), "a Host without a port matches the destination's: {responses:?}");
    let wrong_port = http1(world.dial(web.addr).await, &[("web.test:1", "/x")]).await;
    assert!(wrong_port[0].0.contains(" 503 "), "Host names another port: {wrong_port:?}");
    for bad in ["web.test:99999", "evil.test@web.test"] {
        let refused = http1(world.dial(web.addr).await, &[(bad, "/x")]).await;
        assert!(refused[0].0.contains(" 503 ") || refused[0].0.contains(" 400 "), "{bad}: {refused:?}");
    }
    // Domain fronting: an allowed absolute URI with another Host; the destination sees only the
    // authority that was allowed.
    let mut front = world.dial(web.addr).await;
    let uri = format!("http://web.test:{}/front", web.addr.port());
    front
        .write_all(format!("GET {uri} HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let fronted = read_all(&mut front).await;
    assert!(
        fronted.contains("path: /front") && fronted.contains(&format!("host: web.test:{}", web.addr.port())),
        "{fronted}"
    );
    assert!(!fronted.contains("evil.test"), "{fronted}");
    // Pinned too: web.test dialled at the other address is served by web.test's.
    let before = web_elsewhere.connections();
    let pinned = http1(world.dial(web_elsewhere.addr).await, &[(&host("web.test"), "/pinned")]).await;
    assert!(pinned[0].0.contains(" 200 "), "{pinned:?}");
    assert_eq!(web_elsewhere.connections(), before, "the dialled address is never reached");

    // The MeshExternalService is unaffected by any of it.
    assert_eq!(round_trip(TcpStream::connect(outbound).await.unwrap()).await, "mes\nping<eof>");

    // Hot reload: None closes even the IP rule's destination; All passes anything.
    world.set_mode("None").await;
    assert_eq!(round_trip(world.dial(echo.addr).await).await, "");
    assert!(https_get(&connector, world.dial(tls_dst).await, "tls.test").await.is_err());
    world.set_mode("All").await;
    assert_eq!(round_trip(world.dial(not_listed.addr).await).await, "unlisted\nping<eof>");
    assert_eq!(round_trip(TcpStream::connect(outbound).await.unwrap()).await, "mes\nping<eof>");

    let metrics = mesh_egress::metrics::metrics().encode();
    for series in [
        r#"mesh_egress_passthrough_total{unit="connection",decision="allowed",reason="address"}"#,
        r#"mesh_egress_passthrough_total{unit="connection",decision="allowed",reason="sni"}"#,
        r#"mesh_egress_passthrough_total{unit="connection",decision="denied",reason="no_match"}"#,
        r#"mesh_egress_passthrough_total{unit="connection",decision="denied",reason="mode_none"}"#,
        r#"mesh_egress_passthrough_total{unit="connection",decision="allowed",reason="mode_all"}"#,
        r#"mesh_egress_passthrough_total{unit="request",decision="allowed",reason="host"}"#,
        r#"mesh_egress_passthrough_total{unit="request",decision="denied",reason="no_match"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
}

/// h2c with prior knowledge: each stream is decided by its `:authority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_decided_by_authority() {
    let dns = dns_server(30).await;
    dns.set("web.test", ALLOWED);
    let web = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let policy = format!(
        "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    appendMatch:\n      - {{type: Domain, value: web.test, port: {}, protocol: http2}}\n",
        web.addr.port()
    );
    let (_dir, config) = config_dir(&policy);
    let mut opts = options(config);
    opts.upstream.resolver = ResolverSource::new(vec![dns.addr]);
    let (proxy, injected) = start_transparent(opts).await;
    let stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    for (authority, status) in [("web.test", 200), ("evil.test", 503), ("web.test", 200)] {
        let uri = format!("http://{authority}:{}/h2", web.addr.port());
        let req = http::Request::get(uri).body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap();
        let response = sender.send_request(req).await.unwrap();
        assert_eq!(response.status(), status, "{authority}");
    }
}

/// A passthrough connection has its access-log line (service `passthrough`, as Kuma's
/// passthrough cluster), with the bytes it moved and the endpoint it went to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_connections_are_in_the_access_log() {
    use mesh_egress::access_log::{AccessLog, Destination, Format};
    let echo = echo_server("127.0.0.4:0".parse().unwrap(), "echo").await;
    let policy = "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default: {passthroughMode: All}\n";
    let (dir, config) = config_dir(policy);
    let log = dir.path().join("access.log");
    let mut opts = options(config);
    opts.access_log = Some(AccessLog::start(Destination::File(log.clone()), Format::Json).unwrap());
    let (proxy, injected) = start_transparent(opts).await;
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), echo.addr).await;
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut stream).await, "echo\nping<eof>");
    let line = &wait_for_json_lines(&log, 1).await[0];
    assert_eq!(line["service"], "passthrough");
    assert_eq!(line["endpoint"], echo.addr.to_string());
    assert_eq!(line["outcome"], "closed");
    assert_eq!(line["bytes_sent"], 4);
}

/// A bare `*` Domain rule allows an address as Host too, IPv6 in brackets included: the request
/// goes to that address (a Host of `[::1]` was looked up in DNS with its brackets, and got 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_as_host_goes_to_that_address() {
    let v6 = http_upstream_on("[::1]:0".parse().unwrap(), None).await;
    let v4 = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let rule = |port: u16| format!("      - {{type: Domain, value: '*', port: {port}, protocol: http}}\n");
    let policy = format!(
        "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    appendMatch:\n{}{}",
        rule(v6.addr.port()),
        rule(v4.addr.port())
    );
    let (_dir, config) = config_dir(&policy);
    let opts = options(config);
    let (proxy, injected) = start_transparent(opts).await;
    for upstream in [&v6, &v4] {
        let stream = injected.connect(proxy.transparent_addr().unwrap(), upstream.addr).await;
        let responses = http1(stream, &[(&upstream.addr.to_string(), "/literal")]).await;
        assert!(responses[0].0.contains(" 200 ") && responses[0].1.contains("path: /literal"), "{responses:?}");
    }
}

/// A proxy whose MeshPassthrough allows `web.test` (HTTP, any port), which a DNS server of the
/// test's own resolves to a web upstream on [`ALLOWED`], with a JSON `--access-log`.
struct LoggedWeb {
    web: common::http_upstream::HttpUpstream,
    log: std::path::PathBuf,
    proxy: Server,
    injected: Arc<InjectedOriginalDst>,
    _dns: DnsServer,
    _dir: tempfile::TempDir,
}

async fn logged_web() -> LoggedWeb {
    use mesh_egress::access_log::{AccessLog, Destination, Format};
    let dns = dns_server(30).await;
    dns.set("web.test", ALLOWED);
    let web = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let policy = "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    passthroughMode: Matched\n    appendMatch:\n      - {type: Domain, value: web.test, protocol: http}\n";
    let (dir, config) = config_dir(policy);
    let log = dir.path().join("access.log");
    let mut opts = options(config);
    opts.upstream.resolver = ResolverSource::new(vec![dns.addr]);
    opts.access_log = Some(AccessLog::start(Destination::File(log.clone()), Format::Json).unwrap());
    let (proxy, injected) = start_transparent(opts).await;
    LoggedWeb { web, log, proxy, injected, _dns: dns, _dir: dir }
}

/// Passthrough HTTP requests have their lines in `--access-log` (service `passthrough`): the
/// allowed one with its endpoint, the one no rule allows as the proxy's own 503, the one the
/// application gave up on as `cancelled`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_http_requests_are_in_the_access_log() {
    let LoggedWeb { web, log, proxy, injected, _dns, _dir } = logged_web().await;
    let stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    let responses = http1(stream, &[("web.test", "/allowed"), ("other.test", "/denied")]).await;
    assert!(responses[0].0.contains(" 200 ") && responses[1].0.contains(" 503 "), "{responses:?}");
    let mut gone = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    gone.write_all(b"GET /gone HTTP/1.1\r\nHost: web.test\r\nx-delay-ms: 3000\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);
    let lines = wait_for_json_lines(&log, 3).await;
    assert_eq!(lines[0]["service"], "passthrough");
    assert_eq!(lines[0]["request"], "GET /allowed");
    assert_eq!((lines[0]["status"].as_u64(), lines[0]["outcome"].as_str()), (Some(200), Some("ok")));
    assert_eq!(lines[0]["endpoint"], web.addr.to_string());
    assert_eq!(lines[1]["request"], "GET /denied");
    assert_eq!((lines[1]["status"].as_u64(), lines[1]["outcome"].as_str()), (Some(503), Some("local_reply")));
    assert_eq!(lines[1]["endpoint"], serde_json::Value::Null);
    assert_eq!(lines[2]["request"], "GET /gone");
    assert_eq!((lines[2]["status"].as_u64(), lines[2]["outcome"].as_str()), (None, Some("cancelled")));
}

/// A passthrough request's line carries its body bytes both ways and how its response ended,
/// and a failure names what failed as a service's does (Envoy's flags): UF no connection, UC
/// the connection ended before the response, UPE a response that broke the protocol (502),
/// `upstream_reset` a body cut short. Before, every
/// line had 0 bytes and `ok`, and every failure UF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_lines_carry_body_bytes_and_what_failed() {
    let LoggedWeb { web, log, proxy, injected, _dns, _dir } = logged_web().await;
    let refusing = std::net::TcpListener::bind(SocketAddr::new(ALLOWED.into(), 0)).unwrap().local_addr().unwrap();
    // A destination whose response head gives two lengths: 502, UPE.
    let folding = tokio::net::TcpListener::bind(SocketAddr::new(ALLOWED.into(), 0)).await.unwrap();
    let folded = folding.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = folding.accept().await {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok").await;
        }
    });
    let requests = [
        (web.addr, "POST /upload", "content-length: 5\r\n\r\nhello"),
        (web.addr, "GET /sized", "x-size: 1000\r\n\r\n"),
        (web.addr, "HEAD /head", "x-size: 1000\r\n\r\n"),
        (web.addr, "GET /none", "x-status: 204\r\n\r\n"),
        (web.addr, "GET /before", "x-reset: before\r\n\r\n"),
        (web.addr, "GET /mid", "x-reset: mid\r\n\r\n"),
        (refusing, "GET /refused", "\r\n"),
        (folded, "GET /folded", "\r\n"),
    ];
    for (dst, request, rest) in requests {
        let mut stream = injected.connect(proxy.transparent_addr().unwrap(), dst).await;
        let head = format!("{request} HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n{rest}");
        stream.write_all(head.as_bytes()).await.unwrap();
        read_all(&mut stream).await;
    }
    let lines = wait_for_json_lines(&log, 8).await;
    let line = |request: &str| {
        lines.iter().find(|l| l["request"] == request).unwrap_or_else(|| panic!("{request}: {lines:?}"))
    };
    let summary = |request: &str| {
        let l = line(request);
        let text = |field: &str| l[field].as_str().unwrap_or("?").to_string();
        (
            l["status"].as_u64(),
            text("outcome"),
            text("response_flags"),
            l["bytes_sent"].as_u64(),
            l["bytes_received"].as_u64(),
        )
    };
    let (ok, local_reply) = ("ok".to_string(), "local_reply".to_string());
    let answer = "received: 5\n".len() as u64;
    assert_eq!(summary("POST /upload"), (Some(200), ok.clone(), "-".into(), Some(5), Some(answer)));
    assert_eq!(summary("GET /sized"), (Some(200), ok.clone(), "-".into(), Some(0), Some(1000)));
    // A body that has ended with its head is never polled: `ok`, not `aborted`.
    assert_eq!(summary("HEAD /head"), (Some(200), ok.clone(), "-".into(), Some(0), Some(0)));
    assert_eq!(summary("GET /none"), (Some(204), ok.clone(), "-".into(), Some(0), Some(0)));
    assert_eq!(summary("GET /mid"), (Some(200), "upstream_reset".into(), "UC".into(), Some(0), Some(1000)));
    assert_eq!(summary("GET /before"), (Some(503), local_reply.clone(), "UC".into(), Some(0), Some(0)));
    assert_eq!(summary("GET /refused"), (Some(503), local_reply.clone(), "UF".into(), Some(0), Some(0)));
    assert_eq!(summary("GET /folded"), (Some(502), local_reply, "UPE".into(), Some(0), Some(0)));
}

/// A passthrough request is held to `--request-timeout`, as a service's (Envoy's 15 s route
/// timeout on Kuma's passthrough routes): a destination that does not answer gets a 504, where
/// the request waited for as long as the connection's idle bound (an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_request_is_held_to_the_request_timeout() {
    let web = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let policy = format!(
        "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    appendMatch:\n      - {{type: Domain, value: '*', port: {}, protocol: http}}\n",
        web.addr.port()
    );
    let (_dir, config) = config_dir(&policy);
    let mut opts = options(config);
    opts.request_timeout = Some(Duration::from_secs(1));
    let (proxy, injected) = start_transparent(opts).await;
    let host = web.addr.to_string();
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    let request = format!("GET /slow HTTP/1.1\r\nHost: {host}\r\nx-delay-ms: 30000\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_all(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer:?}");
    let stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    let responses = http1(stream, &[(&host, "/quick")]).await;
    assert!(responses[0].0.contains(" 200 "), "{responses:?}");
}

/// MeshAccessLog `to: Mesh` items log passthrough traffic too, as Kuma configures them on its
/// passthrough listeners: destination service `external`; HTTP requests with their path,
/// status, flags and the headers the format reads; TCP connections, and by default Kuma's TCP
/// format. Before, only `--access-log` logged passthrough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_access_log_logs_passthrough_traffic() {
    let dns = dns_server(30).await;
    dns.set("web.test", ALLOWED);
    let web = http_upstream_on(SocketAddr::new(ALLOWED.into(), 0), None).await;
    let echo = echo_server("127.0.0.4:0".parse().unwrap(), "echo").await;
    let logs = tempfile::tempdir().unwrap();
    let (plain, default) = (logs.path().join("plain.log"), logs.path().join("default.log"));
    let yaml = format!(
        "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    passthroughMode: Matched\n    appendMatch:\n      - {{type: Domain, value: web.test, protocol: http}}\n      - {{type: IP, value: 127.0.0.4, protocol: tcp}}\n---\ntype: MeshAccessLog\nname: all\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default:\n      backends:\n      - {{type: File, file: {{path: {}, format: {{type: Plain, plain: '%KUMA_DESTINATION_SERVICE% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(X-TAG)% %RESP(X-UPSTREAM-CONN)% %BYTES_RECEIVED%'}}}}}}\n      - {{type: File, file: {{path: {}}}}}\n",
        plain.display(),
        default.display()
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.upstream.resolver = ResolverSource::new(vec![dns.addr]);
    let (proxy, injected) = start_transparent(opts).await;
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    let request = "GET /logged HTTP/1.1\r\nHost: web.test\r\nx-tag: t1\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    assert!(read_all(&mut stream).await.starts_with("HTTP/1.1 200"));
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), web.addr).await;
    stream.write_all(b"GET /denied HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n").await.unwrap();
    assert!(read_all(&mut stream).await.starts_with("HTTP/1.1 503"));
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), echo.addr).await;
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    assert_eq!(read_all(&mut stream).await, "echo\nping<eof>");

    let plain = wait_for_lines(&plain, 3).await;
    assert_eq!(plain[0], "external /logged 200 - t1 1 0", "{plain:?}");
    assert_eq!(plain[1], "external /denied 503 NR - - 0", "{plain:?}");
    assert_eq!(plain[2], "external - 0 - - - 4", "{plain:?}");
    let tcp = &wait_for_lines(&default, 3).await[2];
    assert!(tcp.contains(&format!("->{}(external) took ", echo.addr)) && tcp.ends_with("received: 4 bytes"), "{tcp}");
}
