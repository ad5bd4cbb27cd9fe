# VeOmni's own tasks/train_vlm.py (v0.1.12), with the one line veomni_omni asks of its users added on top.
import veomni_omni  # noqa: F401  (patches transformers' Qwen3-Omni-MoE and registers it with VeOmni)
from veomni.arguments import parse_args
from veomni.trainer.vlm_trainer import VeOmniVLMArguments, VLMTrainer


if __name__ == "__main__":
    args = parse_args(VeOmniVLMArguments)
    trainer = VLMTrainer(args)
    trainer.train()
