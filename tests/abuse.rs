//! The fault and abuse tier: what an attacker, a bad neighbour or a starved host does to the
//! real binary, each case failing before its fix (issue 16): descriptor exhaustion, a second
//! instance on the same ports, listeners and the DNS proxy on non-loopback addresses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-egress");

async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.ok()?.ok()?;
    Some(out)
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// An h2c (prior knowledge) client connection to `addr`, driven on its own task.
async fn h2c(addr: SocketAddr) -> (H2Sender, tokio::task::JoinHandle<Result<(), hyper::Error>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    (sender, tokio::spawn(conn))
}

async fn wait_ready(admin: SocketAddr) {
    eventually("/ready answers 200", Duration::from_secs(20), || async {
        http_get(admin, "/ready").await.is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
}

/// At the descriptor limit, connects fail with EMFILE on this host: that must not eject a
/// healthy endpoint, and the admin server must still answer once descriptors are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_ejects_no_endpoint() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [outbound, admin]: [SocketAddr; 2] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let (_dir, config) =
        config_dir(&service_with_outbound("e", outbound, &endpoint("127.0.0.1", echo.addr.port(), 0), ""));
    let admin_arg = admin.to_string();
    let mut cmd = Command::new("prlimit");
    cmd.args(["--nofile=64", "--", BIN, "run", "-c", config.to_str().unwrap(), "--admin", &admin_arg])
        .args(["--transparent", "off", "--dns", "off", "--workers", "1", "--eject-after", "1", "--no-watch"])
        .args(["--readiness-port", "off"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _proxy = KillOnDrop(cmd.spawn().expect("prlimit (util-linux) must be installed"));
    wait_ready(admin).await;
    // Hold connections until the proxy runs out of descriptors for its upstream side.
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(outbound)).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(held);
    eventually("the admin server answers again", Duration::from_secs(20), || async {
        http_get(admin, "/endpoints").await.is_some()
    })
    .await;
    let endpoints = http_get(admin, "/endpoints").await.unwrap_or_default();
    let body = endpoints.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {endpoints}"));
    assert_eq!(json["services"][0]["targets"][0]["healthy"], true, "EMFILE is not the endpoint's fault: {body}");
    let greeting = tokio::time::timeout(Duration::from_secs(10), greet(outbound)).await;
    assert_eq!(greeting.ok().and_then(Result::ok).map(|g| g.0).as_deref(), Some("echo"));
}

/// With several workers the listeners use SO_REUSEPORT, which would let a second instance join
/// the same ports and silently take part of the traffic: it must fail to start instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_cannot_share_the_ports() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [outbound, admin]: [SocketAddr; 2] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let (_dir, config) =
        config_dir(&service_with_outbound("s", outbound, &endpoint("127.0.0.1", echo.addr.port(), 0), ""));
    let _first = spawn_proxy(&config, admin, &["--workers", "2"], &[]);
    wait_ready(admin).await;
    let stderr = refused_to_start(&config, &["--workers", "2"]).await;
    assert!(stderr.contains(&format!("cannot listen on {outbound}")), "{stderr}");
}

/// Runs the binary on `config` with `args` and its own admin address, and returns its stderr
/// once it has exited non-zero. Panics if it becomes ready instead.
async fn refused_to_start(config: &std::path::Path, args: &[&str]) -> String {
    let admin = free_addr("127.0.0.1");
    let mut child = Command::new(BIN)
        .args(["run", "-c", config.to_str().unwrap(), "--admin", &admin.to_string(), "--readiness-port", "off"])
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if http_get(admin, "/ready").await.is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("started with {args:?}, which it must refuse");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_ne!(status.code(), Some(0), "{stderr}");
    stderr
}

/// Non-loopback listeners need an explicit flag: the DNS proxy would be an open resolver, an
/// outbound or the transparent listener an open gateway to the external services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_on_non_loopback_addresses_need_an_explicit_flag() {
    let (_dir, config) =
        config_dir(&service_with_outbound("s", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), ""));
    let err = refused_to_start(&config, &["--transparent", "off", "--dns", "0.0.0.0:0"]).await;
    assert!(err.contains("--dns 0.0.0.0:0 is not a loopback address") && err.contains("--dns-allow-remote"), "{err}");
    let err = refused_to_start(&config, &["--transparent", "0.0.0.0:0", "--dns", "off"]).await;
    assert!(err.contains("0.0.0.0:0 (transparent listener) is not a loopback address"), "{err}");
    assert!(err.contains("--listen-allow-remote"), "{err}");
    let (_dir2, remote) =
        config_dir(&service_with_outbound("r", "0.0.0.0:18777".parse().unwrap(), &endpoint("127.0.0.1", 1, 0), ""));
    let err = refused_to_start(&remote, &["--transparent", "off", "--dns", "off"]).await;
    assert!(err.contains("0.0.0.0:18777 (outbound listener) is not a loopback address"), "{err}");
}

