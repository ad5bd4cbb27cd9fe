"""VeOmni's own trainer (veomni.trainer.vlm_trainer.VLMTrainer, unmodified) trains Qwen3-Omni exactly.

Per layout (FSDP 2, EP 2, FSDP 2 x EP 2) one torchrun process group runs VeOmni's VLMTrainer from a
VeOmni YAML written here, on VeOmni-format JSONL data (its `conversations` and HF's `messages`
formats, real image / audio / video files) through veomni_omni's data transform and VeOmni's
collator, for one or two steps. Ranks hold different modalities (one text only while another has
image and audio, audio-in-video, ...). `tests/dist/veomni_trainer_parity.py` records every step's
starting weights, micro batches, gradients at `optimizer.step`, loss and grad norm; here each step is
recomputed by the unpatched single-process HF thinker on the same weights and the whole global batch
(every micro batch unpacked back into HF's layout), and the loss, every gradient and the grad norm
must match (docs/design.md §7: max|got - ref| <= 1e-5 max|ref| per tensor, see `parity_errors`).

VeOmni's loss is the global token mean over all ranks' micro batches (`mean_global_loss`), which is
HF's mean over the global batch. The router's auxiliary loss is off, as in tests/test_fsdp.py: it is
computed per micro batch and is not the global batch's. The planned runs put one sample in each
micro batch, so each rank's modalities are known; the FSDP layout also runs VeOmni's default
dynamic batching in the same process group (samples packed into one row per micro batch, kept
apart by the patch set's `packed_attention`). The reference takes the trainer's own weights
(gathered at each step's start); at the first step they must be the checkpoint's, loaded by VeOmni.
Audio clips are whole seconds: HF's audio tower pads every chunk of a call to the longest one, so a
clip with a short last chunk would encode differently in the reference's single call (see
tests/test_packing.py).
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from PIL import Image
from safetensors import safe_open
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration, Qwen3OmniMoeThinkerForConditionalGeneration

import veomni_omni
from veomni_omni.data import synthetic
from veomni_omni.data.media import save_wav
from veomni_omni.data.processor import build_tiny_processor
from veomni.lora import VeOmniLoraConfig, VeOmniLoraModel
from veomni_omni.checkpoint.lora import is_adapter_param
from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.data.shaped_batches import concat_batches
from veomni_omni.launch import run_ranks
from veomni_omni.parity import PARITY_RTOL, max_relative_difference, parity_errors
from veomni_omni.testing import loss_and_grads, unpack_veomni_micro_batch
from veomni_omni.tiny import tiny_omni_config

WORKER = str(Path(__file__).parent / "dist" / "veomni_trainer_parity.py")
SEED = 7  # train.seed: VeOmni's sampler shuffles with it

# Packed micro batches for SP. "text_N": a text sample with N more prompt tokens, which moves the slice
# boundaries (at multiples of ceil(length / sp)) onto the media of the next sample: with the tiny processor
# an image+audio sample is 180 tokens, its 128-pixel image's 16 placeholders at 122-137, its 1 s clip's 13
# at 140-152; a text sample is 25 tokens.
IMAGE_STRADDLES = ["text", "image+audio", "text_80"]  # 310 tokens: SP 2 and SP 4 cut the image at 155 / 156
AUDIO_STRADDLES = ["image+audio", "text_63", "text"]  # 293 tokens: SP 2 and SP 4 cut the clip at 147 / 148
TEXT_ONLY_SLICE = ["text_150", "video", "audio"]  # 518 tokens: the first half is text only

# Per layout: ranks, EP size, Ulysses SP size, gradient checkpointing, whether a packed run follows, and
# per step the samples of each data-parallel rank's micro batches by kind: one sample per micro batch, or
# (`pack`) all of a rank's samples packed into its one micro batch of the step. Under SP the packed
# sequences are planned so that an image and an audio clip straddle a slice boundary and some rank's
# slice holds no media token (checked below, `sp_coverage`).
LAYOUTS = {
    "fsdp2": dict(world=2, ep=1, gc=False, packed=True, steps=[
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
    "sp2": dict(world=2, ep=1, sp=2, gc=False, pack=True, steps=[[IMAGE_STRADDLES], [AUDIO_STRADDLES], [TEXT_ONLY_SLICE]]),
    "sp4": dict(world=4, ep=1, sp=4, gc=False, pack=True, steps=[[IMAGE_STRADDLES], [AUDIO_STRADDLES]]),
    "sp2_fsdp2": dict(world=4, ep=1, sp=2, gc=True, pack=True, steps=[
        [IMAGE_STRADDLES, TEXT_ONLY_SLICE],
        [AUDIO_STRADDLES, ["audio_in_video", "text", "image"]],
    ]),
    "sp2_ep2": dict(world=2, ep=2, sp=2, gc=False, pack=True, steps=[[IMAGE_STRADDLES], [AUDIO_STRADDLES], [TEXT_ONLY_SLICE]]),
    # LoRA (`model.lora_config`, VeOmni's native stack): two steps, so that the second sees non-zero B (the first
    # trains B only: A's gradient is B^T-weighted). `export`: the run ends with the merged HF export and the PEFT adapters.
    "lora_fsdp2": dict(world=2, ep=1, gc=False, lora=True, steps=[
        [["text", "image+audio"], ["video", "audio"]],
        [["image", "audio_in_video"], ["text", "image+audio"]],
    ]),
    "lora_ep2": dict(world=2, ep=2, gc=True, lora=True, export=True, steps=[
        [["text"], ["image+audio"]],
        [["video"], ["audio"]],
    ]),
    "lora_fsdp2_ep2": dict(world=4, ep=2, gc=True, lora=True, export=True, steps=[
        [["text"], ["image+audio"], ["audio_in_video"], ["image"]],
        [["audio"], ["video"], ["text"], ["image+audio"]],
    ]),
    # VeOmni's shared expert LoRA (one pair per layer for all its experts; share_expert_lora) under EP, and LoRA under SP.
    "lora_shared_ep2": dict(world=2, ep=2, gc=False, lora="shared", steps=[
        [["text"], ["image+audio"]],
        [["video"], ["audio"]],
    ]),
    "lora_sp2_ep2": dict(world=2, ep=2, sp=2, gc=True, pack=True, lora=True, steps=[[IMAGE_STRADDLES], [AUDIO_STRADDLES], [TEXT_ONLY_SLICE]]),
}
# The LoRA runs' model.lora_config: the text attention, the MoE experts (gate/up/down, per expert), the ViT's fused
# qkv and the audio tower's fc1 (q/k/v_proj also match the audio tower's attention).
LORA_CONFIG = {"rank": 4, "alpha": 8, "lora_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "fc1"]}
LORA_LR = 1.0e-2  # B moves well away from zero in one step: a merge or export that drops an adapter shows
# The modalities the model must see in a sample of each kind.
MODALITIES = {
    "text": set(), "image": {"image"}, "audio": {"audio"}, "video": {"video"},
    "image+audio": {"image", "audio"}, "audio_in_video": {"video", "audio"},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny released-layout Qwen3-Omni checkpoint (thinker, talker, code2wav) with its processor, and
    the thinker's weights it holds."""
    path = tmp_path_factory.mktemp("tiny_omni")
    config = tiny_omni_config()
    config.thinker_config.text_config.output_router_logits = False
    torch.manual_seed(0)
    with veomni_omni.unpatched():
        model = Qwen3OmniMoeForConditionalGeneration(config)
        model.save_pretrained(path)
    build_tiny_processor(path)
    return path, {name: w for name, w in model.state_dict().items() if name.startswith("thinker.")}


