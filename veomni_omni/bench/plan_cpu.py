"""The plan's per-rank memory against a real FSDP2 training step on 2 CPU gloo ranks.

One worker (this file) for `plan --measure-cpu` and `realwidth`, parameterised by a spec: the
thinker (`config`: "cpu", `configs.cpu_thinker_config`, ~25M parameters; "realwidth",
`configs.realwidth_thinker_config`, ~2.0B; "realwidth_2rank", the same with the vocabulary cut to
`configs.REALWIDTH_2RANK_VOCAB`, ~1.5B, what fits two fp32 ranks in 24 GiB; "realwidth_ep", that with
`configs.REALWIDTH_EP_TEXT_LAYERS` text layers, ~0.9B, what fits two FSDP-only ranks), the batch, the layout (EP size `ep`, Ulysses SP size
`sp`), mixed precision on (fp32 shards, bf16 compute, fp32 reductions) or off (fp32 throughout),
gradient checkpointing, LoRA (`lora_rank`: `plan.apply_lora`, as VeOmni's trainer wraps it) and the
optimizer ("adamw": VeOmni's fused AdamW; "sgd": stateless SGD, for a model whose AdamW states do not
fit in the machine's memory; the plan then counts no optimizer state).

The model is built on meta and sharded by VeOmni's `build_parallelize_model` over 2 gloo ranks. Each
rank trains a warm-up step, then a measured step (`measure_memory`), then `timed_steps` steps timed
without the profiler (forward + backward + optimizer step).

Batches: "row" (`plan --measure-cpu`): one padded row per rank with text, an image and an audio clip.
"realwidth_packs": the real-width sample mix (`configs.REALWIDTH_SAMPLES`), rank r packing
`REALWIDTH_DP_PACKS[r]` into one sequence (seed r); under SP the whole global batch packed into one
sequence, each rank holding its slice (`shard_for_sequence_parallel`), as the real-width parity test.

Memory is read from the CPU allocator through the profiler (`profile_memory`: every allocation and
free, FSDP2's storage resizes included), from before the model is built: `peak` is the largest
total allocated during the measured step; `static` the bytes of the local parameter shards, their
gradients and the optimizer states at the end of it. The prediction is `plan.plan` for the same model,
tokens, modality shares, dtypes and layout, with no CUDA overhead and the full-logits loss of the CPU path.

argv (as a worker): out.json spec.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

RANKS = 2
# One row per rank: prompt, an image (16×16 patches → 64 tokens), text, an audio clip, text.
ROW = [("prompt", 16), ("image", 1, 16, 16), ("text", 160), ("audio", 800), ("text", 96)]
# Speech output (`plan --train talker --measure-cpu`): each rank packs two chats, a user turn with an image
# and an audio clip, answered by a spoken turn of this many codec frames (16 s at 12.5 frames a second).
SPEECH_FRAMES = 200
SPEECH_MODES = ("talker", "joint")  # `plan --train` values that train speech output


def thinker_config(name: str):
    from veomni_omni.bench.configs import (
        REALWIDTH_2RANK_VOCAB, REALWIDTH_EP_TEXT_LAYERS, cpu_omni_config, cpu_thinker_config, realwidth_thinker_config,
    )

    configs = {
        "cpu": cpu_thinker_config,
        "cpu_omni": cpu_omni_config,
        "realwidth": realwidth_thinker_config,
        "realwidth_2rank": lambda: realwidth_thinker_config(vocab_size=REALWIDTH_2RANK_VOCAB),
        "realwidth_ep": lambda: realwidth_thinker_config(vocab_size=REALWIDTH_2RANK_VOCAB, text_layers=REALWIDTH_EP_TEXT_LAYERS),
    }
    if name not in configs:
        raise ValueError(f"unknown thinker config {name!r}; one of {sorted(configs)}")
    return configs[name]()


def measure_spec(config="cpu", batch="row", ep=1, sp=1, mixed_precision=True, grad_ckpt=True, optimizer="adamw",
                 lora_rank=0, lora_targets=(), measure_memory=True, timed_steps=0, train="thinker",
                 speech_frames=SPEECH_FRAMES) -> dict:
    """The worker's spec (defaults: `plan --measure-cpu`'s run). `train` "talker": the whole model of
    `config` (an omni config) with the thinker and code2wav frozen, on the "speech" batch (spoken turns
    of `speech_frames` frames); "joint": the same with the thinker training too."""
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"optimizer {optimizer!r}: adamw or sgd")
    if RANKS % ep or RANKS % sp:
        raise ValueError(f"ep ({ep}) and sp ({sp}) must divide the {RANKS} ranks")
    if train not in ("thinker", *SPEECH_MODES):
        raise ValueError(f"train {train!r}: thinker, talker or joint")
    return dict(config=config, batch=batch, ep=ep, sp=sp, mixed_precision=mixed_precision, grad_ckpt=grad_ckpt,
                optimizer=optimizer, lora_rank=lora_rank, lora_targets=list(lora_targets),
                measure_memory=measure_memory, timed_steps=timed_steps, train=train, speech_frames=speech_frames)


def speech_batch(config, rank: int, frames: int = SPEECH_FRAMES) -> dict:
    """Rank `rank`'s packed row of two spoken chats (`frames` frames each), encoded by the tiny
    processor as training data is (`encode_sample`)."""
    import numpy as np
    import torch

    from veomni_omni.data.processor import build_tiny_processor
    from veomni_omni.data.samples import encode_sample
    from veomni_omni.data.sequence_parallel import pack_rows
    from veomni_omni.data.shaped_batches import concat_batches
    from veomni_omni.tiny import TINY_CODEBOOK

    processor = build_tiny_processor()
    rng = np.random.default_rng(rank)
    groups = config.talker_config.num_code_groups
    rows = []
    for speaker in ("chelsie", "ethan"):
        chat = [
            {"role": "user", "content": [
                {"type": "image", "image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)},
                {"type": "audio", "audio": (0.3 * rng.standard_normal(32000)).astype(np.float32)},
                {"type": "text", "text": "what do you see and hear? " * 8},
            ]},
            {"role": "assistant", "content": "a red circle and a low tone " * 4,
             "speech": {"codes": rng.integers(0, TINY_CODEBOOK, (groups, frames)), "speaker": speaker}},
        ]
        encoded = encode_sample({"messages": chat}, processor, config)
        rows.append({k: (v[:, None] if k == "position_ids" else v[None] if v.ndim == 1 and k in ("input_ids", "attention_mask", "labels", "talker_frames", "talker_speakers") else v)
                     for k, v in encoded.items() if torch.is_tensor(v)})
    return pack_rows(concat_batches(rows))


def speech_shape(batch: dict, config) -> dict:
    """The spoken turns of a packed speech batch as `plan` counts them: turns, frames per turn and the
    thinker tokens each turn's talker reads (from its sample's start to the answer's <|im_end|>)."""
    ids, bounds = batch["input_ids"][0], batch["cu_seq_lens_q"].tolist()
    openings = batch["talker_frames"][0].nonzero().flatten().tolist()
    contexts = []
    for opening in openings:
        start = max(b for b in bounds if b <= opening)
        end = opening + int((ids[opening:] == config.im_end_token_id).nonzero()[0])
        contexts.append(end - start)
    return {"spoken_turns": len(openings), "talker_context": sum(contexts) / len(openings),
            "speech_frames": int(batch["talker_frames"].sum()) / len(openings)}


