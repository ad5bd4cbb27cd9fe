"""Released HF checkpoints in and out through VeOmni's own weight loading and HF export.

On gloo (tests/dist/veomni_ckpt.py), one process group per layout (FSDP2 over 2 ranks; EP 2): a
tiny top-level model saved by plain transformers (released layout) loads through VeOmni's
`build_parallelize_model(weights_path=...)`, with every rank reading and with VeOmni's default rank-0
broadcast, with the talker kept or disabled, and into a thinker alone; every gathered parameter
equals `from_pretrained` (computed here without the patches) bit for bit. A checkpoint missing an
expert key (and carrying an unknown one) raises CheckpointError naming both, on every rank, and in
broadcast mode ends the job instead of hanging. VeOmni's HuggingfaceCkptCallback writes the released
layout, which a process that never imports veomni/veomni_omni loads with plain transformers.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_checkpoint import CARRIED, CORRUPTIONS, EXPECTED_MESSAGE, plain_reference, same_bytes, sources  # noqa: F401
from transformers import Qwen3OmniMoeForConditionalGeneration

import veomni_omni
from veomni_omni.checkpoint import CheckpointError, checkpoint_nbytes
from veomni_omni.checkpoint import veomni_io
from veomni_omni.checkpoint.safetensors_io import INDEX_NAME, read_checkpoint
from veomni_omni.checkpoint.lora import is_adapter_param
from veomni_omni.launch import run_ranks
from veomni_omni.tiny import tiny_omni_config, tiny_thinker_config

WORKER = str(Path(__file__).parent / "dist" / "veomni_ckpt.py")
WORLD = 2
LAYOUTS = {"fsdp2": 1, "ep2": 2}  # name -> EP size (FSDP2 spans both ranks)
BROKEN = ("unexpected expert", "missing expert")  # test_checkpoint's corruptions, both in one checkpoint (this order: the first copies the key the second deletes)
HF_SAVE_STEPS, LAST_STEP = 2, 3  # as the worker's callback calls

PLAIN_STATE_DICT = """
import sys, torch
from transformers import Qwen3OmniMoeForConditionalGeneration
checkpoint, out_file = sys.argv[1:3]
state = Qwen3OmniMoeForConditionalGeneration.from_pretrained(checkpoint).state_dict()
assert not any(m.split(".")[0] in ("veomni_omni", "veomni") for m in sys.modules), "plain transformers only"
torch.save(state, out_file)
"""


@pytest.fixture(scope="module")
def inputs(sources, tmp_path_factory):
    src, _ = sources
    root = tmp_path_factory.mktemp("veomni_ckpt_inputs")
    broken = root / "broken"
    shutil.copytree(src, broken)
    for corruption in BROKEN:
        CORRUPTIONS[corruption](broken)
    tiny_thinker_config().save_pretrained(root / "thinker_config")
    return {"source": str(src), "broken": str(broken), "thinker_config": str(root / "thinker_config")}


@pytest.fixture(scope="module")
def reference(sources):
    return plain_reference(sources[0]).state_dict()


def _run(inputs, phase, ep, out):
    spec = dict(inputs, phase=phase, ep=ep)
    (out / f"{phase}.json").write_text(json.dumps(spec))
    return run_ranks(WORKER, WORLD, [str(out / f"{phase}.json"), str(out)], timeout_s=400)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"veomni_ckpt_{request.param}")
    _run(inputs, "cases", LAYOUTS[request.param], out)
    return {"name": request.param, "out": out, **torch.load(out / "cases.pt", weights_only=False)}


def _differing(got: dict, want: dict) -> list[str]:
    assert set(got) == set(want), f"parameter names differ: {sorted(set(got) ^ set(want))[:10]}"
    return [name for name, value in want.items() if not torch.equal(got[name], value)]


def _without_carried(state: dict) -> dict:
    return {name: value for name, value in state.items() if not name.startswith(CARRIED)}


@pytest.mark.parametrize("case", ["omni_every_rank", "omni_broadcast", "no_talker", "thinker"])
def test_veomni_loader_equals_from_pretrained(layout, reference, case):
    if case == "thinker":
        want = {name.removeprefix("thinker."): value for name, value in reference.items() if name.startswith("thinker.")}
    elif case == "no_talker":
        want = _without_carried(reference)
    else:
        want = reference
    differing = _differing(layout[case]["weights"], want)
    assert not differing, f"{layout['name']} {case}: VeOmni's load differs from from_pretrained: {differing[:10]}"


def test_what_each_rank_reads(layout, sources):
    """VeOmni's loader with a fusing converter reads whole tensors: every rank all of them, or rank 0
    all of them in broadcast mode. Each key reaches the converter exactly once per reading rank."""
    total = checkpoint_nbytes(sources[0])
    fed = {case: layout[case]["bytes_fed"] for case in ("omni_every_rank", "omni_broadcast", "no_talker", "thinker")}
    print(f"\n{layout['name']}: checkpoint {total} bytes; bytes fed to each rank's converter: {fed}")
    assert fed["omni_every_rank"] == fed["thinker"] == [total] * WORLD
    assert fed["omni_broadcast"] == fed["no_talker"] == [total] + [0] * (WORLD - 1)


def test_missing_and_unexpected_keys_raise_on_every_rank(layout):
    errors = layout["broken"]
    assert all(errors), f"{layout['name']}: a rank loaded the broken checkpoint: {errors}"
    for rank, error in enumerate(errors):
        assert error.startswith("CheckpointError"), f"rank {rank}: {error}"
        for corruption in BROKEN:
            for part in EXPECTED_MESSAGE[corruption]:
                assert part in error, f"rank {rank}: {part!r} not in the error:\n{error}"


def test_stream_load_refuses_the_fusing_converter(layout):
    if layout["name"] != "ep2":
        pytest.skip("VeOmni streams per rank only with an expert-parallel plan")
    for error in layout["stream_load"]:
        assert error and error.startswith("NotImplementedError") and "ReleasedLayoutConverter" in error, error


def test_broken_checkpoint_in_broadcast_mode_ends_the_job(inputs, tmp_path):
    """VeOmni's default mode runs the converter on rank 0 only: rank 0 raises and torchrun stops the
    rank waiting in VeOmni's broadcast (a hang would be a TimeoutError)."""
    with pytest.raises(RuntimeError) as failure:
        _run(inputs, "broadcast_error", 1, tmp_path)
    message = str(failure.value)
    assert "CheckpointError" in message, message[-3000:]
    for part in EXPECTED_MESSAGE["missing expert"]:
        assert part in message, message[-3000:]


