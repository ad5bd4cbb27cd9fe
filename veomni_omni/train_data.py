"""The main job's data sets and its scoring: the synthetic set written as JSONL (HF chat `messages`,
media as PNG / WAV / Matroska files) for VeOmni's dataset builders, and held-out accuracy per modality.

The synthetic set is written once into `<output_dir>/data` (all ranks generate, rank 0 writes the lists;
reused when a previous run wrote it with the same settings), optionally with some train media files
corrupted or deleted: the data transform skips and counts those samples, the job goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from .data import synthetic

MODALITIES = ("image", "audio", "video", "text")
# Synthetic task → the modality whose input carries the answer (av_pitch: the video's soundtrack).
TASK_MODALITY = {
    "image_shape": "image", "image_colour": "image",
    "audio_pitch": "audio", "av_pitch": "audio",
    "video_motion": "video", "av_motion": "video",
    "text_arith": "text", "text_animal": "text",
}


# ------------------------------------------------------------------------------------ data sets
def _write_synthetic(cfg, paths: dict, rank: int = 0, world: int = 1, speech=None) -> None:
    """Generate the synthetic set, media files beside `paths["train"]` (answers spoken with `speech`, a
    `synthetic.SpokenAnswers`). With several ranks each generates every world-th sample (media files
    included) and rank 0 assembles, corrupts and writes the lists."""
    tasks = tuple(cfg.tasks) or synthetic.TASKS
    media_dir = paths["train"].parent / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", cfg.train_samples), ("eval", cfg.eval_samples)):
        mine = [synthetic.generate_sample(i, tasks[i % len(tasks)], cfg.seed, split, media_dir, speech=speech) for i in range(rank, n, world)]
        parts = [mine]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, mine)
        if rank != 0:
            continue
        samples = [parts[i % world][i // world] for i in range(n)]
        if split == "train" and cfg.corrupt_train_samples:
            _corrupt(samples, cfg.corrupt_train_samples)
        synthetic.write_jsonl(samples, paths[split])


def _media_paths(sample) -> list[str]:
    return [part[k] for m in sample["messages"] if not isinstance(m["content"], str) for part in m["content"]
            for k in ("image", "audio", "video") if isinstance(part.get(k), str)]


def _corrupt(samples: list, count: int) -> None:
    """Damage the media of `count` train samples (every k-th sample with media): alternately overwrite
    the file with junk bytes and delete it."""
    candidates = [s for s in samples if _media_paths(s)]
    if not candidates:
        return
    step = max(1, len(candidates) // count)
    for i, sample in enumerate(candidates[::step][:count]):
        path = Path(_media_paths(sample)[0])
        if i % 2 == 0:
            path.write_bytes(b"this is not a media file" * 4)
        else:
            path.unlink()
        sample["corrupted"] = True


def prepare_synthetic_set(cfg, train_path: Path, eval_path: Path, speech=None) -> None:
    """Write the synthetic set described by `cfg` (`train.SyntheticData`) as `train_path` / `eval_path`
    (media beside them; answers spoken with `speech`), by all ranks of the process group together, unless a
    previous run wrote it."""
    data_dir = train_path.parent
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    stamp = json.dumps({"train_path": str(train_path), "eval_path": str(eval_path), "seed": cfg.seed, "train": cfg.train_samples, "eval": cfg.eval_samples, "tasks": list(cfg.tasks),
                        "corrupt": cfg.corrupt_train_samples, "speech": repr(speech), "version": 4}, sort_keys=True)
    manifest = data_dir / "manifest.json"
    fresh = [manifest.exists() and manifest.read_text() == stamp]
    if world > 1:
        dist.broadcast_object_list(fresh, src=0)  # one decision, rank 0's
    if not fresh[0]:
        if rank == 0 and manifest.exists():
            manifest.unlink()
        _write_synthetic(cfg, {"train": train_path, "eval": eval_path}, rank, world, speech)
        if rank == 0:
            manifest.write_text(stamp)
    if world > 1:
        dist.barrier()


def sample_modality(sample: dict) -> str:
    """The modality a sample's answer comes from: its "modality" key, its synthetic task, else its
    first medium (image, video, audio), else text."""
    if sample.get("modality") in MODALITIES:
        return sample["modality"]
    if sample.get("task") in TASK_MODALITY:
        return TASK_MODALITY[sample["task"]]
    for kind in ("image", "video", "audio"):  # VeOmni's conversations format lists media per kind
        if sample.get(f"{kind}s"):
            return kind
    for message in sample.get("messages") or []:
        if isinstance(message["content"], str):
            continue
        for part in message["content"]:
            for kind in ("image", "video", "audio"):
                if part.get("type") == kind or part.get(kind) is not None:
                    return kind
    return "text"


def chance_level(samples: list[dict]) -> float:
    """Accuracy of guessing among a task's answers (max over tasks): 1 / number of classes."""
    classes: dict[str, set] = {}
    for s in samples:
        task = s.get("task", sample_modality(s))
        if task in synthetic.ANSWERS:
            classes[task] = set(synthetic.ANSWERS[task])
        elif "answer" in s:
            classes.setdefault(task, set()).add(s["answer"])
    return max((1.0 / len(c) for c in classes.values() if c), default=float("nan"))


def accuracy_by_modality(samples, wrong, seen) -> tuple[dict, dict]:
    """(accuracy, number of scored samples) per modality; a sample is right when no answer token was wrong."""
    right = {m: 0 for m in MODALITIES}
    total = {m: 0 for m in MODALITIES}
    for i, sample in enumerate(samples):
        if seen[i] == 0:  # skipped (unreadable media) or nothing to score
            continue
        m = sample_modality(sample)
        total[m] += 1
        right[m] += int(wrong[i] == 0)
    return {m: (round(right[m] / total[m], 4) if total[m] else None) for m in MODALITIES}, total
