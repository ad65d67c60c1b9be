//! MeshAccessLog backends: a file, a TCP collector (one line per entry) or an OTLP/gRPC
//! receiver. Each destination has one writer thread, shared by every service logging there and
//! kept across reloads while a configuration uses it; the data path only queues the record.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderName;

use super::Record;
use crate::grpc_wire;
use crate::grpc_wire::{put_bytes, put_fixed64};
use crate::log_format::{header_value, render_json_object, Lookup, Operator, Value};
use crate::metrics::metrics;
use crate::policy::runtime::{AccessLogPlan, LineFormat, SinkTarget};

/// Records queued per destination before new ones are dropped (and counted).
const QUEUE: usize = 8192;
/// OTLP: records per export request, and the longest a record waits for its batch.
const OTLP_BATCH: usize = 512;
const OTLP_LINGER: Duration = Duration::from_millis(200);

type Entry = (Arc<Record>, Arc<LineFormat>);

/// One destination's queue; its writer thread ends when the last handle is dropped.
#[derive(Debug)]
pub struct Sink {
    sender: SyncSender<Entry>,
}

impl Sink {
    /// The running sink for `target`, or a new one.
    fn get(target: &SinkTarget) -> std::io::Result<Arc<Self>> {
        static SINKS: OnceLock<Mutex<HashMap<SinkTarget, Weak<Sink>>>> = OnceLock::new();
        let mut sinks = SINKS.get_or_init(Default::default).lock().map_err(|_| std::io::Error::other("poisoned"))?;
        if let Some(sink) = sinks.get(target).and_then(Weak::upgrade) {
            return Ok(sink);
        }
        let (sender, receiver) = sync_channel(QUEUE);
        let name = match target {
            SinkTarget::File(_) => "access-log-file",
            SinkTarget::Tcp(_) => "access-log-tcp",
            SinkTarget::OpenTelemetry(_) => "access-log-otlp",
        };
        let thread = std::thread::Builder::new().name(name.into());
        match target.clone() {
            SinkTarget::File(path) => {
                let file = super::file::LogFile::open(path)?;
                thread.spawn(move || write_lines(receiver, std::io::BufWriter::new(file)))?;
            }
            SinkTarget::Tcp(address) => {
                thread.spawn(move || tcp_loop(receiver, &address))?;
            }
            SinkTarget::OpenTelemetry(endpoint) => {
                thread.spawn(move || otlp_loop(receiver, endpoint))?;
            }
        }
        let sink = Arc::new(Self { sender });
        sinks.retain(|_, s| s.strong_count() > 0);
        sinks.insert(target.clone(), Arc::downgrade(&sink));
        Ok(sink)
    }

    fn send(&self, entry: Entry) {
        if let Err(TrySendError::Full(_)) = self.sender.try_send(entry) {
            metrics().access_log_dropped();
        }
    }
}

/// A service's MeshAccessLog backends, and the headers their formats read.
#[derive(Debug)]
pub struct ServiceLog {
    backends: Vec<(Arc<Sink>, Arc<LineFormat>)>,
    pub request_headers: Vec<HeaderName>,
    pub response_headers: Vec<HeaderName>,
}

impl ServiceLog {
    /// Starts (or joins) the backends' writers; one that cannot start is logged and left out.
    pub fn start(service: &str, plan: &AccessLogPlan) -> Option<Arc<Self>> {
        let mut backends = Vec::new();
        let (mut request_headers, mut response_headers) = (Vec::new(), Vec::new());
        for b in &plan.backends {
            match Sink::get(&b.sink) {
                Ok(sink) => backends.push((sink, Arc::new(b.line.clone()))),
                Err(error) => {
                    tracing::error!(%service, sink = ?b.sink, %error, "MeshAccessLog backend cannot start; it is left out");
                    continue;
                }
            }
            for format in formats(&b.line) {
                request_headers
                    .extend(format.request_headers().filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()));
                response_headers
                    .extend(format.response_headers().filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok()));
            }
        }
        for list in [&mut request_headers, &mut response_headers] {
            list.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            list.dedup();
        }
        (!backends.is_empty()).then(|| Arc::new(Self { backends, request_headers, response_headers }))
    }

    pub fn log(&self, record: &Arc<Record>) {
        for (sink, line) in &self.backends {
            sink.send((record.clone(), line.clone()));
        }
    }
}

fn formats(line: &LineFormat) -> Vec<&crate::log_format::Format> {
    match line {
        LineFormat::Plain { format, .. } => vec![format],
        LineFormat::Json { fields, .. } => fields.iter().map(|(_, f)| f).collect(),
        LineFormat::Otel { body, attributes } => {
            std::iter::once(body).chain(attributes.iter().map(|(_, f)| f)).collect()
        }
    }
}

