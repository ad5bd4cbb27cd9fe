"""LoRA models (VeOmni's native `veomni.lora` stack) in our checkpoint IO.

`VeOmniLoraModel` wraps the model: its parameters are `base_model.model.<name>`, a targeted linear's
weight moves to `<module>.base_layer.weight`, a targeted experts module's to
`<experts>.{gate_up_proj,down_proj}.base_layer.weight`, and the adapters sit beside them
(`<module>.lora_A.<adapter>.weight`, `<experts>.<gate_proj|up_proj|down_proj>.lora_A.<adapter>.weight`,
per expert `[E, r, in]` or shared `[r, in]`). Here:

- `base_params`: the base parameters under their bare names (what a released checkpoint fills),
  so loading and the released-layout export see the model they were written for;
- `adapters`: each low-rank pair with the base region it updates (the gate and up halves of the
  fused `gate_up_proj`; every expert), for the merged export (`delta`);
- `PeftAdapterExport`: the adapters in PEFT's format under the released checkpoint's module names,
  one pair per expert (`...mlp.experts.<e>.gate_proj.lora_A.weight`), the layout PEFT converts onto
  transformers 5.22's fused experts when it loads an adapter.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from veomni.lora import VeOmniLoraModel, is_lora_linear
from veomni.lora.moe_layers import is_lora_moe_experts
from veomni.lora.weight_loading import build_lora_key_overrides

from .layout import CARRIED_COMPONENTS
from .publish import publish, staging_dir
from .sharding import ShardedParam, distinct_boxes, gather_to, sharded_params

WRAPPER_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EXPERT_SPECS = ("gate_proj", "up_proj", "down_proj")  # VeOmni's adapters on one experts module


def is_lora_model(model: torch.nn.Module) -> bool:
    return isinstance(model, VeOmniLoraModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model the adapters were injected into (the model itself when it has none)."""
    return model.get_base_model() if is_lora_model(model) else model


def is_adapter_param(name: str) -> bool:
    return not {"lora_A", "lora_B"}.isdisjoint(name.split("."))


def base_params(model: torch.nn.Module) -> dict[str, ShardedParam]:
    """`sharding.sharded_params` of the base model: bare names, adapters left out."""
    params = sharded_params(model)
    if not is_lora_model(model):
        return params
    bare_of = {wrapped: bare for bare, wrapped in build_lora_key_overrides(model).items()}
    return {bare_of.get(name, name.removeprefix(WRAPPER_PREFIX)): p for name, p in params.items() if not is_adapter_param(name)}


@dataclass(frozen=True)
class Adapter:
    """base[:, rows] (experts) or base (a linear) += scale · B @ A, per expert when A is 3-D."""

    base: str  # bare name of the base parameter
    a: str  # model parameter names of the pair
    b: str
    scale: float
    rows: Optional[slice]  # the gate or up half of a fused gate_up_proj [E, 2I, H]
    spec: Optional[str] = None  # experts: gate_proj / up_proj / down_proj
    num_experts: int = 0

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(b.float(), a.float()) * self.scale  # [out, in], or [E, out, in] per expert


def adapters(model: torch.nn.Module) -> list[Adapter]:
    """Every adapter pair of a LoRA model (none for a plain model), in module order."""
    if not is_lora_model(model):
        return []
    found = []
    for fqn, module in model.named_modules():
        bare = fqn.removeprefix(WRAPPER_PREFIX)
        if is_lora_linear(module):
            name = module.active_adapter
            found.append(Adapter(
                f"{bare}.weight", f"{fqn}.lora_A.{name}.weight", f"{fqn}.lora_B.{name}.weight",
                float(module.scaling[name]), None,
            ))
        elif is_lora_moe_experts(module):
            size = module.intermediate_dim
            halves = {"gate_proj": slice(0, size), "up_proj": slice(size, 2 * size)}
            for spec in EXPERT_SPECS:
                base = f"{bare}.down_proj" if spec == "down_proj" else f"{bare}.gate_up_proj"
                found.append(Adapter(
                    base, f"{fqn}.{spec}.lora_A.{module.adapter_name}.weight", f"{fqn}.{spec}.lora_B.{module.adapter_name}.weight",
                    module._lora_scale_value, halves.get(spec), spec, module.num_experts,
                ))
    return found


