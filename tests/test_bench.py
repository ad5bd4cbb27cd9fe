"""The benchmark command: every benchmark runs in quick mode and keeps its JSON contract.

No timing is asserted (timings are machine- and load-dependent); only that the contract keys
exist, values are sane, and the correctness side-facts the benchmarks rely on hold (both
contenders compute the same loss from the same weights).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from veomni_omni.bench.__main__ import main as bench_main

MACHINE_KEYS = {"cpu", "cores", "torch", "transformers", "veomni", "date"}


@pytest.fixture
def one_thread():
    """Timed benchmarks run single-threaded here: on a loaded 2-core machine, spinning OpenMP
    threads make a step many times slower. Restores torch's thread count afterwards."""
    threads = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(threads)


def run_bench(capsys, *argv) -> tuple[int, dict, str]:
    code = bench_main(list(argv))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    return code, json.loads(lines[-1]), out


def assert_machine(payload):
    assert MACHINE_KEYS <= payload["machine"].keys(), payload["machine"]
    assert payload["machine"]["cores"] >= 1


def assert_ratio(payload):
    for key in ("ratio", "ratio_of_medians", "ratio_min", "ratio_max"):
        assert math.isfinite(payload[key]) and payload[key] > 0, (key, payload[key])
    assert payload["ratio_min"] <= payload["ratio"] <= payload["ratio_max"]


def test_overhead_contract(capsys, patched, one_thread):
    code, payload, out = run_bench(capsys, "overhead", "--quick", "--json", *one_thread)
    assert code == 0
    assert_ratio(payload)
    assert_machine(payload)
    assert payload["reps"] == 2 and payload["quick"]
    assert payload["same_loss"], payload["loss"]  # same weights, same batch: patched == unpatched
    assert "veomni_omni" in out and "hf" in out


def test_veomni_contract(capsys, patched, one_thread):
    from transformers.loss.loss_utils import LOSS_MAPPING

    stock_loss = LOSS_MAPPING["ForCausalLM"]
    code, payload, _ = run_bench(capsys, "veomni", "--quick", "--json", *one_thread)
    assert code == 0
    assert_ratio(payload)
    assert_machine(payload)
    assert payload["veomni_class"].startswith("veomni.models.transformers.qwen3_omni_moe.generated.")
    # VeOmni's model, loaded with our weights, computes our loss and gradients.
    ours, theirs = payload["loss"]["veomni_omni"], payload["loss"]["veomni"]
    assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert payload["max_rel_grad_diff"] < 1e-3
    assert LOSS_MAPPING["ForCausalLM"] is stock_loss, "veomni benchmark leaked VeOmni's loss into transformers"


@pytest.mark.parametrize("layout", [["--gpus", "8", "--ep", "8"], ["--gpus", "64", "--ep", "8", "--sp", "4"]])
def test_plan_contract(capsys, layout):
    code, payload, _ = run_bench(capsys, "plan", *layout, "--json")
    assert code == 0
    assert isinstance(payload["fits"], bool)
    assert 0 < payload["per_rank_gib"] < 1000
    assert payload["fits"] == (payload["per_rank_gib"] <= payload["gpu_mem_gib"])
    assert {"gpus", "ep", "sp", "ep_fsdp", "tokens_per_rank", "grad_ckpt"} <= payload["layout"].keys()
    assert payload["layout"]["gpus"] == int(layout[1])
    assert all(payload["design_check"].values()), (payload["params_b"], payload["design_params_b"])
    acts = payload["activations_gib"]
    assert 0 < acts["with_ckpt"] < acts["without_ckpt"]
    assert_machine(payload)


def test_plan_more_gpus_need_less_memory(capsys):
    _, eight, _ = run_bench(capsys, "plan", "--gpus", "8", "--ep", "8", "--json")
    _, many, _ = run_bench(capsys, "plan", "--gpus", "64", "--ep", "8", "--sp", "4", "--json")
    assert many["per_rank_gib"] < eight["per_rank_gib"]
    _, tight, _ = run_bench(capsys, "plan", "--gpus", "8", "--ep", "8", "--gpu-mem-gib", "10", "--json")
    assert tight["fits"] is False


