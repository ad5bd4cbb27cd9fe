"""The tiny Qwen3-Omni processor: tokenizer layout, save/load round trip, torchvision-free video
processor against HF's image processor (and HF's video processor where torchvision exists)."""

import numpy as np
import pytest
import torch

from veomni_omni.data import processor as tiny
from veomni_omni.data.video_processor import Qwen2VLVideoProcessorPil, sample_frame_indices
from veomni_omni.tiny import FIRST_SPECIAL, TINY_VOCAB, TOKENS

VISION = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_processor")
    return tiny.build_tiny_processor(path), path


def _media(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    video = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, 12000).astype(np.float32)
    return image, video, audio


def _call(processor, text, image, video, audio):
    return processor(
        text=[text], images=[image], videos=[video], audio=[audio], return_tensors="pt",
        videos_kwargs={"size": dict(processor.video_processor.size)},
    )


def test_tokenizer_layout_matches_testing_tokens():
    tok = tiny.build_tiny_tokenizer()
    assert len(tok) == TINY_VOCAB == tiny.VOCAB_SIZE
    names = dict(
        pad=tok.pad_token, im_start="<|im_start|>", im_end="<|im_end|>", vision_start=tok.vision_bos_token,
        vision_end=tok.vision_eos_token, audio_start=tok.audio_bos_token, audio_end=tok.audio_eos_token,
        image=tok.image_token, video=tok.video_token, audio=tok.audio_token, system="system", user="user",
        assistant="assistant", tts_pad="<tts_pad>", tts_bos="<tts_text_bos>", tts_eos="<tts_text_eod>",
    )
    assert {k: tok.convert_tokens_to_ids(v) for k, v in names.items()} == TOKENS
    # a chat role is one token, as in Qwen's vocabulary (HF's talker input reads it after <|im_start|>)
    assert tok("<|im_start|>assistant\n")["input_ids"][:2] == [TOKENS["im_start"], TOKENS["assistant"]]
    # plain text never produces a special id; specials are atomic; decoding is lossless
    text = "What shape is in the image? The quick brown fox, 42 times!\n"
    ids = tok(text)["input_ids"]
    assert max(ids) < FIRST_SPECIAL and tok.decode(ids) == text
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>red")["input_ids"]
    assert ids[:3] == [TOKENS["vision_start"], TOKENS["image"], TOKENS["vision_end"]]
    # the synthetic vocabulary is compact: answers are single tokens
    assert all(len(tok(w)["input_ids"]) == 1 for w in ("circle", "red", "soprano", "left", "three", "duck"))
    assert tiny.build_tiny_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


