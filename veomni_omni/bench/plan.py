"""plan: per-rank GPU memory of the full Qwen3-Omni-30B-A3B thinker under an FSDP2 / EP / Ulysses-SP layout.

The thinker is built on the meta device from the real dimensions (`configs.real_thinker_config`),
so parameter counts are exact; they are checked against docs/design.md §3.

Layout (as VeOmni 0.1.12 builds its meshes): dense parameters (attention, router, norms,
embeddings, lm_head, ViT, audio tower) are FSDP-sharded over all `gpus` ranks (VeOmni's
`dp_shard_sp` mesh includes the SP ranks); routed experts are split over `ep` ranks (each holds
num_experts/ep whole experts) and FSDP-sharded over the remaining gpus/ep ranks (`ep_fsdp`).
So every rank stores 1/gpus of every parameter; EP changes what a rank all-gathers per layer.

Per-rank bytes: the resident state plus the largest of three phases of the step (`_phases`):
  resident    = P/gpus · (param + master + 2·optimizer bytes)                   [AdamW: exp_avg, exp_avg_sq]
  phases      = loss:   unsharded root (embeddings, lm_head, mergers, conv front end…) in compute dtype
                        + activations + the loss backward's full logits
                layers: a unit's backward, the largest of three positions (`_backward_units`: the second
                        text layer, the first, an encoder unit): unsharded root + lm_head gradient + the
                        unit (a text layer holds its num_experts/ep local experts) and the one FSDP2
                        prefetches after it (the next text layer, or an encoder unit after the first) in
                        compute dtype + the unit's unsharded gradient in the reduce dtype (fp32) before its
                        reduce-scatter + the sharded gradients of the units whose backward is done
                        + activations (+ a recomputed layer)
                end:    the root's unsharded gradients + their reduce-dtype copy for the reduce-scatter
                        + every sharded gradient (P/gpus · grad bytes); the root is resharded first
                (gradients are freed between steps, as VeOmni's trainer does). Which one peaks depends on
                the widths and dtypes: at real width the root (embeddings and lm_head, 2 × 311M parameters)
                weighs most; in the small CPU thinker, the activations and logits.
  activations = see `activation_elements`, for T = seq_len·micro_batch/sp tokens per rank (Ulysses
                shards the sequence; the encoders are assumed sharded too), of which visual_frac are
                image/video placeholders (4 ViT patches each) and audio_frac audio placeholders
  overhead    = CUDA context, NCCL buffers, allocator fragmentation (flat, --overhead-gib)
Defaults follow VeOmni's trainer: parameters built in fp32 and kept fp32 in their shards, FSDP2
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) so gradients are fp32 shards, AdamW
states fp32, no separate master copy (the fp32 shard is the master): 16 B/param.
`--param-dtype bf16 --grad-dtype bf16 --master-dtype fp32` models bf16 params/grads with an fp32
master (also 16 B/param); `--optim-dtype bf16` halves the AdamW state.

LoRA (`--lora-rank R`): the meta thinker is wrapped in VeOmni's `VeOmniLoraModel` exactly as its trainer
does (`lora_config` → `resolve_fused_moe_lora_targets` → `VeOmniLoraConfig.from_yaml`), so adapter counts
are those of VeOmni's wrappers (dense `LoraLinear`; per-expert `LoraIndependentExperts`: gate, up, down
each A:[E,r,in] B:[E,out,r]). Same layout rules: FSDP2 shards frozen and trainable parameters alike
(one parameter group per unit), the adapters of the experts are EP-sharded with them (VeOmni adds them
to the EP plan as Shard(0)). So:
  resident    = trainable/gpus · (param + master + 2·optimizer) + frozen/gpus · compute
                (VeOmni upcasts the whole model with mixed precision, `model.float()`; veomni_omni's patch
                `lora_frozen_in_param_dtype` then holds the frozen base in param_dtype, the adapters fp32.
                Without mixed precision VeOmni builds in bf16 and the adapters take their base's dtype)
  fsdp        = root and units gathered whole in compute dtype, frozen weights too (the backward needs
                them for input gradients); gradients only for the trainable part
  activations = the full-fine-tuning model for every part that trains or lies downstream of a trainable
                part (the backward runs through it), plus each adapter's A output (r per token per
                adapted linear, k·r per routed copy for expert adapters); a frozen part with nothing
                trainable upstream (the ViT without ViT adapters, the audio conv front end) builds no
                autograd graph and keeps nothing.
Speech output (`--train talker`: the talker and its code predictor train, the thinker frozen; `--train
joint`: both train, thinker as above plus the talker): the whole released model on meta (thinker,
talker, code2wav; `RELEASED_PARAMS`), frozen parts at their stored dtype, the FSDP units of patch
`omni_fsdp_units`, the talker's experts under the same EP size; per rank `--spoken-turns` talker
sequences of `--talker-context` + 9 + `--speech-frames` tokens (`plan_speech`, `TalkerActivations`).
The plan also searches the fewest GPUs (and the EP size among the divisors) on which the layout fits.
`--measure-cpu` checks the model against a real FSDP2 step of a reduced thinker on 2 CPU ranks (`plan_cpu`);
with `--train talker` or `joint`, speech training of a reduced omni model (`configs.cpu_omni_config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import torch

from ..checkpoint.lora import is_adapter_param
from .common import base_parser, emit, format_table, machine_info

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "none": 0}

# docs/design.md §3, in billions of parameters.
DESIGN_PARAMS_B = {"thinker": 31.7, "experts": 29.0, "audio": 0.65, "vision": 0.54}
# Every parameter of Qwen/Qwen3-Omni-30B-A3B-Instruct's 15 safetensors files (thinker, talker, code2wav),
# as the Hugging Face Hub's safetensors metadata counts them; the meta model of `qwen3_omni_30b_a3b.json` has as many.
RELEASED_PARAMS = 35_259_818_545

# VeOmni's names for Qwen-family LoRA (its config.QWEN2_LORA_MODULES): attention projections, and the
# MLP names that VeOmni maps onto the fused experts (gate_up_proj, down_proj) of a MoE model.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_meta_thinker(config=None):
    """The full thinker on the meta device (no memory, exact shapes)."""
    import veomni_omni  # noqa: F401  (the model classes as training uses them)
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from .configs import real_thinker_config

    config = config or real_thinker_config()
    with torch.device("meta"):
        return Qwen3OmniMoeThinkerForConditionalGeneration(config)


def lora_config(rank: int, targets=LORA_TARGETS, alpha: int | None = None) -> dict:
    """A `model.lora_config` in VeOmni's YAML keys (alpha scales the update, not the memory)."""
    return {"rank": rank, "alpha": alpha or 2 * rank, "lora_modules": list(targets)}


