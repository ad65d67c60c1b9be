//! The `validate` and `inspect` commands, run as the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::process::{Command, Output};

fn mesh_egress(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-egress"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KUMA_IPAM_MESH_EXTERNAL_SERVICE_CIDR")
        .output()
        .expect("run mesh-egress")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn validate_accepts_the_shipped_examples() {
    let out = mesh_egress(&["validate", "config/examples"]);
    assert!(out.status.success(), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(text(&out.stderr).contains("valid: 7 MeshExternalService(s)"), "{}", text(&out.stderr));
}

#[test]
fn validate_reports_every_error_with_file_and_path() {
    let out = mesh_egress(&["validate", "tests/data/invalid"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let file = "tests/data/invalid/broken.yaml";
    assert_eq!(
        lines,
        [
            format!("error: {file}:2: MeshExternalService default/bad-match: spec.match.type: unrecognized type 'Foo' - only 'HostnameGenerator' is supported"),
            format!("error: {file}:2: MeshExternalService default/bad-match: spec.match.port: port must be a valid (1-65535)"),
            format!(r#"error: {file}:2: MeshExternalService default/bad-match: spec.match.protocol: "protocol" must be one of ["tcp", "grpc", "http", "http2"]"#),
            format!(r#"error: {file}:13: MeshExternalService default/bad-tls: spec.tls.verification.mode: "mode" must be one of ["SkipSAN", "SkipCA", "SkipAll", "Secured"]"#),
            format!("error: {file}:13: MeshExternalService default/bad-tls: spec.tls.verification.clientKey: must be defined when clientCert is defined"),
            format!("error: {file}:33: spec: unknown field `endpoint`, expected one of `match`, `endpoints`, `extension`, `tls`"),
        ]
    );
    assert!(text(&out.stderr).contains("invalid: 6 error(s)"), "{}", text(&out.stderr));
}

#[test]
fn validate_reports_broken_services() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("svc.yaml");
    std::fs::write(
        &file,
        "type: MeshExternalService\nname: s\nspec:\n  match: {port: 1}\n  endpoints: [{address: 10.0.0.1, port: 1}]\n  tls:\n    enabled: true\n    verification:\n      caCert: {secret: nope}\n",
    )
    .unwrap();
    let out = mesh_egress(&["validate", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let expected = format!(
        "error: {}:1: MeshExternalService default/s: spec.tls.verification.caCert: secret 'nope' not found in mesh 'default'\n",
        file.display()
    );
    assert_eq!(text(&out.stdout), expected);
}

#[test]
fn validate_names_a_missing_path() {
    let out = mesh_egress(&["validate", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("error: does/not/exist.yaml: cannot read:"), "{}", text(&out.stdout));
}

#[test]
fn inspect_shows_services_and_records_vips_like_run() {
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap();
    let out = mesh_egress(&["inspect", "config/examples", "-o", "json", "--state-dir", state_dir]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(inspected["passthrough"]["mode"], "Matched", "config/examples/egress.yaml");
    assert_eq!(inspected["passthrough"]["rules"].as_array().unwrap().len(), 5);
    let https = inspected["services"].as_array().unwrap().iter().find(|s| s["name"] == "mes-https").unwrap();
    assert_eq!(https["protocol"], "http");
    assert_eq!(https["port"], 80);
    assert_eq!(https["tls"]["mode"], "Secured");
    assert_eq!(https["tls"]["serverName"], "httpbin.org");
    assert_eq!(https["hostnames"][0], "mes-https.default.ext.example.local");
    assert!(state.path().join("vips.json").exists());

    // The table form, from the same state: the same VIPs.
    let table = mesh_egress(&["inspect", "config/examples", "--state-dir", state_dir]);
    let table = text(&table.stdout);
    let vip = https["vip"].as_str().unwrap();
    assert!(table.lines().any(|l| l.starts_with("mes-https ") && l.contains(vip)), "{table}");
    assert!(table.contains("outbound 127.0.0.1:10001 (Dataplane app-1) -> default/mes-tcp"), "{table}");
    assert!(table.contains("passthrough Matched (MeshPassthrough default/egress)"), "{table}");
    assert!(table.contains("policy default/mes-http: MeshTrace default/traces default"), "{table}");
    assert_eq!(https["policies"]["meshTrace"]["sampling"]["random"], 10, "config/examples/tracing.yaml");
    assert!(table.contains("passthrough allows Domain *.s3.amazonaws.com port 443 tls"), "{table}");
    assert!(
        table.contains(
            "access default/mes-http: ShadowDenied by MeshTrafficPermission default/mes-http-users from[1] MeshService app"
        ),
        "{table}"
    );
}

#[test]
fn help_explains_every_command() {
    for cmd in ["validate", "inspect"] {
        let out = mesh_egress(&[cmd, "--help"]);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("Usage: mesh-egress"), "{}", text(&out.stdout));
    }
}

/// `--max-header-bytes` below 8192 is refused at start, naming the flag: hyper's HTTP/1 server
/// asserts a read buffer that large, and every HTTP connection's task panicked.
#[test]
fn a_header_limit_too_small_for_the_http_server_is_refused() {
    let out = mesh_egress(&["run", "-c", "config/demo", "--max-header-bytes", "100"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--max-header-bytes") && stderr.contains("at least 8192"), "{stderr}");
}

/// A state directory inside a configuration directory is refused by name: its vips.json was read
/// as configuration (every reload after the first save rejected, a restart refused).
#[test]
fn a_state_directory_inside_the_configuration_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), "type: MeshExternalService\nname: a\nmesh: default\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: 127.0.0.1, port: 80}]\n").unwrap();
    let config = dir.path().to_str().unwrap().to_string();
    let state = dir.path().join("state");
    let out = mesh_egress(&["inspect", &config, "--state-dir", state.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("is inside the configuration directory"), "{}", text(&out.stderr));
    assert!(!state.join("vips.json").exists());
    // Through a symlink to the configuration, not yet made, or by `..`: refused too.
    let link = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(dir.path(), link.path().join("conf")).unwrap();
    for path in ["conf/new/state", "conf/new/../state"] {
        let through = link.path().join(path);
        let out = mesh_egress(&["inspect", &config, "--state-dir", through.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{path}: {}", text(&out.stderr));
    }
    let elsewhere = tempfile::tempdir().unwrap();
    let out = mesh_egress(&["inspect", &config, "--state-dir", elsewhere.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A hidden directory inside, which the loader skips, is fine.
    let hidden = dir.path().join(".state");
    let out = mesh_egress(&["inspect", &config, "--state-dir", hidden.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Directory symlinks that loop (`a -> .`, `b -> .`) are read once: two of them made 2^40 paths
/// to walk, and the reload (and SIGTERM, behind it) never finished.
#[test]
fn looping_directory_links_are_read_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("svc.yaml"), "type: MeshExternalService\nname: a\nmesh: default\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: 127.0.0.1, port: 80}]\n").unwrap();
    std::os::unix::fs::symlink(".", dir.path().join("a")).unwrap();
    std::os::unix::fs::symlink(".", dir.path().join("b")).unwrap();
    // Bounded: without the fix the walk does not end.
    let out = Command::new("timeout")
        .args(["60", env!("CARGO_BIN_EXE_mesh-egress"), "validate", dir.path().to_str().unwrap()])
        .output()
        .expect("run mesh-egress under timeout");
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
}
