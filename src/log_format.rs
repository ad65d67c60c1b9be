//! Envoy access-log format strings (command operators such as `%START_TIME%`,
//! `%REQ(X-FORWARDED-FOR?USER-AGENT):20%`) and Kuma's `%KUMA_*%` values: parsed once per
//! configuration, rendered per record (on the access-log writer, off the data path).
//!
//! Pure: values come from a [`Lookup`] the caller implements.

use std::borrow::Cow;
use std::collections::BTreeMap;

/// Kuma's values, substituted when the format is compiled (as Kuma does at config time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KumaValues {
    pub mesh: String,
    pub source_service: String,
    pub source_address: String,
    pub destination_service: String,
    pub zone: String,
}

/// A command operator, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    StartTime,
    /// Milliseconds from the start to the end of the record.
    Duration,
    /// Envoy's: bytes sent to the application (response body, or TCP payload back).
    BytesSent,
    /// Envoy's: bytes received from the application.
    BytesReceived,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    UpstreamHost,
    UpstreamCluster,
    UpstreamTransportFailureReason,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RequestedServerName,
    Hostname,
    /// `%REQ(A?B):N%`: the first header present of `names`, cut to `max` characters.
    Request {
        names: Vec<String>,
        max: Option<usize>,
    },
    Response {
        names: Vec<String>,
        max: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Op(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    pieces: Vec<Piece>,
}

/// A rendered value: typed, so that JSON gets numbers where Envoy gives numbers.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    Number(u64),
}

/// Where operator values come from; `None` is "not available" (`-` in plain text, `null` in
/// JSON, left out with `omitEmptyValues`).
pub trait Lookup {
    fn value(&self, op: &Operator) -> Option<Value<'_>>;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("unsupported command operator %{0}%")]
    Unsupported(String),
    #[error("%{0}%: arguments are not supported for this operator (%START_TIME% has RFC 3339 only)")]
    Arguments(String),
    #[error("command operator starting at byte {0} is not closed with %")]
    Unclosed(usize),
    #[error("%{0}% needs a header name, as %{0}(X-HEADER)%")]
    MissingHeader(&'static str),
    #[error("invalid length in %{0}%")]
    BadLength(String),
}

impl Format {
    /// Parses `text`, substituting `%KUMA_*%` values.
    pub fn parse(text: &str, kuma: &KumaValues) -> Result<Self, FormatError> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find('%') {
            literal.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            let Some(end) = find_close(after) else { return Err(FormatError::Unclosed(offset + start)) };
            let body = &after[..end];
            match kuma_value(body, kuma) {
                Some(value) => literal.push_str(&value),
                None => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(Piece::Op(operator(body)?));
                }
            }
            offset += start + 2 + end;
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(Self { pieces })
    }

    /// Request headers the format reads (lowercase), for capturing them per request.
    pub fn request_headers(&self) -> impl Iterator<Item = &str> {
        self.headers(true)
    }

    pub fn response_headers(&self) -> impl Iterator<Item = &str> {
        self.headers(false)
    }

    fn headers(&self, request: bool) -> impl Iterator<Item = &str> {
        self.pieces
            .iter()
            .flat_map(move |p| match p {
                Piece::Op(Operator::Request { names, .. }) if request => names.as_slice(),
                Piece::Op(Operator::Response { names, .. }) if !request => names.as_slice(),
                _ => &[],
            })
            .map(String::as_str)
    }

    /// Plain text; a missing value is `-`, or nothing with `omit_empty`.
    pub fn render(&self, lookup: &dyn Lookup, omit_empty: bool, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Op(op) => match lookup.value(op) {
                    Some(Value::Text(t)) => out.push_str(&t),
                    Some(Value::Number(n)) => out.push_str(&n.to_string()),
                    None if omit_empty => {}
                    None => out.push('-'),
                },
            }
        }
    }

    /// A JSON value: a lone operator keeps its type (number, string, null), anything else is
    /// rendered as text.
    pub fn render_json(&self, lookup: &dyn Lookup) -> serde_json::Value {
        match self.pieces.as_slice() {
            [Piece::Op(op)] => match lookup.value(op) {
                Some(Value::Text(t)) => serde_json::Value::String(t.into_owned()),
                Some(Value::Number(n)) => serde_json::Value::from(n),
                None => serde_json::Value::Null,
            },
            _ => {
                let mut text = String::new();
                self.render(lookup, false, &mut text);
                serde_json::Value::String(text)
            }
        }
    }
}

