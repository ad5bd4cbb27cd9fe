"""The parity bar (docs/design.md §7): per tensor, max|got − ref| ≤ PARITY_RTOL · max|ref|. The tests
assert it; the benchmarks report the same measure next to their timings, so it lives with the product."""

from __future__ import annotations

import math
from typing import Optional

import torch

PARITY_RTOL = 1e-5  # docs/design.md §7: max|got − ref| ≤ 1e-5 · max|ref| per tensor
ROUNDOFF_FLOOR = 1e-6  # see parity_errors


def tensor_difference(got: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[tuple[float, float]]:
    """(max|got − ref|, max|ref|) of one tensor pair; (inf, 0) when only one side exists, None when
    neither does, (nan, nan) when either holds a NaN or an infinity (never within any bar). A pair's
    entry in a `difference_table`. Computed in slices of 2^24 elements: a real-width expert tensor
    (1.6 GB in fp32) gets no full-size temporary."""
    if got is None or ref is None:
        return None if (got is None) == (ref is None) else (float("inf"), 0.0)
    if got.numel() != ref.numel():
        raise ValueError(f"cannot compare a tensor of shape {tuple(got.shape)} with a reference of shape {tuple(ref.shape)}")
    pairs = zip(got.detach().reshape(-1).split(1 << 24), ref.detach().reshape(-1).split(1 << 24))
    diff, scale = 0.0, 0.0
    for g, r in (pair for pair in pairs if pair[1].numel()):
        r = r.float()
        if not (torch.isfinite(g).all() and torch.isfinite(r).all()):  # max() would drop a NaN
            return float("nan"), float("nan")
        diff = max(diff, torch.sub(g.float(), r).abs_().max().item())
        scale = max(scale, r.abs().max().item())
    return diff, scale


def difference_table(got: dict, ref: dict) -> dict[str, Optional[tuple[float, float]]]:
    """`tensor_difference` of every name on either side. A worker that cannot hold all tensors at
    once builds the table one pair at a time instead."""
    return {name: tensor_difference(got.get(name), ref.get(name)) for name in sorted(ref.keys() | got.keys())}


def _judged(table: dict, rtol: float):
    """Per tensor: (name, max|got − ref|, the largest difference allowed), or a one-sided entry.

    The limit is rtol · max|ref|; a tensor whose reference is at fp32 round-off level (max|ref| below
    ROUNDOFF_FLOOR times the largest max|ref| of the set) has a true value of zero, e.g. attention
    key-bias gradients (softmax is shift invariant): both sides are round-off, and its difference
    must stay within that floor instead of within rtol of its own noise.
    """
    floor = ROUNDOFF_FLOOR * max((entry[1] for entry in table.values() if entry is not None and math.isfinite(entry[1])), default=0.0)
    for name, entry in sorted(table.items()):
        if entry is None or entry[0] == float("inf"):
            yield name, None if entry is None else float("inf"), None
            continue
        yield name, entry[0], (rtol * entry[1] if entry[1] >= floor else floor)


def table_errors(table: dict, rtol: float = PARITY_RTOL) -> list[str]:
    """Tensors of a `difference_table` whose max|got − ref| exceeds its limit (see `_judged`); a tensor
    present on one side only is an error."""
    errors = []
    for name, diff, limit in _judged(table, rtol):
        if diff == float("inf"):
            errors.append(f"{name}: present on one side only")
        elif diff is not None and math.isnan(diff):
            errors.append(f"{name}: not finite (NaN or infinity on one side or both)")
        elif diff is not None and diff > limit:
            errors.append(f"{name}: max|got-ref|={diff:.3e} > {limit:.3e}")
    return errors


def table_max_relative_difference(table: dict) -> float:
    """Largest max|got − ref| / max|ref| over the tensors of a `difference_table` present on both sides
    (round-off tensors: over the floor), i.e. in units where PARITY_RTOL is the bar."""
    ratios = [PARITY_RTOL * diff / limit for _, diff, limit in _judged(table, PARITY_RTOL) if limit]
    return max(ratios, default=0.0)


def parity_errors(got: dict, ref: dict, rtol: float = PARITY_RTOL) -> list[str]:
    """`table_errors` of two dicts of tensors; None must match None."""
    return table_errors(difference_table(got, ref), rtol)


def max_relative_difference(got: dict, ref: dict) -> float:
    """Largest max|got − ref| / scale over the tensors present on both sides (for reporting)."""
    return table_max_relative_difference(difference_table(got, ref))
