"""Resume through VeOmni's own trainer and checkpoints: a killed run continues exactly.

VeOmni's tasks/train_vlm.py (tests/dist/veomni_resume.py: its three lines after `import veomni_omni`,
plus a test-only callback recording each step and able to kill rank 1) trains the tiny model with
FSDP2 x EP 2 on 2 CPU ranks from a released-layout checkpoint and VeOmni-format JSONL data, saving
VeOmni's DCP checkpoint every 2 of 4 steps. Against the uninterrupted run:
  - rank 1 killed at the start of step 3, then `torchrun` again with `load_path: auto`: steps 3-4
    see the same batches with the same losses and grad norms, and the final checkpoint (model and
    optimizer, every tensor) and per-rank extra state (LR scheduler, data position, RNG) are
    bit-identical (the dynamic-batching loader's batch count included: VeOmni saved one too few);
  - the same kill under `torchrun --max-restarts=1` with `load_path: auto`: the job finishes by
    itself, identically;
  - a save killed part way (rank 1 dies inside DCP's write of step 4, re-saving over a complete
    step 4 after a restart from step 2 with other clipping) leaves the published step 4
    byte for byte as it was, and `auto` picks it;
  - a damaged newest checkpoint (a data, extra-state or metadata file missing or truncated) is not
    picked by `auto`, the previous complete one is (VeOmni alone picks the damaged one).
"""

import json
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from veomni.utils.checkpoint_utils import get_checkpoint_path

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.media import save_wav
from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.launch import run_ranks
from veomni_omni.testing import save_tiny_release

WORKER = str(Path(__file__).parent / "dist" / "veomni_resume.py")
WORLD, STEPS, SAVE_STEPS, DIE_AT = 2, 4, 2, 3
TIMEOUT_S = 600
COMPARED_EXTRA_STATE = ("global_step", "lr_scheduler", "train_dataloader", "torch_rng_state")


