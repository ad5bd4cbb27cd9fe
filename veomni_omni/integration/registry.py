"""What veomni_omni hands VeOmni's registries: the factories VeOmni calls for a qwen3_omni_moe config.

VeOmni 0.1.12 ships its own generated qwen3_omni_moe (a copy of transformers 5.9's modeling);
on transformers 5.22 it leaves MoE expert and router weights at zero when built from config.
The patch set (veomni_omni/patchset.py, group "VeOmni's registries") overrides its entries with
these factories, which give the patched HF classes; `undo` gives VeOmni its own entries back.
"""

from __future__ import annotations

from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as hf_config
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling
from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as hf_processing

# (substring of the architecture name, class), most specific first.
_ARCHITECTURES = (
    ("ThinkerTextModel", hf_modeling.Qwen3OmniMoeThinkerTextModel),
    ("ThinkerForConditionalGeneration", hf_modeling.Qwen3OmniMoeThinkerForConditionalGeneration),
    ("TalkerForConditionalGeneration", hf_modeling.Qwen3OmniMoeTalkerForConditionalGeneration),
    ("TalkerModel", hf_modeling.Qwen3OmniMoeTalkerModel),
    ("ForConditionalGeneration", hf_modeling.Qwen3OmniMoeForConditionalGeneration),
)


def model_class(architecture: str | None):
    """The class VeOmni's loader instantiates for a qwen3_omni_moe config's `architectures[0]`."""
    for key, cls in _ARCHITECTURES:
        if architecture and key in architecture:
            return cls
    return hf_modeling.Qwen3OmniMoeForConditionalGeneration


def thinker_model_class(architecture: str | None):
    """A thinker-only config (model_type qwen3_omni_moe_thinker) builds the thinker."""
    if architecture and "ThinkerTextModel" in architecture:
        return hf_modeling.Qwen3OmniMoeThinkerTextModel
    return hf_modeling.Qwen3OmniMoeThinkerForConditionalGeneration


# VeOmni calls config and processor factories with no argument.
def omni_config_class():
    return hf_config.Qwen3OmniMoeConfig


def thinker_config_class():
    return hf_config.Qwen3OmniMoeThinkerConfig


def processor_class():
    return hf_processing.Qwen3OmniMoeProcessor
