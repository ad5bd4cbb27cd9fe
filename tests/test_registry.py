"""Registry hand-over: VeOmni's registries resolve to veomni_omni's classes, and its builder
gives a correctly initialised model (VeOmni's own generated copy leaves MoE weights at zero)."""

import pytest
import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.models.qwen3_omni_moe import configuration_qwen3_omni_moe as hf_config
from transformers.models.qwen3_omni_moe import processing_qwen3_omni_moe as hf_processing
from veomni.models.loader import MODEL_CONFIG_REGISTRY, MODEL_PROCESSOR_REGISTRY, MODELING_REGISTRY

import veomni_omni
from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.tiny import tiny_omni_config, tiny_thinker_config

ARCHITECTURES = {
    "Qwen3OmniMoeForConditionalGeneration": hf.Qwen3OmniMoeForConditionalGeneration,
    "Qwen3OmniMoeThinkerForConditionalGeneration": hf.Qwen3OmniMoeThinkerForConditionalGeneration,
    "Qwen3OmniMoeThinkerTextModel": hf.Qwen3OmniMoeThinkerTextModel,
}


def test_registries_resolve_to_veomni_omni(patched):
    assert MODEL_CONFIG_REGISTRY["qwen3_omni_moe"]() is hf_config.Qwen3OmniMoeConfig
    assert MODEL_CONFIG_REGISTRY["qwen3_omni_moe_thinker"]() is hf_config.Qwen3OmniMoeThinkerConfig
    assert MODEL_PROCESSOR_REGISTRY["Qwen3OmniMoeProcessor"]() is hf_processing.Qwen3OmniMoeProcessor
    for architecture, cls in ARCHITECTURES.items():
        assert MODELING_REGISTRY["qwen3_omni_moe"](architecture) is cls
    assert MODELING_REGISTRY["qwen3_omni_moe_thinker"]("Qwen3OmniMoeThinkerForConditionalGeneration") is (
        hf.Qwen3OmniMoeThinkerForConditionalGeneration
    )


def test_undo_gives_veomni_its_own_entries_back(patched):
    veomni_omni.undo()
    try:
        cls = MODELING_REGISTRY["qwen3_omni_moe"]("Qwen3OmniMoeForConditionalGeneration")
        assert cls.__module__.startswith("veomni."), cls
        assert "qwen3_omni_moe_thinker" not in MODELING_REGISTRY.valid_keys()
        assert MODEL_CONFIG_REGISTRY["qwen3_omni_moe"]().__module__.startswith("veomni.")
        assert MODEL_PROCESSOR_REGISTRY["Qwen3OmniMoeProcessor"]().__module__.startswith("veomni.")
    finally:
        veomni_omni.apply()
    assert MODELING_REGISTRY["qwen3_omni_moe"]("Qwen3OmniMoeForConditionalGeneration") is (
        hf.Qwen3OmniMoeForConditionalGeneration
    )


@pytest.fixture
def keep_loss_mapping():
    """VeOmni's builder installs its own 3-tuple loss into transformers' global LOSS_MAPPING;
    keep that side effect out of the tests that compare against stock HF."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    saved = dict(LOSS_MAPPING)
    yield
    LOSS_MAPPING.clear()
    LOSS_MAPPING.update(saved)


@pytest.mark.parametrize("config_factory", [tiny_thinker_config, tiny_omni_config])
def test_veomni_builder_initialises_moe_weights(patched, keep_loss_mapping, tmp_path, config_factory):
    from veomni.models import build_foundation_model

    config_factory().save_pretrained(tmp_path)
    model = build_foundation_model(
        str(tmp_path), init_device="cpu", torch_dtype="float32", ops_implementation=eager_ops_config()
    )
    assert type(model).__module__ == hf.__name__
    assert_moe_initialised(model)


def assert_moe_initialised(model):
    moe = {n: p for n, p in model.named_parameters() if ".mlp.experts." in n or ".mlp.gate." in n}
    assert moe, "no MoE parameters found"
    for name, param in moe.items():
        std = param.detach().float().std().item()
        assert 0.01 < std < 0.03, f"{name} is not initialised (std {std:.2e}; initializer_range 0.02)"


def test_standalone_talker_is_initialised(patched):
    talker = hf.Qwen3OmniMoeTalkerForConditionalGeneration(tiny_omni_config().talker_config)
    assert_moe_initialised(talker)


def test_top_level_forward_is_thinker(patched):
    torch.manual_seed(0)
    model = hf.Qwen3OmniMoeForConditionalGeneration(tiny_omni_config()).eval()
    batch = build_batch([[("prompt", 2), ("image", 1, 4, 4), ("audio", 90), ("text", 5)]])
    with torch.no_grad():
        top, thinker = model(**batch), model.thinker(**batch)
    assert torch.equal(top.loss, thinker.loss) and torch.equal(top.logits, thinker.logits)


def test_forward_under_veomni_loss_matches_hf(tiny_thinker, patched, keep_loss_mapping):
    """After VeOmni installs its own loss (as its builder does), the thinker still trains with
    HF's numbers: its fused (hidden states + lm_head weight) path equals stock HF on logits."""
    from transformers.loss.loss_utils import LOSS_MAPPING
    from veomni.ops import apply_ops_config

    from veomni_omni.parity import parity_errors
    from veomni_omni.testing import loss_and_grads

    model, ref_model = tiny_thinker
    batch = build_batch([[("prompt", 2), ("image", 1, 4, 4), ("audio", 90), ("text", 5)], [("text", 9)]])
    with veomni_omni.unpatched():
        ref_loss, ref_grads = loss_and_grads(ref_model, batch)

    apply_ops_config(eager_ops_config())
    assert LOSS_MAPPING["ForCausalLM"].func.__module__.startswith("veomni.")
    loss, grads = loss_and_grads(model, batch)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    errors = parity_errors(grads, ref_grads)
    assert not errors, "\n".join(errors)
    # HF's output contract holds under VeOmni's loss too: logits are (batch, seq, vocab).
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
