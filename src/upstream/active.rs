//! Active health checks (MeshHealthCheck): every interval, each address of the service is
//! checked on a connection of its own (over TLS when the service originates TLS); after
//! `unhealthyThreshold` failures in a row (or one answer that says no, as Envoy) it gets no new
//! traffic, after `healthyThreshold` successes it gets traffic again. The task runs on the control runtime, off the data-path
//! workers.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Target, Upstream, UpstreamIo, UpstreamStream};
use crate::grpc_wire;
use crate::metrics::HealthCheckResult;
use crate::policy::runtime::{Check, HealthCheck};
use crate::tls;

/// Runs until the upstream is gone or its policy has another (or no) health check.
pub(super) async fn run(upstream: Weak<Upstream>, check: Arc<HealthCheck>) {
    let mut first = true;
    let kept: Kept = Arc::default();
    loop {
        let wait = {
            let Some(up) = upstream.upgrade() else { return };
            // A reload replaced or removed this check: its own task runs now.
            if !up.policy().health_check.as_ref().is_some_and(|c| Arc::ptr_eq(c, &check)) {
                return;
            }
            next_wait(&check, first, up.had_traffic())
        };
        first = false;
        tokio::time::sleep(wait).await;
        let Some(up) = upstream.upgrade() else { return };
        let targets = up.targets();
        let mut round = tokio::task::JoinSet::new();
        for target in targets.iter() {
            let target = target.clone();
            let (up, check, kept) = (up.clone(), check.clone(), kept.clone());
            round.spawn(async move {
                let reuse = check.reuse_connection.then_some(&kept);
                let result = tokio::time::timeout(check.timeout, probe(&up, &target, &check.check, reuse)).await;
                let result =
                    result.unwrap_or_else(|_| Err(Failed::Network(format!("no answer within {:?}", check.timeout))));
                record(&up, &target, &check, result).await;
            });
        }
        drop(up);
        while round.join_next().await.is_some() {}
    }
}

/// The interval (or the no-traffic interval while the service never had traffic) plus jitter;
/// the first check waits only the initial jitter.
fn next_wait(check: &HealthCheck, first: bool, had_traffic: bool) -> Duration {
    let mut rng = rand::rng();
    let random = |rng: &mut rand::rngs::ThreadRng, max: Duration| {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { rng.random_range(0..=nanos) })
    };
    if first {
        return random(&mut rng, check.initial_jitter);
    }
    let base = if had_traffic { check.interval } else { check.no_traffic_interval };
    let percent = base.mul_f64(f64::from(check.interval_jitter_percent) / 100.0);
    base + random(&mut rng, check.interval_jitter) + random(&mut rng, percent)
}

/// Why a check failed, as Envoy tells them apart.
#[derive(Debug)]
enum Failed {
    /// The endpoint could not be asked: no connection, a reset, no answer in time. Counted
    /// toward `unhealthyThreshold`.
    Network(String),
    /// The endpoint answered no (an unexpected HTTP status, a gRPC status other than SERVING):
    /// unhealthy at once (Envoy's ACTIVE failure ignores the threshold).
    Answered(String),
}

impl From<String> for Failed {
    fn from(reason: String) -> Self {
        Self::Network(reason)
    }
}

impl Failed {
    fn reason(self) -> String {
        match self {
            Self::Network(reason) | Self::Answered(reason) => reason,
        }
    }
}

