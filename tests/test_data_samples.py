"""Chat sample → model inputs: labels from the chat structure, masks, HF rope positions
(including audio-in-video), truncation under a cap, and skipping bad media."""

import logging

import numpy as np
import pytest
import torch

from veomni_omni.data import synthetic
from veomni_omni.data.media import MediaError, save_video
from veomni_omni.data.samples import SampleTooLong, encode_or_skip, encode_sample, media_blocks
from veomni_omni.data.samples import batch_rope_positions
from veomni_omni.data.shaped_batches import audio_token_count, build_batch
from veomni_omni.tiny import TOKENS, tiny_thinker_config

IDS = TOKENS  # media_blocks wants the start/end/placeholder ids under these names
MEDIA_TOKENS = ("vision_start", "vision_end", "audio_start", "audio_end", "image", "video", "audio")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _image(seed=0, h=64, w=64):
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _video(seed=0, t=4):
    return _rng(seed).integers(0, 256, (t, 64, 64, 3), dtype=np.uint8)


def _tone(seconds, seed=0):
    return (0.3 * _rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _conversation():
    """Two assistant turns; user text full of role words, to show nothing is found by word search."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": _image()},
                                     {"type": "text", "text": "user assistant: is the assistant an assistant?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "audio", "audio": _tone(0.5)}, {"type": "text", "text": "assistant?"}]},
        {"role": "assistant", "content": "soprano"},
    ]


def test_labels_only_on_assistant_content_and_end_of_turn(processor, config):
    out = encode_sample({"messages": _conversation()}, processor, config)
    ids, labels = out["input_ids"], out["labels"]
    tok = processor.tokenizer
    trained = (labels != -100).nonzero().flatten().tolist()
    assert torch.equal(labels[trained], ids[trained])
    assert tok.decode(ids[trained]) == "red<|im_end|>soprano<|im_end|>"
    # each trained run starts right after "<|im_start|>assistant\n" and ends on <|im_end|>
    prompt = tok("<|im_start|>assistant\n")["input_ids"]
    runs = np.split(np.array(trained), np.where(np.diff(trained) != 1)[0] + 1)
    assert len(runs) == 2
    for run in runs:
        assert ids[run[0] - len(prompt) : run[0]].tolist() == prompt
        assert int(ids[run[-1]]) == TOKENS["im_end"]
        assert int(ids[run[-1] + 1]) == tok("\n")["input_ids"][0]  # the newline after <|im_end|> is not trained
    # nothing in the system or user turns is trained, though they contain the word "assistant"
    first_assistant = runs[0][0] - len(prompt)
    assert (labels[:first_assistant] == -100).all()
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].tolist() == [1] * len(ids)


def test_chat_template_that_is_not_prefix_stable_is_refused(processor, config):
    original = processor.chat_template
    processor.chat_template = original + "{{- '<|endoftext|>' -}}"  # footer after the last message
    try:
        with pytest.raises(ValueError, match="prefix-stable"):
            encode_sample({"messages": _conversation()}, processor, config)
    finally:
        processor.chat_template = original


def _check_masks_and_media(out):
    ids = out["input_ids"]
    for kind in ("image", "video", "audio"):
        assert torch.equal(out[f"{kind}_mask"], ids == TOKENS[kind]) and out[f"{kind}_mask"].dtype == torch.bool
        assert (out["labels"][out[f"{kind}_mask"]] == -100).all()
    n_img = int(out["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in out else 0
    n_vid = int(out["video_grid_thw"].prod(-1).sum()) if "video_grid_thw" in out else 0
    assert int(out["image_mask"].sum()) == n_img // 4 and out.get("pixel_values", torch.zeros(0, 1536)).shape == (n_img, 1536)
    assert int(out["video_mask"].sum()) == n_vid // 4
    assert out.get("pixel_values_videos", torch.zeros(0, 1536)).shape == (n_vid, 1536)
    if "input_features" in out:
        frames = out["feature_attention_mask"].sum(-1)
        assert out["input_features"].shape == (len(frames), 128, int(frames.max()))
        assert int(out["audio_mask"].sum()) == sum(audio_token_count(int(f)) for f in frames)
    else:
        assert int(out["audio_mask"].sum()) == 0
    blocks = media_blocks(ids.tolist(), IDS)  # raises on a split block
    kinds = [k for _, _, k in blocks]
    assert kinds.count("image") == (len(out["image_grid_thw"]) if n_img else 0)
    assert kinds.count("video") + kinds.count("audio_in_video") == (len(out["video_grid_thw"]) if n_vid else 0)
    clips = len(out["feature_attention_mask"]) if "input_features" in out else 0
    assert kinds.count("audio") + kinds.count("audio_in_video") == clips


def test_masks_match_placeholder_ids_for_every_synthetic_task(processor, config, tmp_path):
    samples = synthetic.generate(len(synthetic.TASKS), media_dir=tmp_path)
    for sample in samples:
        out = encode_sample(sample, processor, config)
        _check_masks_and_media(out)
        assert processor.tokenizer.decode(out["input_ids"][out["labels"] != -100]) == sample["answer"] + "<|im_end|>"
        assert out["use_audio_in_video"] == sample["task"].startswith("av_")


def _segments(out):
    """The testing.build_batch row with this sample's structure (text counts, grids, audio frames)."""
    ids = out["input_ids"].tolist()
    grids = iter(out.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    vgrids = iter(out.get("video_grid_thw", torch.zeros(0, 3)).tolist())
    frames = iter(out.get("feature_attention_mask", torch.zeros(0, 1)).sum(-1).tolist())
    row, pos = [], 0
    for start, end, kind in media_blocks(ids, IDS):
        if start > pos:
            row.append(("prompt", start - pos))
        if kind == "image":
            row.append(("image", *map(int, next(grids))))
        elif kind == "video":
            row.append(("video", *map(int, next(vgrids))))
        elif kind == "audio":
            row.append(("audio", int(next(frames))))
        else:
            row.append(("audio_in_video", *map(int, next(vgrids)), int(next(frames))))
        pos = end
    if pos < len(ids):
        row.append(("prompt", len(ids) - pos))
    return row


@pytest.mark.parametrize("use_audio_in_video", [False, True])
def test_position_ids_equal_hf_rope_index(processor, config, use_audio_in_video):
    # fps 2 → 1 s per temporal grid, the spacing testing.build_batch uses; 2 s soundtracks make the
    # audio/video interleaving non-trivial (V×4, A×25, V×4, A×1 at 25 positions per second)
    video = {"type": "video", "video": _video(1), "fps": 2.0}
    if use_audio_in_video:
        video["audio"] = _tone(2.0, seed=3)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": _image(2, 64, 96)},
                                     video, {"type": "audio", "audio": _tone(1.37, seed=4)},
                                     {"type": "text", "text": "Which way?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "left"}]},
    ]
    out = encode_sample({"messages": messages, "use_audio_in_video": use_audio_in_video}, processor, config)
    _check_masks_and_media(out)
    positions = out["position_ids"]
    assert positions.shape == (3, len(out["input_ids"]))

    # 1. HF's get_rope_index on exactly these ids (through testing's independent wrapper)
    batch = {k: v for k, v in out.items() if k not in ("labels", "position_ids") and not k.endswith("_mask")}
    batch.update(input_ids=out["input_ids"][None], attention_mask=out["attention_mask"][None])
    batch["feature_attention_mask"] = out["feature_attention_mask"]
    torch.testing.assert_close(batch_rope_positions(config, batch)[:, 0], positions, rtol=0, atol=0)

    # 2. an independently built sequence of the same structure (testing.build_batch interleaves
    #    audio-in-video itself) has the same media token layout and the same positions
    reference = build_batch([_segments(out)], config, with_position_ids=True)
    for name in MEDIA_TOKENS:
        assert torch.equal(reference["input_ids"][0] == TOKENS[name], out["input_ids"] == TOKENS[name]), name
    torch.testing.assert_close(reference["position_ids"][:, 0], positions, rtol=0, atol=0)

    # 3. audio tokens inside an audio-in-video block count up by one on all three axes
    if use_audio_in_video:
        start, end, kind = [b for b in media_blocks(out["input_ids"].tolist(), IDS) if b[2] == "audio_in_video"][0]
        inside = torch.arange(start, end)
        audio_pos = positions[:, inside[out["audio_mask"][inside]]]
        assert (audio_pos[0] == audio_pos[1]).all() and (audio_pos[1] == audio_pos[2]).all()
        assert (audio_pos[0].diff() == 1).all() and len(audio_pos[0]) == audio_token_count(200)
        order = out["input_ids"][start + 2 : end - 2]
        assert order.tolist() == [TOKENS["video"]] * 4 + [TOKENS["audio"]] * 25 + [TOKENS["video"]] * 4 + [TOKENS["audio"]]


def _long_sample():
    messages = _conversation()
    messages.insert(3, {"role": "user", "content": [
        {"type": "video", "video": _video(5), "fps": 2.0, "audio": _tone(2.0, 6)}, {"type": "text", "text": "and?"}]})
    messages.insert(4, {"role": "assistant", "content": "up"})
    return {"messages": messages, "use_audio_in_video": True, "id": "long"}


def test_truncation_never_exceeds_the_cap_nor_splits_media(processor, config):
    sample = _long_sample()
    full = encode_sample(sample, processor, config)
    n = len(full["input_ids"])
    assert encode_sample(sample, processor, config, max_tokens=n)["input_ids"].shape == (n,)
    for cap in (1, n // 2, n - 1):
        with pytest.raises(SampleTooLong):
            encode_sample(sample, processor, config, max_tokens=cap, overflow="drop")
    # caps on and around every media block edge, plus a stride through the rest
    edges = {e + d for s, t, _ in media_blocks(full["input_ids"].tolist(), IDS) for e in (s, t) for d in (-1, 0, 1)}
    caps = sorted(c for c in edges | set(range(1, n + 3, 9)) if c >= 1)
    kept_lengths = set()
    for cap in caps:
        try:
            out = encode_sample(sample, processor, config, max_tokens=cap, overflow="truncate")
        except SampleTooLong:
            continue  # nothing trainable before the cap
        length = len(out["input_ids"])
        kept_lengths.add(length)
        assert length <= cap
        _check_masks_and_media(out)
        assert (out["labels"] != -100).any()
        for key in ("input_ids", "labels", "image_mask", "video_mask", "audio_mask"):
            assert torch.equal(out[key], full[key][:length]), key
        torch.testing.assert_close(out["position_ids"], full["position_ids"][:, :length], rtol=0, atol=0)
        assert out["use_audio_in_video"] == ("video_grid_thw" in out)
    assert len(kept_lengths) > 3  # some caps kept the first turns only, some cut before a media block


def test_bad_media_is_skipped_with_a_warning(processor, config, tmp_path, caplog):
    silent = tmp_path / "silent.mkv"
    save_video(silent, _video(), 2.0)
    bad = [
        ({"type": "image", "image": str(tmp_path / "missing.png")}, False, "file not found"),
        ({"type": "video", "video": str(silent)}, True, "no audio track"),
        ({"type": "audio", "audio": np.zeros(100, np.float32)}, False, "too short"),
    ]
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    bad.append(({"type": "audio", "audio": "junk.wav"}, False, "cannot decode WAV"))  # relative to media_root
    for part, aiv, reason in bad:
        sample = {"id": "bad-1", "use_audio_in_video": aiv, "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": "red"}]}
        with pytest.raises(MediaError, match=reason):
            encode_sample(sample, processor, config, media_root=str(tmp_path))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="veomni_omni.data.samples"):
            assert encode_or_skip(sample, processor, config, media_root=str(tmp_path)) is None
        assert "bad-1" in caplog.text and reason in caplog.text
    long_sample = _long_sample()
    assert encode_or_skip(long_sample, processor, config, max_tokens=8) is None
    assert "SampleTooLong" in caplog.text


def test_token_ids_must_match_the_config(processor):
    wrong = tiny_thinker_config()
    wrong.image_token_id = TOKENS["video"]
    with pytest.raises(ValueError, match="image token id"):
        encode_sample({"messages": _conversation()}, processor, wrong)


def test_encoded_samples_run_through_the_tiny_thinker(processor, config, tiny_thinker):
    """Inputs are shaped as the model wants them, and our positions are the ones the model would
    compute itself from the same ids (HF's forward calls get_rope_index when none are given)."""
    model, _ = tiny_thinker
    for sample in synthetic.generate(len(synthetic.TASKS), seed=5):
        out = encode_sample(sample, processor, config)
        batch = {k: v for k, v in out.items() if not k.endswith("_mask") and k != "position_ids"}
        batch.update(input_ids=out["input_ids"][None], attention_mask=out["attention_mask"][None], labels=out["labels"][None])
        if "feature_attention_mask" in out:
            batch["feature_attention_mask"] = out["feature_attention_mask"]
        with torch.no_grad():
            own = model(**batch)
            ours = model(**batch, position_ids=out["position_ids"][:, None])
        assert torch.isfinite(own.loss)
        torch.testing.assert_close(ours.logits, own.logits, rtol=0, atol=0)