/// A record's line for a file or TCP backend, with its `\n` (as Kuma appends).
fn line(record: &Record, format: &LineFormat) -> String {
    let mut out = String::new();
    match format {
        LineFormat::Plain { format, omit_empty } => format.render(record, *omit_empty, &mut out),
        LineFormat::Json { fields, omit_empty } => out = render_json_object(fields, record, *omit_empty),
        LineFormat::Otel { body, .. } => body.render(record, false, &mut out),
    }
    out.push('\n');
    out
}

fn write_lines(receiver: Receiver<Entry>, out: impl Write) {
    super::write_batches(&receiver, out, |out, (record, format)| {
        let _ = out.write_all(line(&record, &format).as_bytes());
    });
}

/// Writes lines to a TCP collector, reconnecting (at most once a second) when it goes away;
/// lines that arrive while it is away are dropped and counted.
fn tcp_loop(receiver: Receiver<Entry>, address: &str) {
    let mut stream: Option<std::net::TcpStream> = None;
    let mut last_attempt: Option<std::time::Instant> = None;
    while let Ok((record, format)) = receiver.recv() {
        if stream.is_none() && last_attempt.map_or(true, |at| at.elapsed() >= Duration::from_secs(1)) {
            last_attempt = Some(std::time::Instant::now());
            stream = connect(address);
        }
        let Some(s) = stream.as_mut() else {
            metrics().access_log_dropped();
            continue;
        };
        if let Err(error) = s.write_all(line(&record, &format).as_bytes()) {
            tracing::warn!(%address, %error, "access log collector went away");
            stream = None;
            metrics().access_log_dropped();
        }
    }
}

fn connect(address: &str) -> Option<std::net::TcpStream> {
    use std::net::ToSocketAddrs as _;
    let addr = address.to_socket_addrs().ok()?.next()?;
    match crate::socket_mark::connect_blocking(addr, Duration::from_secs(2)) {
        Ok(s) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Err(error) => {
            tracing::warn!(%address, %error, "cannot reach the access log collector");
            None
        }
    }
}

/// Batches records into OTLP `ExportLogsServiceRequest`s sent over HTTP/2 (h2c) to `endpoint`.
fn otlp_loop(receiver: Receiver<Entry>, endpoint: String) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => return tracing::error!(%error, "no runtime for the OTLP access log"),
    };
    let mut client = grpc_wire::GrpcClient::new(endpoint);
    loop {
        let Ok(first) = receiver.recv() else { return };
        let mut batch = vec![first];
        let deadline = std::time::Instant::now() + OTLP_LINGER;
        while batch.len() < OTLP_BATCH {
            match receiver.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(entry) => batch.push(entry),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let request = export_request(&batch);
        let sent =
            runtime.block_on(client.unary("/opentelemetry.proto.collector.logs.v1.LogsService/Export", &request));
        if let Err(error) = sent {
            let endpoint = client.endpoint();
            tracing::warn!(%endpoint, %error, records = batch.len(), "OTLP access log export failed; records dropped");
            for _ in &batch {
                metrics().access_log_dropped();
            }
        }
    }
}

// ---------- OTLP protobuf (opentelemetry/proto/collector/logs/v1) ----------

/// Nanoseconds since the Unix epoch, as OTLP and Zipkin count time.
pub fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `ExportLogsServiceRequest { resource_logs = 1 { resource = 1, scope_logs = 2 { scope = 1,
/// log_records = 2 } } }`, one ResourceLogs per request.
fn export_request(batch: &[Entry]) -> Vec<u8> {
    let mut scope_logs = Vec::new();
    let mut scope = Vec::new();
    put_bytes(&mut scope, 1, b"mesh-egress");
    put_bytes(&mut scope_logs, 1, &scope);
    for (record, format) in batch {
        let LineFormat::Otel { body, attributes } = &**format else { continue };
        let mut log_record = Vec::new();
        put_fixed64(&mut log_record, 1, unix_nanos(record.start));
        let mut text = String::new();
        body.render(&**record, false, &mut text);
        put_bytes(&mut log_record, 5, &grpc_wire::any_string(&text));
        for (key, value) in attributes {
            let mut rendered = String::new();
            value.render(&**record, false, &mut rendered);
            put_bytes(&mut log_record, 6, &grpc_wire::key_value(key, &rendered));
        }
        put_fixed64(&mut log_record, 11, unix_nanos(record.time));
        put_bytes(&mut scope_logs, 2, &log_record);
    }
    let mut resource = Vec::new();
    put_bytes(&mut resource, 1, &grpc_wire::key_value("service.name", "mesh-egress"));
    let mut resource_logs = Vec::new();
    put_bytes(&mut resource_logs, 1, &resource);
    put_bytes(&mut resource_logs, 2, &scope_logs);
    let mut request = Vec::new();
    put_bytes(&mut request, 1, &resource_logs);
    request
}

// ---------- operator values of a record ----------

