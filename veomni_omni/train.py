"""The main job: VeOmni's own VLMTrainer, plus what it lacks for this model.

    torchrun --nproc-per-node 2 -m veomni_omni.train recipes/tiny_cpu.yaml [--train.max_steps 200 ...]

A recipe is a VeOmni config (VeOmni's schema, parsed by VeOmni's `parse_args`, unknown keys refused by
`import veomni_omni`) plus one section of our own, `omni:` (`OmniSection`). Everything VeOmni does, it
does: parallel state, model build through our registry entries, FSDP2 + EP with weight loading by its
loader (our checkpoint-tensor converter), its dataset builders and dynamic batching with our data transform
and its packing collator, optimizer, LR schedule, global token-mean loss, gradient clipping, DCP
checkpoints and resume, the HF export (released layout, through our writer). `OmniTrainer` adds, as hooks
around VeOmni's own `train_step`:

- before each step: placeholder counts of every micro batch checked on the host, agreed across ranks
  (the same `BadInputError` on every rank before any forward);
- the update: a NaN/inf gradient skips it (`omni.on_nonfinite_loss: skip`; `max_nonfinite_in_a_row` in a
  row stop the job) or stops the job (`stop`), on every rank alike;
- after each step: a log line with the loss, tokens per modality, skipped samples and expert load; every
  `omni.eval_steps` and at the end, held-out accuracy per modality (greedy answer tokens);
- at the end: the loss-curve PNG, `summary.json` and one JSON line; when the talker trains
  (`model.model_config.train_talker`), first the held-out speech, spoken by transformers' own generate
  from the HF export (`speech_eval.py`), with one WAV per modality.

`omni.synthetic_data` writes the synthetic multimodal set into `<output_dir>/data` and trains on it;
`omni.tiny_model` trains a tiny thinker from scratch, initialised once as a whole and loaded like a
released checkpoint (VeOmni's own from-scratch path initialises every rank's shard from the same random
state: EP ranks would hold identical experts that never diverge).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.elastic.multiprocessing.errors import record

import veomni_omni  # noqa: F401  (patch set + registry hand-over, before VeOmni builds anything)
from veomni.arguments import parse_args
from veomni.distributed.parallel_state import get_parallel_state
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainer

from .checkpoint.veomni_io import LORA_ADAPTER_DIR
from .data.checks import IGNORE_INDEX, input_problems, raise_on_problems, thinker_config_of
from .data.sequence_parallel import check_divisible_heads
from .data.synthetic import SpokenAnswers, read_jsonl
from .data.veomni_transform import REFUSED_KEY, SPEECH_KEYS, SkipCounter
from .integration.speech_training import speech_training_of
from .models.moe import expert_load
from .train_data import MODALITIES, accuracy_by_modality, chance_level, prepare_synthetic_set


# ------------------------------------------------------------------------------------ arguments
@dataclass
class SyntheticData:
    train_samples: int = 6000
    eval_samples: int = 384
    seed: int = 0
    corrupt_train_samples: int = 0
    tasks: List[str] = field(default_factory=list)
    speech: bool = field(default=False, metadata={"help": "answers carry their own code sequence as target speech (talker training)"})
    speaker: str = "ethan"


@dataclass
class TinyModel:
    """`veomni_omni.tiny.tiny_thinker_config` with overrides."""

    initializer_range: Optional[float] = None
    text: Dict = field(default_factory=dict)
    vision: Dict = field(default_factory=dict)
    audio: Dict = field(default_factory=dict)


@dataclass
class OmniSection:
    synthetic_data: bool = field(default=False, metadata={"help": "write the synthetic set to data.train_path / omni.eval_path first"})
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    tiny_model: bool = field(default=False, metadata={"help": "first write a tiny thinker, initialised from scratch, to model.model_path"})
    tiny: TinyModel = field(default_factory=TinyModel)
    eval_path: Optional[str] = field(default=None, metadata={"help": "held-out samples (JSONL), any accepted format"})
    eval_steps: int = field(default=0, metadata={"help": "held-out accuracy every N steps (0: at the end only)"})
    eval_at_start: bool = field(default=False, metadata={"help": "also before the first step (what the loaded model knows)"})
    log_steps: int = 50
    plot: bool = True
    on_nonfinite_loss: str = field(default="skip", metadata={"help": "skip | stop"})
    max_nonfinite_in_a_row: int = 3
    dist_timeout_s: float = field(default=600.0, metadata={"help": "a collective waiting longer fails the job"})
    speech_eval_samples: int = field(default=24, metadata={"help": "talker training: held-out spoken samples per modality HF's generate speaks at the end"})

    def __post_init__(self):
        if self.on_nonfinite_loss not in ("skip", "stop"):
            raise ValueError(f"omni.on_nonfinite_loss must be 'skip' or 'stop', got {self.on_nonfinite_loss!r}")
        if self.max_nonfinite_in_a_row < 1 or self.eval_steps < 0 or self.log_steps < 1:
            raise ValueError("omni.max_nonfinite_in_a_row and omni.log_steps must be >= 1, omni.eval_steps >= 0")


@dataclass
class OmniArguments(VeOmniVLMArguments):
    omni: OmniSection = field(default_factory=OmniSection)


class NonFiniteLoss(RuntimeError):
    """The gradients were NaN/inf and the recipe says to stop (or too many in a row)."""


# ------------------------------------------------------------------------------------ set-up
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _say(*parts) -> None:
    if _rank() == 0:
        print(*parts, flush=True)


def prepare_inputs(args: OmniArguments) -> None:
    """Write what the recipe's `omni:` section asks to be made (synthetic set, tiny model) where the
    recipe's VeOmni paths point. Every rank calls it; the process group already exists."""
    omni = args.omni
    if omni.tiny_model:
        if not args.model.model_path:
            raise ValueError("omni.tiny_model writes the initial model to model.model_path: give it")
        if _rank() == 0:
            write_tiny_model(omni.tiny, Path(args.model.model_path), args.train.seed)
        dist.barrier()
    if omni.synthetic_data:  # after the model: spoken answers take its codec's shape
        if not (omni.eval_path and args.data.train_path.endswith(".jsonl") and omni.eval_path.endswith(".jsonl")):
            raise ValueError("omni.synthetic_data writes the set to data.train_path and omni.eval_path: give both as .jsonl paths")
        prepare_synthetic_set(omni.synthetic, Path(args.data.train_path), Path(omni.eval_path), spoken_answers(args))


