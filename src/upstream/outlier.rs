//! Outlier detection: what each connect and response says about an endpoint address, and when
//! that ejects it.
//!
//! Without a MeshCircuitBreaker `outlierDetection`, consecutive connect failures eject an
//! address (`--eject-after`, doubling back-off). With one, Envoy's detectors apply: consecutive
//! 5xx (`totalFailures`), consecutive gateway errors (`gatewayFailures`), consecutive local
//! failures (`localOriginFailures`, with `splitExternalAndLocalErrors`), and, every `interval`,
//! success rate and failure percentage across the service's addresses.

use std::sync::atomic::Ordering::Relaxed;

use super::health::Health;
use super::{Target, Upstream};
use crate::policy::runtime::{OutlierDetection, MAX_EJECTION_TIME};

/// What one exchange with an address told us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    /// Connect failure or timeout, or a TLS handshake failure.
    ConnectFailed,
    /// The connection was reset or timed out before a response.
    LocalFailure,
    /// A response arrived with this status.
    Response(u16),
}

impl Outcome {
    fn is_local(self) -> bool {
        matches!(self, Self::Connected | Self::ConnectFailed | Self::LocalFailure)
    }

    fn failed_locally(self) -> bool {
        matches!(self, Self::ConnectFailed | Self::LocalFailure)
    }
}

/// Counts `outcome` against `target` under the service's detection and ejects the address when
/// a detector trips; returns whether it did.
pub(super) fn record(upstream: &Upstream, target: &Target, outcome: Outcome) -> bool {
    let policy = upstream.policy();
    let health = &target.health;
    let ejected = match &policy.outlier {
        crate::policy::runtime::Outlier::Disabled => false,
        crate::policy::runtime::Outlier::Default => match outcome {
            Outcome::Connected => {
                health.record_success();
                false
            }
            Outcome::ConnectFailed => health.record_failure(&upstream.settings.ejection),
            Outcome::LocalFailure | Outcome::Response(_) => false,
        },
        crate::policy::runtime::Outlier::Detect(detect) => {
            // An address already ejected (still picked in panic mode) is not ejected again.
            detect_consecutive(health, detect, outcome) && !health.is_ejected() && may_eject(upstream, detect) && {
                health.eject_for(ejection_time(health, detect));
                true
            }
        }
    };
    if ejected {
        upstream.metrics.ejections.inc();
        tracing::warn!(service = %upstream.service(), target = %target.addr, ?outcome, "endpoint ejected by outlier detection");
    }
    ejected
}

/// Updates the consecutive counters and the interval statistics; `true` when a consecutive
/// detector reached its threshold.
fn detect_consecutive(health: &Health, d: &OutlierDetection, outcome: Outcome) -> bool {
    let c = &health.outlier;
    // Without the split, a local failure counts as the 503 Envoy maps it to.
    let as_response = match outcome {
        Outcome::Response(status) => Some(status),
        o if o.failed_locally() && !d.split_local_errors => Some(503),
        _ => None,
    };
    let failed = as_response.is_some_and(|s| s >= 500) || (d.split_local_errors && outcome.failed_locally());
    if outcome != Outcome::Connected && (d.success_rate.is_some() || d.failure_percentage.is_some()) {
        let counter = if failed { &c.interval_failures } else { &c.interval_successes };
        counter.fetch_add(1, Relaxed);
    }
    let bump = |counter: &std::sync::atomic::AtomicU32, threshold: Option<u32>| {
        threshold.is_some_and(|t| counter.fetch_add(1, Relaxed) + 1 >= t.max(1))
    };
    let mut tripped = false;
    match as_response {
        Some(status) if status >= 500 => {
            tripped |= bump(&c.consecutive_5xx, d.consecutive_total);
            if matches!(status, 502..=504) {
                tripped |= bump(&c.consecutive_gateway, d.consecutive_gateway);
            } else {
                reset(&c.consecutive_gateway);
            }
        }
        Some(_) => {
            reset(&c.consecutive_5xx);
            reset(&c.consecutive_gateway);
        }
        None => {}
    }
    if d.split_local_errors && outcome.is_local() {
        if outcome.failed_locally() {
            tripped |= bump(&c.consecutive_local, d.consecutive_local);
        } else {
            reset(&c.consecutive_local);
        }
    }
    if tripped {
        reset(&c.consecutive_5xx);
        reset(&c.consecutive_gateway);
        reset(&c.consecutive_local);
    }
    tripped
}

