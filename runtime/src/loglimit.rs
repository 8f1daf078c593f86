//! `LineLimit`: a token bucket for log lines that something outside the agent sets the pace
//! of (the job's output, its socket requests). journald drops a unit's lines past its own
//! rate limit, the agent's among them, and a log written as root fills the disk of root.

use std::time::{Duration, Instant};

pub struct LineLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    held_back: u64,
    said: Instant,
}

impl LineLimit {
    /// `per_sec` lines a second, sustained, after a burst of `burst`.
    pub fn new(per_sec: f64, burst: f64) -> Self {
        LineLimit {
            per_sec,
            burst,
            tokens: burst,
            last: Instant::now(),
            held_back: 0,
            said: Instant::now(),
        }
    }

    /// Whether one more line may be logged now; one that may not is counted.
    pub fn admit(&mut self) -> bool {
        self.admit_costing(1.0)
    }

    /// [`LineLimit::admit`] for a line that counts as `cost` lines (a long one).
    pub fn admit_costing(&mut self, cost: f64) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        if self.tokens < cost {
            self.held_back += 1;
            return false;
        }
        self.tokens -= cost;
        true
    }

    /// The lines held back since this last said so, if any: at most once a second, so that
    /// the count is one line a second, not one per line let through (`at_end`: whenever).
    pub fn held_back(&mut self, at_end: bool) -> Option<u64> {
        if !at_end && self.said.elapsed() < Duration::from_secs(1) {
            return None;
        }
        self.said = Instant::now();
        (self.held_back > 0).then(|| std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_held_back_lines_are_counted_once() {
        let mut limit = LineLimit::new(1.0, 3.0);
        let admitted = (0..10).filter(|_| limit.admit()).count();
        assert_eq!(admitted, 3);
        assert_eq!(limit.held_back(true), Some(7));
        assert_eq!(limit.held_back(true), None);
        let mut limit = LineLimit::new(1.0, 20.0);
        assert!(limit.admit_costing(17.0));
        assert!(!limit.admit_costing(17.0));
        assert!(limit.admit());
    }
}