/// Renders `fields` as one JSON object; `omit_empty` leaves out null values.
pub fn render_json_object(fields: &[(String, Format)], lookup: &dyn Lookup, omit_empty: bool) -> String {
    let mut object = serde_json::Map::new();
    for (key, format) in fields {
        let value = format.render_json(lookup);
        if !(omit_empty && value.is_null()) {
            object.insert(key.clone(), value);
        }
    }
    serde_json::Value::Object(object).to_string()
}

/// The `%` closing an operator, skipping `%` inside `(...)` (a `START_TIME` format).
fn find_close(text: &str) -> Option<usize> {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '%' if depth <= 0 => return Some(i),
            _ => {}
        }
    }
    None
}

fn kuma_value(body: &str, kuma: &KumaValues) -> Option<String> {
    Some(match body {
        "KUMA_MESH" => kuma.mesh.clone(),
        "KUMA_SOURCE_SERVICE" => kuma.source_service.clone(),
        "KUMA_DESTINATION_SERVICE" => kuma.destination_service.clone(),
        "KUMA_SOURCE_ADDRESS_WITHOUT_PORT" => kuma.source_address.clone(),
        "KUMA_SOURCE_ADDRESS" => format!("{}:0", kuma.source_address),
        "KUMA_TRAFFIC_DIRECTION" => "OUTBOUND".to_string(),
        "KUMA_ZONE" => kuma.zone.clone(),
        "KUMA_WORKLOAD" => String::new(),
        _ => return None,
    })
}

fn operator(body: &str) -> Result<Operator, FormatError> {
    let (name, args, max) = split_operator(body)?;
    let headers = |what: &'static str| -> Result<Vec<String>, FormatError> {
        let args = args.filter(|a| !a.is_empty()).ok_or(FormatError::MissingHeader(what))?;
        Ok(args.split('?').map(|h| h.trim().to_ascii_lowercase()).collect())
    };
    // Only REQ and RESP take arguments here: an argument elsewhere (a START_TIME format, say)
    // would be ignored without a word.
    if args.is_some_and(|a| !a.is_empty()) && !matches!(name, "REQ" | "RESP") {
        return Err(FormatError::Arguments(body.to_string()));
    }
    Ok(match name {
        "START_TIME" => Operator::StartTime,
        "DURATION" => Operator::Duration,
        "BYTES_SENT" => Operator::BytesSent,
        "BYTES_RECEIVED" => Operator::BytesReceived,
        "PROTOCOL" => Operator::Protocol,
        "RESPONSE_CODE" => Operator::ResponseCode,
        "RESPONSE_FLAGS" => Operator::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
        "UPSTREAM_HOST" => Operator::UpstreamHost,
        "UPSTREAM_CLUSTER" => Operator::UpstreamCluster,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Operator::UpstreamTransportFailureReason,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS" => Operator::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" | "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT" => {
            Operator::DownstreamRemoteAddressWithoutPort
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
        "REQUESTED_SERVER_NAME" => Operator::RequestedServerName,
        "HOSTNAME" => Operator::Hostname,
        "REQ" => Operator::Request { names: headers("REQ")?, max },
        "RESP" => Operator::Response { names: headers("RESP")?, max },
        _ => return Err(FormatError::Unsupported(body.to_string())),
    })
}

/// `NAME`, `NAME(ARGS)` or `NAME(ARGS):LEN`.
fn split_operator(body: &str) -> Result<(&str, Option<&str>, Option<usize>), FormatError> {
    let Some(open) = body.find('(') else { return Ok((body, None, None)) };
    let close = body.rfind(')').filter(|&c| c > open).ok_or_else(|| FormatError::Unsupported(body.to_string()))?;
    let max = match &body[close + 1..] {
        "" => None,
        tail => {
            let len = tail.strip_prefix(':').and_then(|n| n.parse().ok());
            Some(len.ok_or_else(|| FormatError::BadLength(body.to_string()))?)
        }
    };
    Ok((&body[..open], Some(&body[open + 1..close]), max))
}

/// The first present header of `names` in `headers` (lowercase names), cut to `max` chars.
pub fn header_value<'a>(
    headers: &'a BTreeMap<String, String>,
    names: &[String],
    max: Option<usize>,
) -> Option<Value<'a>> {
    let value = names.iter().find_map(|n| headers.get(n))?;
    Some(Value::Text(match max {
        Some(max) if value.chars().count() > max => Cow::Owned(value.chars().take(max).collect()),
        _ => Cow::Borrowed(value.as_str()),
    }))
}

