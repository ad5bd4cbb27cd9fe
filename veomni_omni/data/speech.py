"""Target speech of assistant turns: codec codes the talker and code predictor learn to produce.

An assistant message may carry its spoken form:

    {"role": "assistant", "content": "...", "speech": {"codes": CODES, "speaker": "ethan"}}

CODES is an integer array of shape (`talker_config.num_code_groups`, frames), inline (nested lists,
NumPy, torch) or a `.npy` / `.pt` file; every code lies in [0, the code predictor's vocabulary), which
is code2wav's codebook (2048 in the release; the talker's own codec ids above it are its specials). `speaker` is a key of `talker_config.speaker_id` (case-insensitive, as in HF's
`generate(speaker=...)`). The encoded sample then holds (see `encode_sample`):

    talker_codes (groups, Σ frames) long   the spoken turns' codes, in turn order
    talker_frames (S,) long                at each spoken turn's <|im_start|>: its frames; 0 elsewhere
    talker_speakers (S,) long              there: its speaker id; 0 elsewhere
    talker_labels (Σ (frames + 1),) long   per turn, what the talker predicts: codebook 0 of each frame,
                                           then the end of speech
    code_predictor_labels (Σ frames · (groups − 1),) long   per frame, groups 1.. (what the code predictor predicts)

The two label tensors are what VeOmni's trainer counts (`<name>_labels` → `<name>_tokens`) to make
each named loss a token mean over every rank's batch.

The markers are aligned with the tokens, so packing, padding and concatenating samples (VeOmni's
collator included) keep them with their turns, and the codes in the order of the turns.

Anything else — speech on a user or system turn, a wrong number of code groups, codes out of range,
an unknown speaker, a spoken turn without text — raises `SpeechTargetError`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["SpeechTargetError", "load_codes", "speech_labels", "speech_targets", "spoken_turns"]


class SpeechTargetError(ValueError):
    """A sample's target speech cannot be trained as given."""


def load_codes(source: Any, media_root: Optional[str] = None) -> torch.Tensor:
    """The codes of one turn as a long tensor, from an inline array or a `.npy` / `.pt` file."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if media_root and not os.path.isabs(path):
            path = os.path.join(media_root, path)
        if path.endswith(".npy"):
            source = np.load(path, allow_pickle=False)
        elif path.endswith(".pt"):
            source = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise SpeechTargetError(f"speech codes file {path!r}: expected a .npy or .pt file")
    codes = torch.as_tensor(np.asarray(source) if isinstance(source, list) else source)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise SpeechTargetError(f"speech codes must be integers, got {codes.dtype}")
    return codes.long()


def speech_targets(messages: list, talker_config, media_root: Optional[str] = None) -> list[Optional[tuple[torch.Tensor, int]]]:
    """Per assistant message, in order: (codes (groups, frames), speaker id), or None where it has no
    speech. Checks everything that can be checked before tokenising."""
    targets = []
    for index, message in enumerate(messages):
        speech = message.get("speech")
        if message["role"] != "assistant":
            if speech is not None:
                raise SpeechTargetError(f"message {index} ({message['role']}) carries speech; only assistant turns are spoken")
            continue
        if speech is None:
            targets.append(None)
            continue
        if talker_config is None:
            raise SpeechTargetError(
                f"message {index} carries speech, but the model config has no talker (train the top-level "
                "Qwen3-Omni-MoE config, with enable_audio_output)"
            )
        unknown = sorted(set(speech) - {"codes", "speaker"})
        if unknown or "codes" not in speech or "speaker" not in speech:
            raise SpeechTargetError(f"message {index}: speech takes 'codes' and 'speaker', got {sorted(speech)}")
        codes = load_codes(speech["codes"], media_root)
        groups, codebook = talker_config.num_code_groups, _codebook_size(talker_config)
        if codes.ndim != 2 or codes.shape[0] != groups or codes.shape[1] == 0:
            raise SpeechTargetError(
                f"message {index}: speech codes of shape {tuple(codes.shape)}; the talker takes ({groups}, frames) with frames ≥ 1"
            )
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= codebook:
            raise SpeechTargetError(f"message {index}: speech codes in [{low}, {high}], outside the codebook [0, {codebook})")
        speaker = str(speech["speaker"]).lower()
        if speaker not in talker_config.speaker_id:
            raise SpeechTargetError(f"message {index}: unknown speaker {speech['speaker']!r}; the talker knows {sorted(talker_config.speaker_id)}")
        targets.append((codes, int(talker_config.speaker_id[speaker])))
    return targets


def _codebook_size(talker_config) -> int:
    """Codes code2wav decodes, which are also the code predictor's whole vocabulary; the talker's codec
    vocabulary holds them and then its special ids (pad, bos, eos, speakers)."""
    return talker_config.code_predictor_config.vocab_size


def spoken_turns(input_ids: torch.Tensor, labels: torch.Tensor, targets: list, ids: dict) -> dict:
    """`talker_codes`, `talker_frames` and `talker_speakers` of an encoded sample, from its per-assistant-
    message targets.

    Assistant turns are the runs of trained labels (each "text<|im_end|>", in message order); the turn
    opens 3 tokens before its run with "<|im_start|>assistant\\n", which is where HF's generate starts
    the talker's assistant part."""
    trained = (labels != -100).tolist()
    runs, start = [], None
    for pos, flag in enumerate(trained + [False]):
        if flag and start is None:
            start = pos
        elif not flag and start is not None:
            runs.append((start, pos))
            start = None
    if len(runs) != len(targets):
        raise SpeechTargetError(f"{len(targets)} assistant messages but {len(runs)} trained spans in the encoded sample")
    codes, frames, speakers = [], torch.zeros_like(input_ids), torch.zeros_like(input_ids)
    for (first, end), target in zip(runs, targets):
        if target is None:
            continue
        opening = first - 3
        if opening < 0 or int(input_ids[opening]) != ids["im_start"] or int(input_ids[opening + 1]) != ids["assistant"]:
            raise SpeechTargetError(
                "a spoken assistant turn must open with '<|im_start|>assistant\\n' (3 tokens) right before its text, "
                "as HF's generate assumes; this tokenizer renders it differently"
            )
        if end - first < 2:
            raise SpeechTargetError("a spoken assistant turn has no text: the talker speaks the turn's text")
        turn_codes, speaker = target
        codes.append(turn_codes)
        frames[opening], speakers[opening] = turn_codes.shape[1], speaker
    if not codes:
        return {}
    return {
        "talker_codes": torch.cat(codes, dim=1),
        "talker_frames": frames,
        "talker_speakers": speakers,
        **speech_labels(codes, ids["codec_eos"]),
    }


def speech_labels(codes: list[torch.Tensor], codec_eos: int) -> dict:
    """`talker_labels` and `code_predictor_labels` of spoken turns with these (groups, frames) codes."""
    talker = [torch.cat((turn[0], turn.new_tensor([codec_eos]))) for turn in codes]
    predictor = [turn[1:].T.reshape(-1) for turn in codes]
    return {"talker_labels": torch.cat(talker), "code_predictor_labels": torch.cat(predictor)}
