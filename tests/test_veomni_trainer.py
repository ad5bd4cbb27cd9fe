"""The VeOmni user's path: `import veomni_omni`, then VeOmni's own `tasks/train_vlm.py`, YAML and datasets.

- the hooks VLMTrainer and its data pipeline call on the model (position ids, audio collate rules,
  `thinker.visual` / `thinker.audio_tower`), on the patched HF classes;
- veomni_omni's data transform, registered where VeOmni looks it up, on VeOmni's documented sample
  formats, through VeOmni's own dataset builders (JSON, JSONL, parquet, multisource mixing) and
  DataLoader workers; what it refuses and what it skips;
- end to end: VeOmni's `tasks/train_vlm.py` (its text plus `import veomni_omni`) under torchrun on 2
  CPU ranks, FSDP2 x EP 2, from a released-layout checkpoint, VeOmni-format data; the exported
  checkpoint loads in plain transformers with the released keys.
"""

import io
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.media import save_video, save_wav
from veomni_omni.data.veomni_transform import QWEN_OMNI_SYSTEM_PROMPT, SkipCounter, transform_sample
from veomni_omni.launch import run_ranks
from veomni_omni.train import TinyModel, write_tiny_model

ROOT = Path(__file__).resolve().parent.parent
TRAIN_VLM = str(ROOT / "tasks" / "train_vlm.py")
EAGER_OPS = {
    name: "eager"
    for name in (
        "moe_implementation", "cross_entropy_loss_implementation", "rms_norm_implementation", "swiglu_mlp_implementation",
        "rotary_pos_emb_implementation", "load_balancing_loss_implementation", "rms_norm_gated_implementation",
        "causal_conv1d_implementation", "chunk_gated_delta_rule_implementation",
    )
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A tiny Qwen3-Omni-MoE (thinker, talker, code2wav) saved by plain transformers, processor included."""
    path = tmp_path_factory.mktemp("release") / "model"
    write_tiny_model(TinyModel(), path, seed=0)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(synthetic.make_image(rng, "circle", "red")).save(root / "shape.png")
    save_wav(root / "tone.wav", synthetic.make_tone(rng, "alto", 1.0))
    frames = synthetic.make_video(rng, "left")
    save_video(root / "clip.mkv", frames, synthetic.VIDEO_FPS, synthetic.make_tone(rng, "bass", 1.0))
    (root / "broken.png").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def model(release):
    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(release)


@pytest.fixture(scope="module")
def processor(release):
    from veomni.models import build_processor

    return build_processor(str(release))


def _transform(model, processor, **mm_configs):
    from veomni.data.data_transform import build_data_transform

    return build_data_transform("qwen3_omni_moe", processor=processor, chat_template=None,
                                position_id_func=model.get_position_id_func(), **mm_configs)


# ------------------------------------------------------------------------------------ model hooks
def test_vlm_trainer_hooks_exist_on_the_patched_classes_only(model):
    thinker = model.thinker
    assert thinker.visual is thinker.model.visual and thinker.audio_tower is thinker.model.audio_tower
    infos = model.get_extra_collate_infos()
    assert infos["input_features"][0] == 0 and infos["audio_feature_lengths"][0] == 0
    with veomni_omni.unpatched():
        assert not hasattr(thinker, "visual") and not hasattr(model, "get_position_id_func")


def test_position_id_function_is_hfs_rope_index(model, processor, media):
    sample = {"images": [str(media / "shape.png")], "audios": [str(media / "tone.wav")],
              "conversations": [{"from": "human", "value": "<image>\nand <audio> what?"}, {"from": "gpt", "value": "a circle"}]}
    out = _transform(model, processor)(sample)[0]
    with veomni_omni.unpatched():  # HF's own method on the real model
        reference, _ = model.thinker.get_rope_index(
            out["input_ids"][None], out["image_grid_thw"], None, torch.ones_like(out["input_ids"])[None],
            False, out["audio_feature_lengths"], None,
        )
    torch.testing.assert_close(out["position_ids"], reference[:, 0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ data transform
def test_the_registered_transform_is_veomni_omnis_and_undo_restores_veomnis():
    from veomni.data.data_transform import DATA_TRANSFORM_REGISTRY

    assert DATA_TRANSFORM_REGISTRY["qwen3_omni_moe"] is transform_sample
    with veomni_omni.unpatched():
        assert DATA_TRANSFORM_REGISTRY["qwen3_omni_moe"] is not transform_sample


def test_veomni_conversations_become_the_same_inputs_as_hf_chat(model, processor, media):
    """VeOmni's sharegpt format (with its own per-source preprocessor) and HF's chat format of the same
    conversation give identical inputs; labels cover the assistant turn only."""
    transform = _transform(model, processor)
    conversations = {"images": [str(media / "shape.png")],
                     "conversations": [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]}
    messages = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": QWEN_OMNI_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "image", "image": str(media / "shape.png")}, {"type": "text", "text": "\nWhat shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "circle"}]},
    ]}
    a = transform(conversations, source_name=None)[0]
    b = transform(messages)[0]
    assert a.keys() == b.keys() == {"input_ids", "attention_mask", "labels", "position_ids", "pixel_values", "image_grid_thw"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    trained = processor.tokenizer.decode(a["input_ids"][a["labels"] != -100])
    assert trained == "circle<|im_end|>"
    # VeOmni's sharegpt4v_sft preprocessor (strips the marker, puts the image first) gives the same here.
    c = transform(conversations, source_name="sharegpt4v_sft")[0]
    torch.testing.assert_close(c["pixel_values"], a["pixel_values"])


def test_offline_audio_video_dicts_interleave_their_audio(model, processor, media):
    rng = np.random.default_rng(1)
    frames = []
    for frame in synthetic.make_video(rng, "up"):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((synthetic.make_tone(rng, "tenor", 1.0) * 20000).astype(np.int16).tobytes())
    sample = {"videos": [{"frames": frames, "audio": buffer.getvalue(), "video_fps": 4.0}],
              "conversations": [{"from": "human", "value": "<video>\nWhat do you hear?"}, {"from": "gpt", "value": "tenor"}]}
    out = _transform(model, processor)(sample, source_name="qwen_omni_offline_av")[0]
    config = model.config.thinker_config
    ids = out["input_ids"]
    assert int((ids == config.audio_token_id).sum()) > 0 and int((ids == config.video_token_id).sum()) > 0
    first_audio = int((ids == config.audio_token_id).nonzero()[0])
    last_video = int((ids == config.video_token_id).nonzero()[-1])
    assert first_audio < last_video  # interleaved, not audio after the video
    assert out["input_features"].shape == (int(out["audio_feature_lengths"].sum()), 128)


@pytest.mark.parametrize("mm_configs, message", [
    ({"scale_factor": 28}, "patch_size x merge_size = 32"),
    ({"sample_rate": 22050}, "16000 Hz"),
    ({"image_max_pixel": 100}, "unknown key(s) ['image_max_pixel']"),
])
def test_mm_configs_that_would_be_ignored_are_refused(model, processor, mm_configs, message):
    sample = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        _transform(model, processor, **mm_configs)(sample)


def test_mm_configs_are_honoured(model, processor, media):
    sample = {"videos": [str(media / "clip.mkv")],
              "conversations": [{"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": "left"}]}
    plain = _transform(model, processor, fps=4.0)(sample)[0]
    fewer = _transform(model, processor, fps=4.0, max_frames=2)(sample)[0]
    assert plain["video_grid_thw"][0, 0] == 2 and fewer["video_grid_thw"][0, 0] == 1  # 4 frames vs 2 (temporal patch 2)
    chat = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(media / "clip.mkv")}]},
                         {"role": "assistant", "content": "left"}]}  # HF chat format: the same settings apply
    assert _transform(model, processor, fps=4.0, max_frames=2)(chat)[0]["video_grid_thw"][0, 0] == 1
    with_audio = _transform(model, processor, fps=4.0, use_audio_in_video=True)(sample)[0]
    assert "audio_feature_lengths" in with_audio and "audio_feature_lengths" not in plain
    image = {"images": [str(media / "shape.png")], "conversations": [{"from": "human", "value": "<image>?"}, {"from": "gpt", "value": "x"}]}
    small = _transform(model, processor, image_max_pixels=32 * 32)(image)[0]
    assert small["image_grid_thw"].tolist() == [[1, 2, 2]]  # 64x64 shrunk to one 2x2-patch ViT grid


def test_marker_and_media_counts_must_agree(model, processor, media):
    sample = {"images": [str(media / "shape.png")] * 2,
              "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "circle"}], "id": "s7"}
    with pytest.raises(ValueError, match=r"sample s7 .*media without a marker.*'image': 1"):
        _transform(model, processor)(sample)


def test_unreadable_media_is_skipped_and_counted(model, processor, media):
    before = SkipCounter.total
    sample = {"images": [str(media / "broken.png")], "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}
    missing = {"audios": [str(media / "nowhere.wav")], "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "x"}]}
    transform = _transform(model, processor)
    assert transform(sample) == [] and transform(missing) == []
    assert SkipCounter.total == before + 2


def _write(path: Path, rows: list) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(media, n=6, broken=()):
    rows = []
    for i in range(n):
        image = media / ("broken.png" if i in broken else "shape.png")
        rows.append({"id": f"r{i}", "images": [str(image)],
                     "conversations": [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "circle"}]})
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_veomni_dataset_builders_and_dataloader_workers(model, processor, media, tmp_path, suffix):
    """VeOmni's mapping dataset over JSON / JSONL, read by 2 DataLoader worker processes: the broken
    sample is skipped inside its worker (an empty list), never a crash or a hang."""
    from veomni.data.dataset import build_dataset

    path = _write(tmp_path / f"data{suffix}", _rows(media, broken=(3,)))
    dataset = build_dataset("mapping", train_path=str(path), transform=_transform(model, processor), seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda b: b[0], timeout=120)
    out = list(loader)
    assert len(out) == 6 and sum(len(x) == 0 for x in out) == 1 and out[3] == []
    assert all(x[0]["image_grid_thw"].tolist() == [[1, 4, 4]] for i, x in enumerate(out) if i != 3)


def test_parquet_and_multisource_mixing(model, processor, media, tmp_path):
    """VeOmni's multisource (interleave) builder over a parquet source (VeOmni's sharegpt format, its
    own preprocessor by source name) and a JSONL source (HF chat); both sources' samples come through."""
    from veomni.data.dataset import build_dataset

    text_rows = [{"messages": [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "four"}]}] * 4
    image_rows = [{k: v for k, v in r.items() if k != "id"} for r in _rows(media, 4)]
    (tmp_path / "text").mkdir()
    (tmp_path / "image").mkdir()
    _write(tmp_path / "text" / "part.jsonl", text_rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(image_rows), tmp_path / "image" / "part.parquet")
    spec = tmp_path / "mix.yaml"
    spec.write_text(yaml.safe_dump({
        "sources": [str(tmp_path / "text"), str(tmp_path / "image")],
        "names": ["text", "sharegpt4v_sft"],
        "schedule": [{"schedule_type": "const", "weights": [0.5, 0.5]}],
    }))
    dataset = build_dataset("interleave", train_path=str(spec), transform=_transform(model, processor), seed=0,
                            max_seq_len=512, datasets_type="iterable")
    kinds = set()
    for i, out in enumerate(dataset):
        kinds.add("image" if "image_grid_thw" in out[0] else "text")
        if len(kinds) == 2 or i > 40:
            break
    assert kinds == {"image", "text"}


