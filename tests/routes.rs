//! MeshHTTPRoute and MeshTCPRoute on MeshExternalServices, against real upstreams: every match
//! type and their order, header modifiers, URL rewrite, redirects (with curl), weighted splits
//! (with curl, within a statistical bound), weight 0, the unmatched default, TCP splits and a
//! route reload.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;

use bytes::Bytes;
use common::http_client::*;
use common::*;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP server that names itself in `x-who` and echoes what it got:
/// `who path host x-added x-set x-gone`.
async fn named(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
                    let added: Vec<String> = req
                        .headers()
                        .get_all("x-added")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .map(String::from)
                        .collect();
                    let body = format!(
                        "{name} {} {} {} {} {}",
                        req.uri().path_and_query().map_or("/", |p| p.as_str()),
                        h("host"),
                        if added.is_empty() { "-".to_string() } else { added.join("+") },
                        h("x-set"),
                        h("x-gone")
                    );
                    let response = http::Response::builder()
                        .header("x-who", name)
                        .header("x-upstream-only", "1")
                        .header("x-saw-original-path", h("x-envoy-original-path"))
                        .body(Full::new(Bytes::from(body)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, task)
}

/// Services `main` (the one dialled), `v2` and `legacy`, each on its own upstream, plus `routes`.
struct Setup {
    outbound: SocketAddr,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    _upstreams: Vec<tokio::task::JoinHandle<()>>,
}

async fn setup(routes: &str) -> Setup {
    let mut yaml = String::new();
    let mut upstreams = Vec::new();
    let outbound = free_addr("127.0.0.1");
    for name in ["main", "v2", "legacy"] {
        let (addr, task) = named(name).await;
        upstreams.push(task);
        let out = if name == "main" { outbound } else { free_addr("127.0.0.1") };
        yaml.push_str(&service_with_protocol(name, "http", out, &endpoint("127.0.0.1", addr.port(), 0), ""));
        yaml.push_str("---\n");
    }
    yaml =
        yaml.replacen("name: v2\nmesh: default\nspec:", "name: v2\nmesh: default\nlabels: {track: canary}\nspec:", 1);
    yaml.push_str(routes);
    let (dir, config) = config_dir(&yaml);
    Setup { outbound, _dir: dir, config, _upstreams: upstreams }
}

async fn ask(outbound: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> (u16, String, http::HeaderMap) {
    let response = h1(outbound).await.send_request(get(uri, headers)).await.unwrap();
    let headers = response.headers().clone();
    let (status, body) = text(response).await;
    (status.as_u16(), body, headers)
}

/// A route sending every request for `main` to `backend`.
fn catch_all_to(backend: &str) -> String {
    format!("type: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: main}}\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n      default: {{backendRefs: [{{kind: MeshExternalService, name: {backend}}}]}}\n")
}

fn who(body: &str) -> &str {
    body.split(' ').next().unwrap_or("")
}

const MATCHES: &str = r#"type: MeshHTTPRoute
name: matches
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /api}}]
      default: {backendRefs: [{kind: MeshExternalService, name: legacy}]}
    - matches: [{path: {type: PathPrefix, value: /api/v2}}]
      default: {backendRefs: [{kind: MeshExternalService, labels: {track: canary}}]}
    - matches: [{path: {type: Exact, value: /api/v2/exact}}]
      default: {backendRefs: [{kind: MeshExternalService, name: main}]}
    - matches: [{path: {type: RegularExpression, value: "/re/[0-9]+"}}]
      default: {backendRefs: [{kind: MeshExternalService, name: v2}]}
    - matches: [{method: DELETE}]
      default: {backendRefs: [{kind: MeshExternalService, name: legacy}]}
    - matches: [{headers: [{name: x-canary, value: "yes"}]}, {queryParams: [{type: Exact, name: canary, value: "1"}]}]
      default: {backendRefs: [{kind: MeshExternalService, name: v2}]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_match_type_in_kumas_order() {
    let s = setup(MATCHES).await;
    let _proxy = start(options(s.config.clone())).await;
    let cases = [
        ("http://x/api", &[][..], "legacy"),
        ("http://x/api/users", &[], "legacy"),
        ("http://x/apix", &[], "main"),         // a prefix matches whole segments only
        ("http://x/api/v2/users", &[], "v2"),   // the longer prefix wins
        ("http://x/api/v2/exact", &[], "main"), // Exact before any prefix
        ("http://x/re/123", &[], "v2"),
        ("http://x/re/abc", &[], "main"), // the regex matches the whole path
        ("http://x/other", &[("x-canary", "yes")], "v2"),
        ("http://x/other?canary=1", &[], "v2"),
        ("http://x/other?canary=2", &[], "main"),
        ("http://x/nothing", &[], "main"), // no rule: the service itself
    ];
    for (uri, headers, want) in cases {
        let (status, body, _) = ask(s.outbound, uri, headers).await;
        assert_eq!((status, who(&body)), (200, want), "{uri} {headers:?}");
    }
    let request = http::Request::delete("http://x/anything").body(Full::new(Bytes::new())).unwrap();
    let (_, body) = text(h1(s.outbound).await.send_request(request).await.unwrap()).await;
    assert_eq!(who(&body), "legacy", "method match");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_modifiers_and_url_rewrite() {
    let routes = r#"type: MeshHTTPRoute
name: filters
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /v1}}]
      default:
        filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-set, value: "set"}], add: [{name: x-added, value: "two"}], remove: [x-gone]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-route, value: "filters"}], remove: [x-upstream-only]}
        - type: URLRewrite
          urlRewrite: {hostname: api.internal.test, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - matches: [{path: {type: PathPrefix, value: /strip}}]
      default:
        filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - matches: [{path: {type: Exact, value: /old}}]
      default:
        filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /new}}
