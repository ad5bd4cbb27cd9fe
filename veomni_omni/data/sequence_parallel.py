"""Host-side (collator) preparation of a packed Qwen3-Omni batch for Ulysses sequence parallelism.

Everything that needs a look at the whole sequence is computed here, on the host, once per batch,
so the model's SP forward does no device-to-host sync and no extra communication:
- text (input ids, pre-shifted labels, M-RoPE positions) padded to a multiple of sp and sliced;
  the LM's varlen boundaries (`cu_seq_lens_*`) cover the packed samples plus the pad tail;
- full-length image/video/audio masks, kept whole on every rank (fill-back needs them);
- the joint image+video patch sequence padded to a multiple of sp·merge² and sliced, with the
  ViT's rotary positions and position-embedding interpolation padded and sliced to match, its
  `cu_seqlens` extended by a segment covering the pad, and `max_seqlen` computed once;
- deepstack: the order of visual rows in the sequence and the range this rank's slice holds;
- audio: only the attention windows (n_window_infer frames, whole 2·n_window-frame chunks) that hold
  this rank's audio tokens, which of their output rows fill the slice, and the audio tower's chunking
  (padded chunks, valid rows, window boundaries) so the tower needs no look at lengths either;
- positions (index tensors) wherever the model writes rows into the sequence, so it scatters with
  index ops rather than boolean masks.

Two entry points: `shard_collated_batch` finishes what VeOmni's SequenceParallelCollator started (its
trainer's path: `get_metadata_collate_func` of the patched model); `shard_for_sequence_parallel` shards
a packed batch in HF's layout on its own (tests, benchmarks, custom loops).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths,
    chunk_and_pad_features,
    get_audio_cu_seqlens,
    get_valid_indices,
)
from transformers.vision_utils import (
    get_vision_cu_seqlens,
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from ..models.audio_tower import REFERENCE_WIDTHS_KWARG, chunk_reference_widths
from .checks import IGNORE_INDEX, BadInputError, input_problems


def pack_rows(batch: dict) -> dict:
    """Pack a right-padded (B, S) batch into one row (1, L) of its samples, as a packing collator
    does: padding dropped, each sample's first label ignored, `cu_seq_lens` marking the samples.
    Requires `position_ids` (3, B, S), computed per sample."""
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(-1)
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    packed = {key: value for key, value in batch.items() if key not in ("input_ids", "labels", "attention_mask", "position_ids")}
    packed["input_ids"] = batch["input_ids"][keep].unsqueeze(0)
    packed["labels"] = labels[keep].unsqueeze(0)
    packed["position_ids"] = batch["position_ids"][:, keep].unsqueeze(1)
    packed["cu_seq_lens"] = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return packed


def check_divisible_heads(config, sp_size: int) -> None:
    """Ulysses scatters attention heads over the SP group: they must divide evenly."""
    text, vision = config.text_config, config.vision_config
    problems = []
    if text.num_attention_heads % sp_size:
        problems.append(f"text attention heads ({text.num_attention_heads})")
    kv = text.num_key_value_heads
    if (kv % sp_size) if kv >= sp_size else (sp_size % kv):
        problems.append(f"text key/value heads ({kv}; must divide or be divisible by the SP size)")
    if vision.num_heads % sp_size:
        problems.append(f"vision heads ({vision.num_heads})")
    if problems:
        raise ValueError(f"Ulysses SP size {sp_size} does not divide the {', '.join(problems)}; choose another ulysses_size.")


def shard_for_sequence_parallel(packed: dict, config, sp_size: int, sp_rank: int) -> dict:
    """This rank's model inputs for a packed (1, L) batch in HF's layout (`pack_rows`). See the module
    docstring. Raises `BadInputError` on placeholder counts that do not match the media."""
    check_divisible_heads(config, sp_size)
    problems = input_problems(packed, config, "packed")  # the SP forward cannot check counts without host syncs
    if problems:
        raise BadInputError("; ".join(problems))
    input_ids = packed["input_ids"]
    length = input_ids.shape[1]
    chunk = max(1, math.ceil(length / sp_size))  # a padding-only batch packs to nothing: one pad token per rank
    pad = chunk * sp_size - length
    begin, end = sp_rank * chunk, (sp_rank + 1) * chunk

    labels = F.pad(packed["labels"][:, 1:], (0, 1 + pad), value=IGNORE_INDEX)  # pre-shifted
    ids = F.pad(input_ids, (0, pad), value=0)
    positions = F.pad(packed["position_ids"], (0, pad), value=0)
    cu = packed["cu_seq_lens"]
    if pad:
        cu = torch.cat([cu, cu.new_tensor([length + pad])])
    cu = cu.unique_consecutive()  # drop empty samples (a padding-only row)
    shard = {
        "input_ids": ids[:, begin:end],
        "labels": labels[:, begin:end],
        "position_ids": positions[..., begin:end],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "cu_seq_lens_host": cu.tolist(),  # for attention that splits segments on the host (no device sync)
        "max_length_q": int((cu[1:] - cu[:-1]).max()),
        "max_length_k": int((cu[1:] - cu[:-1]).max()),
    }
    clips = []
    if "input_features" in packed:
        frames = packed["feature_attention_mask"].sum(-1).tolist()
        clips = [packed["input_features"][k, :, :n] for k, n in enumerate(frames)]
    shard["sp_inputs"] = _media_shard(ids, packed, clips, config, sp_size, sp_rank, length, shard)
    return shard


# Keys of VeOmni's collated batch that `shard_collated_batch` moves into `sp_inputs` (or drops: the
# attention mask is all ones and full-length under VeOmni's SP collator; the SP forward does not read it).
_COLLATED_MEDIA_KEYS = ("pixel_values_videos", "image_grid_thw", "video_grid_thw", "input_features", "audio_feature_lengths", "attention_mask")


def shard_collated_batch(batch: dict, config, sp_size: int, sp_rank: int) -> None:
    """Turn the output of VeOmni's SequenceParallelCollator, in place, into this rank's SP shard.

    VeOmni's collator has already done the text side the same way `shard_for_sequence_parallel` does:
    labels shifted, padded to a multiple of sp and sliced, position ids padded and sliced, and the
    varlen boundaries (`cu_seq_lens_*`, the pad tail one segment). By our collate infos
    (`veomni_omni.models.veomni_hooks`) it left `input_ids` (padded), the pixels and the flat audio
    features whole: the masks and the media shards need the whole sequence. Placeholder counts that
    do not match the media are not raised here, in a DataLoader: they go in `sp_inputs["problems"]`,
    which the forward raises and veomni_omni's trainer agrees on across ranks before any forward."""
    ids = batch["input_ids"]
    padded = ids.shape[1]
    if padded % sp_size:
        raise ValueError(f"input_ids of length {padded} reached the SP shard unpadded for sp {sp_size}: VeOmni's collate info "
                         "for input_ids must keep sp_pad_value 0 and sp_slice False (veomni_omni.models.veomni_hooks)")
    problems = input_problems(batch, config, "packed")
    length = padded - int(batch.get("tail_padding_length", 0))
    chunk = padded // sp_size
    begin, end = sp_rank * chunk, (sp_rank + 1) * chunk
    cu = batch["cu_seq_lens_q"]
    shard = {"cu_seq_lens_host": cu.tolist()}
    if problems:
        sp_inputs = {"sp_size": sp_size, "slice": (begin, end), "tokens": length, "problems": problems}
    else:
        clips = []
        if "input_features" in batch:
            clips = [f.transpose(0, 1) for f in batch["input_features"].split(batch["audio_feature_lengths"].tolist())]
        sp_inputs = _media_shard(ids, batch, clips, config, sp_size, sp_rank, length, shard)
    for key in _COLLATED_MEDIA_KEYS + ("pixel_values",):
        batch.pop(key, None)
    batch.update(shard)
    batch["input_ids"] = ids[:, begin:end]
    batch["sp_inputs"] = sp_inputs


