"""VeOmni's per-op kernel settings on the HF classes (veomni_omni/models/kernels.py).

CPU: with no ops config or an all-eager one every patched op is bit-identical to HF's; a selected kernel is
called as VeOmni's OpSlots call it (recording fakes in VeOmni's kernel registry, on meta tensors); a selected
kernel that cannot run here raises, naming the setting; VeOmni's cross-entropy selection reaches the thinker's
loss in its fused form (hidden states + lm_head weight).

CUDA (skipped without it, or without liger-kernel): each of VeOmni's real kernels, forward and backward, against
HF's eager code in bf16 at the thinker's real widths (M-RoPE with the released mrope_section [24, 20, 20]); the
fused linear cross-entropy at the real hidden size and vocabulary, and through the thinker's forward. All of them:
    python -m pytest -q tests/test_kernels.py -k gpu
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import pytest
import torch
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.ops.config import singleton as ops_singleton
from veomni.ops.kernel_registry import KERNEL_REGISTRY, HardwareRequirement, KernelSpec
from veomni.ops.kernels import cross_entropy

import veomni_omni
from veomni_omni.integration.settings import eager_ops_config
from veomni_omni.models import kernels
from veomni_omni.data.samples import batch_rope_positions
from veomni_omni.data.shaped_batches import build_batch
from veomni_omni.parity import parity_errors
from veomni_omni.testing import loss_and_grads
from veomni_omni.tiny import tiny_thinker_config

requires_gpu_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="needs CUDA" if not torch.cuda.is_available() else "needs liger-kernel",
)
BF16_RTOL = 2e-2  # max|kernel − eager| per tensor, relative to max|eager|: a few bf16 ulps

# A text row and a row with every modality: M-RoPE positions whose three axes differ.
ROWS = [
    [("prompt", 3), ("image", 1, 8, 8), ("text", 6), ("video", 2, 4, 4), ("audio", 120), ("text", 12)],
    [("text", 40)],
]
LOSS_KEYS = ("ForCausalLM", "ForConditionalGeneration", "ForSequenceClassification")  # install_loss_mapping's


@dataclasses.dataclass
class Case:
    """One patched op: `fn(*inputs, *constants)`, differentiated with respect to `inputs` and the parameters
    of `module`. `fn` reaches the op through its class or the HF module at call time, so it runs whatever is
    installed there (patched or upstream)."""

    fn: Callable
    inputs: tuple
    constants: tuple = ()
    module: Optional[torch.nn.Module] = None


def text_cases(text_config, position_ids: torch.Tensor, device, dtype) -> dict:
    """The thinker's text ops at `text_config`'s widths, with random weights and inputs."""
    torch.manual_seed(0)
    batch, seq = position_ids.shape[1:]
    hidden, head_dim, eps = text_config.hidden_size, text_config.head_dim, text_config.rms_norm_eps
    norms = {
        "decoder_norm": hf.Qwen3OmniMoeThinkerTextRMSNorm(hidden, eps),  # input/post-attention layernorms
        "head_norm": hf.Qwen3OmniMoeThinkerTextRMSNorm(head_dim, eps),  # q_norm / k_norm
        "final_norm": hf.Qwen3OmniMoeTextRMSNorm(hidden, eps),
    }
    for norm in norms.values():
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)
        norm.to(device, dtype)
    mlp = hf.Qwen3OmniMoeThinkerTextMLP(text_config).to(device, dtype)
    rotary = hf.Qwen3OmniMoeThinkerTextRotaryEmbedding(text_config).to(device)
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    heads = torch.randn(batch, seq, text_config.num_attention_heads, head_dim, device=device, dtype=dtype)
    q = torch.randn(batch, text_config.num_attention_heads, seq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, text_config.num_key_value_heads, seq, head_dim, device=device, dtype=dtype)
    cos_sin = rotary(x, position_ids.to(device))
    cases = {name: Case(norm, (heads if name == "head_norm" else x,), module=norm) for name, norm in norms.items()}
    cases["dense_mlp"] = Case(mlp, (x,), module=mlp)
    cases["mrope"] = Case(lambda *args: hf.apply_rotary_pos_emb(*args), (q, k), cos_sin)
    return cases


def vision_rope_case(vision_config, patches: int, device, dtype) -> Case:
    torch.manual_seed(0)
    head_dim = vision_config.hidden_size // vision_config.num_heads
    q, k = (torch.randn(patches, vision_config.num_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    angles = torch.randn(patches, head_dim // 2, device=device)
    emb = torch.cat((angles, angles), dim=-1)
    return Case(lambda *args: hf.apply_rotary_pos_emb_vision(*args), (q, k), (emb.cos(), emb.sin()))


def forward_backward(case: Case) -> dict:
    """Outputs, and the gradients of the inputs and parameters under one fixed random upstream gradient."""
    inputs = [x.detach().clone().requires_grad_() for x in case.inputs]
    params = dict(case.module.named_parameters()) if case.module is not None else {}
    for param in params.values():
        param.grad = None
    out = case.fn(*inputs, *case.constants)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    sum((o.float() * torch.randn(o.shape, device=o.device)).sum() for o in outs).backward()
    result = {f"output {i}": o.detach() for i, o in enumerate(outs)}
    result.update({f"input {i} grad": x.grad for i, x in enumerate(inputs)})
    result.update({f"{name} grad": p.grad for name, p in params.items()})
    return result


def tiny_cases(device="cpu", dtype=torch.float32) -> dict:
    config = tiny_thinker_config()
    positions = batch_rope_positions(config, build_batch(ROWS, config))
    cases = text_cases(config.text_config, positions, device, dtype)
    cases["vision_rope"] = vision_rope_case(config.vision_config, 40, device, dtype)
    return cases


@pytest.fixture
def ops_config(monkeypatch):
    """Install VeOmni's ops config (all eager but the given settings) for one test; resolved kernels
    are forgotten before and after."""
    monkeypatch.setattr(kernels, "_resolved", {})

    def install(**settings):
        monkeypatch.setattr(ops_singleton, "_ops_config", dataclasses.replace(eager_ops_config(), **settings))

    return install


@pytest.fixture
def loss_mapping(monkeypatch):
    """VeOmni's install_loss_mapping rewrites transformers' global LOSS_MAPPING: restored afterwards."""
    for key in LOSS_KEYS:
        monkeypatch.setitem(LOSS_MAPPING, key, LOSS_MAPPING[key])
    return cross_entropy.install_loss_mapping


# ---------------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("installed", [False, True], ids=["no_ops_config", "eager_ops_config"])
def test_eager_settings_are_hf_exactly(patched, ops_config, monkeypatch, installed):
    if installed:
        ops_config()
    else:
        monkeypatch.setattr(ops_singleton, "_ops_config", None)
    for name, case in tiny_cases().items():
        ours = forward_backward(case)
        with veomni_omni.unpatched():
            theirs = forward_backward(case)
        assert ours.keys() == theirs.keys(), name
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key} differs from HF"


def norm_args(case):
    return (case.inputs[0], case.module.weight, case.module.variance_epsilon), {}


# setting, VeOmni op, variant, case, the arguments VeOmni's kernels for the op take (as its OpSlot call sites pass them)
DISPATCH = [
    ("rms_norm_implementation", "rms_norm", "standard", "decoder_norm", norm_args),
    ("rms_norm_implementation", "rms_norm", "standard", "head_norm", norm_args),
    ("rms_norm_implementation", "rms_norm", "standard", "final_norm", norm_args),
    ("swiglu_mlp_implementation", "swiglu_mlp", "standard", "dense_mlp", lambda case: ((case.module, case.inputs[0]), {})),
    ("rotary_pos_emb_implementation", "rotary_pos_emb", "full", "mrope", lambda case: ((*case.inputs, *case.constants), {"unsqueeze_dim": 1})),
    ("rotary_pos_emb_vision_implementation", "rotary_pos_emb_vision", "full", "vision_rope", lambda case: ((*case.inputs, *case.constants), {})),
]


def register_recording_kernel(monkeypatch, op: str, variant: str, calls: list, result) -> None:
    """A kernel named 'recording' in VeOmni's registry, runnable anywhere, that records its arguments."""

    def kernel(*args, **kwargs):
        calls.append((args, kwargs))
        return result

    spec = KernelSpec(name="recording", op_name=op, variant=variant, factory=lambda: kernel, hardware=HardwareRequirement("any"))
    monkeypatch.setitem(KERNEL_REGISTRY._specs[(op, variant)], "recording", spec)


