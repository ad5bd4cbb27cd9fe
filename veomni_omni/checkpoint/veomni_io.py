"""Released HF checkpoints in and out through VeOmni's own weight loading and HF export.

In: VeOmni's loaders (`build_parallelize_model(..., weights_path=...)` -> `load_model_weights` or
`rank0_load_and_broadcast_weights`) stream every checkpoint tensor through the model's
checkpoint-tensor converter (`veomni.models.checkpoint_tensor_loading`). `ReleasedLayoutConverter`
is that converter for the patched Qwen3-Omni classes: it maps each released key onto the model's
parameters with `layout.model_layout` (transformers' own conversion rules), passes whole
parameters straight through and fills fused expert parameters piece by piece, emitting each as
soon as its last piece arrives; a checkpoint under the model's own parameter names (a state_dict,
`save_pretrained(save_original_format=False)`) passes through whole. Keys of components the model lacks (talker and code2wav after
`disable_talker()`, or under a thinker trained alone) are consumed and dropped. `finalize` raises
`CheckpointError` listing missing (of either layout), unexpected, duplicate and mis-shaped keys, so VeOmni never
reaches its "missing key(s) ... initialize them" fallback (`post_process_after_weight_loading`)
for these models.

What VeOmni reads: with a converter that fuses, no VeOmni loader reads per rank. The default
(`train.broadcast_model_weights_from_rank0=True`) reads every tensor whole on rank 0, which
assembles each fused parameter and broadcasts it whole; every rank then cuts its EP slice and
FSDP shard. With the flag off, every rank reads every tensor whole. `ep_sharded_stream_load`
refuses a converter that fuses (ours claims every key) up front: NotImplementedError naming the first key.
`veomni_omni.checkpoint.load_hf_checkpoint` is the per-rank alternative.

In broadcast mode VeOmni calls `finalize` on rank 0 only: a bad checkpoint raises there, and
torchrun stops the other ranks (waiting in VeOmni's next broadcast) with rank 0's error.

Out: `export_hf_checkpoint(trainer, step)` writes the trained model where VeOmni's
`HuggingfaceCkptCallback` puts its HF export (`<output_dir>/checkpoints/global_step_N/hf_ckpt`),
in the released layout of `args.model.model_path` (`save_hf_checkpoint`: per-expert keys,
`thinker.` prefix, talker/code2wav carried byte for byte, its config, atomically) plus the
trainer's model assets (processor). `hf_ckpt_callback_save` replaces the callback's
`_save_checkpoint` for these models: VeOmni's DCP save of the step stays, its `save_hf_safetensor`
(DCP consolidation: torch 2.9-2.11 only, transformers' internal fused names) is what goes. Other
models keep VeOmni's own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import PretrainedConfig
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.utils import cached_file
from veomni.models.checkpoint_tensor_loading import ConvertedCheckpointTensor
from veomni.trainer.callbacks.base import TrainerState
from veomni.utils.save_safetensor_utils import save_lora_adapter_with_dcp
from veomni.trainer.callbacks.checkpoint_callback import CheckpointerCallback, HFLoraCkptCallback, HuggingfaceCkptCallback

from .hf import save_hf_checkpoint
from .layout import CARRIED_COMPONENTS, PREFIXES, _listing, model_layout
from .safetensors_io import CheckpointError
from .lora import PeftAdapterExport, base_model, base_params, is_lora_model

logger = logging.getLogger(__name__)

RELEASED_LAYOUT_MODELS = (hf.Qwen3OmniMoeForConditionalGeneration, hf.Qwen3OmniMoeThinkerForConditionalGeneration)
HF_EXPORT_PATCH = "veomni_hf_export"  # the patchset entries whose originals serve other models
LORA_EXPORT_PATCH = "veomni_lora_export"
LORA_ADAPTER_DIR = "lora_adapter"  # beside hf_ckpt


class ReleasedLayoutConverter:
    """VeOmni's `CheckpointTensorConverter` for a released-layout Qwen3-Omni checkpoint.

    Claims every key (`can_handle`), so none reaches VeOmni's "Unexpected key" log-and-skip.
    `bytes_consumed` counts the checkpoint bytes this rank's converter was fed.
    """

    def __init__(self, model: torch.nn.Module):
        params = base_params(model)  # a LoRA model's base weights under their bare names: VeOmni maps them on
        layout = model_layout(base_model(model), params, source=None)  # the keys save_pretrained writes
        self.model_name = type(model).__name__
        self._pieces = {piece.key: piece for pieces in layout.pieces.values() for piece in pieces}
        self._params = {name: (tuple(p.global_shape), p.param.dtype, len(layout.pieces[name])) for name, p in params.items()}
        self._dropped = tuple(c for c in CARRIED_COMPONENTS if not hasattr(model, c))
        self._prefix: Optional[str] = None  # "thinker." for a thinker alone reading a top-level checkpoint
        self._filling: dict[str, tuple[torch.Tensor, int]] = {}  # fused parameter, pieces still to come
        self._seen: set[str] = set()
        self._seen_own: set[str] = set()  # keys that are the model's own parameter names
        self._unexpected: list[str] = []
        self._duplicates: list[str] = []
        self._mismatched: list[str] = []
        self.bytes_consumed = 0

    def can_handle(self, name: str) -> bool:
        return True

    def _model_key(self, name: str) -> Optional[str]:
        """The model's own key for checkpoint key `name`; the first match fixes the prefix."""
        for prefix in (self._prefix,) if self._prefix is not None else PREFIXES:
            if name.startswith(prefix) and name[len(prefix):] in self._pieces:
                self._prefix = prefix
                return name[len(prefix):]
        return None

    def convert(self, name: str, tensor: torch.Tensor) -> Optional[ConvertedCheckpointTensor]:
        self.bytes_consumed += tensor.numel() * tensor.element_size()
        if name in self._params:  # the model's own name (a state_dict, save_original_format=False)
            self._seen_own.add(name)
        key = self._model_key(name)
        if key is None:
            if name in self._params:
                return self._own(name, tensor)
            if name.split(".")[0] not in self._dropped:
                self._unexpected.append(name)
            return None
        if key in self._seen:
            self._duplicates.append(name)
            return None
        self._seen.add(key)
        piece = self._pieces[key]
        if tuple(tensor.shape) != piece.shape:
            self._mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)}, model expects {piece.shape}")
            return None
        shape, dtype, count = self._params[piece.param]
        if count == 1 and not piece.stacked:  # the whole parameter, under another name
            return ConvertedCheckpointTensor(piece.param, tensor)
        fused, left = self._filling.get(piece.param) or (torch.empty(shape, dtype=dtype), count)
        fused[piece.region].copy_(tensor.unsqueeze(0) if piece.stacked else tensor)
        if left > 1:
            self._filling[piece.param] = (fused, left - 1)
            return None
        self._filling.pop(piece.param, None)
        return ConvertedCheckpointTensor(piece.param, fused)

    def _own(self, name: str, tensor: torch.Tensor) -> Optional[ConvertedCheckpointTensor]:
        """A tensor under the model's own parameter name: passed through whole."""
        shape = self._params[name][0]
        if tuple(tensor.shape) != shape:
            self._mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)}, model expects {shape}")
            return None
        return ConvertedCheckpointTensor(name, tensor)

    def finalize(self) -> list[ConvertedCheckpointTensor]:
        """Raise `CheckpointError` unless every expected key of one layout (released, or the model's own
        parameter names) arrived once, with its shape."""
        prefix = self._prefix or ""
        missing = [prefix + key for key in self._pieces if key not in self._seen]
        own_missing = [name for name in self._params if name not in self._seen_own]
        if missing and not own_missing:  # a checkpoint in the model's own layout, complete
            missing = []
        elif len(own_missing) < len(missing):  # closer to the model's own layout: list what it lacks
            missing = own_missing
        problems = [
            _listing(title, keys)
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", self._unexpected),
                ("duplicate keys", self._duplicates),
                ("shape mismatches", self._mismatched),
            )
            if keys
        ]
        if problems:
            raise CheckpointError(
                f"checkpoint does not fit {self.model_name} (VeOmni's loader; nothing was initialised at random):\n"
                + "\n".join(problems)
            )
        return []


