"""Thinker MoE experts in one process: HF's exact numbers while the experts are whole, the expert-load
statistics, the EP plan's parameter names, the choice of implementation; on CUDA, VeOmni's fused kernel
against the torch-native path (skipped without CUDA). Multi-rank EP parity: tests/test_expert_parallel.py.
"""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Shard
from transformers import (
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.distributed.utils import check_fqn_match
from veomni.ops.config import singleton as ops_singleton

import veomni_omni
from veomni_omni.models import moe
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.launch import run_ranks
from veomni_omni.tiny import tiny_omni_config, tiny_thinker_config

KERNEL_WORKER = str(Path(__file__).parent / "dist" / "ep_kernels.py")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def experts_and_router(implementation="grouped_mm", device="cpu", dtype=torch.float32, **overrides):
    config = tiny_thinker_config(**overrides).text_config
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts, router = hf.Qwen3OmniMoeThinkerTextExperts(config), hf.Qwen3OmniMoeThinkerTextTopKRouter(config)
    for weight in (experts.gate_up_proj, experts.down_proj, router.weight):
        torch.nn.init.normal_(weight, std=0.5)
    return experts.to(device, dtype), router.to(device, dtype), config


def forward_backward(experts, router, x):
    """Output and every gradient (input, router, experts) of one routed pass."""
    experts.zero_grad(set_to_none=True)
    router.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    _, weights, index = router(x)
    out = experts(x, index, weights)
    probe = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out.float() * probe).sum().backward()
    return [out.detach(), x.grad, router.weight.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
def test_whole_experts_give_hf_exact_numbers(patched, implementation):
    """EP off, no process group: the patched experts are HF's own forward, bit for bit. (Deterministic
    algorithms: batched_mm's weight gradient, an index backward, otherwise varies run to run on CPU.)"""
    experts, router, config = experts_and_router(implementation)
    x = torch.randn(23, config.hidden_size, generator=torch.Generator().manual_seed(1))
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = forward_backward(experts, router, x)
        with veomni_omni.unpatched():
            ref = forward_backward(experts, router, x)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    for g, r in zip(got, ref):
        assert torch.equal(g, r)


def _reference_load(router_logits, top_k, num_experts):
    return torch.stack([
        torch.bincount(torch.topk(layer, top_k).indices.reshape(-1), minlength=num_experts) for layer in router_logits
    ])


def test_expert_load_counts_each_step_once(tiny_thinker, patched):
    """Tokens per expert per layer: accumulated over the forwards of a step (micro-batches), reset when read,
    not counted again when gradient checkpointing re-runs the forward."""
    model = copy.deepcopy(tiny_thinker[0])
    text = model.config.text_config
    first = build_batch([[("prompt", 3), ("image", 1, 4, 4), ("text", 6)], [("prompt", 2), ("text", 5)]], seed=1)
    second = build_batch([[("prompt", 2), ("audio", 150), ("text", 4)]], seed=2)
    moe.expert_load(model)  # forget the forwards earlier tests ran on the shared fixture
    assert not moe.expert_load(model).any()
    with torch.no_grad():
        expected = sum(
            _reference_load(model(**batch).router_logits, text.num_experts_per_tok, text.num_experts)
            for batch in (first, second)
        )
    load = moe.expert_load(model)
    assert load.shape == (text.num_hidden_layers, text.num_experts) and load.dtype == torch.int64
    assert torch.equal(load, expected)
    assert not moe.expert_load(model).any()  # read resets

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = model(**first)
    out.loss.backward()
    expected = _reference_load(out.router_logits, text.num_experts_per_tok, text.num_experts)
    assert torch.equal(moe.expert_load(model, reset=False), expected)


@pytest.mark.parametrize(
    "cls, config",
    [
        (Qwen3OmniMoeThinkerForConditionalGeneration, tiny_thinker_config),
        (Qwen3OmniMoeForConditionalGeneration, tiny_omni_config),
        (hf.Qwen3OmniMoeThinkerTextModel, lambda: tiny_thinker_config().text_config),
    ],
    ids=["thinker", "top_level", "text_model"],
)
def test_plans_name_exactly_the_experts(patched, cls, config):
    """Each class's plan shards exactly its experts' fused weights along dim 0 (the thinker's, and the
    top-level model's talker's), and the modules VeOmni wraps on the ep_fsdp mesh are exactly those experts
    modules."""
    with torch.device("meta"):
        model = cls(config())
    plan = model.get_parallel_plan()
    assert list(plan.extra_parallel_plan) == ["ep"]
    patterns = plan.extra_parallel_plan["ep"]
    assert all(isinstance(s, Shard) and s.dim == 0 for s in patterns.values())
    experts = {n for n, m in model.named_modules() if isinstance(m, hf.Qwen3OmniMoeThinkerTextExperts)}
    assert len(experts) == tiny_thinker_config().text_config.num_hidden_layers
    talker = {n for n, m in model.named_modules() if isinstance(m, hf.Qwen3OmniMoeTalkerTextExperts)}
    assert len(talker) == (tiny_omni_config().talker_config.text_config.num_hidden_layers if cls is Qwen3OmniMoeForConditionalGeneration else 0)
    experts |= talker
    matched = {n for n, _ in model.named_parameters() if any(check_fqn_match(p, n) for p in patterns)}
    assert matched == {f"{e}.{w}" for e in experts for w in ("gate_up_proj", "down_proj")}
    assert set(plan.get_extra_parallel_fsdp_no_shard_info(model, "ep")) == experts


def test_implementation_choice(monkeypatch):
    """auto: VeOmni's ops config when installed, else the fastest available (torch on CPU); VeOmni's
    GPU default falls back to torch on CPU; our explicit fused choice refuses to run where it cannot."""
    monkeypatch.delenv(moe.MOE_IMPLEMENTATION_ENV, raising=False)
    x = torch.randn(3, 4)
    try:
        monkeypatch.setattr(ops_singleton, "get_ops_config", lambda: None)
        assert moe.moe_implementation() == ("auto", False) and moe._fused_kernel(x) is None
        monkeypatch.setattr(ops_singleton, "get_ops_config", lambda: SimpleNamespace(moe_implementation="eager"))
        assert moe.moe_implementation() == ("torch", False)
        monkeypatch.setattr(ops_singleton, "get_ops_config", lambda: SimpleNamespace(moe_implementation="fused_triton"))
        assert moe.moe_implementation() == ("fused_triton", False) and moe._fused_kernel(x) is None
        moe.set_moe_implementation("fused_triton")
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            moe._fused_kernel(x)
        moe.set_moe_implementation("torch")
        assert moe.moe_implementation() == ("torch", True)
        monkeypatch.setenv(moe.MOE_IMPLEMENTATION_ENV, "nonsense")
        moe.set_moe_implementation(None)
        with pytest.raises(ValueError, match="nonsense"):
            moe.moe_implementation()
        with pytest.raises(ValueError):
            moe.set_moe_implementation("fused")
    finally:
        moe.set_moe_implementation(None)


def test_sharded_experts_without_an_ep_group_fail_clearly(patched):
    experts, router, config = experts_and_router()
    experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj[:4].detach())
    experts.down_proj = torch.nn.Parameter(experts.down_proj[:4].detach())
    x = torch.randn(5, config.hidden_size)
    with pytest.raises(RuntimeError, match="4 of 8 experts.*expert-parallel group of size 2"):
        forward_backward(experts, router, x)