/// Kuma's default formats (`pkg/plugins/policies/meshaccesslog/plugin/xds`).
pub const DEFAULT_TCP_FORMAT: &str = "[%START_TIME%] %RESPONSE_FLAGS% %KUMA_MESH% %KUMA_SOURCE_ADDRESS_WITHOUT_PORT%(%KUMA_SOURCE_SERVICE%)->%UPSTREAM_HOST%(%KUMA_DESTINATION_SERVICE%) took %DURATION%ms, sent %BYTES_SENT% bytes, received: %BYTES_RECEIVED% bytes";
pub const DEFAULT_HTTP_FORMAT: &str = r#"[%START_TIME%] %KUMA_MESH% "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-B3-TRACEID?X-DATADOG-TRACEID)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%KUMA_SOURCE_SERVICE%" "%KUMA_DESTINATION_SERVICE%" "%KUMA_SOURCE_ADDRESS_WITHOUT_PORT%" "%UPSTREAM_HOST%""#;

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(BTreeMap<String, String>);

    impl Lookup for Fixed {
        fn value(&self, op: &Operator) -> Option<Value<'_>> {
            match op {
                Operator::Duration => Some(Value::Number(12)),
                Operator::UpstreamHost => Some(Value::Text("10.0.0.1:443".into())),
                Operator::Request { names, max } => header_value(&self.0, names, *max),
                _ => None,
            }
        }
    }

    fn kuma() -> KumaValues {
        KumaValues { mesh: "default".into(), destination_service: "httpbin".into(), ..KumaValues::default() }
    }

    #[test]
    fn operators_kuma_values_and_headers() {
        let f = Format::parse(
            "%KUMA_MESH% %UPSTREAM_HOST% took %DURATION%ms %REQ(X-A?USER-AGENT):3% %RESPONSE_FLAGS%",
            &kuma(),
        )
        .unwrap();
        let headers: BTreeMap<String, String> = [("user-agent".to_string(), "curl/8".to_string())].into();
        let mut out = String::new();
        f.render(&Fixed(headers.clone()), false, &mut out);
        assert_eq!(out, "default 10.0.0.1:443 took 12ms cur -");
        let mut omitted = String::new();
        f.render(&Fixed(headers), true, &mut omitted);
        assert_eq!(omitted, "default 10.0.0.1:443 took 12ms cur ");
        assert_eq!(f.request_headers().collect::<Vec<_>>(), ["x-a", "user-agent"]);
    }

    #[test]
    fn json_values_keep_their_types() {
        let fields = vec![
            ("took".to_string(), Format::parse("%DURATION%", &kuma()).unwrap()),
            ("dst".to_string(), Format::parse("%KUMA_DESTINATION_SERVICE%", &kuma()).unwrap()),
            ("flags".to_string(), Format::parse("%RESPONSE_FLAGS%", &kuma()).unwrap()),
        ];
        let fixed = Fixed(BTreeMap::new());
        assert_eq!(render_json_object(&fields, &fixed, false), r#"{"dst":"httpbin","flags":null,"took":12}"#);
        assert_eq!(render_json_object(&fields, &fixed, true), r#"{"dst":"httpbin","took":12}"#);
    }

    #[test]
    fn errors_name_the_operator() {
        assert_eq!(Format::parse("%NOPE%", &kuma()), Err(FormatError::Unsupported("NOPE".into())));
        assert_eq!(Format::parse("a %DURATION", &kuma()), Err(FormatError::Unclosed(2)));
        assert_eq!(Format::parse("%REQ()%", &kuma()), Err(FormatError::MissingHeader("REQ")));
        assert_eq!(Format::parse("%REQ(A):x%", &kuma()), Err(FormatError::BadLength("REQ(A):x".into())));
        // Ignored without a word before: the line said the default time.
        assert_eq!(Format::parse("%START_TIME(%s)%", &kuma()), Err(FormatError::Arguments("START_TIME(%s)".into())));
        assert!(Format::parse("%START_TIME()%", &kuma()).is_ok());
        assert!(Format::parse(DEFAULT_HTTP_FORMAT, &kuma()).is_ok());
        assert!(Format::parse(DEFAULT_TCP_FORMAT, &kuma()).is_ok());
    }
}