def _sample(i: int, root: Path, rng) -> dict:
    """Every sample differs in its tokens, so a wrong data position changes the batch digests."""
    kind = ("image", "audio", "text", "text")[i % 4]
    if kind == "image":
        shape, colour = synthetic.SHAPES[i % 4], list(synthetic.COLOURS)[(i // 4) % 4]
        Image.fromarray(synthetic.make_image(rng, shape, colour)).save(root / f"{i}.png")
        return {"images": [str(root / f"{i}.png")], "conversations": [
            {"from": "human", "value": f"<image>\nSample {i}: what shape?"}, {"from": "gpt", "value": shape}]}  # fmt: skip
    if kind == "audio":
        pitch = list(synthetic.PITCHES)[i % 4]
        save_wav(root / f"{i}.wav", synthetic.make_tone(rng, pitch, 1.0))
        return {"audios": [str(root / f"{i}.wav")], "conversations": [
            {"from": "human", "value": f"<audio>\nSample {i}: what pitch?"}, {"from": "gpt", "value": pitch}]}  # fmt: skip
    words = synthetic.NUMBER_WORDS
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"{words[i % 10]} plus {words[i // 10]}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": str(i % 10 + i // 10)}]}]}  # fmt: skip


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A released-layout tiny checkpoint with its processor, 16 JSONL samples and VeOmni's YAML."""
    root = tmp_path_factory.mktemp("veomni_resume")
    save_tiny_release(root / "model")
    (root / "media").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps(_sample(i, root / "media", rng)) + "\n")
    ops = {k: v for k, v in vars(eager_ops_config()).items() if k != "qat_implementation"}
    cfg = {
        "model": {"model_path": str(root / "model"), "ops_implementation": ops},
        "data": {"train_path": str(root / "train.jsonl"), "datasets_type": "mapping", "max_seq_len": 256, "dataloader": {"num_workers": 0}},
        "train": {
            "accelerator": {"ulysses_size": 1, "ep_size": 2, "fsdp_config": {"fsdp_mode": "fsdp2", "mixed_precision": {"enable": False}}},
            "optimizer": {"lr": 1.0e-3},
            "micro_batch_size": 1,
            "global_batch_size": 2,
            "max_steps": STEPS,
            "num_train_epochs": 1,
            "init_device": "meta",
            "seed": 0,
            # HF export is not what these tests are about; it has its own (tests/test_checkpoint_veomni.py)
            "checkpoint": {"save_steps": SAVE_STEPS, "save_hf_weights": False},
        },
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


def _train(config: Path, out: Path, die: str = "never", overrides=(), **launch) -> str:
    """One torchrun of the worker; `out/record` collects its steps, `out/output` is VeOmni's output_dir."""
    (out / "record").mkdir(parents=True, exist_ok=True)
    args = [str(out / "record"), die, str(config), "--train.checkpoint.output_dir", str(out / "output"), *overrides]
    return run_ranks(WORKER, WORLD, args, timeout_s=TIMEOUT_S, **launch)


def _killed(config: Path, out: Path, die: str, overrides=()) -> None:
    with pytest.raises(RuntimeError, match="failed"):
        _train(config, out, die, overrides, native_abort_retries=0)  # a retry would run past the kill
    assert (out / "record" / "died").exists(), "the test callback did not kill rank 1"


def _steps(out: Path) -> dict:
    """rank -> step -> the step's record; a step run again after a restart: its last record."""
    steps = {}
    for rank in range(WORLD):
        rows = [json.loads(line) for line in (out / "record" / f"steps_rank{rank}.jsonl").read_text().splitlines()]
        steps[rank] = {row["step"]: row for row in rows}
    return steps


def _checkpoint(out: Path, step: int) -> Path:
    return out / "output" / "checkpoints" / f"global_step_{step}"


def _dcp_tensors(path: Path, scratch: Path) -> dict:
    """Every tensor of a DCP checkpoint (model and optimizer state), flattened to dotted names."""
    dcp_to_torch_save(path, scratch)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", torch.load(scratch, weights_only=False))
    return flat


def _same(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, deque)) and isinstance(b, (list, tuple, deque)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is type(b) and hasattr(a, "__dict__"):  # e.g. the dataloader state's batching strategy
        return _same(vars(a), vars(b))
    return a == b


def _assert_same_run(got: Path, want: Path, tmp_path: Path) -> None:
    """Same per-step records for every step and rank, same final checkpoint and extra state."""
    got_steps, want_steps = _steps(got), _steps(want)
    for rank in range(WORLD):
        assert sorted(got_steps[rank]) == list(range(1, STEPS + 1)), f"rank {rank} recorded steps {sorted(got_steps[rank])}"
        for step in range(1, STEPS + 1):
            assert got_steps[rank][step] == want_steps[rank][step], f"rank {rank} step {step} differs from the uninterrupted run"
    got_t, want_t = _dcp_tensors(_checkpoint(got, STEPS), tmp_path / "got.pt"), _dcp_tensors(_checkpoint(want, STEPS), tmp_path / "want.pt")
    assert got_t.keys() == want_t.keys(), f"checkpoint keys differ: {sorted(got_t.keys() ^ want_t.keys())[:10]}"
    assert any(k.startswith("optimizer.state.") for k in got_t), "no optimizer state in the checkpoint"
    differing = [k for k in want_t if not _same(got_t[k], want_t[k])]
    assert not differing, f"{len(differing)} of {len(want_t)} checkpoint entries differ, e.g. {differing[:5]}"
    for rank in range(WORLD):
        name = f"extra_state/extra_state_rank_{rank}.pt"
        got_e = torch.load(_checkpoint(got, STEPS) / name, weights_only=False)
        want_e = torch.load(_checkpoint(want, STEPS) / name, weights_only=False)
        for key in COMPARED_EXTRA_STATE:
            assert _same(got_e[key], want_e[key]), f"rank {rank}'s {key} differs after the resume"


@pytest.fixture(scope="module")
def straight(config, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    _train(config, out)
    saved = sorted(p.name for p in (out / "output" / "checkpoints").iterdir())
    assert saved == [f"global_step_{s}" for s in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS)], f"checkpoints: {saved}"
    return out


def test_torchrun_again_after_a_killed_rank_resumes_exactly(config, straight, tmp_path):
    out = tmp_path / "run"
    _killed(config, out, f"step:{DIE_AT}")
    assert sorted(p.name for p in (out / "output" / "checkpoints").iterdir()) == ["global_step_2"]
    log = _train(config, out, overrides=["--train.checkpoint.load_path", "auto"])
    assert f"Load distributed checkpoint from {_checkpoint(out, 2)} successfully" in log
    _assert_same_run(out, straight, tmp_path)


def test_max_restarts_resumes_from_the_latest_checkpoint_by_itself(config, straight, tmp_path, monkeypatch):
    # torch 2.13's torchrun shares its rendezvous store with the workers' process group, and the
    # restarted gloo group can read the previous attempt's peer address (connectFullMesh "Connection
    # refused", pytorch/pytorch#135712); torch's own switch gives each attempt its own store.
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    out = tmp_path / "run"
    log = _train(config, out, f"step:{DIE_AT}", ["--train.checkpoint.load_path", "auto"], torchrun_args=("--max-restarts=1",))
    assert (out / "record" / "died").exists(), "the test callback did not kill rank 1"
    assert f"Load distributed checkpoint from {_checkpoint(out, 2)} successfully" in log
    _assert_same_run(out, straight, tmp_path)


def test_save_killed_part_way_leaves_the_published_checkpoint_intact(config, straight, tmp_path):
    """Restarted from step 2 with tighter gradient clipping (the run diverges: clipping is not part of
    the checkpoint), the run re-saves step 4 over the complete one and rank 1 dies inside DCP's write:
    global_step_4 must still be the old, complete checkpoint, byte for byte."""
    out = tmp_path / "run"
    shutil.copytree(straight / "output", out / "output")
    restart = ["--train.checkpoint.load_path", str(_checkpoint(out, 2)), "--train.optimizer.max_grad_norm", "0.01"]
    _killed(config, out, f"save:{STEPS}", restart)
    assert _files(_checkpoint(out, STEPS)) == _files(_checkpoint(straight, STEPS)), "the killed save changed the published checkpoint"
    assert (_checkpoint(out, STEPS).parent / f".global_step_{STEPS}.tmp").is_dir(), "no partial save left behind: did rank 1 die inside it?"
    assert get_checkpoint_path(str(out / "output"), True, "dcp") == str(_checkpoint(out, STEPS))


def _files(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _remove(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "data file removed": ("__1_3.distcp", _remove),
    "data file truncated": ("__0_5.distcp", _truncate),
    "extra state removed": ("extra_state/extra_state_rank_1.pt", _remove),
    "extra state truncated": ("extra_state/extra_state_rank_0.pt", _truncate),
    "metadata truncated": (".metadata", _truncate),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_is_not_picked(straight, tmp_path, damage):
    output = tmp_path / "output"
    shutil.copytree(straight / "output" / "checkpoints", output / "checkpoints")
    newest, previous = output / "checkpoints" / f"global_step_{STEPS}", output / "checkpoints" / f"global_step_{STEPS - SAVE_STEPS}"
    assert get_checkpoint_path(str(output), True, "dcp") == str(newest)
    name, damage_fn = DAMAGES[damage]
    damage_fn(newest / name)
    assert get_checkpoint_path(str(output), True, "dcp") == str(previous)
    if damage == "data file removed":  # what VeOmni alone does: resumes from it (and fails loading it)
        with veomni_omni.unpatched():
            assert get_checkpoint_path(str(output), True, "dcp") == str(newest)


def test_unfinished_saves_are_not_picked(straight, tmp_path):
    """A staging directory left by a killed save, and a global_step_N VeOmni started without
    .metadata (its HF export alone, or a save killed before DCP's metadata)."""
    output = tmp_path / "output"
    shutil.copytree(straight / "output" / "checkpoints", output / "checkpoints")
    newest = output / "checkpoints" / f"global_step_{STEPS}"
    shutil.copytree(newest, output / "checkpoints" / f".global_step_{STEPS + 2}.tmp")
    shutil.copytree(newest, output / "checkpoints" / f"global_step_{STEPS + 4}", ignore=shutil.ignore_patterns(".metadata"))
    assert get_checkpoint_path(str(output), True, "dcp") == str(newest)


def test_lora_run_resumes_exactly(config, tmp_path):
    """A LoRA run (`model.lora_config`: attention and per-expert adapters, EP 2) killed at step 3 and started
    again with `load_path: auto`: VeOmni's trainable-only checkpoint holds the adapters and their optimizer
    state, the base is loaded from the released checkpoint again, and the run matches the uninterrupted one."""
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["lora_config"] = {"rank": 4, "alpha": 8, "lora_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
    lora = tmp_path / "lora.yaml"
    lora.write_text(yaml.safe_dump(cfg))
    straight_lora = tmp_path / "straight"
    _train(lora, straight_lora)
    out = tmp_path / "run"
    _killed(lora, out, f"step:{DIE_AT}")
    log = _train(lora, out, overrides=["--train.checkpoint.load_path", "auto"])
    assert f"Load distributed checkpoint from {_checkpoint(out, 2)} successfully" in log
    model_keys = [k for k in _dcp_tensors(_checkpoint(out, STEPS), tmp_path / "keys.pt") if k.startswith("model.")]
    base = [k for k in model_keys if not (".lora_A." in k or ".lora_B." in k or k.endswith(".lora_scaling"))]  # the experts' scale: a buffer
    assert model_keys and not base, f"the checkpoint holds base weights: {base[:3]}"
    _assert_same_run(out, straight_lora, tmp_path)
