"""What VeOmni 0.1.12's VLMTrainer and data pipeline call on a Qwen3-Omni model, for the HF 5.22 classes.

VeOmni's trainer was written against its own generated copy of transformers 5.9's modeling, which
carries these hooks; HF's classes do not. Each is added to the HF classes by the patch set:

- `get_position_id_func()`: the trainer hands it to the data transform, which computes each sample's
  3-axis M-RoPE positions on the host (HF's own `get_rope_index`).
- `get_extra_collate_infos()`: how VeOmni's packing collator concatenates the audio inputs (VeOmni's
  flat layout: `input_features` (frames, mel) of all clips + `audio_feature_lengths`), and what its SP
  collator must leave whole for our SP shard (input ids padded but not sliced, pixels and audio untouched).
- `get_metadata_collate_func()`: under Ulysses SP, the hook VeOmni's SP collator calls last on every
  micro batch; ours (`SequenceParallelCollateHook`) turns its output into this rank's SP shard (its media
  side a `SequenceParallelShard`, the model's `sp_inputs`).
- `_convert_lora_targets_to_parameters(model, lora_modules, target_parameters)`: VeOmni's LoRA set-up
  (`model.lora_config`) asks it to turn the expert projection names into the fused expert parameters
  its MoE-LoRA wraps; VeOmni's own patterns name 5.9's modules (`thinker.model.layers`), not 5.22's.
- `thinker.visual` / `thinker.audio_tower`: 5.9 kept the encoders on the thinker; 5.22 moved them to
  `thinker.model`. VLMTrainer's freezing code (`freeze_vit`, `freeze_audio_tower`) reads the old names.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from ..data.checks import thinker_config_of
from ..data.samples import rope_positions


class RopePositionIds:
    """Picklable (DataLoader workers) M-RoPE position function in VeOmni's calling convention:
    one unpadded sample, `input_ids` (1, S) → {"position_ids": (3, S)}.

    `config` is the thinker config; VeOmni's transform protocol gives a transform nothing else of the
    model, so veomni_omni's transform reads token ids and audio settings from here too, and, when the
    talker trains (`speech`), the top-level config its speech targets are checked against
    (`speech_config`; None otherwise)."""

    def __init__(self, config, speech: bool = False):
        self.config = thinker_config_of(config)
        self.speech_config = config if speech else None

    def __call__(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        audio_seqlens: Optional[torch.Tensor] = None,
        second_per_grids: Optional[torch.Tensor] = None,
        use_audio_in_video: bool = False,
    ) -> dict:
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError(f"position ids are computed per sample: got input_ids of shape {tuple(input_ids.shape)}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("position ids are computed per unpadded sample: attention_mask has padding")
        positions = rope_positions(
            self.config, input_ids.reshape(-1), image_grid_thw, video_grid_thw, audio_seqlens, second_per_grids, use_audio_in_video
        )
        return {"position_ids": positions}


def get_position_id_func(self) -> RopePositionIds:
    return RopePositionIds(self.config, speech=getattr(self, "speech_training", None) is not None)


# VeOmni's DataCollateInfo fields: (pack_dim, sp_slice, sp_pad_value, sp_pad_scale). Without SP only
# pack_dim matters. Under SP VeOmni's defaults slice pixel_values and pixel_values_videos each on their
# own (the joint image+video patch sequence is what the ViT shards), would slice the flat audio frames,
# and slice input_ids, whose whole length the media masks need: `shard_collated_batch` does those.
# Speech targets (data/speech.py): the turn markers are packed like input_ids, the codes along their
# frames, the loss-count labels end to end (VeOmni would stack them, or keep a list when lengths differ);
# the videos' seconds per grid too, which the talker's positions need (the thinker's come precomputed).
EXTRA_COLLATE_INFOS = {
    "input_ids": (-1, False, 0, 1),
    "pixel_values": (0, False, None, None),
    "pixel_values_videos": (0, False, None, None),
    "input_features": (0, False, None, None),
    "audio_feature_lengths": (0, False, None, None),
    "talker_frames": (-1, False, 0, 1),
    "talker_speakers": (-1, False, 0, 1),
    "talker_codes": (1, False, None, None),
    "talker_labels": (0, False, None, None),
    "code_predictor_labels": (0, False, None, None),
    "video_second_per_grid": (0, False, None, None),
}


def get_extra_collate_infos(self) -> dict:
    return dict(EXTRA_COLLATE_INFOS)


class SequenceParallelCollateHook:
    """Picklable (DataLoader workers) hook in VeOmni's MetadataCollateFunc convention, `(batch, sp_pad)`,
    in place: VeOmni's SP collator output → this rank's SP shard (`shard_collated_batch`). The SP rank
    is fixed when the trainer builds its collator, as VeOmni's own SP collator fixes it."""

    def __init__(self, config, sp_size: int, sp_rank: int):
        from ..data.sequence_parallel import check_divisible_heads

        self.config = thinker_config_of(config)
        self.sp_size, self.sp_rank = sp_size, sp_rank
        check_divisible_heads(self.config, sp_size)

    def __call__(self, batch: dict, sp_pad: dict) -> None:
        from ..data.sequence_parallel import shard_collated_batch

        if any(sp_pad.values()):
            raise ValueError(f"VeOmni's SP collator padded {sp_pad} pixel rows: the collate infos of "
                             "veomni_omni.integration.trainer_hooks.EXTRA_COLLATE_INFOS were overridden")
        shard_collated_batch(batch, self.config, self.sp_size, self.sp_rank)


