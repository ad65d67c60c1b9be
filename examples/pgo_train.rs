//! The training load of a profile-guided build (`scripts/pgo-build`): runs a mesh-egress binary
//! (the instrumented one) against `bench_upstream` and sends through it the traffic of the data
//! paths a sidecar's requests take, in about the proportions a busy one sees: HTTP/1.1 on pooled
//! keep-alive connections and one connection per request, GETs and POSTs (with a length and
//! chunked), chunked responses, h2 and gRPC multiplexed, a service with MeshTimeout, MeshRetry,
//! MeshCircuitBreaker and a MeshHTTPRoute, the access log, TLS origination for HTTP/1.1, h2 and
//! TCP, TCP request/response and bulk flows. Code this load does not reach is what the compiler
//! then treats as cold: the DNS proxy, the transparent listener and passthrough, endpoints given
//! by name (docs/benchmarks.md, "Profile-guided build").
//!
//! It fails, naming the step, on any wrong answer, a step that takes over two minutes, a warning
//! or error the proxy logs, a service whose request count or a bulk flow whose spliced bytes
//! say the traffic did not go the intended way, or the proxy exiting other than cleanly when
//! asked (`POST /quitquitquit`, which writes the profile).
//!
//! ```text
//! pgo_train --proxy PATH --upstream PATH [--requests N]    (N >= 1000; default 20,000)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a harness: failing loudly is right

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HELLO: &[u8] = b"hello world\n";
/// `bench_upstream`'s `/chunked` answer: 8 pieces of 4 KiB, no length.
const CHUNKED_LEN: usize = 8 * 4096;
/// One gRPC message (`bench_upstream` echoes it) with its 5-byte frame header.
const GRPC_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x0a0123456789";
/// The longest a step may take, and the proxy's start and exit.
const STEP_LIMIT: Duration = Duration::from_secs(120);

/// The services: name, protocol, endpoint (an upstream by kind), TLS origination.
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

/// The http-policies service's policies and route (its `/api` requests get a header and a
/// rewritten path on the way).
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
---
type: MeshHTTPRoute
name: train-route
spec:
  to:
    - targetRef: {kind: MeshExternalService, name: http-policies}
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}}]
          default:
            filters:
              - type: RequestHeaderModifier
                requestHeaderModifier: {set: [{name: x-train, value: route}]}
              - type: URLRewrite
                urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
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
    // Below this, some kinds below would send nothing (they send n / 50, n / 20, n / 300).
    assert!(requests >= 1000, "--requests: at least 1000");
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

/// Runs one step of the load, or fails naming it.
async fn step<T>(name: &str, work: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(STEP_LIMIT, work)
        .await
        .unwrap_or_else(|_| panic!("{name}: not done within {STEP_LIMIT:?}"));
    eprintln!("pgo_train: {name} ({:.1?})", started.elapsed());
    out
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
    loop {
        if let Some(status) = proxy.try_wait().unwrap() {
            panic!("the proxy exited before it was ready: {status}");
        }
        if let Ok((StatusCode::OK, _)) = get(admin, "/ready").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `lanes` clients side by side, each a task of its own, and fails if one does.
async fn side_by_side<F>(lanes: usize, client: impl Fn() -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..lanes).map(|_| tokio::spawn(client())).collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// A connection with Nagle's algorithm off, as the proxy's own: a request written in two parts
/// (gRPC's HEADERS, then DATA) must not wait for the peer's delayed ACK.
async fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request on a connection of its own: (status, body).
async fn request(to: SocketAddr, method: Method, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(connect(to).await?)).await?;
    tokio::spawn(conn);
    let request =
        Request::builder().method(method).uri(path).header(header::HOST, "train").body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}

async fn get(to: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    request(to, Method::GET, path).await
}

/// What an HTTP/1.1 client sends in the keep-alive steps, in turn.
#[derive(Clone, Copy)]
enum H1Kind {
    Get,
    /// A GET answered with a chunked body.
    GetChunked,
    /// A POST with a `content-length` body.
    PostSized,
    /// A POST with a chunked body.
    PostChunked,
}

fn h1_request(
    kind: H1Kind,
    path: &str,
) -> Request<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
    let body = Bytes::from_static(&[b'p'; 512]);
    let (method, path, body) = match kind {
        H1Kind::Get => (Method::GET, path.to_string(), Full::new(Bytes::new()).boxed()),
        H1Kind::GetChunked => (Method::GET, "/chunked".to_string(), Full::new(Bytes::new()).boxed()),
        H1Kind::PostSized => (Method::POST, path.to_string(), Full::new(body).boxed()),
        H1Kind::PostChunked => {
            let frames = [Ok(Frame::data(body.slice(..256))), Ok(Frame::data(body.slice(256..)))];
            (Method::POST, path.to_string(), StreamBody::new(futures_util::stream::iter(frames)).boxed())
        }
    };
    Request::builder().method(method).uri(path).header(header::HOST, "train").body(body).unwrap()
}

