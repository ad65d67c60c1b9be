//! HTTP/1.1 exchanges of requests without a body, written and read by the request's own task.
//!
//! hyper's client gives every connection a task of its own and hands it each request and the
//! response head and body through channels: five task polls per request, three of them on the
//! connection's task. Here the request's task writes the head and reads the response on the
//! socket itself, and the response body reads the socket as the application's connection asks
//! for it. Requests with a body and upgrades keep hyper's client, whose connection task can send
//! a body while the response arrives.
//!
//! The response is read as hyper reads it (RFC 9112 §6.3): no body for HEAD, 1xx, 204 and 304;
//! chunked when it is the final transfer coding (trailers become a trailers frame); else
//! Content-Length (every value the same); else until the endpoint closes. 1xx responses other
//! than 101 are skipped. A connection goes back to the pool only when its response ended
//! exactly where its framing said, and the endpoint did not ask to close.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{Permit, UpstreamIo};

/// Most headers in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest response head, and largest trailer section (hyper's default read buffer limit).
const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of a body's trailer section, and of its chunk extensions together (hyper's limits).
const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes the read buffer has room for before each read.
const READ_SIZE: usize = 8192;

/// A waker that does nothing, for checking an idle connection no task waits on.
static NOOP_WAKER: std::sync::LazyLock<std::task::Waker> = std::sync::LazyLock::new(|| {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    std::task::Waker::from(std::sync::Arc::new(Noop))
});

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the endpoint closed the connection before the response")]
    ClosedEarly,
    #[error("connection to the endpoint failed: {0}")]
    Io(#[source] io::Error),
    #[error("malformed response head: {0}")]
    Head(#[source] httparse::Error),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("the endpoint closed the connection before the response body ended")]
    Incomplete,
    #[error("malformed chunked response body: {0}")]
    Chunked(&'static str),
}

impl Error {
    /// The connection ended before any response byte: closed, reset, or the request never left.
    pub fn closed_before_response(&self) -> bool {
        match self {
            Self::ClosedEarly => true,
            Self::Io(e) => matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe),
            _ => false,
        }
    }
}

/// An HTTP/1.1 connection to an endpoint. Boxed, allocated once per connection: it moves with
/// each request's future and response body, which should stay small.
pub struct Conn(Box<State>);

struct State {
    io: UpstreamIo,
    /// Bytes read and not yet used.
    read: BytesMut,
    /// The request head being written (kept for the next request).
    write: Vec<u8>,
    /// Where the response head's header names and values are in it (kept for the next one).
    spans: Vec<[usize; 4]>,
    opened: Instant,
    /// How long it sat in the pool before this use; `None`: a new connection.
    idle_for: Option<Duration>,
    /// A connection slot of the service, held while the connection lives.
    _slot: Permit,
}

impl Conn {
    pub fn new(io: UpstreamIo, slot: Permit) -> Self {
        Self(Box::new(State {
            io,
            read: BytesMut::with_capacity(READ_SIZE),
            write: Vec::with_capacity(512),
            spans: Vec::new(),
            opened: Instant::now(),
            idle_for: None,
            _slot: slot,
        }))
    }

    /// When it was opened (for `maxConnectionDuration`).
    pub fn opened(&self) -> Instant {
        self.0.opened
    }

    /// How long it sat in the pool before this use; `None`: a new connection.
    pub fn idle_for(&self) -> Option<Duration> {
        self.0.idle_for
    }

    pub fn set_idle_for(&mut self, idle: Duration) {
        self.0.idle_for = Some(idle);
    }

    /// The socket and connection slot of an idle connection, for hyper's client to take over
    /// (a request with a body when only these are idle).
    pub fn into_io(self) -> (UpstreamIo, Permit) {
        let State { io, _slot, .. } = *self.0;
        (io, _slot)
    }

    /// Whether the endpoint closed (or wrote to) the idle connection: a read with no task to
    /// wake, which costs no system call unless the socket has something to read.
    pub fn closed(&mut self) -> bool {
        if !self.0.read.is_empty() {
            return true;
        }
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(&NOOP_WAKER);
        Pin::new(&mut self.0.io).poll_read(&mut cx, &mut buf).is_ready()
    }

    /// Sends a request head (the request has no body) and reads the response head; the
    /// response body owns the connection until it ends.
    pub async fn exchange(mut self, parts: &http::request::Parts) -> Result<Response<Body>, Error> {
        self.encode(parts);
        self.0.io.write_all(&self.0.write).await.map_err(Error::Io)?;
        self.0.io.flush().await.map_err(Error::Io)?;
        let head = loop {
            if let Some(head) = self.parse_head(&parts.method)? {
                break head;
            }
            let started = !self.0.read.is_empty();
            if self.fill().await? == 0 {
                return Err(if started { Error::Incomplete } else { Error::ClosedEarly });
            }
        };
        let Head { status, version, headers, reason, framing, keep_alive } = head;
        let mut response = Response::new(Body { conn: Some(self), framing, keep_alive, extensions: 0 });
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        Ok(response)
    }

    fn encode(&mut self, parts: &http::request::Parts) {
        let out = &mut self.0.write;
        out.clear();
        out.extend_from_slice(parts.method.as_str().as_bytes());
        out.push(b' ');
        // Origin form, as hyper writes it: the path ("/" when empty), then the query.
        out.extend_from_slice(parts.uri.path().as_bytes());
        if let Some(query) = parts.uri.query() {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &parts.headers {
            // No body: no transfer coding (as hyper's client).
            if name == http::header::TRANSFER_ENCODING {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    async fn fill(&mut self) -> Result<usize, Error> {
        self.0.read.reserve(READ_SIZE);
        self.0.io.read_buf(&mut self.0.read).await.map_err(Error::Io)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        self.0.read.reserve(READ_SIZE);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.0.io), cx, &mut self.0.read).map_err(Error::Io)
    }

    /// The response head from the read buffer ([`parse_head`]).
    fn parse_head(&mut self, method: &Method) -> Result<Option<Head>, Error> {
        let State { read, spans, .. } = &mut *self.0;
        parse_head(read, spans, method)
    }
}

/// A complete final response head from `read`, or `None` if more is needed (informational
/// responses are dropped on the way). `spans`: scratch space, kept between calls.
fn parse_head(read: &mut BytesMut, spans: &mut Vec<[usize; 4]>, method: &Method) -> Result<Option<Head>, Error> {
    loop {
        if read.is_empty() {
            return Ok(None);
        }
        // Not initialised: zeroing 100 slots cost more than parsing a typical head.
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, read, &mut slots) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if read.len() > MAX_HEAD_BYTES => return Err(Error::HeadTooLarge),
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
                Err(e) => return Err(Error::Head(e)),
            };
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(Error::Invalid("101 Switching Protocols without an upgrade"));
            }
            read.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("status code"))?;
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let reason = parsed
            .reason
            .filter(|r| status.canonical_reason() != Some(*r))
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        // Header values are slices of the head's bytes, which the map then shares.
        let base = read.as_ptr() as usize;
        spans.clear();
        spans.extend(parsed.headers.iter().map(|header| {
            let name = header.name.as_ptr() as usize - base;
            let value = header.value.as_ptr() as usize - base;
            [name, name + header.name.len(), value, value + header.value.len()]
        }));
        let head = read.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(spans.len());
        let mut present = Present::default();
        for &[name_start, name_end, value_start, value_end] in spans.iter() {
            let name =
                HeaderName::from_bytes(&head[name_start..name_end]).map_err(|_| Error::Invalid("header name"))?;
            present.note(&name);
            let value = HeaderValue::from_maybe_shared(head.slice(value_start..value_end))
                .map_err(|_| Error::Invalid("header value"))?;
            headers.append(name, value);
        }
        let (framing, keep_alive) = framing(status, version, method, &headers, present)?;
        return Ok(Some(Head { status, version, headers, reason, framing, keep_alive }));
    }
}

