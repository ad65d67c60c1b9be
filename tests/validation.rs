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

/// Each case's YAML must give exactly one error, at its path with its message.
fn expect_each<P: AsRef<str>>(cases: &[(&str, String, P, &str)]) {
    let mut failures = Vec::new();
    for (name, yaml, path, message) in cases {
        let got = errors(&load(yaml));
        if got != vec![(path.as_ref().to_string(), message.to_string())] {
            failures.push(format!("{name}: want [{}: {message}], got {got:?}", path.as_ref()));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

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
    expect_each(&cases);
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
        "type: MeshFaultInjection\nname: x\nspec: {}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
    );
    assert!(loaded.resources.is_empty());
    assert!(!loaded.diagnostics.has_errors());
    let warnings: Vec<String> = loaded.diagnostics.warnings().map(|d| d.message.clone()).collect();
    assert_eq!(
        warnings,
        [
            "kind MeshFaultInjection is not used by mesh-egress; skipped",
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

/// A field error's line is the field's own, also below a header of comments and in a later
/// document (the comments' lines were counted twice).
#[test]
fn errors_name_the_field_s_line_below_leading_comments() {
    let header = "# licence\n#\n# more\n\n";
    let second = "type: MeshExternalService\nname: y\nspec:\n  match: {type: HostnameGenerator, port: 80, protocol: tcp}\n  endpoints: [{address: 10.0.0.1, port: 80}]\n  extra: 1\n";
    let text = format!("{header}{second}---\n{header}{second}");
    let loaded = load(&text);
    let lines: Vec<Option<usize>> = loaded.diagnostics.errors().map(|d| d.line).collect();
    // `extra` is line 10 of the file, and line 21 in the document after the `---` on line 11.
    assert_eq!(lines, [Some(10), Some(21)], "{}", loaded.diagnostics);
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

/// A Universal policy of `kind` with `spec` (YAML flow or block, indented by 2).
fn policy(kind: &str, spec: &str) -> String {
    format!("type: {kind}\nname: p\nmesh: default\nspec:\n{spec}")
}

/// One `to: Mesh` item with `default`.
fn to_mesh(kind: &str, default: &str) -> String {
    policy(kind, &format!("  to:\n  - targetRef: {{kind: Mesh}}\n    default: {default}\n"))
}

#[test]
fn every_policy_rule_has_its_message() {
    let mt = |d: &str| to_mesh("MeshTimeout", d);
    let mr = |d: &str| to_mesh("MeshRetry", d);
    let mcb = |d: &str| to_mesh("MeshCircuitBreaker", d);
    let to_ref = |kind: &str, r: &str| {
        policy(kind, &format!("  to:\n  - targetRef: {r}\n    default: {{connectionTimeout: 1s}}\n"))
    };
    let top = |r: &str| {
        policy(
            "MeshTimeout",
            &format!("  targetRef: {r}\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{idleTimeout: 1s}}\n"),
        )
    };
    let d = "spec.to[0].default";
    let cases: Vec<(&str, String, String, &str)> = vec![
        // Envelope and targetRefs (Kuma's ValidateTargetRef).
        ("nothing to apply", policy("MeshTimeout", "  targetRef: {kind: Mesh}\n"), "spec".into(), "at least one of 'from', 'to' or 'rules' has to be defined"),
        (
            "rules with to",
            policy("MeshTimeout", "  rules: [{default: {idleTimeout: 1s}}]\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 1s}\n"),
            "spec".into(),
            "fields 'to' and 'from' must be empty when 'rules' is defined",
        ),
        ("top kind unsupported", top("{kind: MeshExternalService, name: x}"), "spec.targetRef.kind".into(), "value 'MeshExternalService' is not supported"),
        ("top kind missing", top("{name: x}"), "spec.targetRef.kind".into(), "must be defined"),
        ("mesh with name", top("{kind: Mesh, name: x}"), "spec.targetRef.name".into(), "using name with kind Mesh is not yet supported"),
        ("mesh with labels", top("{kind: Mesh, labels: {a: b}}"), "spec.targetRef.labels".into(), "must not be set with kind Mesh"),
        ("mesh empty proxyTypes", top("{kind: Mesh, proxyTypes: []}"), "spec.targetRef.proxyTypes".into(), "must be undefined or have at least one element"),
        ("dataplane labels and name", top("{kind: Dataplane, name: a, labels: {a: b}}"), "spec.targetRef.labels".into(), "either labels or name and namespace must be specified"),
        ("dataplane sectionName", top("{kind: Dataplane, name: a, sectionName: http}"), "spec.targetRef.sectionName".into(), "can only be used with inbound policies"),
        ("dataplane tags", top("{kind: Dataplane, tags: {a: b}}"), "spec.targetRef.tags".into(), "must not be set with kind Dataplane"),
        ("subset name", top("{kind: MeshSubset, name: a}"), "spec.targetRef.name".into(), "must not be set with kind MeshSubset"),
        ("gateway without name", policy("MeshCircuitBreaker", "  targetRef: {kind: MeshGateway}\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxConnections: 1}}\n"), "spec.targetRef.name".into(), "must be set when kind is MeshGateway"),
        ("mes without name or labels", to_ref("MeshTimeout", "{kind: MeshExternalService}"), "spec.to[0].targetRef".into(), "name or labels must be set when kind is MeshExternalService"),
        ("mes name and labels", to_ref("MeshTimeout", "{kind: MeshExternalService, name: a, labels: {a: b}}"), "spec.to[0].targetRef.labels".into(), "either labels or name must be specified"),
        ("mes name characters", to_ref("MeshTimeout", "{kind: MeshExternalService, name: Bad_Name}"), "spec.to[0].targetRef.name".into(), "invalid characters: must consist of lower case alphanumeric characters, '-', '.' and '_'."),
        ("mes sectionName", to_ref("MeshTimeout", "{kind: MeshExternalService, name: a, sectionName: x}"), "spec.to[0].targetRef.sectionName".into(), "must not be set with kind MeshExternalService"),
        ("mes tags", to_ref("MeshTimeout", "{kind: MeshExternalService, name: a, tags: {a: b}}"), "spec.to[0].targetRef.tags".into(), "must not be set with kind MeshExternalService"),
        ("to kind unsupported", to_ref("MeshTimeout", "{kind: Dataplane, name: a}"), "spec.to[0].targetRef.kind".into(), "value 'Dataplane' is not supported"),
        ("MCB to MeshHTTPRoute", policy("MeshCircuitBreaker", "  to:\n  - targetRef: {kind: MeshHTTPRoute, name: r}\n    default: {connectionLimits: {maxConnections: 1}}\n"), "spec.to[0].targetRef.kind".into(), "value 'MeshHTTPRoute' is not supported"),
        ("unknown conf field", mt("{connectTimeout: 1s}"), format!("{d}.connectTimeout"), "unknown field `connectTimeout`, expected one of `connectionTimeout`, `idleTimeout`, `http`"),
        ("bad duration", mt("{idleTimeout: 5}"), format!("{d}.idleTimeout"), "invalid type: integer `5`, expected a string"),
        ("unparsable duration", mt("{idleTimeout: 5x}"), format!("{d}.idleTimeout"), "time: invalid duration \"5x\""),
        // MeshTimeout.
        ("timeout empty", mt("{}"), d.into(), "at least one timeout should be configured"),
        ("timeout http empty", mt("{http: {requestHeadersTimeout: 1s}}"), format!("{d}.http"), "at least one timeout in this section should be configured"),
        ("connect timeout zero", mt("{connectionTimeout: 0s}"), format!("{d}.connectionTimeout"), "must be greater than zero when defined"),
        ("idle negative", mt("{idleTimeout: -1s}"), format!("{d}.idleTimeout"), "must not be negative when defined"),
        ("request negative", mt("{http: {requestTimeout: -1s}}"), format!("{d}.http.requestTimeout"), "must not be negative when defined"),
        (
            "route top level",
            policy("MeshTimeout", "  targetRef: {kind: MeshHTTPRoute, name: r}\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 1s}\n"),
            "spec.to[0].default.idleTimeout".into(),
            "can't be specified when top-level TargetRef is referencing MeshHTTPRoute",
        ),
        // MeshRetry.
        ("retry empty", mr("{}"), d.into(), "at least one of the 'tcp', 'http', 'grpc' must be specified"),
        ("retry tcp empty", mr("{tcp: {}}"), format!("{d}.tcp"), "must not be empty"),
        ("retry tcp zero", mr("{tcp: {maxConnectAttempt: 0}}"), format!("{d}.tcp.maxConnectAttempt"), "must be greater than 0"),
        ("retry http empty", mr("{http: {}}"), format!("{d}.http"), "must not be empty"),
        ("retry backOff empty", mr("{http: {backOff: {}}}"), format!("{d}.http.backOff"), "must not be empty"),
        ("retry 5XX", mr("{http: {retryOn: [5XX]}}"), format!("{d}.http.retryOn[0]"), "unknown item '5XX'"),
        ("retry status 952", mr("{http: {retryOn: [\"952\"]}}"), format!("{d}.http.retryOn[0]"), "unknown item '952'"),
        ("retry grpc item", mr("{grpc: {retryOn: [5xx]}}"), format!("{d}.grpc.retryOn[0]"), "unknown item '5xx'"),
        ("reset headers missing", mr("{http: {rateLimitedBackOff: {maxInterval: 1s}}}"), format!("{d}.http.rateLimitedBackOff.resetHeaders"), "must be defined"),
        ("reset header name", mr("{http: {rateLimitedBackOff: {resetHeaders: [{format: Seconds}]}}}"), format!("{d}.http.rateLimitedBackOff.resetHeaders[0].name"), "must be defined"),
        ("rate limited max zero", mr("{http: {rateLimitedBackOff: {maxInterval: 0s, resetHeaders: [{name: retry-after, format: Seconds}]}}}"), format!("{d}.http.rateLimitedBackOff.maxInterval"), "must be greater than zero when defined"),
        ("omit tags without tags", mr("{http: {hostSelection: [{predicate: OmitHostsWithTags}]}}"), format!("{d}.http.hostSelection[0].tags"), "must be defined"),
        ("priorities frequency", mr("{http: {hostSelection: [{predicate: OmitPreviousPriorities}]}}"), format!("{d}.http.hostSelection[0].updateFrequency"), "must be defined and greater than zero"),
        ("unknown predicate", mr("{http: {hostSelection: [{predicate: Nope}]}}"), format!("{d}.http.hostSelection[0].predicate"), "unknown predicate type 'Nope'"),
        ("header match value", mr("{http: {retriableResponseHeaders: [{name: x-a, type: Present, value: v}]}}"), format!("{d}.http.retriableResponseHeaders[0].value"), "must not be defined"),
        ("retry has no from", policy("MeshRetry", "  from: []\n  to:\n  - targetRef: {kind: Mesh}\n    default: {tcp: {maxConnectAttempt: 1}}\n"), "spec.from".into(), "unknown field `from`: MeshRetry has only `to`"),
        // MeshCircuitBreaker.
        ("breaker empty", mcb("{}"), d.into(), "at least one of: 'connectionLimits' or 'outlierDetection' should be configured"),
        ("limit zero", mcb("{connectionLimits: {maxRequests: 0}}"), format!("{d}.connectionLimits.maxRequests"), "must be greater than 0"),
        ("detectors missing", mcb("{outlierDetection: {disabled: true}}"), format!("{d}.outlierDetection.detectors"), "must be defined"),
        ("detectors empty", mcb("{outlierDetection: {detectors: {}}}"), format!("{d}.outlierDetection.detectors"), "must have at least one defined: totalFailures, gatewayFailures, localOriginFailures, successRate, failurePercentage"),
        ("interval zero", mcb("{outlierDetection: {interval: 0s, detectors: {totalFailures: {}}}}"), format!("{d}.outlierDetection.interval"), "must be greater than zero when defined"),
        ("ejection percent", mcb("{outlierDetection: {maxEjectionPercent: 101, detectors: {totalFailures: {}}}}"), format!("{d}.outlierDetection.maxEjectionPercent"), "must be in inclusive range [0, 100]"),
        ("panic threshold", mcb("{outlierDetection: {healthyPanicThreshold: \"100.5\", detectors: {totalFailures: {}}}}"), format!("{d}.outlierDetection.healthyPanicThreshold"), "must be in inclusive range [0.0, 100.0]"),
        ("panic threshold number", mcb("{outlierDetection: {healthyPanicThreshold: abc, detectors: {totalFailures: {}}}}"), format!("{d}.outlierDetection.healthyPanicThreshold"), "string must be a valid number"),
        ("consecutive zero", mcb("{outlierDetection: {detectors: {gatewayFailures: {consecutive: 0}}}}"), format!("{d}.outlierDetection.detectors.gatewayFailures.consecutive"), "must be greater than 0"),
        ("stdev factor", mcb("{outlierDetection: {detectors: {successRate: {standardDeviationFactor: x}}}}"), format!("{d}.outlierDetection.detectors.successRate.standardDeviationFactor"), "invalid number"),
        ("stdev factor zero", mcb("{outlierDetection: {detectors: {successRate: {standardDeviationFactor: \"0\"}}}}"), format!("{d}.outlierDetection.detectors.successRate.standardDeviationFactor"), "must be greater than 0"),
        // MeshHealthCheck.
        ("health check none", to_mesh("MeshHealthCheck", "{interval: 1s}"), d.into(), "must have at least one defined: http, tcp, grpc"),
        ("health interval", to_mesh("MeshHealthCheck", "{interval: 0s, tcp: {}}"), format!("{d}.interval"), "must be greater than zero when defined"),
        ("health threshold", to_mesh("MeshHealthCheck", "{unhealthyThreshold: 0, tcp: {}}"), format!("{d}.unhealthyThreshold"), "must be greater than zero when defined"),
        ("health jitter percent", to_mesh("MeshHealthCheck", "{intervalJitterPercent: 101, tcp: {}}"), format!("{d}.intervalJitterPercent"), "must be in inclusive range [0, 100]"),
        ("health path", to_mesh("MeshHealthCheck", "{http: {path: \"\"}}"), format!("{d}.http.path"), "must be defined"),
        ("health status", to_mesh("MeshHealthCheck", "{http: {expectedStatuses: [99]}}"), format!("{d}.http.expectedStatuses[0]"), "must be in inclusive range [100, 599]"),
        ("health to route", policy("MeshHealthCheck", "  to:\n  - targetRef: {kind: MeshHTTPRoute, name: r}\n    default: {tcp: {}}\n"), "spec.to[0].targetRef.kind".into(), "value 'MeshHTTPRoute' is not supported"),
        // MeshAccessLog.
        ("log backends missing", to_mesh("MeshAccessLog", "{}"), format!("{d}.backends"), "must be defined"),
        ("log file missing", to_mesh("MeshAccessLog", "{backends: [{type: File}]}"), format!("{d}.backends[0].file"), "must be defined"),
        ("log file path", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: \"\"}}]}"), format!("{d}.backends[0].file.path"), "file backend requires a valid path"),
        ("log tcp address", to_mesh("MeshAccessLog", "{backends: [{type: Tcp, tcp: {address: nowhere}}]}"), format!("{d}.backends[0].tcp.address"), "tcp backend requires valid address"),
        ("log otel both", to_mesh("MeshAccessLog", "{backends: [{type: OpenTelemetry, openTelemetry: {}}]}"), format!("{d}.backends[0].openTelemetry"), "openTelemetry must have exactly one defined: endpoint, backendRef"),
        ("log otel attribute", to_mesh("MeshAccessLog", "{backends: [{type: OpenTelemetry, openTelemetry: {endpoint: \"c:4317\", attributes: [{key: Bad, value: x}]}}]}"), format!("{d}.backends[0].openTelemetry.attributes[0].key"), "must start with a lowercase letter, use only lowercase letters, digits, '.' or '_', avoid consecutive delimiters, and end with a letter or digit"),
        ("log plain missing", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Plain}}}]}"), format!("{d}.backends[0].file.format.plain"), "must be defined"),
        ("log plain empty", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Plain, plain: \"\"}}}]}"), format!("{d}.backends[0].file.format.plain"), "must not be empty"),
        ("log json empty", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Json, json: []}}}]}"), format!("{d}.backends[0].file.format.json"), "must not be empty"),
        ("log json key", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Json, json: [{key: \"\", value: v}]}}}]}"), format!("{d}.backends[0].file.format.json[0].key"), "key cannot be empty"),
        ("log json value", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Json, json: [{key: k, value: \"\"}]}}}]}"), format!("{d}.backends[0].file.format.json[0].value"), "value cannot be empty"),
        ("log json object", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Json, json: [{key: 'a\"b', value: v}]}}}]}"), format!("{d}.backends[0].file.format.json[0]"), "is not a valid JSON object"),
        ("log operator", to_mesh("MeshAccessLog", "{backends: [{type: File, file: {path: /x, format: {type: Plain, plain: \"%NOPE%\"}}}]}"), format!("{d}.backends[0].file.format.plain"), "unsupported command operator %NOPE%"),
        ("failure threshold", mcb("{outlierDetection: {detectors: {failurePercentage: {threshold: 200}}}}"), format!("{d}.outlierDetection.detectors.failurePercentage.threshold"), "must be in inclusive range [0, 100]"),
    ];
    expect_each(&cases);
}

