#!/usr/bin/env python3
"""Exit-to-done: how long the GPU waits after the script exits, with live sync on and off.

A job writes 384 MiB as 6 checkpoint files of 64 MiB, one every ~0.7 s (like epochs), then
exits. The agent's JSON log gives the time from "job script exited" to "job finished".
Runs against the file store and a real S3 server (s3s-fs on 127.0.0.1), each mode several
times, and prints medians side by side. Also prints the agent's CPU time for a quiet job.

    python3 scripts/bench_exit_to_done.py [--runs 3] [--no-build]
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "c3-agent")

JOB = r"""
import os, time
d = os.environ['C3_ARTIFACTS_DIR']
chunk = os.urandom(1 << 20)
for epoch in range(6):
    tmp = os.path.join(d, '.ckpt-%d.tmp' % epoch)
    with open(tmp, 'wb') as f:
        for i in range(64):
            f.write(chunk[:-1] + bytes([epoch]))
    os.rename(tmp, os.path.join(d, 'ckpt-%d.bin' % epoch))
    time.sleep(0.7)
"""


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3(tmp):
    exe = os.environ.get("C3_TEST_S3S_FS") or shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
    if not os.path.exists(exe):
        return None, None
    root = os.path.join(tmp, "s3root")
    os.makedirs(os.path.join(root, "bench"))
    port = free_port()
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--access-key", "AK", "--secret-key", "SK", root],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    toml = (f'[store]\nurl = "s3://bench/p"\n[store.options]\naws_endpoint = "http://127.0.0.1:{port}"\n'
            'aws_allow_http = "true"\naws_access_key_id = "AK"\naws_secret_access_key = "SK"\naws_region = "us-east-1"\n')
    return proc, toml


def run_agent(tmp, store_toml, live, job_id, command):
    state = os.path.join(tmp, "state-" + job_id)
    cfg = os.path.join(tmp, job_id + ".toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{state}"\njobs_root = "{tmp}"\n[sync]\nlive = {"true" if live else "false"}\n' + (store_toml or ""))
    work = os.path.join(tmp, "work-" + job_id)
    spec = os.path.join(tmp, job_id + ".json")
    with open(spec, "w") as f:
        json.dump({"job_id": job_id, "command": command, "workdir": work}, f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("C3_AGENT")}
    env.update(C3_AGENT_LOG_FORMAT="json", C3_AGENT_CONFIG=cfg)
    t0 = time.time()
    errf = open(os.path.join(tmp, job_id + ".log"), "w+")
    proc = subprocess.Popen([BIN, "run", "--job", spec], env=env, stdout=subprocess.DEVNULL, stderr=errf)
    # The agent's own CPU and peak RSS (not its job's), sampled from /proc until it exits.
    cpu, hwm = 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    while proc.poll() is None:
        try:
            stat = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            cpu = (int(stat[11]) + int(stat[12])) / tick
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        except (OSError, IndexError):
            pass
        time.sleep(0.02)
    status = proc.returncode
    wall = time.time() - t0
    errf.seek(0)
    err = errf.read()
    if status != 0:
        sys.exit(f"agent failed ({status}):\n{err}")
    events = [json.loads(l) for l in err.splitlines() if l.startswith("{")]
    exited = next(ts(e["timestamp"]) for e in events if e.get("message") == "job script exited")
    done = next(ts(e["timestamp"]) for e in events if e.get("message") == "job finished")
    shutil.rmtree(work, ignore_errors=True)
    return {"exit_to_done": done - exited, "wall": wall, "cpu": cpu, "rss_mib": hwm / 1024}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "c3-agent"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="c3-bench-")
    s3, s3_toml = start_s3(tmp)
    stores = [("file", "")] + ([("s3s-fs", s3_toml)] if s3 else [])
    rows = []
    try:
        for store, toml in stores:
            for live in (True, False):
                results = [run_agent(tmp, toml, live, f"b-{store}-{live}-{i}", ["python3", "-c", JOB]) for i in range(args.runs)]
                med = {k: statistics.median(r[k] for r in results) for k in results[0]}
                rows.append((store, "live sync" if live else "sync off (upload at exit)", med))
        idle = run_agent(tmp, "", True, "idle", ["sleep", "5"])
    finally:
        if s3:
            s3.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nexit-to-done for a job writing 384 MiB (6 x 64 MiB), median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(f"{'store':<8} {'mode':<27} {'exit->done s':>12} {'job wall s':>10} {'agent CPU s':>11} {'peak RSS MiB':>12}")
    for store, mode, m in rows:
        print(f"{store:<8} {mode:<27} {m['exit_to_done']:>12.3f} {m['wall']:>10.2f} {m['cpu']:>11.2f} {m['rss_mib']:>12.1f}")
    for store in dict.fromkeys(r[0] for r in rows):
        on = next(m for s, mode, m in rows if s == store and mode.startswith("live"))
        off = next(m for s, mode, m in rows if s == store and not mode.startswith("live"))
        print(f"{store}: live sync releases the GPU {off['exit_to_done'] / max(on['exit_to_done'], 1e-3):.0f}x sooner")
    print(f"quiet job (sleep 5): agent CPU {idle['cpu']:.3f} s over {idle['wall']:.1f} s wall")


if __name__ == "__main__":
    main()
