//! The training load of a profile-guided build (`scripts/pgo-build`): runs a mesh-egress binary
//! (the instrumented one) against `bench_upstream` and sends through it the traffic of every data
//! path users run, in about the proportions a busy sidecar sees: HTTP/1.1 on pooled keep-alive
//! connections and one connection per request, h2 and gRPC multiplexed, the same with the policies
//! (MeshTimeout, MeshRetry, MeshCircuitBreaker), TLS origination for HTTP/1.1, h2 and TCP, TCP
//! request/response and bulk flows. Code this load does not reach is what the compiler then treats
//! as cold. Every answer is checked; any wrong one, or the proxy exiting other than cleanly when
//! asked to (`POST /quitquitquit`, which writes the profile), fails the run.
//!
//! ```text
//! pgo_train --proxy PATH --upstream PATH [--requests N]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a harness: failing loudly is right

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HELLO: &[u8] = b"hello world\n";
/// One gRPC message (`bench_upstream` echoes it) with its 5-byte frame header.
const GRPC_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x0a0123456789";

/// The services, each with its protocol, endpoint (an upstream port by index), TLS and policies.
const SERVICES: &[(&str, &str, Upstream, bool)] = &[
    ("http", "http", Upstream::Http, false),
    ("http2", "http2", Upstream::Http, false),
    ("grpc", "grpc", Upstream::Http, false),
    ("http-policies", "http", Upstream::Http, false),
    ("https", "http", Upstream::Https, true),
    ("https2", "http2", Upstream::Https, true),
    ("tcp-echo", "tcp", Upstream::Echo, false),
    ("tcp-tls", "tcp", Upstream::Https, true),
];

#[derive(Clone, Copy)]
enum Upstream {
    Http,
    Https,
    Echo,
}

const POLICIES: &str = "type: MeshTimeout
name: train-timeouts
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default: {connectionTimeout: 5s, idleTimeout: 1h, http: {requestTimeout: 15s, streamIdleTimeout: 30m}}
---
type: MeshRetry
name: train-retries
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default: {http: {numRetries: 3, retryOn: [5xx, ConnectFailure]}}
---
type: MeshCircuitBreaker
name: train-limits
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      default:
        connectionLimits: {maxConnections: 100000, maxPendingRequests: 100000, maxRequests: 100000}
        outlierDetection: {detectors: {totalFailures: {consecutive: 5}}}
";

struct Args {
    proxy: PathBuf,
    upstream: PathBuf,
    requests: usize,
}

fn args() -> Args {
    let mut proxy = None;
    let mut upstream = None;
    let mut requests = 20_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => proxy = Some(PathBuf::from(value)),
            "--upstream" => upstream = Some(PathBuf::from(value)),
            "--requests" => requests = value.parse().expect("--requests: a number"),
            _ => panic!("unknown argument {flag}; usage: pgo_train --proxy PATH --upstream PATH [--requests N]"),
        }
    }
    Args {
        proxy: proxy.expect("--proxy PATH is required"),
        upstream: upstream.expect("--upstream PATH is required"),
        requests,
    }
}

/// `n` ports free right now (held together while picked, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<StdListener> = (0..n).map(|_| StdListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Kills the child when the run fails part-way, so no process outlives the build.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path, upstream_ports: [u16; 3], ca: &str, outbound: &[u16]) -> PathBuf {
    let ca: String = ca.lines().map(|line| format!("          {line}\n")).collect();
    let mut docs = Vec::new();
    let mut outbounds = String::new();
    for ((name, protocol, upstream, tls), port) in SERVICES.iter().zip(outbound) {
        let endpoint = upstream_ports[*upstream as usize];
        let mut doc = format!(
            "type: MeshExternalService\nname: {name}\nspec:\n  match: {{port: {endpoint}, protocol: {protocol}}}\n  \
             endpoints: [{{address: 127.0.0.1, port: {endpoint}}}]\n"
        );
        if *tls {
            doc += &format!(
                "  tls:\n    enabled: true\n    verification:\n      serverName: bench.test\n      caCert:\n        \
                 inlineString: |\n{ca}"
            );
        }
        docs.push(doc);
        outbounds += &format!("    - port: {port}\n      backendRef: {{kind: MeshExternalService, name: {name}}}\n");
    }
    docs.push(POLICIES.to_string());
    docs.push(format!("type: Dataplane\nname: train\nnetworking:\n  outbound:\n{outbounds}"));
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, docs.join("---\n")).unwrap();
    path
}

async fn wait_ready(admin: SocketAddr, proxy: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(status) = proxy.try_wait().unwrap() {
            panic!("the proxy exited before it was ready: {status}");
        }
        if let Ok(response) = http1_request(admin, Method::GET, "/ready", Bytes::new()).await {
            if response.0 == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the proxy was not ready within 60 s");
}

/// One request on a connection of its own: (status, body).
async fn http1_request(to: SocketAddr, method: Method, path: &str, body: Bytes) -> anyhow::Result<(StatusCode, Bytes)> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(to).await?)).await?;
    tokio::spawn(conn);
    let request = Request::builder().method(method).uri(path).header(header::HOST, "train").body(Full::new(body))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

