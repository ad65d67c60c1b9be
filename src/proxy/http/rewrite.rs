//! Rewriting a request for the endpoint and a response for the application: hop-by-hop
//! headers, Host / `:authority`, URI form and version.

use std::borrow::Cow;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::Version;

use crate::policy::runtime::joined_values;
use crate::upstream::TargetAddr;

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
    // Credentials for this proxy, and its challenge: never for the next hop.
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Whether `name` is in [`HOP_BY_HOP`], by one match on the name's text (a length check and a
/// compare) instead of eight `HeaderName` comparisons: run for every header of every request
/// and response.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "expect"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Removes the `.` and `..` segments of the request's path (RFC 3986 §5.2.4), as Kuma's Envoy
/// does (`normalize_path: true`) before routing: `/public/../admin` is matched, and sent, as
/// `/admin`, so a route for `/public` cannot carry it to an endpoint that resolves it itself.
/// A path without such segments (nearly all) is left as it is, unparsed.
pub(super) fn normalize_path(uri: &mut Uri) {
    let path = uri.path();
    let dotted = path.split('/').any(|segment| segment == "." || segment == "..");
    if !dotted {
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." => {
                if last {
                    kept.push("");
                }
            }
            ".." => {
                kept.pop();
                if last {
                    kept.push("");
                }
            }
            other => kept.push(other),
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in &kept {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    if let Some(query) = uri.query() {
        normalized.push('?');
        normalized.push_str(query);
    }
    let mut parts = uri.clone().into_parts();
    if let Ok(path_and_query) = PathAndQuery::try_from(normalized) {
        parts.path_and_query = Some(path_and_query);
        if let Ok(new) = Uri::from_parts(parts) {
            *uri = new;
        }
    }
}

/// An upgrade the application asked for and the proxy allows: `Connection: upgrade` and an
/// `Upgrade` whose first protocol is in `allowed` (case-insensitive; `websocket` by default).
/// Others (h2c among them) are not upgrades: their headers are stripped and the request goes on
/// as an ordinary one, as a server that ignores `Upgrade` would answer it.
pub(super) fn is_upgrade(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(protocol) = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()) else { return false };
    let name = protocol.split(',').next().unwrap_or("").trim().split('/').next().unwrap_or("");
    allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// Why a request cannot be forwarded as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The request is malformed: 400.
    BadRequest(&'static str),
    /// CONNECT: 405 (mesh-egress is no forward proxy).
    Method,
    /// The endpoint's name does not make an authority: 503.
    Unavailable(&'static str),
}

/// What the application must get right whatever the endpoint: an HTTP/1.1 request names one
/// Host (RFC 9112 §3.2; as Envoy, an absolute-form URI's authority stands in for a missing
/// one), and CONNECT is not a request to forward.
pub(super) fn check(parts: &http::request::Parts) -> Result<(), Refusal> {
    if parts.method == http::Method::CONNECT {
        return Err(Refusal::Method);
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err(Refusal::BadRequest("more than one Host header")),
        (None, _) if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
            Err(Refusal::BadRequest("request has no Host"))
        }
        _ => Ok(()),
    }
}

/// The comma-separated options of every `Connection` header.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Removes hop-by-hop headers, including those the `Connection` header names. `TE` survives
/// only as `trailers` (gRPC needs it).
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there is nothing to do: one pass over the names says so without hashing.
    let needs_work =
        headers.iter().any(|(name, value)| is_hop_by_hop(name) || (name == header::TE && value != "trailers"));
    if !needs_work {
        return;
    }
    let named: Vec<HeaderName> =
        connection_tokens(headers).filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok()).collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// HTTP/2 clients may send `cookie` as one field per cookie (RFC 9113 §8.2.3); an HTTP/1.1
