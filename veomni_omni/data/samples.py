"""One chat sample → Qwen3-Omni-MoE thinker inputs, with HF's own processor and rope index.

`encode_sample(sample, processor, config)` returns, for a sample of S tokens (docs/design.md §7):

    input_ids (S,) long          placeholder runs expanded by `Qwen3OmniMoeProcessor` itself
    attention_mask (S,) long     all ones
    labels (S,) long             -100 except the content tokens of assistant turns and their <|im_end|>
    position_ids (3, S) float    HF's `get_rope_index` on these ids (the dtype HF computes)
    image_mask / video_mask / audio_mask (S,) bool
    pixel_values (Σ t·h·w, 1536), image_grid_thw (n, 3)                      if images
    pixel_values_videos, video_grid_thw (n, 3), video_second_per_grid (n,)  if videos
    input_features (clips, 128, frames), feature_attention_mask (clips, frames)  if audio
    use_audio_in_video bool
    talker_codes, talker_frames, talker_speakers, talker_labels, code_predictor_labels   if assistant turns carry speech (speech.py)

Assistant spans come from the chat structure: the template is rendered for every conversation
prefix, and an assistant message's trained text is what rendering it appends after the generation
prompt "<|im_start|>assistant\\n", up to and including its "<|im_end|>". Those character spans are
mapped onto tokens by offsets of the unexpanded text, whose tokens are then aligned one by one with
the processor's expanded ids (placeholder runs skipped). No token ids of words are searched for.

Length cap: `max_tokens` with `overflow="drop"` (raise `SampleTooLong`) or `"truncate"` (cut at
the cap, moved back to the start of any media block it would split, dropping that block's media;
a sample with nothing left to train on is dropped; a sample with speech is never truncated, as its
speech would no longer match its text). Output never exceeds the cap.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling

from .checks import IGNORE_INDEX, thinker_config_of
from .media import SAMPLING_RATE, MediaError, load_audio, load_image, load_video
from .speech import SpeechTargetError, speech_targets, spoken_turns

__all__ = [
    "SampleTooLong",
    "assistant_spans",
    "encode_sample",
    "encode_or_skip",
    "media_blocks",
    "rope_positions",
    "batch_rope_positions",
]

logger = logging.getLogger(__name__)

MEDIA_KINDS = ("image", "video", "audio")
MIN_AUDIO_SAMPLES = 400  # Whisper's n_fft: shorter clips make torch.stft's reflect padding fail


class SampleTooLong(ValueError):
    """The sample does not fit `max_tokens` (overflow="drop"), or nothing trainable is left after
    truncating it."""


# ------------------------------------------------------------------------------------ config
def _token_ids(config, tokenizer) -> dict[str, int]:
    """Placeholder/start/end ids from the model config, checked against the processor's tokenizer
    (a processor for another vocabulary must fail loudly, not train on wrong masks)."""
    ids = dict(
        image=config.image_token_id,
        video=config.video_token_id,
        audio=config.audio_token_id,
        vision_start=config.vision_start_token_id,
        audio_start=config.audio_start_token_id,
    )
    names = dict(
        image=tokenizer.image_token, video=tokenizer.video_token, audio=tokenizer.audio_token,
        vision_start=tokenizer.vision_bos_token, audio_start=tokenizer.audio_bos_token,
    )
    for key, token in names.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != ids[key]:
            raise ValueError(f"config {key} token id {ids[key]} differs from the tokenizer's {token}={got}")
    ids["vision_end"] = tokenizer.convert_tokens_to_ids(tokenizer.vision_eos_token)
    ids["audio_end"] = tokenizer.convert_tokens_to_ids(tokenizer.audio_eos_token)
    return ids


def _chat_ids(config, tokenizer) -> dict[str, int]:
    """The chat-turn ids HF's talker input is built from, checked against the tokenizer."""
    ids = {"im_start": tokenizer.convert_tokens_to_ids("<|im_start|>")}
    for role in ("assistant", "user"):
        got = tokenizer.convert_tokens_to_ids(role)
        if got != getattr(config, f"{role}_token_id"):
            raise SpeechTargetError(f"config {role}_token_id {getattr(config, f'{role}_token_id')} differs from the tokenizer's {role!r}={got}")
        ids[role] = got
    ids["codec_eos"] = config.talker_config.codec_eos_token_id
    if ids["im_start"] != config.im_start_token_id:
        raise SpeechTargetError(f"config im_start_token_id {config.im_start_token_id} differs from the tokenizer's {ids['im_start']}")
    return ids