/// Applies one result to the address's state and tells the metrics and the event log.
async fn record(up: &Upstream, target: &Target, check: &HealthCheck, result: Result<(), Failed>) {
    let health = &target.health;
    let event = match &result {
        // Counted once the state has changed: whoever sees the count finds the endpoint as
        // the check left it.
        Ok(()) => {
            health.checks.failures.store(0, Relaxed);
            let successes = health.checks.successes.fetch_add(1, Relaxed) + 1;
            let turned = successes >= check.healthy_threshold && health.checks.unhealthy.swap(false, Relaxed);
            up.metrics.health_check(HealthCheckResult::Success);
            turned.then_some("healthy")
        }
        Err(failed) => {
            health.checks.successes.store(0, Relaxed);
            let failures = health.checks.failures.fetch_add(1, Relaxed) + 1;
            let at_once = matches!(failed, Failed::Answered(_));
            let turned =
                (at_once || failures >= check.unhealthy_threshold) && !health.checks.unhealthy.swap(true, Relaxed);
            up.metrics.health_check(HealthCheckResult::Failure);
            if turned {
                Some("unhealthy")
            } else {
                check.always_log_failures.then_some("failure")
            }
        }
    };
    let Some(event) = event else { return };
    let reason = result.err().map(Failed::reason).unwrap_or_default();
    match event {
        "healthy" => {
            tracing::info!(service = %up.service(), target = %target.addr, "health check passes again; endpoint back in traffic")
        }
        _ => tracing::warn!(service = %up.service(), target = %target.addr, %reason, "health check failed ({event})"),
    }
    if let Some(path) = &check.event_log_path {
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "service": &**up.service(),
            "endpoint": target.addr.to_string(),
            "event": event,
            "reason": reason,
        });
        let appended = async {
            let mut file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
            file.write_all(format!("{line}\n").as_bytes()).await
        };
        if let Err(error) = appended.await {
            tracing::warn!(path = %path.display(), %error, "cannot write the health check event log");
        }
    }
}

/// HTTP/gRPC check connections kept between rounds (`reuseConnection`), per [`kept_key`].
type Kept = Arc<std::sync::Mutex<std::collections::HashMap<KeptKey, Client>>>;

/// A target's endpoint and address: two DNS endpoints that resolve to one address (a CDN)
/// each keep a connection of their own, made (SNI, certificate check) for their own name, as
/// the data path's pool keys do.
type KeptKey = (usize, super::TargetAddr);

pub(super) fn kept_key(target: &Target) -> KeptKey {
    (target.endpoint, target.addr.clone())
}

/// A check's client connection.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A new connection to the address, over the service's TLS when it originates TLS.
async fn open(up: &Upstream, target: &Target) -> Result<UpstreamIo, String> {
    let stream = UpstreamStream::connect(&target.addr).await.map_err(|e| format!("connect: {e}"))?;
    let policy = up.policy_arc();
    Ok(match &policy.tls {
        None => UpstreamIo::Plain(stream),
        Some((tls_policy, config)) => {
            let name = tls::server_name(tls_policy, up.hostname(target), &target.addr);
            UpstreamIo::Tls(Box::new(tls::connect(config, name, stream).await.map_err(|e| format!("TLS: {e}"))?))
        }
    })
}

/// The most of an HTTP check's answer read before its connection is dropped instead of kept:
/// only its status counts.
const MAX_HTTP_BODY: usize = 64 * 1024;

/// One check of one address.
async fn probe(up: &Upstream, target: &Target, check: &Check, kept: Option<&Kept>) -> Result<(), Failed> {
    let authority = up.hostname(target).map_or_else(|| target.addr.to_string(), str::to_string);
    // A kept connection (taken out while in use) or a new one.
    let reused = kept.and_then(|k| k.lock().ok()?.remove(&kept_key(target)));
    let client = |http2: bool| async move {
        match reused {
            Some(Client::H1(mut s)) if !http2 => {
                if s.ready().await.is_ok() {
                    return Ok(Client::H1(s));
                }
                handshake(open(up, target).await?, false).await
            }
            Some(Client::H2(s)) if http2 && !s.is_closed() => Ok(Client::H2(s)),
            _ => handshake(open(up, target).await?, http2).await,
        }
    };
    let give_back = |client: Client| {
        if let Some(k) = kept {
            if let Ok(mut map) = k.lock() {
                map.insert(kept_key(target), client);
            }
        }
    };
    match check {
        Check::Tcp { send, receive } => Ok(tcp(&mut open(up, target).await?, send.as_deref(), receive).await?),
        Check::Http { path, http2, set, add, expected } => {
            let mut request =
                Request::get(format!("http://{authority}{path}").parse::<Uri>().map_err(|e| e.to_string())?);
            request = request.header(http::header::USER_AGENT, "mesh-egress/HC");
            for (name, value) in set {
                request = request.header(name.as_str(), value.as_str());
            }
            for (name, value) in add {
                for value in value.split(',') {
                    request = request.header(name.as_str(), value.trim());
                }
            }
            let request = request.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
            let mut client = client(*http2).await?;
            let response = send(&mut client, request).await?;
            let status = response.status().as_u16();
            // The body is read so that the connection can serve the next check, up to a bound:
            // past it the connection is dropped (closed, or the stream reset) rather than the
            // endpoint's bytes held (it could send them as fast as the check's timeout allows).
            match Limited::new(response.into_body(), MAX_HTTP_BODY).collect().await {
                Ok(_) => give_back(client),
                Err(error) if error.is::<LengthLimitError>() => {}
                Err(error) => return Err(Failed::Network(format!("body: {error}"))),
            }
            if expected.contains(&status) {
                Ok(())
            } else {
                Err(Failed::Answered(format!("status {status}, expected one of {expected:?}")))
            }
        }
        Check::Grpc { service_name, authority: configured } => {
            let authority = configured.clone().unwrap_or(authority);
            // HealthCheckRequest { string service = 1; }
            let mut message = Vec::new();
            if !service_name.is_empty() {
                grpc_wire::put_bytes(&mut message, 1, service_name.as_bytes());
            }
            let request = grpc_wire::unary_request(&authority, "/grpc.health.v1.Health/Check", &message)?;
            let mut client = client(true).await?;
            let response = send(&mut client, request).await?;
            let body = grpc_wire::unary_response(response).await;
            give_back(client);
            let body = body.map_err(|e| match e {
                grpc_wire::UnaryError::Body(_) => Failed::Network(e.to_string()),
                grpc_wire::UnaryError::Status(_) | grpc_wire::UnaryError::TooLarge => Failed::Answered(e.to_string()),
            })?;
            match serving_status(body) {
                Some(1) => Ok(()),
                other => Err(Failed::Answered(format!("health status {other:?}, not SERVING"))),
            }
        }
    }
}