def test_round_trip_through_save_and_load(saved):
    from transformers import AutoProcessor
    from veomni.models import build_processor

    import veomni_omni  # noqa: F401  (VeOmni's registry points at HF's Qwen3OmniMoeProcessor)

    original, path = saved
    messages = [
        {"role": "user", "content": [{"type": "image", "image": "x"}, {"type": "video", "video": "y"},
                                     {"type": "audio", "audio": "z"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = original.apply_chat_template(messages, tokenize=False)
    reference = _call(original, text, *_media())
    for loaded in (tiny.load_processor(path), AutoProcessor.from_pretrained(path), build_processor(str(path))):
        assert type(loaded).__name__ == "Qwen3OmniMoeProcessor"
        assert isinstance(loaded.video_processor, Qwen2VLVideoProcessorPil)
        assert loaded.tokenizer.get_vocab() == original.tokenizer.get_vocab()
        assert loaded.apply_chat_template(messages, tokenize=False) == text
        got = _call(loaded, text, *_media())
        assert sorted(got.keys()) == sorted(reference.keys())
        for key in reference:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(reference[key])), key
    ids = reference["input_ids"][0]
    assert int((ids == TOKENS["image"]).sum()) == int(reference["image_grid_thw"].prod()) // 4
    assert int((ids == TOKENS["video"]).sum()) == int(reference["video_grid_thw"].prod()) // 4
    assert reference["video_grid_thw"].tolist() == [[2, 4, 4]] and reference["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_loading_needs_the_registration_hook_without_torchvision(saved):
    """Documents the transformers gap the patch set's video-processor entries close (fails if transformers fixes it)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    from veomni_omni import patching
    from veomni_omni.patchset import VIDEO_PROCESSOR

    if is_torchvision_available():
        pytest.skip("the gap only exists without torchvision")
    _, path = saved
    with patching.suspended(VIDEO_PROCESSOR):
        with pytest.raises((ImportError, AttributeError, ValueError)):
            AutoProcessor.from_pretrained(path)
    assert isinstance(AutoProcessor.from_pretrained(path).video_processor, Qwen2VLVideoProcessorPil)


def test_chat_template_renders_qwen_chatml(saved):
    processor, _ = saved
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": "a"}, {"type": "text", "text": "Pitch?"}]},
    ]
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Pitch?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _per_frame_reference(frames, **settings):
    """What HF's PIL image processor does to each frame alone, regrouped into temporal pairs:
    image rows are (C, T, P, P) with T copies of the frame; a video row takes T=0 from the first
    frame of its pair and T=1 from the second."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(**settings)
    if len(frames) % 2:
        frames = list(frames) + [frames[-1]]
    rows, grid = [], None
    for first, second in zip(frames[0::2], frames[1::2]):
        a = image_processor(images=[first], return_tensors="np")
        b = image_processor(images=[second], return_tensors="np")
        grid = a["image_grid_thw"][0]
        pa = a["pixel_values"].reshape(len(a["pixel_values"]), 3, 2, 16, 16)
        pb = b["pixel_values"].reshape(len(b["pixel_values"]), 3, 2, 16, 16)
        rows.append(np.stack([pa[:, :, 0], pb[:, :, 1]], axis=2).reshape(len(pa), -1))
    return np.concatenate(rows), [len(rows), int(grid[1]), int(grid[2])]


@pytest.mark.parametrize(
    "frames_shape, pixels",
    [((4, 64, 96, 3), (32 * 32, 128 * 128)),  # no resize
     ((3, 50, 70, 3), (32 * 32, 128 * 128)),  # odd frame count, resized up to 64x64
     ((2, 200, 120, 3), (32 * 32, 96 * 96))],  # resized down
)
def test_video_processor_equals_hf_image_processor_per_frame(frames_shape, pixels):
    frames = np.random.default_rng(1).integers(0, 256, frames_shape, dtype=np.uint8)
    settings = dict(min_pixels=pixels[0], max_pixels=pixels[1], **VISION)
    out = Qwen2VLVideoProcessorPil(**settings)(videos=[frames, frames[:2]], return_tensors="np")
    expected, grid = _per_frame_reference(list(frames), **settings)
    expected_short, grid_short = _per_frame_reference(list(frames[:2]), **settings)
    assert out["video_grid_thw"].tolist() == [grid, grid_short]
    np.testing.assert_array_equal(out["pixel_values_videos"], np.concatenate([expected, expected_short]))
    assert out["pixel_values_videos"].dtype == np.float32


def test_video_processor_rejects_float_frames_and_counts_patches():
    processor = Qwen2VLVideoProcessorPil(min_pixels=32 * 32, max_pixels=128 * 128, **VISION)
    with pytest.raises(ValueError, match="uint8"):
        processor(videos=[np.zeros((2, 64, 64, 3), np.float32)])
    assert processor.get_num_of_video_patches(5, 64, 96, {}) == 3 * 4 * 6
    assert sample_frame_indices(10, 2, num_frames=4).tolist() == [0, 2, 5, 7]
    assert sample_frame_indices(8, 2, fps=2, video_fps=4, min_frames=2).tolist() == [0, 2, 4, 6]


def test_video_processor_equals_hf_video_processor_when_torchvision_exists():
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("torchvision is not importable here; HF's Qwen2VLVideoProcessor cannot run")
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.random.default_rng(2).integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    settings = dict(min_pixels=32 * 32, max_pixels=128 * 128, **VISION)
    ours = Qwen2VLVideoProcessorPil(**settings)(videos=[frames], return_tensors="pt")
    theirs = Qwen2VLVideoProcessor(**settings)(videos=[frames], return_tensors="pt", cap_pixels_per_frame=False)
    assert torch.equal(ours["video_grid_thw"], theirs["video_grid_thw"])
    # torchvision fuses rescale+normalise in float32: equal up to round-off (no resize here)
    torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"], rtol=0, atol=1e-6)