# ------------------------------------------------------------------------------------- media
def _resolve(source: Any, media_root: Optional[str]) -> Any:
    if isinstance(source, str) and media_root and not os.path.isabs(source) and "://" not in source:
        return os.path.join(media_root, source)
    return source


def _part_source(part: dict, kind: str) -> Any:
    for key in (kind, f"{kind}_url", "path", "url"):
        if key in part and part[key] is not None:
            value = part[key]
            return value["url"] if isinstance(value, dict) and "url" in value else value
    raise MediaError(f"<{kind} part>", f"no source in content part keys {sorted(part)}")


def _kind(part: dict) -> str:
    kind = part.get("type")
    if kind in ("image_url", "video_url", "audio_url"):
        kind = kind[:-4]
    if kind in MEDIA_KINDS or kind == "text":
        return kind
    for k in MEDIA_KINDS:
        if k in part:
            return k
    if "text" in part:
        return "text"
    raise ValueError(f"content part of unknown type: {sorted(part)}")


def _checked_audio(audio: np.ndarray, source: Any) -> np.ndarray:
    if audio.shape[-1] < MIN_AUDIO_SAMPLES:
        raise MediaError(source, f"audio too short ({audio.shape[-1]} samples < {MIN_AUDIO_SAMPLES} at 16 kHz)")
    return audio


def _load_media(messages: list, use_audio_in_video: bool, media_root: Optional[str]):
    """Images, videos (frame arrays), their fps, and audio clips in the order the processor consumes
    them: audio parts and (with use_audio_in_video) video soundtracks, in text order."""
    images, videos, fps, audios = [], [], [], []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            continue
        for part in content:
            kind = _kind(part)
            if kind == "text":
                continue
            if message["role"] == "assistant":
                raise ValueError("assistant messages may only hold text (the thinker does not generate media)")
            source = _resolve(_part_source(part, kind), media_root)
            if kind == "image":
                images.append(load_image(source))
            elif kind == "audio":
                rate = part.get("sampling_rate")
                audios.append(_checked_audio(load_audio(source, SAMPLING_RATE, rate), source))
            else:
                video = load_video(
                    source,
                    num_frames=part.get("nframes"),
                    fps=part.get("fps"),
                    with_audio=use_audio_in_video and part.get("audio") is None,
                )
                videos.append(video.frames)
                fps.append(video.fps)
                if use_audio_in_video:
                    soundtrack = part.get("audio")
                    soundtrack = load_audio(soundtrack) if soundtrack is not None else video.audio
                    if soundtrack is None:
                        raise MediaError(source, "use_audio_in_video is set but the video has no audio track")
                    audios.append(_checked_audio(soundtrack, source))
    return images, videos, fps, audios


# ----------------------------------------------------------------------------------- labels
def _skeleton(messages: list) -> list:
    """The conversation with media replaced by markers: what the template needs to render."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            parts = []
            for part in content:
                kind = _kind(part)
                parts.append({"type": "text", "text": part["text"]} if kind == "text" else {"type": kind, kind: kind})
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


def _render(processor, messages: list, add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(processor, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant message, the character span [start, end) of
    its trained text: after the generation prompt, through its end-of-turn token."""
    skeleton = _skeleton(messages)
    full = _render(processor, skeleton)
    eot = processor.tokenizer.eos_token  # <|im_end|> for Qwen chat models
    spans = []
    for i, message in enumerate(skeleton):
        if message["role"] != "assistant":
            continue
        head = _render(processor, skeleton[:i], add_generation_prompt=True)
        upto = _render(processor, skeleton[: i + 1])
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ValueError(
                "the chat template is not prefix-stable (rendering a conversation prefix does not give a prefix of "
                "the rendered conversation), so assistant spans cannot be located from the chat structure"
            )
        end = upto.rfind(eot)
        if end < len(head):
            raise ValueError(f"assistant message {i} renders without its end-of-turn token {eot!r}")
        spans.append((len(head), end + len(eot)))
    return full, spans


