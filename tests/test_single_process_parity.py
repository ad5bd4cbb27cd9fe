"""Single-process contract: the patched thinker equals unpatched HF (loss and every gradient)."""

import pytest
import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

import veomni_omni
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.parity import max_relative_difference, parity_errors
from veomni_omni.testing import loss_and_grads
from veomni_omni.tiny import TOKENS, tiny_thinker_config

CASES = {
    "text_only": [[("prompt", 5), ("text", 9)]],
    "image": [[("prompt", 3), ("image", 1, 4, 6), ("text", 6)]],
    "video": [[("prompt", 3), ("video", 2, 4, 4), ("text", 6)]],
    "audio": [[("prompt", 3), ("audio", 250), ("text", 6)]],  # 250 frames: two full 100-frame chunks + tail
    "audio_in_video": [[("prompt", 3), ("audio_in_video", 3, 4, 4, 230), ("text", 6)]],
    "image_and_video_in_one_sample": [[("prompt", 3), ("video", 2, 4, 4), ("text", 2), ("image", 1, 4, 4), ("text", 5)]],
    "rows_with_different_modality_mixes": [
        [("prompt", 3), ("image", 1, 4, 4), ("text", 5)],
        [("prompt", 2), ("audio", 120), ("text", 4), ("video", 2, 4, 4), ("text", 3)],
        [("text", 7)],
        [("prompt", 1), ("audio_in_video", 2, 4, 4, 150), ("image", 1, 2, 4), ("text", 4)],
    ],
    "padded_rows": [
        [("prompt", 2), ("image", 1, 4, 4), ("text", 20)],
        [("prompt", 2), ("text", 3)],
        [("audio", 60), ("text", 2)],
    ],
}


def reference(model, batch):
    """Loss and grads from transformers with the patch set really undone."""
    with veomni_omni.unpatched():
        assert hf.Qwen3OmniMoeThinkerModel.forward is veomni_omni.PATCHES[0].original()
        assert "forward" not in hf.Qwen3OmniMoeForConditionalGeneration.__dict__
        return loss_and_grads(model, batch)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_match_unpatched_hf(tiny_thinker, patched, case):
    model, ref_model = tiny_thinker
    batch = build_batch(CASES[case], seed=hash(case) % 1000)
    assert hf.Qwen3OmniMoeThinkerModel.forward is not veomni_omni.PATCHES[0].original()
    loss, grads = loss_and_grads(model, batch)
    ref_loss, ref_grads = reference(ref_model, batch)

    assert torch.isfinite(ref_loss)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    errors = parity_errors(grads, ref_grads)
    assert not errors, "\n".join(errors)
    assert sum(g is not None for g in ref_grads.values()) > 0
    print(f"{case}: max relative gradient difference {max_relative_difference(grads, ref_grads):.2e}")


def test_tiny_config_exercises_deepstack_and_routing(tiny_thinker, patched):
    config = tiny_thinker_config()
    vision, text = config.vision_config, config.text_config
    assert max(vision.deepstack_visual_indexes) < vision.depth
    assert len(vision.deepstack_visual_indexes) < text.num_hidden_layers
    assert text.num_experts_per_tok < text.num_experts
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2

    model, _ = tiny_thinker
    batch = build_batch(CASES["image"])
    _, grads = loss_and_grads(model, batch)
    last_merger = f"model.visual.merger_list.{len(vision.deepstack_visual_indexes) - 1}.mlp.2.weight"
    assert grads[last_merger].abs().max() > 0, "the last deepstack level gets no gradient"

    out = model(**batch)
    chosen = torch.stack([logits.topk(text.num_experts_per_tok, dim=-1).indices for logits in out.router_logits])
    assert len(chosen.unique()) > text.num_experts_per_tok, "routing is trivial: every token picks the same experts"


def test_forward_contract_matches_hf(tiny_thinker, patched):
    """Masks and position ids optional, tuple outputs, loss kwargs (num_items_in_batch) honoured."""
    model, ref_model = tiny_thinker
    batch = build_batch([[("prompt", 2), ("image", 1, 4, 4), ("audio", 80), ("text", 6)]])
    text_batch = {k: batch[k] for k in ("input_ids", "labels")}  # no attention_mask, no position ids
    calls = {
        "full": (batch, {}),
        "no_masks": (text_batch, {}),
        "num_items_in_batch": (batch, {"num_items_in_batch": torch.tensor(3)}),
    }
    for name, (inputs, extra) in calls.items():
        with torch.no_grad():
            got = model(**inputs, **extra)
            with veomni_omni.unpatched():
                ref = ref_model(**inputs, **extra)
        for field in ("loss", "logits", "aux_loss"):
            assert torch.allclose(getattr(got, field), getattr(ref, field), rtol=1e-5, atol=1e-6), (name, field)
        assert len(got.router_logits) == len(ref.router_logits)
        assert torch.equal(got.rope_deltas, ref.rope_deltas), name

    with torch.no_grad():
        as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], model(**batch).loss)


def test_images_and_videos_share_one_vit_pass(tiny_thinker, patched):
    model, _ = tiny_thinker
    calls = []
    handle = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        batch = build_batch(CASES["image_and_video_in_one_sample"])
        with torch.no_grad():
            model(**batch)
            assert len(calls) == 1
            with veomni_omni.unpatched():
                model(**batch)
            assert len(calls) == 3  # HF: one pass per modality
    finally:
        handle.remove()


def test_audio_placeholder_mismatch_raises(tiny_thinker, patched):
    model, _ = tiny_thinker
    batch = build_batch([[("prompt", 2), ("audio", 120), ("text", 4)]])
    first_audio = (batch["input_ids"][0] == TOKENS["audio"]).nonzero()[0, 0]
    batch["input_ids"][0, first_audio] = 7  # one placeholder short
    with pytest.raises(ValueError, match=r"audio.*15 audio placeholder tokens.*16 audio encoder outputs"):
        with torch.no_grad():
            model(**batch)


def test_precomputed_encoder_inputs_are_honoured(tiny_thinker, patched):
    """HF's `mm_encoder_outputs` and modality-prefixed precomputed ViT kwargs keep working."""
    from transformers.vision_utils import get_vision_cu_seqlens

    model, ref_model = tiny_thinker
    batch = build_batch(CASES["image_and_video_in_one_sample"])
    with torch.no_grad():
        expected = model(**batch).logits
        pixels = {k: batch.pop(k) for k in ("pixel_values", "pixel_values_videos")}
        mm_outputs = {
            "image": model.model.get_image_features(pixels["pixel_values"], batch["image_grid_thw"]),
            "video": model.model.get_video_features(pixels["pixel_values_videos"], batch["video_grid_thw"]),
        }
        got = model(**batch, mm_encoder_outputs=mm_outputs).logits
        with veomni_omni.unpatched():
            ref = ref_model(**batch, mm_encoder_outputs=mm_outputs).logits
        prefixed = model(**batch, **pixels, image_cu_seqlens=get_vision_cu_seqlens(batch["image_grid_thw"])).logits
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(prefixed, expected, rtol=1e-5, atol=1e-6)
