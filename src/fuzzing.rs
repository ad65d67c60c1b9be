//! Entry points for the `cargo fuzz` targets in `fuzz/` (not an API): each takes arbitrary bytes
//! and must never panic, hang or allocate without bound.

use std::path::Path;
use std::sync::OnceLock;

use crate::catalog::ipam::DEFAULT_CIDR;
use crate::catalog::{compile, Catalog, CompileOptions, Ipam};
use crate::resources::{load_str, Loaded};

/// Loads `text` as a file and, when it is valid, compiles it (the policy merge, routes,
/// permissions and passthrough included).
fn load_and_compile(text: &str) -> Option<Catalog> {
    let mut loaded = Loaded::default();
    load_str(Path::new("fuzz.yaml"), text, &mut loaded);
    if loaded.diagnostics.has_errors() {
        return None;
    }
    let cidr = DEFAULT_CIDR.parse().ok()?;
    Some(compile(&loaded.resources, &CompileOptions::default(), &mut Ipam::in_memory(cidr)).catalog)
}

/// The resource loader and every validator: the bytes as a file, in whichever spelling.
pub fn resources(data: &[u8]) {
    let _ = load_and_compile(&String::from_utf8_lossy(data));
}

/// The policy validators with the envelope given: the first byte picks the kind, the rest is
/// the `spec`.
pub fn policy(data: &[u8]) {
    const KINDS: [&str; 10] = [
        "MeshTimeout",
        "MeshRetry",
        "MeshCircuitBreaker",
        "MeshHealthCheck",
        "MeshAccessLog",
        "MeshPassthrough",
        "MeshTrafficPermission",
        "MeshHTTPRoute",
        "MeshTCPRoute",
        "MeshTrace",
    ];
    let Some((&pick, spec)) = data.split_first() else { return };
    let kind = KINDS[usize::from(pick) % KINDS.len()];
    let text = format!("type: {kind}\nname: p\nmesh: default\nspec:\n{}", String::from_utf8_lossy(spec));
    resources(text.as_bytes());
}

/// HostnameGenerator templates: parse, then render.
pub fn template(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    if let Ok(template) = crate::template::Template::parse(&source) {
        let labels = crate::resources::Labels::new();
        let values = crate::template::Values {
            name: "svc",
            display_name: "svc",
            namespace: "ns",
            zone: "zone",
            mesh: "default",
            labels: &labels,
        };
        let _ = template.render(&values);
    }
}

/// The DNS proxy's answer to one query packet, against a catalog with one service.
pub fn dns_query(data: &[u8]) {
    static CATALOG: OnceLock<Option<Catalog>> = OnceLock::new();
    let catalog = CATALOG.get_or_init(|| {
        load_and_compile("type: MeshExternalService\nname: svc\nmesh: default\nspec:\n  match: {port: 80, protocol: http}\n  endpoints: [{address: example.com, port: 80}]\n")
    });
    if let Some(catalog) = catalog {
        let _ = crate::dns::answer(catalog, data);
    }
}

/// Passthrough's protocol detection (TLS ClientHello and SNI, HTTP/1, HTTP/2 preface).
pub fn sniff(data: &[u8]) {
    let _ = crate::proxy::passthrough::sniff::decide(data);
}

/// `grpc-timeout` header values.
pub fn grpc_timeout(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else { return };
    let mut headers = http::HeaderMap::new();
    headers.insert("grpc-timeout", value);
    let _ = crate::proxy::http::grpc_timeout(&headers);
}

/// An endpoint's HTTP/1.1 response as the proxy's own client reads it: head, framing, chunked
/// body and trailers.
pub fn h1_response(data: &[u8]) {
    crate::upstream::h1::read_response(data);
}