def _aligned_labels(processor, text: str, spans, expanded: list[int], ids: dict, use_audio_in_video: bool) -> list[int]:
    """Labels over the processor's expanded ids: tokens of the unexpanded text whose start lies in
    an assistant span keep their id; placeholder runs (never trained) are skipped in step."""
    encoding = processor.tokenizer(text, return_offsets_mapping=True)
    plain, offsets = encoding["input_ids"], encoding["offset_mapping"]
    labels = [-100] * len(expanded)
    j = 0

    def fail(why):
        raise RuntimeError(f"processor output does not align with the rendered text at token {j}: {why}")

    for token, (start, _) in zip(plain, offsets):
        if token in (ids["image"], ids["audio"]) or (token == ids["video"] and not use_audio_in_video):
            if j >= len(expanded) or expanded[j] != token:
                fail("missing placeholder run")
            while j < len(expanded) and expanded[j] == token:
                j += 1
        elif token == ids["video"]:  # audio-in-video: <audio_start> video/audio interleaved <audio_end>
            if j >= len(expanded) or expanded[j] != ids["audio_start"]:
                fail("missing audio-in-video block")
            j += 1
            while j < len(expanded) and expanded[j] in (ids["video"], ids["audio"]):
                j += 1
            if j >= len(expanded) or expanded[j] != ids["audio_end"]:
                fail("unterminated audio-in-video block")
            j += 1
        else:
            if j >= len(expanded) or expanded[j] != token:
                fail(f"expected {token}, got {expanded[j] if j < len(expanded) else 'end'}")
            if any(a <= start < b for a, b in spans):
                labels[j] = token
            j += 1
    if j != len(expanded):
        fail("trailing tokens")
    return labels


# ------------------------------------------------------------------------------ rope index
def _hf_rope_index(config, input_ids, attention_mask, image_grid_thw, video_grid_thw, audio_seqlens, video_second_per_grid, use_audio_in_video):
    """(3, B, S) M-RoPE positions: HF's `Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index`,
    called unbound on a stand-in carrying only the config (no weights)."""
    config = thinker_config_of(config)
    owner = hf_modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    holder = SimpleNamespace(config=config, spatial_merge_size=config.vision_config.spatial_merge_size)
    holder.get_llm_pos_ids_for_vision = partial(owner.get_llm_pos_ids_for_vision, holder)
    positions, _ = owner.get_rope_index(
        holder,
        input_ids,
        image_grid_thw,
        video_grid_thw,
        attention_mask,
        use_audio_in_video,
        audio_seqlens,
        video_second_per_grid,
    )
    return positions


def rope_positions(
    config,
    input_ids: torch.Tensor,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    audio_seqlens: Optional[torch.Tensor] = None,
    video_second_per_grid: Optional[torch.Tensor] = None,
    use_audio_in_video: bool = False,
) -> torch.Tensor:
    """(3, S) M-RoPE positions of one unpadded sequence (HF's `get_rope_index`)."""
    ids = input_ids.view(1, -1)
    return _hf_rope_index(
        config, ids, torch.ones_like(ids), image_grid_thw, video_grid_thw, audio_seqlens, video_second_per_grid, use_audio_in_video
    )[:, 0]


def batch_rope_positions(config, batch: dict) -> torch.Tensor:
    """(3, B, S) M-RoPE positions of a right-padded batch in HF's layout (HF's `get_rope_index`). Per-batch
    positions let batches with and without audio-in-video be concatenated (HF's flag is one per forward call)."""
    mask = batch.get("feature_attention_mask")
    return _hf_rope_index(
        config,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        mask.sum(-1) if mask is not None else None,
        batch.get("video_second_per_grid"),
        batch.get("use_audio_in_video", False),
    )