/// For the fuzz target: `data` as an endpoint's answer to a GET, its head parsed and its body
/// read to the end of its framing (or the first error), all from memory.
pub fn read_response(data: &[u8]) {
    let (mut read, mut spans, mut extensions) = (BytesMut::from(data), Vec::new(), 0);
    let Ok(Some(head)) = parse_head(&mut read, &mut spans, &Method::GET) else { return };
    let mut framing = head.framing;
    loop {
        framing = match framing {
            Framing::Chunked(chunk) => match chunked_step(&mut read, chunk, &mut extensions) {
                Ok(Step::Next(next, _)) => next,
                Ok(Step::More) | Err(_) => return,
            },
            Framing::Length(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
                read.advance(n);
                return;
            }
            Framing::UntilClose | Framing::Done => return,
        };
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    reason: Option<hyper::ext::ReasonPhrase>,
    framing: Framing,
    keep_alive: bool,
}

/// Which of the headers that frame a response a head has, noted while the map is built: most
/// heads have neither `Connection` nor `Transfer-Encoding`, and two map lookups fewer are 0.6%
/// of an HTTP/1.1 request.
#[derive(Debug, Clone, Copy, Default)]
struct Present {
    connection: bool,
    transfer_encoding: bool,
}

impl Present {
    fn note(&mut self, name: &HeaderName) {
        self.connection |= name == http::header::CONNECTION;
        self.transfer_encoding |= name == http::header::TRANSFER_ENCODING;
    }
}

/// How the response body is delimited, and whether the connection may carry another request.
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &HeaderMap,
    present: Present,
) -> Result<(Framing, bool), Error> {
    let mut keep_alive = version == Version::HTTP_11;
    let connection = present.connection.then(|| headers.get_all(http::header::CONNECTION));
    for value in connection.iter().flatten() {
        for token in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if token.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    if matches!(status.as_u16(), 204 | 304) || method == Method::HEAD {
        return Ok((Framing::Done, keep_alive));
    }
    if present.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(Error::Invalid("Transfer-Encoding in an HTTP/1.0 response"));
        }
        // As hyper: chunked only when it ends the last Transfer-Encoding line.
        let chunked = headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|line| line.to_str().ok())
            .and_then(|line| line.rsplit(',').next())
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        // With a Content-Length too, the message was framed two ways: not reused (RFC 9112 §6.1).
        let keep_alive = keep_alive && !headers.contains_key(http::header::CONTENT_LENGTH);
        return Ok(if chunked { (Framing::Chunked(Chunk::Size), keep_alive) } else { (Framing::UntilClose, false) });
    }
    Ok(match content_length(headers)? {
        Some(0) => (Framing::Done, keep_alive),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::UntilClose, false),
    })
}

