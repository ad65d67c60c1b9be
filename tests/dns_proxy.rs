//! The DNS proxy in-process, queried by `dig` (a client no one here wrote) over UDP and TCP:
//! generated names, AAAA, forwarding to a DNS server of the test's own, SERVFAIL, and a
//! configuration change visible in the next answer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::*;

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .args([&format!("@{}", server.ip()), "-p", &server.port().to_string(), "+time=6", "+tries=1"])
        .args(args)
        .output()
        .expect("dig must be installed (.ci/run installs dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(answer: &str) -> &str {
    answer.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("?")
}

fn mes(name: &str) -> String {
    format!("type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: 443}}\n  endpoints: [{{address: 10.0.0.1, port: 443}}]\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_dns_proxy() {
    let upstream_dns = dns_server(60).await;
    upstream_dns.set("elsewhere.test", "192.0.2.7".parse().unwrap());
    let (dir, config) = config_dir(&mes("httpbin"));
    let mut opts = options(config.clone());
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    opts.dns_forwarders = vec![upstream_dns.addr];
    let mut proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();

    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || dig(dns, &args.iter().map(String::as_str).collect::<Vec<_>>()))
    };
    let a = run(vec!["HTTPBIN.extsvc.mesh.local".into(), "A".into()]).await.unwrap();
    assert_eq!(status(&a), "NOERROR", "{a}");
    assert!(a.contains("flags: qr aa"), "authoritative:\n{a}");
    assert!(a.contains("HTTPBIN.extsvc.mesh.local. 30\tIN\tA\t242.0.0.1"), "{a}");
    let tcp = run(vec!["httpbin.extsvc.mesh.local".into(), "A".into(), "+tcp".into(), "+short".into()]).await.unwrap();
    assert_eq!(tcp.trim(), "242.0.0.1");
    let aaaa = run(vec!["httpbin.extsvc.mesh.local".into(), "AAAA".into()]).await.unwrap();
    assert_eq!(status(&aaaa), "NOERROR");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");

    // Unknown names are forwarded; a name nobody knows comes back as the resolver said.
    let forwarded = run(vec!["elsewhere.test".into(), "A".into(), "+short".into()]).await.unwrap();
    assert_eq!(forwarded.trim(), "192.0.2.7");
    let forwarded_tcp = run(vec!["elsewhere.test".into(), "A".into(), "+tcp".into()]).await.unwrap();
    assert_eq!(status(&forwarded_tcp), "SERVFAIL", "the test DNS server speaks UDP only:\n{forwarded_tcp}");
    let nx = run(vec!["nobody.test".into(), "A".into()]).await.unwrap();
    assert_eq!(status(&nx), "NXDOMAIN", "{nx}");

    // A configuration change is in the next answer.
    std::fs::write(&config, format!("{}---\n{}", mes("httpbin"), mes("new-one"))).unwrap();
    proxy.reload().await.unwrap();
    let new = run(vec!["new-one.extsvc.mesh.local".into(), "+short".into()]).await.unwrap();
    assert_eq!(new.trim(), "242.0.0.2");

    // The resolver goes away: SERVFAIL, and the proxy keeps answering.
    drop(upstream_dns);
    let failed = run(vec!["elsewhere.test".into(), "A".into()]).await.unwrap();
    assert_eq!(status(&failed), "SERVFAIL", "{failed}");
    let still = run(vec!["httpbin.extsvc.mesh.local".into(), "+short".into()]).await.unwrap();
    assert_eq!(still.trim(), "242.0.0.1");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_do_not_stop_the_server() {
    let (_dir, config) = config_dir(&mes("httpbin"));
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    opts.dns_forwarders = vec![free_addr("127.0.0.1")];
    let proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b""[..], b"\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"] {
        socket.send_to(junk, dns).await.unwrap();
    }
    let a = tokio::task::spawn_blocking(move || dig(dns, &["httpbin.extsvc.mesh.local", "+short"])).await.unwrap();
    assert_eq!(a.trim(), "242.0.0.1");
    let text = mesh_egress::metrics::metrics().encode();
    assert!(text.contains("mesh_egress_dns_queries_total{result=\"malformed\"}"), "{text}");
}

/// A DNS-over-TCP client that sends queries and never reads the answers: once they fill the
/// socket, the proxy waits the idle timeout for room and then closes the connection (it waited
/// for ever, holding a task and a descriptor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_tcp_client_that_never_reads_is_closed() {
    use tokio::io::AsyncWriteExt;
    let (_dir, config) = config_dir(&mes("httpbin"));
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    opts.dns_limits.tcp_idle = std::time::Duration::from_millis(300);
    let proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    // A query for a name the proxy answers itself, framed for TCP.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["httpbin", "extsvc", "mesh", "local"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    let batch = framed.repeat(1000);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(dns).await.unwrap();
    let writes = async {
        loop {
            if client.write_all(&batch).await.is_err() {
                return;
            }
        }
    };
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), writes).await;
    assert!(closed.is_ok(), "the proxy kept the connection of a client that reads nothing");
}

/// `/drain_listeners` stops the proxy's listeners, not its DNS: the application still runs and
/// may still resolve, until the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_is_answered_after_the_listeners_are_drained() {
    let (_dir, config) = config_dir(&mes("httpbin"));
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    let mut proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    proxy.drain_listeners();
    let answer =
        tokio::task::spawn_blocking(move || dig(dns, &["httpbin.extsvc.mesh.local", "A", "+short"])).await.unwrap();
    assert_eq!(answer.trim(), "242.0.0.1");
}

/// Clients that open DNS-over-TCP connections and send nothing cannot keep others out: with
/// every slot taken by such connections, `dig +tcp` is answered, the longest-idle connection
/// closed for it (RFC 7766 §6.2.3). Before, the new connection was closed and dig failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_dns_tcp_connections_cannot_hold_every_slot() {
    let (_dir, config) = config_dir(&mes("httpbin"));
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    let mut idle = Vec::new();
    for _ in 0..mesh_egress::dns::MAX_TCP_CONNECTIONS + 8 {
        idle.push(tokio::net::TcpStream::connect(dns).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let answer = tokio::task::spawn_blocking(move || dig(dns, &["httpbin.extsvc.mesh.local", "A", "+tcp", "+short"]))
        .await
        .unwrap();
    assert_eq!(answer.trim(), "242.0.0.1");
    drop(idle);
}
