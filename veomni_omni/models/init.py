"""Weight initialisation for models built from config (training from scratch)."""

from __future__ import annotations

import torch
from transformers import initialization as init
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf

_EXPERTS = (hf.Qwen3OmniMoeThinkerTextExperts, hf.Qwen3OmniMoeTalkerTextExperts)
_ROUTERS = (hf.Qwen3OmniMoeThinkerTextTopKRouter, hf.Qwen3OmniMoeTalkerTextTopKRouter)


@torch.no_grad()
def init_weights(self, module):
    """HF's init, plus the talker's experts and router, which HF 5.22 leaves at torch.empty / zero."""
    PreTrainedModel._init_weights(self, module)
    std = getattr(self.config, "initializer_range", None) or 0.02
    if isinstance(module, _EXPERTS):
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
    elif isinstance(module, _ROUTERS):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, hf.Qwen3OmniMoeCode2Wav):
        offsets = torch.arange(module.config.num_quantizers).view(1, -1, 1) * module.config.codebook_size
        init.copy_(module.code_offset, offsets)
    elif isinstance(module, hf.SinusoidsPositionEmbedding):
        init.copy_(module.positional_embedding, module.compute_default_singular_positional_embedding())
