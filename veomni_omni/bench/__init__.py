"""Benchmarks: `python -m veomni_omni.bench <name> [--json] [--quick]`.

Every timing is a ratio of two contenders measured side by side in one process (interleaved,
several repetitions, median), never an absolute number compared across runs or machines.
Each benchmark prints a readable table; with `--json` its last stdout line is one JSON object
holding its ratios (or sizes) and the machine it ran on (`machine`).
"""

# CLI name -> (module under veomni_omni.bench, one-line description).
BENCHMARKS = {
    "overhead": ("overhead", "patched thinker vs unpatched HF, same weights, fwd+bwd step time (CPU)"),
    "veomni": ("veomni_vs_ours", "veomni_omni's thinker vs VeOmni 0.1.12's own generated model, fwd+bwd (CPU)"),
    "plan": ("plan", "full 30B-A3B thinker on meta: per-rank memory under an FSDP/EP/SP layout, full FT or LoRA; fewest GPUs"),
    "gpu": ("gpu", "reduced-depth thinker at real widths, bf16: tokens/s, MFU, peak memory, vs VeOmni (CUDA)"),
    "sp": ("sp", "Ulysses SP: fill-back memory and audio work vs the all-gather way, host syncs (2 and 4 gloo ranks)"),
    "realwidth": ("realwidth", "released widths, reduced depth, fp32 CPU: memory vs plan (2 gloo ranks), speed vs HF, VeOmni, EP 1"),
}