/// `n` requests over `conns` keep-alive HTTP/1.1 connections, one at a time on each; of every 8
/// requests, 5 GETs, a GET with a chunked answer, a POST with a length, a chunked POST.
async fn http1_keep_alive(to: SocketAddr, path: &'static str, conns: usize, n: usize) {
    const MIX: [H1Kind; 8] = [
        H1Kind::Get,
        H1Kind::Get,
        H1Kind::PostSized,
        H1Kind::Get,
        H1Kind::GetChunked,
        H1Kind::Get,
        H1Kind::PostChunked,
        H1Kind::Get,
    ];
    side_by_side(conns, || async move {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(connect(to).await.unwrap())).await.unwrap();
        tokio::spawn(conn);
        for i in 0..n / conns {
            let kind = MIX[i % MIX.len()];
            let response = sender.send_request(h1_request(kind, path)).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "HTTP/1.1 through {to}");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            match kind {
                H1Kind::GetChunked => assert_eq!(body.len(), CHUNKED_LEN, "chunked answer through {to}"),
                _ => assert_eq!(body, HELLO, "HTTP/1.1 through {to}"),
            }
        }
    })
    .await;
}

/// `n` requests (gRPC calls with `grpc`) over one h2c connection, `streams` at a time.
async fn h2(to: SocketAddr, streams: usize, n: usize, grpc: bool) {
    let io = TokioIo::new(connect(to).await.unwrap());
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    side_by_side(streams, || {
        let mut sender = sender.clone();
        async move {
            for i in 0..n / streams {
                let chunked = !grpc && i % 8 == 4;
                let request = if grpc {
                    Request::post(format!("http://{to}/bench.Echo/Unary"))
                        .header(header::CONTENT_TYPE, "application/grpc")
                        .header(header::TE, "trailers")
                        .body(Full::new(Bytes::from_static(GRPC_MESSAGE)))
                } else {
                    let path = if chunked { "/chunked" } else { "/" };
                    Request::get(format!("http://{to}{path}")).body(Full::new(Bytes::new()))
                };
                let response = sender.send_request(request.unwrap()).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK, "h2 through {to}");
                let body = response.into_body().collect().await.unwrap();
                if grpc {
                    let status = body.trailers().and_then(|t| t.get("grpc-status")).map(|v| v.as_bytes().to_vec());
                    assert_eq!(status.as_deref(), Some(&b"0"[..]), "gRPC through {to}");
                    assert_eq!(body.to_bytes(), GRPC_MESSAGE);
                } else if chunked {
                    assert_eq!(body.to_bytes().len(), CHUNKED_LEN, "h2 answer in pieces through {to}");
                } else {
                    assert_eq!(body.to_bytes(), HELLO);
                }
            }
        }
    })
    .await;
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
    side_by_side(conns, || async move {
        let mut stream = connect(to).await.unwrap();
        let (out, mut back) = ([7u8; 64], [0u8; 64]);
        for _ in 0..n / conns {
            stream.write_all(&out).await.unwrap();
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, out, "TCP echo through {to}");
        }
    })
    .await;
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

