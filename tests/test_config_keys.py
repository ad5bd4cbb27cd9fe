"""Unknown keys in a VeOmni YAML config fail through VeOmni's own `parse_args` (patch
`config_unknown_keys`); VeOmni 0.1.12 alone drops them silently (checked under `unpatched()`)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Dict, Optional

import pytest
from veomni.arguments import parse_args, parser as veomni_parser
from veomni.arguments.arguments_types import FSDPConfig, OptimizerConfig
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainingArguments

import veomni_omni
from veomni_omni.integration.config_keys import UnknownConfigKeyError, instantiate_checked
from veomni_omni.integration.settings import eager_ops_config

# VeOmni's configs/multimodal/qwen3_omni/qwen3_omni.yaml (the documented Qwen3-Omni recipe), verbatim.
QWEN3_OMNI_YAML = """\
model:
  model_path: Qwen3-Omni-30B-A3B-Instruct
  ops_implementation:
    moe_implementation: fused_triton
    attn_implementation: flash_attention_2

data:
  train_path: configs/multimodal/data/tulu_sharegpt4v_llavavideo.yaml
  data_type: conversation
  max_seq_len: 8196
  train_size: 80000000
  source_name: sharegpt4v_captioner_sft
  dataloader:
    num_workers: 0
  mm_configs:
    scale_factor: 28
    image_min_pixels: 3136 # 4 * 28 * 28
    image_max_pixels: 12845056 # 16384 * 28 * 28
    video_min_pixels: 100352 # 128 * 28 * 28
    video_max_pixels: 602112 # 768 * 28 * 28
    max_ratio: 200
    min_frames: 4
    max_frames: 20
    frame_factor: 2
    sample_rate: 16000
    fps: 2.0
    use_audio_in_video: True

train:
  accelerator:
    ulysses_size: 1
    fsdp_config:
      fsdp_mode: fsdp2
  optimizer:
    lr: 1.0e-5
    lr_decay_style: cosine
  num_train_epochs: 3
  micro_batch_size: 1
  global_batch_size: 32
  max_steps: 20
  init_device: meta
  checkpoint:
    output_dir: qwen3_omni_sft
  wandb:
    project: qwen3_omni
    name: qwen3_omni
"""

# VeOmni's default op kernels need CUDA and its validation refuses them on CPU: select the eager
# ones on the command line (which also exercises CLI overrides on top of the YAML).
EAGER_OPS = [
    arg
    for name, value in dataclasses.asdict(eager_ops_config()).items()
    for arg in (f"--model.ops_implementation.{name}", str(value))
]


@dataclass
class OmniSection:
    eval_steps: int = 0
    loss_plot: bool = True
    extra: Optional[Dict] = None


@dataclass
class OmniArguments(VeOmniVLMArguments):
    omni: OmniSection = field(default_factory=OmniSection)


BUILT: list[str] = []


@dataclass
class Probe:
    value: int = 0

    def __post_init__(self):
        BUILT.append("probe")


@dataclass
class Later:
    steps: int = 1


@dataclass
class ProbeArguments:
    """A root that is not VeOmni's: `first` is built before `second` by VeOmni's recursion."""

    first: Probe = field(default_factory=Probe)
    second: Later = field(default_factory=Later)


@pytest.fixture
def parse(tmp_path, monkeypatch, patched):
    """parse(yaml_text, *cli, root=...) runs VeOmni's parse_args on a config file, as torchrun would."""

    def run(yaml_text: str, *cli: str, root=VeOmniVLMArguments, ops=True):
        config = tmp_path / "config.yaml"
        config.write_text(textwrap.dedent(yaml_text))
        monkeypatch.setattr(sys, "argv", ["train_vlm.py", str(config), *cli, *(EAGER_OPS if ops else ())])
        return parse_args(root)

    return run


