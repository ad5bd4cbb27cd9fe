"""torchrun worker: the main job (`veomni_omni.train.main`) with one fault injected on one rank.

argv: FAULT RANK STEP recipe.yaml [--key value ...]
  raise  the rank raises when its step STEP begins
  hang   the rank sleeps (as if stuck) when its step STEP begins
  nan    the rank's forward at step STEP produces NaN hidden states, so its loss is NaN; it prints
         "injected nan on rank R" first
"""

import os
import sys
import time

from veomni_omni import train


def inject(fault: str, step: int) -> None:
    begin = train.OmniTrainer.on_step_begin

    def faulty(self, micro_batches=None):
        if self.base.state.global_step == step:
            if fault == "raise":
                raise RuntimeError(f"injected fault on rank {os.environ['RANK']} at step {step}")
            if fault == "hang":
                time.sleep(3600)
            print(f"injected nan on rank {os.environ['RANK']}", flush=True)
            norm = self.base.model.thinker.model.language_model.norm
            # NaN through the graph (as a real overflow would be), so backward still runs every layer's collectives
            handle = norm.register_forward_hook(lambda module, args, output: (handle.remove(), output * float("nan"))[1])
        return begin(self, micro_batches=micro_batches)

    train.OmniTrainer.on_step_begin = faulty


if __name__ == "__main__":
    fault, rank, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if fault not in ("raise", "hang", "nan"):
        raise SystemExit(f"unknown fault {fault!r}")
    if int(os.environ["RANK"]) == rank:
        inject(fault, step)
    sys.argv = [sys.argv[0], *sys.argv[4:]]
    raise SystemExit(train.main())
