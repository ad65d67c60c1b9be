//! Rapid reset (CVE-2023-44487), paced or not: a client that opens streams and cancels them
//! before their response makes the proxy do the work of each (routing, an upstream request,
//! perhaps a connection) for nothing. Each application connection counts its streams and those
//! cancelled before an answer; past a budget (as Envoy's premature-reset defaults: a minimum
//! count, and half of all streams) the connection is asked to go away (GOAWAY).

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

/// Cancelled streams a connection may have before the ratio applies.
pub(super) const MIN_PREMATURE_RESETS: u32 = 100;

#[derive(Default)]
pub(super) struct ResetBudget {
    streams: AtomicU32,
    resets: AtomicU32,
    exceeded: Notify,
}

impl ResetBudget {
    /// A stream begins; the guard counts it as cancelled unless [`StreamGuard::answered`].
    pub(super) fn stream(&self) -> StreamGuard<'_> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard { budget: self, answered: false }
    }

    /// Completes once the connection has cancelled too many streams.
    pub(super) async fn exceeded(&self) {
        self.exceeded.notified().await;
    }
}

pub(super) struct StreamGuard<'a> {
    budget: &'a ResetBudget,
    answered: bool,
}

impl StreamGuard<'_> {
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let resets = self.budget.resets.fetch_add(1, Ordering::Relaxed) + 1;
        let streams = self.budget.streams.load(Ordering::Relaxed);
        if resets >= MIN_PREMATURE_RESETS && resets.saturating_mul(2) >= streams {
            self.budget.exceeded.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_a_count_and_a_ratio() {
        use futures_util::FutureExt as _;
        let budget = ResetBudget::default();
        for _ in 0..MIN_PREMATURE_RESETS - 1 {
            drop(budget.stream());
        }
        // Many answered streams keep the ratio below one half.
        for _ in 0..MIN_PREMATURE_RESETS * 2 {
            budget.stream().answered();
        }
        drop(budget.stream());
        assert!(budget.exceeded().now_or_never().is_none(), "100 of 300 streams cancelled: within budget");
        for _ in 0..MIN_PREMATURE_RESETS * 2 {
            drop(budget.stream());
        }
        assert!(budget.exceeded().now_or_never().is_some(), "300 of 500 cancelled: past it");
    }
}
