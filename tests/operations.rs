//! Operations: reload under load, admin API, metrics, access log, drain, SIGHUP and file watch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::http_upstream::http_upstream;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http_service(name: &str, outbound: SocketAddr, port: u16) -> String {
    service_with_outbound(name, outbound, &endpoint("127.0.0.1", port, 0), "")
        .replace("protocol: tcp", "protocol: http")
}

fn tcp_service(name: &str, outbound: SocketAddr, port: u16) -> String {
    service_with_outbound(name, outbound, &endpoint("127.0.0.1", port, 0), "")
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let io = TokioIo::new(TcpStream::connect(addr).await.map_err(|e| e.to_string())?);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", "app").body(Empty::new()).unwrap();
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn admin_get(addr: SocketAddr, path: &str) -> String {
    get(addr, path).await.unwrap().1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_request() {
    let (u_keep, u_old, u_new) = (http_upstream(None).await, http_upstream(None).await, http_upstream(None).await);
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [keep, changed, removed, added, tcp]: [SocketAddr; 5] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let before = [
        http_service("keep", keep, u_keep.addr.port()),
        http_service("changed", changed, u_old.addr.port()),
        tcp_service("removed", removed, echo.addr.port()),
        tcp_service("tcp", tcp, echo.addr.port()),
    ]
    .join("---\n");
    let after = [
        http_service("keep", keep, u_keep.addr.port()),
        http_service("changed", changed, u_new.addr.port()),
        tcp_service("added", added, echo.addr.port()),
        tcp_service("tcp", tcp, echo.addr.port()),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&before);
    let mut opts = options(config.clone());
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    let mut proxy = start(opts).await;
    let admin = proxy.admin_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::<String>::new())));
    let mut load = Vec::new();
    for target in [keep, changed] {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            // One keep-alive connection: a reload must not break it.
            let io = TokioIo::new(TcpStream::connect(target).await.unwrap());
            let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await.unwrap();
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let result = async {
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let req = http::Request::get("/").header("host", "app").body(Empty::new()).unwrap();
                    let r = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = r.status();
                    r.into_body().collect().await.map_err(|e| e.to_string())?;
                    if status == 200 {
                        Ok(())
                    } else {
                        Err(format!("status {status}"))
                    }
                }
                .await;
                match result {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failed.lock().unwrap().push(format!("{target}: {e}"));
                        0
                    }
                };
            }
        }));
    }
    {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match greet(tcp).await {
                    Ok((g, _)) if g == "echo" => done.fetch_add(1, Ordering::Relaxed),
                    other => {
                        failed.lock().unwrap().push(format!("tcp: {:?}", other.map(|(g, _)| g)));
                        0
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&config, &after).unwrap();
    proxy.reload().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // An invalid file changes nothing and is reported.
    std::fs::write(&config, format!("{after}---\ntype: MeshExternalService\nname: bad\nspec:\n  match: {{port: 0}}\n"))
        .unwrap();
    let err = proxy.reload().await.unwrap_err().to_string();
    assert!(err.contains("spec.match.port: port must be a valid (1-65535)"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} failures of {}: {failed:?}", failed.len(), done.load(Ordering::Relaxed));
    assert!(done.load(Ordering::Relaxed) > 30, "the load ran");

    assert_eq!(greet(added).await.unwrap().0, "echo", "added service listens");
    assert!(TcpStream::connect(removed).await.is_err(), "removed service's listener is gone");
    assert!(u_new.connections() >= 1, "the changed service now reaches its new endpoint");
    let before_new = u_new.connections();
    assert_eq!(get(changed, "/").await.unwrap().0, 200);
    assert_eq!(u_new.connections(), before_new, "pooled");
    assert_eq!(u_keep.connections(), 1, "the unchanged service kept its pooled upstream connection");
    let metrics = admin_get(admin, "/metrics").await;
    assert!(metrics.contains("mesh_egress_config_reloads_total{result=\"failure\"}"), "{metrics}");
    assert!(metrics.contains("mesh_egress_config_reloads_total{result=\"success\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_known_traffic() {
    let upstream = http_upstream(None).await;
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let (web, tcp) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let yaml = format!(
        "{}---\n{}",
        http_service("metrics-web", web, upstream.addr.port()),
        tcp_service("metrics-tcp", tcp, echo.addr.port())
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    for _ in 0..3 {
        assert_eq!(get(web, "/").await.unwrap().0, 200);
    }
    let (status, _) = get(web, "/x").await.unwrap();
    assert_eq!(status, 200);
    let mut not_found = TcpStream::connect(web).await.unwrap();
    not_found.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nx-status: 404\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    not_found.read_to_end(&mut sink).await.unwrap();
    let (_, mut stream) = greet(tcp).await.unwrap();
    stream.write_all(b"12345").await.unwrap();
    stream.shutdown().await.unwrap();
    stream.read_to_end(&mut sink).await.unwrap();
    drop(stream);
    // The TCP connection's bookkeeping ends once the proxy has seen both sides close.
    let admin = proxy.admin_addr().unwrap();
    eventually("the TCP connection counted as closed", Duration::from_secs(10), || async {
        admin_get(admin, "/metrics")
            .await
            .lines()
            .any(|l| l.starts_with("mesh_egress_connections_active{") && l.contains("metrics-tcp") && l.ends_with(" 0"))
    })
    .await;

    let text = admin_get(admin, "/metrics").await;
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("a Prometheus text parser reads /metrics");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
    };
    let web_labels = [("service", "default/metrics-web"), ("protocol", "http")];
    assert_eq!(value("mesh_egress_requests_total", &[web_labels[0], ("status_class", "2xx")]), 4.0);
    assert_eq!(value("mesh_egress_requests_total", &[web_labels[0], ("status_class", "4xx")]), 1.0);
    assert_eq!(value("mesh_egress_connections_total", &web_labels), 5.0);
    let tcp_labels = [("service", "default/metrics-tcp"), ("protocol", "tcp")];
    assert_eq!(value("mesh_egress_connections_total", &tcp_labels), 1.0);
    assert_eq!(value("mesh_egress_connections_active", &tcp_labels), 0.0);
    assert_eq!(value("mesh_egress_upstream_bytes_sent_total", &tcp_labels), 5.0);
    assert_eq!(value("mesh_egress_upstream_bytes_received_total", &tcp_labels), 15.0, "echo\\n + 12345 + <eof>");
    assert_eq!(value("mesh_egress_upstream_bytes_spliced_total", &tcp_labels), 0.0, "too small to splice");
    // Histograms: the +Inf bucket counts every observation.
    assert_eq!(value("mesh_egress_request_duration_seconds", &web_labels), 5.0);
    assert_eq!(value("mesh_egress_upstream_connect_duration_seconds", &tcp_labels), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_and_endpoints_never_show_secrets() {
    let ca = common::pki::Ca::new("ca");
    let client = ca.client("app");
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let key_body: String = client.key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      caCert:\n        inline: {}\n      clientCert:\n        secret: client-cert\n      clientKey:\n        inlineString: |\n{}",
        b64(&ca.pem),
        client.key_pem.lines().map(|l| format!("          {l}\n")).collect::<String>()
    );
    let yaml = format!(
        "type: Secret\nname: client-cert\nmesh: default\ndata: {}\n---\n{}",
        b64(&client.cert_pem),
        service_with_outbound("secret-svc", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), &tls)
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.admin = Some("127.0.0.1:0".parse().unwrap());
    let proxy = start(opts).await;
    let admin = proxy.admin_addr().unwrap();
    for path in ["/config_dump", "/endpoints"] {
        let body = admin_get(admin, path).await;
        assert!(body.contains("secret-svc"), "{body}");
        for secret in [&key_body[..40], &b64(&ca.pem)[..40], &b64(&client.cert_pem)[..40], "PRIVATE KEY", "BEGIN"] {
            assert!(!body.contains(secret), "{path} leaks {secret}:\n{body}");
        }
    }
    let dump: serde_json::Value = serde_json::from_str(&admin_get(admin, "/config_dump").await).unwrap();
    assert_eq!(dump["services"][0]["tls"]["clientCertificate"], true);
    assert_eq!(dump["services"][0]["tls"]["trust"], "configured");
    let endpoints: serde_json::Value = serde_json::from_str(&admin_get(admin, "/endpoints").await).unwrap();
    assert_eq!(endpoints["services"][0]["targets"][0]["address"], "127.0.0.1:1");
    assert_eq!(endpoints["services"][0]["targets"][0]["healthy"], true);
}

async fn wait_ready(admin: SocketAddr) {
    eventually("/ready", Duration::from_secs(20), || async { get(admin, "/ready").await.is_ok_and(|(s, _)| s == 200) })
        .await;
}

fn signal(proc: &KillOnDrop, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &proc.0.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_completes_requests_in_flight_and_exits_zero() {
    let upstream = http_upstream(None).await;
    let (web, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let (_dir, config) = config_dir(&http_service("drain", web, upstream.addr.port()));
    let mut proxy = spawn_proxy(&config, admin, &["--drain-timeout", "10s"], &[]);
    wait_ready(admin).await;
    let mut slow = TcpStream::connect(web).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nx-delay-ms: 1500\r\n\r\n").await.unwrap();
    eventually("the request at the endpoint", Duration::from_secs(10), || async { upstream.connections() >= 1 }).await;
    signal(&proxy, "TERM");
    // No new connections once draining.
    eventually("listener closed", Duration::from_secs(5), || async { TcpStream::connect(web).await.is_err() }).await;
    let mut response = String::new();
    slow.read_to_string(&mut response).await.unwrap(); // keep-alive ends after this response
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("path: /slow"), "{response}");
    let status = tokio::task::spawn_blocking(move || proxy.0.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_file_changes_reload() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [first, by_hup, by_watch, admin, admin2]: [SocketAddr; 5] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let (_dir, config) = config_dir(&tcp_service("first", first, echo.addr.port()));
    // SIGHUP, with watching off.
    let hup = spawn_proxy(&config, admin, &["--no-watch"], &[]);
    wait_ready(admin).await;
    std::fs::write(
        &config,
        format!(
            "{}---\n{}",
            tcp_service("first", first, echo.addr.port()),
            tcp_service("by-hup", by_hup, echo.addr.port())
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(TcpStream::connect(by_hup).await.is_err(), "no reload without the signal");
    signal(&hup, "HUP");
    eventually("SIGHUP adds the listener", Duration::from_secs(10), || async { greet(by_hup).await.is_ok() }).await;
    drop(hup);

    // File watch.
    let (_dir2, config2) = config_dir(&tcp_service("first", first, echo.addr.port()));
    let _watch = spawn_proxy(&config2, admin2, &[], &[]);
    wait_ready(admin2).await;
    std::fs::write(
        &config2,
        format!(
            "{}---\n{}",
            tcp_service("first", first, echo.addr.port()),
            tcp_service("by-watch", by_watch, echo.addr.port())
        ),
    )
    .unwrap();
    eventually("a file change adds the listener", Duration::from_secs(10), || async { greet(by_watch).await.is_ok() })
        .await;
    // An invalid change is rejected: the running configuration stays.
    std::fs::write(&config2, "type: MeshExternalService\nname: x\nspec: {match: {port: 0}}\n").unwrap();
    eventually("the failed reload is counted", Duration::from_secs(10), || async {
        admin_get(admin2, "/metrics").await.contains("mesh_egress_config_reloads_total{result=\"failure\"} 1")
    })
    .await;
    assert_eq!(greet(by_watch).await.unwrap().0, "echo");
}

/// An http service and a tcp service (named as given) run by the binary with a JSON
/// `--access-log`; kept alive by the struct.
struct LoggedPair {
    web: SocketAddr,
    tcp: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    echo_port: u16,
    log: std::path::PathBuf,
    config: std::path::PathBuf,
    _keep: (common::http_upstream::HttpUpstream, Upstream, tempfile::TempDir, KillOnDrop),
}

async fn logged_pair(http: &str, tcp_name: &str) -> LoggedPair {
    let upstream = http_upstream(None).await;
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [web, tcp, admin]: [SocketAddr; 3] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let (dir, config) = config_dir(&format!(
        "{}---\n{}",
        http_service(http, web, upstream.addr.port()),
        tcp_service(tcp_name, tcp, echo.addr.port())
    ));
    let log = dir.path().join("access.log");
    let proxy =
        spawn_proxy(&config, admin, &["--access-log", log.to_str().unwrap(), "--access-log-format", "json"], &[]);
    wait_ready(admin).await;
    let (upstream_addr, echo_port) = (upstream.addr, echo.addr.port());
    LoggedPair { web, tcp, admin, upstream: upstream_addr, echo_port, log, config, _keep: (upstream, echo, dir, proxy) }
}

/// The JSON lines of an access log written so far.
fn json_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_a_line_per_connection_and_request() {
    let logged = logged_pair("log-web", "log-tcp").await;
    let (web, tcp, log) = (logged.web, logged.tcp, logged.log.clone());
    let upstream_addr = logged.upstream;
    assert_eq!(get(web, "/logged").await.unwrap().0, 200);
    // A response without a body (here a 204) is as complete as any.
    let mut empty = TcpStream::connect(web).await.unwrap();
    empty.write_all(b"GET /empty HTTP/1.1\r\nhost: x\r\nx-status: 204\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    empty.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let (_, mut s) = greet(tcp).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut sink = Vec::new();
    s.read_to_end(&mut sink).await.unwrap();
    drop(s);
    let read = || json_lines(&log);
    eventually("three access log lines", Duration::from_secs(10), || async { read().len() >= 3 }).await;
    let lines = read();
    let empty = lines.iter().find(|l| l["request"] == "GET /empty").unwrap();
    assert_eq!((&empty["status"], &empty["outcome"]), (&serde_json::json!(204), &serde_json::json!("ok")), "{empty}");
    let http = lines.iter().find(|l| l["request"] == "GET /logged").unwrap();
    assert_eq!(http["service"], "default/log-web");
    assert_eq!(http["request"], "GET /logged");
    assert_eq!(http["status"], 200);
    assert_eq!(http["endpoint"], upstream_addr.to_string());
    assert!(http["bytes_received"].as_u64().unwrap() > 0);
    assert_eq!(http["outcome"], "ok", "a complete response is logged as such");
    let tcp_line = lines.iter().find(|l| l["protocol"] == "tcp").unwrap();
    assert_eq!(tcp_line["service"], "default/log-tcp");
    assert_eq!(tcp_line["bytes_sent"], 3);
    assert_eq!(tcp_line["outcome"], "closed");
}

/// A request on a keep-alive connection whose service a reload removed gets a 503 (NC) and its
/// access-log line, naming the service the connection was opened for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_service_removed_by_a_reload_is_logged() {
    let logged = logged_pair("going", "staying").await;
    let (web, tcp, admin, log, config) =
        (logged.web, logged.tcp, logged.admin, logged.log.clone(), logged.config.clone());
    let mut conn = TcpStream::connect(web).await.unwrap();
    async fn ask(conn: &mut TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = conn.read(&mut head).await.unwrap();
        String::from_utf8_lossy(&head[..n]).into_owned()
    }
    assert!(ask(&mut conn, "/before").await.starts_with("HTTP/1.1 200"));
    std::fs::write(&config, tcp_service("staying", tcp, logged.echo_port)).unwrap();
    eventually("the reload", Duration::from_secs(10), || async {
        admin_get(admin, "/metrics").await.contains("mesh_egress_config_reloads_total{result=\"success\"} 1")
    })
    .await;
    let answer = ask(&mut conn, "/after").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let read = || json_lines(&log);
    eventually("the 503's line", Duration::from_secs(10), || async {
        read().iter().any(|l| l["request"] == "GET /after")
    })
    .await;
    let lines = read();
    let after = lines.iter().find(|l| l["request"] == "GET /after").unwrap();
    assert_eq!(after["service"], "default/going", "{after}");
    assert_eq!((&after["status"], &after["outcome"]), (&serde_json::json!(503), &serde_json::json!("local_reply")));
}

#[test]
fn admin_refuses_a_remote_address_unless_asked() {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-egress"))
        .args(["run", "-c", "config/demo", "--admin", "0.0.0.0:0", "--transparent", "off", "--dns", "off"])
        .args(["--readiness-port", "off"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--admin-allow-remote"), "{out:?}");
}

/// A ConfigMap as the kubelet mounts it: the files are symlinks into `..data`, itself a symlink
/// to a timestamped directory, and an update swaps `..data` in one rename. The proxy reads only
/// the visible files (no service twice through the hidden directories) and reloads on the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_by_the_kubelets_data_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let mount = tempfile::tempdir().unwrap();
    let dir = mount.path();
    let version = |name: &str, yaml: &str| {
        let versioned = dir.join(name);
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("services.yaml"), yaml).unwrap();
    };
    let mes = |name: &str| {
        format!("apiVersion: kuma.io/v1alpha1\nkind: MeshExternalService\nmetadata:\n  name: {name}\n  namespace: kuma-system\nspec:\n  match: {{port: 80, protocol: http}}\n  endpoints: [{{address: 127.0.0.1, port: 9}}]\n")
    };
    version("..2026_12_01_10_00_00.000000001", &mes("first"));
    symlink("..2026_12_01_10_00_00.000000001", dir.join("..data")).unwrap();
    symlink("..data/services.yaml", dir.join("services.yaml")).unwrap();
    let admin = free_addr("127.0.0.1");
    let _proxy = spawn_proxy(dir, admin, &[], &[]);
    wait_ready(admin).await;
    let services = || async { admin_get(admin, "/config_dump").await };
    let dump = services().await;
    assert!(dump.contains("\"first\"") && dump.matches("\"name\": \"first\"").count() == 1, "{dump}");

    // The kubelet's update: a new directory, a new `..data` link renamed over the old one.
    version("..2026_12_01_10_05_00.000000002", &format!("{}---\n{}", mes("first"), mes("second")));
    symlink("..2026_12_01_10_05_00.000000002", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2026_12_01_10_00_00.000000001")).unwrap();
    eventually("the swapped ConfigMap is live", Duration::from_secs(20), || async {
        services().await.contains("\"second\"")
    })
    .await;
    let dump = services().await;
    assert_eq!(dump.matches("\"name\": \"first\"").count(), 1, "{dump}");
}

/// A configuration directory replaced whole (`mv conf.new conf`, a deploy tool's swap) is
/// watched anew: the change it brings is applied, and so is the next edit inside it (the watch
/// stayed on the old directory, and edits were no longer seen). The directory is given as a
/// relative path, as in the README (notify reports absolute paths).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_configuration_directory_is_watched_anew() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [first, swapped, edited, admin]: [SocketAddr; 4] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let root = tempfile::tempdir().unwrap();
    let (conf, staged) = (root.path().join("conf"), root.path().join("conf.new"));
    let write = |dir: &std::path::Path, services: &[(&str, SocketAddr)]| {
        std::fs::create_dir_all(dir).unwrap();
        let text: Vec<String> = services.iter().map(|(n, a)| tcp_service(n, *a, echo.addr.port())).collect();
        std::fs::write(dir.join("services.yaml"), text.join("---\n")).unwrap();
    };
    write(&conf, &[("first", first)]);
    let admin_arg = admin.to_string();
    let _proxy = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh-egress"))
            .current_dir(root.path())
            .args(["run", "-c", "conf", "--admin", &admin_arg, "--transparent", "off", "--dns", "off"])
            .args(["--readiness-port", "off"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mesh-egress"),
    );
    wait_ready(admin).await;
    write(&staged, &[("first", first), ("swapped", swapped)]);
    std::fs::rename(&conf, root.path().join("conf.old")).unwrap();
    std::fs::rename(&staged, &conf).unwrap();
    eventually("the swapped-in directory is applied", Duration::from_secs(10), || async {
        greet(swapped).await.is_ok()
    })
    .await;
    write(&conf, &[("first", first), ("swapped", swapped), ("edited", edited)]);
    eventually("an edit in the new directory is applied", Duration::from_secs(10), || async {
        greet(edited).await.is_ok()
    })
    .await;
}

/// A single configuration file mounted from a Kubernetes ConfigMap: `config.yaml` is a link to
/// `..data/config.yaml`, and an update writes a new timestamped directory and swaps the `..data`
/// link, never touching `config.yaml` itself. The swap is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_of_a_single_file_is_applied() {
    use std::os::unix::fs::symlink;
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [first, added, admin]: [SocketAddr; 3] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let mount = tempfile::tempdir().unwrap();
    let version = |name: &str, services: &[(&str, SocketAddr)]| {
        let dir = mount.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let text: Vec<String> = services.iter().map(|(n, a)| tcp_service(n, *a, echo.addr.port())).collect();
        std::fs::write(dir.join("config.yaml"), text.join("---\n")).unwrap();
    };
    version("..2026_12_06_1", &[("first", first)]);
    symlink("..2026_12_06_1", mount.path().join("..data")).unwrap();
    symlink("..data/config.yaml", mount.path().join("config.yaml")).unwrap();
    let _proxy = spawn_proxy(&mount.path().join("config.yaml"), admin, &[], &[]);
    wait_ready(admin).await;
    version("..2026_12_06_2", &[("first", first), ("added", added)]);
    symlink("..2026_12_06_2", mount.path().join("..data_tmp")).unwrap();
    std::fs::rename(mount.path().join("..data_tmp"), mount.path().join("..data")).unwrap();
    eventually("the ConfigMap's update is applied", Duration::from_secs(10), || async { greet(added).await.is_ok() })
        .await;
}

/// Changes beside a single configuration file that are not about it, here the access log
/// written next to it, reload nothing (every write reloaded, about every 250 ms under traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beside_a_single_configuration_file_reload_nothing() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let [outbound, admin]: [SocketAddr; 2] = std::array::from_fn(|_| free_addr("127.0.0.1"));
    let (dir, config) = config_dir(&tcp_service("logged", outbound, echo.addr.port()));
    let log = dir.path().join("access.log");
    let _proxy = spawn_proxy(&config, admin, &["--access-log", log.to_str().unwrap()], &[]);
    wait_ready(admin).await;
    for _ in 0..4 {
        greet(outbound).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await; // past the watch's debounce
    }
    assert!(std::fs::metadata(&log).unwrap().len() > 0, "the access log was written");
    let metrics = admin_get(admin, "/metrics").await;
    assert!(
        !metrics.contains("mesh_egress_config_reloads_total{"),
        "reloads without a configuration change:\n{}",
        metrics.lines().filter(|l| l.contains("reloads")).collect::<Vec<_>>().join("\n")
    );
}

/// Log rotation (logrotate's `create`): once the file is renamed, SIGUSR1 or `POST /reopen_logs`
/// has the next line written to a new file at the path, for `--access-log` and MeshAccessLog
/// files alike; before, every later line went to the renamed file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_files_follow_log_rotation() {
    let upstream = http_upstream(None).await;
    let (web, admin) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let logs = tempfile::tempdir().unwrap();
    let (global, mesh) = (logs.path().join("global.log"), logs.path().join("mesh.log"));
    let policy = format!(
        "type: MeshAccessLog\nname: logs\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default:\n      backends:\n      - {{type: File, file: {{path: {}, format: {{type: Plain, plain: \"%REQ(:PATH)%\"}}}}}}\n",
        mesh.display()
    );
    let (_dir, config) = config_dir(&format!("{}---\n{policy}", http_service("rotated", web, upstream.addr.port())));
    let proxy = spawn_proxy(&config, admin, &["--access-log", global.to_str().unwrap()], &[]);
    wait_ready(admin).await;
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    let rotate = |n: usize| {
        for path in [&global, &mesh] {
            std::fs::rename(path, path.with_extension(format!("log.{n}"))).unwrap();
        }
    };
    let lines_in = |path: std::path::PathBuf, want: &'static str| async move {
        let what = format!("{} to hold {want:?}", path.display());
        eventually(&what, Duration::from_secs(10), || async { read(&path).contains(want) }).await;
    };

    assert_eq!(get(web, "/first").await.unwrap().0, 200);
    lines_in(mesh.clone(), "/first").await;
    lines_in(global.clone(), "/first").await;
    rotate(1);
    signal(&proxy, "USR1");
    // Until the signal is handled, requests are logged to the renamed files: probes until then.
    eventually("a request logged to the reopened files", Duration::from_secs(10), || async {
        assert_eq!(get(web, "/probe").await.unwrap().0, 200);
        read(&mesh).contains("/probe") && read(&global).contains("/probe")
    })
    .await;
    assert_eq!(get(web, "/second").await.unwrap().0, 200);
    lines_in(mesh.clone(), "/second").await;
    lines_in(global.clone(), "/second").await;
    rotate(2);
    let response = Command::new("curl")
        .args(["-s", "-X", "POST", &format!("http://{admin}/reopen_logs")])
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    assert_eq!(String::from_utf8_lossy(&response.stdout), "OK\n");
    assert_eq!(get(web, "/third").await.unwrap().0, 200);
    lines_in(mesh.clone(), "/third").await;
    lines_in(global.clone(), "/third").await;

    for path in [&global, &mesh] {
        let (one, two, now) = (read(&path.with_extension("log.1")), read(&path.with_extension("log.2")), read(path));
        assert!(one.contains("/first") && !one.contains("/second"), "{one}");
        assert!(two.contains("/second") && !two.contains("/third"), "{two}");
        assert!(now.contains("/third") && !now.contains("/second"), "{now}");
    }
}
