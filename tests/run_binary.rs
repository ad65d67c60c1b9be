//! `mesh-egress run` as a real process: readiness, start-up errors, and a 1 GiB transfer with
//! the proxy's memory bounded.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_ready(admin: SocketAddr) {
    eventually("/ready answers 200", Duration::from_secs(20), || async {
        http_get(admin, "/ready").await.is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
}

/// `run` on `config` with no admin, DNS, transparent or readiness listener of its own.
fn run_without_listeners(config: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-egress"));
    cmd.args(["run", "-c", config, "--admin", "off", "--transparent", "off", "--dns", "off"]);
    cmd.args(["--readiness-port", "off"]);
    cmd
}

#[test]
fn invalid_configuration_at_start_exits_non_zero_with_every_error() {
    let out = run_without_listeners("tests/data/invalid").current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid configuration"), "{stderr}");
    for path in [
        "spec.match.type",
        "spec.match.port",
        "spec.match.protocol",
        "spec.tls.verification.mode",
        "spec.tls.verification.clientKey",
    ] {
        let named = stderr.lines().any(|l| l.contains("tests/data/invalid/broken.yaml:") && l.contains(path));
        assert!(named, "{path} missing:\n{stderr}");
    }
}

#[tokio::test]
async fn a_port_that_cannot_be_bound_is_a_clear_start_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (_dir, config) = config_dir(&service_with_outbound("x", addr, &endpoint("127.0.0.1", 1, 0), ""));
    let out = run_without_listeners(config.to_str().unwrap()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {addr} (outbound listener)")), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_with_bounded_memory() {
    const GIB: u64 = 1 << 30;
    // Upstream: counts what it receives, then sends 1 GiB back and closes.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = sink.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut received = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            received += n as u64;
        }
        let chunk = vec![7u8; 256 * 1024];
        let mut sent = 0;
        while sent < GIB {
            s.write_all(&chunk).await.unwrap();
            sent += chunk.len() as u64;
        }
        s.shutdown().await.unwrap();
        received
    });
    let outbound = free_addr("127.0.0.1");
    let admin = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_outbound("bulk", outbound, &endpoint("127.0.0.1", upstream.port(), 0), ""));
    let proxy = spawn_proxy(&config, admin, &[], &[]);
    wait_ready(admin).await;
    let idle_kib = peak_rss_kib(proxy.0.id());

    let mut client = TcpStream::connect(outbound).await.unwrap();
    let chunk = vec![1u8; 256 * 1024];
    let started = std::time::Instant::now();
    let mut sent = 0;
    while sent < GIB {
        client.write_all(&chunk).await.unwrap();
        sent += chunk.len() as u64;
    }
    client.shutdown().await.unwrap(); // half-close: the download still comes
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    loop {
        let n = client.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    let elapsed = started.elapsed();
    assert_eq!(server.await.unwrap(), GIB, "upstream received every byte");
    assert_eq!(received, GIB, "client received every byte");
    let peak_kib = peak_rss_kib(proxy.0.id());
    eprintln!(
        "2 GiB through the proxy in {elapsed:?} ({:.0} MiB/s); proxy RSS idle {idle_kib} KiB, peak {peak_kib} KiB",
        2048.0 / elapsed.as_secs_f64()
    );
    // Buffers are at most 256 KiB per direction: memory must not follow the transfer size.
    assert!(peak_kib < idle_kib + 16 * 1024, "peak RSS {peak_kib} KiB vs idle {idle_kib} KiB");
}

/// `0s` for a timeout flag means none (for the connection idle and half-close timeouts it closed
/// every flow at once; the connect and admin ones are taken along, though on loopback their
/// old reading did no visible harm here), and a duration too long for the clock is taken as
/// long as it can be (it panicked in every flow's task). A TCP exchange where the application
/// closes its half first, then the endpoint answers, goes through under each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_huge_flow_timeouts_leave_flows_alone() {
    let endpoint_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint_addr = endpoint_listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = endpoint_listener.accept().await {
            tokio::spawn(async move {
                let mut asked = Vec::new();
                let _ = stream.read_to_end(&mut asked).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = stream.write_all(&asked).await;
            });
        }
    });
    let zero: &[&str] = &[
        "--connection-idle-timeout",
        "0s",
        "--half-close-timeout",
        "0s",
        "--connect-timeout",
        "0s",
        "--admin-idle-timeout",
        "0s",
        "--admin-header-read-timeout",
        "0s",
    ];
    let huge: &[&str] = &["--connection-idle-timeout", "400000000000y", "--half-close-timeout", "400000000000y"];
    for flags in [zero, huge] {
        let outbound = free_addr("127.0.0.1");
        let (_dir, config) =
            config_dir(&service_with_outbound("flows", outbound, &endpoint("127.0.0.1", endpoint_addr.port(), 0), ""));
        let admin = free_addr("127.0.0.1");
        let mut proxy = spawn_proxy(&config, admin, flags, &[]);
        wait_ready(admin).await;
        let mut app = TcpStream::connect(outbound).await.unwrap();
        app.write_all(b"ping").await.unwrap();
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut answer)).await.unwrap().unwrap();
        assert_eq!(answer, b"ping", "{flags:?}");
        assert!(proxy.0.try_wait().unwrap().is_none(), "the proxy exited under {flags:?}");
    }
}
