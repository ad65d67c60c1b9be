//! MeshAccessLog against real traffic: File backends (plain with Envoy operators and Kuma
//! values, JSON with omitEmptyValues, Kuma's default formats for HTTP and TCP), a TCP collector,
//! and an OTLP/gRPC receiver written with grpcio and the OpenTelemetry protos (a real peer).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::http_client::*;
use common::http_upstream::{attempts_seen, http_upstream};
use common::*;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

/// `name` on a fresh outbound, with a Dataplane `app-<name>` at 10.1.2.3, plus `policies`.
fn config(name: &str, protocol: &str, port: u16, policies: &str) -> (std::net::SocketAddr, tempfile::TempDir, PathBuf) {
    let outbound = free_addr("127.0.0.1");
    let service = service_with_protocol(name, protocol, outbound, &endpoint("127.0.0.1", port, 0), "")
        .replace("networking:\n  outbound:", "networking:\n  address: 10.1.2.3\n  outbound:");
    let (dir, path) = config_dir(&format!("{service}---\n{policies}"));
    (outbound, dir, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backends_with_plain_json_and_default_formats() {
    let upstream = http_upstream(None).await;
    let logs = tempfile::tempdir().unwrap();
    let (plain, json, default) =
        (logs.path().join("plain.log"), logs.path().join("json.log"), logs.path().join("default.log"));
    let policy = format!(
        r#"type: MeshAccessLog
name: logs
mesh: default
spec:
  to:
  - targetRef: {{kind: MeshExternalService, name: logged}}
    default:
      backends:
      - type: File
        file:
          path: {}
          format: {{type: Plain, plain: "%KUMA_MESH% %KUMA_SOURCE_SERVICE%@%KUMA_SOURCE_ADDRESS_WITHOUT_PORT%->%KUMA_DESTINATION_SERVICE% %REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %REQ(X-MISSING?USER-AGENT)% %RESP(X-UPSTREAM-CONN)% %REQ(X-NONE)% %BYTES_SENT%"}}
      - type: File
        file:
          path: {}
          format:
            type: Json
            omitEmptyValues: true
            json:
            - {{key: status, value: "%RESPONSE_CODE%"}}
            - {{key: upstream, value: "%UPSTREAM_HOST%"}}
            - {{key: absent, value: "%REQ(X-NONE)%"}}
            - {{key: route, value: "%KUMA_MESH%/%KUMA_DESTINATION_SERVICE%"}}
      - type: File
        file: {{path: {}}}
"#,
        plain.display(),
        json.display(),
        default.display()
    );
    let (outbound, _dir, config) = config("logged", "http", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;
    let response = h1(outbound)
        .await
        .send_request(get("http://logged.test/hello?x=1", &[("user-agent", "curl/8.0")]))
        .await
        .unwrap();
    let (status, body) = text(response).await;
    assert_eq!(status, 200);

    let plain = wait_for_lines(&plain, 1).await;
    assert_eq!(
        plain[0],
        format!("default app-logged@10.1.2.3->logged GET /hello?x=1 HTTP/1.1 200 curl/8.0 1 - {}", body.len())
    );
    let json: serde_json::Value = serde_json::from_str(&wait_for_lines(&json, 1).await[0]).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"status": 200, "upstream": upstream.addr.to_string(), "route": "default/logged"})
    );
    let default = wait_for_lines(&default, 1).await;
    // Kuma's default HTTP format.
    let expected_tail = format!("] default \"GET /hello?x=1 HTTP/1.1\" 200 - 0 {} ", body.len());
    assert!(default[0].starts_with('[') && default[0].contains(&expected_tail), "{}", default[0]);
    assert!(
        default[0].ends_with(&format!(
            "\"curl/8.0\" \"-\" \"-\" \"logged.test\" \"app-logged\" \"logged\" \"10.1.2.3\" \"{}\"",
            upstream.addr
        )),
        "{}",
        default[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_services_use_kumas_default_tcp_format_and_a_tcp_collector_gets_lines() {
    let echo = echo_server("127.0.0.1:0".parse().unwrap(), "echo").await;
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = collector.local_addr().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("tcp.log");
    let policy = format!(
        "type: MeshAccessLog\nname: logs\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default:\n      backends:\n      - {{type: File, file: {{path: {}}}}}\n      - {{type: Tcp, tcp: {{address: \"{collector_addr}\", format: {{type: Plain, plain: \"tcp %KUMA_DESTINATION_SERVICE% %UPSTREAM_HOST% %BYTES_RECEIVED%\"}}}}}}\n",
        file.display()
    );
    let outbound = free_addr("127.0.0.1");
    let yaml = format!(
        "{}---\n{policy}",
        service_with_outbound("tcp-logged", outbound, &endpoint("127.0.0.1", echo.addr.port(), 0), "")
            .replace("networking:\n  outbound:", "networking:\n  address: 10.1.2.3\n  outbound:")
    );
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let (_, mut stream) = greet(outbound).await.unwrap();
    stream.write_all(b"hello").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest).await;
    drop(stream);

    let line = &wait_for_lines(&file, 1).await[0];
    let pattern = format!("] - default 10.1.2.3(app-tcp-logged)->{}(tcp-logged) took ", echo.addr);
    assert!(line.starts_with('[') && line.contains(&pattern), "{line}");
    assert!(line.ends_with("bytes, received: 5 bytes"), "{line}");

    let (collected, _) = tokio::time::timeout(Duration::from_secs(10), collector.accept()).await.unwrap().unwrap();
    let mut reader = tokio::io::BufReader::new(collected);
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, format!("tcp tcp-logged {} 5\n", echo.addr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_telemetry_backend_exports_to_a_real_otlp_receiver() {
    let receiver = otlp_receiver();
    let upstream = http_upstream(None).await;
    let policy = format!(
        "type: MeshAccessLog\nname: otel\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default:\n      backends:\n      - type: OpenTelemetry\n        openTelemetry:\n          endpoint: 127.0.0.1:{}\n          body: \"%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE%\"\n          attributes:\n          - {{key: mesh.destination, value: \"%KUMA_DESTINATION_SERVICE%\"}}\n          - {{key: upstream.host, value: \"%UPSTREAM_HOST%\"}}\n",
        receiver.port
    );
    let (outbound, _dir, config) = config("otel-logged", "http", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;
    for path in ["/one", "/two"] {
        let (status, _) =
            text(h1(outbound).await.send_request(get(&format!("http://x{path}"), &[])).await.unwrap()).await;
        assert_eq!(status, 200);
    }
    let mut records = Vec::new();
    while records.len() < 2 {
        let line = receiver.lines.recv_timeout(Duration::from_secs(15)).expect("no log record reached the receiver");
        records.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    let bodies: Vec<&str> = records.iter().map(|r| r["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["GET /one 200", "GET /two 200"]);
    assert_eq!(records[0]["attributes"]["mesh.destination"], "otel-logged");
    assert_eq!(records[0]["attributes"]["upstream.host"], upstream.addr.to_string());
    assert_eq!(records[0]["resource"]["service.name"], "mesh-egress");
    drop(receiver.child);
}

/// Every request gets its line, with Envoy's `%RESPONSE_FLAGS%`: the proxy's own replies (a
/// MeshCircuitBreaker overflow is UO, not UF), a response the endpoint cut (UC, not DC),
/// MeshHTTPRoute redirects, and requests whose
/// application went away before the response (code 0, DC), which left no line before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_a_line_with_envoys_response_flags() {
    let upstream = http_upstream(None).await;
    let logs = tempfile::tempdir().unwrap();
    let file = logs.path().join("flags.log");
    let policy = format!(
        r#"type: MeshAccessLog
name: logs
mesh: default
spec:
  to:
  - targetRef: {{kind: Mesh}}
    default:
      backends:
      - type: File
        file:
          path: {}
          format: {{type: Plain, plain: "%REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS%"}}
---
type: MeshCircuitBreaker
name: limits
mesh: default
spec:
  to:
  - targetRef: {{kind: Mesh}}
    default: {{connectionLimits: {{maxRequests: 1}}}}
---
type: MeshHTTPRoute
name: moved
mesh: default
spec:
  to:
  - targetRef: {{kind: MeshExternalService, name: flagged}}
    rules:
    - matches: [{{path: {{type: Exact, value: /moved}}}}]
      default:
        filters:
        - {{type: RequestRedirect, requestRedirect: {{hostname: elsewhere.test, statusCode: 302}}}}
"#,
        file.display()
    );
    let (outbound, _dir, config) = config("flagged", "http", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;
    let ask = |path: &'static str, headers: &'static [(&'static str, &'static str)]| async move {
        let response = h1(outbound).await.send_request(get(&format!("http://x{path}"), headers)).await.unwrap();
        text(response).await.0.as_u16()
    };

    let mut old = tokio::net::TcpStream::connect(outbound).await.unwrap();
    old.write_all(b"GET /ten HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut old, &mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&answer));

    // Counted at the endpoint on arrival, answered 200 two seconds later: it holds the one slot.
    const SLOW: &[(&str, &str)] =
        &[("x-fail-first", "1"), ("x-fail-status", "200"), ("x-fail-delay-ms", "2000"), ("x-key", "access-log-slow")];
    let slow = tokio::spawn(ask("/slow", SLOW));
    eventually("/slow at the endpoint", Duration::from_secs(10), || async { attempts_seen("access-log-slow") >= 1 })
        .await;
    assert_eq!(ask("/over", &[]).await, 503);
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(ask("/moved", &[]).await, 302);
    let cut = h1(outbound).await.send_request(get("http://x/cut", &[("x-reset", "mid")])).await.unwrap();
    assert!(cut.into_body().collect().await.is_err(), "the body is cut");

    let mut gone = tokio::net::TcpStream::connect(outbound).await.unwrap();
    gone.write_all(b"GET /gone HTTP/1.1\r\nHost: x\r\nx-delay-ms: 3000\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(gone);

    let mut got = wait_for_lines(&file, 6).await;
    got.sort();
    assert_eq!(
        got,
        [
            "/cut HTTP/1.1 200 UC upstream_reset",
            "/gone HTTP/1.1 0 DC cancelled",
            "/moved HTTP/1.1 302 - ok",
            "/over HTTP/1.1 503 UO local_reply",
            "/slow HTTP/1.1 200 - ok",
            "/ten HTTP/1.0 200 - ok",
        ]
    );
}

/// A MeshAccessLog item that names a MeshHTTPRoute logs that route's requests with its own
/// backends (the merge of the Mesh items and its items, as Kuma's per-route access logs), in
/// place of the service's, redirects included; one whose merge has no backend leaves them out.
/// Before, such items applied to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_access_log_item_can_name_a_route() {
    let upstream = http_upstream(None).await;
    let logs = tempfile::tempdir().unwrap();
    let (service_log, route_log) = (logs.path().join("service.log"), logs.path().join("route.log"));
    let route = |name: &str, path: &str, filter: &str| {
        format!("type: MeshHTTPRoute\nname: {name}\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: MeshExternalService, name: routed}}\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: {path}}}}}]\n      default: {{{filter}}}\n")
    };
    let file = |path: &Path| {
        format!(
            "[{{type: File, file: {{path: {}, format: {{type: Plain, plain: '%REQ(:PATH)% %RESPONSE_CODE%'}}}}}}]",
            path.display()
        )
    };
    let policy = format!(
        "type: MeshAccessLog\nname: logs\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{backends: {}}}\n  - targetRef: {{kind: MeshHTTPRoute, name: own}}\n    default: {{backends: {}}}\n  - targetRef: {{kind: MeshHTTPRoute, name: moved}}\n    default: {{backends: {}}}\n  - targetRef: {{kind: MeshHTTPRoute, name: quiet}}\n    default: {{backends: []}}\n",
        file(&service_log),
        file(&route_log),
        file(&route_log)
    );
    let redirect = "filters: [{type: RequestRedirect, requestRedirect: {hostname: new.example.test}}]";
    let policies = [route("own", "/own", ""), route("moved", "/moved", redirect), route("quiet", "/quiet", ""), policy]
        .join("---\n");
    let (outbound, _dir, config) = config("routed", "http", upstream.addr.port(), &policies);
    let _proxy = start(options(config)).await;
    for (path, status) in [("/own/a", 200), ("/quiet/a", 200), ("/moved/b", 302), ("/elsewhere", 200)] {
        let response = h1(outbound).await.send_request(get(&format!("http://routed.test{path}"), &[])).await.unwrap();
        assert_eq!(text(response).await.0.as_u16(), status, "{path}");
    }
    assert_eq!(wait_for_lines(&route_log, 2).await, ["/own/a 200", "/moved/b 302"]);
    let service = wait_for_lines(&service_log, 1).await;
    assert_eq!(service, ["/elsewhere 200"], "the quiet route's request is in neither");
}

/// A response that ends with trailers over HTTP/1 is logged `ok`: hyper stops reading a body
/// after its trailers, which an HTTP/1 body does not count as its end, and the line said
/// `aborted` (DC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_ending_with_trailers_is_complete() {
    let upstream = http_upstream(None).await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("trailers.log");
    let policy = format!(
        "type: MeshAccessLog\nname: logs\nmesh: default\nspec:\n  to:\n  - targetRef: {{kind: Mesh}}\n    default: {{backends: [{{type: File, file: {{path: {}, format: {{type: Plain, plain: '%REQ(:PATH)% %RESPONSE_FLAGS% %BYTES_SENT%'}}}}}}]}}\n",
        log.display()
    );
    let (outbound, _dir, config) = config("trailing", "http", upstream.addr.port(), &policy);
    let _proxy = start(options(config)).await;
    let request = http::Request::post("http://trailing.test/with-trailers")
        .header("te", "trailers")
        .header("x-trailers", "1")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"upload")))
        .unwrap();
    let response = h1(outbound).await.send_request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    assert_eq!(trailers.get("x-checksum").map(|v| v.as_bytes()), Some(&b"abc"[..]), "the trailers came through");
    assert_eq!(collected.to_bytes(), "abc");
    assert_eq!(wait_for_lines(&log, 1).await, ["/with-trailers - 3"]);
}
