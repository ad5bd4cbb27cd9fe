"""torchrun worker (gloo): released HF checkpoints through VeOmni's own loader and HF export.

Every model is built on meta by `build_foundation_model` and loaded by VeOmni's
`build_parallelize_model(model, weights_path=...)` (FSDP2 over all ranks, EP over `spec["ep"]`).

phase "cases" (one process group, several cases):
  omni_every_rank  top-level model, talker kept, every rank reads (broadcast_model_weights_from_rank0=False)
  omni_broadcast   the same through VeOmni's default rank-0 read and broadcast
  no_talker        `disable_talker()` first (as VeOmni's trainer does), default broadcast
  thinker          a thinker alone from the top-level checkpoint, every rank reads
  (each: full weights on rank 0, checkpoint bytes each rank's converter was fed)
  stream_load      (EP only) `ep_sharded_stream_load=True`: the error VeOmni raises on every rank
  broken           every rank reads a checkpoint lacking an expert key, with an extra one: the
                   CheckpointError each rank raises
  lora_param_dtype the no_talker model with LoRA (attention + experts), mixed precision param bf16 / reduce fp32:
                   built by our parallelize_model_fsdp2 (frozen base held in bf16) and by VeOmni's (held
                   in fp32), the same adapter values set in both; one forward + backward on a text batch:
                   loss, adapter gradients, the dtypes of frozen and trainable local shards
  export           the no_talker model, weights changed, saved by VeOmni's HuggingfaceCkptCallback
                   (real VeOmni arguments, optimizer and scheduler) at an hf_save_steps step and at
                   train end; full weights as exported
phase "broadcast_error": the broken checkpoint in VeOmni's default broadcast mode; rank 0 raises
  and torchrun ends the group (the test expects this run to fail).

argv: spec.json out_dir
spec: phase, ep, source, broken, thinker_config (a directory holding the thinker's config.json)
"""

import json
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

import veomni_omni  # noqa: F401  (patches + registry, before VeOmni builds anything)
from veomni.arguments.arguments_types import (
    CheckpointConfig,
    DataArguments,
    MixedPrecisionConfig,
    ModelArguments,
    TrainingArguments,
    VeOmniArguments,
)
from veomni.distributed import torch_parallelize as veomni_parallelize
from veomni.distributed.parallel_state import init_parallel_state
from veomni.lora import VeOmniLoraConfig, VeOmniLoraModel, resolve_fused_moe_lora_targets
from veomni.models import build_processor
from veomni.optim import build_lr_scheduler, build_optimizer
from veomni.trainer.callbacks.base import TrainerState
from veomni.trainer.callbacks.checkpoint_callback import HuggingfaceCkptCallback

from _common import build, on_every_rank  # same directory
from veomni_omni.checkpoint import CheckpointError
from veomni_omni.checkpoint import veomni_io
from veomni_omni.checkpoint.lora import is_adapter_param
from veomni_omni.checkpoint.sharding import sharded_params
from veomni_omni.parallel.lora import PARAM_DTYPE_PATCH
from veomni_omni.patchset import original
from veomni_omni.testing import gather_full_tensors
from veomni_omni.integration.settings import eager_ops_config

HF_SAVE_STEPS, LAST_STEP = 2, 3
converters = []  # every converter VeOmni's loader creates on this rank, in order


def record_converters():
    original_init = veomni_io.ReleasedLayoutConverter.__init__

    def init(self, model):
        original_init(self, model)
        converters.append(self)

    veomni_io.ReleasedLayoutConverter.__init__ = init


def without_talker(model):
    model.disable_talker()


def load(config_dir, weights, *, broadcast, talker=True, stream=False):
    return build(
        config_dir, weights, prepare=None if talker else without_talker,
        broadcast_model_weights_from_rank0=broadcast, ep_sharded_stream_load=stream,
    )


def loaded(spec, case, **kwargs):
    """Load one case; its full weights (rank 0) and the bytes each rank's converter was fed."""
    before = len(converters)
    config = spec["thinker_config"] if case == "thinker" else spec["source"]
    model = load(config, spec["source"], **kwargs)
    fed = sum(c.bytes_consumed for c in converters[before:])
    return model, {"weights": gather_full_tensors(model), "bytes_fed": on_every_rank(fed)}


