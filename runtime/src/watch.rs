//! inotify (through `notify`) turned into a small closed set of hints for the live syncer.
//!
//! The watcher is a hint, never the truth: a full queue, an inotify overflow, or any
//! watcher error becomes [`Hint::Rescan`], and a failure to set watches becomes
//! [`Hint::Degraded`] so the syncer falls back to polling. The final scan does not
//! depend on any of this.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::event::{ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::confine::DirFd;

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
///
/// Watches are set one directory at a time (never notify's own recursion), so the agent
/// decides what is watched: never through a symlink (a job's `u -> /usr` must not cost the
/// node its inotify watches, which systemd and udev need too), and never more than
/// `max_watches` of them.
pub struct DirWatcher {
    watcher: notify::RecommendedWatcher,
    /// Watched directories are opened beneath it, never through a symlink.
    workdir: PathBuf,
    watched: HashSet<PathBuf>,
    max_watches: usize,
}

/// Setting watches stopped at the cap: poll from now on.
#[derive(Debug, thiserror::Error)]
#[error("more than {max} directories to watch (sync.max_watches)")]
pub struct WatchCapReached {
    pub max: usize,
}

impl DirWatcher {
    pub fn watch_count(&self) -> usize {
        self.watched.len()
    }

    /// Watches `dir` (below the workdir) and every directory below it. Each directory is
    /// first opened from the workdir with no symlink in any component, and its children are
    /// listed from that fd: a directory swapped for a symlink is never walked into.
    pub fn watch_tree(&mut self, dir: &Path) -> Result<(), WatchCapReached> {
        let Ok(rel) = dir.strip_prefix(&self.workdir) else {
            return Ok(());
        };
        let Ok(root) = DirFd::open_root(&self.workdir) else {
            return Ok(());
        };
        let mut stack = vec![rel.to_path_buf()];
        while let Some(rel) = stack.pop() {
            let Ok(fd) = root.open_dir(&rel) else {
                continue;
            };
            let d = self.workdir.join(&rel);
            if !self.watched.contains(&d) {
                if self.watched.len() >= self.max_watches {
                    return Err(WatchCapReached {
                        max: self.max_watches,
                    });
                }
                match self.watcher.watch(&d, RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.watched.insert(d.clone());
                    }
                    Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                        return Err(WatchCapReached {
                            max: self.watched.len(),
                        })
                    }
                    // Gone meanwhile: nothing to watch.
                    Err(_) => continue,
                }
            }
            stack.extend(fd.subdirs().into_iter().map(|name| rel.join(name)));
        }
        Ok(())
    }

    /// Drops the watches of `dir` and below (removed or moved away).
    pub fn unwatch_tree(&mut self, dir: &Path) {
        let gone: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in gone {
            // The kernel already dropped the watch of a deleted directory.
            let _ = self.watcher.unwatch(&p);
            self.watched.remove(&p);
        }
    }
}

/// Creates the watcher (no watches yet: see [`DirWatcher::watch_tree`]). Hints arrive on the
/// returned channel, which holds at most `queue` of them: past that, one `Rescan` replaces
/// what was dropped.
pub fn watcher(
    workdir: &Path,
    queue: usize,
    max_watches: usize,
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
    let config = notify::Config::default().with_follow_symlinks(false);
    let watcher = notify::RecommendedWatcher::new(handler, config)?;
    Ok((
        DirWatcher {
            watcher,
            workdir: workdir.to_path_buf(),
            watched: HashSet::new(),
            max_watches: max_watches.max(1),
        },
        rx,
    ))
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
