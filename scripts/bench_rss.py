#!/usr/bin/env python3
"""Peak RSS of `c3-agent run --job` (job `true`, live sync off, file:// store) on N 4 KiB files
already in artifacts/ (100 a directory): python3 scripts/bench_rss.py AGENT N [LABEL].
The files are made once under $BENCH_RSS_DIR (default /var/tmp/c3-bench-rss) and kept; the
store and state are new each run, so the manifest of two builds can be compared with `cmp`
(<dir>/n<N>/store/jobs/mem-<N>/manifest.json). PRE="heaptrack -o out" runs it under a tool;
$BENCH_RSS_LOG sets the agent's log filter, $BENCH_RSS_STDERR keeps its log lines in that file.

Live sync (`[sync] live = true`), the files written by the job while it runs:
  bench_rss.py AGENT N [LABEL] --mode live
    a python job writes N 4 KiB files (random bytes, 100 a directory) and exits (after
    --linger S seconds, default 0: live sync's time to catch up); the line adds `job_s`
    (the job's time writing), `live_peak_rss_mib` (the agent's VmHWM when the job is done:
    live sync's peak, before the final sync's) and `files` (the manifest's count: N).
  bench_rss.py AGENT N [LABEL] --mode churn [--secs S]
    for S seconds (default 5) a python job writes 4 KiB files under names it never uses
    twice and deletes each one shortly after (half of them renamed first), a new directory
    every 100 files and the one before last removed: names that never settle. N files are
    left in place first (0 is fine), so the churn runs beside files the book holds. The
    line adds `churned` (files made and deleted) and `files` (the manifest's count, N).
Both make a new workdir each run (<dir>/<mode>-n<N>/)."""
import argparse, json, os, shutil, subprocess, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("agent"); ap.add_argument("n", type=int); ap.add_argument("label", nargs="?", default="run")
ap.add_argument("--mode", choices=("files", "live", "churn"), default="files")
ap.add_argument("--secs", type=float, default=5.0)
ap.add_argument("--linger", type=float, default=0.0)
a = ap.parse_args()
agent, n, label, mode = a.agent, a.n, a.label, a.mode
base = os.environ.get("BENCH_RSS_DIR", "/var/tmp/c3-bench-rss")
root = os.path.join(base, f"n{n}" if mode == "files" else f"{mode}-n{n}")
work = os.path.join(root, "work")
d = os.path.join(work, "artifacts")
# N 4 KiB files of random bytes, 100 a directory, in `d`: made here once (files mode), or by
# the job while it runs (live mode: the same lines in its source).
MAKE = """
for i in range(n):
    sub = os.path.join(d, f"d{i // 100:04d}")
    if i % 100 == 0:
        os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
        f.write(os.urandom(4096))
"""
if mode == "files" and not os.path.exists(os.path.join(root, "ready")):
    shutil.rmtree(root, ignore_errors=True)
    exec(MAKE, {"os": os, "n": n, "d": d})
    open(os.path.join(root, "ready"), "w").close()
if mode != "files":
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(d)
state = os.path.join(root, "state"); store = os.path.join(root, "store")
for p in (state, store, os.path.join(work, ".c3")):
    shutil.rmtree(p, ignore_errors=True)
os.makedirs(store)
cfg = os.path.join(root, "agent.toml")
live = "false" if mode == "files" else "true"
open(cfg, "w").write(f'state_dir = "{state}"\njobs_root = "{root}"\n[sync]\nlive = {live}\n[store]\nurl = "file://{store}"\n')
# The job's report (its own time, what it churned) lies beside artifacts/, never collected.
report = os.path.join(work, "job.json")
WRITE = """
import json, os, sys, time
n, d, report = int(sys.argv[1]), os.environ["C3_ARTIFACTS_DIR"], sys.argv[2]
t0 = time.perf_counter()
""" + MAKE
JOBS = {
    "live": WRITE + """
job_s = round(time.perf_counter() - t0, 2)
time.sleep(float(sys.argv[4]))
json.dump({"job_s": job_s}, open(report, "w"))
""",
    "churn": WRITE + """
secs, c, i, live = float(sys.argv[3]), os.path.join(d, "churn"), 0, []
t0 = time.perf_counter()
end = t0 + secs
while time.perf_counter() < end:
    sub = os.path.join(c, f"c{i // 100:07d}")
    if i % 100 == 0:
        os.makedirs(sub)
        old = os.path.join(c, f"c{i // 100 - 2:07d}")
        if i >= 200:
            for name in os.listdir(old):
                os.unlink(os.path.join(old, name))
            os.rmdir(old)
    p = os.path.join(sub, f"t{i:09d}")
    with open(p, "wb") as f:
        f.write(os.urandom(4096))
    if i % 2:
        os.rename(p, p + ".r")
        p += ".r"
    live.append(p)
    if len(live) > 50:
        q = live.pop(0)
        if os.path.exists(q):
            os.unlink(q)
    i += 1
for q in live:
    if os.path.exists(q):
        os.unlink(q)
for sub in os.listdir(c):
    os.rmdir(os.path.join(c, sub))
os.rmdir(c)
json.dump({"job_s": round(time.perf_counter() - t0, 2), "churned": i}, open(report, "w"))
""",
}
spec = os.path.join(root, "spec.json")
if mode == "files":
    command = ["true"]
else:
    command = [sys.executable, "-c", JOBS[mode], str(n), report, str(a.secs), str(a.linger)]
json.dump({"job_id": f"mem-{n}", "command": command, "workdir": work}, open(spec, "w"))
env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_AGENT", "AWS_"))}
env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG=os.environ.get("BENCH_RSS_LOG", "warn,c3_runtime::collector=info"), C3_AGENT_LOG_FORMAT="json")
pre = os.environ.get("PRE", "").split()
t0 = time.perf_counter()
errf = open(os.path.join(root, "agent.err"), "w+b")
p = subprocess.Popen(pre + [agent, "run", "--job", spec], env=env, stderr=errf, stdout=subprocess.DEVNULL)
live_hwm = None
if mode != "files":
    # The agent's own high-water mark when the job is done (its last act is its report):
    # what live sync cost, before the final sync's.
    gone = lambda: os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    while not os.path.exists(report) and not gone():
        time.sleep(0.02)
    try:
        hwm = [l for l in open(f"/proc/{p.pid}/status") if l.startswith("VmHWM:")][0]
        live_hwm = round(int(hwm.split()[1]) / 1024, 1)
    except (OSError, IndexError):
        pass
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
errf.seek(0)
err = errf.read().decode(errors="replace")
if os.environ.get("BENCH_RSS_STDERR"):
    open(os.environ["BENCH_RSS_STDERR"], "w").write(err)
if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(f"failed {status}:\n{err[-3000:]}")
stages = ""
for line in err.splitlines():
    try: ev = json.loads(line)
    except ValueError: continue
    f = ev.get("fields", ev)
    if f.get("message") == "final sync timings":
        stages = {k: f[k] for k in f if k.endswith("_ms")}
        # Files the final sync found stored already: those live sync sent while the job ran.
        stages["synced_live"] = f.get("already_synced")
manifest = os.path.join(store, "jobs", f"mem-{n}", "manifest.json")
out = {"label": label, "n": n, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
       "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "manifest": manifest, "stages": stages}
if mode != "files":
    # ru_maxrss is the larger of the agent's and its reaped children's (the job's python, ~10 MiB).
    out = {"mode": mode, **out, "live_peak_rss_mib": live_hwm, **json.load(open(report)),
           "files": len(json.load(open(manifest))["files"])}
print(json.dumps(out))
