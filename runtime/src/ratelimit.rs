//! Upload bandwidth (`[upload] bandwidth_limit_bytes_per_sec`): a token bucket every byte an
//! upload sends to the store is taken from first, so that uploads cannot starve the other
//! traffic of a shared NIC (NCCL). One bucket for the whole agent, shared by every upload
//! (cheap to clone).
//!
//! The bucket holds one second's worth of bytes (the burst) and refills at the rate. A take
//! reserves its bytes at once and may drive the bucket into debt; the taker then sleeps until
//! that debt is paid off at the rate. So:
//! * a take larger than the burst (a 64 MiB part under a 10 MB/s limit) waits in proportion
//!   to its size, then proceeds; it never waits for a bucket that can never hold it;
//! * concurrent takers queue in the order they reserved, each sleeping once, for exactly its
//!   turn: nobody polls, nobody is overtaken by a smaller take;
//! * a wait is finite: at most (bytes reserved before it + its own) / rate, in arithmetic
//!   that saturates instead of overflowing.
//!
//! A reservation is not given back when its taker is dropped while it waits: the bucket then
//! errs on the side of sending less.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Tokens are nano-bytes (1e-9 byte): the bucket gains exactly `rate` of them per
/// nanosecond, so refills never round away bytes however often they happen.
const NANO: i128 = 1_000_000_000;

/// A shared bytes-per-second limit. Clones share one bucket.
#[derive(Clone)]
pub struct RateLimit {
    inner: Arc<Inner>,
}

struct Inner {
    /// Bytes per second, at least 1.
    rate: u64,
    /// Never held across an await (a few arithmetic operations), so a plain mutex.
    bucket: Mutex<Bucket>,
}

struct Bucket {
    /// Nano-bytes available at `at`; negative while takers wait (debt).
    tokens: i128,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("bytes_per_sec", &self.inner.rate)
            .finish()
    }
}

impl RateLimit {
    /// A limit of `bytes_per_sec` (0 is taken as 1: "unlimited" is no `RateLimit` at all),
    /// starting with a full bucket (one second's worth).
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1);
        RateLimit {
            inner: Arc::new(Inner {
                rate,
                bucket: Mutex::new(Bucket {
                    tokens: burst(rate),
                    at: Instant::now(),
                }),
            }),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.inner.rate
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn take(&self, n: u64) {
        if n == 0 {
            return;
        }
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            // `sleep` (not `sleep_until`): a deadline past the end of time is clamped, not
            // an overflow.
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `n` bytes out of the bucket at `now`; returns how long the taker must wait
    /// for the debt this leaves to be paid off.
    fn reserve(&self, n: u64, now: Instant) -> Duration {
        let rate = i128::from(self.inner.rate);
        let mut bucket = self
            .inner
            .bucket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let elapsed = now.saturating_duration_since(bucket.at).as_nanos();
        let refill = i128::try_from(elapsed)
            .unwrap_or(i128::MAX)
            .saturating_mul(rate);
        bucket.tokens = bucket
            .tokens
            .saturating_add(refill)
            .min(burst(self.inner.rate));
        bucket.at = bucket.at.max(now);
        bucket.tokens = bucket
            .tokens
            .saturating_sub(i128::from(n).saturating_mul(NANO));
        if bucket.tokens >= 0 {
            return Duration::ZERO;
        }
        // Rounded up, so the debt is paid off when the taker wakes up.
        let nanos = bucket.tokens.unsigned_abs().div_ceil(rate.unsigned_abs());
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// One second's worth of bytes, in nano-bytes.
fn burst(rate: u64) -> i128 {
    i128::from(rate).saturating_mul(NANO)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn the_rate_holds_over_many_takes() {
        let limit = RateLimit::new(1000);
        let start = Instant::now();
        let mut sent = 0u64;
        for i in 0..200u64 {
            let n = 1 + (i * 37) % 150;
            limit.take(n).await;
            sent += n;
            // Never more than the burst plus what the rate allowed since the start.
            let elapsed = start.elapsed().as_secs_f64();
            assert!(
                sent as f64 <= 1000.0 + 1000.0 * elapsed + 1e-6,
                "{sent} bytes after {elapsed}s"
            );
        }
        let expected = Duration::from_millis(sent - 1000);
        let took = start.elapsed();
        assert!(took >= expected, "{took:?} < {expected:?}");
        assert!(
            took <= expected + Duration::from_millis(1),
            "{took:?}: waited more than the rate asks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_second_of_burst_is_free() {
        let limit = RateLimit::new(1000);
        let start = Instant::now();
        limit.take(600).await;
        limit.take(400).await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a full bucket sends at once"
        );
        limit.take(1).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1));
        // An idle bucket fills up to one second's worth, no more.
        tokio::time::sleep(10 * SEC).await;
        let idle = Instant::now();
        limit.take(1000).await;
        assert_eq!(idle.elapsed(), Duration::ZERO);
        limit.take(500).await;
        assert_eq!(idle.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_larger_than_the_burst_waits_in_proportion() {
        let limit = RateLimit::new(1000);
        let start = Instant::now();
        limit.take(1_000_000).await;
        assert_eq!(start.elapsed(), Duration::from_secs(999));
        // The debt was paid: one more second's worth has accrued.
        limit.take(1).await;
        assert_eq!(start.elapsed(), Duration::from_millis(999_001));
    }

    #[tokio::test(start_paused = true)]
    async fn extreme_values_neither_overflow_nor_hang() {
        let fast = RateLimit::new(u64::MAX);
        let start = Instant::now();
        fast.take(u64::MAX).await;
        fast.take(u64::MAX).await;
        assert!(start.elapsed() <= SEC);
        // 0 is 1 byte/s; a take that needs centuries is a finite wait, not a panic.
        let slow = RateLimit::new(0);
        assert_eq!(slow.bytes_per_sec(), 1);
        let waited = tokio::time::timeout(SEC, slow.take(u64::MAX)).await;
        assert!(waited.is_err(), "it has to wait");
        // Centuries of debt: the wait is capped where a `Duration` of nanoseconds ends.
        for _ in 0..4 {
            let wait = slow.reserve(u64::MAX, Instant::now());
            assert_eq!(wait, Duration::from_nanos(u64::MAX));
        }
        assert!(slow.reserve(1, Instant::now()) > Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_all_finish_in_turn() {
        let limit = RateLimit::new(1000);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20u64 {
            let limit = limit.clone();
            tasks.spawn(async move {
                limit.take(500).await;
                (i, start.elapsed())
            });
        }
        let mut done = Vec::new();
        while let Some(r) = tasks.join_next().await {
            done.push(r.unwrap());
        }
        assert_eq!(done.len(), 20);
        // 10,000 bytes at 1000/s with 1000 free: the last one is done after 9 s, not later.
        let last = done.iter().map(|(_, t)| *t).max().unwrap();
        assert_eq!(last, Duration::from_secs(9));
        // Each taker waited for its own turn only: the k-th finished when its bytes were due.
        let mut times: Vec<_> = done.iter().map(|(_, t)| *t).collect();
        times.sort();
        for (k, t) in times.iter().enumerate() {
            let due = Duration::from_millis((500 * (k as u64 + 1)).saturating_sub(1000));
            assert_eq!(*t, due, "taker {k}");
        }
    }
}
