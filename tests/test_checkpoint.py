"""Checkpoint IO: released HF checkpoints in and out without conversion, resumable training.

Single process: loading into a plain model equals `from_pretrained`; a thinker trained alone loads
from the released top-level layout and saves back into it with the talker and code2wav carried
through; corrupted checkpoints fail naming the file or the keys.

FSDP=2 x EP=2 on gloo (tests/dist/ckpt_flow.py), two process groups:
- "first": a tiny top-level model saved by plain transformers (released layout: per-expert keys,
  `thinker.` prefix, talker, code2wav, processor files) is loaded into the sharded model built on
  meta; its weights and logits equal plain transformers'. It trains STEPS steps and is saved; a
  separate process that never imports veomni_omni loads the result with plain transformers and
  gets the trained sharded model's logits; talker and code2wav are bit-identical to the source. A
  second model trains with DCP saves up to half way; rank 1 is killed inside the DCP save at the end.
- "resume": a fresh group resumes from the newest complete checkpoint (the one before the killed
  save), and its losses and logits equal the straight run's bit for bit. It trains two more steps
  and rank 1 is killed while writing a new HF save over the first one, which still loads intact.
Per-rank bytes read and peak RSS of load and save are printed; the memory bounds are asserted on a
mid-size checkpoint, where shards dominate the allocator noise.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

import veomni_omni
from veomni_omni.checkpoint import CheckpointError, checkpoint_nbytes, load_hf_checkpoint, save_hf_checkpoint
from veomni_omni.checkpoint.safetensors_io import INDEX_NAME, read_checkpoint, read_header
from veomni_omni.data.processor import build_tiny_processor
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.launch import run_ranks
from veomni_omni.parity import parity_errors
from veomni_omni.tiny import tiny_omni_config, tiny_thinker_config

WORKER = str(Path(__file__).parent / "dist" / "ckpt_flow.py")
WORLD, EP, STEPS = 4, 2, 4
OUTPUT_SHARD_BYTES = 200_000  # several output shards, so every rank writes some
PROBE = {"rows": [[["prompt", 2], ["image", 1, 4, 4], ["audio", 80], ["video", 2, 4, 4], ["text", 5]], [["prompt", 3], ["text", 8]]], "seed": 11}
CARRIED = ("talker.", "code2wav.")
MiB = 2**20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The released layout in miniature, written by plain transformers' `save_pretrained` (4 shards
    and an index, processor files beside them), and a mid-size thinker for the memory bounds."""
    root = tmp_path_factory.mktemp("ckpt_sources")
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    model.save_pretrained(root / "src", max_shard_size="350KB")
    build_tiny_processor(root / "src")
    torch.manual_seed(1)
    mid = Qwen3OmniMoeThinkerForConditionalGeneration(
        tiny_thinker_config(hidden_size=256, intermediate_size=512, moe_intermediate_size=512, num_hidden_layers=6)
    )
    mid.save_pretrained(root / "mid")
    return root / "src", root / "mid"


def plain_reference(path):
    with veomni_omni.unpatched():
        return Qwen3OmniMoeForConditionalGeneration.from_pretrained(path).eval()