"#;
    let s = setup(routes).await;
    let _proxy = start(options(s.config.clone())).await;
    let headers = [("x-added", "one"), ("x-gone", "bye"), ("x-set", "client")];
    let (status, body, response_headers) = ask(s.outbound, "http://app.local/v1/users?q=1", &headers).await;
    assert_eq!(status, 200);
    assert_eq!(body, "main /v2/users?q=1 api.internal.test one+two set -");
    assert_eq!(response_headers["x-route"], "filters");
    assert!(!response_headers.contains_key("x-upstream-only"));
    assert_eq!(response_headers["x-saw-original-path"], "/v1/users?q=1", "as Envoy's router tells the endpoint");
    let (_, body, response_headers) = ask(s.outbound, "http://x/strip/a/b?k=v", &[]).await;
    assert!(body.starts_with("main /a/b?k=v "), "{body}");
    assert_eq!(response_headers["x-saw-original-path"], "/strip/a/b?k=v");
    let (_, _, response_headers) = ask(s.outbound, "http://x/kept", &[]).await;
    assert_eq!(response_headers["x-saw-original-path"], "-", "only a rewritten path has it");
    let (_, body, _) = ask(s.outbound, "http://x/strip", &[]).await;
    assert!(body.starts_with("main / "), "prefix `/` of a whole path: {body}");
    let (_, body, _) = ask(s.outbound, "http://x/old?z=9", &[]).await;
    assert!(body.starts_with("main /new?z=9 "), "{body}");
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_seen_by_curl() {
    let routes = r#"type: MeshHTTPRoute
name: redirects
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /moved}}]
      default:
        filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, hostname: new.example.test, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /here}}
    - matches: [{path: {type: Exact, value: /temp}}]
      default:
        filters:
        - type: RequestRedirect
          requestRedirect: {port: 8443}
    - matches: [{path: {type: Exact, value: /host}}]
      default:
        filters:
        - type: RequestRedirect
          requestRedirect: {hostname: new.example.test}
    - matches: [{path: {type: Exact, value: /secure}}]
      default:
        filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https}
"#;
    let s = setup(routes).await;
    let _proxy = start(options(s.config.clone())).await;
    let base = format!("http://{}", s.outbound);
    let out = curl(&["-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", &format!("{base}/moved/a?x=1")]);
    assert_eq!(out, "301 https://new.example.test/here/a?x=1");
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "-H",
        "Host: shop.test",
        &format!("{base}/temp"),
    ]);
    assert_eq!(out, "302 http://shop.test:8443/temp");
    // As Envoy builds the Location (Kuma sets host_redirect, scheme_redirect): a new hostname
    // takes no port from the request; a new scheme drops the request's port only when it was
    // the old scheme's default.
    let redirect = |host: &str, path: &str| {
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
            &format!("Host: {host}"),
            &format!("{base}{path}"),
        ])
    };
    assert_eq!(redirect("legacy.test:8080", "/host"), "302 http://new.example.test/host");
    assert_eq!(redirect("legacy.test:8080", "/secure"), "302 https://legacy.test:8080/secure");
    assert_eq!(redirect("legacy.test:80", "/secure"), "302 https://legacy.test/secure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_seen_by_curl_and_weight_zero_drops_a_backend() {
    let routes = r#"type: MeshHTTPRoute
name: split
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /}}]
      default:
        backendRefs:
        - {kind: MeshExternalService, name: main, weight: 80}
        - {kind: MeshExternalService, name: v2, weight: 20}
        - {kind: MeshExternalService, name: legacy, weight: 0}
