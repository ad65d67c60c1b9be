//! Root-only tier: the transparent proxy, the DNS redirect and VIP binding end to end in network
//! namespaces this test builds itself. An "app" namespace holds the proxy (as uid 5678), its
//! iptables rules and the clients (curl, socat, dig: none written here); an "ext" namespace
//! holds the upstreams and a DNS server; a veth pair joins them. Only their addresses are used.
//! Without root or the tools it fails, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROXY_UID: &str = "5678";
const HELPER_ENV: &str = "MESH_EGRESS_NETNS_HELPER";
const PASSTHROUGH_HELPER_ENV: &str = "MESH_EGRESS_NETNS_PASSTHROUGH_HELPER";
/// Test-net addresses in the "ext" namespace: the allowed destinations, another host on the
/// same ports, and two TCP hosts.
const ALLOWED: &str = "192.0.2.10";
const ELSEWHERE: &str = "198.51.100.10";
const TCP_LISTED: &str = "203.0.113.10";
const TCP_UNLISTED: &str = "203.0.113.20";

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Net {
    app: String,
    ext: String,
    app_ip: Ipv4Addr,
    ext_ip: Ipv4Addr,
    /// The ext namespace's IPv6 address (the app's is `…::1` of the same /64).
    ext_ip6: std::net::Ipv6Addr,
    children: Vec<Child>,
}

