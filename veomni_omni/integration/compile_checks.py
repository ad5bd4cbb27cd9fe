"""VeOmni's `train.torch_compile` switch for Qwen3-Omni, and on CPU.

VeOmni 0.1.12 compiles the forward of each decoder layer (`compile_decoder_blocks`, per-block
torch.compile, FSDP2 hooks outside the graph). Two of its checks stop it before anything compiles:

- `validate_compile_model` admits no multimodal model but dense Qwen3-VL. The thinker's text decoder
  layers compile as one graph each (fullgraph) with the patch set's forwards: expert-load counting is a
  custom op, packed attention builds its segment mask on device (tests/test_compile.py). The contracts
  VeOmni sets for Qwen3-VL hold here for the same reasons and are kept: static shapes, no CUDA-graph
  replay (packed boundaries vary; expert-load counting must run on every call), no Ulysses SP or async
  Ulysses, the decoder layer named in `_no_split_modules` (that is how VeOmni finds the blocks). One more:
  with `output_router_logits`, transformers collects the router logits through forward hooks that read a
  ContextVar set outside the compiled layer, which Dynamo cannot trace: refused under fullgraph.
- `validate_compile_runtime` refuses every device but CUDA ("CUDA-only for now"). On CPU
  (veomni_omni.integration.cpu_distributed) inductor and aot_eager compile the layers too; VeOmni's other runtime contracts
  are kept: FSDP2, no expert parallelism (the EP all-to-all needs its split sizes on the host), no CUDA
  graphs.

Each check is replaced where VeOmni calls it (its module, and the modules that imported it by name);
every other model and device goes to VeOmni's own check.
"""

from __future__ import annotations

from torch import nn
from veomni.distributed.torch_compile import CompileConfig

from ..data.checks import thinker_config_of

# Patch-set entries whose originals (VeOmni's checks) the replacements hand other models and devices to.
MODEL_CHECK_PATCH = "compile_model_check"
RUNTIME_CHECK_PATCH = "trainer_compile_runtime_check"

DECODER_BLOCK = "Qwen3OmniMoeThinkerTextDecoderLayer"
OMNI_MODEL_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")


def _text_config(config):
    return thinker_config_of(config).get_text_config()


def validate_compile_model(
    model: nn.Module, compile_config: CompileConfig, sequence_parallel_enabled: bool = False, async_enabled: bool = False
) -> None:
    """VeOmni's check, with Qwen3-Omni admitted under the contracts of the module doc."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in OMNI_MODEL_TYPES:
        from ..patchset import original

        return original(MODEL_CHECK_PATCH)(model, compile_config, sequence_parallel_enabled, async_enabled)
    problems = []
    if compile_config.dynamic:
        problems.append("train.torch_compile.dynamic=False (packed lengths are padded to train.pad_to_length)")
    if compile_config.uses_cuda_graphs():
        problems.append("no CUDA-graph replay (backend 'inductor' or 'aot_eager', mode None): packed boundaries vary between "
                        "micro batches and expert-load counting must run on every call")
    if sequence_parallel_enabled or async_enabled:
        problems.append("train.accelerator.ulysses_size=1, cp_size=1, enable_async=False")
    if DECODER_BLOCK not in (getattr(model, "_no_split_modules", None) or ()):
        problems.append(f"{DECODER_BLOCK!r} in the model's _no_split_modules (VeOmni compiles the blocks it names)")
    if compile_config.fullgraph and _text_config(config).output_router_logits:
        problems.append("text_config.output_router_logits=False with fullgraph: transformers collects router logits through "
                        "hooks reading a ContextVar set outside the compiled layer, which Dynamo cannot trace")
    if problems:
        raise RuntimeError(f"train.torch_compile.enable for {config.model_type} requires: " + "; ".join(problems) + ".")


def validate_compile_runtime(
    compile_config: CompileConfig,
    *,
    device_type: str,
    fsdp_enabled: bool,
    fsdp_mode: str,
    any_extra_parallel_enabled: bool,
    enable_reshard_after_forward: bool,
) -> None:
    """VeOmni's check, with CPU admitted under the contracts of the module doc."""
    if device_type != "cpu" or not compile_config.enable:
        from ..patchset import original

        return original(RUNTIME_CHECK_PATCH)(
            compile_config,
            device_type=device_type,
            fsdp_enabled=fsdp_enabled,
            fsdp_mode=fsdp_mode,
            any_extra_parallel_enabled=any_extra_parallel_enabled,
            enable_reshard_after_forward=enable_reshard_after_forward,
        )
    if not fsdp_enabled or fsdp_mode != "fsdp2":
        raise RuntimeError("train.torch_compile.enable requires FSDP2 (fsdp_mode='fsdp2' over more than one rank).")
    if any_extra_parallel_enabled:
        raise RuntimeError(
            "train.torch_compile.enable does not support expert parallelism: the EP all-to-all reads its split sizes "
            "on the host inside the compiled layer; set train.accelerator.ep_size=1."
        )
    if compile_config.uses_cuda_graphs():
        raise RuntimeError("train.torch_compile on CPU: CUDA graphs (backend 'cudagraphs' or mode 'reduce-overhead') need CUDA.")
