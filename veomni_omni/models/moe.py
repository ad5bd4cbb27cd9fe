"""Thinker MoE experts: HF's own implementations while the experts are whole, token dispatch when
VeOmni's parallel plan has sharded them along the expert dimension over an expert-parallel (EP) group.

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

VeOmni's fused kernels (Triton / Quack group-GEMM, EP-capable through VeOmni's own dispatch) run instead
on CUDA when selected; see `moe_implementation`.

LoRA on the experts (VeOmni's `LoraIndependentExperts` / `LoraSharedExperts`, which replace the experts
module when `model.lora_config` targets them): the same dispatch under EP, the wrapper's own per-expert
computation (base + adapters) running the local experts; VeOmni's forward otherwise.

Expert load (tokens routed to each expert, per layer, padding included: that is the compute) is counted
on device in every forward, into a non-persistent buffer of the experts module (no host sync, no graph
break under torch.compile), and read with `expert_load`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.utils import logging
from veomni.lora.moe_layers import LoraSharedExperts, is_lora_moe_experts

logger = logging.get_logger(__name__)

# The patch-set entry on HF's experts forward: its original is the `use_experts_implementation` wrapper
# (dispatches on `config._experts_implementation`), whose `__wrapped__` is HF's eager loop.
EXPERTS_FORWARD_PATCH = "thinker_experts_forward"

# ---------------------------------------------------------------------------------------------------
# Which implementation runs the experts
# ---------------------------------------------------------------------------------------------------

MOE_IMPLEMENTATION_ENV = "VEOMNI_OMNI_MOE_IMPLEMENTATION"
MOE_IMPLEMENTATIONS = ("auto", "torch", "fused_triton", "fused_quack", "fused_npu", "fused_mlu", "fused_mlu_triton")
_FUSED_DTYPES = (torch.bfloat16, torch.float16)  # VeOmni's fused_moe_forward asserts these
_chosen: Optional[str] = None
_warned: set = set()


def set_moe_implementation(name: Optional[str]) -> None:
    """Choose how the thinker experts run, for this process (None: back to the default).

    "torch": HF's implementations, with the torch-native dispatch under EP. "fused_<kernel>": VeOmni's
    fused kernel (raises where it cannot run). "auto": VeOmni's ops config `moe_implementation` when one
    is installed (its "eager" means torch), else the fastest available: Quack on SM90+ where installed,
    then Triton, on CUDA bf16/fp16; torch otherwise. `VEOMNI_OMNI_MOE_IMPLEMENTATION` sets the same.
    """
    if name is not None and name not in MOE_IMPLEMENTATIONS:
        raise ValueError(f"moe implementation {name!r}: expected one of {MOE_IMPLEMENTATIONS}")
    global _chosen
    _chosen = name


def moe_implementation() -> tuple[str, bool]:
    """(implementation, explicit): our setting, else VeOmni's ops config, else "auto"."""
    name = _chosen or os.environ.get(MOE_IMPLEMENTATION_ENV)
    if name:
        if name not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"{MOE_IMPLEMENTATION_ENV}={name!r}: expected one of {MOE_IMPLEMENTATIONS}")
        return name, name != "auto"
    from veomni.ops.config.singleton import get_ops_config

    ops = get_ops_config()
    if ops is None:
        return "auto", False
    return ("torch" if ops.moe_implementation == "eager" else ops.moe_implementation), False


def _fused_kernel_usable(kernel: str, hidden_states: torch.Tensor) -> bool:
    if hidden_states.dtype not in _FUSED_DTYPES or hidden_states.device.type not in ("cuda", "npu", "mlu"):
        return False
    from veomni.utils import import_utils

    if kernel == "quack":
        return import_utils.is_quack_gemm_available()
    if kernel == "triton":
        return hidden_states.is_cuda and import_utils.is_fused_moe_available()
    if kernel == "npu":
        return import_utils.is_torch_npu_available()
    return import_utils.is_torch_mlu_available()