def get_metadata_collate_func(self) -> Optional[SequenceParallelCollateHook]:
    """VeOmni's trainer asks once, when it builds its collator (parallel state set up): the SP shard
    hook under Ulysses SP, nothing otherwise (VeOmni then calls none)."""
    from veomni.distributed.parallel_state import get_parallel_state

    state = get_parallel_state()
    if state.cp_enabled:
        raise ValueError("context parallelism (train.accelerator.cp_size > 1) is not supported for Qwen3-Omni; use ulysses_size")
    if not state.ulysses_enabled:
        return None
    return SequenceParallelCollateHook(self.config, state.ulysses_size, state.ulysses_rank)


def _thinker_visual(self):
    return self.model.visual


def _thinker_audio_tower(self):
    return self.model.audio_tower


thinker_visual = property(_thinker_visual, doc="The vision encoder (5.22 keeps it at `model.visual`).")
thinker_audio_tower = property(_thinker_audio_tower, doc="The audio encoder (5.22 keeps it at `model.audio_tower`).")


# LoRA target names of the expert projections -> the fused expert parameter holding them.
EXPERT_PROJECTIONS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def lora_targets_to_parameters(model: nn.Module, lora_modules: list, target_parameters: list) -> tuple[list, list]:
    """`model.lora_config` targets as VeOmni's LoRA set-up takes them: `gate_proj` / `up_proj` /
    `down_proj` become the fused expert parameters (glob over the layers) for VeOmni's MoE-LoRA, the
    other names stay linear targets. Refused: a name that matches no linear of the model (VeOmni would
    train without it), or only some of the three expert projections (VeOmni's wrapper adapts all three)."""
    named = {name.rsplit(".", 1)[-1] for name in lora_modules}
    experts = sorted({name for name, _ in model.named_parameters() if name.endswith(".mlp.experts.gate_up_proj")})
    expert_names = named & EXPERT_PROJECTIONS.keys()
    if expert_names and experts:
        if expert_names != EXPERT_PROJECTIONS.keys():
            raise ValueError(
                f"model.lora_config: {sorted(expert_names)} of the MoE experts: VeOmni's expert LoRA adapts gate_proj, up_proj "
                "and down_proj together; list all three (or none)"
            )
        globs = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", name.removesuffix(".gate_up_proj")) for name in experts})
        target_parameters = list(target_parameters) + [f"{g}.{p}" for g in globs for p in ("gate_up_proj", "down_proj")]
        lora_modules = [name for name in lora_modules if name.rsplit(".", 1)[-1] not in EXPERT_PROJECTIONS]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    unmatched = [target for target in lora_modules if not any(name == target or name.endswith("." + target) for name in linears)]
    if unmatched:
        raise ValueError(f"model.lora_config: lora_modules {unmatched} match no linear layer of {type(model).__name__}")
    return lora_modules, target_parameters
