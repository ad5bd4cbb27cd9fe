"""realwidth: the released thinker's widths at reduced depth on CPU: gradients against HF, memory against the planner, speed against HF and VeOmni.

The model is `configs.realwidth_thinker_config` (2 MoE text layers at real width: hidden 2048, 128
experts top-8, vocabulary 152064; a 2-block ViT; 2 audio layers; ~2.0B parameters), fp32, and the
batch `configs.REALWIDTH_SAMPLES` (2080 tokens of image, audio, video and text), the model and batch
of the real-width parity test. The 2-rank sections cut the vocabulary to
`configs.REALWIDTH_2RANK_VOCAB` (32768; ~1.5B parameters), as the parity test does: at the released
vocabulary two fp32 ranks do not fit a 24 GiB machine. `--config cpu` runs every section with the
small `cpu_thinker_config` instead (a smoke run of the wiring in seconds).

Sections (`--sections`, default all):
- speed: one process, one model instance, forward + backward, interleaved rounds (median of per-round
  ratios): (a) patched vs unpatched HF (`overhead`'s method: the reference runs inside
  `veomni_omni.unpatched()`); (b) ours vs VeOmni 0.1.12's generated model (`veomni`'s method), which
  shares our parameter tensors (a second copy would not fit) and its own gradients freed after each
  step. The batch is the four samples as padded rows. Where ours is slower, one step of each under
  torch.profiler: the top ops by self CPU time.
- parity: the same model and batch, one step against unpatched HF at the released vocabulary: the loss
  and every gradient (`gradient_parity`; the 2-rank parity test cuts the vocabulary); the command exits
  1 when they differ beyond the bar. `tests/test_realwidth.py` runs it.
- ep: 2 gloo ranks, FSDP2 × EP 2 vs FSDP2 alone (EP 1), the same packed data (rank r packs
  `REALWIDTH_DP_PACKS[r]`); timed training steps (forward, backward, optimizer step) of one launch per
  layout, so consecutive rather than interleaved; the ratio pairs the launches' steps in order. At real
  width the model has `configs.REALWIDTH_EP_TEXT_LAYERS` text layer ("realwidth_ep"): FSDP-only ranks
  gather whole layers of 128 experts, and two of the 2-layer model do not fit 24 GiB.
- memory: `plan`'s per-rank prediction for CPU training (full logits, no CUDA overhead, no gradient
  checkpointing) against the peak allocated per rank, measured through the profiler (`plan_cpu`)
  during a training step, FSDP2 × EP 2 and SP 2 × EP 2; the plan for fp32 and mixed precision, SGD and
  AdamW is printed for each layout.
2-rank runs (`--precision`): fp32 throughout (the default), or mixed (fp32 shards, bf16 compute, fp32
reductions); `--optimizer`: VeOmni's AdamW, or a stateless SGD (the default at real width: AdamW's
two fp32 states per parameter do not fit beside two ranks), whose plan counts no optimizer state. A
2-rank run whose plan, plus each rank's process overhead, exceeds the available memory is skipped
with the numbers.
JSON: {"speed": {"patched_vs_hf": {"ratio", ...}, "ours_vs_veomni": {...}}, "parity": {"max_relative_difference",
"errors", ...}, "ep": {"ep2_vs_ep1": {...}},
"memory": {"fsdp2_ep2": {"ratios": {"peak", "static"}, ...}, "sp2_ep2": {...}}, "machine": ...}.
"""

from __future__ import annotations

import contextlib
import statistics

import torch

from .common import (
    add_timing_args,
    base_parser,
    contention_note,
    emit,
    format_table,
    interleaved_times,
    machine_info,
    quiet_veomni_logs,
    ratio_summary,
    set_threads,
)

SECTIONS = ("parity", "speed", "ep", "memory")
MEMORY_LAYOUTS = {"fsdp2_ep2": dict(ep=2, sp=1), "sp2_ep2": dict(ep=2, sp=2)}
EP_LAYOUTS = {"fsdp2_ep2": dict(ep=2, sp=1), "fsdp2_ep1": dict(ep=1, sp=1)}
GIB = 2**30
# Resident memory of a rank beyond what the profiler counts as allocated: Python, torch and VeOmni
# (~0.5 GiB) and heap the allocator keeps.
RANK_OVERHEAD_BYTES = int(2.5 * GIB)
TOP_OPS = 12


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def speed_batch(config) -> dict:
    """The four samples as padded rows (the real-width parity test's reference batch)."""
    from veomni_omni.data.shaped_batches import concat_batches

    from .configs import realwidth_dp_batches

    return concat_batches(realwidth_dp_batches(config))


