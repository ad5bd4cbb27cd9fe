"""torchrun worker: talker training (speech output) through VeOmni's own parallelizer, the thinker frozen.
The top-level model is built as VeOmni's trainer builds it (FSDP2 over every unit, the talker's decoder
layers and code predictor included; experts of the thinker and the talker sharded by the model's EP plan).
For each case every rank trains one step on its own batch, the named losses scaled as VeOmni's trainer
scales them; rank 0 saves the global loss, the whole talker gradients and each rank's expert layout.

argv: checkpoint_dir batches.pt out.pt ep   (batches.pt: {case: [batch of rank 0, batch of rank 1, ...]})
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from _common import build, finish, full_gradients, on_every_rank, summed_over_ranks, veomni_scaled_loss  # same directory
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.distributed.parallel_state import init_parallel_state


def main():
    checkpoint, batches_file, out_file, ep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    init_parallel_state(dp_size=world, dp_mode="fsdp2", device_type="cpu", extra_parallel_sizes=(ep,), extra_parallel_names=("ep",))
    def freeze_thinker(model):
        model.thinker.requires_grad_(False)  # (returns the thinker, which must not replace the model)

    model = build(checkpoint, prepare=freeze_thinker)
    experts = [m.gate_up_proj.shape[0] for m in model.modules() if isinstance(m, hf.Qwen3OmniMoeTalkerTextExperts)]
    results = {"_talker_local_experts": on_every_rank(sorted(set(experts)))}
    for case, per_rank in torch.load(batches_file).items():
        print(f"rank {rank}: {case} start", flush=True)
        model.zero_grad(set_to_none=True)
        batch = per_rank[rank]
        out = model(**batch, use_cache=False)
        loss = veomni_scaled_loss(out.loss, batch)
        loss.backward()
        grads = {name: grad for name, grad in full_gradients(model).items() if name.startswith("talker.")}
        result = {"loss": summed_over_ranks(loss) / world, "grads": grads, "turns": on_every_rank(len(out.talker_logits))}
        if rank == 0:
            results[case] = result
    finish(results, out_file)


if __name__ == "__main__":
    main()