async fn handshake(io: UpstreamIo, http2: bool) -> Result<Client, String> {
    let io = TokioIo::new(io);
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(connection);
        return Ok(Client::H2(sender));
    }
    let (sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP/1 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(Client::H1(sender))
}

async fn send(
    client: &mut Client,
    request: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String> {
    match client {
        Client::H2(sender) => sender.send_request(request).await.map_err(|e| e.to_string()),
        Client::H1(sender) => {
            // HTTP/1 wants the origin form and a Host header (HTTP/2 takes `:authority` from the URI).
            let mut request = request;
            if let Some(authority) = request.uri().authority().map(|a| a.to_string()) {
                let path = request
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .parse::<Uri>()
                    .map_err(|e| e.to_string())?;
                *request.uri_mut() = path;
                let host = http::HeaderValue::from_str(&authority).map_err(|e| e.to_string())?;
                request.headers_mut().entry(http::header::HOST).or_insert(host);
            }
            sender.send_request(request).await.map_err(|e| e.to_string())
        }
    }
}

/// Sends `send`, then reads until every `receive` block was seen, in order (Envoy's fuzzy match).
async fn tcp(io: &mut UpstreamIo, send: Option<&[u8]>, receive: &[Vec<u8>]) -> Result<(), String> {
    if let Some(payload) = send {
        io.write_all(payload).await.map_err(|e| format!("send: {e}"))?;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut next = 0;
    while next < receive.len() {
        let n = io.read(&mut buf).await.map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err(format!("closed before {:?} arrived", String::from_utf8_lossy(&receive[next])));
        }
        seen.extend_from_slice(&buf[..n]);
        while let Some(at) = find(&seen, &receive[next]) {
            seen.drain(..at + receive[next].len());
            next += 1;
            if next == receive.len() {
                break;
            }
        }
        if seen.len() > 1 << 20 {
            return Err("more than 1 MiB without the expected answer".into());
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HealthCheckResponse.status` (field 1, an enum) of the first message of a gRPC body.
fn serving_status(mut body: Bytes) -> Option<u64> {
    if body.remaining() < 5 {
        return None;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    let mut message = body.get(..len)?;
    while !message.is_empty() {
        let key = varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, 0) => return varint(&mut message),
            (_, 0) => {
                varint(&mut message)?;
            }
            (_, 2) => {
                let n = varint(&mut message)? as usize;
                message = message.get(n..)?;
            }
            _ => return None,
        }
    }
    Some(0) // the default value, UNKNOWN, is not encoded
}

fn varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_health_answers_are_read() {
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 1])), Some(1));
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 2])), Some(2));
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Some(0));
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 9, 0x08])), None);
    }

    #[test]
    fn tcp_blocks_match_in_order() {
        assert_eq!(find(b"hello world", b"world"), Some(6));
        assert_eq!(find(b"abc", b"x"), None);
    }
}
