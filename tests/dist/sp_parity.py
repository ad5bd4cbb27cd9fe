"""torchrun worker: Ulysses SP (× FSDP2) on packed multimodal sequences. Each SP group packs its
samples into one sequence; the collator-side sharding gives each rank its slice; the loss is
normalised as VeOmni's trainer does. Rank 0 saves loss and gathered gradients per case. A case with
"vision_attention": "flash_varlen" runs the ViT on `flash_varlen_stand_in` (a flash-style varlen
implementation on CPU: one call per forward with the gathered sequence's boundaries), counting its calls.

argv: checkpoint_dir cases.json out.pt sp_size [ep_size]
"""

import json
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

from _common import build, finish, full_gradients, summed_over_ranks, veomni_scaled_loss  # same directory (patches applied there first)
from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state

from veomni_omni.data.sequence_parallel import pack_rows, shard_for_sequence_parallel
from veomni_omni.data.shaped_batches import build_batch


FLASH_STAND_IN = "flash_varlen_stand_in"  # "flash" in the name: transformers treats it as a flash implementation
flash_calls = 0


def flash_varlen_stand_in(module, query, key, value, attention_mask, scaling=None, cu_seq_lens_q=None, **kwargs):
    """What flash-attn's varlen call computes, on CPU: attention within each [cu[i], cu[i+1]) of the
    (1, heads, seq, dim) inputs; (1, seq, heads, dim) out."""
    global flash_calls
    flash_calls += 1
    bounds = cu_seq_lens_q.tolist()
    out = torch.cat([
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scaling)
        for a, b in zip(bounds[:-1], bounds[1:])
    ], dim=2)
    return out.transpose(1, 2), None


def main():
    checkpoint, cases_file, out_file, sp_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ep_size = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    dist.init_process_group("gloo", timeout=timedelta(seconds=90))
    world = dist.get_world_size()
    init_parallel_state(
        dp_size=world // sp_size, ulysses_size=sp_size, dp_mode="fsdp2", device_type="cpu",
        extra_parallel_sizes=(ep_size,), extra_parallel_names=("ep",),
    )
    state = get_parallel_state()
    model = build(checkpoint)
    config = model.config
    AttentionInterface.register(FLASH_STAND_IN, flash_varlen_stand_in)
    experts = model.model.language_model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == config.text_config.num_experts // ep_size, "experts not sharded over EP"
    results = {}
    for name, case in json.load(open(cases_file)).items():
        print(f"rank {dist.get_rank()}: {name} start", flush=True)
        group = case["groups"][state.dp_rank]
        packed = pack_rows(build_batch(group["rows"], seed=group["seed"], with_position_ids=True))
        batch = shard_for_sequence_parallel(packed, config, sp_size, state.sp_rank)

        model.zero_grad(set_to_none=True)
        config.vision_config._attn_implementation = FLASH_STAND_IN if case.get("vision_attention") == "flash_varlen" else "sdpa"
        calls_before = flash_calls
        loss = veomni_scaled_loss(model(**batch, use_cache=False).loss, batch)
        loss.backward()
        grads = full_gradients(model)
        total = summed_over_ranks(loss)
        if dist.get_rank() == 0:
            results[name] = {"loss": total / world, "grads": grads, "flash_calls": flash_calls - calls_before}
    finish(results, out_file)


if __name__ == "__main__":
    main()