/// A MeshHTTPRoute to `svc` with one rule.
fn http_route(rule: &str) -> String {
    format!("type: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: svc}}\n    rules:\n    - {rule}\n")
}

#[test]
fn every_route_rule_has_its_message() {
    let r = "spec.to[0].rules[0]";
    let filter = |f: &str| {
        http_route(&format!("{{matches: [{{path: {{type: PathPrefix, value: /a}}}}], default: {{filters: [{f}]}}}}"))
    };
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("to Mesh", "type: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    rules: []\n".into(), "spec.to[0].targetRef.kind".into(), "value 'Mesh' is not supported"),
        ("hostnames", "type: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: svc}\n    hostnames: [a.test]\n    rules: []\n".into(), "spec.to[0].hostnames".into(), "must not be defined"),
        ("no matches", http_route("{matches: [], default: {}}"), format!("{r}.matches"), "must not be empty"),
        ("relative path", http_route("{matches: [{path: {type: Exact, value: a}}], default: {}}"), format!("{r}.matches[0].path.value"), "must be an absolute path"),
        ("trailing slash", http_route("{matches: [{path: {type: PathPrefix, value: /a/}}], default: {}}"), format!("{r}.matches[0].path.value"), "does not need a trailing slash because only a `/`-separated prefix or an entire path is matched"),
        ("bad regex", http_route("{matches: [{path: {type: RegularExpression, value: \"(\"}}], default: {}}"), format!("{r}.matches[0].path.value"), "must be a valid regular expression"),
        // Valid alone; anchored for a whole-path match, its comment swallows the anchors.
        ("regex closing the anchors' group", http_route("{matches: [{path: {type: RegularExpression, value: \"/admin)|(.*\"}}], default: {}}"), format!("{r}.matches[0].path.value"), "must be a valid regular expression"),
        ("regex comment", http_route("{matches: [{path: {type: RegularExpression, value: \"(?x)/admin # admin only\"}}], default: {}}"), format!("{r}.matches[0].path.value"), "must be a valid regular expression"),
        ("method", http_route("{matches: [{method: FETCH}], default: {}}"), format!("{r}.matches[0].method"), "must be one of: CONNECT, DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT, TRACE"),
        ("query duplicate", http_route("{matches: [{queryParams: [{type: Exact, name: a, value: b}, {type: Exact, name: a, value: c}]}], default: {}}"), format!("{r}.matches[0].queryParams"), "multiple entries for name a"),
        ("header present value", http_route("{matches: [{headers: [{type: Present, name: x-a, value: b}]}], default: {}}"), format!("{r}.matches[0].headers[0].value"), "must not be defined"),
        ("filter body missing", filter("{type: RequestHeaderModifier}"), format!("{r}.default.filters[0].requestHeaderModifier"), "must be defined"),
        ("modifier empty", filter("{type: RequestHeaderModifier, requestHeaderModifier: {}}"), format!("{r}.default.filters[0].requestHeaderModifier"), "must have at least one defined: set, add, remove"),
        ("modifier duplicate", filter("{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-a, value: b}], remove: [x-a]}}"), format!("{r}.default.filters[0].responseHeaderModifier"), "duplicate header name x-a"),
        ("redirect status", filter("{type: RequestRedirect, requestRedirect: {statusCode: 304}}"), format!("{r}.default.filters[0].requestRedirect.statusCode"), "must be one of: 301, 302, 303, 307, 308"),
        ("redirect ip host", filter("{type: RequestRedirect, requestRedirect: {hostname: 10.0.0.1}}"), format!("{r}.default.filters[0].requestRedirect.hostname"), "cannot be an IP address"),
        ("redirect port", filter("{type: RequestRedirect, requestRedirect: {port: 70000}}"), format!("{r}.default.filters[0].requestRedirect.port"), "port must be a valid (1-65535)"),
        ("prefix rewrite without prefix matches", http_route("{matches: [{path: {type: Exact, value: /a}}], default: {filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}}"), format!("{r}.default.filters[0].urlRewrite.path.replacePrefixMatch"), "can only appear if all matches match a path prefix"),
        ("host to backend", filter("{type: URLRewrite, urlRewrite: {hostToBackendHostname: true}}"), format!("{r}.default.filters[0].urlRewrite.hostToBackendHostname"), "can only be set with MeshGateway"),
        ("mirror percentage", filter("{type: RequestMirror, requestMirror: {percentage: 150, backendRef: {kind: MeshExternalService, name: m}}}"), format!("{r}.default.filters[0].requestMirror.percentage"), "must be in inclusive range [0.0, 100.0]"),
        ("backend kind", http_route("{matches: [{path: {type: PathPrefix, value: /}}], default: {backendRefs: [{kind: Mesh, name: x}]}}"), format!("{r}.default.backendRefs[0].kind"), "value 'Mesh' is not supported"),
        ("multi-zone port", http_route("{matches: [{path: {type: PathPrefix, value: /}}], default: {backendRefs: [{kind: MeshMultiZoneService, name: x}]}}"), format!("{r}.default.backendRefs[0].port"), "must be defined with kind MeshMultiZoneService"),
        ("tcp backends", "type: MeshTCPRoute\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: svc}\n    rules: [{default: {}}]\n".into(), "spec.to[0].rules[0].default.backendRefs".into(), "must be defined"),
        ("producer and consumer items", "apiVersion: kuma.io/v1alpha1\nkind: MeshTimeout\nmetadata: {name: t, namespace: shop, labels: {kuma.io/mesh: default}}\nspec:\n  to:\n  - targetRef: {kind: MeshHTTPRoute, name: r}\n    default: {http: {requestTimeout: 1s}}\n  - targetRef: {kind: MeshExternalService, name: svc}\n    default: {http: {requestTimeout: 1s}}\n".into(), "spec.to".into(), "it's not allowed to mix producer and consumer items in the same policy"),
        ("to and from", "apiVersion: kuma.io/v1alpha1\nkind: MeshTimeout\nmetadata: {name: t, namespace: shop, labels: {kuma.io/mesh: default}}\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 1s}}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 1s}}\n".into(), "spec.to".into(), "it's not allowed to mix 'to' and 'from' arrays in the same policy"),
        ("route of producer and consumer items", "apiVersion: kuma.io/v1alpha1\nkind: MeshHTTPRoute\nmetadata: {name: r, namespace: shop, labels: {kuma.io/mesh: default}}\nspec:\n  to:\n  - targetRef: {kind: MeshService, name: s}\n    rules: [{matches: [{path: {type: PathPrefix, value: /}}], default: {}}]\n  - targetRef: {kind: MeshExternalService, name: svc}\n    rules: [{matches: [{path: {type: PathPrefix, value: /}}], default: {}}]\n".into(), "spec.to".into(), "it's not allowed to mix producer and consumer items in the same policy"),
        ("tcp backends empty", "type: MeshTCPRoute\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: svc}\n    rules: [{default: {backendRefs: []}}]\n".into(), "spec.to[0].rules[0].default.backendRefs".into(), "must be defined"),
    ];
    expect_each(&cases);
}

