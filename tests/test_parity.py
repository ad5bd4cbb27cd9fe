"""The parity bar itself: what passes and what never does."""

import torch

from veomni_omni.parity import PARITY_RTOL, parity_errors


def test_within_the_bar_passes_and_beyond_it_fails():
    ref = {"w": torch.tensor([1.0, -2.0, 4.0])}
    assert parity_errors({"w": ref["w"] + 0.5 * PARITY_RTOL * 4.0}, ref) == []
    assert parity_errors({"w": ref["w"] + 2.0 * PARITY_RTOL * 4.0}, ref) != []


def test_non_finite_or_one_sided_tensors_never_pass():
    ref = {"w": torch.tensor([1.0, float("nan")]), "v": torch.ones(2)}
    got = {"w": torch.tensor([1.0, float("nan")]), "v": torch.tensor([1.0, float("inf")])}
    errors = parity_errors(got, ref)
    assert any(e.startswith("w: not finite") for e in errors) and any(e.startswith("v: not finite") for e in errors)
    assert parity_errors({"w": torch.ones(2)}, {"w": torch.ones(2), "u": torch.ones(1)}) == ["u: present on one side only"]
