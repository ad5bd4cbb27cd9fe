"""Tiny Qwen3-Omni-MoE configs, correctly shaped synthetic batches, and the parity bar.

Shared by the tests, the benchmarks and the demo. Shapes follow docs/design.md §7: start/end
tokens around every placeholder run, pixel rows in grid order, one audio row per clip.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Optional

import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

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
PATCH_DIM = 3 * 2 * 16 * 16  # channels · temporal_patch · patch²
MEL_BINS = 128
PARITY_RTOL = 1e-5  # docs/design.md §7: max|got − ref| ≤ 1e-5 · max|ref| per tensor
ROUNDOFF_FLOOR = 1e-6  # see parity_errors


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
        vision_start_token_id=TOKENS["vision_start"],
        audio_start_token_id=TOKENS["audio_start"],
        image_token_id=TOKENS["image"],
        video_token_id=TOKENS["video"],
        audio_token_id=TOKENS["audio"],
        architectures=["Qwen3OmniMoeThinkerForConditionalGeneration"],
    )


def tiny_omni_config() -> Qwen3OmniMoeConfig:
    """Top-level config (thinker + a tiny talker and code2wav), as in the released checkpoint: the
    token roles (chat, tts, multimodal) at the tiny vocabulary's ids, the codec's at `TINY_CODEC`."""
    thinker = tiny_thinker_config()
    groups = 4
    media_ids = dict(
        audio_start_token_id=TOKENS["audio_start"], audio_end_token_id=TOKENS["audio_end"],
        audio_token_id=TOKENS["audio"], image_token_id=TOKENS["image"], video_token_id=TOKENS["video"],
        vision_start_token_id=TOKENS["vision_start"],
    )
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
            **media_ids,
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


def audio_token_count(frames: int, n_window: int = 50) -> int:
    return int(_get_feat_extract_output_lengths(torch.tensor(frames), n_window))


def _interleaved_audio_video(grid_thw, n_audio: int, second_per_grid: float, per_second: int, merge: int) -> list[int]:
    """Token order of an audio-in-video clip: video rows of each frame group at time t·spg·per_second,
    audio tokens at 0,1,2,...; ties go to video (as the HF processor does)."""
    t, h, w = grid_thw
    video_times = [ti * second_per_grid * per_second for ti in range(t) for _ in range((h // merge) * (w // merge))]
    tokens, vi, ai = [], 0, 0
    while vi < len(video_times) and ai < n_audio:
        if video_times[vi] <= ai:
            tokens.append(TOKENS["video"])
            vi += 1
        else:
            tokens.append(TOKENS["audio"])
            ai += 1
    return tokens + [TOKENS["video"]] * (len(video_times) - vi) + [TOKENS["audio"]] * (n_audio - ai)


def build_batch(
    rows: list[list[tuple]],
    config: Optional[Qwen3OmniMoeThinkerConfig] = None,
    seed: int = 0,
    with_position_ids: bool = False,
) -> dict:
    """Model inputs for `rows`, each a list of segments in sequence order:

    ("prompt", n) untrained text · ("text", n) trained text · ("image", t, h, w) ·
    ("video", t, h, w) · ("audio", frames) · ("audio_in_video", t, h, w, frames).
    Grids count ViT patches (h, w even). Rows are right-padded. `with_position_ids` adds the
    (3, B, S) M-RoPE positions, computed per batch as a data pipeline does (see `rope_position_ids`).
    """
    config = config or tiny_thinker_config()
    merge = config.vision_config.spatial_merge_size
    per_second = config.position_id_per_seconds
    second_per_grid = 1.0
    gen = torch.Generator().manual_seed(seed)

    def text_ids(n):
        return torch.randint(1, FIRST_SPECIAL, (n,), generator=gen).tolist()

    seqs, label_seqs = [], []
    images, image_grids, videos, video_grids, clips = [], [], [], [], []
    for row in rows:
        ids, labels = [], []

        def add(tokens, trained=False):
            ids.extend(tokens)
            labels.extend(tokens if trained else [-100] * len(tokens))

        for kind, *spec in row:
            if kind in ("prompt", "text"):
                add(text_ids(spec[0]), trained=kind == "text")
            elif kind == "image":
                image_grids.append(spec)
                images.append(torch.randn(spec[0] * spec[1] * spec[2], PATCH_DIM, generator=gen))
                n = spec[0] * spec[1] * spec[2] // merge**2
                add([TOKENS["vision_start"]] + [TOKENS["image"]] * n + [TOKENS["vision_end"]])
            elif kind == "video":
                video_grids.append(spec)
                videos.append(torch.randn(spec[0] * spec[1] * spec[2], PATCH_DIM, generator=gen))
                n = spec[0] * spec[1] * spec[2] // merge**2
                add([TOKENS["vision_start"]] + [TOKENS["video"]] * n + [TOKENS["vision_end"]])
            elif kind == "audio":
                clips.append(torch.randn(MEL_BINS, spec[0], generator=gen))
                n = audio_token_count(spec[0], config.audio_config.n_window)
                add([TOKENS["audio_start"]] + [TOKENS["audio"]] * n + [TOKENS["audio_end"]])
            elif kind == "audio_in_video":
                grid, frames = spec[:3], spec[3]
                video_grids.append(grid)
                videos.append(torch.randn(grid[0] * grid[1] * grid[2], PATCH_DIM, generator=gen))
                clips.append(torch.randn(MEL_BINS, frames, generator=gen))
                n_audio = audio_token_count(frames, config.audio_config.n_window)
                body = _interleaved_audio_video(grid, n_audio, second_per_grid, per_second, merge)
                add([TOKENS["vision_start"], TOKENS["audio_start"]] + body + [TOKENS["audio_end"], TOKENS["vision_end"]])
            else:
                raise ValueError(f"unknown segment kind {kind!r}")
        seqs.append(ids)
        label_seqs.append(labels)

    length = max(len(s) for s in seqs)
    batch = {
        "input_ids": torch.tensor([s + [TOKENS["pad"]] * (length - len(s)) for s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs]),
        "labels": torch.tensor([s + [-100] * (length - len(s)) for s in label_seqs]),
    }
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.tensor(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.tensor(video_grids)
        batch["video_second_per_grid"] = torch.full((len(videos),), second_per_grid)
    if clips:
        max_frames = max(c.shape[1] for c in clips)
        batch["input_features"] = torch.stack([torch.nn.functional.pad(c, (0, max_frames - c.shape[1])) for c in clips])
        batch["feature_attention_mask"] = torch.tensor(
            [[1] * c.shape[1] + [0] * (max_frames - c.shape[1]) for c in clips]
        )
    if any(kind == "audio_in_video" for row in rows for kind, *_ in row):
        batch["use_audio_in_video"] = True
    if with_position_ids:
        batch["position_ids"] = rope_position_ids(batch, config)
    return batch


def rope_position_ids(batch: dict, config: Qwen3OmniMoeThinkerConfig) -> torch.Tensor:
    """HF's own `get_rope_index` on a batch, without a model. Per-batch positions let batches with
    and without audio-in-video be concatenated (HF's flag is one per forward call)."""
    owner = hf_modeling.Qwen3OmniMoePreTrainedModelForConditionalGeneration
    holder = SimpleNamespace(config=config, spatial_merge_size=config.vision_config.spatial_merge_size)
    holder.get_llm_pos_ids_for_vision = partial(owner.get_llm_pos_ids_for_vision, holder)
    mask = batch.get("feature_attention_mask")
    positions, _ = owner.get_rope_index(
        holder,
        batch["input_ids"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch["attention_mask"],
        batch.get("use_audio_in_video", False),
        mask.sum(-1) if mask is not None else None,
        batch.get("video_second_per_grid"),
    )
    return positions


def loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, Optional[torch.Tensor]]]:
    """One forward+backward; returns the detached loss and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def tensor_difference(got: Optional[torch.Tensor], ref: Optional[torch.Tensor]) -> Optional[tuple[float, float]]:
    """(max|got − ref|, max|ref|) of one tensor pair; (inf, 0) when only one side exists, None when
    neither does. A pair's entry in a `difference_table`. Computed in slices of 2^24 elements: a
    real-width expert tensor (1.6 GB in fp32) gets no full-size temporary."""
    if got is None or ref is None:
        return None if (got is None) == (ref is None) else (float("inf"), 0.0)
    if got.numel() != ref.numel():
        raise ValueError(f"cannot compare a tensor of shape {tuple(got.shape)} with a reference of shape {tuple(ref.shape)}")
    pairs = zip(got.detach().reshape(-1).split(1 << 24), ref.detach().reshape(-1).split(1 << 24))
    diff, scale = 0.0, 0.0
    for g, r in (pair for pair in pairs if pair[1].numel()):
        r = r.float()
        diff = max(diff, torch.sub(g.float(), r).abs_().max().item())
        scale = max(scale, r.abs().max().item())
    return diff, scale


def difference_table(got: dict, ref: dict) -> dict[str, Optional[tuple[float, float]]]:
    """`tensor_difference` of every name on either side. A worker that cannot hold all tensors at
    once builds the table one pair at a time instead."""
    return {name: tensor_difference(got.get(name), ref.get(name)) for name in sorted(ref.keys() | got.keys())}


def _judged(table: dict, rtol: float):
    """Per tensor: (name, max|got − ref|, the largest difference allowed), or a one-sided entry.

    The limit is rtol · max|ref|; a tensor whose reference is at fp32 round-off level (max|ref| below
    ROUNDOFF_FLOOR times the largest max|ref| of the set) has a true value of zero, e.g. attention
    key-bias gradients (softmax is shift invariant): both sides are round-off, and its difference
    must stay within that floor instead of within rtol of its own noise.
    """
    floor = ROUNDOFF_FLOOR * max((entry[1] for entry in table.values() if entry is not None), default=0.0)
    for name, entry in sorted(table.items()):
        if entry is None or entry[0] == float("inf"):
            yield name, None if entry is None else float("inf"), None
            continue
        yield name, entry[0], (rtol * entry[1] if entry[1] >= floor else floor)


def table_errors(table: dict, rtol: float = PARITY_RTOL) -> list[str]:
    """Tensors of a `difference_table` whose max|got − ref| exceeds its limit (see `_judged`); a tensor
    present on one side only is an error."""
    errors = []
    for name, diff, limit in _judged(table, rtol):
        if diff == float("inf"):
            errors.append(f"{name}: present on one side only")
        elif diff is not None and diff > limit:
            errors.append(f"{name}: max|got-ref|={diff:.3e} > {limit:.3e}")
    return errors


def table_max_relative_difference(table: dict) -> float:
    """Largest max|got − ref| / max|ref| over the tensors of a `difference_table` present on both sides
    (round-off tensors: over the floor), i.e. in units where PARITY_RTOL is the bar."""
    ratios = [PARITY_RTOL * diff / limit for _, diff, limit in _judged(table, PARITY_RTOL) if limit]
    return max(ratios, default=0.0)


def parity_errors(got: dict, ref: dict, rtol: float = PARITY_RTOL) -> list[str]:
    """`table_errors` of two dicts of tensors; None must match None."""
    return table_errors(difference_table(got, ref), rtol)


def max_relative_difference(got: dict, ref: dict) -> float:
    """Largest max|got − ref| / scale over the tensors present on both sides (for reporting)."""
    return table_max_relative_difference(difference_table(got, ref))


def run_ranks(
    script: str, world_size: int, args: list[str], timeout_s: float, native_abort_retries: int = 1, torchrun_args: tuple[str, ...] = ()
) -> str:
    """Run `script` under torchrun on CPU/gloo with `world_size` ranks; return its output.

    Fails with the ranks' tracebacks if any rank fails, and kills the whole group (never hangs) if it
    has not finished within `timeout_s`. A rank dying in native code with no Python exception
    ("terminate called ...", seen rarely from gloo under heavy CPU contention) is retried
    `native_abort_retries` times with a warning; a deterministic crash still fails. `torchrun_args`:
    more torchrun options (e.g. `--max-restarts=1`).
    """
    import os
    import signal
    import subprocess
    import sys
    import warnings

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}", *torchrun_args, script, *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise TimeoutError(
            f"{world_size}-rank run of {script} did not finish within {timeout_s:.0f} s (a rank is probably stuck "
            f"in a collective). Last output:\n{output[-4000:]}"
        )
    if proc.returncode != 0:
        # torchrun prefixes each rank's traceback with "[rankN]:"; show those rather than log noise.
        tracebacks = "\n".join(line for line in output.splitlines() if line.startswith("[rank"))
        if not tracebacks and "terminate called" in output and native_abort_retries > 0:
            warnings.warn(f"a rank of {script} aborted in native code without a Python error; retrying once")
            return run_ranks(script, world_size, args, timeout_s, native_abort_retries - 1, torchrun_args)
        raise RuntimeError(f"{world_size}-rank run of {script} failed (exit {proc.returncode}):\n{(tracebacks or output)[-6000:]}")
    return output


def concat_batches(batches: list[dict]) -> dict:
    """The global batch of several local (per-rank) batches: rows in order, right-padded to one
    length; pixel rows, grids and audio clips concatenated in the same order."""
    length = max(b["input_ids"].shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    merged = {
        "input_ids": torch.cat([pad(b["input_ids"], TOKENS["pad"]) for b in batches]),
        "attention_mask": torch.cat([pad(b["attention_mask"], 0) for b in batches]),
        "labels": torch.cat([pad(b["labels"], -100) for b in batches]),
    }
    for key in ("talker_frames", "talker_speakers"):  # speech markers, aligned with the tokens
        if any(key in b for b in batches):
            merged[key] = torch.cat([pad(b[key] if key in b else torch.zeros_like(b["input_ids"]), 0) for b in batches])
    for key, dim in (("talker_codes", 1), ("talker_labels", 0), ("code_predictor_labels", 0)):  # in turn order
        if any(key in b for b in batches):
            merged[key] = torch.cat([b[key] for b in batches if key in b], dim=dim)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [b[key] for b in batches if key in b]
        if parts:
            merged[key] = torch.cat(parts)
    clips = [(f, m) for b in batches if "input_features" in b for f, m in zip(b["input_features"], b["feature_attention_mask"])]
    if clips:
        frames = max(f.shape[-1] for f, _ in clips)
        merged["input_features"] = torch.stack([torch.nn.functional.pad(f, (0, frames - f.shape[-1])) for f, _ in clips])
        merged["feature_attention_mask"] = torch.stack([torch.nn.functional.pad(m, (0, frames - m.shape[-1])) for _, m in clips])
    if any(b.get("use_audio_in_video") for b in batches):
        merged["use_audio_in_video"] = True
    if all("position_ids" in b for b in batches):
        merged["position_ids"] = torch.cat([pad(b["position_ids"].flatten(0, 1), 0).view(3, -1, length) for b in batches], dim=1)
    return merged


def iter_full_tensors(model: torch.nn.Module, grads: bool = False, owner: int = 0):
    """(name, whole tensor on rank `owner`, None elsewhere) for every parameter (or, with `grads`,
    every gradient) of a parallelised model, one at a time: FSDP shards and EP slices put together by
    the checkpoint code's `gather_to`. Collective: every rank iterates it to the end; a gradient
    missing on some ranks only is an error."""
    from dataclasses import replace

    from .checkpoint.sharding import distinct_boxes, gather_to, sharded_params

    params = sharded_params(model)
    if grads:
        params = {name: replace(p, param=p.param.grad) for name, p in params.items() if p.param.grad is not None}
    boxes = distinct_boxes(params)
    mine = torch.distributed.get_rank() == owner
    for name, p in params.items():
        full = gather_to(p, boxes[name], {owner})
        yield name, full if mine else None


def gather_full_tensors(model: torch.nn.Module, grads: bool = False, owner: int = 0) -> Optional[dict]:
    """`iter_full_tensors` as one dict on rank `owner` (None elsewhere)."""
    full = dict(iter_full_tensors(model, grads, owner))
    return full if torch.distributed.get_rank() == owner else None


def _take(items: list, counts: list[int], wanted: int, what: str) -> list:
    """Pop items from the front of `items` (with their token `counts`) until `wanted` tokens are covered."""
    taken, covered = [], 0
    while covered < wanted:
        if not items:
            raise ValueError(f"{what}: {wanted} placeholder tokens but the micro batch has no more inputs for them")
        taken.append(items.pop(0))
        covered += counts.pop(0)
    if covered != wanted:
        raise ValueError(f"{what}: {wanted} placeholder tokens do not match whole inputs ({covered})")
    return taken


def unpack_veomni_micro_batch(micro_batch: dict, config: Qwen3OmniMoeThinkerConfig) -> list[dict]:
    """The samples of one VeOmni micro batch (MainCollator's packed row: `input_ids` (1, S),
    `position_ids` (1, 3, S), flat audio `input_features` (frames, mel) + `audio_feature_lengths`)
    back in HF's layout, one batch per sample as `build_batch` makes them: a row each, audio
    (clips, mel, frames) + `feature_attention_mask`, positions (3, 1, S). Samples are split where
    VeOmni's packing put them (`cu_seq_lens_q`); images, videos and clips go to the sample whose
    placeholder tokens they fill, in order."""
    merge = config.vision_config.spatial_merge_size
    bounds = micro_batch["cu_seq_lens_q"].tolist()
    media = {}
    for kind, values, grids in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
        if grids in micro_batch:
            rows = micro_batch[grids].prod(-1).tolist()
            media[kind] = (list(zip(micro_batch[values].split(rows), micro_batch[grids])), [n // merge**2 for n in rows])
    if "audio_feature_lengths" in micro_batch:
        lengths = micro_batch["audio_feature_lengths"].tolist()
        clips = list(micro_batch["input_features"].split(lengths))
        media["audio"] = (clips, [audio_token_count(n, config.audio_config.n_window) for n in lengths])
    token_ids = {"image": config.image_token_id, "video": config.video_token_id, "audio": config.audio_token_id}
    samples = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        ids = micro_batch["input_ids"][:, start:end]
        sample = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": micro_batch["labels"][:, start:end],
            "position_ids": micro_batch["position_ids"][:, :, start:end].transpose(0, 1),
        }
        for kind, token in token_ids.items():
            wanted = int((ids == token).sum())
            if not wanted:
                continue
            items, counts = media.get(kind, ([], []))
            taken = _take(items, counts, wanted, f"{kind} of the sample at [{start}, {end})")
            if kind == "audio":
                frames = max(c.shape[0] for c in taken)
                sample["input_features"] = torch.stack([torch.nn.functional.pad(c.T, (0, frames - c.shape[0])) for c in taken])
                sample["feature_attention_mask"] = torch.stack([(torch.arange(frames) < c.shape[0]).long() for c in taken])
            else:
                prefix = "pixel_values" if kind == "image" else "pixel_values_videos"
                sample[prefix] = torch.cat([rows for rows, _ in taken])
                sample[f"{kind}_grid_thw"] = torch.stack([grid for _, grid in taken])
        samples.append(sample)
    left = {kind: len(items) for kind, (items, _) in media.items() if items}
    if left:
        raise ValueError(f"micro batch inputs without placeholder tokens: {left}")
    return samples
