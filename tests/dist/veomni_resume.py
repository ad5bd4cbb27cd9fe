"""torchrun worker (gloo): VeOmni's tasks/train_vlm.py (`import veomni_omni`, `parse_args`,
`VLMTrainer(args).train()`) plus one test-only callback, for tests/test_veomni_resume.py.

argv: RECORD_DIR DIE CONFIG.yaml [--key value ...]   (from CONFIG on: VeOmni's parse_args)

The callback appends each finished step to RECORD_DIR/steps_rank<R>.jsonl (step, this rank's loss,
grad norm, a digest of each micro batch's input ids), after VeOmni's checkpoint callback has run for
that step. DIE: `never`; `step:N`, rank 1 ends its process at the start of step N; `save:N`, rank 1
ends it inside DCP's write of step N's checkpoint (before writing its data files). The end is
os._exit (no cleanup, like a SIGKILL), once per RECORD_DIR (a marker file), so a torchrun restart
runs through.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import veomni_omni  # noqa: F401  (the one line VeOmni's users add)
from torch.distributed.checkpoint import FileSystemWriter
from veomni.arguments import parse_args
from veomni.trainer.callbacks.base import Callback
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainer

DYING_RANK = 1


class StepRecorder(Callback):
    def __init__(self, trainer, record_dir: Path, die: str):
        super().__init__(trainer)
        self.rank = trainer.args.train.global_rank
        self.record = record_dir / f"steps_rank{self.rank}.jsonl"
        self.marker = record_dir / "died"
        self.die_when, _, step = die.partition(":")
        self.die_step = int(step or 0)
        self.batches = []
        if self.die_when == "save":
            write_data = FileSystemWriter.write_data

            def write_data_or_die(writer, *args, **kwargs):
                self.maybe_die("save")
                return write_data(writer, *args, **kwargs)

            FileSystemWriter.write_data = write_data_or_die

    def maybe_die(self, when: str) -> None:
        state = self.trainer.state
        if when == self.die_when and state.global_step == self.die_step and self.rank == DYING_RANK and not self.marker.exists():
            self.marker.write_text(f"{when}:{state.global_step}")
            os._exit(1)

    def on_step_begin(self, state, micro_batches=None, **kwargs):
        self.maybe_die("step")
        self.batches = [hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest()[:12] for batch in micro_batches]

    def on_step_end(self, state, loss, loss_dict, grad_norm, **kwargs):
        row = {"step": state.global_step, "loss": loss, "grad_norm": float(grad_norm), "batches": self.batches}
        with open(self.record, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    record_dir, die = Path(sys.argv[1]), sys.argv[2]
    del sys.argv[1:3]
    trainer = VLMTrainer(parse_args(VeOmniVLMArguments))
    trainer.base._callbacks.append(StepRecorder(trainer.base, record_dir, die))
    trainer.train()
