"""Packed samples never see each other (sdpa on CPU).

VeOmni's packing collator puts a micro batch in one row with an all-ones attention mask and
flash-attn's varlen boundaries (`cu_seq_lens_q/k`); the patch set's `packed_attention` entry makes
transformers' "sdpa" attend within each sample (veomni_omni.models.packed_attention). Samples come
from veomni_omni's VeOmni data transform (image, audio, video, text, video with its soundtrack) and
are packed by VeOmni's own MainCollator / dynamic-batching dataloader; losses are normalised by
VeOmni's global token mean, as its trainer does. The router aux loss is off: it couples all tokens
of a micro batch by design (load balance over the batch), so it cannot be per-sample equal.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from veomni.data.data_collator import MainCollator
from veomni.data.data_loader import build_dataloader
from veomni.distributed.parallel_state import clear_parallel_state, init_parallel_state
from veomni.utils.loss_utils import count_loss_token, mean_global_loss, reduce_global_loss_token

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.processor import build_tiny_processor
from veomni_omni.data.veomni_transform import transform_sample
from veomni_omni.models.packed_attention import varlen_sdpa_attention
from veomni_omni.data.sequence_parallel import pack_rows
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.parity import PARITY_RTOL, max_relative_difference, parity_errors
from veomni_omni.tiny import tiny_thinker_config

# (task, synthetic sample index). audio_pitch 1 is a 0.5 s tone (50 mel frames, under one 100-frame chunk)
# packed after a 1 s one: HF's audio tower pads every chunk of a call to the longest and its stride-2
# convolutions carried that padding into the short clip's last audio token; patch audio_encoder_forward
# pads each clip as if alone (tests/test_audio_tower.py).
SAMPLES = (
    ("image_shape", 0), ("audio_pitch", 10), ("audio_pitch", 1), ("video_motion", 2), ("text_arith", 3), ("av_pitch", 4),
)
TASKS = tuple(f"{task}[{index}]" for task, index in SAMPLES)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """VeOmni's parallel state for a single process (its dataloader and loss reduction need one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}", rank=0, world_size=1)
    init_parallel_state(dp_size=1, dp_mode="fsdp2", device_type="cpu")
    yield
    clear_parallel_state()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model():
    veomni_omni.apply()
    torch.manual_seed(0)
    config = tiny_thinker_config(output_router_logits=False)  # see module doc
    return Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def samples(model):
    """One sample per task in VeOmni's layout, from veomni_omni's VeOmni data transform."""
    processor = build_tiny_processor()
    out = []
    for task, index in SAMPLES:
        encoded = transform_sample(synthetic.generate_sample(index, task), processor, model.get_position_id_func())
        assert len(encoded) == 1, f"{task} sample was skipped"
        out.append(encoded[0])
    return out


def collate(model, samples: list[dict]) -> dict:
    """VeOmni's MainCollator, as its trainer builds it (the collator edits labels in place: copies)."""
    return MainCollator(data_collate_info=model.get_extra_collate_infos())(copy.deepcopy(samples))


