"""The synthetic dataset: deterministic, balanced small answer sets, answers that really are in the
media (so it is learnable), files and arrays interchangeable."""

import numpy as np
import pytest
import torch

from veomni_omni.data import synthetic
from veomni_omni.data.media import load_audio, load_image, load_video
from veomni_omni.data.processor import build_tiny_processor
from veomni_omni.data.samples import encode_sample
from veomni_omni.tiny import tiny_thinker_config


def _arrays(sample):
    """Every array in a sample, in order (media items of the user turn)."""
    out = []
    for part in sample["messages"][-2]["content"]:
        for key in ("image", "audio", "video"):
            if isinstance(part.get(key), np.ndarray):
                out.append(part[key])
        if "audio" in part and part.get("type") == "video":
            out.append(part["audio"])
    return out


def test_deterministic_and_splits_differ():
    a = synthetic.generate(16, seed=3)
    b = synthetic.generate(16, seed=3)
    for x, y in zip(a, b):
        assert x["answer"] == y["answer"] and x["messages"][-2]["content"][-1] == y["messages"][-2]["content"][-1]
        assert all(np.array_equal(p, q) for p, q in zip(_arrays(x), _arrays(y)))
    # sample i does not depend on how many were generated
    assert np.array_equal(_arrays(synthetic.generate(3, seed=3)[2])[0], _arrays(a[2])[0])
    ev = synthetic.generate(16, seed=3, split="eval")
    other = synthetic.generate(16, seed=4)
    for x, y, z in zip(a, ev, other):
        if _arrays(x):
            assert not np.array_equal(_arrays(x)[0], _arrays(y)[0]) and not np.array_equal(_arrays(x)[0], _arrays(z)[0])


def test_answer_classes_at_most_four_and_all_used():
    samples = synthetic.generate(400, seed=0)
    for task in synthetic.TASKS:
        answers = {s["answer"] for s in samples if s["task"] == task}
        assert len(synthetic.ANSWERS[task]) <= 4 and answers == set(synthetic.ANSWERS[task]), task
        assert all(s["messages"][-1]["content"][0]["text"] == s["answer"] for s in samples if s["task"] == task)


def _dominant_colour(pixels):
    bright = pixels.reshape(-1, 3)[pixels.reshape(-1, 3).max(1) > 120].mean(0)
    return min(synthetic.COLOURS, key=lambda c: np.abs(np.array(synthetic.COLOURS[c]) - bright).sum())


def _pitch(audio):
    spectrum = np.abs(np.fft.rfft(audio))
    hz = np.argmax(spectrum) * 16000 / len(audio)
    return min(synthetic.PITCHES, key=lambda p: abs(np.log(synthetic.PITCHES[p] / hz)))


def _direction(frames):
    def centre(frame):
        diff = np.abs(frame.astype(int) - np.median(frames, axis=0)).sum(-1) > 60
        ys, xs = np.nonzero(diff)
        return ys.mean(), xs.mean()

    (y0, x0), (y1, x1) = centre(frames[0]), centre(frames[-1])
    dy, dx = y1 - y0, x1 - x0
    return ("down" if dy > 0 else "up") if abs(dy) > abs(dx) else ("right" if dx > 0 else "left")


def _shape_fill(pixels, colour):
    """Share of the shape's bounding box it fills: circle ≈ 0.79, square 1, triangle 0.5, cross ≈ 0.6."""
    mask = np.abs(pixels.astype(int) - np.array(synthetic.COLOURS[colour])).sum(-1) < 100
    ys, xs = np.nonzero(mask)
    return mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))