class SampleMaker:
    """VeOmni-format samples of each kind, each with its own text and media files under `root`."""

    def __init__(self, root: Path, image_size: int = synthetic.IMAGE_SIZE):
        self.root, self.rng, self.count, self.image_size = root, np.random.default_rng(0), 0, image_size
        root.mkdir(exist_ok=True)

    def _file(self, suffix):
        self.count += 1
        return str(self.root / f"{self.count}{suffix}")

    def image(self):
        path = self._file(".png")
        Image.fromarray(synthetic.make_image(self.rng, "circle", "red", self.image_size)).save(path)
        return path

    def wav(self, seconds=1.0):
        path = self._file(".wav")
        save_wav(path, synthetic.make_tone(self.rng, "alto", seconds))
        return path

    def frames(self, count=4):
        return [self.image() for _ in range(count)]

    def __call__(self, kind: str) -> dict:
        question = f"question {self.count}"
        if kind.startswith("text"):  # HF chat messages; text_N: N more prompt tokens (" a" is one token)
            prompt = f"two plus two, {question}" + " a" * int(kind.removeprefix("text").removeprefix("_") or 0)
            return {"messages": [
                {"role": "user", "content": [{"type": "text", "text": prompt}]},
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
    dp, steps = data_parallel_size(layout), layout["steps"]
    per_rank = len(steps[0][0])
    rows = [None] * (dp * per_rank * len(steps))
    for rank in range(dp):
        order = list(StatefulDistributedSampler(range(len(rows)), num_replicas=dp, rank=rank, shuffle=True, seed=SEED))
        for step, plan in enumerate(steps):
            for micro, kind in enumerate(plan[rank]):
                rows[order[step * per_rank + micro]] = make(kind)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def data_parallel_size(layout: dict) -> int:
    return layout["world"] // layout.get("sp", 1)


def write_config(path: Path, checkpoint: Path, data: Path, layout: dict, output_dir: Path, packed: bool = False) -> None:
    """A VeOmni YAML: fp32 everywhere (mixed precision with fp32 params), no clipping in effect, no
    checkpoint or HF export, every op on its eager path (CPU). Micro batches as planned, or (`packed`)
    VeOmni's default dynamic batching: samples packed into rows of up to max_seq_len tokens, one step."""
    per_rank = len(layout["steps"][0][0])
    micro_batch_size = per_rank if layout.get("pack") else 1
    ops = {k: v for k, v in vars(eager_ops_config()).items() if v is not None}
    data_config = {"train_path": str(data), "datasets_type": "mapping", "max_seq_len": 384 if packed else 512, "dataloader": {"num_workers": 0}}
    if packed:
        data_config["train_size"] = 10**6  # dynamic batching's step count needs it; max_steps caps the run
    config = {
        "model": {"model_path": str(checkpoint), "ops_implementation": ops},
        "data": data_config,
        "train": {
            "seed": SEED,
            "accelerator": {
                "ulysses_size": layout.get("sp", 1), "ep_size": layout["ep"],
                "fsdp_config": {"fsdp_mode": "fsdp2", "mixed_precision": {"enable": True, "param_dtype": "float32", "reduce_dtype": "float32"}},
            },
            "gradient_checkpointing": {"enable": layout["gc"]},
            "optimizer": {"lr": LORA_LR if layout.get("lora") else 1.0e-3, "max_grad_norm": 1.0e9},
            "vit_lr": 1.0e-3,
            "micro_batch_size": micro_batch_size,
            "dyn_bsz": packed,
            "global_batch_size": data_parallel_size(layout) * per_rank,
            "max_steps": 1 if packed else len(layout["steps"]),
            "num_train_epochs": 1,
            "init_device": "meta",
            "checkpoint": {"output_dir": str(output_dir), "save_steps": 0, "save_epochs": 0, "save_hf_weights": bool(layout.get("export"))},
        },
    }
    if layout.get("lora"):
        config["model"]["lora_config"] = lora_config(layout)
    path.write_text(yaml.safe_dump(config))


def modalities_of(kind: str) -> set:
    return set() if kind.startswith("text") else MODALITIES[kind]


def modalities(sample: dict) -> set:
    present = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}
    return {kind for kind, key in present.items() if key in sample}


def data_parallel_batches(record: dict, layout: dict) -> list:
    """Each data-parallel rank's micro batches once (the ranks of an SP group share theirs)."""
    return [batches for batches, sp_rank in zip(record["micro_batches"], layout["sp_rank"]) if sp_rank <= 0]


LORA_PREFIX = "base_model.model."  # VeOmniLoraModel's, on every parameter of the wrapped model


def lora_config(layout: dict) -> dict:
    return {**LORA_CONFIG, "share_expert_lora": layout["lora"] == "shared"}


def reference_lora_config(mode: str) -> VeOmniLoraConfig:
    """LORA_CONFIG for the unpatched HF thinker, written out by hand: the expert adapters by their fused
    parameters (the patch set's target mapping is not used by the reference)."""
    experts = "model.language_model.layers.*.mlp.experts"
    dense = [m for m in LORA_CONFIG["lora_modules"] if m not in ("gate_proj", "up_proj", "down_proj")]
    return VeOmniLoraConfig(
        r=LORA_CONFIG["rank"], lora_alpha=LORA_CONFIG["alpha"], target_modules=dense,
        target_parameters=[f"{experts}.gate_up_proj", f"{experts}.down_proj"], moe_mode="shared" if mode == "shared" else "independent",
    )


def reference_thinker(thinker_config, weights: dict, lora):
    """The unpatched HF thinker (wrapped by VeOmni's LoRA for a LoRA run, its own forwards) holding `weights`,
    the trained top-level model's. Call inside `veomni_omni.unpatched()`."""
    model = Qwen3OmniMoeThinkerForConditionalGeneration(thinker_config)
    if lora:
        model = VeOmniLoraModel(model, reference_lora_config(lora))
        weights = {LORA_PREFIX + name.removeprefix(LORA_PREFIX + "thinker."): w for name, w in weights.items()}
    else:
        weights = {name.removeprefix("thinker."): w for name, w in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(name.endswith("lora_scaling") for name in missing), (missing, unexpected)
    return model


def top_level_name(name: str, lora: bool) -> str:
    return LORA_PREFIX + "thinker." + name.removeprefix(LORA_PREFIX) if lora else f"thinker.{name}"


def global_batch(thinker_config, record: dict, layout: dict) -> dict:
    samples = [s for rank in data_parallel_batches(record, layout) for mb in rank for s in unpack_veomni_micro_batch(mb, thinker_config)]
    return concat_batches(samples)


def reference_step(thinker_config, record: dict, layout: dict, lora=False) -> tuple:
    """Unpatched HF thinker, one process, the step's starting weights, the whole global batch."""
    with veomni_omni.unpatched():
        model = reference_thinker(thinker_config, record["weights"], lora)
        loss, grads = loss_and_grads(model, global_batch(thinker_config, record, layout))
    return loss, {top_level_name(name, lora): g for name, g in grads.items()}


def step_differences(thinker_config, record: dict, layout: dict, label: str, lora=False) -> tuple[list[str], float]:
    """A recorded step against the reference: failures (loss, grad norm, every gradient) and the
    largest relative gradient difference."""
    ref_loss, ref_grads = reference_step(thinker_config, record, layout, lora)
    got_grads = record["grads"]
    # A modality absent from the whole global batch has no reference gradient: ours must be exactly zero.
    ref_grads = {n: (g if g is not None else torch.zeros_like(got_grads[n])) for n, g in ref_grads.items() if g is not None or n in got_grads}
    failures = [f"{label}: {e}" for e in parity_errors(got_grads, ref_grads)]
    if abs(record["loss"] - ref_loss.item()) > PARITY_RTOL * abs(ref_loss.item()):
        failures.append(f"{label}: loss {record['loss']} vs reference {ref_loss.item()}")
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref_grads.values()])).item()
    if abs(record["grad_norm"] - ref_norm) > PARITY_RTOL * ref_norm:
        failures.append(f"{label}: grad norm {record['grad_norm']} vs reference {ref_norm}")
    return failures, max_relative_difference(got_grads, ref_grads)


