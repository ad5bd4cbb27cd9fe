"""Bad input: clear errors naming what is wrong, raised on every rank at once; documented inputs
(padding-only rows and batches, the shortest audio) train correctly. See README "Bad input"."""

from pathlib import Path

import numpy as np
import pytest
import torch

import veomni_omni
from veomni_omni.data.checks import BadInputError, check_micro_batch, input_problems, padding_batch
from veomni_omni.data.media import MediaError
from veomni_omni.data.samples import MIN_AUDIO_SAMPLES, encode_sample
from veomni_omni.data.sequence_parallel import pack_rows, shard_collated_batch, shard_for_sequence_parallel
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.launch import run_ranks
from veomni_omni.parity import parity_errors
from veomni_omni.testing import loss_and_grads
from veomni_omni.tiny import TOKENS, tiny_thinker_config

WORKER = str(Path(__file__).parent / "dist" / "bad_input.py")
ALL_MEDIA = [("prompt", 2), ("audio", 120), ("image", 1, 4, 4), ("video", 2, 4, 4), ("text", 4)]
EXPECTED = {"image": (3, 4, "image_grid_thw"), "video": (7, 8, "video_grid_thw"), "audio": (15, 16, "feature_attention_mask")}


def one_placeholder_short(batch: dict, modality: str) -> dict:
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = batch["input_ids"][0]
    ids[(ids == TOKENS[modality]).nonzero()[0, 0]] = 7
    return batch


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_placeholder_mismatch_names_sample_modality_and_both_counts(modality):
    config = tiny_thinker_config()
    good, bad = build_batch([ALL_MEDIA], seed=1), one_placeholder_short(build_batch([ALL_MEDIA], seed=2), modality)
    assert input_problems(good, config, "a") == []
    found, expected, source = EXPECTED[modality]
    with pytest.raises(BadInputError) as err:
        check_micro_batch([good, bad], config, sample_ids=["a", "b"])
    assert f"sample b: {modality}: {found} placeholder tokens in input_ids, {expected} encoder outputs expected from {source}" in str(err.value)
    assert "sample a" not in str(err.value) and str(err.value).count("sample b") == 1


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_model_refuses_placeholder_mismatch_of_every_modality(tiny_thinker, patched, modality):
    """Direct callers of the model (single process) get the modality and both counts; HF checks no audio."""
    model, _ = tiny_thinker
    found, expected, _ = EXPECTED[modality]
    with pytest.raises(ValueError, match=rf"{found} {modality} placeholder tokens in input_ids, {expected} {modality} encoder outputs"):
        with torch.no_grad():
            model(**one_placeholder_short(build_batch([ALL_MEDIA]), modality))


def test_grid_not_divisible_by_merge_size_is_a_clear_error(tiny_thinker, patched):
    model, _ = tiny_thinker
    batch = build_batch([[("prompt", 2), ("image", 1, 4, 4), ("text", 4)]])
    batch["image_grid_thw"] = torch.tensor([[4, 1, 4]])  # same 16 patches, but h = 1 cannot be merged 2×2
    assert input_problems(batch, model.config, 5) == [
        "sample 5: image: grid(s) (t, h, w) [[4, 1, 4]] not positive or h, w not divisible by the spatial merge size 2"
    ]
    with pytest.raises(ValueError, match=r"image_grid_thw \[\[4, 1, 4\]\].*divisible by the ViT's spatial merge size 2"):
        with torch.no_grad():
            model(**batch)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 6]])  # divisible, but 24 patches for 16 pixel rows
    assert "16 rows in pixel_values, 24 patches" in input_problems(batch, model.config)[0]
    with pytest.raises(ValueError, match="image: 16 pixel rows, but image_grid_thw holds 24 patches"):
        with torch.no_grad():
            model(**batch)


def test_sequence_parallel_collator_refuses_mismatch():
    """The SP forward checks nothing on the device (no host syncs): its collator does."""
    config = tiny_thinker_config()
    packed = pack_rows(one_placeholder_short(build_batch([ALL_MEDIA], with_position_ids=True), "video"))
    with pytest.raises(BadInputError, match="sample packed: video: 7 placeholder tokens in input_ids, 8 encoder outputs"):
        shard_for_sequence_parallel(packed, config, 2, 0)


