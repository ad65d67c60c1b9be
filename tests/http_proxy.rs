//! HTTP/1.1, HTTP/2 and gRPC through the proxy against in-process upstreams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub)] // test code

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::grpc::{self, grpc_server, RawCodec};
use common::http_client::*;
use common::http_upstream::{http_upstream, tls_config};
use common::pki::Ca;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_rewritten_for_dns_endpoints_and_kept_for_ip_endpoints() {
    let upstream = http_upstream(None).await;
    let dns = dns_server(30).await;
    dns.set("api.example.test", "127.0.0.1".parse().unwrap());
    let (by_name, by_ip) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let yaml = format!(
        "{}---\n{}",
        service_with_protocol("by-name", "http", by_name, &endpoint("api.example.test", upstream.addr.port(), 0), ""),
        service_with_protocol("by-ip", "http", by_ip, &endpoint("127.0.0.1", upstream.addr.port(), 0), "")
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.upstream.resolver = mesh_egress::upstream::ResolverSource::new(vec![dns.addr]);
    let _proxy = start(opts).await;

    let (status, body) = text(h1(by_name).await.send_request(get("/x", &[("host", "app.local")])).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(field(&body, "host"), format!("api.example.test:{}", upstream.addr.port()));
    let (_, body) =
        text(h1(by_ip).await.send_request(get("/y?q=1", &[("host", "app.local:8080")])).await.unwrap()).await;
    assert_eq!(field(&body, "host"), "app.local:8080");
    assert_eq!(field(&body, "path"), "/y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_reuses_upstream_connections() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("ka", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let mut client = h1(outbound).await;
    for _ in 0..20 {
        client.ready().await.unwrap();
        let (status, _) = text(client.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200);
    }
    // New application connections reuse the pooled upstream connection too.
    for _ in 0..5 {
        let (status, _) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200);
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_are_multiplexed_on_one_upstream_connection() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) = config_dir(&service_with_protocol(
        "mux",
        "http2",
        outbound,
        &endpoint("127.0.0.1", upstream.addr.port(), 0),
        "",
    ));
    let _proxy = start(options(config)).await;
    let client = h2(outbound).await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = get(&format!("http://app/{i}"), &[("x-delay-ms", "200")]);
            text(client.send_request(req).await.unwrap()).await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(field(&body, "path"), format!("/{i}"));
        assert_eq!(field(&body, "version"), "HTTP/2.0");
    }
    assert_eq!(upstream.connections(), 1, "100 concurrent streams over one upstream connection");
}

/// An HTTP/2 endpoint that closes each connection in good order after a request (its GOAWAY,
/// as nginx's after `keepalive_requests`) while that request's response still holds it open.
/// Returns its address and how many connections it has taken.
async fn goaway_after_a_held_request() -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, connections, _) = goaway_after_a_held_request_counting().await;
    (addr, connections)
}

/// The same, also counting the requests it answered.
async fn goaway_after_a_held_request_counting() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, answered) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let answered = answered.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                let mut held = Vec::new();
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    answered.fetch_add(1, Ordering::SeqCst);
                    let hold = request.uri().path() == "/hold";
                    if let Ok(stream) = respond.send_response(http::Response::new(()), !hold) {
                        if hold {
                            held.push(stream);
                            connection.graceful_shutdown();
                        }
                    }
                }
            });
        }
    });
    (addr, connections, requests)
}