def raw(tensor):
    """Bytes, for bit-identity (NaN-safe)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def same_bytes(file_a, key_a, file_b, key_b):
    with safe_open(str(file_a), "pt") as a, safe_open(str(file_b), "pt") as b:
        x, y = a.get_tensor(key_a), b.get_tensor(key_b)
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(raw(x), raw(y))


# ----------------------------------------------------------------------------- single process
def test_load_into_plain_model_equals_from_pretrained(sources):
    src, _ = sources
    reference = plain_reference(src).state_dict()
    torch.manual_seed(5)  # different weights first, so every tensor must be overwritten
    model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    read = load_hf_checkpoint(model, src)
    assert read == checkpoint_nbytes(src), "a single process must read every tensor exactly once"
    differing = [name for name, value in model.state_dict().items() if not torch.equal(value, reference[name])]
    assert not differing, f"loaded tensors differ from from_pretrained: {differing[:10]}"


def test_thinker_alone_round_trips_the_released_layout(sources, tmp_path):
    """A thinker trained on its own reads the `thinker.` keys and saves them back with the source's
    talker, code2wav, config and processor files: the result is the released top-level model."""
    src, _ = sources
    reference = plain_reference(src)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config())
    load_hf_checkpoint(thinker, src)
    expected = reference.thinker.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in thinker.state_dict().items())

    with torch.no_grad():
        thinker.lm_head.weight.mul_(2)  # a "trained" change that must come back out
    out = save_hf_checkpoint(thinker, tmp_path / "out", source=src, max_shard_size=OUTPUT_SHARD_BYTES)
    source_entries, saved = read_checkpoint(src), read_checkpoint(out)
    assert {k: (e.dtype, e.shape) for k, e in saved.items()} == {k: (e.dtype, e.shape) for k, e in source_entries.items()}
    carried = [k for k in source_entries if k.startswith(CARRIED)]
    assert carried and all(same_bytes(source_entries[k].file, k, saved[k].file, k) for k in carried)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / INDEX_NAME).is_file()

    reloaded = plain_reference(out).state_dict()
    for name, value in reference.state_dict().items():
        want = value * 2 if name == "thinker.lm_head.weight" else value
        assert torch.equal(reloaded[name], want), name


def test_save_without_source_writes_the_models_own_layout(tmp_path):
    torch.manual_seed(2)
    thinker = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config())
    out = save_hf_checkpoint(thinker, tmp_path / "out")
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in read_checkpoint(out)), "experts must be saved per expert"
    with veomni_omni.unpatched():
        reloaded = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in thinker.state_dict().items())


def _rewrite(directory, edit):
    """Apply `edit(tensors)` to the shard holding the up_proj of expert 3 in layer 1; fix the index."""
    index = json.loads((directory / INDEX_NAME).read_text())
    name = index["weight_map"]["thinker.model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors = load_file(directory / name)
    edit(tensors)
    save_file(tensors, directory / name, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name} | dict.fromkeys(tensors, name)
    (directory / INDEX_NAME).write_text(json.dumps(index))
    return name


CORRUPTIONS = {
    "truncated shard": lambda d: _truncate(d / "model-00002-of-00004.safetensors", 100),
    "missing expert": lambda d: _rewrite(d, lambda t: t.pop("thinker.model.layers.1.mlp.experts.3.up_proj.weight")),
    "unexpected expert": lambda d: _rewrite(
        d, lambda t: t.__setitem__("thinker.model.layers.1.mlp.experts.8.up_proj.weight", t["thinker.model.layers.1.mlp.experts.3.up_proj.weight"].clone())
    ),
    "wrong shape": lambda d: _rewrite(
        d, lambda t: t.__setitem__("thinker.model.layers.1.mlp.experts.3.up_proj.weight", torch.zeros(3, 3))
    ),
    "shard file missing": lambda d: (d / "model-00003-of-00004.safetensors").unlink(),
}
EXPECTED_MESSAGE = {
    "truncated shard": ["model-00002-of-00004.safetensors", "truncated"],
    "missing expert": ["missing keys (1)", "thinker.model.layers.1.mlp.experts.3.up_proj.weight"],
    "unexpected expert": ["unexpected keys (1)", "thinker.model.layers.1.mlp.experts.8.up_proj.weight"],
    "wrong shape": ["shape mismatches (1)", "thinker.model.layers.1.mlp.experts.3.up_proj.weight: checkpoint (3, 3)"],
    "shard file missing": ["model-00003-of-00004.safetensors", "missing"],
}


def _truncate(path, nbytes):
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_checkpoint_fails_naming_the_file_or_key(sources, tmp_path, corruption):
    src, _ = sources
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    CORRUPTIONS[corruption](broken)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    with pytest.raises(CheckpointError) as error:
        load_hf_checkpoint(model, broken)
    message = str(error.value)
    for part in EXPECTED_MESSAGE[corruption]:
        assert part in message, f"{corruption}: {part!r} not in the error:\n{message}"


# ------------------------------------------------------------------------- FSDP2 x EP on gloo
def _run_until_killed(phase, src, mid, out, spec_dir):
    """Run a phase of the worker; it must die by its own planned kill, after writing its results."""
    spec = {"phase": phase, "steps": STEPS, "ep": EP, "max_shard_size": OUTPUT_SHARD_BYTES, "probe": PROBE}
    (spec_dir / f"{phase}.json").write_text(json.dumps(spec))
    with pytest.raises(RuntimeError) as failure:
        run_ranks(WORKER, WORLD, [str(src), str(mid), str(spec_dir / f"{phase}.json"), str(out)], timeout_s=300, native_abort_retries=0)
    assert (out / f"{phase}.killed").exists(), f"the {phase} run failed before its planned kill:\n{failure.value}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


PLAIN_LOAD = """
import sys, torch
from transformers import Qwen3OmniMoeForConditionalGeneration
checkpoint, batch_file, out_file = sys.argv[1:4]
model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(checkpoint).eval()
with torch.no_grad():
    logits = model.thinker(**torch.load(batch_file)).logits
