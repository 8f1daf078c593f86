//! Fault injection for the tests of crash paths, compiled into debug builds only: with
//! `C3_AGENT_FAULT=<point>` in its environment, the agent panics once at that point (or
//! waits, or fails, as the point says); `<point>+<point>` arms both, for a fault met on the
//! way out of another. Release builds ignore the variable.

/// Whether `C3_AGENT_FAULT` names `name`, alone or among points joined by `+`.
#[cfg(debug_assertions)]
fn named(name: &str) -> bool {
    std::env::var("C3_AGENT_FAULT").is_ok_and(|v| v.split('+').any(|n| n == name))
}

/// The marker path of a `<name>@<path>` entry of `C3_AGENT_FAULT` ([`pause_for`]).
#[cfg(debug_assertions)]
fn held_at(name: &str) -> Option<std::path::PathBuf> {
    let v = std::env::var("C3_AGENT_FAULT").ok()?;
    v.split('+').find_map(|n| {
        n.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('@'))
            .map(std::path::PathBuf::from)
    })
}

/// The path a `<name>@<path>` entry of `C3_AGENT_FAULT` gives, in debug builds: a file a
/// test puts in place of a system one (`fstab@/tmp/x`).
pub fn path_for(name: &str) -> Option<std::path::PathBuf> {
    #[cfg(debug_assertions)]
    {
        held_at(name)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        None
    }
}

/// Panics (once per process) if `C3_AGENT_FAULT` names this point, in debug builds.
pub fn point(name: &str) {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        static FIRED: AtomicBool = AtomicBool::new(false);
        if named(name) && !FIRED.swap(true, Ordering::SeqCst) {
            panic!("injected fault at {name} (C3_AGENT_FAULT)");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Panics every time this point is met if `C3_AGENT_FAULT` names it, in debug builds: a bug
/// every try meets.
pub fn point_always(name: &str) {
    #[cfg(debug_assertions)]
    if named(name) {
        panic!("injected fault at {name} (C3_AGENT_FAULT)");
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Panics the first time each `place` (a file, say) meets this point if `C3_AGENT_FAULT`
/// names it, in debug builds: a bug every upload meets once, for the tests of what a panicked
/// task leaves behind and of its retry.
pub fn point_once_per(name: &str, place: &str) {
    #[cfg(debug_assertions)]
    {
        use std::collections::HashSet;
        use std::sync::Mutex;
        static FIRED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
        let first = named(name)
            && FIRED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert_with(HashSet::new)
                .insert(place.to_string());
        if first {
            panic!("injected fault at {name} for {place} (C3_AGENT_FAULT)");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (name, place);
}

/// Waits 2 s if `C3_AGENT_FAULT` names this point, in debug builds: a window for a test to
/// change the world at that moment (a file vanishing between the final scan and its read).
pub async fn pause_point(name: &str) {
    pause_for(name, std::time::Duration::from_secs(2)).await;
}

/// [`pause_point`], for `dur`. Named as `<name>@<path>`, a handshake instead: the point
/// makes the file at `path` and holds until the test removes it (20 s at most), so a test
/// on a loaded machine acts inside the window, never after a fixed wait ran out.
pub async fn pause_for(name: &str, dur: std::time::Duration) {
    #[cfg(debug_assertions)]
    if named(name) {
        tokio::time::sleep(dur).await;
    } else if let Some(marker) = held_at(name) {
        let _ = std::fs::write(&marker, b"held");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while marker.exists() && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (name, dur);
}

/// Ends the process at once (like a SIGKILL: nothing cleaned up) if `C3_AGENT_FAULT` names
/// this point, in debug builds.
pub fn crash_point(name: &str) {
    #[cfg(debug_assertions)]
    if named(name) {
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Blocks the calling thread for `how_long` if `C3_AGENT_FAULT` names this point, in debug
/// builds: a look that is slow (a network mount after a checkpoint) or never comes back (a
/// stat held by a job's FUSE server), for the tests of the bounds around such looks.
pub fn blocking_pause(name: &str, how_long: std::time::Duration) {
    #[cfg(debug_assertions)]
    if named(name) {
        std::thread::sleep(how_long);
    }
    #[cfg(not(debug_assertions))]
    let _ = (name, how_long);
}

/// True once per process if `C3_AGENT_FAULT` names this point, in debug builds: a transient
/// failure for a test to see retried.
pub fn fail_once(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        static FIRED: AtomicBool = AtomicBool::new(false);
        named(name) && !FIRED.swap(true, Ordering::SeqCst)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

/// Whether `C3_AGENT_FAULT` names this point, in debug builds: for a fault that must be
/// decided before a fork (the child may make syscalls only, not read the environment).
pub fn armed(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        named(name)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}

/// Whether `C3_AGENT_FAULT` names `name` at `place` (`<name>:<place>`, e.g. a job's id; alone
/// or among points joined by `+`), or
/// a unit test armed it ([`arm`]), in debug builds: a fault one place meets and the others
/// beside it (the tests running in the same process) do not.
pub fn armed_at(name: &str, place: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        let at = format!("{name}:{place}");
        #[cfg(test)]
        if ARMED.lock().unwrap().contains(&at) {
            return true;
        }
        std::env::var("C3_AGENT_FAULT").is_ok_and(|v| v.split('+').any(|n| n == at))
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = (name, place);
        false
    }
}

/// Points armed by unit tests: the environment is the whole test binary's, read by the tests
/// running beside the one that would set it.
#[cfg(test)]
static ARMED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Arms [`armed_at`]'s `<name>:<place>` until the guard is dropped.
#[cfg(test)]
pub fn arm(name: &str, place: &str) -> Armed {
    let at = format!("{name}:{place}");
    ARMED.lock().unwrap().push(at.clone());
    Armed(at)
}

/// A point armed by [`arm`]; disarmed on drop.
#[cfg(test)]
pub struct Armed(String);

#[cfg(test)]
impl Drop for Armed {
    fn drop(&mut self) {
        ARMED.lock().unwrap().retain(|armed| *armed != self.0);
    }
}
