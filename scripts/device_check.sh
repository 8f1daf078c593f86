#!/bin/sh
# The device checks of one session, in one call (see the README's benchmarks): run from the
# repo root on a GPU machine, with release builds carried in target/device/ (stripped:
# c3-agent, c3-s3sink, and optionally an older c3-agent-<rev> to compare). Results under $OUT.
set -u
OUT=${OUT:-/tmp/c3-device-out}; mkdir -p "$OUT" target/release
cp target/device/c3-agent target/device/c3-s3sink target/release/
export PYTHONUNBUFFERED=1
{ nproc; free -g | head -2; uname -r; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.is_available())'
  target/release/c3-agent --version; } > "$OUT/host.txt" 2>&1
older=$(ls target/device/c3-agent-* 2>/dev/null | head -1)
timeout "${SLOWDOWN_S:-170}" python3 scripts/bench_job_slowdown.py --runs "${SLOWDOWN_RUNS:-9}" ${older:+--also "$older"} > "$OUT/slowdown.txt" 2>&1
timeout "${TRAIN_S:-260}" python3 scripts/bench_gpu_train.py --runs "${TRAIN_RUNS:-2}" > "$OUT/train.txt" 2>&1
timeout "${SMALL_S:-80}" python3 scripts/bench_data_path.py --only small --endpoints sink --peers none --runs 3 --no-build > "$OUT/small.txt" 2>&1
cat "$OUT/host.txt"; tail -8 "$OUT/slowdown.txt"; tail -12 "$OUT/train.txt"; tail -12 "$OUT/small.txt"
