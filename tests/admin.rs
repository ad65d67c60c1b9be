//! The admin server of the real binary, driven by curl: every path's status and content type,
//! POST-only mutations (refused on a non-loopback admin), the log filter changed at run time,
//! the readiness port, the unix-socket admin, /drain_listeners and /quitquitquit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_mesh-egress");

struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(config: &Path, args: &[&str], stderr: &Path) -> Proxy {
    let child = Command::new(BIN)
        .args(["run", "-c", config.to_str().unwrap(), "--transparent", "off", "--dns", "off"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    Proxy(child)
}

/// `curl` with `extra` arguments: (status, content type, body).
fn curl(extra: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code} %{content_type}"])
        .args(extra)
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap_or(0), content_type.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    curl(&[&format!("http://{addr}{path}")])
}

fn post(addr: SocketAddr, path: &str) -> (u16, String, String) {
    curl(&["-X", "POST", &format!("http://{addr}{path}")])
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_readiness_port_log_level_drain_and_quit() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (dir, config) = config_dir(&service_with_protocol(
        "web",
        "http",
        outbound,
        &endpoint("127.0.0.1", upstream.addr.port(), 0),
        "",
    ));
    let (admin, readiness) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let stderr = dir.path().join("stderr.log");
    let args = ["--admin", &admin.to_string(), "--readiness-port", &readiness.port().to_string()];
    let mut proxy = start(&config, &args, &stderr);
    wait_until("/ready", || get(admin, "/ready").0 == 200);
    let readiness: SocketAddr = ([127, 0, 0, 1], readiness.port()).into();

    // Every GET path: status and content type.
    for (path, content_type, contains) in [
        ("/", "text/plain; charset=utf-8", "/clusters"),
        ("/ready", "text/plain; charset=utf-8", "ready"),
        ("/metrics", "application/openmetrics-text; version=1.0.0; charset=utf-8", "mesh_egress_connections_total"),
        (
            "/stats/prometheus",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "mesh_egress_connections_total",
        ),
        (
            "/stats",
            "text/plain; charset=utf-8",
            "mesh_egress_connections_total{service=\"default/web\",protocol=\"http\"}: 0",
        ),
        ("/clusters", "text/plain; charset=utf-8", &format!("default/web::{}::health_flags::healthy", upstream.addr)),
        ("/server_info", "application/json", "\"state\": \"LIVE\""),
        ("/listeners", "text/plain; charset=utf-8", &format!("outbound {outbound}")),
        ("/config_dump", "application/json", "\"services\""),
        ("/endpoints", "application/json", "\"targets\""),
    ] {
        let (status, ct, body) = get(admin, path);
        assert_eq!((status, ct.as_str()), (200, content_type), "{path}: {body}");
        assert!(body.contains(contains), "{path} has {contains:?}:\n{body}");
    }
    let (_, _, clusters) = get(admin, "/clusters");
    assert!(clusters.contains("default/web::default_priority::max_connections::1024"), "{clusters}");
    let (_, _, listeners) = get(admin, "/listeners?format=json");
    let listeners: serde_json::Value = serde_json::from_str(&listeners).unwrap();
    let all: Vec<&str> = listeners["listeners"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(all.contains(&format!("admin {admin}").as_str()), "{all:?}");
    assert!(all.iter().any(|l| l.starts_with("readiness 0.0.0.0:")), "{all:?}");
    let info: serde_json::Value = serde_json::from_str(&get(admin, "/server_info").2).unwrap();
    assert!(info["version"].as_str().unwrap().starts_with("mesh-egress/"));
    assert!(info["command_line_options"]["argv"].as_array().unwrap().iter().any(|a| a == "--readiness-port"));
    assert_eq!(get(admin, "/nothing").0, 404);

    // Mutations are POST only; reads are GET only.
    let (status, _, body) = get(admin, "/healthcheck/fail");
    assert_eq!(status, 405, "{body}");
    assert_eq!(curl(&["-X", "POST", &format!("http://{admin}/metrics")]).0, 405);
    let headers = curl(&["-D", "-", "-o", "/dev/null", &format!("http://{admin}/quitquitquit")]).2;
    assert!(headers.to_lowercase().contains("allow: post"), "{headers}");

    // The readiness port answers /ready only, and follows /healthcheck/fail and /ok.
    assert_eq!(get(readiness, "/ready").0, 200);
    assert_eq!(get(readiness, "/metrics").0, 404);
    assert_eq!(post(admin, "/healthcheck/fail").0, 200);
    assert_eq!(get(admin, "/ready").0, 503);
    assert_eq!(get(readiness, "/ready").0, 503);
    assert_eq!(post(admin, "/healthcheck/ok").0, 200);
    assert_eq!(get(readiness, "/ready").0, 200);

    // The log filter changes without a restart.
    let debug_line = "admin request";
    assert!(!std::fs::read_to_string(&stderr).unwrap().contains(debug_line), "info: no debug lines yet");
    assert_eq!(get(admin, "/logging").2.trim_end(), "active filter: info");
    let (status, _, body) = post(admin, "/logging?level=debug");
    assert_eq!((status, body.trim_end()), (200, "active filter: debug"));
    get(admin, "/ready");
    wait_until("a debug line", || std::fs::read_to_string(&stderr).unwrap().contains(debug_line));
    let (status, _, body) = post(admin, "/logging?paths=upstream:trace,proxy::http:warn");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("mesh_egress::upstream=trace")
            && body.contains("mesh_egress::proxy::http=warn")
            && body.contains("debug"),
        "{body}"
    );
    assert_eq!(post(admin, "/logging?level=not-a-level!").0, 400);
    assert_eq!(post(admin, "/logging").0, 400);

    // /drain_listeners: no new connections, the process stays; /quitquitquit: it exits, 0.
    assert!(std::net::TcpStream::connect(outbound).is_ok());
    assert_eq!(post(admin, "/drain_listeners?graceful").0, 200);
    wait_until("the outbound stops accepting", || std::net::TcpStream::connect(outbound).is_err());
    let info: serde_json::Value = serde_json::from_str(&get(admin, "/server_info").2).unwrap();
    assert_eq!(info["state"], "DRAINING");
    assert_eq!(get(admin, "/ready").0, 503);
    assert_eq!(post(admin, "/quitquitquit").0, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = proxy.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after /quitquitquit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn a_non_loopback_admin_refuses_mutations_and_a_unix_admin_takes_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "type: MeshExternalService\nname: x\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: 127.0.0.1, port: 9}]\n").unwrap();
    let port = free_addr("127.0.0.1").port();
    let wide = format!("0.0.0.0:{port}");
    let _remote = start(
        &config,
        &["--admin", &wide, "--admin-allow-remote", "--readiness-port", "off"],
        &dir.path().join("a.log"),
    );
    let admin: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until("/ready", || get(admin, "/ready").0 == 200);
    let (status, _, body) = post(admin, "/healthcheck/fail");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback or unix-socket admin"), "{body}");
    assert_eq!(get(admin, "/ready").0, 200, "nothing changed");

    let socket = dir.path().join("admin.sock");
    let unix = format!("unix://{}", socket.display());
    let _local = start(&config, &["--admin", &unix, "--readiness-port", "off"], &dir.path().join("b.log"));
    let over_unix = |method: &str, path: &str| {
        curl(&["--unix-socket", socket.to_str().unwrap(), "-X", method, &format!("http://admin{path}")])
    };
    wait_until("/ready over the unix socket", || over_unix("GET", "/ready").0 == 200);
    assert_eq!(over_unix("POST", "/healthcheck/fail").0, 200);
    assert_eq!(over_unix("GET", "/ready").0, 503);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660, "owner and group only");
}
