"""torchrun worker: the main job (`veomni_omni.train.main`) with one fault injected on one rank.

argv: FAULT RANK STEP recipe.yaml [key=value ...]
  raise  the rank raises when it fetches its batch for STEP
  hang   the rank sleeps (as if stuck) when it fetches its batch for STEP
  nan    the rank's batch for STEP gets NaN position ids, so its loss is NaN; the rank prints
         "injected nan: <sample ids>" first
"""

import os
import sys
import time

import torch

from veomni_omni import train, train_data


def inject(fault: str, step: int) -> None:
    fetch = train_data.Pipeline.next_micro_batch
    calls = {"train": 0}

    def faulty(self):
        batch = fetch(self)
        if self.epochs is not None:  # the evaluation pass, not training
            return batch
        calls["train"] += 1
        if calls["train"] == step:
            if fault == "raise":
                raise RuntimeError(f"injected fault on rank {os.environ['RANK']} at step {step}")
            if fault == "hang":
                time.sleep(3600)
            ids = [self.samples[i]["id"] for i, _ in batch.samples]
            print(f"injected nan: {', '.join(ids)}", flush=True)
            batch.inputs["position_ids"] = torch.full_like(batch.inputs["position_ids"], float("nan"))
        return batch

    train_data.Pipeline.next_micro_batch = faulty


if __name__ == "__main__":
    fault, rank, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if fault not in ("raise", "hang", "nan"):
        raise SystemExit(f"unknown fault {fault!r}")
    if int(os.environ["RANK"]) == rank:
        inject(fault, step)
    raise SystemExit(train.main(sys.argv[4:]))
