"""torchrun worker: expert parallelism through VeOmni's own parallelizer (the model's EP plan, FSDP2 over
the rest, gloo). For each case every rank trains one step, the loss normalised as VeOmni's trainer does;
rank 0 saves the loss, the full gradients (FSDP shards gathered, then the EP shards of the experts
concatenated along the expert dimension), router logits, aux loss and every rank's expert load.

A case is "replicated" (every rank gets the same rows: EP with no data-parallel split) or "split"
(rank r gets rows[r]: EP folded into data parallelism, as VeOmni lays it out).

argv: checkpoint_dir spec.json out.pt   (spec["omni_checkpoint"]: the top-level model with the same thinker)
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from _common import build, finish, full_gradients, summed_over_ranks, veomni_scaled_loss  # same directory (patches applied there first)
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state

from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.models.moe import expert_load


def step(model, batch, aux):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False, output_router_logits=aux)
    loss = veomni_scaled_loss(out.loss, batch)
    loss.backward()
    local = expert_load(model, reset=False)
    world = expert_load(model, group=get_parallel_state().fsdp_group)  # the trainer's global view; resets
    loads = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(loads, local)
    result = {
        "loss": summed_over_ranks(loss) / dist.get_world_size(),
        "grads": full_gradients(model),
        "loads": torch.stack(loads),
        "world_load": world,
    }
    if aux:
        result["aux_loss"] = out.aux_loss.detach()
        result["router_logits"] = [logits.detach() for logits in out.router_logits]
    return result


def main():
    checkpoint, spec_file, out_file = sys.argv[1:4]
    spec = json.load(open(spec_file))
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    init_parallel_state(
        dp_size=world, dp_mode="fsdp2", device_type="cpu", extra_parallel_sizes=(spec["ep"],), extra_parallel_names=("ep",)
    )

    def layout(model):
        """Per rank: its EP rank and how many experts each thinker experts module holds."""
        mine = {
            "ep_rank": get_parallel_state().ep_rank if spec["ep"] > 1 else 0,
            "local_experts": sorted({m.gate_up_proj.shape[0] for m in model.modules() if isinstance(m, hf.Qwen3OmniMoeThinkerTextExperts)}),
        }
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        return gathered

    model = build(checkpoint)
    experts = model.model.language_model.layers[0].mlp.experts
    results = {"_layout": layout(model)}

    def run(variant, name):
        case = spec["all_cases"][name]
        print(f"rank {rank}: {variant}/{name} start", flush=True)
        if case["mode"] == "replicated":
            batch = build_batch(case["rows"], seed=case["seed"], with_position_ids=True)
        else:
            batch = build_batch(case["rows"][rank], seed=case["seeds"][rank], with_position_ids=True)
        result = step(model, batch, aux=case["mode"] == "replicated")
        if rank == 0:
            results[f"{variant}/{name}"] = result

    for name in spec["cases"]:
        run("ep", name)
    default_implementation = experts.config._experts_implementation
    for implementation, name in spec["implementation_cases"]:  # HF's other expert implementations, locally
        model.set_experts_implementation(implementation)
        run(implementation, name)
    model.set_experts_implementation(default_implementation)
    if spec["checkpointing_cases"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for name in spec["checkpointing_cases"]:
            run("gradient_checkpointing", name)
    if spec["omni_cases"]:  # the top-level model: the plan's `thinker.` prefix, a talker that stays whole
        model = build(spec["omni_checkpoint"])
        results["_omni_layout"] = layout(model)
        for name in spec["omni_cases"]:
            run("omni", name)
    if spec["mixed_precision_cases"]:  # bf16 compute (tokens exchanged in bf16), fp32 shards
        model = build(checkpoint, mixed_precision=True)
        for name in spec["mixed_precision_cases"]:
            run("mixed_precision", name)
    finish(results, out_file)


if __name__ == "__main__":
    main()