def test_callback_exports_the_released_layout(layout, reference, sources):
    src = sources[0]
    save_path = Path(layout["export"]["save_path"])
    assert save_path == layout["out"] / "run" / "checkpoints"
    exported = [save_path / f"global_step_{step}" / "hf_ckpt" for step in (HF_SAVE_STEPS, LAST_STEP)]
    assert all((d / INDEX_NAME).is_file() for d in exported), sorted(str(p) for p in save_path.rglob("*"))
    assert all((d.parent / ".metadata").is_file() for d in exported), "VeOmni's DCP checkpoint of the step is missing"
    assert not list(save_path.rglob(".*.tmp")), "a staging directory was left behind"

    source_entries = read_checkpoint(src)
    for directory in exported:
        saved = read_checkpoint(directory)
        assert {k: (e.dtype, e.shape) for k, e in saved.items()} == {k: (e.dtype, e.shape) for k, e in source_entries.items()}
        carried = [k for k in source_entries if k.startswith(CARRIED)]
        changed = [k for k in carried if not same_bytes(source_entries[k].file, k, saved[k].file, k)]
        assert carried and not changed, f"talker/code2wav tensors changed: {changed[:10]}"
        assert (directory / "config.json").read_bytes() == (src / "config.json").read_bytes()
        assert (directory / "processor_config.json").is_file() and (directory / "tokenizer.json").is_file()

    state_file = layout["out"] / "plain_state.pt"
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_STATE_DICT, str(exported[-1]), str(state_file)], capture_output=True, text=True, timeout=180
    )
    assert plain.returncode == 0, f"plain transformers could not load the export:\n{plain.stderr[-4000:]}"
    loaded = torch.load(state_file)
    trained = layout["export"]["weights"]
    assert not _differing(trained, {k: -2 * v for k, v in _without_carried(reference).items()}), "the exported model is not the trained one"
    differing = _differing(loaded, {**reference, **trained})
    assert not differing, f"plain transformers' weights differ from the trained model (talker: the source): {differing[:10]}"