def _fused_kernel(hidden_states: torch.Tensor) -> Optional[str]:
    """The VeOmni fused kernel to run (None: the torch path)."""
    name, explicit = moe_implementation()
    if name == "torch":
        return None
    if name == "auto":
        for kernel in ("quack", "triton"):
            if _fused_kernel_usable(kernel, hidden_states):
                return kernel
        return None
    kernel = name.removeprefix("fused_")
    if _fused_kernel_usable(kernel, hidden_states):
        return kernel
    reason = f"moe implementation {name!r} cannot run on {hidden_states.device.type} {hidden_states.dtype} tensors"
    if explicit:
        raise RuntimeError(f"{reason} (set by veomni_omni); use 'torch' or 'auto'.")
    if name not in _warned:
        _warned.add(name)
        logger.warning(f"{reason}; the thinker experts run the torch path instead.")
    return None


_bound_kernel: Optional[str] = None


def _bind_fused_kernel(kernel: str) -> None:
    """VeOmni's fused MoE kernel `kernel` (and the LoRA-aware kernels it has for it) bound in VeOmni."""
    from veomni.ops.kernels import moe as veomni_moe

    global _bound_kernel
    if _bound_kernel != kernel:
        veomni_moe.apply_veomni_fused_moe_patch(fused_moe_kernel=kernel)
        _bound_kernel = kernel


def _fused_forward(self, kernel: str, hidden_states, top_k_index, top_k_weights):
    """VeOmni's fused MoE (its EP dispatch when VeOmni's parallel state has EP on), called exactly as
    VeOmni's own generated modeling does."""
    from veomni.ops.kernels import moe as veomni_moe

    _bind_fused_kernel(kernel)
    return veomni_moe.fused_moe_forward(
        num_experts=self.num_experts,
        routing_weights=top_k_weights.to(hidden_states.dtype),
        selected_experts=top_k_index,
        hidden_states=hidden_states,
        fc1_1_weight=None,
        fc1_2_weight=None,
        fc2_weight=self.down_proj,
        fc1_1_2_weight=self.gate_up_proj,
    )


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
            f"thinker experts hold {num_local} of {experts.num_experts} experts, but VeOmni's parallel state has "
            f"no expert-parallel group of size {experts.num_experts // num_local} "
            f"(init_parallel_state(..., extra_parallel_sizes=(ep,), extra_parallel_names=('ep',)))."
        )
    return state.ep_group


def _reduce_gradients_with_sum_on_cpu(experts: nn.Module) -> None:
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


def _fused_matches_layout(group: Optional[dist.ProcessGroup]) -> bool:
    """VeOmni's fused path dispatches over its parallel state's EP group whenever EP is on: only right
    when this module's experts are the ones sharded over it."""
    if group is not None:
        return True
    from veomni.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

    return not (is_parallel_state_initialized() and get_parallel_state().ep_enabled)


# ---------------------------------------------------------------------------------------------------
# Torch-native dispatch
# ---------------------------------------------------------------------------------------------------


def _expert_counts(slots: torch.Tensor, num_experts: int) -> torch.Tensor:
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
        from ..patchset import original

        hf_eager = original(EXPERTS_FORWARD_PATCH).__wrapped__
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
        counts = _expert_counts(slots, num_experts)

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


# ---------------------------------------------------------------------------------------------------
# Expert load statistics
# ---------------------------------------------------------------------------------------------------

LOAD_BUFFER = "_veomni_omni_expert_load"  # non-persistent: never in a checkpoint


@torch.library.custom_op("veomni_omni::record_expert_load", mutates_args=("load",), tags=(torch.Tag.cudagraph_unsafe,))
def _record_expert_load(load: torch.Tensor, counts: torch.Tensor) -> None:
    """load += counts, unless this forward is a gradient-checkpointing re-run (it runs inside the
    backward's graph task): that is the step's routing again, not new tokens. A custom op, so that
    torch.compile keeps it as one call and the check runs on every call of a compiled graph (a
    compiled block re-run by checkpointing included) instead of being decided once while tracing;
    not capturable in a CUDA graph for the same reason."""
    if torch._C._current_graph_task_id() == -1:
        load.add_(counts)


@_record_expert_load.register_fake
def _(load: torch.Tensor, counts: torch.Tensor) -> None:
    return None


def _record_load(experts: nn.Module, counts: torch.Tensor) -> None:
    # Created at the module's first forward, zeros on its device, whatever built the module (meta device;
    # from_pretrained, which re-allocates non-persistent buffers uninitialised; before `import veomni_omni`).
    # Under torch.compile that costs one recompile: the first call is traced without the buffer.
    load = experts._buffers.get(LOAD_BUFFER)
    if load is None:
        load = torch.zeros_like(counts)
        experts.register_buffer(LOAD_BUFFER, load, persistent=False)
    _record_expert_load(load, counts.detach())


def expert_load(model: nn.Module, group: Optional[dist.ProcessGroup] = None, reset: bool = True) -> Optional[torch.Tensor]:
    """Tokens routed to each thinker expert, per MoE layer: (num_moe_layers, num_experts) int64, summed
    over the forwards since the last reset (micro-batches of a step), re-runs by gradient checkpointing
    excluded; zeros before any forward. `group`: all-reduce over it (a collective: every rank of it must
    call), e.g. VeOmni's `parallel_state.fsdp_group` (every rank holding distinct tokens) for the global
    load of a step. None for a model without thinker experts."""
    modules = [m for m in model.modules() if isinstance(m, hf.Qwen3OmniMoeThinkerTextExperts) or is_lora_moe_experts(m)]
    if not modules:
        return None
    loads = [m._buffers.get(LOAD_BUFFER) for m in modules]
    matrix = torch.stack([
        torch.zeros(m.num_experts, dtype=torch.int64, device=expert_weights(m)[0].device) if load is None else load
        for m, load in zip(modules, loads)
    ])
    if reset:
        for load in loads:
            if load is not None:
                load.zero_()  # in place: the same buffer, nothing for a compiled graph to re-guard
    if group is not None:
        dist.all_reduce(matrix, group=group)
    return matrix


# ---------------------------------------------------------------------------------------------------
# The patch
# ---------------------------------------------------------------------------------------------------


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Thinker experts: HF's forward (its eager/grouped_mm/batched_mm dispatch) while the experts are whole;
    token dispatch over the EP group when VeOmni's plan has sharded them; VeOmni's fused kernel on CUDA
    when selected (`set_moe_implementation`). Counts the expert load either way."""
    counts = _expert_counts(top_k_index.reshape(-1), self.num_experts)
    _record_load(self, counts)
    group = expert_parallel_group(self)
    kernel = _fused_kernel(hidden_states) if _fused_matches_layout(group) else None
    if kernel is not None:
        return _fused_forward(self, kernel, hidden_states, top_k_index, top_k_weights)
    if group is None:
        from ..patchset import original

        return original(EXPERTS_FORWARD_PATCH)(self, hidden_states, top_k_index, top_k_weights)
    _reduce_gradients_with_sum_on_cpu(self)
    return dispatch_experts(self, hidden_states, top_k_index, top_k_weights, group, counts)


# VeOmni's forward of each wrapper serves the cases it handles. Looked up by isinstance: FSDP2's
# fully_shard replaces a sharded module's class with a generated subclass.
LORA_INDEPENDENT_FORWARD_PATCH = "lora_independent_experts_forward"
LORA_SHARED_FORWARD_PATCH = "lora_shared_experts_forward"


def _lora_fused_kernel_bound(shared: bool) -> bool:
    from veomni.lora import ops as lora_ops

    return (lora_ops._fused_lora_moe_forward if shared else lora_ops._fused_independent_lora_moe_forward) is not None


def lora_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """VeOmni's MoE-LoRA wrappers (`LoraIndependentExperts` / `LoraSharedExperts`): VeOmni's forward (its
    fused LoRA kernel when bound, else its per-expert loop) while the experts are whole or VeOmni's fused
    kernel runs; under EP on the torch path, where VeOmni's forward raises, the token dispatch above with
    the wrapper's per-expert loop (base + adapters) on the rank's local experts. Counts the expert load."""
    from ..patchset import original

    counts = _expert_counts(top_k_index.reshape(-1), self.num_experts)
    _record_load(self, counts)
    group = expert_parallel_group(self)
    kernel = _fused_kernel(hidden_states) if _fused_matches_layout(group) else None
    if kernel is not None:
        _bind_fused_kernel(kernel)
    shared = isinstance(self, LoraSharedExperts)
    if group is None or (kernel is not None and _lora_fused_kernel_bound(shared)):
        return original(LORA_SHARED_FORWARD_PATCH if shared else LORA_INDEPENDENT_FORWARD_PATCH)(self, hidden_states, top_k_index, top_k_weights)
    if shared:
        self._ensure_ep_grad_sync_hooks()  # the shared adapters see only this rank's experts' rows
    _reduce_gradients_with_sum_on_cpu(self)
    return dispatch_experts(self, hidden_states, top_k_index, top_k_weights, group, counts)
