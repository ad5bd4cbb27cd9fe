"""Encoder passes of the thinker: one ViT pass for images and videos together, and audio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_MODALITY_PREFIXES = ("image_", "video_")
# Keys of the thinker forward's **kwargs that belong to the ViT (output capturing flags).
_VISION_KWARGS = ("output_attentions", "output_hidden_states")


@dataclass
class VisionOutput:
    """Merged ViT outputs, in placeholder order within each modality."""

    image_embeds: Optional[torch.Tensor]  # (n_image_tokens, H) or None
    video_embeds: Optional[torch.Tensor]  # (n_video_tokens, H) or None
    deepstack: list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]  # per level: (image, video)


def _tokens_per_item(grid_thw: torch.Tensor, merge_size: int) -> int:
    return int(grid_thw.prod(-1).sum()) // merge_size**2


def encode_vision(
    thinker_model,
    pixel_values: Optional[torch.Tensor],
    image_grid_thw: Optional[torch.Tensor],
    pixel_values_videos: Optional[torch.Tensor],
    video_grid_thw: Optional[torch.Tensor],
    mm_encoder_outputs: Optional[dict],
    kwargs: dict,
) -> Optional[VisionOutput]:
    """Run the ViT once over all images and videos of the batch (HF runs it once per modality).

    Precomputed encoder outputs (`mm_encoder_outputs`) and modality-prefixed precomputed ViT
    kwargs (`image_cu_seqlens`, ...) are honoured by taking HF's per-modality path for them.
    """
    mm_encoder_outputs = dict(mm_encoder_outputs or {})
    if any(key.startswith(_MODALITY_PREFIXES) for key in kwargs):
        if pixel_values is not None:
            mm_encoder_outputs["image"] = thinker_model.get_image_features(
                pixel_values, image_grid_thw, return_dict=True, **kwargs
            )
        if pixel_values_videos is not None:
            mm_encoder_outputs["video"] = thinker_model.get_video_features(
                pixel_values_videos, video_grid_thw, return_dict=True, **kwargs
            )
        pixel_values = pixel_values_videos = None

    if pixel_values is None and pixel_values_videos is None:
        return _from_precomputed(mm_encoder_outputs)

    visual = thinker_model.visual
    named = (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw))
    parts = [(p, g) for _, p, g in named if p is not None]
    for modality, p, g in named:
        if p is not None:
            _check_grids(modality, p, g, visual.spatial_merge_size)
    pixels = torch.cat([p.type(visual.dtype) for p, _ in parts], dim=0)
    grid_thw = torch.cat([g for _, g in parts], dim=0)
    vision_kwargs = {key: value for key, value in kwargs.items() if key in _VISION_KWARGS}
    out = visual(pixels, grid_thw=grid_thw, return_dict=True, **vision_kwargs)

    n_image = _tokens_per_item(image_grid_thw, visual.spatial_merge_size) if pixel_values is not None else 0

    def split(features: torch.Tensor):
        image = features[:n_image] if pixel_values is not None else None
        video = features[n_image:] if pixel_values_videos is not None else None
        return image, video

    image_embeds, video_embeds = split(out.pooler_output)
    return VisionOutput(image_embeds, video_embeds, [split(level) for level in out.deepstack_features])


def _check_grids(modality: str, pixels: torch.Tensor, grid_thw: Optional[torch.Tensor], merge: int) -> None:
    """Grids the ViT cannot merge fail deep inside its patch reshape; say which grids are wrong instead."""
    if grid_thw is None:
        raise ValueError(f"{modality} pixels given without {modality}_grid_thw")
    bad = grid_thw[(grid_thw < 1).any(-1) | (grid_thw[:, 1:] % merge != 0).any(-1)]
    if len(bad):
        raise ValueError(
            f"{modality}_grid_thw {bad.tolist()}: every (t, h, w) must be positive with h and w divisible by the "
            f"ViT's spatial merge size {merge} (HF's processors resize to such grids)"
        )
    patches = int(grid_thw.prod(-1).sum())
    if pixels.shape[0] != patches:
        raise ValueError(f"{modality}: {pixels.shape[0]} pixel rows, but {modality}_grid_thw holds {patches} patches")


def _from_precomputed(mm_encoder_outputs: dict) -> Optional[VisionOutput]:
    image, video = mm_encoder_outputs.get("image"), mm_encoder_outputs.get("video")
    if image is None and video is None:
        return None

    def pooled(output):
        return None if output is None else torch.cat(output.pooler_output, dim=0)

    def levels(output):
        return [torch.cat(level, dim=0) for level in output.deepstack_features] if output is not None else None

    image_levels, video_levels = levels(image), levels(video)
    n_levels = len(image_levels if image_levels is not None else video_levels)
    deepstack = [
        (image_levels[i] if image_levels else None, video_levels[i] if video_levels else None) for i in range(n_levels)
    ]
    return VisionOutput(pooled(image), pooled(video), deepstack)


def encode_audio(
    thinker_model,
    input_features: Optional[torch.Tensor],
    feature_attention_mask: Optional[torch.Tensor],
    audio_feature_lengths: Optional[torch.Tensor],
    kwargs: dict,
) -> Optional[torch.Tensor]:
    """Audio tower output, (n_audio_tokens, H), clips in placeholder order.

    Two layouts: HF's padded (clips, mel, frames) + `feature_attention_mask`, and VeOmni's collated
    flat one, (frames of all clips, mel) + `audio_feature_lengths` (HF's get_audio_features cannot
    take it: it reads lengths only from the mask). Both reach the tower as (mel, frames of all clips)."""
    if input_features is None:
        return None
    if feature_attention_mask is None:
        if audio_feature_lengths is None or input_features.dim() != 2:
            raise ValueError(
                "audio: pass input_features (clips, mel, frames) with feature_attention_mask, or VeOmni's flat "
                f"(frames, mel) with audio_feature_lengths; got input_features {tuple(input_features.shape)} "
                f"and audio_feature_lengths {'None' if audio_feature_lengths is None else tuple(audio_feature_lengths.shape)}"
            )
        return thinker_model.audio_tower(
            input_features.transpose(0, 1), feature_lens=audio_feature_lengths, return_dict=True, **kwargs
        ).last_hidden_state
    return thinker_model.get_audio_features(
        input_features, feature_attention_mask, audio_feature_lengths, return_dict=True, **kwargs
    ).last_hidden_state


def encoders_must_run() -> bool:
    """Under data parallelism every rank must run every encoder every step: FSDP2 all-gathers an
    encoder's parameters in its forward and reduce-scatters its gradients in backward, so a rank
    that skips an encoder leaves the others waiting in a collective."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dummy_vision_forward(visual, sp_size: int = 1) -> torch.Tensor:
    """Smallest valid ViT input (one 2×2-patch image of zeros), in the ViT's own dtype.
    Returns a scalar that is exactly zero and carries exactly-zero gradients to every ViT parameter.
    Under SP each rank's 2×2 image is one segment of the gathered patch sequence."""
    config = visual.config
    merge = visual.spatial_merge_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    device = next(visual.parameters()).device
    pixels = torch.zeros(merge * merge, patch_dim, dtype=visual.dtype, device=device)
    grid_thw = torch.tensor([[1, merge, merge]], device=device)
    segments = {}
    if sp_size > 1:  # each rank's image is one segment of the gathered patch sequence
        from ..parallel.sequence_parallel import VISION_SEGMENTS_KWARG

        bounds = list(range(0, merge * merge * sp_size + 1, merge * merge))
        segments = {"cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device=device), "max_seqlen": merge * merge,
                    VISION_SEGMENTS_KWARG: bounds}
    out = visual(pixels, grid_thw=grid_thw, return_dict=True, **segments)
    return _zero_contribution([out.pooler_output, *out.deepstack_features])


def dummy_audio_forward(thinker_model) -> torch.Tensor:
    """Smallest valid audio input (one chunk of zero mel frames), in the audio tower's dtype; zero contribution."""
    tower = thinker_model.audio_tower
    weight = tower.conv2d1.weight
    frames = 2 * tower.n_window
    features = torch.zeros(1, tower.num_mel_bins, frames, dtype=weight.dtype, device=weight.device)
    mask = torch.ones(1, frames, dtype=torch.long, device=weight.device)
    out = thinker_model.get_audio_features(features, mask, return_dict=True).last_hidden_state
    return _zero_contribution([out])


def _zero_contribution(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(t.float().sum() for t in tensors) * 0.0