/// One h2c connection opening 150 streams at once gets at most 100 served concurrently (the
/// advertised limit), so it cannot open more than 100 upstream HTTP/1 connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_application_connection_cannot_fan_out_past_the_stream_limit() {
    use http_body_util::{BodyExt, Empty};
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("fan", "http", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let (sender, _conn) = h2c(outbound).await;
    let requests = (0..150).map(|_| {
        let mut sender = sender.clone();
        async move {
            let req = http::Request::get(format!("http://{outbound}/"))
                .header("x-delay-ms", "300")
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = sender.send_request(req).await.unwrap();
            let status = response.status();
            let _ = response.into_body().collect().await;
            status
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| s.is_success()), "{statuses:?}");
    assert!(
        upstream.connections() <= 100,
        "{} upstream connections for one application connection",
        upstream.connections()
    );
}

/// A service has at most `max_connections` upstream connections open; a request beyond that
/// is answered 503 at once instead of opening one more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_per_service_are_capped() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("cap", "http", upstream.addr.port());
    let mut opts = options(config);
    opts.upstream.max_connections = 2;
    let _proxy = start(opts).await;
    let slow = |delay: &'static str| async move {
        let mut s = TcpStream::connect(outbound).await.unwrap();
        s.write_all(
            format!("GET / HTTP/1.1\r\nHost: a\r\nx-delay-ms: {delay}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let (a, b) = (tokio::spawn(slow("1500")), tokio::spawn(slow("1500")));
    eventually("two upstream connections open", Duration::from_secs(10), || async { upstream.connections() == 2 })
        .await;
    let third = slow("0").await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    assert!(a.await.unwrap().starts_with("HTTP/1.1 200"));
    assert!(b.await.unwrap().starts_with("HTTP/1.1 200"));
    assert_eq!(upstream.connections(), 2, "the third request opened no connection");
    assert!(slow("0").await.starts_with("HTTP/1.1 200"), "slots come back when connections close");
}

/// Sends `request` as it is on a fresh connection and returns everything the proxy answers.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP/1 requests the proxy must refuse or clean up itself, not pass on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_edge_cases_get_the_answer_the_rfc_asks_for() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("edge", "http", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let close = "Connection: close\r\n";
    for (what, request, want) in [
        ("no Host", format!("GET / HTTP/1.1\r\n{close}\r\n"), "HTTP/1.1 400"),
        ("two Hosts", format!("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n{close}\r\n"), "HTTP/1.1 400"),
        (
            "malformed chunk",
            format!("POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n{close}\r\nzz\r\nhello\r\n0\r\n\r\n"),
            "HTTP/1.1 400",
        ),
        ("CONNECT", format!("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n{close}\r\n"), "HTTP/1.1 405"),
        (
            "h2c upgrade (not allowed): forwarded as an ordinary request",
            format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n{close}\r\n"),
            "HTTP/1.1 200",
        ),
    ] {
        let answer = raw(outbound, &request).await;
        assert!(answer.starts_with(want), "{what}: want {want}, got:\n{answer}");
    }
    // Credentials for the proxy and its challenges do not cross it.
    let answer = raw(
        outbound,
        &format!("GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic c2VjcmV0\r\nx-challenge: 1\r\n{close}\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("proxy-authorization: -\n"), "forwarded to the endpoint:\n{answer}");
    assert!(!answer.to_ascii_lowercase().contains("proxy-authenticate"), "passed back to the application:\n{answer}");
}

/// An upstream that accepts and then neither reads, writes nor closes.
async fn silent_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// Reads until the proxy closes the connection; `None` if it has not after 20 s (the case
/// fails: before the timeouts, such connections stayed open for good).
async fn closed_by_proxy(mut s: TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

/// A chunked upload to the test upstream's `/early`, which answers at once and goes on reading:
/// the stream once the 200's head has arrived, the upload still open.
async fn early_answered_upload(outbound: SocketAddr) -> TcpStream {
    let mut upload = TcpStream::connect(outbound).await.unwrap();
    upload
        .write_all(b"POST /early HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        .await
        .unwrap();
    let head = read_head(&mut upload).await.expect("a response head");
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    upload
}

/// Quiet connections end: a TCP flow with no bytes (idle timeout), a TCP flow half-closed by
/// the application behind a silent upstream (half-close timeout), an HTTP/1 request head that
/// never completes (header-read timeout) and an h2c connection that sends nothing (idle).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_application_connections_are_closed() {
    let (silent, _task) = silent_upstream().await;
    let upstream = common::http_upstream::http_upstream(None).await;
    let [tcp_out, http_out, h2_out]: [SocketAddr; 3] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let yaml = [
        service_with_outbound("silent", tcp_out, &endpoint("127.0.0.1", silent.port(), 0), ""),
        service_with_protocol("web", "http", http_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        service_with_protocol("h2", "http2", h2_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.timeouts = mesh_egress::proxy::ConnectionTimeouts {
        idle: Duration::from_millis(500),
        half_close: Duration::from_millis(300),
        header_read: Duration::from_millis(300),
        ..Default::default()
    };
    let _proxy = start(opts).await;

    let idle = TcpStream::connect(tcp_out).await.unwrap();
    assert!(closed_by_proxy(idle).await.is_some(), "idle TCP flow");

    let mut half = TcpStream::connect(tcp_out).await.unwrap();
    half.write_all(b"request").await.unwrap();
    half.shutdown().await.unwrap();
    assert!(closed_by_proxy(half).await.is_some(), "half-closed TCP flow behind a silent upstream");

    let mut slow = TcpStream::connect(http_out).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: ").await.unwrap();
    assert!(closed_by_proxy(slow).await.is_some(), "HTTP/1 head never completed");

    let mut h2 = TcpStream::connect(h2_out).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    assert!(closed_by_proxy(h2).await.is_some(), "idle h2c connection");
}

/// A request head trickled in a byte at a time, never idle, is cut at the header-read timeout,
/// on an `http2` service's listener too, which takes HTTP/1.1 as well: there the timeout used
/// not to apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_request_head_is_cut_whatever_the_service_s_protocol() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let [http_out, h2_out]: [SocketAddr; 2] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let yaml = [
        service_with_protocol("web", "http", http_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        service_with_protocol("h2", "http2", h2_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.timeouts =
        mesh_egress::proxy::ConnectionTimeouts { header_read: Duration::from_millis(300), ..Default::default() };
    let _proxy = start(opts).await;
    for outbound in [http_out, h2_out] {
        let mut slow = TcpStream::connect(outbound).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: ").await.unwrap();
        // A byte every 100 ms for up to 20 s: far past the timeout, and never idle.
        let mut cut = false;
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await;
            if let Ok(Ok(n @ 1..)) = read {
                panic!("the proxy answered a head never completed: {:?}", String::from_utf8_lossy(&buf[..n]));
            }
            if matches!(read, Ok(Ok(0) | Err(_))) || slow.write_all(b"a").await.is_err() {
                cut = true;
                break;
            }
        }
        assert!(cut, "a trickled head on {outbound} was never cut");
    }
}

/// The header-read timeout counts from the end of the last response: a response that streams
/// for longer is not cut, and its keep-alive connection closes a timeout after it ends. An h2c
/// client on an `http` listener (no head deadline on HTTP/2) may wait longer for its first
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_runs_between_http1_requests_only() {
    use common::http_client::{get, h2, text};
    let upstream = common::http_upstream::http_upstream(None).await;
    let http_out = free_addr("127.0.0.1");
    let yaml = service_with_protocol("web", "http", http_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), "");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.timeouts =
        mesh_egress::proxy::ConnectionTimeouts { header_read: Duration::from_millis(300), ..Default::default() };
    let _proxy = start(opts).await;

    // Eight drips 100 ms apart: the response outlasts the timeout twice over.
    let mut slow = TcpStream::connect(http_out).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nx-drip: 8\r\nx-drip-ms: 100\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.ends_with(b"0\r\n\r\n") {
        let n = slow.read(&mut buf).await.unwrap();
        assert!(n > 0, "cut mid-response: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buf[..n]);
    }
    let text_of = String::from_utf8_lossy(&response);
    assert_eq!(text_of.matches("\r\n.\r\n").count(), 8, "every drip arrived: {text_of}");
    assert_eq!(closed_by_proxy(slow).await, Some(Vec::new()), "closed a timeout after the response, with no reply");

    let mut client = h2(http_out).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (status, body) = text(client.send_request(get("http://web/", &[])).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");

    // `PRI` is an HTTP/1 method too: such a head, never completed, is held to the deadline
    // (the idle timeout here is an hour).
    let mut pri = TcpStream::connect(http_out).await.unwrap();
    pri.write_all(b"PRI / HTTP/1.1\r\nHost: web\r\nx-slow: ").await.unwrap();
    assert!(closed_by_proxy(pri).await.is_some(), "an HTTP/1 head with the method PRI never completed");

    // An upload the endpoint answers before it has all of it goes on for three timeouts after
    // the response ended: the connection is not cut, and its next request is answered.
    let mut upload = early_answered_upload(http_out).await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        upload.write_all(b"4\r\nmore\r\n").await.expect("the upload was cut");
    }
    upload.write_all(b"0\r\n\r\nGET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").await.unwrap();
    let rest = closed_by_proxy(upload).await.unwrap_or_default();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200"), "no answer to the request after the upload: {rest:?}");
}

/// A drain does not lift the header-read timeout: a first head that never completes ends its
/// connection at the deadline, not at the end of the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_keeps_the_header_read_timeout() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("web", "http", upstream.addr.port());
    let mut opts = options(config);
    opts.timeouts =
        mesh_egress::proxy::ConnectionTimeouts { header_read: Duration::from_millis(300), ..Default::default() };
    let mut proxy = start(opts).await;
    let mut slow = TcpStream::connect(outbound).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nx-slow: ").await.unwrap();
    // Accepted and read before the drain begins (well within the deadline).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = proxy.drain(Duration::from_secs(10)).await;
    assert_eq!(left, 0, "the connection outlived its head deadline during the drain");
    assert!(closed_by_proxy(slow).await.is_some());
}

/// The admin server and DNS-over-TCP close connections that send nothing (10 s each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_dns_tcp_close_quiet_connections() {
    let (_dir, config) =
        config_dir(&service_with_outbound("s", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), ""));
    let mut opts = options(config);
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    let admin = TcpStream::connect(proxy.admin_addr().unwrap()).await.unwrap();
    let dns = TcpStream::connect(proxy.dns_addr().unwrap()).await.unwrap();
    let (admin, dns) = tokio::join!(closed_by_proxy(admin), closed_by_proxy(dns));
    assert!(admin.is_some(), "admin connection with no request");
    assert!(dns.is_some(), "DNS-over-TCP connection with no query");
}

/// A slow upload answered before its body is complete must not lend its upstream connection to
/// the next request: that one would wait for the upload (before: forever here, since the
/// upload finishes only once the second request is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_does_not_stall_the_next_request() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("up", "http", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let mut upload = early_answered_upload(outbound).await;
    let next = tokio::time::timeout(
        Duration::from_secs(20),
        raw(outbound, "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
    )
    .await
    .expect("the next request was held up by the unfinished upload");
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    upload.write_all(b"0\r\n\r\n").await.unwrap();
}

/// `--dns-upstream` naming the proxy's own DNS address (or a wildcard of it) would make each
/// unknown query loop through the proxy until descriptors ran out: refused at start, before
/// binding (the port is held busy here, so the answer cannot depend on it being free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dns_proxy_refuses_itself_as_upstream() {
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    for upstream in [format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}"), format!("127.0.0.2:{port}")] {
        let (_dir, config) =
            config_dir(&service_with_outbound("s", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), ""));
        let mut opts = options(config);
        opts.dns = Some(format!("127.0.0.1:{port}").parse().unwrap());
        opts.dns_forwarders = vec![upstream.parse().unwrap()];
        let err = mesh_egress::server::Server::start(opts, std::sync::Arc::new(mesh_egress::listen::SoOriginalDst))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains(&format!("--dns-upstream {upstream} is this DNS proxy's own address")),
            "{upstream}: {err:?}"
        );
    }
}

