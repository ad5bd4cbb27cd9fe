"""sp: Ulysses sequence parallelism — fill-back memory, audio-encoder work, host syncs.

Side by side in one run, for SP=2 and SP=4 (gloo on CPU, one torchrun group per SP size), each rank's
micro batch made as VeOmni's trainer makes it (VeOmni's MainCollator: packing, its SP collator, the
model's SP shard hook):
- fill-back memory: peak bytes allocated per rank while filling the ViT outputs into the sliced
  embeddings (forward and backward), veomni_omni's all-to-all (sequence × hidden/sp) versus an
  all-gather fill-back (every rank builds the full sequence × hidden, as VeOmni 0.1.12 does),
  at real width (hidden 2048) on an 8k-token sequence, half of it visual;
- audio work: FLOPs of the audio tower per rank (the busiest rank) versus every rank encoding all
  audio of the batch, on a packed batch of long clips;
- host syncs: calls that force a device-to-host sync on an accelerator (.item(), .tolist(),
  bool/int of a tensor, nonzero, boolean-mask indexing, masked_select/masked_scatter, unique,
  repeat_interleave without output_size), counted in one SP forward of the tiny thinker with
  eager/SDPA attention, split by phase (multimodal part: encoders, fill-back, deepstack; text
  decoder) and by whose code made the call (veomni_omni's, or transformers' own modules, e.g. its
  SDPA audio attention splitting segments on the host and its eager MoE loop, which flash-attn
  and a grouped MoE kernel avoid on GPU).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .common import base_parser, emit, format_table, machine_info

SP_SIZES = (2, 4)


def _ours(syncs: dict) -> int:
    """Syncs made by veomni_omni's own code (the SP machinery), in either phase."""
    return sum(n for site, n in syncs.items() if site.endswith("/veomni_omni"))


def main(argv=None) -> int:
    from veomni_omni.launch import run_ranks

    parser = base_parser(__doc__.splitlines()[0], "sp")
    parser.add_argument("--quick", action="store_true", help="smaller sequence, fewer clips (for tests)")
    args = parser.parse_args(argv)
    worker = str(Path(__file__).with_name("sp_worker.py"))

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for sp_size in SP_SIZES:
            out = Path(tmp) / f"sp{sp_size}.json"
            run_ranks(worker, sp_size, [str(out), "--quick" if args.quick else "--full"], timeout_s=600)
            results[sp_size] = json.loads(out.read_text())

    rows = []
    for sp_size, r in results.items():
        memory = r["memory"]
        syncs = r["syncs"]
        rows.append([
            sp_size, memory["all_to_all_bytes"] / 2**20, memory["all_gather_bytes"] / 2**20, memory["ratio"],
            r["audio"]["ratio"], _ours(syncs), sum(syncs.values()) - _ours(syncs),
        ])
    print(format_table(
        ["sp", "fill-back MiB (ours)", "all-gather MiB", "memory ratio", "audio work ratio", "syncs (veomni_omni)", "syncs (transformers)"],
        rows,
        title=f"Ulysses SP, per rank (seq {results[SP_SIZES[0]]['memory']['seq_len']}, hidden {results[SP_SIZES[0]]['memory']['hidden']}, fp32)",
    ))
    print("memory ratio = peak bytes allocated in our fill-back / in an all-gather fill-back (forward + backward)")
    print("audio work ratio = audio-tower FLOPs of the busiest rank / FLOPs of encoding all audio on every rank")
    emit({
        "benchmark": "sp",
        "fill_back_memory_ratio": {str(sp): r["memory"]["ratio"] for sp, r in results.items()},
        "audio_work_ratio": {str(sp): r["audio"]["ratio"] for sp, r in results.items()},
        "host_syncs": max(_ours(r["syncs"]) for r in results.values()),
        "host_syncs_by_site": {str(sp): r["syncs"] for sp, r in results.items()},
        "details": {str(sp): r for sp, r in results.items()},
        "machine": machine_info(),
    }, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
