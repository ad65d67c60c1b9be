//! Trace context on the wire, as Envoy's tracers read and write it: W3C Trace Context
//! (`traceparent`, `tracestate`) for the OpenTelemetry backend, B3 (the `x-b3-*` headers, and the
//! single `b3` header on the way in) for Zipkin.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which headers carry the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    W3c,
    B3,
}

/// The caller's span, as its headers describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: u128,
    /// B3 only: the caller sent a 64-bit trace id (kept that width on the way out).
    pub narrow: bool,
    pub span_id: u64,
    /// `None`: the caller left the decision to us (B3 without `x-b3-sampled`).
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on unchanged.
    pub trace_state: Option<HeaderValue>,
}

/// What the headers say: a parent span, only a sampling decision (B3 `b3: 0`), nothing, or
/// something that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    Parent(Parent),
    SamplingOnly(bool),
    Absent,
    /// A context header that does not parse: Envoy makes no span and sends no context then.
    Invalid,
}

impl Propagation {
    pub fn extract(self, headers: &HeaderMap) -> Extracted {
        match self {
            Self::W3c => w3c(headers),
            Self::B3 => b3(headers),
        }
    }

    /// Writes the context of our span (`span_id`, child of `parent_span_id`) for the endpoint,
    /// replacing whatever the caller sent.
    pub fn inject(self, headers: &mut HeaderMap, span: &Outgoing<'_>) {
        match self {
            Self::W3c => {
                let value = format!(
                    "00-{:032x}-{:016x}-{}",
                    span.trace_id,
                    span.span_id,
                    if span.sampled { "01" } else { "00" }
                );
                insert(headers, TRACEPARENT, value);
                if let Some(state) = span.trace_state {
                    headers.insert(TRACESTATE, state.clone());
                }
            }
            Self::B3 => {
                let trace_id = if span.narrow {
                    format!("{:016x}", span.trace_id as u64)
                } else {
                    format!("{:032x}", span.trace_id)
                };
                headers.remove(B3);
                insert(headers, B3_TRACE_ID, trace_id);
                insert(headers, B3_SPAN_ID, format!("{:016x}", span.span_id));
                match span.parent_span_id {
                    Some(parent) => insert(headers, B3_PARENT_SPAN_ID, format!("{parent:016x}")),
                    None => drop(headers.remove(B3_PARENT_SPAN_ID)),
                }
                headers.remove(B3_FLAGS);
                headers.insert(B3_SAMPLED, HeaderValue::from_static(if span.sampled { "1" } else { "0" }));
            }
        }
    }
}

/// Our span, as the endpoint is told about it.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub trace_id: u128,
    pub narrow: bool,
    pub span_id: u64,
    pub parent_span_id: Option<u64>,
    pub sampled: bool,
    pub trace_state: Option<&'a HeaderValue>,
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Hex digits and dashes only: always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// Lowercase hex of exactly `len` digits (W3C) or any case (B3 is lenient).
fn hex(text: &str, len: usize, lowercase_only: bool) -> Option<u128> {
    let ok = text.len() == len
        && text.bytes().all(|b| {
            b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || (!lowercase_only && (b'A'..=b'F').contains(&b))
        });
    ok.then(|| u128::from_str_radix(text, 16).ok()).flatten()
}

/// `version-traceid-parentid-flags`, W3C Trace Context level 1: version 00 has exactly these
/// four fields; a later version may add more, which are ignored. `ff`, all-zero ids and
/// uppercase hex are invalid.
fn w3c(headers: &HeaderMap) -> Extracted {
    let Some(value) = header(headers, &TRACEPARENT) else { return Extracted::Absent };
    let fields: Vec<&str> = value.split('-').collect();
    let parsed = (|| {
        let [version, trace, span, flags, rest @ ..] = fields.as_slice() else { return None };
        let version = hex(version, 2, true)?;
        if version == 0xff || (version == 0 && !rest.is_empty()) {
            return None;
        }
        let trace_id = hex(trace, 32, true).filter(|t| *t != 0)?;
        let span_id = hex(span, 16, true).filter(|s| *s != 0)? as u64;
        let flags = hex(flags, 2, true)?;
        let trace_state = headers.get(TRACESTATE).cloned();
        Some(Parent { trace_id, narrow: false, span_id, sampled: Some(flags & 1 == 1), trace_state })
    })();
    parsed.map_or(Extracted::Invalid, Extracted::Parent)
}

