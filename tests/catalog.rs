//! Compiling resources into a catalog: hostnames, collisions, VIPs, access, secrets, spellings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use mesh_egress::catalog::{self, Access, Catalog, CompileOptions, Compiled, Ipam, ServiceView};
use mesh_egress::resources::{self, Loaded};
use mesh_egress::vip_store::VipStore;

fn compile_with(files: &[(&str, &str)], options: &CompileOptions, ipam: &mut Ipam) -> Compiled {
    let mut loaded = Loaded::default();
    for (name, text) in files {
        resources::load_str(Path::new(name), text, &mut loaded);
    }
    assert!(!loaded.diagnostics.has_errors(), "{}", loaded.diagnostics);
    catalog::compile(&loaded.resources, options, ipam)
}

fn compile(text: &str) -> Catalog {
    let compiled = compile_with(&[("a.yaml", text)], &CompileOptions::default(), &mut ipam("242.0.0.0/8"));
    assert!(!compiled.diagnostics.has_errors(), "{}", compiled.diagnostics);
    compiled.catalog
}

fn ipam(cidr: &str) -> Ipam {
    Ipam::in_memory(cidr.parse().unwrap())
}

fn mes(name: &str, labels: &str) -> String {
    format!(
        "type: MeshExternalService\nname: {name}\nmesh: default\nlabels: {{{labels}}}\nspec:\n  match:\n    port: 443\n    protocol: http\n  endpoints:\n    - address: {name}.example.com\n      port: 443\n---\n"
    )
}

fn view<'a>(catalog: &'a Catalog, name: &str) -> &'a catalog::Service {
    catalog.services().iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no service {name}"))
}

#[test]
fn default_generator_applies_when_none_is_configured() {
    let catalog = compile(&mes("httpbin", "kuma.io/display-name: httpbin-display"));
    let s = view(&catalog, "httpbin");
    assert_eq!(s.hostnames, ["httpbin-display.extsvc.mesh.local"]);
    assert_eq!(s.vip, Some("242.0.0.1".parse().unwrap()));
    assert_eq!(catalog.by_hostname("httpbin-display.extsvc.mesh.local").map(|s| s.name.as_str()), Some("httpbin"));
    assert_eq!(
        catalog.by_vip(SocketAddr::new("242.0.0.1".parse().unwrap(), 443)).map(|s| s.name.as_str()),
        Some("httpbin")
    );
}

#[test]
fn default_generator_can_be_switched_off() {
    let options = CompileOptions { default_hostnames: false, ..Default::default() };
    let compiled = compile_with(&[("a.yaml", &mes("httpbin", ""))], &options, &mut ipam("242.0.0.0/8"));
    assert!(compiled.catalog.services()[0].hostnames.is_empty());
}

const GENERATORS: &str = r#"
type: HostnameGenerator
name: by-zone
spec:
  selector:
    meshExternalService:
      matchLabels: {team: pay}
  template: "{{ .DisplayName }}.{{ .Namespace }}.{{ .Mesh }}.{{ .Zone }}.{{ label \"team\" }}.ext"
---
type: HostnameGenerator
name: by-owner
spec:
  selector:
    meshExternalService:
      matchLabels: {}
  template: "{{ .Name }}.{{ label \"owner\" }}.local"
---
type: HostnameGenerator
name: upper
spec:
  selector:
    meshExternalService:
      matchLabels: {bad: "yes"}
  template: "{{ label \"bad\" }}.UPPER"
---
"#;