def same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    return a is b if isinstance(a, (torch.Tensor, torch.nn.Module)) else a == b


@pytest.mark.parametrize("setting, op, variant, name, expected", DISPATCH, ids=[d[3] for d in DISPATCH])
def test_selected_kernel_is_called_as_veomni_calls_it(patched, ops_config, monkeypatch, setting, op, variant, name, expected):
    """Meta tensors: a selected kernel never runs on CPU ones (test_unrunnable_kernel_raises_naming_the_setting)."""
    calls, result = [], object()
    register_recording_kernel(monkeypatch, op, variant, calls, result)
    ops_config(**{setting: "recording"})
    case = tiny_cases(device="meta")[name]
    assert case.fn(*case.inputs, *case.constants) is result
    assert len(calls) == 1 and same(calls[0], expected(case)), calls


def test_kernel_guards_refuse_what_the_kernels_would_get_wrong(patched, ops_config, monkeypatch):
    for op, variant in (("rms_norm", "standard"), ("rotary_pos_emb", "full"), ("swiglu_mlp", "standard")):
        register_recording_kernel(monkeypatch, op, variant, [], None)
    ops_config(rms_norm_implementation="recording", rotary_pos_emb_implementation="recording", swiglu_mlp_implementation="recording")
    cases = tiny_cases(device="meta", dtype=torch.bfloat16)
    norm = cases["decoder_norm"].module.float()
    with pytest.raises(ValueError, match="weight in the input's dtype"):
        norm(cases["decoder_norm"].inputs[0])
    with pytest.raises(ValueError, match="unsqueeze_dim=2"):
        hf.apply_rotary_pos_emb(*cases["mrope"].inputs, *cases["mrope"].constants, unsqueeze_dim=2)
    mlp = cases["dense_mlp"].module
    mlp.config.hidden_act = "gelu"  # a config of its own: tiny_cases builds a fresh one
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        mlp(cases["dense_mlp"].inputs[0])


