//! The reload path, exactly: what the log and `mesh_egress_config_reloads_total` say is what
//! runs; listeners are bound before the swap and retired after it; a rejected configuration
//! assigns no VIPs; a new system CA file is used; DNS is answered while a large configuration
//! compiles; upgraded tunnels hold a drain open.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::pki::{tls_server, Ca, ServerSpec};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn failed_reloads() -> u64 {
    let text = mesh_egress::metrics::metrics().encode();
    text.lines()
        .find_map(|l| l.strip_prefix("mesh_egress_config_reloads_total{result=\"failure\"} "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn tcp_service(name: &str, outbound: SocketAddr, port: u16) -> String {
    service_with_outbound(name, outbound, &endpoint("127.0.0.1", port, 0), "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_listener_cannot_be_bound_changes_nothing() {
    let (a, b) = (
        echo_server("127.0.0.1:0".parse().unwrap(), "a").await,
        echo_server("127.0.0.1:0".parse().unwrap(), "b").await,
    );
    let first = free_addr("127.0.0.1");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let (_dir, config) = config_dir(&tcp_service("one", first, a.addr.port()));
    let mut proxy = start(options(config.clone())).await;
    assert_eq!(greet(first).await.unwrap().0, "a");

    // The service moves to endpoint "b", and a second one wants an address already in use.
    std::fs::write(
        &config,
        format!("{}---\n{}", tcp_service("one", first, b.addr.port()), tcp_service("two", taken_addr, b.addr.port())),
    )
    .unwrap();
    let failures = failed_reloads();
    let err = proxy.reload().await.unwrap_err().to_string();
    assert!(err.contains(&format!("cannot listen on {taken_addr}")), "{err}");
    // At least: the counter is the process's, and other tests here fail reloads too.
    assert!(failed_reloads() > failures, "counted as a failed reload");
    assert_eq!(greet(first).await.unwrap().0, "a", "the running configuration stays whole");
    assert_eq!(proxy.live().load().catalog.services().len(), 1);

    drop(taken);
    proxy.reload().await.unwrap();
    assert_eq!(greet(first).await.unwrap().0, "b");
    assert_eq!(greet(taken_addr).await.unwrap().0, "b");
}

/// A connection queued on a listener (connected, not yet accepted) survives a reload that
/// changes the listener's kind at the same address: the socket stays open.
#[tokio::test(flavor = "current_thread")]
async fn a_listener_changing_kind_keeps_its_queued_connections() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let addr = free_addr("127.0.0.1");
    let outbound = tcp_service("svc", addr, echo.addr.port());
    // The same service reached by its VIP 127.0.0.1:<port> instead of a Dataplane outbound.
    let vip = format!(
        "type: MeshExternalService\nname: svc\nmesh: default\nspec:\n  match: {{port: {}, protocol: tcp}}\n  endpoints:\n{}status:\n  vip:\n    ip: 127.0.0.1\n",
        addr.port(),
        endpoint("127.0.0.1", echo.addr.port(), 0)
    );
    let (_dir, config) = config_dir(&outbound);
    let mut opts = options(config.clone());
    opts.bind_vips = true;
    let mut proxy = start(opts).await;
    // On this single-threaded runtime the accept loop cannot run before the reload starts.
    let queued = std::net::TcpStream::connect(addr).unwrap();
    std::fs::write(&config, &vip).unwrap();
    proxy.reload().await.unwrap();
    queued.set_nonblocking(true).unwrap();
    let (greeting, _) = greet_stream(TcpStream::from_std(queued).unwrap()).await;
    assert_eq!(greeting, "echo", "the queued connection was served");
    assert_eq!(greet(addr).await.unwrap().0, "echo", "and the listener routes as a VIP listener now");
}

async fn greet_stream(mut stream: TcpStream) -> (String, TcpStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await.unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    (String::from_utf8_lossy(&line).into_owned(), stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_configuration_assigns_no_vips() {
    let mes = |name: &str| {
        format!("type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: 80}}\n  endpoints: [{{address: 10.0.0.1, port: 80}}]\n---\n")
    };
    let state = tempfile::tempdir().unwrap();
    let (_dir, config) = config_dir(&mes("a"));
    let mut opts = options(config.clone());
    opts.state_dir = Some(state.path().to_path_buf());
    let mut proxy = start(opts).await;
    let invalid = "type: MeshExternalService\nname: bad\nspec:\n  match: {port: 0}\n";
    std::fs::write(&config, format!("{}{}{invalid}", mes("a"), mes("b"))).unwrap();
    proxy.reload().await.unwrap_err();
    std::fs::write(&config, format!("{}{}", mes("a"), mes("c"))).unwrap();
    proxy.reload().await.unwrap();
    let live = proxy.live().load();
    let vip = |name: &str| live.catalog.services().iter().find(|s| s.name == name).and_then(|s| s.vip);
    assert_eq!(vip("c"), Some("242.0.0.2".parse().unwrap()), "b's rejected configuration took no address");
    let saved = std::fs::read_to_string(state.path().join("vips.json")).unwrap();
    assert!(!saved.contains("default/b"), "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_system_ca_file_takes_effect_on_the_next_reload() {
    let (first_ca, second_ca) = (Ca::new("first-root"), Ca::new("second-root"));
    let server = tls_server(ServerSpec::new(&first_ca.server(&["tcpbin.test"]))).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("roots.pem");
    std::fs::write(&ca_file, &first_ca.pem).unwrap();
    let outbound = free_addr("127.0.0.1");
    let tls = "  tls:\n    enabled: true\n    verification:\n      serverName: tcpbin.test\n";
    let service =
        |tls: &str| service_with_outbound("sys", outbound, &endpoint("127.0.0.1", server.addr.port(), 0), tls);
    let (_cfg, config) = config_dir(&service(tls));
    let mut opts = options(config.clone());
    opts.compile.system_ca_file = Some(ca_file.clone());
    let mut proxy = start(opts).await;
    let exchange = || async {
        let mut s = TcpStream::connect(outbound).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    };
    assert_eq!(exchange().await, "hello Some(TLSv1_3)\nping", "trusted by the first file");
    std::fs::write(&ca_file, &second_ca.pem).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(exchange().await, "", "the server's CA is no longer in the system roots");
    std::fs::write(&ca_file, &first_ca.pem).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(exchange().await, "hello Some(TLSv1_3)\nping");
    // Unreadable at a reload (rotated, half written): the roots read before stay in force.
    std::fs::remove_file(&ca_file).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(exchange().await, "hello Some(TLSv1_3)\nping", "a missing CA file broke the service");
    std::fs::write(&ca_file, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(exchange().await, "hello Some(TLSv1_3)\nping", "a garbled CA file broke the service");
    // A TLS client made anew meanwhile (its settings changed) trusts those roots too.
    std::fs::write(&config, service(&format!("{tls}    version:\n      max: TLS12\n"))).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(exchange().await, "hello Some(TLSv1_2)\nping", "a changed service broke without the CA file");
}

/// A query for `name`, answered or not within 10 s; true when an answer came.
fn query(dns: SocketAddr, name: &str) -> bool {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut message = Message::new();
    message
        .set_id(7)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket.send_to(&message.to_vec().unwrap(), dns).unwrap();
    let mut buf = [0u8; 512];
    socket.recv_from(&mut buf).is_ok()
}

/// The control thread that compiles reloads also serves DNS: a query sent while 10,000
/// services compile is answered before the reload ends.
#[tokio::test(flavor = "current_thread")]
async fn dns_is_answered_while_a_large_configuration_reloads() {
    let mes = |i: usize| {
        format!("type: MeshExternalService\nname: s{i}\nspec:\n  match: {{port: 80}}\n  endpoints: [{{address: 10.0.0.1, port: 80}}]\n---\n")
    };
    let (_dir, config) = config_dir(&mes(0));
    let mut opts = options(config.clone());
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    let mut proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    let before = tokio::task::spawn_blocking(move || query(dns, "s0.extsvc.mesh.local")).await.unwrap();
    assert!(before, "answered before the reload");
    std::fs::write(&config, (0..10_000).map(mes).collect::<String>()).unwrap();
    let (started, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let client = {
        let (started, done) = (started.clone(), done.clone());
        std::thread::spawn(move || {
            while !started.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            let answered = query(dns, "s0.extsvc.mesh.local");
            (answered, done.load(Ordering::SeqCst))
        })
    };
    started.store(true, Ordering::SeqCst);
    proxy.reload().await.unwrap();
    done.store(true, Ordering::SeqCst);
    let (answered, after_reload) = tokio::task::spawn_blocking(move || client.join().unwrap()).await.unwrap();
    assert!(answered, "the query was answered");
    assert!(!after_reload, "the answer came while the reload was compiling, not after it");
    assert_eq!(proxy.live().load().catalog.services().len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_upgraded_tunnels() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("ws", "http", upstream.addr.port());
    let mut proxy = start(options(config)).await;
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await.expect("a response head");
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    let left = proxy.drain(Duration::from_millis(300)).await;
    assert_eq!(left, 1, "the tunnel is an open connection the drain waited for");
    s.write_all(b"still here").await.unwrap();
    let mut echo = [0u8; 10];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still here", "and it kept working while the drain waited");
}

/// A listener a reload adds accepts only once the reload's configuration is in force: a client
/// that connects to the new address as soon as it can (here while 10,000 other services are
/// set up) is served, where it was accepted and closed for want of a service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listener_serves_its_first_connection() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "new").await;
    let mes = |i: usize| {
        format!("type: MeshExternalService\nname: s{i}\nspec:\n  match: {{port: 80}}\n  endpoints: [{{address: 10.0.0.1, port: 80}}]\n---\n")
    };
    let (_dir, config) = config_dir(&mes(0));
    let mut proxy = start(options(config.clone())).await;
    // An address of its own: no other test's listener or connection is ever there.
    let added = free_addr("127.0.8.1");
    let mut text: String = (0..10_000).map(mes).collect();
    text.push_str(&tcp_service("added", added, echo.addr.port()));
    std::fs::write(&config, text).unwrap();
    let first = std::thread::spawn(move || loop {
        if let Ok(stream) = std::net::TcpStream::connect(added) {
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut greeting = [0u8; 4];
            return std::io::Read::read_exact(&mut &stream, &mut greeting).map(|()| greeting.to_vec());
        }
        std::thread::yield_now();
    });
    proxy.reload().await.unwrap();
    let greeting = tokio::task::spawn_blocking(move || first.join().unwrap()).await.unwrap();
    assert_eq!(greeting.expect("the first connection was closed unserved"), b"new\n");
}

/// The IPv6 loopback twins of the transparent listener and the DNS proxy (for
/// `transparent-proxy install --ipv6`) are best effort: a port something else holds on `[::1]`
/// does not keep the proxy from starting (it did: the twin's bind failed start-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_ipv6_loopback_port_does_not_stop_the_proxy() {
    let Ok(probe) = std::net::UdpSocket::bind("[::1]:0") else {
        panic!("this test needs IPv6 on loopback (::1)");
    };
    drop(probe);
    let (transparent, dns) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let _taken_tcp = std::net::TcpListener::bind(("::1", transparent.port())).unwrap();
    let _taken_udp = std::net::UdpSocket::bind(("::1", dns.port())).unwrap();
    let (_dir, config) = config_dir("");
    let mut opts = options(config);
    opts.transparent = Some(transparent);
    opts.dns = Some(dns);
    opts.dns_forwarders = vec!["127.0.0.1:9".parse().unwrap()]; // never the machine's resolver
    let proxy = mesh_egress::server::Server::start(opts, Arc::new(mesh_egress::listen::SoOriginalDst)).await;
    let proxy = proxy.unwrap_or_else(|e| panic!("the proxy did not start: {e}"));
    assert_eq!(proxy.transparent_addr(), Some(transparent));
    assert_eq!(proxy.dns_addr(), Some(dns));
}

/// A reload that would take a working service out of traffic (its CA secret gone mid-rotation,
/// a certificate pasted wrong) is refused, naming the service, and the running configuration
/// stays, as Envoy keeps a cluster whose update it rejects (the service was broken). A service
/// new in the same file and broken from the start is no reason to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_would_break_a_working_service_keeps_the_running_one() {
    let ca = Ca::new("reload-keeps");
    let inline =
        format!("        inlineString: |\n{}", ca.pem.lines().map(|l| format!("          {l}\n")).collect::<String>());
    let tls = |ca_cert: &str| format!("  tls:\n    enabled: true\n    verification:\n      caCert:\n{ca_cert}");
    let service = |name: &str, ca_cert: &str| {
        service_with_outbound(name, free_addr("127.0.0.1"), &endpoint("127.0.0.1", 9, 0), &tls(ca_cert))
    };
    let (_dir, config) = config_dir(&service("pinned", &inline));
    let mut proxy = start(options(config.clone())).await;
    std::fs::write(&config, service("pinned", "        secret: rotated-away\n")).unwrap();
    let error = proxy.reload().await.unwrap_err().to_string();
    assert!(
        error.contains("would take working services out of traffic")
            && error.contains(&format!("{}:1: default/pinned: ", config.display())),
        "the file and line, the service and why: {error}"
    );
    let snapshot = proxy.live().load();
    assert!(snapshot.catalog.services()[0].broken.is_none(), "the running configuration stays");
    let both =
        format!("{}---\n{}", service("pinned", &inline), service("new-and-broken", "        secret: never-there\n"));
    std::fs::write(&config, both).unwrap();
    proxy.reload().await.unwrap();
    assert_eq!(proxy.live().load().catalog.services().len(), 2);
}