/// `Content-Length`, when there is one: every value, and every item of a comma-separated one,
/// must be the same number (RFC 9110 §8.6, as hyper reads it).
pub(super) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut length: Option<u64> = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(Error::Invalid("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Invalid("Content-Length values differ"));
            }
            length = Some(n);
        }
    }
    Ok(length)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// A response body read from the connection; the connection is handed back once it ended.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    /// Chunk-extension bytes read so far.
    extensions: usize,
}

impl Body {
    /// The connection, when the body ended as framed and it may carry another request.
    pub fn reusable(&mut self) -> Option<Conn> {
        if self.framing == Framing::Done && self.keep_alive {
            return self.conn.take().filter(|c| c.0.read.is_empty());
        }
        None
    }

    pub fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let result = self.poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &result {
            // A failed body leaves the connection in an unknown state.
            self.framing = Framing::Done;
            self.keep_alive = false;
            self.conn = None;
        }
        result
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) => {
                    if conn.0.read.is_empty() && std::task::ready!(conn.poll_fill(cx))? == 0 {
                        return Poll::Ready(Some(Err(Error::Incomplete)));
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(conn.0.read.len());
                    let left = left - n as u64;
                    self.framing = if left == 0 { Framing::Done } else { Framing::Length(left) };
                    return Poll::Ready(Some(Ok(Frame::data(conn.0.read.split_to(n).freeze()))));
                }
                Framing::UntilClose => {
                    if conn.0.read.is_empty() && std::task::ready!(conn.poll_fill(cx))? == 0 {
                        self.framing = Framing::Done;
                        return Poll::Ready(None);
                    }
                    let n = conn.0.read.len();
                    return Poll::Ready(Some(Ok(Frame::data(conn.0.read.split_to(n).freeze()))));
                }
                Framing::Chunked(chunk) => match chunked_step(&mut conn.0.read, chunk, &mut self.extensions)? {
                    Step::Next(next, frame) => {
                        self.framing = next;
                        if let Some(frame) = frame {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                    Step::More => {
                        if std::task::ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(Error::Incomplete)));
                        }
                    }
                },
            }
        }
    }
}

enum Step {
    /// The reader's next state, and a frame if this step gave one.
    Next(Framing, Option<Frame<Bytes>>),
    /// More bytes are needed.
    More,
}

