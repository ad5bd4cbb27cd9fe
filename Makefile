VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2

.PHONY: setup train lora speech test diffs

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) test
	touch $@

setup: $(VENV)/.installed

## The main job: VeOmni's VLMTrainer on recipes/tiny_cpu.yaml, $(NPROC) ranks (CPU: FSDP2 x EP 2); ARGS="--train.max_steps 200 ..." overrides.
train: setup
	OMP_NUM_THREADS=1 VEOMNI_VERBOSITY=warning $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m veomni_omni.train recipes/tiny_cpu.yaml $(ARGS)

## The LoRA demo: the main job's checkpoint learns a new task with adapters only (runs the main job first if its checkpoint is missing).
MAIN_CKPT := runs/tiny_cpu/checkpoints/global_step_600/hf_ckpt
lora: setup
	test -f $(MAIN_CKPT)/config.json || $(MAKE) train
	OMP_NUM_THREADS=1 VEOMNI_VERBOSITY=warning $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m veomni_omni.train recipes/tiny_cpu_lora.yaml $(ARGS)

## The speech demo: the main job's checkpoint learns to speak its answers (talker training; runs the main job first if its checkpoint is missing).
speech: setup
	test -f $(MAIN_CKPT)/config.json || $(MAKE) train
	OMP_NUM_THREADS=1 VEOMNI_VERBOSITY=warning $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m veomni_omni.train recipes/tiny_cpu_speech.yaml $(ARGS)

## The test suite (what CI runs).
test: setup
	$(PY) -m pytest -q tests

## Regenerate patches/*.diff from the code.
diffs: setup
	$(PY) -m veomni_omni diffs --write
