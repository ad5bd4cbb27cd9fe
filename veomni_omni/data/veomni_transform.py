"""VeOmni's data transform for Qwen3-Omni-MoE, without torchvision.

VeOmni's VLMTrainer builds the transform registered for the model type,
`build_data_transform("qwen3_omni_moe", processor=, chat_template=, position_id_func=, **data.mm_configs)`,
and its datasets (JSON, JSONL, parquet, multisource mixing) call it on every sample, passing the
source's `source_name`. `import veomni_omni` registers `transform_sample` there in place of VeOmni's
own, which imports torchvision for every sample, needs librosa/torchcodec, finds labels by searching
the ids of the words "user"/"assistant" and zeroes the placeholder ids.

Accepted samples:
- HF chat: `{"messages": [{"role": ..., "content": str | [{"type": "image", "image": ...}, ...]}]}`;
- VeOmni's: `{"conversations": [{"from": "human", "value": "<image>\\n..."}, ...], "images": [...],
  "videos": [...], "audios": [...]}`, turned into content items by VeOmni's own preprocessor for the
  source (`data.source_name`; without one, the markers `<image>` `<video>` `<audio>` are split where they
  stand, as VeOmni's `qwen_omni_offline_av` does). Each marker takes the next entry of its list; a video
  entry may be a path/bytes or an offline A/V dict `{"frames": [...], "audio": ..., "video_fps",
  "audio_fps"}` (its audio is interleaved: use_audio_in_video).

Output, one sample per call (`[dict]`, or `[]` when the sample is skipped), in the layout VeOmni's
packing collator concatenates: `input_ids`, `attention_mask`, `labels` (S,), `position_ids` (3, S),
`pixel_values` + `image_grid_thw`, `pixel_values_videos` + `video_grid_thw`, and VeOmni's flat audio
`input_features` (frames, mel) + `audio_feature_lengths` (clips,), and, when the talker trains
(`model.model_config.train_talker`), the speech keys of data/speech.py on every sample. Labels cover assistant turns only,
found from the chat structure (`veomni_omni.data.samples`). A sample whose media cannot be read (missing,
corrupt, too short or small) is skipped with a warning naming it, and counted (`skipped`), in the main
process and inside DataLoader workers alike.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .media import MAX_ASPECT_RATIO, SAMPLING_RATE, MediaError, load_audio, load_image, load_video
from .checks import IGNORE_INDEX, thinker_config_of
from .samples import SampleTooLong, _kind, _part_source, encode_sample
from .speech import SpeechTargetError

logger = logging.getLogger(__name__)

# VeOmni's default Qwen-Omni system turn, used (as VeOmni does) when a `conversations` sample has none.
QWEN_OMNI_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, "
    "capable of perceiving auditory and visual inputs, as well as generating text and speech."
)
_MARKER = re.compile(r"<(image|video|audio)>")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class MediaSettings:
    """VeOmni's `data.mm_configs`, as far as they mean something for the Qwen3-Omni processor.

    Keys VeOmni's own transform reads but that cannot apply here are refused with the reason, never
    ignored: `scale_factor` must be the processor's resize factor (patch × merge = 32 for Qwen3-Omni,
    VeOmni's example config says 28, Qwen2.5's), `sample_rate` the audio encoder's 16 kHz."""

    fps: float = 2.0
    min_frames: int = 1
    max_frames: Optional[int] = None
    frame_factor: int = 1
    use_audio_in_video: bool = False
    image_min_pixels: Optional[int] = None
    image_max_pixels: Optional[int] = None
    video_min_pixels: Optional[int] = None
    video_max_pixels: Optional[int] = None
    max_ratio: Optional[float] = None
    scale_factor: Optional[int] = None
    sample_rate: int = SAMPLING_RATE
    max_tokens: Optional[int] = None
    overflow: str = "drop"
    cache_samples: int = 0  # veomni_omni's: keep up to this many encoded samples per process (small, multi-epoch sets)

    @classmethod
    def from_mm_configs(cls, processor, mm_configs: dict) -> "MediaSettings":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(mm_configs) - names)
        if unknown:
            raise ValueError(f"data.mm_configs: unknown key(s) {unknown} for qwen3_omni_moe; known: {sorted(names)}")
        settings = cls(**mm_configs)
        factor = processor.image_processor.patch_size * processor.image_processor.merge_size
        if settings.scale_factor is not None and settings.scale_factor != factor:
            raise ValueError(
                f"data.mm_configs.scale_factor={settings.scale_factor}: the Qwen3-Omni processor resizes images and "
                f"videos to multiples of patch_size x merge_size = {factor}; set it to {factor} or remove it"
            )
        if settings.sample_rate != SAMPLING_RATE:
            raise ValueError(
                f"data.mm_configs.sample_rate={settings.sample_rate}: Qwen3-Omni's audio encoder takes {SAMPLING_RATE} Hz "
                "features; audio is resampled to it, set it to 16000 or remove it"
            )
        if settings.max_ratio is not None and settings.max_ratio > MAX_ASPECT_RATIO:
            raise ValueError(
                f"data.mm_configs.max_ratio={settings.max_ratio}: images beyond {MAX_ASPECT_RATIO}:1 are refused anyway "
                "(the Qwen processors cannot resize them); give a value up to that or remove it"
            )
        if settings.overflow not in ("drop", "truncate"):
            raise ValueError(f"data.mm_configs.overflow must be 'drop' or 'truncate', got {settings.overflow!r}")
        return settings

    def size(self, kind: str) -> Optional[dict]:
        low, high = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
        size = {k: v for k, v in (("shortest_edge", low), ("longest_edge", high)) if v is not None}
        return size or None

    def frame_count(self, total: int, rate: float) -> int:
        """Frames to sample from a video of `total` frames at `rate` fps: duration × fps, within
        [min_frames, max_frames], a multiple of frame_factor, never more than the video has."""
        wanted = max(self.min_frames, round(total / rate * self.fps))
        if self.max_frames is not None:
            wanted = min(wanted, self.max_frames)
        wanted = min(wanted, total)
        return max(self.frame_factor, wanted - wanted % self.frame_factor) if total >= self.frame_factor else total


