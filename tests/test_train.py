"""The main job (`veomni_omni.train`): VeOmni's VLMTrainer with veomni_omni's additions, from recipes
that are VeOmni configs plus an `omni:` section.

Recipes parse through VeOmni's own `parse_args` (unknown keys refused); layouts are checked before
anything is built; a short 2-rank CPU run (FSDP2 x EP 2, gloo) learns, counts skipped media, evaluates,
plots, exports and reports; a fine-tune from that export continues; faults end the job with their
message (a rank that raises, a rank that hangs, NaN losses skipped or stopping the job).
"""

import json
import re
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from veomni_omni.launch import run_ranks

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
FAULTS = str(ROOT / "tests" / "dist" / "train_faults.py")


def _job_args(out: Path, *overrides: str) -> list[str]:
    """A short run of the tiny recipe writing everything under `out`."""
    return [
        str(TINY), "--train.checkpoint.output_dir", str(out), "--model.model_path", str(out / "init"),
        "--data.train_path", str(out / "data" / "train.jsonl"), "--omni.eval_path", str(out / "data" / "eval.jsonl"),
        "--omni.synthetic.train_samples", "96", "--omni.synthetic.eval_samples", "16", "--omni.synthetic.corrupt_train_samples", "3",
        "--data.max_seq_len", "512", "--omni.eval_steps", "0", "--omni.log_steps", "1", *overrides,
    ]


def _parse(argv: list[str], monkeypatch):
    from veomni.arguments import parse_args

    from veomni_omni.train import OmniArguments

    if "WORLD_SIZE" not in os.environ:
        monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's, for the 2-rank tiny recipe; VeOmni's parser checks the SP size against it
    monkeypatch.setattr(sys, "argv", ["train", *argv])
    return parse_args(OmniArguments)


# ------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_has_only_known_keys(path):
    """Every key is one VeOmni's parser or our `omni:` section reads (the GPU recipes' CUDA kernels
    cannot be instantiated on this machine: VeOmni validates them against the installed packages)."""
    import yaml

    from veomni_omni.integration.config_keys import unknown_keys
    from veomni_omni.train import OmniArguments

    recipe = yaml.safe_load(path.read_text())
    assert unknown_keys(OmniArguments, recipe) == []


def test_tiny_recipe_is_the_two_rank_sp_ep_demo(monkeypatch):
    args = _parse([str(TINY)], monkeypatch)
    assert args.train.accelerator.ulysses_size == 2 and args.train.accelerator.ep_size == 2
    assert args.omni.tiny_model and args.omni.synthetic_data
    assert args.train.max_steps == 600 and args.omni.eval_steps == 200


