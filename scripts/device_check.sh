#!/bin/sh
# The device checks of one session, in one call (see the README's benchmarks): run from the
# repo root on a GPU machine, with release builds carried in target/device/ (stripped:
# c3-agent, c3-s3sink, and optionally an older c3-agent-<rev> to compare). Results under $OUT.
set -u
OUT=${OUT:-/tmp/c3-device-out}; mkdir -p "$OUT" target/release
cp target/device/c3-agent target/device/c3-s3sink target/release/
export PYTHONUNBUFFERED=1
{ nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node0|L3"; free -g | head -2; uname -r; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.is_available())'
  target/release/c3-agent --version; } > "$OUT/host.txt" 2>&1
older=$(ls target/device/c3-agent-* 2>/dev/null | head -1)
# The job on CPU 0; a live-sync row with the agent's reading and hashing on the last two CPUs
# (away from CPU 0 and, unless the last two are CPU 0's siblings, its hyperthread sibling).
n=$(nproc)
timeout "${SLOWDOWN_S:-170}" python3 scripts/bench_job_slowdown.py --runs "${SLOWDOWN_RUNS:-9}" \
    --job-cpus 0 --live-cpus "$((n - 2))-$((n - 1))" ${older:+--also "$older"} > "$OUT/slowdown.txt" 2>&1
# A job whose compute is the interpreter's, not SHA-256 (which the agent's hashing also uses).
timeout "${PYTHON_S:-120}" python3 scripts/bench_job_slowdown.py --runs "${PYTHON_RUNS:-7}" \
    --compute python > "$OUT/slowdown-python.txt" 2>&1
timeout "${TRAIN_S:-200}" python3 scripts/bench_gpu_train.py --runs "${TRAIN_RUNS:-2}" > "$OUT/train.txt" 2>&1
timeout "${SMALL_S:-80}" python3 scripts/bench_data_path.py --only small --endpoints sink --peers none --runs 3 --no-build > "$OUT/small.txt" 2>&1
cat "$OUT/host.txt"; tail -12 "$OUT/slowdown.txt"; tail -10 "$OUT/slowdown-python.txt"; tail -12 "$OUT/train.txt"; tail -12 "$OUT/small.txt"
