"""torchrun worker: one thinker experts layer sharded over an EP group of all ranks (as VeOmni's plan
slices it), the same routed tokens through the torch-native dispatch and, on CUDA, VeOmni's fused EP
kernel; the outputs also against the whole (unsharded) experts run locally. Rank 0 saves, per rank, the
largest relative difference of each compared tensor.

argv: device (cuda | cpu) out.pt    (cpu/gloo runs the torch-native path only)
"""

import os
import sys

import torch
import torch.distributed as dist

import veomni_omni  # noqa: F401
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from _common import finish, on_every_rank  # same directory
from veomni.distributed.parallel_state import init_parallel_state

from veomni_omni.models import moe
from veomni_omni.tiny import tiny_thinker_config


def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run(experts, router, x, implementation):
    moe.set_moe_implementation(implementation)
    experts.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    _, weights, index = router(x)
    weights = weights.detach().requires_grad_(True)
    out = experts(x, index, weights)
    probe = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * probe).sum().backward()
    return {"output": out.detach(), "input grad": x.grad, "routing weight grad": weights.grad,
            "gate_up grad": experts.gate_up_proj.grad, "down grad": experts.down_proj.grad}


def main():
    device, out_file = sys.argv[1:3]
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    init_parallel_state(dp_size=world, dp_mode="fsdp2", device_type=device, extra_parallel_sizes=(world,), extra_parallel_names=("ep",))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    config = tiny_thinker_config(hidden_size=256, moe_intermediate_size=128, num_experts=8 * world, num_experts_per_tok=4).text_config
    torch.manual_seed(0)  # same weights on every rank
    whole, router = hf.Qwen3OmniMoeThinkerTextExperts(config), hf.Qwen3OmniMoeThinkerTextTopKRouter(config)
    for weight in (whole.gate_up_proj, whole.down_proj, router.weight):
        torch.nn.init.normal_(weight, std=0.05)
    whole, router = whole.to(device, dtype), router.to(device, dtype)
    num_local = config.num_experts // world
    sharded = hf.Qwen3OmniMoeThinkerTextExperts(config).to(device, dtype)
    shard = slice(rank * num_local, (rank + 1) * num_local)
    sharded.gate_up_proj = torch.nn.Parameter(whole.gate_up_proj[shard].detach().clone())
    sharded.down_proj = torch.nn.Parameter(whole.down_proj[shard].detach().clone())

    torch.manual_seed(1 + rank)  # each rank its own tokens, a different number of them
    x = torch.randn(200 + 37 * rank, config.hidden_size, device=device, dtype=dtype)
    native = run(sharded, router, x, "torch")
    local = run(whole, router, x, "torch")  # whole experts: HF's forward, no exchange
    errors = {"torch EP vs whole: output": relative(native["output"], local["output"]),
              "torch EP vs whole: input grad": relative(native["input grad"], local["input grad"])}
    if device == "cuda":
        fused = run(sharded, router, x, "fused_triton")
        errors.update({f"fused EP vs torch EP: {name}": relative(fused[name], native[name]) for name in native})
    moe.set_moe_implementation(None)

    finish(on_every_rank(errors), out_file)


if __name__ == "__main__":
    main()