"#;
    let s = setup(routes).await;
    let _proxy = start(options(s.config.clone())).await;
    let url = format!("http://{}/split", s.outbound);
    // One curl process, 300 requests over keep-alive: every request is routed on its own.
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 300).collect();
    let out = curl(&[&["-w", "\n"][..], &urls].concat());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        *counts.entry(who(line)).or_default() += 1;
    }
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    assert_eq!(counts.get("legacy"), None, "weight 0 gets nothing");
    // Binomial(300, 0.2): mean 60, sd 6.9; ±4 sd.
    assert!((32..=88).contains(&v2), "v2 got {v2} of 300: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_reload_applies_to_open_keep_alive_connections() {
    let s = setup(&catch_all_to("v2")).await;
    let mut proxy = start(options(s.config.clone())).await;
    let mut client = h1(s.outbound).await;
    let (_, body) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
    assert_eq!(who(&body), "v2");
    let text_now = std::fs::read_to_string(&s.config).unwrap().replace("name: v2}]}", "name: legacy}]}");
    std::fs::write(&s.config, text_now).unwrap();
    proxy.reload().await.unwrap();
    client.ready().await.unwrap();
    let (_, body) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
    assert_eq!(who(&body), "legacy");
}

/// On an HTTP service with no MeshHTTPRoute, a MeshTCPRoute sends the connection, as bytes, to
/// its backend (Kuma's tcp_proxy), where each request went to the targeted service while the
/// route's metric named the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_route_on_an_http_service_sends_its_connections_to_the_backend() {
    let route = "type: MeshTCPRoute\nname: to-v2\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    rules: [{default: {backendRefs: [{kind: MeshExternalService, name: v2}]}}]\n";
    let s = setup(route).await;
    let _proxy = start(options(s.config.clone())).await;
    for path in ["/", "/a"] {
        let (status, body, _) = ask(s.outbound, &format!("http://x{path}"), &[]).await;
        assert_eq!((status, who(&body)), (200, "v2"), "{body}");
    }
}