def field_names(cls) -> str:
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def test_veomni_qwen3_omni_config_parses_with_cli_overrides(parse):
    args = parse(QWEN3_OMNI_YAML, "--model.model_path", "/ckpt/omni", "--train.optimizer.lr", "2e-5")
    assert args.model.model_path == "/ckpt/omni" and args.train.optimizer.lr == 2e-5
    assert args.model.ops_implementation.moe_implementation == "eager"
    assert args.train.optimizer.lr_decay_style == "cosine" and args.train.global_batch_size == 32
    assert args.train.accelerator.fsdp_config.fsdp_mode == "fsdp2"
    assert args.data.mm_configs["use_audio_in_video"] is True and args.data.mm_configs["max_frames"] == 20


def test_top_level_typo_names_key_suggestion_and_section_keys(parse):
    with pytest.raises(UnknownConfigKeyError) as error:
        parse(QWEN3_OMNI_YAML + "trian:\n  seed: 3\n")
    assert str(error.value) == (
        "unknown config key 'trian' (did you mean 'train'?); valid keys in the top level: data, model, train"
    )


def test_nested_typo_names_full_dotted_key(parse):
    yaml_text = QWEN3_OMNI_YAML.replace("      fsdp_mode: fsdp2", "      fsdp_mdoe: fsdp2")
    with pytest.raises(UnknownConfigKeyError) as error:
        parse(yaml_text)
    assert str(error.value) == (
        "unknown config key 'train.accelerator.fsdp_config.fsdp_mdoe' "
        "(did you mean 'train.accelerator.fsdp_config.fsdp_mode'?); "
        f"valid keys in 'train.accelerator.fsdp_config': {field_names(FSDPConfig)}"
    )


def test_misspelt_section_and_unrelated_key_are_both_reported(parse):
    yaml_text = QWEN3_OMNI_YAML.replace("  optimizer:\n", "  optimzer:\n").replace(
        "      fsdp_mode: fsdp2", "      fsdp_mode: fsdp2\n      xyz: 1"
    )
    with pytest.raises(UnknownConfigKeyError) as error:
        parse(yaml_text)
    assert str(error.value).splitlines() == [
        "2 unknown config keys:",
        "- unknown config key 'train.accelerator.fsdp_config.xyz'; "
        f"valid keys in 'train.accelerator.fsdp_config': {field_names(FSDPConfig)}",
        "- unknown config key 'train.optimzer' (did you mean 'train.optimizer'?); "
        f"valid keys in 'train': {field_names(VLMTrainingArguments)}",
    ]


def test_subclass_section_is_checked_and_parsed(parse):
    with pytest.raises(UnknownConfigKeyError) as error:
        parse(QWEN3_OMNI_YAML + "omni:\n  eval_step: 5\n", root=OmniArguments)
    assert str(error.value) == (
        "unknown config key 'omni.eval_step' (did you mean 'omni.eval_steps'?); "
        "valid keys in 'omni': eval_steps, extra, loss_plot"
    )

    yaml_text = QWEN3_OMNI_YAML + "omni:\n  eval_steps: 5\n  loss_plot: false\n"
    args = parse(yaml_text, "--omni.eval_steps", "7", root=OmniArguments)
    assert args.omni == OmniSection(eval_steps=7, loss_plot=False)
    # the same section under VeOmni's own root class is an unknown key
    with pytest.raises(UnknownConfigKeyError, match="unknown config key 'omni'; valid keys in the top level: data, model, train"):
        parse(yaml_text)


def test_dict_fields_take_free_keys(parse):
    args = parse(QWEN3_OMNI_YAML + "omni:\n  extra: {anything: {nested: 1}}\n", root=OmniArguments)
    assert args.omni.extra == {"anything": {"nested": 1}}
    yaml_text = QWEN3_OMNI_YAML.replace(
        "  model_path: Qwen3-Omni-30B-A3B-Instruct\n",
        "  model_path: Qwen3-Omni-30B-A3B-Instruct\n  model_config: {any_key: 1, nested: {free: true}}\n",
    ).replace("    use_audio_in_video: True\n", "    use_audio_in_video: True\n    not_a_veomni_key: 3\n")
    args = parse(yaml_text)
    assert args.model.model_config == {"any_key": 1, "nested": {"free": True}}
    assert args.data.mm_configs["not_a_veomni_key"] == 3


