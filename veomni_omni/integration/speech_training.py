"""Talker (speech output) training through VeOmni's own VLMTrainer: the switch, the freezing, the loss counts.

VeOmni 0.1.12's VLMTrainer always calls `disable_talker()` on a Qwen-Omni model ("talker training is not
supported yet"). With veomni_omni the VeOmni config turns it on, in `model.model_config` (VeOmni's
"config to overwrite foundation model config"), with two keys that veomni_omni reads (transformers'
config ignores them):

    model:
      model_config:
        train_talker: true     # the talker, its projections and its code predictor train on the
                               # samples' target speech (data/speech.py)
        train_thinker: false   # default: the thinker is frozen; true trains both (joint)

What changes then (`freeze_model_module`, replacing `VLMTrainer._freeze_model_module`): the talker is
kept, code2wav (never run in training) and, unless `train_thinker`, the whole thinker are frozen before
VeOmni's own freezing runs; the model's `speech_training` tells its forward whether the thinker trains
and its position-id function (hence the data transform) that every sample carries speech keys
(empty where it has no speech), so that VeOmni's collator keeps them aligned and every rank counts the
same losses. Refused with the reason: the keys on a model without a talker, LoRA (its targets would
adapt the talker's layers too, untested), Ulysses SP or context parallelism (the speech forward takes
whole sequences), `freeze_vit` / `freeze_audio_tower` with a frozen thinker (VeOmni's would unfreeze
the merger / projection), `train_thinker: false` without the talker (nothing would train).

For Qwen3-Omni models any other `model.model_config` key must be one transformers' config loading takes:
`from_pretrained` drops the kwargs it does not know (asked, it returns them), so a misspelt override was
ignored silently.
Other models keep VeOmni's own step (the two keys are refused there: they have no talker).

`count_loss_tokens` replaces VeOmni's `count_loss_token` (where VLMTrainer's and BaseTrainer's steps call it,
and where it is defined): over a step's micro batches VeOmni adds up the text label counts but keeps only
the last micro batch's count of every other `<name>_labels` key (`=` where it means `+=`), so with
gradient accumulation the talker's losses were divided by one micro batch's tokens instead of the step's.
Its call at the step's start is also where samples the data transform refused (bad speech targets,
`refused_samples`) stop every rank at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

__all__ = ["SpeechTraining", "speech_training_of", "freeze_model_module", "count_loss_tokens"]

FREEZE_PATCH = "vlm_freeze_model_module"
COUNT_PATCH = "count_loss_token"
SWITCHES = ("train_talker", "train_thinker")
OMNI_MODEL_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")


@dataclass(frozen=True)
class SpeechTraining:
    """On a model whose talker trains (`model.speech_training`): whether the thinker trains too."""

    train_thinker: bool


def speech_training_of(model_config: Optional[dict]) -> Optional[SpeechTraining]:
    """The talker-training switch of VeOmni's `model.model_config` (None: VeOmni's thinker-only training)."""
    model_config = model_config or {}
    for key in SWITCHES:
        if key in model_config and not isinstance(model_config[key], bool):
            raise ValueError(f"model.model_config.{key} must be true or false, got {model_config[key]!r}")
    if not model_config.get("train_talker", False):
        if model_config.get("train_thinker") is False:
            raise ValueError("model.model_config.train_thinker: false without train_talker: true would train nothing")
        return None
    return SpeechTraining(train_thinker=model_config.get("train_thinker", False))


def _check_overrides(model_config: dict, config_path) -> None:
    """The overrides transformers' config loading would drop (it reports them when asked)."""
    from transformers import AutoConfig

    overrides = {key: value for key, value in model_config.items() if key not in SWITCHES}
    if not overrides:
        return
    config, ignored = AutoConfig.from_pretrained(config_path, return_unused_kwargs=True, **overrides)
    if ignored:
        raise ValueError(
            f"model.model_config: {sorted(ignored)} name no setting of {type(config).__name__}, and transformers would "
            f"ignore them; veomni_omni's own keys are {list(SWITCHES)}"
        )


def freeze_model_module(self):
    """`VLMTrainer._freeze_model_module` (see the module doc): VeOmni's, with the talker kept and the
    thinker frozen when `model.model_config` says the talker trains."""
    from ..patchset import original

    args, model = self.base.args, self.base.model
    overrides = args.model.model_config or {}
    if self.base.model_config.model_type not in OMNI_MODEL_TYPES:
        if any(key in overrides for key in SWITCHES):
            raise ValueError(f"model.model_config {list(SWITCHES)}: {self.base.model_config.model_type} has no talker")
        return original(FREEZE_PATCH)(self)
    _check_overrides(overrides, args.model.config_path)
    settings = speech_training_of(overrides)
    if settings is None:
        return original(FREEZE_PATCH)(self)
    if not getattr(model, "has_talker", False):
        raise ValueError(
            "model.model_config.train_talker: the model has no talker (a thinker-only checkpoint, or enable_audio_output "
            "false): train the released top-level Qwen3-Omni-MoE checkpoint"
        )
    accelerator = args.train.accelerator
    if accelerator.ulysses_size > 1 or accelerator.cp_size > 1:
        raise ValueError("model.model_config.train_talker: talker training takes whole sequences; set ulysses_size and cp_size to 1")
    if args.model.lora_config:
        raise ValueError("model.model_config.train_talker with model.lora_config: LoRA on the talker is not supported; train it fully")
    if not settings.train_thinker and (args.train.freeze_vit or args.train.freeze_audio_tower):
        raise ValueError(
            "train.freeze_vit / train.freeze_audio_tower with a frozen thinker (model.model_config.train_thinker false): the "
            "whole thinker is frozen already, and VeOmni's flags would unfreeze the ViT merger / audio projection; remove them"
        )
    model.code2wav.requires_grad_(False)
    if not settings.train_thinker:
        model.thinker.requires_grad_(False)
    model.speech_training = settings
    model.disable_talker = lambda: None  # VeOmni's step calls it for every Qwen-Omni model; kept for this call only
    try:
        original(FREEZE_PATCH)(self)
    finally:
        del model.disable_talker


def count_loss_tokens(batches: Union[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]):
    """VeOmni's `count_loss_token` for one micro batch; over several, every count summed (VeOmni keeps
    the last micro batch's count of each `<name>_labels`). The step's call (all its micro batches, on
    every rank, before any other collective of the step) first agrees on refused samples: any rank's
    stops every rank with the same `BadInputError` (one small all-reduce per step)."""
    from ..data.checks import raise_on_problems
    from ..data.veomni_transform import REFUSED_KEY
    from ..patchset import original

    count = original(COUNT_PATCH)
    if isinstance(batches, dict):
        return count(batches)
    raise_on_problems([problem for batch in batches if isinstance(batch, dict) for problem in batch.get(REFUSED_KEY, [])])
    totals: dict = {}
    for batch in batches:
        for key, value in count_loss_tokens(batch).items():
            totals[key] = totals.get(key, 0) + value
    return totals
