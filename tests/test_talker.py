"""Talker training (speech output): data checks, and the training forward's logits against HF's own
`generate()` forced along the same text and codes (the reference runs with the patch set undone)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

import veomni_omni
from veomni_omni.data.samples import SampleTooLong, encode_sample
from veomni_omni.data.sequence_parallel import pack_rows
from veomni_omni.data.speech import SpeechTargetError
from veomni_omni.launch import run_ranks
from veomni_omni.data.shaped_batches import concat_batches
from veomni_omni.tiny import TINY_CODEBOOK, TINY_CODEC, TOKENS, tiny_omni_config

LOGITS_RTOL = 1e-4
GROUPS = 4


@pytest.fixture(scope="module")
def omni_config():
    return tiny_omni_config()


@pytest.fixture(scope="module")
def omni_model(omni_config):
    torch.manual_seed(0)
    return Qwen3OmniMoeForConditionalGeneration(omni_config).eval()


def _rng(seed):
    return np.random.default_rng(seed)


def _codes(seed, frames):
    return _rng(seed).integers(0, TINY_CODEBOOK, (GROUPS, frames))


def _speech(seed, frames, speaker="ethan"):
    return {"codes": _codes(seed, frames), "speaker": speaker}


def _image(seed):
    return _rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _tone(seed, seconds=1.0):
    return (0.3 * _rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


def _video(seed):
    return _rng(seed).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)


def _samples():
    """Image + audio + text in the user turn; a history turn before a spoken one (audio in the second
    user turn); a video; answers longer and shorter than their speech."""
    return [
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "image": _image(1)}, {"type": "audio", "audio": _tone(2)},
                                         {"type": "text", "text": "what do you see and hear?"}]},
            {"role": "assistant", "content": "a red circle and a low tone", "speech": _speech(3, 5, "chelsie")},
        ],
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": [{"type": "audio", "audio": _tone(4, 0.6)}, {"type": "text", "text": "pitch?"}]},
            {"role": "assistant", "content": "high", "speech": _speech(5, 7)},
        ],
        [
            {"role": "user", "content": [{"type": "video", "video": _video(6)}, {"type": "text", "text": "which way?"}]},
            {"role": "assistant", "content": "left to right", "speech": _speech(7, 3, "aiden")},
        ],
    ]


class ForceTokens(LogitsProcessor):
    """Greedy generation pinned to `tokens`, one per call (HF's raw logits are left as computed)."""

    def __init__(self, tokens):
        self.tokens = list(tokens)
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[self.step]] = 0.0
        self.step += 1
        return forced


def _generate_forced(model, encoded: dict, opening: int, frames: int, codes: torch.Tensor, speaker_name: str):
    """HF's generate(return_audio=True) on the prompt before the turn opening at `opening`, forced along
    the turn's text and codes: the talker's raw codebook-0 logits (frames + 1, V) and the code
    predictor's (frames, groups - 1, V)."""
    ids = encoded["input_ids"]
    end = opening + 3 + int((ids[opening + 3 :] == TOKENS["im_end"]).nonzero()[0])
    prompt = ids[: opening + 3][None]
    answer = ids[opening + 3 : end + 1].tolist()
    media = {key: encoded[key] for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                           "video_second_per_grid", "input_features", "feature_attention_mask") if key in encoded}
    talker_runs, predictor_logits = [], []
    talker_generate, predictor_generate = model.talker.generate, model.talker.code_predictor.generate

    def talker_spy(*args, **kwargs):
        talker_runs.append(talker_generate(*args, **kwargs))
        return talker_runs[-1]

    def predictor_spy(*args, **kwargs):
        frame = len(predictor_logits)
        kwargs.update(logits_processor=LogitsProcessorList([ForceTokens(codes[1:, frame].tolist())]), output_logits=True)
        result = predictor_generate(*args, **kwargs)
        predictor_logits.append(torch.cat(result.logits))
        return result

    model.talker.generate, model.talker.code_predictor.generate = talker_spy, predictor_spy
    # HF 5.22's talker rope index reads talker_config.audio_config, which the talker config lacks: its
    # generate fails on a prompt with audio and an image or video. Lend it the thinker's audio settings.
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    try:
        sequences, wav = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            speaker=speaker_name,
            return_audio=True,
            thinker_max_new_tokens=len(answer),
            thinker_eos_token_id=TOKENS["im_end"],
            thinker_do_sample=False,
            thinker_logits_processor=LogitsProcessorList([ForceTokens(answer)]),
            talker_max_new_tokens=frames + 1,
            talker_do_sample=False,
            talker_output_logits=True,
            talker_logits_processor=LogitsProcessorList([ForceTokens(codes[0].tolist() + [TINY_CODEC["eos"]])]),
            **media,
        )
    finally:
        del model.talker.generate, model.talker.code_predictor.generate, model.talker.config.audio_config
    assert sequences[0, prompt.shape[1] :].tolist() == answer
    assert wav.numel() > 0  # code2wav rendered the forced codes
    return torch.cat(talker_runs[0].logits), torch.stack(predictor_logits)


