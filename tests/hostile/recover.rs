//! `recover` never kills a stranger: a run record's pgid is only trusted while the recorded
//! job leader (pid, start time, boot id) is the very process that runs under that pid. Nor
//! does it store a stranger's files: a workdir whose path a job redirected (a directory above
//! it swapped for a symlink) while no agent was watching is refused.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::{files_under, nobody, not_root, open_harness, pid_from, uid_of, KillOnDrop};
use crate::support::{alive, chmod, wait_for, Harness, Run};

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n - 3).map(String::from)
}

#[test]
fn recover_does_not_kill_a_process_that_reused_a_recorded_pgid() {
    if not_root() {
        return;
    }
    // The stranger: a session leader the agent never started.
    let mut stranger = Command::new("setsid")
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let pid = stranger.id() as i32;
    let _cleanup = KillOnDrop(pid);
    wait_for(
        "the stranger to be a sleeping session leader",
        Duration::from_secs(5),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "sleep" && stat_field(pid, 6)? == pid.to_string()).then_some(())
        },
    );

    let h = Harness::file();
    h.run_job(json!({"job_id": "old", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"]}))
        .assert_code(0);
    let record_path = h.state.join("jobs/old/attempts/1/run.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let boot_id = record["leader"]["boot_id"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
                .to_string()
        });
    record["phase"] = json!("running");
    record["pgid"] = json!(pid);
    // The same pid and boot, but not the same process: its start time differs.
    record["leader"] = json!({"pid": pid, "start_ticks": 1, "boot_id": boot_id});
    record["agent"] = serde_json::Value::Null;
    // No cgroup to go by: the record's pgid and leader are all recover has.
    record["cgroup"] = serde_json::Value::Null;
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();

    let run = h.run(&["recover"]);
    assert!(
        alive(pid),
        "recover killed process group {pid}, which is not the job's (recover exited {})\n--- stderr\n{}",
        run.code,
        run.stderr
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}

const SECRET: &str = "TOP-SECRET-OF-ANOTHER-TENANT\n";

/// Another tenant's tree, `<h>/other/<below>/artifacts/secret.txt`: the file and the
/// directories below `other` anyone may read, `other` itself is `daemon`'s and 0700, so the
/// job's user cannot reach it.
fn other_tenant(h: &Harness, below: &str) -> PathBuf {
    let other = h.path("other");
    let artifacts = other.join(below).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("secret.txt"), SECRET).unwrap();
    let daemon = uid_of("daemon");
    for p in [
        other.join(below),
        artifacts.clone(),
        artifacts.join("secret.txt"),
    ] {
        std::os::unix::fs::chown(&p, Some(daemon), Some(daemon)).unwrap();
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::chown(&other, Some(daemon), Some(daemon)).unwrap();
    chmod(&other, 0o700);
    other
}

/// What the job (the owner of `scratch`) may do while no agent runs: move its own directory
/// away and put a symlink to `target` in its place.
fn swap_for_symlink(dir: &Path, target: &Path) {
    let mut aside = dir.as_os_str().to_owned();
    aside.push(".old");
    std::fs::rename(dir, &aside).unwrap();
    std::os::unix::fs::symlink(target, dir).unwrap();
}

/// SIGKILL: the agent leaves its attempt unfinished, as a crash or an OOM kill would.
fn kill_agent(mut agent: std::process::Child) {
    agent.kill().unwrap();
    agent.wait().unwrap();
}

/// Neither the secret's bytes in any blob nor its name in any manifest.
fn assert_nothing_of_the_other_tenant_stored(h: &Harness, job: &str, recover: &Run) {
    let stored = files_under(&h.state.join("store"));
    let holding: Vec<_> = stored
        .iter()
        .filter(|(p, _)| {
            std::fs::read(p).is_ok_and(|b| b.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()))
        })
        .collect();
    assert!(
        holding.is_empty(),
        "another tenant's file was stored by recover: {holding:?}\n--- recover stderr\n{}",
        recover.stderr
    );
    let manifests: Vec<_> = stored
        .iter()
        .filter(|(p, _)| p.starts_with(h.state.join("store/jobs")))
        .collect();
    for (path, _) in manifests {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            !text.contains("secret.txt"),
            "{} lists the other tenant's file:\n{text}",
            path.display()
        );
    }
    assert!(
        recover.stderr.contains("the recorded workdir is refused"),
        "recover said nothing of the swapped workdir\n--- stderr\n{}",
        recover.stderr
    );
    let term = h.terminal(job);
    assert_ne!(
        term["state"], "SUCCEEDED",
        "output it refused is not stored: {term}"
    );
}

