//! MeshTrace against real traffic and real collectors: an OTLP/gRPC receiver written with grpcio
//! and the OpenTelemetry protos (`tests/peers/otlp_receiver.py`), and a Zipkin v2 collector of
//! the test's own. Each test checks what the endpoint received (the propagated context) against
//! what the collector received (the span, its ids, name, kind and attributes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::http_client::*;
use common::http_upstream::http_upstream;
use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use serde_json::Value;

/// `name` (http) on a fresh outbound, with a Dataplane whose inbound is `kuma.io/service: web`,
/// plus `policies`.
fn config(name: &str, port: u16, policies: &str) -> (SocketAddr, tempfile::TempDir, PathBuf) {
    let outbound = free_addr("127.0.0.1");
    let service = service_with_protocol(name, "http", outbound, &endpoint("127.0.0.1", port, 0), "").replace(
        "networking:\n  outbound:",
        "networking:\n  address: 10.1.2.3\n  inbound: [{port: 8080, tags: {kuma.io/service: web}}]\n  outbound:",
    );
    let (dir, path) = config_dir(&format!("{service}---\n{policies}"));
    (outbound, dir, path)
}

/// One request through the proxy: the status and the upstream's description of what it got.
async fn request(outbound: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let response = h1(outbound).await.send_request(get("http://traced.test/orders?id=7", headers)).await.unwrap();
    let (status, body) = text(response).await;
    (status.as_u16(), body)
}