/// Paths are normalized before routing, as Kuma's Envoy does (`normalize_path`): a request for
/// `/public/../admin` is matched and sent as `/admin`; it matched the `/public` rule and went to
/// that rule's backend, which resolved it to `/admin` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_carry_a_request_past_its_route() {
    let route = "type: MeshHTTPRoute\nname: public\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /public}}]\n      default: {backendRefs: [{kind: MeshExternalService, name: v2}]}\n";
    let s = setup(route).await;
    let _proxy = start(options(s.config.clone())).await;
    let (_, body, _) = ask(s.outbound, "http://x/public/../admin", &[]).await;
    assert!(body.starts_with("main /admin "), "{body}");
    let (_, body, _) = ask(s.outbound, "http://x/public/./page", &[]).await;
    assert!(body.starts_with("v2 /public/page "), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_splits_connections() {
    let a = echo_server("127.0.0.1:0".parse().unwrap(), "a").await;
    let b = echo_server("127.0.0.1:0".parse().unwrap(), "b").await;
    let c = echo_server("127.0.0.1:0".parse().unwrap(), "c").await;
    let outbound = free_addr("127.0.0.1");
    let mut yaml = service_with_outbound("tcp-main", outbound, &endpoint("127.0.0.1", a.addr.port(), 0), "");
    for (name, port) in [("tcp-b", b.addr.port()), ("tcp-c", c.addr.port())] {
        yaml.push_str("---\n");
        yaml.push_str(&service_with_outbound(name, free_addr("127.0.0.1"), &endpoint("127.0.0.1", port, 0), ""));
    }
    yaml.push_str("---\ntype: MeshTCPRoute\nname: split\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: tcp-main}\n    rules:\n    - default:\n        backendRefs:\n        - {kind: MeshExternalService, name: tcp-b, weight: 1}\n        - {kind: MeshExternalService, name: tcp-c, weight: 1}\n        - {kind: MeshExternalService, name: tcp-main, weight: 0}\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        let (greeting, _) = greet(outbound).await.unwrap();
        *seen.entry(greeting).or_default() += 1;
    }
    assert_eq!(seen.get("a"), None, "weight 0");
    assert!(seen.get("b").is_some_and(|&n| n > 0) && seen.get("c").is_some_and(|&n| n > 0), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror_gets_a_copy_and_never_changes_the_primary_answer() {
    let mirror = common::http_upstream::http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (primary, _task) = named("main").await;
    let mut yaml = service_with_protocol("main", "http", outbound, &endpoint("127.0.0.1", primary.port(), 0), "");
    yaml.push_str("---\n");
    yaml.push_str(&service_with_protocol(
        "shadow",
        "http",
        free_addr("127.0.0.1"),
        &endpoint("127.0.0.1", mirror.addr.port(), 0),
        "",
    ));
    // `down` has an endpoint nothing listens on.
    yaml.push_str("---\n");
    yaml.push_str(&service_with_protocol(
        "down",
        "http",
        free_addr("127.0.0.1"),
        &endpoint("127.0.0.1", free_addr("127.0.0.1").port(), 0),
        "",
    ));
    yaml.push_str("---\ntype: MeshHTTPRoute\nname: mirror\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /m}}]\n      default:\n        filters:\n        - {type: RequestMirror, requestMirror: {backendRef: {kind: MeshExternalService, name: shadow}}}\n    - matches: [{path: {type: PathPrefix, value: /d}}]\n      default:\n        filters:\n        - {type: RequestMirror, requestMirror: {percentage: 100, backendRef: {kind: MeshExternalService, name: down}}}\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    // The mirror is slow (it honours x-delay-ms; the primary does not): the answer does not wait.
    let (status, body, _) = ask(outbound, "http://x/m/1", &[("x-delay-ms", "300")]).await;
    assert_eq!((status, who(&body)), (200, "main"));
    eventually("the mirror got its copy", std::time::Duration::from_secs(10), || async { mirror.connections() >= 1 })
        .await;
    let (status, body, _) = ask(outbound, "http://x/d/1", &[]).await;
    assert_eq!((status, who(&body)), (200, "main"), "a mirror that is down changes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_reloads_under_load_fail_no_request() {
    let s = setup(&catch_all_to("v2")).await;
    let mut proxy = start(options(s.config.clone())).await;
    let outbound = s.outbound;
    let load = tokio::spawn(async move {
        let mut seen = HashMap::<String, usize>::new();
        let mut client = h1(outbound).await;
        for _ in 0..400 {
            client.ready().await.unwrap();
            let (status, body) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
            assert_eq!(status, 200, "{body}");
            *seen.entry(who(&body).to_string()).or_default() += 1;
        }
        seen
    });
    for backend in ["legacy", "v2", "legacy", "v2", "legacy"] {
        let current = std::fs::read_to_string(&s.config).unwrap();
        let next = current.replace("name: v2}]}", "name: NEXT}]}").replace("name: legacy}]}", "name: NEXT}]}");
        std::fs::write(&s.config, next.replace("NEXT", backend)).unwrap();
        proxy.reload().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let seen = load.await.unwrap();
    assert_eq!(seen.values().sum::<usize>(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_matches_merge_across_routes_and_routed_requests_are_counted() {
    // `zzz` ranks below `aaa`: its rule's filters stay, `aaa`'s backendRefs replace its list.
    let routes = r#"type: MeshHTTPRoute
name: zzz
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /x}}]
      default:
        filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-set, value: zzz}]}}]
        backendRefs: [{kind: MeshExternalService, name: v2}]
---
type: MeshHTTPRoute
name: aaa
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{path: {type: PathPrefix, value: /x}}]
      default:
        backendRefs: [{kind: MeshExternalService, name: legacy}]
---
type: MeshTCPRoute
name: ignored-for-http
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules: [{default: {backendRefs: [{kind: MeshExternalService, name: v2}]}}]
"#;
    let s = setup(routes).await;
    let _proxy = start(options(s.config.clone())).await;
    let (_, body, _) = ask(s.outbound, "http://x/x/1", &[]).await;
    assert!(body.starts_with("legacy /x/1 ") && body.ends_with(" zzz -"), "{body}");
    let (_, body, _) = ask(s.outbound, "http://x/other", &[]).await;
    assert_eq!(who(&body), "main", "an HTTP route applies, so the MeshTCPRoute does not");
    let metrics = mesh_egress::metrics::metrics().encode();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("mesh_egress_route_requests_total") && l.contains("route=\"default/aaa rules[0]\""))
        .unwrap_or_else(|| panic!("no route metric in:\n{metrics}"));
    assert!(line.contains("backend=\"default/legacy\"") && line.ends_with(" 1"), "{line}");
}