# ------------------------------------------------------------------------------ truncation
def media_blocks(input_ids: list[int], ids: dict) -> list[tuple[int, int, str]]:
    """(start, end_exclusive, kind) of every top-level media block: image / video / audio /
    audio_in_video, from its start token through its end token."""
    opening = {ids["vision_start"]: ids["vision_end"], ids["audio_start"]: ids["audio_end"]}
    blocks, stack, start = [], [], 0
    for pos, token in enumerate(input_ids):
        if token in opening:
            if not stack:
                start = pos
            stack.append(opening[token])
        elif stack and token == stack[-1]:
            stack.pop()
            if not stack:
                inner = input_ids[start + 1 : pos]
                if inner and inner[0] == ids["audio_start"]:
                    kind = "audio_in_video"
                elif inner and inner[0] == ids["image"]:
                    kind = "image"
                elif inner and inner[0] == ids["video"]:
                    kind = "video"
                else:
                    kind = "audio"
                blocks.append((start, pos + 1, kind))
    if stack:
        raise ValueError("unterminated media block")
    return blocks


def _truncate(out: dict, cap: int, ids: dict) -> dict:
    seq = out["input_ids"].tolist()
    blocks = media_blocks(seq, ids)
    cut = cap
    for start, end, _ in blocks:
        if start < cut < end:
            cut = start  # never split a placeholder run: drop the whole block
    kept = [kind for start, end, kind in blocks if end <= cut]
    n_img = kept.count("image")
    n_vid = kept.count("video") + kept.count("audio_in_video")
    n_clip = kept.count("audio") + kept.count("audio_in_video")
    res = {k: out[k][:cut] for k in ("input_ids", "attention_mask", "labels", "image_mask", "video_mask", "audio_mask")}
    res["use_audio_in_video"] = out["use_audio_in_video"] and n_vid > 0
    if "image_grid_thw" in out and n_img:
        grids = out["image_grid_thw"][:n_img]
        res["image_grid_thw"] = grids
        res["pixel_values"] = out["pixel_values"][: int(grids.prod(-1).sum())]
    if "video_grid_thw" in out and n_vid:
        grids = out["video_grid_thw"][:n_vid]
        res["video_grid_thw"] = grids
        res["pixel_values_videos"] = out["pixel_values_videos"][: int(grids.prod(-1).sum())]
        res["video_second_per_grid"] = out["video_second_per_grid"][:n_vid]
    if "input_features" in out and n_clip:
        mask = out["feature_attention_mask"][:n_clip]
        frames = int(mask.sum(-1).max())
        res["feature_attention_mask"] = mask[:, :frames]
        res["input_features"] = out["input_features"][:n_clip, :, :frames]
    return res


