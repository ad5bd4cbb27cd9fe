"""The main job: recipes, overrides and layouts, the training data path, VeOmni's CPU gaps, a short
2-rank CPU training run (FSDP2 × Ulysses SP 2 × EP 2) whose loss falls and which counts skipped
media, and failures that end the whole job with their message: a rank that raises or hangs, a
NaN loss (skipped or stopping the job)."""

import json
import time
from pathlib import Path

import pytest
import torch

from veomni_omni.recipe import RecipeError, check_layout, load_recipe, model_config, parse_overrides
from veomni_omni.testing import run_ranks, tiny_thinker_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
TRAIN = str(ROOT / "veomni_omni" / "train.py")
FAULTS = str(ROOT / "tests" / "dist" / "train_faults.py")
# A few steps on a small synthetic set: what the multi-rank tests below run.
SHORT = ["train.log_steps=1", "train.eval_steps=0", "data.synthetic.train_samples=48", "data.synthetic.eval_samples=16",
         "data.synthetic.corrupt_train_samples=3", "data.pack_tokens=256", "train.optimizer.lr=3e-3",
         "train.optimizer.lr_warmup_ratio=0", "train.optimizer.lr_decay_style=constant"]


# --------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.train.steps >= 1 and recipe.source == str(path)


def test_tiny_recipe_is_the_two_rank_sp_ep_job():
    recipe = load_recipe(TINY)
    assert recipe.model.config_path == "tiny" and recipe.train.accelerator.ulysses_size == 2
    assert recipe.train.accelerator.ep_size == 2 and recipe.data.synthetic.corrupt_train_samples > 0
    check_layout(recipe, world_size=2)
    config = model_config(load_recipe(TINY, ["model.tiny.vision.hidden_size=48", "model.tiny.initializer_range=0.07"]))
    assert config.vision_config.hidden_size == 48 and config.vision_config.out_hidden_size == config.text_config.hidden_size
    assert {c.initializer_range for c in (config, config.text_config, config.vision_config, config.audio_config)} == {0.07}


