"""Helpers for the tests only (production code never imports this package): one forward+backward with its
gradients, whole parameters and gradients gathered from a parallelised model, VeOmni's packed micro
batches taken back apart into HF-layout samples, a model saved as a one-file checkpoint, and a tiny
top-level model saved as a release."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Qwen3OmniMoeThinkerConfig

from ..data.shaped_batches import audio_token_count


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Optional[torch.Tensor]]]:
    """One forward+backward; returns the detached loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def iter_full_tensors(model: torch.nn.Module, grads: bool = False, owner: int = 0):
    """(name, whole tensor on rank `owner`, None elsewhere) for every parameter (or, with `grads`,
    every gradient) of a parallelised model, one at a time: FSDP shards and EP slices put together by
    the checkpoint code's `gather_to`. Collective: every rank iterates it to the end; a gradient
    missing on some ranks only is an error."""
    from dataclasses import replace

    from ..checkpoint.sharding import distinct_boxes, gather_to, sharded_params

    params = sharded_params(model)
    if grads:
        params = {name: replace(p, param=p.param.grad) for name, p in params.items() if p.param.grad is not None}
    boxes = distinct_boxes(params)
    mine = torch.distributed.get_rank() == owner
    for name, p in params.items():
        full = gather_to(p, boxes[name], {owner})
        yield name, full if mine else None


def gather_full_tensors(model: torch.nn.Module, grads: bool = False, owner: int = 0) -> Optional[dict]:
    """`iter_full_tensors` as one dict on rank `owner` (None elsewhere)."""
    full = dict(iter_full_tensors(model, grads, owner))
    return full if torch.distributed.get_rank() == owner else None


def _take(items: list, counts: list[int], wanted: int, what: str) -> list:
    """Pop items from the front of `items` (with their token `counts`) until `wanted` tokens are covered."""
    taken, covered = [], 0
    while covered < wanted:
        if not items:
            raise ValueError(f"{what}: {wanted} placeholder tokens but the micro batch has no more inputs for them")
        taken.append(items.pop(0))
        covered += counts.pop(0)
    if covered != wanted:
        raise ValueError(f"{what}: {wanted} placeholder tokens do not match whole inputs ({covered})")
    return taken


def unpack_veomni_micro_batch(micro_batch: dict, config: Qwen3OmniMoeThinkerConfig) -> list[dict]:
    """The samples of one VeOmni micro batch (MainCollator's packed row: `input_ids` (1, S),
    `position_ids` (1, 3, S), flat audio `input_features` (frames, mel) + `audio_feature_lengths`)
    back in HF's layout, one batch per sample as `build_batch` makes them: a row each, audio
    (clips, mel, frames) + `feature_attention_mask`, positions (3, 1, S). Samples are split where
    VeOmni's packing put them (`cu_seq_lens_q`); images, videos and clips go to the sample whose
    placeholder tokens they fill, in order."""
    merge = config.vision_config.spatial_merge_size
    bounds = micro_batch["cu_seq_lens_q"].tolist()
    media = {}
    for kind, values, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        if grids in micro_batch:
            rows = micro_batch[grids].prod(-1).tolist()
            media[kind] = (list(zip(micro_batch[values].split(rows), micro_batch[grids])), [n // merge**2 for n in rows])
    if "audio_feature_lengths" in micro_batch:
        lengths = micro_batch["audio_feature_lengths"].tolist()
        clips = list(micro_batch["input_features"].split(lengths))
        media["audio"] = (clips, [audio_token_count(n, config.audio_config.n_window) for n in lengths])
    token_ids = {"image": config.image_token_id, "video": config.video_token_id, "audio": config.audio_token_id}
    samples = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids = micro_batch["input_ids"][:, start:end]
        sample = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": micro_batch["labels"][:, start:end],
            "position_ids": micro_batch["position_ids"][:, :, start:end].transpose(0, 1),
        }
        for kind, token in token_ids.items():
            wanted = int((ids == token).sum())
            if not wanted:
                continue
            items, counts = media.get(kind, ([], []))
            taken = _take(items, counts, wanted, f"{kind} of the sample at [{start}, {end})")
            if kind == "audio":
                frames = max(c.shape[0] for c in taken)
                sample["input_features"] = torch.stack([torch.nn.functional.pad(c.T, (0, frames - c.shape[0])) for c in taken])
                sample["feature_attention_mask"] = torch.stack([(torch.arange(frames) < c.shape[0]).long() for c in taken])
            else:
                prefix = "pixel_values" if kind == "image" else "pixel_values_videos"
                sample[prefix] = torch.cat([rows for rows, _ in taken])
                sample[f"{kind}_grid_thw"] = torch.stack([grid for _, grid in taken])
        samples.append(sample)
    left = {kind: len(items) for kind, (items, _) in media.items() if items}
    if left:
        raise ValueError(f"micro batch inputs without placeholder tokens: {left}")
    return samples


def save_checkpoint(model: torch.nn.Module, path) -> None:
    """`model` as a one-file checkpoint in `path`: its config and its weights (model.safetensors)."""
    from pathlib import Path

    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, Path(path) / "model.safetensors")


def save_tiny_release(path, config=None, seed: int = 0):
    """A seeded tiny top-level Qwen3-Omni-MoE (thinker, talker, code2wav; `tiny_omni_config()` unless
    `config`) saved by plain transformers in the released layout, with the tiny processor; returns the model.
    Built with the patch set's initialisation: HF 5.22 leaves the talker's experts as torch.empty, whatever
    memory held (NaN after some earlier tests in the same process)."""
    import veomni_omni
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from ..data.processor import build_tiny_processor
    from ..tiny import tiny_omni_config

    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config or tiny_omni_config())
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("the tiny model was built with non-finite parameters: is the patch set applied?")
    with veomni_omni.unpatched():
        model.save_pretrained(path)
    build_tiny_processor(path)
    return model