/// request carries a single `Cookie` header, so they are joined with `; ` on the way, as Envoy
/// does: an HTTP/1.1 server may read only the first.
fn join_cookies(headers: &mut HeaderMap) {
    let Some(Cow::Owned(joined)) = joined_values(headers, &header::COOKIE) else { return };
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Rewrites the request for the endpoint at `addr`: hop-by-hop headers, Host / `:authority`
/// (`hostname`, a DNS endpoint's name, as Kuma's `autoHostRewrite`), URI form and version.
pub(super) fn prepare_request(
    parts: &mut http::request::Parts,
    addr: &TargetAddr,
    hostname: Option<&str>,
    tls: bool,
    http2: bool,
    upgrade: bool,
) -> Result<(), Refusal> {
    let upgrade_value = upgrade.then(|| parts.headers.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(&mut parts.headers);
    if !http2 && parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    if let Some(value) = upgrade_value {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, value);
    }
    let scheme = if tls { Scheme::HTTPS } else { Scheme::HTTP };
    if hostname.is_none() {
        // IP and unix endpoints keep the application's authority. Mostly the request already
        // has the form the endpoint gets; only the other cases are rebuilt below.
        let has_host = parts.headers.contains_key(header::HOST);
        if http2 && !has_host && parts.uri.scheme() == Some(&scheme) && parts.uri.authority().is_some() {
            parts.version = Version::HTTP_2;
            return Ok(());
        }
        if !http2 && has_host {
            if parts.uri.authority().is_some() {
                parts.uri =
                    Uri::from(parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
            }
            parts.version = Version::HTTP_11;
            return Ok(());
        }
    }
    let authority: Authority = match (hostname, addr) {
        (Some(name), TargetAddr::Socket(addr)) => {
            let default_port = if tls { 443 } else { 80 };
            let text = if addr.port() == default_port { name.to_string() } else { format!("{name}:{}", addr.port()) };
            text.parse().map_err(|_| Refusal::Unavailable("endpoint name is not a valid authority"))?
        }
        _ => match parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            Some(host) => host.parse().map_err(|_| Refusal::BadRequest("invalid Host header"))?,
            None => parts.uri.authority().cloned().ok_or(Refusal::BadRequest("request has no Host"))?,
        },
    };
    let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    if http2 {
        parts.headers.remove(header::HOST);
        parts.uri = Uri::builder()
            .scheme(scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| Refusal::BadRequest("invalid request URI"))?;
        parts.version = Version::HTTP_2;
    } else {
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| Refusal::BadRequest("invalid Host"))?;
        parts.headers.insert(header::HOST, host);
        parts.uri = Uri::from(path);
        parts.version = Version::HTTP_11;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        let normalized = |path: &str| {
            let mut uri: Uri = path.parse().unwrap();
            normalize_path(&mut uri);
            uri.to_string()
        };
        assert_eq!(normalized("/public/../admin"), "/admin");
        assert_eq!(normalized("/a/./b/../c?x=/../y"), "/a/c?x=/../y", "the query is left alone");
        assert_eq!(normalized("/../../etc"), "/etc");
        assert_eq!(normalized("/a/b/.."), "/a/");
        assert_eq!(normalized("/a/."), "/a/");
        assert_eq!(normalized("/.."), "/");
        assert_eq!(normalized("http://h.test/a/../b"), "http://h.test/b");
        assert_eq!(normalized("/a..b/.c/..."), "/a..b/.c/...", "not dot segments");
        assert_eq!(normalized("/plain/path"), "/plain/path");
    }

    use http::Request;

    use super::*;

    #[test]
    fn the_quick_hop_by_hop_check_matches_the_list() {
        assert!(HOP_BY_HOP.iter().all(is_hop_by_hop));
        for other in [header::HOST, header::TE, header::CONTENT_LENGTH, HeaderName::from_static("x-connection")] {
            assert!(!is_hop_by_hop(&other), "{other}");
        }
    }

    #[test]
    fn requests_take_the_form_the_endpoint_gets() {
        use Version as V;
        // (application's version, URI, Host; endpoint's DNS name, port, TLS, h2) → (URI, Host)
        type Case = (V, &'static str, Option<&'static str>, Option<&'static str>, u16, bool, bool);
        let cases: [(Case, (&str, Option<&str>)); 8] = [
            // HTTP/1 to an IP endpoint: the application's Host and path stay.
            (
                (V::HTTP_11, "/p?q=1", Some("app.example:8080"), None, 80, false, false),
                ("/p?q=1", Some("app.example:8080")),
            ),
            (
                (V::HTTP_11, "http://app.example/p", Some("app.example"), None, 80, false, false),
                ("/p", Some("app.example")),
            ),
            // h2 to an IP endpoint: the URI stays as it is when its scheme fits.
            ((V::HTTP_2, "http://10.0.0.1:81/M", None, None, 81, false, true), ("http://10.0.0.1:81/M", None)),
            ((V::HTTP_2, "http://10.0.0.1:81/M", None, None, 81, true, true), ("https://10.0.0.1:81/M", None)),
            // HTTP/1 from the application, h2 to the endpoint: Host becomes the authority.
            ((V::HTTP_11, "/M", Some("app.example"), None, 81, false, true), ("http://app.example/M", None)),
            // DNS endpoints: Host / :authority is the endpoint's name, with its port unless default.
            (
                (V::HTTP_11, "/p", Some("app.example"), Some("api.example.com"), 443, true, false),
                ("/p", Some("api.example.com")),
            ),
            (
                (V::HTTP_11, "/p", Some("app"), Some("api.example.com"), 8443, true, false),
                ("/p", Some("api.example.com:8443")),
            ),
            (
                (V::HTTP_2, "http://app.example/M", None, Some("grpc.example.com"), 443, true, true),
                ("https://grpc.example.com/M", None),
            ),
        ];
        for (i, ((version, uri, host, hostname, port, tls, http2), (want_uri, want_host))) in
            cases.into_iter().enumerate()
        {
            let mut builder = Request::builder().version(version).uri(uri);
            if let Some(host) = host {
                builder = builder.header(header::HOST, host);
            }
            let (mut parts, ()) = builder.body(()).unwrap().into_parts();
            let addr = TargetAddr::Socket(format!("10.0.0.1:{port}").parse().unwrap());
            prepare_request(&mut parts, &addr, hostname, tls, http2, false).unwrap();
            assert_eq!(parts.uri.to_string(), want_uri, "case {i}");
            assert_eq!(parts.headers.get(header::HOST).map(|h| h.to_str().unwrap()), want_host, "case {i}");
            assert_eq!(parts.version, if http2 { V::HTTP_2 } else { V::HTTP_11 }, "case {i}");
        }
    }

    #[test]
    fn split_http2_cookies_reach_an_http1_endpoint_as_one_header() {
        let request = |version| {
            let builder = Request::builder().version(version).uri("http://app.example/p");
            let builder = builder.header(header::COOKIE, "a=1").header(header::COOKIE, "b=2");
            builder.body(()).unwrap().into_parts().0
        };
        let addr = TargetAddr::Socket("10.0.0.1:80".parse().unwrap());
        let cookies = |parts: &http::request::Parts| {
            parts.headers.get_all(header::COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect::<Vec<_>>()
        };
        let mut to_http1 = request(Version::HTTP_2);
        prepare_request(&mut to_http1, &addr, None, false, false, false).unwrap();
        assert_eq!(cookies(&to_http1), ["a=1; b=2"]);
        let mut to_http2 = request(Version::HTTP_2);
        prepare_request(&mut to_http2, &addr, None, false, true, false).unwrap();
        assert_eq!(cookies(&to_http2), ["a=1", "b=2"], "HTTP/2 to HTTP/2: as they came");
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before, "gRPC's headers pass as they are");
    }
}