def test_unknown_keys_fail_with_the_closest_spelling(monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  eval_steps: 200", "  eval_step: 200"))
    with pytest.raises(ValueError, match=r"omni.eval_step.*did you mean 'omni.eval_steps'"):
        _parse([str(bad)], monkeypatch)
    with pytest.raises(ValueError, match="omni.on_nonfinite_loss must be 'skip' or 'stop'"):
        _parse([str(TINY), "--omni.on_nonfinite_loss", "ignore"], monkeypatch)


@pytest.mark.parametrize("name, world", [("qwen3_omni_30b_a3b_8gpu.yaml", 8), ("qwen3_omni_30b_a3b_multinode.yaml", 32), ("qwen3_omni_30b_a3b_lora.yaml", 2)])
def test_gpu_recipes_fit_the_released_model_on_their_ranks(name, world, monkeypatch):
    from veomni_omni.bench.configs import real_thinker_config
    from veomni_omni.train import check_layout

    # On this GPU-less machine VeOmni refuses the CUDA kernels the recipes name: parse with eager ops.
    eager = [f"--model.ops_implementation.{op}_implementation" for op in (
        "cross_entropy_loss", "rms_norm", "swiglu_mlp", "rotary_pos_emb", "load_balancing_loss", "rms_norm_gated",
        "causal_conv1d", "chunk_gated_delta_rule", "moe")]
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = _parse([str(ROOT / "recipes" / name), *[x for op in eager for x in (op, "eager")]], monkeypatch)
    check_layout(args, real_thinker_config(), world)
    assert args.train.gradient_checkpointing.enable and args.train.accelerator.fsdp_config.mixed_precision.enable
    assert "flash_attention_2" in args.model.ops_implementation.attn_implementation  # varlen: packed samples apart


@pytest.mark.parametrize("overrides, world, message", [
    (["--train.accelerator.ep_size", "3", "--train.global_batch_size", "6"], 6, "does not divide the 8 experts; use one of [1, 2]"),
    (["--train.accelerator.ep_size", "4"], 2, "does not divide the 2 ranks"),
    (["--train.accelerator.ulysses_size", "8", "--train.accelerator.ep_size", "1"], 8, "does not divide the text attention heads (4), vision heads (4)"),
])
def test_impossible_layouts_fail_before_anything_is_built(overrides, world, message, monkeypatch):
    from veomni_omni.tiny import tiny_thinker_config
    from veomni_omni.train import check_layout

    monkeypatch.setenv("WORLD_SIZE", str(world))  # as torchrun sets it; VeOmni's parser reads it
    with pytest.raises(ValueError, match=re.escape(message)):
        check_layout(_parse([str(TINY), *overrides], monkeypatch), tiny_thinker_config(), world)


# ------------------------------------------------------------------------------------ the job
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "run"
    output = run_ranks("veomni_omni.train", 2, _job_args(out, "--train.max_steps", "14"), timeout_s=300, torchrun_args=("-m",))
    return out, output


def test_two_rank_cpu_training_learns_counts_skipped_media_and_reports(trained):
    out, output = trained
    lines = [line for line in output.splitlines() if line.strip()]
    summary = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    assert set(summary) == {"eval_accuracy", "chance", "steps", "wall_s", "checkpoint"}
    assert set(summary["eval_accuracy"]) == {"image", "audio", "video", "text"} and summary["chance"] == 0.25
    assert summary["steps"] == 14 and Path(summary["checkpoint"]).is_dir()
    assert (out / "loss.png").stat().st_size > 0
    details = json.loads((out / "summary.json").read_text())
    losses = [v for _, v in details["losses"]]
    assert len(losses) == 14 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert details["nonfinite_steps"] == []
    step_lines = [line for line in lines if "step " in line and "tok/s" in line]
    assert len(step_lines) == 14 and all("skipped" in line and "expert load" in line for line in step_lines)
    skipped = sum(int(line.split("| skipped ")[1].split(" ")[0]) for line in step_lines)
    corrupt = [json.loads(line)["id"] for line in (out / "data" / "train.jsonl").read_text().splitlines() if "corrupted" in line]
    assert len(corrupt) == 3 and skipped >= 3 and details["skipped_samples"] == skipped, (corrupt, skipped)
    assert all(f"skipping sample {sample_id}" in output for sample_id in corrupt)


def test_from_scratch_ranks_hold_distinct_weights(trained):
    """The tiny model is initialised whole once: no FSDP or EP shard repeats another's values."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    out, _ = trained
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out / "init")
    text = model.thinker.model.language_model
    experts, router, embed = text.layers[0].mlp.experts.gate_up_proj, text.layers[0].mlp.gate.weight, text.embed_tokens.weight
    assert not torch.equal(experts[:4], experts[4:]) and not torch.equal(router[:4], router[4:])
    assert not torch.equal(embed[:256], embed[256:])


def test_fine_tuning_from_the_export_continues_where_training_ended(trained, tmp_path):
    out, _ = trained
    first = [v for _, v in json.loads((out / "summary.json").read_text())["losses"]]
    export = next((out / "checkpoints").glob("global_step_14/hf_ckpt"))
    again = tmp_path / "again"
    args = _job_args(again, "--train.max_steps", "2", "--omni.plot", "false", "--train.checkpoint.save_hf_weights", "false")
    args[args.index("--model.model_path") + 1] = str(export)
    args += ["--omni.tiny_model", "false", "--data.train_path", str(out / "data" / "train.jsonl"),
             "--omni.eval_path", str(out / "data" / "eval.jsonl"), "--omni.synthetic_data", "false"]
    run_ranks("veomni_omni.train", 2, args, timeout_s=240, torchrun_args=("-m",))
    resumed = [v for _, v in json.loads((again / "summary.json").read_text())["losses"]]
    assert resumed[0] < 0.8 * sum(first[:3]) / 3, (resumed, first)


# ------------------------------------------------------------------------------------ faults
def _failing_job(tmp_path, fault, rank, step, *overrides, timeout_s=240):
    """Run the job with a fault injected; return (error text, seconds) of a run that must fail."""
    args = [fault, str(rank), str(step), *_job_args(tmp_path / "run", "--train.max_steps", "6", "--omni.plot", "false",
                                                   "--train.checkpoint.save_hf_weights", "false", *overrides)]
    begin = time.time()
    with pytest.raises(RuntimeError, match="failed") as failure:
        run_ranks(FAULTS, 2, args, timeout_s=timeout_s)
    return str(failure.value), time.time() - begin


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    error, seconds = _failing_job(tmp_path, "raise", 1, 3)
    assert "injected fault on rank 1 at step 3" in error


def test_a_rank_that_hangs_times_the_job_out(tmp_path):
    """The other rank waits in a collective for omni.dist_timeout_s, then the job ends with that message."""
    error, seconds = _failing_job(tmp_path, "hang", 1, 3, "--omni.dist_timeout_s", "20")
    assert "a collective waited longer than omni.dist_timeout_s=20.0 s" in error, error[-3000:]


def test_nan_loss_is_reported_and_its_update_skipped(tmp_path):
    out = tmp_path / "run"
    # data parallel (no SP), so that the NaN is one rank's: under SP both ranks of the group share its loss
    args = ["nan", "1", "3", *_job_args(out, "--train.max_steps", "5", "--omni.plot", "false", "--train.checkpoint.save_hf_weights", "false",
                                        "--train.accelerator.ulysses_size", "1", "--train.global_batch_size", "2")]
    output = run_ranks(FAULTS, 2, args, timeout_s=240)
    assert "injected nan on rank 1" in output
    report = next(line for line in output.splitlines() if "non-finite loss" in line)
    assert "step 3:" in report and "rank(s) [1]" in report and "update skipped" in report, report
    details = json.loads((out / "summary.json").read_text())
    assert details["nonfinite_steps"] == [3] and [s for s, _ in details["losses"]] == [1, 2, 4, 5], details
    assert all(v == v for _, v in details["losses"])  # the steps after the NaN trained on finite weights


def test_nan_loss_stops_the_job_when_the_recipe_says_so(tmp_path):
    error, _ = _failing_job(tmp_path, "nan", 0, 2, "--omni.on_nonfinite_loss", "stop")
    assert "step 2: non-finite loss" in error and "stopping (omni.on_nonfinite_loss=stop)" in error, error[-3000:]
