"""The whole patch set, on one screen. Each entry: target, fingerprint of the HF source it
replaces (None: an addition), why, and the test that proves it. Diffs: patches/<name>.diff."""

from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from veomni.arguments import parser as veomni_parser

from . import config_keys
from .checkpoint import veomni_io
from .models import init, moe, sequence_parallel, thinker
from .parallel import plan
from .models import packed_attention
from .patching import Patch

PATCHES = (
    Patch(
        name="thinker_model_forward",
        owner=hf.Qwen3OmniMoeThinkerModel,
        attr="forward",
        replacement=thinker.thinker_model_forward,
        fingerprint="0566724751925bec",
        why="one ViT pass for images and videos, all placeholder counts checked, encoder outputs filled back in one place",
        test="tests/test_single_process_parity.py",
    ),
    Patch(
        name="thinker_placeholder_mask",
        owner=hf.Qwen3OmniMoeThinkerModel,
        attr="get_placeholder_mask",
        replacement=thinker.placeholder_mask,
        fingerprint="500be932655fd0db",
        why="HF checks image and video placeholder counts but never audio",
        test="tests/test_single_process_parity.py::test_audio_placeholder_mismatch_raises",
    ),
    Patch(
        name="vision_attention_forward",
        owner=hf.Qwen3OmniMoeVisionAttention,
        attr="forward",
        replacement=sequence_parallel.vision_attention_forward,
        fingerprint="a125083356db88e3",
        why="under Ulysses SP each rank holds a slice of the patch sequence: attention gathers it, scattering heads",
        test="tests/test_sequence_parallel.py",
    ),
    Patch(
        name="deepstack_process",
        owner=hf.Qwen3OmniMoeThinkerTextModel,
        attr="_deepstack_process",
        replacement=sequence_parallel.deepstack_process,
        fingerprint="eba318904730815e",
        why="under SP the visual positions arrive as indices: an index add, no boolean-mask host sync",
        test="tests/test_sequence_parallel.py",
    ),
    Patch(
        name="thinker_causal_lm_forward",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="forward",
        replacement=thinker.thinker_causal_lm_forward,
        fingerprint="350f919953506ba8",
        why="VeOmni's builder swaps in a (loss, logits, aux) loss with a fused lm_head; HF's forward breaks on it",
        test="tests/test_registry.py::test_forward_under_veomni_loss_matches_hf",
    ),
    Patch(
        name="init_weights",
        owner=hf.Qwen3OmniMoePreTrainedModel,
        attr="_init_weights",
        replacement=init.init_weights,
        fingerprint="c362a0b49cb16902",
        why="HF 5.22 leaves the talker's MoE experts (torch.empty) and router (zeros) uninitialised",
        test="tests/test_registry.py::test_veomni_builder_initialises_moe_weights",
    ),
    Patch(
        name="text_init_weights",
        owner=hf.Qwen3OmniMoeThinkerTextPreTrainedModel,
        attr="_init_weights",
        replacement=init.init_weights,
        fingerprint="e24e9b47be8e8a9f",
        why="same gap when a talker is built on its own (it inherits the thinker-text init)",
        test="tests/test_registry.py::test_standalone_talker_is_initialised",
    ),
    Patch(
        name="omni_forward",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="forward",
        replacement=thinker.omni_forward,
        fingerprint=None,
        why="HF's top-level model has generate but no forward; training runs the thinker",
        test="tests/test_registry.py::test_top_level_forward_is_thinker",
    ),
    Patch(
        name="thinker_experts_forward",
        owner=hf.Qwen3OmniMoeThinkerTextExperts,
        attr="forward",
        replacement=moe.experts_forward,
        fingerprint="fc9abf5b6fd11894",
        why="expert parallelism: token all-to-all to the experts' owners (torch-native, gloo/NCCL) or VeOmni's fused kernel; HF's own implementations when experts are whole; expert-load counts",
        test="tests/test_expert_parallel.py",
    ),
    Patch(
        name="thinker_parallel_plan",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="get_parallel_plan",
        replacement=plan.thinker_parallel_plan,
        fingerprint=None,
        why="VeOmni shards experts by the model's plan; HF has none (VeOmni's own names the 5.9 layout)",
        test="tests/test_expert_parallel.py",
    ),
    Patch(
        name="omni_parallel_plan",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="get_parallel_plan",
        replacement=plan.omni_parallel_plan,
        fingerprint=None,
        why="the same plan for the top-level model, whose thinker sits under `thinker.`",
        test="tests/test_expert_parallel.py (omni cases)",
    ),
    Patch(
        name="text_model_parallel_plan",
        owner=hf.Qwen3OmniMoeThinkerTextModel,
        attr="get_parallel_plan",
        replacement=plan.text_model_parallel_plan,
        fingerprint=None,
        why="the same plan for the thinker's text decoder built on its own (registry: ThinkerTextModel)",
        test="tests/test_moe.py::test_plans_name_exactly_the_thinker_experts",
    ),
    Patch(
        name="config_unknown_keys",
        owner=veomni_parser,
        attr="_instantiate_recursive",
        replacement=config_keys.instantiate_checked,
        fingerprint="1af38c4f756de986",
        why="VeOmni's parse_args drops YAML keys no arguments field declares (a typo trains on defaults); they fail, naming the closest spelling",
        test="tests/test_config_keys.py",
    ),
    Patch(
        name="packed_attention",
        owner=packed_attention.AttentionInterface,
        attr="get_interface",
        replacement=packed_attention.get_interface,
        fingerprint="5c12a08a6f62f3b6",
        why="VeOmni packs a micro batch into one row (all-ones mask + flash-attn's cu_seq_lens_*), which sdpa and eager ignore: "
        "packed samples attended to each other. Where attention implementations are resolved, 'sdpa' becomes per-segment "
        "causal sdpa when a row holds several samples (HF's own otherwise) and 'eager' refuses such a row",
        test="tests/test_packing.py",
    ),
    Patch(
        name="omni_checkpoint_converter",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="_create_checkpoint_tensor_converter",
        replacement=staticmethod(veomni_io.create_checkpoint_converter),
        fingerprint=None,
        why="VeOmni's loader reads released checkpoints only through a model's converter; without one 1 of 204 thinker keys matched and the rest were randomly initialised. Missing/unexpected keys raise",
        test="tests/test_checkpoint_veomni.py",
    ),
    Patch(
        name="thinker_checkpoint_converter",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="_create_checkpoint_tensor_converter",
        replacement=staticmethod(veomni_io.create_checkpoint_converter),
        fingerprint=None,
        why="the same for a thinker trained alone (reads the `thinker.` keys, drops talker/code2wav)",
        test="tests/test_checkpoint_veomni.py",
    ),
    Patch(
        name=veomni_io.HF_EXPORT_PATCH,
        owner=veomni_io.HuggingfaceCkptCallback,
        attr="_save_checkpoint",
        replacement=veomni_io.hf_ckpt_callback_save,
        fingerprint="c821088c5933931a",
        why="VeOmni's HF export consolidates DCP on torch 2.9-2.11 only and writes 5.22's fused names; ours keeps its DCP save of the step and writes the released layout from the live model (other models: VeOmni's)",
        test="tests/test_checkpoint_veomni.py",
    ),
)
