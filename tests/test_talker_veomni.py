"""Talker (speech output) training through VeOmni's own VLMTrainer (unmodified), switched on in the VeOmni
config (`model.model_config.train_talker`), equals the single-process model on the same global batch.

Per layout one torchrun process group runs VLMTrainer from a VeOmni YAML on HF-chat JSONL whose assistant
turns carry target speech (inline codes; some samples have none), through veomni_omni's data transform and
VeOmni's collator (samples packed into each micro batch), recorded by `tests/dist/veomni_trainer_parity.py`.
The reference encodes the step's samples itself (`encode_sample`, right-padded rows, no VeOmni collator), loads
the step's starting weights into one process and runs the training forward on the whole global batch: each
named loss (a token mean over the global batch) and every gradient must match (1e-5 relative). The layouts:
talker only (thinker frozen) with two micro batches per rank, one of them without any spoken turn (VeOmni's
per-step token counts over micro batches, and the talker's forward on a rank-step without speech); joint
talker + thinker training under EP 2 with gradient checkpointing; FSDP2's bf16 mixed precision (CPU here;
within bf16 round-off of the fp32 reference). The thinker and code2wav must stay
untouched where they are frozen, and VeOmni's HF export must carry the trained talker. A bad speech target
read by one rank stops both with the same error.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

import veomni_omni
from veomni_omni.data.media import save_video, save_wav
from veomni_omni.data.processor import load_processor
from veomni_omni.data.samples import encode_sample
from veomni_omni.data import synthetic
from veomni_omni.integration.speech_training import count_loss_tokens, speech_training_of
from veomni_omni.launch import run_ranks
from veomni_omni.parity import PARITY_RTOL, max_relative_difference, parity_errors
from veomni_omni.testing import save_tiny_release
from veomni_omni.tiny import TINY_CODEBOOK, tiny_omni_config

from test_talker import _batch  # noqa: E402  (same directory)
from test_veomni_trainer_parity import WORKER, write_config, write_dataset  # noqa: E402

GROUPS = 4
# Per layout: ranks, EP size, gradient checkpointing, whether the thinker trains too, samples per micro batch,
# and per step each rank's samples (packed micro_batch_size at a time). "spoken_N": a text answer spoken in
# N frames; "silent": no speech; "media_N": image + audio in the user turn; "video_N": a video in the user turn;
# "history_N": an unspoken turn first; "badgroups_N": codes with one code group too few.
LAYOUTS = {
    "talker_fsdp2_accumulated": dict(world=2, ep=1, gc=False, thinker=False, micro=2, steps=[
        [["spoken_5", "silent", "silent", "silent"], ["media_7", "history_3", "spoken_2", "silent"]],
    ]),
    "joint_ep2_gc": dict(world=2, ep=2, gc=True, thinker=True, micro=1, steps=[
        [["video_5", "spoken_4"], ["media_6", "history_3"]],
    ]),
    # FSDP2 mixed precision with bf16 compute (fp32 shards and reductions), as on GPU: within bf16 round-off.
    "talker_bf16_mixed_precision": dict(world=2, ep=2, gc=False, thinker=False, micro=2, bf16=True, steps=[
        [["spoken_5", "silent", "silent", "silent"], ["media_7", "history_3", "spoken_2", "silent"]],
    ]),
}
# bf16 compute: each loss within BF16_LOSS_RTOL of the fp32 reference, each gradient within BF16_GRAD_RTOL in
# relative L2 norm (measured: 2e-5 and 2.3e-2).
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-3, 5e-2
SPEAKERS = ("ethan", "chelsie", "aiden")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny released-layout Qwen3-Omni checkpoint (thinker, talker, code2wav) with its processor."""
    path = tmp_path_factory.mktemp("tiny_omni_talker")
    config = tiny_omni_config()
    config.thinker_config.text_config.output_router_logits = False
    save_tiny_release(path, config)
    return path


