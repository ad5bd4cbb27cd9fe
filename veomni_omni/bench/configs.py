"""Thinker configs and batches for the benchmarks.

- `cpu_thinker_config`: a "small but not tiny" thinker: every component of the real one (MoE with
  real routing, deepstack, audio chunking), widths chosen so a forward+backward on a mixed batch
  takes a few hundred ms on 2 CPU cores.
- `real_thinker_config`: the released Qwen3-Omni-30B-A3B thinker (`qwen3_omni_30b_a3b.json`,
  docs/design.md §3), for `plan` (built on the meta device) and, with fewer layers, for `gpu`,
  `realwidth` and the real-width parity test.

Token ids are the tiny vocabulary's (`veomni_omni.tiny.TOKENS`), so `build_batch` makes inputs
for every config here; only the ids differ from the released checkpoint, not the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.tiny import MEL_BINS, THINKER_TOKEN_IDS, TINY_CODEBOOK, TINY_CODEC, TOKENS, tiny_omni_config

def cpu_thinker_config(output_router_logits: bool = True) -> Qwen3OmniMoeThinkerConfig:
    """~25M parameters: 4 MoE layers (32 experts, top-4), a 4-block ViT with 3 deepstack levels,
    a 4-layer audio encoder, vocabulary 8192."""
    hidden = 256
    return Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            vocab_size=8192,
            hidden_size=hidden,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            moe_intermediate_size=128,
            num_experts=32,
            num_experts_per_tok=4,
            router_aux_loss_coef=0.001,
            output_router_logits=output_router_logits,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5], "interleaved": True},
            pad_token_id=TOKENS["pad"],
        ),
        vision_config=dict(
            depth=4,
            hidden_size=128,
            intermediate_size=512,
            num_heads=4,
            out_hidden_size=hidden,
            num_position_embeddings=256,
            deepstack_visual_indexes=[0, 1, 2],
        ),
        audio_config=dict(
            encoder_layers=4,
            encoder_attention_heads=4,
            encoder_ffn_dim=512,
            d_model=128,
            output_dim=hidden,
            downsample_hidden_size=32,
            num_mel_bins=MEL_BINS,
        ),
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
        **THINKER_TOKEN_IDS,
    )


def cpu_omni_config() -> Qwen3OmniMoeConfig:
    """`cpu_thinker_config` with a talker of the released talker's shape at reduced width, for `plan
    --train talker --measure-cpu`: an MoE decoder with a shared expert (4 layers, 16 experts, top-4), the
    hidden state taken halfway up the thinker (released: 24 of 48), a dense code predictor over the
    released 16 code groups; the tiny codec vocabulary (`TINY_CODEC`) and token roles, so the tiny
    processor encodes its spoken samples."""
    thinker = cpu_thinker_config()
    roles = tiny_omni_config().to_dict()
    groups, hidden = 16, 128
    talker = {
        **roles["talker_config"],
        "text_config": dict(
            vocab_size=TINY_CODEC["vocab"], hidden_size=hidden, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, num_experts=16,
            num_experts_per_tok=4, shared_expert_intermediate_size=128,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5], "interleaved": True},
        ),
        "code_predictor_config": dict(
            vocab_size=TINY_CODEBOOK, hidden_size=hidden, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_code_groups=groups,
        ),
        "num_code_groups": groups,
        "thinker_hidden_size": thinker.text_config.hidden_size,
        "accept_hidden_layer": thinker.text_config.num_hidden_layers // 2,
    }
    code2wav = {**roles["code2wav_config"], "num_quantizers": groups}
    top = {k: v for k, v in roles.items() if k not in ("thinker_config", "talker_config", "code2wav_config")}
    return Qwen3OmniMoeConfig(**{**top, "thinker_config": thinker.to_dict(), "talker_config": talker, "code2wav_config": code2wav})


def cpu_mixed_batch(config: Qwen3OmniMoeThinkerConfig, quick: bool = False, with_position_ids: bool = True) -> dict:
    """A realistic training micro-batch: chat-style rows mixing text, images and audio clips,
    right-padded. About 3 × 330 tokens (quick: 2 × ~200)."""
    if quick:
        rows = [
            [("prompt", 16), ("image", 1, 8, 8), ("text", 48)],
            [("prompt", 12), ("audio", 400), ("text", 48)],
        ]
    else:
        rows = [
            [("prompt", 24), ("image", 1, 16, 16), ("text", 200)],
            [("prompt", 20), ("audio", 1200), ("text", 150)],
            [("prompt", 16), ("image", 1, 12, 12), ("audio", 600), ("text", 160)],
        ]
    return build_batch(rows, config, seed=0, with_position_ids=with_position_ids)


RELEASED_CONFIG = Path(__file__).with_name("qwen3_omni_30b_a3b.json")


def released_config() -> Qwen3OmniMoeConfig:
    """Qwen3-Omni-30B-A3B's released config (`qwen3_omni_30b_a3b.json`, written from the published
    config.json): thinker, talker and code2wav at their released sizes and token ids."""
    fields = json.loads(RELEASED_CONFIG.read_text())
    fields.pop("_comment")
    return Qwen3OmniMoeConfig(**fields)


def real_thinker_config(
    text_layers: Optional[int] = None,
    vision_depth: Optional[int] = None,
    deepstack_visual_indexes=None,
    audio_layers: Optional[int] = None,
    output_router_logits: bool = True,
) -> Qwen3OmniMoeThinkerConfig:
    """The released thinker (`released_config`), every width, head count, expert count, top-k,
    vocabulary and rope setting as published; None keeps a depth as released, a number gives the
    reduced-depth model (`deepstack_visual_indexes` must then lie inside `vision_depth`). The special
    token ids are the tiny vocabulary's (`veomni_omni.tiny.TOKENS`), so `build_batch` makes its
    inputs; they set no shape."""
    thinker = released_config().thinker_config.to_dict()
    text, vision, audio = thinker["text_config"], thinker["vision_config"], thinker["audio_config"]
    for fields, key, value in (
        (text, "num_hidden_layers", text_layers),
        (vision, "depth", vision_depth),
        (vision, "deepstack_visual_indexes", None if deepstack_visual_indexes is None else list(deepstack_visual_indexes)),
        (audio, "encoder_layers", audio_layers),
    ):
        if value is not None:
            fields[key] = value
    if not all(0 <= i < vision["depth"] for i in vision["deepstack_visual_indexes"]):
        raise ValueError(f"deepstack_visual_indexes {vision['deepstack_visual_indexes']} outside a ViT of depth {vision['depth']}")
    text.update(output_router_logits=output_router_logits, pad_token_id=TOKENS["pad"])
    thinker.update(THINKER_TOKEN_IDS, architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"])
    return Qwen3OmniMoeThinkerConfig(**thinker)


def cpu_workload(args):
    """The CPU timing benchmarks' shared setup: the patched tiny thinker (seed 0, train mode), its
    mixed batch, and (reps, warmup) from the parsed `args`."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    import veomni_omni

    veomni_omni.apply()
    config = cpu_thinker_config()
    torch.manual_seed(0)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(config).train()
    reps, warmup = (2, 0) if args.quick else (args.reps, args.warmup)
    return config, model, cpu_mixed_batch(config, quick=args.quick), reps, warmup


def realwidth_thinker_config(output_router_logits: bool = False, vocab_size: Optional[int] = None, text_layers: int = 2) -> Qwen3OmniMoeThinkerConfig:
    """The released thinker at reduced depth for CPU (`realwidth` benchmark, real-width parity test):
    two MoE text layers (128 experts top-8, vocabulary 152064; the deepstack features added after
    layer 0 reach the loss only through layer 1), a 2-block ViT whose block 0 feeds the one
    deepstack level, 2 audio layers; ~2.0B parameters, 8.1 GB in fp32. `vocab_size` cuts the
    vocabulary, the one width that does not fit two fp32 ranks in 24 GiB (`REALWIDTH_2RANK_VOCAB`);
    `text_layers` the depth (`REALWIDTH_EP_TEXT_LAYERS`)."""
    config = real_thinker_config(
        text_layers=text_layers, vision_depth=2, deepstack_visual_indexes=[0], audio_layers=2, output_router_logits=output_router_logits
    )
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    return config


# The vocabulary of the 2-rank real-width runs (parity test, `realwidth` ep and memory sections). At
# the released 152064, VeOmni's FSDP2 layout holds 12-14 GB per fp32 rank (measured on 2 gloo ranks,
# one text layer: the root's unsharded embeddings and lm_head, their full gradients and reduce-scatter
# copies, the EP-local experts gathered over a 1-rank mesh), so two ranks do not fit a 24 GiB machine;
# at 65536 two ranks of the 2-layer model peaked at 22.7 GB used of 23.5 GiB. 32768 (2^15) leaves a
# margin and keeps every other width real. The single-process runs keep the released vocabulary.
REALWIDTH_2RANK_VOCAB = 32768

# The text depth of `realwidth`'s EP 2 vs FSDP-only timing. Without EP each rank gathers a whole layer's
# 128 experts (604M parameters, 2.4 GB in fp32) and its gradient, and FSDP2 prefetches the next layer's:
# at two layers FSDP-only plans 11.8 GiB per rank, so two ranks do not fit 24 GiB; at one, 8.0 GiB.
REALWIDTH_EP_TEXT_LAYERS = 1


# The real-width sample mix (`build_batch` rows): an image of 256 visual tokens, a 10 s clip (1000 mel
# frames, 130 audio tokens), a short video (4 frames at 256×256: 128 tokens), text; 2050 tokens.
# Packed two per data-parallel rank (`REALWIDTH_DP_PACKS`) or all four in one sequence for Ulysses SP.
REALWIDTH_SAMPLES = {
    "image": [("prompt", 40), ("image", 1, 32, 32), ("text", 330)],
    "audio": [("prompt", 30), ("audio", 1000), ("text", 200)],
    "video": [("prompt", 20), ("video", 2, 16, 16), ("text", 250)],
    "text": [("prompt", 50), ("text", 640)],
}
REALWIDTH_DP_PACKS = (("image", "video"), ("audio", "text"))


def realwidth_dp_batches(config) -> list[dict]:
    """Each data-parallel rank's padded batch of the real-width mix (`REALWIDTH_DP_PACKS[r]`, seed r,
    with M-RoPE positions); concatenated, the global batch of the single-process reference."""
    return [
        build_batch([REALWIDTH_SAMPLES[name] for name in pack], config, seed=rank, with_position_ids=True)
        for rank, pack in enumerate(REALWIDTH_DP_PACKS)
    ]


def rank_share(batches: list[dict], config, sp: int, dp_rank: int, sp_rank: int) -> dict:
    """This rank's input when data-parallel rank r holds `batches[r]`: its batch packed into one sequence;
    under Ulysses SP (`sp` > 1) the whole global batch packed into one sequence and this rank's slice of it."""
    from veomni_omni.data.sequence_parallel import pack_rows, shard_for_sequence_parallel
    from veomni_omni.data.shaped_batches import concat_batches

    if sp > 1:
        return shard_for_sequence_parallel(pack_rows(concat_batches(batches)), config, sp, sp_rank)
    return pack_rows(batches[dp_rank])
