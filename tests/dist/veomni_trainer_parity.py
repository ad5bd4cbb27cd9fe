"""torchrun worker: VeOmni's own VLMTrainer (unmodified) trains a few steps from a VeOmni YAML; a callback
and a wrapper record, per step, what the parity test needs to recompute the step without the patches.

Per step, on rank 0: the model's full weights at the step's start (before its update), every rank's micro
batches (as the collator made them; under Ulysses SP as VeOmni's packing collator made them, before the SP
stage shards them, which the reference needs whole), the full gradients just before `optimizer.step` (after VeOmni's
clipping, which the config turns into a no-op), the global loss (every rank's share summed over the
micro batches and ranks, divided by the FSDP size VeOmni's `mean_global_loss` multiplies by; in all and
per named loss) and the
grad norm VeOmni reports, how often each rank ran each encoder, plus the layout (world, EP size,
whether the model checkpoints gradients, experts held per rank); at the end, the trained weights.

argv: out.pt config.yaml   (a config as `tasks/train_vlm.py` takes it). Saved: {config file: {layout, steps}}.
"""

import sys

import torch
import torch.distributed as dist

import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextExperts
from veomni.lora.moe_layers import is_lora_moe_experts
from veomni.arguments import parse_args
from veomni.data.data_collator import add_flash_attention_kwargs_from_position_ids
from veomni.distributed.parallel_state import get_parallel_state
from veomni.trainer.callbacks.base import Callback
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainer

from veomni_omni.parallel.expert_parallel import expert_weights
from veomni_omni.testing import gather_full_tensors


class StepRecorder(Callback):
    """Weights and micro batches at step begin, gradients at `optimizer.step`, loss and grad norm at step end."""

    def __init__(self, trainer):
        super().__init__(trainer)
        self.steps = []
        self.encoder_calls = {}
        self.packed = {}  # id(shard) -> (shard, the packed batch it was cut from), under SP
        self._record_packed_batches()
        for name in ("visual", "audio_tower"):
            encoder = getattr(trainer.model.thinker.model, name)
            encoder.register_forward_hook(lambda *_, name=name: self.encoder_calls.update({name: self.encoder_calls[name] + 1}))
        self._wrap_optimizer_step()

    def _all_gather(self, obj):
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, obj)
        return everyone

    def _record_packed_batches(self):
        """Under SP, keep a copy of each micro batch as it enters the collator's last stage (VeOmni's SP
        collator, which ends in our shard hook)."""
        pipeline = self.trainer.collate_fn.preforward_pipeline
        if not self.parallel_state.sp_enabled:
            return
        sp_stage = pipeline[-1]

        def recording_sp_stage(batch):
            packed = {k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()}
            add_flash_attention_kwargs_from_position_ids(packed)  # the boundaries, as VeOmni adds them without SP
            shard = sp_stage(batch)
            self.packed[id(shard)] = (shard, packed)
            return shard

        pipeline[-1] = recording_sp_stage

    def _whole(self, micro_batch):
        if not self.parallel_state.sp_enabled:
            return micro_batch
        shard, packed = self.packed.pop(id(micro_batch))
        assert shard is micro_batch, "a micro batch reached the step that the recorded SP stage did not make"
        return packed

    def on_step_begin(self, state, micro_batches=None, **kwargs):
        batches = [{k: v.clone() if torch.is_tensor(v) else v for k, v in self._whole(mb).items()} for mb in micro_batches]
        self.encoder_calls = {"visual": 0, "audio_tower": 0}
        self.steps.append({
            "weights": gather_full_tensors(self.trainer.model),
            "micro_batches": self._all_gather(batches),
        })

    def _wrap_optimizer_step(self):
        optimizer = self.trainer.optimizer
        step = optimizer.step

        def recording_step(*args, **kwargs):
            self.steps[-1]["grads"] = gather_full_tensors(self.trainer.model, grads=True)
            return step(*args, **kwargs)

        optimizer.step = recording_step

    def on_train_end(self, state, **kwargs):
        self.final_weights = gather_full_tensors(self.trainer.model)

    def on_step_end(self, state, loss=None, loss_dict=None, grad_norm=None, **kwargs):
        shares = self._all_gather(loss)
        self.steps[-1]["loss"] = sum(shares) / self.parallel_state.fsdp_size
        named = self._all_gather(dict(loss_dict or {}))
        self.steps[-1]["losses"] = {name: sum(share[name] for share in named) / self.parallel_state.fsdp_size for name in named[0]}
        self.steps[-1]["grad_norm"] = grad_norm
        self.steps[-1]["encoder_calls"] = self._all_gather(self.encoder_calls)


def run(config_file: str) -> dict:
    """One VeOmni training run, as `tasks/train_vlm.py` starts it, recorded; the result on rank 0."""
    sys.argv[1:] = [config_file]
    args = parse_args(VeOmniVLMArguments)
    trainer = VLMTrainer(args)
    recorder = StepRecorder(trainer.base)
    trainer.base._callbacks.append(recorder)
    state = get_parallel_state()
    model = trainer.base.model
    layout = {
        "world": dist.get_world_size(), "ep": state.ep_size if state.ep_enabled else 1,
        "sp": state.ulysses_size, "sp_rank": recorder._all_gather(state.ulysses_rank),
        "gradient_checkpointing": model.is_gradient_checkpointing,
        # experts each rank holds per MoE layer (the plan shards them over EP)
        "local_experts": recorder._all_gather(
            sorted({
                expert_weights(m)[0].shape[0] for m in model.modules()
                if isinstance(m, Qwen3OmniMoeThinkerTextExperts) or is_lora_moe_experts(m)
            })
        ),
    }
    trainer.train()  # ends with VeOmni tearing the process group down
    if args.train.global_rank != 0:
        return None
    return {"layout": layout, "steps": recorder.steps, "final_weights": recorder.final_weights}


def main():
    out_file, config_file = sys.argv[1:]
    result = run(config_file)
    if result is not None:
        torch.save({config_file: result}, out_file)


if __name__ == "__main__":
    main()