def test_overrides_are_typed_and_nested():
    recipe = load_recipe(TINY, ["train.steps=7", "train.optimizer.lr=1e-3", "model.tiny.text.hidden_size=48",
                                "data.overflow=truncate", "train.optimizer.betas=[0.9, 0.99]", "model.model_path=null"])
    assert recipe.train.steps == 7
    assert recipe.train.optimizer.lr == pytest.approx(1e-3)  # YAML reads "1e-3" as a string; coerced
    assert recipe.model.tiny.text["hidden_size"] == 48
    assert recipe.data.overflow == "truncate" and recipe.train.optimizer.betas == [0.9, 0.99]
    assert parse_overrides(["a.b= x=y"]) == [("a.b", "x=y")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimiser.lr=1", r"unknown recipe key 'train.optimiser'.*did you mean 'train.optimizer'"),
        ("train.stpes=3", r"unknown recipe key 'train.stpes'.*did you mean 'train.steps'"),
        ("bogus=1", r"unknown recipe key 'bogus'; valid keys in the top level: data, model, train"),
        ("train.steps.x=1", r"'train.steps' is not a section"),
        ("train.steps=abc", r"train.steps must be an integer"),
        ("train.optimizer.lr=fast", r"train.optimizer.lr must be a number"),
        ("data.overflow=cut", r"data.overflow must be one of \['drop', 'truncate'\]"),
        ("train.accelerator.ep_size=0", r"train.accelerator.ep_size must be >= 1"),
        ("train.on_nonfinite_loss=ignore", r"train.on_nonfinite_loss must be one of \['skip', 'stop'\]"),
        ("train.steps", r"not of the form key=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(TINY, [override])


def test_unknown_key_in_the_file_fails_clearly(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  accelerator:\n    ulysess_size: 2\n")
    with pytest.raises(RecipeError, match=r"'train.accelerator.ulysess_size'.*did you mean 'train.accelerator.ulysses_size'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (3, [], r"ulysses_size=2 does not divide the 3 ranks; use one of \[1, 3\].*ep_size=2 does not divide the 3 ranks"),
        (4, ["train.accelerator.ep_size=3"], r"ep_size=3 does not divide the 4 ranks.*ep_size=3 does not divide the 8 experts"),
        (4, ["train.accelerator.ulysses_size=4", "train.accelerator.ep_size=1", "model.tiny.text.num_key_value_heads=3"],
         r"ulysses_size: Ulysses SP size 4 does not divide the text key/value heads \(3"),
        (8, ["train.accelerator.ulysses_size=8", "train.accelerator.ep_size=1"],
         r"does not divide the text attention heads \(4\).*vision heads \(4\)"),
    ],
)
def test_impossible_layouts_fail_with_what_to_change(world, overrides, message):
    with pytest.raises(RecipeError, match=message):
        check_layout(load_recipe(TINY, overrides), world)


def test_layouts_that_fit_and_checkpoint_configs(tmp_path):
    check_layout(load_recipe(TINY, ["train.accelerator.ulysses_size=4"]), 4)  # SP and EP each divide the ranks
    tiny_thinker_config().save_pretrained(tmp_path)  # a checkpoint's config is read from disk, no weights
    with pytest.raises(RecipeError, match="Ulysses SP size 8"):
        check_layout(load_recipe(TINY, [f"model.config_path={tmp_path}", "train.accelerator.ulysses_size=8"]), 8)
    with pytest.raises(RecipeError, match="model.config_path: cannot read a model config"):
        check_layout(load_recipe(TINY, [f"model.config_path={tmp_path / 'missing'}"]), 2)


@pytest.mark.parametrize("name, world", [("qwen3_omni_30b_a3b_8gpu.yaml", 8), ("qwen3_omni_30b_a3b_multinode.yaml", 32)])
def test_gpu_recipes_fit_the_released_model_on_their_ranks(name, world):
    from veomni_omni.bench.configs import real_thinker_config

    recipe = load_recipe(ROOT / "recipes" / name)
    check_layout(recipe, world, config=real_thinker_config())
    assert recipe.train.device == "cuda" and recipe.train.gradient_checkpointing and recipe.train.mixed_precision.enable


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # @record under pytest's captured stderr
def test_cli_reports_recipe_and_layout_errors_before_starting(capsys, monkeypatch):
    import torch.distributed as dist

    from veomni_omni.train import main

    assert main([str(TINY), "train.stpes=3"]) == 2
    assert "did you mean 'train.steps'" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node 3 sets it
    assert main([str(TINY)]) == 2
    assert "parallel layout impossible on 3 rank(s)" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "8")
    gpu = str(ROOT / "recipes" / "qwen3_omni_30b_a3b_8gpu.yaml")
    assert main([gpu, f"model.config_path={TINY.parent}"]) == 2
    assert "model.config_path: cannot read a model config" in capsys.readouterr().err
    assert main([gpu, "model.config_path=tiny", "data.train_path=/nonexistent/train.jsonl"]) == 2
    assert "data.train_path: no such file '/nonexistent/train.jsonl'" in capsys.readouterr().err
    assert not dist.is_initialized()


# ------------------------------------------------------------------------ VeOmni on CPU
def test_import_closes_veomni_cpu_gaps():
    """`import veomni_omni` lets VeOmni's distributed set-up run on CPU; `unpatched()` shows upstream's gaps."""
    import veomni.trainer.base  # noqa: F401  (binds these names by import)
    from veomni.utils import device, helper

    import veomni_omni

    assert device.get_dist_comm_backend() == "gloo" and veomni.trainer.base.get_dist_comm_backend() == "gloo"
    torch_device = helper.get_torch_device()
    assert torch_device.max_memory_allocated() > 0 and torch_device.memory_stats()["num_alloc_retries"] == 0
    torch_device.empty_cache()
    torch_device.synchronize()  # the rest is torch.cpu's own
    with veomni_omni.unpatched():
        with pytest.raises(RuntimeError, match="No available distributed communication backend"):
            veomni.trainer.base.get_dist_comm_backend()
        assert not hasattr(helper.get_torch_device(), "memory_stats")
    assert veomni.trainer.base.get_dist_comm_backend() == "gloo"


# ---------------------------------------------------------------------------- data path
@pytest.fixture(scope="module")
def encoder():
    from veomni_omni.data.processor import build_tiny_processor
    from veomni_omni.data.samples import SampleEncoder
    from veomni_omni.testing import tiny_thinker_config

    config = tiny_thinker_config()
    return SampleEncoder(build_tiny_processor(), config, max_tokens=128), config


def test_data_parallel_groups_get_disjoint_samples_and_packs_respect_the_budget(encoder):
    from veomni_omni.data import synthetic
    from veomni_omni.train_data import Pipeline

    enc, config = encoder
    samples = synthetic.generate(24)
    seen = []
    for dp_rank in range(2):
        pipe = Pipeline(samples, enc, config, dp_size=2, dp_rank=dp_rank, sp_size=1, sp_rank=0, sp_group=None,
                        pack_tokens=160, seed=3, cache=None, epochs=1)
        mine = []
        while (mb := pipe.next_micro_batch()) is not None:
            assert int(mb.inputs["attention_mask"].sum()) <= 160
            assert mb.inputs["position_ids"].shape[:2] == (3, len(mb.samples))
            mine += [i for i, _ in mb.samples]
        seen.append(mine)
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(24))