def rank_batch(spec: dict, config, dp_rank: int, sp_rank: int) -> dict:
    from veomni_omni.data.shaped_batches import build_batch

    from veomni_omni.bench.configs import rank_share, realwidth_dp_batches

    if spec["batch"] == "speech":
        return speech_batch(config, dp_rank, spec["speech_frames"])
    if spec["batch"] == "row":  # one row per data-parallel rank, or both packed into one SP sequence
        batches = [build_batch([ROW], config, seed=seed, with_position_ids=True) for seed in range(RANKS)]
        if spec["sp"] == 1:
            return batches[dp_rank]  # padded, unpacked (as `plan --measure-cpu` has always measured it)
    elif spec["batch"] == "realwidth_packs":
        batches = realwidth_dp_batches(config)
    else:
        raise ValueError(f"unknown batch {spec['batch']!r}")
    return rank_share(batches, config, spec["sp"], dp_rank, sp_rank)


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


def _release_freed_memory() -> None:
    """Hand back to the OS the heap pages glibc keeps after frees (resident memory only; what the
    profiler counts as allocated is unchanged): building a real-width rank frees ~3 GB it would
    otherwise keep, and two such ranks need it to fit."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker() -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
    from veomni.arguments.arguments_types import MixedPrecisionConfig
    from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state
    from veomni.distributed.torch_parallelize import build_parallelize_model
    from veomni.optim import build_optimizer

    from veomni_omni.bench.plan import apply_lora, build_meta_omni, build_meta_thinker, lora_config
    from veomni_omni.integration.speech_training import SpeechTraining
    from veomni_omni.tiny import TOKENS

    out_file, spec = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    init_parallel_state(
        dp_size=world // spec["sp"], ulysses_size=spec["sp"], dp_mode="fsdp2", device_type="cpu",
        extra_parallel_sizes=(spec["ep"],), extra_parallel_names=("ep",),
    )
    state = get_parallel_state()
    torch.manual_seed(0)
    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if spec["measure_memory"] else contextlib.nullcontext()
    with profiler as prof:
        if spec["train"] in SPEECH_MODES:  # as VeOmni's trainer trains speech output (integration/speech_training.py)
            model = build_meta_omni(thinker_config(spec["config"]))
            joint = spec["train"] == "joint"
            model.thinker.requires_grad_(joint)
            model.code2wav.requires_grad_(False)
            model.speech_training = SpeechTraining(train_thinker=joint)
        else:
            model = build_meta_thinker(thinker_config(spec["config"]))
        if spec["lora_rank"]:
            model = apply_lora(model, lora_config(spec["lora_rank"], spec["lora_targets"]))
        model = build_parallelize_model(
            model, init_device="meta", weights_path=None, enable_gradient_checkpointing=spec["grad_ckpt"],
            mixed_precision=MixedPrecisionConfig(enable=spec["mixed_precision"]), enable_reshard_after_forward=True,
            is_peft_model=bool(spec["lora_rank"]),
        )
        for module in model.modules():  # kaiming A, zero B, as VeOmni's loader initialises a fresh adapter
            if hasattr(module, "reset_lora_parameters"):
                module.reset_lora_parameters()
        if spec["optimizer"] == "adamw":
            optimizer = build_optimizer(model, lr=1e-4, fused=True)
        else:  # stateless; per-tensor loop: EP's expert DTensors live on another mesh than the rest
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, foreach=False)
        batch = rank_batch(spec, model.config, state.dp_rank, state.sp_rank)
        _release_freed_memory()

        def optimizer_states():
            """Tensors of the optimizer state (under EP VeOmni builds one AdamW for the experts, one for the rest)."""
            optimizers = getattr(optimizer, "optimizers_dict", {"all": optimizer}).values()
            return [t for opt in optimizers for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]

        def live_bytes() -> int:
            """Bytes held between steps: parameter shards, gradients, optimizer states, buffers, the batch."""
            params = list(model.parameters())
            held = [*params, *(p.grad for p in params if p.grad is not None), *optimizer_states(), *model.buffers()]
            return _storage_bytes(held + [t for t in batch.values() if torch.is_tensor(t)])

        def step() -> tuple[float, int]:
            loss = model(**batch, use_cache=False).loss
            if isinstance(loss, dict):  # speech output: the named losses (talker, code predictor)
                loss = sum(loss.values())
            loss.backward()
            optimizer.step()
            params = list(model.parameters())
            static = _storage_bytes(params) + _storage_bytes(p.grad for p in params if p.grad is not None)
            static += _storage_bytes(optimizer_states())
            optimizer.zero_grad()  # as VeOmni's trainer: gradients freed (set to None)
            return loss.item(), static

        loss, static = step()
        _release_freed_memory()
        held = live_bytes()
        if spec["measure_memory"]:
            with record_function("measured_step"):
                loss, static = step()
    step_seconds = []
    for _ in range(spec["timed_steps"]):
        dist.barrier()
        start = time.perf_counter()
        loss, static = step()
        step_seconds.append(time.perf_counter() - start)
        _release_freed_memory()
    ids = batch["input_ids"]
    result = {
        "rank": rank, "loss": loss, "static_bytes": static, "step_seconds": step_seconds,
        "tokens": ids.numel(),
        "visual_tokens": int(((ids == TOKENS["image"]) | (ids == TOKENS["video"])).sum()),
        "audio_tokens": int((ids == TOKENS["audio"]).sum()),
        "local_experts": getattr(model.config, "thinker_config", model.config).text_config.num_experts // spec["ep"],
    }
    if spec["train"] in SPEECH_MODES:
        result.update(speech_shape(batch, model.config))
    if spec["measure_memory"]:
        peak, before, peak_ops = _peak_in(prof, "measured_step")
        # The profiler's running total also counts what other threads (gloo's) free: only its rise
        # within the step is used, on top of the bytes counted tensor by tensor before it.
        result.update(peak_bytes=held + peak - before, held_before_step_bytes=held, profiler_total_before_step_bytes=before, peak_ops=peak_ops)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        Path(out_file).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def run_worker(spec: dict, timeout_s: float = 1800) -> list[dict]:
    """Every rank's result of one 2-rank run of `spec`."""
    from veomni_omni.launch import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out, spec_file = Path(tmp) / "measured.json", Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        run_ranks(__file__, RANKS, [str(out), str(spec_file)], timeout_s=timeout_s)
        return json.loads(out.read_text())


