//! The one way a test says it cannot run here (no root, no btrfs, no v1 cgroup...). It still
//! passes, and nextest hides a passing test's output, so each skip is also appended to
//! `$C3_TEST_SKIP_LOG`: scripts/test.sh lists them, and fails a strict run on one it does not
//! expect, so a test that stopped running on CI is seen. Shared by the integration tests
//! (tests/e2e/support.rs) and runtime's unit tests (`#[path]`), which have no crate in common.

use std::io::Write;

/// Prints "<test>: skipped: <reason>" and appends "<test>: <reason>" to `$C3_TEST_SKIP_LOG`.
pub fn skip(reason: &str) {
    // libtest (nextest included) runs each test on a thread named after it.
    let current = std::thread::current();
    let test = current.name().unwrap_or("<unnamed test>");
    eprintln!("{test}: skipped: {reason}");
    let Some(log) = std::env::var_os("C3_TEST_SKIP_LOG") else {
        return;
    };
    let line = format!("{test}: {}\n", reason.replace('\n', " "));
    // One write of one line in append mode: parallel test processes do not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = appended {
        panic!("cannot record the skip in {}: {e}", log.to_string_lossy());
    }
}
