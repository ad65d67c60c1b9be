//! Passive health of one upstream address: consecutive connect failures eject it for a back-off
//! period that doubles with each ejection in a row, as Envoy's outlier detection does.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The most the base ejection time is multiplied by.
const MAX_EJECTION_DOUBLINGS: u32 = 5;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

#[derive(Debug, Clone, Copy)]
pub struct EjectionPolicy {
    /// Consecutive connect failures that eject an address.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts.
    pub base_time: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self { consecutive_failures: 3, base_time: Duration::from_secs(10) }
    }
}

/// Outlier-detection counters (see [`super::outlier`]).
#[derive(Debug, Default)]
pub struct OutlierCounters {
    pub(super) consecutive_5xx: AtomicU32,
    pub(super) consecutive_gateway: AtomicU32,
    pub(super) consecutive_local: AtomicU32,
    pub(super) interval_successes: AtomicU32,
    pub(super) interval_failures: AtomicU32,
    pub(super) times_ejected: AtomicU32,
}

/// Active health-check state (see [`super::active`]).
#[derive(Debug, Default)]
pub struct ActiveState {
    pub(super) failures: AtomicU32,
    pub(super) successes: AtomicU32,
    /// Failed `unhealthyThreshold` checks in a row: no new traffic.
    pub(super) unhealthy: AtomicBool,
}

#[derive(Debug, Default)]
pub struct Health {
    /// Connections (or requests) open now; the balancer prefers the lower count.
    active: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since the process epoch; 0 when not ejected.
    ejected_until: AtomicU64,
    pub(super) outlier: OutlierCounters,
    pub(super) checks: ActiveState,
}

impl Health {
    /// Not ejected and not failing its active health check.
    pub fn is_healthy(&self) -> bool {
        !self.is_ejected() && !self.checks.unhealthy.load(Relaxed)
    }

    /// Ejected by outlier detection now. An endpoint never ejected (0) skips reading the clock,
    /// which every request's endpoint pick would otherwise do.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && until > now_ms()
    }

    /// Failing its active health check (for the admin API).
    pub fn failing_active_check(&self) -> bool {
        self.checks.unhealthy.load(Relaxed)
    }

    /// Forgets the active health-check state (the check was removed).
    pub fn clear_active(&self) {
        self.checks.unhealthy.store(false, Relaxed);
        self.checks.failures.store(0, Relaxed);
        self.checks.successes.store(0, Relaxed);
    }

    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }

    pub fn record_success(&self) {
        // Every worker records here: write only what changes.
        for counter in [&self.failures, &self.ejections] {
            if counter.load(Relaxed) != 0 {
                counter.store(0, Relaxed);
            }
        }
    }

    /// Counts a failed connect; returns `true` when it ejected the address.
    pub fn record_failure(&self, policy: &EjectionPolicy) -> bool {
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        if failures < policy.consecutive_failures.max(1) {
            return false;
        }
        self.failures.store(0, Relaxed);
        let doublings = self.ejections.fetch_add(1, Relaxed).min(MAX_EJECTION_DOUBLINGS);
        self.eject_for(policy.base_time.saturating_mul(1 << doublings));
        true
    }

    /// Ejects the address for `duration` from now.
    pub fn eject_for(&self, duration: Duration) {
        self.ejected_until.store(now_ms() + duration.as_millis() as u64, Relaxed);
    }

    /// Marks one connection or request open until the guard drops.
    pub fn track(self: &std::sync::Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }
}

#[derive(Debug)]
pub struct ActiveGuard(std::sync::Arc<Health>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_after_consecutive_failures_only() {
        let policy = EjectionPolicy { consecutive_failures: 3, base_time: Duration::from_secs(60) };
        let h = Health::default();
        assert!(!h.record_failure(&policy));
        assert!(!h.record_failure(&policy));
        h.record_success();
        assert!(!h.record_failure(&policy));
        assert!(!h.record_failure(&policy));
        assert!(h.is_healthy());
        assert!(h.record_failure(&policy));
        assert!(!h.is_healthy());
    }

    #[test]
    fn ejection_lapses() {
        let policy = EjectionPolicy { consecutive_failures: 1, base_time: Duration::ZERO };
        let h = Health::default();
        assert!(h.record_failure(&policy));
        assert!(h.is_healthy());
    }
}
