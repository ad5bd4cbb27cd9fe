"""torchrun worker of `python -m veomni_omni.bench sp`: fill-back peak memory and host-sync count
on this SP group (world = SP size). argv: out.json --quick|--full"""

from __future__ import annotations

import json
import sys
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakAllocations(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the block and still alive."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}  # inputs: not allocated here

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


class HostSyncCounter(TorchFunctionMode):
    """Counts calls that make an accelerator wait for the host to read a value back, by phase
    (multimodal part / text decoder) and by the library whose code made the call."""

    _ALWAYS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero, torch.masked_select,
               torch.Tensor.masked_select, torch.Tensor.masked_scatter, torch.unique, torch.Tensor.unique}

    def __init__(self):
        super().__init__()
        self.counts = {}
        self.phase = "multimodal"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            caller = next(f.filename for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
            owner = "veomni_omni" if "veomni_omni" in caller else "transformers" if "transformers" in caller else "other"
            key = f"{self.phase}/{owner}"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **kwargs)

    def _syncs(self, func, args, kwargs) -> bool:
        if func in self._ALWAYS:
            return True
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
            return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and "output_size" not in kwargs
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            index = args[1]
            indices = index if isinstance(index, tuple) else (index,)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        return False


def fill_back_memory(group, quick: bool) -> dict:
    from veomni.distributed.sequence_parallel import gather_outputs

    from veomni_omni.models.sequence_parallel import fill_back_visual

    sp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len, hidden = (2048, 512) if quick else (8192, 2048)
    n_visual = seq_len // 2
    generator = torch.Generator().manual_seed(0)
    positions = torch.randperm(seq_len, generator=generator)[:n_visual].sort().values
    order = torch.randperm(n_visual, generator=generator)  # joint ViT row order -> sequence order
    sp_inputs = {"n_visual": n_visual, "visual_fill_positions": positions[torch.argsort(order)]}
    chunk = seq_len // sp_size

    def all_gather_fill_back(embeds, rows):
        full = gather_outputs(embeds, gather_dim=1, group=group)
        rows = gather_outputs(rows, gather_dim=0, group=group)[:n_visual][order]
        full = full[0].index_copy(0, positions, rows).unsqueeze(0)
        return full[:, rank * chunk : (rank + 1) * chunk]

    def peak(fill_back) -> int:
        embeds = torch.randn(1, chunk, hidden, requires_grad=True)
        rows = torch.randn(n_visual // sp_size, hidden, requires_grad=True)
        tracker = PeakAllocations(embeds, rows)
        with tracker:
            fill_back(embeds, rows).sum().backward()
        return tracker.peak

    ours = peak(lambda e, r: fill_back_visual(e, r, sp_inputs, group))
    baseline = peak(all_gather_fill_back)
    return {"seq_len": seq_len, "hidden": hidden, "all_to_all_bytes": ours, "all_gather_bytes": baseline, "ratio": ours / baseline}


def host_syncs(sp_size: int, rank: int) -> dict:
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from veomni_omni.data.sequence_parallel import pack_rows, shard_for_sequence_parallel
    from veomni_omni.testing import build_batch, tiny_thinker_config

    torch.manual_seed(0)
    config = tiny_thinker_config(output_router_logits=False)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
    rows = [
        [("prompt", 3), ("image", 1, 4, 6), ("text", 5)],
        [("prompt", 2), ("audio", 350), ("video", 2, 4, 4), ("text", 4)],
        [("prompt", 2), ("audio_in_video", 2, 4, 4, 230), ("text", 5)],
    ]
    batch = shard_for_sequence_parallel(pack_rows(build_batch(rows, config, with_position_ids=True)), config, sp_size, rank)
    batch.pop("labels")
    counter = HostSyncCounter()
    model.model.language_model.register_forward_pre_hook(lambda *_: setattr(counter, "phase", "decoder"))
    with counter, torch.no_grad():
        model.model(**batch)
    return counter.counts


def main():
    import veomni_omni  # noqa: F401
    from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state

    out_file, quick = sys.argv[1], sys.argv[2] == "--quick"
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world = dist.get_world_size()
    init_parallel_state(dp_size=1, ulysses_size=world, dp_mode="fsdp2", device_type="cpu")
    group = get_parallel_state().ulysses_group
    result = {"memory": fill_back_memory(group, quick), "syncs": host_syncs(world, dist.get_rank())}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        worst = max(gathered, key=lambda r: r["memory"]["ratio"])
        keys = {k for r in gathered for k in r["syncs"]}
        syncs = {k: max(r["syncs"].get(k, 0) for r in gathered) for k in sorted(keys)}  # busiest rank per site
        json.dump({"memory": worst["memory"], "syncs": syncs}, open(out_file, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
