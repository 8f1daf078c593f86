//! inotify watches are a per-user kernel resource: a job must not make the agent (root) watch
//! a whole filesystem through a symlink, nor use up the node's watches with many directories.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, spawn_job, watch_peak_until_exit};
use crate::support::Harness;

#[test]
fn a_symlinked_dir_moved_into_artifacts_is_not_watched_through() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let script = "mkdir x && ln -s /usr x/u && echo f > x/f && mv x $C3_ARTIFACTS_DIR/ && sleep 2";
    let child = spawn_job(&h, json!({"job_id": "w", "command": ["sh", "-c", script]}));
    let (peak, run) = watch_peak_until_exit("run w", child, Duration::from_secs(30));
    println!("peak inotify watches of the agent: {peak}");
    run.assert_code(0);
    assert!(
        peak > 0,
        "never saw an inotify watch of the agent: the measurement proves nothing\n{}",
        run.stderr
    );
    assert!(
        peak < 100,
        "the agent held {peak} inotify watches: it followed x/u -> /usr"
    );
    let paths = h.manifest_paths("w");
    assert_eq!(paths, vec!["artifacts/x/f"], "symlink followed or missed");
}

#[test]
fn past_max_watches_the_agent_polls_and_still_collects_everything() {
    if not_root() {
        return;
    }
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nmax_watches = 20\n".into();
    // 50 sibling dirs and a chain of 50 nested dirs, each with a file.
    let script = "cd $C3_ARTIFACTS_DIR; i=0; while [ $i -lt 50 ]; do mkdir s$i && echo $i > s$i/f; i=$((i+1)); done; \
                  d=.; i=0; while [ $i -lt 50 ]; do d=$d/n$i; mkdir $d && echo $i > $d/f; i=$((i+1)); done; sleep 3";
    let child = spawn_job(
        &h,
        json!({"job_id": "many", "command": ["sh", "-c", script]}),
    );
    let (peak, run) = watch_peak_until_exit("run many", child, Duration::from_secs(40));
    println!("peak inotify watches of the agent: {peak}");
    run.assert_code(0);
    assert!(
        peak <= 22,
        "the agent held {peak} inotify watches, past max_watches = 20"
    );
    assert!(
        run.stderr.lines().any(|l| {
            let l = l.to_lowercase();
            l.contains("watch") && l.contains("poll")
        }),
        "no log line says the agent fell back to polling past the watch limit\n{}",
        run.stderr
    );
    let mut expected: Vec<String> = (0..50).map(|i| format!("artifacts/s{i}/f")).collect();
    let mut chain = String::from("artifacts");
    for i in 0..50 {
        chain.push_str(&format!("/n{i}"));
        expected.push(format!("{chain}/f"));
    }
    expected.sort();
    let mut paths = h.manifest_paths("many");
    paths.sort();
    assert_eq!(paths, expected);
}
