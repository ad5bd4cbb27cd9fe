"""torch.compile on the patched classes as on HF's own, and VeOmni's `train.torch_compile` switch.

- Dynamo on the thinker forward (loss and router aux loss included): as many graphs as HF's unpatched
  forward (one: HF's text path has no data-dependent shape), no graph break in veomni_omni code.
- fullgraph compile of forward + backward: loss, every gradient and the expert load as in eager.
- Packed attention (VeOmni's packed micro batches) compiles whole and attends within each segment as in eager.
- The patch set leaves the classes' `_can_compile_fullgraph` as HF sets them, and every replacement keeps
  the signature (return annotation included) of the attribute it replaces.
- VeOmni's compile checks admit Qwen3-Omni and CPU (patches `*compile_*_check`), with their limits.
- VeOmni's own trainer with `train.torch_compile.enable` on 2 CPU ranks (FSDP2, gradient checkpointing):
  VeOmni compiles every thinker decoder layer whole, and the first step's loss, grad norm and expert load
  are the eager run's.

Compiles use backend "aot_eager": Dynamo and AOTAutograd, the graphs inductor gets, without inductor's C++
code generation, which takes minutes for the tiny thinker on 2 cores (inductor gives the same numbers, checked
by hand). The experts run HF's "batched_mm": HF's default "grouped_mm" runs fp32 weights through its
`transformers::grouped_mm_fallback` op, whose backward cannot be traced (`offs.tolist()`), patched or not.
"""

import copy
import dataclasses
import inspect
import json
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import PreTrainedModel
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.distributed import torch_compile as veomni_torch_compile
from veomni.distributed import torch_parallelize as veomni_parallelize

import veomni_omni
from veomni_omni import PATCHES
from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.models import moe, packed_attention
from veomni_omni.patching import Patch
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.launch import run_ranks
from veomni_omni.parity import parity_errors
from veomni_omni.testing import loss_and_grads
from veomni_omni.tiny import tiny_thinker_config
from veomni_omni.train import TinyModel, write_tiny_model

OURS = str(Path(veomni_omni.__file__).parent)
WORKER = str(Path(__file__).parent / "dist" / "veomni_compile.py")
TEXT_ROWS = [[("prompt", 3), ("text", 6)], [("prompt", 2), ("text", 9)]]
COMPILE_RTOL = 1e-4  # fp32 on CPU: the compiled graph may order reductions differently
PAD_TO_LENGTH = 128  # VeOmni pads each micro batch to micro_batch_size x max_seq_len under compile


def _explain(model, batch):
    torch._dynamo.reset()
    with torch.no_grad():
        model(**batch)  # HF installs its output-capturing hooks on the first call, under a lock Dynamo cannot enter
        return torch._dynamo.explain(model)(**batch)


def test_thinker_forward_compiles_into_hfs_graphs_with_no_break_of_ours(tiny_thinker, patched):
    model = tiny_thinker[0]
    batch = build_batch(TEXT_ROWS)
    ours = _explain(model, batch)
    with veomni_omni.unpatched():
        reference = _explain(model, batch)
    breaks_in_ours = [
        f"{b.reason.splitlines()[0]} at {[(f.filename, f.lineno) for f in b.user_stack]}"
        for b in ours.break_reasons
        if any(f.filename.startswith(OURS) for f in b.user_stack)
    ]
    assert not breaks_in_ours
    assert ours.graph_count == reference.graph_count == 1, (ours.graph_count, reference.graph_count)


def test_fullgraph_compile_matches_eager(tiny_thinker, patched):
    model = copy.deepcopy(tiny_thinker[0]).train()
    model.set_experts_implementation("batched_mm")
    batch = build_batch(TEXT_ROWS)
    moe.expert_load(model)  # forget earlier forwards of the shared fixture
    loss, grads = loss_and_grads(model, batch)
    load = moe.expert_load(model)
    model.compile(backend="aot_eager", fullgraph=True)
    compiled_loss, compiled_grads = loss_and_grads(model, batch)
    assert abs(compiled_loss - loss) <= COMPILE_RTOL * abs(loss)
    assert not parity_errors(compiled_grads, grads, rtol=COMPILE_RTOL)
    assert torch.equal(moe.expert_load(model), load)  # counted inside the graph, once per forward


def test_packed_attention_compiles_with_its_segments(patched):
    """Inside a graph the packed boundaries stay on device (a block-diagonal causal mask, their coverage
    asserted there); in eager, per-segment SDPA on host bounds: the same attention."""
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)  # grouped heads
    module = types.SimpleNamespace(is_causal=True)
    bounds = torch.tensor([0, 3, 7, 10])
    eager, _ = packed_attention.varlen_sdpa_attention(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=bounds)
    compiled = torch.compile(packed_attention.varlen_sdpa_attention, backend="aot_eager", fullgraph=True)
    out, _ = compiled(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=bounds)
    torch.testing.assert_close(out, eager, rtol=COMPILE_RTOL, atol=1e-6)
    with pytest.raises(RuntimeError, match="do not cover"):
        compiled(module, query, key, value, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 3, 7, 9]))


def test_compile_flags_are_hfs(patched):
    classes = [c for c in vars(hf).values() if isinstance(c, type) and issubclass(c, PreTrainedModel)]
    ours = {c.__name__: c._can_compile_fullgraph for c in classes}
    with veomni_omni.unpatched():
        assert {c.__name__: c._can_compile_fullgraph for c in classes} == ours
    assert ours["Qwen3OmniMoeThinkerForConditionalGeneration"]  # the claim the fullgraph test holds us to


