"""VeOmni's per-op kernels (`model.ops_implementation.*`) on the HF classes.

VeOmni installs its RMSNorm, RoPE and SwiGLU kernels through OpSlots that only exist in its own
generated modeling files; on transformers' classes those settings did nothing. These forwards read
VeOmni's ops config (the singleton its builder installs) on every call and run the kernel VeOmni's
`KERNEL_REGISTRY` resolves for the selected backend, exactly as its OpSlot call sites do:

  setting                                op / variant                    HF target
  rms_norm_implementation                rms_norm / standard             Qwen3OmniMoeThinkerTextRMSNorm,
                                                                         Qwen3OmniMoeTextRMSNorm (forward)
  rotary_pos_emb_implementation          rotary_pos_emb / full           apply_rotary_pos_emb (text attention;
                                                                         M-RoPE is already folded into cos/sin)
  swiglu_mlp_implementation              swiglu_mlp / standard           Qwen3OmniMoeThinkerTextMLP (dense layers)
  rotary_pos_emb_vision_implementation   rotary_pos_emb_vision / full    apply_rotary_pos_emb_vision (ViT)

"eager", or no ops config installed (plain transformers use): HF's own code, unchanged. A selected
kernel that cannot run here (CPU tensors, a backend VeOmni has no kernel for, its package missing)
raises, naming the setting. Cross-entropy needs no patch: VeOmni's builder binds its selection into
transformers' LOSS_MAPPING, which `thinker_causal_lm_forward` calls with the hidden states and the
lm_head weight (the fused-linear form).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from veomni.ops.config import singleton as ops_singleton
from veomni.ops.kernel_registry import KERNEL_REGISTRY

# The patch-set entries whose originals (HF's code) run when no kernel is selected. Both RMSNorm classes
# have the same forward (one fingerprint in the patch set), so one original serves both.
RMS_NORM_PATCH = "text_rms_norm_forward"
ROTARY_PATCH = "text_rotary_pos_emb"
MLP_PATCH = "text_mlp_forward"
VISION_ROTARY_PATCH = "vision_rotary_pos_emb"

# (op, variant, backend) -> kernel. Resolving imports the kernel's package and queries the device, so
# it is done once; the plain dict lookup afterwards also keeps torch.compile from breaking the graph.
_resolved: dict[tuple[str, str, str], Callable] = {}


def selected_kernel(setting: str, op: str, variant: str, tensor: torch.Tensor) -> Optional[Callable]:
    """VeOmni's kernel for `op` when its ops config selects one for `setting`; None for HF's code."""
    ops = ops_singleton.get_ops_config()
    backend = "eager" if ops is None else getattr(ops, setting)
    if backend == "eager":
        return None
    where = f"model.ops_implementation.{setting}={backend!r}"
    key = (op, variant, backend)
    kernel = _resolved.get(key)
    if kernel is None:
        try:
            kernel = KERNEL_REGISTRY.resolve(op, variant, backend)
        except (KeyError, RuntimeError, ImportError) as error:
            reason = str(error.args[0] if isinstance(error, KeyError) else error).rstrip(".")
            raise RuntimeError(f"{where} cannot be honoured: {reason}. Set it to 'eager' for HF's implementation.") from error
        _resolved[key] = kernel
    if tensor.device.type == "cpu":
        raise RuntimeError(
            f"{where} selects one of VeOmni's accelerator kernels, which cannot run on CPU tensors; "
            "set it to 'eager' to run on CPU (as recipes/tiny_cpu.yaml does)."
        )
    return kernel


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    kernel = selected_kernel("rms_norm_implementation", "rms_norm", "standard", hidden_states)
    if kernel is None:
        from ..patchset import original

        return original(RMS_NORM_PATCH)(self, hidden_states)
    if self.weight.dtype != hidden_states.dtype:
        # HF returns weight * normed in the promoted dtype; the kernels return the input's dtype.
        raise ValueError(
            f"VeOmni's RMSNorm kernel ({type(self).__name__}) needs the weight in the input's dtype "
            f"(weight {self.weight.dtype}, input {hidden_states.dtype}); HF's eager RMSNorm would promote. "
            "Set model.ops_implementation.rms_norm_implementation='eager', or cast the model."
        )
    return kernel(hidden_states, self.weight, self.variance_epsilon)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    kernel = selected_kernel("rotary_pos_emb_implementation", "rotary_pos_emb", "full", q)
    if kernel is None:
        from ..patchset import original

        return original(ROTARY_PATCH)(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim != 1:
        raise ValueError(
            f"VeOmni's RoPE kernels take q/k as (batch, heads, seq, head_dim) (unsqueeze_dim=1), got unsqueeze_dim={unsqueeze_dim}; "
            "set model.ops_implementation.rotary_pos_emb_implementation='eager'."
        )
    return kernel(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def text_mlp_forward(self, x):
    kernel = selected_kernel("swiglu_mlp_implementation", "swiglu_mlp", "standard", x)
    if kernel is None:
        from ..patchset import original

        return original(MLP_PATCH)(self, x)
    if self.config.hidden_act not in ("silu", "swish"):
        raise ValueError(
            f"VeOmni's SwiGLU kernel computes silu(gate) * up, but this MLP's hidden_act is {self.config.hidden_act!r}; "
            "set model.ops_implementation.swiglu_mlp_implementation='eager'."
        )
    return kernel(self, x)


def apply_rotary_pos_emb_vision(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = selected_kernel("rotary_pos_emb_vision_implementation", "rotary_pos_emb_vision", "full", q)
    if kernel is None:
        from ..patchset import original

        return original(VISION_ROTARY_PATCH)(q, k, cos, sin)
    return kernel(q, k, cos, sin)