/// The sum of the `/metrics` samples named `name` whose labels include all of `labels`.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix) && labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    let log = dir.path().join("proxy.log");
    // A failure shows what the proxy logged (warnings and errors) before the run's files go.
    let default_hook = std::panic::take_hook();
    let log_path = log.clone();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
        eprintln!("pgo_train: the proxy's log so far:\n{logged}");
    }));
    let mut proxy = Reaped(
        Command::new(&args.proxy)
            .arg("run")
            .arg("-c")
            .arg(&mesh)
            .args(["--workers", "1", "--admin", &admin_addr.to_string(), "--readiness-port", "off"])
            .args(["--transparent", "off", "--dns", "off", "--no-watch", "--drain-timeout", "5s", "--state-dir"])
            .arg(dir.path())
            .arg("--access-log")
            .arg(dir.path().join("access.log"))
            .env("RUST_LOG", "warn")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", args.proxy.display())),
    );
    step("the proxy's start", wait_ready(admin_addr, &mut proxy.0)).await;

    let to = |name: &str| -> SocketAddr {
        let i = SERVICES.iter().position(|s| s.0 == name).unwrap();
        ([127, 0, 0, 1], outbound[i]).into()
    };
    step("HTTP/1.1", http1_keep_alive(to("http"), "/", 16, n)).await;
    step("HTTP/1.1 with policies and a route", http1_keep_alive(to("http-policies"), "/api/items", 16, n / 2)).await;
    step("HTTP/1.1, TLS to the endpoint", http1_keep_alive(to("https"), "/", 16, n / 2)).await;
    step("HTTP/1.1, a connection per request", async {
        for _ in 0..n / 20 {
            let (status, body) = get(to("http"), "/").await.unwrap();
            assert!(status == StatusCode::OK && body == HELLO, "HTTP/1.1, a connection per request");
        }
    })
    .await;
    step("h2", h2(to("http2"), 10, n, false)).await;
    step("gRPC", h2(to("grpc"), 10, n, true)).await;
    step("h2, TLS to the endpoint", h2(to("https2"), 10, n / 2, false)).await;
    step("TCP request/response", tcp_echo(to("tcp-echo"), 16, n)).await;
    step("TCP, TLS to the endpoint, a connection each", tcp_http_close(to("tcp-tls"), n / 50)).await;
    step("TCP bulk", async {
        for _ in 0..4 {
            tcp_bulk(to("tcp-echo"), (n / 300).max(1)).await; // 66 MiB each way at 20,000 requests
        }
    })
    .await;

    // The traffic went where it was meant to: every service counted its requests, and bulk flows
    // went by pipe.
    let (_, metrics) = step("/metrics", get(admin_addr, "/metrics")).await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics);
    let sent = |requests: usize, lanes: usize| requests / lanes * lanes; // each lane sends its share
    let expected = [
        ("http", sent(n, 16)),
        ("http-policies", sent(n / 2, 16)),
        ("https", sent(n / 2, 16)),
        ("http2", sent(n, 10)),
        ("grpc", sent(n, 10)),
    ];
    for (service, least) in expected {
        let service_label = format!("service=\"default/{service}\"");
        let counted = sample(&metrics, "mesh_egress_requests_total", &[&service_label, "status_class=\"2xx\""]);
        assert!(counted >= least as f64, "{service}: {counted} requests answered 2xx counted, {least} sent");
    }
    let spliced = sample(&metrics, "mesh_egress_upstream_bytes_spliced_total", &["service=\"default/tcp-echo\""]);
    assert!(spliced > 0.0, "no bulk byte went by pipe");

    let (status, _) = step("POST /quitquitquit", request(admin_addr, Method::POST, "/quitquitquit")).await.unwrap();
    assert_eq!(status, StatusCode::OK, "POST /quitquitquit");
    let exit = step("the proxy's exit", async {
        loop {
            if let Some(status) = proxy.0.try_wait().unwrap() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.trim().is_empty(), "the proxy logged warnings or errors:\n{logged}");
    assert!(exit.success(), "the proxy exited with {exit}");
}
