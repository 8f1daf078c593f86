#!/usr/bin/env python3
"""The data path at full speed: c3-agent vs rclone and aws-cli on the same endpoints, same run.

Workloads:   1 x 2 GiB random file;  10,000 x 4 KiB files (--files N);  --only many: 100,000 x 4 KiB.
Endpoints:   s3s-fs (a real S3 server on 127.0.0.1);  c3-s3sink (an S3 server that discards
             every byte, so client ceilings are measured, not the server's);  the file store
             (c3-agent's file:// store vs `cp` + `sha256sum`, the local physical reference).
Figures:     wall MB/s, files/s, client CPU-seconds per GiB, peak RSS; median of --runs runs;
             ratios against each peer from the same run.

c3-agent is measured doing what it does at a job's end: `run --job` on a workdir whose
artifacts/ already holds the files (job `true`, live sync off), so the figure includes
hashing (SHA-256 + BLAKE3), the upload, the manifest and the agent's start-up.

    python3 scripts/bench_data_path.py [--runs 3] [--only big|small|many] [--files N] [--no-build]
        [--endpoints s3s-fs,sink,file] [--peers rclone,aws-cli,cp]

c3-agent's own stage timings (its `final sync timings` log line: the walk, the uploads, the
logs, the manifest) are printed per run and as medians.

Installs rclone (Debian) and aws-cli (PyPI) if missing. Needs s3s-fs (scripts/test.sh installs it).
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
AGENT = os.path.join(TARGET, "release", "c3-agent")
SINK = os.path.join(TARGET, "release", "c3-s3sink")
GIB = 1 << 30
BUCKET = "bench"


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def ensure_tools(build, peers):
    if build:
        sh("cargo", "build", "--release", "-q", "-p", "c3-agent", cwd=ROOT)
        sh("cargo", "build", "--release", "-q", "--manifest-path", os.path.join(ROOT, "bench/s3sink/Cargo.toml"),
           env={**os.environ, "CARGO_TARGET_DIR": TARGET})
    if "rclone" in peers and not shutil.which("rclone"):
        sh("apt-get", "update", "-q")
        sh("apt-get", "install", "-y", "-q", "rclone")
    if "aws-cli" in peers and not shutil.which("aws"):
        sh(sys.executable, "-m", "pip", "install", "-q", "awscli")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    for _ in range(500):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on {port}")


class Server:
    def __init__(self, kind, tmp):
        self.kind, self.port = kind, free_port()
        if kind == "s3s-fs":
            exe = os.environ.get("C3_TEST_S3S_FS") or shutil.which("s3s-fs") or os.path.expanduser("~/.cargo/bin/s3s-fs")
            self.root = os.path.join(tmp, "s3root")
            os.makedirs(os.path.join(self.root, BUCKET), exist_ok=True)
            cmd = [exe, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", "AK", "--secret-key", "SK", self.root]
        else:
            cmd = [SINK, "--host", "127.0.0.1", "--port", str(self.port), "--access-key", "AK", "--secret-key", "SK"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def clean(self):
        # Keep the server's disk (and page cache) from filling up between runs.
        if self.kind == "s3s-fs":
            shutil.rmtree(os.path.join(self.root, BUCKET), ignore_errors=True)
            os.makedirs(os.path.join(self.root, BUCKET), exist_ok=True)
            for f in os.listdir(self.root):
                if f.startswith("."):
                    os.remove(os.path.join(self.root, f))

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def measure(cmd, env=None, cwd=None):
    """Wall seconds, CPU seconds (user+sys of the command and its children), peak RSS MiB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, stages_of(err)


STAGES = ("scan_ms", "upload_ms", "logs_ms", "manifest_ms")


def stages_of(log):
    """The agent's `final sync timings` line (JSON log), if any."""
    for line in log.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        fields = ev.get("fields", ev)
        if fields.get("message") == "final sync timings":
            return {k: float(fields[k]) for k in STAGES if k in fields}
    return None


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("C3_AGENT", "AWS_", "RCLONE_"))}
    env.update(AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK", AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    return env


def run_agent(tmp, workdir, store_url, server, run_id):
    state = os.path.join(tmp, "agent-state")
    shutil.rmtree(state, ignore_errors=True)
    cfg = os.path.join(tmp, "agent.toml")
    toml = f'state_dir = "{state}"\njobs_root = "{tmp}"\n[sync]\nlive = false\n[store]\nurl = "{store_url}"\n'
    if server:
        toml += (f'[store.options]\naws_endpoint = "{server.endpoint}"\naws_allow_http = "true"\n'
                 'aws_access_key_id = "AK"\naws_secret_access_key = "SK"\naws_region = "us-east-1"\n')
    open(cfg, "w").write(toml)
    spec = os.path.join(tmp, "spec.json")
    json.dump({"job_id": f"bench-{run_id}", "command": ["true"], "workdir": workdir}, open(spec, "w"))
    env = clean_env()
    env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="warn,c3_runtime::collector=info", C3_AGENT_LOG_FORMAT="json")
    return measure([AGENT, "run", "--job", spec], env=env)