/// A flood of queries for unknown names behind an upstream that never answers: at most
/// MAX_FORWARDS_IN_FLIGHT reach it at once; the rest get SERVFAIL at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_dns_queries_are_capped() {
    use hickory_proto::op::{Message, Query, ResponseCode};
    use hickory_proto::rr::{Name, RecordType};
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = received.clone();
    let _silent = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while silent.recv_from(&mut buf).await.is_ok() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let (_dir, config) =
        config_dir(&service_with_outbound("s", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), ""));
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    opts.dns_forwarders = vec![silent_addr];
    let proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    let client = std::sync::Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    const QUERIES: u16 = 1000;
    // Answers are read while the queries go out, so that the client's buffer does not overflow.
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let (mut servfails, mut buf) = (0usize, [0u8; 512]);
            while servfails < usize::from(QUERIES) - mesh_egress::dns::MAX_FORWARDS_IN_FLIGHT {
                let (n, _) = client.recv_from(&mut buf).await.unwrap();
                assert_eq!(Message::from_vec(&buf[..n]).unwrap().response_code(), ResponseCode::ServFail);
                servfails += 1;
            }
        })
    };
    for id in 0..QUERIES {
        let mut m = Message::new();
        m.set_id(id).add_query(Query::query(Name::from_ascii(format!("n{id}.unknown.test.")).unwrap(), RecordType::A));
        client.send_to(&m.to_vec().unwrap(), dns).await.unwrap();
        if id % 50 == 49 {
            // Paced so that no socket buffer overflows (all within the 2 s the first ones wait).
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::timeout(Duration::from_secs(20), reader).await.expect("SERVFAIL answers").unwrap();
    let reached = received.load(std::sync::atomic::Ordering::SeqCst);
    assert!(reached <= mesh_egress::dns::MAX_FORWARDS_IN_FLIGHT, "{reached} queries forwarded at once");
}

/// Paced rapid reset: HEADERS, a moment, RST_STREAM, over and over on one connection. The proxy
/// sends GOAWAY once most of the connection's streams are cancelled (past 100), so the
/// connection refuses new streams well before 1,000 resets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_gets_goaway() {
    use http_body_util::Empty;
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("rr", "http2", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let (mut sender, conn) = h2c(outbound).await;
    let mut refused_after = None;
    for i in 0..1000 {
        if sender.ready().await.is_err() {
            refused_after = Some(i);
            break;
        }
        let req = http::Request::get(format!("http://{outbound}/"))
            .header("x-delay-ms", "2000")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        // Dropped unanswered: hyper resets the stream.
        let _ = tokio::time::timeout(Duration::from_millis(2), sender.send_request(req)).await;
    }
    let refused_after = refused_after.expect("1,000 streams reset on one connection and it still takes more");
    // The budget is 100 cancelled streams: the GOAWAY may come as soon as the 100th is reset.
    assert!(refused_after >= 100, "a connection within the budget is left alone ({refused_after})");
    drop(conn);
}

/// Rapid reset from a client that never answers the GOAWAY's PING: h2 would take its streams
/// until it did, so the connection is closed a moment after the GOAWAY instead of running on
/// until the idle timeout. Raw frames, since HTTP/2 libraries answer PINGs by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_from_a_client_deaf_to_goaway_is_closed() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("rr", "http2", upstream.addr.port());
    let mut opts = options(config);
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    let (mut read, mut write) = TcpStream::connect(outbound).await.unwrap().into_split();
    // What the proxy sends is read and never answered, until it closes the connection.
    let closed = tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while let Ok(1..) = read.read(&mut sink).await {}
    });
    let frame = h2_frame;
    // GET http://a/ (static table indices), x-delay-ms: 2000 as a literal without indexing.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a', 0x00, 10];
    block.extend(b"x-delay-ms");
    block.push(4);
    block.extend(b"2000");
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    preface.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    write.write_all(&preface).await.unwrap();
    // Paced, so each stream is taken before its reset (h2 itself ends a connection that resets
    // streams not yet taken, its own rapid-reset defence).
    for i in 0..1000u32 {
        let stream = 2 * i + 1;
        if write.write_all(&frame(0x1, 0x5, stream, &block)).await.is_err() {
            break; // HEADERS (END_STREAM, END_HEADERS); an error: closed already
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        if write.write_all(&frame(0x3, 0, stream, &8u32.to_be_bytes())).await.is_err() {
            break; // RST_STREAM(CANCEL)
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(20), closed).await;
    assert!(ended.is_ok(), "a rapid-reset connection that ignores the GOAWAY is still open");
    // The connection's task ends too: the streams still waiting for the endpoint (its 2 s delay),
    // polled in that task, end once the connection is gone (`ConnectionStreams::finish`).
    let admin = proxy.admin_addr().unwrap();
    eventually("the rapid-reset connection's task ended", Duration::from_secs(10), || async {
        http_get(admin, "/metrics").await.is_some_and(|metrics| {
            metrics.lines().any(|l| l.starts_with("mesh_egress_connections_active{") && l.ends_with(" 0"))
        })
    })
    .await;
}

/// A TLS endpoint that ends its connection without close_notify (many do) has still sent all it
/// had: the application gets every byte and a clean end, and the access log says `closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_peer_without_close_notify_is_a_normal_close() {
    use common::pki::{certs, Ca};
    use rustls::pki_types::pem::PemObject;
    let ca = Ca::new("abrupt-ca");
    let leaf = ca.server(&["abrupt.test"]);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let config =
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs(&leaf.cert_pem), key)
            .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
            let _ = tls.write_all(b"bye\n").await;
            let _ = tls.flush().await;
            drop(tls.into_inner().0); // TCP FIN, no close_notify
        }
    });
    let outbound = free_addr("127.0.0.1");
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: abrupt.test\n      caCert:\n        inlineString: |\n{}",
        ca.pem.lines().map(|l| format!("          {l}\n")).collect::<String>()
    );
    let (dir, config) =
        config_dir(&service_with_outbound("abrupt", outbound, &endpoint("127.0.0.1", server_addr.port(), 0), &tls));
    let log_path = dir.path().join("access.log");
    let mut opts = options(config);
    opts.access_log = Some(
        mesh_egress::access_log::AccessLog::start(
            mesh_egress::access_log::Destination::File(log_path.clone()),
            mesh_egress::access_log::Format::Text,
        )
        .unwrap(),
    );
    let _proxy = start(opts).await;
    let mut client = TcpStream::connect(outbound).await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, "bye\n");
    drop(client);
    eventually("the access log line", Duration::from_secs(10), || async {
        std::fs::read_to_string(&log_path).is_ok_and(|t| t.contains("default/abrupt"))
    })
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains(" closed sent="), "{log}");
}

