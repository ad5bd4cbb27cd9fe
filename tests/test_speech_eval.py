"""The speech demo's pieces: spoken synthetic answers (each answer word its own code sequence) and the
held-out speech judged by transformers' own generate(return_audio=True) on an exported checkpoint."""

import numpy as np
import pytest

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.media import load_audio
from veomni_omni.data.processor import load_processor
from veomni_omni.speech_eval import _spoken_prompt, evaluate_speech
from veomni_omni.testing import save_tiny_release
from veomni_omni.tiny import TINY_CODEBOOK, tiny_omni_config

SPOKEN = synthetic.SpokenAnswers(groups=4, codebook=TINY_CODEBOOK)
SPOKEN_TASKS = ("image_shape", "audio_pitch", "video_motion", "text_arith")


def test_every_answer_word_has_its_own_code_sequence():
    words = sorted({word for task in synthetic.TASKS for word in synthetic.ANSWERS[task]})
    codes = {word: synthetic.answer_codes(word, SPOKEN.groups, SPOKEN.codebook) for word in words}
    assert len({c.tobytes() for c in codes.values()}) == len(words)
    assert all(c.shape[0] == 4 and 3 <= c.shape[1] <= 6 and 0 <= c.min() and c.max() < TINY_CODEBOOK for c in codes.values())
    again = synthetic.answer_codes(words[0], SPOKEN.groups, SPOKEN.codebook)
    assert np.array_equal(again, codes[words[0]]), "an answer's codes must not depend on anything but the word"


def test_spoken_samples_carry_their_answers_codes_and_av_tasks_refuse_speech():
    sample = synthetic.generate_sample(3, "image_colour", speech=SPOKEN)
    answer = sample["messages"][-1]
    assert answer["speech"] == {"codes": synthetic.answer_codes(sample["answer"], 4, TINY_CODEBOOK).tolist(), "speaker": "ethan"}
    assert "speech" not in synthetic.generate_sample(3, "image_colour")["messages"][-1]
    with pytest.raises(ValueError, match="cannot be spoken"):
        synthetic.generate_sample(0, "av_pitch", speech=SPOKEN)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny released-layout checkpoint (untrained talker) and spoken held-out samples with media files."""
    root = tmp_path_factory.mktemp("speech_eval")
    save_tiny_release(root / "ckpt")
    (root / "media").mkdir()
    samples = [synthetic.generate_sample(i, task, split="eval", media_dir=root / "media", speech=SPOKEN)
               for i, task in enumerate(SPOKEN_TASKS * 2)]
    return root, samples


def test_spoken_prompt_is_the_sample_up_to_its_spoken_turn(exported):
    root, samples = exported
    config = tiny_omni_config()
    processor = load_processor(root / "ckpt")
    spoken = _spoken_prompt(samples[0], processor, config)
    prompt = spoken["prompt"][0].tolist()
    assert prompt[-3:-1] == [config.im_start_token_id, config.assistant_token_id]
    assert processor.tokenizer.decode(spoken["answer"]) == samples[0]["answer"] + "<|im_end|>"
    assert spoken["codes"].tolist() == samples[0]["messages"][-1]["speech"]["codes"] and spoken["speaker"] == "ethan"
    assert set(spoken["media"]) == {"pixel_values", "image_grid_thw"}


def test_untrained_talker_speaks_no_held_out_answer_and_every_modality_gets_a_wav(exported, tmp_path):
    root, samples = exported
    results = evaluate_speech(root / "ckpt", samples, tmp_path, per_modality=1)
    assert sorted(results) == ["audio", "image", "text", "video"]
    assert all(r["n"] == 1 and r["spoken"] == 0.0 and 0.0 <= r["answer"] <= 1.0 for r in results.values())
    for modality in results:
        audio = load_audio(str(tmp_path / f"speech_{modality}.wav"))
        assert audio.size > 0 and np.isfinite(audio).all()
    assert veomni_omni.is_applied(), "the patch set must be back after the evaluation"