/// The same endpoint answer read by `upstream::h1` and by hyper's HTTP/1 client, which it
/// replaced for requests without a body: both must send the same request head and see the same
/// response (status, version, reason, headers, body bytes, trailers), or both none; a body that
/// fails must fail in both, after the same bytes. Panics where they differ.
///
/// The first byte picks the request (bit 0: HEAD, else GET) and how the endpoint writes the rest
/// (bits 1–7: pieces of that many bytes, with the reader run between them; 0: at once).
/// Errs only when the socket pair or the runtime cannot be had.
pub fn h1_response_against_hyper(data: &[u8]) -> std::io::Result<()> {
    let Some((&first, answer)) = data.split_first() else { return Ok(()) };
    let method = if first & 1 == 1 { http::Method::HEAD } else { http::Method::GET };
    let piece = match usize::from(first >> 1) {
        0 => usize::MAX,
        n => n,
    };
    let (ours, our_request) = read_through(answer, piece, method.clone(), |stream, request| async move {
        let conn = crate::upstream::h1::Conn::over_socket_pair(stream);
        let Ok(response) = conn.exchange(&request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        let mut read = Read::head(&head);
        loop {
            match std::future::poll_fn(|cx| body.poll_frame(cx)).await {
                None => break,
                Some(Ok(frame)) => read.frame(frame),
                Some(Err(_)) => return read.failed(),
            }
        }
        read
    })?;
    let (theirs, their_request) = read_through(answer, piece, method, |stream, request| async move {
        use http_body_util::BodyExt;
        let io = hyper_util::rt::TokioIo::new(stream);
        let Ok((mut sender, connection)) = hyper::client::conn::http1::handshake(io).await else {
            return Read::NoResponse;
        };
        tokio::spawn(connection);
        let request = http::Request::from_parts(request, http_body_util::Empty::<bytes::Bytes>::new());
        let Ok(response) = sender.send_request(request).await else { return Read::NoResponse };
        let (head, mut body) = response.into_parts();
        let mut read = Read::head(&head);
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => read.frame(frame),
                Some(Err(_)) => return read.failed(),
            }
        }
        read
    })?;
    // One difference on purpose: a 101 to a request that asked for no upgrade breaks RFC 9110
    // §15.2.2, and upstream::h1 refuses it (a 502) where hyper's client hands it on.
    let theirs = match theirs {
        Read::Response { status: 101, .. } => Read::NoResponse,
        read => read,
    };
    let shown = &data[..data.len().min(300)];
    assert_eq!(our_request, their_request, "request heads differ");
    assert_eq!(ours, theirs, "upstream::h1 and hyper's client read {:?} differently", String::from_utf8_lossy(shown));
    Ok(())
}

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
    /// Neither an answer nor an error within the bound: the reader hung.
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

    fn frame(&mut self, frame: hyper::body::Frame<bytes::Bytes>) {
        if let Self::Response { body, trailers, .. } = self {
            match frame.into_data() {
                Ok(data) => body.extend_from_slice(&data),
                Err(frame) => trailers.extend(frame.into_trailers().map(|t| fields(&t)).unwrap_or_default()),
            }
        }
    }

    fn failed(mut self) -> Self {
        if let Self::Response { failed, .. } = &mut self {
            *failed = true;
        }
        self
    }
}

fn fields(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter().map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec())).collect()
}

/// Runs `client` on one end of a socket pair; at the other an endpoint reads the request head,
/// writes `answer` in pieces of `piece` bytes, then closes its side for writing. What the
/// client read, and the request head the endpoint got.
fn read_through<C, F>(answer: &[u8], piece: usize, method: http::Method, client: C) -> std::io::Result<(Read, Vec<u8>)>
where
    C: FnOnce(tokio::net::UnixStream, http::request::Parts) -> F,
    F: std::future::Future<Output = Read>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    thread_local! {
        static RUNTIME: Option<tokio::runtime::Runtime> =
            tokio::runtime::Builder::new_current_thread().enable_all().build().ok();
    }
    let answer = answer.to_vec();
    let (mut request, ()) = http::Request::new(()).into_parts();
    request.method = method;
    request.headers.insert(http::header::HOST, http::HeaderValue::from_static("endpoint"));
    RUNTIME.with(|runtime| {
        let runtime = runtime.as_ref().ok_or_else(|| std::io::Error::other("no tokio runtime"))?;
        runtime.block_on(async move {
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
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), client(near, request))
                .await
                .unwrap_or(Read::Hung);
            endpoint.abort();
            Ok((read, got_request.await.unwrap_or_default()))
        })
    })
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
        ];
        for answer in answers {
            // A byte at a time only for the small ones: the large head takes 400,000 rounds.
            let firsts: &[u8] = if answer.len() < 65_536 { &[0, 1, 2, 3, 14, 15] } else { &[0, 1, 14, 15] };
            for &first in firsts {
                let mut data = vec![first];
                data.extend_from_slice(answer);
                super::h1_response_against_hyper(&data).unwrap();
            }
        }
    }
}
