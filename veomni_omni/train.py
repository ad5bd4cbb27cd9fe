"""The main job: train Qwen3-Omni-MoE's thinker from a recipe, on CPU (gloo) or CUDA (NCCL).

    torchrun --nproc-per-node 2 -m veomni_omni.train recipes/tiny_cpu.yaml [key=value ...]

A lean trainer loop over VeOmni's own building blocks, in the order VeOmni's BaseTrainer runs them:
parallel state (`init_parallel_state`), model (`build_foundation_model` on meta, through our registry
entries), FSDP2 and EP (`build_parallelize_model`, which also loads the weights: a checkpoint's, or from
scratch a whole-model init saved once, see `initial_weights`), optimizer and
LR schedule (`build_optimizer`, `build_lr_scheduler`), VeOmni's loss normalisation over the global
batch (`count_loss_token`, `reduce_global_loss_token`, `mean_global_loss`), gradient clipping
(`veomni_clip_grad_norm`) and DCP checkpoints (VeOmni's checkpointer). Not VeOmni's trainer class:
its data transform, dataset, packing collator and SP slicing are replaced by ours
(`veomni_omni.train_data`; VeOmni's Qwen-Omni transform needs torchvision and hooks of its own
generated model); see README "Main job".

Output: a log line per step (loss, tokens/s, tokens per modality, skipped samples); at the end the
held-out accuracy per modality against chance, the loss curve (PNG), the saved model, and as the
last stdout line a JSON summary.

Failures end the whole job with their message instead of leaving ranks waiting: the recipe and its
parallel layout are checked before anything is built; collectives time out after
`train.dist_timeout_s` (a rank that died or hangs); a rank's exception is recorded for torchrun
(`@record`), which then stops the other ranks; a NaN/inf loss or gradient norm is reported with the
step and its samples and the update dropped or the job stopped (`train.on_nonfinite_loss`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from veomni_omni.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from veomni_omni.data.checks import raise_on_problems
from veomni_omni.recipe import Recipe, RecipeError, check_layout, load_recipe, model_config, recipe_to_dict


# ------------------------------------------------------------------------------------ helpers
def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for name in ("veomni", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _say(*parts, rank0=True):
    if not rank0 or not dist.is_initialized() or dist.get_rank() == 0:
        print(*parts, flush=True)


def _ops_config(recipe: Recipe, device_type: str):
    from veomni.arguments.arguments_types import OpsImplementationConfig

    from veomni_omni.host import eager_ops_config

    ops = dict(recipe.model.ops_implementation)
    if device_type == "cpu":
        config = eager_ops_config(ops.pop("attn_implementation", "sdpa"))
        for key, value in ops.items():
            if not hasattr(config, key):
                raise RecipeError(f"model.ops_implementation: unknown op {key!r}")
            setattr(config, key, value)
        return config
    return OpsImplementationConfig(**ops)


def _model_inputs(inputs: dict, device: torch.device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return {k: move(v) for k, v in inputs.items()}


# --------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, pipeline, n_samples: int, eos_id: int, device, sp_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Greedy next-token accuracy on the answer tokens (labels other than the end-of-turn token) of
    every eval sample: a sample is right when the argmax of every answer position is the answer
    token — what greedy decoding from the prompt produces. Returns per-sample (wrong, seen) counts
    summed over all ranks, and the number of skipped eval samples."""
    model.eval()
    batches = []
    while (mb := pipeline.next_micro_batch()) is not None:
        batches.append(mb)
    raise_on_problems([p for mb in batches for p in mb.problems])
    counts = torch.tensor([len(batches), -len(batches)], device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # (most, -fewest) batches of any rank
    if counts[1] == 0:  # every rank sees it, so none is left waiting in a collective
        raise RuntimeError("a data-parallel group got no evaluation sample; use more eval samples than data-parallel groups")
    wrong = torch.zeros(n_samples, device=device)
    seen = torch.zeros(n_samples, device=device)
    for k in range(int(counts[0])):
        dummy = k >= len(batches)  # every rank runs the same number of forwards (FSDP collectives)
        mb = batches[k % len(batches)]
        inputs = dict(mb.inputs)
        labels = inputs.pop("labels")
        logits = model(**_model_inputs(inputs, device), use_cache=False).logits
        if dummy:
            continue
        pred = logits.argmax(-1).cpu()
        owner = torch.full(labels.shape, -1, dtype=torch.long)
        if sp_size > 1:  # labels are pre-shifted; this rank holds positions [begin, end) of the packed row
            targets = labels
            begin, end = mb.inputs["sp_inputs"]["slice"]
            starts = torch.tensor(mb.offsets)
            positions = torch.arange(begin, end)
            ids = torch.tensor([i for i, _ in mb.samples])
            owner[0] = ids[torch.searchsorted(starts, positions, right=True) - 1]
        else:  # padded rows: position s predicts labels[:, s + 1]
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            for row, (i, _) in enumerate(mb.samples):
                owner[row] = i
        keep = (targets != -100) & (targets != eos_id)
        idx = owner[keep].to(device)
        seen.index_add_(0, idx, torch.ones(idx.shape, device=device))
        wrong.index_add_(0, idx, (pred[keep] != targets[keep]).float().to(device))
    dist.all_reduce(wrong)
    dist.all_reduce(seen)
    skipped = torch.tensor([pipeline.skipped_total], device=device)
    dist.all_reduce(skipped)
    model.train()
    return wrong.cpu(), seen.cpu(), int(skipped) // sp_size


def accuracy_by_modality(samples, wrong, seen) -> tuple[dict, dict]:
    """(accuracy, number of scored samples) per modality; a sample is right when no answer token was wrong."""
    from veomni_omni.train_data import MODALITIES, sample_modality

    right = {m: 0 for m in MODALITIES}
    total = {m: 0 for m in MODALITIES}
    for i, sample in enumerate(samples):
        if seen[i] == 0:  # skipped (unreadable media) or nothing to score
            continue
        m = sample_modality(sample)
        total[m] += 1
        right[m] += int(wrong[i] == 0)
    return {m: (round(right[m] / total[m], 4) if total[m] else None) for m in MODALITIES}, total


# ---------------------------------------------------------------------------------- reporting
def plot_losses(path: Path, losses: list, evals: list, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [s for s, _ in losses]
    ax.plot(steps, [v for _, v in losses], lw=1, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (global token mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        for modality in evals[-1][1]:
            pts = [(s, acc[modality]) for s, acc in evals if acc.get(modality) is not None]
            ax2.plot([s for s, _ in pts], [a for _, a in pts], marker="o", ms=3, label=f"eval acc {modality}")
        if not math.isnan(chance):
            ax2.axhline(chance, ls="--", color="grey", lw=1, label="chance")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("held-out accuracy")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("veomni_omni main job")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_dcp(checkpointer, model, optimizer, scheduler, path: Path, step: int) -> None:
    """Model + optimizer + schedule as a DCP checkpoint (VeOmni's checkpointer, EP-aware)."""
    from veomni.distributed.parallel_state import get_parallel_state

    checkpointer.save(str(path), {"model": model, "optimizer": optimizer,
                                  "extra_state": {"global_step": step, "lr_scheduler": scheduler.state_dict()}},
                      parallel_state=get_parallel_state())
    dist.barrier()


def initial_weights(config_path: str, path: str, ops, seed: int) -> None:
    """A from-scratch model, initialised whole on this process and saved as a checkpoint for every
    rank to load. VeOmni's own from-scratch path initialises each rank's shard from the same random
    state, so every FSDP-sharded tensor repeats itself across ranks (and EP ranks get identical
    experts and router rows, which then never diverge)."""
    from safetensors.torch import save_file
    from veomni.models import build_foundation_model

    torch.manual_seed(seed)
    model = build_foundation_model(config_path, torch_dtype="float32", init_device="cpu", ops_implementation=ops)
    Path(path).mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(path) / "model.safetensors"))


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm was NaN/inf and the recipe says to stop (or too many in a row)."""


def describe_nonfinite(step: int, loss: float, grad_norm: float, ranks: list) -> str:
    """One report line. `ranks`: per rank, (whether its own loss was finite, ids of its step's samples)."""
    bad = [r for r, (finite, _) in enumerate(ranks) if not finite]
    ids = sorted({i for finite, sample_ids in ranks if not finite for i in sample_ids})
    if not ids:  # finite losses everywhere, non-finite gradients: every sample of the step is a suspect
        ids = sorted({i for _, sample_ids in ranks for i in sample_ids})
    where = f"loss non-finite on rank(s) {bad}" if bad else "loss finite, gradients non-finite"
    return f"step {step}: non-finite loss {loss} / grad norm {grad_norm} ({where}); samples of the step: {', '.join(map(str, ids))}"


# ------------------------------------------------------------------------------------ the job
def run(recipe: Recipe) -> dict:
    start = time.time()
    t, m, d = recipe.train, recipe.model, recipe.data
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=t.dist_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()

    import veomni_omni  # noqa: F401  (patch set + registry hand-over, before VeOmni builds anything)
    from veomni.arguments.arguments_types import MixedPrecisionConfig
    from veomni.checkpoint import build_checkpointer
    from veomni.distributed.clip_grad_norm import veomni_clip_grad_norm
    from veomni.distributed.parallel_state import get_parallel_state, init_parallel_state
    from veomni.distributed.torch_parallelize import build_parallelize_model
    from veomni.models import build_foundation_model, build_processor
    from veomni.optim import build_lr_scheduler, build_optimizer
    from veomni.utils.loss_utils import count_loss_token, mean_global_loss, reduce_global_loss_token

    from veomni_omni.data.processor import build_tiny_processor
    from veomni_omni.data.samples import SampleEncoder
    from veomni_omni.models.sequence_parallel import ULYSSES_SDPA
    from veomni_omni.train_data import MODALITIES, Pipeline, chance_level, prepare_datasets

    sp, ep = t.accelerator.ulysses_size, t.accelerator.ep_size
    check_layout(recipe, world)
    init_parallel_state(dp_size=world // sp, ulysses_size=sp, dp_mode=t.accelerator.fsdp_mode, device_type=device.type,
                        extra_parallel_sizes=(ep,), extra_parallel_names=("ep",))
    state = get_parallel_state()
    dp_size, dp_rank = world // sp, state.dp_rank
    sp_rank, sp_group = (state.sp_rank, state.sp_group) if sp > 1 else (0, None)
    torch.manual_seed(t.seed)

    out = Path(t.output_dir).resolve()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe_to_dict(recipe), indent=2))
    dist.barrier()

    # Model config and processor (the tiny ones are written to disk and loaded back like a checkpoint's).
    config_path, processor_path = m.config_path, m.tokenizer_path
    if m.config_path == "tiny":
        config_path = str(out / "model_config")
        if rank == 0:
            model_config(recipe).save_pretrained(config_path)
        processor_path = processor_path or str(out / "processor")
        if rank == 0 and m.tokenizer_path is None:
            build_tiny_processor(processor_path)
    processor_path = processor_path or m.model_path or config_path
    dist.barrier()
    processor = build_processor(processor_path)

    # Model: meta → FSDP2 (+ EP: VeOmni's plan slices the experts), weights loaded by VeOmni's parallelize.
    ops = _ops_config(recipe, device.type)
    dtype = "float32" if (device.type == "cpu" or t.mixed_precision.enable) else "bfloat16"
    weights_path = m.model_path
    if weights_path is None:
        weights_path = str(out / "init")
        if rank == 0:
            initial_weights(config_path, weights_path, ops, t.seed)
        dist.barrier()
    model = build_foundation_model(config_path, weights_path=weights_path, torch_dtype=dtype, init_device="meta", ops_implementation=ops)
    thinker_config = model.config.thinker_config if hasattr(model.config, "thinker_config") else model.config
    if m.output_router_logits is not None:
        thinker_config.text_config.output_router_logits = m.output_router_logits
    if sp > 1 and device.type == "cpu":
        thinker_config.get_text_config()._attn_implementation = ULYSSES_SDPA
    if hasattr(model, "disable_talker"):
        model.disable_talker()  # the thinker is what trains; talker training is not supported
    thinker = getattr(model, "thinker", model)
    if m.freeze_vit:
        thinker.model.visual.requires_grad_(False)
        thinker.model.visual.merger.requires_grad_(True)
    if m.freeze_audio_tower:
        thinker.model.audio_tower.requires_grad_(False)
        thinker.model.audio_tower.proj1.requires_grad_(True)
    mp = MixedPrecisionConfig(enable=t.mixed_precision.enable, param_dtype=t.mixed_precision.param_dtype, reduce_dtype=t.mixed_precision.reduce_dtype)
    # A released checkpoint (one tensor per expert, `thinker.` prefix) is read by our loader, each rank
    # only its own shard; VeOmni's loader cannot read that layout. The from-scratch init (initial_weights,
    # fused layout) goes through VeOmni's loader.
    released = m.model_path is not None
    model = build_parallelize_model(
        model, weights_path=None if released else weights_path, should_skip_hf_weight_load=released,
        init_device="meta", enable_gradient_checkpointing=t.gradient_checkpointing,
        mixed_precision=mp, enable_reshard_after_forward=t.accelerator.reshard_after_forward,
        basic_modules=list(getattr(model, "_no_split_modules", None) or []),
    )
    if released:
        load_hf_checkpoint(model, m.model_path)
    model.train()
    if weights_path != m.model_path:  # the from-scratch init has been loaded into the shards
        dist.barrier()
        if rank == 0:
            shutil.rmtree(weights_path)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel is the global size (EP: this rank's experts)

    o = t.optimizer
    vit, other = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vit if "visual" in name else other).append(p)
    groups = [g for g in ({"params": vit, "lr": o.vit_lr if o.vit_lr is not None else o.lr}, {"params": other, "lr": o.lr}) if g["params"]]
    optimizer = build_optimizer(model, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True,
                                optimizer_type=o.type, param_groups=groups)
    scheduler = build_lr_scheduler(optimizer, train_steps=t.steps, lr=o.lr, lr_decay_style=o.lr_decay_style, lr_decay_ratio=o.lr_decay_ratio,
                                   lr_warmup_ratio=o.lr_warmup_ratio, lr_min=o.lr_min, lr_start=o.lr_start)
    checkpointer = build_checkpointer(ckpt_manager="dcp", dist_backend="fsdp2") if t.save_steps else None

    # Data.
    train_samples, eval_samples = prepare_datasets(recipe, out, rank, world)
    encoder = SampleEncoder(processor, thinker_config, max_tokens=d.max_tokens, overflow=d.overflow, media_root=d.media_root)
    common = dict(dp_size=dp_size, dp_rank=dp_rank, sp_size=sp, sp_rank=sp_rank, sp_group=sp_group, pack_tokens=d.pack_tokens)
    train_pipe = Pipeline(train_samples, encoder, thinker_config, seed=t.seed, cache={} if d.cache_encoded else None, **common)
    eval_cache: dict = {}  # held-out samples are encoded once, for every evaluation
    eos_id = processor.tokenizer.eos_token_id
    chance = chance_level(eval_samples or train_samples)

    def run_eval():
        pipe = Pipeline(eval_samples, encoder, thinker_config, seed=t.seed, cache=eval_cache, shuffle=False, epochs=1, **common)
        wrong, seen, skipped = evaluate(model, pipe, len(eval_samples), eos_id, device, sp)
        acc, totals = accuracy_by_modality(eval_samples, wrong, seen)
        return acc, totals, skipped

    def sample_id(index: int):
        return train_samples[index].get("id", index)

    setup_s = time.time() - start
    _say(f"[veomni_omni] {world} rank(s) on {device.type} ({'nccl' if use_cuda else 'gloo'}): FSDP2 over {world}, "
         f"dp {dp_size} x ulysses sp {sp}, experts over ep {ep}; {n_params / 1e6:.2f}M params; "
         f"{len(train_samples)} train / {len(eval_samples)} eval samples; setup {setup_s:.1f}s")

    losses, evals, nonfinite_steps = [], [], []
    tokens_total, skipped_seen, nonfinite_in_a_row = 0, 0, 0
    train_start = time.time()
    for step in range(1, t.steps + 1):
        t0 = time.time()
        micro = [train_pipe.next_micro_batch() for _ in range(t.micro_batches_per_step)]
        raise_on_problems([p for mb in micro for p in mb.problems])  # the same error on every rank
        inputs = [_model_inputs(mb.inputs, device) for mb in micro]
        token_counts = count_loss_token(inputs)
        global_tokens = reduce_global_loss_token(token_counts)
        step_loss = torch.zeros((), device=device)
        for batch in inputs:
            loss = model(**batch, use_cache=False).loss
            loss = torch.stack(list(mean_global_loss(loss, count_loss_token(batch), token_counts, global_tokens).values())).sum()
            loss.backward()
            step_loss += loss.detach()
        grad_norm = veomni_clip_grad_norm(model, o.max_grad_norm)  # global over all ranks

        # Metrics, reduced before the update so every rank sees a NaN anywhere: the loss's global token
        # mean; tokens and skips of each DP group counted once (SP rank 0).
        first_of_group = float(sp_rank == 0)
        stats = torch.tensor(
            [step_loss.item(), *[first_of_group * sum(mb.tokens[k] for mb in micro) for k in ("text", "image", "video", "audio")],
             first_of_group * sum(mb.skipped for mb in micro)], dtype=torch.float64,
        )
        dist.all_reduce(stats)
        loss_value = stats[0].item() / world
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            optimizer.step()
            nonfinite_in_a_row = 0
        else:
            ranks = [None] * world
            dist.all_gather_object(ranks, (bool(torch.isfinite(step_loss)), [sample_id(i) for mb in micro for i, _ in mb.samples]))
            report = describe_nonfinite(step, loss_value, grad_norm, ranks)
            nonfinite_steps.append(step)
            nonfinite_in_a_row += 1
            if t.on_nonfinite_loss == "stop" or nonfinite_in_a_row >= t.max_nonfinite_in_a_row:
                why = ("train.on_nonfinite_loss=stop" if t.on_nonfinite_loss == "stop"
                       else f"{nonfinite_in_a_row} in a row (train.max_nonfinite_in_a_row)")
                raise NonFiniteLoss(f"{report}; stopping ({why})")
            _say(f"[veomni_omni] {report}; update skipped (train.on_nonfinite_loss=skip)")
        scheduler.step()
        optimizer.zero_grad()

        tok = {k: int(v) for k, v in zip(("text", "image", "video", "audio"), stats[1:5].tolist())}
        skipped = int(stats[5])
        skipped_seen += skipped
        n_tok = sum(tok.values())
        tokens_total += n_tok
        dt = time.time() - t0
        if math.isfinite(loss_value):
            losses.append((step, loss_value))
        if step % t.log_steps == 0 or step == 1 or step == t.steps:
            _say(f"step {step:4d}/{t.steps} | loss {loss_value:.4f} | lr {scheduler.get_last_lr()[-1]:.2e} | grad_norm {grad_norm:.3f} | "
                 f"{n_tok / dt:7.0f} tok/s | tokens text {tok['text']} image {tok['image']} video {tok['video']} audio {tok['audio']} | "
                 f"skipped {skipped} (total {skipped_seen}) | epoch {train_pipe.epoch} | {dt:.2f}s")
        if checkpointer is not None and step % t.save_steps == 0:
            path = out / "checkpoints" / f"global_step_{step}"
            save_dcp(checkpointer, model, optimizer, scheduler, path, step)
            _say(f"[veomni_omni] DCP checkpoint (model + optimizer) saved to {path}")
        if t.eval_steps and step % t.eval_steps == 0 and step != t.steps and eval_samples:
            acc, _, _ = run_eval()
            evals.append((step, acc))
            _say(f"[eval] step {step}: held-out accuracy " + ", ".join(f"{k} {v}" for k, v in acc.items()) + f" (chance {chance:.2f})")
    train_s = time.time() - train_start

    # Held-out evaluation, checkpoint, plot, summary.
    accuracy, totals, eval_skipped = ({k: None for k in MODALITIES}, {}, 0)
    if eval_samples:
        accuracy, totals, eval_skipped = run_eval()
        evals.append((t.steps, accuracy))
    distinct = [None] * world  # samples are re-dealt to DP groups every epoch: take the union
    dist.all_gather_object(distinct, train_pipe.skipped_ids)
    skipped_distinct = len(set().union(*distinct))
    ckpt = out / "hf_ckpt"
    if t.save_hf:
        save_hf_checkpoint(model, ckpt, source=m.model_path, processor=processor)  # released layout, atomic
    if rank == 0 and t.plot:
        plot_losses(out / "loss.png", losses, evals, chance)
    wall = time.time() - start
    summary = {
        "eval_accuracy": accuracy,
        "chance": round(chance, 4),
        "steps": t.steps,
        "wall_s": round(wall, 1),
        "checkpoint": str(ckpt) if t.save_hf else None,
    }
    if rank == 0:
        _say("")
        _say(f"held-out accuracy (greedy answer token, {sum(totals.values())} eval samples, {eval_skipped} skipped) vs chance {chance:.2f}:")
        for modality, value in accuracy.items():
            bar = "#" * int(round((value or 0) * 40))
            _say(f"  {modality:6s} {'-' if value is None else f'{value:.3f}'}  n={totals.get(modality, 0):4d}  {bar}")
        _say(f"train: {t.steps} steps, {tokens_total} tokens, {tokens_total / train_s:.0f} tok/s, {skipped_seen} skipped samples "
             f"({skipped_distinct} distinct), {len(nonfinite_steps)} non-finite steps skipped; "
             f"first loss {losses[0][1]:.4f}, last loss {losses[-1][1]:.4f}")
        if t.plot:
            _say(f"loss curve: {out / 'loss.png'}")
        if t.save_hf:
            _say(f"checkpoint (save_pretrained): {ckpt}")
        with open(out / "summary.json", "w") as f:
            json.dump({**summary, "losses": losses, "evals": evals, "skipped_train": skipped_seen,
                       "skipped_distinct": skipped_distinct, "nonfinite_steps": nonfinite_steps,
                       "setup_s": round(setup_s, 1), "train_s": round(train_s, 1)}, f, indent=1)
        _say(json.dumps(summary))
    dist.barrier()
    dist.destroy_process_group()
    return summary


@record  # a rank's exception goes to torchrun's error file and summary, and torchrun stops the other ranks
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m veomni_omni.train",
        description="Train Qwen3-Omni-MoE's thinker from a recipe (YAML) with key=value overrides.",
    )
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50 train.optimizer.lr=1e-3")
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        check_layout(recipe, int(os.environ.get("WORLD_SIZE", 1)))  # before any process group or model
        if recipe.data.source == "jsonl":
            for key in ("train_path", "eval_path"):
                path = getattr(recipe.data, key)
                if path is not None and not os.path.isfile(path):
                    raise RecipeError(f"data.{key}: no such file {path!r}")
        if recipe.train.device == "cuda" and not torch.cuda.is_available():
            raise RecipeError("train.device is cuda but CUDA is not available; use train.device=auto or cpu")
    except (RecipeError, OSError) as err:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank finds the same problem: say it once
            print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(recipe)
    except (dist.DistBackendError, RuntimeError) as err:
        if isinstance(err, dist.DistBackendError) or "timed out" in str(err).lower():
            raise RuntimeError(f"a collective waited longer than train.dist_timeout_s={recipe.train.dist_timeout_s} s: "
                               "another rank failed or hangs (its own log says why)") from err
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
