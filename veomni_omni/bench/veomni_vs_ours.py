"""veomni: veomni_omni's thinker vs VeOmni 0.1.12's own generated qwen3_omni_moe thinker.

VeOmni's model is the class its MODELING_REGISTRY gives for
"Qwen3OmniMoeThinkerForConditionalGeneration" while veomni_omni is undone
(`veomni.models.transformers.qwen3_omni_moe.generated.patched_modeling_qwen3_omni_moe_gpu`),
with its OpSlots bound by VeOmni's own `_bind_veomni_ops` exactly as `build_foundation_model`
does, from the CPU-capable ops config (`veomni_omni.integration.settings.eager_ops_config`). It is built from the
same config and loaded with our weights (names mapped, strict load), so both compute the same
loss from the same batch; its inputs are converted to VeOmni's data contract (see
`to_veomni_inputs`). Both run with VeOmni's loss installed, as in VeOmni training.
JSON: {"ratio": veomni_omni step time / VeOmni step time, ...}. Target: ratio <= 0.95.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch

from .common import fwd_bwd_step, interleaved_times, report_side_by_side, side_by_side_workload

TARGET = 0.95
VEOMNI_ARCHITECTURE = "Qwen3OmniMoeThinkerForConditionalGeneration"

# Our thinker (transformers 5.22) nests the text model, ViT and audio tower under `model.`;
# VeOmni's (generated from transformers 5.9) has them at the thinker's top level.
_NAME_MAP = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("model.audio_tower.", "audio_tower."),
)


def to_veomni_name(name: str) -> str:
    for ours, theirs in _NAME_MAP:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def to_veomni_state_dict(state_dict: dict) -> dict:
    return {to_veomni_name(name): tensor for name, tensor in state_dict.items()}


def veomni_thinker_class():
    """The class VeOmni's own registry gives for a thinker when veomni_omni is undone."""
    import veomni_omni
    from veomni.models.loader import MODELING_REGISTRY

    with veomni_omni.unpatched():
        cls = MODELING_REGISTRY["qwen3_omni_moe"](VEOMNI_ARCHITECTURE)
    if not cls.__module__.startswith("veomni."):
        raise RuntimeError(f"VeOmni's registry gave {cls.__module__}.{cls.__name__}, not VeOmni's own model")
    return cls


def build_veomni_thinker(config, ops_config, state_dict: dict, dtype=torch.float32, device="cpu", share_from=None):
    """VeOmni's thinker with `state_dict` (ours, names mapped) loaded strictly.

    Built from config the way VeOmni's builder does (OpSlots bound first), then loaded: on
    transformers 5.22 its from-config init leaves every expert and router weight at exactly zero
    (docs/design.md §4 item 2), so it must not be relied on.
    `share_from` (our thinker): built on meta and given our parameter tensors themselves (no copy: a
    real-width model fits in memory once), and our values of the buffers outside the state dict.
    """
    from veomni.models.auto import _bind_veomni_ops

    cls = veomni_thinker_class()
    _bind_veomni_ops(sys.modules[cls.__module__], ops_config)
    config = copy.deepcopy(config)  # from-config construction writes attention/experts choices into it
    with torch.device("meta" if share_from is not None else device):
        model = cls._from_config(config, dtype=dtype, attn_implementation=ops_config.attn_implementation)
    result = model.load_state_dict(to_veomni_state_dict(state_dict), strict=True, assign=share_from is not None)
    assert not result.missing_keys and not result.unexpected_keys, result
    if share_from is not None:
        ours = {to_veomni_name(name): buffer for name, buffer in share_from.named_buffers()}
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta:
                if name not in ours or ours[name].shape != buffer.shape:
                    raise RuntimeError(f"VeOmni's buffer {name} {tuple(buffer.shape)} has no counterpart in our thinker to share")
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = ours[name]
    return model