def test_plan_lora_counts_the_adapters_veomni_injects(capsys):
    """LoRA mode: the adapters counted on the meta thinker wrapped by VeOmni's `VeOmniLoraModel` equal
    the closed form from the config dimensions; the base stays the full model's, frozen; the static
    bytes follow from the two counts; the fewest GPUs are fewer than full fine-tuning's."""
    from veomni_omni.bench.configs import real_thinker_config
    from veomni_omni.bench.plan import GIB

    rank, gpus = 16, 2
    code, payload, out = run_bench(capsys, "plan", "--gpus", str(gpus), "--ep", "2", "--lora-rank", str(rank), "--json")
    assert code == 0
    config = real_thinker_config()
    t, a = config.text_config, config.audio_config
    H, q, kv, E, I = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, t.num_experts, t.moe_intermediate_size
    attention = rank * ((H + q) + 2 * (H + kv) + (q + H))  # q, k, v, o: A [r, in] + B [out, r]
    experts = E * rank * (2 * (H + I) + (I + H))  # gate, up: A [E, r, H] B [E, I, r]; down: A [E, r, I] B [E, H, r]
    audio = 3 * rank * 2 * a.d_model  # the audio encoder's q_proj, k_proj, v_proj match the same names
    adapters = t.num_hidden_layers * (attention + experts) + a.encoder_layers * audio
    assert payload["param_groups"]["lora"] == adapters
    assert payload["trainable_params"] == adapters  # only the adapters train
    assert all(payload["design_check"].values()), payload["params_b"]  # the frozen base is the whole thinker
    base = sum(payload["param_groups"].values()) - adapters
    breakdown = payload["breakdown_gib"]
    assert breakdown["frozen_params"] == pytest.approx(base * 2 / gpus / GIB)  # held in bf16 (lora_frozen_in_param_dtype)
    assert breakdown["params"] == pytest.approx(adapters * 4 / gpus / GIB)
    assert breakdown["adamw_states"] == pytest.approx(2 * adapters * 4 / gpus / GIB)
    assert breakdown["act_vision"] == 0 < breakdown["act_audio"]  # no ViT adapter: the ViT keeps no activations
    fewest, full = payload["fewest_gpus"], payload["full_fine_tuning"]
    assert fewest["per_rank_gib"] <= payload["gpu_mem_gib"] and fewest["gpus"] < full["fewest_gpus"]["gpus"]
    assert full["per_rank_gib"] > payload["per_rank_gib"]
    assert "fewest 80 GiB GPUs" in out


def test_plan_talker_counts_the_released_model(capsys):
    """`--train talker`: the whole released model on meta (as many parameters as the published checkpoint),
    its parts counted independently here; the thinker and code2wav frozen (their fp32 shards only), the
    talker with its code predictor trained (fp32 shards, gradients, AdamW states)."""
    from veomni_omni.bench.plan import GIB, RELEASED_PARAMS, build_meta_omni

    gpus = 8
    code, payload, out = run_bench(capsys, "plan", "--gpus", str(gpus), "--ep", "8", "--train", "talker", "--json")
    assert code == 0
    model = build_meta_omni()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    parts = {name: count(getattr(model, name)) for name in ("thinker", "talker", "code2wav")}
    assert payload["param_parts"] == parts
    assert sum(parts.values()) == RELEASED_PARAMS
    assert payload["trainable_params"] == parts["talker"]
    talker = model.talker
    units = payload["fsdp_units_params"]
    experts = count(talker.model.layers[0].mlp.experts)
    assert units["talker_layer"] == count(talker.model.layers[0]) - experts + experts // 8
    assert units["predictor_layer"] == count(talker.code_predictor.model.layers[0])
    wrapped = [*model.thinker.model.language_model.layers, *model.thinker.model.visual.blocks, *model.thinker.model.audio_tower.layers,
               *talker.model.layers, *talker.code_predictor.model.layers]
    assert units["root"] == RELEASED_PARAMS - sum(count(m) for m in wrapped)
    breakdown, close = payload["breakdown_gib"], lambda v: pytest.approx(v, rel=1e-5)  # noqa: E731  (the JSON rounds)
    assert breakdown["frozen_params"] * GIB == close((parts["thinker"] + parts["code2wav"]) * 4 / gpus)
    assert breakdown["params"] * GIB == close(parts["talker"] * 4 / gpus)
    assert breakdown["adamw_states"] * GIB == close(parts["talker"] * 8 / gpus)
    assert payload["static_gib"] * GIB == close(parts["talker"] * 16 / gpus + (parts["thinker"] + parts["code2wav"]) * 4 / gpus)
    assert payload["fits"] == (payload["per_rank_gib"] <= payload["gpu_mem_gib"])
    assert "thinker" in payload["phases_gib"] and "thinker_layers" not in payload["phases_gib"]  # a no-grad forward only
    layout = payload["layout"]
    assert layout["talker_tokens"] == 2 * (2048 + 9 + 375) and layout["code_predictor_tokens"] == 2 * 375 * 16
    assert "speech output" in out


