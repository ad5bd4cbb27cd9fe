"""The released HF layout of a model: which checkpoint tensor fills which part of which parameter.

transformers 5.22 owns the naming: `get_model_conversion_mapping` gives the renamings
(`thinker.model.layers.*` -> `thinker.model.language_model.layers.*`, `thinker.visual` ->
`thinker.model.visual`, ...) and the MoE converters (per-expert `gate_proj`/`up_proj`/`down_proj`
-> fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]`), and `revert_weight_conversion` gives
the per-expert keys `save_pretrained` writes. HF applies the converters to whole tensors; here each
per-expert key becomes a `Piece` (an offset into the fused parameter), so a rank can read just
the pieces that overlap its shard.

Both functions look up conversions by class name, which FSDP2 changes (`FSDPQwen3Omni...`), so
they run on a meta-device copy of the unwrapped class.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.fsdp import FSDPModule
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from .safetensors_io import CheckpointError, TensorEntry
from .sharding import ShardedParam

# A thinker trained on its own from a released top-level checkpoint reads the `thinker.` keys.
PREFIXES = ("", "thinker.")
# Released top-level components a model may lack (the thinker alone, or `disable_talker()`): their
# keys are carried from the source checkpoint into the saved one, unchanged.
CARRIED_COMPONENTS = ("talker", "code2wav")
MAX_LISTED = 20


@dataclass(frozen=True)
class Piece:
    """Checkpoint tensor `key` (of `shape`) fills the region of parameter `param` starting at `offset`;
    `stacked`: it is one index of the parameter's first dimension (one expert), without that dim."""

    key: str
    param: str
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    stacked: bool

    @property
    def region(self) -> tuple[slice, ...]:
        extent = (1, *self.shape) if self.stacked else self.shape
        return tuple(slice(o, o + e) for o, e in zip(self.offset, extent))


@dataclass
class Layout:
    pieces: dict[str, list[Piece]]  # per parameter (model order), pieces in key order
    dtypes: dict[str, torch.dtype]  # per checkpoint key: the source's dtype, else the parameter's
    carried: list[str]  # source keys of components the model does not have


def _unwrapped_class(model: torch.nn.Module) -> type:
    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def _listing(title: str, keys) -> str:
    keys = sorted(keys, key=dot_natural_key)
    shown = "\n  ".join(keys[:MAX_LISTED])
    more = f"\n  ... and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return f"{title} ({len(keys)}):\n  {shown}{more}"


def _fusion_dim(converter: WeightConverter) -> Optional[int]:
    """The concatenation dim of a stack-then-concatenate converter (None: stack only); anything else
    cannot be split into per-shard reads."""
    ops = converter.operations
    if isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
        if len(ops) == 1:
            return None
        if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim > 0:
            return ops[1].dim
    raise NotImplementedError(f"{converter}: operations {ops} cannot be read shard by shard")


def model_layout(
    model: torch.nn.Module, params: dict[str, ShardedParam], source: Optional[dict[str, TensorEntry]]
) -> Layout:
    """Map the model's parameters to the keys of `source` (a checkpoint's tensors), or, without a
    source, to the keys `save_pretrained` would write. Raises `CheckpointError` listing missing,
    unexpected and mis-shaped keys."""
    with torch.device("meta"):  # a copy of the config: building a model writes to it
        shadow = _unwrapped_class(model)._from_config(copy.deepcopy(model.config))
    meta = {name: torch.empty(p.global_shape, dtype=p.param.dtype, device="meta") for name, p in params.items()}
    native = {key: tuple(t.shape) for key, t in revert_weight_conversion(shadow, meta).items()}

    if source is None:
        expected, carried = native, []
        dtypes = {}
    else:
        prefix = max(PREFIXES, key=lambda p: sum(p + key in source for key in native))
        expected = {prefix + key: shape for key, shape in native.items()}
        missing = [key for key in expected if key not in source]
        extra = [key for key in source if key not in expected]
        carried = [key for key in extra if key.split(".")[0] in CARRIED_COMPONENTS and not hasattr(model, key.split(".")[0])]
        unexpected = sorted(set(extra) - set(carried))
        mismatched = [
            f"{key}: checkpoint {source[key].shape}, model expects {shape}"
            for key, shape in expected.items() if key in source and source[key].shape != shape
        ]
        problems = [
            _listing(title, keys)
            for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
            if keys
        ]
        if problems:
            raise CheckpointError(f"checkpoint does not fit {type(shadow).__name__}:\n" + "\n".join(problems))
        dtypes = {key: entry.dtype for key, entry in source.items()}

    conversions = get_model_conversion_mapping(shadow)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    pieces: dict[str, list[Piece]] = {name: [] for name in params}
    fused: dict[str, list[tuple[str, WeightConverter, int, int, tuple[int, ...]]]] = {}
    for key in sorted(expected, key=dot_natural_key):
        # As HF's loader does: renamings, at most one converter, base-model prefix added or stripped.
        name, pattern = rename_source_key(key, renamings, converters, shadow.base_model_prefix, meta)
        if name not in params and key in params:
            name, pattern = key, None
        if name not in params:
            raise CheckpointError(f"{key}: maps to {name}, which {type(shadow).__name__} does not have")
        shape = expected[key]
        if pattern is None:
            pieces[name].append(Piece(key, name, (0,) * len(shape), shape, stacked=False))
            continue
        converter = by_pattern[pattern]
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        if match is None:
            raise CheckpointError(f"{key}: no expert index where {converter} expects one ({pattern})")
        fused.setdefault(name, []).append((key, converter, converter.source_patterns.index(pattern), int(match.group(1)), shape))

    for name, members in fused.items():
        # Per-expert tensors stack along dim 0 (expert index); several patterns (gate, up) then
        # concatenate along `dim`, in the converter's pattern order.
        dim = _fusion_dim(members[0][1])
        sizes = {j: shape[dim - 1] for _, _, j, _, shape in members} if dim else {}
        for key, _, j, expert, shape in members:
            offset = [expert] + [0] * len(shape)
            if dim:
                offset[dim] = sum(size for i, size in sizes.items() if i < j)
            pieces[name].append(Piece(key, name, tuple(offset), shape, stacked=True))

    for name, p in params.items():
        covered = sum(torch.Size(piece.shape).numel() for piece in pieces[name])
        if covered != torch.Size(p.global_shape).numel():
            raise CheckpointError(f"{name}: checkpoint keys cover {covered} of its {torch.Size(p.global_shape).numel()} elements")
    for name in pieces:
        pieces[name].sort(key=lambda piece: dot_natural_key(piece.key))
    for name, p in params.items():
        for piece in pieces[name]:
            dtypes.setdefault(piece.key, p.param.dtype)
    return Layout(pieces, dtypes, carried)