/// An upstream that resets a gRPC stream after its headers went out: the client gets trailers
/// with `grpc-status: 14` (UNAVAILABLE), as from Envoy, not a bare reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_stream_reset_mid_response_ends_with_unavailable() {
    use http_body_util::{BodyExt, Empty};
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("g", "grpc", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let (mut sender, _conn) = h2c(outbound).await;
    let req = http::Request::post(format!("http://{outbound}/svc/Method"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-reset", "mid")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.expect("the stream ends with trailers, not a reset");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(trailers.get("grpc-status").map(|v| v.to_str().unwrap()), Some("14"), "{trailers:?}");
}

/// An HTTP/1 upstream that answers each request with `response` (raw bytes) and then closes.
async fn raw_upstream(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response).await;
                // Stays open without sending more: the stalled case.
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    (addr, task)
}

/// Applications that stop reading large downloads from an HTTP/2 service hold their streams'
/// windows on the shared endpoint connection, not the connection's: another application's
/// small request on it still gets its answer. Before, three stalled downloads (2 MiB stream
/// windows) used up the 5 MiB connection window and every other response on it stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_nobody_reads_do_not_stall_the_shared_endpoint_connection() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("shared", "http2", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut app = TcpStream::connect(outbound).await.unwrap();
        // 256 MiB each, never read: the proxy's socket buffers fill, then the stream's window.
        app.write_all(b"GET /big HTTP/1.1\r\nhost: shared\r\nx-size: 268435456\r\n\r\n").await.unwrap();
        let mut head = [0u8; 12];
        app.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        stalled.push(app);
    }
    // Time for the three downloads to fill what they can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let small = tokio::time::timeout(Duration::from_secs(10), async {
        let mut app = TcpStream::connect(outbound).await.unwrap();
        app.write_all(b"GET /small HTTP/1.1\r\nhost: shared\r\nx-size: 100000\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        app.read_to_end(&mut response).await.unwrap();
        response
    })
    .await
    .expect("the small response stalled behind downloads nobody reads");
    assert!(small.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&small[..64.min(small.len())]));
    assert!(small.len() > 100_000, "the whole body came: {} bytes", small.len());
    drop(stalled);
}

