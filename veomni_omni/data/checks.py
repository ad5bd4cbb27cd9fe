"""Host-side input checks, run on a micro batch before the model sees it.

A bad sample must stop training with a clear error, and under data parallelism it must stop every
rank at the same point: a rank that raises while the others go on into the model's FSDP collectives
leaves them waiting until the process group times out. So the checks here use only host-side
metadata (token ids, grids, audio frame counts), and `check_micro_batch` agrees on the result across
the process group before any rank enters the model.

What is checked, per sample:
- placeholder tokens against what the encoders will produce, for image, video and audio alike
  (HF checks image and video only, inside the forward, on one rank): t·h·w / merge² per image or
  video grid, the audio tower's output length for each clip's valid mel frames;
- image/video grids divisible by the ViT's spatial merge size, and pixel rows matching the grids
  (otherwise the ViT fails deep inside a reshape).

A rank with no sample in a step still runs it, on `padding_batch` (see README "Bad input").
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

IGNORE_INDEX = -100


class BadInputError(ValueError):
    """Input the model cannot encode correctly; raised with the same message on every rank."""


def thinker_config_of(config):
    """The thinker's config, from a top-level Qwen3-Omni config or a thinker config."""
    return getattr(config, "thinker_config", config)


def input_problems(inputs: dict, config, name: Any = "batch") -> list[str]:
    """What is wrong with one sample's model inputs (`input_ids` of any shape; its grids, pixel rows
    and audio clips), each problem as one line starting with `name`. A whole collated batch can be
    checked this way too: its counts are then totals over the batch."""
    config = thinker_config_of(config)
    ids = inputs["input_ids"]
    merge = config.vision_config.spatial_merge_size
    problems = []

    def count_mismatch(modality, expected, source):
        found = int((ids == getattr(config, f"{modality}_token_id")).sum())
        if found != expected:
            problems.append(
                f"sample {name}: {modality}: {found} placeholder tokens in input_ids, "
                f"{expected} encoder outputs expected from {source}"
            )

    for modality, pixels_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grids = inputs.get(f"{modality}_grid_thw")
        if grids is None:
            count_mismatch(modality, 0, f"no {modality}_grid_thw")
            continue
        grids = grids.view(-1, 3)
        odd = [g for g in grids.tolist() if g[1] % merge or g[2] % merge or min(g) < 1]
        if odd:  # the token count is not even defined: report the grids alone
            problems.append(
                f"sample {name}: {modality}: grid(s) (t, h, w) {odd} not positive or h, w not divisible "
                f"by the spatial merge size {merge}"
            )
            continue
        patches = int(grids.prod(-1).sum())
        pixels = inputs.get(pixels_key)
        if pixels is not None and pixels.shape[0] != patches:
            problems.append(f"sample {name}: {modality}: {pixels.shape[0]} rows in {pixels_key}, {patches} patches in the grids")
        count_mismatch(modality, patches // merge**2, f"{modality}_grid_thw {grids.tolist()}")

    mask, lengths = inputs.get("feature_attention_mask"), inputs.get("audio_feature_lengths")
    if mask is not None:  # HF's layout: (clips, mel, frames) + mask
        frames, source = mask.view(-1, mask.shape[-1]).sum(-1), "feature_attention_mask"
    elif lengths is not None:  # VeOmni's flat layout: (frames of all clips, mel) + lengths
        frames, source = lengths.view(-1), "audio_feature_lengths"
        features = inputs.get("input_features")
        if features is not None and features.shape[0] != int(frames.sum()):
            problems.append(f"sample {name}: audio: {features.shape[0]} rows in input_features, {int(frames.sum())} frames in audio_feature_lengths")
    else:
        count_mismatch("audio", 0, "no feature_attention_mask or audio_feature_lengths")
        return problems
    tokens = _get_feat_extract_output_lengths(frames, config.audio_config.n_window)
    count_mismatch("audio", int(tokens.sum()), f"{source} (mel frames per clip {frames.tolist()})")
    return problems


def micro_batch_problems(samples: Sequence[dict], config, sample_ids: Optional[Sequence[Any]] = None) -> list[str]:
    """`input_problems` of every sample of a micro batch, named by `sample_ids` (default: position)."""
    ids = list(sample_ids) if sample_ids is not None else list(range(len(samples)))
    return [line for sample, sample_id in zip(samples, ids) for line in input_problems(sample, config, sample_id)]


def raise_on_problems(problems: Sequence[str], group=None) -> None:
    """Raise `BadInputError` on every rank of `group` (default: the world, when initialised) as soon
    as any rank has a problem, listing every rank's problems; one small all-reduce when none has.
    Single process: raise on local problems."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if problems:
            raise BadInputError(_message({line: [0] for line in problems}))
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    flag = torch.tensor([len(problems)], device=device)
    dist.all_reduce(flag, group=group)
    if int(flag) == 0:
        return
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(problems), group=group)
    by_problem: dict[str, list[int]] = {}
    for rank, lines in enumerate(gathered):
        for line in lines:
            by_problem.setdefault(line, []).append(rank)  # SP ranks share samples: one line, all their ranks
    raise BadInputError(_message(by_problem))


def _message(by_problem: dict[str, list[int]]) -> str:
    lines = [f"  {line} (rank {', '.join(map(str, ranks))})" for line, ranks in by_problem.items()]
    return "bad input in this step's micro batches; every rank stops here:\n" + "\n".join(lines)


def check_micro_batch(samples: Sequence[dict], config, sample_ids: Optional[Sequence[Any]] = None, group=None) -> None:
    """Check this rank's micro batch (its encoded samples) and agree across `group`: raises the same
    `BadInputError` on every rank when any rank's batch is bad. Call it on every rank, every micro
    batch, before the forward."""
    raise_on_problems(micro_batch_problems(samples, config, sample_ids), group)


def padding_batch(config) -> dict:
    """Model inputs for a rank that has no sample this step: one padding token, attention mask 0,
    no label. The patched thinker runs the encoders on dummies (FSDP collectives stay in step) and
    returns loss 0 and aux loss 0, so the rank contributes exactly zero loss and gradient. Under SP,
    pass it through `pack_rows` and `shard_for_sequence_parallel` like any batch."""
    pad = thinker_config_of(config).text_config.pad_token_id
    return {
        "input_ids": torch.full((1, 1), pad or 0, dtype=torch.long),  # never attended nor trained on
        "attention_mask": torch.zeros(1, 1, dtype=torch.long),
        "labels": torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        "position_ids": torch.zeros(3, 1, 1, dtype=torch.long),
    }
