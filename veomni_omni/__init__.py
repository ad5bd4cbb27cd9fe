"""veomni_omni: Qwen3-Omni-MoE for VeOmni. Importing it applies the patch set (veomni_omni/patchset.py):
the patched HF classes, VeOmni's registries handed our classes, a video processor without torchvision
and VeOmni's distributed set-up on CPU (gloo); `undo()` restores upstream transformers and VeOmni."""

from . import patching as _patching
from .patching import OPT_OUT_ENV, PatchFingerprintError
from .patchset import PATCHES


def apply() -> None:
    """Apply the patch set (idempotent)."""
    _patching.apply(PATCHES)


def undo() -> None:
    """Restore transformers' and VeOmni's originals (idempotent)."""
    _patching.undo(PATCHES)


def is_applied() -> bool:
    return _patching.is_applied()


def unpatched():
    """Context manager: run a block against upstream transformers/VeOmni, then re-apply."""
    return _patching.suspended(PATCHES)


apply()

__all__ = ["PATCHES", "OPT_OUT_ENV", "PatchFingerprintError", "apply", "undo", "is_applied", "unpatched"]
