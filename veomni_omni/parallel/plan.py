"""Expert-parallel plan: the MoE experts' fused weights, sharded along the expert dimension.

VeOmni's `parallelize_model_fsdp2` asks the root model for `get_parallel_plan()` when an `ep` dimension
is on (`init_parallel_state(..., extra_parallel_sizes=(ep,), extra_parallel_names=("ep",))`). Its
`ParallelPlan.apply` then slices every matching parameter to this EP rank's `Shard(0)` chunk
(`gate_up_proj [E, 2I, H] -> [E/ep, 2I, H]`, `down_proj [E, H, I] -> [E/ep, H, I]`), each experts module
is `fully_shard`-ed on its own over the `ep_fsdp` mesh (dim 1; gradients divided by the world size,
as they receive every rank's tokens), and everything else is FSDP2-sharded over all ranks as usual.
Its weight loader slices the full checkpoint tensors by the same plan. The router stays replicated.

VeOmni's own plan for this model names `thinker.model.layers.*`, transformers 5.9's layout; 5.22 puts
the decoder under `model.language_model`. The top-level model's plan also shards the talker's experts
(`talker.model.layers.*`), which train with speech output; a model without its talker matches none.
"""

from __future__ import annotations

EXPERTS = "model.language_model.layers.*.mlp.experts"
TALKER_EXPERTS = "talker.model.layers.*.mlp.experts"
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def expert_parallel_plan(*experts_paths: str):
    """VeOmni ParallelPlan sharding `<experts_path>.{gate_up_proj,down_proj}` along dim 0 over `ep`."""
    from torch.distributed.tensor import Shard
    from veomni.distributed.parallel_plan import ParallelPlan

    patterns = {f"{path}.{name}": Shard(0) for path in experts_paths for name in EXPERT_WEIGHTS}
    plan = ParallelPlan(extra_parallel_plan={"ep": patterns})
    # VeOmni takes the modules it shards over the ep_fsdp mesh from the plan's first key only: name them all
    plan.extra_parallel_fsdp_no_shard_module["ep"] = set(experts_paths)
    return plan


def thinker_parallel_plan(self):
    """`Qwen3OmniMoeThinkerForConditionalGeneration.get_parallel_plan`: experts under `model.language_model`."""
    return expert_parallel_plan(EXPERTS)


def omni_parallel_plan(self):
    """`Qwen3OmniMoeForConditionalGeneration.get_parallel_plan`: the thinker's experts, under `thinker.`,
    and the talker's, under `talker.`."""
    return expert_parallel_plan(f"thinker.{EXPERTS}", TALKER_EXPERTS)


def text_model_parallel_plan(self):
    """`Qwen3OmniMoeThinkerTextModel.get_parallel_plan` (the text decoder built on its own)."""
    return expert_parallel_plan(EXPERTS.removeprefix("model.language_model."))


# The units VeOmni's FSDP2 wraps in the top-level model (it reads the root's `_no_split_modules`): HF's,
# with the code predictor's decoder layers instead of the whole code predictor. The talker's training
# forward uses the code predictor's codec embeddings and heads outside its forward (as HF's generate
# does), where a unit's parameters would still be sharded; they sit in the root unit instead.
OMNI_FSDP_UNITS = [
    "Qwen3OmniMoeThinkerTextDecoderLayer",
    "Qwen3OmniMoeAudioEncoderLayer",
    "Qwen3OmniMoeVisionBlock",
    "Qwen3OmniMoeTalkerDecoderLayer",
    "Qwen3OmniMoeTalkerCodePredictorDecoderLayer",
]
