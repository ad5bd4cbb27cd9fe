"""Synthetic model inputs shaped as real ones (docs/design.md §7): start/end tokens around every
placeholder run, pixel rows in grid order, one audio row per clip; the benchmarks and the tests feed
them to the tiny and the real-width model alike."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from ..tiny import FIRST_SPECIAL, MEL_BINS, PATCH_DIM, TOKENS, tiny_thinker_config
from .checks import IGNORE_INDEX
from .samples import batch_rope_positions


def audio_token_count(frames: int, n_window: int = 50) -> int:
    return int(_get_feat_extract_output_lengths(torch.tensor(frames), n_window))


def _interleaved_audio_video(grid_thw, n_audio: int, second_per_grid: float, per_second: int, merge: int) -> list[int]:
    """Token order of an audio-in-video clip: video rows of each frame group at time t·spg·per_second,
    audio tokens at 0,1,2,...; ties go to video (as the HF processor does)."""
    t, h, w = grid_thw
    video_times = [ti * second_per_grid * per_second for ti in range(t) for _ in range((h // merge) * (w // merge))]
    tokens, vi, ai = [], 0, 0
    while vi < len(video_times) and ai < n_audio:
        if video_times[vi] <= ai:
            tokens.append(TOKENS["video"])
            vi += 1
        else:
            tokens.append(TOKENS["audio"])
            ai += 1
    return tokens + [TOKENS["video"]] * (len(video_times) - vi) + [TOKENS["audio"]] * (n_audio - ai)


def build_batch(
    rows: list[list[tuple]],
    config: Optional[Qwen3OmniMoeThinkerConfig] = None,
    seed: int = 0,
    with_position_ids: bool = False,
) -> dict:
    """Model inputs for `rows`, each a list of segments in sequence order:

    ("prompt", n) untrained text · ("text", n) trained text · ("image", t, h, w) ·
    ("video", t, h, w) · ("audio", frames) · ("audio_in_video", t, h, w, frames).
    Grids count ViT patches (h, w even). Rows are right-padded. `with_position_ids` adds the
    (3, B, S) M-RoPE positions, computed per batch as a data pipeline does (`samples.batch_rope_positions`).
    """
    config = config or tiny_thinker_config()
    merge = config.vision_config.spatial_merge_size
    per_second = config.position_id_per_seconds
    second_per_grid = 1.0
    gen = torch.Generator().manual_seed(seed)

    def text_ids(n):
        return torch.randint(1, FIRST_SPECIAL, (n,), generator=gen).tolist()

    seqs, label_seqs = [], []
    images, image_grids, videos, video_grids, clips = [], [], [], [], []
    for row in rows:
        ids, labels = [], []

        def add(tokens, trained=False):
            ids.extend(tokens)
            labels.extend(tokens if trained else [IGNORE_INDEX] * len(tokens))

        for kind, *spec in row:
            if kind in ("prompt", "text"):
                add(text_ids(spec[0]), trained=kind == "text")
            elif kind == "image":
                image_grids.append(spec)
                images.append(torch.randn(spec[0] * spec[1] * spec[2], PATCH_DIM, generator=gen))
                n = spec[0] * spec[1] * spec[2] // merge**2
                add([TOKENS["vision_start"]] + [TOKENS["image"]] * n + [TOKENS["vision_end"]])
            elif kind == "video":
                video_grids.append(spec)
                videos.append(torch.randn(spec[0] * spec[1] * spec[2], PATCH_DIM, generator=gen))
                n = spec[0] * spec[1] * spec[2] // merge**2
                add([TOKENS["vision_start"]] + [TOKENS["video"]] * n + [TOKENS["vision_end"]])
            elif kind == "audio":
                clips.append(torch.randn(MEL_BINS, spec[0], generator=gen))
                n = audio_token_count(spec[0], config.audio_config.n_window)
                add([TOKENS["audio_start"]] + [TOKENS["audio"]] * n + [TOKENS["audio_end"]])
            elif kind == "audio_in_video":
                grid, frames = spec[:3], spec[3]
                video_grids.append(grid)
                videos.append(torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM, generator=gen))
                clips.append(torch.randn(MEL_BINS, frames, generator=gen))
                n_audio = audio_token_count(frames, config.audio_config.n_window)
                body = _interleaved_audio_video(grid, n_audio, second_per_grid, per_second, merge)
                add([TOKENS["vision_start"], TOKENS["audio_start"]] + body + [TOKENS["audio_end"], TOKENS["vision_end"]])
            else:
                raise ValueError(f"unknown segment kind {kind!r}")
        seqs.append(ids)
        label_seqs.append(labels)

    length = max(len(s) for s in seqs)
    batch = {
        "input_ids": torch.tensor([s + [TOKENS["pad"]] * (length - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs]),
        "labels": torch.tensor([s + [IGNORE_INDEX] * (length - len(s)) for s in label_seqs]),
    }
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
        batch["video_second_per_grid"] = torch.full((len(videos),), second_per_grid)
    if clips:
        max_frames = max(c.shape[1] for c in clips)
        batch["input_features"] = torch.stack([torch.nn.functional.pad(c, (0, max_frames - c.shape[1])) for c in clips])
        batch["feature_attention_mask"] = torch.tensor(
            [[1] * c.shape[1] + [0] * (max_frames - c.shape[1]) for c in clips]
        )
    if any(kind == "audio_in_video" for row in rows for kind, *_ in row):
        batch["use_audio_in_video"] = True
    if with_position_ids:
        batch["position_ids"] = batch_rope_positions(config, batch)
    return batch


def concat_batches(batches: list[dict]) -> dict:
    """The global batch of several local (per-rank) batches: rows in order, right-padded to one
    length; pixel rows, grids and audio clips concatenated in the same order."""
    length = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    merged = {
        "input_ids": torch.cat([pad(b["input_ids"], TOKENS["pad"]) for b in batches]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        "labels": torch.cat([pad(b["labels"], IGNORE_INDEX) for b in batches]),
    }
    for key in ("talker_frames", "talker_speakers"):  # speech markers, aligned with the tokens
        if any(key in b for b in batches):
            merged[key] = torch.cat([pad(b[key] if key in b else torch.zeros_like(b["input_ids"]), 0) for b in batches])
    for key, dim in (("talker_codes", 1), ("talker_labels", 0), ("code_predictor_labels", 0)):  # in turn order
        if any(key in b for b in batches):
            merged[key] = torch.cat([b[key] for b in batches if key in b], dim=dim)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [b[key] for b in batches if key in b]
        if parts:
            merged[key] = torch.cat(parts)
    clips = [(f, m) for b in batches if "input_features" in b for f, m in zip(b["input_features"], b["feature_attention_mask"])]
    if clips:
        frames = max(f.shape[-1] for f, _ in clips)
        merged["input_features"] = torch.stack([torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f, _ in clips])
        merged["feature_attention_mask"] = torch.stack([torch.nn.functional.pad(m, (0, frames - m.shape[-1])) for _, m in clips])
    if any(b.get("use_audio_in_video") for b in batches):
        merged["use_audio_in_video"] = True
    if all("position_ids" in b for b in batches):
        merged["position_ids"] = torch.cat([pad(b["position_ids"].flatten(0, 1), 0).view(3, -1, length) for b in batches], dim=1)
    return merged