/// Job `job`, as nobody, with its workdir `<h>/scratch/jobX/work` in a scratch tree of its
/// own (below `jobs_root`): it writes `artifacts/mine.txt` and waits, and its agent is
/// killed. Returns `scratch` and the job's (still running) process.
fn left_for_recover(h: &Harness, job: &str) -> (PathBuf, KillOnDrop) {
    let scratch = h.path("scratch");
    std::fs::create_dir_all(scratch.join("jobX")).unwrap();
    for p in [&scratch, &scratch.join("jobX")] {
        std::os::unix::fs::chown(p, Some(nobody()), Some(nobody())).unwrap();
        chmod(p, 0o755);
    }
    let workdir = scratch.join("jobX/work");
    let agent = crate::common::spawn_job(
        h,
        json!({
            "job_id": job, "user": "nobody", "workdir": workdir.display().to_string(),
            "command": ["sh", "-c", "echo mine > $C3_ARTIFACTS_DIR/mine.txt; echo $$ > ready; exec sleep 60"],
        }),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let process = KillOnDrop(pid_from(&workdir.join("ready")));
    kill_agent(agent);
    (scratch, process)
}

/// The agent is killed; the job swaps the directory above its workdir for a symlink to
/// another tenant's tree. `recover` (a new process: it knows the workdir by path only) must
/// refuse it.
#[test]
fn recover_never_follows_a_swapped_parent_of_the_workdir_into_another_tenants_tree() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let other = other_tenant(&h, "work");
    let (scratch, _job) = left_for_recover(&h, "swap");
    swap_for_symlink(&scratch.join("jobX"), &other);
    let recover = h.run(&["recover"]);
    assert_nothing_of_the_other_tenant_stored(&h, "swap", &recover);
}

/// No symlink, but another directory where the workdir was (renamed into place from
/// elsewhere): not the one the run record pinned, so refused as well.
#[test]
fn recover_refuses_a_workdir_that_is_not_the_pinned_one() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let (scratch, _job) = left_for_recover(&h, "moved");
    let record = std::fs::read_to_string(h.state.join("jobs/moved/attempts/1/run.json")).unwrap();
    assert!(record.contains("\"workdir_pin\""), "{record}");
    let jobx = scratch.join("jobX");
    std::fs::rename(&jobx, scratch.join("jobX.old")).unwrap();
    std::fs::create_dir_all(jobx.join("work/artifacts")).unwrap();
    std::fs::write(jobx.join("work/artifacts/planted.txt"), "planted\n").unwrap();
    let recover = h.run(&["recover"]);
    assert!(
        recover
            .stderr
            .contains("not the directory the attempt used"),
        "{}",
        recover.stderr
    );
    let manifest = h.object("jobs/moved/manifest.json").unwrap_or_default();
    assert!(!String::from_utf8_lossy(&manifest).contains("planted.txt"));
    assert_ne!(h.terminal("moved")["state"], "SUCCEEDED");
}