def plan_args(spec: dict, tokens: int, visual_tokens: int, audio_tokens: int, speech: dict | None = None) -> argparse.Namespace:
    """`plan`'s arguments for a spec's run: its layout and dtypes, `tokens` per rank of which
    `visual_tokens` and `audio_tokens` are placeholders, no CUDA overhead, full logits; `speech`: the
    spoken turns (`speech_shape`) of a talker run."""
    from .plan import build_parser

    compute = "bf16" if spec["mixed_precision"] else "fp32"
    return argparse.Namespace(**{
        **vars(build_parser().parse_args([])),
        "gpus": RANKS, "ep": spec["ep"], "sp": spec["sp"], "seq_len": tokens * spec["sp"], "micro_batch": 1,
        "visual_frac": visual_tokens / tokens, "audio_frac": audio_tokens / tokens,
        "grad_ckpt": spec["grad_ckpt"], "ce": "full", "overhead_gib": 0.0,
        "param_dtype": "fp32", "grad_dtype": "fp32", "master_dtype": "none",
        "optim_dtype": "fp32" if spec["optimizer"] == "adamw" else "none",
        "compute_dtype": compute, "reduce_dtype": "fp32",
        "lora_rank": spec["lora_rank"], "lora_targets": tuple(spec["lora_targets"]),
        "train": spec["train"], **(speech or {}),
    })