def test_corrupt_and_missing_media_are_skipped_and_counted(tmp_path, encoder, caplog):
    from veomni_omni.recipe import SyntheticData
    from veomni_omni.train_data import Pipeline, _write_synthetic
    from veomni_omni.data import synthetic

    enc, config = encoder
    _write_synthetic(SyntheticData(train_samples=32, eval_samples=0, corrupt_train_samples=4), tmp_path)
    samples = synthetic.read_jsonl(tmp_path / "train.jsonl")
    corrupted = {i for i, s in enumerate(samples) if s.get("corrupted")}
    assert len(corrupted) == 4
    pipe = Pipeline(samples, enc, config, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0, sp_group=None,
                    pack_tokens=256, seed=0, cache={}, epochs=2)
    used, skipped = [], 0
    while (mb := pipe.next_micro_batch()) is not None:
        used += [i for i, _ in mb.samples]
        skipped += mb.skipped
    assert pipe.skipped_ids == corrupted and skipped == pipe.skipped_total == 8  # twice each (two epochs)
    assert sorted(used) == sorted(2 * [i for i in range(32) if i not in corrupted])
    messages = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert any("file not found" in m for m in messages) and any("cannot decode" in m for m in messages)


def test_a_sample_whose_placeholders_do_not_match_its_audio_is_named_before_the_forward(encoder):
    """The pipeline checks each micro batch on the host and builds no model inputs for a bad one;
    the train loop raises it on every rank at once (raise_on_problems, multi-rank in test_bad_input)."""
    from veomni_omni.data import synthetic
    from veomni_omni.data.checks import BadInputError, raise_on_problems
    from veomni_omni.train_data import Pipeline

    enc, config = encoder
    samples = [s for s in synthetic.generate(40) if s["task"] == "audio_pitch"][:2]
    bad_id = samples[1]["id"]

    def drop_one_audio_token(sample):
        encoded = dict(enc(sample))
        if sample["id"] == bad_id:
            ids = encoded["input_ids"]
            first = int((ids == config.audio_token_id).nonzero()[0])
            encoded["input_ids"] = torch.cat([ids[:first], ids[first + 1:]])
            encoded["labels"] = torch.cat([encoded["labels"][:first], encoded["labels"][first + 1:]])
        return encoded

    pipe = Pipeline(samples, drop_one_audio_token, config, dp_size=1, dp_rank=0, sp_size=1, sp_rank=0, sp_group=None,
                    pack_tokens=512, seed=0, cache=None, epochs=1)
    mb = pipe.next_micro_batch()
    assert len(mb.samples) == 2 and mb.inputs == {}
    assert len(mb.problems) == 1 and bad_id in mb.problems[0] and "audio" in mb.problems[0], mb.problems
    with pytest.raises(BadInputError, match=bad_id):
        raise_on_problems(mb.problems)


def test_sequence_parallel_shards_cover_the_packed_sequence(encoder):
    from veomni_omni.data import synthetic
    from veomni_omni.train_data import model_inputs

    enc, config = encoder
    encoded = [enc(s) for s in synthetic.generate(8)]
    length = sum(len(s["input_ids"]) for s in encoded)
    shards = [model_inputs(encoded, config, 2, r) for r in range(2)]
    ids = torch.cat([s["input_ids"] for s in shards], dim=1)[0, :length]
    assert torch.equal(ids, torch.cat([s["input_ids"] for s in encoded]))
    labels = sum(int((s["labels"] != -100).sum()) for s in shards)
    assert labels == sum(int((s["labels"][1:] != -100).sum()) for s in encoded)  # first label of a sample is dropped


