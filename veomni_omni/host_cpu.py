"""Small, named adaptations that let VeOmni 0.1.12's training machinery run on CPU (gloo).

VeOmni supports CUDA, NPU and MLU only (docs/design.md §4). Its parallel state, Ulysses
all-to-all and FSDP2 wrapping already work on CPU once a gloo process group exists; what fails is
the glue around them. Each adaptation below is one function VeOmni calls, replaced by a version
that answers for CPU and otherwise defers to VeOmni's own. Nothing is forked: the replacement is
set in `veomni.utils.device` (so modules imported later bind it) and in every loaded VeOmni module
that imported the original by name; `undo()` puts the originals back everywhere. `import
veomni_omni` applies it (part of the patch set's hooks).

| adaptation      | VeOmni function        | what it does on CPU in 0.1.12          | here                              |
|-----------------|------------------------|----------------------------------------|-----------------------------------|
| `comm_backend`  | `get_dist_comm_backend`| raises "No available ... backend"      | "gloo"                            |
| `device_module` | `get_torch_device`     | `torch.cpu`, which has no memory stats | `torch.cpu` + the memory API the  |
|                 |                        | (`max_memory_allocated`, `memory_stats`,| meters/trainer call: peak RSS,    |
|                 |                        | `empty_cache` ...): meters crash       | zero retries, no-op cache         |

Not needed here, and why: `TrainingArguments.init_device` lists only cuda/meta/npu/mlu, but FSDP2
requires "meta" anyway (VeOmni's `build_parallelize_model` materialises and loads weights on the
host for CPU ranks); ops implementations default to CUDA kernels, `veomni_omni.host.eager_ops_config`
selects the eager ones.

On CUDA/NPU/MLU machines `apply()` changes nothing (the replacements defer to the originals).
"""

from __future__ import annotations

import resource
import sys
import types

import torch

__all__ = ["apply", "undo", "is_applied", "dist_backend", "device_type"]

_ORIGINALS: dict[str, object] = {}


def device_type() -> str:
    from veomni.utils.device import get_device_type

    return get_device_type()


def dist_backend() -> str:
    """The process-group backend for this machine: VeOmni's answer, or "gloo" on CPU."""
    if device_type() == "cpu":
        return "gloo"
    return _ORIGINALS["get_dist_comm_backend"]()


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


def _get_torch_device():
    if device_type() == "cpu":
        return _CPU_DEVICE
    return _ORIGINALS["get_torch_device"]()


def _get_dist_comm_backend():
    return dist_backend()


_REPLACEMENTS = {"get_dist_comm_backend": _get_dist_comm_backend, "get_torch_device": _get_torch_device}


def _veomni_modules():
    return [m for name, m in list(sys.modules.items()) if m is not None and (name == "veomni" or name.startswith("veomni."))]


def _swap(old_of, new_of) -> None:
    """Every loaded VeOmni module's attribute holding old_of(name) gets new_of(name)."""
    for module in _veomni_modules():
        for name in _REPLACEMENTS:
            if getattr(module, name, None) is old_of(name):
                setattr(module, name, new_of(name))


def apply() -> None:
    """Install the adaptations (idempotent)."""
    from veomni.utils import device

    for name in _REPLACEMENTS:
        if getattr(device, name) is not _REPLACEMENTS[name]:
            _ORIGINALS[name] = getattr(device, name)
    _swap(_ORIGINALS.__getitem__, _REPLACEMENTS.__getitem__)


def undo() -> None:
    if _ORIGINALS:
        _swap(_REPLACEMENTS.__getitem__, _ORIGINALS.__getitem__)


def is_applied() -> bool:
    from veomni.utils import device

    return all(getattr(device, name) is replacement for name, replacement in _REPLACEMENTS.items())