#[test]
fn generators_render_values_and_report_failures_as_conditions() {
    let text = format!(
        "{GENERATORS}{}{}",
        mes("a", "team: pay, k8s.kuma.io/namespace: ns1, kuma.io/zone: west, owner: me"),
        mes("b", "bad: 'yes'"),
    );
    let options = CompileOptions { zone: "east".into(), ..Default::default() };
    let compiled = compile_with(&[("a.yaml", &text)], &options, &mut ipam("242.0.0.0/8"));
    let a = view(&compiled.catalog, "a");
    assert_eq!(a.hostnames, ["a.ns1.default.west.pay.ext", "a.me.local"]);
    assert!(a.conditions.iter().all(|c| c.status == "True" && c.reason == "Generated"));
    let b = view(&compiled.catalog, "b");
    assert!(b.hostnames.is_empty(), "{:?}", b.hostnames);
    let reasons: Vec<(&str, &str, &str)> =
        b.conditions.iter().map(|c| (c.generator.as_str(), c.reason.as_str(), c.message.as_str())).collect();
    assert_eq!(
        reasons,
        [
            ("by-owner", "TemplateError", "label owner not found"),
            ("upper", "TemplateError", "'yes.UPPER' is not a valid lowercase RFC 1123 DNS name"),
        ]
    );
}

#[test]
fn zone_falls_back_to_the_local_zone() {
    let hg = "type: HostnameGenerator\nname: z\nspec:\n  selector:\n    meshExternalService:\n      matchLabels: {}\n  template: '{{ .Name }}.{{ .Zone }}.ext'\n---\n";
    let options = CompileOptions { zone: "east".into(), ..Default::default() };
    let compiled = compile_with(&[("a.yaml", &format!("{hg}{}", mes("a", "")))], &options, &mut ipam("242.0.0.0/8"));
    assert_eq!(compiled.catalog.services()[0].hostnames, ["a.east.ext"]);
}

#[test]
fn hostname_collision_first_by_file_then_name_wins() {
    let hg = "type: HostnameGenerator\nname: same\nspec:\n  selector:\n    meshExternalService:\n      matchLabels: {}\n  template: '{{ label \"app\" }}.ext'\n";
    // 2.yaml lists "zeta" before "alpha"; within a file the name decides, so "alpha" wins.
    // 3.yaml comes later, so "aaa" loses despite its name.
    let file1 = format!("{}{}", mes("zeta", "app: web"), mes("alpha", "app: web"));
    let file2 = mes("aaa", "app: web");
    let compiled = compile_with(
        &[("1.yaml", hg), ("2.yaml", &file1), ("3.yaml", &file2)],
        &CompileOptions::default(),
        &mut ipam("242.0.0.0/8"),
    );
    let c = &compiled.catalog;
    assert_eq!(view(c, "alpha").hostnames, ["web.ext"]);
    for loser in ["zeta", "aaa"] {
        let s = view(c, loser);
        assert!(s.hostnames.is_empty());
        let cond = &s.conditions[0];
        assert_eq!(
            (cond.type_.as_str(), cond.status.as_str(), cond.reason.as_str()),
            ("Generated", "False", "Collision")
        );
        assert_eq!(cond.message, "hostname web.ext is already used by default/alpha");
    }
    assert_eq!(c.by_hostname("web.ext").map(|s| s.name.as_str()), Some("alpha"));
}

#[test]
fn vips_are_stable_across_loads_with_a_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cidr = "242.0.0.0/8".parse().unwrap();
    let first = format!("{}{}", mes("b", ""), mes("c", ""));
    let store = VipStore::new(Some(dir.path()));
    let mut ipam = store.load(cidr).unwrap();
    let c1 = compile_with(&[("x.yaml", &first)], &CompileOptions::default(), &mut ipam).catalog;
    store.save(&mut ipam).unwrap();
    let before: Vec<(String, Option<IpAddr>)> = c1.services().iter().map(|s| (s.name.clone(), s.vip)).collect();
    assert_eq!(
        before,
        [("b".to_string(), Some("242.0.0.1".parse().unwrap())), ("c".to_string(), Some("242.0.0.2".parse().unwrap()))]
    );

    // A new process: "a" is added ahead of the others in file order, "c" is removed.
    let second = format!("{}{}", mes("a", ""), mes("b", ""));
    let mut ipam = store.load(cidr).unwrap();
    let c2 = compile_with(&[("x.yaml", &second)], &CompileOptions::default(), &mut ipam).catalog;
    assert_eq!(view(&c2, "b").vip, Some("242.0.0.1".parse().unwrap()));
    assert_eq!(view(&c2, "a").vip, Some("242.0.0.3".parse().unwrap()), "c's address is not reused");
}

