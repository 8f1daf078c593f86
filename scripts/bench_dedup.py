#!/usr/bin/env python3
"""Dedup without sending: a re-run of the same 10,000-file output, every blob already stored.

The store is s3s-fs on 127.0.0.1 behind a counting TCP proxy (stdlib asyncio), so "bytes
sent" is what each client really put on the wire (request lines, headers and bodies). Each
figure is one run, all in the same process and on the same machine:

  c3-agent, first run                   fresh state dir: every blob is new
  c3-agent, re-run, same node           the node knows the blobs (its own uploads): one HEAD
                                        per file, no body
  c3-agent, re-run, fresh node          nothing known: a create-if-absent PUT per file sends
                                        the body and gets 412 back (what the agent did before)
  rclone copy / aws s3 sync, re-run     peers, re-run onto their own earlier copy (they skip by
                                        path, size and time, not by content)

    python3 scripts/bench_dedup.py [--files 10000] [--size 4096] [--no-build]
"""
import argparse, asyncio, json, os, shutil, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_data_path import BUCKET, Server, clean_env, ensure_tools, free_port, measure  # noqa: E402

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
AGENT = os.path.join(TARGET, "release", "c3-agent")


class Proxy:
    """Forwards 127.0.0.1:port to the server, counting what clients send."""

    def __init__(self, target_port):
        self.port, self.target, self.sent = free_port(), target_port, 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader, writer):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r, w, count):
            try:
                while data := await r.read(65536):
                    if count:
                        self.sent += len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    w.close()
                except Exception:
                    pass

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))


def agent_run(tmp, state, workdir, endpoint, job):
    cfg = os.path.join(tmp, f"{job}.toml")
    open(cfg, "w").write(
        f'state_dir = "{state}"\njobs_root = "{tmp}"\n[sync]\nlive = false\n[store]\nurl = "s3://{BUCKET}/c3"\n'
        f'[store.options]\naws_endpoint = "{endpoint}"\naws_allow_http = "true"\n'
        'aws_access_key_id = "AK"\naws_secret_access_key = "SK"\naws_region = "us-east-1"\n')
    spec = os.path.join(tmp, f"{job}.json")
    json.dump({"job_id": job, "command": ["true"], "workdir": workdir}, open(spec, "w"))
    env = clean_env()
    env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="warn")
    return measure([AGENT, "run", "--job", spec], env=env)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    ensure_tools(not args.no_build)
    tmp = tempfile.mkdtemp(prefix="c3-dedup-")
    server = Server("s3s-fs", tmp)
    proxy = Proxy(server.port)
    endpoint = f"http://127.0.0.1:{proxy.port}"
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    for i in range(args.files):
        with open(os.path.join(src, f"f{i:05d}.bin"), "wb") as f:
            f.write(os.urandom(args.size))
    body = args.files * args.size
    rows = []

    def row(name, fn):
        before = proxy.sent
        wall, cpu, _ = fn()
        rows.append((name, proxy.sent - before, wall, cpu))

    def workdir(job):
        w = os.path.join(tmp, job)
        shutil.copytree(src, os.path.join(w, "artifacts"))
        return w

    node = os.path.join(tmp, "node-a")
    row("c3-agent, first run", lambda: agent_run(tmp, node, workdir("first"), endpoint, "first"))
    row("c3-agent, re-run, same node", lambda: agent_run(tmp, node, workdir("again"), endpoint, "again"))
    row("c3-agent, re-run, fresh node", lambda: agent_run(tmp, os.path.join(tmp, "node-b"), workdir("other"), endpoint, "other"))
    renv = clean_env()
    renv.update(RCLONE_CONFIG_B_TYPE="s3", RCLONE_CONFIG_B_PROVIDER="Other", RCLONE_CONFIG_B_ENDPOINT=endpoint,
                RCLONE_CONFIG_B_ACCESS_KEY_ID="AK", RCLONE_CONFIG_B_SECRET_ACCESS_KEY="SK",
                RCLONE_CONFIG_B_FORCE_PATH_STYLE="true", RCLONE_CONFIG_B_REGION="us-east-1")
    rclone = ["rclone", "copy", src, f"b:{BUCKET}/rclone", "--transfers", "16", "--s3-no-check-bucket"]
    measure(rclone, env=renv)
    row("rclone copy --transfers 16, re-run", lambda: measure(rclone, env=renv))
    aws = ["aws", "--endpoint-url", endpoint, "s3", "sync", src, f"s3://{BUCKET}/aws", "--only-show-errors"]
    measure(aws, env=clean_env())
    row("aws s3 sync, re-run", lambda: measure(aws, env=clean_env()))
    print(f"{args.files} files x {args.size} B ({body / 1e6:.1f} MB of bodies), s3s-fs on 127.0.0.1, this machine")
    print(f"{'client':<38} {'bytes sent':>12} {'of bodies':>10} {'wall s':>8} {'CPU s':>7}")
    for name, sent, wall, cpu in rows:
        print(f"{name:<38} {sent:>12,} {sent / body:>9.1%} {wall:>8.2f} {cpu:>7.2f}")
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
