"""overhead: the patched thinker vs unpatched HF transformers, same weights, same batch.

One model instance; the patch set is class-level, so each timed step of the reference runs inside
`veomni_omni.unpatched()` and each of ours outside it. Steps are forward + backward (loss incl.
the router aux loss) on a mixed text+image+audio batch, fp32 on CPU, in alternating order.
JSON: {"ratio": veomni_omni step time / HF step time (median of per-round ratios), ...}.
Target: ratio <= 1.03 (the patches may not slow a single-process step down).
"""

from __future__ import annotations

from .common import fwd_bwd_step, interleaved_times, report_side_by_side, side_by_side_workload

TARGET = 1.03


def main(argv=None) -> int:
    import veomni_omni

    args, _, model, batch, reps, warmup = side_by_side_workload(__doc__, "overhead", argv)
    losses = {}
    contenders = {
        "veomni_omni": fwd_bwd_step(losses, "veomni_omni", model, batch),
        "hf": fwd_bwd_step(losses, "hf", model, batch, veomni_omni.unpatched),
    }
    times = interleaved_times(contenders, reps=reps, warmup=warmup, log=None if args.json else print, clock=args.clock)
    assert veomni_omni.is_applied()
    same_loss = losses["veomni_omni"] == losses["hf"] or abs(losses["veomni_omni"] - losses["hf"]) <= 1e-5 * abs(losses["hf"])
    return report_side_by_side("overhead", args, times, losses, model, batch, reps, TARGET, extra={"same_loss": same_loss})
