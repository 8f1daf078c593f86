//! A fixed budget for file bytes held in memory by uploads (reads waiting to be sent, parts
//! in flight), shared by every upload of a job, so the agent's memory stays flat whatever
//! the file sizes and however many files sync at once. Part buffers are recycled within the
//! budget: a fresh multi-MiB buffer costs a page fault per 4 KiB, a reused one nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits are KiB, so that a `u32` permit count covers any budget.
const UNIT: u64 = 1024;

#[derive(Debug, Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    permits: Arc<Semaphore>,
    limit: u64,
    /// Bytes currently held (written by `acquire` and by guards on drop).
    in_use: AtomicU64,
    /// Highest `in_use` ever seen, for tests and benchmarks.
    peak: AtomicU64,
    /// Finished part buffers, for reuse. Their capacity and the bytes in use stay within
    /// `limit` together: counted apart, a full budget of parts in flight beside a full pool
    /// of spares held twice the budget.
    spare: Mutex<Vec<BytesMut>>,
}

/// Bytes held until dropped.
#[derive(Debug)]
pub struct BudgetGuard {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    inner: Arc<Inner>,
}

impl ByteBudget {
    pub fn new(limit_bytes: u64) -> Self {
        let units = limit_bytes.div_ceil(UNIT).clamp(1, u64::from(u32::MAX));
        ByteBudget {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(units as usize)),
                limit: units * UNIT,
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                spare: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Waits until `bytes` fit. A request larger than the whole budget takes all of it,
    /// so it runs alone rather than never. Spare buffers give way to it.
    pub async fn acquire(&self, bytes: u64) -> BudgetGuard {
        let guard = self.acquire_alone(bytes).await;
        self.trim_spare();
        guard
    }

    /// [`ByteBudget::acquire`] for a part read into a buffer of `len` bytes (contents
    /// unspecified), a spare one when there is one.
    pub async fn acquire_buffer(&self, len: usize) -> (BudgetGuard, BytesMut) {
        let mut guard = self.acquire_alone(len as u64).await;
        // The spare that fits is taken before the others give way to the new part, and the
        // budget is charged for all it holds (a short last part in a whole part's buffer
        // holds the whole buffer); one the budget has no room for is let go.
        let buffer = match self.take_spare(len) {
            Some(mut buf) if self.extend(&mut guard, buf.capacity() as u64) => {
                // Only bytes past the old length are zeroed; a same-size part costs nothing.
                buf.resize(len, 0);
                buf
            }
            _ => BytesMut::zeroed(len),
        };
        self.trim_spare();
        (guard, buffer)
    }

    /// Grows `guard` to hold `to` bytes if the budget has room now (never waits: the caller
    /// already holds some of it).
    fn extend(&self, guard: &mut BudgetGuard, to: u64) -> bool {
        if to <= guard.bytes {
            return true;
        }
        let (have, want) = (guard.bytes.div_ceil(UNIT), to.div_ceil(UNIT));
        let Ok(units) = u32::try_from(want - have) else {
            return false;
        };
        let Ok(more) = self.inner.permits.clone().try_acquire_many_owned(units) else {
            return false;
        };
        guard._permit.merge(more);
        let extra = to - guard.bytes;
        guard.bytes = to;
        let now = self.inner.in_use.fetch_add(extra, Ordering::SeqCst) + extra;
        self.inner.peak.fetch_max(now, Ordering::SeqCst);
        true
    }

    async fn acquire_alone(&self, bytes: u64) -> BudgetGuard {
        let held = bytes.clamp(1, self.inner.limit);
        let units = held.div_ceil(UNIT) as u32;
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("the budget's semaphore is never closed");
        let now = self.inner.in_use.fetch_add(held, Ordering::SeqCst) + held;
        self.inner.peak.fetch_max(now, Ordering::SeqCst);
        BudgetGuard {
            _permit: permit,
            bytes: held,
            inner: self.inner.clone(),
        }
    }

    /// The smallest spare buffer of at least `len` bytes, so that a short last part does not
    /// take a whole part's buffer while a smaller one fits.
    fn take_spare(&self, len: usize) -> Option<BytesMut> {
        let mut spare = self
            .inner
            .spare
            .lock()
            .expect("the spare list is never poisoned");
        let at = (0..spare.len())
            .filter(|&i| spare[i].capacity() >= len)
            .min_by_key(|&i| spare[i].capacity());
        at.map(|i| spare.swap_remove(i))
    }

    /// Hands a sent part's buffer back with the budget it held: kept for reuse if nothing
    /// else still refers to it and it fits beside the bytes others hold.
    pub fn recycle(&self, bytes: Bytes, guard: BudgetGuard) {
        let Ok(mut buf) = bytes.try_into_mut() else {
            return;
        };
        let mut spare = self
            .inner
            .spare
            .lock()
            .expect("the spare list is never poisoned");
        let others = self.in_use().saturating_sub(guard.bytes);
        let kept: u64 = spare.iter().map(|b| b.capacity() as u64).sum();
        if others + kept + buf.capacity() as u64 <= self.inner.limit {
            let cap = buf.capacity();
            // Full length, so that the next `resize` to a part size zeroes nothing.
            buf.resize(cap, 0);
            spare.push(buf);
        }
        drop(guard);
    }

    /// Drops spare buffers until they fit beside the bytes in use.
    fn trim_spare(&self) {
        let mut spare = self
            .inner
            .spare
            .lock()
            .expect("the spare list is never poisoned");
        let mut kept: u64 = spare.iter().map(|b| b.capacity() as u64).sum();
        while kept + self.in_use() > self.inner.limit {
            let Some(buf) = spare.pop() else { break };
            kept -= buf.capacity() as u64;
        }
    }

    /// Bytes in use and spare capacity together: what uploads hold in memory at most.
    #[cfg(test)]
    fn held(&self) -> u64 {
        let spare = self.inner.spare.lock().unwrap();
        self.in_use() + spare.iter().map(|b| b.capacity() as u64).sum::<u64>()
    }

    pub fn in_use(&self) -> u64 {
        self.inner.in_use.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> u64 {
        self.inner.peak.load(Ordering::SeqCst)
    }
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        self.inner.in_use.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn never_more_than_the_limit_in_use() {
        let budget = ByteBudget::new(10 * 1024);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50u64 {
            let b = budget.clone();
            tasks.spawn(async move {
                let _g = b.acquire(1024 * (1 + i % 4)).await;
                tokio::task::yield_now().await;
                assert!(b.in_use() <= b.limit());
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert!(budget.peak() <= budget.limit());
        assert!(budget.peak() >= 4096);
        assert_eq!(budget.in_use(), 0);
        // Larger than the budget: takes all of it, does not hang.
        let g = budget.acquire(1 << 30).await;
        assert_eq!(budget.in_use(), budget.limit());
        drop(g);
    }

    /// Parts in flight and recycled buffers share the budget: a full budget of parts sent
    /// and recycled, then a full budget of new ones, never holds more than the limit.
    #[tokio::test]
    async fn spare_buffers_and_parts_in_flight_share_the_budget() {
        const PART: usize = 8 * 1024;
        let budget = ByteBudget::new(4 * PART as u64);
        let sent: Vec<_> = {
            let mut held = Vec::new();
            for _ in 0..4 {
                held.push(budget.acquire_buffer(PART).await);
            }
            held
        };
        for (guard, buf) in sent {
            budget.recycle(buf.freeze(), guard);
            assert!(budget.held() <= budget.limit(), "{}", budget.held());
        }
        // Reused while it fits: no new buffer for a part of the same size.
        let mut again = Vec::new();
        for _ in 0..4 {
            again.push(budget.acquire_buffer(PART).await);
            assert!(budget.held() <= budget.limit(), "{}", budget.held());
        }
        // Bytes acquired for hashing make spares give way too.
        for (guard, buf) in again.drain(..2) {
            budget.recycle(buf.freeze(), guard);
        }
        let hashing = budget.acquire(2 * PART as u64).await;
        assert!(budget.held() <= budget.limit(), "{}", budget.held());
        // A short last part takes the smallest spare that fits.
        drop(hashing);
        for (guard, buf) in again.drain(..) {
            budget.recycle(buf.freeze(), guard);
        }
        let (_g, tail) = budget.acquire_buffer(100).await;
        assert!(tail.capacity() >= 100);
        // Charged for all the buffer holds, not for the 100 bytes asked.
        assert!(
            budget.in_use() >= tail.capacity() as u64,
            "{}",
            budget.in_use()
        );
        assert!(budget.held() <= budget.limit(), "{}", budget.held());
    }
}
