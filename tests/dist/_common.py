"""What the multi-rank workers in tests/dist share, so each worker holds only its own cases: the model
built as VeOmni's trainer builds it, one training step's loss scaled as VeOmni's trainer scales it,
whole gradients, and the save-and-leave at the end. Workers import it as a neighbour (`from _common import ...`): torchrun puts a
script's directory first on sys.path."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
from torch.distributed.tensor import Shard
from veomni.arguments.arguments_types import MixedPrecisionConfig
from veomni.distributed.parallel_state import get_parallel_state
from veomni.distributed.torch_parallelize import build_parallelize_model
from veomni.models import build_foundation_model
from veomni.utils.loss_utils import count_loss_token, mean_global_loss, reduce_global_loss_token

from veomni_omni.integration.settings import eager_ops_config


def build(
    checkpoint,
    weights_path: Optional[str] = None,
    *,
    load_weights: bool = True,
    prepare: Optional[Callable[[torch.nn.Module], Optional[torch.nn.Module]]] = None,
    mixed_precision: Union[bool, MixedPrecisionConfig] = False,
    **parallelize_options,
) -> torch.nn.Module:
    """VeOmni's `build_foundation_model` on meta (fp32, eager ops), then `prepare(model)` (freeze, drop the
    talker, wrap in LoRA; its result replaces the model when not None), then `build_parallelize_model`
    with weights from `weights_path` (default: the checkpoint itself); `load_weights=False`: materialised
    uninitialised, for a checkpoint to fill later."""
    model = build_foundation_model(str(checkpoint), init_device="meta", torch_dtype="float32", ops_implementation=eager_ops_config())
    if prepare is not None:
        model = prepare(model) or model
    if not isinstance(mixed_precision, MixedPrecisionConfig):
        mixed_precision = MixedPrecisionConfig(enable=mixed_precision)
    if load_weights:
        parallelize_options["weights_path"] = str(weights_path or checkpoint)
    else:
        parallelize_options.update(weights_path=None, should_skip_hf_weight_load=True)
    return build_parallelize_model(
        model, init_device="meta", enable_gradient_checkpointing=False, mixed_precision=mixed_precision,
        enable_reshard_after_forward=True, **parallelize_options,
    )


def veomni_scaled_loss(loss: torch.Tensor, batch: dict) -> torch.Tensor:
    """The model's loss on this rank's batch as VeOmni's trainer scales it (`mean_global_loss`): its share
    of the token mean over every rank's batch, times the FSDP size."""
    tokens = count_loss_token(batch)
    global_tokens = reduce_global_loss_token(tokens)
    return torch.stack(list(mean_global_loss(loss, tokens, tokens, global_tokens).values())).sum()


def summed_over_ranks(value: torch.Tensor) -> float:
    total = value.detach().clone()
    dist.all_reduce(total)
    return total.item()


def finish(results, out_file: str) -> None:
    """The worker's last step: rank 0 saves `results` (torch.save) for the test to read, then every rank
    leaves the group together."""
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def on_every_rank(value) -> list:
    """`value` of every rank, in rank order (all_gather_object)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def full_gradients(model) -> dict:
    """Every gradient as the whole tensor: FSDP shards gathered, EP slices concatenated (expert order
    is EP rank order, as `ParallelPlan.apply` sliced them)."""
    state = get_parallel_state()
    expert_sharded = {fqn for fqn, info in getattr(model, "_fqn2spec_info", {}).items() if isinstance(info.placement, Shard)}
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        grad = param.grad.full_tensor()
        if name in expert_sharded:
            parts = [torch.empty_like(grad) for _ in range(state.ep_size)]
            dist.all_gather(parts, grad.contiguous(), group=state.ep_group)
            grad = torch.cat(parts)
        grads[name] = grad
    return grads


def step_counting_vit(model, batch):
    """One forward/backward exactly as VeOmni's trainer scales it; returns (the loss averaged over ranks,
    whole gradients, how many times each rank ran the ViT)."""
    model.zero_grad(set_to_none=True)
    vit_calls = []
    hook = model.model.visual.register_forward_hook(lambda *_: vit_calls.append(1))
    loss = veomni_scaled_loss(model(**batch, use_cache=False).loss, batch)
    loss.backward()
    hook.remove()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    calls = [None] * dist.get_world_size()
    dist.all_gather_object(calls, len(vit_calls))
    return summed_over_ranks(loss) / dist.get_world_size(), grads, calls
