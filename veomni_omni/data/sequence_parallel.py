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

The media side is a `SequenceParallelShard`, passed to the model as `sp_inputs`. Two entry points
build it: `shard_collated_batch` finishes what VeOmni's SequenceParallelCollator started (its trainer's
path: `get_metadata_collate_func` of the patched model); `shard_for_sequence_parallel` shards a packed
batch in HF's layout on its own (tests, benchmarks, custom loops).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

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


class _TensorFields:
    """`.to()` and `pin_memory()` for a frozen dataclass: every tensor field, and the tensor fields of
    nested ones, moved; host fields (ints, lists) shared."""

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        def moved(value):
            if isinstance(value, torch.Tensor):
                return fn(value)
            return value._map_tensors(fn) if isinstance(value, _TensorFields) else value

        return dataclasses.replace(self, **{f.name: moved(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device, non_blocking: bool = False):
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """Called by a DataLoader with pin_memory=True (VeOmni's default), as it pins a dict's tensors."""
        return self._map_tensors(torch.Tensor.pin_memory)


@dataclass(frozen=True, eq=False)  # eq over tensor fields would be ambiguous
class VisionShard(_TensorFields):
    """This rank's part of the joint image+video patch sequence (its pixel rows are the batch's
    `pixel_values`), padded to a multiple of sp·merge², and where the ViT outputs go."""

    grid_thw: torch.Tensor  # (images + videos, 3): every grid, whole
    cu_seqlens: torch.Tensor  # boundaries of images/frames in the gathered (padded) patch sequence; the pad is one segment
    segments: list[int]  # the same boundaries on the host, for attention that splits segments there
    max_seqlen: int  # longest segment of `cu_seqlens`
    interp_indices: torch.Tensor  # position-embedding interpolation of this rank's patch rows
    interp_weights: torch.Tensor
    rotary_position_ids: torch.Tensor  # the ViT's rotary positions of this rank's patch rows
    order: torch.Tensor  # (visual tokens,): each visual token's row in the joint ViT output (images first)
    fill_positions: torch.Tensor  # (visual tokens,): where each joint ViT output row goes in the whole sequence
    rows: tuple[int, int]  # the range of visual tokens (in sequence order) this rank's slice holds: its deepstack rows
    local_positions: torch.Tensor  # positions of the visual tokens within this rank's slice

    def encoder_kwargs(self) -> dict:
        """Keyword arguments of the ViT's forward (HF's precomputed-positions interface)."""
        return {"grid_thw": self.grid_thw, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen,
                "interp_indices": self.interp_indices, "interp_weights": self.interp_weights,
                "position_ids": self.rotary_position_ids}


@dataclass(frozen=True, eq=False)  # eq over tensor fields would be ambiguous
class AudioShard(_TensorFields):
    """The audio attention windows (n_window_infer frames) that hold this rank's audio tokens, chunked
    for the audio tower, and which of the tower's output rows fill the slice where."""

    feature_lens: torch.Tensor  # (windows,): mel frames of each window
    padded_feature: torch.Tensor  # (chunks, mel, 2·n_window): the windows cut into padded chunks
    chunk_lengths: torch.Tensor  # (chunks,): valid frames of each chunk
    valid_indices: torch.Tensor  # the conv output rows of the chunks that are not padding
    reference_widths: torch.Tensor  # (chunks,): the width HF pads each chunk to in its whole clip (models.audio_tower)
    cu_seqlens: torch.Tensor  # the tower's attention windows
    max_seqlen: int  # longest window of `cu_seqlens`
    rows: torch.Tensor  # the tower's output rows that are this slice's audio tokens, in order
    local_positions: torch.Tensor  # positions of the audio tokens within this rank's slice

    def tower_kwargs(self) -> dict:
        """Keyword arguments of the (patched) audio tower's forward, with `input_features=None`."""
        return {"feature_lens": self.feature_lens, "padded_feature": self.padded_feature,
                "chunk_lengths": self.chunk_lengths, "valid_indices": self.valid_indices,
                REFERENCE_WIDTHS_KWARG: self.reference_widths, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen}


@dataclass(frozen=True, eq=False)  # eq over tensor fields would be ambiguous
class SequenceParallelShard(_TensorFields):
    """What one rank's SP forward needs beyond its text slice (`sp_inputs` of the thinker's forward).
    Built by `_build_shard` only, for both producers. VeOmni's trainer moves a batch's tensors and dicts
    to the device, not this: the SP forward moves it (`.to`)."""

    sp_size: int
    token_range: tuple[int, int]  # [begin, end) of this rank's slice in the sequence padded to a multiple of sp_size
    sequence_length: int  # tokens of the packed sequence before that padding (0: a padding-only batch)
    problems: list[str] = dataclasses.field(default_factory=list)  # bad placeholder counts the collator found; no media then
    vision: Optional[VisionShard] = None  # None: the batch has no image or video
    audio: Optional[AudioShard] = None  # None: this rank's slice holds no audio token

    def __post_init__(self):
        begin, end = self.token_range
        if self.sp_size < 1 or not 0 <= begin <= end or not 0 <= self.sequence_length <= (end - begin) * self.sp_size:
            raise ValueError(f"SP shard of slice {self.token_range} for sp {self.sp_size} and {self.sequence_length} tokens is inconsistent")
        if self.problems and (self.vision is not None or self.audio is not None):
            raise ValueError("an SP shard with input problems carries no media (the forward raises them)")


def pack_rows(batch: dict) -> dict:
    """Pack a right-padded (B, S) batch into one row (1, L) of its samples, as VeOmni's packing
    collator does: padding dropped, each sample's first label ignored, the samples' boundaries in
    flash-attn's varlen keys (`cu_seq_lens_q/k`, `max_length_q/k`), which the attention honours (a
    model input as it stands). Requires `position_ids` (3, B, S), computed per sample."""
    keep = batch["attention_mask"].bool()
    lengths = keep.sum(-1)
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    aligned = [key for key in ("input_ids", "talker_frames", "talker_speakers") if key in batch]  # with the tokens
    packed = {key: value for key, value in batch.items() if key not in (*aligned, "labels", "attention_mask", "position_ids")}
    packed.update({key: batch[key][keep].unsqueeze(0) for key in aligned})
    packed["labels"] = labels[keep].unsqueeze(0)
    packed["position_ids"] = batch["position_ids"][:, keep].unsqueeze(1)
    cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max()) if lengths.numel() else 0
    packed.update(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)
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
    """This rank's model inputs for a packed (1, L) batch in HF's layout (`pack_rows`), the media side in
    `sp_inputs` (a `SequenceParallelShard`). See the module docstring. Raises `BadInputError` on
    placeholder counts that do not match the media."""
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
    cu = packed["cu_seq_lens_q"]
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
    shard["sp_inputs"] = _build_shard(ids, packed, clips, config, sp_size, sp_rank, length, [], shard)
    return shard


# Keys of VeOmni's collated batch that `shard_collated_batch` moves into `sp_inputs` (or drops: the
# attention mask is all ones and full-length under VeOmni's SP collator; the SP forward does not read it).
_COLLATED_MEDIA_KEYS = ("pixel_values_videos", "image_grid_thw", "video_grid_thw", "input_features", "audio_feature_lengths", "attention_mask")


def shard_collated_batch(batch: dict, config, sp_size: int, sp_rank: int) -> None:
    """Turn the output of VeOmni's SequenceParallelCollator, in place, into this rank's SP shard.

    VeOmni's collator has already done the text side the same way `shard_for_sequence_parallel` does:
    labels shifted, padded to a multiple of sp and sliced, position ids padded and sliced, and the
    varlen boundaries (`cu_seq_lens_*`, the pad tail one segment). By our collate infos
    (`veomni_omni.integration.trainer_hooks`) it left `input_ids` (padded), the pixels and the flat audio
    features whole: the masks and the media shards need the whole sequence. Placeholder counts that
    do not match the media are not raised here, in a DataLoader: they go in `sp_inputs.problems`,
    which the forward raises and veomni_omni's trainer agrees on across ranks before any forward."""
    ids = batch["input_ids"]
    padded = ids.shape[1]
    if padded % sp_size:
        raise ValueError(f"input_ids of length {padded} reached the SP shard unpadded for sp {sp_size}: VeOmni's collate info "
                         "for input_ids must keep sp_pad_value 0 and sp_slice False (veomni_omni.integration.trainer_hooks)")
    problems = input_problems(batch, config, "packed")
    length = padded - int(batch.get("tail_padding_length", 0))
    chunk = padded // sp_size
    begin, end = sp_rank * chunk, (sp_rank + 1) * chunk
    cu = batch["cu_seq_lens_q"]
    shard = {"cu_seq_lens_host": cu.tolist()}
    clips = []
    if "input_features" in batch and not problems:
        clips = [f.transpose(0, 1) for f in batch["input_features"].split(batch["audio_feature_lengths"].tolist())]
    sp_inputs = _build_shard(ids, batch, clips, config, sp_size, sp_rank, length, problems, shard)
    for key in _COLLATED_MEDIA_KEYS + ("pixel_values",):
        batch.pop(key, None)
    batch.update(shard)
    batch["input_ids"] = ids[:, begin:end]
    batch["sp_inputs"] = sp_inputs


def _build_shard(ids, packed, clips, config, sp_size, sp_rank, length, problems, shard) -> SequenceParallelShard:
    """The `SequenceParallelShard` of this rank's slice of the padded sequence `ids` (1, chunk·sp) of
    `length` tokens; puts the rank's pixel rows into `shard`. `clips`: each audio clip's (mel, frames)
    features, in placeholder order. With `problems` the media are not cut (their counts do not match)."""
    chunk = ids.shape[1] // sp_size
    begin, end = sp_rank * chunk, (sp_rank + 1) * chunk
    if problems:
        return SequenceParallelShard(sp_size, (begin, end), length, problems=problems)
    masks = {m: ids == getattr(config, f"{m}_token_id") for m in ("image", "video", "audio")}
    return SequenceParallelShard(
        sp_size, (begin, end), length,
        vision=_vision_shard(packed, config, masks, sp_size, sp_rank, begin, end, shard),
        audio=_audio_shard(clips, config, masks["audio"], begin, end),
    )


def _vision_shard(packed, config, masks, sp_size, sp_rank, begin, end, shard) -> Optional[VisionShard]:
    grids = [packed[k] for k in ("image_grid_thw", "video_grid_thw") if k in packed]
    if not grids:
        return None
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
    return VisionShard(
        grid_thw=grid_thw,
        cu_seqlens=cu_seqlens,
        segments=cu_seqlens.tolist(),
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        interp_indices=F.pad(interp_indices, (0, 0, 0, pad))[rows],
        interp_weights=F.pad(interp_weights, (0, 0, 0, pad))[rows],
        rotary_position_ids=F.pad(rotary_positions, (0, 0, 0, pad))[rows],
        order=order,
        fill_positions=positions[torch.argsort(order)],
        rows=(int(visual_mask[:, :begin].sum()), int(visual_mask[:, :end].sum())),
        local_positions=positions[(positions >= begin) & (positions < end)] - begin,
    )


def _audio_shard(clips, config, audio_mask, begin, end) -> Optional[AudioShard]:
    if not clips:
        return None
    audio = config.audio_config
    frames_per_window = audio.n_window_infer
    if frames_per_window % (2 * audio.n_window):
        raise ValueError("audio n_window_infer must be a multiple of 2·n_window for per-window encoding")
    first, last = int(audio_mask[:, :begin].sum()), int(audio_mask[:, :end].sum())  # global audio-token range
    if first == last:
        return None

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
    return AudioShard(
        feature_lens=feature_lens,
        padded_feature=padded_feature,
        chunk_lengths=chunk_lengths,
        valid_indices=get_valid_indices(chunk_lengths, audio.n_window),
        # a window's chunks keep the conv padding of its whole clip (veomni_omni.models.audio_tower)
        reference_widths=chunk_reference_widths(feature_lens, audio.n_window, torch.tensor(window_clip_frames)),
        cu_seqlens=cu_seqlens,
        max_seqlen=int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        rows=torch.tensor(select),
        local_positions=positions[(positions >= begin) & (positions < end)] - begin,
    )
