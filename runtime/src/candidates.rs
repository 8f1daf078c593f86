//! Live sync's candidates: files that may need uploading, each with the moment since which it
//! has looked the same. Kept by path and in the order they settle, so the next to settle and
//! the ones due are at hand: looking through every candidate at each turn of live sync's loop
//! (a hint, an upload done) made a job writing 100,000 files cost the agent a scan of all of
//! them per file, and live sync fell behind (about 7 % of them sent while the job ran).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::time::{Duration, Instant};

use crate::collect::FileStamp;

/// A path that may need uploading, and since when it has looked this way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub stamp: Option<FileStamp>,
    pub since: Instant,
}

#[derive(Default)]
pub struct Candidates {
    by_path: HashMap<Arc<str>, Candidate>,
    /// The same paths, earliest `since` first.
    by_since: BTreeSet<(Instant, Arc<str>)>,
    /// What the paths take, for the bound on what live sync tracks.
    path_bytes: u64,
}

impl Candidates {
    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// The bytes of every candidate's path.
    pub fn path_bytes(&self) -> u64 {
        self.path_bytes
    }

    pub fn contains(&self, rel: &str) -> bool {
        self.by_path.contains_key(rel)
    }

    pub fn get(&self, rel: &str) -> Option<&Candidate> {
        self.by_path.get(rel)
    }

    /// Adds `rel`, or replaces what it was.
    /// A candidate held back (its `since` still to come: its last upload found it changed)
    /// stays held back however it is touched meanwhile.
    pub fn insert(&mut self, rel: String, mut candidate: Candidate) {
        let key: Arc<str> = match self.by_path.get_key_value(rel.as_str()) {
            Some((key, old)) => {
                if old.since > Instant::now() {
                    candidate.since = candidate.since.max(old.since);
                }
                let key = key.clone();
                self.by_since.remove(&(old.since, key.clone()));
                key
            }
            None => {
                self.path_bytes += c3_proto::manifest::entry_path_bytes(&rel);
                Arc::from(rel)
            }
        };
        self.by_since.insert((candidate.since, key.clone()));
        self.by_path.insert(key, candidate);
    }

    /// Restarts `rel`'s clock (still written to: it settles from `since` on).
    pub fn restart(&mut self, rel: &str, since: Instant) {
        if let Some(old) = self.by_path.get(rel).copied() {
            self.insert(rel.to_string(), Candidate { since, ..old });
        }
    }

    pub fn remove(&mut self, rel: &str) -> Option<Candidate> {
        let (key, old) = self.by_path.remove_entry(rel)?;
        self.by_since.remove(&(old.since, key));
        self.path_bytes -= c3_proto::manifest::entry_path_bytes(rel);
        Some(old)
    }