/// The next span the OTLP receiver printed.
fn next_span(receiver: &OtlpReceiver) -> Value {
    loop {
        let line = receiver.lines.recv_timeout(Duration::from_secs(15)).expect("no span reached the receiver");
        let value: Value = serde_json::from_str(&line).unwrap();
        if value.get("span").is_some() {
            return value;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_telemetry_spans_reach_a_real_otlp_receiver_with_w3c_propagation() {
    let receiver = otlp_receiver();
    let upstream = http_upstream(None).await;
    let policy = format!(
        r#"type: MeshTrace
name: traces
mesh: default
spec:
  targetRef: {{kind: Mesh}}
  default:
    backends:
    - type: OpenTelemetry
      openTelemetry: {{endpoint: "127.0.0.1:{}"}}
    tags:
    - {{name: team, literal: payments}}
    - {{name: tenant, header: {{name: x-tenant, default: none}}}}
"#,
        receiver.port
    );
    let (outbound, _dir, config) = config("traced", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;

    // 1. No context from the application: a new trace, sampled (100 % by default).
    let (status, body) = request(outbound, &[("x-tenant", "acme"), ("user-agent", "curl/8.0")]).await;
    assert_eq!(status, 200);
    let traceparent = field(&body, "traceparent").to_string();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[3]), (4, "00", "01"), "{traceparent}");
    let request_id = field(&body, "x-request-id").to_string();
    assert_eq!(request_id.len(), 36, "Envoy makes an x-request-id (UUIDv4): {request_id}");

    let root = next_span(&receiver);
    assert_eq!(root["resource"]["service.name"], "web");
    let span = &root["span"];
    assert_eq!(span["trace_id"], parts[1]);
    assert_eq!(span["span_id"], parts[2], "the endpoint's parent is our span");
    assert_eq!(span["parent_span_id"], "");
    assert_eq!(span["name"], "egress traced.test");
    assert_eq!(span["kind"], 3, "SPAN_KIND_CLIENT");
    assert_eq!(span["status"], 0);
    assert!(span["end"].as_u64() >= span["start"].as_u64());
    let attributes = &span["attributes"];
    for (key, value) in [
        ("http.method", "GET"),
        ("http.url", "http://traced.test/orders?id=7"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "200"),
        ("user_agent", "curl/8.0"),
        ("downstream_cluster", "-"),
        ("component", "proxy"),
        ("upstream_cluster", "default_traced"),
        ("response_flags", "-"),
        ("node_id", "default.app-traced"),
        ("peer.address", "127.0.0.1"),
        ("team", "payments"),
        ("tenant", "acme"),
        ("kuma.mesh", "default"),
    ] {
        assert_eq!(attributes[key], value, "{key} in {attributes}");
    }
    assert_eq!(attributes["guid:x-request-id"], request_id.as_str());
    assert_eq!(attributes["upstream_address"], upstream.addr.to_string());
    assert!(attributes.get("error").is_none());

    // 2. A sampled parent: same trace, our span its child, tracestate passed on; the header tag
    //    falls back to its default.
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (_, body) = request(outbound, &[("traceparent", parent), ("tracestate", "congo=t61rcWkgMzE")]).await;
    let sent = field(&body, "traceparent").to_string();
    assert!(sent.starts_with("00-0af7651916cd43dd8448eb211c80319c-") && sent.ends_with("-01"), "{sent}");
    assert_ne!(&sent[36..52], "b7ad6b7169203331", "a new span id");
    assert_eq!(field(&body, "tracestate"), "congo=t61rcWkgMzE");
    let child = next_span(&receiver);
    let span = &child["span"];
    assert_eq!(span["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(span["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(span["span_id"], &sent[36..52]);
    assert_eq!(span["trace_state"], "congo=t61rcWkgMzE");
    assert_eq!(span["attributes"]["tenant"], "none");

    // 3. An unsampled parent: the context goes on (flag 00), no span is exported.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    let (_, body) = request(outbound, &[("traceparent", unsampled)]).await;
    let sent = field(&body, "traceparent").to_string();
    assert!(sent.starts_with("00-11111111111111111111111111111111-") && sent.ends_with("-00"), "{sent}");

    // 4. A traceparent that does not parse: as Envoy, no span, and the header is left alone.
    let (_, body) = request(outbound, &[("traceparent", "00-xyz-01")]).await;
    assert_eq!(field(&body, "traceparent"), "00-xyz-01");

    // 5. An endpoint's 503: the span is an error.
    let (status, _) = request(outbound, &[("x-status", "503")]).await;
    assert_eq!(status, 503);
    let failed = next_span(&receiver);
    assert_eq!(failed["span"]["attributes"]["http.status_code"], "503");
    assert_eq!(failed["span"]["attributes"]["error"], "true");
    assert_eq!(failed["span"]["status"], 2, "STATUS_CODE_ERROR");
    // Nothing from 3 and 4 arrived before it.
    assert_ne!(failed["span"]["trace_id"], "11111111111111111111111111111111");

    let metrics = mesh_egress::metrics::metrics().encode();
    assert!(
        metrics.lines().any(|l| l.starts_with("mesh_egress_spans_total{backend=\"otlp\",result=\"exported\"}")),
        "{metrics}"
    );
}

/// A Zipkin collector: every POST body it received, with its path and content type.
struct Collector {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<(String, String, Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let seen = posts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            seen.lock().unwrap().push((path, content_type, body));
                            Ok::<_, Infallible>(
                                http::Response::builder().status(202).body(Full::new(Bytes::new())).unwrap(),
                            )
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        Self { addr, posts, task }
    }

    /// Every span received so far (JSON v2).
    fn spans(&self) -> Vec<Value> {
        let posts = self.posts.lock().unwrap();
        posts
            .iter()
            .flat_map(|(path, content_type, body)| {
                assert_eq!(path, "/api/v2/spans");
                assert_eq!(content_type, "application/json");
                serde_json::from_slice::<Vec<Value>>(body).unwrap()
            })
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<Value> {
        eventually("spans at the Zipkin collector", Duration::from_secs(15), || async { self.spans().len() >= n })
            .await;
        self.spans()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zipkin_spans_with_b3_propagation_and_sampling() {
    let collector = Collector::start().await;
    let upstream = http_upstream(None).await;
    // Random sampling off: only a caller's decision or x-client-trace-id (client: 100) samples.
    let policy = format!(
        r#"type: MeshTrace
name: zipkin
mesh: default
spec:
  default:
    backends:
    - type: Zipkin
      zipkin: {{url: "http://{}/api/v2/spans"}}
    sampling: {{random: 0, client: 100}}
"#,
        collector.addr
    );
    let (outbound, _dir, config) = config("traced", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;

    // 1. No context, random sampling 0: B3 headers with sampled 0; a root span's id is its
    //    (64-bit, traceId128bit off) trace id.
    let (_, body) = request(outbound, &[]).await;
    let trace_id = field(&body, "x-b3-traceid").to_string();
    assert_eq!(trace_id.len(), 16);
    assert_eq!(field(&body, "x-b3-spanid"), trace_id);
    assert_eq!(field(&body, "x-b3-parentspanid"), "-");
    assert_eq!(field(&body, "x-b3-sampled"), "0");

    // 2. The caller's B3 context, sampled: our span is its child.
    let (_, body) = request(
        outbound,
        &[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(field(&body, "x-b3-traceid"), "463ac35c9f6413ad48485a3953bb6124");
    assert_eq!(field(&body, "x-b3-parentspanid"), "a2fb4a1d1a96d312");
    assert_eq!(field(&body, "x-b3-sampled"), "1");
    let child_id = field(&body, "x-b3-spanid").to_string();

    // 3. x-client-trace-id with client sampling 100: sampled although random sampling is 0.
    let (_, body) = request(outbound, &[("x-client-trace-id", "abc")]).await;
    assert_eq!(field(&body, "x-b3-sampled"), "1");
    let forced_trace = field(&body, "x-b3-traceid").to_string();

    // 4. The single b3 header is read too, and replaced by the multi-header form.
    let (_, body) = request(outbound, &[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]).await;
    assert_eq!(field(&body, "x-b3-traceid"), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(field(&body, "x-b3-parentspanid"), "e457b5a2e4d86bd1");
    assert_eq!(field(&body, "b3"), "-");

    let spans = collector.wait_for(3).await;
    assert_eq!(spans.len(), 3, "only the sampled requests: {spans:?}");
    let child = spans.iter().find(|s| s["traceId"] == "463ac35c9f6413ad48485a3953bb6124").unwrap();
    assert_eq!(child["id"], child_id.as_str());
    assert_eq!(child["parentId"], "a2fb4a1d1a96d312");
    assert_eq!(child["kind"], "CLIENT");
    assert_eq!(child["name"], "traced.test");
    assert_eq!(child["localEndpoint"]["serviceName"], "web");
    assert_eq!(child["tags"]["http.method"], "GET");
    assert_eq!(child["tags"]["http.status_code"], "200");
    assert_eq!(child["tags"]["upstream_cluster"], "default_traced");
    assert!(child["timestamp"].as_u64().unwrap() > 1_600_000_000_000_000);
    assert!(child["duration"].as_u64().unwrap() >= 1);
    let forced = spans.iter().find(|s| s["traceId"] == forced_trace.as_str()).unwrap();
    assert!(forced.get("parentId").is_none());
    assert_eq!(forced["tags"]["guid:x-client-trace-id"], "abc");
    assert!(spans.iter().any(|s| s["traceId"] == "80f198ee56343ba864fe8b2a57d3eff7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overall_sampling_zero_and_empty_backends_trace_nothing() {
    let collector = Collector::start().await;
    let upstream = http_upstream(None).await;
    // A Dataplane-targeted MeshTrace is more specific than the Mesh one: its `backends: []`
    // (lists are replaced whole) turns tracing off for this sidecar.
    let policy = format!(
        r#"type: MeshTrace
name: mesh-wide
mesh: default
spec:
  default:
    backends:
    - type: Zipkin
      zipkin: {{url: "http://{}/api/v2/spans"}}
    sampling: {{overall: 0}}
"#,
        collector.addr
    );
    let (outbound, dir, config) = config("traced", upstream.addr.port(), &policy);
    let mut proxy = start(options(config.clone())).await;
    // overall 0: even a forced request is not sampled.
    let (_, body) = request(outbound, &[("x-envoy-force-trace", "true")]).await;
    assert_eq!(field(&body, "x-b3-sampled"), "0");

    let off = "---\ntype: MeshTrace\nname: off-here\nmesh: default\nspec:\n  targetRef: {kind: Dataplane, name: app-traced}\n  default: {backends: []}\n";
    let yaml = std::fs::read_to_string(&config).unwrap().replace("sampling: {overall: 0}", "") + off;
    std::fs::write(&config, yaml).unwrap();
    proxy.reload().await.unwrap();
    let (_, body) = request(outbound, &[("x-b3-sampled", "1")]).await;
    assert_eq!(field(&body, "x-b3-traceid"), "-", "no tracing: nothing is propagated");
    tokio::time::sleep(Duration::from_millis(600)).await; // longer than the exporter's batch wait
    assert!(collector.spans().is_empty());
    drop(dir);
}
