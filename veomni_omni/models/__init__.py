"""Replacements for HF Qwen3-Omni-MoE functions, in data order: encoders → fill-back → decoder."""
