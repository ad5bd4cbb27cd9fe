"""The audio tower encodes each clip of a call as that clip alone (patch audio_encoder_forward).

HF's tower cuts clips into chunks of 2·n_window = 100 mel frames and pads every chunk of a call to the
longest one; its stride-2 convolutions (bias, GELU) turn that padding into nonzero frames that reach a
shorter chunk's last output frame. Alone, HF pads a clip only to its own longest chunk (100 frames, or
its length when shorter), so a clip under 100 frames encoded differently next to a longer one (VeOmni's
packing collator puts a micro batch's clips into one call). Reference: unpatched HF, one clip per call.
Conv biases at std 0.2 lift the padding's trace well above round-off. In fp64: in fp32 a conv weight's
gradient, summed over every chunk in another order, differs by round-off near the 1e-5 bar (1.25e-5
with one OpenMP thread), which would hide what is tested here.
"""

import pytest
import torch
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import chunk_and_pad_features, get_audio_cu_seqlens

import veomni_omni
from veomni_omni.data.sequence_parallel import pack_rows, shard_for_sequence_parallel
from veomni_omni.models.audio_tower import REFERENCE_WIDTHS_KWARG
from veomni_omni.models.encoders import encode_audio
from veomni_omni.data.shaped_batches import audio_token_count, build_batch
from veomni_omni.parity import max_relative_difference, parity_errors
from veomni_omni.tiny import MEL_BINS, tiny_thinker_config

# mel frames: under one chunk, exactly one, short last chunks (odd and even lengths), a 99-frame last chunk
LENGTHS = (37, 100, 150, 250, 399)
OUTPUT_RTOL = 1e-12  # fp64 round-off (the patched tower matches HF alone to ~1e-15)
CONV_BIAS_STD = 0.2


@pytest.fixture(scope="module")
def thinker():
    veomni_omni.apply()
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(tiny_thinker_config(), attn_implementation="sdpa").double()
    tower = model.model.audio_tower
    with torch.no_grad():
        for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
            conv.bias.normal_(0.0, CONV_BIAS_STD)
    return model.model


@pytest.fixture(scope="module")
def clips():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(MEL_BINS, n, generator=gen, dtype=torch.float64) for n in LENGTHS]


@pytest.fixture(scope="module")
def weights(thinker):
    """A fixed random projection per clip output: every output element gets its own gradient."""
    gen = torch.Generator().manual_seed(2)
    width = thinker.audio_tower.config.output_dim
    return [torch.randn(audio_token_count(n), width, generator=gen, dtype=torch.float64) for n in LENGTHS]


def tower_grads(tower) -> dict:
    return {name: p.grad.clone() for name, p in tower.named_parameters()}