/// An upload whose HTTP/2 endpoint answers it whole at once (trailers included, as a gRPC
/// endpoint refusing a client-streaming call) and never opens a window for all of its body is
/// cut once the answer has reached the application, as Envoy's router cuts it:
/// the endpoint's stream is reset (`CANCEL`), the application's HTTP/2 stream too (`NO_ERROR`,
/// RFC 9113 §8.1), and its HTTP/1 connection closes after the answer. Before, the body's next
/// frame waited for the window in the proxy, holding the endpoint's stream and the body's
/// memory until the endpoint closed its connection, whatever the application did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_an_http2_endpoint_answered_whole_is_cut() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    let (reset_tx, mut resets) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let reset_tx = reset_tx.clone();
            tokio::spawn(async move {
                let handshake = h2::server::Builder::new().initial_window_size(0).handshake::<_, bytes::Bytes>(socket);
                let Ok(mut connection) = handshake.await else { return };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    // With trailers, as a gRPC endpoint refusing a client-streaming call early:
                    // the response is read to its very end (a response ending with its last
                    // data frame is dropped before that, and its upload was already cut).
                    if let Ok(mut answer) = respond.send_response(http::Response::new(()), false) {
                        let _ = answer.send_data(bytes::Bytes::from_static(b"answered"), false);
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("7"));
                        let _ = answer.send_trailers(trailers);
                    }
                    let reset_tx = reset_tx.clone();
                    // What the first window (h2's default until SETTINGS arrive) lets through
                    // is read; no capacity is released: the rest cannot come.
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let end = loop {
                            match body.data().await {
                                Some(Ok(_)) => continue,
                                Some(Err(error)) => break error.reason(),
                                None => break None,
                            }
                        };
                        let _ = reset_tx.send(end);
                    });
                }
            });
        }
    });
    let (outbound, _dir, config) = single_service("answered", "http2", at.port());
    let _proxy = start(options(config)).await;
    // More than any window the endpoint opens.
    let chunk = bytes::Bytes::from(vec![b'u'; 0x20000]);

    // An HTTP/2 application, whose upload is still going.
    let (mut send, connection) = h2::client::handshake(TcpStream::connect(outbound).await.unwrap()).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post("http://answered/upload").body(()).unwrap();
    let (response, mut upload) = send.send_request(request, false).unwrap();
    upload.send_data(chunk.clone(), false).unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    let reset = tokio::time::timeout(Duration::from_secs(10), resets.recv()).await;
    assert_eq!(reset.expect("the endpoint's stream was not reset"), Some(Some(h2::Reason::CANCEL)));
    let reset = tokio::time::timeout(Duration::from_secs(10), std::future::poll_fn(|cx| upload.poll_reset(cx))).await;
    assert_eq!(reset.expect("the application's stream was not reset").unwrap(), h2::Reason::NO_ERROR);

    // An HTTP/1 application, whose upload is still going.
    let mut app = TcpStream::connect(outbound).await.unwrap();
    app.write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n20000\r\n").await.unwrap();
    app.write_all(&chunk).await.unwrap();
    app.write_all(b"\r\n").await.unwrap();
    let reset = tokio::time::timeout(Duration::from_secs(10), resets.recv()).await;
    assert_eq!(reset.expect("the endpoint's stream was not reset"), Some(Some(h2::Reason::CANCEL)));
    let answer = closed_by_proxy(app).await.expect("the application's connection stayed open");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