def test_plan_joint_trains_both_and_thinker_only_is_unchanged(capsys):
    """`--train joint` trains the thinker as the thinker-only plan does plus the talker on top: more
    memory than either; the speech options do not touch the thinker-only plan."""
    layout = ["--gpus", "8", "--ep", "8", "--json"]
    _, thinker, _ = run_bench(capsys, "plan", *layout)
    _, explicit, _ = run_bench(capsys, "plan", *layout, "--train", "thinker", "--spoken-turns", "7", "--speech-frames", "11")
    _, talker, _ = run_bench(capsys, "plan", *layout, "--train", "talker")
    _, joint, _ = run_bench(capsys, "plan", *layout, "--train", "joint")
    for payload in (thinker, explicit):
        payload.pop("machine")
    assert explicit == thinker
    parts = joint["param_parts"]
    assert joint["trainable_params"] == parts["thinker"] + parts["talker"]
    assert joint["per_rank_gib"] > thinker["per_rank_gib"] > talker["per_rank_gib"]
    assert "thinker_layers" in joint["phases_gib"]
    assert joint["activations_gib"]["with_ckpt"] > talker["activations_gib"]["with_ckpt"]


def test_plan_lora_matches_memory_measured_on_cpu_ranks(capsys):
    """The plan against the per-rank memory of a real LoRA step under FSDP2 on 2 gloo ranks (the
    reduced thinker): the sharded state exactly, the step's peak within 15 %."""
    code, payload, out = run_bench(capsys, "plan", "--gpus", "2", "--ep", "1", "--lora-rank", "8", "--measure-cpu", "--json")
    assert code == 0
    measured = payload["measured_cpu"]
    assert measured["ratios"]["static"] == pytest.approx(1, rel=1e-3), measured
    assert 0.85 <= measured["ratios"]["peak"] <= 1.15, measured
    assert all(math.isfinite(r["loss"]) for r in measured["ranks"])
    assert_machine(payload)
    assert "planned / measured" in out


def test_gpu_contract(capsys):
    code, payload, _ = run_bench(capsys, "gpu", "--quick", "--json")
    assert code == 0
    assert_machine(payload)
    if not torch.cuda.is_available():
        assert "CUDA" in payload["skipped"]
        return
    assert {"mfu", "tokens_per_s", "ratio_vs_veomni", "device"} <= payload.keys()
    assert payload["tokens_per_s"] > 0 and payload["ratio_vs_veomni"] > 0
    assert payload["mfu"] is None or 0 < payload["mfu"] < 1