    /// Keeps only the paths `keep` says.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let gone: Vec<Arc<str>> = self.by_path.keys().filter(|k| !keep(k)).cloned().collect();
        for key in gone {
            self.remove(&key);
        }
    }

    /// When the earliest candidate has looked the same for `settle`.
    pub fn next_due(&self, settle: Duration) -> Option<Instant> {
        self.next_due_except(settle, |_| false)
    }

    /// [`Candidates::next_due`] of the paths `busy` does not name (an upload of them under
    /// way): a busy one's past due time woke the loop every few milliseconds for as long as
    /// its upload took, `due` passing it over each time.
    pub fn next_due_except(
        &self,
        settle: Duration,
        busy: impl Fn(&str) -> bool,
    ) -> Option<Instant> {
        self.by_since
            .iter()
            .find(|(_, key)| !busy(key))
            .map(|(since, _)| *since + settle)
    }

    /// Up to `room` paths that have looked the same for `settle` at `now`, earliest first,
    /// `busy` ones (an upload of them under way) left out.
    pub fn due(
        &self,
        now: Instant,
        settle: Duration,
        room: usize,
        busy: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        self.by_since
            .iter()
            .take_while(|(since, _)| now >= *since + settle)
            .filter(|(_, rel)| !busy(rel))
            .take(room)
            .map(|(_, rel)| rel.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(since: Instant) -> Candidate {
        Candidate { stamp: None, since }
    }

    /// A file whose upload found it changed is held back (its `since` to come): a touch
    /// meanwhile (the job appending to it again) restarts its clock no earlier than that.
    /// Reset to now, a 10 GB file appended every few seconds was read whole every settle.
    #[tokio::test(start_paused = true)]
    async fn a_candidate_held_back_stays_held_back_when_touched() {
        let t0 = Instant::now();
        let (s, hold) = (Duration::from_millis(100), Duration::from_secs(20));
        let mut c = Candidates::default();
        c.insert("big".into(), at(t0 + hold));
        c.insert("big".into(), at(t0));
        c.restart("big", t0);
        assert!(
            c.due(t0 + s, s, 10, |_| false).is_empty(),
            "taken up at once"
        );
        assert_eq!(c.next_due(s), Some(t0 + hold + s));
        // Once the hold has passed, a touch restarts it as any other.
        tokio::time::advance(hold + s).await;
        let now = Instant::now();
        c.insert("big".into(), at(now));
        assert_eq!(c.next_due(s), Some(now + s));
    }

    /// The index by time follows every change: the due ones come earliest first, a restarted
    /// clock moves its path back, and what the paths take is counted once each.
    #[tokio::test(start_paused = true)]
    async fn due_ones_come_in_order_and_the_index_follows_every_change() {
        let t0 = Instant::now();
        let s = Duration::from_millis(100);
        let mut c = Candidates::default();
        for (i, rel) in ["c", "a", "bb"].iter().enumerate() {
            c.insert(
                rel.to_string(),
                at(t0 + Duration::from_millis(10 * i as u64)),
            );
        }
        assert_eq!((c.len(), c.path_bytes()), (3, 4));
        assert_eq!(c.next_due(s), Some(t0 + s));
        // One whose upload is under way wakes nothing: the next due is the next one's.
        assert_eq!(
            c.next_due_except(s, |r| r == "c"),
            Some(t0 + Duration::from_millis(10) + s)
        );
        assert_eq!(c.next_due_except(s, |_| true), None);
        let now = t0 + Duration::from_millis(115);
        assert_eq!(c.due(now, s, 10, |_| false), ["c", "a"]);
        assert_eq!(c.due(now, s, 1, |_| false), ["c"]);
        assert_eq!(c.due(now, s, 10, |r| r == "c"), ["a"]);
        c.restart("c", now);
        assert_eq!(c.due(now + s, s, 10, |_| false), ["a", "bb", "c"]);
        c.insert("a".into(), at(now));
        assert_eq!((c.len(), c.path_bytes()), (3, 4), "replaced, not added");
        assert_eq!(c.next_due(s), Some(t0 + Duration::from_millis(20) + s));
        c.retain(|r| r != "bb");
        assert_eq!(c.remove("c"), Some(at(now)));
        assert_eq!(c.remove("c"), None);
        assert_eq!((c.len(), c.path_bytes()), (1, 1));
        assert_eq!(c.due(now + s, s, 10, |_| false), ["a"]);
        assert_eq!(c.by_since.len(), 1);
    }

    /// A wake copies no more paths than there is room to upload, however many settled.
    #[tokio::test(start_paused = true)]
    async fn a_wake_takes_only_as_many_settled_files_as_there_is_room_for() {
        let settle = Duration::from_millis(100);
        let start = Instant::now();
        let mut candidates = Candidates::default();
        for i in 0..10_000 {
            let c = Candidate {
                stamp: None,
                since: start,
            };
            candidates.insert(format!("artifacts/f{i}"), c);
        }
        // Not settled yet: never due.
        candidates.insert(
            "artifacts/fresh".into(),
            Candidate {
                stamp: None,
                since: start + settle,
            },
        );
        let now = start + settle;
        let got = candidates.due(now, settle, 16, |_| false);
        assert_eq!(got.len(), 16);
        assert!(!got.contains(&"artifacts/fresh".to_string()));
        assert!(candidates.due(now, settle, 0, |_| false).is_empty());
        // What is being uploaded is not taken again.
        assert!(candidates
            .due(now, settle, 16, |rel| rel != "artifacts/fresh")
            .is_empty());
    }
}
