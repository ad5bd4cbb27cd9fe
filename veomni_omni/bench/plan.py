"""plan: per-rank GPU memory of the full Qwen3-Omni-30B-A3B thinker under an FSDP2 / EP / Ulysses-SP layout.

The thinker is built on the meta device from the real dimensions (`configs.real_thinker_config`),
so parameter counts are exact; they are checked against DESIGN.md section 3.

Layout (as VeOmni 0.1.12 builds its meshes): dense parameters (attention, router, norms,
embeddings, lm_head, ViT, audio tower) are FSDP-sharded over all `gpus` ranks (VeOmni's
`dp_shard_sp` mesh includes the SP ranks); routed experts are split over `ep` ranks (each holds
num_experts/ep whole experts) and FSDP-sharded over the remaining gpus/ep ranks (`ep_fsdp`).
So every rank stores 1/gpus of every parameter; EP changes what a rank all-gathers per layer.

Per-rank bytes:
  static      = P/gpus · (param + grad + master + 2·optimizer bytes)            [AdamW: exp_avg, exp_avg_sq]
  fsdp        = unsharded root (embeddings, lm_head, mergers, conv front end…) in compute dtype, params
                + grads, held for the step; + (1 + prefetch) unsharded units (text layer with its
                num_experts/ep local experts, ViT block, audio layer) in compute dtype; + one unit's
                unsharded gradient in the reduce dtype (fp32) before its reduce-scatter
  activations = see `activation_elements`, for T = seq_len·micro_batch/sp tokens per rank (Ulysses
                shards the sequence; the encoders are assumed sharded too), of which visual_frac are
                image/video placeholders (4 ViT patches each) and audio_frac audio placeholders
  overhead    = CUDA context, NCCL buffers, allocator fragmentation (flat, --overhead-gib)
Defaults follow VeOmni's trainer: parameters built in fp32 and kept fp32 in their shards, FSDP2
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) so gradients are fp32 shards, AdamW
states fp32, no separate master copy (the fp32 shard is the master): 16 B/param.
`--param-dtype bf16 --grad-dtype bf16 --master-dtype fp32` models bf16 params/grads with an fp32
master (also 16 B/param); `--optim-dtype bf16` halves the AdamW state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .common import base_parser, emit, format_table, machine_info

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "none": 0}

# DESIGN.md section 3, in billions of parameters.
DESIGN_PARAMS_B = {"thinker": 31.7, "experts": 29.0, "audio": 0.65, "vision": 0.54}


def build_meta_thinker(config=None):
    """The full thinker on the meta device (no memory, exact shapes)."""
    import veomni_omni  # noqa: F401  (the model classes as training uses them)
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from .configs import real_thinker_config

    config = config or real_thinker_config()
    with torch.device("meta"):
        return Qwen3OmniMoeThinkerForConditionalGeneration(config)


def parameter_groups(model) -> dict[str, int]:
    """Parameter counts by role (names as in transformers 5.22's thinker)."""
    groups = dict.fromkeys(["experts", "router", "attention", "norms", "embed_tokens", "lm_head", "vision", "audio"], 0)
    for name, p in model.named_parameters():
        if name.startswith("model.visual."):
            key = "vision"
        elif name.startswith("model.audio_tower."):
            key = "audio"
        elif ".mlp.experts." in name:
            key = "experts"
        elif ".mlp.gate." in name:
            key = "router"
        elif ".self_attn." in name and "norm" not in name:
            key = "attention"
        elif "embed_tokens" in name:
            key = "embed_tokens"
        elif name.startswith("lm_head."):
            key = "lm_head"
        else:
            key = "norms"
        groups[key] += p.numel()
    return groups


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def fsdp_units(model, ep: int) -> dict[str, int]:
    """Parameters all-gathered per FSDP unit on one rank: a text layer holds only its local experts."""
    text_layer = model.model.language_model.layers[0]
    experts = _numel(text_layer.mlp.experts)
    units = {
        "text_layer": _numel(text_layer) - experts + experts // ep,
        "vit_block": _numel(model.model.visual.blocks[0]),
        "audio_layer": _numel(model.model.audio_tower.layers[0]),
    }
    wrapped = (
        sum(_numel(layer) for layer in model.model.language_model.layers)
        + sum(_numel(b) for b in model.model.visual.blocks)
        + sum(_numel(layer) for layer in model.model.audio_tower.layers)
    )
    units["root"] = _numel(model) - wrapped
    return units


@dataclass
class ActivationModel:
    """Elements (compute dtype) kept for backward, per token / patch, from the config's widths.

    text layer, per LM token:
        attention  2H + 3q + 3kv     norm in/out; q_proj, k_proj outputs (q/k-norm inputs); post-rope
                                     q, k and v (kept by the attention kernel); attention output
        MoE        2H + 4E           norm in/out; router logits and probabilities (fp32 = 2 units each)
                 + k(2H + 3I)        per routed copy: dispatched input, gate_up output (2I), SwiGLU
                                     output (I), expert output before the routing-weight multiply
    ViT block, per patch:     8Hv + 2Iv   (norms in/out, post-rope q, k, v, attention out, fc1 out, GELU out)
    audio layer, per token:   8Ha + 2Ia   (same shape of block)
    audio conv front end, per audio token: 2·C·Σ_i f_i·t_i / t_3 for the three stride-2 convs over a
        (mel × 2·n_window) chunk (conv output + GELU output each)
    mergers, per visual LM token: 4 × (n_deepstack + 1) × 4Hv (norm in/out, fc1 out, GELU out at 4Hv)
    with gradient checkpointing (HF's GradientCheckpointingLayer: text layers, ViT blocks, audio
    layers) only each layer's input is kept (H, Hv, Ha), plus recomputing the largest layer in
    backward: its activations and as much again for their gradients.
    """

    H: int
    q: int
    kv: int
    E: int
    k: int
    I: int
    text_layers: int
    Hv: int
    Iv: int
    vit_blocks: int
    merge: int
    mergers: int
    Ha: int
    Ia: int
    audio_layers: int
    conv_per_token: float

    @classmethod
    def from_config(cls, config) -> "ActivationModel":
        t, v, a = config.text_config, config.vision_config, config.audio_config
        chunk = 2 * a.n_window
        f, tt, conv = a.num_mel_bins, chunk, 0
        for _ in range(3):
            f, tt = math.ceil(f / 2), math.ceil(tt / 2)
            conv += 2 * a.downsample_hidden_size * f * tt
        return cls(
            H=t.hidden_size, q=t.num_attention_heads * t.head_dim, kv=t.num_key_value_heads * t.head_dim,
            E=t.num_experts, k=t.num_experts_per_tok, I=t.moe_intermediate_size, text_layers=t.num_hidden_layers,
            Hv=v.hidden_size, Iv=v.intermediate_size, vit_blocks=v.depth, merge=v.spatial_merge_size**2,
            mergers=len(v.deepstack_visual_indexes) + 1,
            Ha=a.d_model, Ia=a.encoder_ffn_dim, audio_layers=a.encoder_layers, conv_per_token=conv / tt,
        )

    @property
    def text_layer(self) -> int:
        return (2 * self.H + 3 * self.q + 3 * self.kv) + (2 * self.H + 4 * self.E) + self.k * (2 * self.H + 3 * self.I)

    @property
    def vit_block(self) -> int:
        return 8 * self.Hv + 2 * self.Iv

    @property
    def audio_layer(self) -> int:
        return 8 * self.Ha + 2 * self.Ia

    def elements(self, tokens: float, visual_tokens: float, audio_tokens: float, checkpointing: bool) -> dict[str, float]:
        patches = visual_tokens * self.merge
        per = {
            "text": tokens * (self.text_layer * self.text_layers + 4 * self.H),  # + embeddings, final norm, lm_head input
            "vision": patches * self.vit_block * self.vit_blocks + visual_tokens * self.mergers * 4 * self.merge * self.Hv,
            "audio": audio_tokens * (self.audio_layer * self.audio_layers + self.conv_per_token),
        }
        if not checkpointing:
            return per
        recompute = 2 * max(tokens * self.text_layer, patches * self.vit_block, audio_tokens * self.audio_layer)
        return {
            "text": tokens * (self.H * self.text_layers + 4 * self.H),
            "vision": patches * self.Hv * self.vit_blocks + visual_tokens * self.mergers * 4 * self.merge * self.Hv,
            "audio": audio_tokens * (self.Ha * self.audio_layers + self.conv_per_token),
            "recompute": recompute,
        }


def plan(args, model=None) -> dict:
    if args.gpus % args.ep or args.gpus % args.sp:
        raise SystemExit(f"--ep ({args.ep}) and --sp ({args.sp}) must divide --gpus ({args.gpus})")
    model = model or build_meta_thinker()
    config = model.config
    text = config.text_config
    if text.num_experts % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide the {text.num_experts} experts")

    groups = parameter_groups(model)
    total = sum(groups.values())
    counts_b = {
        "thinker": total / 1e9,
        "experts": groups["experts"] / 1e9,
        "audio": groups["audio"] / 1e9,
        "vision": groups["vision"] / 1e9,
        "text_dense": (total - groups["experts"] - groups["audio"] - groups["vision"]) / 1e9,
    }
    design_check = {k: abs(round(counts_b[k], 2) - v) <= 0.05 * max(v, 1) for k, v in DESIGN_PARAMS_B.items()}

    b_param, b_grad, b_master, b_optim = (BYTES[args.param_dtype], BYTES[args.grad_dtype], BYTES[args.master_dtype], BYTES[args.optim_dtype])
    b_compute, b_reduce = BYTES[args.compute_dtype], BYTES[args.reduce_dtype]
    per_rank_params = total / args.gpus  # dense over all ranks; experts: 1/ep each, then 1/(gpus/ep)
    static = {
        "params": per_rank_params * b_param,
        "grads": per_rank_params * b_grad,
        "master": per_rank_params * b_master,
        "adamw_states": per_rank_params * 2 * b_optim,
    }

    units = fsdp_units(model, args.ep)
    largest = max(units["text_layer"], units["vit_block"], units["audio_layer"])
    fsdp = {
        "root_unsharded": units["root"] * b_compute * 2,  # params + their grads until the final reduce-scatter
        "layer_unsharded": largest * ((1 + args.prefetch) * b_compute + b_reduce),
    }

    tokens = args.seq_len * args.micro_batch / args.sp
    visual, audio = tokens * args.visual_frac, tokens * args.audio_frac
    acts = ActivationModel.from_config(config)
    act_bytes = {}
    for mode, ckpt in (("with_ckpt", True), ("without_ckpt", False)):
        elements = acts.elements(tokens, visual, audio, ckpt)
        act_bytes[mode] = {k: v * b_compute for k, v in elements.items()}
        if args.ce == "full":  # bf16 logits + fp32 upcast + fp32 grad
            act_bytes[mode]["logits"] = tokens * text.vocab_size * (b_compute + 8)
    mode = "with_ckpt" if args.grad_ckpt else "without_ckpt"

    fixed = sum(static.values()) + sum(fsdp.values()) + args.overhead_gib * GIB
    per_rank_by_mode = {m: (fixed + sum(v.values())) / GIB for m, v in act_bytes.items()}
    breakdown = {**static, **fsdp, **{f"act_{k}": v for k, v in act_bytes[mode].items()}, "overhead": args.overhead_gib * GIB}
    per_rank = sum(breakdown.values())
    fits = per_rank <= args.gpu_mem_gib * GIB

    warnings = []
    if text.num_key_value_heads % args.sp:
        warnings.append(f"Ulysses: {text.num_key_value_heads} kv heads not divisible by sp={args.sp}; kv heads are repeated (more activation memory than modelled)")
    if text.num_attention_heads % args.sp:
        warnings.append(f"Ulysses needs sp ({args.sp}) to divide the {text.num_attention_heads} attention heads")

    return {
        "per_rank_gib": per_rank / GIB,
        "fits": fits,
        "gpu_mem_gib": args.gpu_mem_gib,
        "layout": {
            "gpus": args.gpus, "ep": args.ep, "sp": args.sp,
            "dense_fsdp": args.gpus, "ep_fsdp": args.gpus // args.ep, "local_experts": text.num_experts // args.ep,
            "data_parallel_groups": args.gpus // args.sp,
            "seq_len": args.seq_len, "micro_batch": args.micro_batch, "tokens_per_rank": tokens,
            "visual_frac": args.visual_frac, "audio_frac": args.audio_frac, "grad_ckpt": args.grad_ckpt, "ce": args.ce,
        },
        "breakdown_gib": {k: v / GIB for k, v in breakdown.items()},
        "activations_gib": {m: sum(v.values()) / GIB for m, v in act_bytes.items()},
        "per_rank_gib_by_mode": per_rank_by_mode,
        "activation_per_token_kib": {
            "text_layer": acts.text_layer * b_compute / 1024,
            "vit_block_per_patch": acts.vit_block * b_compute / 1024,
            "audio_layer": acts.audio_layer * b_compute / 1024,
        },
        "params_b": counts_b,
        "param_groups": groups,
        "design_params_b": DESIGN_PARAMS_B,
        "design_check": design_check,
        "fsdp_units_params": units,
        "dtypes": {
            "param": args.param_dtype, "grad": args.grad_dtype, "master": args.master_dtype,
            "adamw_state": args.optim_dtype, "compute": args.compute_dtype, "reduce": args.reduce_dtype,
        },
        "bytes_per_param_static": b_param + b_grad + b_master + 2 * b_optim,
        "warnings": warnings,
    }


def build_parser():
    parser = base_parser(__doc__.splitlines()[0], "plan")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel size (divides gpus and the 128 experts)")
    parser.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel size")
    parser.add_argument("--seq-len", type=int, default=8192, help="tokens of one packed sequence (split over the SP group)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per data-parallel group per micro step")
    parser.add_argument("--visual-frac", type=float, default=0.25, help="share of tokens that are image/video placeholders")
    parser.add_argument("--audio-frac", type=float, default=0.10, help="share of tokens that are audio placeholders")
    ckpt = parser.add_mutually_exclusive_group()
    ckpt.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=True, help="gradient checkpointing (default)")
    ckpt.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    parser.add_argument("--ce", choices=["fused", "full"], default="fused", help="fused linear+CE (no logits) or full logits")
    parser.add_argument("--param-dtype", choices=["fp32", "bf16"], default="fp32", help="stored (sharded) parameter dtype")
    parser.add_argument("--grad-dtype", choices=["fp32", "bf16"], default="fp32", help="stored (sharded) gradient dtype")
    parser.add_argument("--master-dtype", choices=["none", "fp32"], default="none", help="separate master copy")
    parser.add_argument("--optim-dtype", choices=["fp32", "bf16"], default="fp32", help="AdamW exp_avg / exp_avg_sq dtype")
    parser.add_argument("--compute-dtype", choices=["bf16", "fp32"], default="bf16", help="FSDP2 param_dtype / activations")
    parser.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32", help="FSDP2 reduce_dtype")
    parser.add_argument("--prefetch", type=int, default=1, help="FSDP units all-gathered ahead of the running one")
    parser.add_argument("--overhead-gib", type=float, default=4.0, help="CUDA context, NCCL, fragmentation")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; plan is always quick")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = plan(args)
    lay = result["layout"]
    print(
        format_table(
            ["group", "params (B)", "DESIGN.md (B)", "ok"],
            [
                [k, result["params_b"][k], DESIGN_PARAMS_B.get(k, "-"), result["design_check"].get(k, "-")]
                for k in ("thinker", "experts", "audio", "vision", "text_dense")
            ],
            title="plan: Qwen3-Omni-30B-A3B thinker built on meta (exact parameter counts)",
        )
    )
    print()
    print(
        format_table(
            ["per-rank item", "GiB"],
            [[k, v] for k, v in result["breakdown_gib"].items()] + [["TOTAL", result["per_rank_gib"]]],
            title=(
                f"layout: {lay['gpus']} GPUs, ep {lay['ep']} ({lay['local_experts']} experts/rank, ep_fsdp {lay['ep_fsdp']}), "
                f"sp {lay['sp']}, dense FSDP {lay['dense_fsdp']}; seq {lay['seq_len']} × mb {lay['micro_batch']} → "
                f"{lay['tokens_per_rank']:.0f} tokens/rank ({lay['visual_frac']:.0%} visual, {lay['audio_frac']:.0%} audio); "
                f"grad ckpt {'on' if lay['grad_ckpt'] else 'off'}; CE {lay['ce']}\n"
                f"dtypes: {result['dtypes']} → {result['bytes_per_param_static']} B/param static"
            ),
        )
    )
    acts = result["activations_gib"]
    print(
        f"activations: {acts['with_ckpt']:.2f} GiB with gradient checkpointing, {acts['without_ckpt']:.2f} GiB without "
        f"(per token per text layer {result['activation_per_token_kib']['text_layer']:.0f} KiB; formula in `plan.ActivationModel`)"
    )
    by_mode = result["per_rank_gib_by_mode"]
    print(
        f"per rank {result['per_rank_gib']:.1f} GiB of {result['gpu_mem_gib']:.0f} GiB → fits: {result['fits']} "
        f"(with checkpointing {by_mode['with_ckpt']:.1f} GiB, without {by_mode['without_ckpt']:.1f} GiB)"
    )
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    emit({"benchmark": "plan", **result, "machine": machine_info()}, args.json)
    return 0