impl Net {
    /// `tag` keeps the names of tests that run at once apart.
    fn create(tag: char) -> Self {
        let id = std::process::id() % 250 + 1;
        let (app, ext) = (format!("me-app-{id}{tag}"), format!("me-ext-{id}{tag}"));
        let (app_ip, ext_ip) = (Ipv4Addr::new(10, 231, id as u8, 1), Ipv4Addr::new(10, 231, id as u8, 2));
        let (app_ip6, ext_ip6) = (
            std::net::Ipv6Addr::new(0xfd00, 231, id as u16, 0, 0, 0, 0, 1),
            std::net::Ipv6Addr::new(0xfd00, 231, id as u16, 0, 0, 0, 0, 2),
        );
        let net = Self { app: app.clone(), ext: ext.clone(), app_ip, ext_ip, ext_ip6, children: Vec::new() };
        net.cleanup();
        let (veth_app, veth_ext) = (format!("mea{id}{tag}"), format!("mee{id}{tag}"));
        ok(&["ip", "netns", "add", &app]);
        ok(&["ip", "netns", "add", &ext]);
        ok(&["ip", "link", "add", &veth_app, "type", "veth", "peer", "name", &veth_ext]);
        ok(&["ip", "link", "set", &veth_app, "netns", &app]);
        ok(&["ip", "link", "set", &veth_ext, "netns", &ext]);
        for (ns, dev, ip, ip6) in [(&app, &veth_app, app_ip, app_ip6), (&ext, &veth_ext, ext_ip, ext_ip6)] {
            ok(&["ip", "-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]);
            ok(&["ip", "-n", ns, "addr", "add", &format!("{ip6}/64"), "dev", dev, "nodad"]);
            ok(&["ip", "-n", ns, "link", "set", dev, "up"]);
            ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // VIPs (242.0.0.0/8) must be routable for the application's connect to happen at all.
        ok(&["ip", "-n", &app, "route", "add", "default", "via", &ext_ip.to_string()]);
        // `ip netns exec` shows this file as /etc/resolv.conf inside the namespace.
        std::fs::create_dir_all(format!("/etc/netns/{app}")).unwrap();
        std::fs::write(format!("/etc/netns/{app}/resolv.conf"), format!("nameserver {ext_ip}\n")).unwrap();
        net
    }

    fn exec(&self, ns: &str, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        sh(&full)
    }

    fn app(&self, args: &[&str]) -> String {
        let out = self.exec(&self.app, args);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn app_ok(&self, args: &[&str]) -> String {
        let out = self.exec(&self.app, args);
        assert!(out.status.success(), "{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn nat_table(&self) -> String {
        // Rules only: counters and comments change between dumps.
        self.app_ok(&["iptables-save", "-t", "nat"])
            .lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(&mut self, ns: &str, args: &[&str], env: &[(&str, String)]) -> usize {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.children.push(cmd.spawn().unwrap());
        self.children.len() - 1
    }

    fn stop(&mut self, index: usize) {
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
    }

    fn cleanup(&self) {
        for ns in [&self.app, &self.ext] {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.app));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cleanup();
    }
}

fn require_root_and_tools() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?")
        .to_string();
    assert_eq!(uid, "0", "the network-namespace tier needs root: run `sudo .ci/run` (it installs the tools too)");
    for tool in ["ip", "iptables", "iptables-save", "curl", "socat", "dig", "setpriv"] {
        let found =
            Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
        assert!(found, "{tool} is missing: .ci/run installs iproute2, iptables, curl, socat, dnsutils");
    }
}

/// Not a test: the upstreams that run inside the "ext" namespace, started by the test below as
/// a child process of this same test binary.
#[test]
#[ignore = "helper process for transparent_proxy_dns_and_vips_in_network_namespaces"]
fn netns_helper_servers() {
    let Ok(ip) = std::env::var(HELPER_ENV) else { return };
    let ip: Ipv4Addr = ip.parse().unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let _echo = common::echo_server((ip, 9000).into(), "echo").await;
        let _http = common::http_upstream::http_upstream_on((ip, 8080).into(), None).await;
        let dns = common::dns_server_on((ip, 53).into(), 30).await;
        dns.set("web.ext.test", ip);
        dns.set("forwarded.ext.test", Ipv4Addr::new(192, 0, 2, 99));
        serve_until_the_parent_is_done().await;
    });
}

const CONFIG: &str = "\
type: MeshExternalService
name: web
spec:
  match: {port: 80, protocol: http}
  endpoints: [{address: web.ext.test, port: 8080}]
---
type: MeshExternalService
name: h2web
spec:
  match: {port: 8081, protocol: http2}
  endpoints: [{address: EXT_IP, port: 8080}]
---
type: MeshExternalService
name: echo
spec:
  match: {port: 9000, protocol: tcp}
  endpoints: [{address: EXT_IP, port: 9000}]
";

/// In a helper process: says the servers are up, then serves until the parent closes our stdin
/// (or kills us).
async fn serve_until_the_parent_is_done() {
    println!("\nhelper-servers-ready");
    let _ = tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
}

/// `mesh-egress run` on `config` as `uid`, as the tests start it in the "app" namespace.
fn run_as(uid: &str, caps: &[&str], config: &std::path::Path, state_dir: &std::path::Path) -> Vec<String> {
    let mut args: Vec<String> =
        ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"].map(String::from).to_vec();
    args.extend(caps.iter().map(|s| s.to_string()));
    let bin = env!("CARGO_BIN_EXE_mesh-egress");
    let rest = [bin, "run", "-c", config.to_str().unwrap(), "--state-dir", state_dir.to_str().unwrap()];
    args.extend(rest.map(String::from));
    args
}

/// Starts this test binary's ignored `helper` test in namespace `ns` and waits for its servers.
fn start_helper(net: &mut Net, ns: &str, helper: &str, env: (&str, String)) {
    let me = std::env::current_exe().unwrap();
    let index = net.spawn(
        ns,
        &[me.to_str().unwrap(), "--ignored", "--exact", helper, "--nocapture", "--test-threads=1"],
        &[env],
    );
    let stdout = net.children[index].stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("helper-servers-ready"))), "{helper} did not start");
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn transparent_proxy_dns_and_vips_in_network_namespaces() {
    require_root_and_tools();
    let mut net = Net::create('t');
    let (ext_ip, ext) = (net.ext_ip.to_string(), net.ext.clone());
    let app = net.app.clone();
    start_helper(&mut net, &ext, "netns_helper_servers", (HELPER_ENV, ext_ip.clone()));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, CONFIG.replace("EXT_IP", &ext_ip)).unwrap();
    // The proxy runs as uid 5678 and must read its configuration.
    ok(&["chmod", "-R", "a+rwX", dir.path().to_str().unwrap()]);
    let bin = env!("CARGO_BIN_EXE_mesh-egress");
    let nat_before = net.nat_table();

    // --- clear errors: not root, no iptables ---
    let not_root = net.exec(
        &app,
        &["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", bin, "transparent-proxy", "install"],
    );
    assert_eq!(not_root.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&not_root.stderr).contains("needs root"), "{not_root:?}");
    let no_iptables = net.exec(&app, &["env", "PATH=/nonexistent", bin, "transparent-proxy", "install"]);
    assert_eq!(no_iptables.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_iptables.stderr).contains("iptables not found"), "{no_iptables:?}");

    // --- transparent proxy install: dry run, then twice (idempotent) ---
    let dry = net.app_ok(&[bin, "transparent-proxy", "install", "--dry-run", "--proxy-uid", PROXY_UID]);
    assert!(dry.contains("-A MESH_EGRESS_OUTPUT -m owner --uid-owner 5678 -j RETURN"), "{dry}");
    assert_eq!(net.nat_table(), nat_before, "--dry-run changes nothing");
    net.app_ok(&[bin, "transparent-proxy", "install", "--proxy-uid", PROXY_UID]);
    let once = net.nat_table();
    net.app_ok(&[bin, "transparent-proxy", "install", "--proxy-uid", PROXY_UID]);
    assert_eq!(net.nat_table(), once, "install is idempotent");
    assert!(once.contains("-A OUTPUT -p tcp -j MESH_EGRESS_OUTPUT"), "{once}");
    // And for IPv6: REDIRECT sends to ::1, where the proxy listens too.
    net.app_ok(&[bin, "transparent-proxy", "install", "--ipv6", "--proxy-uid", PROXY_UID]);
    assert_eq!(net.nat_table(), once, "the IPv4 rules as they were");
    let ext6 = net.ext_ip6;
    // Reads the client's bytes before it answers and closes: bytes arriving after the close
    // would be answered with a RST, which discards `v6` unread in the proxy's socket.
    let v6_echo = net.spawn(
        &ext,
        &["socat", &format!("TCP6-LISTEN:9006,bind=[{ext6}],fork,reuseaddr"), "SYSTEM:cat >/dev/null; echo v6"],
        &[],
    );

    let run = |extra: &[&str]| -> Vec<String> {
        let mut args = run_as(PROXY_UID, &[], &config, dir.path());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let args = run(&[]);
    let proxy = net.spawn(&app, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[("RUST_LOG", "warn".into())]);
    wait_for("/ready", || net.app(&["curl", "-s", "http://127.0.0.1:9901/ready"]).trim() == "ready");

    // --- DNS: the proxy on 15053, and the application's port 53 redirected to it ---
    let vip =
        net.app_ok(&["dig", "@127.0.0.1", "-p", "15053", "web.extsvc.mesh.local", "A", "+short"]).trim().to_string();
    assert!(vip.starts_with("242."), "{vip}");
    let aaaa = net.app_ok(&["dig", "@127.0.0.1", "-p", "15053", "web.extsvc.mesh.local", "AAAA"]);
    assert!(aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"), "{aaaa}");
    let redirected = net.app_ok(&["dig", "web.extsvc.mesh.local", "+short"]);
    assert_eq!(redirected.trim(), vip, "port 53 goes to the DNS proxy");
    let forwarded = net.app_ok(&["dig", "forwarded.ext.test", "+short"]);
    assert_eq!(forwarded.trim(), "192.0.2.99", "unknown names are forwarded (the proxy's own query is not redirected)");
    let unknown = net.app_ok(&["dig", "nobody.ext.test"]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");

    // --- the application just dials names ---
    let body = net.app_ok(&["curl", "-sS", "--max-time", "10", "http://web.extsvc.mesh.local/hello"]);
    assert!(body.contains("path: /hello") && body.contains("host: web.ext.test:8080"), "{body}");
    let h2 = net.app_ok(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--http2-prior-knowledge",
        "http://h2web.extsvc.mesh.local:8081/h2",
    ]);
    assert!(h2.contains("version: HTTP/2.0") && h2.contains("path: /h2"), "{h2}");
    let echo = net.app_ok(&["sh", "-c", "printf ping | socat -t5 - TCP:echo.extsvc.mesh.local:9000"]);
    assert_eq!(echo, "echo\nping<eof>");
    // Not a VIP: passed through, by the proxy, whose own connection is not redirected again.
    let direct = net.app_ok(&["curl", "-sS", "--max-time", "10", &format!("http://{ext_ip}:8080/direct")]);
    assert!(direct.contains("path: /direct"), "{direct}");
    // IPv6, redirected to [::1]: passed through, and DNS to an IPv6 nameserver answered by the
    // proxy (nothing listened on ::1: every IPv6 connection was refused, every such query lost).
    let v6 = net.app_ok(&["sh", "-c", &format!("printf ping | socat -t5 - TCP6:[{ext6}]:9006")]);
    assert_eq!(v6, "v6\n", "an IPv6 connection, through the proxy");
    let over_v6 = net.app_ok(&["dig", &format!("@{ext6}"), "web.extsvc.mesh.local", "+short"]);
    assert_eq!(over_v6.trim(), vip, "DNS to an IPv6 nameserver goes to the DNS proxy");
    net.stop(v6_echo);

    // --- uninstall leaves the nat table as it was ---
    net.app_ok(&[bin, "transparent-proxy", "uninstall", "--ipv6"]);
    assert_eq!(net.nat_table(), nat_before);
    net.stop(proxy);

    // --- VIP binding without iptables: the VIP range routed to lo ---
    net.app_ok(&["ip", "route", "add", "local", "242.0.0.0/8", "dev", "lo"]);
    // uid 5678 binds VIP:80 (a container gets this from CAP_NET_BIND_SERVICE).
    net.app_ok(&["sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0"]);
    let args = run(&["--bind-vips", "--transparent", "off", "--dns", "off"]);
    let _proxy = net.spawn(&app, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[("RUST_LOG", "warn".into())]);
    wait_for("/ready with VIP listeners", || net.app(&["curl", "-s", "http://127.0.0.1:9901/ready"]).trim() == "ready");
    let body = net.app_ok(&["curl", "-sS", "--max-time", "10", &format!("http://{vip}/vip")]);
    assert!(body.contains("path: /vip") && body.contains("host: web.ext.test:8080"), "{body}");
}

/// Not a test: the "internet" of `mesh_passthrough_in_network_namespaces`, in the "ext"
/// namespace. `ELSEWHERE` answers every port with `elsewhere`, so a connection that reached it
/// shows.
#[test]
#[ignore = "helper process for mesh_passthrough_in_network_namespaces"]
fn netns_passthrough_servers() {
    let Ok(spec) = std::env::var(PASSTHROUGH_HELPER_ENV) else { return };
    let (dns_ip, dir) = spec.split_once(',').unwrap();
    let dns_ip: Ipv4Addr = dns_ip.parse().unwrap();
    let read = |f: &str| std::fs::read_to_string(std::path::Path::new(dir).join(f)).unwrap();
    let leaf = common::pki::Leaf { cert_pem: read("leaf.pem"), key_pem: read("leaf.key") };
    tokio::runtime::Runtime::new().unwrap().block_on(async move {
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let tls = common::http_upstream::tls_config(&leaf);
        let _web = common::http_upstream::http_upstream_on((ip(ALLOWED), 80).into(), None).await;
        let _https = common::http_upstream::http_upstream_on((ip(ALLOWED), 443).into(), Some(tls)).await;
        let _elsewhere_80 = common::echo_server((ip(ELSEWHERE), 80).into(), "elsewhere").await;
        let _elsewhere_443 = common::echo_server((ip(ELSEWHERE), 443).into(), "elsewhere").await;
        let _listed = common::echo_server((ip(TCP_LISTED), 5432).into(), "listed").await;
        let _unlisted = common::echo_server((ip(TCP_UNLISTED), 5432).into(), "unlisted").await;
        let _cidr = common::echo_server((ip(TCP_UNLISTED), 7000).into(), "cidr").await;
        let _h2 = common::http_upstream::http_upstream_on((ip(ALLOWED), 8080).into(), None).await;
        let _mes = common::echo_server((dns_ip, 9000).into(), "mes").await;
        let dns = common::dns_server_on((dns_ip, 53).into(), 30).await;
        let allowed: Ipv4Addr = ALLOWED.parse().unwrap();
        for name in ["allowed.test", "api.wild.test", "web.test", "h2.test", "denied.test"] {
            dns.set(name, allowed);
        }
        serve_until_the_parent_is_done().await;
    });
}

const PASSTHROUGH_CONFIG: &str = "\
type: MeshExternalService
name: echo
spec:
  match: {port: 9000, protocol: tcp}
  endpoints: [{address: EXT_IP, port: 9000}]
---
type: MeshPassthrough
name: egress
spec:
  targetRef: {kind: Mesh}
  default:
    passthroughMode: MODE
    appendMatch:
      - {type: IP, value: 203.0.113.10, port: 5432}
      - {type: CIDR, value: 203.0.113.16/28, port: 7000}
      - {type: Domain, value: h2.test, port: 8080, protocol: http2}
      - {type: Domain, value: allowed.test, port: 443, protocol: tls}
      - {type: Domain, value: '*.wild.test', port: 443, protocol: tls}
      - {type: Domain, value: web.test, port: 80, protocol: http}
";

/// MeshPassthrough with iptables and real clients run as an unprivileged user: curl, openssl
/// s_client and socat, against servers on test-net addresses in another namespace.
#[test]
fn mesh_passthrough_in_network_namespaces() {
    require_root_and_tools();
    let openssl = Command::new("sh").args(["-c", "command -v openssl"]).output().is_ok_and(|o| o.status.success());
    assert!(openssl, "openssl is missing: .ci/run installs it");
    let mut net = Net::create('p');
    let (ext_ip, ext, app) = (net.ext_ip.to_string(), net.ext.clone(), net.app.clone());
    for addr in [ALLOWED, ELSEWHERE, TCP_LISTED, TCP_UNLISTED] {
        ok(&["ip", "-n", &ext, "addr", "add", &format!("{addr}/32"), "dev", "lo"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = common::pki::Ca::new("netns-passthrough-ca");
    let leaf = ca.server(&["allowed.test", "*.wild.test", "denied.test"]);
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    std::fs::write(dir.path().join("leaf.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.path().join("leaf.key"), &leaf.key_pem).unwrap();
    let helper_env = (PASSTHROUGH_HELPER_ENV, format!("{ext_ip},{}", dir.path().display()));
    start_helper(&mut net, &ext, "netns_passthrough_servers", helper_env);

    let config = dir.path().join("config.yaml");
    let write_config = |mode: &str| {
        let text = PASSTHROUGH_CONFIG.replace("EXT_IP", &ext_ip).replace("MODE", mode);
        // Written aside and renamed: the watcher never sees half a file.
        let tmp = dir.path().join("config.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
    };
    write_config("Matched");
    ok(&["chmod", "-R", "a+rwX", dir.path().to_str().unwrap()]);
    let bin = env!("CARGO_BIN_EXE_mesh-egress");
    net.app_ok(&[bin, "transparent-proxy", "install", "--proxy-uid", PROXY_UID]);
    let args = run_as(PROXY_UID, &[], &config, dir.path());
    let proxy = net.spawn(&app, &args.iter().map(String::as_str).collect::<Vec<_>>(), &[("RUST_LOG", "warn".into())]);
    wait_for("/ready", || net.app(&["curl", "-s", "http://127.0.0.1:9901/ready"]).trim() == "ready");

    // The application: an unprivileged user whose connections iptables redirects.
    let user = |args: &[&str]| -> String {
        let mut full =
            vec!["ip", "netns", "exec", &app, "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"];
        full.extend_from_slice(args);
        String::from_utf8_lossy(&sh(&full).stdout).into_owned()
    };
    let socat = |addr: &str| user(&["sh", "-c", &format!("printf ping | socat -t5 - TCP:{addr}")]);
    let ca_file = dir.path().join("ca.pem");
    let ca_file = ca_file.to_str().unwrap().to_string();
    let s_client = |connect: &str, sni: &str| {
        let script = format!(
            "printf 'GET /tls HTTP/1.1\\r\\nHost: {sni}\\r\\nConnection: close\\r\\n\\r\\n' | timeout 10 openssl s_client -connect {connect} -servername {sni} -CAfile {ca_file} -verify_return_error -quiet 2>&1"
        );
        user(&["sh", "-c", &script])
    };
    let curl = |extra: &[&str]| {
        let mut args = vec!["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}"];
        args.extend_from_slice(extra);
        user(&args)
    };

    // IP: by address and port, whatever the bytes.
    assert_eq!(socat(&format!("{TCP_LISTED}:5432")), "listed\nping<eof>");
    assert_eq!(socat(&format!("{TCP_UNLISTED}:5432")), "", "not in appendMatch: closed");
    assert_eq!(socat(&format!("{TCP_UNLISTED}:7000")), "cidr\nping<eof>", "the CIDR rule, on its port");
    // TLS by SNI, passed through untouched: the client verifies the server's own certificate.
    let tls = s_client(&format!("{ALLOWED}:443"), "allowed.test");
    assert!(tls.contains("HTTP/1.1 200") && tls.contains("path: /tls"), "{tls}");
    let wild = s_client(&format!("{ALLOWED}:443"), "api.wild.test");
    assert!(wild.contains("HTTP/1.1 200"), "{wild}");
    let denied = s_client(&format!("{ALLOWED}:443"), "denied.test");
    assert!(!denied.contains("HTTP/1.1"), "no rule for denied.test: {denied}");
    // Pinned: the allowed SNI dialled at another host reaches allowed.test's own address.
    let pinned = s_client(&format!("{ELSEWHERE}:443"), "allowed.test");
    assert!(pinned.contains("HTTP/1.1 200") && !pinned.contains("elsewhere"), "{pinned}");
    // HTTP by Host, resolved through the proxy's DNS like any name.
    let web = curl(&["http://web.test/hello"]);
    assert!(web.ends_with("\n200") && web.contains("path: /hello"), "{web}");
    let other = curl(&["-H", "Host: denied.test", &format!("http://{ALLOWED}/")]);
    assert!(other.ends_with("\n503") && other.contains("No routes matched this domain"), "{other}");
    let h2 = curl(&["--http2-prior-knowledge", "http://h2.test:8080/h2"]);
    assert!(h2.ends_with("\n200") && h2.contains("version: HTTP/2.0"), "{h2}");
    let h2_denied =
        curl(&["--http2-prior-knowledge", "-H", "Host: denied.test:8080", &format!("http://{ALLOWED}:8080/")]);
    assert!(h2_denied.ends_with("\n503"), "{h2_denied}");
    let pinned = curl(&["--resolve", &format!("web.test:80:{ELSEWHERE}"), "http://web.test/pinned"]);
    assert!(pinned.ends_with("\n200") && pinned.contains("path: /pinned"), "{pinned}");
    // The MeshExternalService is unaffected.
    assert_eq!(socat("echo.extsvc.mesh.local:9000"), "mes\nping<eof>");
    let metrics = net.app(&["curl", "-s", "http://127.0.0.1:9901/metrics"]);
    assert!(
        metrics.contains(r#"mesh_egress_passthrough_total{unit="connection",decision="allowed",reason="sni"}"#),
        "{metrics}"
    );
    let inspect = net.app_ok(&[bin, "inspect", config.to_str().unwrap(), "--state-dir", dir.path().to_str().unwrap()]);
    assert!(inspect.contains("passthrough Matched (MeshPassthrough default/egress)"), "{inspect}");
    assert!(inspect.contains("passthrough allows Domain allowed.test port 443 tls"), "{inspect}");

    // Hot reload: None closes even what the IP rule allowed; All passes anything.
    write_config("None");
    wait_for("passthroughMode None", || socat(&format!("{TCP_LISTED}:5432")).is_empty());
    assert!(!s_client(&format!("{ALLOWED}:443"), "allowed.test").contains("HTTP/1.1"));
    // This host's own address (the pod's IP) is not redirected, as Kuma's `-o lo` rule: under
    // None too, a server of the application's own namespace is reached on it (it was closed).
    let app_ip = net.app_ip;
    let own = net.spawn(
        &app,
        &["socat", &format!("TCP-LISTEN:7100,bind={app_ip},reuseaddr,fork"), "SYSTEM:cat >/dev/null; echo own"],
        &[],
    );
    wait_for("a server on the application's own address", || socat(&format!("{app_ip}:7100")) == "own\n");
    net.stop(own);
    write_config("All");
    wait_for("passthroughMode All", || socat(&format!("{TCP_UNLISTED}:5432")) == "unlisted\nping<eof>");
    assert_eq!(socat("echo.extsvc.mesh.local:9000"), "mes\nping<eof>");

    // Another uid than the rules' --proxy-uid: the proxy's own sockets carry SO_MARK, which the
    // rules return, so passthrough does not loop back into the proxy (it ran out of fds).
    net.stop(proxy);
    let other_uid = run_as("5680", &["--inh-caps", "+net_admin", "--ambient-caps", "+net_admin"], &config, dir.path());
    let _proxy =
        net.spawn(&app, &other_uid.iter().map(String::as_str).collect::<Vec<_>>(), &[("RUST_LOG", "warn".into())]);
    wait_for("/ready as uid 5680", || net.app(&["curl", "-s", "http://127.0.0.1:9901/ready"]).trim() == "ready");
    assert_eq!(socat(&format!("{TCP_UNLISTED}:5432")), "unlisted\nping<eof>");
    let web = curl(&["http://web.test/marked"]);
    assert!(web.ends_with("\n200") && web.contains("path: /marked"), "{web}");
    assert!(net.nat_table().contains("-m mark --mark 0x4d45 -j RETURN"));
    net.app_ok(&[bin, "transparent-proxy", "uninstall"]);
}