#[test]
fn an_http_route_to_a_tcp_service_is_reported_and_gets_no_traffic() {
    let yaml = format!(
        "{}---\n{}---\ntype: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: web}}\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n      default: {{backendRefs: [{{kind: MeshExternalService, name: raw}}, {{kind: MeshExternalService, name: nowhere}}]}}\n",
        service_with_protocol("web", "http", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 1, 0), ""),
        service_with_outbound("raw", free_addr("127.0.0.1"), &endpoint("127.0.0.1", 2, 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-egress")).args(["validate"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "warnings only: {stderr}");
    assert!(
        stderr.contains(
            "backendRef default/raw is a tcp service: an HTTP route splits only to http, http2 and grpc services"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("backendRef MeshExternalService nowhere names no MeshExternalService of mesh default"),
        "{stderr}"
    );
}

/// A mirror that reports each request's head as it arrives, then the size of its body when
/// whole, or `usize::MAX` when it failed before its end.
struct BodySizes {
    addr: SocketAddr,
    /// Each request's path, as its head arrives.
    heads: tokio::sync::mpsc::UnboundedReceiver<String>,
    sizes: tokio::sync::mpsc::UnboundedReceiver<usize>,
}

async fn body_sizes() -> BodySizes {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (heads_tx, heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (sizes_tx, sizes) = tokio::sync::mpsc::unbounded_channel::<usize>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (heads_tx, sizes_tx) = (heads_tx.clone(), sizes_tx.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let _ = heads_tx.send(req.uri().path().to_owned());
                    let sizes_tx = sizes_tx.clone();
                    async move {
                        use http_body_util::BodyExt as _;
                        let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
                        let _ = sizes_tx.send(body);
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    BodySizes { addr, heads, sizes }
}

/// A request body is copied to the mirror whole, also when the primary may be retried (its
/// copy used to end at once: the mirror got an empty body), and a body the application cuts
/// short reaches the mirror as failed, never as a whole body of what came. The cut-short
/// request goes to an endpoint that reads the whole body before it answers: one that answers
/// at once may end the exchange before the mirror's copy has started, and the mirror then
/// rightly gets nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_request_body_is_copied_to_the_mirror() {
    let BodySizes { addr: mirror_addr, mut heads, mut sizes } = body_sizes().await;
    let (primary, _task) = named("main").await;
    let reader = body_sizes().await;
    let (outbound, retried, read) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let mut yaml = service_with_protocol("main", "http", outbound, &endpoint("127.0.0.1", primary.port(), 0), "");
    for (name, listen, port) in [
        ("retried", retried, primary.port()),
        ("reader", read, reader.addr.port()),
        ("copy", free_addr("127.0.0.1"), mirror_addr.port()),
    ] {
        yaml.push_str("---\n");
        yaml.push_str(&service_with_protocol(name, "http", listen, &endpoint("127.0.0.1", port, 0), ""));
    }
    for name in ["main", "retried", "reader"] {
        yaml.push_str(&format!("---\ntype: MeshHTTPRoute\nname: mirror-{name}\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: {name}}}\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: /}}}}]\n      default:\n        filters:\n        - {{type: RequestMirror, requestMirror: {{backendRef: {{kind: MeshExternalService, name: copy}}}}}}\n"));
    }
    yaml.push_str("---\ntype: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: retried}\n    default:\n      http: {numRetries: 1, retryOn: [5xx]}\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let ten_seconds = std::time::Duration::from_secs(10);
    for to in [outbound, retried] {
        let request = http::Request::post("http://x/upload").body(Full::new(Bytes::from(vec![b'm'; 10_000]))).unwrap();
        let (status, body) = text(h1(to).await.send_request(request).await.unwrap()).await;
        assert_eq!((status.as_u16(), who(&body)), (200, "main"));
        assert_eq!(
            tokio::time::timeout(ten_seconds, sizes.recv()).await.unwrap().unwrap(),
            10_000,
            "the mirror got the whole body ({to})"
        );
    }
    // A chunk of 5,000 bytes, then, once the mirror has its request, the application is gone.
    while heads.try_recv().is_ok() {} // the earlier requests'
    let mut app = TcpStream::connect(read).await.unwrap();
    // Chunked: with a Content-Length the mirror's client would itself see the body fall short.
    app.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1388\r\n").await.unwrap();
    app.write_all(&[b'h'; 5_000]).await.unwrap();
    app.write_all(b"\r\n").await.unwrap();
    tokio::time::timeout(ten_seconds, heads.recv()).await.unwrap().unwrap();
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = app.read_to_end(&mut rest).await;
    assert_eq!(
        tokio::time::timeout(ten_seconds, sizes.recv()).await.unwrap().unwrap(),
        usize::MAX,
        "the mirror took part of a body for all of it"
    );
}

/// A RequestMirror copy goes only where the request itself may go, and only to a mirror that may
/// take traffic: a mirror service that is broken (here: its CA secret is missing, so it has no
/// TLS client) gets nothing, where the copy used to go to it in clear text. Both mirror
/// services here lead to one listener, which sees the copies in the order they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_may_not_take_traffic_gets_no_copy() {
    let BodySizes { addr: mirror_addr, mut heads, .. } = body_sizes().await;
    let (primary, _task) = named("main").await;
    let outbound = free_addr("127.0.0.1");
    let mut yaml = service_with_protocol("main", "http", outbound, &endpoint("127.0.0.1", primary.port(), 0), "");
    let broken_tls = "  tls:\n    enabled: true\n    verification:\n      caCert:\n        secret: missing\n";
    for (name, tls) in [("copy", ""), ("broken-copy", broken_tls)] {
        yaml.push_str("---\n");
        yaml.push_str(&service_with_protocol(
            name,
            "http",
            free_addr("127.0.0.1"),
            &endpoint("127.0.0.1", mirror_addr.port(), 0),
            tls,
        ));
    }
    let rule = |path: &str, to: &str| {
        format!("    - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n      default:\n        filters:\n        - {{type: RequestMirror, requestMirror: {{backendRef: {{kind: MeshExternalService, name: {to}}}}}}}\n")
    };
    yaml.push_str(&format!(
        "---\ntype: MeshHTTPRoute\nname: mirrors\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: main}}\n    rules:\n{}{}",
        rule("/broken", "broken-copy"),
        rule("/ok", "copy")
    ));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    for path in ["/broken", "/ok"] {
        let (status, body) =
            text(h1(outbound).await.send_request(get(&format!("http://x{path}"), &[])).await.unwrap()).await;
        assert_eq!((status.as_u16(), who(&body)), (200, "main"), "{path}");
    }
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), heads.recv()).await.unwrap().unwrap();
    assert_eq!(first, "/ok", "a copy went to the broken mirror service");
}

/// A backend is reached with its own endpoints, TLS and Host; the request's timeouts and
/// retries are the dialled service's, as Kuma configures them on that service's listener and
/// routes (the backend's cluster keeps its connection settings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_is_reached_with_its_own_endpoints_tls_host_and_the_dialled_service_s_route_policies() {
    use base64::Engine as _;
    // `secure` is TLS to a DNS endpoint name; `slow` has a MeshTimeout of its own, `main` one and
    // a MeshRetry.
    let ca = common::pki::Ca::new("route-ca");
    let leaf = ca.server(&["api.partner.test"]);
    let tls_upstream = common::http_upstream::http_upstream(Some(common::http_upstream::tls_config(&leaf))).await;
    let plain_upstream = common::http_upstream::http_upstream(None).await;
    let dns = dns_server(30).await;
    dns.set("api.partner.test", "127.0.0.1".parse().unwrap());
    let (primary, _task) = named("main").await;
    let outbound = free_addr("127.0.0.1");
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      caCert:\n        inline: {}\n",
        base64::engine::general_purpose::STANDARD.encode(&ca.pem)
    );
    let yaml = [
        service_with_protocol("main", "http", outbound, &endpoint("127.0.0.1", primary.port(), 0), ""),
        service_with_protocol("secure", "http", free_addr("127.0.0.1"), &endpoint("api.partner.test", tls_upstream.addr.port(), 0), &tls),
        service_with_protocol("slow", "http", free_addr("127.0.0.1"), &endpoint("127.0.0.1", plain_upstream.addr.port(), 0), ""),
        "type: MeshTimeout\nname: slow-only\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: slow}\n    default: {http: {requestTimeout: 200ms}}\n  - targetRef: {kind: MeshExternalService, name: main}\n    default: {http: {requestTimeout: 2s}}\n".to_string(),
        "type: MeshRetry\nname: main-retries\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    default: {http: {numRetries: 1, retryOn: [5xx], backOff: {baseInterval: 1ms}}}\n".to_string(),
        "type: MeshHTTPRoute\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /secure}}]\n      default: {backendRefs: [{kind: MeshExternalService, name: secure}]}\n    - matches: [{path: {type: PathPrefix, value: /slow}}]\n      default: {backendRefs: [{kind: MeshExternalService, name: slow}]}\n".to_string(),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.upstream.resolver = mesh_egress::upstream::ResolverSource::new(vec![dns.addr]);
    let _proxy = start(opts).await;
    let (status, body, _) = ask(outbound, "http://app.local/secure/x", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        field(&body, "host"),
        format!("api.partner.test:{}", tls_upstream.addr.port()),
        "TLS, SNI and Host of the backend"
    );
    let (status, _, _) = ask(outbound, "http://app.local/slow/x", &[("x-delay-ms", "600")]).await;
    assert_eq!(status, 200, "the dialled service's 2 s request timeout, not the backend's 200 ms");
    let (status, _, _) = ask(outbound, "http://app.local/slow/x", &[("x-delay-ms", "4000")]).await;
    assert_eq!(status, 504, "the dialled service's MeshTimeout");
    let key = format!("dialled-retry-{}", std::process::id());
    let (status, _, headers) =
        ask(outbound, "http://app.local/slow/x", &[("x-fail-first", "1"), ("x-key", &key)]).await;
    assert_eq!((status, headers["x-attempt"].to_str().unwrap()), (200, "2"), "the dialled service's MeshRetry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_query_match_types_full_path_redirect_and_a_zero_percent_mirror() {
    let routes = r#"type: MeshHTTPRoute
name: kinds
mesh: default
spec:
  to:
  - targetRef: {kind: MeshExternalService, name: main}
    rules:
    - matches: [{headers: [{type: Prefix, name: x-p, value: "ab"}]}]
      default: {backendRefs: [{kind: MeshExternalService, name: v2}]}
    - matches: [{headers: [{type: RegularExpression, name: x-r, value: "v[0-9]+"}]}]
      default: {backendRefs: [{kind: MeshExternalService, name: legacy}]}
    - matches: [{path: {type: PathPrefix, value: /absent}, headers: [{type: Absent, name: x-token}]}]
      default: {backendRefs: [{kind: MeshExternalService, name: legacy}]}
    - matches: [{queryParams: [{type: RegularExpression, name: id, value: "[0-9]+"}]}]
      default: {backendRefs: [{kind: MeshExternalService, name: v2}]}
    - matches: [{path: {type: Exact, value: /go}}]
      default:
        filters:
        - {type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /gone}, statusCode: 308}}
        - {type: RequestMirror, requestMirror: {percentage: 0, backendRef: {kind: MeshExternalService, name: v2}}}
"#;
    let s = setup(routes).await;
    let _proxy = start(options(s.config.clone())).await;
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case<'_>; 8] = [
        ("http://x/a", &[("x-p", "abc")], "v2"),
        ("http://x/a", &[("x-p", "xab")], "main"),
        ("http://x/a", &[("x-r", "v12")], "legacy"),
        ("http://x/a", &[("x-r", "v12x")], "main"), // the whole value must match
        ("http://x/absent", &[], "legacy"),
        ("http://x/absent", &[("x-token", "t")], "main"),
        ("http://x/a?id=42", &[], "v2"),
        ("http://x/a?id=4x", &[], "main"),
    ];
    for (uri, headers, want) in cases {
        let (_, body, _) = ask(s.outbound, uri, headers).await;
        assert_eq!(who(&body), want, "{uri} {headers:?}");
    }
    let (status, _, headers) = ask(s.outbound, "http://shop.test/go?x=1", &[]).await;
    assert_eq!((status, headers["location"].to_str().unwrap()), (308, "http://shop.test/gone?x=1"));
}