class AdapterGather:
    """Whole adapter tensors on the ranks that need them (every rank calls in the same order)."""

    def __init__(self, model: torch.nn.Module):
        self.params = {name: p for name, p in sharded_params(model).items() if is_adapter_param(name)}
        self.boxes = distinct_boxes(self.params)

    def pair(self, adapter: Adapter, owners: set[int]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return tuple(gather_to(self.params[name], self.boxes[name], owners) for name in (adapter.a, adapter.b))


def merge_into(full: torch.Tensor, adapter: Adapter, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add the adapter's update to the whole base parameter `full` (in place)."""
    region = full[:, adapter.rows] if adapter.rows is not None else full
    region += adapter.delta(a, b).to(full.dtype)  # a shared [out, in] update broadcasts over the experts


def released_module(layout, adapter: Adapter) -> str:
    """The adapted module's name in the released checkpoint (`layout`: `layout.model_layout` of the
    base model against it): a linear's weight key without `.weight`; for experts, the module holding
    the per-expert `<e>.<spec>.weight` keys."""
    key = layout.pieces[adapter.base][0].key
    return key.rsplit(".", 3 if adapter.spec else 1)[0]


def _peft_tensors(adapter: Adapter, module: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's keys for one pair; an experts pair becomes one pair per expert (shared: the same for each)."""
    if adapter.spec is None:
        return {f"{WRAPPER_PREFIX}{module}.lora_A.weight": a, f"{WRAPPER_PREFIX}{module}.lora_B.weight": b}
    per_expert = a.ndim == 3
    tensors = {}
    for expert in range(adapter.num_experts):
        key = f"{WRAPPER_PREFIX}{module}.{expert}.{adapter.spec}"
        tensors[f"{key}.lora_A.weight"] = a[expert] if per_expert else a
        tensors[f"{key}.lora_B.weight"] = b[expert] if per_expert else b
    return tensors


def peft_config(model: torch.nn.Module, base_model_name_or_path: Optional[str]) -> dict:
    """`adapter_config.json` for the exported adapters: VeOmni's PEFT dict, with expert adapters declared
    as PEFT declares per-expert linears (`gate_proj` / `up_proj` / `down_proj` targets; PEFT maps them onto
    the fused experts) instead of VeOmni's fused-parameter globs; components the trained model lacked
    (talker, code2wav) excluded, so PEFT adds nothing there."""
    config = model.get_lora_config()
    d = config.to_peft_dict()
    d.pop("veomni_lora", None)
    if config.target_parameters:
        modules = d["target_modules"] or []
        if isinstance(modules, str):
            raise NotImplementedError("PEFT export of expert adapters with a regex target_modules: list the module names")
        d["target_modules"] = sorted(set(modules) | set(EXPERT_SPECS))
        d["target_parameters"] = None
    missing = [c for c in CARRIED_COMPONENTS if not hasattr(base_model(model), c)]
    if missing:
        if d.get("exclude_modules"):
            raise NotImplementedError("PEFT export with exclude_modules on a model without " + "/".join(missing))
        d["exclude_modules"] = rf".*\b({'|'.join(missing)})\..*"
    d["base_model_name_or_path"] = base_model_name_or_path
    return d


class PeftAdapterExport:
    """The adapters of `model` in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, in
    the adapters' own dtype) at `path`, keyed by the released module names: `hf.save_hf_checkpoint`
    hands each pair over as it gathers it for the merge (`add`, on rank 0), then rank 0 writes them,
    atomically (`write`)."""

    def __init__(self, model: torch.nn.Module, path, base_model_name_or_path: Optional[str] = None):
        self.model, self.path, self.base_model_name_or_path = model, Path(path), base_model_name_or_path
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, adapter: Adapter, layout, a: torch.Tensor, b: torch.Tensor) -> None:
        self.tensors.update(_peft_tensors(adapter, released_module(layout, adapter), a, b))

    def write(self) -> Path:
        staged = staging_dir(self.path)
        shutil.rmtree(staged, ignore_errors=True)  # left by a save that died
        staged.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(staged / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = peft_config(self.model, self.base_model_name_or_path)
        (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        publish(staged, self.path)
        return self.path
