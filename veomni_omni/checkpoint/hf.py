"""Released HF checkpoints straight into the sharded model, and back out in the same layout.

Load: every rank reads the safetensors headers (cheap; a truncated or missing shard fails here, on
every rank alike, naming the file), maps the keys onto its parameters (`layout.model_layout`), then
reads with `safe_open(...).get_slice` only the part of each tensor that overlaps its own shard and
copies it into place, one parameter at a time. Per-expert tensors land directly in the rank's slice
of the fused expert parameter: a rank's memory grows by its own shard, plus at most one
parameter's worth of mapped file pages while that parameter is read.

Save: the output has the source checkpoint's keys, shapes and dtypes (per-expert keys, `thinker.`
prefix), in `model-XXXXX-of-YYYYY.safetensors` shards with an index. Each shard file is written by
one rank (round-robin); parameters are assembled one at a time on the rank(s) writing them, and
components the model does not have (talker, code2wav) are copied byte for byte from the source.
Config, generation config and processor files come from the source directory (or `processor`).
Everything is written into a hidden sibling directory and published atomically (`publish.py`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors import safe_open

from .layout import model_layout
from .publish import publish, staging_dir
from .safetensors_io import INDEX_NAME, CheckpointError, ShardWriter, read_checkpoint, tensor_nbytes
from .lora import AdapterGather, PeftAdapterExport, adapters, base_model, base_params, merge_into
from .sharding import distinct_boxes, gather_to

WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def load_hf_checkpoint(model: torch.nn.Module, path) -> int:
    """Fill every parameter of `model` from the HF safetensors checkpoint at `path`.

    `model` may be FSDP2-sharded (with VeOmni's EP plan and any SP layout) or plain; its parameters
    must be materialised (e.g. `build_parallelize_model(..., weights_path=None,
    should_skip_hf_weight_load=True)`, which allocates storage without initialising it). Needs no
    collective. Returns the number of bytes this rank read from the checkpoint.
    """
    source = read_checkpoint(path)
    params = base_params(model)
    on_meta = [name for name, p in params.items() if p.local.is_meta]
    if on_meta:
        raise CheckpointError(
            f"{len(on_meta)} parameters are still on the meta device (e.g. {on_meta[0]}): materialise the model first, "
            "e.g. build_parallelize_model(model, weights_path=None, init_device='meta', should_skip_hf_weight_load=True)"
        )
    layout = model_layout(base_model(model), params, source)
    read = 0
    for name, pieces in layout.pieces.items():
        target = params[name]
        by_file: dict[Path, list] = {}
        for piece in pieces:
            overlap = target.local_slices(piece.region)
            if overlap is not None:
                by_file.setdefault(source[piece.key].file, []).append((piece, overlap))
        # One parameter per opening: the shard file's pages this rank touched are unmapped before
        # the next parameter, so they never add up beyond one parameter's worth.
        for file, wanted in by_file.items():
            try:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for piece, (in_region, in_local) in wanted:
                        # A stacked piece has no expert dim on disk: its first region slice is that dim.
                        tensor = f.get_slice(piece.key)[in_region[1:] if piece.stacked else in_region]
                        target.local[in_local].copy_(tensor.unsqueeze(0) if piece.stacked else tensor)
                        read += tensor.numel() * tensor.element_size()
                        del tensor
            except Exception as err:
                raise CheckpointError(f"{file}: reading {name} failed: {err}") from err
    return read


def _plan_shards(entries: list[tuple[str, torch.dtype, tuple]], max_shard_size: int) -> list[list]:
    """Consecutive runs of entries, each at most `max_shard_size` bytes (a bigger tensor alone)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = tensor_nbytes(entry[2], entry[1])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _copy_side_files(source: Optional[Path], staged: Path, model: torch.nn.Module, processor) -> None:
    """config.json, generation config, tokenizer/processor files: the source's, else the model's."""
    copied = False
    if source is not None:
        for item in sorted(source.iterdir()):
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, staged / item.name)
                copied |= item.name == "config.json"
    if not copied:
        model.config.save_pretrained(staged)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staged)
    if processor is not None:
        processor.save_pretrained(staged)