class SpokenSamples:
    """HF-chat samples of each kind, with their media files under `root` and inline speech codes."""

    def __init__(self, root: Path):
        self.root, self.rng, self.count = root, np.random.default_rng(0), 0
        root.mkdir(exist_ok=True)

    def _speech(self, frames: int, groups: int = GROUPS) -> dict:
        codes = self.rng.integers(0, TINY_CODEBOOK, (groups, frames)).tolist()
        return {"codes": codes, "speaker": SPEAKERS[self.count % len(SPEAKERS)]}

    def __call__(self, kind: str) -> dict:
        self.count += 1
        name, _, frames = kind.partition("_")
        question = [{"type": "text", "text": f"question {self.count}"}]
        answer = {"role": "assistant", "content": [{"type": "text", "text": f"answer {self.count} is four"}]}
        if name != "silent":
            answer["speech"] = self._speech(int(frames), GROUPS - 1 if name == "badgroups" else GROUPS)
        if name == "media":
            image, wav = self.root / f"{self.count}.png", self.root / f"{self.count}.wav"
            Image.fromarray(synthetic.make_image(self.rng, "circle", "red", synthetic.IMAGE_SIZE)).save(image)
            save_wav(str(wav), synthetic.make_tone(self.rng, "alto", 1.0))
            question = [{"type": "image", "image": str(image)}, {"type": "audio", "audio": str(wav)}, *question]
        if name == "video":
            video = self.root / f"{self.count}.mkv"
            save_video(str(video), synthetic.make_video(self.rng, "left"), synthetic.VIDEO_FPS)
            question = [{"type": "video", "video": str(video), "fps": synthetic.VIDEO_FPS}, *question]
        messages = [{"role": "user", "content": question}, answer]
        if name == "history":
            earlier = [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]}]
            messages = earlier + messages
        return {"id": f"{kind}-{self.count}", "messages": messages}


def write_talker_config(path: Path, checkpoint: Path, data: Path, layout: dict, output_dir: Path) -> None:
    """The trainer-parity test's VeOmni YAML, with the talker switched on and `micro` samples packed per micro batch."""
    write_config(path, checkpoint, data, {**layout, "export": True}, output_dir)
    config = yaml.safe_load(path.read_text())
    config["model"]["model_config"] = {"train_talker": True, "train_thinker": layout["thinker"]}
    config["train"]["micro_batch_size"] = layout["micro"]
    if layout.get("bf16"):
        config["train"]["accelerator"]["fsdp_config"]["mixed_precision"]["param_dtype"] = "bfloat16"
    path.write_text(yaml.safe_dump(config))


