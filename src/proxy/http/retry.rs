//! MeshRetry's decisions for one request: whether it may be retried at all, whether an
//! attempt's result calls for another, and how long to back off first.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::request::Parts;
use http::{HeaderMap, Response, StatusCode};
use rand::Rng as _;

use crate::policy::runtime::RetryPolicy;

/// How an attempt ended without a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AttemptFailure {
    /// No connection: connect failure, timeout or TLS handshake failure.
    Connect,
    /// The connection failed or was reset before the response headers, or the per-try timeout
    /// passed.
    Reset,
    /// HTTP/2 `REFUSED_STREAM`: the endpoint did not process the request.
    RefusedStream,
    /// A limit of this proxy (no endpoint, connection limits): not retried.
    Local,
}

impl RetryPolicy {
    /// Whether the request qualifies: with neither `HttpMethod*` items nor
    /// `retriableRequestHeaders`, all do; else one listed method or one matching header is
    /// enough. Kuma turns each method into a `:method` matcher appended to Envoy's
    /// `retriable_request_headers`, which a request passes by matching any one of them.
    pub(super) fn admits(&self, parts: &Parts) -> bool {
        (self.methods.is_empty() && self.retriable_request_headers.is_empty())
            || self.methods.contains(&parts.method)
            || self.retriable_request_headers.iter().any(|m| m.matches(&parts.headers))
    }

    /// Whether an attempt that got no response is retried.
    pub(super) fn retries_failure(&self, failure: AttemptFailure) -> bool {
        let on = &self.on;
        let any_reset = on.five_xx || on.gateway_error || on.reset;
        match failure {
            AttemptFailure::Connect => on.connect_failure || any_reset,
            AttemptFailure::Reset => any_reset,
            AttemptFailure::RefusedStream => on.refused_stream || any_reset,
            AttemptFailure::Local => false,
        }
    }

    /// Whether a response is retried (it has not been sent on: only its head arrived).
    pub(super) fn retries_response<B>(&self, response: &Response<B>) -> bool {
        let status = response.status();
        let code = status.as_u16();
        let on = &self.on;
        let headers = response.headers();
        // An upstream Envoy's rate limit: retried only with `EnvoyRatelimited`, whatever else
        // the response matches (as Envoy's `wouldRetryFromHeaders`).
        if headers.contains_key("x-envoy-ratelimited") {
            return on.envoy_ratelimited;
        }
        (on.five_xx && status.is_server_error())
            || (on.gateway_error && matches!(code, 502..=504))
            || (on.retriable_4xx && status == StatusCode::CONFLICT)
            || self.status_codes.contains(&code)
            || self.retriable_response_headers.iter().any(|m| m.matches(headers))
            || grpc_status(headers).is_some_and(|s| self.grpc_statuses.contains(&s))
    }

