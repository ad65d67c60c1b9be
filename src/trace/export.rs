//! Span exporters, one thread per destination (shared by every service that traces there and
//! kept while a configuration uses it): OTLP/gRPC `TraceService/Export`, or a Zipkin
//! collector's v2 API (`httpJson` or `httpProto`). The data path only queues finished spans;
//! a full queue drops them (counted).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::json;

use super::Finished;
use crate::access_log::sink::unix_nanos;
use crate::grpc_wire::{self, put_bytes, put_fixed64, put_varint};
use crate::metrics::metrics;
use crate::policy::trace::{TraceTarget, ZipkinTarget};

/// Spans queued per destination before new ones are dropped.
const QUEUE: usize = 8192;
/// Spans per export request, and the longest a span waits for its batch.
const BATCH: usize = 512;
const LINGER: Duration = Duration::from_millis(200);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(super) struct Exporter {
    sender: SyncSender<Finished>,
    backend: &'static str,
}

impl Exporter {
    /// The running exporter for `target`, or a new one.
    pub(super) fn get(target: &TraceTarget) -> std::io::Result<Arc<Self>> {
        static EXPORTERS: OnceLock<Mutex<HashMap<TraceTarget, Weak<Exporter>>>> = OnceLock::new();
        let mut running =
            EXPORTERS.get_or_init(Default::default).lock().map_err(|_| std::io::Error::other("poisoned"))?;
        if let Some(exporter) = running.get(target).and_then(Weak::upgrade) {
            return Ok(exporter);
        }
        let (sender, receiver) = sync_channel(QUEUE);
        let backend = match target {
            TraceTarget::Otlp(_) => "otlp",
            TraceTarget::Zipkin(_) => "zipkin",
        };
        let thread = std::thread::Builder::new().name(format!("trace-{backend}"));
        let client = match target.clone() {
            TraceTarget::Otlp(endpoint) => Client::Otlp(grpc_wire::GrpcClient::new(endpoint)),
            TraceTarget::Zipkin(target) => Client::Zipkin(ZipkinClient { target, sender: None }),
        };
        thread.spawn(move || run(receiver, backend, client))?;
        let exporter = Arc::new(Self { sender, backend });
        running.retain(|_, e| e.strong_count() > 0);
        running.insert(target.clone(), Arc::downgrade(&exporter));
        Ok(exporter)
    }

    pub(super) fn send(&self, span: Finished) {
        if let Err(TrySendError::Full(_)) = self.sender.try_send(span) {
            metrics().spans(self.backend, "dropped", 1);
        }
    }
}

/// Where an exporter thread sends its batches.
enum Client {
    Otlp(grpc_wire::GrpcClient),
    Zipkin(ZipkinClient),
}

impl Client {
    async fn export(&mut self, batch: &[Finished]) -> Result<(), String> {
        match self {
            Self::Otlp(client) => {
                let path = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
                client.unary(path, &otlp_request(batch)).await.map(drop)
            }
            Self::Zipkin(client) => client.post(batch).await,
        }
    }
}

/// Batches spans and exports each batch; ends when every sender is gone.
fn run(receiver: Receiver<Finished>, backend: &'static str, mut client: Client) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => return tracing::error!(%error, "no runtime for the MeshTrace exporter"),
    };
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + LINGER;
        while batch.len() < BATCH {
            match receiver.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let count = batch.len() as u64;
        match runtime.block_on(async { tokio::time::timeout(EXPORT_TIMEOUT, client.export(&batch)).await }) {
            Ok(Ok(())) => metrics().spans(backend, "exported", count),
            Ok(Err(error)) => {
                tracing::warn!(backend, %error, spans = count, "MeshTrace export failed; spans dropped");
                metrics().spans(backend, "failed", count);
            }
            Err(_) => {
                tracing::warn!(backend, spans = count, "MeshTrace export timed out; spans dropped");
                metrics().spans(backend, "failed", count);
            }
        }
    }
}

// ---------- OTLP (opentelemetry/proto/collector/trace/v1) ----------

/// `SpanKind.SPAN_KIND_CLIENT`, `Status.STATUS_CODE_ERROR`.
const OTLP_CLIENT: u64 = 3;
const OTLP_ERROR: u64 = 2;

fn put_uint(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, u64::from(field << 3));
    put_varint(out, value);
}