# ---------------------------------------------------------------------------------- encode
def encode_sample(
    sample: Any,
    processor,
    config,
    *,
    max_tokens: Optional[int] = None,
    overflow: str = "drop",
    use_audio_in_video: Optional[bool] = None,
    media_root: Optional[str] = None,
    image_size: Optional[dict] = None,
    video_size: Optional[dict] = None,
) -> dict:
    """Model inputs of one chat sample (a dict with "messages", or the message list itself).

    `config`: the thinker config (or the top-level Qwen3OmniMoeConfig) the inputs are for; its
    token ids must match the processor's tokenizer, and its `position_id_per_seconds` and audio
    `n_window` are used for the audio-in-video interleaving and the audio token counts (the
    processor's own defaults, 13 and 50, may differ from the model's). `use_audio_in_video`
    defaults to the sample's "use_audio_in_video" key. `image_size` / `video_size` override the image /
    video processor's pixel bounds ({"shortest_edge": min_pixels, "longest_edge": max_pixels}). Raises `MediaError` for unreadable media
    and `SampleTooLong` for samples that do not fit (see module docstring).
    """
    if overflow not in ("drop", "truncate"):
        raise ValueError(f"overflow must be 'drop' or 'truncate', got {overflow!r}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError("max_tokens must be positive")
    messages = sample["messages"] if isinstance(sample, dict) else sample
    if use_audio_in_video is None:
        use_audio_in_video = bool(sample.get("use_audio_in_video", False)) if isinstance(sample, dict) else False
    thinker = thinker_config_of(config)
    ids = _token_ids(thinker, processor.tokenizer)
    speech = speech_targets(messages, getattr(config, "talker_config", None), media_root)
    spoken = any(target is not None for target in speech)
    if spoken:
        ids.update(_chat_ids(config, processor.tokenizer))

    images, videos, fps, audios = _load_media(messages, use_audio_in_video, media_root)
    if len(set(fps)) > 1:
        raise ValueError(f"videos of one sample must share a frame rate (the processor takes one fps), got {fps}")
    use_audio_in_video = use_audio_in_video and bool(videos)
    text, spans = assistant_spans(processor, messages)

    video_kwargs = {
        # Qwen3OmniMoeProcessor's class-level defaults pass size {shortest_edge: 128·32², ...} to the
        # video processor on every call, overriding the video processor's own configured size.
        "size": {**dict(processor.video_processor.size), **(video_size or {})},
        "use_audio_in_video": use_audio_in_video,
        "position_id_per_seconds": thinker.position_id_per_seconds,
    }
    if fps:
        video_kwargs["fps"] = fps[0]
    batch = processor(
        text=[text],
        images=images or None,
        videos=videos or None,
        audio=audios or None,
        videos_kwargs=video_kwargs,
        images_kwargs={"size": {**dict(processor.image_processor.size), **image_size}} if image_size else {},
        audio_kwargs={"n_window": thinker.audio_config.n_window},
        # NumPy, not "pt": with torch grids the processor's audio-in-video interleaving calls
        # np.arange / np.broadcast_to on tensors (NumPy 2 DeprecationWarnings on every call)
        return_tensors="np",
    )
    batch = {key: torch.as_tensor(np.asarray(value)) for key, value in batch.items()}
    input_ids = batch["input_ids"][0].long()
    expanded = input_ids.tolist()
    labels = _aligned_labels(processor, text, spans, expanded, ids, use_audio_in_video)

    out = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor(labels, dtype=torch.long),
        "image_mask": input_ids == ids["image"],
        "video_mask": input_ids == ids["video"],
        "audio_mask": input_ids == ids["audio"],
        "use_audio_in_video": use_audio_in_video,
    }
    if images:
        out["pixel_values"] = batch["pixel_values"]
        out["image_grid_thw"] = batch["image_grid_thw"]
    if videos:
        out["pixel_values_videos"] = batch["pixel_values_videos"]
        out["video_grid_thw"] = batch["video_grid_thw"]
        out["video_second_per_grid"] = batch["video_second_per_grid"].float()
    if audios:
        out["input_features"] = batch["input_features"]
        out["feature_attention_mask"] = batch["feature_attention_mask"].long()

    if spoken:
        out.update(spoken_turns(input_ids, out["labels"], speech, ids))
    if max_tokens is not None and len(expanded) > max_tokens:
        if overflow == "drop" or spoken:
            why = " (a sample with speech is never truncated: its speech would no longer match its text)" if spoken else ""
            raise SampleTooLong(f"{len(expanded)} tokens > max_tokens={max_tokens}{why}")
        out = _truncate(out, max_tokens, ids)
        if not bool((out["labels"] != IGNORE_INDEX).any()):
            raise SampleTooLong(f"nothing left to train on after truncating {len(expanded)} tokens to {max_tokens}")

    out["position_ids"] = rope_positions(
        thinker,
        out["input_ids"],
        out.get("image_grid_thw"),
        out.get("video_grid_thw"),
        out["feature_attention_mask"].sum(-1) if "feature_attention_mask" in out else None,
        out.get("video_second_per_grid"),
        out["use_audio_in_video"],
    )
    if max_tokens is not None:
        assert len(out["input_ids"]) <= max_tokens
    return out


def encode_or_skip(sample: Any, processor, config, **kwargs) -> Optional[dict]:
    """`encode_sample`, but a sample with unreadable media or over the length cap is skipped with a
    warning (returns None)."""
    try:
        return encode_sample(sample, processor, config, **kwargs)
    except (MediaError, SampleTooLong) as err:
        sample_id = sample.get("id", "?") if isinstance(sample, dict) else "?"
        logger.warning("skipping sample %s: %s: %s", sample_id, type(err).__name__, err)
        return None