    /// The wait before retry number `retry` (1 for the first): a reset header's value when
    /// the response has one within `rateLimitedBackOff.maxInterval`, else Envoy's jittered
    /// exponential back-off, random in `[0, (2^retry - 1) × baseInterval]`, capped.
    pub(super) fn back_off(&self, retry: u32, response_headers: Option<&HeaderMap>) -> Duration {
        if let Some(headers) = response_headers {
            for h in &self.rate_limited {
                let Some(value) = headers.get(&h.name).and_then(|v| v.to_str().ok()) else { continue };
                let Some(wait) = reset_wait(value.trim(), h.unix_timestamp) else { continue };
                if wait <= self.rate_limited_max {
                    return wait;
                }
            }
        }
        let factor = (1u64 << retry.min(30)) - 1;
        let ceiling =
            self.base_interval.saturating_mul(u32::try_from(factor).unwrap_or(u32::MAX)).min(self.max_interval);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::rng().random_range(0..=u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX)))
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A `Retry-After`-style value: seconds, or a Unix timestamp to wait until.
fn reset_wait(value: &str, unix_timestamp: bool) -> Option<Duration> {
    let number: f64 = value.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    // `try_`: a value past what a `Duration` holds (an endpoint's) is not a wait, not a panic.
    if !unix_timestamp {
        return Duration::try_from_secs_f64(number).ok();
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    Duration::try_from_secs_f64((number - now).max(0.0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::runtime::{HeaderMatcher, HeaderTest, ResetHeader, RetryOn};
    use http::header::HeaderName;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            num_retries: 3,
            per_try_timeout: None,
            base_interval: Duration::from_millis(25),
            max_interval: Duration::from_millis(250),
            rate_limited: vec![ResetHeader { name: HeaderName::from_static("retry-after"), unix_timestamp: false }],
            rate_limited_max: Duration::from_secs(5),
            on: RetryOn { gateway_error: true, ..RetryOn::default() },
            status_codes: vec![418],
            grpc_statuses: vec![14],
            methods: vec![],
            retriable_response_headers: vec![HeaderMatcher {
                name: HeaderName::from_static("x-retry"),
                test: HeaderTest::Present,
            }],
            retriable_request_headers: vec![],
            omit_previous_hosts: false,
        }
    }

    fn response(status: u16, headers: &[(&'static str, &'static str)]) -> Response<()> {
        let mut r = Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    /// `HttpMethod*` items and `retriableRequestHeaders` are one list of alternatives, as in
    /// the Envoy configuration Kuma makes of them: a listed method or a matching header.
    #[test]
    fn methods_and_request_headers_are_alternatives() {
        let request = |method: &str, header: Option<&str>| {
            let mut builder = http::Request::builder().method(method);
            if let Some(name) = header {
                builder = builder.header(name, "1");
            }
            builder.body(()).unwrap().into_parts().0
        };
        let mut p = policy();
        assert!(p.admits(&request("POST", None)), "neither: every request");
        p.methods = vec![http::Method::GET];
        p.retriable_request_headers =
            vec![HeaderMatcher { name: HeaderName::from_static("x-idempotent"), test: HeaderTest::Present }];
        assert!(p.admits(&request("GET", None)), "a listed method");
        assert!(p.admits(&request("POST", Some("x-idempotent"))), "a matching header");
        assert!(!p.admits(&request("POST", None)));
        p.methods.clear();
        assert!(!p.admits(&request("GET", None)), "headers only: one must match");
    }

    #[test]
    fn which_responses_and_failures_are_retried() {
        let p = policy();
        assert!(p.retries_response(&response(503, &[])));
        assert!(!p.retries_response(&response(500, &[])), "gateway-error is 502, 503, 504 only");
        assert!(p.retries_response(&response(418, &[])));
        assert!(p.retries_response(&response(200, &[("x-retry", "1")])));
        assert!(p.retries_response(&response(200, &[("grpc-status", "14")])));
        assert!(!p.retries_response(&response(200, &[("grpc-status", "13")])));
        // An upstream Envoy's rate limit is retried only with EnvoyRatelimited.
        assert!(!p.retries_response(&response(503, &[("x-envoy-ratelimited", "true")])));
        let mut limited = policy();
        limited.on.envoy_ratelimited = true;
        assert!(limited.retries_response(&response(429, &[("x-envoy-ratelimited", "true")])));
        assert!(p.retries_failure(AttemptFailure::Connect));
        assert!(p.retries_failure(AttemptFailure::Reset));
        assert!(!p.retries_failure(AttemptFailure::Local));
    }

    #[test]
    fn back_off_is_jittered_capped_and_follows_reset_headers() {
        let p = policy();
        for retry in 1..8 {
            let ceiling = (Duration::from_millis(25) * ((1 << retry) - 1)).min(Duration::from_millis(250));
            for _ in 0..50 {
                assert!(p.back_off(retry, None) <= ceiling);
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(p.back_off(1, Some(&headers)), Duration::from_secs(2));
        headers.insert("retry-after", "60".parse().unwrap());
        assert!(p.back_off(1, Some(&headers)) <= Duration::from_millis(25), "over maxInterval: ignored");
        // Past what a Duration holds: ignored (it panicked the request's task).
        headers.insert("retry-after", "99999999999999999999".parse().unwrap());
        assert!(p.back_off(1, Some(&headers)) <= Duration::from_millis(25));
        assert_eq!(reset_wait("1e300", true), None);
    }
}