/// `n` requests over `conns` keep-alive HTTP/1.1 connections, one at a time on each.
async fn http1_keep_alive(to: SocketAddr, conns: usize, n: usize) {
    let tasks = (0..conns).map(|_| {
        tokio::spawn(async move {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(TcpStream::connect(to).await.unwrap()))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            for _ in 0..n / conns {
                let request = Request::get("/").header(header::HOST, "train").body(Full::new(Bytes::new())).unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "HTTP/1.1 through {to}");
                assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), HELLO);
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
}

/// `n` requests (gRPC calls with `grpc`) over one h2c connection, `streams` at a time.
async fn h2(to: SocketAddr, streams: usize, n: usize, grpc: bool) {
    let io = TokioIo::new(TcpStream::connect(to).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let tasks = (0..streams).map(|_| {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            for _ in 0..n / streams {
                let request = if grpc {
                    Request::post(format!("http://{to}/bench.Echo/Unary"))
                        .header(header::CONTENT_TYPE, "application/grpc")
                        .header(header::TE, "trailers")
                        .body(Full::new(Bytes::from_static(GRPC_MESSAGE)))
                } else {
                    Request::get(format!("http://{to}/")).body(Full::new(Bytes::new()))
                };
                let response = sender.send_request(request.unwrap()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "h2 through {to}");
                let body = response.into_body().collect().await.unwrap();
                if grpc {
                    let status = body.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
                    assert_eq!(status.as_deref(), Some(&b"0"[..]), "gRPC through {to}");
                    assert_eq!(body.to_bytes(), GRPC_MESSAGE);
                } else {
                    assert_eq!(body.to_bytes(), HELLO);
                }
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
}

/// A request with `Connection: close` on a raw TCP connection, read to the end (the tcp-tls
/// service originates TLS for it, one handshake per connection).
async fn tcp_http_close(to: SocketAddr, n: usize) {
    for _ in 0..n {
        let mut stream = TcpStream::connect(to).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nhost: bench.test\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(HELLO), "TCP+TLS through {to}");
    }
}

/// `n` 64-byte request/response exchanges over `conns` TCP connections to the echo upstream.
async fn tcp_echo(to: SocketAddr, conns: usize, n: usize) {
    let tasks = (0..conns).map(|_| {
        tokio::spawn(async move {
            let mut stream = TcpStream::connect(to).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (out, mut back) = ([7u8; 64], [0u8; 64]);
            for _ in 0..n / conns {
                stream.write_all(&out).await.unwrap();
                stream.read_exact(&mut back).await.unwrap();
                assert_eq!(back, out, "TCP echo through {to}");
            }
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        task.await.unwrap();
    }
}

/// `mib` MiB written to the echo upstream while the echo is read back: both directions of a
/// bulk flow (the proxy's splice path).
async fn tcp_bulk(to: SocketAddr, mib: usize) {
    let stream = TcpStream::connect(to).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5a; 1 << 20];
        for _ in 0..mib {
            write.write_all(&chunk).await.unwrap();
        }
        write.shutdown().await.unwrap();
    });
    let mut buf = vec![0; 1 << 16];
    let mut total = 0;
    loop {
        let n = read.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == 0x5a), "bulk echo through {to}");
        total += n;
    }
    writer.await.unwrap();
    assert_eq!(total, mib << 20, "bulk echo through {to}");
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let n = args.requests;
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(4 + SERVICES.len());
    let (upstream_ports, admin, outbound) = ([ports[0], ports[1], ports[2]], ports[3], &ports[4..]);

    let ca_file = dir.path().join("ca.pem");
    let mut upstream = Reaped(
        Command::new(&args.upstream)
            .args(["--http", &format!("127.0.0.1:{}", upstream_ports[0])])
            .args(["--https", &format!("127.0.0.1:{}", upstream_ports[1])])
            .args(["--tcp", &format!("127.0.0.1:{}", upstream_ports[2])])
            .arg("--ca-out")
            .arg(&ca_file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", args.upstream.display())),
    );
    let mut ready = String::new();
    BufReader::new(upstream.0.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready", "bench_upstream did not start");

    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let mesh = config(dir.path(), upstream_ports, &ca, outbound);
    let admin_addr: SocketAddr = ([127, 0, 0, 1], admin).into();
    let mut proxy = Reaped(
        Command::new(&args.proxy)
            .arg("run")
            .arg("-c")
            .arg(&mesh)
            .args(["--workers", "1", "--admin", &admin_addr.to_string(), "--readiness-port", "off"])
            .args(["--transparent", "off", "--dns", "off", "--no-watch", "--state-dir"])
            .arg(dir.path())
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", args.proxy.display())),
    );
    wait_ready(admin_addr, &mut proxy.0).await;

    let to = |name: &str| -> SocketAddr {
        let i = SERVICES.iter().position(|s| s.0 == name).unwrap();
        ([127, 0, 0, 1], outbound[i]).into()
    };
    let started = Instant::now();
    http1_keep_alive(to("http"), 16, n).await;
    http1_keep_alive(to("http-policies"), 16, n / 2).await;
    http1_keep_alive(to("https"), 16, n / 2).await;
    for _ in 0..n / 20 {
        let (status, body) = http1_request(to("http"), Method::GET, "/", Bytes::new()).await.unwrap();
        assert!(status == StatusCode::OK && body == HELLO, "HTTP/1.1, a connection per request");
    }
    h2(to("http2"), 10, n, false).await;
    h2(to("grpc"), 10, n, true).await;
    h2(to("https2"), 10, n / 2, false).await;
    tcp_echo(to("tcp-echo"), 16, n).await;
    tcp_http_close(to("tcp-tls"), n / 50).await;
    for _ in 0..4 {
        tcp_bulk(to("tcp-echo"), (n / 300).max(1)).await; // 66 MiB each way at 20,000 requests
    }
    eprintln!("pgo_train: {n} requests a kind, sent in {:.1?}", started.elapsed());

    let (status, _) = http1_request(admin_addr, Method::POST, "/quitquitquit", Bytes::new()).await.unwrap();
    assert_eq!(status, StatusCode::OK, "POST /quitquitquit");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the proxy did not exit within 30 s of /quitquitquit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "the proxy exited with {exit}");
}
