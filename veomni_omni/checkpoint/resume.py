"""Resumable training: DCP checkpoints of model, optimizer, LR scheduler, data position and RNG.

Model and optimizer are saved with PyTorch DCP through VeOmni's `ModelState` / `OptimizerState`
wrappers, which are aware of the EP plan (expert shards carry their EP placement, so the files
describe whole tensors). VeOmni's `DistributedCheckpointer` is not called: its save ends in device
calls that 0.1.12 lacks on CPU (`torch.cpu.empty_cache`). The rest is per rank
(`extra_state/rank_R.pt`): the step, the scheduler's state, the caller's data position and every
RNG this process draws from; a resume therefore needs the same world size.

Each checkpoint is `ROOT/global_step_N`, written into `ROOT/.global_step_N.tmp` and published
atomically once every rank has finished (`publish.py`): a save killed part way leaves the previous
checkpoints as they were, and `latest_resume_checkpoint` never sees the partial one.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .publish import publish, staging_dir
from .safetensors_io import CheckpointError

STEP_DIR = re.compile(r"global_step_(\d+)")
EXTRA_STATE_DIR = "extra_state"


@dataclass
class ResumeState:
    step: int
    data_state: Any


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _steps(root: Path) -> dict[int, Path]:
    if not root.is_dir():
        return {}
    return {int(m.group(1)): d for d in root.iterdir() if d.is_dir() and (m := STEP_DIR.fullmatch(d.name))}


def latest_resume_checkpoint(root) -> Optional[Path]:
    """The newest complete checkpoint under `root` (partial saves are never published), or None."""
    steps = _steps(Path(root))
    return steps[max(steps)] if steps else None


def save_resume_state(
    root,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    data_state: Any = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Save everything a resume needs as `root/global_step_{step}`; every rank calls it.

    `data_state`: any picklable description of this rank's data position (e.g. the pipeline's
    state). `keep_last`: once published, delete all but this many newest checkpoints.
    """
    import torch.distributed.checkpoint as dcp
    from veomni.checkpoint.dcp_checkpointer import ModelState, OptimizerState

    root = Path(root)
    final = root / f"global_step_{step}"
    staged = staging_dir(final)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)  # left by a save that died
        (staged / EXTRA_STATE_DIR).mkdir(parents=True)
    dist.barrier()
    extra = {
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data": data_state,
        "rng": _rng_state(),
    }
    torch.save(extra, staged / EXTRA_STATE_DIR / f"rank_{rank}.pt")
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(staged, single_file_per_rank=True, sync_files=True))
    dist.barrier()
    if rank == 0:
        publish(staged, final)
        if keep_last is not None:
            for old in sorted(_steps(root))[:-keep_last]:
                shutil.rmtree(root / f"global_step_{old}")
    dist.barrier()
    return final


def load_resume_state(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> ResumeState:
    """Restore a `save_resume_state` checkpoint directory into freshly built model, optimizer and
    scheduler (same parallel layout and world size), and this rank's RNG; returns the step and the
    data position to continue from."""
    import torch.distributed.checkpoint as dcp
    from veomni.checkpoint.dcp_checkpointer import ModelState, OptimizerState

    path = Path(path)
    world = dist.get_world_size()
    saved_by = len(list((path / EXTRA_STATE_DIR).glob("rank_*.pt")))
    if saved_by != world:
        raise CheckpointError(f"{path}: saved by {saved_by} ranks, resuming on {world}; per-rank RNG and data position need the same")
    reader = dcp.FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    missing = [name for name, _ in model.named_parameters() if f"model.{name}" not in saved]
    if missing:
        raise CheckpointError(f"{path}: no saved state for {len(missing)} model parameters, e.g. {missing[:5]}")
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer, load=True)}
    # Partial: parameters that never had a gradient (unrouted experts, frozen towers) have no
    # optimizer state; the fresh optimizer's defaults stand for them, as VeOmni's loader does.
    dcp.load(state, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    extra = torch.load(path / EXTRA_STATE_DIR / f"rank_{dist.get_rank()}.pt", weights_only=False)
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return ResumeState(step=extra["step"], data_state=extra["data"])
