//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API): each takes arbitrary bytes
//! and must never panic, hang or allocate without bound.

use std::path::Path;
use std::sync::OnceLock;

use crate::catalog::{compile, Catalog, CompileOptions, Ipam};
use crate::resources::{load_str, Loaded};

/// The resource loader and every validator: the bytes as a file, in whichever spelling.
pub fn resources(data: &[u8]) {
    let mut loaded = Loaded::default();
    load_str(Path::new("fuzz.yaml"), &String::from_utf8_lossy(data), &mut loaded);
    // Compiling what loaded exercises the policy merge, routes and permissions too.
    if !loaded.diagnostics.has_errors() {
        let mut ipam = Ipam::in_memory("242.0.0.0/8".parse().unwrap_or_else(|_| unreachable_cidr()));
        let _ = compile(&loaded.resources, &CompileOptions::default(), &mut ipam);
    }
}

/// The policy validators with the envelope given: the first byte picks the kind, the rest is
/// the `spec`.
pub fn policy(data: &[u8]) {
    const KINDS: [&str; 9] = [
        "MeshTimeout",
        "MeshRetry",
        "MeshCircuitBreaker",
        "MeshHealthCheck",
        "MeshAccessLog",
        "MeshPassthrough",
        "MeshTrafficPermission",
        "MeshHTTPRoute",
        "MeshTCPRoute",
    ];
    let Some((&pick, spec)) = data.split_first() else { return };
    let kind = KINDS[usize::from(pick) % KINDS.len()];
    let text = format!("type: {kind}\nname: p\nmesh: default\nspec:\n{}", String::from_utf8_lossy(spec));
    resources(text.as_bytes());
}

/// HostnameGenerator templates: parse, then render.
pub fn template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    if let Ok(template) = crate::template::Template::parse(&source) {
        let labels = crate::resources::Labels::new();
        let values = crate::template::Values {
            name: "svc",
            display_name: "svc",
            namespace: "ns",
            zone: "zone",
            mesh: "default",
            labels: &labels,
        };
        let _ = template.render(&values);
    }
}

/// The DNS proxy's answer to one query packet, against a catalog with one service.
pub fn dns_query(data: &[u8]) {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    let catalog = CATALOG.get_or_init(|| {
        let mut loaded = Loaded::default();
        let yaml = "type: MeshExternalService\nname: svc\nmesh: default\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: example.com, port: 80}]\n";
        load_str(Path::new("fuzz.yaml"), yaml, &mut loaded);
        let mut ipam = Ipam::in_memory("242.0.0.0/8".parse().unwrap_or_else(|_| unreachable_cidr()));
        compile(&loaded.resources, &CompileOptions::default(), &mut ipam).catalog
    });
    let _ = crate::dns::answer(catalog, data);
}

/// Passthrough's protocol detection (TLS ClientHello and SNI, HTTP/1, HTTP/2 preface).
pub fn sniff(data: &[u8]) {
    let _ = crate::proxy::passthrough::sniff::decide(data);
}

/// `grpc-timeout` header values.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-timeout", value);
    let _ = crate::proxy::http::grpc_timeout(&headers);
}

fn unreachable_cidr() -> ipnet::IpNet {
    ipnet::IpNet::V4(ipnet::Ipv4Net::default())
}
