#!/usr/bin/env python3
"""A stand-in for a training job, for trying c3-agent end to end (python3, stdlib only).

It behaves the way real training scripts do towards the agent:
  - prints one progress line per epoch (flushed, so it shows up live in the agent's log);
  - writes a checkpoint per epoch to $C3_ARTIFACTS_DIR/checkpoints/epoch-<n>.ckpt, first under a temporary
    name and then renamed into place, as PyTorch Lightning, Keras and friends do (so the agent sees a finished
    file appear, and can upload it while training goes on);
  - at the end writes $C3_ARTIFACTS_DIR/metrics.json and a small JSON result to $C3_RESULT_FILE.

Environment (all optional):
  EPOCHS            number of epochs, default 3
  CKPT_KIB          checkpoint size in KiB, default 256
  EPOCH_SECONDS     time spent "training" per epoch, default 0.2
  C3_ARTIFACTS_DIR  set by c3-agent; default ./artifacts when run by hand
  C3_RESULT_FILE    set by c3-agent; no result file when unset

Checkpoint bytes are deterministic (same epoch, same size -> same bytes), so a rerun produces the same
blobs and exercises the store's deduplication.

    c3-agent run --output checkpoints -- python3 examples/train.py
    C3_ARTIFACTS_DIR=$(mktemp -d) C3_RESULT_FILE=/tmp/r.json python3 examples/train.py
"""

import hashlib
import json
import math
import os
import sys
import time


def env_number(name, default, kind):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        sys.exit(f"train.py: {name}={raw!r} is not a number")
    if value < 0:
        sys.exit(f"train.py: {name}={raw!r} must not be negative")
    return value


def pseudo_random_bytes(seed, size):
    """`size` deterministic, incompressible-looking bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def write_atomically(path, data):
    """Write to a temporary name in the same directory, fsync, then rename into place."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    epochs = env_number("EPOCHS", 3, int)
    ckpt_bytes = env_number("CKPT_KIB", 256, int) * 1024
    epoch_seconds = env_number("EPOCH_SECONDS", 0.2, float)
    artifacts = os.environ.get("C3_ARTIFACTS_DIR") or os.path.join(os.getcwd(), "artifacts")
    result_file = os.environ.get("C3_RESULT_FILE")
    checkpoints = os.path.join(artifacts, "checkpoints")
    os.makedirs(checkpoints, exist_ok=True)

    print(f"training: {epochs} epochs, checkpoints in {checkpoints}", flush=True)
    started = time.monotonic()
    history = []
    loss, accuracy = 2.3, 0.1
    for epoch in range(1, epochs + 1):
        time.sleep(epoch_seconds)
        # A plausible learning curve: loss decays, accuracy saturates towards 0.95.
        loss = round(2.3 * math.exp(-0.9 * epoch) + 0.05, 4)
        accuracy = round(0.95 - 0.85 * math.exp(-1.2 * epoch), 4)
        name = f"epoch-{epoch}.ckpt"
        write_atomically(os.path.join(checkpoints, name), pseudo_random_bytes(f"epoch-{epoch}", ckpt_bytes))
        history.append({"epoch": epoch, "loss": loss, "accuracy": accuracy})
        print(f"epoch {epoch}/{epochs}: loss={loss:.4f} accuracy={accuracy:.4f} saved {name}", flush=True)

    elapsed = round(time.monotonic() - started, 3)
    metrics = {"epochs": epochs, "final_loss": loss, "final_accuracy": accuracy, "seconds": elapsed, "history": history}
    write_atomically(os.path.join(artifacts, "metrics.json"), (json.dumps(metrics, indent=2) + "\n").encode())

    result = {"accuracy": accuracy, "loss": loss, "epochs": epochs}
    if result_file:
        os.makedirs(os.path.dirname(os.path.abspath(result_file)), exist_ok=True)
        write_atomically(result_file, json.dumps(result).encode())
    print(f"done in {elapsed:.1f}s: {json.dumps(result)}", flush=True)


if __name__ == "__main__":
    main()