def create_checkpoint_converter(model: torch.nn.Module) -> ReleasedLayoutConverter:
    """`_create_checkpoint_tensor_converter` of the patched classes (VeOmni calls it with the model)."""
    return ReleasedLayoutConverter(model)


def is_released_layout_model(model: torch.nn.Module) -> bool:
    return isinstance(base_model(model), RELEASED_LAYOUT_MODELS)


def released_source(model_path) -> Optional[Path]:
    """The local directory of `args.model.model_path` (a hub id resolves to its cached snapshot,
    as VeOmni's loader resolved it), or None when training started from a config."""
    if model_path is None:
        return None
    if Path(model_path).is_dir():
        return Path(model_path)
    return Path(cached_file(str(model_path), "config.json")).parent


class _ModelAssets:
    """The trainer's model assets (processor, tokenizer, ...) saved the way VeOmni saves them, as
    the one `processor` save_hf_checkpoint takes. Configs stay out: config.json is the source's
    (the released top-level config), or the model's own when there is no source."""

    def __init__(self, assets):
        self.assets = [asset for asset in assets if not isinstance(asset, PretrainedConfig)]

    def save_pretrained(self, directory) -> None:
        from veomni.models import save_model_assets

        save_model_assets(str(directory), self.assets)


def export_hf_checkpoint(trainer, global_step: int) -> Path:
    """Write `trainer.model` in the released HF layout to VeOmni's HF export directory,
    `<train.checkpoint.save_path>/global_step_<N>/hf_ckpt`, atomically. Every rank calls it.

    `trainer`: VeOmni's BaseTrainer (or anything with its `.model`, `.args`, `.model_assets`).
    The layout, dtypes, talker/code2wav and config come from `args.model.model_path`; without one
    the model's own `save_pretrained` layout and config are written.
    """
    args = trainer.args
    path = Path(args.train.checkpoint.save_path) / f"global_step_{global_step}" / "hf_ckpt"
    source = released_source(args.model.model_path)
    assets = _ModelAssets(getattr(trainer, "model_assets", None) or [])
    lora = is_lora_model(trainer.model)
    peft = PeftAdapterExport(trainer.model, path.parent / LORA_ADAPTER_DIR, str(args.model.model_path)) if lora else None
    save_hf_checkpoint(trainer.model, path, source=source, processor=assets, peft=peft)
    logger.info("HF checkpoint (released layout%s) saved at %s", ", adapters merged" if lora else "", path)
    if lora:
        logger.info("LoRA adapters (PEFT format, released module names) saved at %s", peft.path)
    return path


