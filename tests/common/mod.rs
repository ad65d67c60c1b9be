//! Shared helpers for integration tests: in-process upstreams, a DNS server, and a proxy.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

pub mod grpc;
pub mod http_client;
pub mod http_upstream;
pub mod pki;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_egress::catalog::CompileOptions;
use mesh_egress::listen::{OriginalDst, SoOriginalDst};
use mesh_egress::server::{Options, Server};
use mesh_egress::upstream::{EjectionPolicy, ResolverSource, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// Reads an HTTP/1 head, byte by byte so nothing after it is consumed: the head, or what came
/// before the stream closed or failed.
pub async fn read_head(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Result<Vec<u8>, Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return Err(head),
        }
    }
    Ok(head)
}

/// An address nothing listens on (bound, then released), with a port below the kernel's
/// ephemeral range, handed out once per process: no `bind(0)` of another test's server and no
/// outgoing connection can take it before the test binds it, and no two callers share one (both
/// happened with ports from `bind(0)`).
pub fn free_addr(ip: &str) -> SocketAddr {
    static NEXT: Mutex<Option<u16>> = Mutex::new(None);
    let ip = ip.parse::<IpAddr>().unwrap();
    static EPHEMERAL_LOW: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    let ephemeral_low = *EPHEMERAL_LOW.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768)
    });
    if ephemeral_low < 4096 {
        // No room below the ephemeral range: the kernel's choice.
        return std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap();
    }
    let floor = ephemeral_low.saturating_sub(12_000).max(1024);
    let span = ephemeral_low - floor;
    let mut next = NEXT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    // Test binaries run one after another: each starts elsewhere in the span.
    let first = *next.get_or_insert(floor + u16::try_from(std::process::id() % u32::from(span)).unwrap());
    for step in 0..span {
        let port = floor + (first - floor + step) % span;
        if let Ok(listener) = std::net::TcpListener::bind((ip, port)) {
            *next = Some(floor + (port - floor + 1) % span);
            return listener.local_addr().unwrap();
        }
    }
    panic!("no free port on {ip} between {floor} and {ephemeral_low}");
}

/// A dead endpoint: an address nothing listens on, on 127.0.9.1, where no test runs a server.
pub fn dead_addr() -> SocketAddr {
    free_addr("127.0.9.1")
}

/// A TCP server that greets with `name\n`, echoes what it reads, and on the client's FIN
/// writes `<eof>` and closes: shows both directions and half-close.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn echo_server(addr: SocketAddr, name: &str) -> Upstream {
    let listener = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let name = name.clone();
            tokio::spawn(async move {
                let _ = echo(stream, &name).await;
            });
        }
    });
    Upstream { addr, task }
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S, name: &str) -> io::Result<()> {
    stream.write_all(format!("{name}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.write_all(&buf[..n]).await?;
    }
    stream.write_all(b"<eof>").await?;
    stream.shutdown().await
}

pub async fn unix_echo_server(path: &Path, name: &str) -> JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let name = name.clone();
            tokio::spawn(async move {
                let _ = echo(stream, &name).await;
            });
        }
    })
}

/// Connects, reads the greeting line, and returns it with the stream.
pub async fn greet(addr: SocketAddr) -> io::Result<(String, TcpStream)> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("closed after {line:?}")));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok((String::from_utf8_lossy(&line).into_owned(), stream))
}

/// A DNS server on loopback answering A queries from a table that tests can change.
pub struct DnsServer {
    pub addr: SocketAddr,
    pub records: Arc<Mutex<HashMap<String, Ipv4Addr>>>,
    pub queries: Arc<std::sync::atomic::AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub fn set(&self, name: &str, ip: Ipv4Addr) {
        self.records.lock().unwrap().insert(format!("{}.", name.trim_end_matches('.')), ip);
    }
}

pub async fn dns_server(ttl: u32) -> DnsServer {
    dns_server_on("127.0.0.1:0".parse().unwrap(), ttl).await
}

pub async fn dns_server_on(addr: SocketAddr, ttl: u32) -> DnsServer {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let socket = UdpSocket::bind(addr).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let records: Arc<Mutex<HashMap<String, Ipv4Addr>>> = Arc::default();
    let queries: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
    let (table, count) = (records.clone(), queries.clone());
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else { return };
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut response = Message::new();
            response.set_id(query.id()).set_message_type(MessageType::Response).set_recursion_desired(true);
            response.set_recursion_available(true).set_authoritative(true);
            for q in query.queries() {
                response.add_query(q.clone());
                let name = q.name().to_ascii().to_lowercase();
                let ip = table.lock().unwrap().get(&name).copied();
                match (q.query_type(), ip) {
                    (RecordType::A, Some(ip)) => {
                        response.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
                    }
                    (_, Some(_)) => {}
                    (_, None) => {
                        response.set_response_code(ResponseCode::NXDomain);
                    }
                }
            }
            if let Ok(bytes) = response.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    DnsServer { addr, records, queries, task }
}