# ------------------------------------------------------------------------------ sample → messages
@functools.cache
def veomni_preprocessors():
    """VeOmni's per-source conversation preprocessors. Their package's __init__ imports torchvision
    (absent on GPU-less machines); the module itself needs only VeOmni's registry, so without
    torchvision it is loaded from its file on its own."""
    try:
        from veomni.data.multimodal import preprocess
    except ImportError as err:
        if err.name != "torchvision":
            raise
        import veomni.data

        path = Path(veomni.data.__path__[0]) / "multimodal" / "preprocess.py"
        spec = importlib.util.spec_from_file_location("veomni.data.multimodal.preprocess", path)
        preprocess = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(preprocess)
    return preprocess.PREPROCESSOR_REGISTRY


def _content_items(sample: dict, source_name: Optional[str]) -> list:
    """[[role, (kind, value), ...], ...] of a `conversations` sample, by VeOmni's preprocessor for the source."""
    conversations = sample["conversations"]
    preprocessors = veomni_preprocessors()
    if source_name is not None and source_name in preprocessors:
        return preprocessors[source_name](conversations)
    items = []
    for message in conversations:
        role = _ROLES.get(message.get("from", message.get("role")))
        if role is None:
            raise ValueError(f"conversation turn with unknown speaker {message.get('from', message.get('role'))!r}")
        parts, cursor, value = [], 0, message["value"]
        for match in _MARKER.finditer(value):
            if value[cursor : match.start()]:
                parts.append(("text", value[cursor : match.start()]))
            parts.append((match.group(1), None))
            cursor = match.end()
        if value[cursor:]:
            parts.append(("text", value[cursor:]))
        items.append([role, *parts])
    return items


def _video_part(entry: Any, settings: MediaSettings) -> dict:
    """A video content part with decoded, sampled frames (and its soundtrack for an offline A/V dict)."""
    if isinstance(entry, dict) and "frames" in entry:
        frames = [load_image(frame) for frame in entry["frames"]]
        part = {"type": "video", "video": frames, "fps": float(entry.get("video_fps", settings.fps))}
        audio = entry.get("audio")
        if audio is not None:
            if isinstance(audio, (np.ndarray, list)) and entry.get("audio_fps") is None:
                raise MediaError("<offline A/V audio>", "an audio array needs its audio_fps")
            part["audio"] = load_audio(audio, SAMPLING_RATE, entry.get("audio_fps"))
        return part
    video = load_video(entry, with_audio=settings.use_audio_in_video)
    sampled = load_video(video.frames, num_frames=settings.frame_count(len(video.frames), video.fps), fps=video.fps)
    part = {"type": "video", "video": sampled.frames, "fps": sampled.fps}
    if settings.use_audio_in_video:
        if video.audio is None:
            raise MediaError(entry, "data.mm_configs.use_audio_in_video is set but the video has no audio track")
        part["audio"] = video.audio
    return part


