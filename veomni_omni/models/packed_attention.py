"""Attention over packed micro batches without flash-attn: honour `cu_seq_lens_q`.

VeOmni's packing collator puts a micro batch's samples in one row with an all-ones attention mask
and flash-attn's varlen boundaries (`cu_seq_lens_q/k`, `max_length_q/k`: where the position ids
restart at 0). flash-attn attends within each segment; transformers' SDPA and eager attention
ignore the boundaries, so on CPU packed samples attended to each other.

transformers resolves `config._attn_implementation` through `AttentionInterface.get_interface`;
the patch set replaces it with `get_interface` below:
- "sdpa" resolves to `varlen_sdpa_attention`: causal SDPA within each segment when the boundaries
  describe more than one segment, HF's own sdpa, unchanged, otherwise; under Ulysses SP the
  thinker's text attention (each rank holds a slice of the sequence) goes to
  `sequence_parallel.ulysses_sdpa_attention` instead;
- "eager" resolves to HF's eager behind `refuse_packed`: eager is the attention-weights (debug)
  path, whose (S × S) weights a per-segment computation would change; a packed batch is refused,
  and so is the text attention under Ulysses SP (it would attend within each rank's slice);
- VeOmni's "*_with_sp" kernels (flash-attn / flex / magi, Ulysses all-to-all inside) are for the
  sequence-sliced text attention only: the audio tower (each rank encodes its own windows) and the
  ViT call them with `skip_ulysses`.

Host syncs: slicing segments needs the boundaries on the host. They come from `cu_seq_lens_host`
when the collator provides it (veomni_omni's SP path), else from `cu_seq_lens_q`, converted once
per forward (every layer receives the same tensor): no sync when it is a CPU tensor (VeOmni's
CPU training), one device-to-host copy per forward when it lives on an accelerator (where
flash-attn is the intended kernel). Whether there is more than one segment is read from the
tensor's shape (no sync). Inside a torch.compile graph the boundaries cannot come to the host
without a graph break: there the same attention runs as one SDPA call whose mask keeps each query
to its own segment (`segment_mask`, built on device; O(S²) mask instead of per-segment blocks).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _hf_sdpa
from transformers.modeling_utils import AttentionInterface
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextAttention

PACKED_ATTENTION_PATCH = "packed_attention"  # the patch-set entry on `AttentionInterface.get_interface`
# Keyword arguments HF's attention functions may take that per-segment SDPA does not implement.
_UNSUPPORTED_WITH_SEGMENTS = ("sliding_window", "softcap", "position_bias", "s_aux")
_host_copy: tuple[Optional[weakref.ref], list[int]] = (None, [])  # last `cu_seq_lens_q` seen, on the host


def segment_attention(query, key, value, bounds: list[int], scaling, causal: bool, attention_mask=None, dropout: float = 0.0):
    """Attention within each [bounds[i], bounds[i+1]) segment of the sequence; (B, H, S, D) in and out,
    grouped-query heads allowed. A 4-D `attention_mask` (B, 1, S, S) is cut to each segment's block."""
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        mask = None if attention_mask is None else attention_mask[..., start:end, start:end]
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
                dropout_p=dropout, is_causal=causal and mask is None, scale=scaling, enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2)


def segment_mask(cu_seq_lens: torch.Tensor, length: int, causal: bool, attention_mask=None) -> torch.Tensor:
    """Bool mask for SDPA, (1, 1, S, S): query i may see key j when both lie in the same [cu[k], cu[k+1])
    segment (and j <= i if causal); with a 4-D bool `attention_mask` (B, 1, S, S), and-ed with it (it then
    carries the causality itself, as in `segment_attention`). On device: no host sync."""
    positions = torch.arange(length, device=cu_seq_lens.device)
    segment = torch.bucketize(positions, cu_seq_lens, right=True)
    allowed = segment[:, None] == segment[None, :]
    if attention_mask is not None:
        return allowed & attention_mask
    if causal:
        allowed = allowed & (positions[:, None] >= positions[None, :])
    return allowed[None, None]


def _on_host(cu_seq_lens: torch.Tensor) -> list[int]:
    """`cu_seq_lens.tolist()`, computed once for the tensor all layers of a forward share."""
    global _host_copy
    cached, bounds = _host_copy
    if cached is None or cached() is not cu_seq_lens:
        bounds = cu_seq_lens.tolist()
        _host_copy = (weakref.ref(cu_seq_lens), bounds)
    return bounds


def segment_bounds(kwargs: dict) -> Optional[list[int]]:
    """Host-side segment boundaries of a packed row (`cu_seq_lens_host`, else `cu_seq_lens_q`), or None."""
    if kwargs.get("cu_seq_lens_host") is not None:
        return list(kwargs["cu_seq_lens_host"])
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    return None if cu_seq_lens is None else _on_host(cu_seq_lens)


