"""VeOmni settings that veomni_omni needs to run on any device (CPU included)."""

from __future__ import annotations

import dataclasses


def eager_ops_config(attn_implementation: str = "sdpa"):
    """VeOmni's OpsImplementationConfig with every op on its eager/torch path.

    VeOmni's defaults (liger, triton, flash-attn) need CUDA; on CPU its validation refuses them.
    """
    from veomni.arguments.arguments_types import OpsImplementationConfig

    fields = {f.name: "eager" for f in dataclasses.fields(OpsImplementationConfig)}
    fields.update(attn_implementation=attn_implementation, qat_implementation="none")
    return OpsImplementationConfig(**fields)
