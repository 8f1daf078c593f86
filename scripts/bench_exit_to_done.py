#!/usr/bin/env python3
"""Exit-to-done: how long the GPU waits after the script exits, with live sync on and off.

A job writes 384 MiB as 6 checkpoint files of 64 MiB, one every ~0.7 s (like epochs), then
exits. The agent's JSON log gives the time from "job script exited" to "job finished".
Runs against the file store and a real S3 server (s3s-fs on 127.0.0.1), each mode several
times, and prints medians side by side. Also prints the agent's CPU time for a quiet job.

    python3 scripts/bench_exit_to_done.py [--runs 3] [--no-build]
    python3 scripts/bench_exit_to_done.py --last-second [--mib 1536] [--no-build]

--last-second: the checkpoint written in the job's last second. A job writes one file of
--mib MiB at about 1 GB/s and exits right after closing it, live sync on (the agent hashes the
file while it is written). Reported: the agent's exit-to-done against the store's ingest time
for that file (`aws s3 cp` of the same file to the same store, in the same run), and against
`aws s3 cp` / `rclone copy` started at exit. Target: exit-to-done <= 1.2x the ingest time.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_data_path import wait_port  # noqa: E402
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
    wait_port(port)
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


LAST_SECOND = r"""
import os, sys, time
d = os.environ['C3_ARTIFACTS_DIR']
mib = int(sys.argv[1])
chunk = os.urandom(64 << 20)
start = time.time()
with open(os.path.join(d, 'last.ckpt'), 'wb') as f:
    for i in range(mib // 64):
        f.write(chunk[:-1] + bytes([i & 255]))
        # about 1 GB/s, like a fast checkpoint writer
        lag = start + (i + 1) * 64 / 1000 - time.time()
        if lag > 0:
            time.sleep(lag)
"""


def peer_at_exit(cmd, env):
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def start_sink(tmp):
    """c3-s3sink (bench/s3sink): an S3 server that discards every byte, so the client's own
    ceiling is measured, not the server's."""
    exe = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "c3-s3sink")
    if not os.path.exists(exe):
        subprocess.run(["cargo", "build", "--release", "-q", "--manifest-path", os.path.join(ROOT, "bench/s3sink/Cargo.toml")],
                       cwd=ROOT, check=True)
    port = free_port()
    proc = subprocess.Popen([exe, "--host", "127.0.0.1", "--port", str(port), "--access-key", "AK", "--secret-key", "SK"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    toml = (f'[store]\nurl = "s3://bench/p"\n[store.options]\naws_endpoint = "http://127.0.0.1:{port}"\n'
            'aws_allow_http = "true"\naws_access_key_id = "AK"\naws_secret_access_key = "SK"\naws_region = "us-east-1"\n')
    return proc, toml


def last_second(args):
    tmp = tempfile.mkdtemp(prefix="c3-bench-")
    s3, s3_toml = start_sink(tmp) if args.sink else start_s3(tmp)
    if not s3:
        sys.exit("needs s3s-fs")
    endpoint = s3_toml.split('aws_endpoint = "')[1].split('"')[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_AGENT", "AWS_", "RCLONE_"))}
    env.update(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_DEFAULT_REGION="us-east-1")
    renv = dict(env, RCLONE_CONFIG_B_TYPE="s3", RCLONE_CONFIG_B_PROVIDER="Other", RCLONE_CONFIG_B_ENDPOINT=endpoint,
                RCLONE_CONFIG_B_ACCESS_KEY_ID="AK", RCLONE_CONFIG_B_SECRET_ACCESS_KEY="SK",
                RCLONE_CONFIG_B_FORCE_PATH_STYLE="true", RCLONE_CONFIG_B_REGION="us-east-1")
    try:
        r = run_agent(tmp, s3_toml, True, "last", ["python3", "-c", LAST_SECOND, str(args.mib)])
        # The same bytes for the peers (the agent's workdir is gone): written once more.
        src = os.path.join(tmp, "peer")
        os.makedirs(src)
        subprocess.run(["python3", "-c", LAST_SECOND.replace("os.environ['C3_ARTIFACTS_DIR']", repr(src)), str(args.mib)], check=True)
        f = os.path.join(src, "last.ckpt")
        ingest = peer_at_exit(["aws", "--endpoint-url", endpoint, "s3", "cp", f, "s3://bench/ingest/last.ckpt", "--only-show-errors"], env)
        rclone = peer_at_exit(["rclone", "copy", src, "b:bench/rclone", "--s3-no-check-bucket", "--s3-no-head"], renv)
    finally:
        s3.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    where = "the discarding sink" if args.sink else "s3s-fs"
    print(f"\ncheckpoint of {args.mib} MiB written in the job's last ~{args.mib / 1000:.1f} s at ~1 GB/s, {where}, {os.cpu_count()} CPUs")
    print(f"{'':<40} {'seconds':>8} {'x ingest':>9}")
    for name, t in [("store ingest (aws s3 cp of the file)", ingest), ("c3-agent exit -> done (live sync)", r["exit_to_done"]),
                    ("aws s3 cp started at exit", ingest), ("rclone copy started at exit", rclone)]:
        print(f"{name:<40} {t:>8.2f} {t / ingest:>9.2f}")
    print(f"c3-agent CPU {r['cpu']:.2f} s, peak RSS {r['rss_mib']:.0f} MiB; target exit->done <= 1.2x ingest")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--last-second", action="store_true")
    ap.add_argument("--mib", type=int, default=1536)
    ap.add_argument("--sink", action="store_true", help="--last-second against the discarding sink")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "c3-agent"], cwd=ROOT, check=True)
    if args.last_second:
        return last_second(args)
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