def hf_ckpt_callback_save(self, state: TrainerState, stage: str = "step_end"):
    """`HuggingfaceCkptCallback._save_checkpoint` (and `HFLoraCkptCallback`'s): as VeOmni's (a DCP
    checkpoint of the step unless one exists, so every `global_step_N` stays resumable, then the HF
    export beside it), with the export written in the released layout straight from the live sharded
    model instead of VeOmni's DCP consolidation; a LoRA model's merged, plus its PEFT adapters. Models
    other than the patched Qwen3-Omni classes get VeOmni's own."""
    if not is_released_layout_model(self.trainer.model):
        from ..patchset import original

        veomni_save = original(LORA_EXPORT_PATCH if isinstance(self, HFLoraCkptCallback) else HF_EXPORT_PATCH)
        return veomni_save(self, state, stage)
    step_dir = Path(self.trainer.args.train.checkpoint.save_path) / f"global_step_{state.global_step}"
    if not step_dir.exists():  # created only after the barrier: every rank sees the same answer
        dist.barrier()
        CheckpointerCallback._save_checkpoint(self, state)
    self.trainer.checkpointer.wait_for_pending_save()  # an async DCP save still writing
    if is_lora_model(self.trainer.model):  # VeOmni's own adapter files too: what `lora_config.lora_adapter` reads back
        save_lora_adapter_with_dcp(self.trainer.model, str(Path(self.trainer.args.train.checkpoint.output_dir) / f"global_step_{state.global_step}"))
    export_hf_checkpoint(self.trainer, state.global_step)
    self._last_saved_step = state.global_step
