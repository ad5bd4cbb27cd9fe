"""VeOmni on CPU: the patch set's "VeOmni on CPU" entries answer where VeOmni's own device helpers fail."""

import pytest
import torch
from veomni.trainer import base as veomni_trainer_base
from veomni.utils import device as veomni_device
from veomni.utils import helper as veomni_helper

import veomni_omni
from veomni_omni.integration.cpu_distributed import dist_backend

pytestmark = pytest.mark.skipif(veomni_device.get_device_type() != "cpu", reason="the CPU gaps exist only on CPU")


def test_veomnis_own_helpers_fail_on_cpu_and_ours_answer(patched):
    with veomni_omni.unpatched():
        with pytest.raises(RuntimeError, match="No available distributed communication backend"):
            veomni_device.get_dist_comm_backend()
        assert not hasattr(veomni_helper.get_torch_device(), "max_memory_allocated")
    for module in (veomni_device, veomni_trainer_base):
        assert module.get_dist_comm_backend() == dist_backend() == "gloo"
    for module in (veomni_device, veomni_helper, veomni_trainer_base):
        device = module.get_torch_device()
        assert device.max_memory_allocated() > 0 and device.memory_stats() == {"num_alloc_retries": 0}
        assert device.synchronize is torch.cpu.synchronize  # the rest is torch.cpu's own