@torch.no_grad()
def save_hf_checkpoint(
    model: torch.nn.Module,
    path,
    *,
    source=None,
    processor=None,
    max_shard_size: int = 5 * 2**30,
    dtype: Optional[torch.dtype] = None,
    peft: Optional[PeftAdapterExport] = None,
) -> Path:
    """Write `model` as a HF checkpoint at `path` (atomically; see `publish.py`). Every rank calls it.

    `source`: the checkpoint the model was loaded from. The output then has exactly its keys,
    shapes and dtypes, its talker/code2wav tensors when the model lacks them, and its config and
    processor files. Without it, the layout is the one `save_pretrained` writes for this model.
    `dtype` overrides the floating-point dtype of the model's tensors (default: the source's, else
    the parameter's). `processor` is saved too (after the source's files). A LoRA model (VeOmni's
    `VeOmniLoraModel`) is written merged: each base weight plus its adapters' update; `peft` also
    writes its adapters, gathered once for both.
    """
    rank, world = _rank_world()
    path = Path(path)
    source = Path(source) if source is not None else None
    source_entries = read_checkpoint(source) if source is not None else None
    params = base_params(model)
    layout = model_layout(base_model(model), params, source_entries)
    merges = {}
    for adapter in adapters(model):
        merges.setdefault(adapter.base, []).append(adapter)
    gather_adapters = AdapterGather(model) if merges else None

    def out_dtype(key):
        original = layout.dtypes[key]
        return dtype if dtype is not None and original.is_floating_point else original

    entries = [(piece.key, out_dtype(piece.key), piece.shape) for pieces in layout.pieces.values() for piece in pieces]
    entries += [(key, source_entries[key].dtype, source_entries[key].shape) for key in layout.carried]
    shards = _plan_shards(entries, max_shard_size)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    file_of = {entry[0]: i for i, shard in enumerate(shards) for entry in shard}

    staged = staging_dir(path)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staged, ignore_errors=True)  # left by a save that died
        staged.mkdir()
    _barrier()

    writers: dict[int, ShardWriter] = {}

    def write(key: str, tensor: torch.Tensor) -> None:
        i = file_of[key]
        if i % world != rank:
            return
        if i not in writers:
            writers[i] = ShardWriter(staged / names[i], shards[i])
        writers[i].write(key, tensor)
        if writers[i].done:
            writers.pop(i).close()

    boxes = distinct_boxes(params)
    for name, param in params.items():
        owners = {file_of[piece.key] % world for piece in layout.pieces[name]}
        full = gather_to(param, boxes[name], owners)  # every rank, every parameter, same order
        if full is not None and name in merges:
            full = full.float()  # the base may be held in bf16 (parallel/lora.py): merge in fp32
        for adapter in merges.get(name, ()):
            a, b = gather_adapters.pair(adapter, owners | ({0} if peft is not None else set()))
            if full is not None:
                merge_into(full, adapter, a, b)
            if peft is not None and rank == 0:
                peft.add(adapter, layout, a, b)
        if full is not None:
            for piece in layout.pieces[name]:
                part = full[piece.region]
                write(piece.key, (part[0] if piece.stacked else part).to(out_dtype(piece.key)))
            del full
    for key in layout.carried:
        if file_of[key] % world == rank:
            with safe_open(str(source_entries[key].file), framework="pt", device="cpu") as f:
                write(key, f.get_tensor(key))
    if writers:
        raise RuntimeError(f"rank {rank}: shards left unfinished: {sorted(names[i] for i in writers)}")
    if peft is not None and rank == 0:
        peft.write()

    if rank == 0:
        index = {
            "metadata": {"total_size": sum(tensor_nbytes(shape, dt) for _, dt, shape in entries)},
            "weight_map": {key: names[i] for key, i in file_of.items()},
        }
        (staged / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _copy_side_files(source, staged, model, processor)
    _barrier()  # every shard is closed (and fsynced) before the directory goes live
    if rank == 0:
        publish(staged, path)
    _barrier()
    return path


def checkpoint_nbytes(path) -> int:
    """Bytes of tensor data in a HF safetensors checkpoint (for memory reports)."""
    return sum(entry.nbytes for entry in read_checkpoint(path).values())