def reference_step(config, processor, record: dict, samples: list, train_thinker: bool):
    """The named losses and the gradients of the single-process model on the step's whole global batch."""
    model = Qwen3OmniMoeForConditionalGeneration(config)
    model.load_state_dict(record["weights"])
    model.code2wav.requires_grad_(False)
    if not train_thinker:
        model.thinker.requires_grad_(False)
    batch = _batch([encode_sample(s, processor, config) for s in samples], "padded")
    out = model(**batch, train_thinker=train_thinker)
    sum(out.loss.values()).backward()
    return {k: v.item() for k, v in out.loss.items()}, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_veomni_trainer_trains_the_talker_as_the_single_process_model(checkpoint, tmp_path, name):
    layout = LAYOUTS[name]
    write_dataset(tmp_path / "train.jsonl", layout, SpokenSamples(tmp_path / "media"))
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]  # the one step's global batch
    config_file = tmp_path / "talker.yaml"
    write_talker_config(config_file, checkpoint, tmp_path / "train.jsonl", layout, tmp_path / "out")
    run_ranks(WORKER, layout["world"], [str(tmp_path / "run.pt"), str(config_file)], timeout_s=400)
    result = torch.load(tmp_path / "run.pt")[str(config_file)]
    config = Qwen3OmniMoeConfig.from_pretrained(checkpoint)
    processor = load_processor(checkpoint)
    assert result["layout"]["ep"] == layout["ep"] and result["layout"]["gradient_checkpointing"] == layout["gc"]

    record = result["steps"][0]
    batches = record["micro_batches"]
    assert [len(rank) for rank in batches] == [len(layout["steps"][0][0]) // layout["micro"]] * layout["world"], "micro batches not as planned"
    spoken = [[int(mb["talker_frames"].count_nonzero()) for mb in rank] for rank in batches]
    want = [[sum(not k.startswith("silent") for k in kinds[i : i + layout["micro"]]) for i in range(0, len(kinds), layout["micro"])]
            for kinds in layout["steps"][0]]
    assert spoken == want, f"spoken turns per micro batch {spoken}, planned {want}"

    ref_losses, ref_grads = reference_step(config, processor, record, rows, layout["thinker"])
    want_losses = {"talker_loss", "code_predictor_loss"} | ({"foundation_loss"} if layout["thinker"] else set())
    assert set(record["losses"]) == want_losses == set(ref_losses), (record["losses"], ref_losses)
    assert all(np.isfinite(v) for v in [*record["losses"].values(), *ref_losses.values()]), (record["losses"], ref_losses)
    loss_rtol = BF16_LOSS_RTOL if layout.get("bf16") else PARITY_RTOL
    failures = [f"{k}: {record['losses'][k]} vs reference {v}" for k, v in ref_losses.items()
                if abs(record["losses"][k] - v) > loss_rtol * abs(v)]
    assert record["grads"].keys() == ref_grads.keys(), f"trained parameters differ: {sorted(record['grads'].keys() ^ ref_grads.keys())[:6]}"
    if layout.get("bf16"):
        relative = {n: ((record["grads"][n] - g).norm() / g.norm()).item() for n, g in ref_grads.items()}
        failures += [f"{n}: relative L2 difference {r:.3e} > {BF16_GRAD_RTOL}" for n, r in relative.items() if not r <= BF16_GRAD_RTOL]
        worst = max(relative.values())
        assert worst > 1e-4, f"gradients within {worst:.1e} of fp32: the bf16 param_dtype did not take effect"
    else:
        failures += parity_errors(record["grads"], ref_grads)
        worst = max_relative_difference(record["grads"], ref_grads)
    assert not failures, "\n".join(failures[:20])
    print(f"{name}: losses {record['losses']}, largest gradient difference {worst:.2e}")

    start, end = record["weights"], result["final_weights"]
    frozen = ("code2wav.",) if layout["thinker"] else ("code2wav.", "thinker.")
    moved = [n for n in start if n.startswith(frozen) and not torch.equal(start[n], end[n])]
    assert not moved, f"frozen parameters changed: {moved[:5]}"
    assert all(not torch.equal(start[n], end[n]) for n in ref_grads if n.startswith("talker.model.layers.0.self_attn")), "the talker did not train"

    export = next((tmp_path / "out").glob("checkpoints/global_step_1/hf_ckpt"))
    with veomni_omni.unpatched():
        exported = Qwen3OmniMoeForConditionalGeneration.from_pretrained(export, dtype=torch.float32).state_dict()
    stale = [n for n in end if n.startswith("talker.") and not torch.equal(exported[n], end[n])]
    assert not stale, f"VeOmni's HF export does not carry the trained talker: {stale[:5]}"


def test_speech_without_the_talker_switch_is_refused_naming_the_switch(checkpoint):
    from transformers import AutoConfig

    from veomni_omni.data.veomni_transform import REFUSED_KEY, transform_sample
    from veomni_omni.integration.trainer_hooks import RopePositionIds

    sample = SpokenSamples(checkpoint / "speech_media")("spoken_3")
    processor, config = load_processor(checkpoint), AutoConfig.from_pretrained(checkpoint)
    (refused,) = transform_sample(sample, processor, RopePositionIds(config))
    assert "the talker does not train: set model.model_config.train_talker: true" in refused[REFUSED_KEY]
    (kept,) = transform_sample(sample, processor, RopePositionIds(config, speech=True))
    assert REFUSED_KEY not in kept and kept["talker_frames"].count_nonzero() == 1


def test_model_config_switch():
    assert speech_training_of({}) is None and speech_training_of({"train_talker": False}) is None
    assert speech_training_of({"train_talker": True}).train_thinker is False
    assert speech_training_of({"train_talker": True, "train_thinker": True}).train_thinker is True
    with pytest.raises(ValueError, match="would train nothing"):
        speech_training_of({"train_thinker": False})
    with pytest.raises(ValueError, match="must be true or false"):
        speech_training_of({"train_talker": "yes"})


def test_loss_token_counts_add_up_over_micro_batches():
    def micro(text, talker):
        return {"labels": torch.tensor(text), "talker_labels": torch.tensor(talker)}

    counts = count_loss_tokens([micro([1, -100, 2], [5, 6, 7]), micro([3], [])])
    assert {k: int(v) for k, v in counts.items()} == {"foundation_tokens": 3, "talker_tokens": 3}
    assert {k: int(v) for k, v in count_loss_tokens(micro([1], [4, 4])).items()} == {"foundation_tokens": 1, "talker_tokens": 2}


def _trainer(model, model_config: dict, config_path, lora: dict = None, ulysses: int = 1, freeze_vit: bool = False):
    """What VLMTrainer's freezing step reads of its trainer."""
    from types import SimpleNamespace as NS

    accelerator = NS(ulysses_size=ulysses, cp_size=1)
    args = NS(model=NS(model_config=model_config, lora_config=lora or {}, config_path=str(config_path)),
              train=NS(accelerator=accelerator, freeze_vit=freeze_vit, freeze_audio_tower=False))
    return NS(base=NS(args=args, model=model, model_config=model.config))


@pytest.mark.parametrize("case, message", [
    ("misspelt", r"\['train_talkr'\] name no setting of Qwen3OmniMoeConfig"),
    ("thinker_only", "the model has no talker"),
    ("lora", "LoRA on the talker is not supported"),
    ("ulysses", "set ulysses_size and cp_size to 1"),
    ("freeze_vit", "would unfreeze the ViT merger"),
])
def test_freezing_step_refuses_what_it_cannot_train(tmp_path, case, message):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from veomni_omni.integration.speech_training import freeze_model_module

    config = tiny_omni_config()
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config.thinker_config) if case == "thinker_only" else Qwen3OmniMoeForConditionalGeneration(config)
    model.config.save_pretrained(tmp_path)
    switch = {"train_talker": True, "experts_implementation": "eager"}  # a setting transformers takes: passes
    trainer = {
        "misspelt": lambda: _trainer(model, {"train_talkr": True}, tmp_path),
        "thinker_only": lambda: _trainer(model, switch, tmp_path),
        "lora": lambda: _trainer(model, switch, tmp_path, lora={"rank": 4}),
        "ulysses": lambda: _trainer(model, switch, tmp_path, ulysses=2),
        "freeze_vit": lambda: _trainer(model, switch, tmp_path, freeze_vit=True),
    }[case]()
    with pytest.raises(ValueError, match=message):
        freeze_model_module(trainer)
    assert getattr(model, "speech_training", None) is None and all(p.requires_grad for p in model.parameters())