def predicted(spec: dict, measured: dict) -> dict:
    """`plan.plan` for the measured model, batch and layout."""
    from .plan import GIB, build_planned_model, plan

    speech = {k: measured[k] for k in ("spoken_turns", "talker_context", "speech_frames")} if spec["train"] in SPEECH_MODES else None
    layout = plan_args(spec, measured["tokens"], measured["visual_tokens"], measured["audio_tokens"], speech)
    result = plan(layout, build_planned_model(layout, thinker_config(spec["config"])))
    return {
        "per_rank_bytes": result["per_rank_gib"] * GIB,
        "static_bytes": result["static_gib"] * GIB,
        "peak_phase": result["peak_phase"],
        "phases_gib": result["phases_gib"],
        "breakdown_gib": result["breakdown_gib"],
    }


def describe(spec: dict) -> str:
    what = f"LoRA rank {spec['lora_rank']}" if spec["lora_rank"] else "full fine-tuning"
    if spec["train"] in SPEECH_MODES:
        what = "talker training (thinker frozen)" if spec["train"] == "talker" else "talker and thinker training (joint)"
    dtypes = "fp32 shards, bf16 compute, fp32 reductions" if spec["mixed_precision"] else "fp32 throughout"
    ckpt = "gradient checkpointing" if spec["grad_ckpt"] else "no gradient checkpointing"
    optim = "VeOmni's fused AdamW" if spec["optimizer"] == "adamw" else "stateless SGD"
    return f"{spec['config']} thinker, {what}, FSDP2 over {RANKS} gloo ranks (EP {spec['ep']}, SP {spec['sp']}, {dtypes}, {ckpt}, {optim})"