def run_rclone(src, server, run_id, is_dir):
    env = clean_env()
    env.update(RCLONE_CONFIG_B_TYPE="s3", RCLONE_CONFIG_B_PROVIDER="Other", RCLONE_CONFIG_B_ENDPOINT=server.endpoint,
               RCLONE_CONFIG_B_ACCESS_KEY_ID="AK", RCLONE_CONFIG_B_SECRET_ACCESS_KEY="SK",
               RCLONE_CONFIG_B_FORCE_PATH_STYLE="true", RCLONE_CONFIG_B_REGION="us-east-1")
    return measure(["rclone", "copy", src, f"b:{BUCKET}/rclone-{run_id}", "--transfers", "16", "--s3-no-check-bucket", "--s3-no-head"], env=env)


def run_aws(src, server, run_id, is_dir):
    cmd = ["aws", "--endpoint-url", server.endpoint, "s3", "cp", src, f"s3://{BUCKET}/aws-{run_id}/", "--only-show-errors"]
    if is_dir:
        cmd.insert(-1, "--recursive")
    return measure(cmd, env=clean_env())


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def run_cp_sha(src, tmp, is_dir):
    dest = os.path.join(tmp, "cp-dest")
    remove(dest)
    hash_cmd = f"find '{src}' -type f -print0 | xargs -0 sha256sum > /dev/null" if is_dir else f"sha256sum '{src}' > /dev/null"
    r = measure(["sh", "-c", f"cp -r '{src}' '{dest}' && sync -f '{tmp}' && {hash_cmd}"])
    remove(dest)
    return r