fn b3_sampled(text: &str) -> Option<bool> {
    match text {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_trace_id(text: &str) -> Option<(u128, bool)> {
    match text.len() {
        16 => hex(text, 16, false).filter(|t| *t != 0).map(|t| (t, true)),
        32 => hex(text, 32, false).filter(|t| *t != 0).map(|t| (t, false)),
        _ => None,
    }
}

/// The multi-header form first, then the single `b3` header
/// (`traceid-spanid[-sampled[-parentspanid]]`, or just the sampling state).
fn b3(headers: &HeaderMap) -> Extracted {
    let flags_debug = header(headers, &B3_FLAGS) == Some("1");
    if let Some(trace) = header(headers, &B3_TRACE_ID) {
        let parsed = (|| {
            let (trace_id, narrow) = b3_trace_id(trace)?;
            let span_id = hex(header(headers, &B3_SPAN_ID)?, 16, false).filter(|s| *s != 0)? as u64;
            let sampled = if flags_debug { Some(true) } else { header(headers, &B3_SAMPLED).and_then(b3_sampled) };
            Some(Parent { trace_id, narrow, span_id, sampled, trace_state: None })
        })();
        return parsed.map_or(Extracted::Invalid, Extracted::Parent);
    }
    if let Some(single) = header(headers, &B3) {
        let fields: Vec<&str> = single.split('-').collect();
        return match fields.as_slice() {
            [only] => b3_sampled(only).map_or(Extracted::Invalid, Extracted::SamplingOnly),
            [trace, span, rest @ ..] if rest.len() <= 2 => {
                let parsed = (|| {
                    let (trace_id, narrow) = b3_trace_id(trace)?;
                    let span_id = hex(span, 16, false).filter(|s| *s != 0)? as u64;
                    let sampled = match rest.first() {
                        Some(s) => Some(b3_sampled(s)?),
                        None => None,
                    };
                    Some(Parent { trace_id, narrow, span_id, sampled, trace_state: None })
                })();
                parsed.map_or(Extracted::Invalid, Extracted::Parent)
            }
            _ => Extracted::Invalid,
        };
    }
    match header(headers, &B3_SAMPLED).and_then(b3_sampled) {
        Some(sampled) => Extracted::SamplingOnly(sampled || flags_debug),
        None if flags_debug => Extracted::SamplingOnly(true),
        None => Extracted::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn w3c_traceparent_is_read_with_its_state() {
        let h = headers(&[("traceparent", TP), ("tracestate", "congo=t61rcWkgMzE")]);
        let Extracted::Parent(p) = Propagation::W3c.extract(&h) else { panic!() };
        assert_eq!(p.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(p.span_id, 0xb7ad6b7169203331);
        assert_eq!(p.sampled, Some(true));
        assert_eq!(p.trace_state.unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "garbage",
        ] {
            assert_eq!(Propagation::W3c.extract(&headers(&[("traceparent", bad)])), Extracted::Invalid, "{bad}");
        }
        // A later version may carry more fields.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-more";
        assert!(
            matches!(Propagation::W3c.extract(&headers(&[("traceparent", later)])), Extracted::Parent(p) if p.sampled == Some(false))
        );
    }

    #[test]
    fn w3c_injection_names_our_span() {
        let mut h = headers(&[("traceparent", TP)]);
        let state = HeaderValue::from_static("a=b");
        let out = Outgoing {
            trace_id: 1,
            narrow: false,
            span_id: 2,
            parent_span_id: Some(3),
            sampled: false,
            trace_state: Some(&state),
        };
        Propagation::W3c.inject(&mut h, &out);
        assert_eq!(h["traceparent"], "00-00000000000000000000000000000001-0000000000000002-00");
        assert_eq!(h["tracestate"], "a=b");
    }

    #[test]
    fn b3_multi_and_single_headers_are_read() {
        let multi = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ]);
        let Extracted::Parent(p) = Propagation::B3.extract(&multi) else { panic!() };
        assert_eq!(
            (p.trace_id, p.narrow, p.span_id, p.sampled),
            (0x463ac35c9f6413ad, true, 0xa2fb4a1d1a96d312, Some(true))
        );

        let single = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90")]);
        let Extracted::Parent(p) = Propagation::B3.extract(&single) else { panic!() };
        assert_eq!((p.narrow, p.span_id, p.sampled), (false, 0xe457b5a2e4d86bd1, Some(false)));

        assert_eq!(Propagation::B3.extract(&headers(&[("b3", "0")])), Extracted::SamplingOnly(false));
        assert_eq!(Propagation::B3.extract(&headers(&[("x-b3-flags", "1")])), Extracted::SamplingOnly(true));
        let undecided = headers(&[("x-b3-traceid", "463ac35c9f6413ad"), ("x-b3-spanid", "a2fb4a1d1a96d312")]);
        assert!(matches!(Propagation::B3.extract(&undecided), Extracted::Parent(p) if p.sampled.is_none()));
        assert_eq!(Propagation::B3.extract(&headers(&[("x-b3-traceid", "xyz")])), Extracted::Invalid);
        assert_eq!(Propagation::B3.extract(&HeaderMap::new()), Extracted::Absent);
    }

    #[test]
    fn b3_injection_writes_the_multi_headers() {
        let mut h = headers(&[("b3", "1"), ("x-b3-flags", "1")]);
        let out = Outgoing {
            trace_id: 0xab,
            narrow: true,
            span_id: 0xcd,
            parent_span_id: Some(0xef),
            sampled: true,
            trace_state: None,
        };
        Propagation::B3.inject(&mut h, &out);
        assert_eq!(h["x-b3-traceid"], "00000000000000ab");
        assert_eq!(h["x-b3-spanid"], "00000000000000cd");
        assert_eq!(h["x-b3-parentspanid"], "00000000000000ef");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(h.get("b3").is_none() && h.get("x-b3-flags").is_none());
    }
}