/// The same through a sidecar (`watch`) whose parent dir lies in the job's scratch tree.
#[test]
fn recover_of_a_sidecar_never_follows_a_swapped_parent_into_another_tenants_tree() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let scratch = h.path("scratch");
    let artifacts = scratch.join("jobX/out/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("mine.txt"), "mine\n").unwrap();
    for p in [
        &scratch,
        &scratch.join("jobX"),
        &scratch.join("jobX/out"),
        &artifacts,
    ] {
        std::os::unix::fs::chown(p, Some(nobody()), Some(nobody())).unwrap();
        chmod(p, 0o755);
    }
    let other = other_tenant(&h, "out");
    let agent = h.spawn(&["watch", "--job-id", "side", artifacts.to_str().unwrap()]);
    let _agent = KillOnDrop(agent.id() as i32);
    let record = h.state.join("jobs/side/attempts/1/run.json");
    wait_for(
        "the sidecar to record its attempt",
        Duration::from_secs(20),
        || {
            let text = std::fs::read_to_string(&record).ok()?;
            text.contains("\"running\"").then_some(())
        },
    );
    kill_agent(agent);
    // A sidecar told no pid is left to its restart for days from the attempt's start
    // (`recover::UNWATCHED_SIDECAR_WAIT`): this one started long ago.
    let mut text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    text["started_at"] = serde_json::json!("2020-01-01T00:00:00Z");
    std::fs::write(&record, serde_json::to_vec(&text).unwrap()).unwrap();
    swap_for_symlink(&scratch.join("jobX"), &other);
    let recover = h.run(&["recover"]);
    assert_nothing_of_the_other_tenant_stored(&h, "side", &recover);
}

/// No cgroup (as on a node without a writable cgroup v2); the agent is SIGKILLed while the
/// job's shell still runs, and the shell ends before `recover` comes, leaving its background
/// child in its process group. The recorded leader is gone, but its group provably is not
/// (pid P is not given out while group P exists): `recover` stopped nothing, and its
/// retryable AGENT_ERROR let the platform place the job again beside the copy still on the
/// GPU.
#[test]
fn recover_stops_the_group_a_gone_leader_left_running() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_FAULT".into(), "no-job-cgroup".into()));
    let agent = crate::common::spawn_job(
        &h,
        json!({
            "job_id": "bg", "user": "nobody",
            "command": ["sh", "-c", "sleep 300 & echo $! > bg.pid; sleep 2"],
        }),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let background = pid_from(&h.workdir("bg").join("bg.pid"));
    let _background = KillOnDrop(background);
    let record = launched_without_cgroup(&h, "bg");
    kill_agent(agent);
    let leader = record["pgid"].as_i64().unwrap() as i32;
    wait_for(
        "the job's shell to end on its own",
        Duration::from_secs(10),
        || (!alive(leader)).then_some(()),
    );
    assert!(alive(background), "the background child outlived its shell");
    h.env.clear();
    let recover = h.run(&["recover"]);
    // The group is provably the job's (its pgid is the recorded leader's pid, which the
    // kernel does not give out while the group lives): a warning is not enough, it is stopped.
    let stopped = wait_for_or_none(Duration::from_secs(5), || !alive(background));
    let terminal = h.terminal("bg");
    assert!(
        stopped,
        "recover left the job's background process {background} running: {terminal}\n--- recover stderr\n{}",
        recover.stderr
    );
    assert_eq!(terminal["reason"], "AGENT_ERROR", "{terminal}");
}

/// No cgroup; the job starts a process in a session of its own (`setsid`, as `ray start`
/// or `start_new_session=True` do) and one in a group of its own (`setpgrp`,
/// `process_group=0`), and the agent is SIGKILLed. `recover` signalled only the
/// recorded leader's group, found it empty once the leader was stopped, and reported the
/// GPU free while the daemon, still carrying the job's marks, went on running.
#[test]
fn recover_stops_a_job_process_that_left_for_a_session_of_its_own() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_FAULT".into(), "no-job-cgroup".into()));
    let agent = crate::common::spawn_job(
        &h,
        json!({
            "job_id": "daemon", "user": "nobody",
            "command": ["sh", "-c", "setsid sleep 300 & echo $! > bg.pid; /usr/bin/python3 -c 'import os, time; os.setpgrp(); open(\"pg.pid\", \"w\").write(str(os.getpid())); time.sleep(300)' & sleep 300"],
        }),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let background = pid_from(&h.workdir("daemon").join("bg.pid"));
    let _background = KillOnDrop(background);
    let grouped = pid_from(&h.workdir("daemon").join("pg.pid"));
    let _grouped = KillOnDrop(grouped);
    launched_without_cgroup(&h, "daemon");
    kill_agent(agent);
    assert!(alive(background), "the daemon outlived the agent");
    h.env.clear();
    let recover = h.run(&["recover"]);
    let stopped = wait_for_or_none(Duration::from_secs(5), || {
        !alive(background) && !alive(grouped)
    });
    assert!(
        stopped,
        "recover left the job's daemon {background} ({}) or its process in a group of its own {grouped} ({}) running\n--- recover stderr\n{}",
        alive(background),
        alive(grouped),
        recover.stderr
    );
    assert_eq!(h.terminal("daemon")["reason"], "AGENT_ERROR");
}