#[test]
fn valid_policies_load_in_both_spellings_with_all_errors_at_once() {
    let kube = "apiVersion: kuma.io/v1alpha1\nkind: MeshRetry\nmetadata:\n  name: r\n  namespace: kuma-system\n  labels: {kuma.io/mesh: default}\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: httpbin, namespace: kuma-system}\n    default: {http: {numRetries: 3, retryOn: [5xx, \"503\", HttpMethodGet]}}\n";
    let loaded = load(kube);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    assert_eq!(loaded.resources.len(), 1);
    let two = to_mesh("MeshTimeout", "{connectionTimeout: 0s, idleTimeout: -1s}");
    assert_eq!(errors(&load(&two)).len(), 2, "every violation is reported");
}

fn passthrough(default: &str) -> String {
    policy("MeshPassthrough", &format!("  default:\n    passthroughMode: Matched\n    appendMatch:\n{default}"))
}

fn permission(spec: &str) -> String {
    policy("MeshTrafficPermission", spec)
}

/// MeshPassthrough's messages (Kuma's, typos kept) and MeshTrafficPermission's, with the
/// MeshExternalService extension's.
#[test]
fn every_egress_rule_has_its_message() {
    let m = |fields: &str| passthrough(&format!("    - {{{fields}}}\n"));
    let at = |i: usize, field: &str| format!("spec.default.appendMatch[{i}].{field}");
    let on_mes = "  targetRef: {kind: MeshExternalService, name: httpbin}\n";
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("mysql without port", m("type: IP, value: 192.0.2.1, protocol: mysql"), at(0, "port"), "port must be defined for Mysql protocol"),
        ("port zero", m("type: IP, value: 192.0.2.1, port: 0"), at(0, "port"), "port must be a valid (1-65535)"),
        ("port high", m("type: IP, value: 192.0.2.1, port: 70000"), at(0, "port"), "port must be a valid (1-65535)"),
        (
            "one port, two L7 protocols",
            passthrough("    - {type: Domain, value: a.test, port: 80, protocol: http}\n    - {type: Domain, value: b.test, port: 80, protocol: grpc}\n"),
            at(1, "port"),
            "using the same port in multiple matches requires the same protocol for the following protocols: [grpc http http2]",
        ),
        (
            "duplicate",
            passthrough("    - {type: Domain, value: a.test, port: 443, protocol: tls}\n    - {type: Domain, value: a.test, port: 443, protocol: tls}\n"),
            at(1, "value"),
            "value a.test is already defiend for this port and protocol",
        ),
        ("protocol", m("type: IP, value: 192.0.2.1, protocol: udp"), at(0, "protocol"), r#""protocol" must be one of ["tcp", "tls", "grpc", "http", "http2", "mysql"]"#),
        ("bad CIDR", m("type: CIDR, value: 192.0.2.0/33"), at(0, "value"), "provided CIDR has incorrect value"),
        ("bad IP", m("type: IP, value: 192.0.2.300"), at(0, "value"), "provided IP has incorrect value"),
        ("tcp for a domain", m("type: Domain, value: a.test, protocol: tcp"), at(0, "protocol"), "protocol tcp is not supported for a domain"),
        ("mysql for a domain", m("type: Domain, value: a.test, port: 3306, protocol: mysql"), at(0, "protocol"), "protocol mysql is not supported for a domain"),
        (
            "partial wildcard",
            m("type: Domain, value: '*w.example.com', port: 443, protocol: tls"),
            at(0, "value"),
            "provided DNS has incorrect value, partial wildcard is currently not supported",
        ),
        (
            "wildcard on all ports with L7",
            m("type: Domain, value: '*.example.com', protocol: http"),
            at(0, "port"),
            "wildcard domains doesn't work for all ports and layer 7 protocol",
        ),
        ("bad DNS", m("type: Domain, value: 'exa mple.com', protocol: tls"), at(0, "value"), "provided DNS has incorrect value"),
        ("IP as a domain", m("type: Domain, value: 192.0.2.1, protocol: tls"), at(0, "value"), "provided DNS has incorrect value"),
        ("type", m("type: Host, value: a.test, protocol: tls"), at(0, "type"), "provided type Host is not supported, one of Domain, IP, or CIDR is supported"),
        (
            "passthrough targetRef",
            policy("MeshPassthrough", "  targetRef: {kind: MeshService, name: web}\n  default: {passthroughMode: All}\n"),
            "spec.targetRef.kind".into(),
            "value 'MeshService' is not supported",
        ),
        (
            "passthrough to",
            policy("MeshPassthrough", "  to: []\n  default: {passthroughMode: All}\n"),
            "spec.to".into(),
            "unknown field `to`: MeshPassthrough has only `default`",
        ),
        (
            "permission without from",
            permission(on_mes),
            "spec".into(),
            "at least one of 'from' or 'rules' has to be defined",
        ),
        (
            "permission action",
            permission(&format!("{on_mes}  from:\n  - targetRef: {{kind: Mesh}}\n    default: {{}}\n")),
            "spec.from[0].default.action".into(),
            "must be defined",
        ),
        (
            "permission from kind",
            permission(&format!("{on_mes}  from:\n  - targetRef: {{kind: MeshExternalService, name: x}}\n    default: {{action: Deny}}\n")),
            "spec.from[0].targetRef.kind".into(),
            "value 'MeshExternalService' is not supported",
        ),
        (
            "permission Dataplane only on a MeshExternalService",
            permission("  targetRef: {kind: Mesh}\n  from:\n  - targetRef: {kind: Dataplane, name: web-1}\n    default: {action: Deny}\n"),
            "spec.from[0].targetRef.kind".into(),
            "value 'Dataplane' is not supported",
        ),
        (
            "permission rules on a MeshExternalService",
            permission(&format!("{on_mes}  rules:\n  - default: {{allow: []}}\n")),
            "spec.rules".into(),
            "a MeshTrafficPermission on a MeshExternalService takes `from` items, not `rules`",
        ),
    ];
    expect_each(&cases);
    let valid = passthrough(
        "    - {type: Domain, value: '*', port: 443, protocol: tls}\n    - {type: CIDR, value: '2001:db8::/32'}\n    - {type: IP, value: 192.0.2.1, port: 3306, protocol: mysql}\n",
    );
    assert!(errors(&load(&valid)).is_empty(), "{:?}", errors(&load(&valid)));
    let kube = "apiVersion: kuma.io/v1alpha1\nkind: MeshTrafficPermission\nmetadata:\n  name: p\n  namespace: kuma-system\n  labels: {kuma.io/mesh: default}\nspec:\n  targetRef: {kind: MeshExternalService, name: httpbin}\n  from:\n  - targetRef: {kind: Dataplane, labels: {app: web}}\n    default: {action: AllowWithShadowDeny}\n";
    let loaded = load(kube);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
}