def _media_shard(ids, packed, clips, config, sp_size, sp_rank, length, shard) -> dict:
    """`sp_inputs` for this rank's slice of the padded sequence `ids` (1, chunk·sp); puts the rank's
    pixel rows into `shard`. `clips`: each audio clip's (mel, frames) features, in placeholder order."""
    chunk = ids.shape[1] // sp_size
    begin, end = sp_rank * chunk, (sp_rank + 1) * chunk
    masks = {m: ids == getattr(config, f"{m}_token_id") for m in ("image", "video", "audio")}
    sp_inputs = {"sp_size": sp_size, "slice": (begin, end), "tokens": length}
    sp_inputs.update(_vision_shard(packed, config, masks, sp_size, sp_rank, begin, end, shard))
    sp_inputs.update(_audio_shard(clips, config, masks["audio"], begin, end))
    return sp_inputs


def _vision_shard(packed, config, masks, sp_size, sp_rank, begin, end, shard) -> dict:
    grids = [packed[k] for k in ("image_grid_thw", "video_grid_thw") if k in packed]
    if not grids:
        return {}
    vision = config.vision_config
    merge = vision.spatial_merge_size
    pixels = torch.cat([packed[k] for k in ("pixel_values", "pixel_values_videos") if k in packed])
    grid_thw = torch.cat(grids)
    n_patches = pixels.shape[0]
    per_rank = math.ceil(n_patches / (sp_size * merge**2)) * merge**2
    pad = per_rank * sp_size - n_patches
    rows = slice(sp_rank * per_rank, (sp_rank + 1) * per_rank)

    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    if pad:
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([n_patches + pad])])
    interp_indices, interp_weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(vision.num_position_embeddings**0.5), mode="bilinear",
        align_corners=True, spatial_merge_size=merge,
    )
    rotary_positions = get_vision_position_ids(grid_thw, merge)
    shard["pixel_values"] = F.pad(pixels, (0, 0, 0, pad))[rows]

    visual_mask = masks["image"] | masks["video"]
    is_image = masks["image"][visual_mask]
    n_image = int(is_image.sum())
    order = torch.where(is_image, is_image.cumsum(0) - 1, (~is_image).cumsum(0) - 1 + n_image)
    positions = visual_mask[0].nonzero().squeeze(-1)
    return {
        "vision_segments": cu_seqlens.tolist(),
        "vision_kwargs": {
            "grid_thw": grid_thw,
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            "interp_indices": F.pad(interp_indices, (0, 0, 0, pad))[rows],
            "interp_weights": F.pad(interp_weights, (0, 0, 0, pad))[rows],
            "position_ids": F.pad(rotary_positions, (0, 0, 0, pad))[rows],
        },
        "n_visual": int(visual_mask.sum()),
        "visual_order": order,
        "visual_fill_positions": positions[torch.argsort(order)],  # where each joint ViT row goes in the sequence
        "visual_rows": (int(visual_mask[:, :begin].sum()), int(visual_mask[:, :end].sum())),
        "visual_local_positions": positions[(positions >= begin) & (positions < end)] - begin,
    }