def test_bad_speech_on_one_rank_stops_every_rank_with_the_same_error(checkpoint, tmp_path):
    """Rank 1 reads a sample whose codes have a code group too few: both ranks raise the same BadInputError
    naming it, at the step's start (before any collective that rank 0 would otherwise wait in)."""
    layout = dict(world=2, ep=1, gc=False, thinker=False, micro=1, steps=[[["spoken_3"], ["badgroups_4"]]])
    write_dataset(tmp_path / "train.jsonl", layout, SpokenSamples(tmp_path / "media"))
    config_file = tmp_path / "talker.yaml"
    write_talker_config(config_file, checkpoint, tmp_path / "train.jsonl", layout, tmp_path / "out")
    with pytest.raises(RuntimeError) as failure:
        run_ranks(WORKER, 2, [str(tmp_path / "run.pt"), str(config_file)], timeout_s=300)
    lines = str(failure.value).splitlines()
    for rank in (0, 1):
        raised = [line for line in lines if line.startswith(f"[rank{rank}]") and "BadInputError" in line]
        assert raised, f"rank {rank} did not raise BadInputError:\n{failure.value}"
    assert "sample badgroups_4-2 (-): message 1: speech codes of shape (3, 4); the talker takes (4, frames)" in str(failure.value)
    assert "(rank 1)" in str(failure.value), "the error names the rank that read the sample"
