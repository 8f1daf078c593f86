#!/usr/bin/env python3
"""GPU release: how soon after the script exits a scheduler may reuse the GPU.

Contract v2 §7: the agent sends `FINALIZING` with `"gpu_released": true` as soon as the job's
processes are gone, before the final sync; the terminal status still waits for the manifest.
Target: the FINALIZING report leaves the node < 100 ms after the script's exit.

Each job writes a checkpoint of --mib MiB in its last second and exits right after writing
`time.time()` to a marker file (the last thing the script does). A recording control plane
(stdlib HTTP server on 127.0.0.1) stamps each status on arrival. Printed side by side, per store
(file store; s3s-fs on 127.0.0.1 when installed), medians and maxima over --runs jobs:

  exit -> FINALIZING   when a scheduler that reads FINALIZING may place the next job
  exit -> terminal     when one that waits for the terminal status could (the peer behaviour:
                       a batch system that frees the GPU when the job's process tree is done)

    python3 scripts/bench_gpu_release.py [--runs 10] [--mib 256] [--agent PATH] [--no-build]
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_exit_to_done import start_s3  # noqa: E402  (same s3s-fs set-up)

JOB = r"""
import os, sys, time
d = os.environ['C3_ARTIFACTS_DIR']
time.sleep(0.5)
chunk = os.urandom(1 << 20)
with open(os.path.join(d, 'last.ckpt'), 'wb') as f:
    for i in range(int(sys.argv[1])):
        f.write(chunk)
with open(sys.argv[2], 'w') as f:
    f.write(repr(time.time()))
"""


class Recorder(BaseHTTPRequestHandler):
    statuses = []  # (arrival time, job, body)
    lock = threading.Lock()

    def do_POST(self):
        arrived = time.time()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.split("/")
        if self.path.endswith("/status"):
            with Recorder.lock:
                Recorder.statuses.append((arrived, parts[-2], json.loads(body)))
        reply = b'{"storage_used_bytes":0,"storage_quota_bytes":null}' if self.path.endswith("/artifacts") else b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def one_store(agent, tmp, name, store_toml, url, runs, mib):
    fin, term = [], []
    for i in range(runs):
        job = f"{name}-{i}"
        work = os.path.join(tmp, "jobs", job)
        os.makedirs(work)
        marker = os.path.join(tmp, f"{job}.exit")
        config = os.path.join(tmp, f"{name}.toml")
        with open(config, "w") as f:
            f.write(f'state_dir = "{tmp}/state-{name}"\njobs_root = "{tmp}/jobs"\n{store_toml}'
                    f'[control_plane]\nurl = "{url}"\n')
        spec = os.path.join(tmp, f"{job}.json")
        with open(spec, "w") as f:
            json.dump({"job_id": job, "workdir": work, "command": ["python3", "-c", JOB, str(mib), marker]}, f)
        out = subprocess.run([agent, "run", "--config", config, "--job", spec], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{job}: agent exited {out.returncode}\n{out.stderr[-3000:]}")
        exited = float(open(marker).read())
        with Recorder.lock:
            mine = [(t, b) for t, j, b in Recorder.statuses if j == job]
        f_at = [t for t, b in mine if b["state"] == "FINALIZING"]
        t_at = [t for t, b in mine if b["state"] not in ("RUNNING", "FINALIZING")]
        if not f_at or not t_at:
            sys.exit(f"{job}: statuses {[b['state'] for _, b in mine]}")
        fin.append((f_at[0] - exited) * 1000)
        term.append((t_at[0] - exited) * 1000)
    return fin, term


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--agent", default=os.path.join(ROOT, "target", "release", "c3-agent"))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build and args.agent.endswith(os.path.join("release", "c3-agent")):
        subprocess.run(["cargo", "build", "--release", "-p", "c3-agent"], cwd=ROOT, check=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/api"
    tmp = tempfile.mkdtemp(prefix="c3-gpu-release-")
    s3, s3_toml = start_s3(tmp)
    stores = [("file", f'[store]\nurl = "file://{tmp}/store"\n')]
    if s3_toml:
        stores.append(("s3s-fs", s3_toml))
    print(f"{args.runs} jobs per store, each writing a {args.mib} MiB checkpoint in its last second, then exiting")
    print(f"{'store':<8} {'exit->FINALIZING p50':>21} {'max':>8} {'exit->terminal p50':>19} {'max':>8}  target FINALIZING < 100 ms")
    try:
        for name, toml in stores:
            fin, term = one_store(args.agent, tmp, name, toml, url, args.runs, args.mib)
            ok = "yes" if max(fin) < 100 else "NO"
            print(f"{name:<8} {statistics.median(fin):>18.1f} ms {max(fin):>5.1f} ms "
                  f"{statistics.median(term):>16.1f} ms {max(term):>5.1f} ms  {ok}")
    finally:
        if s3:
            s3.kill()
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
