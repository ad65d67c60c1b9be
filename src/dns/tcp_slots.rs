//! DNS-over-TCP connection slots. At most [`super::MAX_TCP_CONNECTIONS`] are served at once;
//! when all are taken, a new connection takes the slot of the one that has waited longest for
//! its next query (RFC 7766 §6.2.3: a server under load may close idle connections), so clients
//! that connect and send nothing cannot keep everyone else out. A connection busy with a query
//! is never closed for another.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a new connection waits for the slot of the connection it closed.
const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

pub(super) struct TcpSlots {
    permits: Arc<Semaphore>,
    open: Mutex<Vec<Arc<Slot>>>,
}

/// One served connection's slot.
pub(super) struct Slot {
    /// Since when the connection waits for its next query; `None` while it answers one.
    idle_since: Mutex<Option<Instant>>,
    /// Told to close: another connection needs the slot.
    evict: Notify,
}

/// A connection's hold on its slot, given up when dropped.
pub(super) struct Held {
    slots: Arc<TcpSlots>,
    pub(super) slot: Arc<Slot>,
    _permit: OwnedSemaphorePermit,
}

impl TcpSlots {
    pub(super) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { permits: Arc::new(Semaphore::new(max)), open: Mutex::default() })
    }

    /// A slot for a new connection: a free one, else the longest-idle connection's once it has
    /// closed; `None` when every connection is busy with a query.
    pub(super) async fn take(self: &Arc<Self>) -> Option<Held> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.evict_longest_idle()?;
                tokio::time::timeout(TAKEOVER_WAIT, self.permits.clone().acquire_owned()).await.ok()?.ok()?
            }
        };
        let slot = Arc::new(Slot { idle_since: Mutex::new(Some(Instant::now())), evict: Notify::new() });
        self.open.lock().unwrap_or_else(PoisonError::into_inner).push(slot.clone());
        Some(Held { slots: self.clone(), slot, _permit: permit })
    }

    fn evict_longest_idle(&self) -> Option<()> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, longest) = open
            .iter()
            .filter_map(|slot| Some(((*slot.idle_since.lock().unwrap_or_else(PoisonError::into_inner))?, slot)))
            .min_by_key(|(since, _)| *since)?;
        // Marked busy so that the next eviction picks another.
        longest.set_idle(false);
        longest.evict.notify_one();
        Some(())
    }
}

impl Slot {
    /// The connection waits for its next query (`true`) or answers one.
    pub(super) fn set_idle(&self, idle: bool) {
        *self.idle_since.lock().unwrap_or_else(PoisonError::into_inner) = idle.then(Instant::now);
    }

    /// Completes when another connection takes this slot.
    pub(super) async fn evicted(&self) {
        self.evict.notified().await;
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.slots.open.lock().unwrap_or_else(PoisonError::into_inner).retain(|s| !Arc::ptr_eq(s, &self.slot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_table_closes_the_longest_idle_connection_never_a_busy_one() {
        let slots = TcpSlots::new(3);
        let busy = slots.take().await.unwrap();
        busy.slot.set_idle(false);
        let oldest = slots.take().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let newer = slots.take().await.unwrap();

        let taker = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::timeout(Duration::from_secs(5), oldest.slot.evicted()).await.unwrap();
        drop(oldest); // the evicted connection's task ends
        let taken = taker.await.unwrap().expect("the new connection gets the idle one's slot");
        taken.slot.set_idle(false);

        // `newer` is the only idle one left: it goes next; then, with every connection busy,
        // a new one is turned away.
        let next = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::timeout(Duration::from_secs(5), newer.slot.evicted()).await.unwrap();
        drop(newer);
        let last = next.await.unwrap().expect("newer's slot");
        last.slot.set_idle(false);
        assert!(slots.take().await.is_none());
        drop((busy, taken, last));
    }

    #[tokio::test]
    async fn no_idle_connection_means_no_slot() {
        let slots = TcpSlots::new(1);
        let busy = slots.take().await.unwrap();
        busy.slot.set_idle(false);
        assert!(slots.take().await.is_none());
    }
}