/// The run record of `job`'s attempt 1 once its launch is recorded, checked to have no
/// cgroup (the test's fault `no-job-cgroup`).
fn launched_without_cgroup(h: &Harness, job: &str) -> serde_json::Value {
    let path = h.state.join(format!("jobs/{job}/attempts/1/run.json"));
    let record: serde_json::Value =
        wait_for("the launch to be recorded", Duration::from_secs(20), || {
            let bytes = std::fs::read(&path).ok()?;
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .filter(|r| r["phase"] == "running")
        });
    assert!(
        record["cgroup"].is_null(),
        "the job was meant to run without a cgroup: {record}"
    );
    record
}

/// Polls `f` until `limit`; whether it came true.
fn wait_for_or_none(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// No cgroup; the job leaves a process in a session of its own whose environment does not
/// answer (a page of the job's own FUSE mount mapped over it, or its memory lock held in D
/// state). `recover` read it on a reactor thread with no limit and never finished: not this
/// record, nor any other (another job's here), nor retention and gc after them. Now the
/// process is unproven: not signalled, counted as a survivor, and `recover` moves on.
#[test]
fn recover_moves_on_past_a_job_process_whose_environment_hangs() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_FAULT".into(), "no-job-cgroup".into()));
    let hung = crate::common::spawn_job(
        &h,
        json!({
            "job_id": "hung", "user": "nobody",
            "command": ["sh", "-c", "setsid sleep 300 & echo $! > bg.pid; sleep 300"],
        }),
    );
    let _hung = KillOnDrop(hung.id() as i32);
    let other = crate::common::spawn_job(
        &h,
        json!({"job_id": "other", "user": "nobody", "command": ["sh", "-c", "echo $$ > ready; exec sleep 300"]}),
    );
    let _other = KillOnDrop(other.id() as i32);
    let background = pid_from(&h.workdir("hung").join("bg.pid"));
    let _background = KillOnDrop(background);
    let _other_job = KillOnDrop(pid_from(&h.workdir("other").join("ready")));
    launched_without_cgroup(&h, "hung");
    launched_without_cgroup(&h, "other");
    kill_agent(hung);
    kill_agent(other);
    h.env = vec![("C3_AGENT_FAULT".into(), "environ-hangs:hung".into())];
    let recover = crate::common::wait_within(
        "c3-agent recover",
        h.spawn(&["recover"]),
        Duration::from_secs(60),
    );
    let terminal = h.terminal("hung");
    assert_eq!(terminal["reason"], "AGENT_ERROR", "{terminal}");
    assert!(
        terminal["warnings"]
            .to_string()
            .contains("processes of the job survive"),
        "the GPU was reported free: {terminal}\n--- recover stderr\n{}",
        recover.stderr
    );
    assert!(
        alive(background),
        "a process whose marks could not be read was signalled"
    );
    assert_eq!(h.terminal("other")["reason"], "AGENT_ERROR");
}

