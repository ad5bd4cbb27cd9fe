"""overhead: the patched thinker vs unpatched HF transformers, same weights, same batch.

One model instance; the patch set is class-level, so each timed step of the reference runs inside
`veomni_omni.unpatched()` and each of ours outside it. Steps are forward + backward (loss incl.
the router aux loss) on a mixed text+image+audio batch, fp32 on CPU, in alternating order.
JSON: {"ratio": veomni_omni step time / HF step time (median of per-round ratios), ...}.
Target: ratio <= 1.03 (the patches may not slow a single-process step down).
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

TARGET = 1.03


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "overhead")
    add_timing_args(parser, reps=10)
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import veomni_omni

    from .configs import cpu_workload

    quiet_veomni_logs()
    _, model, batch, reps, warmup = cpu_workload(args)
    losses = {}

    def step(name, context):
        def run():
            with context():
                model.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
            losses[name] = loss.item()

        return run

    contenders = {"veomni_omni": step("veomni_omni", contextlib.nullcontext), "hf": step("hf", veomni_omni.unpatched)}
    times = interleaved_times(contenders, reps=reps, warmup=warmup, log=None if args.json else print, clock=args.clock)
    assert veomni_omni.is_applied()
    summary = ratio_summary(times["veomni_omni"], times["hf"])
    n_params = sum(p.numel() for p in model.parameters())
    tokens = int(batch["attention_mask"].sum())

    print(
        format_table(
            ["contender", "median ms", "min ms", "max ms", "loss"],
            [
                [name, statistics.median(t) * 1e3, min(t) * 1e3, max(t) * 1e3, losses[name]]
                for name, t in times.items()
            ],
            title=(
                f"overhead: fwd+bwd step, thinker {n_params / 1e6:.1f}M params, batch {tuple(batch['input_ids'].shape)} "
                f"({tokens} tokens: text+image+audio), fp32, {torch.get_num_threads()} threads, {reps} interleaved rounds, {args.clock} clock"
            ),
        )
    )
    print(
        f"ratio veomni_omni/hf = {summary['ratio']:.3f} (median of per-round ratios; range "
        f"{summary['ratio_min']:.3f}..{summary['ratio_max']:.3f}; ratio of medians {summary['ratio_of_medians']:.3f}); "
        f"target <= {TARGET}"
    )
    machine = machine_info()
    if contention_note(machine, args.clock):
        print(contention_note(machine, args.clock))
    emit(
        {
            "benchmark": "overhead",
            **summary,
            "target": TARGET,
            "meets_target": summary["ratio"] <= TARGET,
            "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
            "loss": losses,
            "same_loss": losses["veomni_omni"] == losses["hf"] or abs(losses["veomni_omni"] - losses["hf"]) <= 1e-5 * abs(losses["hf"]),
            "reps": reps,
            "clock": args.clock,
            "quick": args.quick,
            "workload": {"params": n_params, "batch_shape": list(batch["input_ids"].shape), "tokens": tokens, "dtype": "float32"},
            "machine": machine,
        },
        args.json,
    )
    return 0
