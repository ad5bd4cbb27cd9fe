"""Held-out speech of a trained talker, judged by transformers' own `generate(return_audio=True)`.

The exported checkpoint is loaded by plain transformers (the patch set undone), and each held-out prompt
(the sample up to its spoken turn's "<|im_start|>assistant\\n") goes through HF's generate, greedy for the
thinker, the talker and the code predictor. A sample counts as spoken right when the codes code2wav
receives are exactly the turn's target codes (every group of every frame, and the end of speech where the
target ends); its answer counts as right when the thinker's text is the reference. Per modality, the first
sample's audio as code2wav rendered it is written as a WAV.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.media import save_wav
from .data.processor import load_processor
from .data.samples import encode_sample
from .train_data import sample_modality

# The released codec's frame rate (12.5 Hz: code2wav turns a frame into 1920 samples of 24 kHz audio); a WAV of
# another code2wav is written at the rate that keeps this frame rate.
FRAME_RATE_HZ = 12.5
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid",
              "input_features", "feature_attention_mask")


def _spoken_prompt(sample: dict, processor, config) -> dict:
    """The generate inputs of a sample's last spoken turn, its target codes, answer ids and speaker."""
    encoded = encode_sample(sample, processor, config)
    if "talker_frames" not in encoded:
        raise ValueError(f"sample {sample.get('id', '?')} has no spoken turn to evaluate")
    opening = int(encoded["talker_frames"].nonzero()[-1])
    frames = int(encoded["talker_frames"][opening])
    ids = encoded["input_ids"]
    end = opening + 3 + int((ids[opening + 3 :] == config.im_end_token_id).nonzero()[0])
    speaker = next(m["speech"]["speaker"] for m in reversed(sample["messages"]) if m.get("speech"))
    return {
        "prompt": ids[: opening + 3][None],
        "media": {key: encoded[key] for key in MEDIA_KEYS if key in encoded},
        "codes": encoded["talker_codes"][:, -frames:],
        "answer": ids[opening + 3 : end + 1].tolist(),
        "speaker": speaker,
    }


@torch.no_grad()
def _speak(model, spoken: dict, max_frames: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """HF's generate, greedy: the thinker's answer ids, the codes code2wav decoded (groups, frames), the audio."""
    decode, received = model.code2wav.chunked_decode, []

    def recording_decode(codes, *args, **kwargs):
        received.append(codes[0].clone())
        return decode(codes, *args, **kwargs)

    model.code2wav.chunked_decode = recording_decode
    try:
        prompt = spoken["prompt"]
        sequences, wav = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), speaker=spoken["speaker"], return_audio=True,
            thinker_max_new_tokens=len(spoken["answer"]) + 4, thinker_eos_token_id=model.config.im_end_token_id, thinker_do_sample=False,
            talker_max_new_tokens=max_frames + 1, talker_do_sample=False, talker_repetition_penalty=1.0, **spoken["media"],
        )
    finally:
        del model.code2wav.chunked_decode
    return sequences[0, prompt.shape[1] :].tolist(), received[0], wav.reshape(-1)


def evaluate_speech(checkpoint: Path, samples: list[dict], out_dir: Path, per_modality: int) -> dict:
    """Spoken-right and answer-right fractions per modality over the first `per_modality` spoken samples
    of each, and one WAV per modality (`<out_dir>/speech_<modality>.wav`)."""
    from transformers.utils import logging as hf_logging

    processor = load_processor(checkpoint)
    picked: dict[str, list] = {}
    for sample in samples:
        if any(m.get("speech") for m in sample["messages"]) and len(picked.setdefault(sample_modality(sample), [])) < per_modality:
            picked[sample_modality(sample)].append(sample)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # generate's per-call notes on the greedy settings
    try:
        return _speak_held_out(picked, checkpoint, processor, out_dir)
    finally:
        hf_logging.set_verbosity(verbosity)


def _speak_held_out(picked: dict, checkpoint: Path, processor, out_dir: Path) -> dict:
    import veomni_omni
    from transformers import Qwen3OmniMoeForConditionalGeneration

    results: dict = {}
    with veomni_omni.unpatched():
        model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        model.talker.code_predictor.generation_config.do_sample = False
        codec = model.config.code2wav_config
        rate = int(FRAME_RATE_HZ * np.prod(codec.upsample_rates) * np.prod(codec.upsampling_ratios))
        for modality, chosen in picked.items():
            spoken_right = answer_right = 0
            for index, sample in enumerate(chosen):
                spoken = _spoken_prompt(sample, processor, model.config)
                answer, codes, wav = _speak(model, spoken, max_frames=3 * spoken["codes"].shape[1])
                spoken_right += codes.shape == spoken["codes"].shape and torch.equal(codes, spoken["codes"])
                answer_right += answer == spoken["answer"]
                if index == 0:
                    save_wav(str(out_dir / f"speech_{modality}.wav"), wav.clamp(-1, 1).numpy(), rate)
            results[modality] = {"spoken": round(spoken_right / len(chosen), 4), "answer": round(answer_right / len(chosen), 4), "n": len(chosen)}
    return results