fn trace(default: &str) -> String {
    policy("MeshTrace", &format!("  default:\n{default}"))
}

const ZIPKIN: &str = "    backends: [{type: Zipkin, zipkin: {url: 'http://jaeger:9411/api/v2/spans'}}]\n";

/// MeshTrace's messages (Kuma 2.14's `meshtrace` validator), each at its path.
#[test]
fn every_trace_rule_has_its_message() {
    let b = |backend: &str| trace(&format!("    backends: [{backend}]\n"));
    let at = |field: &str| format!("spec.default.{field}");
    let cases: Vec<(&str, String, String, &str)> = vec![
        ("backends missing", trace("    tags: []\n"), at("backends"), "must be defined"),
        (
            "two backends",
            b("{type: Zipkin, zipkin: {url: 'http://a/'}}, {type: Zipkin, zipkin: {url: 'http://b/'}}"),
            at("backends"),
            "must have zero or one backend defined",
        ),
        ("zipkin missing", b("{type: Zipkin}"), at("backends[0].zipkin"), "must be defined"),
        ("zipkin url empty", b("{type: Zipkin, zipkin: {url: ''}}"), at("backends[0].zipkin.url"), "must not be empty"),
        ("zipkin url", b("{type: Zipkin, zipkin: {url: 'not a url'}}"), at("backends[0].zipkin.url"), "must be a valid url"),
        ("datadog scheme", b("{type: Datadog, datadog: {url: 'https://dd:8126'}}"), at("backends[0].datadog.url"), "scheme must be http"),
        ("datadog port", b("{type: Datadog, datadog: {url: 'http://dd'}}"), at("backends[0].datadog.url"), "port must be defined"),
        ("datadog path", b("{type: Datadog, datadog: {url: 'http://dd:8126/x'}}"), at("backends[0].datadog.url"), "path must not be defined"),
        (
            "otel both",
            b("{type: OpenTelemetry, openTelemetry: {endpoint: 'c:4317', backendRef: {kind: MeshOpenTelemetryBackend, labels: {a: b}}}}"),
            at("backends[0].openTelemetry"),
            "openTelemetry must have only one type defined: endpoint, backendRef",
        ),
        (
            "otel neither",
            b("{type: OpenTelemetry, openTelemetry: {}}"),
            at("backends[0].openTelemetry"),
            "openTelemetry must have exactly one defined: endpoint, backendRef",
        ),
        (
            "otel url",
            b("{type: OpenTelemetry, openTelemetry: {endpoint: 'http://c:4317/v1'}}"),
            at("backends[0].openTelemetry.endpoint"),
            "must be in host:port format, not a URL",
        ),
        (
            "otel backendRef labels",
            b("{type: OpenTelemetry, openTelemetry: {backendRef: {kind: MeshOpenTelemetryBackend}}}"),
            at("backends[0].openTelemetry.backendRef"),
            "backendRef must have exactly one defined: labels",
        ),
        ("tag name", trace(&format!("{ZIPKIN}    tags: [{{name: '', literal: x}}]\n")), at("tags[0].name"), "must not be empty"),
        (
            "tag both",
            trace(&format!("{ZIPKIN}    tags: [{{name: a, literal: x, header: {{name: h}}}}]\n")),
            at("tags[0]"),
            "tag must have only one type defined: header, literal",
        ),
        (
            "tag neither",
            trace(&format!("{ZIPKIN}    tags: [{{name: a}}]\n")),
            at("tags[0]"),
            "tag must have only one type defined: header, literal",
        ),
        ("sampling range", trace(&format!("{ZIPKIN}    sampling: {{random: 101}}\n")), at("sampling.random"), "must be between 0 and 100"),
        ("sampling number", trace(&format!("{ZIPKIN}    sampling: {{overall: xyz}}\n")), at("sampling.overall"), "string is not a number"),
        (
            "targetRef kind",
            policy("MeshTrace", &format!("  targetRef: {{kind: MeshExternalService, name: x}}\n  default:\n{ZIPKIN}")),
            "spec.targetRef.kind".into(),
            "value 'MeshExternalService' is not supported",
        ),
        ("to", policy("MeshTrace", &format!("  to: []\n  default:\n{ZIPKIN}")), "spec.to".into(), "unknown field `to`: MeshTrace has only `default`"),
    ];
    expect_each(&cases);

    // Valid, in both spellings; a decimal percentage; `backends: []` (tracing off).
    let valid = trace(&format!("{ZIPKIN}    sampling: {{overall: '60.1', client: 20, random: 50}}\n    tags: [{{name: a, header: {{name: x-a, default: none}}}}]\n"));
    assert!(errors(&load(&valid)).is_empty(), "{:?}", errors(&load(&valid)));
    assert!(errors(&load(&trace("    backends: []\n"))).is_empty());
    let kube = "apiVersion: kuma.io/v1alpha1\nkind: MeshTrace\nmetadata:\n  name: t\n  namespace: kuma-system\n  labels: {kuma.io/mesh: default}\nspec:\n  targetRef: {kind: Mesh}\n  default:\n    backends:\n    - type: OpenTelemetry\n      openTelemetry: {endpoint: 'otel-collector.observability:4317'}\n";
    let loaded = load(kube);
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    // No warning for `endpoint` (Kuma deprecates it for a MeshOpenTelemetryBackend, which
    // mesh-egress has not); one for what is not applied.
    assert_eq!(loaded.diagnostics.warnings().count(), 0, "{}", loaded.diagnostics);
    let datadog = load(&b("{type: Datadog, datadog: {url: 'http://dd:8126'}}"));
    assert!(errors(&datadog).is_empty());
    assert!(datadog.diagnostics.warnings().any(|d| d.message.contains("does not export to Datadog")));
}