assert not any(m.split(".")[0] in ("veomni_omni", "veomni") for m in sys.modules), "plain transformers only"
torch.save(logits, out_file)
"""


@pytest.fixture(scope="module")
def flow(sources, tmp_path_factory):
    src, mid = sources
    out = tmp_path_factory.mktemp("ckpt_flow")
    first = _run_until_killed("first", src, mid, out, out)
    resumed = _run_until_killed("resume", src, mid, out, out)
    batch = build_batch(PROBE["rows"], seed=PROBE["seed"], with_position_ids=True)
    batch.pop("labels")  # as the worker's probe
    torch.save(batch, out / "probe_batch.pt")
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out / "hf_trained"), str(out / "probe_batch.pt"), str(out / "plain_logits.pt")],
        capture_output=True, text=True, timeout=180,
    )
    assert plain.returncode == 0, f"plain transformers could not load the saved checkpoint:\n{plain.stderr[-4000:]}"
    return {"src": src, "out": out, "first": first, "resume": resumed, "batch": batch,
            "plain_logits": torch.load(out / "plain_logits.pt")}


def test_sharded_load_equals_plain_transformers(flow):
    reference = plain_reference(flow["src"])
    loaded = flow["first"]["loaded_weights"]
    differing = [name for name, value in reference.state_dict().items() if not torch.equal(loaded[name], value)]
    assert not differing, f"FSDP2 x EP load differs from from_pretrained: {differing[:10]}"
    with torch.no_grad():
        ref_logits = reference.thinker(**flow["batch"]).logits
    assert not parity_errors({"logits": flow["first"]["loaded_logits"]}, {"logits": ref_logits})


def test_trained_checkpoint_loads_in_plain_transformers(flow):
    src, saved = flow["src"], flow["out"] / "hf_trained"
    errors = parity_errors({"logits": flow["plain_logits"]}, {"logits": flow["first"]["trained_logits"]})
    assert not errors, f"plain transformers' logits of the saved model differ from the trained sharded model's: {errors}"
    assert not torch.equal(flow["first"]["trained_logits"], flow["first"]["loaded_logits"]), "training changed nothing"
    source_entries, saved_entries = read_checkpoint(src), read_checkpoint(saved)
    assert {k: (e.dtype, e.shape) for k, e in saved_entries.items()} == {k: (e.dtype, e.shape) for k, e in source_entries.items()}
    carried = [k for k in source_entries if k.startswith(CARRIED)]
    changed = [k for k in carried if not same_bytes(source_entries[k].file, k, saved_entries[k].file, k)]
    assert carried and not changed, f"talker/code2wav tensors changed: {changed[:10]}"
    assert (saved / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (saved / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_resume_continues_the_straight_run_exactly(flow):
    first, resumed = flow["first"], flow["resume"]
    assert first["checkpointed_losses"] == first["straight_losses"], "a DCP save (or disabling the talker) changed training"
    assert resumed["resumed_from"] == f"global_step_{STEPS // 2}" and resumed["step"] == STEPS // 2
    assert resumed["losses"] == first["straight_losses"][STEPS // 2:], (
        f"resumed losses {resumed['losses']} vs straight {first['straight_losses'][STEPS // 2:]}"
    )
    assert torch.equal(resumed["trained_logits"], first["trained_logits"])


def test_killed_saves_leave_the_previous_checkpoints(flow):
    out = flow["out"]
    # DCP: the save at the last step died on rank 1; only the half-way checkpoint is published
    # (the earlier ones were pruned by keep_last=1).
    assert (out / "resume" / f".global_step_{STEPS}.tmp").is_dir(), "the DCP save was not interrupted part way"
    assert sorted(p.name for p in (out / "resume").iterdir() if not p.name.startswith(".")) == [f"global_step_{STEPS // 2}"]
    # HF: a second save over hf_trained died mid-shard; hf_trained is still the first save, whole
    # (its logits were checked above, through plain transformers, after the killed save).
    partial = list((out / ".hf_trained.tmp").glob("*.safetensors"))
    assert partial, "the HF save was not interrupted part way"
    assert any(_is_truncated(p) for p in partial), "no shard of the killed save was cut short"
    read_checkpoint(out / "hf_trained")


def _is_truncated(path):
    try:
        read_header(path)
    except CheckpointError:
        return True
    return False


def test_memory_per_rank(flow):
    """Each rank reads exactly its own shard's bytes; peak RSS grows by its shard plus at most one
    parameter on load, and by at most one whole parameter (plus a receive buffer) on save."""
    first = flow["first"]
    full_mid = checkpoint_nbytes(flow["src"].parent / "mid")
    full_tiny = checkpoint_nbytes(flow["src"])
    print(f"\nper-rank memory, FSDP=2 x EP=2 on {WORLD} gloo ranks (peak RSS over the call, minus RSS before it):")
    for label, rows, full in (("tiny omni", first["tiny"], full_tiny), ("mid thinker", first["mid"], full_mid)):
        print(f"  {label}: full model {full / MiB:.2f} MiB")
        for rank, r in enumerate(rows):
            print(
                f"    rank {rank}: read {r['read'] / MiB:.2f} MiB (own shard {r['local'] / MiB:.2f}); "
                f"load peak +{(r['load']['peak'] - r['load']['before']) / MiB:.1f} MiB (kept +{(r['load']['after'] - r['load']['before']) / MiB:.1f}), "
                f"save peak +{(r['save']['peak'] - r['save']['before']) / MiB:.1f} MiB; process peak {r['save']['peak'] / MiB:.0f} MiB"
            )
    for label, rows in (("tiny", first["tiny"]), ("mid", first["mid"])):
        assert all(r["read"] == r["local"] for r in rows), f"{label}: a rank read more than its own shard: {rows}"
    assert sum(r["local"] for r in first["mid"]) == full_mid, "the ranks' shards do not add up to the model"
    for rank, r in enumerate(first["mid"]):
        load_peak = r["load"]["peak"] - r["load"]["before"]
        save_peak = r["save"]["peak"] - r["save"]["before"]
        assert load_peak <= r["local"] + r["largest_param"] + 16 * MiB, f"rank {rank}: load peak +{load_peak / MiB:.1f} MiB"
        assert save_peak <= 2 * r["largest_param"] + 16 * MiB, f"rank {rank}: save peak +{save_peak / MiB:.1f} MiB"
        assert max(load_peak, save_peak) < full_mid, f"rank {rank} held as much as the whole model"