#[test]
fn status_vip_is_kept() {
    let text = mes("a", "").replace("spec:", "status:\n  vip:\n    ip: 242.0.0.42\nspec:");
    let c = compile(&text);
    assert_eq!(c.services()[0].vip, Some("242.0.0.42".parse().unwrap()));
}

/// A VIP a later service asks for (`status.vip.ip`) is not handed to an earlier one without a
/// status: it got the next free address, the same one, and the configuration was refused as a
/// VIP conflict (or, on other ports, two services shared one VIP).
#[test]
fn a_requested_vip_is_not_assigned_to_another_service() {
    let requested = mes("b", "").replace("spec:", "status:\n  vip:\n    ip: 242.0.0.1\nspec:");
    let c = compile(&format!("{}{requested}", mes("a", "")));
    assert_eq!(view(&c, "b").vip, Some("242.0.0.1".parse().unwrap()));
    assert_eq!(view(&c, "a").vip, Some("242.0.0.2".parse().unwrap()));
}

#[test]
fn exhaustion_breaks_only_the_services_left_without_an_address() {
    let text = format!("{}{}{}", mes("a", ""), mes("b", ""), mes("c", ""));
    let compiled = compile_with(&[("x.yaml", &text)], &CompileOptions::default(), &mut ipam("10.9.0.0/30"));
    assert!(!compiled.diagnostics.has_errors());
    let c = &compiled.catalog;
    assert!(view(c, "a").broken.is_none() && view(c, "b").broken.is_none());
    let broken = view(c, "c");
    assert_eq!(broken.vip, None);
    assert!(broken.hostnames.is_empty(), "no DNS entry without a VIP");
    assert_eq!(broken.broken.as_deref(), Some("could not allocate vip for MeshExternalService c: No addresses left"));
    assert_eq!(c.vip_listeners().count(), 2);
}

#[test]
fn universal_and_kubernetes_spellings_compile_to_the_same_entry() {
    let universal = r#"
type: MeshExternalService
name: httpbin
mesh: payments
labels:
  kuma.io/mesh: payments
  k8s.kuma.io/namespace: kuma-system
spec:
  match: {port: 443, protocol: http2}
  endpoints: [{address: httpbin.org, port: 443}]
  tls:
    enabled: true
    version: {min: TLS12}
    verification: {serverName: httpbin.org, mode: SkipSAN}
"#;
    let kubernetes = r#"
apiVersion: kuma.io/v1alpha1
kind: MeshExternalService
metadata:
  name: httpbin
  namespace: kuma-system
  labels:
    kuma.io/mesh: payments
  resourceVersion: "123"
  creationTimestamp: "2026-01-01T00:00:00Z"
spec:
  match: {port: 443, protocol: http2}
  endpoints: [{address: httpbin.org, port: 443}]
  tls:
    enabled: true
    version: {min: TLS12}
    verification: {serverName: httpbin.org, mode: SkipSAN}
status:
  addresses: []
"#;
    let u = compile(universal);
    let k = compile(kubernetes);
    let (u, k) = (&u.services()[0], &k.services()[0]);
    assert_eq!(ServiceView::from(&**u), ServiceView::from(&**k));
    assert_eq!(u.labels, k.labels);
    assert_eq!(u.namespace, "kuma-system");
}