def _batch(encoded: list, layout: str) -> dict:
    """Right-padded rows, or one packed row, of encoded samples (speech markers included)."""
    aligned = ("input_ids", "attention_mask", "labels", "talker_frames", "talker_speakers")  # one row each
    rows = [{k: (v[None] if k in aligned else v) for k, v in e.items() if k != "position_ids" and torch.is_tensor(v)} for e in encoded]
    batch = concat_batches(rows)
    batch["position_ids"] = torch.nn.utils.rnn.pad_sequence([e["position_ids"].T for e in encoded], batch_first=True).permute(2, 0, 1)
    return pack_rows(batch) if layout == "packed" else batch


def _relative(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_training_logits_equal_hf_generate_forced_along_the_same_codes(processor, omni_config, omni_model, layout):
    encoded = [encode_sample({"messages": s}, processor, omni_config) for s in _samples()]
    batch = _batch(encoded, layout)
    batch.pop("labels")

    with torch.no_grad():
        out = omni_model(**batch)
    assert sorted(out.loss) == ["code_predictor_loss", "talker_loss"] and out.thinker_loss is None
    assert all(torch.isfinite(loss) for loss in out.loss.values())

    names = {v: k for k, v in TINY_CODEC["speakers"].items()}
    turn_index = 0
    with veomni_omni.unpatched():
        for sample in encoded:
            first = 0
            for opening in sample["talker_frames"].nonzero().flatten().tolist():
                frames = int(sample["talker_frames"][opening])
                codes = sample["talker_codes"][:, first : first + frames]
                first += frames
                speaker = names[int(sample["talker_speakers"][opening])]
                talker_ref, predictor_ref = _generate_forced(omni_model, sample, opening, frames, codes, speaker)
                talker_got, predictor_got = out.talker_logits[turn_index], out.code_predictor_logits[turn_index]
                assert talker_got.shape == talker_ref.shape == (frames + 1, TINY_CODEC["vocab"])
                assert predictor_got.shape == predictor_ref.shape == (frames, GROUPS - 1, TINY_CODEBOOK)
                assert _relative(talker_got, talker_ref) < LOGITS_RTOL, (layout, turn_index, _relative(talker_got, talker_ref))
                assert _relative(predictor_got, predictor_ref) < LOGITS_RTOL, (layout, turn_index, _relative(predictor_got, predictor_ref))
                turn_index += 1
    assert turn_index == len(out.talker_logits) == 3


# ------------------------------------------------------------------------------------ data
def _spoken(speech, role="assistant"):
    chat = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]
    chat[0 if role == "user" else 1]["speech"] = speech
    return {"messages": chat}


