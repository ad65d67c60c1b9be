//! One invalid sample per validation rule, each asserting the exact field path and message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::path::Path;

use mesh_egress::resources::{self, Diagnostic, Loaded, Severity};

fn load(text: &str) -> Loaded {
    let mut out = Loaded::default();
    resources::load_str(Path::new("sample.yaml"), text, &mut out);
    out
}

/// A valid MeshExternalService with `extra` spliced into its spec (YAML, 2-space indented).
fn mes(spec: &str) -> String {
    format!("type: MeshExternalService\nname: svc\nmesh: default\nspec:\n{spec}")
}

const MATCH: &str = "  match:\n    port: 80\n    protocol: tcp\n";
const ENDPOINTS: &str = "  endpoints:\n    - address: example.com\n      port: 443\n";

fn errors(loaded: &Loaded) -> Vec<(String, String)> {
    loaded.diagnostics.errors().map(|d| (d.path.clone(), d.message.clone())).collect()
}

#[test]
fn every_rule_has_its_message() {
    let tls = |body: &str| mes(&format!("{MATCH}{ENDPOINTS}  tls:\n    enabled: true\n{body}"));
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "match type",
            mes(&format!("  match:\n    type: Foo\n    port: 80\n{ENDPOINTS}")),
            "spec.match.type",
            "unrecognized type 'Foo' - only 'HostnameGenerator' is supported",
        ),
        ("match port zero", mes(&format!("  match:\n    port: 0\n{ENDPOINTS}")), "spec.match.port", "port must be a valid (1-65535)"),
        ("match port high", mes(&format!("  match:\n    port: 65536\n{ENDPOINTS}")), "spec.match.port", "port must be a valid (1-65535)"),
        ("match port missing", mes(&format!("  match:\n    protocol: tcp\n{ENDPOINTS}")), "spec.match.port", "port must be a valid (1-65535)"),
        (
            "protocol",
            mes(&format!("  match:\n    port: 80\n    protocol: udp\n{ENDPOINTS}")),
            "spec.match.protocol",
            r#""protocol" must be one of ["tcp", "grpc", "http", "http2"]"#,
        ),
        ("no endpoints", mes(MATCH), "spec.endpoints", "must not be empty"),
        (
            "endpoint address",
            mes(&format!("{MATCH}  endpoints:\n    - address: 'not a host!'\n      port: 80\n")),
            "spec.endpoints[0].address",
            "address has to be a valid IP or hostname",
        ),
        (
            "endpoint ip port",
            mes(&format!("{MATCH}  endpoints:\n    - address: 10.0.0.1\n")),
            "spec.endpoints[0].port",
            "must be defined when endpoint is an IP",
        ),
        (
            "endpoint hostname port",
            mes(&format!("{MATCH}  endpoints:\n    - address: example.com\n")),
            "spec.endpoints[0].port",
            "must be defined when endpoint is a hostname",
        ),
        (
            "endpoint port range",
            mes(&format!("{MATCH}  endpoints:\n    - address: example.com\n      port: 70000\n")),
            "spec.endpoints[0].port",
            "port must be a valid (1-65535)",
        ),
        (
            "unix relative",
            mes(&format!("{MATCH}  endpoints:\n    - address: unix://run/x.sock\n")),
            "spec.endpoints[0].address",
            "unix socket path must be absolute, e.g. unix:///run/app.sock",
        ),
        (
            "unix path climbing out",
            mes(&format!("{MATCH}  endpoints:\n    - address: unix:///run/app/../../etc/x.sock\n")),
            "spec.endpoints[0].address",
            "unix socket path must not contain '..' components",
        ),
        (
            "priority",
            mes(&format!("{MATCH}  endpoints:\n    - address: example.com\n      port: 443\n      priority: 129\n")),
            "spec.endpoints[0].priority",
            "must be between 0 and 128",
        ),
        (
            "version bad value",
            tls("    version:\n      min: TLS9\n"),
            "spec.tls.version.min",
            r#""min" must be one of ["TLSAuto", "TLS10", "TLS11", "TLS12", "TLS13"]"#,
        ),
        (
            "version order",
            tls("    version:\n      min: TLS13\n      max: TLS12\n"),
            "spec.tls.version.min",
            "min version must be lower than max",
        ),
        (
            "version max too old",
            tls("    version:\n      max: TLS11\n"),
            "spec.tls.version.max",
            "TLS11 is not supported: mesh-egress (rustls) speaks TLS 1.2 and 1.3 only; use TLS12 or higher",
        ),
        (
            "server name",
            tls("    verification:\n      serverName: 'bad name'\n"),
            "spec.tls.verification.serverName",
            "must be a valid DNS name",
        ),
        (
            "mode",
            tls("    verification:\n      mode: Strict\n"),
            "spec.tls.verification.mode",
            r#""mode" must be one of ["SkipSAN", "SkipCA", "SkipAll", "Secured"]"#,
        ),
        (
            "san type",
            tls("    verification:\n      subjectAltNames:\n        - type: Regex\n          value: x\n"),
            "spec.tls.verification.subjectAltNames[0].type",
            r#""type" must be one of ["Prefix", "Exact"]"#,
        ),
        (
            "client key missing",
            tls("    verification:\n      clientCert:\n        secret: c\n"),
            "spec.tls.verification.clientKey",
            "must be defined when clientCert is defined",
        ),
        (
            "client cert missing",
            tls("    verification:\n      clientKey:\n        secret: k\n"),
            "spec.tls.verification.clientCert",
            "must be defined when clientKey is defined",
        ),
        (
            "two data sources",
            tls("    verification:\n      caCert:\n        secret: a\n        inlineString: b\n"),
            "spec.tls.verification.caCert",
            "exactly one of inline, inlineString or secret must be defined",
        ),
        (
            "inline not base64",
            tls("    verification:\n      caCert:\n        inline: '***'\n"),
            "spec.tls.verification.caCert.inline",
            "must be base64: Invalid symbol 42, offset 0.",
        ),
        (
            "extension type",
            mes(&format!("{MATCH}  extension:\n    type: ''\n")),
            "spec.extension.type",
            "must not be empty",
        ),
        ("name length", mes(&format!("{MATCH}{ENDPOINTS}")).replace("name: svc", &format!("name: {}", "a".repeat(64))), "name", "must not be longer than 63 characters"),
        (
            "hostname generator template",
            "type: HostnameGenerator\nname: hg\nspec:\n  selector:\n    meshExternalService:\n      matchLabels: {}\n  template: '{{ if .Name }}x{{ end }}'\n".into(),
            "spec.template",
            "couldn't parse template: unsupported action \"{{if .Name}}\": only {{ .Name }}, {{ .DisplayName }}, {{ .Namespace }}, {{ .Mesh }}, {{ .Zone }} and {{ label \"key\" }} are supported",
        ),
        (
            "hostname generator selector",
            "type: HostnameGenerator\nname: hg\nspec:\n  template: x\n".into(),
            "spec.selector",
            "exactly one of meshService, meshExternalService or meshMultiZoneService must be defined",
        ),
        (
            "dataplane outbound port",
            "type: Dataplane\nname: dp\nnetworking:\n  outbound:\n    - port: 0\n      backendRef: {kind: MeshExternalService, name: svc}\n".into(),
            "networking.outbound[0].port",
            "port must be a valid (1-65535)",
        ),
        (
            "dataplane outbound address",
            "type: Dataplane\nname: dp\nnetworking:\n  outbound:\n    - port: 1\n      address: nowhere\n      backendRef: {kind: MeshExternalService, name: svc}\n".into(),
            "networking.outbound[0].address",
            "address has to be a valid IP address",
        ),
        (
            "unknown field is a typo",
            tls("    verification:\n      mdoe: Secured\n"),
            "spec.tls.verification",
            "unknown field `mdoe`, expected one of `mode`, `serverName`, `subjectAltNames`, `caCert`, `clientCert`, `clientKey`",
        ),
        (
            "unknown field in flat Mesh",
            "type: Mesh\nname: default\nroutng: {}\n".into(),
            "routng",
            "unknown field `routng`, expected one of `routing`, `mtls`, `tracing`, `logging`, `metrics`, `networking`, `constraints`, `skipCreatingInitialPolicies`, `meshServices`",
        ),
        (
            "document without kind",
            "name: x\n".into(),
            "",
            "neither `type` (Universal) nor `apiVersion` and `kind` (Kubernetes) is set",
        ),
    ];
    let mut failures = Vec::new();
    for (name, yaml, path, message) in &cases {
        let loaded = load(yaml);
        let got = errors(&loaded);
        if got != vec![(path.to_string(), message.to_string())] {
            failures.push(format!("{name}: want [{path}: {message}], got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn warnings_do_not_fail_the_load() {
    let yaml = mes(&format!(
        "{MATCH}{ENDPOINTS}  tls:\n    enabled: true\n    allowRenegotiation: true\n    version:\n      min: TLS10\n"
    ));
    let loaded = load(&yaml);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    let warnings: Vec<&str> = loaded.diagnostics.warnings().map(|d| d.path.as_str()).collect();
    assert_eq!(warnings, ["spec.tls.allowRenegotiation", "spec.tls.version.min"]);
}

#[test]
fn a_san_prefix_that_does_not_end_at_a_label_boundary_is_warned_about() {
    let sans = "  tls:\n    enabled: true\n    verification:\n      subjectAltNames:\n        - {type: Prefix, value: api.example.com}\n        - {type: Prefix, value: api-}\n        - {type: Prefix, value: web.}\n        - {type: Exact, value: exact.example.com}\n";
    let loaded = load(&mes(&format!("{MATCH}{ENDPOINTS}{sans}")));
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    let warnings: Vec<(&str, &str)> =
        loaded.diagnostics.warnings().map(|d| (d.path.as_str(), d.message.as_str())).collect();
    assert_eq!(
        warnings,
        [(
            "spec.tls.verification.subjectAltNames[0].value",
            "prefix 'api.example.com' does not end at a label boundary ('.' or '-'): it also accepts names such as 'api.example.com.evil.example'"
        )]
    );
}

#[test]
fn all_errors_of_a_load_are_reported_with_file_and_line() {
    let text = format!(
        "# leading comment\n{}\n---\n{}",
        mes("  match:\n    port: 0\n    protocol: udp\n"),
        mes(&format!("{MATCH}{ENDPOINTS}  tls:\n    enabeld: true\n")).replace("name: svc", "name: other"),
    );
    let loaded = load(&text);
    let errors: Vec<&Diagnostic> = loaded.diagnostics.errors().collect();
    let lines: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        lines,
        [
            "error: sample.yaml:2: MeshExternalService default/svc: spec.match.port: port must be a valid (1-65535)",
            r#"error: sample.yaml:2: MeshExternalService default/svc: spec.match.protocol: "protocol" must be one of ["tcp", "grpc", "http", "http2"]"#,
            "error: sample.yaml:2: MeshExternalService default/svc: spec.endpoints: must not be empty",
            "error: sample.yaml:22: spec.tls: unknown field `enabeld`, expected one of `enabled`, `allowRenegotiation`, `version`, `verification`",
        ]
    );
}

#[test]
fn unknown_kinds_are_skipped_with_a_warning() {
    let loaded = load(
        "type: MeshTrafficPermission\nname: x\nspec: {}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    assert!(loaded.resources.is_empty());
    assert!(!loaded.diagnostics.has_errors());
    let warnings: Vec<String> = loaded.diagnostics.warnings().map(|d| d.message.clone()).collect();
    assert_eq!(
        warnings,
        [
            "kind MeshTrafficPermission is not used by mesh-egress; skipped",
            "kind ConfigMap is not used by mesh-egress; skipped"
        ]
    );
    assert!(loaded.diagnostics.0.iter().all(|d| d.severity == Severity::Warning));
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let loaded = load("type: MeshExternalService\nname: x\nspec:\n  match: [\n");
    let e: Vec<&Diagnostic> = loaded.diagnostics.errors().collect();
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].file, "sample.yaml");
    assert!(e[0].line.is_some_and(|l| l >= 4), "{}", e[0]);
}

/// Files built to be slow to parse are refused before the YAML parser sees them: flow nesting
/// past 64 levels (the parser's time grows with the square of the depth; 100,000 levels took
/// 31 s before) and files over 16 MiB. Quoted and commented brackets do not count.
#[test]
fn hostile_files_are_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("deep.yaml");
    std::fs::write(&deep, format!("type: Mesh\nname: x\nextra: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)))
        .unwrap();
    let deep_errors = errors(&resources::load_paths(&[deep]));
    assert_eq!(deep_errors.len(), 1, "{deep_errors:?}");
    assert!(deep_errors[0].1.contains("nesting deeper than 64 levels at line 3"), "{deep_errors:?}");

    let big = dir.path().join("big.yaml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(17 << 20))).unwrap();
    let big_errors = errors(&resources::load_paths(&[big]));
    assert!(big_errors[0].1.contains("more than the 16 MiB a configuration file may have"), "{big_errors:?}");

    let fine = load(&format!(
        "type: MeshExternalService\nname: svc\nlabels: {{a: \"{}\"}}\nspec:\n{MATCH}{ENDPOINTS}  # {}\n",
        "[".repeat(100),
        "{".repeat(100)
    ));
    assert!(!fine.diagnostics.has_errors(), "{}", fine.diagnostics);
}
