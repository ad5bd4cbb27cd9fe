"""torchrun worker: FSDP2 (VeOmni's parallelize, gloo, reshard after forward) over ranks holding
different modalities. For each case, every rank trains on its own rows with the loss normalised as
VeOmni's trainer does; rank 0 saves the loss and full (gathered) gradients for the parent test.

argv: checkpoint_dir cases.json out.pt
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
from veomni.arguments.arguments_types import MixedPrecisionConfig
from veomni.distributed.parallel_state import init_parallel_state
from veomni.distributed.torch_parallelize import build_parallelize_model
from veomni.models import build_foundation_model
from veomni.utils.loss_utils import count_loss_token, mean_global_loss, reduce_global_loss_token

from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.data.shaped_batches import build_batch


def build(checkpoint, freeze_encoders=False, mixed_precision=False):
    model = build_foundation_model(checkpoint, init_device="meta", torch_dtype="float32", ops_implementation=eager_ops_config())
    if freeze_encoders:  # freeze_vit / freeze_audio_tower
        model.model.visual.requires_grad_(False)
        model.model.audio_tower.requires_grad_(False)
    return build_parallelize_model(
        model, weights_path=checkpoint, init_device="meta", enable_gradient_checkpointing=False,
        mixed_precision=MixedPrecisionConfig(enable=mixed_precision), enable_reshard_after_forward=True,
    )


def step(model, batch):
    """One forward/backward exactly as VeOmni's trainer scales it; returns (loss share, full grads,
    how many times each rank ran the ViT)."""
    model.zero_grad(set_to_none=True)
    vit_calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: vit_calls.append(1))
    tokens = count_loss_token(batch)
    global_tokens = reduce_global_loss_token(tokens)
    loss = model(**batch, use_cache=False).loss
    loss = torch.stack(list(mean_global_loss(loss, tokens, tokens, global_tokens).values())).sum()
    loss.backward()
    hook.remove()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    share = loss.detach().clone()
    dist.all_reduce(share)
    calls = [None] * dist.get_world_size()
    dist.all_gather_object(calls, len(vit_calls))
    return share.item() / dist.get_world_size(), grads, calls


def main():
    checkpoint, cases_file, out_file = sys.argv[1:4]
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    rank = dist.get_rank()
    init_parallel_state(dp_size=dist.get_world_size(), dp_mode="fsdp2", device_type="cpu")
    spec = json.load(open(cases_file))
    results = {}
    model = build(checkpoint)
    frozen = build(checkpoint, freeze_encoders=True) if spec["frozen_cases"] else None
    for variant, cases in (("fsdp", spec["cases"]), ("gradient_checkpointing", spec["checkpointing_cases"]), ("frozen_encoders", spec["frozen_cases"])):
        target = frozen if variant == "frozen_encoders" else model
        if variant == "gradient_checkpointing":
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name in cases:
            case = spec["all_cases"][name]
            print(f"rank {rank}: {variant}/{name} start", flush=True)
            batch = build_batch(case["rows"][rank], seed=case["seeds"][rank], with_position_ids=True)
            loss, grads, vit_calls = step(target, batch)
            if rank == 0:
                results[f"{variant}/{name}"] = {"loss": loss, "grads": grads, "vit_calls": vit_calls}
    if spec["mixed_precision_cases"]:  # bf16 compute, fp32 shards: the dummies must take the encoders' dtype
        mixed = build(checkpoint, mixed_precision=True)
        for name in spec["mixed_precision_cases"]:
            case = spec["all_cases"][name]
            batch = build_batch(case["rows"][rank], seed=case["seeds"][rank], with_position_ids=True)
            loss, _, vit_calls = step(mixed, batch)
            if rank == 0:
                results[f"mixed_precision/{name}"] = {"loss": loss, "vit_calls": vit_calls}
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
