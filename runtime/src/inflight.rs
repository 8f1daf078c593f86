//! How many files to upload at once, found while uploading: many small files are bound by
//! round trips (more in flight helps until the store or the CPU is saturated), large files by
//! bandwidth (more in flight only holds more memory and opens more connections).
//!
//! A hill climb on measured throughput: every window, the score (bytes per second, each file
//! also counting as [`FILE_WEIGHT`] bytes, its round trip) is compared with the previous
//! window's. A step that raised the score is followed by another in the same direction; a step
//! up that gained little is taken back, and then the limit goes down while going down costs
//! nothing, so a bandwidth-bound upload settles at few files. Bounded on both sides; bytes held
//! stay bounded by the memory budget whatever the limit. A value set in the config is fixed.

use std::time::{Duration, Instant};

/// A file's round trip counted as this many bytes: latency-bound work scores by files,
/// bandwidth-bound work by bytes.
const FILE_WEIGHT: f64 = 64.0 * 1024.0;
/// A window lasts at least this long and sees at least [`WINDOW_FILES`] completions (or
/// [`WINDOW_MAX`] passes): short enough to adapt within a second, long enough not to chase noise.
const WINDOW: Duration = Duration::from_millis(150);
const WINDOW_FILES: u64 = 8;
const WINDOW_MAX: Duration = Duration::from_secs(2);
/// A change of less than this is no change.
const SIGNIFICANT: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trend {
    Up,
    Down,
}

/// The current limit on files in flight and what decides the next one.
#[derive(Debug)]
pub struct FilesInFlight {
    limit: usize,
    min: usize,
    max: usize,
    trend: Trend,
    last_score: Option<f64>,
    window_start: Instant,
    files: u64,
    bytes: u64,
    /// The window after a change is not scored: files started under the old limit are
    /// still finishing in it.
    settling: bool,
}

impl FilesInFlight {
    /// Fixed at `limit`.
    pub fn fixed(limit: usize) -> Self {
        let limit = limit.max(1);
        Self::new(limit, limit, limit)
    }

    /// Starts at `start` and adapts within `min..=max`.
    pub fn adaptive(start: usize, min: usize, max: usize) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        Self::new(start.clamp(min, max), min, max)
    }

    fn new(limit: usize, min: usize, max: usize) -> Self {
        FilesInFlight {
            limit,
            min,
            max,
            trend: Trend::Up,
            last_score: None,
            window_start: Instant::now(),
            files: 0,
            bytes: 0,
            settling: false,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// One file done (`bytes` long), at `now`.
    pub fn done(&mut self, bytes: u64, now: Instant) {
        // Nowhere to go: fixed.
        if self.min == self.max {
            return;
        }
        self.files += 1;
        self.bytes += bytes;
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < WINDOW || (self.files < WINDOW_FILES && elapsed < WINDOW_MAX) {
            return;
        }
        let score = (self.bytes as f64 + self.files as f64 * FILE_WEIGHT) / elapsed.as_secs_f64();
        if !std::mem::take(&mut self.settling) {
            let before = self.limit;
            self.step(score);
            self.settling = self.limit != before;
        }
        self.window_start = now;
        self.files = 0;
        self.bytes = 0;
    }

    fn step(&mut self, score: f64) {
        let Some(last) = self.last_score.replace(score) else {
            self.limit = self.up();
            return;
        };
        let gain = score / last.max(f64::MIN_POSITIVE) - 1.0;
        (self.trend, self.limit) = match self.trend {
            // More in flight paid: more still. It did not: take the step back and try fewer.
            Trend::Up if gain > SIGNIFICANT => (Trend::Up, self.up()),
            Trend::Up => (Trend::Down, self.down()),
            // Fewer cost nothing: fewer still. They cost: back up.
            Trend::Down if gain > -SIGNIFICANT => (Trend::Down, self.down()),
            Trend::Down => (Trend::Up, self.up()),
        };
    }

    fn up(&self) -> usize {
        (self.limit + self.limit.div_ceil(2)).min(self.max)
    }

    fn down(&self) -> usize {
        (self.limit * 2 / 3).max(self.min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives the controller against a model store: each file costs `rtt` plus its bytes at
    /// `bandwidth`, and the store serves at most `cap` requests at once.
    fn settle(mut c: FilesInFlight, size: u64, rtt: f64, bandwidth: f64, cap: usize) -> usize {
        let mut now = Instant::now();
        let mut seen = Vec::new();
        for _ in 0..200 {
            let n = c.limit();
            let per_file = rtt + size as f64 / (bandwidth / n.min(cap) as f64).max(1.0);
            let rate = n.min(cap) as f64 / per_file;
            // One window's worth of completions, evenly spread.
            let files = (rate * 0.2).ceil() as u64 + WINDOW_FILES;
            let gap = Duration::from_secs_f64(1.0 / rate);
            for _ in 0..files {
                now += gap;
                c.done(size, now);
            }
            seen.push(c.limit());
        }
        // Where it spends its time at the end.
        let tail = &seen[seen.len() - 40..];
        tail.iter().sum::<usize>() / tail.len()
    }

    #[test]
    fn latency_bound_small_files_climb_to_what_the_store_can_take() {
        let c = FilesInFlight::adaptive(16, 4, 512);
        // 4 KiB files, 5 ms round trips, a store that serves 200 requests at once.
        let settled = settle(c, 4096, 0.005, 1e9, 200);
        assert!(settled >= 100, "settled at {settled}");
    }

    #[test]
    fn bandwidth_bound_large_files_settle_low() {
        let c = FilesInFlight::adaptive(16, 2, 512);
        // 64 MiB files over 100 MB/s: one file at a time already fills the pipe.
        let settled = settle(c, 64 << 20, 0.005, 1e8, 1000);
        assert!(settled <= 8, "settled at {settled}");
    }

    #[test]
    fn a_configured_value_never_moves() {
        let c = FilesInFlight::fixed(3);
        assert_eq!(settle(c, 4096, 0.005, 1e9, 200), 3);
    }

    #[test]
    fn the_limit_stays_within_its_bounds() {
        let c = FilesInFlight::adaptive(16, 8, 40);
        let settled = settle(c, 4096, 0.005, 1e9, 1000);
        assert!((8..=40).contains(&settled), "{settled}");
    }
}
