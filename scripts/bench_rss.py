#!/usr/bin/env python3
"""Peak RSS of `c3-agent run --job` (job `true`, live sync off, file:// store) on N 4 KiB files
already in artifacts/ (100 a directory): python3 scripts/bench_rss.py AGENT N [LABEL].
The files are made once under $BENCH_RSS_DIR (default /var/tmp/c3-bench-rss) and kept; the
store and state are new each run, so the manifest of two builds can be compared with `cmp`
(<dir>/n<N>/store/jobs/mem-<N>/manifest.json). PRE="heaptrack -o out" runs it under a tool."""
import json, os, shutil, subprocess, sys, time
agent, n = sys.argv[1], int(sys.argv[2])
label = sys.argv[3] if len(sys.argv) > 3 else "run"
root = os.path.join(os.environ.get("BENCH_RSS_DIR", "/var/tmp/c3-bench-rss"), f"n{n}")
work = os.path.join(root, "work")
d = os.path.join(work, "artifacts")
if not os.path.exists(os.path.join(root, "ready")):
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        sub = os.path.join(d, f"d{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
            f.write(os.urandom(4096))
    open(os.path.join(root, "ready"), "w").close()
state = os.path.join(root, "state"); store = os.path.join(root, "store")
for p in (state, store, os.path.join(work, ".c3")):
    shutil.rmtree(p, ignore_errors=True)
os.makedirs(store)
cfg = os.path.join(root, "agent.toml")
open(cfg, "w").write(f'state_dir = "{state}"\njobs_root = "{root}"\n[sync]\nlive = false\n[store]\nurl = "file://{store}"\n')
spec = os.path.join(root, "spec.json")
json.dump({"job_id": f"mem-{n}", "command": ["true"], "workdir": work}, open(spec, "w"))
env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_AGENT", "AWS_"))}
env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="warn,c3_runtime::collector=info", C3_AGENT_LOG_FORMAT="json")
pre = os.environ.get("PRE", "").split()
t0 = time.perf_counter()
p = subprocess.Popen(pre + [agent, "run", "--job", spec], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
err = p.stderr.read().decode(errors="replace")
if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(f"failed {status}:\n{err[-3000:]}")
stages = ""
for line in err.splitlines():
    try: ev = json.loads(line)
    except ValueError: continue
    f = ev.get("fields", ev)
    if f.get("message") == "final sync timings":
        stages = {k: f[k] for k in f if k.endswith("_ms")}
print(json.dumps({"label": label, "n": n, "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
                  "peak_rss_mib": round(ru.ru_maxrss / 1024, 1), "manifest": os.path.join(store, "jobs", f"mem-{n}", "manifest.json"), "stages": stages}))
