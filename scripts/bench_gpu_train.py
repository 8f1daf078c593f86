#!/usr/bin/env python3
"""A real training job, bare and under c3-agent: does live sync cost training speed, and how
long is the GPU held after the script exits? Needs a GPU, PyTorch and transformers; nothing is
downloaded (GPT-2 124M from its config, random tokens).

The job is a Hugging Face `Trainer` run (bf16, batch 16 x 512 tokens) that saves a checkpoint
(model + optimizer, about 1.5 GB) every --every steps with `save_total_limit=2`, as a user's
script would, and writes its metrics and `time.time()` to a marker file as its last act. Runs alternate, --runs
times each:

  bare        python3 directly, output to a plain directory
  c3-agent    `c3-agent run`, live sync on, the discarding sink (bench/s3sink) as the store

Reported per run and as medians: the Trainer's own steps/s (checkpoint saves included, as the
job feels them) and, under the agent, exit -> done (the agent's exit after the final sync, the
manifest and the reports), with the agent's `final sync timings` and `job finished` lines.

    python3 scripts/bench_gpu_train.py [--runs 2] [--steps 150] [--every 50]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from bench_exit_to_done import BIN, start_sink  # noqa: E402

JOB = r"""
import json, os, sys, time
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
out = os.environ.get("C3_ARTIFACTS_DIR") or sys.argv[1]
steps, every, marker = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = GPT2Config()
model = GPT2LMHeadModel(cfg)

class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20
    def __getitem__(self, i):
        ids = torch.randint(0, cfg.vocab_size, (512,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}

args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=16, bf16=True,
                         save_steps=every, save_total_limit=2, logging_steps=every, report_to=[],
                         dataloader_num_workers=2, disable_tqdm=True)
result = Trainer(model=model, args=args, train_dataset=Tokens()).train()
print(json.dumps(result.metrics), flush=True)
open(marker, "w").write(json.dumps(dict(result.metrics, exit_time=time.time())))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="c3-gpu-")
    sink, toml = start_sink(tmp)
    rows = []
    try:
        for i in range(args.runs):
            for mode in ("bare", "c3-agent"):
                os.sync()
                work = os.path.join(tmp, f"w-{mode}-{i}")
                os.makedirs(os.path.join(work, "artifacts"))
                marker = os.path.join(tmp, f"{mode}-{i}.exit")
                job = ["python3", "-c", JOB, os.path.join(work, "artifacts"), str(args.steps), str(args.every), marker]
                if mode == "bare":
                    run = subprocess.run(job, capture_output=True, text=True)
                    done = time.time()
                else:
                    cfg = os.path.join(tmp, f"{i}.toml")
                    open(cfg, "w").write(f'state_dir = "{tmp}/state-{i}"\njobs_root = "{tmp}"\n' + toml)
                    spec = os.path.join(tmp, f"{i}.json")
                    json.dump({"job_id": f"gpu-{i}", "command": job, "workdir": work}, open(spec, "w"))
                    env = {k: v for k, v in os.environ.items() if not k.startswith("C3_AGENT")}
                    env.update(C3_AGENT_CONFIG=cfg, C3_AGENT_LOG="info")
                    run = subprocess.run([BIN, "run", "--job", spec], env=env, capture_output=True, text=True)
                    done = time.time()
                m = json.load(open(marker)) if os.path.exists(marker) else {}
                exit_at = m.get("exit_time")
                row = {"mode": mode, "run": i, "code": run.returncode, "steps_per_s": m.get("train_steps_per_second"),
                       "train_s": m.get("train_runtime"),
                       "exit_to_done_s": (done - exit_at) if (exit_at and mode != "bare") else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if run.returncode != 0:
                    print((run.stdout + run.stderr)[-3000:], flush=True)
                for line in (run.stdout + run.stderr).splitlines():
                    if "final sync timings" in line or "job finished" in line:
                        print("   ", line[-300:], flush=True)
                shutil.rmtree(work, ignore_errors=True)
    finally:
        sink.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nGPT-2 124M, Trainer, {args.steps} steps, a checkpoint every {args.every}, median of {args.runs}")
    bare = [r["steps_per_s"] for r in rows if r["mode"] == "bare" and r["steps_per_s"]]
    agent = [r["steps_per_s"] for r in rows if r["mode"] == "c3-agent" and r["steps_per_s"]]
    held = [r["exit_to_done_s"] for r in rows if r["exit_to_done_s"] is not None]
    if bare and agent:
        b, a = statistics.median(bare), statistics.median(agent)
        print(f"steps/s bare {b:.3f}, under c3-agent (live sync) {a:.3f}: {100 * (b / a - 1):+.2f} % time per step")
    if held:
        print(f"exit -> done under c3-agent: median {statistics.median(held):.2f} s, max {max(held):.2f} s")


if __name__ == "__main__":
    main()
