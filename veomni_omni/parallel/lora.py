"""LoRA under FSDP2: the frozen base held in the dtype it computes in.

VeOmni's `build_parallelize_model` upcasts the whole model to fp32 when mixed precision is on (its
optimizer steps fp32 parameters) and FSDP2 then casts every parameter to `mixed_precision.param_dtype`
at each all-gather. A frozen weight is never stepped: its fp32 shard is the bf16 checkpoint value held
twice as wide, and what the forward sees is that value cast back. `parallelize_model_fsdp2` here holds a
LoRA model's frozen parameters in `param_dtype` before VeOmni shards it, so the all-gather moves the
same values without a cast and the base takes half the memory; the adapters (trainable) stay fp32, as
FSDP2 wants one dtype among a unit's trainable parameters. Forward and gradients are bit-identical
(tests/test_checkpoint_veomni.py). Modules the model keeps out of mixed precision
(`get_ignore_modules_in_mixed_precision`) keep their dtype.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from veomni.arguments import MixedPrecisionConfig
from veomni.distributed.torch_compile import CompileConfig

from ..checkpoint.lora import is_lora_model

PARAM_DTYPE_PATCH = "lora_frozen_in_param_dtype"


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast `model`'s frozen floating-point parameters to `dtype` (meta or materialised)."""
    ignored = tuple(model.get_ignore_modules_in_mixed_precision() or ()) if hasattr(model, "get_ignore_modules_in_mixed_precision") else ()
    kept = {id(p) for m in model.modules() if ignored and isinstance(m, ignored) for p in m.parameters()}
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype and id(param) not in kept:
            param.data = param.data.to(dtype)


def parallelize_model_fsdp2(
    model: nn.Module,
    weights_path: Optional[str] = None,
    enable_reshard_after_forward: bool = True,
    mixed_precision: MixedPrecisionConfig = MixedPrecisionConfig(enable=True),  # noqa
    basic_modules: Optional[List[str]] = None,
    muon_expert_zero_comm: bool = False,
    compile_config: Optional[CompileConfig] = None,
    should_skip_hf_weight_load: bool = False,
    **kwargs,
) -> nn.Module:
    """VeOmni's `parallelize_model_fsdp2`, a LoRA model's frozen parameters first held in the mixed-precision
    `param_dtype` (see the module doc)."""
    from ..patchset import original

    if is_lora_model(model) and mixed_precision.enable and mixed_precision.param_dtype:
        hold_frozen_in(model, getattr(torch, mixed_precision.param_dtype))
    return original(PARAM_DTYPE_PATCH)(
        model, weights_path, enable_reshard_after_forward, mixed_precision, basic_modules, muon_expert_zero_comm,
        compile_config, should_skip_hf_weight_load, **kwargs,
    )
