//! Rapid reset (CVE-2023-44487), paced or not: a client that opens streams and cancels them
//! before their response makes the proxy do the work of each (routing, an upstream request,
//! perhaps a connection) for nothing. Each application connection counts its streams and those
//! cancelled before an answer and, on HTTP/2, within a second of their start (as Envoy's
//! `premature_reset_min_stream_lifetime_seconds`: a client whose calls hit their own deadlines
//! cancels later than that); past a budget (a minimum count, and half of all streams, as
//! Envoy's premature-reset rule) the connection is asked to go away (GOAWAY).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Cancelled streams a connection may have before the ratio applies.
pub(super) const MIN_PREMATURE_RESETS: u32 = 100;
/// An HTTP/2 stream cancelled later than this after its start is not a premature reset.
const PREMATURE_WITHIN: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct ResetBudget {
    streams: AtomicU32,
    resets: AtomicU32,
    exceeded: Notify,
}

impl ResetBudget {
    /// A stream begins; the guard counts it as cancelled unless [`StreamGuard::answered`] (or,
    /// for an HTTP/2 stream, it lived past [`PREMATURE_WITHIN`]). HTTP/1 requests read no clock:
    /// one cancelled there ends its connection anyway.
    pub(super) fn stream(&self, http2: bool) -> StreamGuard<'_> {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard { budget: self, answered: false, started: http2.then(Instant::now) }
    }

    /// Completes once the connection has cancelled too many streams.
    pub(super) async fn exceeded(&self) {
        self.exceeded.notified().await;
    }
}

pub(super) struct StreamGuard<'a> {
    budget: &'a ResetBudget,
    answered: bool,
    started: Option<Instant>,
}

impl StreamGuard<'_> {
    pub(super) fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        if self.answered || self.started.is_some_and(|at| at.elapsed() >= PREMATURE_WITHIN) {
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
            drop(budget.stream(true));
        }
        // Many answered streams keep the ratio below one half.
        for _ in 0..MIN_PREMATURE_RESETS * 2 {
            budget.stream(true).answered();
        }
        drop(budget.stream(true));
        assert!(budget.exceeded().now_or_never().is_none(), "100 of 300 streams cancelled: within budget");
        for _ in 0..MIN_PREMATURE_RESETS * 2 {
            drop(budget.stream(false));
        }
        assert!(budget.exceeded().now_or_never().is_some(), "300 of 500 cancelled: past it");
    }

    /// HTTP/2 streams cancelled a second or more after their start (calls that hit the client's
    /// own deadline) are not premature resets, as in Envoy.
    #[tokio::test(start_paused = true)]
    async fn streams_cancelled_after_a_second_are_not_premature() {
        use futures_util::FutureExt as _;
        let budget = ResetBudget::default();
        let late: Vec<_> = (0..MIN_PREMATURE_RESETS * 2).map(|_| budget.stream(true)).collect();
        tokio::time::sleep(PREMATURE_WITHIN).await;
        drop(late);
        assert!(budget.exceeded().now_or_never().is_none(), "200 streams cancelled after 1 s: not premature");
        let early: Vec<_> = (0..MIN_PREMATURE_RESETS * 2).map(|_| budget.stream(true)).collect();
        drop(early);
        assert!(budget.exceeded().now_or_never().is_some(), "200 of 400 cancelled at once: past the budget");
    }
}