@pytest.mark.parametrize(
    "speech, message",
    [
        ({"codes": _codes(0, 4)[:3], "speaker": "ethan"}, r"shape \(3, 4\); the talker takes \(4, frames\)"),
        ({"codes": np.zeros((GROUPS, 0), dtype=np.int64), "speaker": "ethan"}, r"frames ≥ 1"),
        ({"codes": np.full((GROUPS, 2), TINY_CODEBOOK), "speaker": "ethan"}, rf"outside the codebook \[0, {TINY_CODEBOOK}\)"),
        ({"codes": -np.ones((GROUPS, 2), dtype=np.int64), "speaker": "ethan"}, r"outside the codebook"),
        ({"codes": np.zeros((GROUPS, 2), dtype=np.float32), "speaker": "ethan"}, r"must be integers"),
        ({"codes": _codes(0, 2), "speaker": "nobody"}, r"unknown speaker 'nobody'"),
        ({"codes": _codes(0, 2)}, r"speech takes 'codes' and 'speaker'"),
        ({"codes": _codes(0, 2), "speaker": "ethan", "rate": 12}, r"speech takes 'codes' and 'speaker'"),
        ({"codes": "codes.wav", "speaker": "ethan"}, r"expected a .npy or .pt file"),
    ],
)
def test_bad_speech_targets_are_refused(processor, omni_config, speech, message):
    with pytest.raises(SpeechTargetError, match=message):
        encode_sample(_spoken(speech), processor, omni_config)


def test_speech_only_on_assistant_turns_and_with_a_talker(processor, omni_config):
    with pytest.raises(SpeechTargetError, match=r"message 0 \(user\) carries speech"):
        encode_sample(_spoken(_speech(0, 2), role="user"), processor, omni_config)
    with pytest.raises(SpeechTargetError, match="the model config has no talker"):
        encode_sample(_spoken(_speech(0, 2)), processor, omni_config.thinker_config)


def test_codes_from_npy_and_pt_files_land_at_their_turn(processor, omni_config, tmp_path):
    codes = _codes(1, 3)
    np.save(tmp_path / "a.npy", codes)
    torch.save(torch.as_tensor(codes[:, :2]), tmp_path / "b.pt")
    chat = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first", "speech": {"codes": "a.npy", "speaker": "Chelsie"}},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "no speech here"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "third", "speech": {"codes": str(tmp_path / "b.pt"), "speaker": "aiden"}},
    ]
    out = encode_sample({"messages": chat}, processor, omni_config, media_root=str(tmp_path))
    ids = out["input_ids"]
    openings = out["talker_frames"].nonzero().flatten().tolist()
    assert [int(out["talker_frames"][p]) for p in openings] == [3, 2]
    assert [int(out["talker_speakers"][p]) for p in openings] == [TINY_CODEC["speakers"]["chelsie"], TINY_CODEC["speakers"]["aiden"]]
    assert all(ids[p] == TOKENS["im_start"] and ids[p + 1] == TOKENS["assistant"] for p in openings)
    assert len((ids == TOKENS["im_start"]).nonzero()) == 6  # the unspoken assistant turn has no marker
    assert torch.equal(out["talker_codes"], torch.cat([torch.as_tensor(codes), torch.as_tensor(codes[:, :2])], dim=1))


def test_a_sample_with_speech_is_never_truncated(processor, omni_config):
    sample = _spoken(_speech(0, 2))
    length = len(encode_sample(sample, processor, omni_config)["input_ids"])
    with pytest.raises(SampleTooLong, match="a sample with speech is never truncated"):
        encode_sample(sample, processor, omni_config, max_tokens=length - 1, overflow="truncate")


def test_veomni_layout_carries_speech_keys_on_every_sample_when_the_talker_trains(processor, omni_config):
    from veomni_omni.data.veomni_transform import SPEECH_KEYS, veomni_layout

    spoken = encode_sample(_spoken(_speech(0, 2)), processor, omni_config)
    with pytest.raises(ValueError, match="set model.model_config.train_talker: true"):
        veomni_layout(spoken)
    assert all(torch.equal(veomni_layout(spoken, omni_config)[key], spoken[key]) for key in SPEECH_KEYS)
    silent = veomni_layout(encode_sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], processor, omni_config), omni_config)
    assert silent["talker_codes"].shape == (GROUPS, 0) and silent["talker_labels"].numel() == silent["code_predictor_labels"].numel() == 0
    assert silent["talker_frames"].shape == silent["input_ids"].shape and not silent["talker_frames"].any()


