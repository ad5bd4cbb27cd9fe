"""Shared benchmark plumbing: machine description, interleaved timing, table and JSON output."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import time
from typing import Callable, Optional, Sequence


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """Where a result was measured: CPU, cores, threads, library versions, date (and GPU if any)."""
    import torch
    import transformers

    try:
        from importlib.metadata import version

        veomni_version = version("veomni")
    except Exception:  # pragma: no cover - veomni is a hard dependency
        veomni_version = None
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "veomni": veomni_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # > cores: timings shared the CPU with other work
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def contention_note(info: dict, clock: str = "wall") -> str:
    """A warning line when the 1-minute load says other work shared the CPU during the timings."""
    load, cores = info.get("loadavg_1m"), info.get("cores") or 1
    if load is None or load <= cores + 1:
        return ""
    if clock == "cpu":
        return f"note: load average {load} on {cores} cores; CPU-time clock, so other processes mostly do not count (caches are still shared)"
    return f"warning: load average {load} on {cores} cores: other processes competed for the CPU; ratios are noisier (try --threads 1 --clock cpu)"


def base_parser(description: str, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m veomni_omni.bench {prog}", description=description)
    parser.add_argument("--json", action="store_true", help="end with one line of JSON (ratios + machine)")
    return parser


def add_timing_args(parser: argparse.ArgumentParser, reps: int, warmup: int = 1) -> None:
    parser.add_argument("--reps", type=int, default=reps, help=f"timed repetitions per contender (default {reps})")
    parser.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps per contender first (default {warmup})")
    parser.add_argument("--quick", action="store_true", help="smoke mode for tests: 2 reps, no warm-up, smaller batch")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: perf_counter (default); cpu: this process's CPU time, robust on a shared machine (use with --threads 1)",
    )


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_times(
    contenders: dict[str, Callable[[], None]],
    reps: int,
    warmup: int = 1,
    log: Optional[Callable[[str], None]] = None,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Wall time of each contender's step, measured side by side.

    Round r runs every contender once, in an order that alternates between rounds (A B, B A, ...)
    so slow drift (thermal, other load) hits both equally. Garbage is collected outside the timed
    region. Warm-up rounds are run the same way and discarded. `clock` "cpu" counts this process's
    CPU time instead of wall time (immune to other processes, but counts threads' spin-waits).
    """
    now = CLOCKS[clock]
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(warmup + reps):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            start = now()
            contenders[name]()
            elapsed = now() - start
            if r >= warmup:
                times[name].append(elapsed)
        if log is not None and r >= warmup:
            log(f"  round {r - warmup + 1}/{reps}: " + "  ".join(f"{n} {times[n][-1] * 1e3:.1f} ms" for n in names))
    return times


def ratio_summary(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Median of the per-round ratios (the headline), plus the ratio of medians and the spread."""
    pairs = sorted(a / b for a, b in zip(ours, theirs))
    return {
        "ratio": statistics.median(pairs),
        "ratio_of_medians": statistics.median(ours) / statistics.median(theirs),
        "ratio_min": pairs[0],
        "ratio_max": pairs[-1],
    }


def format_table(columns: Sequence[str], rows: Sequence[Sequence], title: Optional[str] = None) -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def emit(payload: dict, as_json: bool) -> None:
    """Print the JSON contract line (last line of stdout) when asked."""
    if as_json:
        print(json.dumps(_rounded(payload), sort_keys=False), flush=True)


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def quiet_veomni_logs() -> None:
    """VeOmni logs at INFO on import and on every ops binding; keep benchmark tables readable."""
    import logging

    for name in ("veomni", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ------------------------------------------------------------------ side-by-side fwd+bwd step benchmarks


def side_by_side_workload(doc: str, prog: str, argv) -> tuple:
    """The CLI of a side-by-side CPU step benchmark (timing options) and its workload: (args, config,
    model, batch, reps, warmup), see `configs.cpu_workload`."""
    from .configs import cpu_workload

    parser = base_parser(doc.splitlines()[0], prog)
    add_timing_args(parser, reps=10)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quiet_veomni_logs()
    return (args, *cpu_workload(args))


def fwd_bwd_step(losses: dict, name: str, model, inputs: dict, context: Callable = contextlib.nullcontext) -> Callable[[], None]:
    """One contender's timed step: zero the gradients, forward, backward, all under `context()`; its
    loss goes to `losses[name]`."""

    def run():
        with context():
            model.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
        losses[name] = loss.item()

    return run


def report_side_by_side(
    benchmark: str,
    args: argparse.Namespace,
    times: dict[str, list[float]],
    losses: dict[str, float],
    model,
    batch: dict,
    reps: int,
    target: float,
    columns: Sequence[str] = (),
    cells: Optional[dict[str, list]] = None,
    note: str = "",
    extra: Optional[dict] = None,
) -> int:
    """Table, ratio line and JSON of a fwd+bwd step measured side by side (`interleaved_times`): the
    first contender in `times` is ours, the ratio is ours / the second's. `columns` and `cells[name]`:
    more describing columns per contender; `note`: appended to the ratio line; `extra`: more JSON keys."""
    import torch

    ours, theirs = list(times)
    summary = ratio_summary(times[ours], times[theirs])
    n_params = sum(p.numel() for p in model.parameters())
    tokens = int(batch["attention_mask"].sum())
    cells = cells or {}
    print(
        format_table(
            ["contender", *columns, "median ms", "min ms", "max ms", "loss"],
            [
                [name, *cells.get(name, []), statistics.median(t) * 1e3, min(t) * 1e3, max(t) * 1e3, losses[name]]
                for name, t in times.items()
            ],
            title=(
                f"{benchmark}: fwd+bwd step, thinker {n_params / 1e6:.1f}M params, batch {tuple(batch['input_ids'].shape)} "
                f"({tokens} tokens: text+image+audio), fp32, {torch.get_num_threads()} threads, {reps} interleaved rounds, {args.clock} clock"
            ),
        )
    )
    print(
        f"ratio {ours}/{theirs} = {summary['ratio']:.3f} (median of per-round ratios; range "
        f"{summary['ratio_min']:.3f}..{summary['ratio_max']:.3f}; ratio of medians {summary['ratio_of_medians']:.3f}); "
        f"target <= {target}" + (f"; {note}" if note else "")
    )
    machine = machine_info()
    if contention_note(machine, args.clock):
        print(contention_note(machine, args.clock))
    emit(
        {
            "benchmark": benchmark,
            **summary,
            "target": target,
            "meets_target": summary["ratio"] <= target,
            "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()},
            "loss": losses,
            **(extra or {}),
            "reps": reps,
            "clock": args.clock,
            "quick": args.quick,
            "workload": {"params": n_params, "batch_shape": list(batch["input_ids"].shape), "tokens": tokens, "dtype": "float32"},
            "machine": machine,
        },
        args.json,
    )
    return 0
