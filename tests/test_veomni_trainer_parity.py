"""VeOmni's own trainer (veomni.trainer.vlm_trainer.VLMTrainer, unmodified) trains Qwen3-Omni exactly.

Per layout (FSDP 2, EP 2, FSDP 2 x EP 2) one torchrun process group runs VeOmni's VLMTrainer from a
VeOmni YAML written here, on VeOmni-format JSONL data (its `conversations` and HF's `messages`
formats, real image / audio / video files) through veomni_omni's data transform and VeOmni's
collator, for one or two steps. Ranks hold different modalities (one text only while another has
image and audio, audio-in-video, ...). `tests/dist/veomni_trainer_parity.py` records every step's
starting weights, micro batches, gradients at `optimizer.step`, loss and grad norm; here each step is
recomputed by the unpatched single-process HF thinker on the same weights and the whole global batch
(every micro batch unpacked back into HF's layout), and the loss, every gradient and the grad norm
must match (DESIGN.md section 7: max|got - ref| <= 1e-5 max|ref| per tensor, see `parity_errors`).

VeOmni's loss is the global token mean over all ranks' micro batches (`mean_global_loss`), which is
HF's mean over the global batch. The router's auxiliary loss is off, as in tests/test_fsdp.py: it is
computed per micro batch and is not the global batch's. One sample per micro batch: VeOmni's
collator would otherwise pack samples into one row. Weights come from the trainer itself (gathered
at each step's start), so the check does not depend on how the checkpoint was loaded.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.media import save_wav
from veomni_omni.data.processor import build_tiny_processor
from veomni_omni.host import eager_ops_config
from veomni_omni.testing import (
    PARITY_RTOL,
    concat_batches,
    loss_and_grads,
    max_relative_difference,
    parity_errors,
    run_ranks,
    tiny_omni_config,
    unpack_veomni_micro_batch,
)

WORKER = str(Path(__file__).parent / "dist" / "veomni_trainer_parity.py")
SEED = 7  # train.seed: VeOmni's sampler shuffles with it

# Per layout: ranks, EP size, gradient checkpointing, and per step the samples of each rank's micro
# batches (one sample each) by kind.
LAYOUTS = {
    "fsdp2": dict(world=2, ep=1, gc=False, steps=[
        [["text", "text"], ["image+audio", "video"]],
        [["image", "audio"], ["audio_in_video", "text"]],
    ]),
    "ep2": dict(world=2, ep=2, gc=True, steps=[
        [["text"], ["image+audio"]],
        [["video"], ["audio"]],
    ]),
    "fsdp2_ep2": dict(world=4, ep=2, gc=True, steps=[
        [["text"], ["image+audio"], ["audio_in_video"], ["image"]],
    ]),
}
# The modalities the model must see in a sample of each kind.
MODALITIES = {
    "text": set(), "image": {"image"}, "audio": {"audio"}, "video": {"video"},
    "image+audio": {"image", "audio"}, "audio_in_video": {"video", "audio"},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny released-layout Qwen3-Omni checkpoint (thinker, talker, code2wav) with its processor."""
    path = tmp_path_factory.mktemp("tiny_omni")
    config = tiny_omni_config()
    config.thinker_config.text_config.output_router_logits = False
    torch.manual_seed(0)
    with veomni_omni.unpatched():
        Qwen3OmniMoeForConditionalGeneration(config).save_pretrained(path)
    build_tiny_processor(path)
    return path


class SampleMaker:
    """VeOmni-format samples of each kind, each with its own text and media files under `root`."""

    def __init__(self, root: Path):
        self.root, self.rng, self.count = root, np.random.default_rng(0), 0
        root.mkdir(exist_ok=True)

    def _file(self, suffix):
        self.count += 1
        return str(self.root / f"{self.count}{suffix}")

    def image(self):
        path = self._file(".png")
        Image.fromarray(synthetic.make_image(self.rng, "circle", "red")).save(path)
        return path

    def wav(self, seconds=1.0):
        path = self._file(".wav")
        save_wav(path, synthetic.make_tone(self.rng, "alto", seconds))
        return path

    def frames(self, count=4):
        return [self.image() for _ in range(count)]

    def __call__(self, kind: str) -> dict:
        question = f"question {self.count}"
        if kind == "text":  # HF chat messages
            return {"messages": [
                {"role": "user", "content": [{"type": "text", "text": f"two plus two, {question}"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "four"}]},
            ]}
        sample = {"images": [], "audios": [], "videos": []}
        markers = []
        if "image" in kind:
            sample["images"].append(self.image())
            markers.append("<image>")
        if kind in ("audio", "image+audio"):
            sample["audios"].append(self.wav())
            markers.append("<audio>")
        if kind == "video":
            sample["videos"].append({"frames": self.frames(), "video_fps": 2.0})
            markers.append("<video>")
        if kind == "audio_in_video":
            sample["videos"].append({"frames": self.frames(), "video_fps": 2.0, "audio": self.wav(2.0)})
            markers.append("<video>")
        sample["conversations"] = [
            {"from": "human", "value": "".join(markers) + f"\nWhat is it? {question}"},
            {"from": "gpt", "value": "a red circle"},
        ]
        return {k: v for k, v in sample.items() if v}


