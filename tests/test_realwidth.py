"""Parity at the released model's widths (`bench.configs.realwidth_thinker_config`: Qwen3-Omni-30B-A3B's
thinker with two MoE text layers, a 2-block ViT with one deepstack level and 2 audio layers; hidden 2048,
128 experts top-8, 32 q / 4 kv heads of 128, M-RoPE [24, 20, 20]; ViT 1152 wide with 16 heads; audio
1280 wide with 20 heads). The 2-rank runs cut the vocabulary to `REALWIDTH_2RANK_VOCAB` (32768 of 152064;
~1.5B parameters): at the released vocabulary two fp32 ranks do not fit CI's 24 GiB (see configs.py). One
process checks the released vocabulary: the patched model against unpatched HF (`bench realwidth --sections parity`).

The unpatched single-process HF thinker computes the loss and every gradient on the global batch
(`REALWIDTH_SAMPLES`: an image of 256 visual tokens, a 10 s clip, a 4-frame video, text; 2080 tokens,
as padded rows), in a subprocess; then VeOmni's parallelizer runs the same step packed on 2 gloo ranks
under FSDP 2 × EP 2 (two packs, one per data-parallel rank) and under SP 2 × EP 2 (one pack, sliced),
and the loss and every gradient must match (docs/design.md §7: max|got − ref| ≤ 1e-5 · max|ref| per
tensor). The router's auxiliary loss is off (per micro batch under SP, see tests/test_fsdp.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from veomni_omni.bench.configs import (
    REALWIDTH_2RANK_VOCAB, REALWIDTH_DP_PACKS, REALWIDTH_EP_TEXT_LAYERS, REALWIDTH_SAMPLES, realwidth_dp_batches, realwidth_thinker_config,
)
from veomni_omni.bench.plan import build_meta_thinker
from veomni_omni.bench.plan_cpu import thinker_config
from veomni_omni.data.shaped_batches import concat_batches
from veomni_omni.launch import run_ranks
from veomni_omni.parity import table_errors, table_max_relative_difference
from veomni_omni.tiny import TOKENS

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from realwidth_parity import LAYOUTS  # noqa: E402

WORKER = str(Path(__file__).parent / "dist" / "realwidth_parity.py")
pytestmark = pytest.mark.realwidth


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The seeded real-width thinker saved as a checkpoint, and the unpatched HF reference's loss and
    gradients on the global batch saved beside it, computed in a subprocess (this process stays small
    for the two ranks that follow)."""
    path = tmp_path_factory.mktemp("realwidth")
    subprocess.run([sys.executable, WORKER, "reference", str(path), str(REALWIDTH_2RANK_VOCAB)], check=True, timeout=1200)
    return path, json.loads((path / "reference.json").read_text())


def test_the_model_and_batch_have_real_widths_and_a_realistic_mix():
    config = realwidth_thinker_config()
    text, vision, audio = config.text_config, config.vision_config, config.audio_config
    assert (text.hidden_size, text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (2048, 128, 8, 768)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim, text.vocab_size) == (32, 4, 128, 152064)
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert (vision.hidden_size, vision.num_heads, vision.patch_size, audio.d_model, audio.encoder_attention_heads, audio.num_mel_bins) == (
        1152, 16, 16, 1280, 20, 128)
    assert vision.deepstack_visual_indexes and text.num_hidden_layers >= len(vision.deepstack_visual_indexes)
    two_rank = realwidth_thinker_config(vocab_size=REALWIDTH_2RANK_VOCAB).to_dict()
    assert two_rank["text_config"].pop("vocab_size") == REALWIDTH_2RANK_VOCAB
    full = config.to_dict()
    full["text_config"].pop("vocab_size")
    assert two_rank == full, "the 2-rank model differs from the real-width one in more than its vocabulary"
    ep_timing = thinker_config("realwidth_ep").to_dict()  # `realwidth --sections ep`: one text layer
    assert ep_timing["text_config"].pop("num_hidden_layers") == REALWIDTH_EP_TEXT_LAYERS
    assert ep_timing["text_config"].pop("vocab_size") == REALWIDTH_2RANK_VOCAB
    assert ep_timing == {**full, "text_config": {k: v for k, v in full["text_config"].items() if k != "num_hidden_layers"}}
    batch = concat_batches(realwidth_dp_batches(config))
    ids = batch["input_ids"]
    assert 2000 <= int(batch["attention_mask"].sum()) <= 4000
    assert int((ids == TOKENS["image"]).sum()) >= 200 and int((ids == TOKENS["video"]).sum()) > 0
    assert batch["feature_attention_mask"].sum() == 1000, "a 10 s clip: 1000 mel frames"
    assert sorted(n for pack in REALWIDTH_DP_PACKS for n in pack) == sorted(REALWIDTH_SAMPLES)


@pytest.mark.timeout(1800)
def test_released_vocabulary_gradients_match_unpatched_hf(tmp_path):
    """The 2-rank runs cut the vocabulary; this one keeps the released 152064: `bench realwidth --sections
    parity` runs one step of the patched 2.02B model and one of unpatched HF on the same instance (HF's
    gradients through disk) in a subprocess, and the loss and all gradients must match."""
    run = subprocess.run(
        [sys.executable, "-m", "veomni_omni.bench", "realwidth", "--sections", "parity", "--json"],
        capture_output=True, text=True, timeout=1500,
    )
    lines = [line for line in run.stdout.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("{"), f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    parity = json.loads(lines[-1])["parity"]
    print(f"released vocabulary: loss {parity['loss']:.6f} (HF {parity['hf_loss']:.6f}), {parity['gradients']} gradients, "
          f"largest relative difference {parity['max_relative_difference']:.2e}")
    assert not parity["errors"], "\n".join(parity["errors"][:20])
    names = [name for name, _ in build_meta_thinker(realwidth_thinker_config()).named_parameters()]
    assert parity["vocab_size"] == 152064 and parity["gradients"] == parity["parameters"] == len(names), parity
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_real_width_matches_single_process(reference, tmp_path, layout):
    path, ref = reference
    out = tmp_path / "out.json"
    run_ranks(WORKER, 2, [str(path), str(path), str(out), layout], timeout_s=1200)
    got = json.loads(out.read_text())

    ranks = got["ranks"]
    assert [r["local_experts"] for r in ranks] == [64, 64], f"the 128 experts are not split over EP 2: {ranks}"
    if LAYOUTS[layout]["sp"] > 1:
        assert sum(r["tokens"] for r in ranks) >= ref["tokens"], "the SP slices do not cover the packed sequence"
    held_media = [{kind for kind, n in r["media_tokens"].items() if n} for r in ranks]
    assert all(held_media), f"{layout}: a rank held no media token; the mix should reach both ranks: {ranks}"

    table = {name: tuple(entry) if entry is not None else None for name, entry in got["table"].items()}
    assert set(table) == set(ref["names"]), "the compared gradients are not the model's parameters"
    deepstack = [name for name in table if name.startswith("model.visual.merger_list.")]
    assert deepstack and all(table[name][1] > 0 for name in deepstack), "the deepstack mergers got no gradient: deepstack not exercised"
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), f"loss {got['loss']} vs reference {ref['loss']}"
    errors = table_errors(table)
    print(f"{layout}: loss {got['loss']:.6f} (reference {ref['loss']:.6f}), {len(table)} gradients of {ref['params'] / 1e9:.2f}B "
          f"parameters, largest relative difference {table_max_relative_difference(table):.2e}")
    assert not errors, "\n".join(errors[:20])