def with_sp_encoder_shares(spec: dict, rows: list[dict]) -> list[dict]:
    """Rank-ordered token counts as the plan models them: under Ulysses SP the encoders split each
    modality's work evenly over the SP group (ViT pad-and-slice, audio windows per rank), whichever
    placeholders a rank's slice of the text holds, so each rank counts its group's visual and audio
    tokens / sp."""
    sp = spec["sp"]
    shared = []
    for index, row in enumerate(rows):
        group = rows[index - index % sp : index - index % sp + sp]
        shared.append({**row, **{k: sum(r[k] for r in group) / sp for k in ("visual_tokens", "audio_tokens")}})
    return shared


def compare(spec: dict, ranks: list[dict]) -> dict:
    """The plan against the busiest rank of a measured run; prints the table."""
    from .common import format_table

    worst = max(with_sp_encoder_shares(spec, ranks), key=lambda r: r["peak_bytes"])
    plan_bytes = predicted(spec, worst)
    ratios = {
        "peak": plan_bytes["per_rank_bytes"] / worst["peak_bytes"],
        "static": plan_bytes["static_bytes"] / worst["static_bytes"],
    }
    mib = 2**20
    print(format_table(
        ["per rank (MiB)", "planned", "measured", "planned / measured"],
        [
            ["peak of a training step", plan_bytes["per_rank_bytes"] / mib, worst["peak_bytes"] / mib, ratios["peak"]],
            ["params + grads + optimizer states", plan_bytes["static_bytes"] / mib, worst["static_bytes"] / mib, ratios["static"]],
        ],
        title=(
            f"measured: {describe(spec)}, {worst['tokens']} tokens/rank ({worst['visual_tokens']} visual, "
            f"{worst['audio_tokens']} audio); busiest rank {worst['rank']}, loss {worst['loss']:.3f}, peak in {worst['peak_ops'] or '-'}"
        ),
    ))
    return {"spec": spec, "ranks": ranks, "planned": plan_bytes, "ratios": ratios}


def measure_cpu(args) -> dict:
    """`plan --measure-cpu`: the reduced thinker, mixed precision, gradient checkpointing, AdamW."""
    if args.train in SPEECH_MODES:
        spec = measure_spec(config="cpu_omni", batch="speech", ep=args.measure_ep, train=args.train)
    else:
        spec = measure_spec(ep=args.measure_ep, lora_rank=args.lora_rank, lora_targets=args.lora_targets)
    print()
    return compare(spec, run_worker(spec, timeout_s=600))


if __name__ == "__main__":
    worker()