#[test]
fn kubernetes_list_wrappers_are_unwrapped() {
    let list = r#"
apiVersion: v1
kind: List
metadata: {resourceVersion: ""}
items:
  - apiVersion: kuma.io/v1alpha1
    kind: MeshExternalService
    metadata: {name: one, namespace: ns}
    spec: {match: {port: 80}, endpoints: [{address: 10.0.0.1, port: 80}]}
  - apiVersion: kuma.io/v1alpha1
    kind: MeshExternalService
    metadata: {name: two, namespace: ns}
    spec: {match: {port: 80}, endpoints: [{address: 10.0.0.2, port: 80}]}
"#;
    let c = compile(list);
    let names: Vec<&str> = c.services().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["one", "two"]);
    let mut loaded = Loaded::default();
    resources::load_str(
        Path::new("l.yaml"),
        &list.replace(
            "match: {port: 80}, endpoints: [{address: 10.0.0.2",
            "match: {port: 80}, endpoint: [{address: 10.0.0.2",
        ),
        &mut loaded,
    );
    let e: Vec<String> = loaded.diagnostics.errors().map(|d| format!("{}: {}", d.path, d.message)).collect();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("items[1].spec.endpoint: unknown field `endpoint`"), "{e:?}");
}

#[test]
fn mesh_forbid_sets_the_access_decision() {
    let text = format!(
        "type: Mesh\nname: locked\nrouting:\n  defaultForbidMeshExternalServiceAccess: true\nmtls: {{}}\n---\n{}{}",
        mes("open", ""),
        mes("closed", "").replace("mesh: default", "mesh: locked")
    );
    let c = compile(&text);
    assert_eq!(view(&c, "open").access, Access::Allowed);
    assert_eq!(view(&c, "closed").access, Access::Forbidden);
}

fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::new(vec!["ca.test".into()]).unwrap().self_signed(&key).unwrap().pem()
}

#[test]
fn a_missing_secret_breaks_only_its_service() {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem());
    let tls = |secret: &str| {
        format!("  tls:\n    enabled: true\n    verification:\n      caCert:\n        secret: {secret}\n")
    };
    let text = format!(
        "type: Secret\nname: ca\nmesh: default\ndata: {ca}\n---\n{}{}{}",
        mes("good", "").replace("---\n", &tls("ca")),
        "---\n",
        mes("bad", "").replace("---\n", &tls("nope"))
    );
    let c = compile(&text);
    let good = view(&c, "good");
    assert!(good.broken.is_none(), "{:?}", good.broken);
    assert_eq!(good.tls.as_ref().and_then(|t| t.ca.as_ref()).map(Vec::len), Some(1));
    assert_eq!(
        view(&c, "bad").broken.as_deref(),
        Some("spec.tls.verification.caCert: secret 'nope' not found in mesh 'default'")
    );
}

#[test]
fn unparsable_certificate_material_names_the_field() {
    let text = mes("a", "").replace(
        "---\n",
        "  tls:\n    enabled: true\n    verification:\n      clientCert:\n        inlineString: nonsense\n      clientKey:\n        inlineString: nonsense\n",
    );
    let c = compile(&text);
    assert_eq!(c.services()[0].broken.as_deref(), Some("spec.tls.verification.clientCert: no PEM certificate found"));
}

#[test]
fn unregistered_extension_breaks_only_its_service() {
    let text = format!(
        "{}{}",
        mes("plain", ""),
        "type: MeshExternalService\nname: ext\nspec:\n  match: {port: 80}\n  extension: {type: Lambda, config: {arn: x}}\n"
    );
    let c = compile(&text);
    assert!(view(&c, "plain").broken.is_none());
    assert_eq!(
        view(&c, "ext").broken.as_deref(),
        Some("extension type 'Lambda' is not registered in this build of mesh-egress")
    );
}

