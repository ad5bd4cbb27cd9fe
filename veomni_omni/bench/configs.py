"""Thinker configs and batches for the benchmarks.

- `cpu_thinker_config`: a "small but not tiny" thinker: every component of the real one (MoE with
  real routing, deepstack, audio chunking), widths chosen so a forward+backward on a mixed batch
  takes a few hundred ms on 2 CPU cores.
- `real_thinker_config`: the Qwen3-Omni-30B-A3B thinker's dimensions (docs/design.md §3), for
  `plan` (built on the meta device) and, with fewer layers, for `gpu`.

Token ids are the tiny vocabulary's (`veomni_omni.testing.TOKENS`), so `build_batch` makes inputs
for every config here; only the ids differ from the released checkpoint, not the shapes.
"""

from __future__ import annotations

from transformers import Qwen3OmniMoeThinkerConfig

from veomni_omni.testing import MEL_BINS, TOKENS, build_batch

_SPECIAL_IDS = dict(
    vision_start_token_id=TOKENS["vision_start"],
    audio_start_token_id=TOKENS["audio_start"],
    image_token_id=TOKENS["image"],
    video_token_id=TOKENS["video"],
    audio_token_id=TOKENS["audio"],
)


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
        **_SPECIAL_IDS,
    )


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


def real_thinker_config(
    text_layers: int = 48,
    vision_depth: int = 27,
    deepstack_visual_indexes=(8, 16, 24),
    audio_layers: int = 32,
    output_router_logits: bool = True,
) -> Qwen3OmniMoeThinkerConfig:
    """Qwen3-Omni-30B-A3B thinker dimensions (the released config.json's thinker fields that set
    parameter shapes). Defaults give the full model; fewer layers give the `gpu` benchmark's
    reduced-depth model at real widths."""
    hidden = 2048
    return Qwen3OmniMoeThinkerConfig(
        text_config=dict(
            vocab_size=152064,
            hidden_size=hidden,
            intermediate_size=768,  # dense-MLP width; unused (every layer is MoE: decoder_sparse_step 1)
            num_hidden_layers=text_layers,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            max_position_embeddings=65536,
            router_aux_loss_coef=0.001,
            output_router_logits=output_router_logits,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20], "interleaved": True},
            pad_token_id=TOKENS["pad"],
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            in_channels=3,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=hidden,
            num_position_embeddings=2304,
            deepstack_visual_indexes=list(deepstack_visual_indexes),
            hidden_act="gelu_pytorch_tanh",
        ),
        audio_config=dict(
            encoder_layers=audio_layers,
            encoder_attention_heads=20,
            encoder_ffn_dim=5120,
            d_model=1280,
            output_dim=hidden,
            num_mel_bins=MEL_BINS,
            downsample_hidden_size=480,
            n_window=50,
            n_window_infer=800,
            conv_chunksize=500,
            max_source_positions=1500,
        ),
        position_id_per_seconds=25,
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
        **_SPECIAL_IDS,
    )


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
