"""torchrun worker: one training step of the real-width thinker (`bench.configs.realwidth_thinker_config`,
its vocabulary cut to the checkpoint's) through VeOmni's own parallelizer on 2 gloo ranks, compared
tensor by tensor with the unpatched reference's gradients on disk (~1.5B parameters: no rank holds
all gradients at once). `reference DIR VOCAB` (one process, no torchrun) writes that reference.

Layout "fsdp2_ep2": data parallel over both ranks (FSDP2 over the non-expert weights, the 128 experts
split 64 + 64 over EP 2); rank r packs the samples of `REALWIDTH_DP_PACKS[r]` into one sequence.
Layout "sp2_ep2": Ulysses SP 2 × EP 2; the whole global batch packed into one sequence, each rank
holding its slice. The loss is normalised as VeOmni's trainer does. Rank 0 writes the loss, the
`difference_table` of every gradient against the reference and what each rank held.

argv: checkpoint_dir reference_dir out.json layout  |  reference dir vocab_size
"""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

import veomni_omni  # patches + registry, before VeOmni builds anything
from _common import build, summed_over_ranks, veomni_scaled_loss  # same directory
from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state

from veomni_omni.bench.configs import rank_share, realwidth_dp_batches, realwidth_thinker_config
from veomni_omni.data.shaped_batches import concat_batches
from veomni_omni.parity import tensor_difference
from veomni_omni.testing import iter_full_tensors
from veomni_omni.tiny import TOKENS

LAYOUTS = {"fsdp2_ep2": dict(sp=1, ep=2), "sp2_ep2": dict(sp=2, ep=2)}


def write_reference(path: Path, vocab_size: int) -> None:
    """The seeded real-width thinker saved as a checkpoint, and the unpatched HF reference's loss and
    gradients on the global batch (the DP packs as padded rows), saved beside it."""
    config = realwidth_thinker_config(vocab_size=vocab_size)
    torch.manual_seed(0)
    with veomni_omni.unpatched():
        model = Qwen3OmniMoeThinkerForConditionalGeneration(config)
        config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
        batch = concat_batches(realwidth_dp_batches(config))
        loss = model(**batch, use_cache=False).loss
        loss.backward()
    save_file({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, path / "grads.safetensors")
    (path / "reference.json").write_text(json.dumps({
        "loss": loss.item(), "params": sum(p.numel() for p in model.parameters()),
        "tokens": int(batch["attention_mask"].sum()), "names": [n for n, _ in model.named_parameters()],
    }))


def main():
    if sys.argv[1] == "reference":
        return write_reference(Path(sys.argv[2]), int(sys.argv[3]))
    checkpoint, reference, out_file, layout_name = sys.argv[1:5]
    layout = LAYOUTS[layout_name]
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    init_parallel_state(
        dp_size=world // layout["sp"], ulysses_size=layout["sp"], dp_mode="fsdp2", device_type="cpu",
        extra_parallel_sizes=(layout["ep"],), extra_parallel_names=("ep",),
    )
    state = get_parallel_state()
    model = build(checkpoint)
    print(f"rank {rank}: built", flush=True)
    config = model.config
    batch = rank_share(realwidth_dp_batches(config), config, layout["sp"], state.dp_rank, state.sp_rank)

    loss = veomni_scaled_loss(model(**batch, use_cache=False).loss, batch)
    loss.backward()
    print(f"rank {rank}: stepped", flush=True)
    total = summed_over_ranks(loss)

    ids = batch["input_ids"]
    held = {
        "tokens": ids.numel(),
        "media_tokens": {kind: int((ids == TOKENS[kind]).sum()) for kind in ("image", "video", "audio")},
        "local_experts": model.model.language_model.layers[0].mlp.experts.gate_up_proj.shape[0],
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, held)

    table = {}
    with safe_open(Path(reference) / "grads.safetensors", "pt") as ref:
        names = set(ref.keys())
        for name, grad in iter_full_tensors(model, grads=True):
            if rank == 0:
                table[name] = tensor_difference(grad, ref.get_tensor(name) if name in names else None)
        if rank == 0:
            table.update({name: tensor_difference(None, ref.get_tensor(name)) for name in names - table.keys()})
    if rank == 0:
        Path(out_file).write_text(json.dumps({"loss": total / world, "ranks": everyone, "table": table}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
