import copy

import pytest
import torch

import veomni_omni
from veomni_omni.testing import tiny_thinker_config


@pytest.fixture(scope="session")
def tiny_thinker():
    """A seeded tiny thinker (fp32, CPU) and an identical copy used as the unpatched reference."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config()).eval()
    return model, copy.deepcopy(model)


@pytest.fixture
def patched():
    """Guarantee the patch set is applied for the test, whatever an earlier test did."""
    veomni_omni.apply()
    yield
    veomni_omni.apply()
