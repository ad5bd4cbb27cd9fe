"""Hand veomni_omni's model, config and processor classes to VeOmni's registries.

VeOmni 0.1.12 ships its own generated qwen3_omni_moe (a copy of transformers 5.9's modeling);
on transformers 5.22 it leaves MoE expert and router weights at zero when built from config.
We override its entries (instance-local, so `undo` restores VeOmni's) with the patched HF classes.
"""

from __future__ import annotations

from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as hf_config
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling
from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as hf_processing

from .data.veomni_transform import transform_sample

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


# registry name -> {key: factory}; VeOmni calls config/processor factories with no argument.
ENTRIES = {
    "MODEL_CONFIG_REGISTRY": {
        "qwen3_omni_moe": lambda: hf_config.Qwen3OmniMoeConfig,
        "qwen3_omni_moe_thinker": lambda: hf_config.Qwen3OmniMoeThinkerConfig,
    },
    "MODELING_REGISTRY": {
        "qwen3_omni_moe": model_class,
        "qwen3_omni_moe_thinker": thinker_model_class,
    },
    "MODEL_PROCESSOR_REGISTRY": {
        "Qwen3OmniMoeProcessor": lambda: hf_processing.Qwen3OmniMoeProcessor,
    },
    # VLMTrainer builds its data transform by the config's model_type (called with the sample).
    "DATA_TRANSFORM_REGISTRY": {
        "qwen3_omni_moe": transform_sample,
        "qwen3_omni_moe_thinker": transform_sample,
    },
}


def _registries():
    from veomni.data import data_transform
    from veomni.models import loader

    return {name: getattr(data_transform if name == "DATA_TRANSFORM_REGISTRY" else loader, name) for name in ENTRIES}


_previous: dict[tuple[str, str], object] = {}


def register() -> None:
    for name, registry in _registries().items():
        for key, factory in ENTRIES[name].items():
            _previous[(name, key)] = registry._local_mapping.get(key)
            registry[key] = factory


def unregister() -> None:
    for name, registry in _registries().items():
        for key in ENTRIES[name]:
            previous = _previous.pop((name, key), None)
            if previous is None:
                registry._local_mapping.pop(key, None)
            else:
                registry[key] = previous