/// Envoy's response flags for how a record ended.
pub fn response_flags(record: &Record) -> &'static str {
    if let Some(flag) = record.flag {
        return flag;
    }
    match (record.outcome, record.status) {
        ("connect_failed", _) => "UF",
        ("reset" | "upstream_reset", _) => "UC",
        ("idle_timeout", _) => "SI",
        ("stream_idle_timeout", _) => "SI",
        ("max_stream_duration", _) => "UMSDR",
        ("deadline_exceeded", _) => "UT",
        ("aborted" | "cancelled", _) => "DC",
        ("overflow", _) => "UO",
        _ => "-",
    }
}

fn hostname() -> &'static str {
    static HOSTNAME: OnceLock<String> = OnceLock::new();
    HOSTNAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
    })
}

impl Lookup for Record {
    fn value(&self, op: &Operator) -> Option<Value<'_>> {
        let text = |s: String| Some(Value::Text(Cow::Owned(s)));
        match op {
            Operator::StartTime => text(humantime::format_rfc3339_millis(self.start).to_string()),
            Operator::Duration => Some(Value::Number(self.duration.as_millis() as u64)),
            // Envoy's point of view: sent to and received from the application.
            Operator::BytesSent => Some(Value::Number(self.bytes_received)),
            Operator::BytesReceived => Some(Value::Number(self.bytes_sent)),
            Operator::Protocol => self.http_version.map(|v| Value::Text(Cow::Borrowed(v))),
            Operator::ResponseCode => Some(Value::Number(self.status.map_or(0, u64::from))),
            Operator::ResponseFlags => Some(Value::Text(Cow::Borrowed(response_flags(self)))),
            Operator::ResponseCodeDetails => Some(Value::Text(Cow::Borrowed(self.outcome))),
            Operator::UpstreamHost => self.endpoint.as_deref().map(|e| Value::Text(Cow::Borrowed(e))),
            Operator::UpstreamCluster => Some(Value::Text(Cow::Borrowed(&self.service))),
            Operator::DownstreamRemoteAddress => text(self.client.to_string()),
            Operator::DownstreamRemoteAddressWithoutPort => text(self.client.ip().to_string()),
            Operator::Hostname => Some(Value::Text(Cow::Borrowed(hostname()))),
            Operator::Request { names, max } => header_value(&self.headers.as_ref()?.request, names, *max),
            Operator::Response { names, max } => header_value(&self.headers.as_ref()?.response, names, *max),
            Operator::DownstreamLocalAddress
            | Operator::RequestedServerName
            | Operator::UpstreamTransportFailureReason => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_format::{Format, KumaValues, DEFAULT_HTTP_FORMAT};

    fn record() -> Record {
        let mut headers = super::super::Headers::default();
        headers.request.insert(":method".into(), "GET".into());
        headers.request.insert(":path".into(), "/get".into());
        headers.request.insert(":authority".into(), "httpbin.org".into());
        headers.request.insert("user-agent".into(), "curl/8".into());
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1500),
            start: UNIX_EPOCH + Duration::from_millis(1000),
            service: Arc::from("default/httpbin"),
            protocol: "http",
            client: "127.0.0.1:5555".parse().unwrap(),
            endpoint: Some("10.0.0.1:80".into()),
            request: None,
            status: Some(200),
            outcome: "ok",
            flag: None,
            bytes_sent: 3,
            bytes_received: 42,
            duration: Duration::from_millis(7),
            http_version: Some("HTTP/1.1"),
            headers: Some(Box::new(headers)),
        }
    }

    #[test]
    fn kumas_default_http_format_renders_envoy_style() {
        let kuma = KumaValues {
            mesh: "default".into(),
            source_service: "app".into(),
            source_address: "10.1.1.1".into(),
            destination_service: "httpbin".into(),
            zone: String::new(),
        };
        let format =
            LineFormat::Plain { format: Format::parse(DEFAULT_HTTP_FORMAT, &kuma).unwrap(), omit_empty: false };
        assert_eq!(
            line(&record(), &format),
            "[1970-01-01T00:00:01.000Z] default \"GET /get HTTP/1.1\" 200 - 3 42 7 - \"-\" \"curl/8\" \"-\" \"-\" \"httpbin.org\" \"app\" \"httpbin\" \"10.1.1.1\" \"10.0.0.1:80\"\n"
        );
    }

    #[test]
    fn otlp_request_carries_body_and_attributes() {
        let kuma = KumaValues::default();
        let format = LineFormat::Otel {
            body: Format::parse("%REQ(:METHOD)% %RESPONSE_CODE%", &kuma).unwrap(),
            attributes: vec![("upstream".into(), Format::parse("%UPSTREAM_HOST%", &kuma).unwrap())],
        };
        let bytes = export_request(&[(Arc::new(record()), Arc::new(format))]);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("GET 200") && text.contains("upstream") && text.contains("10.0.0.1:80"), "{text}");
    }
}
