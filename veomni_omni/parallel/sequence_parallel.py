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


import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.utils.generic import is_flash_attention_requested
from veomni.distributed.sequence_parallel import gather_heads_scatter_seq, gather_seq_scatter_heads

from ..models.packed_attention import segment_attention, segment_bounds

_hf_vision_attention = hf.Qwen3OmniMoeVisionAttention.forward  # captured before the patch set is applied


def ulysses_group():
    from veomni.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

    if not is_parallel_state_initialized():
        return None
    state = get_parallel_state()
    return state.ulysses_group if state.ulysses_enabled else None


# ViT keyword argument (it reaches every block's attention, also when gradient checkpointing recomputes
# a block in backward): the host-side boundaries of the images (frames) in the gathered patch sequence.
# Its presence says the ViT runs on this rank's slice of the patch sequence.
VISION_SEGMENTS_KWARG = "sequence_parallel_segments"


def vision_attention_forward(
    self,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """HF's ViT attention; under SP (`sequence_parallel_segments` given) q/k/v gather the patch
    sequence and scatter heads before attention, and the output goes back the same way. The gathered
    sequence's boundaries are `cu_seqlens` / `max_seqlen` (device) and the segments (host): a flash
    implementation takes the former in one varlen call, as HF's own ViT does; SDPA (and eager, which
    only differs from it in returning weights) attends per segment on the host boundaries."""
    segments = kwargs.pop(VISION_SEGMENTS_KWARG, None)
    if segments is None:
        return _hf_vision_attention(self, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    group = ulysses_group()
    seq_length = hidden_states.shape[0]
    query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    query, key = hf.apply_rotary_pos_emb_vision(query, key, cos, sin)
    query, key, value = (gather_seq_scatter_heads(t, seq_dim=0, head_dim=1, group=group).transpose(0, 1).unsqueeze(0)
                         for t in (query, key, value))  # (1, heads/sp, patches, head_dim)
    if is_flash_attention_requested(self.config):
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)  # VeOmni's: Ulysses skipped
        out, _ = attention(
            self, query, key, value, attention_mask=None, scaling=self.scaling, dropout=0.0,
            cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen, max_length_k=max_seqlen, is_causal=False,
        )
        out = out[0]  # (patches, heads/sp, head_dim)
    else:
        out = segment_attention(query, key, value, segments, self.scaling, False)[0].transpose(0, 1)
    out = gather_heads_scatter_seq(out, head_dim=1, seq_dim=0, group=group)
    return self.proj(out.reshape(seq_length, -1).contiguous())


def ulysses_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Text attention for CPU (and any device) under Ulysses SP, what "sdpa" resolves to there
    (packed_attention): (B, H, S/sp, D) slices in, varlen causal attention over the packed samples
    (`cu_seq_lens_q`), (B, S/sp, H, D) out."""
    from veomni.ops.kernels.attention.ulysses import prepare_ulysses_qkv

    group = ulysses_group()
    bounds = segment_bounds(kwargs)  # of the whole packed row, which the all-to-all below gathers
    if group is None or bounds is None:
        raise ValueError("Ulysses sdpa attention needs Ulysses SP and a packed batch's boundaries (cu_seq_lens_host or cu_seq_lens_q)")
    sp_size = torch.distributed.get_world_size(group)
    query, key, value, _ = prepare_ulysses_qkv(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), group=group, ulysses_size=sp_size
    )
    out = segment_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bounds, scaling, True, dropout=dropout)
    return gather_heads_scatter_seq(out.transpose(1, 2), head_dim=2, seq_dim=1, group=group), None


def _all_to_all_hidden(x: torch.Tensor, group) -> torch.Tensor:
    """(sequence slice, hidden) → (whole sequence, hidden/sp); hidden padded to a multiple of sp."""
    pad = -x.shape[-1] % torch.distributed.get_world_size(group)
    return gather_seq_scatter_heads(F.pad(x, (0, pad)) if pad else x, seq_dim=0, head_dim=1, group=group)


def fill_back_visual(inputs_embeds, visual_rows, fill_positions, group):
    """Scatter this rank's ViT rows (slice of the joint patch order) into the sliced embeddings
    through the gather-seq/scatter-hidden layout; never materialises sequence × hidden.
    `fill_positions`: where each joint ViT row goes in the sequence (`VisionShard.fill_positions`)."""
    hidden = inputs_embeds.shape[-1]
    embeds = _all_to_all_hidden(inputs_embeds[0], group)  # (L, H/sp)
    rows = _all_to_all_hidden(visual_rows.to(embeds.dtype), group)[: fill_positions.shape[0]]  # (N, H/sp): the pad rows dropped
    embeds = embeds.index_copy_(0, fill_positions, rows)
    del rows
    embeds = gather_heads_scatter_seq(embeds, head_dim=1, seq_dim=0, group=group)  # (L/sp, H padded)
    return (embeds if embeds.shape[-1] == hidden else embeds[:, :hidden]).unsqueeze(0)


class _EqualRowsAllGather(torch.autograd.Function):
    """All-gather along dim 0 when every rank holds the same number of rows: no size exchange
    (VeOmni's gather exchanges sizes with a host sync). Backward sums the gradient over ranks and
    keeps this rank's rows (reduce-scatter on NCCL; all-reduce where it is missing, e.g. gloo)."""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group = group
        world = torch.distributed.get_world_size(group)
        out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, rows.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world, rank = torch.distributed.get_world_size(ctx.group), torch.distributed.get_rank(ctx.group)
        grad = grad.contiguous()
        if torch.distributed.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
            torch.distributed.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        total = grad.clone()
        torch.distributed.all_reduce(total, group=ctx.group)
        return total.chunk(world)[rank].contiguous(), None


def deepstack_rows(levels: list[torch.Tensor], vision, group) -> list[torch.Tensor]:
    """All-gather each deepstack level once and keep the rows of this rank's slice (`vision`: its VisionShard)."""
    first, last = vision.rows
    order = vision.order[first:last]
    return [_EqualRowsAllGather.apply(level, group)[order] for level in levels]


def sequence_parallel_forward(self, input_ids, position_ids, sp_inputs, pixel_values=None, output_router_logits=False, **kwargs):
    """The thinker model's forward on this rank's slice of a packed sequence (see module docstring);
    `sp_inputs`: its `veomni_omni.data.sequence_parallel.SequenceParallelShard`."""
    from ..models.encoders import dummy_audio_forward, dummy_vision_forward, encoders_must_run

    if sp_inputs.problems:  # found by the collator (shard_collated_batch), which does not raise in a DataLoader
        from ..data.checks import BadInputError

        raise BadInputError("; ".join(sp_inputs.problems))
    group = ulysses_group()
    if group is None:
        raise ValueError("sp_inputs given but VeOmni's parallel state has no Ulysses group")
    # VeOmni's trainer moves only a batch's tensors and dicts to the device (`preforward`); the shard is
    # moved here, to where its text slice is (a no-op for tensors already there).
    sp_inputs = sp_inputs.to(input_ids.device, non_blocking=True)
    inputs_embeds = self.get_input_embeddings()(input_ids)
    distributed = encoders_must_run()

    # Audio: the windows this slice needs were chosen (and chunked) by the collator; fill its rows locally.
    if sp_inputs.audio is not None:
        audio = self.audio_tower(None, **sp_inputs.audio.tower_kwargs()).last_hidden_state[sp_inputs.audio.rows]
        positions = sp_inputs.audio.local_positions
        inputs_embeds = inputs_embeds[0].index_copy(0, positions, audio.to(inputs_embeds.dtype)).unsqueeze(0)
    elif distributed:
        inputs_embeds = inputs_embeds + dummy_audio_forward(self).to(inputs_embeds.dtype)

    # Vision: this rank's patch slice through the ViT (Ulysses attention), then fill-back by all-to-all.
    visual_pos_masks, deepstack = None, None
    if pixel_values is not None:
        vision = sp_inputs.vision
        vision_kwargs = {**vision.encoder_kwargs(), VISION_SEGMENTS_KWARG: vision.segments}
        out = self.visual(pixel_values.type(self.visual.dtype), return_dict=True, **vision_kwargs)
        inputs_embeds = fill_back_visual(inputs_embeds, out.pooler_output, vision.fill_positions, group)
        visual_pos_masks = vision.local_positions  # positions, not a mask: see deepstack_process
        deepstack = deepstack_rows(out.deepstack_features, vision, group)
    elif distributed:
        inputs_embeds = inputs_embeds + dummy_vision_forward(self.visual, sp_size=sp_inputs.sp_size).to(inputs_embeds.dtype)

    lm_keys = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "cu_seq_lens_host")
    lm_kwargs = {k: kwargs[k] for k in lm_keys if k in kwargs}
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


def deepstack_process(self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
    """HF's deepstack add; `visual_pos_masks` may also be the (batch-flattened) positions of the
    visual tokens, as the SP forward passes them: an index add needs no device-to-host sync."""
    visual_embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype)
    if visual_pos_masks.dtype == torch.bool:
        hidden_states = hidden_states.clone()
        hidden_states[visual_pos_masks, :] = hidden_states[visual_pos_masks, :] + visual_embeds
        return hidden_states
    flat = hidden_states.flatten(0, 1).index_add(0, visual_pos_masks.to(hidden_states.device), visual_embeds)
    return flat.view_as(hidden_states)