# ------------------------------------------------------------------------------- training
def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def test_frozen_thinker_trains_only_the_talker_and_joint_training_adds_the_text_loss(processor, omni_config):
    torch.manual_seed(1)
    model = Qwen3OmniMoeForConditionalGeneration(omni_config)
    batch = _batch([encode_sample({"messages": s}, processor, omni_config) for s in _samples()], "packed")

    frozen = model(**batch)  # labels are ignored: the thinker is frozen by default
    sum(frozen.loss.values()).backward()
    grads = _grads(model)
    assert frozen.thinker_loss is None
    assert frozen.loss == {"talker_loss": frozen.talker_loss, "code_predictor_loss": frozen.code_predictor_loss}
    assert all(g is None for n, g in grads.items() if n.startswith("thinker."))
    trained = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    for part in ("talker.model.", "talker.codec_head", "talker.text_projection", "talker.hidden_projection",
                 "talker.code_predictor.model.", "talker.code_predictor.lm_head"):
        assert any(n.startswith(part) for n in trained), part
    assert not any(n.startswith("code2wav.") for n in trained)
    assert all(p.grad is not None for p in model.talker.parameters())

    model.zero_grad(set_to_none=True)
    joint = model(**batch, train_thinker=True)
    sum(joint.loss.values()).backward()
    assert torch.allclose(joint.talker_loss, frozen.talker_loss) and torch.allclose(joint.code_predictor_loss, frozen.code_predictor_loss)
    text_only = model.thinker(**{k: v for k, v in batch.items() if not k.startswith("talker_")}).loss
    assert torch.allclose(joint.thinker_loss, text_only)
    assert joint.loss["foundation_loss"] is joint.thinker_loss  # VeOmni's name for the text loss
    assert model.thinker.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="give labels"):
        model(**{k: v for k, v in batch.items() if k != "labels"}, train_thinker=True)


def test_a_batch_without_spoken_turns_still_runs_the_talker_with_zero_loss(processor, omni_config):
    torch.manual_seed(2)
    model = Qwen3OmniMoeForConditionalGeneration(omni_config)
    encoded = encode_sample({"messages": _samples()[0][:2] + [{"role": "assistant", "content": "silent"}]}, processor, omni_config)
    batch = _batch([encoded], "padded")
    batch.update(talker_codes=torch.zeros(GROUPS, 0, dtype=torch.long), talker_frames=torch.zeros_like(batch["input_ids"]),
                 talker_speakers=torch.zeros_like(batch["input_ids"]))
    out = model(**batch)
    sum(out.loss.values()).backward()
    assert all(loss.item() == 0.0 for loss in out.loss.values()) and out.talker_logits == []
    untouched = [name for name, grad in _grads(model).items() if name.startswith("talker.") and grad is None]
    assert not untouched  # every talker parameter takes part, as on a rank with speech
    assert all(p.grad.abs().sum() == 0 for p in model.talker.parameters())


def test_bad_speech_batches_are_refused(processor, omni_config, omni_model):
    batch = _batch([encode_sample({"messages": _samples()[2]}, processor, omni_config)], "padded")
    with pytest.raises(ValueError, match=r"talker_codes \(4, 2\) must be \(4, Σ talker_frames = 3\)"):
        omni_model(**{**batch, "talker_codes": batch["talker_codes"][:, :2]})
    assert batch["talker_labels"].tolist() == batch["talker_codes"][0].tolist() + [TINY_CODEC["eos"]]
    with pytest.raises(ValueError, match="talker_labels .* are not the targets talker_codes make"):
        omni_model(**{**batch, "talker_labels": batch["talker_labels"].flip(0)})
    with pytest.raises(ValueError, match="code_predictor_labels .* are not the targets"):
        omni_model(**{**batch, "code_predictor_labels": batch["code_predictor_labels"][1:]})
    moved = torch.roll(batch["talker_frames"], 1, dims=1)
    with pytest.raises(ValueError, match="no '<\\|im_start\\|>assistant' there"):
        omni_model(**{**batch, "talker_frames": moved, "talker_speakers": torch.roll(batch["talker_speakers"], 1, dims=1)})


