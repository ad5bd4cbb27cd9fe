"""Resuming VeOmni's trainer from its own DCP checkpoints: only complete ones are ever picked.

What VeOmni 0.1.12 does. `CheckpointerCallback._save_checkpoint` calls
`DistributedCheckpointer.save(<output_dir>/checkpoints/global_step_N, ...)`, which writes straight
into that directory: each rank's `extra_state/extra_state_rank_R.pt` (step, LR scheduler,
StatefulDataLoader position, torch RNG) with `torch.save`, then PyTorch DCP's `__R_i.distcp` data
files, then rank 0's `.metadata` once every rank has written. `train.checkpoint.load_path: auto`
resolves (`utils.checkpoint_utils.get_checkpoint_path` -> `dcp_get_last_iteration` ->
`_validate_dcp_checkpoint_entry`) to the highest `global_step_N` holding a `.metadata` file, nothing
else checked. So a save killed part way into a *new* directory is skipped (no `.metadata` yet), but:
  - a save into an existing `global_step_N` (a run restarted from an earlier `load_path`, or one that
    diverged, saving the same step again) overwrites that complete checkpoint in place: killed part
    way, it leaves the old `.metadata` over a mix of old and new files, and `auto` resumes from it;
  - a published checkpoint that lost or truncated a file (a full disk, a partial copy) is still
    picked, and every restart by `torchrun --max-restarts` then fails loading it again.

What the two patches change (patchset: `veomni_dcp_atomic_save`, `veomni_dcp_complete_only`):
  - `atomic_dcp_save`: VeOmni's own save writes into the hidden sibling `.global_step_N.tmp`, then
    rank 0 publishes it in one rename (`publish.py`; an existing `global_step_N` is exchanged
    atomically), so `global_step_N` is always either the previous complete checkpoint or the new
    one. Assumes `output_dir` is shared by all ranks, as VeOmni requires for multi-node runs.
    Async saves (the write outlives the call), a caller's own `storage_writer` (it names its
    directory) and `dcp_save_to_lowest_rank` (meant for node-local disks, where rank 0 cannot
    publish another node's copy) keep VeOmni's direct write.
  - `complete_checkpoint_step`: `auto` also requires every data file `.metadata` refers to, at its
    full length, and the extra state of every rank that saved; a damaged newest checkpoint is
    skipped with a warning naming the file, and the previous complete one is resumed.

The data position. The saved `train_dataloader` state is VeOmni's `DynamicBatchSizeDataLoader`'s
(its `step`, buffers, batching strategy, and the StatefulDataLoader's sampler position inside).
Its generator counts a batch (`self.step += 1`) only when the *next* one is requested, so a state
saved after step N says N-1: a resume then builds its first batch with the previous step's token
budget (`bsz_warmup_steps`), and ends the epoch one batch late. `dynamic_batching_state_dict`
(patch `veomni_dynamic_batching_position`) saves the number of batches handed out.
"""

from __future__ import annotations

import inspect
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from veomni.checkpoint import dcp_checkpointer
from veomni.data.dynamic_batching import DynamicBatchSizeDataLoader
from veomni.utils import checkpoint_utils
from veomni.utils import logging as veomni_logging

from .publish import publish, staging_dir

logger = veomni_logging.get_logger(__name__)

ATOMIC_SAVE_PATCH = "veomni_dcp_atomic_save"
COMPLETE_ONLY_PATCH = "veomni_dcp_complete_only"
DATA_POSITION_PATCH = "veomni_dynamic_batching_position"
_DATA_FILE_RANK = re.compile(r"__(\d+)_")  # DCP's FileSystemWriter names rank R's files __R_<i>.distcp
_EXTRA_STATE_RANK = re.compile(dcp_checkpointer._EXTRA_STATE_FORMAT.replace("{}", r"(\d+)").replace(".", r"\."))


