"""Expert parallelism (EP) at run time: the thinker's experts sharded along the expert dimension over an
EP group by VeOmni's parallel plan (veomni_omni/parallel/plan.py), and the token dispatch that runs them.

Dispatch (torch-native, any device, gloo or NCCL), per MoE layer:
  1. every rank sorts its (token, slot) pairs by expert id, so they are grouped by the EP rank owning
     the expert (rank r owns experts [r·E/P, (r+1)·E/P), the `Shard(0)` slice of the plan);
  2. per-expert counts are exchanged (one small all-to-all) and read on the host once (the split sizes
     of the next all-to-all);
  3. all-to-all of the token rows to their owners; the owner runs its local experts with HF's own
     implementation (`config._experts_implementation`: eager / grouped_mm / batched_mm) on a view of the
     module whose `num_experts` is the local count;
  4. all-to-all of the expert outputs back; each rank restores slot order and combines the top-k
     outputs with its routing weights (so router gradients stay local).
Both exchanges are autograd Functions whose backward is the reverse exchange.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from veomni.lora.moe_layers import is_lora_moe_experts


def expert_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj, down_proj) of an experts module; a LoRA wrapper holds them as `<name>.base_layer.weight`."""
    if is_lora_moe_experts(experts):
        return experts.gate_up_proj.base_layer.weight, experts.down_proj.base_layer.weight
    return experts.gate_up_proj, experts.down_proj


# ---------------------------------------------------------------------------------------------------
# Expert-parallel group
# ---------------------------------------------------------------------------------------------------


def expert_parallel_group(experts: nn.Module) -> Optional[dist.ProcessGroup]:
    """The EP group the module's experts are sharded over, or None when it holds all of them.

    Sharding is read off the weights (`[E/ep, ...]` after VeOmni's `ParallelPlan.apply`), the group off
    VeOmni's parallel state (the `ep` mesh the plan sharded over)."""
    num_local = expert_weights(experts)[0].shape[0]
    if num_local == experts.num_experts:
        return None
    from veomni.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

    state = get_parallel_state() if is_parallel_state_initialized() else None
    if state is None or not state.ep_enabled or state.ep_size * num_local != experts.num_experts:
        raise RuntimeError(
            f"{type(experts).__name__} holds {num_local} of {experts.num_experts} experts, but VeOmni's parallel state has "
            f"no expert-parallel group of size {experts.num_experts // num_local} "
            f"(init_parallel_state(..., extra_parallel_sizes=(ep,), extra_parallel_names=('ep',)))."
        )
    return state.ep_group


def reduce_gradients_with_sum_on_cpu(experts: nn.Module) -> None:
    """VeOmni divides an EP experts unit's gradients by the world size (`set_gradient_divide_factor`),
    which FSDP2 turns into a `ReduceOp.PREMUL_SUM` reduce-scatter over the `ep_fsdp` group; gloo has no
    such op ("Cannot use ReduceOp.PREMUL_SUM with Gloo"). On CPU, reduce with SUM and divide after.
    Only where that group has several ranks: on a single rank FSDP2 runs no collective and divides by
    the factor itself, and forcing SUM there makes it divide twice (torch 2.13)."""
    if experts.__dict__.get("_veomni_omni_sum_reduction"):
        return
    from veomni.distributed.parallel_state import get_parallel_state

    if isinstance(experts, FSDPModule) and expert_weights(experts)[0].device.type == "cpu" and get_parallel_state().ep_fsdp_size > 1:
        experts.set_force_sum_reduction_for_comms(True)
    experts.__dict__["_veomni_omni_sum_reduction"] = True


# ---------------------------------------------------------------------------------------------------
# Torch-native dispatch
# ---------------------------------------------------------------------------------------------------


def expert_counts(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, on device without a host sync (bincount on CUDA reads the max first)."""
    return torch.zeros(num_experts, dtype=torch.int64, device=slots.device).scatter_add_(0, slots, torch.ones_like(slots))


def _exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits (gloo and NCCL); the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


class _LocalExperts:
    """The rank's slice of an experts module as HF's expert functions see it: `num_experts` is the local
    count, everything else (weights, activation, layout flags) is the module's."""

    _is_expert_parallel = False  # only real local ids are sent: no out-of-range sentinels

    def __init__(self, experts: nn.Module, num_local: int):
        self._experts = experts
        self.num_experts = num_local

    def __getattr__(self, name):
        return getattr(self._experts, name)

    def _apply_gate(self, gate_up_out):
        return type(self._experts)._apply_gate(self, gate_up_out)


def _run_local_experts(experts: nn.Module, x: torch.Tensor, local_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """Each received row through its (local) expert, unweighted, with HF's selected implementation."""
    if x.shape[0] == 0:
        # Nothing routed to this rank's experts. The (empty) result still depends on the received rows and
        # on the weights (adapters included), so that every rank runs the reverse exchange in backward and
        # FSDP reduces a (zero) gradient for every expert shard, as on the ranks that did get tokens.
        weights = sum(p.sum() for p in experts.parameters())
        return x * 0 + weights * 0
    if is_lora_moe_experts(experts):  # base + adapters, VeOmni's per-expert computation
        implementation = type(experts)._eager_forward
    else:
        from ..models.moe import hf_experts_forward

        hf_eager = hf_experts_forward(experts).__wrapped__
        implementation = ALL_EXPERTS_FUNCTIONS.get_interface(experts.config._experts_implementation, hf_eager)
    ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    return implementation(_LocalExperts(experts, num_local), x, local_ids.unsqueeze(1), ones)


def dispatch_experts(
    experts: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    group: dist.ProcessGroup,
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MoE output for `hidden_states` (N, H) with experts sharded over `group` (torch-native EP)."""
    num_experts, ep_size = experts.num_experts, dist.get_world_size(group)
    num_local = num_experts // ep_size
    num_tokens, top_k = top_k_index.shape
    slots = top_k_index.reshape(-1)
    if counts is None:
        counts = expert_counts(slots, num_experts)

    # 1-2. Group (token, slot) pairs by expert, hence by owner; exchange per-expert counts.
    order = torch.argsort(slots, stable=True)
    received = torch.empty_like(counts)  # [source rank, local expert]
    dist.all_to_all_single(received, counts, group=group)
    splits = torch.cat([counts.view(ep_size, num_local).sum(1), received.view(ep_size, num_local).sum(1)]).tolist()
    send_splits, recv_splits = splits[:ep_size], splits[ep_size:]

    # 3. Rows to their owners; local experts; 4. outputs back.
    rows = _AllToAll.apply(hidden_states[order // top_k], recv_splits, send_splits, group)
    local_ids = torch.repeat_interleave(
        torch.arange(num_local, device=slots.device).repeat(ep_size), received, output_size=sum(recv_splits)
    )
    outputs = _AllToAll.apply(_run_local_experts(experts, rows, local_ids, num_local), send_splits, recv_splits, group)

    # Slot order back, then the routing-weighted sum over the top-k slots (as HF's grouped_mm combines).
    per_slot = outputs.new_empty(outputs.shape).index_copy(0, order, outputs)
    combined = (per_slot.view(num_tokens, top_k, -1) * top_k_weights.unsqueeze(-1)).sum(dim=1)
    return combined.to(hidden_states.dtype)
