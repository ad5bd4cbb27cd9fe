"""The patch mechanism: idempotent apply/undo, the fingerprint guard, fresh diffs in patches/."""

import dataclasses
import importlib
import subprocess
import sys

import pytest
import transformers

import veomni_omni
from veomni_omni import patching
from veomni_omni.patchset import PATCHES


def current_attributes():
    return {p.target: p.owner.__dict__.get(p.attr) for p in PATCHES}


def test_import_applies_every_patch(patched):
    for patch in PATCHES:
        assert patch.owner.__dict__[patch.attr] is patch.replacement, patch.target


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
            assert patch.owner.__dict__.get(patch.attr) is originals[patch.target], patch.target
        # additions are really gone, not set to None
        for patch in (p for p in PATCHES if p.fingerprint is None):
            assert patch.attr not in patch.owner.__dict__
    finally:
        veomni_omni.apply()
    assert current_attributes() == {p.target: p.replacement for p in PATCHES}


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
    addition = next(p for p in PATCHES if p.fingerprint is None)
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
    done = subprocess.run([sys.executable, "-m", "veomni_omni.patching", "--check"], capture_output=True, text=True)
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
    for patch in PATCHES:
        assert patch.why and patch.test.startswith("tests/")
        assert patch.diff().startswith(f"# patch {patch.name}: {patch.why}")
