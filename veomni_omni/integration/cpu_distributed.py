"""Small, named adaptations that let VeOmni 0.1.12's training machinery run on CPU (gloo).

VeOmni supports CUDA, NPU and MLU only (docs/design.md §4). Its parallel state, Ulysses
all-to-all and FSDP2 wrapping already work on CPU once a gloo process group exists; what fails is
the glue around them. Each adaptation below is one function VeOmni calls, replaced by a version
that answers for CPU and otherwise defers to VeOmni's own. Nothing is forked: the patch set
(veomni_omni/patchset.py, group "VeOmni on CPU") sets the replacement in `veomni.utils.device` (so
modules imported later bind it) and in each VeOmni module that imports the original by name.

| adaptation      | VeOmni function        | what it does on CPU in 0.1.12          | here                              |
|-----------------|------------------------|----------------------------------------|-----------------------------------|
| `comm_backend`  | `get_dist_comm_backend`| raises "No available ... backend"      | "gloo"                            |
| `device_module` | `get_torch_device`     | `torch.cpu`, which has no memory stats | `torch.cpu` + the memory API the  |
|                 |                        | (`max_memory_allocated`, `memory_stats`,| meters/trainer call: peak RSS,    |
|                 |                        | `empty_cache` ...): meters crash       | zero retries, no-op cache         |

Not needed here, and why: `TrainingArguments.init_device` lists only cuda/meta/npu/mlu, but FSDP2
requires "meta" anyway (VeOmni's `build_parallelize_model` materialises and loads weights on the
host for CPU ranks); ops implementations default to CUDA kernels, `veomni_omni.integration.settings.eager_ops_config`
selects the eager ones. The CUDA-kernel modules under `veomni.ops.kernels` that also import
`get_torch_device` by name are not patched: they never load on CPU, and elsewhere the replacement
would defer to VeOmni's own.

On CUDA/NPU/MLU machines the replacements change nothing (they defer to the originals).
"""

from __future__ import annotations

import resource
import types
from typing import Any

import torch

__all__ = ["COMM_BACKEND_PATCH", "TORCH_DEVICE_PATCH", "device_type", "dist_backend", "get_dist_comm_backend", "get_torch_device"]

# The patch-set entries on veomni.utils.device, whose originals the replacements defer to.
TORCH_DEVICE_PATCH = "cpu_torch_device"
COMM_BACKEND_PATCH = "cpu_comm_backend"


def device_type() -> str:
    from veomni.utils.device import get_device_type

    return get_device_type()


def dist_backend() -> str:
    """The process-group backend for this machine: VeOmni's answer, or "gloo" on CPU."""
    if device_type() == "cpu":
        return "gloo"
    from ..patchset import original

    return original(COMM_BACKEND_PATCH)()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _CpuDevice(types.SimpleNamespace):
    """`torch.cpu` plus the memory API VeOmni's meters and trainer call on the device module."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def max_memory_allocated(*_, **__):
        return _peak_rss_bytes()

    max_memory_reserved = max_memory_allocated
    memory_allocated = max_memory_allocated
    memory_reserved = max_memory_allocated

    @staticmethod
    def memory_stats(*_, **__):
        return {"num_alloc_retries": 0}

    @staticmethod
    def reset_peak_memory_stats(*_, **__):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def get_device_name(*_, **__):
        return "cpu"


_CPU_DEVICE = _CpuDevice()


def get_torch_device() -> Any:
    """VeOmni's device module, or on CPU `torch.cpu` with the memory API its meters call."""
    if device_type() == "cpu":
        return _CPU_DEVICE
    from ..patchset import original

    return original(TORCH_DEVICE_PATCH)()


def get_dist_comm_backend() -> str:
    return dist_backend()