def to_messages(sample: dict, settings: MediaSettings, source_name: Optional[str] = None) -> tuple[list, bool]:
    """HF chat messages of a sample in any accepted format (media not decoded yet), and whether its videos
    carry their audio."""
    # Columnar sources (parquet, JSON through HF datasets) give every row every column, None where absent.
    if sample.get("messages") is not None:
        in_video = sample.get("use_audio_in_video")
        return sample["messages"], bool(settings.use_audio_in_video if in_video is None else in_video)
    if sample.get("conversations") is None:
        raise ValueError(f"a sample needs 'messages' or 'conversations'; got {sorted(k for k, v in sample.items() if v is not None)}")
    media = {kind: list(sample.get(f"{kind}s") or []) for kind in ("image", "video", "audio")}
    used = {kind: 0 for kind in media}
    messages, audio_in_video = [], settings.use_audio_in_video
    for role, *parts in _content_items(sample, source_name):
        content = []
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
                continue
            if used[kind] >= len(media[kind]):
                raise ValueError(f"more <{kind}> markers than entries in the sample's '{kind}s' ({len(media[kind])})")
            entry = media[kind][used[kind]]
            used[kind] += 1
            # an offline A/V dict brings its soundtrack: the sample's videos are interleaved with their audio
            audio_in_video |= kind == "video" and isinstance(entry, dict) and entry.get("audio") is not None
            content.append({"type": kind, kind: entry})
        messages.append({"role": role, "content": content})
    left = {kind: len(media[kind]) - used[kind] for kind in media if used[kind] != len(media[kind])}
    if left:
        raise ValueError(f"media without a marker in the conversation: {left} unused (each <image>/<video>/<audio> takes one)")
    if messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": QWEN_OMNI_SYSTEM_PROMPT}]})
    return messages, audio_in_video


