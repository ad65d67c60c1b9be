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
//! exactly where its framing said, and the endpoint did not ask to close. `fuzzing::differential`
//! holds this to what hyper's client reads from the same bytes.

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
use chunked::Decoded;

mod chunked;

/// Most headers in a response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest response head (hyper's default read buffer limit).
const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Bytes the read buffer has room for before each read.
const READ_SIZE: usize = 8192;
/// The largest `Content-Length` taken, as hyper's (it keeps the two values above for its own use).
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

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
    #[error("more than {MAX_HEADERS} response headers")]
    TooManyHeaders,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("the endpoint closed the connection before the response body ended")]
    Incomplete,
    #[error("malformed chunked response body: {0}")]
    Chunked(&'static str),
}

impl Error {
    /// The endpoint's response head broke HTTP/1.1 (malformed, obs-fold included; too large;
    /// invalid), as opposed to the connection ending.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, Self::Head(_) | Self::HeadTooLarge | Self::TooManyHeaders | Self::Invalid(_))
    }

    /// The connection ended before any response byte: closed, reset, or the request never left.
    pub fn closed_before_response(&self) -> bool {
        match self {
            Self::ClosedEarly => true,
            Self::Io(e) => closed_connection(e.kind()),
            _ => false,
        }
    }
}

/// An I/O error that means the endpoint closed the connection: a reset, a broken pipe, or a TLS
/// stream's unexpected EOF (a close without close_notify; [`super::UpstreamIo`] reads it as the
/// end, hyper's own TLS streams elsewhere may not).
pub fn closed_connection(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof)
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

    /// A connection over one end of a socket pair, with a slot of its own: for the
    /// differential fuzz target, which gives hyper's client the same bytes.
    pub fn over_socket_pair(stream: tokio::net::UnixStream) -> Self {
        let slot = Permit(std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(1)));
        Self::new(UpstreamIo::Plain(super::UpstreamStream::Unix(stream)), slot)
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
        let mut progress = HeadProgress::default();
        let head = loop {
            if let Some(head) = self.parse_head(&parts.method, &mut progress)? {
                break head;
            }
            // As hyper: empty lines are not a response begun (closing after them may be resent);
            // an informational response is.
            let started = progress.informational || self.0.read.iter().any(|b| !matches!(b, b'\r' | b'\n'));
            let closed = Err(if started { Error::Incomplete } else { Error::ClosedEarly });
            match self.fill().await {
                // Over TLS, with or without close_notify (`UpstreamIo` reads both as the end).
                Ok(0) => return closed,
                Ok(_) => {}
                // Reset once the response has begun: not a request that never got there.
                Err(Error::Io(e)) if started && closed_connection(e.kind()) => return closed,
                Err(e) => return Err(e),
            }
        };
        let Head { status, version, headers, reason, framing, keep_alive } = head;
        let mut response = Response::new(Body { conn: Some(self), framing, keep_alive, chunked: None });
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
    fn parse_head(&mut self, method: &Method, progress: &mut HeadProgress) -> Result<Option<Head>, Error> {
        let State { read, spans, .. } = &mut *self.0;
        parse_head(read, spans, method, progress)
    }
}

/// What the parses of one response head so far learnt, so the next one does not redo them.
#[derive(Debug, Default)]
struct HeadProgress {
    /// The buffer's length when a parse last found the head incomplete. As hyper does, the head
    /// is parsed again only when the bytes read since then could end it: a head that arrives a
    /// byte at a time then costs time in proportion to its length, not to its square.
    partial: Option<usize>,
    /// Empty lines dropped from before the status line. httparse skips them on every parse, so
    /// a flood of them would be scanned again on every read (each read holds an empty line, so
    /// `partial` does not help); dropped once, they still count towards the head's size, as in
    /// hyper, which keeps them in its buffer.
    skipped: usize,
    /// An informational (1xx) response came before: the endpoint has begun to answer.
    informational: bool,
}

/// A folded header value with each obs-fold (CRLF and the whitespace around it) replaced by one
/// space; a value with no line break comes back as it is.
fn unfold(value: &[u8]) -> Vec<u8> {
    let mut unfolded = Vec::with_capacity(value.len());
    for line in value.split(|b| *b == b'\n').map(|line| line.trim_ascii()).filter(|line| !line.is_empty()) {
        if !unfolded.is_empty() {
            unfolded.push(b' ');
        }
        unfolded.extend_from_slice(line);
    }
    unfolded
}