/// An HTTP/2 endpoint's response headers of up to 64 KiB pass (as `--max-header-bytes` for
/// requests; Envoy's default is 60 KiB), more get 502. Before, hyper's 16 KiB refused a 20 KiB
/// header, and a refusal was a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_endpoint_s_large_response_headers_pass() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let size = if request.uri().path() == "/over" { 80_000 } else { 40_000 };
                    let response = http::Response::builder().header("x-big", "b".repeat(size)).body(()).unwrap();
                    let _ = respond.send_response(response, true);
                }
            });
        }
    });
    let (outbound, _dir, config) = single_service("big-headers", "http2", at.port());
    let _proxy = start(options(config)).await;
    let response = http_get(outbound, "/").await.unwrap_or_default();
    assert!(response.starts_with("HTTP/1.1 200"), "{}", &response[..64.min(response.len())]);
    assert!(response.contains(&"b".repeat(40_000)), "the header passed whole");
    // Past the limit: 502, a protocol error (h2 resets the stream itself).
    let over = http_get(outbound, "/over").await.unwrap_or_default();
    assert!(over.starts_with("HTTP/1.1 502"), "{}", &over[..64.min(over.len())]);
}

/// One HTTP/2 frame: its 9-byte header (length, type, flags, stream) and `payload`.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = length[1..].to_vec();
    frame.extend([kind, flags]);
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// An HTTP/2 endpoint written frame by frame: it acknowledges the proxy's SETTINGS and answers
/// the HEADERS of each stream with one HEADERS frame (END_HEADERS | END_STREAM) carrying the HPACK
/// block `response`.
async fn raw_h2_upstream(response: &'static [u8]) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let frame = h2_frame;
                let mut preface = [0u8; 24];
                if stream.read_exact(&mut preface).await.is_err()
                    || stream.write_all(&frame(4, 0, 0, &[])).await.is_err()
                {
                    return;
                }
                let mut head = [0u8; 9];
                while stream.read_exact(&mut head).await.is_ok() {
                    let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
                    if stream.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let reply = match (head[3], head[4] & 1) {
                        (4, 0) => frame(4, 1, 0, &[]), // SETTINGS: ACK
                        (1, _) => frame(1, 0x4 | 0x1, id, response),
                        _ => continue,
                    };
                    if stream.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An HTTP/2 endpoint whose response breaks the protocol gets the application a 502 (gRPC:
/// UNAVAILABLE), as Envoy's `UPE`, whether h2 refuses the stream (a connection-specific header:
/// its RST_STREAM) or the connection (an HPACK index out of the table: its GOAWAY). Before, 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_endpoint_breaking_the_protocol_gets_a_502() {
    // `:status: 200` (static index 8), then `connection: close`, a literal with a new name.
    let stream_error = raw_h2_upstream(b"\x88\x00\x0aconnection\x05close").await;
    // `:status: 200`, then index 63: no such entry (the static table has 61, the dynamic none).
    let connection_error = raw_h2_upstream(b"\x88\xbf").await;
    let outbounds: Vec<SocketAddr> = (0..3).map(|_| free_addr("127.0.0.1")).collect();
    let yaml =
        [("h2-stream", "http2", stream_error), ("h2-conn", "http2", connection_error), ("grpc", "grpc", stream_error)]
            .iter()
            .zip(&outbounds)
            .map(|((name, protocol, at), outbound)| {
                service_with_protocol(name, protocol, *outbound, &endpoint("127.0.0.1", at.port(), 0), "")
            })
            .collect::<Vec<_>>()
            .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    for (outbound, what) in
        [(outbounds[0], "a malformed response (stream error)"), (outbounds[1], "bad HPACK (connection error)")]
    {
        for _ in 0..2 {
            let response = http_get(outbound, "/").await.unwrap_or_default();
            assert!(response.starts_with("HTTP/1.1 502"), "{what}: {response}");
            assert!(response.ends_with("reset reason: protocol error"), "{what}: {response}");
        }
    }
    let (mut sender, _conn) = h2c(outbounds[2]).await;
    let request = http::Request::post(format!("http://{}/svc/Method", outbounds[2]))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200, "gRPC: trailers only");
    assert_eq!(response.headers().get("grpc-status").map(|v| v.to_str().unwrap()), Some("14"));
    let metrics = http_get(proxy.admin_addr().unwrap(), "/metrics").await.unwrap_or_default();
    for service in ["h2-stream", "h2-conn"] {
        let line = format!(
            "mesh_egress_requests_total{{service=\"default/{service}\",protocol=\"http2\",status_class=\"5xx\"}} 2"
        );
        assert!(metrics.contains(&line), "the 502s are counted: {metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_mid_response_end_that_response_only() {
    // A body shorter than its Content-Length, then silence; and the same cut by a policy's
    // stream idle timeout. Either way the application sees that response fail, and the proxy
    // keeps serving.
    let (short, _a) = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten!!").await;
    let healthy = common::http_upstream::http_upstream(None).await;
    let (short_out, healthy_out) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let yaml = format!(
        "{}---\n{}---\ntype: MeshTimeout\nname: stalls\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: short}}\n    default: {{http: {{streamIdleTimeout: 300ms}}}}\n",
        service_with_protocol("short", "http", short_out, &endpoint("127.0.0.1", short.port(), 0), ""),
        service_with_protocol("healthy", "http", healthy_out, &endpoint("127.0.0.1", healthy.addr.port(), 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let mut s = TcpStream::connect(short_out).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    // The upstream stays silent for 30 s: only the stream idle timeout ends this read early.
    let ended = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let response = String::from_utf8_lossy(&out);
    assert!(ended.is_ok(), "the proxy cut the stalled response: {response:?}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("only ten!!"), "the ten bytes pass, then the connection ends short: {response:?}");
    let ok = http_get(healthy_out, "/").await.unwrap_or_default();
    assert!(ok.starts_with("HTTP/1.1 200"), "other services are unaffected: {ok}");
    let again = http_get(short_out, "/").await.unwrap_or_default();
    assert!(again.starts_with("HTTP/1.1 200"), "the faulty service still takes requests: {again}");
}

/// Forwarding shares a few sockets: concurrent queries reach the upstream from at most four source ports,
/// each under an ID of the proxy's, and every client gets its own answer under its own ID. An
/// upstream that stops answering costs SERVFAIL (after the forward timeout), not the proxy's
/// local answers; once it answers again, so does forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_forwarding_shares_a_socket_and_survives_an_upstream_that_stops_answering() {
    use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
    use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let answering = Arc::new(AtomicBool::new(true));
    // Source ports, and each forwarded query's ID with the i of its name n<i>.test.
    type Seen = (std::collections::BTreeSet<u16>, Vec<(u16, u8)>);
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (on, record) = (answering.clone(), seen.clone());
    let _upstream = tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = upstream.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let q = query.queries()[0].clone();
            let i: u8 = q.name().to_ascii().trim_start_matches('n').split('.').next().unwrap().parse().unwrap();
            {
                let mut r = record.lock().unwrap();
                r.0.insert(peer.port());
                r.1.push((query.id(), i));
            }
            if !on.load(Ordering::SeqCst) {
                continue;
            }
            // Answers n<i>.test with 192.0.2.<i>.
            let mut response = Message::new();
            response.set_id(query.id()).set_message_type(MessageType::Response);
            response.add_query(q.clone());
            response.add_answer(Record::from_rdata(q.name().clone(), 30, RData::A(A::new(192, 0, 2, i))));
            let _ = upstream.send_to(&response.to_vec().unwrap(), peer).await;
        }
    });
    let (_dir, config) = config_dir("type: MeshExternalService\nname: local\nspec:\n  match: {port: 443}\n  endpoints: [{address: 10.0.0.1, port: 443}]\n");
    let mut opts = options(config);
    opts.dns = Some("127.0.0.1:0".parse().unwrap());
    opts.dns_forwarders = vec![upstream_addr];
    let proxy = start(opts).await;
    let dns = proxy.dns_addr().unwrap();
    let query = |id: u16, name: &str| {
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    };
    // 50 clients at once, each with its own ID.
    let mut tasks = Vec::new();
    for i in 1..=50u8 {
        let packet = query(1000 + u16::from(i), &format!("n{i}.test."));
        tasks.push(tokio::spawn(async move {
            let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            client.send_to(&packet, dns).await.unwrap();
            let mut buf = [0u8; 512];
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf)).await.unwrap().unwrap();
            (i, Message::from_vec(&buf[..n]).unwrap())
        }));
    }
    for task in tasks {
        let (i, answer) = task.await.unwrap();
        assert_eq!(answer.id(), 1000 + u16::from(i), "the client's own ID");
        let ip = answer.answers()[0].data().as_a().unwrap().0;
        assert_eq!(ip, std::net::Ipv4Addr::new(192, 0, 2, i), "its own answer");
    }
    {
        let seen = seen.lock().unwrap();
        assert!(seen.0.len() <= 4, "a few shared source ports, not one socket per query: {:?}", seen.0);
        // Each query goes out under an ID of the proxy's, random: one may equal its client's by
        // chance (1 in 65,536 each; the test once saw a proxy ID fall among the clients' 50).
        let own = seen.1.iter().filter(|&&(id, i)| id == 1000 + u16::from(i)).count();
        assert!(own <= 1, "sent under the clients' own IDs: {:?}", seen.1);
    }

    answering.store(false, Ordering::SeqCst);
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let ask = |packet: Vec<u8>| {
        let client = &client;
        async move {
            client.send_to(&packet, dns).await.unwrap();
            let mut buf = [0u8; 512];
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf)).await.unwrap().unwrap();
            Message::from_vec(&buf[..n]).unwrap()
        }
    };
    assert_eq!(ask(query(7, "n7.test.")).await.response_code(), ResponseCode::ServFail, "a silent upstream");
    let local = ask(query(8, "local.extsvc.mesh.local.")).await;
    assert_eq!(local.response_code(), ResponseCode::NoError);
    assert_eq!(local.answers().len(), 1, "local answers are unaffected");
    answering.store(true, Ordering::SeqCst);
    let back = ask(query(9, "n9.test.")).await;
    assert_eq!((back.id(), back.answers()[0].data().as_a().unwrap().0), (9, std::net::Ipv4Addr::new(192, 0, 2, 9)));
}