/// Two routes' rules that tie in Kuma's match order keep the stronger route's first (Kuma
/// reverses each route's rules, merges by key where each last appears, and reverses back):
/// between `tie-a` and `tie-z`, `tie-a` wins; the weaker one's rule came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tie_in_match_order_goes_to_the_stronger_route() {
    let route = |name: &str, header: &str, backend: &str| {
        format!("type: MeshHTTPRoute\nname: {name}\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: main}}\n    rules:\n    - matches: [{{headers: [{{type: Exact, name: {header}, value: \"1\"}}]}}]\n      default: {{backendRefs: [{{kind: MeshExternalService, name: {backend}}}]}}\n")
    };
    let routes = format!("{}---\n{}", route("tie-z", "x-region", "legacy"), route("tie-a", "x-canary", "v2"));
    let s = setup(&routes).await;
    let _proxy = start(options(s.config.clone())).await;
    let (status, body, _) = ask(s.outbound, "http://x/", &[("x-region", "1"), ("x-canary", "1")]).await;
    assert_eq!((status, who(&body)), (200, "v2"), "tie-a's rule, the stronger route's");
    let (_, body, _) = ask(s.outbound, "http://x/", &[("x-region", "1")]).await;
    assert_eq!(who(&body), "legacy");
}

/// MeshTimeout and MeshRetry items `to: MeshHTTPRoute` set the requests of that route's rules
/// (Kuma's route-level conf: the Mesh items and the route's, not the service's): here a longer
/// request timeout and retries for `/reports`, where the service has a short timeout and none.
/// Such items were validated and applied to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_to_a_mesh_http_route_set_its_requests() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let yaml = [
        service_with_protocol("reports", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        "type: MeshHTTPRoute\nname: slow-reports\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: reports}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /reports}}]\n      default: {}\n".to_string(),
        "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: reports}\n    default: {http: {requestTimeout: 1s}}\n  - targetRef: {kind: MeshHTTPRoute, name: slow-reports}\n    default: {http: {requestTimeout: 5s}}\n".to_string(),
        "type: MeshRetry\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: reports}\n    default: {http: {numRetries: 1, retryOn: [5xx], backOff: {baseInterval: 1ms}}}\n  - targetRef: {kind: MeshHTTPRoute, name: slow-reports}\n    default: {http: {perTryTimeout: 5s, backOff: {baseInterval: 1ms}}}\n".to_string(),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let (status, _, _) = ask(outbound, "http://x/reports/q3", &[("x-delay-ms", "2000")]).await;
    assert_eq!(status, 200, "the route's 5 s request timeout");
    let (status, _, _) = ask(outbound, "http://x/other", &[("x-delay-ms", "2500")]).await;
    assert_eq!(status, 504, "the service's 1 s elsewhere");
    // The route's MeshRetry conf is the Mesh items and its own, not the service's: its default
    // conditions retry a 503 but not a 500, which the service's `5xx` retries elsewhere.
    fn fail<'a>(key: &'a str, code: &'a str) -> [(&'a str, &'a str); 3] {
        [("x-fail-first", "1"), ("x-fail-status", code), ("x-key", key)]
    }
    let [a, b, c] = ["a", "b", "c"].map(|k| format!("route-level-{k}-{}", std::process::id()));
    let (a, b, c) = (a.as_str(), b.as_str(), c.as_str());
    assert_eq!(ask(outbound, "http://x/reports/q4", &fail(a, "503")).await.0, 200, "the route's defaults: 503");
    assert_eq!(ask(outbound, "http://x/reports/q5", &fail(b, "500")).await.0, 500, "not the service's 5xx");
    assert_eq!(ask(outbound, "http://x/other", &fail(c, "500")).await.0, 200, "the service's 5xx elsewhere");
}