def atomic_dcp_save(
    cls,
    path: str,
    state: Dict[str, Any],
    save_async: bool = False,
    global_steps: int = None,
    storage_writer: Optional[FileSystemWriter] = None,
    trainable_only: bool = False,
    save_to_lowest_rank: bool = False,
    parallel_state=None,
    stage_dir: Optional[str] = None,
) -> None:
    """`DistributedCheckpointer.save`: VeOmni's save into a staging directory, published whole."""
    from ..patchset import original

    veomni_save = original(ATOMIC_SAVE_PATCH).__func__
    kwargs = dict(trainable_only=trainable_only, parallel_state=parallel_state, stage_dir=stage_dir)
    if save_async or storage_writer is not None or save_to_lowest_rank:
        return veomni_save(
            cls, path, state, save_async=save_async, global_steps=global_steps,
            storage_writer=storage_writer, save_to_lowest_rank=save_to_lowest_rank, **kwargs,
        )  # fmt: skip
    final = Path(path) / f"{checkpoint_utils._GLOBAL_STEP_PREFIX}{global_steps}" if global_steps else Path(path)
    staged = staging_dir(final)
    is_publisher = dist.get_rank() == 0
    if is_publisher:
        shutil.rmtree(staged, ignore_errors=True)  # left by a save that died part way
    dist.barrier()
    veomni_save(cls, str(staged), state, **kwargs)  # ends in a barrier: every rank has written
    if is_publisher:
        publish(staged, final)
    dist.barrier()  # on return, every rank sees the published checkpoint


def incomplete_reason(checkpoint: Path) -> Optional[str]:
    """Why the DCP checkpoint directory `checkpoint` (VeOmni's layout) cannot be resumed from, or None."""
    try:
        metadata = FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any unreadable .metadata disqualifies the directory
        return f".metadata unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = checkpoint / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is truncated ({file.stat().st_size} of {size} bytes)"
    extra_dir = checkpoint / dcp_checkpointer._EXTRA_STATE_DIR
    extra = {int(m.group(1)): f for f in extra_dir.glob("*") if (m := _EXTRA_STATE_RANK.fullmatch(f.name))}
    writers = {int(m.group(1)) for name in needed if (m := _DATA_FILE_RANK.match(name))}
    for rank in range(max(set(extra) | writers, default=-1) + 1):
        if rank not in extra:
            return f"{dcp_checkpointer._EXTRA_STATE_DIR}/{dcp_checkpointer._EXTRA_STATE_FORMAT.format(rank)} is missing"
        if not zipfile.is_zipfile(extra[rank]):  # torch.save's archive lost its end record: truncated
            return f"{dcp_checkpointer._EXTRA_STATE_DIR}/{extra[rank].name} is truncated or not a torch.save archive"
    return None


def complete_checkpoint_step(checkpoints_dir: str, entry: str):
    """`checkpoint_utils._validate_dcp_checkpoint_entry`: VeOmni's name and `.metadata` checks, then
    `incomplete_reason`; the step of a resumable checkpoint, else None."""
    from ..patchset import original

    step = original(COMPLETE_ONLY_PATCH)(checkpoints_dir, entry)
    if step is None:
        return None
    reason = incomplete_reason(Path(checkpoints_dir) / entry)
    if reason is not None:
        logger.warning_rank0(f"Not resuming from {Path(checkpoints_dir) / entry}: {reason}.")
        return None
    return step


def dynamic_batching_state_dict(self):
    """`DynamicBatchSizeDataLoader.state_dict` with `step` = the batches handed out this epoch."""
    from ..patchset import original

    state = original(DATA_POSITION_PATCH)(self)
    generator = getattr(self, "_batch_data_iter", None)
    if generator is not None and inspect.getgeneratorstate(generator) == inspect.GEN_SUSPENDED:
        state["step"] += 1  # paused at a `yield batch`, whose `self.step += 1` runs on the next request
    return state