def make_workloads(tmp, only, files):
    loads = []
    if only in (None, "big"):
        work = os.path.join(tmp, "work-big")
        os.makedirs(os.path.join(work, "artifacts"))
        path = os.path.join(work, "artifacts", "big.bin")
        with open(path, "wb") as f:
            for _ in range(2048):
                f.write(os.urandom(1 << 20))
        loads.append(("1 x 2 GiB", work, path, 1, 2 * GIB))
    if only in (None, "small", "many"):
        n = 100_000 if only == "many" else files
        work = os.path.join(tmp, "work-small")
        d = os.path.join(work, "artifacts")
        # 100 files per directory, like per-sample outputs sharded by step.
        for i in range(n):
            sub = os.path.join(d, f"d{i // 100:04d}")
            if i % 100 == 0:
                os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
                f.write(os.urandom(4096))
        loads.append((f"{n:,} x 4 KiB", work, d, n, n * 4096))
    return loads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", choices=["big", "small", "many"])
    ap.add_argument("--files", type=int, default=10_000, help="files in the small workload")
    ap.add_argument("--endpoints", default="s3s-fs,sink,file")
    ap.add_argument("--peers", default="rclone,aws-cli,cp")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS-vs-file-size check")
    args = ap.parse_args()
    if args.rss_only:
        ensure_tools(not args.no_build, args.peers.split(","))
        return rss_vs_size()
    ensure_tools(not args.no_build, args.peers.split(","))
    tmp = tempfile.mkdtemp(prefix="c3-bench-data-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    servers = {}
    rows = []
    stage_rows = []
    try:
        loads = make_workloads(tmp, args.only, args.files)
        endpoints, peers = args.endpoints.split(","), args.peers.split(",")
        for kind in ("s3s-fs", "sink"):
            if kind in endpoints:
                servers[kind] = Server(kind, tmp)
        counter = 0
        for name, work, src, files, size in loads:
            is_dir = files > 1
            cases = []
            for kind, server in servers.items():
                cases.append((kind, "c3-agent", lambda s=server, w=work: run_agent(tmp, w, f"s3://{BUCKET}/c3-{counter}", s, counter), server))
                if "rclone" in peers:
                    cases.append((kind, "rclone", lambda s=server: run_rclone(src, s, counter, is_dir), server))
                if "aws-cli" in peers:
                    cases.append((kind, "aws-cli", lambda s=server: run_aws(src, s, counter, is_dir), server))
            store_dir = os.path.join(tmp, "file-store")
            if "file" in endpoints:
                cases.append(("file", "c3-agent", lambda w=work: run_agent(tmp, w, f"file://{store_dir}", None, counter), None))
                if "cp" in peers:
                    cases.append(("file", "cp+sha256sum", lambda: run_cp_sha(src, tmp, is_dir), None))
            results = {}
            for _ in range(args.runs):
                for endpoint, tool, fn, server in cases:
                    counter += 1
                    r = fn()
                    results.setdefault((endpoint, tool), []).append(r)
                    if server:
                        server.clean()
                    shutil.rmtree(store_dir, ignore_errors=True)
                    st = "  " + " ".join(f"{k[:-3]} {v:.0f} ms" for k, v in r[3].items()) if r[3] else ""
                    print(f"  {name:<15} {endpoint:<7} {tool:<13} wall {r[0]:7.2f} s  cpu {r[1]:6.2f} s  rss {r[2]:7.1f} MiB{st}", file=sys.stderr)
            for (endpoint, tool), rs in results.items():
                wall = statistics.median(r[0] for r in rs)
                cpu = statistics.median(r[1] for r in rs)
                rss = statistics.median(r[2] for r in rs)
                rows.append((name, endpoint, tool, wall, size / wall / 1e6, files / wall, cpu / (size / GIB), rss, cpu))
                if rs[0][3]:
                    stage_rows.append((name, endpoint, {k: statistics.median(r[3].get(k, 0) for r in rs) for k in STAGES}, wall))
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmedian of {args.runs} runs, {os.cpu_count()} CPUs; files read from the page cache")
    print(f"{'workload':<15} {'endpoint':<8} {'tool':<13} {'wall s':>7} {'MB/s':>7} {'files/s':>8} {'CPU s/GiB':>9} {'RSS MiB':>8}  vs peers (speed, CPU)")
    for name, endpoint, tool, wall, mbs, fps, cpu_gib, rss, cpu in rows:
        ratios = ""
        if tool == "c3-agent":
            for other in rows:
                if other[0] == name and other[1] == endpoint and other[2] != tool:
                    ratios += f" {other[2]}: {other[3] / wall:.2f}x faster, {other[6] / cpu_gib:.2f}x less CPU;"
        per_file = f" {cpu / fps / wall * 1e6:.0f} CPU-us/file;" if fps and "x 4 KiB" in name else ""
        print(f"{name:<15} {endpoint:<8} {tool:<13} {wall:>7.2f} {mbs:>7.1f} {fps:>8.0f} {cpu_gib:>9.2f} {rss:>8.1f}{per_file}{ratios}")
    if stage_rows:
        print("\nc3-agent's final sync by stage (medians, ms; the rest of the wall time is start-up, the")
        print("launch of the job and the reports)")
        print(f"{'workload':<15} {'endpoint':<8} " + " ".join(f"{k[:-3]:>9}" for k in STAGES) + f" {'wall':>9}")
        for name, endpoint, st, wall in stage_rows:
            print(f"{name:<15} {endpoint:<8} " + " ".join(f"{st[k]:>9.0f}" for k in STAGES) + f" {wall * 1000:>9.0f}")


def rss_vs_size():
    """The agent's peak RSS uploading one file of 1, 2 and 4 GiB to the sink: flat, under 64 MiB."""
    tmp = tempfile.mkdtemp(prefix="c3-bench-rss-", dir=os.environ.get("BENCH_TMP", "/var/tmp"))
    sink = Server("sink", tmp)
    rows = []
    try:
        work = os.path.join(tmp, "work")
        os.makedirs(os.path.join(work, "artifacts"))
        path = os.path.join(work, "artifacts", "big.bin")
        with open(path, "wb") as f:
            for gib in (1, 2, 4):
                while f.tell() < gib * GIB:
                    f.write(os.urandom(1 << 20))
                f.flush()
                wall, cpu, rss, _ = run_agent(tmp, work, f"s3://{BUCKET}/rss-{gib}", sink, f"rss{gib}")
                rows.append((gib, wall, cpu, rss))
    finally:
        sink.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nc3-agent peak RSS by file size (discarding sink, default settings)")
    print(f"{'size':>6} {'wall s':>7} {'CPU s/GiB':>9} {'peak RSS MiB':>12}")
    for gib, wall, cpu, rss in rows:
        print(f"{gib:>4} GiB {wall:>7.2f} {cpu / gib:>9.2f} {rss:>12.1f}")


if __name__ == "__main__":
    main()
