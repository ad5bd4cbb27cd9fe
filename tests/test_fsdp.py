"""FSDP2 without hangs: ranks holding different modalities (or none) all run every encoder.

One torchrun process group per world size runs every case; gradients gathered from the shards must
equal the single-process, unpatched HF reference on the whole global batch (docs/design.md §7).
The router's auxiliary loss is off here: it is computed per rank (as in any data-parallel MoE
trainer) and, being non-linear in the token fractions, is not the global batch's aux loss.
"""

import itertools
import json
from pathlib import Path

import pytest
import torch

import veomni_omni
from veomni_omni.data.shaped_batches import build_batch, concat_batches
from veomni_omni.launch import run_ranks
from veomni_omni.parity import max_relative_difference, parity_errors
from veomni_omni.testing import loss_and_grads

WORKER = str(Path(__file__).parent / "dist" / "fsdp_parity.py")

ROWS = {
    "text": [("prompt", 3), ("text", 8)],
    "image": [("prompt", 3), ("image", 1, 4, 4), ("text", 6)],
    "video": [("prompt", 2), ("video", 2, 4, 4), ("text", 6)],
    "audio": [("prompt", 2), ("audio", 150), ("text", 6)],
    "all": [("prompt", 2), ("image", 1, 4, 4), ("audio", 80), ("video", 2, 4, 4), ("text", 5)],
    "audio_in_video": [("prompt", 2), ("audio_in_video", 2, 4, 4, 120), ("text", 5)],
}


def case(*kinds):
    return {"rows": [[ROWS[k]] for k in kinds], "seeds": [17 * i + len(k) for i, k in enumerate(kinds)]}


WORLD2 = {"|".join(pair): case(*pair) for pair in itertools.combinations(ROWS, 2)}
WORLD4 = {
    "|".join(kinds): case(*kinds)
    for kinds in [
        ("text", "image", "video", "audio"),
        ("all", "text", "audio_in_video", "text"),
        ("image", "image", "text", "audio"),
        ("audio_in_video", "video", "all", "text"),
    ]
}
LAYOUTS = {
    2: {"cases": list(WORLD2), "checkpointing_cases": ["text|image", "audio|all", "video|audio_in_video"],
        "frozen_cases": ["text|image", "audio|audio_in_video"], "mixed_precision_cases": ["text|all", "video|audio"],
        "all_cases": WORLD2},
    4: {"cases": list(WORLD4), "checkpointing_cases": [list(WORLD4)[1]], "frozen_cases": [list(WORLD4)[0]],
        "mixed_precision_cases": [], "all_cases": WORLD4},
}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint("tiny_thinker", output_router_logits=False)


def reference(model, spec):
    """Unpatched HF, one process, the whole global batch."""
    batch = concat_batches([build_batch(rows, seed=seed, with_position_ids=True) for rows, seed in zip(spec["rows"], spec["seeds"])])
    with veomni_omni.unpatched():
        return loss_and_grads(model, batch)


@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp_ranks_with_different_modalities_match_single_process(checkpoint, tmp_path, world_size):
    path, model = checkpoint
    layout = LAYOUTS[world_size]
    (tmp_path / "cases.json").write_text(json.dumps(layout))
    run_ranks(WORKER, world_size, [str(path), str(tmp_path / "cases.json"), str(tmp_path / "out.pt")], timeout_s=480)
    results = torch.load(tmp_path / "out.pt")

    expected = [f"fsdp/{c}" for c in layout["cases"]] + [f"gradient_checkpointing/{c}" for c in layout["checkpointing_cases"]]
    expected += [f"frozen_encoders/{c}" for c in layout["frozen_cases"]]
    expected += [f"mixed_precision/{c}" for c in layout["mixed_precision_cases"]]
    assert sorted(results) == sorted(expected)
    for key, got in results.items():
        assert got["vit_calls"] == [1] * world_size, f"{key}: ViT forwards per rank {got['vit_calls']} (want one each)"

    worst, failures = 0.0, []
    for key, got in results.items():
        variant, name = key.split("/")
        if variant == "mixed_precision":
            ref_loss, _ = reference(model, layout["all_cases"][name])
            assert abs(got["loss"] - ref_loss.item()) < 0.05 * ref_loss.item(), f"{key}: bf16 loss {got['loss']} vs fp32 {ref_loss.item()}"
            continue
        ref_loss, ref_grads = reference(model, layout["all_cases"][name])
        if variant == "frozen_encoders":
            frozen = [n for n in got["grads"] if n.startswith(("model.visual.", "model.audio_tower."))]
            assert not frozen, f"{key}: frozen encoder parameters got gradients: {frozen[:3]}"
            ref_grads = {n: g for n, g in ref_grads.items() if not n.startswith(("model.visual.", "model.audio_tower."))}
        # A modality absent from the whole global batch has no reference gradient: ours must be exactly zero.
        ref_grads = {n: (g if g is not None else torch.zeros_like(got["grads"][n])) for n, g in ref_grads.items() if g is not None or n in got["grads"]}
        if abs(got["loss"] - ref_loss.item()) > 1e-5 * abs(ref_loss.item()):
            failures.append(f"{key}: loss {got['loss']} vs reference {ref_loss.item()}")
        failures += [f"{key}: {e}" for e in parity_errors(got["grads"], ref_grads)]
        worst = max(worst, max_relative_difference(got["grads"], ref_grads))
    print(f"FSDP world {world_size}: {len(results)} cases, largest relative gradient difference {worst:.2e}")
    assert not failures, "\n".join(failures[:20])

    for name in layout["checkpointing_cases"]:
        on, off = results[f"gradient_checkpointing/{name}"]["grads"], results[f"fsdp/{name}"]["grads"]
        assert not parity_errors(on, off), f"gradient checkpointing changes gradients for {name}"