def test_gpu_workload_is_well_formed():
    """The GPU benchmark's batch and FLOP count, checked on CPU (no model is run)."""
    from veomni_omni.bench.configs import real_thinker_config
    from veomni_omni.bench.gpu import activated_text_params, gpu_config, gpu_mixed_rows, step_flops
    from veomni_omni.data.shaped_batches import build_batch
    from veomni_omni.tiny import TOKENS

    # docs/design.md §3: ≈ 3.0B activated parameters per token in the full thinker.
    assert abs(activated_text_params(real_thinker_config())["total"] / 1e9 - 3.0) < 0.1
    config = gpu_config()
    batch = build_batch(gpu_mixed_rows(2048, config), config)
    assert batch["input_ids"].shape == (1, 2048)
    for token in ("image", "video", "audio"):
        assert (batch["input_ids"] == TOKENS[token]).sum() > 100
    flops = step_flops(config, batch)
    assert flops["tokens"] == 2048 and flops["total"] > flops["text"] > 0 and flops["vision"] > 0 and flops["audio"] > 0


def test_gpu_measurement_path_runs_on_cpu(patched, one_thread):
    """The GPU benchmark's measuring code, run on CPU with a small config and every modality
    (incl. a video without audio): both models step and agree on the loss."""
    from veomni_omni.bench.configs import cpu_thinker_config
    from veomni_omni.bench.gpu import measure
    from veomni_omni.integration.settings import eager_ops_config

    torch.set_num_threads(1)
    rows = [[("prompt", 4), ("image", 1, 4, 4), ("text", 8), ("video", 2, 4, 4), ("audio", 200), ("text", 8)]]
    result = measure(cpu_thinker_config(), rows, eager_ops_config(), "cpu", torch.float32, reps=1, warmup=0)
    assert result["ratio"] > 0 and result["flops"]["total"] > 0
    assert abs(result["loss"]["veomni_omni"] - result["loss"]["veomni"]) <= 1e-5 * abs(result["loss"]["veomni"])


