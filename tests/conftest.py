import copy

import pytest
import torch

import veomni_omni
from veomni_omni.testing import save_checkpoint
from veomni_omni.tiny import tiny_thinker_config


@pytest.fixture(scope="session")
def tiny_thinker():
    """A seeded tiny thinker (fp32, CPU) and an identical copy used as the unpatched reference."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config()).eval()
    return model, copy.deepcopy(model)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: `make(name, **text_overrides)` saves a seeded tiny thinker (`tiny_thinker_config(**text_overrides)`,
    fp32, CPU) as a checkpoint in a fresh directory and returns (its path, the model)."""
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    def make(name: str, **text_overrides):
        torch.manual_seed(0)
        model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config(**text_overrides)).eval()
        path = tmp_path_factory.mktemp(name)
        save_checkpoint(model, path)
        return path, model

    return make


@pytest.fixture
def patched():
    """Guarantee the patch set is applied for the test, whatever an earlier test did."""
    veomni_omni.apply()
    yield
    veomni_omni.apply()


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The tiny processor, saved and loaded back as from a checkpoint directory."""
    from veomni_omni.data.processor import build_tiny_processor, load_processor

    path = tmp_path_factory.mktemp("proc")
    build_tiny_processor(path)
    return load_processor(path)


@pytest.fixture(scope="module")
def config():
    """The tiny thinker config the tiny processor's token ids belong to."""
    return tiny_thinker_config()
