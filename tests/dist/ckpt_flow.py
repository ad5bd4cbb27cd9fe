"""torchrun worker (FSDP2 x EP on gloo): released HF checkpoint in, train, HF checkpoint out, DCP resume.

phase "first":
  1. model A (top-level, talker kept) built on meta, loaded with `load_hf_checkpoint`: its full
     weights and probe logits are recorded; it trains STEPS steps straight (losses, logits), and
     `save_hf_checkpoint` writes it to OUT/hf_trained (with the source's talker/code2wav/config).
  2. memory: a mid-size thinker checkpoint is loaded and saved; per-rank bytes read, local shard
     bytes and peak RSS of both are recorded (for model A too).
  3. model B (talker disabled, as the train entry builds it) is loaded, trains half the steps with
     `save_resume_state(..., keep_last=1)` after each, trains on; then rank 1 kills itself inside
     the DCP save at step STEPS (after writing its data, before the checkpoint is complete).
phase "resume": a fresh model resumes from the newest complete checkpoint, trains to step STEPS
  (losses, logits), trains two more steps, and rank 1 kills itself while writing the first shard of
  a new save over OUT/hf_trained.
Results go to OUT/<phase>.pt (rank 0) before the kill; rank 1 touches OUT/<phase>.killed before dying.

argv: source_dir mid_source_dir spec.json out_dir
spec: phase, steps, ep, max_shard_size (bytes per output shard), probe (rows and seed of the logits batch)
"""

import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from _common import build, on_every_rank, summed_over_ranks, veomni_scaled_loss  # same directory (patches applied there first)
from veomni.distributed.clip_grad_norm import veomni_clip_grad_norm
from veomni.distributed.parallel_state import init_parallel_state
from veomni.optim import build_lr_scheduler, build_optimizer

from veomni_omni.checkpoint import (
    latest_resume_checkpoint,
    load_hf_checkpoint,
    load_resume_state,
    save_hf_checkpoint,
    save_resume_state,
)
from veomni_omni.checkpoint import safetensors_io
from veomni_omni.checkpoint.sharding import sharded_params
from veomni_omni.testing import gather_full_tensors
from veomni_omni.data.shaped_batches import build_batch

SEED = 1234
ROWS = {
    "text": [("prompt", 3), ("text", 8)],
    "image": [("prompt", 3), ("image", 1, 4, 4), ("text", 6)],
    "audio": [("prompt", 2), ("audio", 150), ("text", 6)],
    "video": [("prompt", 2), ("video", 2, 4, 4), ("text", 6)],
    "all": [("prompt", 2), ("image", 1, 4, 4), ("audio", 80), ("video", 2, 4, 4), ("text", 5)],
}
KINDS = list(ROWS)


class PeakRSS:
    """Peak resident memory of this process over a block (Linux: VmHWM after resetting it)."""

    @staticmethod
    def _status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = self._status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        self.peak = self._status_kb("VmHWM") * 1024
        self.after = self._status_kb("VmRSS") * 1024


class Data:
    """A data stream whose position is checkpointed; each batch's seed comes from the global torch
    RNG, so a resume that failed to restore the RNG would draw different batches."""

    def __init__(self, position=0):
        self.position = position

    def next(self, rank, world):
        kind = KINDS[(self.position * world + rank) % len(KINDS)]
        seed = int(torch.randint(0, 2**31 - 1, ()))
        self.position += 1
        return build_batch([ROWS[kind]], seed=seed, with_position_ids=True)


def without_talker(model):
    if hasattr(model, "disable_talker"):
        model.disable_talker()


def build_unloaded(checkpoint, *, talker=True):
    """On meta, sharded, then materialised without initialisation: the checkpoint fills it."""
    return build(checkpoint, load_weights=False, prepare=None if talker else without_talker)