def check_run(result: dict, layout: dict, thinker_weights: dict, label: str) -> None:
    """What every run must show: the configured layout, the checkpoint's weights at the start, and each
    rank running each encoder once per micro batch (dummy inputs where it has none)."""
    experts = tiny_omni_config().thinker_config.text_config.num_experts
    sp = layout.get("sp", 1)
    assert result["layout"] == {
        "world": layout["world"], "ep": layout["ep"], "sp": sp, "gradient_checkpointing": layout["gc"],
        "local_experts": [[experts // layout["ep"]]] * layout["world"],
        "sp_rank": [r % sp if sp > 1 else -1 for r in range(layout["world"])],
    }, f"{label}: VeOmni did not lay the model out as configured"
    loaded = result["steps"][0]["weights"]
    if layout.get("lora"):
        loaded = check_lora_start(result, layout, label)
    assert loaded.keys() == thinker_weights.keys(), f"{label}: the trained thinker's parameters are not the checkpoint's"
    not_loaded = [n for n, w in loaded.items() if not torch.equal(w, thinker_weights[n])]
    assert not not_loaded, f"{label}: VeOmni's loader did not load these from the released-layout checkpoint: {not_loaded[:5]}"
    for step, record in enumerate(result["steps"], start=1):
        for rank, (calls, batches) in enumerate(zip(record["encoder_calls"], record["micro_batches"])):
            assert calls == {"visual": len(batches), "audio_tower": len(batches)}, (
                f"{label} step {step} rank {rank}: encoder forwards {calls} for {len(batches)} micro batches; "
                "every rank must run each encoder once per micro batch"
            )


def base_name(name: str) -> str:
    """A LoRA model's parameter name -> the base model's (`...q_proj.base_layer.weight` -> `...q_proj.weight`,
    `...experts.gate_up_proj.base_layer.weight` -> `...experts.gate_up_proj`)."""
    name = re.sub(r"\.(gate_up_proj|down_proj)\.base_layer\.weight$", r".\1", name.removeprefix(LORA_PREFIX))
    return name.replace(".base_layer.", ".")


def check_lora_start(result: dict, layout: dict, label: str) -> dict:
    """A LoRA run starts from the checkpoint with fresh adapters (A random, B zero), trains the adapters only,
    and has them where LORA_CONFIG asks; returns the base weights under the base model's names."""
    first = result["steps"][0]
    adapters = {name for name in first["weights"] if is_adapter_param(name)}
    assert first["grads"].keys() == adapters, f"{label}: trained parameters other than the adapters: {sorted(first['grads'].keys() ^ adapters)[:5]}"
    for where in (".self_attn.q_proj.", ".self_attn.o_proj.", ".mlp.experts.gate_proj.", ".mlp.experts.up_proj.", ".mlp.experts.down_proj.", ".attn.qkv.", ".fc1."):
        assert any(where in name for name in adapters), f"{label}: no adapter on {where!r}"
    expert_a = next(w for name, w in first["weights"].items() if ".mlp.experts.gate_proj.lora_A." in name)
    assert expert_a.ndim == (2 if layout["lora"] == "shared" else 3), f"{label}: expert adapters of shape {tuple(expert_a.shape)}"
    for name in adapters:
        weight = first["weights"][name]
        assert (weight.abs().sum() > 0) == (".lora_A." in name), f"{label}: {name} at the start: A must be random, B zero"
    return {base_name(name): w for name, w in first["weights"].items() if name not in adapters}


def sp_coverage(result: dict, sp: int, thinker_config) -> set:
    """What the SP run's packed sequences exercise: an image / an audio clip whose placeholder tokens
    straddle a slice boundary, a rank whose slice holds no media token."""
    found = set()
    media = {m: getattr(thinker_config, f"{m}_token_id") for m in ("image", "video", "audio")}
    for record in result["steps"]:
        for batches in data_parallel_batches(record, result["layout"]):
            for mb in batches:
                ids = mb["input_ids"].reshape(-1)
                chunk = -(-ids.numel() // sp)
                slices = [ids[r * chunk : (r + 1) * chunk] for r in range(sp)]
                for modality in ("image", "audio"):  # the same run of placeholders on both sides of a boundary
                    if any(ids[r * chunk - 1] == ids[r * chunk] == media[modality] for r in range(1, sp)):
                        found.add(f"{modality} straddles")
                if any(not torch.isin(part, torch.tensor(list(media.values()))).any() for part in slices):
                    found.add("slice without media")
    return found


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_veomni_trainer_matches_single_process_hf(checkpoint, tmp_path, name):
    checkpoint, thinker_weights = checkpoint
    layout = LAYOUTS[name]
    # Under SP, 128-pixel images (16 placeholder tokens) give the slice boundaries more room to cut one.
    make = SampleMaker(tmp_path / "media", image_size=128 if layout.get("sp") else synthetic.IMAGE_SIZE)
    write_dataset(tmp_path / "train.jsonl", layout, make)
    configs = {"planned": tmp_path / "planned.yaml"}
    if layout.get("packed"):
        configs["packed"] = tmp_path / "packed.yaml"
    for run, config in configs.items():
        write_config(config, checkpoint, tmp_path / "train.jsonl", layout, tmp_path / run, packed=run == "packed")
    results = {}
    for run, config in configs.items():  # one process group per run: VeOmni tears its group down at the end,
        # and a second run set up again in the same processes deadlocked in its first barrier (gloo, torch 2.13)
        run_ranks(WORKER, layout["world"], [str(tmp_path / f"{run}.pt"), str(config)], timeout_s=300)
        results[run] = torch.load(tmp_path / f"{run}.pt")[str(config)]
    thinker_config = Qwen3OmniMoeConfig.from_pretrained(checkpoint).thinker_config

    planned = results["planned"]
    assert len(planned["steps"]) == len(layout["steps"]), "VeOmni's trainer did not run the planned steps"
    for step, (plan, record) in enumerate(zip(layout["steps"], planned["steps"]), start=1):
        for rank, (kinds, batches) in enumerate(zip(plan, data_parallel_batches(record, planned["layout"]))):
            got = [[modalities(s) for s in unpack_veomni_micro_batch(mb, thinker_config)] for mb in batches]
            want = [[modalities_of(k) for k in kinds]] if layout.get("pack") else [[modalities_of(k)] for k in kinds]
            assert got == want, f"step {step} rank {rank}: micro batches hold {got}, planned {kinds}"
    if layout.get("sp"):
        coverage = sp_coverage(planned, layout["sp"], thinker_config)
        assert coverage == {"image straddles", "audio straddles", "slice without media"}, f"SP cases exercise only {coverage}"
    if "packed" in results:
        for rank, batches in enumerate(results["packed"]["steps"][0]["micro_batches"]):
            packed = [[modalities(s) for s in unpack_veomni_micro_batch(mb, thinker_config)] for mb in batches]
            assert all(len(samples) > 1 for samples in packed), f"packed run, rank {rank}: micro batches hold {packed}"

    failures, worst = [], {}
    for run, result in results.items():
        check_run(result, layout, thinker_weights, run)
        for step, record in enumerate(result["steps"], start=1):
            errors, worst[f"{run} step {step}"] = step_differences(
                thinker_config, record, result["layout"], f"{run} step {step}", lora=layout.get("lora", False)
            )
            failures += errors
    print(f"VeOmni trainer, {name}: largest relative gradient difference " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert not failures, "\n".join(failures[:20])
    if layout.get("lora"):
        check_zero_adapters_are_the_base(thinker_config, planned["steps"][0], planned["layout"], thinker_weights, layout["lora"])
    if layout.get("export"):
        check_lora_export(checkpoint, thinker_config, planned, tmp_path / "planned", len(layout["steps"]), layout["lora"])


def check_zero_adapters_are_the_base(thinker_config, record: dict, layout: dict, thinker_weights: dict, lora) -> None:
    """With every B at zero (the first step's start) the LoRA model's loss is the base model's, bit for bit."""
    batch = global_batch(thinker_config, record, layout)
    with veomni_omni.unpatched(), torch.no_grad():
        lora_loss = reference_thinker(thinker_config, record["weights"], lora=lora)(**batch).loss
        base_loss = reference_thinker(thinker_config, thinker_weights, lora=False)(**batch).loss
    assert torch.equal(lora_loss, base_loss), f"zero adapters: loss {lora_loss.item()} vs the base model's {base_loss.item()}"


def check_lora_export(checkpoint: Path, thinker_config, result: dict, output_dir: Path, steps: int, lora) -> None:
    """The end of a LoRA run: the merged export (released layout, plain transformers) and the PEFT adapters
    (peft on the plain transformers model, per-expert adapters converted by peft onto 5.22's fused experts)
    give the trained adapter model's logits; the merged export changes exactly the adapted tensors."""
    step_dir = output_dir / "checkpoints" / f"global_step_{steps}"
    batch = global_batch(thinker_config, result["steps"][-1], result["layout"])
    with veomni_omni.unpatched(), torch.no_grad():
        want = reference_thinker(thinker_config, result["final_weights"], lora=lora)(**batch).logits
        merged = Qwen3OmniMoeForConditionalGeneration.from_pretrained(step_dir / "hf_ckpt", dtype=torch.float32)
        base = Qwen3OmniMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
        with_adapters = PeftModel.from_pretrained(base, step_dir / "lora_adapter")
        got = {"merged export": merged.thinker(**batch).logits, "PEFT adapters": with_adapters.base_model.model.thinker(**batch).logits}
    for what, logits in got.items():
        error = ((logits - want).abs().max() / want.abs().max()).item()
        print(f"LoRA export: {what} logits vs the trained adapter model, relative {error:.2e}")
        assert error <= PARITY_RTOL, f"{what}: logits differ from the trained adapter model's by {error:.2e} (relative)"

    adapter = read_state(step_dir / "lora_adapter")
    # The exported update of each adapted weight; zero for an expert no token was routed to (its B never moved).
    adapted = {
        key.removeprefix(LORA_PREFIX).replace(".lora_B.weight", ".weight"): bool(b.abs().sum() > 0)
        for key, b in adapter.items() if key.endswith(".lora_B.weight")
    }
    assert any(".mlp.experts.0.gate_proj." in key for key in adapted), f"no per-expert adapters exported: {sorted(adapted)[:5]}"
    before, after = read_state(checkpoint), read_state(step_dir / "hf_ckpt")
    assert before.keys() == after.keys(), f"merged export keys differ from the released checkpoint's: {sorted(before.keys() ^ after.keys())[:5]}"
    # Bytes, not values: the fixture's talker experts are HF 5.22's uninitialised memory (NaN can occur) and carried as they are.
    changed = {key for key in before if not same_bytes(before[key], after[key])}
    updated = {key for key, moved in adapted.items() if moved}
    assert changed == updated, f"merged export: changed without an update {sorted(changed - updated)[:5]}, updated but unchanged {sorted(updated - changed)[:5]}"


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def read_state(path: Path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors
