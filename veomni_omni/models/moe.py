"""Thinker MoE experts: HF's own implementations while the experts are whole, the expert-parallel token
dispatch (veomni_omni/parallel/expert_parallel.py) when VeOmni's parallel plan has sharded them along the
expert dimension over an expert-parallel (EP) group.

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
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.utils import logging
from veomni.lora.moe_layers import LoraSharedExperts, is_lora_moe_experts

from ..parallel.expert_parallel import (
    reduce_gradients_with_sum_on_cpu,
    dispatch_experts,
    expert_counts,
    expert_parallel_group,
    expert_weights,
)

logger = logging.get_logger(__name__)

# The patch-set entries on HF's experts forwards (the thinker's and the talker's, the same code): each
# original is the `use_experts_implementation` wrapper (dispatches on `config._experts_implementation`),
# whose `__wrapped__` is HF's eager loop.
EXPERTS_FORWARD_PATCH = "thinker_experts_forward"
TALKER_EXPERTS_FORWARD_PATCH = "talker_experts_forward"


def hf_experts_forward(experts: nn.Module):
    """HF's forward of this experts module's class, as the patch set stored it."""
    from ..patchset import original

    talker = isinstance(experts, hf.Qwen3OmniMoeTalkerTextExperts)
    return original(TALKER_EXPERTS_FORWARD_PATCH if talker else EXPERTS_FORWARD_PATCH)

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


def _fused_matches_layout(group: Optional[dist.ProcessGroup]) -> bool:
    """VeOmni's fused path dispatches over its parallel state's EP group whenever EP is on: only right
    when this module's experts are the ones sharded over it."""
    if group is not None:
        return True
    from veomni.distributed.parallel_state import get_parallel_state, is_parallel_state_initialized

    return not (is_parallel_state_initialized() and get_parallel_state().ep_enabled)


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
    """Thinker and talker experts: HF's forward (its eager/grouped_mm/batched_mm dispatch) while the experts are whole;
    token dispatch over the EP group when VeOmni's plan has sharded them; VeOmni's fused kernel on CUDA
    when selected (`set_moe_implementation`). Counts the expert load either way."""
    counts = expert_counts(top_k_index.reshape(-1), self.num_experts)
    _record_load(self, counts)
    group = expert_parallel_group(self)
    kernel = _fused_kernel(hidden_states) if _fused_matches_layout(group) else None
    if kernel is not None:
        return _fused_forward(self, kernel, hidden_states, top_k_index, top_k_weights)
    if group is None:
        return hf_experts_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    reduce_gradients_with_sum_on_cpu(self)
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

    counts = expert_counts(top_k_index.reshape(-1), self.num_experts)
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
    reduce_gradients_with_sum_on_cpu(self)
    return dispatch_experts(self, hidden_states, top_k_index, top_k_weights, group, counts)
