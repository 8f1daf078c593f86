"""Publish each checkpoint the moment it is saved, from Hugging Face Trainer or Lightning.

Inside a c3 job (`C3_AGENT_SOCKET` set), the agent stores the checkpoint's files and answers
only once they are durable and in the job's manifest: old checkpoints can then be deleted
safely. Outside a c3 job these callbacks do nothing.

    from checkpoint_callbacks import C3PublishCallback
    trainer = Trainer(..., args=TrainingArguments(output_dir=os.environ["C3_ARTIFACTS_DIR"], ...),
                      callbacks=[C3PublishCallback()])

    from checkpoint_callbacks import C3ModelCheckpoint
    pl.Trainer(..., callbacks=[C3ModelCheckpoint(dirpath=os.environ["C3_ARTIFACTS_DIR"])])
"""
import os

from publish import publish, request  # examples/publish.py, stdlib only


def _publish_dir(path):
    if not os.environ.get("C3_AGENT_SOCKET") or not os.path.isdir(path):
        return
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]
    reply = publish(files) if files else {"ok": True}
    if not reply["ok"]:
        raise RuntimeError("c3 publish failed: " + reply["error"])


try:
    from transformers import TrainerCallback

    class C3PublishCallback(TrainerCallback):
        """After each save, publishes the new `checkpoint-<step>` directory."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                _publish_dir(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            return control

except ImportError:  # transformers not installed
    pass

try:
    from lightning.pytorch.callbacks import ModelCheckpoint

    class C3ModelCheckpoint(ModelCheckpoint):
        """Lightning's ModelCheckpoint that publishes each checkpoint file once written."""

        def _save_checkpoint(self, trainer, filepath):
            super()._save_checkpoint(trainer, filepath)
            if trainer.is_global_zero and os.environ.get("C3_AGENT_SOCKET"):
                reply = publish([filepath])
                if not reply["ok"]:
                    raise RuntimeError("c3 publish failed: " + reply["error"])

except ImportError:  # lightning not installed
    pass

if __name__ == "__main__":
    # A smoke test without any framework: publish a directory, then the barrier.
    import sys

    _publish_dir(sys.argv[1])
    print(request({"op": "wait_all"}))
