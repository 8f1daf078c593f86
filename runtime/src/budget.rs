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
    /// Finished part buffers, for reuse; never more than `limit` bytes of capacity.
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
    /// so it runs alone rather than never.
    pub async fn acquire(&self, bytes: u64) -> BudgetGuard {
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

    /// A buffer of `len` bytes (contents unspecified), reused when one is spare.
    pub fn buffer(&self, len: usize) -> BytesMut {
        let reused = {
            let mut spare = self
                .inner
                .spare
                .lock()
                .expect("the spare list is never poisoned");
            let at = spare.iter().position(|b| b.capacity() >= len);
            at.map(|i| spare.swap_remove(i))
        };
        match reused {
            Some(mut buf) => {
                // Only bytes past the old length are zeroed; a same-size part costs nothing.
                buf.resize(len, 0);
                buf
            }
            None => BytesMut::zeroed(len),
        }
    }

    /// Hands a sent part's buffer back, if nothing else still refers to it.
    pub fn recycle(&self, bytes: Bytes) {
        let Ok(mut buf) = bytes.try_into_mut() else {
            return;
        };
        let mut spare = self
            .inner
            .spare
            .lock()
            .expect("the spare list is never poisoned");
        let kept: usize = spare.iter().map(|b| b.capacity()).sum();
        if (kept + buf.capacity()) as u64 <= self.inner.limit {
            let cap = buf.capacity();
            // Full length, so that the next `resize` to a part size zeroes nothing.
            buf.resize(cap, 0);
            spare.push(buf);
        }
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
}