/// No cgroup; the job leaves six process groups of its own (`setsid`), each ignoring
/// SIGTERM, and the agent is SIGKILLed. `recover` stopped them one at a time, a full kill
/// grace each (six graces of 2 s here; 10 s each with the defaults, a minute and more for a
/// job of a few dozen): the housekeeping unit's timeout and every record after this one
/// waited. Now every group gets SIGTERM at once and the one grace is shared.
#[test]
fn recover_stops_a_jobs_many_leftover_groups_within_one_grace() {
    if not_root() {
        return;
    }
    const GROUPS: usize = 6;
    const GRACE: Duration = Duration::from_secs(2);
    let mut h = open_harness();
    h.env = vec![
        ("C3_AGENT_FAULT".into(), "no-job-cgroup".into()),
        (
            "C3_AGENT_KILL_GRACE_SECS".into(),
            GRACE.as_secs().to_string(),
        ),
    ];
    let script = format!(
        "for i in $(seq {GROUPS}); do \
           setsid sh -c 'trap \"\" TERM; echo $$ > g'$i'.pid; exec sleep 1000' & \
         done; sleep 300"
    );
    let agent = crate::common::spawn_job(
        &h,
        json!({"job_id": "many", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let groups: Vec<i32> = (1..=GROUPS)
        .map(|i| pid_from(&h.workdir("many").join(format!("g{i}.pid"))))
        .collect();
    let _groups: Vec<KillOnDrop> = groups.iter().map(|&p| KillOnDrop(p)).collect();
    launched_without_cgroup(&h, "many");
    kill_agent(agent);
    assert!(
        groups.iter().all(|&p| alive(p)),
        "the groups outlived the agent"
    );
    h.env.retain(|(k, _)| k != "C3_AGENT_FAULT");
    let started = std::time::Instant::now();
    let recover = crate::common::wait_within(
        "c3-agent recover",
        h.spawn(&["recover"]),
        Duration::from_secs(120),
    );
    let took = started.elapsed();
    let left: Vec<i32> = groups.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        left.is_empty(),
        "recover left the job's groups {left:?} running\n--- recover stderr\n{}",
        recover.stderr
    );
    // One at a time it is at least six graces (12 s); together, one and SIGKILL's rounds.
    assert!(
        took < 4 * GRACE,
        "recover took {took:?} to stop {GROUPS} groups with a kill grace of {GRACE:?}\n--- recover stderr\n{}",
        recover.stderr
    );
    assert_eq!(h.terminal("many")["reason"], "AGENT_ERROR");
}

/// No cgroup; the job's SIGTERM trap starts a new group of its own (`setsid`, ignoring
/// SIGTERM) as it is stopped. The marked groups were searched for before anything was
/// signalled, so one made during the stop was never found: it ran on, and the GPU was
/// reported free. It is searched for again after the stop.
#[test]
fn recover_stops_a_group_the_job_made_while_it_was_stopped() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env = vec![
        ("C3_AGENT_FAULT".into(), "no-job-cgroup".into()),
        ("C3_AGENT_KILL_GRACE_SECS".into(), "2".into()),
    ];
    let script = r#"trap 'setsid sh -c "trap \"\" TERM; echo \$\$ > late.pid; exec sleep 1000" & wait' TERM; echo $$ > lead.pid; sleep 300 & wait"#;
    let agent = crate::common::spawn_job(
        &h,
        json!({"job_id": "late", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let lead = pid_from(&h.workdir("late").join("lead.pid"));
    let _lead = KillOnDrop(lead);
    launched_without_cgroup(&h, "late");
    kill_agent(agent);
    assert!(alive(lead), "the job outlived the agent");
    h.env.retain(|(k, _)| k != "C3_AGENT_FAULT");
    let recover = crate::common::wait_within(
        "c3-agent recover",
        h.spawn(&["recover"]),
        Duration::from_secs(120),
    );
    let late = pid_from(&h.workdir("late").join("late.pid"));
    let _late = KillOnDrop(late);
    assert!(
        !alive(late),
        "the group made during the stop ran on\n--- recover stderr\n{}",
        recover.stderr
    );
    assert!(!alive(lead));
}
