"""Training entry. Until the torchrun recipe entry lands, this runs a tiny single-process
training run: a tiny thinker built through VeOmni's builder (so through our registry entries),
trained on a fixed mixed-modality batch; the loss must fall."""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    import veomni_omni  # noqa: F401  (applies the patch set, registers with VeOmni)
    from veomni.models import build_foundation_model

    from veomni_omni.host import eager_ops_config
    from veomni_omni.testing import build_batch, tiny_thinker_config

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as config_dir:
        tiny_thinker_config().save_pretrained(config_dir)
        model = build_foundation_model(
            config_dir, init_device="cpu", torch_dtype="float32", ops_implementation=eager_ops_config()
        )
    batch = build_batch(
        [
            [("prompt", 4), ("image", 1, 4, 4), ("text", 8)],
            [("prompt", 3), ("audio", 150), ("text", 8)],
            [("prompt", 2), ("audio_in_video", 2, 4, 4, 120), ("text", 6)],
            [("prompt", 2), ("video", 2, 4, 4), ("text", 6)],
        ]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    start, losses = time.time(), []
    model.train()
    for step in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    result = {"steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1], "wall_s": round(time.time() - start, 2)}
    print(json.dumps(result))
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