def top_ops(step, rows: int = TOP_OPS) -> list[list]:
    """One `step` under torch.profiler: its ops by self CPU time (ms, share of the step, calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in averages)
    return [[e.key, e.self_cpu_time_total / 1e3, e.self_cpu_time_total / total, e.count] for e in averages[:rows]]


def gradient_parity(model, batch: dict) -> dict:
    """One forward + backward of the patched `model` against the same step of unpatched HF
    (`veomni_omni.unpatched()`) on the same instance: the loss and every gradient at the parity bar.
    HF's gradients wait on disk (read back memory-mapped): at real width a second set beside the
    first does not fit, and this is the one place the released vocabulary's gradients are compared."""
    import tempfile
    from pathlib import Path

    import veomni_omni
    from veomni_omni.parity import PARITY_RTOL, difference_table, table_errors, table_max_relative_difference

    def loss_and_gradients(context) -> float:
        model.zero_grad(set_to_none=True)
        with context():
            loss = model(**batch).loss
            loss.backward()
        return loss.item()

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "hf_gradients.pt"
        hf_loss = loss_and_gradients(veomni_omni.unpatched)
        torch.save({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, saved)
        loss = loss_and_gradients(contextlib.nullcontext)
        hf_grads = torch.load(saved, mmap=True, weights_only=True)
        table = difference_table({name: p.grad for name, p in model.named_parameters()}, hf_grads)
        del hf_grads
    model.zero_grad(set_to_none=True)
    errors = table_errors(table)
    if abs(loss - hf_loss) > PARITY_RTOL * abs(hf_loss):
        errors.insert(0, f"loss {loss} vs HF {hf_loss}")
    result = {
        "loss": loss, "hf_loss": hf_loss, "gradients": sum(entry is not None for entry in table.values()),
        "parameters": len(table), "vocab_size": model.config.text_config.vocab_size,
        "max_relative_difference": table_max_relative_difference(table), "errors": errors,
    }
    print(
        f"parity with unpatched HF (one step, every gradient): loss {loss:.6f} vs {hf_loss:.6f}, {result['gradients']} gradients, "
        f"largest relative difference {result['max_relative_difference']:.2e} (bar {PARITY_RTOL:g})"
        + ("" if not errors else "; FAILED:\n  " + "\n  ".join(errors[:20]))
    )
    return result


def patched_thinker(config_name: str):
    """The patched thinker of `config_name` (`plan_cpu.thinker_config`; seed 0, train mode) and its batch
    (`speed_batch`), for the speed and parity sections."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    import veomni_omni

    from .plan_cpu import thinker_config

    veomni_omni.apply()
    config = thinker_config(config_name)
    torch.manual_seed(0)
    return Qwen3OmniMoeThinkerForConditionalGeneration(config).train(), speed_batch(config)


def speed(args, ours, batch: dict, reps: int, warmup: int) -> dict:
    import veomni_omni
    from veomni_omni.integration.settings import eager_ops_config

    from .veomni_vs_ours import build_veomni_thinker, to_veomni_inputs, veomni_ops

    config = ours.config
    ops_config = eager_ops_config()
    with veomni_ops(ops_config):
        theirs = build_veomni_thinker(config, ops_config, ours.state_dict(), share_from=ours).train()
    veomni_batch = to_veomni_inputs(batch, config)
    losses = {}

    def step(name, model, inputs, context):
        def run():
            with context():
                loss = model(**inputs).loss
                loss.backward()
                losses[name] = loss.item()
                model.zero_grad(set_to_none=True)  # the models share parameters, not gradients: one set at a time

        return run

    contenders = {
        "veomni_omni": step("veomni_omni", ours, batch, contextlib.nullcontext),
        "hf": step("hf", ours, batch, veomni_omni.unpatched),
        "veomni": step("veomni", theirs, veomni_batch, lambda: veomni_ops(ops_config)),
    }
    times = interleaved_times(contenders, reps=reps, warmup=warmup, log=None if args.json else print, clock=args.clock)
    assert veomni_omni.is_applied()
    result = {
        "patched_vs_hf": ratio_summary(times["veomni_omni"], times["hf"]),
        "ours_vs_veomni": ratio_summary(times["veomni_omni"], times["veomni"]),
        "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
        "loss": dict(losses),
        "params": sum(p.numel() for p in ours.parameters()),
        "batch_shape": list(batch["input_ids"].shape),
        "tokens": int(batch["attention_mask"].sum()),
        "reps": reps,
        "warmup": warmup,
    }
    print(format_table(
        ["contender", "median ms", "min ms", "max ms", "loss"],
        [[name, statistics.median(t) * 1e3, min(t) * 1e3, max(t) * 1e3, losses[name]] for name, t in times.items()],
        title=(
            f"speed: fwd+bwd, {args.config} thinker {result['params'] / 1e9:.2f}B params, batch {tuple(batch['input_ids'].shape)} "
            f"({result['tokens']} tokens), fp32, {torch.get_num_threads()} threads, {reps} interleaved rounds after {warmup} warm-up "
            f"({args.clock} clock; few rounds: a step takes about a minute at real width)"
        ),
    ))
    for key, other in (("patched_vs_hf", "hf"), ("ours_vs_veomni", "veomni")):
        s = result[key]
        print(f"ratio veomni_omni/{other} = {s['ratio']:.3f} (median of per-round ratios; range {s['ratio_min']:.3f}..{s['ratio_max']:.3f})")
    profiles = {}
    for key, other in (("patched_vs_hf", "hf"), ("ours_vs_veomni", "veomni")):
        if result[key]["ratio"] > 1:
            for name in ("veomni_omni", other):
                if name not in profiles:
                    profiles[name] = top_ops(contenders[name])
    for name, rows in profiles.items():
        print(format_table(["op", "self CPU ms", "share", "calls"], rows, title=f"where {name}'s step goes (top ops by self CPU time)"))
    result["profile_top_ops"] = profiles
    return result


def planned_two_ranks(spec: dict, rows: list[dict]) -> float:
    """Planned bytes of both ranks (each rank as the larger of the two)."""
    from .plan_cpu import predicted

    return max(predicted(spec, r)["per_rank_bytes"] for r in rows) * 2


def layout_tokens(spec: dict) -> list[dict]:
    """Each rank's token counts for a spec, from its batch (no model is built), as the plan models
    them (`plan_cpu.with_sp_encoder_shares`)."""
    from veomni_omni.tiny import TOKENS

    from .plan_cpu import RANKS, rank_batch, thinker_config, with_sp_encoder_shares

    config = thinker_config(spec["config"])
    rows = []
    for rank in range(RANKS):
        ids = rank_batch(spec, config, rank // spec["sp"], rank % spec["sp"])["input_ids"]
        rows.append({
            "tokens": ids.numel(), "visual_tokens": int(((ids == TOKENS["image"]) | (ids == TOKENS["video"])).sum()),
            "audio_tokens": int((ids == TOKENS["audio"]).sum()),
        })
    return with_sp_encoder_shares(spec, rows)


def fits(spec: dict) -> tuple[bool, str]:
    """Whether both ranks' planned peaks, plus each process's resident overhead, fit in the available memory."""
    from .plan_cpu import RANKS

    planned, available = planned_two_ranks(spec, layout_tokens(spec)), available_bytes()
    needed = planned + RANKS * RANK_OVERHEAD_BYTES
    text = f"planned {planned / GIB:.1f} GiB + {RANKS} × {RANK_OVERHEAD_BYTES / GIB:.1f} GiB process overhead for {RANKS} ranks, {available / GIB:.1f} GiB available"
    return needed <= available, text


def run_layouts(args, config: str, layouts: dict, measure_memory: bool, timed_steps: int) -> dict:
    """One 2-rank launch of the thinker `config` (`plan_cpu.thinker_config`) per layout; {name: ranks'
    results, or {"skipped": reason}}."""
    from .plan_cpu import describe, measure_spec, run_worker

    runs = {}
    for name, layout in layouts.items():
        spec = measure_spec(
            config=config, batch="realwidth_packs", mixed_precision=args.precision == "mixed", grad_ckpt=False, optimizer=args.optimizer,
            measure_memory=measure_memory, timed_steps=timed_steps, **layout,
        )
        ok, text = fits(spec)
        if not ok and not args.ignore_memory_check:
            print(f"{name}: skipped, does not fit: {text} ({describe(spec)})")
            runs[name] = {"spec": spec, "skipped": f"does not fit: {text}"}
            continue
        print(f"{name}: running {describe(spec)}; {text}", flush=True)
        try:
            runs[name] = {"spec": spec, "ranks": run_worker(spec, timeout_s=args.timeout)}
        except RuntimeError as error:
            if ok:
                raise
            # Beyond the plan (--ignore-memory-check): a rank killed for memory is a result, reported as such.
            lines = str(error).strip().splitlines()
            reason = next((line for line in lines if "SIGKILL" in line or "exitcode" in line), lines[-1]).strip()[:300]
            print(f"{name}: failed beyond the planned memory: {reason}")
            runs[name] = {"spec": spec, "skipped": f"failed: {reason}"}
    return runs


def memory(runs: dict) -> dict:
    from .plan_cpu import compare, plan_args, predicted

    out = {}
    for name, run in runs.items():
        spec = run["spec"]
        tokens = max(layout_tokens(spec), key=lambda r: r["tokens"])
        variants = {
            f"{'mixed' if mp else 'fp32'}+{optimizer}": predicted({**spec, "mixed_precision": mp, "optimizer": optimizer}, tokens)["per_rank_bytes"] / GIB
            for mp in (False, True) for optimizer in ("sgd", "adamw")
        }
        layout = plan_args(spec, **tokens)
        print(
            f"{name}: planned per rank (GiB) " + ", ".join(f"{k} {v:.2f}" for k, v in variants.items())
            + f"; {layout.seq_len // layout.sp} tokens/rank ({tokens['visual_tokens']} visual, {tokens['audio_tokens']} audio)"
        )
        if "skipped" in run:
            out[name] = {"skipped": run["skipped"], "planned_gib": variants}
            continue
        out[name] = {**compare(spec, run["ranks"]), "planned_gib": variants}
    return out


def ep_speed(runs: dict) -> dict:
    if any("skipped" in run for run in runs.values()):
        return {name: run.get("skipped", "ran") for name, run in runs.items()}
    seconds = {name: [max(steps) for steps in zip(*(r["step_seconds"] for r in run["ranks"]))] for name, run in runs.items()}
    summary = ratio_summary(seconds["fsdp2_ep2"], seconds["fsdp2_ep1"])
    config = runs["fsdp2_ep2"]["spec"]["config"]
    print(format_table(
        ["layout", "median s", "steps (s)", "loss (rank 0)"],
        [[name, statistics.median(s), " ".join(f"{x:.2f}" for x in s), runs[name]["ranks"][0]["loss"]] for name, s in seconds.items()],
        title=f"ep: training step (fwd+bwd+optimizer) of the {config} thinker on 2 gloo ranks, slowest rank per step; one launch per layout (consecutive, not interleaved)",
    ))
    print(f"ratio EP2/EP1 = {summary['ratio']:.3f} (median of per-step ratios; range {summary['ratio_min']:.3f}..{summary['ratio_max']:.3f})")
    return {"ep2_vs_ep1": summary, "step_seconds": seconds, "config": config}


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "realwidth")
    add_timing_args(parser, reps=3)
    parser.add_argument("--config", choices=["realwidth", "cpu"], default="realwidth", help="cpu: the small thinker, for a quick wiring check")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="2-rank runs' optimizer (default: sgd at real width, adamw for cpu)")
    parser.add_argument(
        "--precision", choices=["fp32", "mixed"], default="fp32",
        help="2-rank runs: fp32 throughout, or mixed (fp32 shards, bf16 compute, fp32 reductions; VeOmni's default)",
    )
    parser.add_argument("--ignore-memory-check", action="store_true", help="run 2-rank layouts even when their plan exceeds the available memory")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per 2-rank launch")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(set(sections) - set(SECTIONS))}; choose from {SECTIONS}")
    args.optimizer = args.optimizer or ("sgd" if args.config == "realwidth" else "adamw")
    set_threads(args.threads)
    quiet_veomni_logs()
    reps, warmup = (2, 0) if args.quick else (args.reps, args.warmup)

    payload = {"benchmark": "realwidth", "config": args.config, "sections": sections, "quick": args.quick, "clock": args.clock}
    if {"parity", "speed"} & set(sections):  # one model for both
        model, batch = patched_thinker(args.config)
        if "speed" in sections:
            payload["speed"] = speed(args, model, batch, reps, warmup)
        if "parity" in sections:
            payload["parity"] = gradient_parity(model, batch)
        del model
        print()
    realwidth = args.config == "realwidth"
    if "memory" in sections:
        runs = run_layouts(args, "realwidth_2rank" if realwidth else args.config, MEMORY_LAYOUTS, measure_memory=True, timed_steps=0)
        print()
        payload["memory"] = memory(runs)
    if "ep" in sections:
        runs = run_layouts(args, "realwidth_ep" if realwidth else args.config, EP_LAYOUTS, measure_memory=False, timed_steps=reps)
        print()
        payload["ep"] = ep_speed(runs)
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, loadavg {machine.get('loadavg_1m')}")
    if contention_note(machine, args.clock):
        print(contention_note(machine, args.clock))
    emit({**payload, "machine": machine}, args.json)
    return 1 if "parity" in sections and payload["parity"]["errors"] else 0
