"""torchrun worker (2 ranks, gloo) for tests/test_bad_input.py. Rank 0 saves what it saw.

1. `check_micro_batch` on good micro batches passes on both ranks; then rank 1 alone holds a sample
   whose audio placeholders do not match its clip: both ranks must raise the same BadInputError,
   and both must then still meet at a barrier (nobody is left inside a collective).
2. FSDP2 (dp 2): rank 0 trains on a real mixed batch, rank 1 on `padding_batch`.
3. Ulysses SP 2 (dp 1): the SP group has no sample; both ranks get `padding_batch` packed and sharded.

argv: checkpoint_dir out.pt
"""

import sys
import time
from datetime import timedelta

import torch.distributed as dist

from _common import build, finish, full_gradients, step_counting_vit  # same directory (patches applied there first)
from veomni.distributed.parallel_state import clear_parallel_state, get_parallel_state, init_parallel_state

from veomni_omni.data.checks import BadInputError, check_micro_batch, padding_batch
from veomni_omni.data.sequence_parallel import pack_rows, shard_for_sequence_parallel
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.tiny import TOKENS

GOOD_ROWS = [[("prompt", 2), ("audio", 120), ("text", 4)], [("prompt", 2), ("image", 1, 4, 4), ("text", 3)]]
REAL_ROWS = [[("prompt", 2), ("image", 1, 4, 4), ("audio", 80), ("video", 2, 4, 4), ("text", 5)], [("prompt", 3), ("text", 6)]]


def samples(rank: int, bad: bool) -> list[dict]:
    out = [build_batch([row], seed=10 * rank + i) for i, row in enumerate(GOOD_ROWS)]
    if bad:  # one audio placeholder of the first sample turned into text
        ids = out[0]["input_ids"][0]
        ids[(ids == TOKENS["audio"]).nonzero()[0, 0]] = 7
    return out


def agreement(rank: int, config) -> dict:
    ids = [2 * i + rank for i in range(len(GOOD_ROWS))]  # rank 0: samples 0, 2; rank 1: samples 1, 3
    check_micro_batch(samples(rank, bad=False), config, ids)
    start = time.time()
    try:
        check_micro_batch(samples(rank, bad=rank == 1), config, ids)
        message = None
    except BadInputError as err:
        message = str(err)
    seconds = time.time() - start
    dist.barrier()
    gathered = [None, None]
    dist.all_gather_object(gathered, (message, seconds))
    return {"messages": [m for m, _ in gathered], "seconds": max(s for _, s in gathered)}


def main():
    checkpoint, out_file = sys.argv[1:3]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    init_parallel_state(dp_size=2, dp_mode="fsdp2", device_type="cpu")
    results = {}

    model = build(checkpoint)
    results["agreement"] = agreement(rank, model.config)

    batch = build_batch(REAL_ROWS, seed=3, with_position_ids=True) if rank == 0 else padding_batch(model.config)
    loss, grads, vit_calls = step_counting_vit(model, batch)
    results["empty_rank"] = {"loss": loss, "grads": grads, "vit_calls": vit_calls, "batch": batch}

    dist.barrier()
    clear_parallel_state()  # same processes, new layout: Ulysses SP over both ranks
    init_parallel_state(dp_size=1, ulysses_size=2, dp_mode="fsdp2", device_type="cpu")
    model = build(checkpoint)
    shard = shard_for_sequence_parallel(pack_rows(padding_batch(model.config)), model.config, 2, get_parallel_state().sp_rank)
    out = model(**shard, use_cache=False)
    out.loss.backward()
    results["empty_sp_group"] = {"loss": out.loss.item(), "aux_loss": out.aux_loss.item(), "grads": full_gradients(model)}

    model.config.get_text_config()._attn_implementation = "eager"  # would attend within each rank's slice
    try:
        model(**shard, use_cache=False)
        results["eager_under_sp"] = None
    except ValueError as error:
        results["eager_under_sp"] = str(error)

    finish(results, out_file)


if __name__ == "__main__":
    main()