def test_veomni_sequence_parallel_hook_carries_the_mismatch_to_the_forward(tiny_thinker, patched):
    """The hook VeOmni's SP collator calls runs inside a DataLoader: it records the problem in the
    shard (the main job's step check raises it on every rank) and the SP forward raises it."""
    model, _ = tiny_thinker
    packed = pack_rows(one_placeholder_short(build_batch([ALL_MEDIA], with_position_ids=True), "audio"))
    length = packed["input_ids"].shape[1]
    pad = length % 2
    frames = packed["feature_attention_mask"].sum(-1)
    batch = {  # what VeOmni's SP collator hands the hook, with veomni_omni's collate infos
        "input_ids": torch.nn.functional.pad(packed["input_ids"], (0, pad)),
        "labels": packed["labels"][:, : (length + pad) // 2],
        "position_ids": packed["position_ids"].transpose(0, 1)[..., : (length + pad) // 2],
        "cu_seq_lens_q": torch.cat([packed["cu_seq_lens_q"], torch.tensor([length + pad])]) if pad else packed["cu_seq_lens_q"],
        "input_features": torch.cat([clip[:, :n].T for clip, n in zip(packed["input_features"], frames.tolist())]),
        "audio_feature_lengths": frames,
        **{k: packed[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")},
    }
    shard_collated_batch(batch, model.config, 2, 0)
    assert batch["sp_inputs"].problems == ["sample packed: audio: 15 placeholder tokens in input_ids, 16 encoder outputs "
                                              "expected from audio_feature_lengths (mel frames per clip [120])"]
    assert not {"input_features", "pixel_values_videos", "image_grid_thw"} & batch.keys(), "media left in the shard"
    batch.pop("labels")
    with pytest.raises(BadInputError, match="audio: 15 placeholder tokens in input_ids, 16 encoder outputs"), torch.no_grad():
        model(**batch)


def test_audio_shorter_than_one_stft_window_is_refused_and_the_shortest_clip_trains(tiny_thinker, patched, tmp_path):
    """Waveforms under one STFT window (n_fft = 400 samples) are refused with MediaError (the sample
    is skipped by encode_or_skip); the shortest accepted one encodes and trains, giving HF's result."""
    from veomni_omni.data.processor import build_tiny_processor, load_processor

    build_tiny_processor(tmp_path)
    processor, model = load_processor(tmp_path), tiny_thinker[0]

    def sample(n):
        audio = (0.3 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
        return {"messages": [{"role": "user", "content": [{"type": "audio", "audio": audio}]}, {"role": "assistant", "content": "hi"}]}

    with pytest.raises(MediaError, match=f"too short \\({MIN_AUDIO_SAMPLES - 1} samples < {MIN_AUDIO_SAMPLES}"):
        encode_sample(sample(MIN_AUDIO_SAMPLES - 1), processor, model.config)
    encoded = encode_sample(sample(MIN_AUDIO_SAMPLES), processor, model.config)
    assert input_problems(encoded, model.config) == []
    batch = {k: v.unsqueeze(0) for k, v in encoded.items() if k in ("input_ids", "attention_mask", "labels")}
    batch.update(input_features=encoded["input_features"], feature_attention_mask=encoded["feature_attention_mask"])
    batch["position_ids"] = encoded["position_ids"].unsqueeze(1)
    loss, grads = loss_and_grads(model, batch)
    with veomni_omni.unpatched():
        ref_loss, ref_grads = loss_and_grads(model, batch)
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert not parity_errors(grads, ref_grads)


def test_padding_only_row_contributes_nothing(tiny_thinker, patched):
    """A row that is all padding (attention_mask 0) leaves loss and every gradient as without it."""
    model, _ = tiny_thinker
    rows = [[("prompt", 2), ("image", 1, 4, 4), ("audio", 80), ("text", 5)]]
    with_pad = build_batch(rows + [[("prompt", 0)]], with_position_ids=False)
    without = build_batch(rows, with_position_ids=True)
    with_pad["position_ids"] = torch.cat([without["position_ids"], torch.zeros_like(without["position_ids"])], dim=1)
    loss, grads = loss_and_grads(model, with_pad)
    ref_loss, ref_grads = loss_and_grads(model, without)
    assert torch.isfinite(loss) and abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    assert not parity_errors(grads, ref_grads)
    del with_pad["position_ids"]  # HF's M-RoPE index cannot place an empty row: a clear error, not a torch.cat crash
    with pytest.raises(ValueError, match=r"batch rows \[1\] are all padding .* pass position_ids"):
        with torch.no_grad():
            model(**with_pad)


def test_padding_batch_gives_zero_loss_and_gradients_and_empty_batch_is_refused(tiny_thinker, patched):
    model, _ = tiny_thinker
    loss, grads = loss_and_grads(model, padding_batch(model.config))
    assert loss.item() == 0.0  # HF: NaN (a token mean over no token), and a NaN aux loss
    assert all(g is None or (torch.isfinite(g).all() and not g.any()) for g in grads.values())
    empty = {k: v[:0] for k, v in build_batch([[("prompt", 4)]]).items()}
    with pytest.raises(ValueError, match=r"empty batch \(shape \(0, 4\)\).*padding_batch"):
        model(**empty)


@pytest.fixture(scope="module")
def worker_results(tiny_checkpoint):
    path, model = tiny_checkpoint("tiny_thinker")  # router aux loss on: the padding rank must add none
    run_ranks(WORKER, 2, [str(path), str(path / "out.pt")], timeout_s=240)
    return model, torch.load(path / "out.pt")


def test_bad_sample_on_one_rank_stops_both_ranks_with_the_same_error(worker_results):
    _, results = worker_results
    got = results["agreement"]
    assert got["messages"][0] is not None, "rank 0 (good batch) did not raise: it would go on into FSDP and hang"
    assert got["messages"][0] == got["messages"][1], f"ranks raised different errors: {got['messages']}"
    assert "sample 1: audio: 15 placeholder tokens in input_ids, 16 encoder outputs expected" in got["messages"][0]
    assert "(rank 1)" in got["messages"][0]
    assert got["seconds"] < 10, f"the agreement took {got['seconds']:.1f} s"


def test_rank_with_padding_batch_runs_encoders_and_contributes_nothing(worker_results):
    """FSDP over 2 ranks, one with a real batch and one with `padding_batch`, equals the unpatched
    single-process result of the real batch alone (loss normalised as VeOmni's trainer does)."""
    model, results = worker_results
    got = results["empty_rank"]
    assert got["vit_calls"] == [1, 1], f"ViT forwards per rank {got['vit_calls']}: the padding rank must run the dummy"
    with veomni_omni.unpatched():
        ref_loss, ref_grads = loss_and_grads(model, got["batch"])  # rank 0's batch
    assert abs(got["loss"] - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), f"loss {got['loss']} vs {ref_loss.item()}"
    # a parameter HF leaves without gradient must get exactly zero from us
    ref_grads = {n: g if g is not None else torch.zeros_like(got["grads"][n]) for n, g in ref_grads.items() if g is not None or n in got["grads"]}
    errors = parity_errors(got["grads"], ref_grads)
    assert not errors, "\n".join(errors[:10])


def test_sequence_parallel_group_without_samples_contributes_nothing(worker_results):
    _, results = worker_results
    got = results["empty_sp_group"]
    assert got["loss"] == 0.0 and got["aux_loss"] == 0.0
    bad = [n for n, g in got["grads"].items() if not torch.isfinite(g).all() or g.any()]
    assert got["grads"] and not bad, f"non-zero or non-finite gradients: {bad[:5]}"


def test_eager_attention_is_refused_under_sequence_parallelism(worker_results):
    _, results = worker_results
    assert results["eager_under_sp"] is not None, "eager attention ran on sequence slices"
    assert "attn_implementation='eager' under Ulysses SP" in results["eager_under_sp"]