@pytest.mark.parametrize(
    "setting, backend, message",
    [
        ("rms_norm_implementation", "liger_kernel", None),
        ("rotary_pos_emb_implementation", "liger_kernel", None),
        ("swiglu_mlp_implementation", "liger_kernel", None),
        # VeOmni's only vision RoPE kernel is its NPU one ('npu' off NPU fails its own config check)
        ("rotary_pos_emb_vision_implementation", "liger_kernel", "Unknown kernel 'liger_kernel'"),
        ("rms_norm_implementation", "triton", "Unknown kernel 'triton'"),
    ],
)
def test_unrunnable_kernel_raises_naming_the_setting(patched, ops_config, setting, backend, message):
    """Through the thinker's own forward (a dense layer, an image): each setting is reached, and a kernel
    that cannot run on this CPU machine (or does not exist) fails instead of silently running eager."""
    torch.manual_seed(0)
    model = hf.Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config(mlp_only_layers=[0]))
    batch = build_batch(ROWS)
    ops_config(**{setting: backend})
    with pytest.raises(RuntimeError, match=f"model.ops_implementation.{setting}='{backend}'") as error:
        model(**batch)
    assert "'eager'" in str(error.value) and (message is None or message in str(error.value))


def test_cross_entropy_setting_reaches_the_thinker_fused(tiny_thinker, patched, ops_config, loss_mapping, monkeypatch):
    """VeOmni binds its cross-entropy selection into LOSS_MAPPING; the thinker's forward hands it the final
    hidden states and the lm_head weight (what Liger's fused linear cross-entropy needs), no logits."""
    model, _ = tiny_thinker
    calls, eager = [], cross_entropy.eager_cross_entropy

    def recording(logits, labels, vocab_size, num_items_in_batch, ignore_index, **kwargs):
        calls.append(dict(logits=logits, hidden_states=kwargs["hidden_states"], weights=kwargs["weights"]))
        return eager(logits, labels, vocab_size, num_items_in_batch, ignore_index, **kwargs)

    monkeypatch.setattr(cross_entropy, "eager_cross_entropy", recording)
    ops_config()
    loss_mapping("eager")
    batch = build_batch(ROWS)
    out = model(**batch)
    assert len(calls) == 1 and calls[0]["logits"] is None and calls[0]["weights"] is model.lm_head.weight
    assert calls[0]["hidden_states"].shape == (batch["input_ids"].numel(), model.config.text_config.hidden_size)
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------
# CUDA: VeOmni's real kernels against HF's eager code, bf16
# ---------------------------------------------------------------------------------------------------


def counting_resolve(monkeypatch) -> dict:
    """Calls of each kernel VeOmni's registry resolves from now on (the real kernels, counted)."""
    counts, resolve = {}, KERNEL_REGISTRY.resolve

    def counted(op, variant, backend):
        kernel = resolve(op, variant, backend)

        def call(*args, **kwargs):
            counts[op] = counts.get(op, 0) + 1
            return kernel(*args, **kwargs)

        return call

    monkeypatch.setattr(KERNEL_REGISTRY, "resolve", counted)
    return counts