#[test]
fn dataplane_outbounds_become_listener_keys() {
    let text = format!(
        "{}type: Dataplane\nname: app\nmesh: default\nnetworking:\n  address: 10.0.0.5\n  outbound:\n    - port: 10001\n      backendRef: {{kind: MeshExternalService, name: a}}\n    - address: 127.0.0.2\n      port: 10002\n      backendRef: {{kind: MeshExternalService, name: a}}\n    - port: 10003\n      backendRef: {{kind: MeshService, name: other}}\n",
        mes("a", "")
    );
    let c = compile(&text);
    let outbounds: Vec<String> = c.outbounds().iter().map(|o| o.address.to_string()).collect();
    assert_eq!(outbounds, ["127.0.0.1:10001", "127.0.0.2:10002"]);
}

/// A policy or secret defined twice (a file copied into a subdirectory, say) is an error naming
/// the first, as a MeshExternalService is; it was applied twice, or the last one won.
#[test]
fn a_resource_defined_twice_is_an_error() {
    let timeout = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 1s}\n";
    let secret = "type: Secret\nname: s\nmesh: default\ndata: YQ==\n";
    let text = format!("{timeout}---\n{secret}");
    let files = [("x.yaml", text.as_str()), ("sub/x.yaml", text.as_str())];
    let compiled = compile_with(&files, &CompileOptions::default(), &mut ipam("242.0.0.0/8"));
    let e: Vec<String> = compiled.diagnostics.errors().map(|d| format!("{}: {}", d.path, d.message)).collect();
    assert_eq!(
        e,
        [
            "name: duplicate MeshTimeout default/t: already defined in x.yaml:1",
            "name: duplicate Secret default/s: already defined in x.yaml:9",
        ]
    );
    // The same name in another namespace is another resource.
    let other = timeout.replace("mesh: default\n", "mesh: default\nlabels: {k8s.kuma.io/namespace: other}\n");
    let compiled =
        compile_with(&[("x.yaml", timeout), ("y.yaml", &other)], &CompileOptions::default(), &mut ipam("242.0.0.0/8"));
    assert!(!compiled.diagnostics.has_errors(), "{}", compiled.diagnostics);
}

#[test]
fn configuration_level_errors_are_reported() {
    let text = format!(
        "{}{}type: Dataplane\nname: app\nnetworking:\n  outbound:\n    - port: 1\n      backendRef: {{kind: MeshExternalService, name: missing}}\n    - port: 2\n      backendRef: {{kind: MeshExternalService, name: a}}\n    - port: 2\n      backendRef: {{kind: MeshExternalService, name: a}}\n",
        mes("a", ""),
        mes("a", "")
    );
    let compiled = compile_with(&[("x.yaml", &text)], &CompileOptions::default(), &mut ipam("242.0.0.0/8"));
    let e: Vec<String> = compiled.diagnostics.errors().map(|d| format!("{}: {}", d.path, d.message)).collect();
    assert_eq!(
        e,
        [
            "name: duplicate MeshExternalService default/a: already defined in x.yaml:1",
            "networking.outbound[0].backendRef.name: MeshExternalService default/missing is not defined",
            "networking.outbound[2]: address 127.0.0.1:2 is already used by Dataplane default/app networking.outbound[1]",
        ]
    );
}

/// `status.vip.ip` is listened on (`--bind-vips`) and answered in DNS: the unspecified address
/// (it listened on every interface, opening the service, its client certificate included, to the
/// network), multicast and broadcast are refused by name.
#[test]
fn a_status_vip_that_is_not_unicast_is_refused() {
    for ip in ["0.0.0.0", "::", "224.0.0.1", "255.255.255.255", "::ffff:0.0.0.0"] {
        let text = mes("a", "").replace("spec:", &format!("status:\n  vip:\n    ip: \"{ip}\"\nspec:"));
        let mut loaded = mesh_egress::resources::Loaded::default();
        mesh_egress::resources::load_str(std::path::Path::new("x.yaml"), &text, &mut loaded);
        let errors: Vec<String> = loaded.diagnostics.errors().map(|d| format!("{}: {}", d.path, d.message)).collect();
        assert_eq!(errors, [format!("status.vip.ip: '{ip}' is not usable as a VIP: it must be a unicast address")]);
    }
}