/// Requests that come after an endpoint's GOAWAY, on a connection an earlier stream still
/// holds open, go on a new connection: none is answered 503 (the first used to be, the
/// connection being noticed as closing only when a request failed on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_after_an_endpoint_s_goaway_go_on_a_new_connection() {
    let (addr, connections) = goaway_after_a_held_request().await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("closing", "http2", outbound, &endpoint("127.0.0.1", addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let held = h1(outbound).await.send_request(get("/hold", &[("host", "a")])).await.unwrap();
    assert_eq!(held.status(), 200);
    // The GOAWAY reaches the proxy at some point in these; each request must find a connection.
    for i in 0..50 {
        let (status, _) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200, "request {i} after the endpoint's GOAWAY");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(connections.load(Ordering::SeqCst) >= 2, "the requests went on a connection of their own");
    drop(held);
}

/// An HTTP/2 endpoint that allows `max_streams` streams per connection and answers `/hold`
/// only once `held` such requests are open at the same time; it counts its connections.
async fn answers_once_all_are_open(max_streams: u32, held: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let all_open = Arc::new(tokio::sync::Barrier::new(held));
    h2_endpoint(max_streams, move |mut connection| {
        let all_open = all_open.clone();
        async move {
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                let all_open = all_open.clone();
                tokio::spawn(async move {
                    if request.uri().path() == "/hold" {
                        all_open.wait().await;
                    }
                    let _ = respond.send_response(http::Response::new(()), true);
                });
            }
        }
    })
    .await
}

/// An HTTP/2 endpoint allowing `max_streams` streams per connection, each connection served
/// by `serve`; it counts its connections.
async fn h2_endpoint<F, Fut>(max_streams: u32, serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(h2::server::Connection<TcpStream, Bytes>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            tokio::spawn(async move {
                let handshake =
                    h2::server::Builder::new().max_concurrent_streams(max_streams).handshake::<_, Bytes>(socket);
                if let Ok(connection) = handshake.await {
                    serve(connection).await;
                }
            });
        }
    });
    (addr, connections)
}

/// A proxy with one http2 service to `endpoint`, whose stream limit it has learnt: the
/// endpoint's SETTINGS arrive after a connection's first request may have gone, so two go
/// first. Returns the service's outbound address and what keeps the proxy running.
async fn proxy_knowing_the_stream_limit(
    endpoint_addr: SocketAddr,
) -> (SocketAddr, (mesh_egress::server::Server, tempfile::TempDir)) {
    let outbound = free_addr("127.0.0.1");
    let service =
        service_with_protocol("limited", "http2", outbound, &endpoint("127.0.0.1", endpoint_addr.port(), 0), "");
    let (dir, config) = config_dir(&service);
    let proxy = start(options(config)).await;
    for _ in 0..2 {
        let (status, _) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200);
    }
    (outbound, (proxy, dir))
}

/// Requests beyond what an HTTP/2 endpoint allows at once on a connection (its
/// `SETTINGS_MAX_CONCURRENT_STREAMS`) go on another connection to it, as Envoy's pool sends
/// them, rather than wait for a stream on the first: five requests reach an endpoint that
/// allows two streams per connection, all at the same time. They used to wait in turn on one
/// connection, and here, where the endpoint answers once all five are there, time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_an_endpoint_s_stream_limit_go_on_another_connection() {
    let (addr, connections) = answers_once_all_are_open(2, 5).await;
    let (outbound, _proxy) = proxy_knowing_the_stream_limit(addr).await;
    let requests = (0..5).map(|_| async {
        let (status, _) = text(h1(outbound).await.send_request(get("/hold", &[("host", "a")])).await.unwrap()).await;
        status
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert_eq!(statuses, [200; 5], "all five open at the endpoint at once (else each times out: 504)");
    assert!(connections.load(Ordering::SeqCst) >= 3, "two streams per connection: at least three connections");
}

/// What the test tells every connection of [`held_streams_endpoint`] to do.
#[derive(Clone, Copy, Debug)]
enum Command {
    /// End one of its held responses.
    ReleaseOne,
    /// Send GOAWAY (a graceful shutdown), its held responses going on.
    GoAway,
}

/// An HTTP/2 endpoint allowing `max_streams` streams per connection, holding `/hold`
/// responses open after their head until told, and answering the rest at once. It counts its
/// connections.
async fn held_streams_endpoint(
    max_streams: u32,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::sync::broadcast::Sender<Command>) {
    let (commands, _) = tokio::sync::broadcast::channel(16);
    let told = commands.clone();
    let (addr, connections) = h2_endpoint(max_streams, move |mut connection| {
        let mut commands = told.subscribe();
        async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    accepted = connection.accept() => {
                        let Some(Ok((request, mut respond))) = accepted else { return };
                        let hold = request.uri().path() == "/hold";
                        if let Ok(stream) = respond.send_response(http::Response::new(()), !hold) {
                            if hold {
                                held.push(stream);
                            }
                        }
                    }
                    command = commands.recv() => match command {
                        Ok(Command::ReleaseOne) => {
                            if let Some(mut stream) = held.pop() {
                                let _ = stream.send_data(Bytes::new(), true);
                            }
                        }
                        Ok(Command::GoAway) => connection.graceful_shutdown(),
                        Err(_) => return,
                    },
                }
            }
        }
    })
    .await;
    (addr, connections, commands)
}