/// A complete final response head from `read`, or `None` if more is needed (informational
/// responses are dropped on the way). `spans`: scratch space, kept between calls.
fn parse_head(
    read: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    method: &Method,
    progress: &mut HeadProgress,
) -> Result<Option<Head>, Error> {
    if let Some(before) = progress.partial {
        if !may_end_head(read, before) {
            return incomplete(read, progress);
        }
    }
    loop {
        let empty = leading_empty_lines(read);
        if empty > 0 {
            read.advance(empty);
            progress.skipped += empty;
        }
        if read.is_empty() {
            return incomplete(read, progress);
        }
        // Not initialised: zeroing 100 slots cost more than parsing a typical head.
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        // A header folded over lines (obs-fold) is read and unfolded (RFC 9112 §5.2), as Envoy
        // and hyper's client do.
        let mut config = httparse::ParserConfig::default();
        config.allow_obsolete_multiline_headers_in_responses(true);
        let len = match config.parse_response_with_uninit_headers(&mut parsed, read, &mut slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return incomplete(read, progress),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::TooManyHeaders),
            Err(e) => return Err(Error::Head(e)),
        };
        let code = parsed.code.unwrap_or_default();
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(Error::Invalid("101 Switching Protocols without an upgrade"));
            }
            read.advance(len);
            *progress = HeadProgress { informational: true, ..HeadProgress::default() };
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
            let value = match HeaderValue::from_maybe_shared(head.slice(value_start..value_end)) {
                Ok(value) => value,
                Err(_) => HeaderValue::from_bytes(&unfold(&head[value_start..value_end]))
                    .map_err(|_| Error::Invalid("header value"))?,
            };
            present.note(&name, &value);
            headers.append(name, value);
        }
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): the length goes, so what
        // is passed on agrees with how the body was read, as hyper's client (1.13) does.
        if present.transfer_encoding && present.content_length != ContentLength::Absent {
            headers.remove(http::header::CONTENT_LENGTH);
        }
        let (framing, keep_alive) = framing(status, version, method, &headers, present)?;
        return Ok(Some(Head { status, version, headers, reason, framing, keep_alive }));
    }
}

/// For the fuzz target: `data` as an endpoint's answer to a GET, its head parsed and its body
/// read to the end of its framing (or the first error), all from memory.
pub fn read_response(data: &[u8]) {
    let (mut read, mut spans) = (BytesMut::from(data), Vec::new());
    let Ok(Some(head)) = parse_head(&mut read, &mut spans, &Method::GET, &mut HeadProgress::default()) else {
        return;
    };
    if head.framing == Framing::Chunked {
        let mut decoder = chunked::Decoder::default();
        while let Ok(Decoded::Frame(_)) = decoder.decode(&mut read) {}
    }
}

/// A head not complete yet: too large, or to be parsed again once bytes that could end it come.
fn incomplete(read: &[u8], progress: &mut HeadProgress) -> Result<Option<Head>, Error> {
    if progress.skipped + read.len() >= MAX_HEAD_BYTES {
        return Err(Error::HeadTooLarge);
    }
    // As hyper: after an empty buffer, the first bytes are parsed whatever they are.
    progress.partial = (!read.is_empty()).then_some(read.len());
    Ok(None)
}

/// How many bytes of empty lines (LF or CRLF) `read` starts with; a CR without its LF yet is
/// left for httparse to judge.
fn leading_empty_lines(read: &[u8]) -> usize {
    let mut at = 0;
    loop {
        let rest = &read[at..];
        if rest.starts_with(b"\n") {
            at += 1;
        } else if rest.starts_with(b"\r\n") {
            at += 2;
        } else {
            return at;
        }
    }
}

/// Whether the bytes after the first `before` (and the three before them) hold an empty line
/// that ends a head: LF LF or LF CRLF (hyper's test, `is_complete_fast`).
fn may_end_head(read: &[u8], before: usize) -> bool {
    let new = &read[before.saturating_sub(3).min(read.len())..];
    new.windows(2).any(|w| w == b"\n\n") || new.windows(3).any(|w| w == b"\n\r\n")
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    reason: Option<hyper::ext::ReasonPhrase>,
    framing: Framing,
    keep_alive: bool,
}

