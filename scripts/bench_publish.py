#!/usr/bin/env python3
"""`c3-agent publish` of a big checkpoint vs a plain upload of it, same run, same server.

Target (issue 10): a publish of a 1 GiB file returns within 1.2x the time a plain upload of
it takes. Both on s3s-fs (127.0.0.1), file in the page cache:
  publish   inside a job, `c3-agent publish ckpt.bin` timed by the job itself (the agent hashes,
            uploads, writes the in-progress manifest, then answers)
  plain     c3-agent at a job's end (`run --job true` on a workdir holding the file, live sync
            off): what bench_data_path.py measures; the agent's start-up is included
  aws-cli   `aws s3 cp` of the same file, for reference

    python3 scripts/bench_publish.py [--runs 3] [--gib 1] [--no-build]
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_data_path as b  # noqa: E402  (servers, measuring, tools)


def publish_once(tmp, server, size, run_id):
    state = os.path.join(tmp, "pstate")
    b.remove(state)
    server.clean()
    cfg = os.path.join(tmp, "p.toml")
    open(cfg, "w").write(
        f'state_dir = "{state}"\njobs_root = "{tmp}"\n[sync]\nsettle_ms = 600000\n[store]\nurl = "s3://{b.BUCKET}/p"\n'
        f'[store.options]\naws_endpoint = "{server.endpoint}"\naws_allow_http = "true"\n'
        'aws_access_key_id = "AK"\naws_secret_access_key = "SK"\naws_region = "us-east-1"\n')
    work = os.path.join(tmp, f"pwork-{run_id}")
    b.remove(work)
    os.makedirs(os.path.join(work, "artifacts"))
    src = os.path.join(tmp, "ckpt.bin")
    os.link(src, os.path.join(work, "artifacts", "ckpt.bin"))
    script = (f'python3 -c "import subprocess,time,sys; t=time.perf_counter(); '
              f'subprocess.run([sys.argv[1],\'publish\',\'artifacts/ckpt.bin\'],check=True,stdout=subprocess.DEVNULL); '
              f'open(\'took\',\'w\').write(str(time.perf_counter()-t))" {b.AGENT}')
    spec = os.path.join(tmp, "p.json")
    json.dump({"job_id": f"pub-{run_id}", "command": ["sh", "-c", script], "workdir": work}, open(spec, "w"))
    env = b.clean_env()
    env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="warn")
    subprocess.run([b.AGENT, "run", "--job", spec], env=env, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return float(open(os.path.join(work, "took")).read())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    b.ensure_tools(not args.no_build)
    size = int(args.gib * b.GIB)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        src = os.path.join(tmp, "ckpt.bin")
        with open(src, "wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
        server = b.Server("s3s-fs", tmp)
        try:
            pub, plain, aws = [], [], []
            for i in range(args.runs):
                pub.append(publish_once(tmp, server, size, i))
                server.clean()
                work = os.path.join(tmp, f"plain-{i}")
                os.makedirs(os.path.join(work, "artifacts"))
                os.link(src, os.path.join(work, "artifacts", "ckpt.bin"))
                plain.append(b.run_agent(tmp, work, f"s3://{b.BUCKET}/a", server, f"plain-{i}")[0])
                server.clean()
                aws.append(b.run_aws(src, server, f"aws-{i}", False)[0])
        finally:
            server.stop()
    med = statistics.median
    mb = size / 1e6
    print(f"\n{args.gib:g} GiB checkpoint to s3s-fs, median of {args.runs} (same run, same server):\n")
    print("| how | wall s | MB/s | vs plain |")
    print("|---|---|---|---|")
    for name, xs in (("c3-agent publish (in the job)", pub), ("c3-agent at exit (plain upload)", plain), ("aws s3 cp", aws)):
        print(f"| {name} | {med(xs):.2f} | {mb / med(xs):.0f} | {med(xs) / med(plain):.2f}x |")
    print(f"\ntarget: publish <= 1.2x plain; measured {med(pub) / med(plain):.2f}x")


if __name__ == "__main__":
    main()