def to_veomni_inputs(batch: dict, config) -> dict:
    """Our (HF-shaped) batch in VeOmni's data contract, which its thinker forward reads:

    - `image_mask`, `video_mask`, `audio_mask` (B, S) bool: required (it asserts and pops them; its
      data pipeline precomputes them per sample).
    - `input_features`: one flat (Σ frames, mel) tensor, clips concatenated without padding, plus
      `audio_feature_lengths` (num_clips,) — not HF's padded (clips, mel, frames) +
      `feature_attention_mask`.
    - `position_ids`: (B, 3, S) as its collator emits them (it transposes to (3, B, S)); given so
      both models skip the per-row rope-index loop a data pipeline runs ahead of time.
    - `video_second_per_grid`; a video without audio would need a zero entry in
      `audio_feature_lengths` only if positions were computed in the model (they are not here).
    """
    ids = batch["input_ids"]
    out = {
        "input_ids": ids,
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
        "image_mask": ids == config.image_token_id,
        "video_mask": ids == config.video_token_id,
        "audio_mask": ids == config.audio_token_id,
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        if key in batch:
            out[key] = batch[key]
    if "input_features" in batch:
        lengths = batch["feature_attention_mask"].sum(-1)
        clips = [features[:, :n].T for features, n in zip(batch["input_features"], lengths.tolist())]
        out["input_features"] = torch.cat(clips)
        out["audio_feature_lengths"] = lengths
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"].transpose(0, 1).contiguous()
    return out


@contextlib.contextmanager
def veomni_ops(ops_config):
    """Install VeOmni's ops config (its 3-tuple loss goes into transformers' global LOSS_MAPPING) for
    the block, then restore LOSS_MAPPING so later code in this process sees stock transformers."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    from veomni.ops import apply_ops_config

    saved = dict(LOSS_MAPPING)
    apply_ops_config(ops_config)
    try:
        yield
    finally:
        LOSS_MAPPING.clear()
        LOSS_MAPPING.update(saved)


def grad_parity(ours, theirs) -> float:
    """Largest per-tensor max|Δgrad| / max|grad| between the two models (names mapped)."""
    from veomni_omni.parity import max_relative_difference

    got = {to_veomni_name(n): p.grad for n, p in ours.named_parameters()}
    ref = {n: p.grad for n, p in theirs.named_parameters()}
    return max_relative_difference(got, ref)


def main(argv=None) -> int:
    from veomni_omni.integration.settings import eager_ops_config

    args, config, ours, batch, reps, warmup = side_by_side_workload(__doc__, "veomni", argv)
    ops_config = eager_ops_config()
    veomni_batch = to_veomni_inputs(batch, config)

    with veomni_ops(ops_config):
        theirs = build_veomni_thinker(config, ops_config, ours.state_dict()).train()
        losses = {}
        contenders = {
            "veomni_omni": fwd_bwd_step(losses, "veomni_omni", ours, batch),
            "veomni": fwd_bwd_step(losses, "veomni", theirs, veomni_batch),
        }
        times = interleaved_times(contenders, reps=reps, warmup=warmup, log=None if args.json else print, clock=args.clock)
        grad_diff = grad_parity(ours, theirs)

    experts_impl = ours.config.get_text_config()._experts_implementation
    return report_side_by_side(
        "veomni",
        args,
        times,
        losses,
        ours,
        batch,
        reps,
        TARGET,
        columns=["model class", "experts"],
        cells={
            "veomni_omni": ["transformers 5.22 + patches", experts_impl],
            "veomni": ["VeOmni 0.1.12 generated (5.9)", f"moe={ops_config.moe_implementation} (loop)"],
        },
        note=f"loss equal: {abs(losses['veomni_omni'] - losses['veomni']):.2e} apart; max rel grad diff {grad_diff:.2e}",
        extra={
            "max_rel_grad_diff": grad_diff,
            "experts_implementation": {"veomni_omni": experts_impl, "veomni": ops_config.moe_implementation},
            "veomni_class": f"{type(theirs).__module__}.{type(theirs).__name__}",
        },
    )