# ----------------------------------------------------------------------------- checkpoints
def test_a_trained_talker_is_exported_in_the_released_layout_and_generate_speaks_with_it(processor, omni_config, tmp_path):
    from safetensors import safe_open

    from veomni_omni.checkpoint.hf import save_hf_checkpoint
    from veomni_omni.checkpoint.safetensors_io import read_checkpoint

    torch.manual_seed(3)
    model = Qwen3OmniMoeForConditionalGeneration(omni_config)
    model.save_pretrained(tmp_path / "src")
    encoded = [encode_sample({"messages": s}, processor, omni_config) for s in _samples()]
    batch = _batch(encoded, "packed")
    optimizer = torch.optim.SGD(model.talker.parameters(), lr=0.5)
    for _ in range(3):  # the thinker is frozen by default: only the talker moves
        sum(model(**batch).loss.values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    out = save_hf_checkpoint(model, tmp_path / "out", source=tmp_path / "src")

    source, saved = read_checkpoint(tmp_path / "src"), read_checkpoint(out)
    assert {k: (e.shape, e.dtype) for k, e in saved.items()} == {k: (e.shape, e.dtype) for k, e in source.items()}

    def tensor(entries, key):
        with safe_open(str(entries[key].file), "pt") as f:
            return f.get_tensor(key)

    moved = [k for k in source if k.startswith("talker.") and not torch.equal(tensor(source, k), tensor(saved, k))]
    assert any(".mlp.experts." in k for k in moved) and any(k.startswith("talker.code_predictor.") for k in moved)
    assert all(torch.equal(tensor(source, k), tensor(saved, k)) for k in source if not k.startswith("talker."))

    sample = encoded[0]
    opening = int(sample["talker_frames"].nonzero()[0])
    frames = int(sample["talker_frames"][opening])
    codes = sample["talker_codes"][:, :frames]
    with veomni_omni.unpatched():
        trained = _generate_forced(model.eval(), sample, opening, frames, codes, "chelsie")
        loaded = _generate_forced(Qwen3OmniMoeForConditionalGeneration.from_pretrained(out).eval(), sample, opening, frames, codes, "chelsie")
        before = _generate_forced(Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "src").eval(), sample, opening, frames, codes, "chelsie")
    for got, ref, old in zip(loaded, trained, before):
        assert torch.equal(got, ref)
        assert _relative(old, ref) > 1e-2  # the exported talker is the trained one, not the source's


# ------------------------------------------------------------------------------ multi-rank
TALKER_WORKER = str(Path(__file__).parent / "dist" / "talker_parity.py")


def _without_speech(batch: dict) -> dict:
    """The batch with its spoken turns made silent, as a rank without speech gets it."""
    groups = batch["talker_codes"].shape[0]
    silent = {k: v for k, v in batch.items() if not k.startswith("talker_") and k != "code_predictor_labels"}
    empty = torch.zeros(0, dtype=torch.long)
    return {**silent, "talker_codes": torch.zeros(groups, 0, dtype=torch.long), "talker_frames": torch.zeros_like(batch["input_ids"]),
            "talker_speakers": torch.zeros_like(batch["input_ids"]), "talker_labels": empty, "code_predictor_labels": empty}