def write_dataset(path: Path, layout: dict, make: SampleMaker) -> None:
    """JSONL whose rows VeOmni's sampler (shuffled with SEED, rank r taking every world-th index) hands
    to the ranks and micro batches as the layout plans."""
    world, steps = layout["world"], layout["steps"]
    per_rank = len(steps[0][0])
    rows = [None] * (world * per_rank * len(steps))
    for rank in range(world):
        order = list(StatefulDistributedSampler(range(len(rows)), num_replicas=world, rank=rank, shuffle=True, seed=SEED))
        for step, plan in enumerate(steps):
            for micro, kind in enumerate(plan[rank]):
                rows[order[step * per_rank + micro]] = make(kind)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_config(path: Path, checkpoint: Path, data: Path, layout: dict, output_dir: Path) -> None:
    """A VeOmni YAML: fp32 everywhere (mixed precision with fp32 params), no clipping in effect, no
    checkpoint or HF export, every op on its eager path (CPU)."""
    per_rank = len(layout["steps"][0][0])
    ops = {k: v for k, v in vars(eager_ops_config()).items() if v is not None}
    config = {
        "model": {"model_path": str(checkpoint), "ops_implementation": ops},
        "data": {"train_path": str(data), "datasets_type": "mapping", "max_seq_len": 512, "dataloader": {"num_workers": 0}},
        "train": {
            "seed": SEED,
            "accelerator": {
                "ulysses_size": 1, "ep_size": layout["ep"],
                "fsdp_config": {"fsdp_mode": "fsdp2", "mixed_precision": {"enable": True, "param_dtype": "float32", "reduce_dtype": "float32"}},
            },
            "gradient_checkpointing": {"enable": layout["gc"]},
            "optimizer": {"lr": 1.0e-3, "max_grad_norm": 1.0e9},
            "vit_lr": 1.0e-3,
            "micro_batch_size": 1,
            "dyn_bsz": False,  # one sample per micro batch (VeOmni's default packs up to max_seq_len tokens)
            "global_batch_size": layout["world"] * per_rank,
            "max_steps": len(layout["steps"]),
            "num_train_epochs": 1,
            "init_device": "meta",
            "checkpoint": {"output_dir": str(output_dir), "save_steps": 0, "save_epochs": 0, "save_hf_weights": False},
        },
    }
    path.write_text(yaml.safe_dump(config))


def modalities(sample: dict) -> set:
    present = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}
    return {kind for kind, key in present.items() if key in sample}


def reference_step(thinker_config, record: dict) -> tuple:
    """Unpatched HF thinker, one process, the step's starting weights, the whole global batch."""
    samples = [s for rank in record["micro_batches"] for mb in rank for s in unpack_veomni_micro_batch(mb, thinker_config)]
    with veomni_omni.unpatched():
        model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config)
        weights = {name.removeprefix("thinker."): w for name, w in record["weights"].items()}
        model.load_state_dict(weights, strict=True)
        loss, grads = loss_and_grads(model, concat_batches(samples))
    return loss, {f"thinker.{name}": g for name, g in grads.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_veomni_trainer_matches_single_process_hf(checkpoint, tmp_path, name):
    layout = LAYOUTS[name]
    write_dataset(tmp_path / "train.jsonl", layout, SampleMaker(tmp_path / "media"))
    write_config(tmp_path / "config.yaml", checkpoint, tmp_path / "train.jsonl", layout, tmp_path / "out")
    run_ranks(WORKER, layout["world"], [str(tmp_path / "out.pt"), str(tmp_path / "config.yaml")], timeout_s=300)
    result = torch.load(tmp_path / "out.pt")

    experts = tiny_omni_config().thinker_config.text_config.num_experts
    assert result["layout"] == {
        "world": layout["world"], "ep": layout["ep"], "gradient_checkpointing": layout["gc"],
        "local_experts": [[experts // layout["ep"]]] * layout["world"],
    }, "VeOmni did not lay the model out as configured"
    assert len(result["steps"]) == len(layout["steps"]), "VeOmni's trainer did not run the planned steps"
    thinker_config = Qwen3OmniMoeConfig.from_pretrained(checkpoint).thinker_config
    failures, worst = [], 0.0
    for step, (plan, record) in enumerate(zip(layout["steps"], result["steps"]), start=1):
        for rank, (kinds, batches) in enumerate(zip(plan, record["micro_batches"])):
            got = [[modalities(s) for s in unpack_veomni_micro_batch(mb, thinker_config)] for mb in batches]
            assert got == [[MODALITIES[k]] for k in kinds], f"step {step} rank {rank}: micro batches hold {got}, planned {kinds}"
        for rank, calls in enumerate(record["encoder_calls"]):
            assert calls == {"visual": len(plan[rank]), "audio_tower": len(plan[rank])}, (
                f"step {step} rank {rank}: encoder forwards {calls}; every rank must run each encoder once per micro batch"
            )

        ref_loss, ref_grads = reference_step(thinker_config, record)
        got_grads = record["grads"]
        # A modality absent from the whole global batch has no reference gradient: ours must be exactly zero.
        ref_grads = {n: (g if g is not None else torch.zeros_like(got_grads[n])) for n, g in ref_grads.items() if g is not None or n in got_grads}
        if abs(record["loss"] - ref_loss.item()) > PARITY_RTOL * abs(ref_loss.item()):
            failures.append(f"step {step}: loss {record['loss']} vs reference {ref_loss.item()}")
        ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
        if abs(record["grad_norm"] - ref_norm) > PARITY_RTOL * ref_norm:
            failures.append(f"step {step}: grad norm {record['grad_norm']} vs reference {ref_norm}")
        failures += [f"step {step}: {e}" for e in parity_errors(got_grads, ref_grads)]
        worst = max(worst, max_relative_difference(got_grads, ref_grads))
    print(f"VeOmni trainer, {name}: {len(result['steps'])} step(s), largest relative gradient difference {worst:.2e}")
    assert not failures, "\n".join(failures[:20])