/// What of the headers that frame a response a head has, noted while the map is built: most
/// heads have neither `Connection` nor `Transfer-Encoding`, and `Content-Length` read on the way
/// saves the map lookups (three fewer are about 1% of an HTTP/1.1 request).
#[derive(Debug, Clone, Copy, Default)]
struct Present {
    connection: bool,
    transfer_encoding: bool,
    content_length: ContentLength,
}

impl Present {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == http::header::CONTENT_LENGTH {
            self.content_length.add(value);
        }
        self.connection |= name == http::header::CONNECTION;
        self.transfer_encoding |= name == http::header::TRANSFER_ENCODING;
    }
}

/// `Content-Length` read line by line: every value, and every item of a comma-separated one,
/// must be the same number (RFC 9110 §8.6, as hyper reads it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ContentLength {
    #[default]
    Absent,
    Value(u64),
    Invalid(&'static str),
}

impl ContentLength {
    fn add(&mut self, value: &HeaderValue) {
        for part in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if let Self::Invalid(_) = self {
                return;
            }
            let n = std::str::from_utf8(part)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok());
            *self = match (n, *self) {
                (None, _) => Self::Invalid("Content-Length"),
                (Some(n), Self::Value(l)) if l != n => Self::Invalid("Content-Length values differ"),
                (Some(n), _) => Self::Value(n),
            };
        }
    }

    fn get(self) -> Result<Option<u64>, Error> {
        match self {
            Self::Absent => Ok(None),
            Self::Value(n) => Ok(Some(n)),
            Self::Invalid(why) => Err(Error::Invalid(why)),
        }
    }
}

/// Whether a response's `Connection` lines (`connection`) let its connection carry another
/// request: HTTP/1.1 does, HTTP/1.0 only with `keep-alive`; a `close` anywhere wins, whatever
/// comes after it (RFC 9112 §9.6; hyper reads it the same way).
pub fn keeps_alive<'a>(version: Version, connection: impl Iterator<Item = &'a HeaderValue>) -> bool {
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    // A line with bytes other than visible ASCII is not read at all, as hyper does.
    for value in connection.filter_map(|value| value.to_str().ok()) {
        for token in value.split(',').map(str::trim) {
            saw_close |= token.eq_ignore_ascii_case("close");
            saw_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    !saw_close && (version == Version::HTTP_11 || saw_keep_alive)
}

/// How the response body is delimited, and whether the connection may carry another request.
fn framing(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: &HeaderMap,
    present: Present,
) -> Result<(Framing, bool), Error> {
    let connection = present.connection.then(|| headers.get_all(http::header::CONNECTION));
    let keep_alive = keeps_alive(version, connection.iter().flatten());
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
        let keep_alive = keep_alive && present.content_length == ContentLength::Absent;
        return Ok(if chunked { (Framing::Chunked, keep_alive) } else { (Framing::UntilClose, false) });
    }
    Ok(match present.content_length.get()? {
        Some(0) => (Framing::Done, keep_alive),
        Some(n) if n > MAX_CONTENT_LENGTH => return Err(Error::Invalid("Content-Length too large")),
        Some(n) => (Framing::Length(n), keep_alive),
        None => (Framing::UntilClose, false),
    })
}

/// `Content-Length`, when there is one (see [`ContentLength`]).
pub(super) fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut length = ContentLength::Absent;
    headers.get_all(http::header::CONTENT_LENGTH).iter().for_each(|value| length.add(value));
    length.get()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
    Done,
}