/// A `to: MeshHTTPRoute` item names its route by labels, or by the route's
/// `kuma.io/display-name` (a synced route's resource name carries a suffix), as Kuma resolves
/// them: such items applied to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_http_route_is_named_by_labels_or_display_name() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let route = |name: &str, labels: &str, path: &str| {
        format!("type: MeshHTTPRoute\nname: {name}\nmesh: default\nlabels: {labels}\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: named}}\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n      default: {{}}\n")
    };
    let yaml = [
        service_with_protocol("named", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        route("by-labels", "{speed: slow}", "/labelled"),
        route("shown.kuma-demo", "{kuma.io/display-name: shown}", "/shown"),
        "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: named}\n    default: {http: {requestTimeout: 300ms}}\n  - targetRef: {kind: MeshHTTPRoute, labels: {speed: slow}}\n    default: {http: {requestTimeout: 5s}}\n  - targetRef: {kind: MeshHTTPRoute, name: shown}\n    default: {http: {requestTimeout: 5s}}\n".to_string(),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    for path in ["/labelled/a", "/shown/a"] {
        let (status, _, _) = ask(outbound, &format!("http://x{path}"), &[("x-delay-ms", "800")]).await;
        assert_eq!(status, 200, "{path}: the route's 5 s");
    }
    let (status, _, _) = ask(outbound, "http://x/other", &[("x-delay-ms", "800")]).await;
    assert_eq!(status, 504, "the service's 300 ms elsewhere");
}

/// A route's MeshTimeout `streamIdleTimeout` longer than the service's widens the application
/// connection's silence bound with a request open (the longer of the idle and stream idle
/// timeouts), so that bound does not cut that route's requests sooner: a request on the route
/// waiting 1.5 s for its answer, with the service's stream idle timeout at 400 ms and the
/// connection idle timeout at 300 ms, gets its 200 (the connection was closed at 400 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_stream_idle_timeout_widens_the_connections_silence_bound() {
    let upstream = common::http_upstream::http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let yaml = [
        service_with_protocol("quiet", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        "type: MeshHTTPRoute\nname: slow\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: quiet}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /slow}}]\n      default: {}\n".to_string(),
        "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: quiet}\n    default: {http: {streamIdleTimeout: 400ms}}\n  - targetRef: {kind: MeshHTTPRoute, name: slow}\n    default: {http: {streamIdleTimeout: 5s}}\n".to_string(),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.timeouts.idle = std::time::Duration::from_millis(300);
    let _proxy = start(opts).await;
    let (status, _, _) = ask(outbound, "http://x/slow/a", &[("x-delay-ms", "1500")]).await;
    assert_eq!(status, 200, "the route's 5 s stream idle timeout bounds the connection's silence");
}