/// A TLS endpoint that answers, then sends a fatal alert in the middle of the stream: the
/// application gets what came before, then its connection ends; the proxy and the next
/// connection are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_alert_mid_stream_ends_that_connection_only() {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject;
    let ca = common::pki::Ca::new("alert-ca");
    let leaf = ca.server(&["alert.test"]);
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(common::pki::certs(&leaf.cert_pem), key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    let _server = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            n += 1;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let _ = tls.write_all(format!("hello {n}\n").as_bytes()).await;
                let _ = tls.flush().await;
                if n == 1 {
                    // A fatal alert (internal_error), in the clear, mid-stream.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let _ = tls.get_mut().0.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50]).await;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else {
                    let mut buf = [0u8; 64];
                    while let Ok(read) = tls.read(&mut buf).await {
                        if read == 0 || tls.write_all(&buf[..read]).await.is_err() {
                            break;
                        }
                    }
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: alert.test\n      caCert:\n        inline: {}\n",
        b64(&ca.pem)
    );
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_outbound("alerting", outbound, &endpoint("127.0.0.1", server.port(), 0), &tls));
    let _proxy = start(options(config)).await;

    let mut first = TcpStream::connect(outbound).await.unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), first.read_to_end(&mut got)).await;
    assert!(ended.is_ok(), "the connection ends when the alert arrives, not at a timeout");
    assert_eq!(String::from_utf8_lossy(&got), "hello 1\n", "what came before the alert arrives");

    let mut second = TcpStream::connect(outbound).await.unwrap();
    second.write_all(b"ping").await.unwrap();
    second.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), second.read_to_string(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, "hello 2\nping");
}