/// A burst leaves several connections to an HTTP/2 endpoint, each with a stream free; the
/// endpoint then closes them all in good order (GOAWAY, as on a restart). A request handed
/// back unsent by one goes on to the next, and on to a new connection: it is answered. Before,
/// it went on one more connection only, which was closing too: 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_past_every_connection_an_endpoint_is_closing() {
    let (addr, connections, commands) = held_streams_endpoint(2).await;
    let (outbound, _proxy) = proxy_knowing_the_stream_limit(addr).await;
    // Four held responses: two connections of two streams each.
    let mut held = Vec::new();
    for _ in 0..4 {
        let response = h1(outbound).await.send_request(get("/hold", &[("host", "a")])).await.unwrap();
        assert_eq!(response.status(), 200);
        held.push(tokio::spawn(text(response)));
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    // One stream free on each, then both closing.
    commands.send(Command::ReleaseOne).unwrap();
    eventually("one held response ended per connection", Duration::from_secs(10), || async {
        held.iter().filter(|response| response.is_finished()).count() == 2
    })
    .await;
    commands.send(Command::GoAway).unwrap();
    // Time for the GOAWAYs to reach the proxy. A request sent before one arrives is still
    // taken (h2's graceful shutdown takes streams until its second GOAWAY): this can only
    // make the test pass without the change, never fail with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
    assert_eq!(status, 200, "the request found a connection the endpoint is not closing");
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    drop(held);
}