def _function(attr):
    """The function behind a class attribute: a property's getter, a static/class method's function."""
    attr = attr.fget if isinstance(attr, property) else attr
    return getattr(attr, "__func__", attr)


# Attribute replacements are called where the original was; registry factories (VeOmni calls them by its
# registry's contract, e.g. architecture None) and data tables are not functions standing in for one.
REPLACING = [p for p in PATCHES if isinstance(p, Patch) and p.fingerprint is not None and callable(_function(p.replacement))]


@pytest.mark.parametrize("patch", REPLACING, ids=[p.name for p in REPLACING])
def test_replacement_keeps_the_signature(patch):
    original, replacement = _function(patch.original()), _function(patch.replacement)
    expected, got = inspect.signature(original, eval_str=True), inspect.signature(replacement, eval_str=True)
    assert got == expected, f"{patch.target}: {got} replaces {expected}"


def test_veomni_compile_checks_admit_qwen3_omni_on_cpu(tiny_thinker, patched):
    config = veomni_torch_compile.CompileConfig(enable=True, backend="aot_eager")
    model = tiny_thinker[0]  # output_router_logits on
    with pytest.raises(RuntimeError, match="output_router_logits=False with fullgraph"):
        veomni_torch_compile.validate_compile_model(model, config)
    veomni_torch_compile.validate_compile_model(model, dataclasses.replace(config, fullgraph=False))
    cpu = dict(device_type="cpu", fsdp_enabled=True, fsdp_mode="fsdp2", any_extra_parallel_enabled=False, enable_reshard_after_forward=True)
    veomni_parallelize.validate_compile_runtime(config, **cpu)
    with pytest.raises(RuntimeError, match="expert parallelism"):
        veomni_parallelize.validate_compile_runtime(config, **{**cpu, "any_extra_parallel_enabled": True})
    with veomni_omni.unpatched():  # what VeOmni says without the patch set
        with pytest.raises(RuntimeError, match="dense Qwen3-VL"):
            veomni_torch_compile.validate_compile_model(model, dataclasses.replace(config, fullgraph=False))
        with pytest.raises(RuntimeError, match="CUDA-only"):
            veomni_parallelize.validate_compile_runtime(config, **cpu)


@pytest.fixture(scope="module")
def veomni_runs(tmp_path_factory):
    """VeOmni's trainer, one step, from the same released-layout tiny model and data, switch off then on."""
    root = tmp_path_factory.mktemp("veomni_compile")
    # Router logits off: the released Qwen3-Omni's setting, and the one a compiled block can take (see veomni_compile).
    write_tiny_model(TinyModel(text={"output_router_logits": False}), root / "model", seed=0)
    rows = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}"}, {"role": "assistant", "content": f"{2 * i}"}]}
            for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    configs = []
    for name, enable in (("eager", False), ("compiled", True)):
        config = {
            "model": {
                "model_path": str(root / "model"),
                "ops_implementation": dataclasses.asdict(eager_ops_config()),
                "model_config": {"experts_implementation": "batched_mm"},
            },
            "data": {"train_path": str(root / "train.jsonl"), "max_seq_len": PAD_TO_LENGTH, "dataloader": {"num_workers": 0}},
            "train": {
                "seed": 0, "init_device": "meta", "micro_batch_size": 1, "global_batch_size": 2, "max_steps": 1,
                "pad_to_length": True, "gradient_checkpointing": {"enable": True},
                "accelerator": {"fsdp_config": {"fsdp_mode": "fsdp2", "mixed_precision": {"enable": True, "param_dtype": "float32"}}},
                "optimizer": {"lr": 1.0e-3},
                "checkpoint": {"output_dir": str(root / name), "save_epochs": 0, "save_hf_weights": False},
                "torch_compile": {"enable": enable, "backend": "aot_eager"},
            },
        }
        configs.append(root / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(config))
    run_ranks(WORKER, 2, [str(root / "runs.json"), *map(str, configs)], timeout_s=300)
    runs = json.loads((root / "runs.json").read_text())
    return [runs[str(c)] for c in configs]


def test_veomni_torch_compile_switch_trains_the_same_step(veomni_runs):
    eager, compiled = veomni_runs
    assert eager["compiled_blocks"] == [] and eager["graphs"] == 0
    layers = tiny_thinker_config().text_config
    assert len(compiled["compiled_blocks"]) == layers.num_hidden_layers
    assert all(c["fullgraph"] and c["backend"] == "aot_eager" for c in compiled["compiled_blocks"])
    assert compiled["graphs"] >= 1 and compiled["graph_breaks"] == 0
    step, reference = compiled["steps"][0], eager["steps"][0]
    assert abs(step["loss"] - reference["loss"]) <= COMPILE_RTOL * abs(reference["loss"])
    assert abs(step["grad_norm"] - reference["grad_norm"]) <= COMPILE_RTOL * reference["grad_norm"]
    assert step["expert_load"] == reference["expert_load"]
    # Every (padded) token once per layer, though checkpointing re-runs each compiled block in backward.
    assert all(sum(layer) == 2 * PAD_TO_LENGTH * layers.num_experts_per_tok for layer in step["expert_load"])