/// Zeroes a counter shared by every worker, writing only when it is not zero already: a run of
/// successes then only reads the line.
fn reset(counter: &std::sync::atomic::AtomicU32) {
    if counter.load(Relaxed) != 0 {
        counter.store(0, Relaxed);
    }
}

/// `maxEjectionPercent`: one address can always be ejected; more only while the ejected share
/// stays below the limit.
fn may_eject(upstream: &Upstream, d: &OutlierDetection) -> bool {
    let targets = upstream.targets();
    let ejected = targets.iter().filter(|t| t.health.is_ejected()).count();
    ejected == 0 || (ejected + 1) * 100 <= usize::from(d.max_ejection_percent) * targets.len()
}

/// Envoy's: the base time times the number of ejections in a row, at most five minutes.
fn ejection_time(health: &Health, d: &OutlierDetection) -> std::time::Duration {
    let times = health.outlier.times_ejected.fetch_add(1, Relaxed) + 1;
    d.base_ejection_time.saturating_mul(times).min(MAX_EJECTION_TIME.max(d.base_ejection_time))
}

/// The interval detectors (success rate, failure percentage) over the counts since the last
/// evaluation; returns the addresses ejected. Addresses that stayed healthy through an interval
/// have their ejection count lowered, as Envoy does.
pub(super) fn evaluate_interval(upstream: &Upstream, d: &OutlierDetection) -> usize {
    let targets = upstream.targets();
    let stats: Vec<(u32, u32)> = targets
        .iter()
        .map(|t| {
            let c = &t.health.outlier;
            (c.interval_successes.swap(0, Relaxed), c.interval_failures.swap(0, Relaxed))
        })
        .collect();
    let mut eject = vec![false; targets.len()];
    if let Some(fp) = &d.failure_percentage {
        let eligible: Vec<usize> =
            (0..targets.len()).filter(|&i| stats[i].0 + stats[i].1 >= fp.request_volume).collect();
        if eligible.len() >= fp.minimum_hosts as usize {
            for &i in &eligible {
                let (ok, failed) = stats[i];
                if u64::from(failed) * 100 >= u64::from(fp.threshold) * u64::from(ok + failed) {
                    eject[i] = true;
                }
            }
        }
    }
    if let Some(sr) = &d.success_rate {
        let eligible: Vec<(usize, f64)> = (0..targets.len())
            .filter(|&i| stats[i].0 + stats[i].1 >= sr.request_volume)
            .map(|i| (i, f64::from(stats[i].0) / f64::from(stats[i].0 + stats[i].1)))
            .collect();
        if eligible.len() >= sr.minimum_hosts as usize && !eligible.is_empty() {
            let n = eligible.len() as f64;
            let mean = eligible.iter().map(|(_, r)| r).sum::<f64>() / n;
            let variance = eligible.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
            let floor = mean - sr.stdev_factor * variance.sqrt();
            for (i, rate) in eligible {
                if rate < floor {
                    eject[i] = true;
                }
            }
        }
    }
    let mut ejected = 0;
    for (target, eject) in targets.iter().zip(eject) {
        if eject && !target.health.is_ejected() && may_eject(upstream, d) {
            target.health.eject_for(ejection_time(&target.health, d));
            upstream.metrics.ejections.inc();
            tracing::warn!(service = %upstream.service(), target = %target.addr, "endpoint ejected by outlier detection (interval detectors)");
            ejected += 1;
        } else if !target.health.is_ejected() {
            let _ = target.health.outlier.times_ejected.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }
    ejected
}
