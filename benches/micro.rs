//! Criterion micro-benchmarks of the work done per connection, per request and per reload:
//! catalog lookup by VIP:port, hostname template rendering, the gRPC deadline parse, a
//! 100-rule MeshHTTPRoute lookup, compiling 10,000 services, and what a reference count
//! shared between two threads costs. (Protocol detection, h2 preface vs HTTP/1, is hyper-util's.)
//!
//!     cargo bench --bench micro
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a harness: failing loudly is right

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mesh_egress::catalog::{self, CompileOptions, Ipam};
use mesh_egress::resources::{self, Labels, Loaded};
use mesh_egress::template::{Template, Values};

/// A value alone on its cache line (and its `Arc`'s counts alone on theirs), so two of them
/// share nothing.
#[repr(align(64))]
struct Padded(#[allow(dead_code)] u64);

fn services(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "type: MeshExternalService\nname: svc-{i}\nlabels: {{team: t{}}}\nspec:\n  match: {{port: 443, protocol: http}}\n  endpoints: [{{address: api-{i}.example.com, port: 443}}]\n",
                i % 10
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn load(text: &str) -> Loaded {
    let mut loaded = Loaded::default();
    resources::load_str(Path::new("bench.yaml"), text, &mut loaded);
    loaded
}

fn benches(c: &mut Criterion) {
    let text = services(10_000);
    let loaded = load(&text);
    let compiled = catalog::compile(
        &loaded.resources,
        &CompileOptions::default(),
        &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap()),
    );
    let hit: SocketAddr = "242.0.19.137:443".parse().unwrap();
    let miss: SocketAddr = "10.0.0.1:443".parse().unwrap();
    assert!(compiled.catalog.by_vip(hit).is_some());
    c.bench_function("catalog lookup by VIP:port (10,000 services, hit)", |b| {
        b.iter(|| compiled.catalog.by_vip(black_box(hit)).is_some())
    });
    c.bench_function("catalog lookup by VIP:port (10,000 services, miss)", |b| {
        b.iter(|| compiled.catalog.by_vip(black_box(miss)).is_some())
    });
    c.bench_function("hostname lookup (10,000 services)", |b| {
        b.iter(|| compiled.catalog.by_hostname(black_box("svc-4242.extsvc.mesh.local")).is_some())
    });

    let template = Template::parse("{{ .DisplayName }}.{{ .Namespace }}.{{ label \"team\" }}.svc.mesh.local").unwrap();
    let mut labels = Labels::new();
    labels.insert("team".into(), "payments".into());
    let values = Values {
        name: "httpbin",
        display_name: "httpbin",
        namespace: "kuma-demo",
        mesh: "default",
        zone: "east",
        labels: &labels,
    };
    c.bench_function("template render", |b| b.iter(|| template.render(black_box(&values)).unwrap()));
    c.bench_function("template parse", |b| {
        b.iter(|| Template::parse(black_box("{{ .DisplayName }}.{{ .Namespace }}.svc.mesh.local")).unwrap())
    });

    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-timeout", http::HeaderValue::from_static("250m"));
    c.bench_function("grpc-timeout parse", |b| b.iter(|| mesh_egress::proxy::http::grpc_timeout(black_box(&headers))));

    // A 100-rule MeshHTTPRoute: the per-request lookup of a routed service.
    let rules: String = (0..100)
        .map(|i| match i % 4 {
            0 => format!("    - matches: [{{path: {{type: PathPrefix, value: /p{i}}}}}]\n      default: {{}}\n"),
            1 => format!("    - matches: [{{path: {{type: Exact, value: /e{i}}}, method: GET}}]\n      default: {{}}\n"),
            2 => format!("    - matches: [{{path: {{type: RegularExpression, value: \"/r{i}/[0-9]+\"}}}}]\n      default: {{}}\n"),
            _ => format!("    - matches: [{{headers: [{{name: x-h{i}, value: v}}], queryParams: [{{type: Exact, name: q, value: \"{i}\"}}]}}]\n      default: {{}}\n"),
        })
        .collect();
    let routed = format!(
        "{}---\ntype: MeshHTTPRoute\nname: big\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: svc-0}}\n    rules:\n{rules}",
        services(1)
    );
    let loaded_routes = load(&routed);
    assert!(!loaded_routes.diagnostics.has_errors(), "{}", loaded_routes.diagnostics);
    let routed = catalog::compile(
        &loaded_routes.resources,
        &CompileOptions::default(),
        &mut Ipam::in_memory("242.0.0.0/8".parse().unwrap()),
    );
    let table = routed.catalog.services()[0].routes.as_ref().and_then(|r| r.http.clone()).unwrap();
    let get = http::Method::GET;
    let no_headers = http::HeaderMap::new();
    assert!(table.find(&get, "/p96/users", None, &no_headers).is_some());
    c.bench_function("route lookup, 100 rules (a late prefix rule)", |b| {
        b.iter(|| table.find(black_box(&get), black_box("/p96/users"), None, &no_headers).is_some())
    });
    c.bench_function("route lookup, 100 rules (no rule matches)", |b| {
        b.iter(|| table.find(black_box(&get), black_box("/nothing/here"), Some("q=1"), &no_headers).is_some())
    });

    // What a reference count every worker writes costs against one only its worker writes (a
    // request's route is one of the second, `live::Route`): this thread clones and drops an `Arc`
    // while a second thread, as another worker, does the same to the same one or to its own.
    let mut group = c.benchmark_group("Arc clone + drop");
    for (name, other) in [
        ("alone", None),
        ("while another thread clones its own", Some(false)),
        ("while another thread clones the same", Some(true)),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mine = Arc::new(Padded(0));
                let theirs = if other == Some(true) { mine.clone() } else { Arc::new(Padded(0)) };
                let stop = AtomicBool::new(false);
                std::thread::scope(|s| {
                    if other.is_some() {
                        s.spawn(|| {
                            while !stop.load(Ordering::Relaxed) {
                                black_box(theirs.clone());
                            }
                        });
                    }
                    let started = Instant::now();
                    for _ in 0..iters {
                        black_box(mine.clone());
                    }
                    let elapsed = started.elapsed();
                    stop.store(true, Ordering::Relaxed);
                    elapsed
                })
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("config");
    group.sample_size(10);
    group.bench_function("load + validate 10,000 services", |b| b.iter(|| load(black_box(&text))));
    group.bench_function("compile 10,000 services", |b| {
        b.iter(|| {
            let mut ipam = Ipam::in_memory("242.0.0.0/8".parse().unwrap());
            catalog::compile(black_box(&loaded.resources), &CompileOptions::default(), &mut ipam)
        })
    });
    group.finish();
}

criterion_group!(micro, benches);
criterion_main!(micro);
