"""The patch mechanism: idempotent apply/undo, the fingerprint guard, fresh diffs in patches/, and that the
patch set declares every runtime change veomni_omni makes."""

import dataclasses
import importlib
import inspect
import subprocess
import sys
import types

import pytest
import transformers
from veomni.utils.registry import Registry

import veomni_omni
from veomni_omni import patching
from veomni_omni.patching import Patch, RegistryEntry
from veomni_omni.patchset import PATCHES

APPLIED = [p for p in PATCHES if p.needed()]


def current_attributes():
    return {p.target: p.current() for p in PATCHES}


def test_import_applies_every_patch(patched):
    for patch in APPLIED:
        assert patch.current() is patch.replacement, patch.target


def test_apply_and_import_twice_change_nothing(patched):
    before = current_attributes()
    originals = {p.target: p.original() for p in PATCHES}
    veomni_omni.apply()
    importlib.reload(veomni_omni)
    assert current_attributes() == before
    assert {p.target: p.original() for p in PATCHES} == originals


def test_undo_restores_upstream_and_is_idempotent(patched):
    originals = {p.target: p.original() for p in PATCHES}
    veomni_omni.undo()
    veomni_omni.undo()
    try:
        assert not veomni_omni.is_applied()
        for patch in PATCHES:
            assert patch.original() is originals[patch.target], patch.target
        # additions are really gone, not set to None
        for patch in (p for p in PATCHES if p.fingerprint is None):
            assert patch.current() is patching._MISSING, patch.target
    finally:
        veomni_omni.apply()
    assert {p.target: p.current() for p in APPLIED} == {p.target: p.replacement for p in APPLIED}


def test_fingerprints_match_installed_transformers():
    for patch in PATCHES:
        patch.verify()


def test_fingerprint_guard_fires_on_a_changed_function(patched, monkeypatch):
    """Simulate a transformers release whose thinker forward differs from the one we patched."""
    target = PATCHES[0]
    veomni_omni.undo()
    upstream = target.owner.__dict__[target.attr]

    def forward(self, *args, **kwargs):  # a "new upstream" implementation
        return upstream(self, *args, **kwargs)

    monkeypatch.delenv(patching.OPT_OUT_ENV, raising=False)
    setattr(target.owner, target.attr, forward)
    try:
        with pytest.raises(veomni_omni.PatchFingerprintError) as error:
            veomni_omni.apply()
        message = str(error.value)
        assert target.target in message and transformers.__version__ in message and patching.OPT_OUT_ENV in message
        assert not veomni_omni.is_applied(), "nothing may be patched when the guard fires"
        assert target.owner.__dict__[target.attr] is forward

        monkeypatch.setenv(patching.OPT_OUT_ENV, "1")
        veomni_omni.apply()
        assert target.owner.__dict__[target.attr] is target.replacement
        veomni_omni.undo()
    finally:
        setattr(target.owner, target.attr, upstream)
        veomni_omni.apply()


def test_guard_fires_when_an_added_attribute_appears_upstream(patched):
    addition = next(p for p in PATCHES if p.fingerprint is None and isinstance(p, Patch))
    veomni_omni.undo()
    setattr(addition.owner, addition.attr, lambda self: None)
    try:
        with pytest.raises(veomni_omni.PatchFingerprintError, match="now exists"):
            veomni_omni.apply()
    finally:
        delattr(addition.owner, addition.attr)
        veomni_omni.apply()


def test_wrong_fingerprint_is_reported():
    bad = dataclasses.replace(PATCHES[0], fingerprint="0" * 16)
    with pytest.raises(veomni_omni.PatchFingerprintError, match=r"Qwen3OmniMoeThinkerModel\.forward"):
        bad.verify()


