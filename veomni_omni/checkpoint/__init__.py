"""Checkpoint IO: released HF checkpoints in and out without conversion, and resumable training.

    load_hf_checkpoint(model, path)            released layout -> the (FSDP2/EP/SP-sharded) model
    save_hf_checkpoint(model, path, source=)   the model -> released layout, atomically
    save_resume_state(root, step, ...)         DCP: model, optimizer, scheduler, data position, RNG
    latest_resume_checkpoint(root)             newest complete one (or None)
    load_resume_state(path, model, ...)        -> ResumeState(step, data_state)

Through VeOmni's own machinery (veomni_io.py; installed by the patch set):
    ReleasedLayoutConverter                    VeOmni's checkpoint-tensor converter: released keys -> parameters
    export_hf_checkpoint(trainer, step)        the trainer's model -> <save_path>/global_step_N/hf_ckpt, released layout
"""

from .hf import checkpoint_nbytes, load_hf_checkpoint, save_hf_checkpoint
from .resume import ResumeState, latest_resume_checkpoint, load_resume_state, save_resume_state
from .safetensors_io import CheckpointError
from .veomni_io import ReleasedLayoutConverter, export_hf_checkpoint

__all__ = [
    "CheckpointError",
    "ReleasedLayoutConverter",
    "ResumeState",
    "checkpoint_nbytes",
    "export_hf_checkpoint",
    "latest_resume_checkpoint",
    "load_hf_checkpoint",
    "load_resume_state",
    "save_hf_checkpoint",
    "save_resume_state",
]