/// Writes `yaml` into a fresh directory and returns it (kept alive by the returned guard).
pub fn config_dir(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

pub fn options(config: PathBuf) -> Options {
    Options {
        config_paths: vec![config],
        request_timeout: Some(Duration::from_secs(10)),
        state_dir: None,
        compile: CompileOptions::default(),
        admin: None,
        admin_unix: None,
        readiness: None,
        command_line: Vec::new(),
        log_control: None,
        admin_timeouts: Default::default(),
        dns_limits: Default::default(),
        http_limits: Default::default(),
        dns: None,
        dns_forwarders: Vec::new(),
        transparent: None,
        bind_vips: false,
        listen_allow_remote: false,
        timeouts: Default::default(),
        upgrade_protocols: vec!["websocket".to_string()],
        passthrough: true,
        access_log: None,
        workers: Vec::new(),
        upstream: Settings {
            connect_timeout: Duration::from_secs(2),
            max_connections: mesh_egress::upstream::DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Duration::from_secs(30),
            ejection: EjectionPolicy { consecutive_failures: 2, base_time: Duration::from_millis(500) },
            resolver: ResolverSource::new(Vec::new()),
        },
    }
}

pub async fn start(options: Options) -> Server {
    start_with(options, Arc::new(SoOriginalDst)).await
}

pub async fn start_with(options: Options, original_dst: Arc<dyn OriginalDst>) -> Server {
    log_warnings();
    Server::start(options, original_dst).await.unwrap_or_else(|e| panic!("proxy did not start: {e}"))
}

/// The proxy's warnings and errors (`RUST_LOG` for more) go to the test's captured output, so
/// a failing test shows why the proxy closed a connection or refused a request.
pub fn log_warnings() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_test_writer().try_init();
}

/// A proxy with a transparent listener on loopback whose original destinations the test
/// chooses ([`InjectedOriginalDst::connect`]).
pub async fn start_transparent(mut options: Options) -> (Server, Arc<InjectedOriginalDst>) {
    options.transparent = Some("127.0.0.1:0".parse().unwrap());
    let injected = Arc::new(InjectedOriginalDst::default());
    (start_with(options, injected.clone()).await, injected)
}

/// Original destinations chosen by the test, keyed by the client's address.
#[derive(Default)]
pub struct InjectedOriginalDst(pub Mutex<HashMap<SocketAddr, SocketAddr>>);

impl OriginalDst for InjectedOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let peer = stream.peer_addr()?;
        self.0.lock().unwrap().get(&peer).copied().ok_or_else(|| io::Error::other("not redirected"))
    }
}

impl InjectedOriginalDst {
    /// Connects to `listener` as if the application had dialled `dst` and been redirected.
    pub async fn connect(&self, listener: SocketAddr, dst: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.0.lock().unwrap().insert(socket.local_addr().unwrap(), dst);
        socket.connect(listener).await.unwrap()
    }
}

/// A MeshExternalService plus a Dataplane outbound for it on `outbound`.
pub fn service_with_outbound(name: &str, outbound: SocketAddr, endpoints: &str, extra: &str) -> String {
    format!(
        "type: MeshExternalService\nname: {name}\nmesh: default\nspec:\n  match:\n    port: 9000\n    protocol: tcp\n  endpoints:\n{endpoints}{extra}\n---\ntype: Dataplane\nname: app-{name}\nmesh: default\nnetworking:\n  outbound:\n    - address: {}\n      port: {}\n      backendRef: {{kind: MeshExternalService, name: {name}}}\n",
        outbound.ip(),
        outbound.port()
    )
}

pub fn endpoint(address: &str, port: u16, priority: u8) -> String {
    format!("    - address: {address}\n      port: {port}\n      priority: {priority}\n")
}

/// Waits until `check` returns true, panicking with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines of a log file so far (none while it does not exist).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|t| t.lines().map(str::to_string).collect()).unwrap_or_default()
}

/// The lines of a log file once it has at least `n`.
pub async fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    eventually("access log lines", Duration::from_secs(10), || async { lines(path).len() >= n }).await;
    lines(path)
}

/// The lines of a JSON log file once it has at least `n`, parsed.
pub async fn wait_for_json_lines(path: &Path, n: usize) -> Vec<serde_json::Value> {
    wait_for_lines(path, n).await.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `mesh-egress run` on `config` with its admin on `admin`, no transparent or DNS listener.
pub fn spawn_proxy(config: &Path, admin: SocketAddr, extra: &[&str], env: &[(&str, &Path)]) -> KillOnDrop {
    let admin = admin.to_string();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-egress"));
    cmd.args(["run", "-c", config.to_str().unwrap(), "--admin", &admin, "--transparent", "off", "--dns", "off"])
        .args(["--readiness-port", "off"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    KillOnDrop(cmd.spawn().expect("start mesh-egress"))
}

/// A process's peak resident memory (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One `protocol` service on a fresh loopback outbound, its endpoint 127.0.0.1:`port`, written
/// to a new configuration directory: the outbound, the directory guard and the file.
pub fn single_service(name: &str, protocol: &str, port: u16) -> (SocketAddr, tempfile::TempDir, PathBuf) {
    let outbound = free_addr("127.0.0.1");
    let (dir, config) =
        config_dir(&service_with_protocol(name, protocol, outbound, &endpoint("127.0.0.1", port, 0), ""));
    (outbound, dir, config)
}

/// [`service_with_outbound`] with another protocol than tcp.
pub fn service_with_protocol(name: &str, protocol: &str, outbound: SocketAddr, endpoints: &str, extra: &str) -> String {
    service_with_outbound(name, outbound, endpoints, extra).replace("protocol: tcp", &format!("protocol: {protocol}"))
}

/// The OTLP receiver (Python, grpcio, `tests/peers/otlp_receiver.py`): its port and its output
/// lines (one JSON object per log record or span).
pub struct OtlpReceiver {
    pub child: KillOnDrop,
    pub port: u16,
    pub lines: std::sync::mpsc::Receiver<String>,
}

pub fn otlp_receiver() -> OtlpReceiver {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run .ci/run, or `python3 -m venv target/venv && target/venv/bin/pip install grpcio opentelemetry-proto`",
        python.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/otlp_receiver.py");
    let mut child =
        std::process::Command::new(python).arg(script).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(30)).expect("the OTLP receiver did not start");
    let port =
        first.strip_prefix("port ").and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("unexpected: {first}"));
    OtlpReceiver { child: KillOnDrop(child), port, lines }
}