/// One step of a chunked body's reader over the bytes read so far.
/// `extensions`: chunk-extension bytes of the body so far (bounded, as hyper bounds them).
fn chunked_step(read: &mut BytesMut, chunk: Chunk, extensions: &mut usize) -> Result<Step, Error> {
    match chunk {
        Chunk::Size => {
            let Some((size, line, extension)) = chunk_size_line(read)? else {
                return if read.len() > MAX_CHUNK_LINE {
                    Err(Error::Chunked("chunk size line too long"))
                } else {
                    Ok(Step::More)
                };
            };
            *extensions += extension;
            if line > MAX_CHUNK_LINE || *extensions > MAX_TRAILERS {
                return Err(Error::Chunked("chunk extensions too long"));
            }
            read.advance(line);
            let next = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
            Ok(Step::Next(Framing::Chunked(next), None))
        }
        Chunk::Data(left) => {
            if read.is_empty() {
                return Ok(Step::More);
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(read.len());
            let left = left - n as u64;
            let next = if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) };
            Ok(Step::Next(Framing::Chunked(next), Some(Frame::data(read.split_to(n).freeze()))))
        }
        Chunk::DataEnd => {
            if read.len() < 2 {
                return Ok(Step::More);
            }
            if &read[..2] != b"\r\n" {
                return Err(Error::Chunked("chunk data not followed by CRLF"));
            }
            read.advance(2);
            Ok(Step::Next(Framing::Chunked(Chunk::Size), None))
        }
        Chunk::Trailers => {
            if read.starts_with(b"\r\n") {
                read.advance(2);
                return Ok(Step::Next(Framing::Done, None));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS]; // rare: trailers
            let (len, fields) = match httparse::parse_headers(read, &mut slots) {
                Ok(httparse::Status::Complete((len, fields))) if len <= MAX_TRAILERS => (len, fields),
                Ok(httparse::Status::Partial) if read.len() <= MAX_TRAILERS => return Ok(Step::More),
                Ok(_) => return Err(Error::Chunked("trailers too large")),
                Err(_) => return Err(Error::Chunked("malformed trailers")),
            };
            // httparse takes a bare LF for a line end; hyper does not, nor does this.
            if read[..len].iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || read[i - 1] != b'\r')) {
                return Err(Error::Chunked("trailer line without CRLF"));
            }
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields.iter() {
                let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::Chunked("trailer name"))?;
                let value = HeaderValue::from_bytes(field.value).map_err(|_| Error::Chunked("trailer value"))?;
                trailers.append(name, value);
            }
            read.advance(len);
            Ok(Step::Next(Framing::Done, Some(Frame::trailers(trailers))))
        }
    }
}