/// An endpoint that closes a kept-alive connection as the next request arrives (its keep-alive
/// timeout racing the reuse): an idempotent request without a body is sent again on a new
/// connection; a POST is not (it may have been processed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_as_it_is_reused_is_retried_for_idempotent_requests() {
    use common::http_client::{h1, text};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let _server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                // Answers the first request, then closes as the second one arrives.
                for request in 0.. {
                    if read_head(&mut tcp).await.is_err() {
                        return;
                    }
                    if request == 1 {
                        return;
                    }
                    let body = format!("connection {n}");
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                    if tcp.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let (outbound, _dir, config) = single_service("racy", "http", port);
    let _proxy = start(options(config)).await;
    let send = |method: &'static str| async move {
        let req = http::Request::builder()
            .method(method)
            .uri("http://racy/")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        text(h1(outbound).await.send_request(req).await.unwrap()).await
    };
    assert_eq!(send("GET").await, (http::StatusCode::OK, "connection 1".to_string()));
    // Idle long enough to count as a connection the endpoint may close.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(send("GET").await, (http::StatusCode::OK, "connection 2".to_string()), "sent again on a new one");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _) = send("POST").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "a POST is not sent twice");
    assert_eq!(send("GET").await, (http::StatusCode::OK, "connection 3".to_string()));
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

/// The limits in the docs' table are flags: fewer request headers allowed means 431 sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_limits_follow_their_flags() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let (outbound, _dir, config) = single_service("limited", "http", upstream.addr.port());
    let mut opts = options(config);
    opts.http_limits.max_headers = 8;
    let _proxy = start(opts).await;
    let request = |headers: usize| {
        let mut req = String::from("GET / HTTP/1.1\r\nHost: limited\r\nConnection: close\r\n");
        for i in 0..headers {
            req.push_str(&format!("x-h{i}: v\r\n"));
        }
        req + "\r\n"
    };
    for (headers, status) in [(3, "200"), (12, "431")] {
        let mut s = TcpStream::connect(outbound).await.unwrap();
        s.write_all(request(headers).as_bytes()).await.unwrap();
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {status}")), "{headers} headers: {out}");
    }
}
