"""Training recipes: a YAML file plus `key=value` command-line overrides, checked strictly.

    torchrun --nproc-per-node 2 -m veomni_omni.train recipes/tiny_cpu.yaml train.steps=50 train.optimizer.lr=1e-3

Sections and names follow VeOmni's arguments (`model.config_path`, `train.accelerator.ulysses_size`,
`train.optimizer.lr`, ...) where a field means the same thing, so a VeOmni user reads a recipe
without a glossary; but only fields this trainer honours exist. An unknown key, in the file or in
an override, is an error naming the key, its closest valid spelling and the valid keys of its
section: a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

__all__ = ["Recipe", "RecipeError", "check_layout", "load_recipe", "model_config", "parse_overrides", "recipe_to_dict"]


class RecipeError(ValueError):
    """A recipe or override that cannot be used (unknown key, wrong type, bad value)."""


# ------------------------------------------------------------------------------------- schema
@dataclass
class TinyModel:
    """Overrides of `veomni_omni.testing.tiny_thinker_config` (a thinker trained from scratch).
    Keys must exist in the corresponding sub-config; the text vocabulary stays 512 (the tiny
    processor's)."""

    text: dict = field(default_factory=dict)
    vision: dict = field(default_factory=dict)
    audio: dict = field(default_factory=dict)
    initializer_range: Optional[float] = None  # init std of every sub-model; None = HF's 0.02


@dataclass
class ModelSection:
    config_path: str = "tiny"  # "tiny": the tiny thinker from scratch; else an HF checkpoint/config dir
    model_path: Optional[str] = None  # HF weights to start from; None = random init (from scratch)
    tokenizer_path: Optional[str] = None  # processor dir; None with config_path "tiny": build the tiny processor
    tiny: TinyModel = field(default_factory=TinyModel)
    # VeOmni OpsImplementationConfig fields (attn_implementation, moe_implementation, ...); {} = eager ops with
    # SDPA on CPU (under SP: veomni_omni's Ulysses SDPA), VeOmni's defaults on GPU
    ops_implementation: dict = field(default_factory=dict)
    freeze_vit: bool = False
    freeze_audio_tower: bool = False
    output_router_logits: Optional[bool] = None  # router aux loss on/off; None = the config's


@dataclass
class SyntheticData:
    train_samples: int = 2000
    eval_samples: int = 256
    seed: int = 0
    tasks: list = field(default_factory=list)  # [] = all of veomni_omni.data.synthetic.TASKS
    corrupt_train_samples: int = 0  # train samples whose media file is overwritten with junk (must be skipped)
    media: Literal["files", "arrays"] = "files"  # files: PNG/WAV/MKV decoded by the pipeline; arrays: in memory


@dataclass
class DataSection:
    source: Literal["synthetic", "jsonl"] = "synthetic"
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    train_path: Optional[str] = None  # jsonl of chat samples (source: jsonl)
    eval_path: Optional[str] = None
    media_root: Optional[str] = None  # relative media paths in the jsonl are resolved against it
    max_tokens: int = 1024  # per-sample token cap (SampleEncoder)
    overflow: Literal["drop", "truncate"] = "drop"
    pack_tokens: int = 4096  # tokens of one packed micro-batch (one sequence per DP group)
    cache_encoded: bool = True  # keep encoded samples for later epochs


@dataclass
class AcceleratorSection:
    ulysses_size: int = 1
    ep_size: int = 1  # expert parallelism: the thinker's experts split over ep ranks (VeOmni's extra "ep" mesh)
    fsdp_mode: Literal["fsdp2"] = "fsdp2"
    reshard_after_forward: bool = True


@dataclass
class MixedPrecisionSection:
    enable: bool = False  # FSDP2 mixed precision: compute in param_dtype, keep fp32 shards
    param_dtype: str = "bfloat16"
    reduce_dtype: str = "float32"


@dataclass
class OptimizerSection:
    type: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    vit_lr: Optional[float] = None  # None = lr
    lr_min: float = 1e-7
    lr_start: float = 0.0
    lr_warmup_ratio: float = 0.0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_ratio: float = 1.0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = 1.0


@dataclass
class TrainSection:
    output_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: int = 100
    micro_batches_per_step: int = 1  # gradient accumulation (packed micro-batches per DP group per step)
    seed: int = 0
    log_steps: int = 1
    eval_steps: int = 0  # held-out accuracy every N steps (0: only at the end)
    save_steps: int = 0  # DCP checkpoint (model + optimizer) every N steps (0: never)
    save_hf: bool = True  # final model via save_pretrained into <output_dir>/hf_ckpt
    plot: bool = True  # loss-curve PNG into <output_dir>/loss.png
    gradient_checkpointing: bool = False
    dist_timeout_s: int = 600  # a collective waiting longer than this fails the job (a rank died or hangs)
    on_nonfinite_loss: Literal["skip", "stop"] = "skip"  # NaN/inf loss or grad norm: drop the update, or end the job
    max_nonfinite_in_a_row: int = 3  # with "skip": this many non-finite steps in a row end the job anyway
    accelerator: AcceleratorSection = field(default_factory=AcceleratorSection)
    mixed_precision: MixedPrecisionSection = field(default_factory=MixedPrecisionSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    source: Optional[str] = field(default=None, metadata={"internal": True})  # the YAML file it came from

    def validate(self) -> "Recipe":
        t, d = self.train, self.data
        acc = t.accelerator
        positive = {
            "train.steps": t.steps, "train.micro_batches_per_step": t.micro_batches_per_step, "train.log_steps": t.log_steps,
            "train.accelerator.ulysses_size": acc.ulysses_size, "train.accelerator.ep_size": acc.ep_size,
            "data.max_tokens": d.max_tokens, "data.pack_tokens": d.pack_tokens, "train.dist_timeout_s": t.dist_timeout_s,
            "train.max_nonfinite_in_a_row": t.max_nonfinite_in_a_row,
        }
        for key, value in positive.items():
            if value < 1:
                raise RecipeError(f"{key} must be >= 1, got {value}")
        if d.pack_tokens < d.max_tokens:
            raise RecipeError(f"data.pack_tokens ({d.pack_tokens}) must be >= data.max_tokens ({d.max_tokens}): a sample must fit a pack")
        if d.source == "jsonl" and not d.train_path:
            raise RecipeError("data.source: jsonl needs data.train_path")
        if d.source == "synthetic" and (d.synthetic.train_samples < 1 or d.synthetic.eval_samples < 0):
            raise RecipeError("data.synthetic.train_samples must be >= 1 and eval_samples >= 0")
        if self.model.tiny.initializer_range is not None and self.model.tiny.initializer_range <= 0:
            raise RecipeError(f"model.tiny.initializer_range must be > 0, got {self.model.tiny.initializer_range}")
        if self.model.config_path == "tiny" and self.model.tiny.text.get("vocab_size", 512) != 512:
            raise RecipeError("model.tiny.text.vocab_size must stay 512 (the tiny processor's vocabulary)")
        if len(t.optimizer.betas) != 2:
            raise RecipeError(f"train.optimizer.betas must be two numbers, got {t.optimizer.betas}")
        return self


# ------------------------------------------------------------------------------------ loading
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _unknown_key(key: str, path: str, cls) -> RecipeError:
    valid = sorted(_fields(cls))
    where = f"{path}.{key}" if path else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""
    section = f"'{path}'" if path else "the top level"
    return RecipeError(f"unknown recipe key '{where}'{hint}; valid keys in {section}: {', '.join(valid)}")


def _coerce(value: Any, hint, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise RecipeError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads "3e-3" as a string
        except (TypeError, ValueError):
            raise RecipeError(f"{where} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}")
        return value
    if hint is list or origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping, got {value!r}")
        return value
    return value


def _build(cls, data: Any, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"'{path or 'recipe'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = _fields(cls)
    values = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(str(key), path, cls)
        where = f"{path}.{key}" if path else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, where)
        else:
            values[key] = _coerce(value, hint, where)
    return cls(**values)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Put `value` at `a.b.c` in a nested dict, validating every level against the schema so that
    errors name the override; free-form mappings (e.g. model.tiny.text) accept any sub-key."""
    keys = dotted.split(".")
    if not all(keys):
        raise RecipeError(f"malformed override key '{dotted}'")
    cls, node = Recipe, tree
    for depth, key in enumerate(keys):
        path = ".".join(keys[:depth])
        last = depth == len(keys) - 1
        if cls is not None:
            if key not in _fields(cls):
                raise _unknown_key(key, path, cls)
            hint = typing.get_type_hints(cls)[key]
            cls = hint if dataclasses.is_dataclass(hint) else None
            if not last and cls is None and not (hint is dict or typing.get_origin(hint) is dict):
                raise RecipeError(f"override '{dotted}': '{'.'.join(keys[:depth + 1])}' is not a section")
        if last:
            node[key] = value
        else:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key=value` strings → (dotted key, YAML-parsed value)."""
    out = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.steps=50)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: cannot parse value: {err}") from None
        out.append((key.strip(), value))
    return out


def load_recipe(path: Optional[os.PathLike], overrides: Optional[list[str]] = None) -> Recipe:
    """Read `path` (YAML; None = defaults only), apply `key=value` overrides, build and validate."""
    tree: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            tree = yaml.safe_load(f) or {}
        if not isinstance(tree, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping with model/data/train sections")
    for key, value in parse_overrides(list(overrides or [])):
        _set_dotted(tree, key, value)
    recipe = _build(Recipe, tree, "")
    recipe.source = os.fspath(path) if path is not None else None
    return recipe.validate()


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source", None)
    return out


# ------------------------------------------------------------------------------ model and layout
def model_config(recipe: Recipe):
    """The thinker config the recipe trains: `veomni_omni.testing.tiny_thinker_config` with the
    recipe's overrides (config_path "tiny"), else the thinker config of the checkpoint's config.json.
    Cheap (no weights): used to check the layout before any model is built."""
    m = recipe.model
    if m.config_path != "tiny":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(m.config_path)
        except (OSError, ValueError) as err:
            raise RecipeError(f"model.config_path: cannot read a model config from {m.config_path!r}: {err}") from None
        return getattr(config, "thinker_config", config)

    from transformers import Qwen3OmniMoeThinkerConfig

    from .testing import tiny_thinker_config

    tiny = m.tiny
    base = tiny_thinker_config(**tiny.text).to_dict()
    hidden = base["text_config"]["hidden_size"]
    for section, overrides in (("vision_config", tiny.vision), ("audio_config", tiny.audio)):
        unknown = sorted(set(overrides) - set(base[section]))
        if unknown:
            raise RecipeError(f"model.tiny.{section.split('_')[0]}: unknown config keys {unknown}")
        base[section].update(overrides)
    base["vision_config"]["out_hidden_size"] = hidden  # encoders feed the text decoder
    base["audio_config"]["output_dim"] = hidden
    if tiny.initializer_range is not None:
        for section in (base, base["text_config"], base["vision_config"], base["audio_config"]):
            section["initializer_range"] = tiny.initializer_range
    return Qwen3OmniMoeThinkerConfig(**base)


def check_layout(recipe: Recipe, world_size: int, config=None) -> None:
    """Fail, before anything is built, on a parallel layout VeOmni cannot build for `world_size`
    ranks, saying what to change. Ulysses SP and EP both span the ranks (VeOmni lays its `ep` mesh
    over the same ranks as data × sequence parallelism), so each must divide the world size, and
    SP must divide the attention heads it scatters."""
    from .data.sequence_parallel import check_divisible_heads

    acc = recipe.train.accelerator
    sp, ep = acc.ulysses_size, acc.ep_size
    divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
    problems = []
    if world_size % sp:
        problems.append(f"train.accelerator.ulysses_size={sp} does not divide the {world_size} ranks; use one of {divisors}")
    if world_size % ep:
        problems.append(f"train.accelerator.ep_size={ep} does not divide the {world_size} ranks; use one of {divisors}")
    config = config if config is not None else model_config(recipe)
    experts = config.text_config.num_experts
    if experts % ep:
        problems.append(f"train.accelerator.ep_size={ep} does not divide the {experts} experts")
    if sp > 1:
        try:
            check_divisible_heads(config, sp)
        except ValueError as err:
            problems.append(f"train.accelerator.ulysses_size: {err}")
    if problems:
        raise RecipeError(f"parallel layout impossible on {world_size} rank(s): " + "; ".join(problems))