GPU_SETTINGS = {
    "decoder_norm": ("rms_norm_implementation", "rms_norm"),
    "head_norm": ("rms_norm_implementation", "rms_norm"),
    "final_norm": ("rms_norm_implementation", "rms_norm"),
    "dense_mlp": ("swiglu_mlp_implementation", "swiglu_mlp"),
    "mrope": ("rotary_pos_emb_implementation", "rotary_pos_emb"),
}


@requires_gpu_kernels
@pytest.mark.parametrize("name", list(GPU_SETTINGS))
def test_gpu_kernel_matches_eager_in_bf16(patched, ops_config, monkeypatch, name):
    from veomni_omni.bench.configs import real_thinker_config

    setting, op = GPU_SETTINGS[name]
    counts = counting_resolve(monkeypatch)
    tiny = tiny_thinker_config()
    positions = batch_rope_positions(tiny, build_batch(ROWS, tiny))
    assert not torch.equal(positions[0], positions[1]), "M-RoPE axes must differ for the test to mean anything"
    real = real_thinker_config(text_layers=1).text_config
    assert real.rope_parameters["mrope_section"] == [24, 20, 20] and real.head_dim == 128
    case = text_cases(real, positions, "cuda", torch.bfloat16)[name]
    ops_config()
    eager = forward_backward(case)
    ops_config(**{setting: "liger_kernel"})
    fused = forward_backward(case)
    assert counts.get(op, 0) == 1, f"VeOmni's {op} kernel did not run ({counts})"
    errors = parity_errors(fused, eager, rtol=BF16_RTOL)
    assert not errors, "\n".join(errors)


@requires_gpu_kernels
def test_gpu_fused_linear_cross_entropy_matches_eager_in_bf16(loss_mapping):
    """VeOmni's installed loss, liger_kernel vs eager, at the thinker's real hidden size and vocabulary."""
    from veomni_omni.bench.configs import real_thinker_config

    text = real_thinker_config(text_layers=1).text_config
    torch.manual_seed(0)
    hidden = torch.randn(2, 512, text.hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(text.vocab_size, text.hidden_size, device="cuda", dtype=torch.bfloat16) * text.hidden_size**-0.5
    labels = torch.randint(0, text.vocab_size, (2, 512), device="cuda")
    labels[:, :100] = -100

    def loss_case(backend):
        loss_mapping(backend)
        loss_fn = LOSS_MAPPING["ForConditionalGeneration"]
        return Case(lambda h, w: loss_fn(logits=None, labels=labels, vocab_size=text.vocab_size, hidden_states=h, weights=w)[0], (hidden, weight))

    eager = forward_backward(loss_case("eager"))
    fused = forward_backward(loss_case("liger_kernel"))
    errors = parity_errors(fused, eager, rtol=BF16_RTOL)
    assert not errors, "\n".join(errors)


@requires_gpu_kernels
def test_gpu_thinker_loss_through_liger_cross_entropy(patched, ops_config, loss_mapping, monkeypatch):
    """The thinker's forward in bf16 on CUDA under VeOmni's liger_kernel loss: the fused kernel runs and
    the loss and the lm_head gradient (what the fused kernel differentiates) match the eager loss's."""
    from veomni.ops.kernels.cross_entropy import liger

    calls = []
    fused_ce = liger.fused_liger_kernel_cross_entropy

    def counted(*args, **kwargs):
        calls.append(1)
        return fused_ce(*args, **kwargs)

    monkeypatch.setattr(liger, "fused_liger_kernel_cross_entropy", counted)
    ops_config()
    torch.manual_seed(0)
    model = hf.Qwen3OmniMoeThinkerForConditionalGeneration(tiny_thinker_config()).to("cuda", torch.bfloat16)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in build_batch(ROWS).items()}
    for key in ("pixel_values", "pixel_values_videos", "input_features"):
        batch[key] = batch[key].to(torch.bfloat16)
    loss_mapping("eager")
    eager_loss, eager_grads = loss_and_grads(model, batch)
    loss_mapping("liger_kernel")
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert calls, "VeOmni's fused linear cross-entropy did not run"
    assert abs(fused_loss.item() - eager_loss.item()) <= BF16_RTOL * abs(eager_loss.item())
    lm_head = "lm_head.weight"
    errors = parity_errors({lm_head: fused_grads[lm_head]}, {lm_head: eager_grads[lm_head]}, rtol=BF16_RTOL)
    assert not errors, "\n".join(errors)
