"""Ulysses sequence parallelism for the thinker.

Each rank holds a slice of the packed token sequence (see veomni_omni.data.sequence_parallel):
- ViT: a slice of the joint image+video patch sequence; its attention gathers the sequence and
  scatters heads (Ulysses) so every image still attends over all its patches;
- fill-back: encoder outputs meet `inputs_embeds` in the gather-sequence / scatter-hidden layout
  (each rank holds sequence × hidden/sp, never sequence × hidden), are scattered with the
  full-length masks, and go back to the sliced layout;
- deepstack: each level is all-gathered once after the ViT and this rank's rows are taken;
- audio: each rank has encoded only the windows its slice needs, so its rows go straight in;
- text decoder: attention gathers sequence / scatters heads around varlen causal attention.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from veomni.distributed.sequence_parallel import gather_heads_scatter_seq, gather_outputs, gather_seq_scatter_heads

ULYSSES_SDPA = "veomni_omni_ulysses_sdpa"
_vision_group: Optional[torch.distributed.ProcessGroup] = None
_hf_vision_attention = hf.Qwen3OmniMoeVisionAttention.forward  # captured before the patch set is applied


def register_attention() -> None:
    ALL_ATTENTION_FUNCTIONS[ULYSSES_SDPA] = ulysses_sdpa_attention


def unregister_attention() -> None:
    ALL_ATTENTION_FUNCTIONS._local_mapping.pop(ULYSSES_SDPA, None)


def ulysses_group():
    from veomni.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

    if not is_parallel_state_initialized():
        return None
    state = get_parallel_state()
    return state.ulysses_group if state.ulysses_enabled else None


@contextmanager
def vision_sequence_parallel(group):
    """ViT attention inside this block treats its input as this rank's slice of the patch sequence."""
    global _vision_group
    previous, _vision_group = _vision_group, group
    try:
        yield
    finally:
        _vision_group = previous


def _segment_attention(query, key, value, cu_seqlens, scaling, causal):
    """Attention within each [cu_seqlens[i], cu_seqlens[i+1]) segment; (B, H, S, D) layout."""
    bounds = cu_seqlens.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=causal, scale=scaling, enable_gqa=True
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outputs, dim=2)


def vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """HF's ViT attention; under SP (inside `vision_sequence_parallel`) q/k/v gather the patch
    sequence and scatter heads before attention, and the output goes back the same way."""
    if _vision_group is None:
        return _hf_vision_attention(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = hf.apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (gather_seq_scatter_heads(t, seq_dim=0, head_dim=1, group=_vision_group) for t in (query, key, value))
    out = _segment_attention(*(t.transpose(0, 1).unsqueeze(0) for t in (query, key, value)), cu_seqlens, self.scaling, False)
    out = gather_heads_scatter_seq(out[0].transpose(0, 1), head_dim=1, seq_dim=0, group=_vision_group)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def ulysses_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Text attention for CPU (and any device) under Ulysses SP: (B, H, S/sp, D) slices in,
    varlen causal attention over the packed samples (`cu_seq_lens_q`), (B, S/sp, H, D) out."""
    from veomni.ops.kernels.attention.ulysses import prepare_ulysses_qkv

    group = ulysses_group()
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if group is None or cu_seqlens is None:
        raise ValueError(f"{ULYSSES_SDPA} needs Ulysses SP and packed inputs with cu_seq_lens_q")
    sp_size = torch.distributed.get_world_size(group)
    query, key, value, _ = prepare_ulysses_qkv(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), group=group, ulysses_size=sp_size
    )
    out = _segment_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cu_seqlens, scaling, True)
    return gather_heads_scatter_seq(out.transpose(1, 2), head_dim=2, seq_dim=1, group=group), None


def _all_to_all_hidden(x: torch.Tensor, seq_dim: int, group) -> tuple[torch.Tensor, int]:
    """Sliced sequence × full hidden → full sequence × hidden/sp (hidden padded to a multiple of sp)."""
    sp_size = torch.distributed.get_world_size(group)
    hidden = x.shape[-1]
    pad = -hidden % sp_size
    x = F.pad(x, (0, pad))
    return gather_seq_scatter_heads(x, seq_dim=seq_dim, head_dim=x.ndim - 1, group=group), hidden


def fill_back_visual(inputs_embeds, visual_rows, sp_inputs, group):
    """Scatter this rank's ViT rows (slice of the joint patch order) into the sliced embeddings
    through the gather-seq/scatter-hidden layout; never materialises sequence × hidden."""
    embeds, hidden = _all_to_all_hidden(inputs_embeds, seq_dim=1, group=group)  # (1, L, H/sp)
    rows, _ = _all_to_all_hidden(visual_rows, seq_dim=0, group=group)  # (N_padded, H/sp)
    rows = rows[: sp_inputs["n_visual"]][sp_inputs["visual_order"]]
    embeds = embeds[0].index_copy(0, sp_inputs["visual_positions"], rows.to(embeds.dtype)).unsqueeze(0)
    embeds = gather_heads_scatter_seq(embeds, head_dim=2, seq_dim=1, group=group)
    return embeds[..., :hidden]


def deepstack_rows(levels: list[torch.Tensor], sp_inputs, group) -> list[torch.Tensor]:
    """All-gather each deepstack level once and keep the rows of this rank's slice."""
    first, last = sp_inputs["visual_rows"]
    order = sp_inputs["visual_order"][first:last]
    return [gather_outputs(level, gather_dim=0, group=group)[order] for level in levels]


def sequence_parallel_forward(self, input_ids, position_ids, sp_inputs, pixel_values=None, output_router_logits=False, **kwargs):
    """The thinker model's forward on this rank's slice of a packed sequence (see module docstring)."""
    from .encoders import dummy_audio_forward, dummy_vision_forward, encoders_must_run

    group = ulysses_group()
    if group is None:
        raise ValueError("sp_inputs given but VeOmni's parallel state has no Ulysses group")
    inputs_embeds = self.get_input_embeddings()(input_ids)
    distributed = encoders_must_run()

    # Audio: the windows this slice needs were chosen (and chunked) by the collator; fill its rows locally.
    if "audio_tower_kwargs" in sp_inputs:
        audio = self.audio_tower(None, **sp_inputs["audio_tower_kwargs"]).last_hidden_state[sp_inputs["audio_rows"]]
        positions = sp_inputs["audio_local_positions"]
        inputs_embeds = inputs_embeds[0].index_copy(0, positions, audio.to(inputs_embeds.dtype)).unsqueeze(0)
    elif distributed:
        inputs_embeds = inputs_embeds + dummy_audio_forward(self).to(inputs_embeds.dtype)

    # Vision: this rank's patch slice through the ViT (Ulysses attention), then fill-back by all-to-all.
    visual_pos_masks, deepstack = None, None
    with vision_sequence_parallel(group):
        if pixel_values is not None:
            vision_kwargs = dict(sp_inputs["vision_kwargs"])
            out = self.visual(pixel_values.type(self.visual.dtype), return_dict=True, **vision_kwargs)
            inputs_embeds = fill_back_visual(inputs_embeds, out.pooler_output, sp_inputs, group)
            visual_pos_masks = sp_inputs["visual_local_positions"]  # positions, not a mask: see deepstack_process
            deepstack = deepstack_rows(out.deepstack_features, sp_inputs, group)
        elif distributed:
            inputs_embeds = inputs_embeds + dummy_vision_forward(self.visual, sp_size=sp_inputs["sp_size"]).to(inputs_embeds.dtype)

    lm_kwargs = {k: kwargs[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in kwargs}
    return self.language_model(
        attention_mask=None,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=False,
        output_router_logits=output_router_logits,
        deepstack_visual_embeds=deepstack,
        visual_pos_masks=visual_pos_masks,
        **lm_kwargs,
    )


def deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
    """HF's deepstack add; `visual_pos_masks` may also be the (batch-flattened) positions of the
    visual tokens, as the SP forward passes them: an index add needs no device-to-host sync."""
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    if visual_pos_masks.dtype == torch.bool:
        hidden_states = hidden_states.clone()
        hidden_states[visual_pos_masks, :] = hidden_states[visual_pos_masks, :] + visual_embeds
        return hidden_states
    flat = hidden_states.flatten(0, 1).index_add(0, visual_pos_masks.to(hidden_states.device), visual_embeds)
    return flat.view_as(hidden_states)
