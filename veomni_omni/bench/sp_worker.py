"""torchrun worker of `python -m veomni_omni.bench sp`: fill-back peak memory, host-sync count and
audio-tower work on this SP group (world = SP size), the micro batches sharded as VeOmni's trainer
shards them (its MainCollator with the model's hooks). argv: out.json --quick|--full"""

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

    from veomni_omni.parallel.sequence_parallel import fill_back_visual

    sp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    seq_len, hidden = (2048, 512) if quick else (8192, 2048)
    n_visual = seq_len // 2
    generator = torch.Generator().manual_seed(0)
    positions = torch.randperm(seq_len, generator=generator)[:n_visual].sort().values
    order = torch.randperm(n_visual, generator=generator)  # joint ViT row order -> sequence order
    fill_positions = positions[torch.argsort(order)]
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

    ours = peak(lambda e, r: fill_back_visual(e, r, fill_positions, group))
    baseline = peak(all_gather_fill_back)
    return {"seq_len": seq_len, "hidden": hidden, "all_to_all_bytes": ours, "all_gather_bytes": baseline, "ratio": ours / baseline}


def veomni_sp_shard(model, rows) -> dict:
    """This rank's micro batch for `rows` (`build_batch` segments, one sample each) as VeOmni's trainer
    makes it under Ulysses SP: the samples in VeOmni's layout through VeOmni's MainCollator (packing,
    its SP collator) with the model's collate infos and SP shard hook."""
    from veomni.data.data_collator import MainCollator

    from veomni_omni.data.veomni_transform import veomni_layout
    from veomni_omni.data.shaped_batches import build_batch

    features = []
    for seed, row in enumerate(rows):
        sample = build_batch([row], model.config, seed=seed, with_position_ids=True)
        sample = {k: v[0] if k in ("input_ids", "attention_mask", "labels") else v for k, v in sample.items()}
        sample["position_ids"] = sample["position_ids"][:, 0]
        features.append(veomni_layout(sample))
    collator = MainCollator(data_collate_info=model.get_extra_collate_infos(), metadata_collate_func=model.get_metadata_collate_func())
    return collator(features)


def host_syncs(model) -> dict:
    rows = [
        [("prompt", 3), ("image", 1, 4, 6), ("text", 5)],
        [("prompt", 2), ("audio", 350), ("video", 2, 4, 4), ("text", 4)],
        [("prompt", 2), ("audio_in_video", 2, 4, 4, 230), ("text", 5)],
    ]
    batch = veomni_sp_shard(model, rows)
    batch.pop("labels")
    counter = HostSyncCounter()
    model.model.language_model.register_forward_pre_hook(lambda *_: setattr(counter, "phase", "decoder"))
    with counter, torch.no_grad():
        model.model(**batch)
    return counter.counts


def audio_work(model, quick: bool) -> dict:
    """FLOPs of the audio tower on this rank's SP shard, and (for comparison) of encoding all the
    batch's audio in one call, as every rank would without SP."""
    from torch.utils.flop_counter import FlopCounterMode

    from veomni_omni.data.shaped_batches import build_batch

    clips = (1200, 3100) if quick else (3000, 4500, 1800, 6000)  # mel frames (100 per second)
    rows = [[("prompt", 3), ("audio", frames), ("text", 5)] for frames in clips]

    def flops(fn) -> int:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    whole = build_batch(rows, model.config, with_position_ids=True)
    everything = flops(lambda: model.model.get_audio_features(whole["input_features"], whole["feature_attention_mask"]))
    audio = veomni_sp_shard(model, rows)["sp_inputs"].audio
    mine = flops(lambda: model.model.audio_tower(None, **audio.tower_kwargs())) if audio is not None else 0
    return {"all_audio_flops": everything, "rank_flops": mine}


def main():
    import veomni_omni  # noqa: F401
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration
    from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state

    from veomni_omni.tiny import tiny_thinker_config

    out_file, quick = sys.argv[1], sys.argv[2] == "--quick"
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    world = dist.get_world_size()
    init_parallel_state(dp_size=1, ulysses_size=world, dp_mode="fsdp2", device_type="cpu")
    group = get_parallel_state().ulysses_group
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config(output_router_logits=False)).eval()
    result = {"memory": fill_back_memory(group, quick), "syncs": host_syncs(model), "audio": audio_work(model, quick)}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        worst = max(gathered, key=lambda r: r["memory"]["ratio"])
        keys = {k for r in gathered for k in r["syncs"]}
        syncs = {k: max(r["syncs"].get(k, 0) for r in gathered) for k in sorted(keys)}  # busiest rank per site
        per_rank = [r["audio"]["rank_flops"] for r in gathered]
        everything = gathered[0]["audio"]["all_audio_flops"]
        audio = {"all_audio_flops": everything, "per_rank_flops": per_rank, "ratio": max(per_rank) / everything}
        json.dump({"memory": worst["memory"], "syncs": syncs, "audio": audio}, open(out_file, "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