@pytest.mark.parametrize("ep", [1, 2])
def test_talker_gradients_under_fsdp2_and_ep_equal_the_single_process_model(processor, omni_config, tmp_path, ep):
    """2 gloo ranks through VeOmni's parallelizer (FSDP2; EP 1 or 2 over the thinker's and the talker's
    experts), thinker frozen, each rank its own samples, against the single-process model on the global
    batch: the named losses and every talker gradient within 1e-5. Case "one_silent": rank 1 has no spoken
    turn (its talker runs on a made-up frame, so no collective hangs)."""
    from veomni_omni.parity import max_relative_difference, parity_errors
    from veomni_omni.testing import save_checkpoint

    torch.manual_seed(4)
    model = Qwen3OmniMoeForConditionalGeneration(omni_config)
    save_checkpoint(model, tmp_path / "ckpt")
    encoded = [encode_sample({"messages": s}, processor, omni_config) for s in _samples()]
    rank_samples = {"both_speak": ([encoded[0], encoded[2]], [encoded[1]]), "one_silent": ([encoded[0]], [encoded[1]])}
    batches, references = {}, {}
    for case, (first, second) in rank_samples.items():
        per_rank = [_batch(first, "packed"), _batch(second, "packed")]
        if case == "one_silent":
            per_rank[1] = _without_speech(per_rank[1])
        batches[case] = per_rank
        model.zero_grad(set_to_none=True)
        speaking = first if case == "one_silent" else first + second  # the global batch's spoken turns
        out = model(**_batch(speaking, "padded"))
        sum(out.loss.values()).backward()
        references[case] = (sum(out.loss.values()).item(), {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("talker.")})
    torch.save(batches, tmp_path / "batches.pt")

    run_ranks(TALKER_WORKER, 2, [str(tmp_path / "ckpt"), str(tmp_path / "batches.pt"), str(tmp_path / "out.pt"), str(ep)], timeout_s=300)
    results = torch.load(tmp_path / "out.pt")
    talker_experts = omni_config.talker_config.text_config.num_experts
    assert results.pop("_talker_local_experts") == [[talker_experts // ep]] * 2, "the talker's experts were not sharded by the EP plan"
    assert results["both_speak"]["turns"] == [2, 1] and results["one_silent"]["turns"] == [1, 0]
    for case, (loss, grads) in references.items():
        got = results[case]
        assert abs(got["loss"] - loss) <= 1e-5 * abs(loss), (case, got["loss"], loss)
        assert sorted(got["grads"]) == sorted(grads), case
        errors = parity_errors(got["grads"], grads)
        assert not errors, (case, max_relative_difference(got["grads"], grads), errors[:5])


def test_gradient_checkpointing_gives_the_same_gradients(processor, omni_config):
    """Thinker and talker trained jointly, with and without gradient checkpointing (non-reentrant, as
    VeOmni enables it): the hook that takes the thinker's accept_hidden_layer state must not be fooled
    by the recomputation."""
    from veomni_omni.parity import max_relative_difference, parity_errors

    torch.manual_seed(5)
    model = Qwen3OmniMoeForConditionalGeneration(omni_config).train()
    batch = _batch([encode_sample({"messages": s}, processor, omni_config) for s in _samples()], "packed")
    # attention inside the first thinker and talker layers: run again in backward when checkpointed (the
    # layer's own forward hook would not show it: torch stops a recomputation once it has what it needs)
    layers = (model.thinker.model.language_model.layers[0].self_attn, model.talker.model.layers[0].self_attn)
    runs, calls = [], []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad(set_to_none=True)
        counted = []
        hooks = [layer.register_forward_hook(lambda module, *_: counted.append(module)) for layer in layers]
        out = model(**batch, train_thinker=True)
        sum(out.loss.values()).backward()
        [hook.remove() for hook in hooks]
        calls.append([sum(m is layer for m in counted) for layer in layers])
        runs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [[1, 1], [2, 2]], calls  # checkpointing recomputed both in backward
    assert sorted(runs[0]) == sorted(runs[1]) and any(n.startswith("thinker.") for n in runs[0])
    assert not parity_errors(runs[1], runs[0]), max_relative_difference(runs[1], runs[0])
