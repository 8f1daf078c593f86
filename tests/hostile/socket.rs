//! The job's agent socket: each connection costs the root agent a peer check in /proc, on
//! CPU outside the job's cgroup, so a job connecting in a loop must not get a check per loop.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, open_harness, spawn_job, wait_within};

#[test]
fn a_job_connecting_in_a_loop_gets_a_bounded_rate_and_can_still_publish() {
    if not_root() {
        return;
    }
    let h = open_harness();
    // 16 threads connect for 3 s, each sending a line that is no request: the agent answers
    // ("not a request") only after the peer check. Then one real publish, from the same
    // process (a child of the shell the agent started).
    let flood = h.path("flood.py");
    std::fs::write(
        &flood,
        r#"import json, os, socket, threading, time
path = os.environ["C3_AGENT_SOCKET"]
start = time.time()
end = start + 3
served = [0]
def run():
    while time.time() < end:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.sendall(b"x\n")
            if b"not a request" in s.recv(200):
                served[0] += 1
        except OSError:
            pass
        s.close()
ts = [threading.Thread(target=run) for _ in range(16)]
[t.start() for t in ts]
[t.join() for t in ts]
print("served %d in %.2f s" % (served[0], time.time() - start), flush=True)
with open(os.path.join(os.environ["C3_ARTIFACTS_DIR"], "f"), "w") as f:
    f.write("done\n")
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.sendall(json.dumps({"op": "publish", "paths": ["artifacts/f"]}).encode() + b"\n")
reply = json.loads(s.makefile().readline())
print("publish ok" if reply.get("ok") else "publish failed: %s" % reply, flush=True)
"#,
    )
    .unwrap();
    std::fs::set_permissions(&flood, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let script = format!(
        "p=/usr/bin/python3; [ -x $p ] || p=python3; $p '{}'; true",
        flood.display()
    );
    let child = spawn_job(
        &h,
        json!({"job_id": "flood", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run flood", child, Duration::from_secs(60));
    run.assert_code(0);
    let line = run
        .stderr
        .lines()
        .find_map(|l| l.split_once("served ").map(|(_, rest)| rest.to_string()))
        .unwrap_or_else(|| panic!("no count in the job's output\n{}", run.stderr));
    let mut words = line.split_whitespace();
    let served: f64 = words.next().unwrap().parse().unwrap();
    let secs: f64 = words.nth(1).unwrap().parse().unwrap();
    println!("connections served: {served} in {secs} s");
    // 100 a second, a burst of 100, the 16 already accepted, and room.
    assert!(
        served <= 100.0 * (secs + 2.0) + 16.0,
        "{served} connections served in {secs} s: each was a peer check by the root agent"
    );
    assert!(served >= 1.0, "no connection served at all");
    assert!(run.stderr.contains("publish ok"), "{}", run.stderr);
    assert_eq!(h.manifest_paths("flood"), vec!["artifacts/f"]);
}
