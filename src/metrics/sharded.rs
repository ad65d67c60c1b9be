//! Per-worker metric shards: each worker thread writes its own cache line and a scrape sums the
//! shards, so a request never writes a line another worker writes (prometheus-client's
//! `Counter` is one shared atomic, its `Histogram` a shared mutex). Threads that are no worker
//! (the control plane, health checks) share shard 0.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::worker::{self, Line};

#[derive(Debug, Clone)]
pub struct Counter(Arc<[Line<AtomicU64>]>);

impl Default for Counter {
    fn default() -> Self {
        Self((0..worker::slots()).map(|_| Line::default()).collect())
    }
}

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, v: u64) {
        self.0[worker::slot_in(self.0.len())].0.fetch_add(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|l| l.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Counter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Counter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Debug, Clone)]
pub struct Gauge(Arc<[Line<AtomicI64>]>);

impl Default for Gauge {
    fn default() -> Self {
        Self((0..worker::slots()).map(|_| Line::default()).collect())
    }
}

impl Gauge {
    pub fn inc(&self) {
        self.0[worker::slot_in(self.0.len())].0.fetch_add(1, Ordering::Relaxed);
    }

    /// May run on another worker than its `inc`: only the sum is meaningful.
    pub fn dec(&self) {
        self.0[worker::slot_in(self.0.len())].0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.iter().map(|l| l.0.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for Gauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Gauge {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Latency buckets, upper bounds in seconds: 100 µs doubling to about 13 s (then +Inf).
const BUCKETS: usize = 18;

fn upper_bound(i: usize) -> f64 {
    0.0001 * f64::from(1u32 << i)
}

#[derive(Debug, Default)]
struct HistogramShard {
    /// An `f64`'s bits.
    sum: AtomicU64,
    count: AtomicU64,
    /// Non-cumulative; the last is +Inf.
    buckets: [AtomicU64; BUCKETS + 1],
}

/// A latency histogram with the buckets of [`upper_bound`].
#[derive(Debug, Clone)]
pub struct Histogram(Arc<[Line<HistogramShard>]>);

impl Default for Histogram {
    fn default() -> Self {
        Self((0..worker::slots()).map(|_| Line::default()).collect())
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        let shard = &self.0[worker::slot_in(self.0.len())].0;
        let bucket = (0..BUCKETS).find(|i| seconds <= upper_bound(*i)).unwrap_or(BUCKETS);
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.count.fetch_add(1, Ordering::Relaxed);
        // Only this thread writes the shard's sum (or, for shard 0, rarely another): a plain
        // load and store would lose nothing on a worker, the update keeps shard 0 exact too.
        let _ = shard.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + seconds).to_bits())
        });
    }

    /// Sum, count and the non-cumulative buckets, over every shard.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> =
            (0..=BUCKETS).map(|i| (if i < BUCKETS { upper_bound(i) } else { f64::MAX }, 0)).collect();
        let (mut sum, mut count) = (0.0, 0);
        for line in self.0.iter() {
            let shard = &line.0;
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
            count += shard.count.load(Ordering::Relaxed);
            for (total, bucket) in buckets.iter_mut().zip(&shard.buckets) {
                total.1 += bucket.load(Ordering::Relaxed);
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_write_their_own_lines_and_a_scrape_sums_them() {
        worker::set_workers(2);
        let (counter, gauge, histogram) = (Counter::default(), Gauge::default(), Histogram::default());
        worker::set_workers(0);
        std::thread::scope(|s| {
            for worker in 0..2 {
                let (counter, gauge, histogram) = (&counter, &gauge, &histogram);
                s.spawn(move || {
                    worker::enter(worker);
                    for _ in 0..1000 {
                        counter.inc();
                        gauge.inc();
                        histogram.observe(0.00015);
                    }
                    gauge.dec();
                });
            }
        });
        counter.inc(); // shard 0: this thread is no worker
        assert_eq!(counter.get(), 2001);
        // Each worker's writes are on its own line, none on the others'.
        let per_shard: Vec<u64> = counter.0.iter().map(|l| l.0.load(Ordering::Relaxed)).collect();
        assert_eq!(per_shard, [1, 1000, 1000]);
        assert_eq!(std::mem::align_of::<Line<AtomicU64>>(), 64);
        assert_eq!(gauge.get(), 1998);
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 2000);
        assert!((sum - 0.3).abs() < 1e-9);
        assert_eq!(buckets[1], (0.0002, 2000), "0.15 ms is in the 200 µs bucket");
        assert_eq!(buckets.last().map(|b| b.0), Some(f64::MAX));
    }
}