def test_patch_diffs_are_fresh():
    stale = patching.stale_diffs(PATCHES)
    assert not stale, f"patches/*.diff out of date for {stale}: run `make diffs`"
    done = subprocess.run([sys.executable, "-m", "veomni_omni", "diffs", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_stale_diff_is_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(patching, "DIFF_DIR", tmp_path)
    for patch in PATCHES:
        patching.diff_path(patch).write_text(patch.diff())
    assert patching.stale_diffs(PATCHES) == []
    patching.diff_path(PATCHES[0]).write_text(PATCHES[0].diff().replace("masked_scatter", "index_put"))
    assert patching.stale_diffs(PATCHES) == [PATCHES[0].name]


def test_every_patch_is_documented():
    names = [p.name for p in PATCHES]
    assert len(set(names)) == len(names)
    targets = [p.target for p in PATCHES]
    assert len(set(targets)) == len(targets), "a target changed by two entries"
    for patch in PATCHES:
        assert patch.why and patch.test.startswith("tests/")
        assert patch.diff().startswith(f"# patch {patch.name}: {patch.why}")


# ------------------------------------------------------------ the patch set declares every runtime change
def _namespace_of(entry):
    """(namespace, name) an entry changes: a class's or module's attribute, a registry's key."""
    if isinstance(entry, RegistryEntry):
        return entry.mapping, entry.key
    return entry.owner, entry.attr


def _watched_namespaces():
    """id -> (label, namespace) wherever a runtime change of veomni_omni could land: every loaded VeOmni
    module, transformers' qwen3_omni_moe modules and every module an entry touches, the classes those
    modules define, and the VeOmni registries they hold."""
    def watched(name):
        return name == "veomni" or name.startswith(("veomni.", "transformers.models.qwen3_omni_moe"))

    modules = [m for name, m in list(sys.modules.items()) if m is not None and watched(name)]
    for entry in PATCHES:
        owner = entry.module if isinstance(entry, RegistryEntry) else entry.owner
        modules.append(owner if isinstance(owner, types.ModuleType) else sys.modules[owner.__module__])
    namespaces = {}
    for module in modules:
        namespaces[id(module)] = (module.__name__, module)
        for name, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == module.__name__:
                namespaces[id(value)] = (f"{module.__name__}.{value.__qualname__}", value)
            elif isinstance(value, Registry):
                namespaces[id(value)] = (f"{module.__name__}.{name}[]", value)
    return namespaces


def _snapshot(namespaces):
    """(id of namespace, name) -> object: every module and class attribute, every registry key's entry."""
    found = {}
    for namespace_id, (_, namespace) in namespaces.items():
        if isinstance(namespace, Registry):
            items = {key: namespace[key] for key in namespace.valid_keys()}
        else:
            items = dict(vars(namespace))
        found.update({(namespace_id, name): value for name, value in items.items()})
    return found


def _changed(before, after):
    missing = patching._MISSING
    return {key for key in before.keys() | after.keys() if before.get(key, missing) is not after.get(key, missing)}


def test_apply_changes_exactly_the_declared_targets_and_undo_restores_each(patched):
    declared = {}
    for entry in APPLIED:
        namespace, name = _namespace_of(entry)
        declared[(id(namespace), name)] = entry
    veomni_omni.undo()
    try:
        namespaces = _watched_namespaces()
        upstream = _snapshot(namespaces)
        veomni_omni.apply()
        applied = _snapshot(namespaces)
        veomni_omni.undo()
        restored = _snapshot(namespaces)
    finally:
        veomni_omni.apply()

    def label(key):
        return f"{namespaces[key[0]][0]}.{key[1]}"

    assert {key[0] for key in declared} <= set(namespaces), "an entry's target lies outside the watched namespaces"
    changed = _changed(upstream, applied)
    undeclared = sorted(map(label, changed - set(declared)))
    assert not undeclared, f"apply() changed what no entry declares: {undeclared}"
    unchanged = sorted(map(label, set(declared) - changed))
    assert not unchanged, f"declared, but apply() left as it was: {unchanged}"
    for key, entry in declared.items():
        assert applied[key] is entry.replacement, entry.target
    not_restored = sorted(map(label, _changed(upstream, restored)))
    assert not not_restored, f"undo() did not restore to the identical object: {not_restored}"
    assert len(declared) == len(APPLIED) > 50


def test_no_loaded_module_keeps_a_replaced_function_under_its_name(patched):
    """A function VeOmni or transformers modules import by name is replaced in each module holding it,
    not only where it is defined (where a module keeps its own binding, the entry has no effect there)."""
    # Defined there, called only where imported by name (vlm_trainer, torch_parallelize: both patched).
    never_called_where_defined = {("veomni.distributed.torch_compile", "validate_compile_runtime")}
    declared = {(id(p.owner), p.attr) for p in APPLIED if isinstance(p, Patch)}
    module_entries = [
        p for p in APPLIED if isinstance(p, Patch) and isinstance(p.owner, types.ModuleType) and inspect.isfunction(p.original())
    ]
    kept = set()
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("veomni.", "transformers.")):
            continue
        for patch in module_entries:
            if vars(module).get(patch.attr) is patch.original() and (id(module), patch.attr) not in declared:
                kept.add((name, patch.attr))
    assert sorted(kept - never_called_where_defined) == []


def test_registry_guard_fires_on_a_changed_registry_api(patched, monkeypatch):
    first = next(p for p in PATCHES if isinstance(p, RegistryEntry))
    veomni_omni.undo()
    monkeypatch.delenv(patching.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(patching, "REGISTRY_API_FINGERPRINT", "0" * 16)
    try:
        with pytest.raises(veomni_omni.PatchFingerprintError, match=r"registry API") as error:
            veomni_omni.apply()
        assert first.target in str(error.value)
        assert not veomni_omni.is_applied(), "nothing may be patched when the guard fires"
    finally:
        monkeypatch.undo()
        veomni_omni.apply()


def test_registry_entry_undo_gives_back_an_override_made_before_it(patched):
    """undo() gives back exactly what the registry held, also an override someone set before veomni_omni."""
    entry = next(p for p in PATCHES if isinstance(p, RegistryEntry) and p.fingerprint is not None)
    veomni_omni.undo()
    veomni_own = entry.mapping[entry.key]

    def override(*args):
        return veomni_own(*args)

    entry.mapping[entry.key] = override
    try:
        with pytest.raises(veomni_omni.PatchFingerprintError, match=entry.name):
            veomni_omni.apply()  # the override is not what the entry was written against
        patching.apply([dataclasses.replace(entry, fingerprint=patching.fingerprint(override))])
        assert entry.mapping[entry.key] is entry.replacement
        patching.undo([entry])
        assert entry.mapping[entry.key] is override
    finally:
        del entry.mapping[entry.key]
        veomni_omni.apply()
    assert entry.mapping[entry.key] is entry.replacement