def spoken_answers(args: OmniArguments) -> Optional[SpokenAnswers]:
    """How the synthetic answers are spoken (the model's code groups and codebook), when the recipe asks."""
    if not args.omni.synthetic.speech:
        return None
    if speech_training_of(args.model.model_config) is None:
        raise ValueError("omni.synthetic.speech writes target speech: set model.model_config.train_talker: true to train on it")
    from transformers import AutoConfig

    talker = AutoConfig.from_pretrained(args.model.config_path).talker_config
    return SpokenAnswers(talker.num_code_groups, talker.code_predictor_config.vocab_size, args.omni.synthetic.speaker)


def write_tiny_model(tiny: TinyModel, path: Path, seed: int) -> None:
    """A tiny Qwen3-Omni-MoE in the released layout (thinker, talker, code2wav), initialised whole on this
    process, with its processor, saved like a release."""
    from transformers import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from .data.processor import build_tiny_processor
    from .data.synthetic import corpus
    from .tiny import tiny_omni_config, tiny_thinker_config

    thinker = tiny_thinker_config(**tiny.text).to_dict()
    hidden = thinker["text_config"]["hidden_size"]
    for section, overrides in (("vision_config", tiny.vision), ("audio_config", tiny.audio)):
        unknown = sorted(set(overrides) - set(thinker[section]))
        if unknown:
            raise ValueError(f"omni.tiny.{section.split('_')[0]}: unknown config keys {unknown}")
        thinker[section].update(overrides)
    thinker["vision_config"]["out_hidden_size"] = thinker["audio_config"]["output_dim"] = hidden  # encoders feed the decoder
    if tiny.initializer_range is not None:
        for section in (thinker, thinker["text_config"], thinker["vision_config"], thinker["audio_config"]):
            section["initializer_range"] = tiny.initializer_range
    config = tiny_omni_config().to_dict()
    config["thinker_config"] = thinker
    config["talker_config"]["thinker_hidden_size"] = hidden
    torch.manual_seed(seed)
    Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**config)).save_pretrained(path)
    build_tiny_processor(path, corpus=corpus())