def _decoded_media(messages: list, settings: MediaSettings) -> list:
    """The messages with their media decoded once, as data.mm_configs says: images (one beyond `max_ratio`
    refused), video files and offline A/V dicts sampled (fps, frame bounds, soundtrack); a video part that
    names its own `fps`, `nframes` or soundtrack keeps them (HF's convention). Assistant turns are left to
    `encode_sample`, which refuses media there."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str) or message["role"] == "assistant":
            out.append(message)
            continue
        parts = []
        for part in content:
            kind = _kind(part)
            if kind == "image":
                source = _part_source(part, "image")
                image = load_image(source)
                ratio = max(image.size) / min(image.size)
                if settings.max_ratio is not None and ratio > settings.max_ratio:
                    raise MediaError(source, f"aspect ratio {ratio:.0f} exceeds data.mm_configs.max_ratio={settings.max_ratio}")
                part = {"type": "image", "image": image}
            elif kind == "video" and all(part.get(key) is None for key in ("fps", "nframes", "audio")):
                source = _part_source(part, "video")
                if isinstance(source, (str, bytes, bytearray, dict)):
                    part = _video_part(source, settings)
            parts.append(part)
        out.append({**message, "content": parts})
    return out


# ------------------------------------------------------------------------------------ transform
SPEECH_KEYS = ("talker_codes", "talker_frames", "talker_speakers", "talker_labels", "code_predictor_labels")


def veomni_layout(encoded: dict, speech_config=None) -> dict:
    """One encoded sample in the layout VeOmni's packing collator concatenates (see module doc).

    When the talker trains (`speech_config`, the top-level config), every sample carries the speech keys,
    empty where it has no spoken turn: VeOmni's collator concatenates each key over the samples that have
    it, so token-aligned markers from only some samples would land on other samples' tokens, and every
    rank must count the same `*_labels` losses."""
    if speech_config is None and "talker_codes" in encoded:
        raise ValueError(
            "its assistant turns carry speech, but the talker does not train: set model.model_config.train_talker: true "
            "(veomni_omni), or remove the 'speech' entries"
        )
    out = {key: encoded[key] for key in ("input_ids", "attention_mask", "labels", "position_ids")}
    if speech_config is not None:
        groups = speech_config.talker_config.num_code_groups
        silent = {
            "talker_codes": torch.zeros(groups, 0, dtype=torch.long),
            "talker_frames": torch.zeros_like(encoded["input_ids"]),
            "talker_speakers": torch.zeros_like(encoded["input_ids"]),
            "talker_labels": torch.zeros(0, dtype=torch.long),
            "code_predictor_labels": torch.zeros(0, dtype=torch.long),
        }
        out.update({key: encoded.get(key, silent[key]) for key in SPEECH_KEYS})
        if "video_second_per_grid" in encoded:  # the talker's positions of a video are computed in the forward
            out["video_second_per_grid"] = encoded["video_second_per_grid"]
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in encoded:
            out[key] = encoded[key]
    if "input_features" in encoded:
        lengths = encoded["feature_attention_mask"].sum(-1)
        features = encoded["input_features"].transpose(1, 2)  # (clips, frames, mel)
        out["input_features"] = torch.cat([clip[:n] for clip, n in zip(features, lengths.tolist())])
        out["audio_feature_lengths"] = lengths
    return out


class SkipCounter:
    """Samples skipped by this process (each DataLoader worker counts its own and logs the running total)."""

    total = 0


def transform_sample(
    sample: dict,
    processor,
    position_id_func,
    chat_template=None,
    source_name: Optional[str] = None,
    **mm_configs,
) -> list[dict]:
    """VeOmni data-transform entry for qwen3_omni_moe (see the module doc)."""
    if chat_template is not None:  # VLMTrainer passes none for model_type qwen3_omni_moe
        raise ValueError(
            "VeOmni's VLMTrainer treats a thinker-only checkpoint (model_type qwen3_omni_moe_thinker) as a generic VLM: "
            "its data.chat_template replaces the tokenizer's chat template when the trainer saves its assets. Train the "
            "released top-level checkpoint (model_type qwen3_omni_moe); chats are rendered with the processor's own template"
        )
    config = getattr(position_id_func, "config", None)
    speech_config = getattr(position_id_func, "speech_config", None)
    if config is None:
        raise TypeError(
            "position_id_func must be the model's get_position_id_func() (veomni_omni's RopePositionIds); "
            f"got {type(position_id_func).__name__}"
        )
    settings = MediaSettings.from_mm_configs(processor, mm_configs)
    key = json.dumps([source_name, sample], sort_keys=True, default=repr) if settings.cache_samples else None
    if key in _ENCODED:
        return [_fresh(_ENCODED[key])] if _ENCODED[key] is not None else []
    out = _transform(sample, processor, config, speech_config, settings, source_name)
    if key is not None and len(_ENCODED) < settings.cache_samples:
        _ENCODED[key] = out[0] if out else None
        return [_fresh(out[0])] if out else []
    return out


# Encoded samples by their JSON (mm_configs.cache_samples); None for a skipped one, counted once.
_ENCODED: dict = {}


def _fresh(encoded: dict) -> dict:
    """A cached sample for the collator, which writes into the labels of every sample it packs after the first."""
    return {**encoded, "labels": encoded["labels"].clone()}


def _transform(sample: dict, processor, config, speech_config, settings: MediaSettings, source_name: Optional[str]) -> list[dict]:
    sample_id = sample.get("id", sample.get("sample_id", "?"))
    try:
        messages, audio_in_video = to_messages(sample, settings, source_name or sample.get("source_name"))
        if speech_config is None and any(message.get("speech") is not None for message in messages):
            raise SpeechTargetError("its assistant turns carry speech, but the talker does not train: set "
                                    "model.model_config.train_talker: true (veomni_omni), or remove the 'speech' entries")
        messages = _decoded_media(messages, replace(settings, use_audio_in_video=audio_in_video))
        encoded = encode_sample(
            {"messages": messages},
            processor,
            speech_config or config,
            max_tokens=settings.max_tokens,
            overflow=settings.overflow,
            use_audio_in_video=audio_in_video,
            image_size=settings.size("image"),
            video_size=settings.size("video"),
        )
    except (MediaError, SampleTooLong) as err:
        SkipCounter.total += 1
        logger.warning("skipping sample %s (%s): %s: %s [%d skipped in this process]",
                       sample_id, source_name or "-", type(err).__name__, err, SkipCounter.total)
        return []
    except SpeechTargetError as err:
        return [refused_sample(f"sample {sample_id} ({source_name or '-'}): {err}", config, speech_config)]
    except ValueError as err:
        raise ValueError(f"sample {sample_id} ({source_name or '-'}): {err}") from err
    return [veomni_layout(encoded, speech_config)]


REFUSED_KEY = "refused_samples"


def refused_sample(problem: str, config, speech_config=None) -> dict:
    """A sample whose speech targets cannot be trained, as one padding token carrying the reason
    (`refused_samples`): raising here would stop only the rank that read it, while the others wait in the
    step's collectives until torchrun kills them. VeOmni's collator gathers the reasons of a micro batch
    into a list, and at the step's start every rank raises the same `BadInputError` with every rank's
    reasons (integration/speech_training.py `count_loss_tokens`, before any other collective)."""
    token = {
        "input_ids": torch.tensor([thinker_config_of(config).text_config.pad_token_id or 0]),
        "attention_mask": torch.ones(1, dtype=torch.long),
        "labels": torch.tensor([IGNORE_INDEX]),
        "position_ids": torch.zeros(3, 1, dtype=torch.long),
    }
    return {**veomni_layout(token, speech_config), REFUSED_KEY: problem}
