//! TCP services end to end through the in-process proxy: every listener kind, half-close,
//! DNS, unix sockets, failover, priorities, passthrough and forbid.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `ping`, half-closes, and reads everything back: greeting, echo and the upstream's
/// `<eof>` marker, which it only writes after it saw our FIN.
async fn round_trip(mut stream: TcpStream) -> String {
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_listener_round_trip_with_half_close() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "up").await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_outbound("echo", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let reply = round_trip(TcpStream::connect(outbound).await.unwrap()).await;
    assert_eq!(reply, "up\nping<eof>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_listener_round_trip() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "vip-up").await;
    // A loopback VIP (given as status.vip.ip) needs no route or privileges.
    let yaml = format!(
        "type: MeshExternalService\nname: v\nspec:\n  match: {{port: {}}}\n  endpoints: [{{address: 127.0.0.1, port: {}}}]\nstatus:\n  vip: {{ip: 127.0.0.77}}\n",
        free_addr("127.0.0.77").port(),
        upstream.addr.port()
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.bind_vips = true;
    let proxy = start(opts).await;
    let (vip, _) = proxy.live().load().catalog.vip_listeners().map(|(a, s)| (a, s.name.clone())).next().unwrap();
    assert_eq!(vip.ip().to_string(), "127.0.0.77");
    assert_eq!(round_trip(TcpStream::connect(vip).await.unwrap()).await, "vip-up\nping<eof>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_listener_routes_by_original_destination_and_passes_unknown_through() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "svc").await;
    let elsewhere = echo_server("127.0.0.1:0".parse().unwrap(), "elsewhere").await;
    let yaml = format!(
        "type: MeshExternalService\nname: t\nspec:\n  match: {{port: 9000}}\n  endpoints: [{{address: 127.0.0.1, port: {}}}]\nstatus:\n  vip: {{ip: 242.0.0.9}}\n",
        upstream.addr.port()
    );
    let (_dir, config) = config_dir(&yaml);
    let opts = options(config);
    let (proxy, injected) = start_transparent(opts).await;
    let listener = proxy.transparent_addr().unwrap();

    let vip: SocketAddr = "242.0.0.9:9000".parse().unwrap();
    assert_eq!(round_trip(injected.connect(listener, vip).await).await, "svc\nping<eof>");
    // Not a VIP:port: passed through to where the application was going.
    assert_eq!(round_trip(injected.connect(listener, elsewhere.addr).await).await, "elsewhere\nping<eof>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_can_be_switched_off() {
    let elsewhere = echo_server("127.0.0.1:0".parse().unwrap(), "elsewhere").await;
    let (_dir, config) = config_dir("type: Mesh\nname: default\n");
    let mut opts = options(config);
    opts.passthrough = false;
    let (proxy, injected) = start_transparent(opts).await;
    let mut stream = injected.connect(proxy.transparent_addr().unwrap(), elsewhere.addr).await;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    assert!(buf.is_empty(), "closed without reaching the destination, got {buf:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_mesh_closes_at_once() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "up").await;
    let outbound = free_addr("127.0.0.1");
    let yaml = format!(
        "type: Mesh\nname: default\nrouting:\n  defaultForbidMeshExternalServiceAccess: true\n---\n{}",
        service_with_outbound("echo", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let mut stream = TcpStream::connect(outbound).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    assert!(buf.is_empty(), "the upstream's greeting must not arrive, got {buf:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("up.sock");
    let _server = unix_echo_server(&socket, "unix").await;
    let outbound = free_addr("127.0.0.1");
    let ep = format!("    - address: unix://{}\n", socket.display());
    let (_cfg, config) = config_dir(&service_with_outbound("u", outbound, &ep, ""));
    let _proxy = start(options(config)).await;
    assert_eq!(round_trip(TcpStream::connect(outbound).await.unwrap()).await, "unix\nping<eof>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoint_is_retried_on_the_other_one() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "alive").await;
    let dead = dead_addr();
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.9.1", dead.port(), 0), endpoint("127.0.0.1", upstream.addr.port(), 0));
    let (_dir, config) = config_dir(&service_with_outbound("f", outbound, &endpoints, ""));
    let _proxy = start(options(config)).await;
    for i in 0..20 {
        let (greeting, _) = greet(outbound).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(greeting, "alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_levels_fail_over_and_back() {
    // Down until the test starts it, on an address of its own: nothing else comes up there.
    let primary_addr = free_addr("127.0.9.2");
    let secondary = echo_server("127.0.0.1:0".parse().unwrap(), "secondary").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.9.2", primary_addr.port(), 0), endpoint("127.0.0.1", secondary.addr.port(), 1));
    let (_dir, config) = config_dir(&service_with_outbound("p", outbound, &endpoints, ""));
    let _proxy = start(options(config)).await;

    // Primary level is down: every connection still succeeds, on the secondary level.
    for _ in 0..10 {
        assert_eq!(greet(outbound).await.unwrap().0, "secondary");
    }
    // Primary comes back: once its ejection lapses, traffic returns to it.
    let primary = echo_server(primary_addr, "primary").await;
    eventually("traffic fails back to priority 0", Duration::from_secs(30), || async {
        greet(outbound).await.is_ok_and(|(g, _)| g == "primary")
    })
    .await;
    for _ in 0..10 {
        assert_eq!(greet(outbound).await.unwrap().0, "primary");
    }
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoint_follows_address_changes_after_the_ttl() {
    let dns = dns_server(1).await;
    let port = free_addr("127.0.0.2").port();
    let first = echo_server(format!("127.0.0.2:{port}").parse().unwrap(), "first").await;
    let second = echo_server(format!("127.0.0.3:{port}").parse().unwrap(), "second").await;
    dns.set("echo.test", "127.0.0.2".parse().unwrap());
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) = config_dir(&service_with_outbound("d", outbound, &endpoint("echo.test", port, 0), ""));
    let mut opts = options(config);
    opts.upstream.resolver = mesh_egress::upstream::ResolverSource::new(vec![dns.addr]);
    let _proxy = start(opts).await;

    assert_eq!(greet(outbound).await.unwrap().0, "first");
    dns.set("echo.test", "127.0.0.3".parse().unwrap());
    // Re-resolved at the TTL (1 s, floored to 5 s): new connections reach the new address.
    eventually("the new DNS answer is used", Duration::from_secs(30), || async {
        greet(outbound).await.is_ok_and(|(g, _)| g == "second")
    })
    .await;
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_keeps_the_last_good_answer() {
    let dns = dns_server(1).await;
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "kept").await;
    dns.set("kept.test", "127.0.0.1".parse().unwrap());
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_outbound("k", outbound, &endpoint("kept.test", upstream.addr.port(), 0), ""));
    let mut opts = options(config);
    opts.upstream.resolver = mesh_egress::upstream::ResolverSource::new(vec![dns.addr]);
    let _proxy = start(opts).await;
    assert_eq!(greet(outbound).await.unwrap().0, "kept");
    let asked = dns.queries.load(std::sync::atomic::Ordering::Relaxed);
    drop(dns); // the resolver is gone: lookups time out from now on
    tokio::time::sleep(Duration::from_secs(7)).await; // past the refresh time
    assert!(asked >= 1);
    assert_eq!(greet(outbound).await.unwrap().0, "kept");
}

/// Passthrough never goes to the proxy itself (its admin server, DNS proxy, outbounds: a loop
/// through the proxy) nor to a VIP no service has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_refuses_the_proxys_own_listeners() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let (outbound, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let (_dir, config) =
        config_dir(&service_with_outbound("own", outbound, &endpoint("127.0.0.1", echo.addr.port(), 0), ""));
    let mut opts = options(config);
    opts.admin = Some(admin);
    let (proxy, injected) = start_transparent(opts).await;
    let listener = proxy.transparent_addr().unwrap();
    for dst in [outbound, admin] {
        let mut stream = injected.connect(listener, dst).await;
        stream.write_all(b"GET /ready HTTP/1.0\r\n\r\n").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
        assert!(buf.is_empty(), "{dst}: closed without reaching it, got {:?}", String::from_utf8_lossy(&buf));
    }
    // Elsewhere still works.
    assert_eq!(round_trip(injected.connect(listener, echo.addr).await).await, "echo\nping<eof>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_flow_is_spliced_whole_both_ways() {
    let upstream = echo_server("127.0.0.1:0".parse().unwrap(), "bulk").await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_outbound("bulk", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 241) as u8).collect();
    let (mut read, mut write) = TcpStream::connect(outbound).await.unwrap().into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut reply = Vec::new();
    read.read_to_end(&mut reply).await.unwrap();
    writer.await.unwrap();
    assert!(reply == [&b"bulk\n"[..], &data, b"<eof>"].concat(), "the echo comes back whole and in order");
    // The flow's metrics are counted when it ends, just after the proxy's last write.
    let spliced = async {
        loop {
            let text = mesh_egress::metrics::metrics().encode();
            let line =
                text.lines().find(|l| l.starts_with("mesh_egress_upstream_bytes_spliced_total{") && l.contains("bulk"));
            if let Some(value) = line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse::<f64>().ok()) {
                if value > 0.0 {
                    return value;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let spliced = tokio::time::timeout(Duration::from_secs(10), spliced).await.expect("no spliced bytes counted");
    // Both ways, after the first few reads of each through the buffers.
    assert!(spliced > 14_000_000.0, "{spliced}");
}
