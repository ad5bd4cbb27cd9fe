"""Where each parameter's local data sits in the full (unsharded) parameter, and how to gather it.

A parameter of the parallelised model is one of
- a plain tensor (single process, or not sharded): the whole parameter;
- an FSDP2 DTensor: `to_local()` is a box of the DTensor's global shape (Shard/Replicate only);
- an expert weight under VeOmni's EP plan: the DTensor's global shape is already this EP rank's
  slice `[E/ep, ...]` of the full `[E, ...]`, recorded in `model._fqn2spec_info` (placement
  `Shard(dim)` over the `ep` mesh). The EP offset is added on top of the FSDP box.

Saving assembles a whole parameter only on the ranks that write it (`gather_to`): the others send
their box point to point, so no rank ever holds more than the parameter it is writing, and
FSDP and EP sharding are gathered by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


@dataclass
class ExpertShard:
    group: dist.ProcessGroup
    rank: int
    size: int
    dim: int


@dataclass
class ShardedParam:
    name: str
    param: torch.nn.Parameter
    global_shape: tuple[int, ...]  # the full parameter, every shard put together
    offset: tuple[int, ...]  # where this rank's local data starts inside it
    local_shape: tuple[int, ...]
    expert_shard: Optional[ExpertShard]

    @property
    def local(self) -> torch.Tensor:
        """This rank's data, a view into the parameter's storage (writes land in the model)."""
        return self.param.to_local() if isinstance(self.param, DTensor) else self.param.data

    def local_slices(self, region: tuple[slice, ...]) -> Optional[tuple[tuple[slice, ...], tuple[slice, ...]]]:
        """For a region of the full parameter: the part this rank holds, as (slices into the region,
        slices into the local data), or None when this rank holds none of it."""
        in_region, in_local = [], []
        for r, start, length in zip(region, self.offset, self.local_shape):
            lo, hi = max(r.start, start), min(r.stop, start + length)
            if lo >= hi:
                return None
            in_region.append(slice(lo - r.start, hi - r.start))
            in_local.append(slice(lo - start, hi - start))
        return tuple(in_region), tuple(in_local)


def sharded_params(model: torch.nn.Module) -> dict[str, ShardedParam]:
    """Every parameter of `model` (in `named_parameters` order) with its place in the full parameter."""
    spec_info = getattr(model, "_fqn2spec_info", None) or {}
    params = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            if any(type(p) not in (Shard, Replicate) for p in param.placements):
                raise NotImplementedError(f"{name}: placements {param.placements} are not plain Shard/Replicate")
            local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        else:
            local_shape, offset = tuple(param.shape), (0,) * param.ndim
        global_shape, offset = list(param.shape), list(offset)
        expert_shard = None
        info = spec_info.get(name)
        if info is not None and isinstance(info.placement, Shard):
            mesh = info.para_mesh
            dim = info.placement.dim
            expert_shard = ExpertShard(mesh.get_group(), mesh.get_local_rank(), mesh.size(), dim)
            offset[dim] += expert_shard.rank * global_shape[dim]
            global_shape[dim] *= expert_shard.size
        params[name] = ShardedParam(name, param, tuple(global_shape), tuple(offset), tuple(local_shape), expert_shard)
    return params


Box = tuple[int, tuple[int, ...], tuple[int, ...]]  # (rank holding it, offset, shape)


def distinct_boxes(params: dict[str, ShardedParam]) -> dict[str, list[Box]]:
    """Per parameter, the distinct non-empty boxes held across ranks, each with the lowest rank
    holding it (replicas hold identical boxes; shards hold disjoint ones)."""
    mine = {name: (p.offset, p.local_shape) for name, p in params.items()}
    if dist.is_available() and dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    boxes = {}
    for name in params:
        seen = {}
        for rank, held in enumerate(everyone):
            offset, shape = held[name]
            if all(shape) and (offset, shape) not in seen:
                seen[(offset, shape)] = rank
        boxes[name] = [(rank, offset, shape) for (offset, shape), rank in seen.items()]
    return boxes


def gather_to(param: ShardedParam, boxes: list[Box], owners: set[int]) -> Optional[torch.Tensor]:
    """The whole parameter, in host memory, on each rank in `owners` (None elsewhere). Every rank
    calls it for the same parameters in the same order; owners receive one box at a time, on the
    parameter's device (NCCL sends device tensors)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    local = param.local
    full = torch.empty(param.global_shape, dtype=local.dtype) if rank in owners else None
    sends = []
    for src, offset, shape in boxes:
        region = tuple(slice(o, o + n) for o, n in zip(offset, shape))
        for dst in sorted(owners):
            if src == rank and dst == rank:
                full[region].copy_(local)
            elif src == rank:
                data = local.contiguous()
                sends.append((dist.isend(data, dst), data))  # the buffer must outlive the send
            elif dst == rank:
                buffer = torch.empty(shape, dtype=local.dtype, device=local.device)
                dist.recv(buffer, src)
                full[region].copy_(buffer)
                del buffer
    for work, _ in sends:
        work.wait()
    return full