@requires_cuda
def test_fused_kernel_agrees_with_torch_native_on_cuda(patched):
    """VeOmni's fused Triton MoE (bf16) against the torch path on the same routing, EP off."""
    pytest.importorskip("triton")
    experts, router, config = experts_and_router(
        device="cuda", dtype=torch.bfloat16, hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4
    )
    x = torch.randn(300, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    try:
        moe.set_moe_implementation("fused_triton")
        fused = forward_backward(experts, router, x)
        moe.set_moe_implementation("torch")
        native = forward_backward(experts, router, x)
    finally:
        moe.set_moe_implementation(None)
    for name, f, n in zip(["output", "input grad", "router grad", "gate_up grad", "down grad"], fused, native):
        assert (f.float() - n.float()).abs().max() <= 2e-2 * n.float().abs().max(), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="EP on CUDA needs two GPUs")
def test_fused_and_torch_native_dispatch_agree_under_ep_on_cuda(tmp_path):
    """EP=2 over NCCL: VeOmni's fused EP path and our torch-native dispatch, same shards, same tokens."""
    pytest.importorskip("triton")
    run_ranks(KERNEL_WORKER, 2, ["cuda", str(tmp_path / "out.pt")], timeout_s=300)
    result = torch.load(tmp_path / "out.pt")
    for rank, errors in enumerate(result):
        for name, error in errors.items():
            assert error <= 2e-2, f"rank {rank}: {name} relative difference {error:.2e}"