def test_lora_config_keys_are_veomnis(parse):
    """VeOmni reads model.lora_config by name and drops the rest: a typo is an error naming the key."""
    lora = "  model_path: Qwen3-Omni-30B-A3B-Instruct\n  lora_config: {rank: 8, alpha: 16, lora_modules: [q_proj], rank_patern: {q_proj: 4}}\n"
    with pytest.raises(UnknownConfigKeyError) as error:
        parse(QWEN3_OMNI_YAML.replace("  model_path: Qwen3-Omni-30B-A3B-Instruct\n", lora))
    assert str(error.value).startswith("unknown config key 'model.lora_config.rank_patern' (did you mean 'model.lora_config.rank_pattern'?)")
    args = parse(QWEN3_OMNI_YAML.replace("  model_path: Qwen3-Omni-30B-A3B-Instruct\n", lora.replace("rank_patern", "rank_pattern")))
    assert args.model.lora_config["rank_pattern"] == {"q_proj": 4}


def test_nothing_is_built_before_the_check_fails(parse):
    BUILT.clear()
    with pytest.raises(UnknownConfigKeyError, match=r"'second\.step' \(did you mean 'second\.steps'\?\)"):
        parse("first: {value: 1}\nsecond: {step: 2}\n", root=ProbeArguments, ops=False)
    assert BUILT == [], "a section was built before the unknown key was refused"
    assert parse("first: {value: 1}\nsecond: {steps: 2}\n", root=ProbeArguments, ops=False).second.steps == 2
    assert BUILT == ["probe"]


def test_unpatched_veomni_drops_unknown_keys(parse):
    """The patch is what refuses them: VeOmni 0.1.12 alone builds the config without the typo."""
    yaml_text = QWEN3_OMNI_YAML.replace("  optimizer:\n", "  optimzer:\n") + "trian:\n  seed: 3\n"
    with veomni_omni.unpatched():
        assert veomni_parser._instantiate_recursive is not instantiate_checked
        args = parse(yaml_text)
    assert args.train.optimizer.lr == OptimizerConfig().lr != 1.0e-5, "upstream should drop the misspelt section"
    assert veomni_parser._instantiate_recursive is instantiate_checked
    with pytest.raises(UnknownConfigKeyError):
        parse(yaml_text)


def test_import_veomni_omni_guards_veomni_train_script(tmp_path):
    """The user's path: `import veomni_omni` before VeOmni's tasks/train_vlm.py, in a fresh process."""
    config = tmp_path / "config.yaml"
    config.write_text(QWEN3_OMNI_YAML.replace("  max_steps: 20\n", "  max_stpes: 20\n"))
    script = (
        "import veomni_omni\n"
        "from veomni.arguments import parse_args\n"
        "from veomni.trainer.vlm_trainer import VeOmniVLMArguments\n"
        "parse_args(VeOmniVLMArguments)\n"
        "print('PARSED')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(config), *EAGER_OPS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "PARSED" not in done.stdout, done.stdout + done.stderr
    assert "UnknownConfigKeyError: unknown config key 'train.max_stpes' (did you mean 'train.max_steps'?)" in done.stderr, done.stderr


def test_guard_names_veomni_when_its_parser_changes():
    patch = next(p for p in veomni_omni.PATCHES if p.name == "config_unknown_keys")
    patch.verify()
    with pytest.raises(veomni_omni.PatchFingerprintError) as error:
        dataclasses.replace(patch, fingerprint="0" * 16).verify()
    assert "veomni.arguments.parser._instantiate_recursive in veomni 0.1.12 has changed" in str(error.value)