# ------------------------------------------------------------------------------- the job
def test_two_rank_cpu_training_learns_and_counts_skipped_media(tmp_path):
    """A few steps of the real entry point (FSDP2 over 2 ranks, Ulysses SP 2, EP 2, gloo): the loss
    falls, corrupt media are skipped and counted, the model is saved (EP slices gathered) and the
    summary is the last line."""
    out = tmp_path / "run"
    output = run_ranks(TRAIN, 2, [str(TINY), f"train.output_dir={out}", "train.steps=14", "train.save_steps=14", *SHORT], timeout_s=150)
    lines = [line for line in output.splitlines() if line.strip()]
    summary = json.loads(lines[-1])
    assert set(summary) == {"eval_accuracy", "chance", "steps", "wall_s", "checkpoint"}
    assert set(summary["eval_accuracy"]) == {"image", "audio", "video", "text"} and summary["chance"] == 0.25
    assert summary["steps"] == 14 and Path(summary["checkpoint"]).is_dir()
    assert "dp 1 x ulysses sp 2, experts over ep 2" in output
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "checkpoints" / "global_step_14").is_dir()  # DCP (model + optimizer)

    details = json.loads((out / "summary.json").read_text())
    losses = [v for _, v in details["losses"]]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert details["skipped_distinct"] == 3 and details["nonfinite_steps"] == [], details
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 14 and all("tok/s" in line and "skipped" in line for line in step_lines)

    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    model = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(summary["checkpoint"])
    assert model.config.text_config.vocab_size == 512
    experts = model.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == 8 and torch.isfinite(experts.gate_up_proj).all()
    # from scratch, every rank's shard starts from its own values: no halves repeating across ranks or EP ranks
    assert not torch.equal(experts.gate_up_proj[:4], experts.gate_up_proj[4:])
    router = model.model.language_model.layers[0].mlp.gate.weight
    embed = model.model.language_model.embed_tokens.weight
    assert not torch.equal(router[:4], router[4:]) and not torch.equal(embed[:256], embed[256:])

    # Fine-tuning from that checkpoint: read by veomni_omni.checkpoint into the FSDP2 x EP shards
    # (each rank its own slices); the first loss continues where the first run ended.
    again = tmp_path / "again"
    output = run_ranks(TRAIN, 2, [str(TINY), f"train.output_dir={again}", "train.steps=2", f"model.config_path={out / 'hf_ckpt'}",
                                  f"model.model_path={out / 'hf_ckpt'}", "train.plot=false", *SHORT], timeout_s=150)
    resumed = [v for _, v in json.loads((again / "summary.json").read_text())["losses"]]
    assert resumed[0] < 0.8 * sum(losses[:3]) / 3, (resumed, losses)
    reloaded = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(again / "hf_ckpt")
    assert reloaded.config.text_config.vocab_size == 512


def _failing_job(tmp_path, fault, rank, step, *overrides, timeout_s=90):
    """Run the job with a fault injected; return (error text, seconds) of a run that must fail."""
    args = [fault, str(rank), str(step), str(TINY), f"train.output_dir={tmp_path / 'run'}", "train.steps=6",
            "train.save_hf=false", "train.plot=false", *SHORT, *overrides]
    begin = time.time()
    with pytest.raises(RuntimeError, match="failed") as failure:
        run_ranks(FAULTS, 2, args, timeout_s=timeout_s)
    return str(failure.value), time.time() - begin


def test_a_rank_that_raises_ends_the_job_with_its_message(tmp_path):
    error, seconds = _failing_job(tmp_path, "raise", 1, 3)
    assert "injected fault on rank 1 at step 3" in error
    assert seconds < 60, f"the job took {seconds:.0f} s to end after a rank failed"


def test_a_rank_that_hangs_times_the_job_out(tmp_path):
    """The other rank waits in a collective for train.dist_timeout_s, then the job ends."""
    error, seconds = _failing_job(tmp_path, "hang", 1, 3, "train.dist_timeout_s=10")
    assert "a collective waited longer than train.dist_timeout_s=10 s" in error and "imed out" in error, error[-3000:]
    assert seconds < 80


def test_nan_loss_is_reported_and_its_update_skipped(tmp_path):
    out = tmp_path / "run"
    output = run_ranks(FAULTS, 2, ["nan", "1", "3", str(TINY), f"train.output_dir={out}", "train.steps=5",
                                   "train.save_hf=false", "train.plot=false", *SHORT], timeout_s=90)
    injected = next(line for line in output.splitlines() if line.startswith("injected nan: "))
    report = next(line for line in output.splitlines() if "non-finite loss" in line)
    assert "step 3:" in report and "update skipped" in report, report
    reported = report.split("samples of the step: ")[1].split(";")[0]
    assert set(reported.split(", ")) == set(injected.removeprefix("injected nan: ").split(", ")), (injected, report)
    details = json.loads((out / "summary.json").read_text())
    assert details["nonfinite_steps"] == [3] and [s for s, _ in details["losses"]] == [1, 2, 4, 5], details
    assert all(v == v for _, v in details["losses"])  # the steps after the NaN trained on finite weights


def test_nan_loss_stops_the_job_when_the_recipe_says_so(tmp_path):
    error, _ = _failing_job(tmp_path, "nan", 0, 2, "train.on_nonfinite_loss=stop")
    assert "step 2: non-finite loss" in error and "stopping (train.on_nonfinite_loss=stop)" in error, error[-3000:]


def test_describe_nonfinite_names_the_step_the_ranks_and_the_samples():
    from veomni_omni.train import describe_nonfinite

    text = describe_nonfinite(7, float("nan"), float("nan"), [(True, ["a", "b"]), (False, ["c", "d"])])
    assert text.startswith("step 7: non-finite loss nan") and "rank(s) [1]" in text and text.endswith("samples of the step: c, d")
    text = describe_nonfinite(8, 1.5, float("inf"), [(True, ["a"]), (True, ["b"])])
    assert "gradients non-finite" in text and text.endswith("a, b")
