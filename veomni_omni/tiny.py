"""The tiny Qwen3-Omni-MoE: configs small enough for CPU (the demo job, the benchmarks, the tests) and the
token ids of its vocabulary (veomni_omni/data/processor.py builds the matching tokenizer)."""

from __future__ import annotations

from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig

# Special token ids of the tiny vocabulary (Qwen's real ones are ~151k; same roles).
TOKENS = dict(
    pad=0,
    im_start=490,
    im_end=491,
    vision_start=500,
    vision_end=501,
    audio_start=502,
    audio_end=503,
    image=504,
    video=505,
    audio=506,
    system=477,
    user=478,
    assistant=479,
    tts_pad=508,
    tts_bos=509,
    tts_eos=510,
)
# The tiny talker's codec vocabulary, laid out like the released one (2048 codes, then 1024 ids
# whose offsets from the codebook size are the released ones): HF's generate suppresses the top
# 1024 ids but the end of speech.
TINY_CODEBOOK = 64
TINY_CODEC = dict(
    vocab=TINY_CODEBOOK + 1024,
    pad=TINY_CODEBOOK + 100,
    bos=TINY_CODEBOOK + 101,
    eos=TINY_CODEBOOK + 102,
    nothink=TINY_CODEBOOK + 107,
    think_bos=TINY_CODEBOOK + 108,
    think_eos=TINY_CODEBOOK + 109,
    speakers={"chelsie": TINY_CODEBOOK + 253, "ethan": TINY_CODEBOOK + 254, "aiden": TINY_CODEBOOK + 255},
)
TINY_VOCAB = 512
FIRST_SPECIAL = 480  # plain text tokens are drawn from [1, FIRST_SPECIAL)
# A thinker config's token-id fields, set to the tiny vocabulary's ids (any config the synthetic batches feed).
THINKER_TOKEN_IDS = dict(
    vision_start_token_id=TOKENS["vision_start"],
    audio_start_token_id=TOKENS["audio_start"],
    image_token_id=TOKENS["image"],
    video_token_id=TOKENS["video"],
    audio_token_id=TOKENS["audio"],
)
PATCH_DIM = 3 * 2 * 16 * 16  # channels · temporal_patch · patch²
MEL_BINS = 128

def tiny_thinker_config(**text_overrides) -> Qwen3OmniMoeThinkerConfig:
    """A thinker small enough for CPU that still exercises everything: deepstack levels inside the
    ViT depth and fewer than the text layers, top-2 of 8 experts, mrope_section summing to head_dim/2,
    text and ViT head counts that Ulysses SP of 2 and 4 can scatter."""
    text = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        moe_intermediate_size=16,
        num_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "interleaved": True},
        pad_token_id=TOKENS["pad"],
    )
    text.update(text_overrides)
    return Qwen3OmniMoeThinkerConfig(
        text_config=text,
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=text["hidden_size"],
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        audio_config=dict(
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            d_model=32,
            output_dim=text["hidden_size"],
            downsample_hidden_size=16,
            num_mel_bins=MEL_BINS,
        ),
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
        **THINKER_TOKEN_IDS,
    )


def tiny_omni_config() -> Qwen3OmniMoeConfig:
    """Top-level config (thinker + a tiny talker and code2wav), as in the released checkpoint: the
    token roles (chat, tts, multimodal) at the tiny vocabulary's ids, the codec's at `TINY_CODEC`."""
    thinker = tiny_thinker_config()
    groups = 4
    return Qwen3OmniMoeConfig(
        thinker_config=thinker.to_dict(),
        talker_config=dict(
            text_config=dict(
                vocab_size=TINY_CODEC["vocab"], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, num_experts=4,
                num_experts_per_tok=2, shared_expert_intermediate_size=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "interleaved": True},
            ),
            code_predictor_config=dict(
                vocab_size=TINY_CODEBOOK, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_code_groups=groups,
            ),
            num_code_groups=groups,
            thinker_hidden_size=32,
            spatial_merge_size=2,
            accept_hidden_layer=1,
            codec_pad_id=TINY_CODEC["pad"], codec_bos_id=TINY_CODEC["bos"], codec_eos_token_id=TINY_CODEC["eos"],
            codec_nothink_id=TINY_CODEC["nothink"], codec_think_bos_id=TINY_CODEC["think_bos"],
            codec_think_eos_id=TINY_CODEC["think_eos"], speaker_id=dict(TINY_CODEC["speakers"]),
            audio_end_token_id=TOKENS["audio_end"], **THINKER_TOKEN_IDS,  # the talker's rope index reads them
        ),
        code2wav_config=dict(
            codebook_size=TINY_CODEBOOK, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, num_quantizers=groups, decoder_dim=16, upsample_rates=(2, 2), upsampling_ratios=(2, 2),
            sliding_window=8, max_position_embeddings=256,
        ),
        im_start_token_id=TOKENS["im_start"], im_end_token_id=TOKENS["im_end"], system_token_id=TOKENS["system"],
        user_token_id=TOKENS["user"], assistant_token_id=TOKENS["assistant"], tts_pad_token_id=TOKENS["tts_pad"],
        tts_bos_token_id=TOKENS["tts_bos"], tts_eos_token_id=TOKENS["tts_eos"],
        architectures=["Qwen3OmniMoeForConditionalGeneration"],
    )

