//! Differential checks of the clients mesh-egress wrote for endpoints against hyper's, which
//! they replaced (issue 17: "no change in behaviour"): the same endpoint behaviour is met by
//! both, and both must send the same request and read the same response. Each panics where
//! they differ, and errs only when a socket or a runtime cannot be had.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use hyper::body::{Body as _, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::upstream::pool::{Copied, RequestBody};
use crate::upstream::UpstreamHandle;

/// How long a client may take before it counts as hung.
const BOUND: Duration = Duration::from_secs(5);

/// What a client made of an endpoint's answer.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// No response: the head was refused or never came.
    NoResponse,
    Response {
        status: u16,
        version: http::Version,
        reason: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        trailers: Vec<(String, Vec<u8>)>,
        failed: bool,
    },
    /// Neither an answer nor an error within the bound.
    Hung,
}

impl Read {
    fn head(head: &http::response::Parts) -> Self {
        Self::Response {
            status: head.status.as_u16(),
            version: head.version,
            reason: head.extensions.get::<hyper::ext::ReasonPhrase>().map(|r| r.as_bytes().to_vec()),
            headers: fields(&head.headers),
            body: Vec::new(),
            trailers: Vec::new(),
            failed: false,
        }
    }

    /// The response with its body read to the end or the first error.
    async fn with_body<E>(
        head: &http::response::Parts,
        mut next: impl FnMut(&mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, E>>>,
    ) -> Self {
        let mut read = Self::head(head);
        loop {
            match poll_fn(&mut next).await {
                None => return read,
                Some(Ok(frame)) => read.frame(frame),
                Some(Err(_)) => {
                    if let Self::Response { failed, .. } = &mut read {
                        *failed = true;
                    }
                    return read;
                }
            }
        }
    }

    fn frame(&mut self, frame: Frame<Bytes>) {
        if let Self::Response { body, trailers, .. } = self {
            match frame.into_data() {
                Ok(data) => body.extend_from_slice(&data),
                Err(frame) => trailers.extend(frame.into_trailers().map(|t| fields(&t)).unwrap_or_default()),
            }
        }
    }
}

fn fields(map: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect()
}

/// Runs `run` on a current-thread runtime of this thread's own.
fn on_runtime<T>(run: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    thread_local! {
        static RUNTIME: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
    }
    RUNTIME.with(|runtime| runtime.as_ref().ok_or_else(|| io::Error::other("no tokio runtime"))?.block_on(run))
}

async fn bounded(read: impl Future<Output = Read>) -> Read {
    tokio::time::timeout(BOUND, read).await.unwrap_or(Read::Hung)
}

/// The same endpoint answer read by `upstream::h1` and by hyper's HTTP/1 client, which it
/// replaced for requests without a body: the request heads, the responses (status, version,
/// reason, headers), the body bytes, the trailers and whether the body failed must be the same.
///
/// The first byte picks the request (bit 0: HEAD, else GET) and how the endpoint writes the rest
/// (bits 1–7: pieces of that many bytes, with the reader run between them; 0: at once).
pub fn h1_response_against_hyper(data: &[u8]) -> io::Result<()> {
    let Some((&first, answer)) = data.split_first() else { return Ok(()) };
    let method = if first & 1 == 1 { Method::HEAD } else { Method::GET };
    let piece = match usize::from(first >> 1) {
        0 => usize::MAX,
        n => n,
    };
    let (ours, our_request) = h1_exchange(answer, piece, method.clone(), |stream, request| async move {
        let conn = crate::upstream::h1::Conn::over_socket_pair(stream);
        let Ok(response) = conn.exchange(&request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        Read::with_body(&head, |cx| body.poll_frame(cx)).await
    })?;
    let (theirs, their_request) = h1_exchange(answer, piece, method, |stream, request| async move {
        let io = hyper_util::rt::TokioIo::new(stream);
        // Configured as the proxy's (`proxy::http::client::handshake_h1`): obs-fold unfolded.
        let handshake = hyper::client::conn::http1::Builder::new()
            .allow_obsolete_multiline_headers_in_responses(true)
            .handshake(io);
        let Ok((mut sender, connection)) = handshake.await else {
            return Read::NoResponse;
        };
        tokio::spawn(connection);
        let request = Request::from_parts(request, http_body_util::Empty::<Bytes>::new());
        let Ok(response) = sender.send_request(request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        Read::with_body(&head, |cx| Pin::new(&mut body).poll_frame(cx)).await
    })?;
    // One difference on purpose: a 101 to a request that asked for no upgrade breaks RFC 9110
    // §15.2.2, and upstream::h1 refuses it (a 502) where hyper's client hands it on.
    let theirs = match theirs {
        Read::Response { status: 101, .. } => Read::NoResponse,
        read => read,
    };
    let shown = String::from_utf8_lossy(&data[..data.len().min(300)]);
    assert_eq!(our_request, their_request, "request heads differ for {shown:?}");
    assert_eq!(ours, theirs, "upstream::h1 and hyper's client read {shown:?} differently");
    Ok(())
}

/// Runs `client` on one end of a socket pair; at the other an endpoint reads the request head,
/// writes `answer` in pieces of `piece` bytes, then closes its side for writing. What the
/// client read, and the request head the endpoint got.
fn h1_exchange<C, F>(answer: &[u8], piece: usize, method: Method, client: C) -> io::Result<(Read, Vec<u8>)>
where
    C: FnOnce(tokio::net::UnixStream, http::request::Parts) -> F,
    F: Future<Output = Read>,
{
    let answer = answer.to_vec();
    let (mut request, ()) = Request::new(()).into_parts();
    request.method = method;
    request.headers.insert(http::header::HOST, HeaderValue::from_static("endpoint"));
    on_runtime(async move {
        let (near, mut far) = tokio::net::UnixStream::pair()?;
        let (request_head, got_request) = tokio::sync::oneshot::channel();
        let endpoint = tokio::spawn(async move {
            let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
            while !head.ends_with(b"\r\n\r\n") {
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = request_head.send(head);
            for part in answer.chunks(piece) {
                if far.write_all(part).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            let _ = far.shutdown().await;
            while matches!(far.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let read = bounded(client(near, request)).await;
        endpoint.abort();
        Ok((read, got_request.await.unwrap_or_default()))
    })
}

/// The same HTTP/2 endpoint met by `upstream::h2` and by hyper's HTTP/2 client, which it
/// replaced: the requests the endpoint got (head and body), the responses, the body bytes, the
/// trailers and whether the body failed must be the same.
///
/// The first byte picks the request (bit 0: a POST with the body `ping`, sent as a stream of
/// unknown length; else a GET). The rest is the endpoint's script (`h2_endpoint`).
pub fn h2_response_against_hyper(data: &[u8]) -> io::Result<()> {
    let Some((&first, script)) = data.split_first() else { return Ok(()) };
    let post = first & 1 == 1;
    let (ours, our_request) = h2_exchange(script, post, |io, request| async move {
        let Ok(mut client) = crate::upstream::h2::Client::handshake(io, (), None).await else {
            return Read::NoResponse;
        };
        let Ok(response) = client.send(request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        // The one intended difference: a RST_STREAM(NO_ERROR) before the response's end cuts it
        // short for upstream::h2 (an error) and ends it for hyper's client (reading stops).
        Read::with_body(&head, |cx| match ready!(body.poll_frame(cx)) {
            Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) && e.is_remote() => Poll::Ready(None),
            other => Poll::Ready(other),
        })
        .await
    })?;
    let (theirs, their_request) = h2_exchange(script, post, |io, request| async move {
        let io = hyper_util::rt::TokioIo::new(io);
        let executor = hyper_util::rt::TokioExecutor::new();
        let Ok((mut sender, connection)) = hyper::client::conn::http2::handshake(executor, io).await else {
            return Read::NoResponse;
        };
        tokio::spawn(connection);
        let Ok(response) = sender.send_request(request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        Read::with_body(&head, |cx| Pin::new(&mut body).poll_frame(cx)).await
    })?;
    let shown = format!("{data:?}");
    assert_eq!(our_request, their_request, "the endpoint got different requests for {shown}");
    assert_eq!(ours, theirs, "upstream::h2 and hyper's client met {shown} differently");
    Ok(())
}

/// What the endpoint got: the request's method and URI, its headers, and the body bytes the
/// script read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Got {
    head: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Runs `client` on one end of an in-memory pipe with h2's server at the other, which answers
/// its one request as `script` says, then goes away. What the client read, and what the
/// endpoint got.
fn h2_exchange<C, F>(script: &[u8], post: bool, client: C) -> io::Result<(Read, Got)>
where
    C: FnOnce(tokio::io::DuplexStream, Request<RequestBody>) -> F,
    F: Future<Output = Read>,
{
    let script = script.to_vec();
    on_runtime(async move {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let endpoint = tokio::spawn(h2_endpoint(far, script));
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let mut request = if post {
            let _ = tx.try_send(Copied::Data(Bytes::from_static(b"ping")));
            let _ = tx.try_send(Copied::End);
            Request::new(RequestBody::mirror(rx, UpstreamHandle::detached()))
        } else {
            Request::new(RequestBody::empty(UpstreamHandle::detached(), None))
        };
        drop(tx);
        *request.method_mut() = if post { Method::POST } else { Method::GET };
        *request.uri_mut() = http::Uri::from_static("http://endpoint/path?q=1");
        let read = bounded(client(near, request)).await;
        let got = tokio::time::timeout(BOUND, endpoint).await.ok().and_then(Result::ok).unwrap_or_default();
        Ok((read, got))
    })
}

/// One step of the endpoint's script: a byte for the action (its value modulo 8), and one for
/// its argument.
///
/// 0 the response head (argument: bits 0–2 the status, 1xx ones sent as informational; bits
/// 3–5 its `content-length`, none or one of seven spellings; bit 6 the end of the stream);
/// 1 a data frame (bits 0–5 its length, bit 6 the end of the stream); 2 trailers; 3 a
/// RST_STREAM (bits 0–2 the reason); 4 a GOAWAY, the connection then closing when its streams
/// have; 5 the end of the script; 6 the request body read to its end; 7 the endpoint yields
/// (1–4 times). At the end, a stream not finished is reset (CANCEL).
async fn h2_endpoint(io: tokio::io::DuplexStream, script: Vec<u8>) -> Got {
    const STATUS: [u16; 8] = [200, 204, 304, 404, 503, 206, 100, 103];
    const LENGTH: [Option<&str>; 8] =
        [None, Some("0"), Some("4"), Some("5"), Some("16"), Some("4, 4"), Some("x"), Some("4, 5")];
    const REASON: [h2::Reason; 8] = [
        h2::Reason::NO_ERROR,
        h2::Reason::CANCEL,
        h2::Reason::PROTOCOL_ERROR,
        h2::Reason::INTERNAL_ERROR,
        h2::Reason::REFUSED_STREAM,
        h2::Reason::FLOW_CONTROL_ERROR,
        h2::Reason::STREAM_CLOSED,
        h2::Reason::ENHANCE_YOUR_CALM,
    ];
    let mut got = Got::default();
    let Ok(mut connection) = h2::server::handshake(io).await else { return got };
    let Some(Ok((request, mut respond))) = connection.accept().await else { return got };
    got.head = format!("{} {}", request.method(), request.uri());
    got.headers = fields(request.headers());
    let mut body = request.into_body();
    // The connection is driven by a task of its own until the client closes it (or, after a
    // GOAWAY, its streams are done), told to go away through a channel. It never closes under
    // a client: which frames a client has taken when its socket breaks is a race, and hyper's
    // client and h2's lose a received response to it at different moments.
    let (go_away, mut told) = tokio::sync::mpsc::unbounded_channel::<()>();
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                // Another stream is refused as it is dropped; an error or the end ends it.
                next = connection.accept() => if !matches!(next, Some(Ok(_))) { return },
                Some(()) = told.recv() => connection.graceful_shutdown(),
            }
        }
    });
    let mut stream: Option<h2::SendStream<Bytes>> = None;
    for step in script.chunks(2) {
        let (action, argument) = (step[0] % 8, step.get(1).copied().unwrap_or(0));
        let end = argument & 0x40 != 0;
        match action {
            0 => {
                let Some(status) = StatusCode::from_u16(STATUS[usize::from(argument & 7)]).ok() else { continue };
                let mut head = http::Response::new(());
                *head.status_mut() = status;
                if let Some(length) = LENGTH[usize::from((argument >> 3) & 7)] {
                    head.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from_static(length));
                }
                if status.is_informational() {
                    let _ = respond.send_informational(head);
                } else if stream.is_none() {
                    stream = respond.send_response(head, end).ok();
                }
            }
            1 => {
                if let Some(stream) = &mut stream {
                    let _ = stream.send_data(Bytes::from(vec![b'd'; usize::from(argument & 0x3f)]), end);
                }
            }
            2 => {
                if let Some(stream) = &mut stream {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", HeaderValue::from(u16::from(argument % 17)));
                    let _ = stream.send_trailers(trailers);
                }
            }
            3 => {
                let reason = REASON[usize::from(argument & 7)];
                match &mut stream {
                    Some(stream) => stream.send_reset(reason),
                    None => respond.send_reset(reason),
                }
            }
            4 => {
                let _ = go_away.send(());
            }
            5 => break,
            6 => {
                while let Some(Ok(data)) = body.data().await {
                    let _ = body.flow_control().release_capacity(data.len());
                    got.body.extend_from_slice(&data);
                }
            }
            _ => {
                for _ in 0..=argument % 4 {
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    // An unfinished stream is reset (CANCEL) as its handles go.
    drop((stream, respond, body));
    let _ = driver.await;
    got
}

#[cfg(test)]
mod tests {
    /// Endpoint answers where HTTP/1.1 readers are known to part ways: framing, malformed
    /// chunks, informational responses, reason phrases, limits. Each is given whole, a byte
    /// at a time and in 7-byte pieces, to a GET and to a HEAD.
    #[test]
    fn upstream_h1_reads_responses_as_hyper_s_client_does() {
        let many_headers = format!("HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n", "x-h: v\r\n".repeat(100));
        let large_head = format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n", "v".repeat(420_000));
        let long_extension =
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(5000));
        // Trailer sections of 16,383 and 16,384 bytes, their final CRLF counted.
        let trailers_of = |len: usize| {
            format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx: {}\r\n\r\n", "y".repeat(len - 7))
        };
        let (trailers_under_limit, trailers_at_limit) = (trailers_of(16_383), trailers_of(16_384));
        let answers: Vec<&[u8]> = vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length : 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhello and more",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the endpoint closes",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nhi",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\nconnection: close, keep-alive\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551614\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551613\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551616\r\n\r\nhi",
            b"\r\n\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            b"\n\n\nHTTP/1.1 100 Continue\r\n\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            b"\r\n\rHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            b"\r\n\r\n\r\n",
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nA\r\n0123456789\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked,\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n  5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0005 \t;name=\"v\"\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nbad header\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx: y\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
            b"HTTP/1.1 304 Not Modified\r\n\r\n",
            b"HTTP/1.1 200 Fine\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 \xe9t\xe9\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 999 Odd\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 099 Low\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\ncontent-length: 2\n\nhi",
            b"HTTP/1.1 200 OK\r\nx: \x7f\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx: caf\xc3\xa9\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"hello",
            b"",
            many_headers.as_bytes(),
            large_head.as_bytes(),
            long_extension.as_bytes(),
            trailers_under_limit.as_bytes(),
            trailers_at_limit.as_bytes(),
        ];
        for answer in answers {
            // A byte at a time only for the small ones: a large head takes 400,000 rounds.
            let firsts: &[u8] = if answer.len() < 65_536 { &[0, 1, 2, 3, 14, 15] } else { &[0, 1, 14, 15] };
            for &first in firsts {
                let mut data = vec![first];
                data.extend_from_slice(answer);
                super::h1_response_against_hyper(&data).unwrap();
            }
        }
    }

    /// Endpoint behaviours where HTTP/2 clients can part ways: `content-length` right, wrong
    /// and malformed, trailers, resets of every kind before, during and after the body, GOAWAY,
    /// informational responses, an endpoint that goes away; for a GET and for a POST.
    #[test]
    fn upstream_h2_meets_endpoints_as_hyper_s_client_does() {
        let scripts: [&[u8]; 17] = [
            &[0, 0x00, 1, 0x44],
            &[0, 0x10, 1, 0x44],
            &[0, 0x10, 1, 0x45],
            &[0, 0x18, 1, 0x44],
            &[0, 0x00, 1, 0x04, 2, 0],
            &[0, 0x00, 1, 0x44, 3, 0],
            &[0, 0x00, 1, 0x04, 3, 0],
            &[0, 0x00, 1, 0x04, 3, 1],
            &[0, 0x00, 1, 0x04, 3, 3],
            &[4, 0, 0, 0x00, 1, 0x44],
            &[5, 0],
            &[0, 7, 0, 0x00, 1, 0x44],
            &[6, 0, 0, 0x40],
            &[0, 0x30, 1, 0x44],
            &[3, 4],
            &[0, 0x28, 1, 0x44],
            &[7, 3, 0, 0x00, 7, 3, 1, 0x44],
        ];
        for script in scripts {
            for first in [0u8, 1] {
                super::h2_response_against_hyper(&[&[first][..], script].concat()).unwrap();
            }
        }
    }
}
