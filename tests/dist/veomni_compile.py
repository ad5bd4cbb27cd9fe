"""torchrun worker: VeOmni's own VLMTrainer (unmodified) from each YAML in turn, in one process group; per run,
on rank 0: each step's loss and grad norm as VeOmni reports them, the global expert load of the step, the decoder
blocks VeOmni compiled (and with which torch.compile options), and Dynamo's graph and graph-break counts.

argv: out.json config.yaml [config.yaml ...]   (configs as `tasks/train_vlm.py` takes them)
"""

import json
import os
import sys

import torch.distributed as dist
from torch._dynamo.utils import counters

import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
from veomni.arguments import parse_args
from veomni.distributed.parallel_state import clear_parallel_state
from veomni.trainer.callbacks.base import Callback
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainer

from veomni_omni.models.moe import expert_load


class StepRecorder(Callback):
    def __init__(self, trainer):
        super().__init__(trainer)
        self.steps = []

    def on_step_end(self, state, loss=None, grad_norm=None, **kwargs):
        load = expert_load(self.trainer.model, group=dist.group.WORLD)
        self.steps.append({"loss": loss, "grad_norm": float(grad_norm), "expert_load": load.tolist()})


def run(config_file: str, keep_process_group: bool) -> dict:
    sys.argv[1:] = [config_file]
    args = parse_args(VeOmniVLMArguments)
    trainer = VLMTrainer(args)
    recorder = StepRecorder(trainer.base)
    trainer.base._callbacks.append(recorder)
    compiled = [m._veomni_compile_config for m in trainer.base.model.modules() if getattr(m, "_veomni_forward_compiled", False)]
    if keep_process_group:  # VeOmni tears it down at the end of train(); the next run needs it
        trainer.base.destroy_distributed = clear_parallel_state
    counters.clear()
    trainer.train()
    return {
        "compiled_blocks": compiled,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "steps": recorder.steps,
    }


def main():
    out_file, *configs = sys.argv[1:]
    results = {config: run(config, keep_process_group=i < len(configs) - 1) for i, config in enumerate(configs)}
    if os.environ["RANK"] == "0":
        with open(out_file, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
