"""gpu: reduced-depth thinker at real widths on one CUDA GPU, bf16: tokens/s, MFU, peak memory, vs VeOmni.

Model: `real_thinker_config` with few layers (default 4 text layers, 6 ViT blocks with deepstack
at [1, 3, 5], 4 audio layers), every width real: hidden 2048, 128 experts top-8, moe_intermediate
768, 32 q / 4 kv heads × 128, vocab 152064, ViT 1152/4304/16 heads, audio 1280/5120/20 heads.
Parameters in bf16 (no FSDP, no optimizer step: forward + backward only).

Kernels, chosen from what is importable and given to both contenders through one VeOmni
`OpsImplementationConfig` (`gpu_ops_config`): flash-attn → attention `flash_attention_2`, which
VeOmni renames to its `veomni_flash_attention_2_with_sp`; both models use that name, as VeOmni's
builder would give it to ours (transformers treats any name containing "flash" as varlen flash);
else sdpa. liger-kernel → VeOmni's fused linear+cross-entropy (both models: ours reads it from
transformers' LOSS_MAPPING, VeOmni's through its loss OpSlot), else VeOmni's chunked loss.
triton → VeOmni's fused-Triton MoE and load-balancing loss for its model. VeOmni's generated omni
model has OpSlots only for the experts, the loss and the load-balancing loss, so liger RMSNorm /
SwiGLU / RoPE do not apply to either. Our experts run transformers' `grouped_mm`.

Batch: one packed row of `--seq-len` tokens (default 8192): text, two images, a two-frame-group
video and two audio clips (`gpu_mixed_rows`), M-RoPE positions precomputed, on the GPU.

FLOPs per step (`step_flops`), the MFU numerator, counted from the batch actually run; training
= 3 × forward; a matmul with N parameters costs 2N FLOPs per row forward:
  text:   6 · N_act · tokens + 6 · L · q_dim · Σ_rows S²     (causal attention: S²/2 pairs × 4·q_dim × 3)
          N_act per token = per layer (q, k, v, o projections + router + top-k experts × 3·H·I) + lm_head
          (≈ 3.0B for the full model: docs/design.md §3: ≈ 18 GFLOP/token plus attention)
  ViT:    6 · (depth · N_block + N_patch_embed) · patches + 12 · depth · Hv · Σ_frames (h·w)²
          + 6 · N_merger · (deepstack levels + 1) · visual LM tokens
  audio:  6 · (layers · N_layer + N_proj) · tokens + 12 · layers · Ha · Σ_windows w² + 3 · conv front end
MFU = FLOPs / median step time / peak dense bf16 FLOP/s (`PEAK_BF16_TFLOPS` by device name, or --peak-tflops).
JSON: {"mfu", "tokens_per_s", "ratio_vs_veomni": our tokens/s / VeOmni's (target ≥ 1.1), "step_time_ratio":
our step time / VeOmni's, "device", ...}; without
CUDA: {"skipped": "<why>"}.
"""

from __future__ import annotations

import importlib.util
import math
import statistics

import torch

from .common import add_timing_args, base_parser, emit, format_table, interleaved_times, machine_info, quiet_veomni_logs, set_threads

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, by substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H800", 989.4),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("B200", 2250.0),
)


def peak_tflops(device_name: str):
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def gpu_config(text_layers: int = 4, vision_depth: int = 6, audio_layers: int = 4):
    from .configs import real_thinker_config

    deepstack = [1, 3, 5] if vision_depth >= 6 else list(range(min(3, vision_depth)))
    if text_layers <= len(deepstack):
        raise SystemExit(f"--text-layers must exceed the {len(deepstack)} deepstack levels (else a merger gets no gradient)")
    return real_thinker_config(text_layers=text_layers, vision_depth=vision_depth, deepstack_visual_indexes=deepstack, audio_layers=audio_layers)