/// A chunk-size line, as hyper reads one: hex digits, optional spaces or tabs, an optional
/// `;` extension without CR or LF, then CRLF. The size, the line's length and the extension's;
/// `None` until the line is complete.
fn chunk_size_line(read: &[u8]) -> Result<Option<(u64, usize, usize)>, Error> {
    let bad = || Error::Chunked("chunk size line");
    let digits = read.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == read.len() {
        return Ok(None);
    }
    if digits == 0 {
        return Err(bad());
    }
    let size = read[..digits].iter().try_fold(0u64, |size, &b| {
        let digit = char::from(b).to_digit(16).map(u64::from).ok_or_else(bad)?;
        size.checked_mul(16).and_then(|s| s.checked_add(digit)).ok_or(Error::Chunked("chunk size overflows"))
    })?;
    let mut i = digits + read[digits..].iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    let extension = i;
    if read.get(i) == Some(&b';') {
        i += read[i..].iter().take_while(|&&b| b != b'\r' && b != b'\n').count();
    }
    let extension = i - extension;
    match (read.get(i), read.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) => Ok(Some((size, i + 2, extension))),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method_get() -> Method {
        Method::GET
    }

    /// Runs the chunked reader over `wire` fed `step` bytes at a time; the data and trailers.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut read = BytesMut::new();
        let mut fed = 0;
        let mut framing = Framing::Chunked(Chunk::Size);
        let (mut data, mut trailers, mut extensions) = (Vec::new(), None, 0);
        while let Framing::Chunked(chunk) = framing {
            match chunked_step(&mut read, chunk, &mut extensions)? {
                Step::Next(next, frame) => {
                    framing = next;
                    match frame.map(Frame::into_data) {
                        Some(Ok(bytes)) => data.extend_from_slice(&bytes),
                        Some(Err(frame)) => trailers = frame.into_trailers().ok(),
                        None => {}
                    }
                }
                Step::More if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    read.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Step::More => return Err(Error::Incomplete),
            }
        }
        assert!(read.is_empty(), "bytes left after the body: {read:?}");
        Ok((data, trailers))
    }

    #[test]
    fn chunked_bodies_are_read_whole_however_they_arrive() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (data, trailers) = dechunk(wire, step).unwrap();
            assert_eq!((data.as_slice(), trailers), (&b"hello, world"[..], None), "fed {step} at a time");
        }
        let (data, trailers) = dechunk(b"A\r\n0123456789\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n", 4).unwrap();
        let trailers = trailers.expect("trailers");
        assert_eq!(
            (data.len(), trailers["grpc-status"].as_bytes(), trailers["x-b"].as_bytes()),
            (10, &b"0"[..], &b"2"[..])
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for wire in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"\r\n",
            b"3\r\nabc\r\n0\r\nbad header\r\n\r\n",
            // As hyper rejects them: leading whitespace, other whitespace, a bare CR or LF.
            b"  5\r\nhello\r\n0\r\n\r\n",
            b"5\x0c\r\nhello\r\n0\r\n\r\n",
            b"5\r\r\nhello\r\n0\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            b"3\r\nabc\r\n0\r\n\n",
            b"3\r\nabc\r\n0\r\nx: y\n\r\n",
            b"FFFFFFFFFFFFFFFFF\r\n",
        ] {
            assert!(dechunk(wire, 3).is_err(), "{:?}", String::from_utf8_lossy(wire));
        }
        assert!(matches!(dechunk(b"5\r\nhel", 2), Err(Error::Incomplete)));
        let long_extension = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(dechunk(long_extension.as_bytes(), 1 << 20).is_err(), "an extension line past the limit");
        let many_extensions = format!("1;{}\r\nx\r\n", "e".repeat(1000)).repeat(20) + "0\r\n\r\n";
        assert!(dechunk(many_extensions.as_bytes(), 1 << 20).is_err(), "extensions past 16 KiB in all");
        let (data, _) = dechunk(b"0005 \t;name=\"v\"\r\nhello\r\n0\r\n\r\n", 3).unwrap();
        assert_eq!(data, b"hello", "leading zeros, whitespace before an extension");
    }

    fn head(lines: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in lines.lines().filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':').unwrap();
            map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value.trim().parse().unwrap());
        }
        map
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        let v11 = Version::HTTP_11;
        let get = method_get();
        let frame = |status, version, method: &Method, h: &str| {
            let headers = head(h);
            let mut present = Present::default();
            headers.keys().for_each(|name| present.note(name));
            framing(status, version, method, &headers, present).ok()
        };
        assert_eq!(frame(ok, v11, &get, "content-length: 5"), Some((Framing::Length(5), true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 5, 5\ncontent-length: 5"), Some((Framing::Length(5), true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 0"), Some((Framing::Done, true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 5, 6"), None);
        assert_eq!(frame(ok, v11, &get, "content-length: +5"), None);
        assert_eq!(
            frame(ok, v11, &get, "transfer-encoding: gzip, chunked"),
            Some((Framing::Chunked(Chunk::Size), true))
        );
        assert_eq!(
            frame(ok, v11, &get, "transfer-encoding: chunked\ncontent-length: 5"),
            Some((Framing::Chunked(Chunk::Size), false)),
            "framed two ways: not reused"
        );
        assert_eq!(frame(ok, v11, &get, "transfer-encoding: chunked, gzip"), Some((Framing::UntilClose, false)));
        assert_eq!(frame(ok, v11, &get, "transfer-encoding: chunked,"), Some((Framing::UntilClose, false)), "as hyper");
        assert_eq!(
            frame(ok, v11, &get, "transfer-encoding: chunked\ntransfer-encoding: gzip"),
            Some((Framing::UntilClose, false)),
            "the last line decides"
        );
        assert_eq!(frame(ok, Version::HTTP_10, &get, "transfer-encoding: chunked"), None);
        assert_eq!(frame(ok, v11, &get, ""), Some((Framing::UntilClose, false)));
        assert_eq!(frame(ok, v11, &get, "content-length: 5\nconnection: Close"), Some((Framing::Length(5), false)));
        assert_eq!(frame(ok, Version::HTTP_10, &get, "content-length: 5"), Some((Framing::Length(5), false)));
        assert_eq!(
            frame(ok, Version::HTTP_10, &get, "content-length: 5\nconnection: keep-alive"),
            Some((Framing::Length(5), true))
        );
        assert_eq!(frame(ok, v11, &Method::HEAD, "content-length: 5"), Some((Framing::Done, true)));
        assert_eq!(frame(StatusCode::NO_CONTENT, v11, &get, "content-length: 5"), Some((Framing::Done, true)));
        assert_eq!(frame(StatusCode::NOT_MODIFIED, v11, &get, ""), Some((Framing::Done, true)));
    }
}