def train_step(model, micro_batches: list[dict]):
    """Forward and backward of one step as VeOmni's trainer runs it: each micro batch's loss
    scaled by its share of the step's loss tokens (global token mean), gradients accumulated.
    Returns each micro batch's logits and the parameters' gradients."""
    model.zero_grad(set_to_none=True)
    step_tokens = count_loss_token(micro_batches)
    global_tokens = reduce_global_loss_token(step_tokens)
    logits = []
    for micro_batch in micro_batches:
        out = model(**micro_batch)
        losses = mean_global_loss(out.loss, count_loss_token(micro_batch), step_tokens, global_tokens)
        torch.stack(list(losses.values())).sum().backward()
        logits.append(out.logits.detach())
    return logits, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def segment_losses(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> list[torch.Tensor]:
    """Each packed sample's token-mean loss, from the packed row's logits."""
    return [
        F.cross_entropy(logits[0, start : end - 1].float(), labels[0, start + 1 : end], ignore_index=-100)
        for start, end in zip(bounds[:-1], bounds[1:])
    ]


@pytest.fixture(scope="module")
def alone(model, samples, one_rank):
    """Every sample as its own micro batch of one step: per-sample losses and logits, step gradients."""
    micro_batches = [collate(model, [sample]) for sample in samples]
    logits, grads = train_step(model, micro_batches)
    losses = [segment_losses(lg, mb["labels"], mb["cu_seq_lens_q"].tolist())[0] for lg, mb in zip(logits, micro_batches)]
    return losses, logits, grads


def packed_run(model, samples):
    packed = collate(model, samples)
    (logits,), grads = train_step(model, [packed])
    bounds = packed["cu_seq_lens_q"].tolist()
    return packed, bounds, logits, segment_losses(logits, packed["labels"], bounds), grads


def test_collator_packs_one_row_with_boundaries(model, samples):
    """What the fix relies on: one row, an all-ones mask, boundaries at each sample's start."""
    packed = collate(model, samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert bool(packed["attention_mask"].all()), "VeOmni's collator now masks: revisit veomni_omni.models.packed_attention"
    starts = torch.tensor(lengths).cumsum(0)
    assert packed["cu_seq_lens_q"].tolist() == [0, *starts.tolist()]
    assert packed["position_ids"].shape == (1, 3, sum(lengths))


def test_packed_samples_equal_each_sample_alone(model, samples, alone):
    ref_losses, ref_logits, ref_grads = alone
    _, bounds, logits, losses, grads = packed_run(model, samples)
    for task, loss, ref in zip(TASKS, losses, ref_losses):
        assert abs(loss.item() - ref.item()) <= PARITY_RTOL * abs(ref.item()), f"{task}: packed {loss.item()} alone {ref.item()}"
    got = {task: logits[0, s:e] for task, s, e in zip(TASKS, bounds[:-1], bounds[1:])}
    errors = parity_errors(got, {task: ref[0] for task, ref in zip(TASKS, ref_logits)})
    errors += parity_errors(grads, ref_grads)
    assert not errors, "\n".join(errors)


def test_without_the_patch_packed_samples_mix(model, samples, alone, monkeypatch):
    """The same packed batch through HF's own attention resolution (the patch entry's original):
    samples after the first see their predecessors, and losses, logits and gradients move."""
    entry = next(p for p in veomni_omni.PATCHES if p.name == "packed_attention")
    monkeypatch.setattr(entry.owner, entry.attr, entry.original())
    ref_losses, ref_logits, ref_grads = alone
    _, bounds, logits, losses, grads = packed_run(model, samples)
    assert abs(losses[0].item() - ref_losses[0].item()) <= PARITY_RTOL * abs(ref_losses[0].item()), "the first sample sees nothing before it"
    moved = [abs(loss.item() - ref.item()) / abs(ref.item()) for loss, ref in zip(losses[1:], ref_losses[1:])]
    later = {task: logits[0, s:e] for task, s, e in zip(TASKS[1:], bounds[1:-1], bounds[2:])}
    logits_moved = max_relative_difference(later, {task: ref[0] for task, ref in zip(TASKS[1:], ref_logits[1:])})
    grads_moved = max_relative_difference(grads, ref_grads)
    print(f"without the patch: later samples' relative loss change {moved}, logits {logits_moved:.3g}, gradients {grads_moved:.3g}")
    assert min(moved) > 10 * PARITY_RTOL, f"relative loss change per later sample {moved}: no longer mixed without the patch?"
    assert logits_moved > 1e-2 and grads_moved > 1e-2, (logits_moved, grads_moved)


def test_dynamic_batching_micro_batch_is_packed_and_separate(model, samples, alone):
    """VeOmni's native dataloader with dyn_bsz forms the micro batch (same collator): one packed
    row whose samples each keep the loss they have alone."""
    lengths = [len(s["input_ids"]) for s in samples]
    loader = build_dataloader(
        "native", dataset=[[copy.deepcopy(s)] for s in samples], micro_batch_size=1, global_batch_size=1,
        dataloader_batch_size=1, max_seq_len=sum(lengths), train_steps=1, dyn_bsz=True, dyn_bsz_buffer_size=len(samples),
        num_workers=0, prefetch_factor=None, pin_memory=False, shuffle=False, collate_fn_kwargs={"data_collate_info": model.get_extra_collate_infos()},
    )
    (micro_batch,) = next(iter(loader))
    bounds = micro_batch["cu_seq_lens_q"].tolist()
    assert micro_batch["input_ids"].shape[0] == 1 and bool(micro_batch["attention_mask"].all()) and len(bounds) > 2
    order = []
    for start, end in zip(bounds[:-1], bounds[1:]):  # each segment is one whole sample
        order.append(next(i for i, s in enumerate(samples) if torch.equal(s["input_ids"], micro_batch["input_ids"][0, start:end])))
    with torch.no_grad():
        logits = model(**micro_batch).logits
    ref_losses = alone[0]
    for i, loss in zip(order, segment_losses(logits, micro_batch["labels"], bounds)):
        assert abs(loss.item() - ref_losses[i].item()) <= PARITY_RTOL * abs(ref_losses[i].item()), TASKS[i]


def test_eager_refuses_a_packed_batch(model, samples):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with pytest.raises(ValueError, match="attn_implementation='eager' ignores the packed boundaries"):
        eager(**collate(model, samples))
    with torch.no_grad():  # one sample per row has nothing to mix: eager runs, and agrees with sdpa
        single = collate(model, samples[:1])
        assert torch.allclose(eager(**single).logits, model(**single).logits, rtol=1e-5, atol=1e-6)


class _Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("with_mask", [False, True])
def test_varlen_sdpa_is_block_diagonal_causal_attention(with_mask):
    """The attention function alone: per-segment SDPA (grouped-query heads, optional 4-D mask)
    equals one SDPA under the block-diagonal causal mask; one segment is HF's sdpa unchanged."""
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, h, 20, 8, generator=gen) for h in (4, 2, 2))
    bounds = [0, 5, 12, 20]
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 7, 8]))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(20, 20, dtype=torch.bool).tril()
    mask = None
    if with_mask:  # e.g. a padded key inside the second sample, in HF's 4-D boolean layout
        mask = torch.ones(20, 20, dtype=torch.bool).tril()
        mask[:, 9] = False
        mask = mask.view(1, 1, 20, 20)
        allowed = allowed & mask[0, 0]
    ref = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=0.3, enable_gqa=True).transpose(1, 2)
    out, _ = varlen_sdpa_attention(_Attention(), query, key, value, mask, scaling=0.3, cu_seq_lens_q=torch.tensor(bounds))
    torch.testing.assert_close(out, ref)
    single, _ = varlen_sdpa_attention(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 20]))
    assert torch.equal(single, sdpa_attention_forward(_Attention(), query, key, value, None, scaling=0.3)[0])