def gpu_mixed_rows(seq_len: int, config) -> list[list[tuple]]:
    """One packed row of exactly `seq_len` tokens: two images ≈ 12%, a video ≈ 12%, two audio clips ≈ 10%, rest text."""
    from veomni_omni.data.shaped_batches import audio_token_count

    merge = config.vision_config.spatial_merge_size
    side = max(2 * merge, 2 * int(math.sqrt(seq_len * 0.06 * merge**2) / 2))  # one image ≈ 6% of tokens
    vside = max(2 * merge, 2 * int(math.sqrt(seq_len * 0.12 * merge**2 / 2) / 2))  # video ≈ 12%: 2 frame groups
    frames = max(100, int(seq_len * 0.05 / 13) * 100)  # two clips ≈ 10%
    segments = [
        ("prompt", 32), ("image", 1, side, side), ("text", 0), ("audio", frames), ("text", 0),
        ("image", 1, side, side), ("text", 0), ("video", 2, vside, vside), ("text", 0), ("audio", frames), ("text", 0),
    ]
    used = 32
    for kind, *spec in segments:
        if kind in ("image", "video"):
            used += 2 + spec[0] * spec[1] * spec[2] // merge**2
        elif kind == "audio":
            used += 2 + audio_token_count(spec[0], config.audio_config.n_window)
    free = seq_len - used
    if free < 5:
        raise SystemExit(f"--seq-len {seq_len} too short for the mixed row")
    texts = [i for i, (kind, *_) in enumerate(segments) if kind == "text"]
    for n, i in enumerate(texts):
        segments[i] = ("text", free // len(texts) + (1 if n < free % len(texts) else 0))
    return [segments]


def activated_text_params(config) -> dict[str, int]:
    """Parameters one LM token passes through in the text model (embedding lookup excluded)."""
    t = config.text_config
    H, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = H * q + 2 * H * kv + q * H + H * t.num_experts + t.num_experts_per_tok * 3 * H * t.moe_intermediate_size
    return {"per_layer": per_layer, "layers": t.num_hidden_layers, "lm_head": H * t.vocab_size, "total": per_layer * t.num_hidden_layers + H * t.vocab_size}


def step_flops(config, batch: dict) -> dict[str, float]:
    """Training FLOPs (forward + backward = 3 × forward) of one step on `batch` (see module doc)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    t, v, a = config.text_config, config.vision_config, config.audio_config
    lengths = batch["attention_mask"].sum(-1).tolist()
    tokens = sum(lengths)
    act = activated_text_params(config)
    q_dim = t.num_attention_heads * t.head_dim
    text = 6 * act["total"] * tokens + 6 * t.num_hidden_layers * q_dim * sum(s * s for s in lengths)

    vision = 0.0
    Hv, Iv, merge = v.hidden_size, v.intermediate_size, v.spatial_merge_size**2
    block = 4 * Hv * Hv + 2 * Hv * Iv
    merger = (Hv * merge) ** 2 + Hv * merge * v.out_hidden_size
    n_mergers = len(v.deepstack_visual_indexes) + 1
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size**2 * Hv
    for key in ("image_grid_thw", "video_grid_thw"):
        for gt, gh, gw in batch.get(key, torch.zeros(0, 3)).tolist():
            patches = gt * gh * gw
            vision += 6 * (block * v.depth + patch_embed) * patches
            vision += 12 * v.depth * Hv * gt * (gh * gw) ** 2
            vision += 6 * merger * n_mergers * patches / merge

    audio = 0.0
    if "feature_attention_mask" in batch:
        Ha = a.d_model
        layer = 4 * Ha * Ha + 2 * Ha * a.encoder_ffn_dim
        C, chunk = a.downsample_hidden_size, 2 * a.n_window
        f1, t1 = math.ceil(a.num_mel_bins / 2), math.ceil(chunk / 2)
        f2, t2 = math.ceil(f1 / 2), math.ceil(t1 / 2)
        f3, t3 = math.ceil(f2 / 2), math.ceil(t2 / 2)
        conv_per_chunk = 2 * 9 * (C * f1 * t1 + C * C * f2 * t2 + C * C * f3 * t3) + 2 * t3 * C * f3 * Ha
        window = t3 * (a.n_window_infer // chunk)
        for frames in batch["feature_attention_mask"].sum(-1).tolist():
            n = int(_get_feat_extract_output_lengths(torch.tensor(frames), a.n_window))
            audio += 6 * (layer * a.encoder_layers + Ha * Ha + Ha * a.output_dim) * n  # + proj1, proj2
            audio += 3 * conv_per_chunk * math.ceil(frames / chunk)
            windows = [window] * (n // window) + ([n % window] if n % window else [])
            audio += 12 * a.encoder_layers * Ha * sum(w * w for w in windows)
    return {"text": text, "vision": vision, "audio": audio, "total": text + vision + audio, "tokens": tokens}


def gpu_ops_config():
    """VeOmni's ops config with every GPU kernel whose package is importable, eager otherwise."""
    import dataclasses

    from veomni.arguments.arguments_types import OpsImplementationConfig

    have = {name: importlib.util.find_spec(name) is not None for name in ("flash_attn", "liger_kernel", "triton")}
    fields = {f.name: "eager" for f in dataclasses.fields(OpsImplementationConfig)}
    liger = "liger_kernel" if have["liger_kernel"] else "eager"
    fields.update(
        attn_implementation="flash_attention_2" if have["flash_attn"] else "sdpa",
        qat_implementation="none",
        moe_implementation="fused_triton" if have["triton"] else "eager",
        cross_entropy_loss_implementation="liger_kernel" if have["liger_kernel"] else "chunk_loss",
        rms_norm_implementation=liger,
        swiglu_mlp_implementation=liger,
        rotary_pos_emb_implementation=liger,
        load_balancing_loss_implementation="triton" if have["triton"] else "eager",
    )
    return OpsImplementationConfig(**fields), have


def _skip(reason: str, as_json: bool) -> int:
    print(f"gpu: skipped: {reason}")
    emit({"benchmark": "gpu", "skipped": reason, "machine": machine_info()}, as_json)
    return 0


def measure(config, rows, ops_config, device, dtype=torch.bfloat16, reps=10, warmup=2, with_veomni=True, log=None) -> dict:
    """Interleaved fwd+bwd steps of our thinker and (with_veomni) VeOmni's, same weights and batch.

    Device-agnostic (the CPU smoke test runs it with a small config); CUDA adds synchronisation
    and peak-memory tracking. Returns per-contender medians, peaks, losses, FLOPs and the ratio.
    """
    import veomni_omni
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from veomni_omni.data.shaped_batches import build_batch

    from .veomni_vs_ours import build_veomni_thinker, grad_parity, to_veomni_inputs, veomni_ops

    veomni_omni.apply()
    device = torch.device(device)
    cuda = device.type == "cuda"
    attn = ops_config.attn_implementation

    def to_device(batch):
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(device)
                if key in ("pixel_values", "pixel_values_videos", "input_features"):
                    value = value.to(dtype)  # the audio tower does not cast its input itself
            out[key] = value
        return out

    cpu_batch = build_batch(rows, config, seed=0, with_position_ids=True)
    flops = step_flops(config, cpu_batch)
    batch = to_device(cpu_batch)
    veomni_batch = to_device(to_veomni_inputs(cpu_batch, config))

    with veomni_ops(ops_config):
        torch.manual_seed(0)
        with torch.device(device):
            ours = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        models = {"veomni_omni": (ours.train(), batch)}
        if with_veomni:
            theirs = build_veomni_thinker(config, ops_config, ours.state_dict(), dtype=dtype, device=device)
            models["veomni"] = (theirs.train(), veomni_batch)
        peaks, losses = dict.fromkeys(models, 0), {}

        def step(name):
            model, inputs = models[name]

            def run():
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                loss = model(**inputs).loss
                loss.backward()
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated())
                losses[name] = loss.item()

            return run

        times = interleaved_times({name: step(name) for name in models}, reps=reps, warmup=warmup, log=log)
        grad_diff = grad_parity(ours, models["veomni"][0]) if with_veomni else None

    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "median_s": med,
        "peak_bytes": peaks if cuda else None,
        "loss": losses,
        "flops": flops,
        "ratio": med["veomni_omni"] / med["veomni"] if with_veomni else None,
        "max_rel_grad_diff": grad_diff,
        "params": sum(p.numel() for p in ours.parameters()),
        "experts_implementation": ours.config.get_text_config()._experts_implementation,
        "attn_implementation": attn,
    }


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0], "gpu")
    add_timing_args(parser, reps=10, warmup=2)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--vision-depth", type=int, default=6)
    parser.add_argument("--audio-layers", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s (default: by device name)")
    parser.add_argument("--no-veomni", action="store_true", help="time veomni_omni only (skip VeOmni's model)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if not torch.cuda.is_available():
        return _skip("CUDA is not available (torch %s, no GPU visible)" % torch.__version__, args.json)

    quiet_veomni_logs()
    seq_len = 2048 if args.quick else args.seq_len
    reps, warmup = (2, 1) if args.quick else (args.reps, args.warmup)
    config = gpu_config(args.text_layers, args.vision_depth, args.audio_layers)
    ops_config, have = gpu_ops_config()
    m = measure(
        config, gpu_mixed_rows(seq_len, config), ops_config, "cuda", torch.bfloat16, reps, warmup,
        with_veomni=not args.no_veomni, log=None if args.json else print,
    )

    device_name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(device_name)
    flops = m["flops"]
    rows, result = [], {}
    for name, seconds in m["median_s"].items():
        tps = flops["tokens"] / seconds
        mfu = flops["total"] / seconds / (peak * 1e12) if peak else None
        mem = m["peak_bytes"][name] / 2**30
        result[name] = {"step_ms": seconds * 1e3, "tokens_per_s": tps, "mfu": mfu, "peak_mem_gib": mem, "loss": m["loss"][name]}
        rows.append([name, seconds * 1e3, tps, "-" if mfu is None else f"{mfu:.1%}", mem, m["loss"][name]])
    print(
        format_table(
            ["contender", "step ms", "tokens/s", "MFU", "peak GiB", "loss"],
            rows,
            title=(
                f"gpu: {device_name}, thinker {m['params'] / 1e9:.2f}B params ({config.text_config.num_hidden_layers} text layers, "
                f"{config.vision_config.depth} ViT blocks, {config.audio_config.encoder_layers} audio layers; real widths), "
                f"bf16, {flops['tokens']} tokens/step, attention {m['attn_implementation']}, kernels {have}, {reps} interleaved rounds\n"
                f"FLOPs/step {flops['total'] / 1e12:.2f} T (text {flops['text'] / 1e12:.2f}, ViT {flops['vision'] / 1e12:.2f}, "
                f"audio {flops['audio'] / 1e12:.2f}); peak {peak} TFLOP/s"
            ),
        )
    )
    if m["ratio"] is not None:
        print(f"tokens/s veomni_omni/veomni = {1 / m['ratio']:.3f} (target >= 1.1); step time ratio {m['ratio']:.3f}; max rel grad diff {m['max_rel_grad_diff']:.2e} (bf16)")
    ours = result["veomni_omni"]
    emit(
        {
            "benchmark": "gpu",
            "mfu": ours["mfu"],
            "tokens_per_s": ours["tokens_per_s"],
            "ratio_vs_veomni": None if m["ratio"] is None else 1 / m["ratio"],  # tokens/s: ours / VeOmni's
            "step_time_ratio": m["ratio"],
            "device": device_name,
            "peak_mem_gib": ours["peak_mem_gib"],
            "results": result,
            "flops_per_step": flops,
            "flops_formula": "3 x forward: 6*activated_params*tokens + attention (text causal 6*L*q_dim*S^2; ViT 12*depth*Hv*sum(frame_patches^2); audio 12*layers*Ha*sum(window^2)) + 3 x audio conv",
            "peak_tflops": peak,
            "kernels": {
                **have,
                "attn_implementation": m["attn_implementation"],
                "moe_veomni": ops_config.moe_implementation,
                "moe_veomni_omni": m["experts_implementation"],
                "cross_entropy": ops_config.cross_entropy_loss_implementation,
            },
            "max_rel_grad_diff": m["max_rel_grad_diff"],
            "seq_len": seq_len,
            "reps": reps,
            "quick": args.quick,
            "params": m["params"],
            "machine": machine_info(),
        },
        args.json,
    )
    return 0
