"""The patch mechanism: named, fingerprinted, reversible replacements of HF attributes.

A `Patch` replaces (or adds) one attribute of one transformers class or VeOmni module. Before
anything is touched, the source of every function being replaced is hashed and compared with the
fingerprint the patch was written against; a mismatch raises `PatchFingerprintError`
naming the function and the installed transformers (or VeOmni) version, unless the user opts out with
`VEOMNI_OMNI_ALLOW_UNVERIFIED_PATCHES=1`.

`python -m veomni_omni diffs --write` regenerates `patches/*.diff` (the upstream original vs our
replacement); `--check` exits non-zero when one is stale.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import inspect
import os
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Optional

OPT_OUT_ENV = "VEOMNI_OMNI_ALLOW_UNVERIFIED_PATCHES"
DIFF_DIR = Path(__file__).resolve().parent.parent / "patches"
_MISSING = object()


class PatchFingerprintError(RuntimeError):
    """The HF source a patch replaces is not the source it was written against."""


def _code_of(attr):
    """The function behind a class attribute (a property's getter)."""
    return attr.fget if isinstance(attr, property) else attr


def source_of(fn: Callable) -> str:
    return textwrap.dedent(inspect.getsource(inspect.unwrap(_code_of(fn))))


def fingerprint(fn: Callable) -> str:
    return hashlib.sha256(source_of(fn).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Patch:
    """One replacement: `owner.attr = replacement`.

    `fingerprint` is the hash of the HF source being replaced, or None when the attribute
    does not exist upstream (an addition, e.g. a forward HF never wrote).
    """

    name: str
    owner: type | ModuleType
    attr: str
    replacement: Callable | property
    fingerprint: Optional[str]
    why: str
    test: str

    @property
    def target(self) -> str:
        return f"{self.owner.__name__}.{self.attr}"

    @property
    def upstream(self) -> str:
        """'<library> <installed version>' the target belongs to (transformers, veomni)."""
        module = self.owner.__name__ if isinstance(self.owner, ModuleType) else self.owner.__module__
        library = module.partition(".")[0]
        return f"{library} {importlib.metadata.version(library)}"

    def original(self):
        """The upstream attribute, whether or not the patch is applied now."""
        if self.target in _state.originals:
            saved = _state.originals[self.target]
            return None if saved is _MISSING else saved
        return self.owner.__dict__.get(self.attr)

    def verify(self) -> None:
        original = self.original()
        if self.fingerprint is None:
            if original is not None:
                raise PatchFingerprintError(
                    f"{self.target} now exists in {self.upstream}; "
                    f"veomni_omni's patch '{self.name}' was written to add it, not to replace it. "
                    f"Set {OPT_OUT_ENV}=1 to apply it anyway."
                )
            return
        if original is None:
            raise PatchFingerprintError(
                f"{self.target} does not exist in {self.upstream}; "
                f"veomni_omni's patch '{self.name}' cannot be applied."
            )
        found = fingerprint(original)
        if found != self.fingerprint:
            raise PatchFingerprintError(
                f"{self.target} in {self.upstream} has changed since veomni_omni's "
                f"patch '{self.name}' was written (fingerprint {found}, expected {self.fingerprint}). "
                f"Install the version veomni_omni requires (pyproject.toml), or set {OPT_OUT_ENV}=1 to apply the patch anyway."
            )

    def diff(self) -> str:
        original = self.original()
        old = source_of(original).splitlines(keepends=True) if original is not None else []
        new = source_of(self.replacement).splitlines(keepends=True)
        where = self.target if isinstance(self.owner, ModuleType) else f"{self.owner.__module__}.{self.target}"
        origin = f"{self.upstream}: {where}"
        code = _code_of(self.replacement)
        ours = f"veomni_omni: {code.__module__}.{code.__qualname__}"
        header = f"# patch {self.name}: {self.why}\n# test: {self.test}\n"
        return header + "".join(difflib.unified_diff(old, new, fromfile=origin, tofile=ours))


class _State:
    def __init__(self):
        self.originals: dict[str, object] = {}
        self.hooks: list[tuple[Callable[[], None], Callable[[], None]]] = []


_state = _State()


def is_applied() -> bool:
    return bool(_state.originals)


def apply(patches: Iterable[Patch], on_apply: Iterable[tuple[Callable, Callable]] = ()) -> None:
    """Apply all patches (idempotent). `on_apply` holds (do, undo) pairs run alongside."""
    if is_applied():
        return
    patches = list(patches)
    if os.environ.get(OPT_OUT_ENV) != "1":
        for patch in patches:
            patch.verify()
    for patch in patches:
        _state.originals[patch.target] = patch.owner.__dict__.get(patch.attr, _MISSING)
        setattr(patch.owner, patch.attr, patch.replacement)
    for do, undo_fn in on_apply:
        do()
        _state.hooks.append((do, undo_fn))


def undo(patches: Iterable[Patch]) -> None:
    """Restore every patched attribute to its upstream value (idempotent)."""
    for patch in patches:
        saved = _state.originals.pop(patch.target, None)
        if saved is None:
            continue
        if saved is _MISSING:
            delattr(patch.owner, patch.attr)
        else:
            setattr(patch.owner, patch.attr, saved)
    for _, undo_fn in reversed(_state.hooks):
        undo_fn()
    _state.hooks.clear()


@contextmanager
def suspended(patches: Iterable[Patch], on_apply: Iterable[tuple[Callable, Callable]] = ()):
    """Run a block against unpatched transformers, re-applying afterwards if needed."""
    patches, on_apply = list(patches), list(on_apply)
    was_applied = is_applied()
    undo(patches)
    try:
        yield
    finally:
        if was_applied:
            apply(patches, on_apply)


def diff_path(patch: Patch) -> Path:
    return DIFF_DIR / f"{patch.name}.diff"


def stale_diffs(patches: Iterable[Patch]) -> list[str]:
    return [
        patch.name
        for patch in patches
        if not diff_path(patch).exists() or diff_path(patch).read_text() != patch.diff()
    ]
