"""veomni_omni: Qwen3-Omni-MoE for VeOmni. Importing it applies the patch set, hands VeOmni's
registries our classes and lets VeOmni's distributed set-up run on CPU (gloo); `undo()` restores
upstream transformers and VeOmni."""

from . import host_cpu as _host_cpu
from . import patching as _patching
from . import registry as _registry
from .data import video_processor as _video_processor
from .patching import OPT_OUT_ENV, PatchFingerprintError
from .patchset import PATCHES

_HOOKS = (
    (_registry.register, _registry.unregister),
    # transformers 5.22 cannot build or load a video processor without torchvision: ours fills in.
    (_video_processor.register, _video_processor.unregister),
    # VeOmni's distributed set-up refuses CPU; gloo and a CPU device module fill in.
    (_host_cpu.apply, _host_cpu.undo),
)


def apply() -> None:
    """Apply the patch set and the registry hand-over (idempotent)."""
    _patching.apply(PATCHES, _HOOKS)


def undo() -> None:
    """Restore transformers' and VeOmni's originals (idempotent)."""
    _patching.undo(PATCHES)


def is_applied() -> bool:
    return _patching.is_applied()


def unpatched():
    """Context manager: run a block against upstream transformers/VeOmni, then re-apply."""
    return _patching.suspended(PATCHES, _HOOKS)


apply()

__all__ = ["PATCHES", "OPT_OUT_ENV", "PatchFingerprintError", "apply", "undo", "is_applied", "unpatched"]