# ------------------------------------------------------------------------------------ end to end
def test_veomni_train_vlm_trains_and_exports_the_released_layout(release, media, tmp_path):
    """VeOmni's tasks/train_vlm.py + import veomni_omni, 2 CPU ranks, FSDP2 x EP 2, released checkpoint,
    VeOmni-format data; the HF export loads in a process without veomni/veomni_omni."""
    rows = _rows(media, 8) + [
        {"audios": [str(media / "tone.wav")], "conversations": [{"from": "human", "value": "<audio>\nPitch?"}, {"from": "gpt", "value": "alto"}]},
        {"videos": [str(media / "clip.mkv")], "conversations": [{"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": "left"}]},
    ] * 4
    data = _write(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    config = {
        "model": {"model_path": str(release), "ops_implementation": {"attn_implementation": "sdpa", **EAGER_OPS}},
        "data": {"train_path": str(data), "max_seq_len": 256, "mm_configs": {"fps": 4.0}, "dataloader": {"num_workers": 0}},
        "train": {
            "seed": 0, "accelerator": {"ep_size": 2, "fsdp_config": {"fsdp_mode": "fsdp2", "mixed_precision": {"enable": True, "param_dtype": "float32"}}},
            "optimizer": {"lr": 1.0e-3}, "micro_batch_size": 1, "global_batch_size": 2, "max_steps": 3, "num_train_epochs": 1,
            "init_device": "meta", "checkpoint": {"output_dir": str(out), "save_epochs": 0},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    log = run_ranks(TRAIN_VLM, 2, [str(tmp_path / "config.yaml")], timeout_s=400)
    assert "Start training" in log
    export = out / "checkpoints" / "global_step_3" / "hf_ckpt"
    check = f"""
import json, sys
from transformers import Qwen3OmniMoeForConditionalGeneration
model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained({str(export)!r}, output_loading_info=True)
keys = json.load(open({str(export / 'model.safetensors.index.json')!r}))["weight_map"]
assert not info["missing_keys"] and not info["unexpected_keys"], info
assert "thinker.model.layers.0.mlp.experts.0.gate_proj.weight" in keys and "talker.codec_head.weight" in keys, sorted(keys)[:5]
assert not any(k.startswith("thinker.model.language_model") or ".gate_up_proj" in k for k in keys)
assert "veomni" not in sys.modules and "veomni_omni" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
    with open(export / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen3_omni_moe"
    assert AutoConfig.from_pretrained(export).thinker_config.text_config.num_experts == 8