def backward(outputs: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    sum((out * w).sum() for out, w in zip(outputs, weights)).backward()


def encode_alone_unpatched(tower, clips: list[torch.Tensor]) -> list[torch.Tensor]:
    with veomni_omni.unpatched():
        return [tower(clip, feature_lens=torch.tensor([clip.shape[-1]])).last_hidden_state for clip in clips]


@pytest.fixture(scope="module")
def alone(thinker, clips, weights):
    """Reference: each clip through the unpatched HF tower in its own call; gradients summed over clips."""
    tower = thinker.audio_tower
    tower.zero_grad(set_to_none=True)
    outputs = encode_alone_unpatched(tower, clips)
    backward(outputs, weights)
    return [out.detach() for out in outputs], tower_grads(tower)


def encode_together(thinker, clips: list[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """All clips in one tower call, in VeOmni's flat layout or HF's padded one; outputs split per clip."""
    lengths = torch.tensor([clip.shape[-1] for clip in clips])
    if layout == "flat":  # VeOmni's packing collator: (frames of all clips, mel) + audio_feature_lengths
        out = encode_audio(thinker, torch.cat(clips, dim=-1).T, None, lengths, {})
    else:  # HF's processor: (clips, mel, frames) + feature_attention_mask
        frames = int(lengths.max())
        features = torch.stack([torch.nn.functional.pad(c, (0, frames - c.shape[-1])) for c in clips])
        mask = (torch.arange(frames) < lengths[:, None]).long()
        out = encode_audio(thinker, features, mask, None, {})
    return list(out.split([audio_token_count(int(n)) for n in lengths]))


def together_run(thinker, clips, weights, layout: str):
    tower = thinker.audio_tower
    tower.zero_grad(set_to_none=True)
    outputs = encode_together(thinker, clips, layout)
    backward(outputs, weights)
    return [out.detach() for out in outputs], tower_grads(tower)


def relative_output_differences(outputs, refs) -> dict:
    """Per clip (by mel frames): max|got − ref| / max|ref|."""
    return {n: ((got - ref).abs().max() / ref.abs().max()).item() for n, got, ref in zip(LENGTHS, outputs, refs)}


def shown(moved: dict) -> str:
    return ", ".join(f"{n}: {m:.2g}" for n, m in moved.items())


@pytest.mark.parametrize("layout", ["flat", "padded"])
def test_clips_encoded_together_equal_each_clip_alone(thinker, clips, weights, alone, layout):
    ref_outputs, ref_grads = alone
    outputs, grads = together_run(thinker, clips, weights, layout)
    moved = relative_output_differences(outputs, ref_outputs)
    print(f"{layout}: relative output difference per clip ({shown(moved)}), gradients {max_relative_difference(grads, ref_grads):.3g}")
    assert all(m <= OUTPUT_RTOL for m in moved.values()), f"clip (mel frames): relative difference {moved}"
    errors = parity_errors(grads, ref_grads)
    assert not errors, "\n".join(errors)


def test_without_the_patch_a_short_clip_sees_the_others(thinker, clips, weights, alone, monkeypatch):
    """HF's own forward on the same call: the clip shorter than one chunk moves (its last audio token, which
    the padding reaches through the convolutions; the others ~85× less, through attention), the clips with a
    full chunk do not, and the conv gradients move past the parity bar."""
    entry = next(p for p in veomni_omni.PATCHES if p.name == "audio_encoder_forward")
    monkeypatch.setattr(entry.owner, entry.attr, entry.original())
    ref_outputs, ref_grads = alone
    outputs, grads = together_run(thinker, clips, weights, "flat")
    moved = relative_output_differences(outputs, ref_outputs)
    print(f"without the patch: relative output difference per clip ({shown(moved)}), gradients {max_relative_difference(grads, ref_grads):.3g}")
    assert moved[37] > 30 * OUTPUT_RTOL, moved
    assert all(m <= OUTPUT_RTOL for n, m in moved.items() if n != 37), moved
    per_token = (outputs[0] - ref_outputs[0]).abs().amax(-1)
    assert per_token[-1] > 30 * per_token[:-1].max(), f"the padding reaches the last token, the others only through attention: {per_token}"
    errors = parity_errors(grads, ref_grads)
    assert any(e.startswith("conv2d") for e in errors), errors


def test_sequence_parallel_windows_equal_each_clip_alone(thinker):
    """Under SP each rank encodes the attention windows (800 frames) its slice needs, with the chunking
    precomputed by the collator. An 850-frame clip ends in a 50-frame window; the rank holding only that
    window and a 37-frame clip must still pad the window's chunk to 100 frames as HF does for the whole clip."""
    rows = [[("prompt", 2), ("audio", 850), ("text", 60)], [("prompt", 1), ("audio", 37), ("text", 35)]]
    packed = pack_rows(build_batch(rows, seed=3, with_position_ids=True))
    parts = [shard_for_sequence_parallel(packed, tiny_thinker_config(), 2, rank)["sp_inputs"].audio for rank in range(2)]
    tail_rank = parts[1]
    assert tail_rank.padded_feature.shape[-1] < 100 and tail_rank.feature_lens.tolist() == [50, 37], "case not exercised"
    clips = [packed["input_features"][i, :, : int(n)] for i, n in enumerate(packed["feature_attention_mask"].sum(-1))]
    tower = thinker.audio_tower
    with torch.no_grad():
        ref = torch.cat(encode_alone_unpatched(tower, clips))

        def encode_slices(drop_widths: bool = False) -> torch.Tensor:
            slices = []
            for part in parts:
                kwargs = {k: v for k, v in part.tower_kwargs().items() if not (drop_widths and k == REFERENCE_WIDTHS_KWARG)}
                slices.append(tower(None, **kwargs).last_hidden_state[part.rows])
            return torch.cat(slices)

        got = encode_slices()
        without_clip_widths = encode_slices(drop_widths=True)
    moved, moved_without = (((out - ref).abs().max() / ref.abs().max()).item() for out in (got, without_clip_widths))
    print(f"SP=2 windows: relative output difference {moved:.3g}; without the collator's clip widths {moved_without:.3g}")
    assert moved <= OUTPUT_RTOL, moved
    # the collator's widths matter: from the window lengths alone the 50-frame window is a 50-frame clip
    assert moved_without > 30 * OUTPUT_RTOL, moved_without


def test_precomputed_chunking_without_lengths_or_widths_is_refused(thinker, clips):
    """Without feature_lens the tower cannot tell which chunks are short clips: it says what to pass."""
    lengths = torch.tensor(LENGTHS)
    padded, chunk_lengths = chunk_and_pad_features(torch.cat(clips, dim=-1), lengths, thinker.audio_tower.n_window)
    cu_seqlens = get_audio_cu_seqlens(chunk_lengths, lengths, thinker.audio_tower.n_window_infer, thinker.audio_tower.n_window)
    with pytest.raises(ValueError, match=REFERENCE_WIDTHS_KWARG):
        thinker.audio_tower(None, padded_feature=padded, chunk_lengths=chunk_lengths, cu_seqlens=cu_seqlens)
