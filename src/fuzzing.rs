//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API): each takes arbitrary bytes
//! and must never panic, hang or allocate without bound.

use std::path::Path;
use std::sync::OnceLock;

use crate::catalog::ipam::DEFAULT_CIDR;
use crate::catalog::{compile, Catalog, CompileOptions, Ipam};
use crate::resources::{load_str, Loaded};

/// Loads `text` as a file and, when it is valid, compiles it (the policy merge, routes,
/// permissions and passthrough included).
fn load_and_compile(text: &str) -> Option<Catalog> {
    let mut loaded = Loaded::default();
    load_str(Path::new("fuzz.yaml"), text, &mut loaded);
    if loaded.diagnostics.has_errors() {
        return None;
    }
    let cidr = DEFAULT_CIDR.parse().ok()?;
    Some(compile(&loaded.resources, &CompileOptions::default(), &mut Ipam::in_memory(cidr)).catalog)
}

/// The resource loader and every validator: the bytes as a file, in whichever spelling.
pub fn resources(data: &[u8]) {
    let _ = load_and_compile(&String::from_utf8_lossy(data));
}

/// The policy validators with the envelope given: the first byte picks the kind, the rest is
/// the `spec`.
pub fn policy(data: &[u8]) {
    const KINDS: [&str; 10] = [
        "MeshTimeout",
        "MeshRetry",
        "MeshCircuitBreaker",
        "MeshHealthCheck",
        "MeshAccessLog",
        "MeshPassthrough",
        "MeshTrafficPermission",
        "MeshHTTPRoute",
        "MeshTCPRoute",
        "MeshTrace",
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
    static CATALOG: OnceLock<Option<Catalog>> = OnceLock::new();
    let catalog = CATALOG.get_or_init(|| {
        load_and_compile("type: MeshExternalService\nname: svc\nmesh: default\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: example.com, port: 80}]\n")
    });
    if let Some(catalog) = catalog {
        let _ = crate::dns::answer(catalog, data);
    }
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

/// An endpoint's HTTP/1.1 response as the proxy's own client reads it: head, framing, chunked
/// body and trailers.
pub fn h1_response(data: &[u8]) {
    crate::upstream::h1::read_response(data);
}

pub use differential::{h1_response_against_hyper, h2_response_against_hyper};

mod differential;