def apply_lora(model, config: dict):
    """`model` wrapped in VeOmni's native LoRA as its trainer's `_setup_lora` wraps it; returns the
    `VeOmniLoraModel` (its `get_base_model()` is `model`, adapters injected in place)."""
    from veomni.lora import VeOmniLoraConfig, VeOmniLoraModel, resolve_fused_moe_lora_targets

    resolved = resolve_fused_moe_lora_targets(model, config)  # gate/up/down_proj -> the fused experts
    wrapped = VeOmniLoraModel(model, VeOmniLoraConfig.from_yaml(resolved))
    if not any(p.requires_grad for p in wrapped.parameters()):
        raise ValueError(f"LoRA targets {config['lora_modules']} matched no module of {type(model).__name__}")
    return wrapped


def parameter_groups(model) -> dict[str, int]:
    """Parameter counts by role (names as in transformers 5.22's thinker); LoRA adapters on their own."""
    groups = dict.fromkeys(["experts", "router", "attention", "norms", "embed_tokens", "lm_head", "vision", "audio", "lora"], 0)
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            key = "lora"
        elif name.startswith("model.visual."):
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


def _numel(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def fsdp_units(model, ep: int, trainable_only: bool = False) -> dict[str, int]:
    """Parameters all-gathered per FSDP unit on one rank (`trainable_only`: those of them that get
    gradients): a text layer holds only its local experts (and their adapters)."""
    numel = lambda module: _numel(module, trainable_only)  # noqa: E731
    text_layer = model.model.language_model.layers[0]
    experts = numel(text_layer.mlp.experts)
    units = {
        "text_layer": numel(text_layer) - experts + experts // ep,
        "vit_block": numel(model.model.visual.blocks[0]),
        "audio_layer": numel(model.model.audio_tower.layers[0]),
    }
    wrapped = (
        sum(numel(layer) for layer in model.model.language_model.layers)
        + sum(numel(b) for b in model.model.visual.blocks)
        + sum(numel(layer) for layer in model.model.audio_tower.layers)
    )
    units["root"] = numel(model) - wrapped
    return units


def _lora_ranks(module, routed_copies: int) -> int:
    """Elements of adapter A outputs per token that `module` keeps for backward: r per adapted
    linear, and per adapted expert projection r for each of the token's routed copies."""
    from veomni.lora import LoraLinear
    from veomni.lora.moe_layers import is_lora_moe_experts

    total = 0
    for m in module.modules():
        if isinstance(m, LoraLinear):
            total += sum(m.r.values())
        elif is_lora_moe_experts(m):
            total += routed_copies * sum(spec.lora_A[a].weight.shape[-2] for spec in (m.gate_proj, m.up_proj, m.down_proj) for a in spec.lora_A)
    return total


def _trains(params) -> bool:
    return any(p.requires_grad for p in params)


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
    LoRA (`from_model` on a wrapped model): + the adapters' A outputs per token and layer (lora_*);
    a part keeps activations only if it or a part upstream of it trains (vision_trains: ViT and
    mergers; audio_front_trains: the conv front end; the audio layers train if any audio parameter does).
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
    lora_text: int = 0
    lora_vit: int = 0
    lora_audio: int = 0
    vision_trains: bool = True
    audio_front_trains: bool = True
    audio_trains: bool = True

    @classmethod
    def from_model(cls, model) -> "ActivationModel":
        """From the config, with what the (possibly LoRA-wrapped) model trains."""
        acts = cls.from_config(model.config)
        visual, audio = model.model.visual, model.model.audio_tower
        front = [p for n, p in audio.named_parameters() if n.startswith("conv")]
        return dataclasses.replace(
            acts,
            lora_text=_lora_ranks(model.model.language_model.layers[0], acts.k),
            lora_vit=_lora_ranks(visual.blocks[0], 1),
            lora_audio=_lora_ranks(audio.layers[0], 1),
            vision_trains=_trains(visual.parameters()),
            audio_front_trains=_trains(front),
            audio_trains=_trains(audio.parameters()),
        )

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
        return (2 * self.H + 3 * self.q + 3 * self.kv) + (2 * self.H + 4 * self.E) + self.k * (2 * self.H + 3 * self.I) + self.lora_text

    @property
    def vit_block(self) -> int:
        return (8 * self.Hv + 2 * self.Iv + self.lora_vit) * self.vision_trains

    @property
    def audio_layer(self) -> int:
        return (8 * self.Ha + 2 * self.Ia + self.lora_audio) * self.audio_trains

    def elements(self, tokens: float, visual_tokens: float, audio_tokens: float, checkpointing: bool) -> dict[str, float]:
        patches = visual_tokens * self.merge
        mergers = visual_tokens * self.mergers * 4 * self.merge * self.Hv * self.vision_trains
        conv = audio_tokens * self.conv_per_token * self.audio_front_trains
        per = {
            "text": tokens * (self.text_layer * self.text_layers + 4 * self.H),  # + embeddings, final norm, lm_head input
            "vision": patches * self.vit_block * self.vit_blocks + mergers,
            "audio": audio_tokens * self.audio_layer * self.audio_layers + conv,
        }
        if not checkpointing:
            return per
        recompute = 2 * max(tokens * self.text_layer, patches * self.vit_block, audio_tokens * self.audio_layer)
        return {
            "text": tokens * (self.H * self.text_layers + 4 * self.H),
            "vision": patches * self.Hv * self.vit_blocks * self.vision_trains + mergers,
            "audio": audio_tokens * self.Ha * self.audio_layers * self.audio_trains + conv,
            "recompute": recompute,
        }


def _phases(root_params, root_grads, head_grads, all_grads, root_reduce_input, backward_units, acts, recompute, logits) -> dict:
    """What a training step holds on top of the parameter shards and optimizer states, in its three
    candidate peaks (FSDP2: the root is gathered for the whole forward and backward, resharded before
    its gradients are reduce-scattered at the end of the backward; gradients are freed between steps):
      loss:   the gathered root, the activations and the loss backward's logits (before any gradient)
      layers: a unit's backward (`backward_units`, the largest of them): the gathered root and the
              lm_head gradient, the unit gathered with the one prefetched after it, its gradient being
              reduced, the sharded gradients of the units whose backward is done, the activations
              (+ a recomputed layer)
      end:    the root's reduce-scatter: its unsharded gradients, their reduce-dtype copy, every sharded gradient
    """
    layer_acts = {**acts, **({"act_recompute": recompute} if recompute is not None else {})}
    grads, layer = max(backward_units.values(), key=sum)
    return {
        "loss": {"root_unsharded": root_params, **acts, "act_logits": logits},
        "layers": {"grads": grads, "root_unsharded": root_params + head_grads, "layer_unsharded": layer, **layer_acts},
        "end": {"grads": all_grads, "root_unsharded": root_grads + root_reduce_input},
    }


def _backward_units(model, units: dict, trained_units: dict, args, b_compute: int, b_reduce: int, b_grad: int) -> dict:
    """(sharded gradients already made, gathered unit + prefetched unit + the unit's unsharded gradient)
    at the backward positions that can peak. The backward runs the text layers last to first, then the
    encoder units; FSDP2 prefetches the unit that comes next in that order:
      text_layer_1: the second text layer (the last one whose successor is a text layer): all text layers
                    after it have sharded gradients
      text_layer_0: the first text layer, prefetching an encoder unit, every other text layer's shard made
      encoder:      an encoder unit, every text layer's shard and the encoders' made
    (Each rank stores 1/gpus of every parameter, so a text layer's shard is its trainable size / gpus.)"""
    layers = model.model.language_model.layers
    text_shard = _numel(layers[0], trainable_only=True) / args.gpus * b_grad
    encoder_shards = sum(_numel(unit, trainable_only=True) for unit in (*model.model.visual.blocks, *model.model.audio_tower.layers))
    text, encoder = units["text_layer"] * b_compute, max(units["vit_block"], units["audio_layer"]) * b_compute
    text_grad = trained_units["text_layer"] * b_reduce
    encoder_grad = max(trained_units["vit_block"], trained_units["audio_layer"]) * b_reduce
    positions = {
        "text_layer_0": ((len(layers) - 1) * text_shard, text + args.prefetch * encoder + text_grad),
        "encoder": (len(layers) * text_shard + encoder_shards / args.gpus * b_grad, (1 + args.prefetch) * encoder + encoder_grad),
    }
    if len(layers) > 1:
        positions["text_layer_1"] = ((len(layers) - 2) * text_shard, (1 + args.prefetch) * text + text_grad)
    return positions


def build_meta_omni(config=None):
    """The whole released model (thinker, talker, code2wav) on the meta device."""
    import veomni_omni  # noqa: F401
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from .configs import released_config

    with torch.device("meta"):
        return Qwen3OmniMoeForConditionalGeneration(config or released_config())


def build_planned_model(args, config=None):
    """The thinker on meta, LoRA-wrapped when `args.lora_rank` (returns the thinker, adapters injected);
    for speech output (`args.train` talker or joint) the whole model, what does not train frozen: code2wav,
    and the thinker unless joint."""
    if args.train != "thinker":
        if args.lora_rank:
            raise SystemExit("--lora-rank plans the thinker's LoRA only; use it with --train thinker")
        model = build_meta_omni(config)
        model.code2wav.requires_grad_(False)
        model.thinker.requires_grad_(args.train == "joint")
        return model
    model = build_meta_thinker(config)
    if args.lora_rank:
        apply_lora(model, lora_config(args.lora_rank, args.lora_targets))
    return model


def plan(args, model=None) -> dict:
    if args.gpus % args.ep or args.gpus % args.sp:
        raise SystemExit(f"--ep ({args.ep}) and --sp ({args.sp}) must divide --gpus ({args.gpus})")
    model = model or build_planned_model(args)
    if args.train != "thinker":
        return plan_speech(args, model)
    config = model.config
    text = config.text_config
    if text.num_experts % args.ep:
        raise SystemExit(f"--ep {args.ep} must divide the {text.num_experts} experts")

    groups = parameter_groups(model)
    total = sum(groups.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = total - trainable
    base = total - groups["lora"]
    counts_b = {
        "thinker": base / 1e9,
        "experts": groups["experts"] / 1e9,
        "audio": groups["audio"] / 1e9,
        "vision": groups["vision"] / 1e9,
        "text_dense": (base - groups["experts"] - groups["audio"] - groups["vision"]) / 1e9,
        "lora_adapters": groups["lora"] / 1e9,
        "trainable": trainable / 1e9,
    }
    design_check = {k: abs(round(counts_b[k], 2) - v) <= 0.05 * max(v, 1) for k, v in DESIGN_PARAMS_B.items()}

    b_param, b_grad, b_master, b_optim = (BYTES[args.param_dtype], BYTES[args.grad_dtype], BYTES[args.master_dtype], BYTES[args.optim_dtype])
    b_compute, b_reduce = BYTES[args.compute_dtype], BYTES[args.reduce_dtype]
    # dense over all ranks; experts: 1/ep each, then 1/(gpus/ep): 1/gpus of every parameter either way
    per_rank_trainable, per_rank_frozen = trainable / args.gpus, frozen / args.gpus
    static = {
        "params": per_rank_trainable * b_param,
        "grads": per_rank_trainable * b_grad,
        "master": per_rank_trainable * b_master,
        "adamw_states": per_rank_trainable * 2 * b_optim,
    }
    if frozen:  # a LoRA model's frozen base is held in the compute dtype (patch lora_frozen_in_param_dtype)
        static["frozen_params"] = per_rank_frozen * b_compute

    units = fsdp_units(model, args.ep)
    trained_units = fsdp_units(model, args.ep, trainable_only=True)
    root_params = units["root"] * b_compute
    root_grads = trained_units["root"] * b_compute
    head_grads = _numel(model.lm_head, trainable_only=True) * b_compute  # the first root gradient the backward makes
    backward_units = _backward_units(model, units, trained_units, args, b_compute, b_reduce, b_grad)

    tokens = args.seq_len * args.micro_batch / args.sp
    visual, audio = tokens * args.visual_frac, tokens * args.audio_frac
    acts = ActivationModel.from_model(model)
    logits = tokens * text.vocab_size * (b_compute + 12) if args.ce == "full" else 0.0
    phase_bytes, act_bytes = {}, {}
    for mode, ckpt in (("with_ckpt", True), ("without_ckpt", False)):
        elements = {f"act_{k}": v * b_compute for k, v in acts.elements(tokens, visual, audio, ckpt).items()}
        recompute = elements.pop("act_recompute", None)
        act_bytes[mode] = {**elements, **({"act_recompute": recompute} if recompute is not None else {}), "act_logits": logits}
        phase_bytes[mode] = _phases(root_params, root_grads, head_grads, static["grads"], trained_units["root"] * b_reduce,
                                    backward_units, elements, recompute, logits)
    mode = "with_ckpt" if args.grad_ckpt else "without_ckpt"

    resident = {k: v for k, v in static.items() if k != "grads"}  # held through the whole step (gradients are not: see _phases)
    overhead = args.overhead_gib * GIB
    peak_phase = {m: max(phases, key=lambda name: sum(phases[name].values())) for m, phases in phase_bytes.items()}
    per_rank_by_mode = {m: (sum(resident.values()) + overhead + sum(phase_bytes[m][peak_phase[m]].values())) / GIB for m in phase_bytes}
    breakdown = {**resident, **phase_bytes[mode][peak_phase[mode]], "overhead": overhead}
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
        "lora": {"rank": args.lora_rank, "targets": list(args.lora_targets)} if args.lora_rank else None,
        "breakdown_gib": {k: v / GIB for k, v in breakdown.items()},
        "peak_phase": peak_phase[mode],
        "phases_gib": {name: sum(items.values()) / GIB for name, items in phase_bytes[mode].items()},
        "static_gib": sum(static.values()) / GIB,
        "activations_gib": {m: sum(v.values()) / GIB for m, v in act_bytes.items()},
        "per_rank_gib_by_mode": per_rank_by_mode,
        "activation_per_token_kib": {
            "text_layer": acts.text_layer * b_compute / 1024,
            "vit_block_per_patch": acts.vit_block * b_compute / 1024,
            "audio_layer": acts.audio_layer * b_compute / 1024,
        },
        "params_b": counts_b,
        "param_groups": groups,
        "trainable_params": trainable,
        "design_params_b": DESIGN_PARAMS_B,
        "design_check": design_check,
        "fsdp_units_params": units,
        "fsdp_units_trainable_params": trained_units,
        "dtypes": {
            "param": args.param_dtype, "grad": args.grad_dtype, "master": args.master_dtype,
            "adamw_state": args.optim_dtype, "compute": args.compute_dtype, "reduce": args.reduce_dtype,
        },
        "bytes_per_param_static": b_param + b_grad + b_master + 2 * b_optim,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- speech output (talker)


@dataclass
class TalkerActivations:
    """Elements (compute dtype) that talker training keeps for backward (models/talker.py), from the
    talker config's widths. Per spoken turn, a talker sequence of `context` projected thinker tokens
    (its user turns; the answer's text is projected too and is counted with them), 9 prefix tokens
    and `frames` codec frames; the code predictor runs one row of `groups` tokens per frame.

    talker layer, per talker token:  the thinker's text layer formula at the talker's widths
                                     + shared expert 4Is + Ht + 2 (gate, up, SiLU, product; its output
                                     and its sigmoid gate, kept for the gating multiply)
    code predictor layer, per row token: 2Hc + 3q + 3kv (attention) + 2Hc + 4Ic (dense SwiGLU MLP)
    projections, per context token:  3·Hth + Ht (ResizeMLP input, fc1 out, SiLU out; the projection)
    sequence, per talker token:      3Ht (the concatenated sequence, its padded stack, the final norm's
                                     input; + its output below) and per frame G·Ht (each group's codec
                                     embedding, kept for the code predictor's input)
    code predictor input, per frame: 2·G·Hc (each frame's row and their concatenation) + (G−1)·Hc head inputs
    with gradient checkpointing: each layer's input only (Ht, Hc per token), plus the layer being
    recomputed in backward: a talker layer's activations and as much again for their gradients (the
    thinker's MoE rule); a code predictor layer's activations and the gradients of its MLP's widest
    backward step (3Ic + Hc: the SwiGLU product's, the gate's and the up projection's, the output's)
    logits: talker (frames + 1) × its codec vocabulary, code predictor frames × (G − 1) × codebook, each
    per element in the compute dtype twice (the per-turn / per-head results and their concatenation)
    plus the fp32 copy, log-softmax and its gradient of the cross entropy (3 × 4 B)."""

    Ht: int
    qt: int
    kvt: int
    Et: int
    kt: int
    It: int
    Is: int
    talker_layers: int
    Hc: int
    qc: int
    kvc: int
    Ic: int
    predictor_layers: int
    groups: int
    Hth: int
    talker_vocab: int
    codebook: int

    @classmethod
    def from_config(cls, config) -> "TalkerActivations":
        talker = config.talker_config
        t, c = talker.text_config, talker.code_predictor_config
        return cls(
            Ht=t.hidden_size, qt=t.num_attention_heads * t.head_dim, kvt=t.num_key_value_heads * t.head_dim, Et=t.num_experts,
            kt=t.num_experts_per_tok, It=t.moe_intermediate_size, Is=t.shared_expert_intermediate_size, talker_layers=t.num_hidden_layers,
            Hc=c.hidden_size, qc=c.num_attention_heads * c.head_dim, kvc=c.num_key_value_heads * c.head_dim, Ic=c.intermediate_size,
            predictor_layers=c.num_hidden_layers, groups=talker.num_code_groups, Hth=talker.thinker_hidden_size,
            talker_vocab=t.vocab_size, codebook=c.vocab_size,
        )

    @property
    def talker_layer(self) -> int:
        attention = 2 * self.Ht + 3 * self.qt + 3 * self.kvt
        moe = 2 * self.Ht + 4 * self.Et + self.kt * (2 * self.Ht + 3 * self.It)
        return attention + moe + 4 * self.Is + self.Ht + 2

    @property
    def predictor_layer(self) -> int:
        return (2 * self.Hc + 3 * self.qc + 3 * self.kvc) + (2 * self.Hc + 4 * self.Ic)

    def elements(self, turns: float, context: float, frames: float, checkpointing: bool) -> dict[str, float]:
        """Per rank, for `turns` spoken turns each of `context` thinker tokens and `frames` frames."""
        tokens = turns * (context + 9 + frames)
        rows = turns * frames * self.groups
        talker_kept, predictor_kept = (self.Ht, self.Hc) if checkpointing else (self.talker_layer, self.predictor_layer)
        per = {
            "talker": tokens * (talker_kept * self.talker_layers + 4 * self.Ht)
            + turns * (context * (3 * self.Hth + self.Ht) + frames * self.groups * self.Ht),
            "code_predictor": rows * (predictor_kept * self.predictor_layers + 2 * self.Hc)
            + turns * frames * (3 * self.groups - 1) * self.Hc,
        }
        if checkpointing:
            per["recompute_talker"] = 2 * tokens * self.talker_layer
            per["recompute_code_predictor"] = rows * (self.predictor_layer + 3 * self.Ic + self.Hc)
        return per

    def logit_elements(self, turns: float, frames: float) -> float:
        return turns * ((frames + 1) * self.talker_vocab + frames * (self.groups - 1) * self.codebook)


def speech_units(model, ep: int) -> dict[str, int]:
    """Parameters all-gathered per FSDP unit of the top-level model (patch `omni_fsdp_units`): the
    thinker's units (a text layer with its num_experts/ep local experts), a talker decoder layer (its
    local experts), a code predictor decoder layer; the root is everything else: the thinker's embeddings,
    lm_head and encoder stems, the talker's codec embedding, projections and codec head, the code
    predictor's embeddings and heads, and code2wav."""
    thinker = fsdp_units(model.thinker, ep)
    talker_layers, predictor_layers = model.talker.model.layers, model.talker.code_predictor.model.layers
    experts = _numel(talker_layers[0].mlp.experts)
    wrapped = sum(_numel(unit) for unit in _thinker_unit_modules(model.thinker))
    return {
        "text_layer": thinker["text_layer"], "vit_block": thinker["vit_block"], "audio_layer": thinker["audio_layer"],
        "talker_layer": _numel(talker_layers[0]) - experts + experts // ep,
        "predictor_layer": _numel(predictor_layers[0]),
        "root": _numel(model) - wrapped - _numel(talker_layers) - _numel(predictor_layers),
    }


def _thinker_unit_modules(thinker) -> list:
    return [*thinker.model.language_model.layers, *thinker.model.visual.blocks, *thinker.model.audio_tower.layers]


def plan_speech(args, model) -> dict:
    """`plan` for speech output (`--train talker`: thinker frozen; `--train joint`: thinker and talker).

    resident    = trainable/gpus · (param + master + 2·optimizer) + frozen/gpus · param
                  (the frozen thinker and code2wav keep their shards in the stored dtype, no gradient, no state)
    kept        = what the talker reads from the thinker: the captured `accept_hidden_layer` state and the
                  input embeddings (T·Hth each)
    phases      = thinker:  (frozen thinker) its no-grad forward: the gathered root, the running thinker
                            unit and the prefetched one, one layer's transient activations (the largest of
                            a text layer, ViT block, audio layer), the hidden stream (T·Hth, residual and
                            output), the captured state and the deepstack features
                  loss:     root + kept + the thinker's activations (joint) + the talker's + all logits
                  code_predictor: a code predictor layer's backward (the last one run: the other
                            layers' shards made): root + the talker's root gradients (unsharded, counted
                            whole) + the unit and the next in compute dtype + its reduce-dtype gradient
                            + every activation (+ the recomputed layer)
                  talker:   a talker layer's backward (the second talker layer, prefetching the first;
                            or the first, prefetching the last thinker text layer, the unit before it in
                            forward), as above; the code predictor's activations are freed by then
                  thinker_layers (joint): the thinker's `_backward_units` with every talker gradient
                            shard made, the talker's activations freed
                  end:      the root's reduce-scatter: its unsharded gradients, their reduce-dtype copy,
                            every sharded gradient; with the thinker frozen, also the thinker layer FSDP2
                            prefetched for a backward that never runs (it stays gathered to the step's end)
    The talker's sequences: `--spoken-turns` per rank, each `--talker-context` thinker tokens before it
    and `--speech-frames` frames (the released codec: 12.5 frames a second)."""
    config = model.config
    thinker_text, talker_text = config.thinker_config.text_config, config.talker_config.text_config
    for name, experts in (("thinker", thinker_text.num_experts), ("talker", talker_text.num_experts)):
        if experts % args.ep:
            raise SystemExit(f"--ep {args.ep} must divide the {name}'s {experts} experts")
    if args.sp != 1:
        raise SystemExit("speech training under Ulysses SP is not supported (models/talker.py): use --sp 1")
    joint = args.train == "joint"

    parts = {name: _numel(getattr(model, name)) for name in ("thinker", "talker", "code2wav")}
    trainable = _numel(model, trainable_only=True)
    frozen = sum(parts.values()) - trainable
    b_param, b_grad, b_master, b_optim = (BYTES[args.param_dtype], BYTES[args.grad_dtype], BYTES[args.master_dtype], BYTES[args.optim_dtype])
    b_compute, b_reduce = BYTES[args.compute_dtype], BYTES[args.reduce_dtype]
    static = {
        "params": trainable / args.gpus * b_param,
        "grads": trainable / args.gpus * b_grad,
        "master": trainable / args.gpus * b_master,
        "adamw_states": trainable / args.gpus * 2 * b_optim,
        "frozen_params": frozen / args.gpus * b_param,
    }
    units = speech_units(model, args.ep)
    talker_layers = model.talker.model.layers
    root_trainable = trainable - sum(_numel(u, trainable_only=True) for u in (*talker_layers, *model.talker.code_predictor.model.layers))
    if joint:
        root_trainable -= sum(_numel(u) for u in _thinker_unit_modules(model.thinker))
    root_params, root_grads = units["root"] * b_compute, root_trainable * b_compute

    tokens = args.seq_len * args.micro_batch
    visual, audio = tokens * args.visual_frac, tokens * args.audio_frac
    acts = ActivationModel.from_model(model.thinker)
    talker_acts = TalkerActivations.from_config(config)
    H = thinker_text.hidden_size
    kept = {"thinker_state_for_talker": 2 * tokens * H * b_compute}
    speech_logits = talker_acts.logit_elements(args.spoken_turns, args.speech_frames) * (2 * b_compute + 12)
    thinker_logits = tokens * thinker_text.vocab_size * (b_compute + 12) if joint and args.ce == "full" else 0.0
    talker_text_shard = _numel(talker_layers[0], trainable_only=True) / args.gpus * b_grad
    predictor_shards = _numel(model.talker.code_predictor.model.layers, trainable_only=True) / args.gpus * b_grad
    # a talker layer's backward: (gradient shards made, the unit + the one FSDP2 prefetches + its reduce-dtype
    # gradient); the first talker layer prefetches the last thinker text layer (the unit before it in forward)
    talker_positions = [
        ((len(talker_layers) - 2) * talker_text_shard + predictor_shards, (1 + args.prefetch) * units["talker_layer"] * b_compute),
        ((len(talker_layers) - 1) * talker_text_shard + predictor_shards,
         (units["talker_layer"] + args.prefetch * units["text_layer"]) * b_compute),
    ]
    talker_done, talker_unit = max(talker_positions, key=sum)
    talker_unit += units["talker_layer"] * b_reduce
    # a frozen thinker's layer gathered by that prefetch never runs a backward: it stays unsharded to the step's end
    stray_layer = 0.0 if joint else args.prefetch * units["text_layer"] * b_compute
    predictor_layers = model.talker.code_predictor.model.layers
    predictor_unit = (1 + args.prefetch) * units["predictor_layer"] * b_compute + units["predictor_layer"] * b_reduce

    phase_bytes, act_bytes = {}, {}
    for mode, ckpt in (("with_ckpt", True), ("without_ckpt", False)):
        speech = {f"act_{k}": v * b_compute for k, v in talker_acts.elements(args.spoken_turns, args.talker_context, args.speech_frames, ckpt).items()}
        talker_recompute = speech.pop("act_recompute_talker", 0.0)
        predictor_recompute = speech.pop("act_recompute_code_predictor", 0.0)
        thinker_acts = {}
        if joint:
            thinker_acts = {f"act_thinker_{k}": v * b_compute for k, v in acts.elements(tokens, visual, audio, ckpt).items()}
        thinker_recompute = thinker_acts.pop("act_thinker_recompute", 0.0)
        act_bytes[mode] = {**thinker_acts, **speech, "act_logits": speech_logits + thinker_logits}
        phases = {
            "loss": {"root_unsharded": root_params, **kept, **thinker_acts, **speech, "act_logits": speech_logits + thinker_logits},
            "code_predictor": {
                "grads": predictor_shards * (len(predictor_layers) - 1) / len(predictor_layers),
                "root_unsharded": root_params + root_grads, "layer_unsharded": predictor_unit,
                **thinker_acts, **speech, "act_recompute": predictor_recompute,
            },
            "talker": {
                "grads": talker_done, "root_unsharded": root_params + root_grads, "layer_unsharded": talker_unit,
                **thinker_acts, "act_talker": speech["act_talker"], "act_recompute": talker_recompute,
            },
            "end": {"grads": static["grads"], "root_unsharded": root_grads + root_trainable * b_reduce, "layer_unsharded": stray_layer},
        }
        if joint:
            thinker_units = fsdp_units(model.thinker, args.ep)
            talker_shards = _numel(model.talker, trainable_only=True) / args.gpus * b_grad
            done, unit = max(_backward_units(model.thinker, thinker_units, thinker_units, args, b_compute, b_reduce, b_grad).values(), key=sum)
            phases["thinker_layers"] = {
                "grads": done + talker_shards, "root_unsharded": root_params + root_grads, "layer_unsharded": unit,
                **thinker_acts, "act_recompute": thinker_recompute,
            }
        else:
            encoder = max(units["vit_block"], units["audio_layer"])
            transient = max(tokens * acts.text_layer, visual * acts.merge * (8 * acts.Hv + 2 * acts.Iv), audio * (8 * acts.Ha + 2 * acts.Ia))
            phases["thinker"] = {
                "root_unsharded": root_params,
                "layer_unsharded": (1 + args.prefetch) * max(units["text_layer"], encoder) * b_compute,
                "act_thinker_no_grad": (transient + 3 * tokens * H + visual * (acts.mergers - 1) * H) * b_compute,
            }
        phase_bytes[mode] = phases
    mode = "with_ckpt" if args.grad_ckpt else "without_ckpt"

    resident = {k: v for k, v in static.items() if k != "grads"}
    overhead = args.overhead_gib * GIB
    peak_phase = {m: max(phases, key=lambda name: sum(phases[name].values())) for m, phases in phase_bytes.items()}
    per_rank_by_mode = {m: (sum(resident.values()) + overhead + sum(phase_bytes[m][peak_phase[m]].values())) / GIB for m in phase_bytes}
    breakdown = {**resident, **phase_bytes[mode][peak_phase[mode]], "overhead": overhead}
    per_rank = sum(breakdown.values())
    return {
        "per_rank_gib": per_rank / GIB,
        "fits": per_rank <= args.gpu_mem_gib * GIB,
        "gpu_mem_gib": args.gpu_mem_gib,
        "train": args.train,
        "layout": {
            "gpus": args.gpus, "ep": args.ep, "sp": args.sp, "dense_fsdp": args.gpus, "ep_fsdp": args.gpus // args.ep,
            "local_experts": thinker_text.num_experts // args.ep, "talker_local_experts": talker_text.num_experts // args.ep,
            "data_parallel_groups": args.gpus, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "tokens_per_rank": tokens,
            "visual_frac": args.visual_frac, "audio_frac": args.audio_frac, "grad_ckpt": args.grad_ckpt, "ce": args.ce,
            "spoken_turns": args.spoken_turns, "talker_context": args.talker_context, "speech_frames": args.speech_frames,
            "talker_tokens": args.spoken_turns * (args.talker_context + 9 + args.speech_frames),
            "code_predictor_tokens": args.spoken_turns * args.speech_frames * talker_acts.groups,
        },
        "lora": None,
        "breakdown_gib": {k: v / GIB for k, v in breakdown.items()},
        "peak_phase": peak_phase[mode],
        "phases_gib": {name: sum(items.values()) / GIB for name, items in phase_bytes[mode].items()},
        "static_gib": sum(static.values()) / GIB,
        "activations_gib": {m: sum(v.values()) / GIB for m, v in act_bytes.items()},
        "per_rank_gib_by_mode": per_rank_by_mode,
        "params_b": {**{k: v / 1e9 for k, v in parts.items()}, "total": sum(parts.values()) / 1e9, "trainable": trainable / 1e9},
        "param_parts": parts,
        "trainable_params": trainable,
        "released_params": RELEASED_PARAMS,
        "fsdp_units_params": units,
        "dtypes": {
            "param": args.param_dtype, "grad": args.grad_dtype, "master": args.master_dtype,
            "adamw_state": args.optim_dtype, "compute": args.compute_dtype, "reduce": args.reduce_dtype,
        },
        "bytes_per_param_static": b_param + b_grad + b_master + 2 * b_optim,
        "warnings": [],
    }


def fewest_gpus(args, model, max_gpus: int = 1024) -> dict | None:
    """The fewest GPUs (with the EP size, among those dividing the GPUs and the experts, that needs
    the least memory) on which `args`' run fits; None if none up to `max_gpus` does."""
    config = model.config
    experts = [config.text_config.num_experts] if args.train == "thinker" else [
        config.thinker_config.text_config.num_experts, config.talker_config.text_config.num_experts]
    for gpus in range(args.sp, max_gpus + 1, args.sp):
        layouts = [
            plan(argparse.Namespace(**{**vars(args), "gpus": gpus, "ep": ep}), model)
            for ep in range(1, gpus + 1) if gpus % ep == 0 and all(e % ep == 0 for e in experts)
        ]
        best = min(layouts, key=lambda r: r["per_rank_gib"])
        if best["fits"]:
            return {"gpus": gpus, "ep": best["layout"]["ep"], "per_rank_gib": best["per_rank_gib"], "breakdown_gib": best["breakdown_gib"]}
    return None


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
    parser.add_argument(
        "--optim-dtype", choices=["fp32", "bf16", "none"], default="fp32", help="AdamW exp_avg / exp_avg_sq dtype (none: a stateless optimizer, SGD)"
    )
    parser.add_argument("--compute-dtype", choices=["bf16", "fp32"], default="bf16", help="FSDP2 param_dtype / activations")
    parser.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32", help="FSDP2 reduce_dtype")
    parser.add_argument("--prefetch", type=int, default=1, help="FSDP units all-gathered ahead of the running one")
    parser.add_argument("--overhead-gib", type=float, default=4.0, help="CUDA context, NCCL, fragmentation")
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--lora-rank", type=int, default=0, help="LoRA rank (VeOmni's native LoRA); 0: full fine-tuning")
    parser.add_argument(
        "--lora-targets", type=lambda v: tuple(t for t in v.split(",") if t), default=LORA_TARGETS,
        help="comma-separated `lora_modules` (VeOmni maps gate_proj/up_proj/down_proj to the fused experts; "
        "note that q_proj/k_proj/v_proj also name the audio tower's attention; ViT: qkv,proj,linear_fc1,linear_fc2)",
    )
    parser.add_argument(
        "--train", choices=["thinker", "talker", "joint"], default="thinker",
        help="thinker: the thinker alone (default); talker: speech output with the thinker frozen; joint: both train",
    )
    parser.add_argument("--spoken-turns", type=int, default=2, help="(talker, joint) spoken assistant turns per rank and micro step")
    parser.add_argument("--talker-context", type=int, default=2048, help="(talker, joint) thinker tokens (its user turns) each spoken turn's talker reads")
    parser.add_argument("--speech-frames", type=int, default=375, help="(talker, joint) codec frames per spoken turn (12.5 a second: 375 = 30 s)")
    parser.add_argument("--measure-cpu", action="store_true", help="also run a reduced thinker under FSDP2 on 2 CPU ranks (gloo) and compare its per-rank memory with the plan")
    parser.add_argument("--measure-ep", type=int, choices=[1, 2], default=1, help="EP size of the --measure-cpu run")
    parser.add_argument("--quick", action="store_true", help="accepted for symmetry; plan is always quick")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model = build_planned_model(args)
    result = plan(args, model)
    result["fewest_gpus"] = fewest_gpus(args, model)
    if args.train == "thinker" and args.lora_rank:  # the same run as full fine-tuning
        full_args = argparse.Namespace(**{**vars(args), "lora_rank": 0})
        full_model = build_planned_model(full_args)
        result["full_fine_tuning"] = {"per_rank_gib": plan(full_args, full_model)["per_rank_gib"], "fewest_gpus": fewest_gpus(full_args, full_model)}
    (_print_thinker if args.train == "thinker" else _print_speech)(result, args)
    if args.measure_cpu:
        from .plan_cpu import measure_cpu

        result["measured_cpu"] = measure_cpu(args)
    emit({"benchmark": "plan", **result, "machine": machine_info()}, args.json)
    return 0


def _print_thinker(result: dict, args) -> None:
    lay = result["layout"]
    print(
        format_table(
            ["group", "params (B)", "docs/design.md (B)", "ok"],
            [
                [k, result["params_b"][k], DESIGN_PARAMS_B.get(k, "-"), result["design_check"].get(k, "-")]
                for k in ("thinker", "experts", "audio", "vision", "text_dense")
            ],
            title="plan: Qwen3-Omni-30B-A3B thinker built on meta (exact parameter counts)",
        )
    )
    _print_budget(
        result,
        layout=(
            f"layout: {lay['gpus']} GPUs, ep {lay['ep']} ({lay['local_experts']} experts/rank, ep_fsdp {lay['ep_fsdp']}), "
            f"sp {lay['sp']}, dense FSDP {lay['dense_fsdp']}; seq {lay['seq_len']} × mb {lay['micro_batch']} → "
            f"{lay['tokens_per_rank']:.0f} tokens/rank ({lay['visual_frac']:.0%} visual, {lay['audio_frac']:.0%} audio); "
            f"grad ckpt {'on' if lay['grad_ckpt'] else 'off'}; CE {lay['ce']}\n"
            f"dtypes: {result['dtypes']} → {result['bytes_per_param_static']} B/param static"
        ),
        phases_doc="_phases",
        activations=(
            f"activations: {result['activations_gib']['with_ckpt']:.2f} GiB with gradient checkpointing, "
            f"{result['activations_gib']['without_ckpt']:.2f} GiB without (per token per text layer "
            f"{result['activation_per_token_kib']['text_layer']:.0f} KiB; formula in `plan.ActivationModel`)"
        ),
    )
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    if args.lora_rank:
        params = result["params_b"]
        print(
            f"LoRA rank {args.lora_rank} on {','.join(args.lora_targets)}: {params['lora_adapters'] * 1e3:.1f}M adapter parameters "
            f"trained (fp32 shards, grads, AdamW states at {result['bytes_per_param_static']} B/param), "
            f"{params['thinker']:.2f}B frozen at {BYTES[args.compute_dtype]} B/param"
        )
    fewest = result["fewest_gpus"]
    print(
        f"fewest {args.gpu_mem_gib:.0f} GiB GPUs: {fewest['gpus']} (ep {fewest['ep']}, sp {args.sp}) at {fewest['per_rank_gib']:.1f} GiB per GPU"
        if fewest else f"fits on no layout of up to 1024 {args.gpu_mem_gib:.0f} GiB GPUs"
    )
    if args.lora_rank:
        full = result["full_fine_tuning"]
        full_fewest = full["fewest_gpus"]
        print(
            f"full fine-tuning, same layout: {full['per_rank_gib']:.1f} GiB per GPU; fewest GPUs "
            + (f"{full_fewest['gpus']} (ep {full_fewest['ep']}) at {full_fewest['per_rank_gib']:.1f} GiB" if full_fewest else "none up to 1024")
        )


def _print_budget(result: dict, layout: str, phases_doc: str, activations: str | None = None) -> None:
    """The per-rank breakdown under its layout line, the peak phase, (the activations,) and whether it fits."""
    print()
    print(
        format_table(
            ["per-rank item", "GiB"],
            [[k, v] for k, v in result["breakdown_gib"].items()] + [["TOTAL", result["per_rank_gib"]]],
            title=layout,
        )
    )
    phases = ", ".join(f"{k} {v:.2f}" for k, v in result["phases_gib"].items())
    print(f"peak phase: {result['peak_phase']} ({phases} GiB on top of the resident state; see `{phases_doc}`)")
    if activations:
        print(activations)
    by_mode = result["per_rank_gib_by_mode"]
    print(
        f"per rank {result['per_rank_gib']:.1f} GiB of {result['gpu_mem_gib']:.0f} GiB → fits: {result['fits']} "
        f"(with checkpointing {by_mode['with_ckpt']:.1f} GiB, without {by_mode['without_ckpt']:.1f} GiB)"
    )


def _print_speech(result: dict, args) -> None:
    lay, params = result["layout"], result["params_b"]
    what = "talker and code predictor train, thinker frozen" if args.train == "talker" else "thinker, talker and code predictor train"
    print(
        format_table(
            ["part", "params (B)", "trains"],
            [[k, params[k], k == "talker" or (k == "thinker" and args.train == "joint")] for k in ("thinker", "talker", "code2wav")]
            + [["total", params["total"], f"{params['trainable']:.2f}B"]],
            title=f"plan: Qwen3-Omni-30B-A3B speech output ({what}); released checkpoint: {RELEASED_PARAMS / 1e9:.3f}B",
        )
    )
    _print_budget(
        result,
        layout=(
            f"layout: {lay['gpus']} GPUs, ep {lay['ep']} ({lay['local_experts']} thinker / {lay['talker_local_experts']} talker experts per rank); "
            f"{lay['tokens_per_rank']:.0f} thinker tokens/rank ({lay['visual_frac']:.0%} visual, {lay['audio_frac']:.0%} audio); "
            f"{lay['spoken_turns']} spoken turns × ({lay['talker_context']} context + 9 + {lay['speech_frames']} frames) = "
            f"{lay['talker_tokens']} talker tokens, {lay['code_predictor_tokens']} code predictor tokens; "
            f"grad ckpt {'on' if lay['grad_ckpt'] else 'off'}\n"
            f"dtypes: {result['dtypes']} → {result['bytes_per_param_static']} B/trainable param, {BYTES[args.param_dtype]} B/frozen param"
        ),
        phases_doc="plan_speech",
    )
    fewest = result["fewest_gpus"]
    print(
        f"fewest {args.gpu_mem_gib:.0f} GiB GPUs: {fewest['gpus']} (ep {fewest['ep']}) at {fewest['per_rank_gib']:.1f} GiB per GPU"
        if fewest else f"fits on no layout of up to 1024 {args.gpu_mem_gib:.0f} GiB GPUs"
    )