def error_of(fn):
    try:
        fn()
    except (CheckpointError, NotImplementedError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def export(model, spec, out):
    """VeOmni's HF callback with real VeOmni arguments, at an hf_save_steps step and at train end."""
    with torch.no_grad():  # "trained" weights, different from the source everywhere
        for param in sharded_params(model).values():
            param.local.mul_(-2)
    args = VeOmniArguments(
        model=ModelArguments(model_path=spec["source"], ops_implementation=eager_ops_config()),
        data=DataArguments(train_path=spec["source"]),
        train=TrainingArguments(checkpoint=CheckpointConfig(output_dir=str(out / "run"), save_hf_weights=True, hf_save_steps=HF_SAVE_STEPS)),
    )
    optimizer = build_optimizer(model, lr=1e-3, fused=True)
    trainer = SimpleNamespace(
        args=args, model=model, model_assets=[build_processor(spec["source"])], optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(optimizer, train_steps=LAST_STEP, lr=1e-3), train_dataloader=None,
        environ_meter=SimpleNamespace(state_dict=dict),
    )
    callback = HuggingfaceCkptCallback(trainer)
    callback.on_step_end(TrainerState(global_step=HF_SAVE_STEPS))
    callback.on_train_end(TrainerState(global_step=LAST_STEP))
    return {"weights": gather_full_tensors(model), "save_path": args.train.checkpoint.save_path}


LORA_CONFIG = {"rank": 4, "alpha": 8, "lora_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}


def with_lora_adapters(model):
    model.disable_talker()
    return VeOmniLoraModel(model, VeOmniLoraConfig.from_yaml(resolve_fused_moe_lora_targets(model, LORA_CONFIG)))


def lora_param_dtype(spec):
    mixed = MixedPrecisionConfig(enable=True, param_dtype="bfloat16", reduce_dtype="float32")
    results = {}
    for which in ("ours", "veomni"):
        ours = veomni_parallelize.parallelize_model_fsdp2
        if which == "veomni":
            veomni_parallelize.parallelize_model_fsdp2 = original(PARAM_DTYPE_PATCH)
        try:
            model = build(spec["source"], prepare=with_lora_adapters, mixed_precision=mixed, is_peft_model=True)
        finally:
            veomni_parallelize.parallelize_model_fsdp2 = ours
        params = sharded_params(model)
        with torch.no_grad():  # the same adapters in both builds, B away from zero
            for name, p in params.items():
                if is_adapter_param(name):
                    full = torch.randn(p.global_shape, generator=torch.Generator().manual_seed(len(name))) * 0.1
                    p.local.copy_(full[tuple(slice(o, o + n) for o, n in zip(p.offset, p.local_shape))])
        ids = torch.randint(100, 400, (1, 48), generator=torch.Generator().manual_seed(dist.get_rank()))
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        results[which] = {
            "loss": on_every_rank(loss.detach()),
            "grads": gather_full_tensors(model, grads=True),
            "dtypes": on_every_rank({
                kind: sorted({str(p.local.dtype) for n, p in params.items() if is_adapter_param(n) == (kind == "adapters")})
                for kind in ("frozen", "adapters")
            }),
        }
    return results


def cases(spec, out):
    results = {}
    results["omni_every_rank"] = loaded(spec, "omni_every_rank", broadcast=False)[1]
    results["omni_broadcast"] = loaded(spec, "omni_broadcast", broadcast=True)[1]
    no_talker, results["no_talker"] = loaded(spec, "no_talker", broadcast=True, talker=False)
    results["thinker"] = loaded(spec, "thinker", broadcast=False)[1]
    if spec["ep"] > 1:
        results["stream_load"] = on_every_rank(error_of(lambda: load(spec["source"], spec["source"], broadcast=False, stream=True)))
    results["broken"] = on_every_rank(error_of(lambda: load(spec["source"], spec["broken"], broadcast=False)))
    results["lora_param_dtype"] = lora_param_dtype(spec)
    results["export"] = export(no_talker, spec, out)
    if dist.get_rank() == 0:
        torch.save(results, out / "cases.pt")


def main():
    spec_file, out = sys.argv[1:3]
    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    ep = dict(extra_parallel_sizes=(spec["ep"],), extra_parallel_names=("ep",)) if spec["ep"] > 1 else {}
    init_parallel_state(dp_size=dist.get_world_size(), dp_mode="fsdp2", device_type="cpu", **ep)
    record_converters()
    if spec["phase"] == "cases":
        cases(spec, Path(out))
    else:
        load(spec["source"], spec["broken"], broadcast=True)
        raise RuntimeError("the broken checkpoint loaded")


if __name__ == "__main__":
    main()
