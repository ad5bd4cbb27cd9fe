"""`plan --measure-cpu`: the plan's per-rank memory against a real FSDP2 step on 2 CPU ranks.

The reduced thinker (`configs.cpu_thinker_config`, ~25M parameters, so parameters dominate) is built
on meta, LoRA-wrapped when `--lora-rank` is set (`plan.apply_lora`, as VeOmni's trainer wraps it),
and sharded by VeOmni's `build_parallelize_model` (FSDP2, mixed precision: fp32 shards, bf16 compute,
fp32 reductions; gradient checkpointing; EP 1 or 2: `--measure-ep`) over 2 gloo ranks. Each rank trains two steps on one
row with text, an image and an audio clip (VeOmni's fused AdamW); the second is measured.

Memory is read from the CPU allocator through the profiler (`profile_memory`: every allocation and
free, FSDP2's storage resizes included), from before the model is built: `peak` is the largest
total allocated during the measured step; `static` the bytes of the local parameter shards, their
gradients and the AdamW states at the end of it. The prediction is `plan.plan` for the same model,
tokens, modality shares and layout, with no CUDA overhead and the full-logits loss of the CPU path.

This file is also the torchrun worker: argv out.json lora_rank lora_targets (comma-separated) ep.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

RANKS = 2
# One row per rank: prompt, an image (16×16 patches → 64 tokens), text, an audio clip, text.
ROW = [("prompt", 16), ("image", 1, 16, 16), ("text", 160), ("audio", 800), ("text", 96)]


def _storage_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _peak_in(prof, range_name: str) -> tuple[int, int, str]:
    """(largest total allocated, total allocated when it began, the ops allocating at the peak)
    within the profiler range `range_name`."""
    from torch._C._profiler import _EventType

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    window = next(e for e in events if e.name == range_name)
    allocations = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    before = [e.extra_fields.total_allocated for e in allocations if e.start_time_ns < window.start_time_ns]
    inside = [e for e in allocations if window.start_time_ns <= e.start_time_ns <= window.end_time_ns]
    peak = max(inside, key=lambda e: e.extra_fields.total_allocated)
    ops, node = [], peak.parent
    while node is not None and node.name != range_name:
        ops.append(node.name)
        node = node.parent
    return peak.extra_fields.total_allocated, before[-1] if before else 0, " < ".join(ops[:4])


def worker() -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
    from veomni.arguments.arguments_types import MixedPrecisionConfig
    from veomni.distributed.parallel_state import init_parallel_state
    from veomni.distributed.torch_parallelize import build_parallelize_model
    from veomni.optim import build_optimizer

    from veomni_omni.bench.configs import cpu_thinker_config
    from veomni_omni.bench.plan import apply_lora, build_meta_thinker, lora_config
    from veomni_omni.testing import TOKENS, build_batch

    out_file, lora_rank, lora_targets, ep = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    init_parallel_state(dp_size=dist.get_world_size(), dp_mode="fsdp2", device_type="cpu", extra_parallel_sizes=(ep,), extra_parallel_names=("ep",))
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_meta_thinker(cpu_thinker_config())
        if lora_rank:
            model = apply_lora(model, lora_config(lora_rank, lora_targets))
        model = build_parallelize_model(
            model, init_device="meta", weights_path=None, enable_gradient_checkpointing=True,
            mixed_precision=MixedPrecisionConfig(enable=True), enable_reshard_after_forward=True,
            is_peft_model=bool(lora_rank),
        )
        for module in model.modules():  # kaiming A, zero B, as VeOmni's loader initialises a fresh adapter
            if hasattr(module, "reset_lora_parameters"):
                module.reset_lora_parameters()
        optimizer = build_optimizer(model, lr=1e-4, fused=True)
        batch = build_batch([ROW], model.config, seed=rank, with_position_ids=True)

        def adamw_states():
            """Tensors of the optimizer state (under EP VeOmni builds one AdamW for the experts, one for the rest)."""
            optimizers = getattr(optimizer, "optimizers_dict", {"all": optimizer}).values()
            return [t for opt in optimizers for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]

        def live_bytes() -> int:
            """Bytes held between steps: parameter shards, gradients, AdamW states, buffers, the batch."""
            params = list(model.parameters())
            held = [*params, *(p.grad for p in params if p.grad is not None), *adamw_states(), *model.buffers()]
            return _storage_bytes(held + [t for t in batch.values() if torch.is_tensor(t)])

        def step() -> tuple[float, int]:
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            params = list(model.parameters())
            static = _storage_bytes(params) + _storage_bytes(p.grad for p in params if p.grad is not None)
            static += _storage_bytes(adamw_states())
            optimizer.zero_grad()  # as VeOmni's trainer: gradients freed (set to None)
            return loss.item(), static

        step()
        held = live_bytes()
        with record_function("measured_step"):
            loss, static = step()
    peak, before, peak_ops = _peak_in(prof, "measured_step")
    ids = batch["input_ids"]
    result = {
        # The profiler's running total also counts what other threads (gloo's) free: only its rise
        # within the step is used, on top of the bytes counted tensor by tensor before it.
        "rank": rank, "loss": loss, "peak_bytes": held + peak - before, "held_before_step_bytes": held,
        "profiler_total_before_step_bytes": before, "static_bytes": static, "peak_ops": peak_ops,
        "tokens": ids.numel(),
        "visual_tokens": int(((ids == TOKENS["image"]) | (ids == TOKENS["video"])).sum()),
        "audio_tokens": int((ids == TOKENS["audio"]).sum()),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def predicted(args, measured: dict) -> dict:
    """`plan.plan` for the measured model, batch and layout."""
    from .configs import cpu_thinker_config
    from .plan import GIB, build_planned_model, plan

    tokens = measured["tokens"]
    layout = argparse.Namespace(**{
        **vars(args), "gpus": RANKS, "ep": args.measure_ep, "sp": 1, "seq_len": tokens, "micro_batch": 1,
        "visual_frac": measured["visual_tokens"] / tokens, "audio_frac": measured["audio_tokens"] / tokens,
        "grad_ckpt": True, "ce": "full", "overhead_gib": 0.0,
        "param_dtype": "fp32", "grad_dtype": "fp32", "master_dtype": "none", "optim_dtype": "fp32",
        "compute_dtype": "bf16", "reduce_dtype": "fp32",
    })
    result = plan(layout, build_planned_model(layout, cpu_thinker_config()))
    static_keys = ("params", "grads", "master", "adamw_states", "frozen_params")
    return {
        "per_rank_bytes": result["per_rank_gib"] * GIB,
        "static_bytes": sum(result["breakdown_gib"].get(k, 0) for k in static_keys) * GIB,
        "breakdown_gib": result["breakdown_gib"],
    }


def measure_cpu(args) -> dict:
    from veomni_omni.testing import run_ranks

    from .common import format_table

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "measured.json"
        run_ranks(__file__, RANKS, [str(out), str(args.lora_rank), ",".join(args.lora_targets), str(args.measure_ep)], timeout_s=600)
        ranks = json.loads(out.read_text())
    worst = max(ranks, key=lambda r: r["peak_bytes"])
    plan_bytes = predicted(args, worst)
    ratios = {
        "peak": plan_bytes["per_rank_bytes"] / worst["peak_bytes"],
        "static": plan_bytes["static_bytes"] / worst["static_bytes"],
    }
    mib = 2**20
    what = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    print()
    print(format_table(
        ["per rank (MiB)", "planned", "measured", "planned / measured"],
        [
            ["peak of a training step", plan_bytes["per_rank_bytes"] / mib, worst["peak_bytes"] / mib, ratios["peak"]],
            ["params + grads + AdamW states", plan_bytes["static_bytes"] / mib, worst["static_bytes"] / mib, ratios["static"]],
        ],
        title=(
            f"measured: cpu_thinker_config, {what}, FSDP2 over {RANKS} gloo ranks (EP {args.measure_ep}, fp32 shards, bf16 compute, "
            f"gradient checkpointing), {worst['tokens']} tokens/rank ({worst['visual_tokens']} visual, {worst['audio_tokens']} audio); "
            f"busiest rank {worst['rank']}, loss {worst['loss']:.3f}"
        ),
    ))
    return {"ranks": ranks, "planned": plan_bytes, "ratios": ratios}


if __name__ == "__main__":
    worker()
