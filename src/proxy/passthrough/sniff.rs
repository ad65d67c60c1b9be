//! What a passthrough connection speaks, read from its first bytes with `MSG_PEEK`: the bytes
//! stay in the socket, so the connection passes on unchanged whatever is decided.
//!
//! - TLS: a handshake record; the ClientHello's SNI is read with rustls' `Acceptor` (parsed,
//!   never answered);
//! - HTTP/2 with prior knowledge: the client preface;
//! - HTTP/1: a request line's method (upper-case letters, `-`, `_`) and a space;
//! - anything else is opaque TCP.

use std::time::Duration;

use tokio::net::TcpStream;

/// Largest prefix looked at: a ClientHello with post-quantum key shares is about 2 KB; 16 KiB
/// is TLS's largest record.
const MAX_PEEK: usize = 16 * 1024 + 5;
/// The HTTP/2 client preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest method token accepted as the start of an HTTP/1 request line.
const MAX_METHOD: usize = 24;
/// Wait between peeks while a prefix is incomplete (peek does not wait for *more* bytes).
const PEEK_RETRY: Duration = Duration::from_millis(2);
const MAX_PEEK_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sniffed {
    /// A TLS ClientHello, with its SNI when it has one.
    Tls {
        sni: Option<String>,
    },
    Http1,
    Http2,
    /// Not TLS and not HTTP (or the peer closed before saying).
    Opaque,
}

/// Peeks until the prefix decides, the peer closes, or `timeout` passes (then: opaque).
pub(crate) async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let mut buf = vec![0u8; 512];
    let deadline = tokio::time::Instant::now() + timeout;
    let (mut seen, mut wait) = (0, PEEK_RETRY);
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniffed::Opaque,
        };
        if n == seen {
            // Nothing new: peek returns at once while bytes wait, so pause (longer each time)
            // instead of parsing the same prefix again.
            if tokio::time::Instant::now() >= deadline {
                return Sniffed::Opaque;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_PEEK_RETRY);
            continue;
        }
        seen = n;
        if let Some(decided) = decide(&buf[..n]) {
            return decided;
        }
        if n == buf.len() {
            if buf.len() >= MAX_PEEK {
                return Sniffed::Opaque;
            }
            buf.resize((buf.len() * 4).min(MAX_PEEK), 0);
        }
    }
}

/// `None`: the prefix is too short to tell.
pub(crate) fn decide(prefix: &[u8]) -> Option<Sniffed> {
    let first = *prefix.first()?;
    if first == 0x16 {
        return client_hello(prefix);
    }
    if H2_PREFACE.starts_with(&prefix[..prefix.len().min(H2_PREFACE.len())]) {
        return (prefix.len() >= H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    // A method is a token (RFC 9110 §9.1) followed by one space; in practice upper case (as
    // registered methods are), which tells most other protocols apart at the first byte.
    let token = prefix.iter().take(MAX_METHOD + 1).position(|&b| !is_method_char(b));
    Some(match token {
        Some(0) => Sniffed::Opaque,
        Some(end) if prefix[end] == b' ' => Sniffed::Http1,
        Some(_) => Sniffed::Opaque,
        None if prefix.len() > MAX_METHOD => Sniffed::Opaque,
        None => return None,
    })
}

fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// A TLS prefix: `None` until the ClientHello is complete.
fn client_hello(prefix: &[u8]) -> Option<Sniffed> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = prefix;
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).is_err() {
            return Some(Sniffed::Opaque);
        }
    }
    match acceptor.accept() {
        Ok(None) => None,
        Ok(Some(accepted)) => {
            let sni = accepted.client_hello().server_name().map(|s| s.to_ascii_lowercase());
            Some(Sniffed::Tls { sni })
        }
        Err(_) => Some(Sniffed::Opaque),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_hello_bytes(sni: &str) -> Vec<u8> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Nothing is verified before the server answers: empty roots are enough for a hello.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tls_sni_is_read_from_a_complete_client_hello_only() {
        let hello = client_hello_bytes("API.Example.com");
        assert_eq!(decide(&hello), Some(Sniffed::Tls { sni: Some("api.example.com".into()) }));
        assert_eq!(decide(&hello[..hello.len() - 10]), None, "incomplete: wait for more");
        assert_eq!(decide(&hello[..3]), None);
        // A complete handshake message that is no ClientHello (a ServerHello, empty).
        assert_eq!(decide(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]), Some(Sniffed::Opaque));
    }

    #[test]
    fn http_and_opaque_prefixes() {
        assert_eq!(decide(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(decide(b"M-SEARCH * HTTP/1.1"), Some(Sniffed::Http1));
        assert_eq!(decide(b"GE"), None);
        assert_eq!(decide(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(decide(&H2_PREFACE[..10]), None);
        assert_eq!(decide(b"PRIZE "), Some(Sniffed::Http1), "a method that only starts like the preface");
        assert_eq!(decide(b"ping\n"), Some(Sniffed::Opaque));
        assert_eq!(decide(b"ping"), Some(Sniffed::Opaque), "lower case: decided at once");
        assert_eq!(decide(b"\x00\x01"), Some(Sniffed::Opaque));
        assert_eq!(decide(&[b'A'; 40]), Some(Sniffed::Opaque));
        assert_eq!(decide(b""), None);
    }
}