def check_layout(args: OmniArguments, config, world: int) -> None:
    """Fail before any model is built on a layout VeOmni would build wrongly or fail on deep inside."""
    thinker = thinker_config_of(config)
    text = thinker.text_config
    ep = args.train.accelerator.ep_size
    if world % ep:
        raise ValueError(f"train.accelerator.ep_size={ep} does not divide the {world} ranks")
    if ep > 1 and text.num_experts % ep:
        divisors = [d for d in range(1, world + 1) if world % d == 0 and text.num_experts % d == 0]
        raise ValueError(f"train.accelerator.ep_size={ep} does not divide the {text.num_experts} experts; use one of {divisors}")
    sp = args.train.accelerator.ulysses_size
    if sp > 1:
        if world % sp:
            raise ValueError(f"train.accelerator.ulysses_size={sp} does not divide the {world} ranks")
        check_divisible_heads(thinker, sp)


# ------------------------------------------------------------------------------------ trainer
class OmniTrainer(VLMTrainer):
    """VeOmni's VLMTrainer with the checks, policies and reports of the module doc, as hooks."""

    def __init__(self, args: OmniArguments):
        self.started = time.time()
        super().__init__(args)
        self.omni = args.omni
        self.config = thinker_config_of(self.base.model_config)
        self.eval_samples = read_jsonl(self.omni.eval_path) if self.omni.eval_path else []
        self.losses: list = []
        self.evals: list = []
        self.nonfinite_steps: list = []
        self.nonfinite_in_a_row = 0
        self.tokens_total = 0
        self.step_started = time.time()
        self.step_tokens: dict = {}
        self.skipped_before = 0
        self.skipped_total = 0  # samples skipped for bad media or length, all ranks
        self.update_finite = True  # set by the guarded optimizer step
        self.setup_s = time.time() - self.started
        self._guard_updates()

    def on_train_begin(self):
        super().on_train_begin()
        if self.omni.eval_at_start and self.eval_samples:
            accuracy, _ = self.evaluate()
            self.evals.append((0, accuracy))
            _say("[eval] before training: held-out accuracy " + ", ".join(f"{k} {v}" for k, v in accuracy.items()))

    # ---- before the step: host-side checks, agreed across ranks
    def on_step_begin(self, micro_batches=None):
        self.step_started = time.time()
        problems, ids = [], []
        for k, batch in enumerate(micro_batches or []):
            name = f"micro batch {k} (step {self.base.state.global_step})"
            problems += [f"{name}: {problem}" for problem in batch.get(REFUSED_KEY, [])]
            sp_inputs = batch.get("sp_inputs")
            if sp_inputs is None:
                problems += input_problems(batch, self.config, name=name)
                ids.append(batch["input_ids"].reshape(-1))
            else:  # an SP shard: the collator checked the whole sequence; count this slice's tokens, not its pad
                problems += [f"{name}: {line}" for line in sp_inputs.problems]
                begin, end = sp_inputs.token_range
                ids.append(batch["input_ids"].reshape(-1)[: max(0, min(end, sp_inputs.sequence_length) - begin)])
        raise_on_problems(problems)
        ids = torch.cat(ids) if ids else torch.zeros(0)
        self.step_tokens = {m: int((ids == getattr(self.config, f"{m}_token_id")).sum()) for m in ("image", "video", "audio")}
        self.step_tokens["text"] = int(ids.numel()) - sum(self.step_tokens.values())
        super().on_step_begin(micro_batches=micro_batches)

    # ---- the update: skipped (or the job stopped) when any rank's gradients are not finite
    def _guard_updates(self) -> None:
        optimizer = self.base.optimizer
        update = optimizer.step

        def guarded_step(*a, **kw):
            # Each rank checks its own shards (no collective per parameter, one host sync), then all agree.
            flags = [torch.isfinite(_local(p.grad)).all() for p in self.base.model.parameters() if p.grad is not None]
            finite = torch.stack(flags).all().float().reshape(1) if flags else torch.ones(1, device=self.base.device)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            self.update_finite = bool(finite.item())
            if self.update_finite:
                return update(*a, **kw)
            return None

        optimizer.step = guarded_step

    # ---- after the step: policy, log line, evaluation
    def on_step_end(self, loss=None, loss_dict=None, grad_norm=None, aux_metrics=None):
        step = self.base.state.global_step
        counts = torch.tensor(
            [loss if loss is not None else 0.0, *[self.step_tokens[m] for m in MODALITIES], SkipCounter.total - self.skipped_before],
            dtype=torch.float64, device=self.base.device,
        )
        self.skipped_before = SkipCounter.total
        dist.all_reduce(counts)
        # Each rank's loss is its share of the global token mean times the FSDP size (VeOmni's mean_global_loss
        # multiplies by it for FSDP's gradient averaging); under SP each rank holds its slice's share.
        loss_value = counts[0].item() / get_parallel_state().fsdp_size
        tokens = {m: int(v) for m, v in zip(MODALITIES, counts[1:5].tolist())}
        skipped = int(counts[5])
        self.skipped_total += skipped
        if not self.update_finite:
            self._nonfinite(step, loss_value, grad_norm, local_finite=loss is not None and math.isfinite(loss))
        else:
            self.nonfinite_in_a_row = 0
            self.losses.append((step, loss_value))
        load = expert_load(self.base.model, group=dist.group.WORLD)
        super().on_step_end(loss=loss, loss_dict=loss_dict, grad_norm=grad_norm, aux_metrics=aux_metrics)
        dt = time.time() - self.step_started
        self.tokens_total += sum(tokens.values())
        if step % self.omni.log_steps == 0 or step == 1 or step == self.base.args.train_steps:
            balance = f"{(load.max(-1).values.float() / load.float().mean(-1).clamp(min=1)).max():.2f}" if load is not None else "-"
            lr = self.base.lr_scheduler.get_last_lr()[-1]
            _say(f"step {step:4d}/{self.base.args.train_steps} | loss {loss_value:.4f} | lr {lr:.2e} | grad_norm {float(grad_norm):.3f} | "
                 f"{sum(tokens.values()) / dt:7.0f} tok/s | tokens text {tokens['text']} image {tokens['image']} video "
                 f"{tokens['video']} audio {tokens['audio']} | skipped {skipped} (total {self.skipped_total}) | expert load max/mean {balance} | {dt:.2f}s")
        if self.omni.eval_steps and step % self.omni.eval_steps == 0 and step != self.base.args.train_steps and self.eval_samples:
            accuracy, _ = self.evaluate()
            self.evals.append((step, accuracy))
            _say(f"[eval] step {step}: held-out accuracy " + ", ".join(f"{k} {v}" for k, v in accuracy.items()))

    def _nonfinite(self, step: int, loss: float, grad_norm, local_finite: bool) -> None:
        self.nonfinite_steps.append(step)
        self.nonfinite_in_a_row += 1
        local = torch.tensor([float(local_finite)], device=self.base.device)
        flags = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, local)
        bad = [rank for rank, flag in enumerate(flags) if not flag.item()]
        where = f"loss non-finite on rank(s) {bad}" if bad else "loss finite, gradients non-finite"
        report = f"step {step}: non-finite loss {loss} / grad norm {float(grad_norm)} ({where})"
        if self.omni.on_nonfinite_loss == "stop" or self.nonfinite_in_a_row >= self.omni.max_nonfinite_in_a_row:
            why = ("omni.on_nonfinite_loss=stop" if self.omni.on_nonfinite_loss == "stop"
                   else f"{self.nonfinite_in_a_row} in a row (omni.max_nonfinite_in_a_row)")
            raise NonFiniteLoss(f"{report}; stopping ({why})")
        _say(f"[veomni_omni] {report}; update skipped (omni.on_nonfinite_loss=skip)")

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self) -> tuple[dict, dict]:
        """Held-out accuracy per modality: a sample is right when the argmax at every answer position
        (labels other than the end-of-turn token) is the answer token — what greedy decoding produces.
        Each data-parallel rank scores every dp-th sample; every rank runs the same number of forwards."""
        state = get_parallel_state()
        dp_size, dp_rank = state.dp_size, state.dp_rank
        model, transform = self.base.model, self.base.data_transform
        eos = self.base.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        budget = self.base.args.data.max_seq_len
        batches, current, length, refused = [], [], 0, []
        for index in range(dp_rank, len(self.eval_samples), dp_size):
            for feature in transform(self.eval_samples[index]):
                if REFUSED_KEY in feature:
                    refused.append(f"held-out {feature[REFUSED_KEY]}")
                    continue
                n = feature["input_ids"].shape[-1]
                if current and length + n > budget:
                    batches.append(current)
                    current, length = [], 0
                current.append((index, feature))
                length += n
        if current:
            batches.append(current)
        raise_on_problems(refused)
        most = torch.tensor([len(batches)], device=self.base.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        wrong = torch.zeros(len(self.eval_samples), device=self.base.device)
        seen = torch.zeros(len(self.eval_samples), device=self.base.device)
        model.eval()
        for k in range(int(most)):
            pack = batches[k] if k < len(batches) else (batches[-1] if batches else [])
            if not pack:
                raise RuntimeError("a data-parallel rank got no evaluation sample; use more eval samples than ranks")
            batch = self.base.preforward(self.base.collate_fn([dict(feature) for _, feature in pack]))
            labels = batch.pop("labels")[0]
            for key in SPEECH_KEYS:  # the thinker's answers are scored here; speech at the end, by HF's generate
                batch.pop(key, None)
            predicted = model(**batch, use_cache=False).logits[0].argmax(-1)
            if state.sp_enabled:  # this rank's slice, labels already shifted: the whole sequence, shifted back
                predicted, labels = (_gather_slices(t, state.sp_group) for t in (predicted, labels))
                labels = torch.cat([labels.new_full((1,), IGNORE_INDEX), labels])
            if k >= len(batches):
                continue  # a repeat, run only to keep the FSDP collectives in step
            starts = batch["cu_seq_lens_q"].tolist()
            for (index, _), begin, end in zip(pack, starts[:-1], starts[1:]):
                target = labels[begin + 1 : end]
                keep = (target != IGNORE_INDEX) & (target != eos)
                seen[index] += int(keep.sum())
                wrong[index] += int((predicted[begin : end - 1][keep] != target[keep]).sum())
        model.train()
        model.reshard()  # a forward without backward leaves the root gathered
        dist.all_reduce(wrong)
        dist.all_reduce(seen)
        return accuracy_by_modality(self.eval_samples, wrong.cpu(), seen.cpu())

    # ---- the end: final evaluation, VeOmni's end-of-training callbacks (HF export), report
    def on_train_end(self):
        train_s = time.time() - self.started - self.setup_s
        accuracy, totals = ({m: None for m in MODALITIES}, {})
        if self.eval_samples:
            accuracy, totals = self.evaluate()
            self.evals.append((self.base.state.global_step, accuracy))
        super().on_train_end()
        self.report(accuracy, totals, train_s)

    def report(self, accuracy: dict, totals: dict, train_s: float) -> dict:
        args = self.base.args
        out = Path(args.train.checkpoint.output_dir)
        step = self.base.state.global_step
        hf_ckpt = Path(args.train.checkpoint.save_path) / f"global_step_{step}" / "hf_ckpt"
        chance = chance_level(self.eval_samples)
        summary = {
            "eval_accuracy": accuracy,
            "chance": round(chance, 4),
            "steps": step,
            "wall_s": round(time.time() - self.started, 1),
            "checkpoint": str(hf_ckpt) if args.train.checkpoint.save_hf_weights else None,
        }
        if args.model.lora_config and args.train.checkpoint.save_hf_weights:
            summary["lora_adapter"] = str(hf_ckpt.parent / LORA_ADAPTER_DIR)
        speech = None
        if _rank() == 0 and getattr(self.base.model, "speech_training", None) is not None and self.eval_samples:
            if not args.train.checkpoint.save_hf_weights:
                raise ValueError("talker training: the held-out speech is generated from the HF export; keep train.checkpoint.save_hf_weights on")
            from .speech_eval import evaluate_speech

            speech = evaluate_speech(hf_ckpt, self.eval_samples, out, self.omni.speech_eval_samples)
            summary["speech"] = speech
        if _rank() == 0:
            _say("")
            _say(f"held-out accuracy (greedy answer tokens, {sum(totals.values())} eval samples) vs chance {chance:.2f}:")
            for modality, value in accuracy.items():
                _say(f"  {modality:6s} {'-' if value is None else f'{value:.3f}'}  n={totals.get(modality, 0):4d}  {'#' * int(round((value or 0) * 40))}")
            if speech is not None:
                _say(f"held-out speech (HF's generate(return_audio=True) from the export, greedy): codes exactly the target's, vs "
                     f"chance {chance:.2f} (the right one of a task's answers); WAVs: {out}/speech_<modality>.wav")
                for modality, got in speech.items():
                    _say(f"  {modality:6s} spoken {got['spoken']:.3f}  answer {got['answer']:.3f}  n={got['n']:3d}  {'#' * int(round(got['spoken'] * 40))}")
            first, last = (self.losses[0][1], self.losses[-1][1]) if self.losses else (float("nan"),) * 2
            _say(f"train: {step} steps, {self.tokens_total} tokens, {self.tokens_total / max(train_s, 1e-9):.0f} tok/s, "
                 f"{self.skipped_total} samples skipped, {len(self.nonfinite_steps)} non-finite steps skipped; first loss {first:.4f}, last loss {last:.4f}")
            if self.omni.plot:
                plot_losses(out / "loss.png", self.losses, self.evals, chance)
                _say(f"loss curve: {out / 'loss.png'}")
            with open(out / "summary.json", "w") as f:
                json.dump({**summary, "losses": self.losses, "evals": self.evals, "nonfinite_steps": self.nonfinite_steps,
                           "skipped_samples": self.skipped_total,
                           "setup_s": round(self.setup_s, 1), "train_s": round(train_s, 1)}, f, indent=1)
            _say(json.dumps(summary))
        return summary


def _gather_slices(local: torch.Tensor, group) -> torch.Tensor:
    """The SP group's equal-length slices of a sequence, in rank order, on every rank."""
    slices = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(slices, local.contiguous(), group=group)
    return torch.cat(slices)


def plot_losses(path: Path, losses: list, evals: list, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses], lw=1, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (global token mean)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = ax.twinx()
        for modality in evals[-1][1]:
            points = [(s, acc[modality]) for s, acc in evals if acc.get(modality) is not None]
            ax2.plot([s for s, _ in points], [a for _, a in points], marker="o", ms=3, label=f"eval acc {modality}")
        if not math.isnan(chance):
            ax2.axhline(chance, ls="--", color="grey", lw=1, label="chance")
        ax2.set_ylim(0, 1.02)
        ax2.set_ylabel("held-out accuracy")
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("veomni_omni main job (VeOmni VLMTrainer)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ entry
@record  # a rank's exception goes to torchrun's error file and summary; torchrun then stops the others
def main() -> int:
    args = parse_args(OmniArguments)
    if not dist.is_initialized():
        from veomni_omni.integration.cpu_distributed import dist_backend

        dist.init_process_group(dist_backend(), timeout=timedelta(seconds=args.omni.dist_timeout_s))
    try:
        prepare_inputs(args)
        from transformers import AutoConfig

        check_layout(args, AutoConfig.from_pretrained(args.model.config_path), dist.get_world_size())
        OmniTrainer(args).train()
    except (dist.DistBackendError, RuntimeError) as err:
        if isinstance(err, dist.DistBackendError) or "timed out" in str(err).lower():
            raise RuntimeError(f"a collective waited longer than omni.dist_timeout_s={args.omni.dist_timeout_s} s: "
                               "another rank failed or hangs (its own log says why)") from err
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
