#!/usr/bin/env python3
"""Does live sync slow the job down? A training-like job run bare and under c3-agent.

The job computes (one core, like a training step: SHA-256 over a buffer with --compute sha,
the interpreter's own dict-and-int work with --compute python) for a fixed amount of work and writes a checkpoint of --ckpt-mib MiB every --every steps; it measures its
own wall time and writes it to a file. Runs, alternating, --runs times each:

  bare                      python3 directly
  c3-agent, live sync       every checkpoint hashed and uploaded while the job runs
  c3-agent, sync off        uploads only at the end (the job's time excludes them)

The store is the discarding sink (bench/s3sink) at nice 19, standing for a remote store: its
own CPU does not count against the agent. Reported: the job's median wall time and its slowdown against bare,
and the same for its compute alone (the time outside its checkpoint writes); then the paired
slowdown (each round's run against that round's bare run, which cancels drift between rounds)
with a bootstrap 90% interval of its median: an interval that holds 1% cannot tell 1% apart.
The target is under 1%, on a host whose cores are not all taken by the job.

Why two kinds of compute: the agent hashes with SHA-256 too, so where its thread lands on the
job core's hyperthread sibling, a SHA-256 job contends for the same execution unit, which a
training loop's Python side would not.

Each run starts after a `sync` (otherwise the previous run's checkpoints are written back
during the next one), and the modes run in a shuffled order each round (on a VM, what the
previous run freed changes what the next one's page-cache allocations cost; a fixed order
charges that to whichever mode comes second). `--also BIN` adds a live-sync
row for another build (an older commit, say), in the same alternation; `--live-cpus LIST` a
live-sync row with `sync.live_cpus = LIST` (the agent's reading and hashing kept on those CPUs);
`--job-cpus LIST` runs the job under `taskset -c LIST` in every mode.

    python3 scripts/bench_job_slowdown.py [--runs 7] [--steps 40] [--every 8] [--ckpt-mib 128]
        [--compute sha|python] [--also BIN] [--live-cpus LIST] [--job-cpus LIST]
"""
import argparse, json, os, random, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_exit_to_done import BIN, start_sink  # noqa: E402

