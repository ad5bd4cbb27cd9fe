"""VeOmni configs fail on a key that no arguments dataclass declares, instead of dropping it.

VeOmni 0.1.12's `parse_args` refuses an unknown command-line key (argparse), but it reads the YAML
into a dict and builds the arguments dataclasses with `_instantiate_recursive`, which takes the
keys each dataclass declares and drops the rest: a typo (`train.optimzer: {lr: ...}`) trains with
the defaults, silently. `unknown_keys` walks the tree VeOmni builds, resolving each field's type as
VeOmni does, and reports every key it would drop, with the full dotted name, the closest valid
spelling and the section's keys. A field VeOmni does not build into a dataclass (a `Dict` field
such as `model.model_config`, `data.mm_configs`) takes its value whole, free keys included: the code
that reads it checks it. `model.lora_config` is read by VeOmni (`VeOmniLoraConfig.from_yaml`, the
trainer's `_setup_lora`), which takes the keys it knows and drops the rest (`rank_patern: ...` would
train every module at the default rank): its keys are checked here, against VeOmni 0.1.12's.

`instantiate_checked` replaces `veomni.arguments.parser._instantiate_recursive` (patch
`config_unknown_keys`): it checks the whole config, then lets VeOmni's own function build the
dataclasses, so nothing is built from a config with an unknown key. Any root class passed to
`parse_args` works, subclasses that add their own sections included.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, Optional, Type

from veomni.arguments import parser as veomni_parser

UNKNOWN_KEYS_PATCH = "config_unknown_keys"  # the patch-set entry on VeOmni's `_instantiate_recursive`
T = veomni_parser.T  # VeOmni's type variable: the replacement's signature is the original's

__all__ = ["UNKNOWN_KEYS_PATCH", "UnknownConfigKeyError", "unknown_keys", "check_config_keys", "instantiate_checked"]


class UnknownConfigKeyError(ValueError):
    """Config keys that no field of their arguments dataclass declares."""


def _section_types(cls) -> dict[str, Optional[type]]:
    """Each field of `cls` -> the dataclass VeOmni builds a mapping value into, or None (taken whole).

    Resolved exactly as `_instantiate_recursive` resolves it (type hints, else the raw annotation;
    `Optional[X]` unwrapped to X), so the check covers exactly the keys VeOmni would drop.
    """
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # VeOmni falls back to the raw annotations as well
        hints = {}
    sections = {}
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name, field.type)
        if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
            hint = typing.get_args(hint)[0]
        sections[field.name] = hint if dataclasses.is_dataclass(hint) else None
    return sections


def _describe(key: str, path: str, valid: list[str]) -> str:
    prefix = f"{path}." if path else ""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    section = f"'{path}'" if path else "the top level"
    return f"unknown config key '{prefix}{key}'{hint}; valid keys in {section}: {', '.join(valid)}"


# The keys VeOmni 0.1.12 reads from `model.lora_config` (VeOmniLoraConfig.from_yaml, BaseTrainer._setup_lora).
LORA_CONFIG_KEYS = (
    "rank", "r", "alpha", "lora_alpha", "lora_modules", "target_modules", "exclude_modules", "target_parameters",
    "share_expert_lora", "lora_dropout", "bias", "use_rslora", "init_lora_weights", "modules_to_save",
    "rank_pattern", "alpha_pattern", "task_type", "base_model_name_or_path", "lora_adapter", "is_trainable",
)
FREE_SECTION_KEYS = {"model.lora_config": sorted(LORA_CONFIG_KEYS)}


def unknown_keys(cls, config: dict, path: str = "") -> list[str]:
    """One message per key in `config`, at any depth, that VeOmni would drop building `cls` (or reading
    a section of FREE_SECTION_KEYS)."""
    sections = _section_types(cls)
    valid = sorted(sections)
    problems = []
    for key, value in config.items():
        where = f"{path}.{key}" if path else key
        if key not in sections:
            problems.append(_describe(str(key), path, valid))
        elif sections[key] is not None and isinstance(value, dict):
            problems += unknown_keys(sections[key], value, where)
        elif where in FREE_SECTION_KEYS and isinstance(value, dict):
            problems += [_describe(str(k), where, FREE_SECTION_KEYS[where]) for k in value if k not in FREE_SECTION_KEYS[where]]
    return problems


def check_config_keys(cls, config: dict) -> None:
    """Raise `UnknownConfigKeyError` listing every key of `config` that `cls` does not declare."""
    problems = unknown_keys(cls, config)
    if len(problems) == 1:
        raise UnknownConfigKeyError(problems[0])
    if problems:
        raise UnknownConfigKeyError(f"{len(problems)} unknown config keys:\n" + "\n".join(f"- {p}" for p in problems))


def instantiate_checked(cls: Type[T], config_dict: Dict[str, Any]) -> T:
    """VeOmni's `_instantiate_recursive`, refusing unknown keys before anything is built.

    VeOmni's function calls this one again for each nested section (by its module-level name);
    those sections were checked with the whole config and pass.
    """
    if dataclasses.is_dataclass(cls) and isinstance(config_dict, dict):
        check_config_keys(cls, config_dict)
    from ..patchset import original

    return original(UNKNOWN_KEYS_PATCH)(cls, config_dict)
