//! MeshTimeout, MeshRetry and MeshCircuitBreaker applied to traffic, against real upstreams:
//! every field that changes behaviour, merge precedence (MeshExternalService over Mesh), label
//! targetRefs, the Kubernetes spelling and hot reload of a policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::grpc::{self, grpc_server, RawCodec};
use common::http_client::*;
use common::http_upstream::{attempts_seen, http_upstream};
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A unique `x-key` per call, so the upstream's failure counters never collide.
fn key(name: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One `protocol` service named `name` on a fresh outbound to `port`, plus `policies` (YAML
/// documents), written to a new configuration directory.
fn service_and_policies(
    name: &str,
    protocol: &str,
    port: u16,
    policies: &str,
) -> (SocketAddr, tempfile::TempDir, std::path::PathBuf) {
    let outbound = free_addr("127.0.0.1");
    let service = service_with_protocol(name, protocol, outbound, &endpoint("127.0.0.1", port, 0), "").replacen(
        "mesh: default\nspec:",
        "mesh: default\nlabels: {team: payments}\nspec:",
        1,
    );
    let (dir, config) = config_dir(&format!("{service}---\n{policies}"));
    (outbound, dir, config)
}

fn counter(name: &str, service: &str) -> f64 {
    let text = mesh_egress::metrics::metrics().encode();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("service=\"default/{service}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn get_status(outbound: SocketAddr, headers: &[(&str, &str)]) -> (http::StatusCode, String, http::HeaderMap) {
    let response = h1(outbound).await.send_request(get("http://app/", headers)).await.unwrap();
    let headers = response.headers().clone();
    let (status, body) = text(response).await;
    (status, body, headers)
}

const RETRY_5XX: &str = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, labels: {team: payments}}\n    default:\n      http: {numRetries: 2, retryOn: [5xx], backOff: {baseInterval: 1ms, maxInterval: 5ms}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_retry_retries_5xx_up_to_num_retries() {
    let upstream = http_upstream(None).await;
    let (outbound, _dir, config) = service_and_policies("retried", "http", upstream.addr.port(), RETRY_5XX);
    let _proxy = start(options(config)).await;
    let before = counter("mesh_egress_upstream_retries_total", "retried");

    let k = key("two-failures");
    let (status, body, headers) = get_status(outbound, &[("x-fail-first", "2"), ("x-key", &k)]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-attempt"], "3", "two retries after two 503s");
    assert_eq!(counter("mesh_egress_upstream_retries_total", "retried") - before, 2.0);

    let k = key("three-failures");
    let (status, _, headers) = get_status(outbound, &[("x-fail-first", "3"), ("x-key", &k)]).await;
    assert_eq!(status, 503, "numRetries 2: the third failure is the answer");
    assert_eq!(headers["x-attempt"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_nothing_is_retried() {
    let upstream = http_upstream(None).await;
    let (outbound, _dir, config) = single_service("plain", "http", upstream.addr.port());
    let _proxy = start(options(config)).await;
    let k = key("no-policy");
    let (status, _, headers) = get_status(outbound, &[("x-fail-first", "1"), ("x-key", &k)]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-attempt"], "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_status_codes_methods_and_response_headers() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: codes}\n    default:\n      http:\n        numRetries: 1\n        retryOn: [\"418\", HttpMethodGet]\n        backOff: {baseInterval: 1ms}\n        retriableResponseHeaders: [{name: x-try-again, type: Exact, value: \"yes\"}]\n";
    let (outbound, _dir, config) = service_and_policies("codes", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;

    let k = key("418");
    let (status, _, _) = get_status(outbound, &[("x-fail-first", "1"), ("x-fail-status", "418"), ("x-key", &k)]).await;
    assert_eq!(status, 200, "418 is listed");
    // Status codes alone keep Kuma's default conditions (gateway-error: 502, 503, 504), not 500.
    let k = key("503");
    let (status, _, _) = get_status(outbound, &[("x-fail-first", "1"), ("x-key", &k)]).await;
    assert_eq!(status, 200, "503 is retried under the default gateway-error");
    let k = key("500");
    let (status, _, _) = get_status(outbound, &[("x-fail-first", "1"), ("x-fail-status", "500"), ("x-key", &k)]).await;
    assert_eq!(status, 500, "500 is neither listed nor a gateway error");
    let k = key("header");
    let headers =
        [("x-fail-first", "1"), ("x-fail-status", "200"), ("x-fail-header", "x-try-again: yes"), ("x-key", &k)];
    let (status, body, _) = get_status(outbound, &headers).await;
    assert_eq!((status.as_u16(), body.starts_with("attempt 2")), (200, true), "retriable response header: {body}");

    // HttpMethodGet restricts retries to GET: a POST's 418 is the answer.
    let k = key("post");
    let request = Request::post("http://app/")
        .header("x-fail-first", "1")
        .header("x-fail-status", "418")
        .header("x-key", &k)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _) = text(h1(outbound).await.send_request(request).await.unwrap()).await;
    assert_eq!(status, 418);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_body_is_replayed_and_a_large_one_is_not_retried() {
    let upstream = http_upstream(None).await;
    let (outbound, _dir, config) = service_and_policies("uploads", "http", upstream.addr.port(), RETRY_5XX);
    let _proxy = start(options(config)).await;
    let post = |k: &str, size: usize| {
        Request::post("http://app/")
            .header("x-fail-first", "1")
            .header("x-key", k)
            .body(Full::new(Bytes::from(vec![b'u'; size])))
            .unwrap()
    };
    let k = key("small-body");
    let (status, body) = text(h1(outbound).await.send_request(post(&k, 50_000)).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "attempt 2 received: 50000", "the body went again, whole");

    let k = key("large-body");
    let (status, _) = text(h1(outbound).await.send_request(post(&k, 200_000)).await.unwrap()).await;
    assert_eq!(status, 503, "over the 64 KiB replay buffer: sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_retries_on_unavailable() {
    let server = grpc_server(None).await;
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      grpc: {numRetries: 3, retryOn: [Unavailable], backOff: {baseInterval: 1ms}}\n";
    let (outbound, _dir, config) = service_and_policies("grpc-retried", "grpc", server.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let mut client = grpc::client(outbound).await;
    client.ready().await.unwrap();
    let message = format!("fail:{}:2", key("grpc"));
    let reply = client.unary(tonic::Request::new(Bytes::from(message)), grpc::path("Unary"), RawCodec).await;
    assert_eq!(reply.unwrap().into_inner(), Bytes::from("attempt 3"));

    client.ready().await.unwrap();
    let message = format!("fail:{}:9", key("grpc-exhausted"));
    let reply = client.unary(tonic::Request::new(Bytes::from(message)), grpc::path("Unary"), RawCodec).await;
    assert_eq!(reply.unwrap_err().code(), tonic::Code::Unavailable);
}

const TIMEOUTS: &str = "type: MeshTimeout\nname: timeouts\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 5s}}\n  - targetRef: {kind: MeshExternalService, name: slow}\n    default: {http: {requestTimeout: 200ms}}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_of_the_mes_item_overrides_the_mesh_item() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let other = free_addr("127.0.0.1");
    let ep = endpoint("127.0.0.1", upstream.addr.port(), 0);
    let yaml = format!(
        "{}---\n{}---\n{TIMEOUTS}",
        service_with_protocol("slow", "http", outbound, &ep, ""),
        service_with_protocol("other", "http", other, &ep, "")
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.request_timeout = Some(Duration::from_millis(100)); // the flag: overridden by both items
    let _proxy = start(opts).await;
    let (status, _, _) = get_status(outbound, &[("x-delay-ms", "1500")]).await;
    assert_eq!(status, 504, "the MES item's 200ms");
    let (status, _, _) = get_status(other, &[("x-delay-ms", "500")]).await;
    assert_eq!(status, 200, "the Mesh item's 5s, over the 100ms flag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_applies_to_the_next_request() {
    let upstream = http_upstream(None).await;
    let slow = TIMEOUTS.replace("requestTimeout: 200ms", "requestTimeout: 10s");
    let (outbound, dir, config) = service_and_policies("slow", "http", upstream.addr.port(), &slow);
    let mut proxy = start(options(config.clone())).await;
    let mut client = h1(outbound).await;
    let (status, _) = text(client.send_request(get("http://app/", &[("x-delay-ms", "600")])).await.unwrap()).await;
    assert_eq!(status, 200);
    let text_now = std::fs::read_to_string(&config).unwrap().replace("requestTimeout: 10s", "requestTimeout: 100ms");
    std::fs::write(&config, text_now).unwrap();
    proxy.reload().await.unwrap();
    client.ready().await.unwrap();
    let (status, _) = text(client.send_request(get("http://app/", &[("x-delay-ms", "1500")])).await.unwrap()).await;
    assert_eq!(status, 504, "the same keep-alive connection gets the new policy");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_spelling_and_a_dataplane_targetref() {
    let upstream = http_upstream(None).await;
    // The service's Dataplane is `app-kube`; a policy for another Dataplane does not apply.
    let policies = "apiVersion: kuma.io/v1alpha1\nkind: MeshTimeout\nmetadata:\n  name: kube-timeout\n  namespace: kuma-system\n  labels: {kuma.io/mesh: default}\nspec:\n  targetRef: {kind: Dataplane, name: app-kube}\n  to:\n  - targetRef: {kind: MeshExternalService, name: kube}\n    default: {http: {requestTimeout: 150ms}}\n---\ntype: MeshTimeout\nname: elsewhere\nmesh: default\nspec:\n  targetRef: {kind: Dataplane, name: another}\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 10s}}\n";
    let (outbound, _dir, config) = service_and_policies("kube", "http", upstream.addr.port(), policies);
    let _proxy = start(options(config)).await;
    let (status, _, _) = get_status(outbound, &[("x-delay-ms", "1500")]).await;
    assert_eq!(status, 504);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_idle_and_max_stream_duration_cut_responses() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshTimeout\nname: streams\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: idle}\n    default: {http: {streamIdleTimeout: 300ms}}\n  - targetRef: {kind: MeshExternalService, name: capped}\n    default: {http: {maxStreamDuration: 400ms}}\n";
    let (idle, capped) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let ep = endpoint("127.0.0.1", upstream.addr.port(), 0);
    let yaml = format!(
        "{}---\n{}---\n{policy}",
        service_with_protocol("idle", "http", idle, &ep, ""),
        service_with_protocol("capped", "http", capped, &ep, "")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let body = |addr: SocketAddr, drips: &'static str, ms: &'static str| async move {
        let response =
            h1(addr).await.send_request(get("http://app/", &[("x-drip", drips), ("x-drip-ms", ms)])).await.unwrap();
        response.into_body().collect().await.map(|b| b.to_bytes().len())
    };
    assert_eq!(body(idle, "5", "50").await.unwrap(), 5, "chunks well inside the idle timeout pass");
    assert!(body(idle, "3", "1200").await.is_err(), "a pause past streamIdleTimeout cuts the response");
    assert_eq!(body(capped, "3", "20").await.unwrap(), 3);
    assert!(body(capped, "10", "200").await.is_err(), "maxStreamDuration cuts a long response");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_timeout_and_max_connect_attempt() {
    let live = echo_server("127.0.0.1:0".parse().unwrap(), "live").await;
    let dead = [dead_addr(), dead_addr()];
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!(
        "{}{}{}",
        endpoint("127.0.9.1", dead[0].port(), 0),
        endpoint("127.0.9.1", dead[1].port(), 0),
        endpoint("127.0.0.1", live.addr.port(), 0)
    );
    // Ejection off, so that every connection picks among all three endpoints.
    let policies = "type: MeshRetry\nname: attempts\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {tcp: {maxConnectAttempt: 3}}\n---\ntype: MeshCircuitBreaker\nname: no-ejection\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {outlierDetection: {disabled: true, detectors: {totalFailures: {}}}}\n---\ntype: MeshTimeout\nname: idle\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {idleTimeout: 300ms}\n";
    let yaml = format!("{}---\n{policies}", service_with_outbound("tcp-svc", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    // With the default (one retry), a third of these would pick two dead endpoints in a row.
    for _ in 0..20 {
        let (greeting, _stream) = greet(outbound).await.unwrap();
        assert_eq!(greeting, "live");
    }
    let (_, mut stream) = greet(outbound).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).await.unwrap(), 4);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed after idleTimeout without traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_overflow_is_answered_503_at_once() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshCircuitBreaker\nname: limits\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: limited}\n    default: {connectionLimits: {maxRequests: 1}}\n";
    let (outbound, _dir, config) = service_and_policies("limited", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let before = counter("mesh_egress_upstream_overflows_total", "limited");
    let first = tokio::spawn(get_status(outbound, &[("x-delay-ms", "2000")]));
    eventually("the first request at the endpoint", Duration::from_secs(10), || async { upstream.connections() >= 1 })
        .await;
    let (status, body, headers) = get_status(outbound, &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(counter("mesh_egress_upstream_overflows_total", "limited") - before, 1.0);
    let (status, _, _) = get_status(outbound, &[]).await;
    assert_eq!(status, 200, "the slot is free again once the first response ended");
}

/// An HTTP server that answers every request with `status` and names itself.
async fn fixed_upstream(status: u16, name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, task, _) = switchable_upstream(status, name).await;
    (addr, task)
}

/// [`fixed_upstream`] whose status can be changed while it runs.
async fn switchable_upstream(
    status: u16,
    name: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<std::sync::atomic::AtomicU16>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let current = Arc::new(std::sync::atomic::AtomicU16::new(status));
    let shared = current.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let status = shared.load(std::sync::atomic::Ordering::SeqCst);
                    async move {
                        let response = http::Response::builder()
                            .status(status)
                            .header("x-who", name)
                            .body(Full::new(Bytes::from_static(b"fixed")))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, task, current)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_an_endpoint_after_consecutive_5xx() {
    let (bad, _bad_task) = fixed_upstream(500, "bad").await;
    let (good, _good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", bad.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let policy = "type: MeshCircuitBreaker\nname: outliers\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      outlierDetection:\n        baseEjectionTime: 1m\n        maxEjectionPercent: 50\n        detectors: {totalFailures: {consecutive: 2}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("outliers", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let mut from_bad = 0;
    for _ in 0..40 {
        let (_, _, headers) = get_status(outbound, &[]).await;
        if headers["x-who"] == "bad" {
            from_bad += 1;
        }
    }
    assert_eq!(from_bad, 2, "two 500s in a row eject the bad endpoint for the rest of the run");
    assert_eq!(counter("mesh_egress_upstream_ejections_total", "outliers"), 1.0);
}

fn health_checks(service: &str, result: &str) -> f64 {
    let text = mesh_egress::metrics::metrics().encode();
    text.lines()
        .filter(|l| l.starts_with("mesh_egress_upstream_health_checks_total"))
        .filter(|l| {
            l.contains(&format!("service=\"default/{service}\"")) && l.contains(&format!("result=\"{result}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for_checks(service: &str, result: &str, at_least: f64) {
    eventually("health checks", Duration::from_secs(15), || async { health_checks(service, result) >= at_least }).await;
}

async fn wait_for_failed_checks(service: &str, at_least: f64) {
    wait_for_checks(service, "failure", at_least).await;
}

/// A service of two endpoints, `bad` (503) and `good` (200), under a MeshHealthCheck whose
/// `default` is `check` with `LOG` standing for its event log's path; kept alive by `_keep`.
struct Checked {
    outbound: SocketAddr,
    bad: SocketAddr,
    log: std::path::PathBuf,
    _keep:
        (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>, [tempfile::TempDir; 2], mesh_egress::server::Server),
}

async fn checked(service: &str, check: &str) -> Checked {
    let (bad, bad_task) = fixed_upstream(503, "bad").await;
    let (good, good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let events = tempfile::tempdir().unwrap();
    let log = events.path().join("hc.log");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", bad.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let check = check.replace("LOG", &log.display().to_string());
    let policy = format!(
        "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: {service}}}\n    default: {check}\n"
    );
    let yaml = format!("{}---\n{policy}", service_with_protocol(service, "http", outbound, &endpoints, ""));
    let (dir, config) = config_dir(&yaml);
    let proxy = start(options(config)).await;
    Checked { outbound, bad, log, _keep: (bad_task, good_task, [events, dir], proxy) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_take_a_failing_endpoint_out_and_log_the_event() {
    let check = "{interval: 100ms, noTrafficInterval: 100ms, unhealthyThreshold: 2, eventLogPath: LOG, http: {path: /health, expectedStatuses: [200], requestHeadersToAdd: {set: [{name: x-check, value: \"1\"}]}}}";
    let Checked { outbound, bad, log, _keep } = checked("checked", check).await;
    wait_for_failed_checks("checked", 2.0).await;
    for _ in 0..30 {
        let (status, _, headers) = get_status(outbound, &[]).await;
        assert_eq!(
            (status.as_u16(), headers["x-who"].to_str().unwrap()),
            (200, "good"),
            "the failing endpoint gets no traffic"
        );
    }
    let events = std::fs::read_to_string(&log).unwrap();
    let event: serde_json::Value = serde_json::from_str(events.lines().next().unwrap()).unwrap();
    assert_eq!(event["event"], "unhealthy");
    assert_eq!(event["endpoint"], bad.to_string());
    assert!(event["reason"].as_str().unwrap().contains("status 503"), "{event}");
}

/// An endpoint that answers its check with an unexpected status is unhealthy at once, whatever
/// `unhealthyThreshold` (Envoy's ACTIVE failure; only failures to ask it count toward the
/// threshold): one check round, an hour apart from the next, takes it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_answers_its_check_with_a_failure_is_out_at_once() {
    let check =
        "{interval: 1h, noTrafficInterval: 1h, initialJitter: 10ms, unhealthyThreshold: 5, eventLogPath: LOG, http: {path: /}}";
    let Checked { outbound, log, _keep, .. } = checked("at-once", check).await;
    eventually("the unhealthy event", Duration::from_secs(10), || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"unhealthy\""))
    })
    .await;
    assert_eq!(health_checks("at-once", "failure"), 1.0, "one round only");
    for _ in 0..20 {
        assert_eq!(get_status(outbound, &[]).await.2["x-who"], "good", "the failing endpoint gets no traffic");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_health_checks_a_failing_endpoint_keeps_its_share() {
    let (bad, _bad_task) = fixed_upstream(503, "bad").await;
    let (good, _good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", bad.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let (_dir, config) = config_dir(&service_with_protocol("unchecked", "http", outbound, &endpoints, ""));
    let _proxy = start(options(config)).await;
    let mut bad_answers = 0;
    for _ in 0..30 {
        if get_status(outbound, &[]).await.2["x-who"] == "bad" {
            bad_answers += 1;
        }
    }
    assert!(bad_answers > 0, "the control: both endpoints take traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_traffic_on_panic_fails_requests_when_no_endpoint_is_healthy() {
    let (bad, _bad_task) = fixed_upstream(503, "bad").await;
    let outbound = free_addr("127.0.0.1");
    let policy = |fail: bool| {
        format!(
        "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{interval: 100ms, unhealthyThreshold: 1, failTrafficOnPanic: {fail}, http: {{path: /}}}}\n"
    )
    };
    let service = service_with_protocol("panicky", "http", outbound, &endpoint("127.0.0.1", bad.port(), 0), "");
    let (_dir, config) = config_dir(&format!("{service}---\n{}", policy(true)));
    let mut proxy = start(options(config.clone())).await;
    wait_for_failed_checks("panicky", 1.0).await;
    let (status, _, headers) = get_status(outbound, &[]).await;
    assert_eq!(status, 503);
    assert!(!headers.contains_key("x-who"), "failed by the proxy, not by the endpoint");
    // Without failTrafficOnPanic the only (unhealthy) endpoint is tried anyway.
    std::fs::write(&config, format!("{service}---\n{}", policy(false))).unwrap();
    proxy.reload().await.unwrap();
    let (_, _, headers) = get_status(outbound, &[]).await;
    assert_eq!(headers["x-who"], "bad");
}

/// An endpoint that answers its HTTP check with 200 and a body that never ends, as fast as the
/// proxy reads: only the status counts, the proxy reads a bounded part and drops the connection.
/// Before, it read the whole body into memory until the check's timeout (5 GB in 8 s from a
/// local sender), and the check then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_health_check_answer_is_not_read_to_its_end() {
    use tokio::io::AsyncWriteExt;
    let endless = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = endless.local_addr().unwrap();
    let _endless = tokio::spawn(async move {
        while let Ok((mut stream, _)) = endless.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut request).await;
                let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
                if stream.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.is_ok() {
                    while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                }
            });
        }
    });
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, noTrafficInterval: 100ms, timeout: 2s, unhealthyThreshold: 1, http: {path: /}}\n";
    let outbound = free_addr("127.0.0.1");
    let yaml = format!(
        "{}---\n{policy}",
        service_with_protocol("endless", "http", outbound, &endpoint("127.0.0.1", at.port(), 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    wait_for_checks("endless", "success", 3.0).await;
    assert_eq!(health_checks("endless", "failure"), 0.0, "no check timed out reading the body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_use_the_standard_health_service() {
    let healthy = grpc_server(None).await;
    // An HTTP server that is no gRPC health service: its checks fail.
    let other = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.0.1", healthy.addr.port(), 0), endpoint("127.0.0.1", other.addr.port(), 0));
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, unhealthyThreshold: 1, grpc: {serviceName: test.Echo}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("grpc-checked", "grpc", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    wait_for_failed_checks("grpc-checked", 1.0).await;
    let mut client = grpc::client(outbound).await;
    for i in 0..20 {
        client.ready().await.unwrap();
        let reply =
            client.unary(tonic::Request::new(Bytes::from(format!("m{i}"))), grpc::path("Unary"), RawCodec).await;
        assert_eq!(reply.unwrap().into_inner(), Bytes::from(format!("m{i}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_health_checks_send_and_expect_payloads() {
    let live = echo_server("127.0.0.1:0".parse().unwrap(), "live").await;
    // Accepts and closes at once: the expected answer never comes.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer_addr = closer.local_addr().unwrap();
    let _closer = tokio::spawn(async move {
        while let Ok((stream, _)) = closer.accept().await {
            drop(stream);
        }
    });
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.0.1", closer_addr.port(), 0), endpoint("127.0.0.1", live.addr.port(), 0));
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, unhealthyThreshold: 1, tcp: {send: ping, receive: [live, ping]}}\n";
    let yaml = format!("{}---\n{policy}", service_with_outbound("tcp-checked", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    wait_for_failed_checks("tcp-checked", 1.0).await;
    for _ in 0..20 {
        let (greeting, _stream) = greet(outbound).await.unwrap();
        assert_eq!(greeting, "live");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_passing_healthy_threshold_checks_gets_traffic_again() {
    let (toggler, _task, status) = switchable_upstream(503, "toggler").await;
    let (good, _good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", toggler.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, noTrafficInterval: 100ms, unhealthyThreshold: 1, healthyThreshold: 2, http: {}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("recovering", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    wait_for_failed_checks("recovering", 1.0).await;
    for _ in 0..10 {
        assert_eq!(get_status(outbound, &[]).await.2["x-who"], "good");
    }
    status.store(200, std::sync::atomic::Ordering::SeqCst);
    let passed = health_checks("recovering", "success");
    // Both endpoints pass from now on: two rounds make the toggler healthy again.
    wait_for_checks("recovering", "success", passed + 4.0).await;
    let mut toggler_answers = 0;
    for _ in 0..40 {
        if get_status(outbound, &[]).await.2["x-who"] == "toggler" {
            toggler_answers += 1;
        }
    }
    assert!(toggler_answers > 0, "back in traffic after healthyThreshold passing checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_go_over_tls_when_the_service_originates_it() {
    use base64::Engine as _;
    let ca = common::pki::Ca::new("hc-ca");
    let leaf = ca.server(&["api.hc.test"]);
    let upstream = http_upstream(Some(common::http_upstream::tls_config(&leaf))).await;
    let outbound = free_addr("127.0.0.1");
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: api.hc.test\n      caCert:\n        inline: {}\n",
        base64::engine::general_purpose::STANDARD.encode(&ca.pem)
    );
    // Plaintext checks against this TLS endpoint would fail, and failTrafficOnPanic would then
    // fail every request.
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, noTrafficInterval: 100ms, unhealthyThreshold: 1, failTrafficOnPanic: true, http: {path: /}}\n";
    let service =
        service_with_protocol("tls-checked", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), &tls);
    let (_dir, config) = config_dir(&format!("{service}---\n{policy}"));
    let _proxy = start(options(config)).await;
    wait_for_checks("tls-checked", "success", 3.0).await;
    assert_eq!(health_checks("tls-checked", "failure"), 0.0);
    let (status, body, _) = get_status(outbound, &[]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_retries_a_slow_attempt() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http: {numRetries: 1, perTryTimeout: 1s, retryOn: [Reset], backOff: {baseInterval: 1ms}}\n";
    let (outbound, _dir, config) = service_and_policies("per-try", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let k = key("slow-first");
    let headers = [("x-fail-first", "1"), ("x-fail-status", "200"), ("x-fail-delay-ms", "3000"), ("x-key", &k)];
    let (status, body, response_headers) = get_status(outbound, &headers).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(response_headers["x-attempt"], "2", "the first attempt passed its per-try timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_overflow_answers_503_without_a_new_connection() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshCircuitBreaker\nname: limits\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxConnections: 1}}\n";
    let (outbound, _dir, config) = service_and_policies("one-conn", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let slow = tokio::spawn(get_status(outbound, &[("x-delay-ms", "2000")]));
    eventually("the slow request at the endpoint", Duration::from_secs(10), || async { upstream.connections() >= 1 })
        .await;
    // The only connection is busy: a second request would need another.
    let (status, _, headers) = get_status(outbound, &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-envoy-overloaded"], "true");
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(upstream.connections(), 1);
}

/// Requests without a body and with one are exchanged by two clients (the request's own task,
/// hyper's), whose idle connections hold the service's connection slots: with one slot, they
/// take turns on the one connection instead of finding the slot held by the other kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_slot_serves_requests_with_and_without_a_body_in_turn() {
    use common::http_client::{get, h1, text};
    let upstream = http_upstream(None).await;
    let policy = "type: MeshCircuitBreaker\nname: limits\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxConnections: 1}}\n";
    let (outbound, _dir, config) = service_and_policies("one-slot", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let mut client = h1(outbound).await;
    for round in 0..3 {
        client.ready().await.unwrap();
        let (status, body) = text(client.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200, "GET in round {round}: {body}");
        client.ready().await.unwrap();
        let post = http::Request::post("/upload")
            .header("host", "a")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"12345")))
            .unwrap();
        let (status, body) = text(client.send_request(post).await.unwrap()).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "received: 5\n"), "POST in round {round}");
    }
    assert_eq!(upstream.connections(), 1, "the one connection served both kinds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_failures_and_failure_percentage_detectors_eject() {
    let (gateway, _g) = fixed_upstream(502, "gateway").await;
    let (flaky, _f) = fixed_upstream(500, "flaky").await;
    let (good, _good) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!(
        "{}{}{}",
        endpoint("127.0.0.1", gateway.port(), 0),
        endpoint("127.0.0.1", flaky.port(), 0),
        endpoint("127.0.0.1", good.port(), 0)
    );
    // 502s trip gatewayFailures; the 500s only the failure percentage, evaluated each interval.
    let policy = "type: MeshCircuitBreaker\nname: outliers\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      outlierDetection:\n        interval: 300ms\n        baseEjectionTime: 1m\n        maxEjectionPercent: 100\n        healthyPanicThreshold: 0\n        detectors:\n          gatewayFailures: {consecutive: 2}\n          failurePercentage: {minimumHosts: 1, requestVolume: 3, threshold: 90}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("detectors", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let before = counter("mesh_egress_upstream_ejections_total", "detectors");
    eventually("both failing endpoints ejected", Duration::from_secs(15), || async {
        get_status(outbound, &[]).await;
        counter("mesh_egress_upstream_ejections_total", "detectors") - before >= 2.0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get_status(outbound, &[]).await.2["x-who"], "good");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_request_headers_and_a_rate_limited_back_off_header() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http:\n        numRetries: 1\n        retryOn: [\"429\"]\n        retriableRequestHeaders: [{name: x-idempotent, type: Present}]\n        rateLimitedBackOff: {resetHeaders: [{name: retry-after, format: Seconds}], maxInterval: 5s}\n";
    let (outbound, _dir, config) = service_and_policies("rate-limited", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let k = key("marked");
    let marked = [
        ("x-fail-first", "1"),
        ("x-fail-status", "429"),
        ("x-fail-header", "retry-after: 0"),
        ("x-idempotent", "1"),
        ("x-key", &k),
    ];
    let (status, _, headers) = get_status(outbound, &marked).await;
    assert_eq!(
        (status.as_u16(), headers["x-attempt"].to_str().unwrap()),
        (200, "2"),
        "retried after the Retry-After wait"
    );
    let k = key("unmarked");
    let unmarked = [("x-fail-first", "1"), ("x-fail-status", "429"), ("x-key", &k)];
    let (status, _, _) = get_status(outbound, &unmarked).await;
    assert_eq!(status, 429, "without a retriable request header the request is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omit_previous_hosts_sends_the_retry_to_another_endpoint() {
    let (bad, _bad_task) = fixed_upstream(503, "bad").await;
    let (good, _good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", bad.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http: {numRetries: 1, retryOn: [5xx], backOff: {baseInterval: 1ms}, hostSelection: [{predicate: OmitPreviousHosts}]}\n---\ntype: MeshCircuitBreaker\nname: keep-both\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {outlierDetection: {disabled: true, detectors: {totalFailures: {}}}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("omit", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    // One retry: without OmitPreviousHosts a request that hit `bad` would pick it again half the time.
    for _ in 0..30 {
        let (status, _, headers) = get_status(outbound, &[]).await;
        assert_eq!((status.as_u16(), headers["x-who"].to_str().unwrap()), (200, "good"));
    }
}

/// An attempt that failed (here: passed its per-try timeout on an endpoint that never
/// answers) counts as tried too: the retry goes elsewhere (failed attempts were not counted,
/// so the retry went back to the silent endpoint half the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omit_previous_hosts_counts_an_attempt_that_timed_out() {
    let (silent, _silent_task, _) = silent_listener().await;
    let (good, _good_task) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", silent.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http: {numRetries: 1, perTryTimeout: 1s, retryOn: [Reset], backOff: {baseInterval: 1ms}, hostSelection: [{predicate: OmitPreviousHosts}]}\n---\ntype: MeshCircuitBreaker\nname: keep-both\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {outlierDetection: {disabled: true, detectors: {totalFailures: {}}}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("omit-timed-out", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    for i in 0..20 {
        let (status, body, headers) = get_status(outbound, &[]).await;
        assert_eq!(status, 200, "request {i}: {body}");
        assert_eq!(headers["x-who"], "good");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_duration_retires_pooled_connections() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshTimeout\nname: lifetime\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {maxConnectionDuration: 1500ms}}\n";
    let (outbound, _dir, config) = service_and_policies("lifetime", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let mut client = h1(outbound).await;
    let (status, _) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
    assert_eq!(status, 200);
    client.ready().await.unwrap();
    let (_, _) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
    assert_eq!(upstream.connections(), 1, "reused while young");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    client.ready().await.unwrap();
    let (status, _) = text(client.send_request(get("http://x/", &[])).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(upstream.connections(), 2, "an old connection takes no new request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_timeout_closes_a_slow_request_head() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshTimeout\nname: heads\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 15s, requestHeadersTimeout: 300ms}}\n";
    let (outbound, _dir, config) = service_and_policies("heads", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await; // --header-read-timeout stays at its 30 s default
    let mut stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the proxy closes the connection well before the 30 s default");
}

/// A TCP listener that accepts and never says a word (a TLS handshake to it never ends).
/// A listener that accepts, counts and holds connections, and never says anything.
async fn silent_listener() -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    (addr, task, accepted)
}

const SKIP_ALL_TLS: &str = "  tls:\n    enabled: true\n    verification: {mode: SkipAll}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_timeout_bounds_connect_and_tls_handshake() {
    let (silent, _task, _) = silent_listener().await;
    let outbound = free_addr("127.0.0.1");
    let policy = "type: MeshTimeout\nname: connect\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionTimeout: 300ms}\n";
    let service =
        service_with_protocol("silent", "http", outbound, &endpoint("127.0.0.1", silent.port(), 0), SKIP_ALL_TLS);
    let (_dir, config) = config_dir(&format!("{service}---\n{policy}"));
    let mut opts = options(config);
    opts.upstream.connect_timeout = Duration::from_secs(60);
    opts.request_timeout = Some(Duration::from_secs(20));
    let _proxy = start(opts).await;
    // 503 (the connect failed) rather than 504 (the 20 s request timeout): 300 ms bounded it.
    let (status, body, _) = get_status(outbound, &[]).await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_requests_overflow() {
    let (silent, _task, accepted) = silent_listener().await;
    let outbound = free_addr("127.0.0.1");
    let policy = "type: MeshCircuitBreaker\nname: pending\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxPendingRequests: 1}}\n";
    let service =
        service_with_protocol("pending", "http", outbound, &endpoint("127.0.0.1", silent.port(), 0), SKIP_ALL_TLS);
    let (_dir, config) = config_dir(&format!("{service}---\n{policy}"));
    let _proxy = start(options(config)).await;
    // The first request waits in the (never-ending, 2 s-bounded) TLS handshake of a new connection.
    let first = tokio::spawn(get_status(outbound, &[]));
    eventually("the first connection accepted", Duration::from_secs(10), || async {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    let (status, _, headers) = get_status(outbound, &[]).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-envoy-overloaded"], "true", "refused at once as pending overflow");
    assert_eq!(first.await.unwrap().0, 503, "the first one's connect timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_bounds_retries_in_flight() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http: {numRetries: 2, retryOn: [5xx], backOff: {baseInterval: 1ms}}\n---\ntype: MeshCircuitBreaker\nname: budget\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxRetries: 1}}\n";
    let (outbound, _dir, config) = service_and_policies("budget", "http", upstream.addr.port(), policy);
    let _proxy = start(options(config)).await;
    let before = counter("mesh_egress_upstream_overflows_total", "budget");
    // A's failing attempts take 1.5 s each; B fails once while A's retry is in flight.
    let ka = key("a");
    let a = {
        let ka = ka.clone();
        tokio::spawn(async move {
            get_status(outbound, &[("x-fail-first", "2"), ("x-fail-delay-ms", "1500"), ("x-key", &ka)]).await
        })
    };
    eventually("A's retry at the endpoint", Duration::from_secs(10), || async { attempts_seen(&ka) >= 2 }).await;
    let kb = key("b");
    let (status_b, _, headers_b) = get_status(outbound, &[("x-fail-first", "1"), ("x-key", &kb)]).await;
    assert_eq!((status_b.as_u16(), headers_b["x-attempt"].to_str().unwrap()), (503, "1"), "no retry budget left for B");
    let (status_a, _, headers_a) = a.await.unwrap();
    assert_eq!(
        (status_a.as_u16(), headers_a["x-attempt"].to_str().unwrap()),
        (200, "3"),
        "A retried twice, one at a time"
    );
    assert!(counter("mesh_egress_upstream_overflows_total", "budget") - before >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_pools_refuses_a_second_pool() {
    let (a, _ta) = fixed_upstream(200, "a").await;
    let (b, _tb) = fixed_upstream(200, "b").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!("{}{}", endpoint("127.0.0.1", a.port(), 0), endpoint("127.0.0.1", b.port(), 0));
    let policy = "type: MeshCircuitBreaker\nname: pools\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {connectionLimits: {maxConnectionPools: 1}}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("pools", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let mut answered = std::collections::HashSet::new();
    let mut overflows = 0;
    for _ in 0..30 {
        let (status, _, headers) = get_status(outbound, &[]).await;
        match status.as_u16() {
            200 => {
                answered.insert(headers["x-who"].to_str().unwrap().to_string());
            }
            _ => overflows += 1,
        }
    }
    assert_eq!(answered.len(), 1, "one endpoint's pool only: {answered:?}");
    assert!(overflows > 0, "requests picking the other endpoint overflow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_reuse_their_connection_unless_told_not_to() {
    let reused = http_upstream(None).await;
    let fresh = http_upstream(None).await;
    let policy = |reuse: bool| {
        format!("type: MeshHealthCheck\nname: hc-{reuse}\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: reuse-{reuse}}}\n    default: {{interval: 100ms, noTrafficInterval: 100ms, reuseConnection: {reuse}, http: {{path: /}}}}\n")
    };
    let yaml = format!(
        "{}---\n{}---\n{}---\n{}",
        service_with_protocol(
            "reuse-true",
            "http",
            free_addr("127.0.0.1"),
            &endpoint("127.0.0.1", reused.addr.port(), 0),
            ""
        ),
        service_with_protocol(
            "reuse-false",
            "http",
            free_addr("127.0.0.1"),
            &endpoint("127.0.0.1", fresh.addr.port(), 0),
            ""
        ),
        policy(true),
        policy(false)
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    wait_for_checks("reuse-true", "success", 5.0).await;
    wait_for_checks("reuse-false", "success", 5.0).await;
    assert_eq!(reused.connections(), 1, "one connection for every check");
    assert!(fresh.connections() >= 5, "a new connection per check: {}", fresh.connections());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_rate_and_local_origin_detectors_eject() {
    let (bad, _b) = fixed_upstream(500, "bad").await;
    let (g1, _g1) = fixed_upstream(200, "g1").await;
    let (g2, _g2) = fixed_upstream(200, "g2").await;
    let dead = dead_addr();
    let outbound = free_addr("127.0.0.1");
    let endpoints = format!(
        "{}{}{}{}",
        endpoint("127.0.0.1", bad.port(), 0),
        endpoint("127.0.0.1", g1.port(), 0),
        endpoint("127.0.0.1", g2.port(), 0),
        endpoint("127.0.9.1", dead.port(), 0)
    );
    // With the split, connect failures count as local-origin failures only; the 500s count for
    // the success rate only.
    let policy = "type: MeshCircuitBreaker\nname: outliers\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      outlierDetection:\n        interval: 300ms\n        baseEjectionTime: 1m\n        maxEjectionPercent: 100\n        healthyPanicThreshold: 0\n        splitExternalAndLocalErrors: true\n        detectors:\n          localOriginFailures: {consecutive: 1}\n          successRate: {minimumHosts: 3, requestVolume: 3, standardDeviationFactor: \"1\"}\n";
    let yaml = format!("{}---\n{policy}", service_with_protocol("rates", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let before = counter("mesh_egress_upstream_ejections_total", "rates");
    eventually("the dead and the failing endpoint ejected", Duration::from_secs(15), || async {
        // Enough requests in each 300 ms interval for every address to reach requestVolume.
        for _ in 0..20 {
            get_status(outbound, &[]).await;
        }
        counter("mesh_egress_upstream_ejections_total", "rates") - before >= 2.0
    })
    .await;
    for _ in 0..20 {
        let (status, _, headers) = get_status(outbound, &[]).await;
        assert_eq!(status, 200);
        assert_ne!(headers["x-who"], "bad");
    }
}

/// An endpoint that takes requests and never answers: each request timeout counts as a
/// local-origin failure against it (as Envoy counts a timeout), so it is ejected and the next
/// requests go to the endpoint that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_never_answers_is_ejected_by_its_timeouts() {
    let (silent_addr, _silent, _) = silent_listener().await;
    let (good, _g) = fixed_upstream(200, "good").await;
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.0.1", silent_addr.port(), 0), endpoint("127.0.0.1", good.port(), 0));
    let policies = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 1s}}\n---\ntype: MeshCircuitBreaker\nname: outliers\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      outlierDetection:\n        baseEjectionTime: 1m\n        maxEjectionPercent: 100\n        healthyPanicThreshold: 0\n        splitExternalAndLocalErrors: true\n        detectors:\n          localOriginFailures: {consecutive: 1}\n";
    let yaml = format!("{}---\n{policies}", service_with_protocol("silent", "http", outbound, &endpoints, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    eventually("the silent endpoint ejected", Duration::from_secs(15), || async {
        get_status(outbound, &[]).await;
        counter("mesh_egress_upstream_ejections_total", "silent") >= 1.0
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get_status(outbound, &[]).await.0, 200, "a request went to the ejected endpoint");
    }
}

/// The stream's own deadline (`maxStreamDuration`, a client's `grpc-timeout`) is not the
/// endpoint's doing: passing it counts nothing against the endpoint, as in Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deadline_does_not_count_against_the_endpoint() {
    let (silent_addr, _silent, _) = silent_listener().await;
    let outbound = free_addr("127.0.0.1");
    let policies = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 0s, maxStreamDuration: 100ms}}\n---\ntype: MeshCircuitBreaker\nname: outliers\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      outlierDetection:\n        baseEjectionTime: 1m\n        maxEjectionPercent: 100\n        splitExternalAndLocalErrors: true\n        detectors:\n          localOriginFailures: {consecutive: 1}\n";
    let ep = endpoint("127.0.0.1", silent_addr.port(), 0);
    let yaml = format!("{}---\n{policies}", service_with_protocol("deadline", "http", outbound, &ep, ""));
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    for _ in 0..3 {
        assert_eq!(get_status(outbound, &[]).await.0, 504);
    }
    assert_eq!(counter("mesh_egress_upstream_ejections_total", "deadline"), 0.0);
}

/// A TLS handshake that fails (the endpoint's certificate is not trusted) is a failed connect
/// for outlier detection, as in Envoy: with the default detection the endpoint is ejected after
/// consecutive failures, where it used to count as a connection made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_eject_an_endpoint() {
    use common::http_upstream::tls_config;
    use common::pki::Ca;
    let trusted = Ca::new("trusted");
    let untrusted = http_upstream(Some(tls_config(&Ca::new("other").server(&["tls.test"])))).await;
    let good = http_upstream(Some(tls_config(&trusted.server(&["tls.test"])))).await;
    let outbound = free_addr("127.0.0.1");
    let endpoints =
        format!("{}{}", endpoint("127.0.0.1", untrusted.addr.port(), 0), endpoint("127.0.0.1", good.addr.port(), 0));
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: tls.test\n      caCert:\n        inlineString: |\n{}",
        trusted.pem.lines().map(|l| format!("          {l}\n")).collect::<String>()
    );
    let yaml = service_with_protocol("tls-eject", "http", outbound, &endpoints, &tls);
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    eventually("the endpoint with the untrusted certificate ejected", Duration::from_secs(15), || async {
        get_status(outbound, &[]).await;
        counter("mesh_egress_upstream_ejections_total", "tls-eject") >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_the_stream_idle_default_applies() {
    let upstream = http_upstream(None).await;
    let (outbound, _dir, config) = single_service("idle-default", "http", upstream.addr.port());
    let mut opts = options(config);
    opts.timeouts.stream_idle = Duration::from_millis(300); // the flag (default 30 min)
    let _proxy = start(opts).await;
    let response =
        h1(outbound).await.send_request(get("http://x/", &[("x-drip", "3"), ("x-drip-ms", "1200")])).await.unwrap();
    assert!(response.into_body().collect().await.is_err(), "cut by --stream-idle-timeout");
    // Headers, then nothing: counted from the response head, as Envoy's, not from a first
    // frame that never comes (the connection idle timeout of an hour was all that bounded it).
    let headers = [("x-drip", "1"), ("x-drip-ms", "1500"), ("x-drip-late", "1")];
    let response = h1(outbound).await.send_request(get("http://x/", &headers)).await.unwrap();
    assert!(response.into_body().collect().await.is_err(), "a body that never starts is cut too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_send_the_configured_authority() {
    let server = grpc_server(None).await;
    let outbound = free_addr("127.0.0.1");
    let policy = "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {interval: 100ms, noTrafficInterval: 100ms, initialJitter: 10ms, intervalJitter: 10ms, intervalJitterPercent: 10, unhealthyThreshold: 1, grpc: {authority: not-serving.test}}\n";
    let yaml = format!(
        "{}---\n{policy}",
        service_with_protocol("grpc-authority", "grpc", outbound, &endpoint("127.0.0.1", server.addr.port(), 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    // The server answers NOT_SERVING only to that authority: the check must have sent it.
    wait_for_failed_checks("grpc-authority", 2.0).await;
    assert_eq!(health_checks("grpc-authority", "success"), 0.0);
}

fn permission(name: &str, service: &str, from: &str, action: &str) -> String {
    format!("---\ntype: MeshTrafficPermission\nname: {name}\nmesh: default\nspec:\n  targetRef: {{kind: MeshExternalService, name: {service}}}\n  from:\n  - targetRef: {from}\n    default: {{action: {action}}}\n")
}

/// MeshTrafficPermission on a MeshExternalService, for the workload named by `--dataplane`:
/// denied HTTP gets 403, gRPC PERMISSION_DENIED, TCP a close; a shadow deny passes and is
/// counted; the most specific item wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_permissions_decide_per_workload() {
    let upstream = http_upstream(None).await;
    let grpc_upstream = grpc_server(None).await;
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let outbounds: Vec<SocketAddr> = (0..5).map(|_| free_addr("127.0.0.1")).collect();
    let mut yaml = String::new();
    for (i, (name, protocol, port)) in [
        ("denied", "http", upstream.addr.port()),
        ("rpc", "grpc", grpc_upstream.addr.port()),
        ("raw", "tcp", echo.addr.port()),
        ("shadowed", "http", upstream.addr.port()),
        ("opened", "http", upstream.addr.port()),
    ]
    .into_iter()
    .enumerate()
    {
        yaml.push_str(&service_with_protocol(name, protocol, outbounds[i], &endpoint("127.0.0.1", port, 0), ""));
        yaml.push_str("---\n");
    }
    yaml.push_str(&permission("deny-denied", "denied", "{kind: Dataplane, name: app-denied}", "Deny"));
    yaml.push_str(&permission("deny-rpc", "rpc", "{kind: Mesh}", "Deny"));
    yaml.push_str(&permission("deny-raw", "raw", "{kind: Mesh}", "Deny"));
    yaml.push_str(&permission("shadow", "shadowed", "{kind: Mesh}", "AllowWithShadowDeny"));
    yaml.push_str(&permission("close-opened", "opened", "{kind: Mesh}", "Deny"));
    yaml.push_str(&permission("open-opened", "opened", "{kind: Dataplane, name: app-denied}", "Allow"));
    // Another workload's item changes nothing for this one.
    yaml.push_str(&permission("other-workload", "shadowed", "{kind: Dataplane, name: app-rpc}", "Deny"));
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.compile.dataplane = Some("app-denied".into());
    let _proxy = start(opts).await;

    let (status, body, _) = get_status(outbounds[0], &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("denied by a MeshTrafficPermission"), "{body}");

    let mut client = grpc::client(outbounds[1]).await;
    client.ready().await.unwrap();
    let reply = client.unary(tonic::Request::new(Bytes::from("hello")), grpc::path("Unary"), RawCodec).await;
    assert_eq!(reply.unwrap_err().code(), tonic::Code::PermissionDenied);

    let mut raw = tokio::net::TcpStream::connect(outbounds[2]).await.unwrap();
    let _ = raw.write_all(b"ping").await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "closed without reaching the endpoint: {:?}", String::from_utf8_lossy(&buf));

    let before = counter("mesh_egress_access_refused_total", "shadowed");
    for _ in 0..3 {
        assert_eq!(get_status(outbounds[3], &[]).await.0, 200);
    }
    assert_eq!(counter("mesh_egress_access_refused_total", "shadowed") - before, 3.0, "each use is counted");
    assert_eq!(get_status(outbounds[4], &[]).await.0, 200, "the Dataplane item beats the Mesh one");
    assert_eq!(counter("mesh_egress_access_refused_total", "denied"), 1.0);
}

/// A reload that shortens MeshTimeout's `idleTimeout` on a kept service closes its idle pooled
/// connections by the new timeout: the sweeper, asleep for half the old one (a minute at most),
/// is woken (it closed them only after its sleep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_shortens_the_idle_timeout_applies_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                loop {
                    if common::read_head(&mut stream).await.is_err() {
                        let _ = closed_tx.send(());
                        return;
                    }
                    if stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let idle = |timeout: &str| {
        format!("type: MeshTimeout\nname: idle\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{idleTimeout: {timeout}}}\n")
    };
    let (outbound, _dir, config) = service_and_policies("shortened", "http", port, &idle("1h"));
    let mut proxy = start(options(config.clone())).await;
    let (status, _, _) = get_status(outbound, &[]).await;
    assert_eq!(status, 200);
    let text = std::fs::read_to_string(&config).unwrap().replace("idleTimeout: 1h", "idleTimeout: 200ms");
    std::fs::write(&config, text).unwrap();
    proxy.reload().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), closed.recv()).await;
    assert!(ended.is_ok(), "the idle connection outlived the new idle timeout");
}

/// The connection idle timeout on an HTTP connection is Envoy's: no request open for that long.
/// A request whose response takes longer (a long poll) keeps its connection, HTTP/1.1 or h2c;
/// the connection closes that long after the response. Before, nothing moving for the idle
/// timeout closed it under the waiting request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_outlives_the_connection_idle_timeout() {
    let upstream = http_upstream(None).await;
    let (outbound, _dir, config) = single_service("long-poll", "http", upstream.addr.port());
    let mut opts = options(config);
    opts.timeouts.idle = Duration::from_millis(400); // --connection-idle-timeout
    let _proxy = start(opts).await;
    let mut http1 = h1(outbound).await;
    let response = http1.send_request(get("http://x/", &[("x-delay-ms", "1500")])).await.expect("HTTP/1.1 long poll");
    assert_eq!(text(response).await.0, 200);
    let mut http2 = h2(outbound).await;
    let response = http2.send_request(get("http://x/", &[("x-delay-ms", "1500")])).await.expect("h2c long poll");
    assert_eq!(text(response).await.0, 200);
    // Then idle: closed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(http1.send_request(get("http://x/", &[])).await.is_err(), "idle HTTP/1.1 connection closed");
    assert!(http2.send_request(get("http://x/", &[])).await.is_err(), "idle h2c connection closed");
}

/// With a request open, a connection may be silent for the longer of the idle and stream idle
/// timeouts, the service's MeshTimeout `streamIdleTimeout` counting over the flag's: here the
/// flags alone would close it after 500 ms under the long poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_may_be_as_silent_as_the_services_stream_idle_timeout() {
    let upstream = http_upstream(None).await;
    let policy = "type: MeshTimeout\nname: long-polls\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 10s, streamIdleTimeout: 5s}}\n";
    let (outbound, _dir, config) = service_and_policies("long-poll-policy", "http", upstream.addr.port(), policy);
    let mut opts = options(config);
    opts.timeouts.idle = Duration::from_millis(400);
    opts.timeouts.stream_idle = Duration::from_millis(500);
    let _proxy = start(opts).await;
    let mut http1 = h1(outbound).await;
    let response = http1.send_request(get("http://x/", &[("x-delay-ms", "1500")])).await.expect("long poll");
    assert_eq!(text(response).await.0, 200);
}

/// An upload of `chunks` kilobytes, one every `pause`; after the first, `stall` more silence.
async fn timed_upload(
    outbound: SocketAddr,
    chunks: u64,
    pause: Duration,
    stall: Duration,
) -> (http::StatusCode, String) {
    use http_body_util::StreamBody;
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(outbound).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let frames = futures_util::stream::unfold(0, move |sent| async move {
        if sent == chunks {
            return None;
        }
        tokio::time::sleep(if sent == 1 { pause + stall } else { pause }).await;
        Some((Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![b'u'; 1024]))), sent + 1))
    });
    let post = Request::post("http://app/upload").body(StreamBody::new(frames)).unwrap();
    text(sender.send_request(post).await.unwrap()).await
}

/// The request timeout and MeshRetry's perTryTimeout count from the end of the request body, as
/// Envoy's route and per-try timeouts: an upload that lasts longer than either is not cut while
/// it flows (it got a 504), nor while the application pauses it, and then has them in full for
/// the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_count_from_the_end_of_the_request_body() {
    let upstream = http_upstream(None).await;
    let request_timeout = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 400ms}}\n";
    let per_try = "type: MeshTimeout\nname: t\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default: {http: {requestTimeout: 20s}}\n---\ntype: MeshRetry\nname: r\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: Mesh}\n    default:\n      http: {numRetries: 1, perTryTimeout: 400ms}\n";
    for (name, policies) in [("per-try", per_try), ("request-timeout", request_timeout)] {
        let (outbound, _dir, config) = service_and_policies(name, "http", upstream.addr.port(), policies);
        let _proxy = start(options(config)).await;
        let (status, body) = timed_upload(outbound, 8, Duration::from_millis(150), Duration::ZERO).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "received: 8192\n"), "{name}: a 1.2 s upload");
        let (status, body) = timed_upload(outbound, 3, Duration::from_millis(10), Duration::from_millis(1500)).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "received: 3072\n"), "{name}: an upload that pauses");
    }
}

/// Before its end, a request body the application stops sending is bounded by the stream idle
/// timeout, as Envoy's: 408 (SI), not retried, whether the request timeout is shorter, longer
/// or off; a body nobody reads (an endpoint that reads nothing) still times out as the request
/// does: 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_its_end_a_request_body_is_bounded_by_stream_idle_or_the_request_timeout() {
    let upstream = http_upstream(None).await;
    // The stall bound was checked once per request timeout (a 10 s one let a 4 s stall pass),
    // and not at all with the request timeout off.
    for request_timeout in [Some(Duration::from_millis(300)), Some(Duration::from_secs(10)), None] {
        let (outbound, _dir, config) = single_service("stalls", "http", upstream.addr.port());
        let mut opts = options(config);
        opts.request_timeout = request_timeout;
        opts.timeouts.stream_idle = Duration::from_secs(1);
        let _proxy = start(opts).await;
        let (status, body) = timed_upload(outbound, 3, Duration::from_millis(10), Duration::from_secs(4)).await;
        let stalled = (status.as_u16(), body.as_str());
        assert_eq!(stalled, (408, "stream timeout"), "the application stopped sending; timeout {request_timeout:?}");
    }

    let (silent, _task, _) = silent_listener().await;
    let (outbound, _dir, config) = single_service("unread", "http", silent.port());
    let mut opts = options(config);
    opts.request_timeout = Some(Duration::from_millis(300));
    let _proxy = start(opts).await;
    let io = hyper_util::rt::TokioIo::new(tokio::net::TcpStream::connect(outbound).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let frames = futures_util::stream::iter(
        (0..256).map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let post = Request::post("http://app/upload").body(http_body_util::StreamBody::new(frames)).unwrap();
    let (status, _) = text(sender.send_request(post).await.unwrap()).await;
    assert_eq!(status.as_u16(), 504, "256 MiB to an endpoint that reads nothing");
}