/// `ExportTraceServiceRequest { resource_spans = 1 { resource = 1, scope_spans = 2 { scope = 1,
/// spans = 2 } } }`: one ResourceSpans per service name in the batch.
fn otlp_request(batch: &[Finished]) -> Vec<u8> {
    let mut request = Vec::new();
    let mut resources: Vec<&Arc<str>> = batch.iter().map(|s| &s.resource).collect();
    resources.sort();
    resources.dedup();
    for resource_name in resources {
        let mut scope_spans = Vec::new();
        let mut scope = Vec::new();
        put_bytes(&mut scope, 1, b"mesh-egress");
        put_bytes(&mut scope_spans, 1, &scope);
        for span in batch.iter().filter(|s| &s.resource == resource_name) {
            put_bytes(&mut scope_spans, 2, &otlp_span(span));
        }
        let mut resource = Vec::new();
        put_bytes(&mut resource, 1, &grpc_wire::key_value("service.name", resource_name));
        let mut resource_spans = Vec::new();
        put_bytes(&mut resource_spans, 1, &resource);
        put_bytes(&mut resource_spans, 2, &scope_spans);
        put_bytes(&mut request, 1, &resource_spans);
    }
    request
}

fn otlp_span(span: &Finished) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, 1, &span.span.trace_id.to_be_bytes());
    put_bytes(&mut out, 2, &span.span.span_id.to_be_bytes());
    if let Some(state) = &span.span.trace_state {
        put_bytes(&mut out, 3, state.as_bytes());
    }
    if let Some(parent) = span.span.parent_span_id {
        put_bytes(&mut out, 4, &parent.to_be_bytes());
    }
    put_bytes(&mut out, 5, span.span.name.as_bytes());
    put_uint(&mut out, 6, OTLP_CLIENT);
    put_fixed64(&mut out, 7, unix_nanos(span.span.start));
    put_fixed64(&mut out, 8, unix_nanos(span.end));
    for (key, value) in &span.span.attributes {
        put_bytes(&mut out, 9, &grpc_wire::key_value(key, value));
    }
    if span.error {
        let mut status = Vec::new();
        put_uint(&mut status, 3, OTLP_ERROR);
        put_bytes(&mut out, 15, &status);
    }
    out
}

// ---------- Zipkin v2 ----------

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct ZipkinClient {
    target: ZipkinTarget,
    sender: Option<H1>,
}

