"""LoRA target names through the patch set's `_convert_lora_targets_to_parameters` hook (what VeOmni's
`_setup_lora` calls): the expert projections become the fused expert parameters of every MoE layer, other
names stay linear targets, and a name that would silently train nothing is refused. Training, parity and
the exports are in tests/test_veomni_trainer_parity.py (the `lora_*` layouts)."""

import pytest
import torch
from transformers import Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration
from veomni.lora import VeOmniLoraConfig, VeOmniLoraModel, resolve_fused_moe_lora_targets
from veomni.lora.moe_layers import LoraIndependentExperts

import veomni_omni  # noqa: F401
from veomni_omni.tiny import tiny_omni_config

TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def models():
    config = tiny_omni_config()
    with torch.device("meta"):
        omni = Qwen3OmniMoeForConditionalGeneration(config)
        omni.disable_talker()  # as VLMTrainer does before its LoRA set-up
        return {"omni": omni, "thinker": Qwen3OmniMoeThinkerForConditionalGeneration(config.thinker_config)}


@pytest.mark.parametrize("which", ["omni", "thinker"])
def test_expert_projections_become_the_fused_experts_of_every_layer(models, which):
    model = models[which]
    resolved = resolve_fused_moe_lora_targets(model, {"rank": 4, "alpha": 8, "lora_modules": TARGETS})
    assert resolved["lora_modules"] == ["q_proj", "o_proj"]
    prefix = "thinker." if which == "omni" else ""
    experts = f"{prefix}model.language_model.layers.*.mlp.experts"
    assert resolved["target_parameters"] == [f"{experts}.gate_up_proj", f"{experts}.down_proj"]

    with torch.device("meta"):
        fresh = type(model)(model.config)
    if which == "omni":
        fresh.disable_talker()
    wrapped = VeOmniLoraModel(fresh, VeOmniLoraConfig.from_yaml(resolved))
    layers = model.config.get_text_config().num_hidden_layers
    assert sum(isinstance(m, LoraIndependentExperts) for m in wrapped.modules()) == layers


def test_some_expert_projections_only_is_refused(models):
    with pytest.raises(ValueError, match="adapts gate_proj, up_proj and down_proj together"):
        resolve_fused_moe_lora_targets(models["omni"], {"lora_modules": ["q_proj", "down_proj"]})


def test_a_name_matching_no_linear_is_refused(models):
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer"):
        resolve_fused_moe_lora_targets(models["omni"], {"lora_modules": ["qproj", "gate_proj", "up_proj", "down_proj"]})
    with pytest.raises(ValueError, match=r"\['q_porj'\] match no linear layer"):
        resolve_fused_moe_lora_targets(models["thinker"], {"lora_modules": ["q_porj"]})


def test_expert_adapters_run_when_fsdp_has_subclassed_the_wrapper():
    """FSDP2's `fully_shard` swaps a module's class for a generated subclass (VeOmni shards each experts
    module on its own under EP); the LoRA experts forward must hand such a wrapper to VeOmni's forward too."""
    config = tiny_omni_config().thinker_config
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    resolved = resolve_fused_moe_lora_targets(model, {"rank": 4, "alpha": 8, "lora_modules": ["gate_proj", "up_proj", "down_proj"]})
    model = VeOmniLoraModel(model, VeOmniLoraConfig.from_yaml(resolved))
    for module in model.modules():
        if isinstance(module, LoraIndependentExperts):
            torch.nn.init.normal_(module.get_lora_B_weight("gate_proj"))  # a non-zero update to lose
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for module in model.modules():
            if isinstance(module, LoraIndependentExperts):
                module.__class__ = type(f"FSDP{type(module).__name__}", (type(module),), {})
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