# ----------------------------------------------------------------------------- single process
@pytest.mark.parametrize("corruption", ["missing expert", "unexpected expert", "wrong shape"])
def test_single_process_loader_names_the_key(sources, tmp_path, corruption):
    from veomni.models.module_utils import load_model_weights

    broken = tmp_path / "broken"
    shutil.copytree(sources[0], broken)
    CORRUPTIONS[corruption](broken)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    with pytest.raises(CheckpointError) as error:
        load_model_weights(model, str(broken), init_device="cpu")
    for part in EXPECTED_MESSAGE[corruption]:
        assert part in str(error.value), f"{part!r} not in the error:\n{error.value}"


def test_other_models_keep_veomni_export(monkeypatch, tmp_path):
    """The callback patch applies to the Qwen3-Omni classes only: another model reaches VeOmni's own
    `_save_checkpoint` (DCP save, then its consolidating `save_hf_safetensor`); ours keeps the DCP save
    and replaces the consolidation."""
    from veomni.trainer.callbacks import checkpoint_callback

    calls = []
    monkeypatch.setattr(checkpoint_callback.CheckpointerCallback, "_save_checkpoint", lambda self, state: calls.append("dcp"))
    monkeypatch.setattr(checkpoint_callback, "save_hf_safetensor", lambda **kw: calls.append(kw["save_hf_safetensor_path"]))
    monkeypatch.setattr(checkpoint_callback, "dist", SimpleNamespace(barrier=lambda: None))
    monkeypatch.setattr(veomni_io, "export_hf_checkpoint", lambda *a: calls.append("released layout"))
    monkeypatch.setattr(veomni_io, "dist", SimpleNamespace(barrier=lambda: None))
    args = SimpleNamespace(
        train=SimpleNamespace(checkpoint=SimpleNamespace(save_path=str(tmp_path), manager="dcp", output_dir=str(tmp_path)), global_rank=0),
        model=SimpleNamespace(fqn_to_index_mapping=None),
    )
    callback = checkpoint_callback.HuggingfaceCkptCallback.__new__(checkpoint_callback.HuggingfaceCkptCallback)
    callback.trainer = SimpleNamespace(args=args, model=torch.nn.Linear(2, 2), model_assets=[], checkpointer=SimpleNamespace(wait_for_pending_save=lambda: None))
    callback.parallel_state = None
    callback._save_checkpoint(SimpleNamespace(global_step=7))
    assert calls == ["dcp", str(tmp_path / "global_step_7" / "hf_ckpt")]

    calls.clear()
    callback.trainer.model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    callback._save_checkpoint(SimpleNamespace(global_step=8))
    assert calls == ["dcp", "released layout"] and callback._last_saved_step == 8


def test_patches_are_undone_with_the_set():
    from veomni.trainer.callbacks.checkpoint_callback import HuggingfaceCkptCallback

    with veomni_omni.unpatched():
        assert "_create_checkpoint_tensor_converter" not in Qwen3OmniMoeForConditionalGeneration.__dict__
        assert HuggingfaceCkptCallback._save_checkpoint is not veomni_io.hf_ckpt_callback_save
    assert HuggingfaceCkptCallback._save_checkpoint is veomni_io.hf_ckpt_callback_save


def test_lora_base_is_held_in_the_param_dtype(layout):
    """LoRA with mixed precision (param bf16): our FSDP2 wrapping holds the frozen base in bf16 (VeOmni's in fp32),
    the adapters in fp32, and one forward + backward gives the same loss and adapter gradients, bit for bit."""
    ours, veomni = layout["lora_param_dtype"]["ours"], layout["lora_param_dtype"]["veomni"]
    assert all(d == {"frozen": ["torch.bfloat16"], "adapters": ["torch.float32"]} for d in ours["dtypes"]), ours["dtypes"]
    assert all(d == {"frozen": ["torch.float32"], "adapters": ["torch.float32"]} for d in veomni["dtypes"]), veomni["dtypes"]
    assert all(torch.equal(a, b) for a, b in zip(ours["loss"], veomni["loss"])), (ours["loss"], veomni["loss"])
    assert ours["grads"].keys() == veomni["grads"].keys() and any(".mlp.experts." in name for name in ours["grads"])
    assert all(is_adapter_param(name) for name in ours["grads"]), "only the adapters train"
    differing = [name for name in ours["grads"] if not torch.equal(ours["grads"][name], veomni["grads"][name])]
    assert not differing, f"{layout['name']}: adapter gradients differ: {differing[:5]}"