JOB = r"""
import hashlib, os, sys, time
steps, every, mib, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
d = os.environ.get('C3_ARTIFACTS_DIR') or sys.argv[5]
kind = sys.argv[6]
buf = os.urandom(4 << 20)
ckpt = os.urandom(mib << 20)

def sha_step():
    h = hashlib.sha256()
    for _ in range(24):
        h.update(buf)

def python_step():
    # The interpreter's own work, like a training loop's Python side: dicts, ints, calls.
    acc = {}
    for i in range(600_000):
        acc[i & 1023] = acc.get(i & 1023, 0) + i

step_fn = sha_step if kind == "sha" else python_step
t0 = time.perf_counter()
compute = 0.0
for step in range(steps):
    a = time.perf_counter()
    step_fn()
    compute += time.perf_counter() - a
    if (step + 1) % every == 0:
        with open(os.path.join(d, f'ckpt-{step}.pt'), 'wb') as f:
            f.write(ckpt[:-1] + bytes([step & 255]))
open(out, 'w').write(f"{time.perf_counter() - t0} {compute}")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=8)
    ap.add_argument("--ckpt-mib", type=int, default=128)
    ap.add_argument("--compute", choices=["sha", "python"], default="sha")
    ap.add_argument("--live-cpus", help="add a live-sync row with sync.live_cpus = this CPU list")
    ap.add_argument("--job-cpus", help="run the job under `taskset -c LIST` in every mode")
    ap.add_argument("--also", action="append", default=[], help="another c3-agent binary, live sync")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="c3-slow-")
    sink, toml = start_sink(tmp)
    # The sink stands for a remote store: its CPU is not this host's (nice 19, out of the way).
    subprocess.run(["renice", "-n", "19", "-p", str(sink.pid)], check=False, stdout=subprocess.DEVNULL)
    modes = ["bare", "live", "off"] + [f"also{k}" for k in range(len(args.also))]
    modes += ["pinned"] if args.live_cpus else []
    times = {m: [] for m in modes}
    computes = {m: [] for m in modes}
    order = random.Random(13)
    try:
        for i in range(args.runs):
            for mode in order.sample(modes, len(modes)):
                os.sync()
                out = os.path.join(tmp, f"{mode}-{i}.t")
                work = os.path.join(tmp, f"w-{mode}-{i}")
                os.makedirs(os.path.join(work, "artifacts"))
                pin = ["taskset", "-c", args.job_cpus] if args.job_cpus else []
                job = pin + ["python3", "-c", JOB, str(args.steps), str(args.every), str(args.ckpt_mib), out,
                       os.path.join(work, "artifacts"), args.compute]
                if mode == "bare":
                    subprocess.run(job, check=True)
                else:
                    cfg = os.path.join(tmp, f"{mode}-{i}.toml")
                    open(cfg, "w").write(f'state_dir = "{tmp}/state-{mode}-{i}"\njobs_root = "{tmp}"\n'
                                         f'[sync]\nlive = {"false" if mode == "off" else "true"}\n'
                                         + (f'live_cpus = "{args.live_cpus}"\n' if mode == "pinned" else "")
                                         + toml)
                    spec = os.path.join(tmp, f"{mode}-{i}.json")
                    json.dump({"job_id": f"{mode}-{i}", "command": job, "workdir": work}, open(spec, "w"))
                    env = {k: v for k, v in os.environ.items() if not k.startswith("C3_AGENT")}
                    env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="warn")
                    exe = args.also[int(mode[4:])] if mode.startswith("also") else BIN
                    subprocess.run([exe, "run", "--job", spec], env=env, check=True, stdout=subprocess.DEVNULL)
                total, compute = map(float, open(out).read().split())
                times[mode].append(total)
                computes[mode].append(compute)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        sink.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    bare = statistics.median(times["bare"])
    bare_c = statistics.median(computes["bare"])
    ckpts = args.steps // args.every
    where = f", job on CPUs {args.job_cpus}" if args.job_cpus else ""
    print(f"job: {args.steps} steps of {args.compute} compute{where}, a {args.ckpt_mib} MiB checkpoint every "
          f"{args.every} ({ckpts} in all), median of {args.runs}, {os.cpu_count()} CPUs, store: discarding sink")
    print(f"{'run':<24} {'job wall s':>10} {'slowdown':>9}  {'min':>6} {'max':>6}  {'compute s':>9} {'slowdown':>9}")
    names = [("bare", "bare"), ("live", "c3-agent, live sync"), ("off", "c3-agent, sync off")]
    names += [(f"also{k}", f"{os.path.basename(b)}, live sync") for k, b in enumerate(args.also)]
    names += [("pinned", f"live, cpus {args.live_cpus}")] if args.live_cpus else []
    for mode, name in names:
        m, c = statistics.median(times[mode]), statistics.median(computes[mode])
        print(f"{name:<24} {m:>10.3f} {100 * (m / bare - 1):>8.2f}%  {min(times[mode]):>6.3f} {max(times[mode]):>6.3f}"
              f"  {c:>9.3f} {100 * (c / bare_c - 1):>8.2f}%")
    print("compute: the job's time outside its checkpoint writes (CPU contention); the rest of the "
          "wall time is its own writes into the page cache (memory bandwidth)")
    print()
    print(f"paired (each round against its own bare run): median slowdown [bootstrap 90% interval]")
    rng = random.Random(7)
    for mode, name in names[1:]:
        cells = []
        for series, base in ((times[mode], times["bare"]), (computes[mode], computes["bare"])):
            ratios = [100 * (x / b - 1) for x, b in zip(series, base)]
            med, lo, hi = paired(ratios, rng)
            cells.append(f"{med:>+7.2f}% [{lo:+.2f}, {hi:+.2f}]")
        print(f"{name:<24} job wall {cells[0]}   compute {cells[1]}")


def paired(ratios, rng, draws=2000):
    """The median of the per-round slowdowns and a bootstrap 90% interval of that median."""
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), meds[int(0.05 * draws)], meds[int(0.95 * draws) - 1]


if __name__ == "__main__":
    main()
