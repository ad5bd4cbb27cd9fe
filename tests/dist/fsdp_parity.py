"""torchrun worker: FSDP2 (VeOmni's parallelize, gloo, reshard after forward) over ranks holding
different modalities. For each case, every rank trains on its own rows with the loss normalised as
VeOmni's trainer does; rank 0 saves the loss and full (gathered) gradients for the parent test.

argv: checkpoint_dir cases.json out.pt
"""

import json
import sys
from datetime import timedelta

import torch.distributed as dist

from _common import build, finish, step_counting_vit  # same directory (patches applied there first)
from veomni.distributed.parallel_state import init_parallel_state

from veomni_omni.data.shaped_batches import build_batch


def freeze_encoders(model):  # freeze_vit / freeze_audio_tower
    model.model.visual.requires_grad_(False)
    model.model.audio_tower.requires_grad_(False)


def main():
    checkpoint, cases_file, out_file = sys.argv[1:4]
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    init_parallel_state(dp_size=dist.get_world_size(), dp_mode="fsdp2", device_type="cpu")
    spec = json.load(open(cases_file))
    results = {}
    model = build(checkpoint)
    frozen = build(checkpoint, prepare=freeze_encoders) if spec["frozen_cases"] else None
    for variant, cases in (("fsdp", spec["cases"]), ("gradient_checkpointing", spec["checkpointing_cases"]), ("frozen_encoders", spec["frozen_cases"])):
        target = frozen if variant == "frozen_encoders" else model
        if variant == "gradient_checkpointing":
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name in cases:
            case = spec["all_cases"][name]
            print(f"rank {rank}: {variant}/{name} start", flush=True)
            batch = build_batch(case["rows"][rank], seed=case["seeds"][rank], with_position_ids=True)
            loss, grads, vit_calls = step_counting_vit(target, batch)
            if rank == 0:
                results[f"{variant}/{name}"] = {"loss": loss, "grads": grads, "vit_calls": vit_calls}
    if spec["mixed_precision_cases"]:  # bf16 compute, fp32 shards: the dummies must take the encoders' dtype
        mixed = build(checkpoint, mixed_precision=True)
        for name in spec["mixed_precision_cases"]:
            case = spec["all_cases"][name]
            batch = build_batch(case["rows"][rank], seed=case["seeds"][rank], with_position_ids=True)
            loss, _, vit_calls = step_counting_vit(mixed, batch)
            if rank == 0:
                results[f"mixed_precision/{name}"] = {"loss": loss, "vit_calls": vit_calls}
    finish(results, out_file)


if __name__ == "__main__":
    main()