/// A response body read from the connection; the connection is handed back once it ended.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    /// A chunked body's decoder, from the body's first read on (boxed: the body moves with the
    /// response, and most bodies are not chunked).
    chunked: Option<Box<chunked::Decoder>>,
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
                Framing::Chunked => match self.chunked.get_or_insert_with(Box::default).decode(&mut conn.0.read)? {
                    Decoded::Frame(frame) => {
                        // Trailers end the body: it is done (and its connection reusable) now,
                        // as a server that sends them may not ask for more.
                        if frame.is_trailers() {
                            self.framing = Framing::Done;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    Decoded::End => self.framing = Framing::Done,
                    Decoded::More => {
                        if std::task::ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(Error::Incomplete)));
                        }
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint that began its answer (part of a head, or an informational response) and
    /// then reset the connection (closed with the request unread) did get the request: not a
    /// connection closed before the response, which an idempotent request is sent again for.
    #[tokio::test]
    async fn a_reset_after_the_answer_began_is_not_a_close_before_it() {
        for begun in [&b"HTTP/1.1 200 OK\r\n"[..], b"HTTP/1.1 100 Continue\r\n\r\n"] {
            let (client, mut endpoint) = tokio::net::UnixStream::pair().unwrap();
            let exchange = tokio::spawn(async move {
                let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
                Conn::over_socket_pair(client).exchange(&parts).await.map(|_| ())
            });
            let mut byte = [0u8; 1];
            endpoint.read_exact(&mut byte).await.unwrap(); // the request is in, one byte read
            endpoint.write_all(begun).await.unwrap();
            drop(endpoint); // the rest of the request unread: a reset
            let error = exchange.await.unwrap().unwrap_err();
            assert!(matches!(error, Error::Incomplete) && !error.closed_before_response(), "{error:?}");
        }
    }

    fn method_get() -> Method {
        Method::GET
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
    fn a_head_is_parsed_again_only_when_new_bytes_could_end_it() {
        let (mut read, mut spans, mut progress) = (BytesMut::new(), Vec::new(), HeadProgress::default());
        let mut feed = |bytes: &[u8], read: &mut BytesMut| {
            read.extend_from_slice(bytes);
            parse_head(read, &mut spans, &Method::GET, &mut progress)
        };
        assert!(matches!(feed(b"HTTP/1.1 200 OK\r\n", &mut read), Ok(None)));
        // A malformed line without an empty line after it is not parsed yet: parsing every
        // read would make a head trickled byte by byte cost its length squared.
        assert!(matches!(feed(b"bad header\r\n", &mut read), Ok(None)), "parsed before its end");
        assert!(matches!(feed(b"\r\n", &mut read), Err(Error::Head(_))));
        for end in [&b"\n\n"[..], b"\r\n\r\n", b"\n\r\n"] {
            let (mut read, mut spans, mut progress) = (BytesMut::new(), Vec::new(), HeadProgress::default());
            for (i, byte) in [&b"HTTP/1.1 204 No Content"[..], end].concat().iter().enumerate() {
                read.extend_from_slice(&[*byte]);
                let head = parse_head(&mut read, &mut spans, &Method::GET, &mut progress).unwrap();
                assert_eq!(head.is_some(), i == 22 + end.len(), "{end:?} at byte {i}");
            }
        }
    }

    #[test]
    fn a_content_length_beside_transfer_encoding_is_dropped() {
        let parse = |head: &[u8]| {
            let (mut read, mut spans) = (BytesMut::from(head), Vec::new());
            parse_head(&mut read, &mut spans, &Method::GET, &mut HeadProgress::default()).unwrap().expect("a head")
        };
        let both = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(!both.headers.contains_key(http::header::CONTENT_LENGTH));
        assert_eq!((both.framing, both.keep_alive), (Framing::Chunked, false), "framed two ways: not reused");
        let length_only = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(length_only.headers[http::header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn a_folded_header_is_unfolded() {
        let (mut read, mut spans) = (
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-folded: one\r\n two\r\n\t three\r\nx-plain: a  b\r\n\r\n"[..]),
            Vec::new(),
        );
        let head = parse_head(&mut read, &mut spans, &Method::GET, &mut HeadProgress::default()).unwrap().unwrap();
        assert_eq!(head.headers["x-folded"], "one two three", "each obs-fold is one space, as Envoy and hyper");
        assert_eq!(head.headers["x-plain"], "a  b", "spaces inside a value stay");
    }

    #[test]
    fn empty_lines_before_a_head_are_dropped_once_and_count_towards_its_size() {
        let (mut read, mut spans, mut progress) = (BytesMut::new(), Vec::new(), HeadProgress::default());
        // A flood of empty lines, each read holding one: the buffer does not grow with it.
        for _ in 0..1000 {
            read.extend_from_slice(b"\r\n\n");
            assert!(matches!(parse_head(&mut read, &mut spans, &Method::GET, &mut progress), Ok(None)));
            assert!(read.is_empty());
        }
        assert_eq!(progress.skipped, 3000);
        read.extend_from_slice(b"\r");
        assert!(matches!(parse_head(&mut read, &mut spans, &Method::GET, &mut progress), Ok(None)));
        read.extend_from_slice(b"\nHTTP/1.1 204 No Content\r\n\r\n");
        let head = parse_head(&mut read, &mut spans, &Method::GET, &mut progress).unwrap().expect("a head");
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        // A CR without its LF is httparse's to refuse.
        let (mut read, mut progress) = (BytesMut::from(&b"\rX"[..]), HeadProgress::default());
        assert!(matches!(parse_head(&mut read, &mut spans, &Method::GET, &mut progress), Err(Error::Head(_))));
        // Dropped lines still count: the limit is hyper's, on what came since the last head.
        let (mut read, mut progress) = (BytesMut::new(), HeadProgress::default());
        let mut result = Ok(None);
        while matches!(result, Ok(None)) {
            read.extend_from_slice(&[b'\n'; 4096]);
            result = parse_head(&mut read, &mut spans, &Method::GET, &mut progress);
        }
        assert!(matches!(result, Err(Error::HeadTooLarge)));
        assert_eq!(progress.skipped, MAX_HEAD_BYTES.next_multiple_of(4096));
        // Too many headers is said so, not taken for a head too large.
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let mut read = BytesMut::from(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes());
        let result = parse_head(&mut read, &mut spans, &Method::GET, &mut HeadProgress::default());
        assert!(matches!(result, Err(Error::TooManyHeaders)));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let ok = StatusCode::OK;
        let v11 = Version::HTTP_11;
        let get = method_get();
        let frame = |status, version, method: &Method, h: &str| {
            let headers = head(h);
            let mut present = Present::default();
            headers.iter().for_each(|(name, value)| present.note(name, value));
            framing(status, version, method, &headers, present).ok()
        };
        assert_eq!(frame(ok, v11, &get, "content-length: 5"), Some((Framing::Length(5), true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 5, 5\ncontent-length: 5"), Some((Framing::Length(5), true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 0"), Some((Framing::Done, true)));
        assert_eq!(frame(ok, v11, &get, "content-length: 5, 6"), None);
        assert_eq!(frame(ok, v11, &get, "content-length: +5"), None);
        assert_eq!(frame(ok, v11, &get, "transfer-encoding: gzip, chunked"), Some((Framing::Chunked, true)));
        assert_eq!(
            frame(ok, v11, &get, "transfer-encoding: chunked\ncontent-length: 5"),
            Some((Framing::Chunked, false)),
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
        // A `close` wins over a `keep-alive` after it, on its line or a later one (as hyper).
        for connection in ["close, keep-alive", "close\nconnection: keep-alive", "keep-alive, close"] {
            for version in [v11, Version::HTTP_10] {
                let h = format!("content-length: 5\nconnection: {connection}");
                assert_eq!(frame(ok, version, &get, &h), Some((Framing::Length(5), false)), "{version:?} {connection}");
            }
        }
        // A Connection line that is not visible ASCII is not read (as hyper: `to_str` fails).
        for (version, line, reused) in
            [(Version::HTTP_10, &b"keep-alive, \xff"[..], false), (v11, b"close, \xff", true)]
        {
            let mut headers = head("content-length: 5");
            headers.append(http::header::CONNECTION, HeaderValue::from_bytes(line).unwrap());
            let mut present = Present::default();
            headers.iter().for_each(|(name, value)| present.note(name, value));
            assert_eq!(framing(ok, version, &get, &headers, present).ok(), Some((Framing::Length(5), reused)));
        }
        // hyper keeps the two largest values for itself and refuses them.
        assert_eq!(frame(ok, v11, &get, "content-length: 18446744073709551615"), None);
        assert_eq!(frame(ok, v11, &get, "content-length: 18446744073709551614"), None);
        assert_eq!(
            frame(ok, v11, &get, "content-length: 18446744073709551613"),
            Some((Framing::Length(u64::MAX - 2), true))
        );
        assert_eq!(frame(ok, v11, &Method::HEAD, "content-length: 5"), Some((Framing::Done, true)));
        assert_eq!(frame(StatusCode::NO_CONTENT, v11, &get, "content-length: 5"), Some((Framing::Done, true)));
        assert_eq!(frame(StatusCode::NOT_MODIFIED, v11, &get, ""), Some((Framing::Done, true)));
    }
}
