//! The access log: one line per TCP connection and per HTTP request, as text or JSON.
//!
//! The data path only hands a small record to a bounded channel; a thread of its own formats
//! and writes. When the writer falls behind, records are dropped and counted, never waited for.
//!
//! Two kinds of log share the records: the process-wide `--access-log` ([`AccessLog`]) and each
//! service's MeshAccessLog backends ([`ServiceLog`], with Envoy formats, see [`sink`]).

pub mod file;
pub mod sink;

pub use file::reopen_files;
pub use sink::ServiceLog;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::metrics::metrics;

const QUEUE: usize = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

/// One connection or request.
#[derive(Debug, Serialize)]
pub struct Record {
    /// When the response headers arrived (HTTP) or the connection ended (TCP).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// When the connection or request began (`%START_TIME%`).
    #[serde(skip)]
    pub start: SystemTime,
    pub service: Arc<str>,
    pub protocol: &'static str,
    pub client: SocketAddr,
    /// The endpoint address, when one was reached.
    pub endpoint: Option<String>,
    /// `GET /path` for HTTP; absent for TCP.
    pub request: Option<String>,
    /// HTTP status; absent for TCP.
    pub status: Option<u16>,
    /// How a TCP connection ended, or why a request failed.
    pub outcome: &'static str,
    /// Envoy's response flag, when the proxy answered a request itself; else it follows from
    /// the outcome.
    #[serde(skip)]
    pub flag: Option<&'static str>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    #[serde(serialize_with = "millis")]
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2`; absent for TCP.
    #[serde(skip)]
    pub http_version: Option<&'static str>,
    /// Headers a MeshAccessLog format reads (lowercase names; request ones include `:method`,
    /// `:path`, `:authority`); only captured when a service's formats need them.
    #[serde(skip)]
    pub headers: Option<Box<Headers>>,
}

impl Record {
    /// An HTTP request's record as it begins; the rest is filled in as it is answered.
    pub fn http<B>(service: Arc<str>, protocol: &'static str, client: SocketAddr, req: &http::Request<B>) -> Self {
        let now = SystemTime::now();
        Self {
            time: now,
            start: now,
            service,
            protocol,
            client,
            endpoint: None,
            request: Some(format!("{} {}", req.method(), req.uri().path())),
            status: None,
            outcome: "ok",
            flag: None,
            bytes_sent: 0,
            bytes_received: 0,
            duration: Duration::ZERO,
            http_version: Some(match req.version() {
                http::Version::HTTP_2 => "HTTP/2",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            }),
            headers: None,
        }
    }

    /// A TCP connection's record as it ends: begun at `started`, `bytes` moved (to the
    /// endpoint, from it), and how it ended.
    pub fn tcp(
        service: Arc<str>,
        client: SocketAddr,
        endpoint: Option<String>,
        outcome: &'static str,
        (bytes_sent, bytes_received): (u64, u64),
        started: std::time::Instant,
    ) -> Self {
        let (duration, time) = (started.elapsed(), SystemTime::now());
        Self {
            time,
            start: time.checked_sub(duration).unwrap_or(time),
            service,
            protocol: "tcp",
            client,
            endpoint,
            request: None,
            status: None,
            outcome,
            flag: None,
            bytes_sent,
            bytes_received,
            duration,
            http_version: None,
            headers: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Headers {
    pub request: std::collections::BTreeMap<String, String>,
    pub response: std::collections::BTreeMap<String, String>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

#[derive(Clone, Debug)]
pub struct AccessLog {
    sender: SyncSender<Arc<Record>>,
}

impl AccessLog {
    /// Starts the writer thread.
    pub fn start(destination: Destination, format: Format) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match &destination {
            Destination::Stdout => Box::new(std::io::stdout()),
            Destination::File(path) => Box::new(file::LogFile::open(path.clone())?),
        };
        let (sender, receiver) = sync_channel(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || write_loop(receiver, out, format))?;
        Ok(Self { sender })
    }

    pub fn log(&self, record: Arc<Record>) {
        if let Err(TrySendError::Full(_)) = self.sender.try_send(record) {
            metrics().access_log_dropped();
        }
    }
}

/// Where a finished record goes: the process-wide log and the service's backends.
#[derive(Clone, Debug, Default)]
pub struct Logs {
    pub global: Option<AccessLog>,
    pub service: Option<Arc<ServiceLog>>,
}

impl Logs {
    pub fn is_on(&self) -> bool {
        self.global.is_some() || self.service.is_some()
    }

    pub fn log(&self, record: Record) {
        let record = Arc::new(record);
        if let Some(service) = &self.service {
            service.log(&record);
        }
        if let Some(global) = &self.global {
            global.log(record);
        }
    }
}

fn write_loop(receiver: Receiver<Arc<Record>>, out: Box<dyn Write + Send>, format: Format) {
    write_batches(&receiver, std::io::BufWriter::new(out), |out, record| {
        let _ = match format {
            Format::Json => serde_json::to_writer(&mut *out, &JsonLine::of(&record)).map_err(std::io::Error::other),
            Format::Text => write_text(out, &record),
        };
        let _ = out.write_all(b"\n");
    });
}

/// A writer thread's loop: `write` gets every queued entry and `out` is flushed after each
/// batch, and once every [`file::CHECK_EVERY`] with nothing to write (a flush lets a rotated
/// file go); it ends when every sender is gone.
fn write_batches<T, W: Write>(receiver: &Receiver<T>, mut out: W, mut write: impl FnMut(&mut W, T)) {
    loop {
        match receiver.recv_timeout(file::CHECK_EVERY) {
            Ok(first) => {
                let mut next = Some(first);
                while let Some(entry) = next {
                    write(&mut out, entry);
                    next = receiver.try_recv().ok();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let _ = out.flush();
    }
}

/// A JSON line: the record's fields and Envoy's `response_flags` for how it ended.
#[derive(Serialize)]
struct JsonLine<'a> {
    #[serde(flatten)]
    record: &'a Record,
    response_flags: &'static str,
}

impl<'a> JsonLine<'a> {
    fn of(record: &'a Record) -> Self {
        Self { record, response_flags: sink::response_flags(record) }
    }
}

fn write_text(out: &mut impl Write, r: &Record) -> std::io::Result<()> {
    write!(
        out,
        "{} {} {} {} {} \"{}\" {} {} sent={} received={} {:.3}ms",
        humantime::format_rfc3339_millis(r.time),
        r.service,
        r.protocol,
        r.client,
        r.endpoint.as_deref().unwrap_or("-"),
        r.request.as_deref().unwrap_or("-"),
        r.status.map_or("-".to_string(), |s| s.to_string()),
        r.outcome,
        r.bytes_sent,
        r.bytes_received,
        r.duration.as_secs_f64() * 1000.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH,
            start: SystemTime::UNIX_EPOCH,
            http_version: Some("HTTP/1.1"),
            headers: None,
            service: Arc::from("default/httpbin"),
            protocol: "http",
            client: "127.0.0.1:5555".parse().unwrap(),
            endpoint: Some("10.0.0.1:80".into()),
            request: Some("GET /status/200".into()),
            status: Some(200),
            outcome: "ok",
            flag: None,
            bytes_sent: 0,
            bytes_received: 42,
            duration: Duration::from_micros(1500),
        }
    }

    #[test]
    fn text_and_json_lines() {
        let mut text = Vec::new();
        write_text(&mut text, &record()).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "1970-01-01T00:00:00.000Z default/httpbin http 127.0.0.1:5555 10.0.0.1:80 \"GET /status/200\" 200 ok sent=0 received=42 1.500ms"
        );
        let json: serde_json::Value = serde_json::to_value(record()).unwrap();
        assert_eq!(json["service"], "default/httpbin");
        assert_eq!(json["status"], 200);
        assert_eq!(json["duration"], 1.5);
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
    }
}