def test_veomni_sequence_parallel_attention_does_ulysses_only_in_the_text_decoder():
    """VeOmni's `*_with_sp` attentions run Ulysses all-to-alls inside; only the thinker's text attention
    sees a slice of the sequence (the audio tower encodes each rank's own windows, the ViT gathers itself)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

    from veomni_omni.models.packed_attention import encoders_skip_ulysses

    resolved = ALL_ATTENTION_FUNCTIONS.get_interface("veomni_flash_attention_2_with_sp", None)
    assert resolved.func is encoders_skip_ulysses and resolved.args == (ALL_ATTENTION_FUNCTIONS["veomni_flash_attention_2_with_sp"],)
    calls = []

    def veomni_attention(module, *args, **kwargs):
        calls.append((type(module).__name__, kwargs))

    config = tiny_thinker_config()
    encoders_skip_ulysses(veomni_attention, hf.Qwen3OmniMoeAudioAttention(config.audio_config), None, None, None, None)
    encoders_skip_ulysses(veomni_attention, hf.Qwen3OmniMoeThinkerTextAttention(config.text_config, layer_idx=0), None, None, None, None)
    assert calls == [("Qwen3OmniMoeAudioAttention", {"skip_ulysses": True}), ("Qwen3OmniMoeThinkerTextAttention", {})]


def test_pack_rows_is_a_model_input_whose_samples_stay_apart(model, samples):
    """`pack_rows` (the tests' and benchmarks' packer) emits the boundaries under VeOmni's collator's keys,
    so its row goes to the model as it stands: each sample's logits equal the sample's own padded row.
    (Under another key the boundaries were silently ignored and the samples attended to each other.)"""
    rows = [[("prompt", 6), ("image", 1, 4, 4), ("text", 20)], [("prompt", 4), ("text", 30)], [("prompt", 3), ("audio", 120), ("text", 9)]]
    batch = build_batch(rows, model.config, seed=5, with_position_ids=True)
    packed = pack_rows(batch)
    assert {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= packed.keys()
    with torch.no_grad():
        padded_logits = model(**batch, use_cache=False).logits
        packed_logits = model(**packed, use_cache=False).logits
    bounds = packed["cu_seq_lens_q"].tolist()
    for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        got, ref = packed_logits[0, start:end], padded_logits[row, : end - start]
        assert not parity_errors({"logits": got}, {"logits": ref}), f"sample {row}: packed logits differ from its own row"