/// RequestMirror copies to an HTTP/2 mirror that closes its connection in good order (GOAWAY)
/// go on a new connection, as requests do: every copy arrives. (A copy h2 hands back unsent
/// is sent again; the window for that is too narrow for this test to hit on purpose.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_copies_after_the_mirror_s_goaway_go_on_a_new_connection() {
    let upstream = http_upstream(None).await;
    let (mirror, _, copies) = goaway_after_a_held_request_counting().await;
    let (outbound, shadow_outbound) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let yaml = [
        service_with_protocol("main", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        service_with_protocol("shadow", "http2", shadow_outbound, &endpoint("127.0.0.1", mirror.port(), 0), ""),
        "type: MeshHTTPRoute\nname: mirror\nmesh: default\nspec:\n  to:\n  - targetRef: {kind: MeshExternalService, name: main}\n    rules:\n    - matches: [{path: {type: PathPrefix, value: /}}]\n      default:\n        filters:\n        - {type: RequestMirror, requestMirror: {backendRef: {kind: MeshExternalService, name: shadow}}}\n".to_string(),
    ]
    .join("---\n");
    let (_dir, config) = config_dir(&yaml);
    let _proxy = start(options(config)).await;
    let (status, _) = text(h1(outbound).await.send_request(get("/hold", &[("host", "a")])).await.unwrap()).await;
    assert_eq!(status, 200);
    eventually("the held copy", Duration::from_secs(10), || async { copies.load(Ordering::SeqCst) == 1 }).await;
    for _ in 0..20 {
        let (status, _) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
        assert_eq!(status, 200);
    }
    eventually("all 21 copies at the mirror", Duration::from_secs(10), || async {
        copies.load(Ordering::SeqCst) == 21
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_an_http_service_is_detected() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) = config_dir(&service_with_protocol(
        "detect",
        "http",
        outbound,
        &endpoint("127.0.0.1", upstream.addr.port(), 0),
        "",
    ));
    let _proxy = start(options(config)).await;
    let (status, body) = text(h2(outbound).await.send_request(get("http://app.local/h2", &[])).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(field(&body, "version"), "HTTP/1.1", "http services speak HTTP/1.1 to the endpoint");
    assert_eq!(field(&body, "host"), "app.local");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_do_not_reach_the_endpoint() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) = config_dir(&service_with_protocol(
        "hop",
        "http",
        outbound,
        &endpoint("127.0.0.1", upstream.addr.port(), 0),
        "",
    ));
    let _proxy = start(options(config)).await;
    let req =
        get("/", &[("host", "a"), ("connection", "x-private"), ("x-private", "secret"), ("te", "trailers, gzip")]);
    let (_, body) = text(h1(outbound).await.send_request(req).await.unwrap()).await;
    assert_eq!(field(&body, "x-private"), "-");
    assert_eq!(field(&body, "te"), "trailers");
    assert_eq!(field(&body, "connection"), "-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_round_trip() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("ws", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await.unwrap_or_else(|head| panic!("{}", String::from_utf8_lossy(&head)));
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    s.write_all(b"frames both ways").await.unwrap();
    let mut echo = [0u8; 16];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"frames both ways");
}

/// A tunnel whose endpoint half-closes first still carries what the application sends after:
/// the endpoint's FIN reaches the application, and the application connection's lingering
/// close (for HTTP answers the proxy ends first) does not apply to a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_endpoint_half_closes_still_carries_the_application_s_bytes() {
    let endpoint_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = endpoint_listener.local_addr().unwrap().port();
    let endpoint_got = tokio::spawn(async move {
        let (mut conn, _) = endpoint_listener.accept().await.unwrap();
        read_head(&mut conn).await.unwrap();
        conn.write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.unwrap();
        got
    });
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("ws", "http", outbound, &endpoint("127.0.0.1", port, 0), ""));
    let _proxy = start(options(config)).await;
    let mut app = TcpStream::connect(outbound).await.unwrap();
    app.write_all(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let head = read_head(&mut app).await.unwrap_or_else(|head| panic!("{}", String::from_utf8_lossy(&head)));
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "the endpoint's half-close reaches the application");
    app.write_all(b"after the endpoint's half-close").await.unwrap();
    app.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), endpoint_got).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "after the endpoint's half-close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_mapping() {
    let upstream = http_upstream(None).await;
    let ca = Ca::new("ca");
    let untrusted = http_upstream(Some(tls_config(&Ca::new("other").server(&["tls.test"])))).await;
    let dead = dead_addr();
    let (up, down, bad_tls, forbid_out) =
        (free_addr("127.0.0.1"), free_addr("127.0.0.1"), free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let tls = format!(
        "  tls:\n    enabled: true\n    verification:\n      serverName: tls.test\n      caCert:\n        inlineString: |\n{}",
        ca.pem.lines().map(|l| format!("          {l}\n")).collect::<String>()
    );
    let yaml = format!(
        "{}---\n{}---\n{}---\ntype: Mesh\nname: locked\nrouting:\n  defaultForbidMeshExternalServiceAccess: true\n---\n{}",
        service_with_protocol("up", "http", up, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""),
        service_with_protocol("down", "http", down, &endpoint("127.0.9.1", dead.port(), 0), ""),
        service_with_protocol("bad-tls", "http", bad_tls, &endpoint("127.0.0.1", untrusted.addr.port(), 0), &tls),
        service_with_protocol("locked", "http", forbid_out, &endpoint("127.0.0.1", upstream.addr.port(), 0), "").replace("mesh: default", "mesh: locked"),
    );
    let (_dir, config) = config_dir(&yaml);
    let mut opts = options(config);
    opts.request_timeout = Some(Duration::from_secs(1));
    let _proxy = start(opts).await;

    let status = |r: http::Response<hyper::body::Incoming>| r.status();
    assert_eq!(status(h1(down).await.send_request(get("/", &[("host", "a")])).await.unwrap()), 503, "endpoint down");
    assert_eq!(status(h1(bad_tls).await.send_request(get("/", &[("host", "a")])).await.unwrap()), 503, "TLS failure");
    assert_eq!(status(h1(forbid_out).await.send_request(get("/", &[("host", "a")])).await.unwrap()), 403, "forbidden");
    let slow = get("/", &[("host", "a"), ("x-delay-ms", "3000")]);
    assert_eq!(status(h1(up).await.send_request(slow).await.unwrap()), 504, "timeout");
    let reset = get("/", &[("host", "a"), ("x-reset", "before")]);
    assert_eq!(status(h1(up).await.send_request(reset).await.unwrap()), 503, "reset before the response");
    assert_eq!(status(h1(up).await.send_request(get("/", &[("host", "a"), ("x-status", "418")])).await.unwrap()), 418);

    // Reset mid-response: the response started, so it is aborted, never passed off as complete.
    let response = h1(up).await.send_request(get("/", &[("host", "a"), ("x-reset", "mid")])).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.into_body().collect().await.is_err(), "the body must fail, not end cleanly");
    let response = h2(up).await.send_request(get("http://a/", &[("x-reset", "mid")])).await.unwrap();
    assert!(response.into_body().collect().await.is_err(), "h2: the stream is reset");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_answer_431() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) = config_dir(&service_with_protocol(
        "lim",
        "http",
        outbound,
        &endpoint("127.0.0.1", upstream.addr.port(), 0),
        "",
    ));
    let _proxy = start(options(config)).await;
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..150 {
        raw.push_str(&format!("x-h{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

async fn grpc_setup(extra_yaml: &str, mesh: &str) -> (GrpcGuard, SocketAddr, SocketAddr) {
    let server = grpc_server(None).await;
    let (live, down) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
    let dead = dead_addr();
    let yaml = format!(
        "{extra_yaml}{}---\n{}",
        service_with_protocol("grpc-live", "grpc", live, &endpoint("127.0.0.1", server.addr.port(), 0), "")
            .replace("mesh: default", &format!("mesh: {mesh}")),
        service_with_protocol("grpc-down", "grpc", down, &endpoint("127.0.9.1", dead.port(), 0), ""),
    );
    let (dir, config) = config_dir(&yaml);
    let proxy = start(options(config)).await;
    (GrpcGuard(server, proxy, dir), live, down)
}

/// Keeps the upstream, the proxy and its configuration alive for the test.
#[allow(dead_code)]
struct GrpcGuard(grpc::GrpcServer, mesh_egress::server::Server, tempfile::TempDir);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_all_four_call_kinds_deadlines_and_errors() {
    use futures_util::StreamExt;
    let (_guard, live, down) = grpc_setup("", "default").await;
    let mut client = grpc::client(live).await;

    client.ready().await.unwrap();
    let reply = client.unary(tonic::Request::new(Bytes::from("hi")), grpc::path("Unary"), RawCodec).await.unwrap();
    assert_eq!(reply.into_inner(), "hi");

    client.ready().await.unwrap();
    let stream = client
        .server_streaming(tonic::Request::new(Bytes::from("3")), grpc::path("ServerStream"), RawCodec)
        .await
        .unwrap();
    let items: Vec<Bytes> = stream.into_inner().map(|m| m.unwrap()).collect().await;
    assert_eq!(items, ["msg-0", "msg-1", "msg-2"]);

    client.ready().await.unwrap();
    let outgoing = futures_util::stream::iter((0..5).map(|i| Bytes::from(format!("{i}"))));
    let reply =
        client.client_streaming(tonic::Request::new(outgoing), grpc::path("ClientStream"), RawCodec).await.unwrap();
    assert_eq!(reply.into_inner(), "got 5");

    client.ready().await.unwrap();
    let outgoing = futures_util::stream::iter(["a", "b", "c"].map(|s: &'static str| Bytes::from_static(s.as_bytes())));
    let replies = client.streaming(tonic::Request::new(outgoing), grpc::path("Bidi"), RawCodec).await.unwrap();
    let items: Vec<Bytes> = replies.into_inner().map(|m| m.unwrap()).collect().await;
    assert_eq!(items, ["a", "b", "c"]);

    // grpc-timeout is honoured: the proxy answers DEADLINE_EXCEEDED. (A raw h2 request: tonic's
    // client would enforce the deadline itself and hide the proxy's answer.)
    let mut message = vec![0u8, 0, 0, 0, 10];
    message.extend_from_slice(b"sleep:3000");
    let request = Request::post("http://app/test.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(Full::new(Bytes::from(message)))
        .unwrap();
    let response = h2(live).await.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "4", "{:?}", response.headers());

    // A deadline passing mid-stream ends the response with trailers grpc-status 4.
    let mut message = vec![0u8, 0, 0, 0, 7];
    message.extend_from_slice(b"slow:20");
    let request = Request::post("http://app/test.Echo/ServerStream")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "700m")
        .body(Full::new(Bytes::from(message)))
        .unwrap();
    let response = h2(live).await.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(!response.headers().contains_key("grpc-status"), "the stream started: not trailers-only");
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers end the stream");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    assert!(!collected.to_bytes().is_empty(), "the messages before the deadline came through");

    // Endpoint down: UNAVAILABLE, with HTTP 200 and grpc-status.
    let mut client = grpc::client(down).await;
    client.ready().await.unwrap();
    let status = client.unary(tonic::Request::new(Bytes::from("x")), grpc::path("Unary"), RawCodec).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_forbidden_is_permission_denied() {
    let mesh = "type: Mesh\nname: locked\nrouting:\n  defaultForbidMeshExternalServiceAccess: true\n---\n";
    let (_guard, live, _) = grpc_setup(mesh, "locked").await;
    let mut client = grpc::client(live).await;
    client.ready().await.unwrap();
    let status = client.unary(tonic::Request::new(Bytes::from("x")), grpc::path("Unary"), RawCodec).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_and_chunked_upload() {
    let upstream = http_upstream(None).await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("up", "http", outbound, &endpoint("127.0.0.1", upstream.addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").await.unwrap();
    // The head and the body may come in separate reads: read until the body's end (or 10 s).
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        while !response.ends_with(b"received: 11\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("received: 11\n"), "{response}");
}

/// An HTTP/1.1 endpoint written byte by byte: each path answers with one response framing (or a
/// broken one), keeping the connection unless the response says otherwise. Counts connections.
async fn framing_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                loop {
                    let Ok(head) = read_head(&mut tcp).await else { return };
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (reply, close): (&[u8], bool) = match path.as_str() {
                        "/length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nlength", false),
                        "/?q=1" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nquery", false),
                        "/chunked" => (
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nchunk\r\n3;x=y\r\ned!\r\n0\r\nx-trailer: t\r\n\r\n",
                            false,
                        ),
                        "/early-hints" => (
                            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
                            false,
                        ),
                        "/head" => (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", false),
                        "/no-content" => (b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n", false),
                        "/reason" => (b"HTTP/1.1 200 Fine Thanks\r\ncontent-length: 0\r\n\r\n", false),
                        "/close" => (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nclose", true),
                        "/http10" => (b"HTTP/1.0 200 OK\r\n\r\nuntil close", true),
                        "/extra" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled", false),
                        "/bad-length" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok", true),
                        // A header folded over two lines (obs-fold, RFC 9112 §5.2).
                        "/obs-fold" => (b"HTTP/1.1 200 OK\r\nx-folded: one\r\n two\r\ncontent-length: 2\r\n\r\nok", false),
                        "/bad-chunk" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabcdeXY", true),
                        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", false),
                    };
                    if tcp.write_all(reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

/// Sends a request on a kept-alive connection: the status, headers and body (or the body's error).
async fn call(client: &mut Sender1, method: &str, path: &str) -> (u16, http::HeaderMap, Result<String, String>) {
    client.ready().await.unwrap();
    let request =
        Request::builder().method(method).uri(path).header("host", "framing").body(Full::new(Bytes::new())).unwrap();
    let response = match client.send_request(request).await {
        Ok(r) => r,
        Err(e) => panic!("{method} {path}: {e:?}"),
    };
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let body = response.into_body().collect().await.map(|b| b.to_bytes());
    (status, headers, body.map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| e.to_string()))
}

/// The HTTP/1 client reads every response framing as RFC 9112 says, and reuses a connection
/// only when its response ended exactly where the framing said and the endpoint keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_responses_of_every_framing_and_when_connections_are_reused() {
    use std::sync::atomic::Ordering;
    let (upstream, connections) = framing_upstream().await;
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("framing", "http", outbound, &endpoint("127.0.0.1", upstream.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let mut client = h1(outbound).await;
    let used = || connections.load(Ordering::SeqCst);

    let cases: [(&str, &str, u16, &str, usize); 10] = [
        ("GET", "/length", 200, "length", 1),
        // An absolute-form target with no path goes out in origin form: `/?q=1`.
        ("GET", "http://framing?q=1", 200, "query", 1),
        ("GET", "/chunked", 200, "chunked!", 1),
        ("GET", "/early-hints", 200, "final", 1),
        ("HEAD", "/head", 200, "", 1),
        ("GET", "/no-content", 204, "", 1),
        ("GET", "/length", 200, "length", 1),
        // The endpoint closes after these: the next request needs a new connection.
        ("GET", "/close", 200, "close", 1),
        ("GET", "/http10", 200, "until close", 2),
        ("GET", "/length", 200, "length", 3),
    ];
    for (method, path, status, body, connections) in cases {
        let (got, headers, text) = call(&mut client, method, path).await;
        assert_eq!((got, text.as_deref()), (status, Ok(body)), "{method} {path}");
        assert_eq!(used(), connections, "connections after {method} {path}");
        if path == "/head" {
            assert_eq!(headers["content-length"], "100", "a HEAD response keeps its Content-Length");
        }
    }

    // Bytes after the end of a response are never read as the next response.
    let (status, _, body) = call(&mut client, "GET", "/extra").await;
    assert_eq!((status, body.as_deref()), (200, Ok("ok")));
    let (status, _, body) = call(&mut client, "GET", "/length").await;
    assert_eq!((status, body.as_deref()), (200, Ok("length")), "not the smuggled response");
    assert_eq!(used(), 4, "the connection with stray bytes was dropped");

    // Malformed framing: no response (502, as Envoy's UPE), or an aborted body; never a reused
    // connection.
    let (status, _, body) = call(&mut client, "GET", "/bad-length").await;
    assert_eq!(status, 502, "differing Content-Length values");
    assert_eq!(
        body.as_deref(),
        Ok("upstream connect error or disconnect/reset before headers. reset reason: protocol error")
    );
    // A folded header is unfolded (RFC 9112 §5.2; Envoy does the same), through our own client
    // (a request without a body) and hyper's (with one). Before: 503.
    let (status, headers, body) = call(&mut client, "GET", "/obs-fold").await;
    assert_eq!((status, body.as_deref()), (200, Ok("ok")), "obs-fold, own client");
    assert_eq!(headers["x-folded"], "one two");
    client.ready().await.unwrap();
    let post = Request::post("/obs-fold").header("host", "framing").body(Full::new(Bytes::from_static(b"x"))).unwrap();
    let response = client.send_request(post).await.unwrap();
    assert_eq!(response.headers()["x-folded"], "one two", "obs-fold, hyper's client");
    assert_eq!(text(response).await, (http::StatusCode::OK, "ok".to_string()));
    // The proxy may not have written the head yet when the body breaks: then the application
    // connection just closes. Either way nothing passes for a complete response.
    let request = get("/bad-chunk", &[("host", "framing")]);
    client.ready().await.unwrap();
    if let Ok(response) = client.send_request(request).await {
        assert!(response.into_body().collect().await.is_err(), "a broken chunked body fails");
    }
    let mut client = h1(outbound).await;
    let (status, _) = text(client.send_request(get("/length", &[("host", "framing")])).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(used(), 6, "each broken response's connection was dropped (a folded header's one is kept)");

    // A reason phrase that is not the status code's usual one passes through, as with hyper.
    let mut raw = TcpStream::connect(outbound).await.unwrap();
    raw.write_all(b"GET /reason HTTP/1.1\r\nhost: framing\r\n\r\n").await.unwrap();
    let mut head = vec![0u8; 64];
    let n = raw.read(&mut head).await.unwrap();
    assert!(
        String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 200 Fine Thanks\r\n"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
}

/// An endpoint's response framed by both Transfer-Encoding: chunked and a Content-Length is read
/// chunked, and reaches the application whole: the Content-Length, which does not frame it
/// (RFC 9112 §6.3), is not passed on (the application got its first 5 bytes as the whole body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_a_content_length_reaches_the_application_whole() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut stream).await.is_ok() {
                    let body = "x".repeat(100);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n64\r\n{body}\r\n0\r\n\r\n"
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
            });
        }
    });
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("both", "http", outbound, &endpoint("127.0.0.1", addr.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let (status, body) = text(h1(outbound).await.send_request(get("/", &[("host", "a")])).await.unwrap()).await;
    assert_eq!((status.as_u16(), body.len()), (200, 100));
}

/// A pooled connection the endpoint closes as a request arrives on it (a keep-alive timeout
/// shorter than a second, or a close right after its last answer without `Connection: close`):
/// an idempotent request without a body goes again on a new connection, however short the
/// connection sat idle; a POST does not (the endpoint may have acted on it) and gets 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_reused_connection_closes_under_is_resent_when_idempotent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            // Answers the first request of each connection, closes when the second arrives.
            tokio::spawn(async move {
                if read_head(&mut s).await.is_ok() {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    let _ = read_head(&mut s).await;
                }
            });
        }
    });
    let outbound = free_addr("127.0.0.1");
    let (_dir, config) =
        config_dir(&service_with_protocol("s", "http", outbound, &endpoint("127.0.0.1", upstream.port(), 0), ""));
    let _proxy = start(options(config)).await;
    let status = |method: &'static str| async move {
        let mut app = TcpStream::connect(outbound).await.unwrap();
        let request = format!("{method} / HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        app.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = app.read_to_end(&mut response).await;
        String::from_utf8_lossy(&response).lines().next().unwrap_or_default().to_string()
    };
    assert_eq!(status("GET").await, "HTTP/1.1 200 OK");
    // At once: the pooled connection closes under each of these.
    for method in ["GET", "PUT", "DELETE"] {
        assert_eq!(status(method).await, "HTTP/1.1 200 OK", "{method} was not sent again");
    }
    assert_eq!(status("POST").await, "HTTP/1.1 503 Service Unavailable");
}