def test_unknown_benchmark_is_refused(capsys):
    assert bench_main(["nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


def test_command_line_entry_point():
    """`python -m veomni_omni.bench plan --json` from a fresh process: the last stdout line is the JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "veomni_omni.bench", "plan", "--gpus", "8", "--ep", "8", "--json"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"per_rank_gib", "fits", "layout"} <= payload.keys()


def test_sp_contract(capsys):
    """SP=2 and SP=4 gloo groups: the fill-back and audio ratios fall with SP size; our SP code makes no host sync."""
    code, payload, _ = run_bench(capsys, "sp", "--quick", "--json")
    assert code == 0
    assert_machine(payload)
    memory, audio = payload["fill_back_memory_ratio"], payload["audio_work_ratio"]
    assert set(memory) == set(audio) == {"2", "4"}
    assert 0 < memory["4"] < memory["2"] < 1 and 0 < audio["4"] < audio["2"] < 1
    assert payload["host_syncs"] == 0, payload["host_syncs_by_site"]


def test_plan_real_width_cpu_layout_matches_closed_form():
    """`plan` for the real-width thinker as `realwidth` trains it on 2 CPU ranks (FSDP2 × EP 2, fp32
    shards, bf16 compute, full logits, stateless SGD): the peak is the end of the backward, when the
    root's unsharded bf16 gradients (embeddings, lm_head, the encoders' unwrapped parts) and their fp32
    copy for the reduce-scatter meet every parameter's and gradient's shard; counted from the model's names."""
    from veomni_omni.bench.configs import realwidth_thinker_config
    from veomni_omni.bench.plan import GIB, build_meta_thinker, build_parser, plan

    model = build_meta_thinker(realwidth_thinker_config())
    text = model.config.text_config
    total = sum(p.numel() for p in model.parameters())
    wrapped = (".layers.", ".blocks.")  # text layers, ViT blocks, audio layers: FSDP units; the rest is the root
    root = sum(p.numel() for name, p in model.named_parameters() if not any(w in name for w in wrapped))
    assert root >= 2 * text.vocab_size * text.hidden_size  # embed_tokens and lm_head are root parameters
    args = build_parser().parse_args([
        "--gpus", "2", "--ep", "2", "--seq-len", "1388", "--visual-frac", "0.18", "--audio-frac", "0", "--no-grad-ckpt",
        "--ce", "full", "--compute-dtype", "bf16", "--optim-dtype", "none", "--overhead-gib", "0",
    ])
    result = plan(args, model)
    assert result["peak_phase"] == "end", result["phases_gib"]
    shards = total / 2 * 4  # fp32 parameter shards; at the end, as many gradient bytes
    assert result["per_rank_gib"] * GIB == pytest.approx(2 * shards + root * (2 + 4))
    assert result["static_gib"] * GIB == pytest.approx(2 * shards)


def test_realwidth_memory_wiring_on_the_small_thinker(capsys):
    """`realwidth --config cpu --sections memory`: the plan against a measured fp32 training step on 2
    gloo ranks, FSDP2 × EP 2 and SP 2 × EP 2, with the real-width sample mix: the sharded state
    exactly, the peak within 15 %."""
    code, payload, out = run_bench(capsys, "realwidth", "--config", "cpu", "--sections", "memory", "--json")
    assert code == 0
    assert set(payload["memory"]) == {"fsdp2_ep2", "sp2_ep2"}
    for name, result in payload["memory"].items():
        assert result["spec"]["mixed_precision"] is False and result["spec"]["sp"] == (2 if name == "sp2_ep2" else 1)
        assert result["ratios"]["static"] == pytest.approx(1, rel=1e-3), (name, result["ratios"])
        assert 0.85 <= result["ratios"]["peak"] <= 1.15, (name, result["ratios"], result["planned"])
    assert_machine(payload)
    assert "planned / measured" in out


def test_realwidth_gradient_parity_compares_every_gradient_with_unpatched_hf(monkeypatch):
    """`realwidth`'s speed section ends with one step of the patched model against unpatched HF on the
    same instance (HF's gradients through disk): on the small thinker they match; when HF's step sees an
    lm_head nudged by 0.1 %, the loss and the gradients are reported as different."""
    import contextlib

    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    import veomni_omni
    from veomni_omni.bench.configs import cpu_mixed_batch, cpu_thinker_config
    from veomni_omni.bench.realwidth import gradient_parity

    veomni_omni.apply()
    config = cpu_thinker_config()
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config).train()
    batch = cpu_mixed_batch(config, quick=True)
    result = gradient_parity(model, batch)
    assert not result["errors"], result["errors"]
    assert result["gradients"] == sum(p.requires_grad for p in model.parameters())
    assert result["loss"] == pytest.approx(result["hf_loss"], rel=1e-5)
    assert all(p.grad is None for p in model.parameters()), "the check leaves no gradients behind"

    @contextlib.contextmanager
    def nudged_lm_head():
        with torch.no_grad():
            model.lm_head.weight.mul_(1.001)
        try:
            yield
        finally:
            with torch.no_grad():
                model.lm_head.weight.div_(1.001)

    monkeypatch.setattr(veomni_omni, "unpatched", nudged_lm_head)
    errors = gradient_parity(model, batch)["errors"]
    assert errors and errors[0].startswith("loss ") and len(errors) > 1, errors  # the loss, then the gradients that moved


def test_plan_joint_speech_training_matches_memory_measured_on_cpu_ranks(capsys):
    """`plan --train joint --measure-cpu`: the talker and the thinker train together (VeOmni's
    `train_thinker: true`) on 2 gloo ranks with the CPU omni model and two spoken turns per rank: the
    sharded state (thinker + talker trainable, code2wav frozen) exactly, the step's peak within 15 %."""
    code, payload, out = run_bench(capsys, "plan", "--gpus", "2", "--ep", "2", "--train", "joint", "--measure-cpu", "--measure-ep", "2", "--json")
    assert code == 0
    measured = payload["measured_cpu"]
    assert measured["spec"]["train"] == "joint"
    assert all(r["spoken_turns"] == 2 and math.isfinite(r["loss"]) for r in measured["ranks"]), measured["ranks"]
    assert measured["ratios"]["static"] == pytest.approx(1, rel=1e-3), measured
    assert 0.85 <= measured["ratios"]["peak"] <= 1.15, measured
    assert "talker and thinker training (joint)" in out