def is_packed(kwargs: dict) -> bool:
    """Whether the attention kwargs describe more than one segment (from shapes only: no sync)."""
    if kwargs.get("cu_seq_lens_host") is not None:
        return len(kwargs["cu_seq_lens_host"]) > 2
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    return cu_seq_lens is not None and cu_seq_lens.numel() > 2


def _check_packed_call(module, query, key, bounds, kwargs: dict) -> None:
    """The boundaries must describe this single row of self-attention, and nothing per-segment
    SDPA leaves out may be asked for. `bounds`: on the host, or inside a compiled graph the device
    tensor (its coverage is asserted on device, no sync)."""
    name = type(module).__name__
    if query.shape[0] != 1:
        raise ValueError(
            f"{name}: packed boundaries (cu_seq_lens_q) with a batch of {query.shape[0]} rows; a packed micro batch "
            "is one row (VeOmni's packing collator makes it so)"
        )
    on_device = isinstance(bounds, torch.Tensor)
    message = (
        f"{name}: packed boundaries cu_seq_lens_q={'(on device)' if on_device else bounds} do not cover the "
        f"{query.shape[2]} queries / {key.shape[2]} keys of this call (each rank must hold the whole packed row, "
        "or use an attention made for sequence parallelism)"
    )
    if key.shape[2] != query.shape[2] or (not on_device and (bounds[0] != 0 or bounds[-1] != query.shape[2])):
        raise ValueError(message)
    if on_device:
        torch._assert_async((bounds[0] == 0) & (bounds[-1] == query.shape[2]), message)
    unsupported = [k for k in _UNSUPPORTED_WITH_SEGMENTS if kwargs.get(k) is not None]
    if unsupported:
        raise ValueError(f"{name}: per-segment sdpa over a packed row does not implement {unsupported}")


def _sequence_sliced(module) -> bool:
    """Whether this attention call sees a slice of the sequence: the thinker's text attention under Ulysses SP."""
    from ..parallel.sequence_parallel import ulysses_group

    return isinstance(module, Qwen3OmniMoeThinkerTextAttention) and ulysses_group() is not None


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' "sdpa" that honours packed boundaries and Ulysses SP (see the module doc); (B, S, H, D) out."""
    if _sequence_sliced(module):
        from ..parallel.sequence_parallel import ulysses_sdpa_attention

        return ulysses_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if not is_packed(kwargs):
        return _hf_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if torch.compiler.is_compiling() and kwargs.get("cu_seq_lens_host") is None:
        cu_seq_lens = kwargs["cu_seq_lens_q"]
        _check_packed_call(module, query, key, cu_seq_lens, kwargs)
        mask = segment_mask(cu_seq_lens, query.shape[2], causal, attention_mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True)
    else:
        bounds = segment_bounds(kwargs)
        _check_packed_call(module, query, key, bounds, kwargs)
        out = segment_attention(query, key, value, bounds, scaling, causal, attention_mask, dropout)
    return out.transpose(1, 2).contiguous(), None


def refuse_packed(eager_attention, module, *args, **kwargs):
    """The model's eager attention, refusing packed boundaries and sequence slices it would silently ignore."""
    if _sequence_sliced(module):
        raise ValueError(
            f"{type(module).__name__}: attn_implementation='eager' under Ulysses SP would attend within each rank's "
            "slice of the sequence; use 'sdpa' (CPU or any device) or flash_attention_2/3"
        )
    if is_packed(kwargs):
        raise ValueError(
            f"{type(module).__name__}: attn_implementation='eager' ignores the packed boundaries (cu_seq_lens_q) of "
            "this micro batch, so its samples would attend to each other; use 'sdpa' (per-segment on any device) "
            "or flash_attention_2/3 for packed training"
        )
    return eager_attention(module, *args, **kwargs)


def encoders_skip_ulysses(sequence_parallel_attention, module, *args, **kwargs):
    """A VeOmni "*_with_sp" attention: Ulysses for the thinker's text attention, plain for every other module."""
    if not isinstance(module, Qwen3OmniMoeThinkerTextAttention):
        kwargs["skip_ulysses"] = True
    return sequence_parallel_attention(module, *args, **kwargs)


def get_interface(self, attn_implementation: str, default: Callable) -> Callable:
    """HF's resolution of `attn_implementation`, with sdpa and eager made safe for packed batches and
    Ulysses SP, and VeOmni's SP attentions kept to the text decoder."""
    from ..patchset import original

    interface = original(PACKED_ATTENTION_PATCH)(self, attn_implementation, default)
    if interface is _hf_sdpa:
        return varlen_sdpa_attention
    if interface is default:  # "eager" (or unset): the calling model's own eager attention
        return functools.partial(refuse_packed, interface)
    if attn_implementation.startswith("veomni_") and attn_implementation.endswith("_with_sp"):
        return functools.partial(encoders_skip_ulysses, interface)
    return interface