impl ZipkinClient {
    async fn post(&mut self, batch: &[Finished]) -> Result<(), String> {
        let result = self.try_post(batch).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_post(&mut self, batch: &[Finished]) -> Result<(), String> {
        let (body, content_type) = if self.target.proto {
            (zipkin_proto(batch), "application/x-protobuf")
        } else {
            (zipkin_json(batch), "application/json")
        };
        let sender = match &mut self.sender {
            Some(sender) if !sender.is_closed() => sender,
            slot => slot.insert(connect(&self.target).await?),
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let request = http::Request::post(self.target.path.as_str())
            .header(http::header::HOST, self.target.authority.as_str())
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let _ = response.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

async fn connect(target: &ZipkinTarget) -> Result<H1, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), crate::socket_mark::connect_host(target.address.as_str()))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect to {}: {e}", target.address))?;
    let _ = tcp.set_nodelay(true);
    if !target.tls {
        return handshake(tcp).await;
    }
    let roots = crate::tls::roots::SystemRoots::from_env().get()?;
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let host = target.authority.rsplit_once(':').map_or(target.authority.as_str(), |(h, _)| h);
    let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {}: {e}", target.authority))?;
    handshake(tls).await
}

async fn handshake<S>(io: S) -> Result<H1, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn trace_id_hex(span: &Finished) -> String {
    if span.span.narrow {
        format!("{:016x}", span.span.trace_id as u64)
    } else {
        format!("{:032x}", span.span.trace_id)
    }
}

/// Zipkin's v2 JSON: an array of spans.
fn zipkin_json(batch: &[Finished]) -> Vec<u8> {
    let spans: Vec<serde_json::Value> = batch
        .iter()
        .map(|span| {
            let tags: serde_json::Map<String, serde_json::Value> =
                span.span.attributes.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
            let mut value = json!({
                "traceId": trace_id_hex(span),
                "id": format!("{:016x}", span.span.span_id),
                "kind": "CLIENT",
                "name": span.span.name,
                "timestamp": micros(span.span.start),
                "duration": micros(span.end).saturating_sub(micros(span.span.start)).max(1),
                "localEndpoint": {"serviceName": &*span.resource},
                "tags": tags,
            });
            if let (Some(parent), Some(object)) = (span.span.parent_span_id, value.as_object_mut()) {
                object.insert("parentId".into(), json!(format!("{parent:016x}")));
            }
            value
        })
        .collect();
    serde_json::to_vec(&spans).unwrap_or_default()
}

/// Zipkin's `zipkin.proto3` `ListOfSpans { spans = 1 }`.
fn zipkin_proto(batch: &[Finished]) -> Vec<u8> {
    let mut list = Vec::new();
    for span in batch {
        let mut out = Vec::new();
        if span.span.narrow {
            put_bytes(&mut out, 1, &(span.span.trace_id as u64).to_be_bytes());
        } else {
            put_bytes(&mut out, 1, &span.span.trace_id.to_be_bytes());
        }
        if let Some(parent) = span.span.parent_span_id {
            put_bytes(&mut out, 2, &parent.to_be_bytes());
        }
        put_bytes(&mut out, 3, &span.span.span_id.to_be_bytes());
        put_uint(&mut out, 4, 1); // Kind.CLIENT
        put_bytes(&mut out, 5, span.span.name.as_bytes());
        put_fixed64(&mut out, 6, micros(span.span.start));
        put_uint(&mut out, 7, micros(span.end).saturating_sub(micros(span.span.start)).max(1));
        let mut endpoint = Vec::new();
        put_bytes(&mut endpoint, 1, span.resource.as_bytes());
        put_bytes(&mut out, 8, &endpoint);
        for (key, value) in &span.span.attributes {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, key.as_bytes());
            put_bytes(&mut entry, 2, value.as_bytes());
            put_bytes(&mut out, 11, &entry);
        }
        put_bytes(&mut list, 1, &out);
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn span(parent: Option<u64>, narrow: bool) -> Finished {
        let start = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_000);
        Finished {
            resource: "web".into(),
            span: crate::trace::Span {
                trace_id: 0xab,
                narrow,
                span_id: 0xcd,
                parent_span_id: parent,
                trace_state: None,
                name: "egress httpbin:80".into(),
                start,
                attributes: vec![(Cow::Borrowed("http.method"), "GET".into())],
            },
            end: start + Duration::from_micros(1500),
            error: false,
        }
    }

    #[test]
    fn zipkin_json_has_v2_fields() {
        let body: serde_json::Value = serde_json::from_slice(&zipkin_json(&[span(Some(0xef), true)])).unwrap();
        let s = &body[0];
        assert_eq!(s["traceId"], "00000000000000ab");
        assert_eq!(s["id"], "00000000000000cd");
        assert_eq!(s["parentId"], "00000000000000ef");
        assert_eq!(s["kind"], "CLIENT");
        assert_eq!(s["timestamp"], 1_700_000_000_000_000u64);
        assert_eq!(s["duration"], 1500);
        assert_eq!(s["localEndpoint"]["serviceName"], "web");
        assert_eq!(s["tags"]["http.method"], "GET");
        let root: serde_json::Value = serde_json::from_slice(&zipkin_json(&[span(None, false)])).unwrap();
        assert!(root[0].get("parentId").is_none());
        assert_eq!(root[0]["traceId"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn zipkin_proto_is_a_list_of_spans() {
        let bytes = zipkin_proto(&[span(Some(0xef), true)]);
        // ListOfSpans.spans (field 1), then Span.trace_id (field 1): 8 bytes for a 64-bit id.
        assert_eq!(bytes[0], 0x0a);
        let span = &bytes[2..];
        assert_eq!(&span[..2], &[0x0a, 8]);
        assert_eq!(&span[2..10], &0xabu64.to_be_bytes());
        assert_eq!(&span[10..12], &[0x12, 8], "parent_id");
        assert!(span.windows(2).any(|w| w == [0x20, 1]), "kind CLIENT");
        assert!(span.windows(b"http.method".len()).any(|w| w == b"http.method"), "tags");
    }

    #[test]
    fn otlp_span_fields_are_where_the_proto_puts_them() {
        let bytes = otlp_span(&span(Some(0xef), false));
        // trace_id: field 1, 16 bytes; span_id: field 2, 8 bytes.
        assert_eq!(&bytes[..2], &[0x0a, 16]);
        assert_eq!(bytes[2 + 16..2 + 16 + 2], [0x12, 8]);
        assert!(bytes.windows(2).any(|w| w == [0x30, OTLP_CLIENT as u8]), "kind CLIENT");
    }
}
