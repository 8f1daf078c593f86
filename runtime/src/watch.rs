//! inotify (through `notify`) turned into a small closed set of hints for the live syncer.
//!
//! The watcher is a hint, never the truth: a full queue, an inotify overflow, or any
//! watcher error becomes [`Hint::Rescan`], and a failure to set watches becomes
//! [`Hint::Degraded`] so the syncer falls back to polling. The final scan does not
//! depend on any of this.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::event::{ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Something at this path was written, closed, created or moved in.
    Touched(PathBuf),
    /// This path (file or directory) was removed or moved away.
    Gone(PathBuf),
    /// Events were lost; look at everything again.
    Rescan(String),
    /// Watches cannot be kept (the watch limit); poll from now on.
    Degraded(String),
}

/// Owns the `notify` watcher; dropping it stops the watches.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
}

/// Starts watching `dirs` recursively. Hints arrive on the returned channel, which holds
/// at most `queue` of them: past that, one `Rescan` replaces what was dropped.
pub fn watch(
    dirs: &[PathBuf],
    queue: usize,
) -> Result<(DirWatcher, mpsc::Receiver<Hint>), notify::Error> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    let handler = {
        let overflowed = overflowed.clone();
        move |res: notify::Result<Event>| {
            let hints = match res {
                Ok(event) => hints_of(event),
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                    vec![Hint::Degraded(format!("inotify watch limit reached: {e}"))]
                }
                Err(e) => vec![Hint::Rescan(format!("watcher error: {e}"))],
            };
            for hint in hints {
                // A lost hint is fine as long as a rescan follows it.
                if overflowed.load(Ordering::Relaxed) {
                    if tx
                        .try_send(Hint::Rescan("event queue was full".into()))
                        .is_ok()
                    {
                        overflowed.store(false, Ordering::Relaxed);
                    } else {
                        return;
                    }
                }
                if tx.try_send(hint).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    let mut watcher = notify::recommended_watcher(handler)?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::Recursive)?;
    }
    Ok((DirWatcher { _watcher: watcher }, rx))
}

fn hints_of(event: Event) -> Vec<Hint> {
    if event.need_rescan() {
        return vec![Hint::Rescan("inotify queue overflowed".into())];
    }
    let mut paths = event.paths.into_iter();
    match event.kind {
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            paths.map(Hint::Gone).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            let from = paths.next().map(Hint::Gone);
            let to = paths.next().map(Hint::Touched);
            from.into_iter().chain(to).collect()
        }
        // Opening or reading tells nothing new; closing after a write does.
        EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write)) => {
            paths.map(Hint::Touched).collect()
        }
        EventKind::Access(_) => Vec::new(),
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => {
            paths.map(Hint::Touched).collect()
        }
    }
}

/// Is `path` inside one of `roots`?
pub fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}