def optimizer_and_scheduler(model, steps):
    optimizer = build_optimizer(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    scheduler = build_lr_scheduler(optimizer, train_steps=steps, lr=2e-3, lr_decay_style="cosine", lr_warmup_ratio=0.25, lr_min=1e-4)
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, data):
    batch = data.next(dist.get_rank(), dist.get_world_size())
    loss = veomni_scaled_loss(model(**batch, use_cache=False).loss, batch)
    loss.backward()
    veomni_clip_grad_norm(model, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return summed_over_ranks(loss)


@torch.no_grad()
def probe_logits(model, probe):
    batch = build_batch(probe["rows"], seed=probe["seed"], with_position_ids=True)
    batch.pop("labels")  # inference: the patched forward returns flattened logits alongside a loss
    logits = model(**batch, use_cache=False).logits.detach().clone()
    # FSDP2 leaves the root module unsharded after a forward without backward, and the next
    # training step's root gradients then differ in the last bits: reshard, so a probed run and
    # an unprobed (resumed) one stay bit-identical.
    model.reshard()
    return logits


@torch.no_grad()
def local_bytes(model):
    return sum(p.local.numel() * p.local.element_size() for p in sharded_params(model).values())


def die_after(owner, method, marker):
    """Make `owner.method` do its work, then SIGKILL this process (a rank dying mid-save)."""
    original = getattr(owner, method)

    def dying(*args, **kwargs):
        result = original(*args, **kwargs)
        if hasattr(result, "wait"):  # DCP's write_data returns a future: let the bytes land first
            result.wait()
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(owner, method, dying)


def first(source, mid_source, spec, out):
    rank, steps, shard_size = dist.get_rank(), spec["steps"], spec["max_shard_size"]
    results = {}

    # 1. model A: load, logits, straight training, HF save
    model = build_unloaded(source)
    with PeakRSS() as load_rss:
        read = load_hf_checkpoint(model, source)
    results["tiny"] = {"read": read, "local": local_bytes(model), "load": vars(load_rss)}
    results["loaded_weights"] = gather_full_tensors(model)
    results["loaded_logits"] = probe_logits(model, spec["probe"])
    optimizer, scheduler = optimizer_and_scheduler(model, steps)
    torch.manual_seed(SEED)
    data = Data()
    results["straight_losses"] = [train_step(model, optimizer, scheduler, data) for _ in range(steps)]
    results["trained_logits"] = probe_logits(model, spec["probe"])
    with PeakRSS() as save_rss:
        save_hf_checkpoint(model, out / "hf_trained", source=source, max_shard_size=shard_size)
    results["tiny"]["save"] = vars(save_rss)
    results["tiny"] = on_every_rank(results["tiny"])
    del model, optimizer, scheduler

    # 2. memory, on a checkpoint large enough for its shards to dominate the noise (and after the
    #    first load and save of the process, which pay one-off import and cache costs)
    model = build_unloaded(mid_source)
    with PeakRSS() as load_rss:
        read = load_hf_checkpoint(model, mid_source)
    with PeakRSS() as save_rss:
        save_hf_checkpoint(model, out / "hf_mid", source=mid_source, max_shard_size=shard_size * 64)
    largest = max(torch.Size(p.global_shape).numel() * p.local.element_size() for p in sharded_params(model).values())
    results["mid"] = on_every_rank({"read": read, "local": local_bytes(model), "largest_param": largest, "load": vars(load_rss), "save": vars(save_rss)})
    del model

    # 3. model B: the same training with a DCP save half way, then a save that a dying rank breaks
    model = build_unloaded(source, talker=False)
    load_hf_checkpoint(model, source)
    optimizer, scheduler = optimizer_and_scheduler(model, steps)
    torch.manual_seed(SEED)
    data = Data()
    losses = []
    for step in range(1, steps // 2 + 1):  # a save every step, keeping only the newest
        losses.append(train_step(model, optimizer, scheduler, data))
        save_resume_state(out / "resume", step, model, optimizer, scheduler, data_state=data.position, keep_last=1)
    losses += [train_step(model, optimizer, scheduler, data) for _ in range(steps - steps // 2)]
    results["checkpointed_losses"] = losses
    if rank == 0:
        torch.save(results, out / "first.pt")
    dist.barrier()
    if rank == 1:
        from torch.distributed.checkpoint import FileSystemWriter

        die_after(FileSystemWriter, "write_data", out / "first.killed")
    save_resume_state(out / "resume", steps, model, optimizer, scheduler, data_state=data.position)
    raise RuntimeError("the DCP save should have been killed")


def resume(source, spec, out):
    rank, steps = dist.get_rank(), spec["steps"]
    model = build_unloaded(source, talker=False)
    optimizer, scheduler = optimizer_and_scheduler(model, steps)
    checkpoint = latest_resume_checkpoint(out / "resume")
    state = load_resume_state(checkpoint, model, optimizer, scheduler)
    data = Data(state.data_state)
    results = {
        "resumed_from": checkpoint.name,
        "step": state.step,
        "losses": [train_step(model, optimizer, scheduler, data) for _ in range(state.step, steps)],
        "trained_logits": probe_logits(model, spec["probe"]),
    }
    if rank == 0:
        torch.save(results, out / "resume.pt")
    dist.barrier()
    for _ in range(2):  # different weights, so an intact old checkpoint is told apart from a new one
        train_step(model, optimizer, scheduler, data)
    if rank == 1:
        die_after(safetensors_io.ShardWriter, "write", out / "resume.killed")
    save_hf_checkpoint(model, out / "hf_trained", source=source, max_shard_size=spec["max_shard_size"])
    raise RuntimeError("the HF save should have been killed")


def main():
    source, mid_source, spec_file, out = sys.argv[1:5]
    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    init_parallel_state(
        dp_size=dist.get_world_size(), dp_mode="fsdp2", device_type="cpu",
        extra_parallel_sizes=(spec["ep"],), extra_parallel_names=("ep",),
    )
    if spec["phase"] == "first":
        first(source, mid_source, spec, Path(out))
    else:
        resume(source, spec, Path(out))


if __name__ == "__main__":
    main()
