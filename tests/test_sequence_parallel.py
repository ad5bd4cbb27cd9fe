"""Ulysses sequence parallelism: each rank holds a slice of a packed multimodal sequence.

Gathered gradients must equal the single-process, unpatched HF reference on the same samples
(unpacked rows), for SP=2, SP=4, SP=2 × FSDP=2 and EP=2 × SP=2 (docs/design.md §7). Router aux loss off, as
in tests/test_fsdp.py. Every audio clip has at least one full 100-frame chunk: HF's audio tower pads
all chunks of a call to the longest one, and a clip convolved without that padding rounds
differently (~1e-6 relative in its outputs, which the tiny conv-bias gradients amplify past the bar).
"""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

import veomni_omni
from veomni_omni.data.sequence_parallel import SequenceParallelShard, check_divisible_heads, pack_rows, shard_for_sequence_parallel
from veomni_omni.data.shaped_batches import build_batch, concat_batches
from veomni_omni.launch import run_ranks
from veomni_omni.parity import max_relative_difference, parity_errors
from veomni_omni.testing import loss_and_grads
from veomni_omni.tiny import TOKENS, tiny_thinker_config

WORKER = str(Path(__file__).parent / "dist" / "sp_parity.py")

SAMPLES = {
    "packed_modalities": [
        [("prompt", 3), ("text", 8)],
        [("prompt", 2), ("image", 1, 4, 6), ("text", 5)],
        [("prompt", 2), ("audio", 150), ("text", 4)],
        [("prompt", 1), ("video", 2, 4, 4), ("text", 6)],
    ],
    "straddling_image": [[("prompt", 4), ("image", 1, 8, 12), ("text", 9)], [("prompt", 2), ("text", 6)]],
    "straddling_audio": [[("prompt", 3), ("audio", 350), ("text", 8)]],
    "audio_in_video": [[("prompt", 2), ("audio_in_video", 2, 4, 4, 230), ("text", 5)], [("prompt", 2), ("text", 6)]],
    "multimodal_only_at_the_end": [[("prompt", 30), ("text", 31)], [("prompt", 1), ("image", 1, 4, 4), ("text", 3)]],
    "long_audio": [[("prompt", 2), ("audio", 1900), ("text", 8)]],  # three 800-frame attention windows
    "text_only": [[("prompt", 4), ("text", 13)], [("prompt", 3), ("text", 7)]],
    "image_video_audio": [[("prompt", 2), ("video", 2, 4, 4), ("image", 1, 4, 4), ("text", 3)], [("prompt", 1), ("audio", 130), ("text", 6)]],
}


def groups(*names):
    return {"groups": [{"rows": SAMPLES[n], "seed": 7 + i} for i, n in enumerate(names)]}


LAYOUTS = {  # name: (world size, SP size, EP size, cases)
    "sp2": (2, 2, 1, {**{name: groups(name) for name in SAMPLES},
                      "image_video_audio with a flash-style ViT": {**groups("image_video_audio"), "vision_attention": "flash_varlen"}}),
    "sp4": (4, 4, 1, {name: groups(name) for name in SAMPLES}),
    "sp2_ep2": (2, 2, 2, {name: groups(name) for name in ("packed_modalities", "straddling_audio", "audio_in_video", "text_only")}),
    "sp2_fsdp2": (4, 2, 1, {
        "packed_modalities+multimodal_only_at_the_end": groups("packed_modalities", "multimodal_only_at_the_end"),
        "audio_in_video+text_only": groups("audio_in_video", "text_only"),
        "straddling_image+long_audio": groups("straddling_image", "long_audio"),
        "straddling_audio+image_video_audio": groups("straddling_audio", "image_video_audio"),
    }),
}


def shards(rows, seed, sp_size):
    config = tiny_thinker_config()
    packed = pack_rows(build_batch(rows, seed=seed, with_position_ids=True))
    return packed, [shard_for_sequence_parallel(packed, config, sp_size, r) for r in range(sp_size)]


def test_cases_exercise_what_they_claim():
    for sp_size in (2, 4):
        packed, parts = shards(SAMPLES["multimodal_only_at_the_end"], 7, sp_size)
        mm = [TOKENS["image"], TOKENS["video"], TOKENS["audio"]]
        assert not torch.isin(parts[0]["input_ids"], torch.tensor(mm)).any(), "rank 0 should hold no multimodal token"
        for name in SAMPLES:
            packed, parts = shards(SAMPLES[name], 7, sp_size)
            assert packed["input_ids"].shape[1] % sp_size, f"{name}: length should not divide by {sp_size}"
        for name, token in (("straddling_image", TOKENS["image"]), ("straddling_audio", TOKENS["audio"])):
            _, parts = shards(SAMPLES[name], 7, sp_size)
            holders = [r for r, p in enumerate(parts) if (p["input_ids"] == token).any()]
            assert len(holders) > 1, f"{name}: the run should straddle a slice boundary at SP={sp_size}"


@pytest.mark.parametrize("sp_size", [2, 4])
def test_each_rank_encodes_only_the_audio_its_slice_needs(sp_size):
    """1900 frames = three attention windows (800, 800, 300 frames); no rank encodes all of them,
    and the windows each rank encodes cover exactly the audio tokens of its slice."""
    packed, parts = shards(SAMPLES["long_audio"], 7, sp_size)
    frames = [int(p["feature_attention_mask"].sum()) if "input_features" in p else 0 for p in parts]
    assert max(frames) < 1900, frames
    for p in parts:
        n_tokens = int((p["input_ids"] == TOKENS["audio"]).sum())
        audio = p["sp_inputs"].audio
        assert (len(audio.rows) if audio is not None else 0) == n_tokens


def fields_of(shard) -> dict:
    """Every field of a shard and of its nested vision/audio shards, by dotted name."""
    out = {}
    for f in dataclasses.fields(shard):
        value = getattr(shard, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in fields_of(value).items()})
        else:
            out[f.name] = value
    return out


def test_shard_to_moves_every_tensor_field_and_keeps_the_host_ones():
    _, parts = shards(SAMPLES["image_video_audio"], 7, 2)
    shard = parts[1]["sp_inputs"]
    assert shard.vision is not None and shard.audio is not None, "case not exercised: rank 1 should hold vision and audio"
    before = fields_of(shard)
    moved = shard.to("meta")
    after = fields_of(moved)
    assert after.keys() == before.keys()
    tensors = [name for name, value in before.items() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 16, tensors  # 7 of the vision shard, 9 of the audio shard
    for name, value in after.items():
        if name in tensors:
            assert value.device.type == "meta" and value.shape == before[name].shape and value.dtype == before[name].dtype, name
        else:
            assert value == before[name], name
    assert all(v.device.type == "cpu" for n, v in fields_of(shard).items() if n in tensors), "the original shard was changed"
    # a DataLoader worker hands the shard to the main process pickled
    unpickled = fields_of(pickle.loads(pickle.dumps(shard)))
    assert all(torch.equal(unpickled[n], before[n]) if n in tensors else unpickled[n] == before[n] for n in before)


def test_shard_constructor_refuses_inconsistent_fields():
    SequenceParallelShard(2, (3, 6), 5)  # rank 1 of sp 2, a 5-token sequence padded to 6
    SequenceParallelShard(2, (3, 6), 0, problems=["sample 0: audio: ..."])
    for args in [(0, (0, 3), 3), (2, (4, 3), 3), (2, (3, 6), 7), (2, (3, 6), -1)]:
        with pytest.raises(ValueError, match="inconsistent"):
            SequenceParallelShard(*args)
    _, parts = shards(SAMPLES["long_audio"], 7, 2)
    audio = next(p["sp_inputs"].audio for p in parts if p["sp_inputs"].audio is not None)
    with pytest.raises(ValueError, match="carries no media"):
        SequenceParallelShard(2, (0, 3), 5, problems=["sample 0: audio: ..."], audio=audio)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts[0]["sp_inputs"].sequence_length = 0


def test_indivisible_heads_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="vision heads"):
        check_divisible_heads(tiny_thinker_config(), 8)
    config = tiny_thinker_config(num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(ValueError, match="text attention heads"):
        check_divisible_heads(config, 4)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("tiny_thinker_sp", output_router_logits=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sequence_parallel_matches_single_process(checkpoint, tmp_path, layout):
    path, model = checkpoint
    world_size, sp_size, ep_size, cases = LAYOUTS[layout]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    args = [str(path), str(tmp_path / "cases.json"), str(tmp_path / "out.pt"), str(sp_size), str(ep_size)]
    run_ranks(WORKER, world_size, args, timeout_s=480)
    results = torch.load(tmp_path / "out.pt")
    assert sorted(results) == sorted(cases)

    worst, failures = 0.0, []
    for name, got in results.items():
        if cases[name].get("vision_attention") == "flash_varlen":
            assert got["flash_calls"] >= 1, f"{name}: the ViT under SP did not use the flash-style implementation"
        batch = concat_batches([build_batch(g["rows"], seed=g["seed"], with_position_ids=True) for g in cases[name]["groups"]])
        with veomni_omni.unpatched():
            ref_loss, ref_grads = loss_and_grads(model, batch)
        ref_grads = {n: (g if g is not None else torch.zeros_like(got["grads"][n])) for n, g in ref_grads.items() if g is not None or n in got["grads"]}
        if abs(got["loss"] - ref_loss.item()) > 1e-5 * abs(ref_loss.item()):
            failures.append(f"{name}: loss {got['loss']} vs reference {ref_loss.item()}")
        failures += [f"{name}: {e}" for e in parity_errors(got["grads"], ref_grads)]
        worst = max(worst, max_relative_difference(got["grads"], ref_grads))
    print(f"{layout}: {len(results)} cases, largest relative gradient difference {worst:.2e}")
    assert not failures, "\n".join(failures[:20])
