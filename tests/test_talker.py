"""Talker training (speech output): data checks, and the training forward's logits against HF's own
`generate()` forced along the same text and codes (the reference runs with the patch set undone)."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

import veomni_omni
from veomni_omni.data.samples import SampleTooLong, encode_sample
from veomni_omni.data.sequence_parallel import pack_rows
from veomni_omni.data.speech import SpeechTargetError, batch_speech_targets
from veomni_omni.testing import TINY_CODEBOOK, TINY_CODEC, TOKENS, concat_batches, tiny_omni_config

LOGITS_RTOL = 1e-4
GROUPS = 4


@pytest.fixture(scope="module")
def omni_config():
    return tiny_omni_config()


@pytest.fixture(scope="module")
def omni_model(omni_config):
    torch.manual_seed(0)
    return Qwen3OmniMoeForConditionalGeneration(omni_config).eval()


def _rng(seed):
    return np.random.default_rng(seed)


def _codes(seed, frames):
    return _rng(seed).integers(0, TINY_CODEBOOK, (GROUPS, frames))


def _speech(seed, frames, speaker="ethan"):
    return {"codes": _codes(seed, frames), "speaker": speaker}


def _image(seed):
    return _rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _tone(seed, seconds=1.0):
    return (0.3 * _rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _video(seed):
    return _rng(seed).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)


def _samples():
    """Image + audio + text in the user turn; a history turn before a spoken one (audio in the second
    user turn); a video; answers longer and shorter than their speech."""
    return [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "image": _image(1)}, {"type": "audio", "audio": _tone(2)},
                                         {"type": "text", "text": "what do you see and hear?"}]},
            {"role": "assistant", "content": "a red circle and a low tone", "speech": _speech(3, 5, "chelsie")},
        ],
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "audio", "audio": _tone(4, 0.6)}, {"type": "text", "text": "pitch?"}]},
            {"role": "assistant", "content": "high", "speech": _speech(5, 7)},
        ],
        [
            {"role": "user", "content": [{"type": "video", "video": _video(6)}, {"type": "text", "text": "which way?"}]},
            {"role": "assistant", "content": "left to right", "speech": _speech(7, 3, "aiden")},
        ],
    ]


class ForceTokens(LogitsProcessor):
    """Greedy generation pinned to `tokens`, one per call (HF's raw logits are left as computed)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[self.step]] = 0.0
        self.step += 1
        return forced


def _generate_forced(model, encoded: dict, turn: torch.Tensor, codes: torch.Tensor, speaker_name: str):
    """HF's generate(return_audio=True) on the prompt before `turn`, forced along the turn's text and
    codes: the talker's raw codebook-0 logits (frames + 1, V) and the code predictor's (frames, groups - 1, V)."""
    opening, frames, _ = turn.tolist()
    ids = encoded["input_ids"]
    end = opening + 3 + int((ids[opening + 3 :] == TOKENS["im_end"]).nonzero()[0])
    prompt = ids[: opening + 3][None]
    answer = ids[opening + 3 : end + 1].tolist()
    media = {key: encoded[key] for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                           "video_second_per_grid", "input_features", "feature_attention_mask") if key in encoded}
    talker_runs, predictor_logits = [], []
    talker_generate, predictor_generate = model.talker.generate, model.talker.code_predictor.generate

    def talker_spy(*args, **kwargs):
        talker_runs.append(talker_generate(*args, **kwargs))
        return talker_runs[-1]

    def predictor_spy(*args, **kwargs):
        frame = len(predictor_logits)
        kwargs.update(logits_processor=LogitsProcessorList([ForceTokens(codes[1:, frame].tolist())]), output_logits=True)
        result = predictor_generate(*args, **kwargs)
        predictor_logits.append(torch.cat(result.logits))
        return result

    model.talker.generate, model.talker.code_predictor.generate = talker_spy, predictor_spy
    # HF 5.22's talker rope index reads talker_config.audio_config, which the talker config lacks: its
    # generate fails on a prompt with audio and an image or video. Lend it the thinker's audio settings.
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    try:
        sequences, wav = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            speaker=speaker_name,
            return_audio=True,
            thinker_max_new_tokens=len(answer),
            thinker_eos_token_id=TOKENS["im_end"],
            thinker_do_sample=False,
            thinker_logits_processor=LogitsProcessorList([ForceTokens(answer)]),
            talker_max_new_tokens=frames + 1,
            talker_do_sample=False,
            talker_output_logits=True,
            talker_logits_processor=LogitsProcessorList([ForceTokens(codes[0].tolist() + [TINY_CODEC["eos"]])]),
            **media,
        )
    finally:
        del model.talker.generate, model.talker.code_predictor.generate, model.talker.config.audio_config
    assert sequences[0, prompt.shape[1] :].tolist() == answer
    assert wav.numel() > 0  # code2wav rendered the forced codes
    return torch.cat(talker_runs[0].logits), torch.stack(predictor_logits)


def _relative(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_training_logits_equal_hf_generate_forced_along_the_same_codes(processor, omni_config, omni_model, layout):
    encoded = [encode_sample({"messages": s}, processor, omni_config) for s in _samples()]
    batch = concat_batches([{k: (v[None] if k in ("input_ids", "attention_mask", "labels") else v) for k, v in e.items()
                            if k not in ("talker_codes", "talker_turns", "position_ids")} for e in encoded])
    batch["position_ids"] = torch.nn.utils.rnn.pad_sequence([e["position_ids"].T for e in encoded], batch_first=True).permute(2, 0, 1)
    if layout == "packed":
        batch = pack_rows(batch)
        starts = np.cumsum([0] + [len(e["input_ids"]) for e in encoded[:-1]]).tolist()
        placements = [(0, start) for start in starts]
    else:
        placements = [(row, 0) for row in range(len(encoded))]
    batch.update(batch_speech_targets(encoded, placements))
    batch.pop("use_audio_in_video", None)
    batch.pop("labels")

    with torch.no_grad():
        out = omni_model(**batch)
    assert torch.isfinite(out.loss) and out.thinker_loss is None

    names = {v: k for k, v in TINY_CODEC["speakers"].items()}
    turn_index = 0
    with veomni_omni.unpatched():
        for sample in encoded:
            first = 0
            for turn in sample["talker_turns"]:
                frames = int(turn[1])
                codes = sample["talker_codes"][:, first : first + frames]
                first += frames
                talker_ref, predictor_ref = _generate_forced(omni_model, sample, turn, codes, names[int(turn[2])])
                talker_got, predictor_got = out.talker_logits[turn_index], out.code_predictor_logits[turn_index]
                assert talker_got.shape == talker_ref.shape == (frames + 1, TINY_CODEC["vocab"])
                assert predictor_got.shape == predictor_ref.shape == (frames, GROUPS - 1, TINY_CODEBOOK)
                assert _relative(talker_got, talker_ref) < LOGITS_RTOL, (layout, turn_index, _relative(talker_got, talker_ref))
                assert _relative(predictor_got, predictor_ref) < LOGITS_RTOL, (layout, turn_index, _relative(predictor_got, predictor_ref))
                turn_index += 1
    assert turn_index == len(out.talker_logits) == 3