def _audio_shard(clips, config, audio_mask, begin, end) -> dict:
    if not clips:
        return {}
    audio = config.audio_config
    frames_per_window = audio.n_window_infer
    if frames_per_window % (2 * audio.n_window):
        raise ValueError("audio n_window_infer must be a multiple of 2·n_window for per-window encoding")
    first, last = int(audio_mask[:, :begin].sum()), int(audio_mask[:, :end].sum())  # global audio-token range
    if first == last:
        return {}

    windows, window_clip_frames, select, token_start, out_rows = [], [], [], 0, 0
    for clip in clips:
        frames = clip.shape[-1]
        for frame_start in range(0, frames, frames_per_window):
            n_frames = min(frames_per_window, frames - frame_start)
            n_tokens = int(_get_feat_extract_output_lengths(torch.tensor(n_frames), audio.n_window))
            lo, hi = max(first, token_start), min(last, token_start + n_tokens)
            if lo < hi:  # this window holds tokens of the slice: encode it here
                windows.append(clip[:, frame_start : frame_start + n_frames])
                window_clip_frames.append(frames)
                select.extend(range(out_rows + lo - token_start, out_rows + hi - token_start))
                out_rows += n_tokens
            token_start += n_tokens
    frames = torch.cat(windows, dim=-1)
    feature_lens = torch.tensor([w.shape[-1] for w in windows])
    padded_feature, chunk_lengths = chunk_and_pad_features(frames, feature_lens, audio.n_window)
    cu_seqlens = get_audio_cu_seqlens(chunk_lengths, feature_lens, frames_per_window, audio.n_window)
    positions = audio_mask[0].nonzero().squeeze(-1)
    return {
        "audio_tower_kwargs": {
            "feature_lens": feature_lens,
            "padded_feature": padded_feature,
            "chunk_lengths": chunk_lengths,
            "valid_indices": get_valid_indices(chunk_lengths, audio.n_window),
            # a window's chunks keep the conv padding of its whole clip (veomni_omni.models.audio_tower)
            REFERENCE_WIDTHS_KWARG: chunk_reference_widths(feature_lens, audio.n_window, torch.tensor(window_clip_frames)),
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        },
        "audio_rows": torch.tensor(select),
        "audio_local_positions": positions[(positions >= begin) & (positions < end)] - begin,
    }