/// Kuma's inbound pattern (a Dataplane's inbound named by `sectionName`, with `rules` or
/// `from`) is valid: Kuma rejects `sectionName` only on a policy without inbound items. It used
/// to make the whole configuration invalid.
#[test]
fn a_dataplane_section_name_is_valid_on_inbound_policies() {
    let inbound = [
        policy("MeshTimeout", "  targetRef: {kind: Dataplane, labels: {app: web}, sectionName: http}\n  rules:\n  - default: {http: {requestTimeout: 30s}}\n"),
        policy("MeshCircuitBreaker", "  targetRef: {kind: Dataplane, name: web, sectionName: http}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxConnections: 5}}\n"),
        policy("MeshTrafficPermission", "  targetRef: {kind: Dataplane, labels: {app: web}, sectionName: http}\n  from:\n  - targetRef: {kind: Mesh}\n    default: {action: Allow}\n"),
    ];
    for text in inbound {
        let loaded = load(&text);
        assert!(errors(&loaded).is_empty(), "{text}\n{}", loaded.diagnostics);
    }
    let outbound = policy(
        "MeshTimeout",
        "  targetRef: {kind: Dataplane, name: web, sectionName: http}\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 1s}\n",
    );
    let errors = errors(&load(&outbound));
    assert_eq!(
        errors,
        [("spec.targetRef.sectionName".to_string(), "can only be used with inbound policies".to_string())]
    );
}