def test_answers_are_in_the_media(tmp_path):
    """Oracles read the answer back from the media written to disk: the dataset is learnable."""
    samples = synthetic.generate(64, seed=1, media_dir=tmp_path)
    samples += synthetic.generate(32, seed=1, tasks=("image_shape",), media_dir=tmp_path / "shapes")
    fills = {shape: [] for shape in synthetic.SHAPES}
    for s in samples:
        part = s["messages"][-2]["content"][0]
        if s["task"] == "image_colour":
            assert _dominant_colour(np.asarray(load_image(part["image"]))) == s["answer"]
        elif s["task"] == "image_shape":
            pixels = np.asarray(load_image(part["image"]))
            fills[s["answer"]].append(_shape_fill(pixels, _dominant_colour(pixels)))
        elif s["task"] == "audio_pitch":
            audio = load_audio(part["audio"])
            assert _pitch(audio) == s["answer"] and 0.5 <= len(audio) / 16000 <= 1.0
        elif s["task"] in ("video_motion", "av_motion", "av_pitch"):
            video = load_video(part["video"], with_audio=True)
            assert video.frames.shape == (4, 64, 64, 3) and video.fps == 4.0
            assert (video.audio is not None) == s["use_audio_in_video"]
            if s["task"] == "av_pitch":
                assert _pitch(video.audio) == s["answer"] and len(video.audio) == 16000
            else:
                assert _direction(video.frames) == s["answer"]
        elif s["task"] == "text_arith":
            words = s["messages"][-2]["content"][0]["text"].split()
            a, b = synthetic.NUMBER_WORDS.index(words[2]), synthetic.NUMBER_WORDS.index(words[4])
            assert synthetic.NUMBER_WORDS[(a + b) % 4] == s["answer"]
    means = {shape: np.mean(v) for shape, v in fills.items()}
    assert means["square"] > 0.95 > means["circle"] > 0.72 > means["cross"] > 0.56 > means["triangle"], means


def test_files_arrays_and_jsonl_encode_identically(tmp_path):
    processor, config = build_tiny_processor(tmp_path / "proc"), tiny_thinker_config()
    files = synthetic.generate(len(synthetic.TASKS), seed=2, media_dir=tmp_path / "media")
    arrays = synthetic.generate(len(synthetic.TASKS), seed=2)
    synthetic.write_jsonl(files, tmp_path / "train.jsonl")
    with pytest.raises(TypeError, match="media_dir"):
        synthetic.write_jsonl(arrays, tmp_path / "x.jsonl")
    for f, a, j in zip(files, arrays, synthetic.read_jsonl(tmp_path / "train.jsonl")):
        outs = [encode_sample(s, processor, config) for s in (f, a, j)]
        for key, value in outs[0].items():
            for other in outs[1:]:
                assert (torch.equal(value, other[key]) if torch.is_tensor(value) else value == other[key]), (f["task"], key)
        # tiny media, as promised: ≤ 13 audio tokens, 4 image / 8 video tokens
        assert int(outs[0]["audio_mask"].sum()) <= 13 and int(outs[0]["image_mask"].sum()) in (0, 4)
        assert int(outs[0]["video_mask"].sum()) in (0, 8) and len(outs[0]["input_ids"]) < 64


def test_image_position_is_a_new_task_the_shape_sits_that_way():
    """`image_position` (the LoRA demo's task) is not among the main job's tasks nor in the tokenizer's corpus,
    and its shape sits off the centre in the answered direction."""
    assert "image_position" not in synthetic.TASKS
    assert synthetic.QUESTIONS["image_position"] not in synthetic.corpus()
    for index in range(16):
        sample = synthetic.generate_sample(index, "image_position")
        pixels = np.asarray(sample["messages"][0]["content"][0]["image"]).max(-1)
        ys, xs = np.nonzero(pixels > 150)  # the shape (a channel at 180+), not the dark noisy background (below ~100)
        dy, dx = synthetic.DIRECTIONS[sample["answer"]]
        offset = np.array([ys.mean(), xs.mean()]) - synthetic.IMAGE_SIZE / 2
        assert offset @ np.array([dy, dx]) > synthetic.IMAGE_SIZE / 8, (sample["answer"], offset)
