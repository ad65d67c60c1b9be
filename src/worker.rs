//! Which data-path worker the current thread is. Per-worker state (metric shards, connection
//! pools) has one slot per worker, indexed by it, so a request writes only its own worker's
//! cache lines and takes only its own worker's locks.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Slots of per-worker state: the workers plus slot 0 for every other thread.
static SLOTS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// Sizes the per-worker state made from now on for `workers` worker threads. Called once at
/// start-up, before any configuration is compiled; state made before keeps its slot count.
pub fn set_workers(workers: usize) {
    SLOTS.store(workers + 1, Ordering::Relaxed);
}

/// Marks the calling thread as worker `index` (0-based).
pub fn enter(index: usize) {
    SLOT.with(|s| s.set(index + 1));
}

/// How many slots per-worker state made now should have.
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed).max(1)
}

/// This thread's slot: 1 + its worker index, 0 for a thread that is no worker (the control
/// plane, health checks, tests' runtimes).
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// This thread's slot in per-worker state made with `len` slots (state made before
/// [`set_workers`] has fewer: every thread then shares one).
pub fn slot_in(len: usize) -> usize {
    slot() % len
}

/// A cache line of its own, so neighbouring slots written by different workers do not share one.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Line<T>(pub T);
