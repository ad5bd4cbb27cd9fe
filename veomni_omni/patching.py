"""The patch mechanism: named, fingerprinted, reversible runtime changes to transformers and VeOmni.

Two kinds of entry, one store of originals (`_state`), one apply/undo/suspended path:

- `Patch` replaces (or adds) one attribute of a class or module (a method, a module-level function
  VeOmni imported by name, a data table);
- `RegistryEntry` sets (or adds) one key of a VeOmni `Registry` (MODELING_REGISTRY, ...).

Before anything is touched, every entry's guard is checked: the fingerprint of what it replaces (a
function's or class's source, a data value's repr) must be the one the entry was written against,
and a registry entry's registry must still have the API it relies on. A mismatch raises
`PatchFingerprintError` naming the target and the installed transformers (or VeOmni) version, unless
the user opts out with `VEOMNI_OMNI_ALLOW_UNVERIFIED_PATCHES=1`. An entry with `only_if` is applied
only where that holds (a gap of some machines, e.g. no torchvision).

`python -m veomni_omni diffs --write` regenerates `patches/*.diff` (the upstream original vs our
replacement); `--check` exits non-zero when one is stale.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import inspect
import os
import pprint
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Optional

OPT_OUT_ENV = "VEOMNI_OMNI_ALLOW_UNVERIFIED_PATCHES"
DIFF_DIR = Path(__file__).resolve().parent.parent / "patches"
# Source fingerprint of veomni.utils.registry.Registry (VeOmni 0.1.12), the API a RegistryEntry relies on:
# item assignment is an instance-local override of what `register` recorded; `del` removes only that override.
REGISTRY_API_FINGERPRINT = "c6f4af3e01153c38"
_MISSING = object()


class PatchFingerprintError(RuntimeError):
    """The upstream code an entry replaces is not the code it was written against."""


def _code_of(attr):
    """The function behind a class attribute (a property's getter)."""
    return attr.fget if isinstance(attr, property) else attr


def _is_code(value) -> bool:
    value = _code_of(value)
    return inspect.isroutine(value) or inspect.isclass(value)


def source_of(value) -> str:
    """The text an entry is fingerprinted and diffed by: a function's or class's source, a data value's repr."""
    if _is_code(value):
        return textwrap.dedent(inspect.getsource(inspect.unwrap(_code_of(value))))
    return pprint.pformat(value) + "\n"


def fingerprint(value) -> str:
    return hashlib.sha256(source_of(value).encode()).hexdigest()[:16]


def _library(module_name: str) -> str:
    library = module_name.partition(".")[0]
    return f"{library} {importlib.metadata.version(library)}"


@dataclass(frozen=True, kw_only=True)
class _Entry:
    """What every entry kind shares: its name, the replacement, the fingerprint of what it replaces
    (None: an addition), why, the test that proves it and an optional `only_if`. A kind adds where it
    writes and defines `target` (unique across the set), `_module_name`, `_where`, `current()` (the
    value now, or _MISSING), `_set(value)` and `_restore(saved)`."""

    name: str
    replacement: object
    fingerprint: Optional[str]
    why: str
    test: str
    only_if: Optional[Callable[[], bool]] = None

    @property
    def upstream(self) -> str:
        """'<library> <installed version>' the target belongs to (transformers, veomni)."""
        return _library(self._module_name)

    def needed(self) -> bool:
        return self.only_if is None or self.only_if()

    def original(self):
        """The upstream value, whether or not the entry is applied now (None where there is none)."""
        saved = _state.originals[self.target] if self.target in _state.originals else self.current()
        return None if saved is _MISSING else saved

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
        original = self.original() if self.fingerprint is not None else None  # an addition replaces nothing
        old = source_of(original).splitlines(keepends=True) if original is not None else []
        code = _code_of(self.replacement)
        if _is_code(code) and code.__module__.startswith("veomni_omni."):
            new, ours = source_of(self.replacement), f"veomni_omni: {code.__module__}.{code.__qualname__}"
        elif _is_code(code):  # an upstream object under another name: named, not copied
            new, ours = f"{code.__module__}.{code.__qualname__}\n", f"veomni_omni: {self.name}"
        else:
            new, ours = source_of(self.replacement), f"veomni_omni: {self.name}"
        new = new.splitlines(keepends=True)
        origin = f"{self.upstream}: {self._where}"
        condition = f"# only if: {self.only_if.__doc__}\n" if self.only_if is not None else ""
        header = f"# patch {self.name}: {self.why}\n# test: {self.test}\n{condition}"
        return header + "".join(difflib.unified_diff(old, new, fromfile=origin, tofile=ours))


@dataclass(frozen=True, kw_only=True)
class Patch(_Entry):
    """One attribute: `owner.attr = replacement` (owner a class or module)."""

    owner: type | ModuleType
    attr: str

    @property
    def target(self) -> str:
        return f"{self.owner.__name__}.{self.attr}"

    @property
    def _module_name(self) -> str:
        return self.owner.__name__ if isinstance(self.owner, ModuleType) else self.owner.__module__

    @property
    def _where(self) -> str:
        return self.target if isinstance(self.owner, ModuleType) else f"{self.owner.__module__}.{self.target}"

    def current(self):
        return self.owner.__dict__.get(self.attr, _MISSING)

    def _set(self, value) -> None:
        setattr(self.owner, self.attr, value)

    def _restore(self, saved) -> None:
        if saved is _MISSING:
            delattr(self.owner, self.attr)
        else:
            setattr(self.owner, self.attr, saved)


@dataclass(frozen=True, kw_only=True)
class RegistryEntry(_Entry):
    """One key of a VeOmni `Registry`: `module.registry[key] = replacement`, through the registry's
    public mapping API (an instance-local override; `del` gives back what VeOmni's `register` recorded)."""

    module: ModuleType
    registry: str
    key: str

    @property
    def target(self) -> str:
        return f"{self.module.__name__}.{self.registry}[{self.key!r}]"

    @property
    def _module_name(self) -> str:
        return self.module.__name__

    _where = target

    @property
    def mapping(self):
        return getattr(self.module, self.registry)

    def current(self):
        mapping = self.mapping
        return mapping[self.key] if self.key in mapping.valid_keys() else _MISSING

    def _set(self, value) -> None:
        self.mapping[self.key] = value

    def _restore(self, saved) -> None:
        del self.mapping[self.key]  # our override; VeOmni's own registration shows through again
        if saved is not _MISSING and self.current() is not saved:
            self.mapping[self.key] = saved  # someone's override that ours had replaced

    def verify(self) -> None:
        found = fingerprint(type(self.mapping))
        if found != REGISTRY_API_FINGERPRINT:
            raise PatchFingerprintError(
                f"{self.target}: {type(self.mapping).__qualname__} in {self.upstream} is not the registry API veomni_omni's "
                f"patch '{self.name}' relies on (fingerprint {found}, expected {REGISTRY_API_FINGERPRINT}). "
                f"Install the version veomni_omni requires (pyproject.toml), or set {OPT_OUT_ENV}=1 to apply the patch anyway."
            )
        super().verify()


class _State:
    def __init__(self):
        self.originals: dict[str, object] = {}  # target -> upstream value (_MISSING: absent upstream)


_state = _State()


def is_applied() -> bool:
    return bool(_state.originals)


def apply(entries: Iterable[_Entry]) -> None:
    """Apply every needed entry not applied yet (idempotent). All guards are checked first: when one
    fails, nothing changes."""
    pending = [entry for entry in entries if entry.target not in _state.originals and entry.needed()]
    if os.environ.get(OPT_OUT_ENV) != "1":
        for entry in pending:
            entry.verify()
    for entry in pending:
        _state.originals[entry.target] = entry.current()
        entry._set(entry.replacement)


def undo(entries: Iterable[_Entry]) -> None:
    """Restore every applied entry to its upstream value (idempotent)."""
    for entry in reversed(list(entries)):
        if entry.target in _state.originals:
            entry._restore(_state.originals.pop(entry.target))


@contextmanager
def suspended(entries: Iterable[_Entry]):
    """Run a block with the given entries undone, re-applying those that were applied."""
    applied = [entry for entry in entries if entry.target in _state.originals]
    undo(applied)
    try:
        yield
    finally:
        apply(applied)


def diff_path(entry: _Entry) -> Path:
    return DIFF_DIR / f"{entry.name}.diff"


def stale_diffs(entries: Iterable[_Entry]) -> list[str]:
    return [
        entry.name
        for entry in entries
        if not diff_path(entry).exists() or diff_path(entry).read_text() != entry.diff()
    ]
