"""The whole patch set: every runtime change veomni_omni makes to transformers and VeOmni, in groups.
Each entry: target (an attribute of a transformers/VeOmni class or module, or a key of a VeOmni
registry), fingerprint of what it replaces (None: an addition), why, and the test that proves it.
Diffs: patches/<name>.diff."""

from transformers import processing_utils
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf
from transformers.video_processing_utils import VideoProcessorMixin
from veomni.arguments import parser as veomni_parser
from veomni.data import data_transform as veomni_data_transform
from veomni.distributed import torch_compile as veomni_torch_compile
from veomni.distributed import torch_parallelize as veomni_parallelize
from veomni.lora import moe_layers as veomni_moe_lora
from veomni.models import loader as veomni_loader
from veomni.trainer import base as veomni_trainer_base
from veomni.trainer import vlm_trainer as veomni_vlm_trainer
from veomni.utils import device as veomni_device
from veomni.utils import helper as veomni_helper
from veomni.utils import loss_utils as veomni_loss_utils

from .checkpoint import veomni_io, veomni_resume
from .data import video_processor
from .data.veomni_transform import transform_sample
from .integration import compile_checks, config_keys, cpu_distributed, registry, speech_training, trainer_hooks
from .models import audio_tower, init, kernels, moe, packed_attention, thinker
from .parallel import lora as parallel_lora
from .parallel import plan, sequence_parallel
from .patching import Patch, RegistryEntry

# ------------------------------------------------------------ the model's classes and VeOmni's trainer
MODEL_AND_TRAINER = (
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
        why="HF's top-level model has generate but no forward; training runs the thinker, and the talker on speech targets",
        test="tests/test_registry.py::test_top_level_forward_is_thinker",
    ),
    Patch(
        name="omni_position_id_func",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="get_position_id_func",
        replacement=trainer_hooks.get_position_id_func,
        fingerprint=None,
        why="VeOmni's VLMTrainer hands the model's M-RoPE position function to the data transform",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name="thinker_position_id_func",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="get_position_id_func",
        replacement=trainer_hooks.get_position_id_func,
        fingerprint=None,
        why="the same for a thinker-only checkpoint",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name="omni_extra_collate_infos",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="get_extra_collate_infos",
        replacement=trainer_hooks.get_extra_collate_infos,
        fingerprint=None,
        why="VeOmni's packing collator concatenates the flat audio features by these rules",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name="thinker_extra_collate_infos",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="get_extra_collate_infos",
        replacement=trainer_hooks.get_extra_collate_infos,
        fingerprint=None,
        why="the same for a thinker-only checkpoint",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name="omni_metadata_collate_func",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="get_metadata_collate_func",
        replacement=trainer_hooks.get_metadata_collate_func,
        fingerprint=None,
        why="under Ulysses SP VeOmni's SP collator calls this hook last: it turns the collated batch into our SP shard "
        "(joint image+video patch slice, audio windows, fill-back positions); VeOmni's own slicing cut the audio and pixels apart",
        test="tests/test_veomni_trainer_parity.py (sp layouts)",
    ),
    Patch(
        name="thinker_metadata_collate_func",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="get_metadata_collate_func",
        replacement=trainer_hooks.get_metadata_collate_func,
        fingerprint=None,
        why="the same for a thinker-only checkpoint",
        test="tests/test_veomni_trainer_parity.py (sp layouts)",
    ),
    Patch(
        name="thinker_visual",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="visual",
        replacement=trainer_hooks.thinker_visual,
        fingerprint=None,
        why="VLMTrainer freezes `thinker.visual` (5.9 layout); 5.22 keeps it at `thinker.model.visual`",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name="thinker_audio_tower",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="audio_tower",
        replacement=trainer_hooks.thinker_audio_tower,
        fingerprint=None,
        why="VLMTrainer freezes `thinker.audio_tower` (5.9 layout); 5.22 keeps it at `thinker.model.audio_tower`",
        test="tests/test_veomni_trainer.py",
    ),
    Patch(
        name=moe.EXPERTS_FORWARD_PATCH,
        owner=hf.Qwen3OmniMoeThinkerTextExperts,
        attr="forward",
        replacement=moe.experts_forward,
        fingerprint="fc9abf5b6fd11894",
        why="expert parallelism: token all-to-all to the experts' owners (torch-native, gloo/NCCL) or VeOmni's fused kernel; HF's own implementations when experts are whole; expert-load counts",
        test="tests/test_expert_parallel.py",
    ),
    Patch(
        name=moe.TALKER_EXPERTS_FORWARD_PATCH,
        owner=hf.Qwen3OmniMoeTalkerTextExperts,
        attr="forward",
        replacement=moe.experts_forward,
        fingerprint="fc9abf5b6fd11894",
        why="the talker's experts (the same code) trained under the same expert parallelism",
        test="tests/test_talker.py",
    ),
    Patch(
        name="omni_fsdp_units",
        owner=hf.Qwen3OmniMoePreTrainedModel,
        attr="_no_split_modules",
        replacement=plan.OMNI_FSDP_UNITS,
        fingerprint="a196bb1ec5c64cf2",
        why="talker training uses the code predictor's embeddings and heads outside its forward: its layers are the FSDP units",
        test="tests/test_talker.py",
    ),
    Patch(
        name=speech_training.FREEZE_PATCH,
        owner=veomni_vlm_trainer.VLMTrainer,
        attr="_freeze_model_module",
        replacement=speech_training.freeze_model_module,
        fingerprint="855d256318d5ac03",
        why="VLMTrainer always disables the talker: model.model_config.train_talker keeps it (thinker frozen unless train_thinker); "
        "unknown model_config keys, which HF drops, are refused",
        test="tests/test_talker_veomni.py",
    ),
    Patch(
        name=speech_training.COUNT_PATCH,
        owner=veomni_vlm_trainer,
        attr="count_loss_token",
        replacement=speech_training.count_loss_tokens,
        fingerprint="97e6a101fea8533b",
        why="over a step's micro batches VLMTrainer keeps the last one's count of each <name>_labels (talker losses) instead of the sum",
        test="tests/test_talker_veomni.py",
    ),
    Patch(
        name="count_loss_token_base",
        owner=veomni_trainer_base,
        attr="count_loss_token",
        replacement=speech_training.count_loss_tokens,
        fingerprint="97e6a101fea8533b",
        why="the same where BaseTrainer's step imported it by name",
        test="tests/test_talker_veomni.py",
    ),
    Patch(
        name="count_loss_token_defined",
        owner=veomni_loss_utils,
        attr="count_loss_token",
        replacement=speech_training.count_loss_tokens,
        fingerprint="97e6a101fea8533b",
        why="the same where VeOmni defines it, for callers that import it later",
        test="tests/test_talker_veomni.py",
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
        why="the same plan for the top-level model: the thinker's experts under `thinker.`, the talker's under `talker.`",
        test="tests/test_expert_parallel.py (omni cases)",
    ),
    Patch(
        name="text_model_parallel_plan",
        owner=hf.Qwen3OmniMoeThinkerTextModel,
        attr="get_parallel_plan",
        replacement=plan.text_model_parallel_plan,
        fingerprint=None,
        why="the same plan for the thinker's text decoder built on its own (registry: ThinkerTextModel)",
        test="tests/test_moe.py::test_plans_name_exactly_the_experts",
    ),
    Patch(
        name=config_keys.UNKNOWN_KEYS_PATCH,
        owner=veomni_parser,
        attr="_instantiate_recursive",
        replacement=config_keys.instantiate_checked,
        fingerprint="1af38c4f756de986",
        why="VeOmni's parse_args drops YAML keys no arguments field declares (a typo trains on defaults); they fail, naming the closest spelling",
        test="tests/test_config_keys.py",
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
        name="omni_lora_targets",
        owner=hf.Qwen3OmniMoeForConditionalGeneration,
        attr="_convert_lora_targets_to_parameters",
        replacement=staticmethod(trainer_hooks.lora_targets_to_parameters),
        fingerprint=None,
        why="VeOmni's LoRA set-up maps gate/up/down_proj onto fused experts only through this hook: without it they matched nothing and the experts "
        "trained no adapters, silently; unmatched names raise",
        test="tests/test_lora.py",
    ),
    Patch(
        name="thinker_lora_targets",
        owner=hf.Qwen3OmniMoeThinkerForConditionalGeneration,
        attr="_convert_lora_targets_to_parameters",
        replacement=staticmethod(trainer_hooks.lora_targets_to_parameters),
        fingerprint=None,
        why="the same for the thinker trained on its own",
        test="tests/test_lora.py",
    ),
    Patch(
        name=parallel_lora.PARAM_DTYPE_PATCH,
        owner=veomni_parallelize,
        attr="parallelize_model_fsdp2",
        replacement=parallel_lora.parallelize_model_fsdp2,
        fingerprint="2264a065ce4b19a2",
        why="VeOmni holds a LoRA model's frozen base in fp32 under mixed precision (cast to param_dtype at every all-gather); "
        "held in param_dtype the forward is bit-identical and the base takes half the memory",
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
    Patch(
        name=veomni_io.LORA_EXPORT_PATCH,
        owner=veomni_io.HFLoraCkptCallback,
        attr="_save_checkpoint",
        replacement=veomni_io.hf_ckpt_callback_save,
        fingerprint="fbc2159165ca0e90",
        why="VeOmni's LoRA export writes fused expert adapters in bf16 under 5.22's names; ours writes the merged model in the released layout "
        "(hf_ckpt) and fp32 PEFT adapters under the released per-expert names (lora_adapter) beside it (other models: VeOmni's)",
        test="tests/test_veomni_trainer_parity.py",
    ),
    Patch(
        name=packed_attention.PACKED_ATTENTION_PATCH,
        owner=packed_attention.AttentionInterface,
        attr="get_interface",
        replacement=packed_attention.get_interface,
        fingerprint="5c12a08a6f62f3b6",
        why="VeOmni packs a micro batch into one row (all-ones mask + flash-attn's cu_seq_lens_*), which sdpa and eager ignore: "
        "packed samples attended to each other. Where attention implementations are resolved, 'sdpa' becomes per-segment "
        "causal sdpa when a row holds several samples (HF's own otherwise) and 'eager' refuses such a row; under Ulysses SP "
        "'sdpa' in the text decoder is the Ulysses varlen sdpa, 'eager' is refused there, VeOmni's *_with_sp kernels skip Ulysses elsewhere",
        test="tests/test_packing.py",
    ),
    Patch(
        name=veomni_resume.ATOMIC_SAVE_PATCH,
        owner=veomni_resume.dcp_checkpointer.DistributedCheckpointer,
        attr="save",
        replacement=classmethod(veomni_resume.atomic_dcp_save),
        fingerprint="895f7a325ec3c679",
        why="VeOmni's DCP save writes into global_step_N in place: re-saving a step over a complete checkpoint and killed part way, "
        "it left the old .metadata over mixed files, which load_path=auto resumed from. Written to .global_step_N.tmp, published in one rename",
        test="tests/test_veomni_resume.py",
    ),
    Patch(
        name=veomni_resume.COMPLETE_ONLY_PATCH,
        owner=veomni_resume.checkpoint_utils,
        attr="_validate_dcp_checkpoint_entry",
        replacement=veomni_resume.complete_checkpoint_step,
        fingerprint="4f8d98f2924e531a",
        why="load_path=auto took the newest global_step_N with a .metadata file, even with a data or extra-state file missing or "
        "truncated (every torchrun restart then failed loading it); such a checkpoint is skipped, the previous complete one resumed",
        test="tests/test_veomni_resume.py",
    ),
    Patch(
        name=veomni_resume.DATA_POSITION_PATCH,
        owner=veomni_resume.DynamicBatchSizeDataLoader,
        attr="state_dict",
        replacement=veomni_resume.dynamic_batching_state_dict,
        fingerprint="603cf6e8fd1d7ebf",
        why="VeOmni's dynamic-batching loader saved one batch fewer than it had handed out (its counter moves on the next request): "
        "a resume built its first batch with the previous step's token budget and ended the epoch a batch late",
        test="tests/test_veomni_resume.py",
    ),
    Patch(
        name="audio_encoder_forward",
        owner=hf.Qwen3OmniMoeAudioEncoder,
        attr="forward",
        replacement=audio_tower.audio_encoder_forward,
        fingerprint="1605548595ae4fba",
        why="HF pads every chunk of a call to the longest one and its padded stride-2 convs carry that padding into a shorter "
        "chunk's last frames: a clip shorter than one chunk encoded differently next to others (packed micro batches). "
        "Each chunk is zero-padded at the width HF gives it when its clip is encoded alone",
        test="tests/test_audio_tower.py",
    ),
    Patch(
        name=kernels.RMS_NORM_PATCH,
        owner=hf.Qwen3OmniMoeThinkerTextRMSNorm,
        attr="forward",
        replacement=kernels.rms_norm_forward,
        fingerprint="d676bfe9af0e524d",
        why="VeOmni's rms_norm_implementation (Liger RMSNorm) reached only its generated models' OpSlots; here it runs the kernel VeOmni resolves",
        test="tests/test_kernels.py",
    ),
    Patch(
        name="text_final_rms_norm_forward",
        owner=hf.Qwen3OmniMoeTextRMSNorm,
        attr="forward",
        replacement=kernels.rms_norm_forward,
        fingerprint="d676bfe9af0e524d",
        why="the same for the text decoder's final norm (its own class, same code)",
        test="tests/test_kernels.py",
    ),
    Patch(
        name=kernels.ROTARY_PATCH,
        owner=hf,
        attr="apply_rotary_pos_emb",
        replacement=kernels.apply_rotary_pos_emb,
        fingerprint="ea234325c15de475",
        why="VeOmni's rotary_pos_emb_implementation (Liger RoPE, M-RoPE cos/sin included) was ignored on the HF text attention",
        test="tests/test_kernels.py",
    ),
    Patch(
        name=kernels.MLP_PATCH,
        owner=hf.Qwen3OmniMoeThinkerTextMLP,
        attr="forward",
        replacement=kernels.text_mlp_forward,
        fingerprint="b4e9c2637c7f1172",
        why="VeOmni's swiglu_mlp_implementation (Liger SwiGLU) was ignored on the dense text MLP (layers in mlp_only_layers)",
        test="tests/test_kernels.py",
    ),
    Patch(
        name=kernels.VISION_ROTARY_PATCH,
        owner=hf,
        attr="apply_rotary_pos_emb_vision",
        replacement=kernels.apply_rotary_pos_emb_vision,
        fingerprint="961a1862d6808a5c",
        why="VeOmni's rotary_pos_emb_vision_implementation (its NPU kernel, the NPU default) was ignored on the ViT attention",
        test="tests/test_kernels.py",
    ),
    Patch(
        name=compile_checks.MODEL_CHECK_PATCH,
        owner=veomni_torch_compile,
        attr="validate_compile_model",
        replacement=compile_checks.validate_compile_model,
        fingerprint="b7208688662c6f94",
        why="train.torch_compile refused every multimodal model but dense Qwen3-VL; Qwen3-Omni's thinker decoder layers compile "
        "whole (fullgraph) under the same contracts, plus output_router_logits off under fullgraph (HF's capture hooks)",
        test="tests/test_compile.py",
    ),
    Patch(
        name="trainer_compile_model_check",
        owner=veomni_vlm_trainer,
        attr="validate_compile_model",
        replacement=compile_checks.validate_compile_model,
        fingerprint="b7208688662c6f94",
        why="the same check where VLMTrainer calls it (imported by name) before building anything",
        test="tests/test_compile.py",
    ),
    Patch(
        name=compile_checks.RUNTIME_CHECK_PATCH,
        owner=veomni_vlm_trainer,
        attr="validate_compile_runtime",
        replacement=compile_checks.validate_compile_runtime,
        fingerprint="f2ccbec0fa8a7a63",
        why="train.torch_compile refused every device but CUDA; on CPU the decoder layers compile too (FSDP2, no EP, no CUDA graphs kept)",
        test="tests/test_compile.py",
    ),
    Patch(
        name="parallelize_compile_runtime_check",
        owner=veomni_parallelize,
        attr="validate_compile_runtime",
        replacement=compile_checks.validate_compile_runtime,
        fingerprint="f2ccbec0fa8a7a63",
        why="the same check where VeOmni's FSDP2 wrapping calls it (imported by name) before compiling the blocks",
        test="tests/test_compile.py",
    ),
    Patch(
        name=moe.LORA_INDEPENDENT_FORWARD_PATCH,
        owner=veomni_moe_lora.LoraIndependentExperts,
        attr="forward",
        replacement=moe.lora_experts_forward,
        fingerprint="638558e649104433",
        why="expert LoRA under EP on the torch path (VeOmni's eager forward raises under EP): our token dispatch, "
        "the wrapper's base + adapter computation on the local experts; expert-load counts",
        test="tests/test_veomni_trainer_parity.py",
    ),
    Patch(
        name=moe.LORA_SHARED_FORWARD_PATCH,
        owner=veomni_moe_lora.LoraSharedExperts,
        attr="forward",
        replacement=moe.lora_experts_forward,
        fingerprint="53b2da88127e2f2f",
        why="the same for VeOmni's shared (one adapter per layer) expert LoRA",
        test="tests/test_veomni_trainer_parity.py",
    ),
)


# ------------------------------------------------------------ VeOmni's registries
# VeOmni builds a qwen3_omni_moe config, model, processor and data transform through these keys; its own
# entries give its generated copy of transformers 5.9's modeling, which on 5.22 leaves MoE weights at zero.
REGISTRIES = (
    RegistryEntry(
        name="registry_omni_config",
        module=veomni_loader,
        registry="MODEL_CONFIG_REGISTRY",
        key="qwen3_omni_moe",
        replacement=registry.omni_config_class,
        fingerprint="cc3cfee9f351699c",
        why="VeOmni's config class is its 5.9 copy; the model classes below need transformers' own",
        test="tests/test_registry.py::test_registries_resolve_to_veomni_omni",
    ),
    RegistryEntry(
        name="registry_thinker_config",
        module=veomni_loader,
        registry="MODEL_CONFIG_REGISTRY",
        key="qwen3_omni_moe_thinker",
        replacement=registry.thinker_config_class,
        fingerprint=None,
        why="a thinker-only checkpoint (model_type qwen3_omni_moe_thinker) had no entry",
        test="tests/test_registry.py::test_registries_resolve_to_veomni_omni",
    ),
    RegistryEntry(
        name="registry_omni_modeling",
        module=veomni_loader,
        registry="MODELING_REGISTRY",
        key="qwen3_omni_moe",
        replacement=registry.model_class,
        fingerprint="fbed658f4810d9fe",
        why="VeOmni's generated 5.9 modeling leaves MoE expert and router weights at zero on 5.22; the patched HF classes by architecture",
        test="tests/test_registry.py::test_veomni_builder_initialises_moe_weights",
    ),
    RegistryEntry(
        name="registry_thinker_modeling",
        module=veomni_loader,
        registry="MODELING_REGISTRY",
        key="qwen3_omni_moe_thinker",
        replacement=registry.thinker_model_class,
        fingerprint=None,
        why="the thinker (or its text decoder) for a thinker-only config",
        test="tests/test_registry.py::test_registries_resolve_to_veomni_omni",
    ),
    RegistryEntry(
        name="registry_processor",
        module=veomni_loader,
        registry="MODEL_PROCESSOR_REGISTRY",
        key="Qwen3OmniMoeProcessor",
        replacement=registry.processor_class,
        fingerprint="556ee3d8fa558c72",
        why="transformers' processor, whose sub-processors the model's placeholder counts are checked against",
        test="tests/test_registry.py::test_registries_resolve_to_veomni_omni",
    ),
    RegistryEntry(
        name="registry_omni_transform",
        module=veomni_data_transform,
        registry="DATA_TRANSFORM_REGISTRY",
        key="qwen3_omni_moe",
        replacement=transform_sample,
        fingerprint="4fca17cb27fd8284",
        why="VLMTrainer builds its data transform by model_type; ours gives exactly the HF processor's inputs and the patched model's positions",
        test="tests/test_veomni_trainer.py",
    ),
    RegistryEntry(
        name="registry_thinker_transform",
        module=veomni_data_transform,
        registry="DATA_TRANSFORM_REGISTRY",
        key="qwen3_omni_moe_thinker",
        replacement=transform_sample,
        fingerprint=None,
        why="the same for a thinker-only config",
        test="tests/test_veomni_trainer.py",
    ),
)

# ------------------------------------------------------------ a video processor without torchvision
# transformers 5.22 cannot build or load a processor with a video processor where torchvision is missing
# (veomni_omni/data/video_processor.py: the two gaps); ours is torchvision-free.
VIDEO_PROCESSOR = (
    Patch(
        name="video_processor_mixin_export",
        owner=processing_utils.transformers_module,  # the `transformers` ProcessorMixin looks names up on
        attr="VideoProcessorMixin",
        replacement=VideoProcessorMixin,
        fingerprint=None,
        only_if=video_processor.without_torchvision,
        why="ProcessorMixin type-checks a video_processor against transformers.VideoProcessorMixin, exported only with torchvision: "
        "no processor with a video processor could be built",
        test="tests/test_data_processor.py::test_loading_needs_the_registration_hook_without_torchvision",
    ),
    Patch(
        name=video_processor.VIDEO_LOADER_PATCH,
        owner=processing_utils._LazyAutoProcessorMapping,
        attr="_MAPPING_NAMES",
        replacement=video_processor.AUTO_LOADERS,
        fingerprint="3cc52a49db04309f",
        why="ProcessorMixin.from_pretrained loads a video_processor with AutoVideoProcessor, a placeholder without torchvision; "
        "ours loads our class and stands in for Qwen2VLVideoProcessor, handing every other class to AutoVideoProcessor",
        test="tests/test_data_processor.py::test_loading_needs_the_registration_hook_without_torchvision",
    ),
)

# ------------------------------------------------------------ VeOmni on CPU
# VeOmni's distributed set-up refuses CPU (veomni_omni/integration/cpu_distributed.py); on other devices the replacements defer
# to VeOmni's own. Set where VeOmni defines them and in each module that imports them by name (the CUDA-kernel
# modules under veomni.ops.kernels excepted: they never load on CPU).
CPU_HOST = (
    Patch(
        name=cpu_distributed.TORCH_DEVICE_PATCH,
        owner=veomni_device,
        attr="get_torch_device",
        replacement=cpu_distributed.get_torch_device,
        fingerprint="087ffe45d64f9fd8",
        why="on CPU VeOmni's device module is torch.cpu, which lacks the memory API its meters and trainer call",
        test="tests/test_cpu_distributed.py",
    ),
    Patch(
        name=cpu_distributed.COMM_BACKEND_PATCH,
        owner=veomni_device,
        attr="get_dist_comm_backend",
        replacement=cpu_distributed.get_dist_comm_backend,
        fingerprint="f265cadbf291333b",
        why="on CPU VeOmni found no process-group backend and raised; gloo",
        test="tests/test_cpu_distributed.py",
    ),
    Patch(
        name="cpu_torch_device_helper",
        owner=veomni_helper,
        attr="get_torch_device",
        replacement=cpu_distributed.get_torch_device,
        fingerprint="087ffe45d64f9fd8",
        why="the same where VeOmni's helpers (meters, seeding, cache emptying) imported it by name",
        test="tests/test_cpu_distributed.py",
    ),
    Patch(
        name="cpu_torch_device_trainer",
        owner=veomni_trainer_base,
        attr="get_torch_device",
        replacement=cpu_distributed.get_torch_device,
        fingerprint="087ffe45d64f9fd8",
        why="the same where VeOmni's trainer imported it by name",
        test="tests/test_cpu_distributed.py",
    ),
    Patch(
        name="cpu_comm_backend_trainer",
        owner=veomni_trainer_base,
        attr="get_dist_comm_backend",
        replacement=cpu_distributed.get_dist_comm_backend,
        fingerprint="f265cadbf291333b",
        why="the same where VeOmni's trainer (process-group set-up) imported it by name",
        test="tests/test_cpu_distributed.py",
    ),
)

PATCHES = MODEL_AND_TRAINER + REGISTRIES + VIDEO_PROCESSOR + CPU_HOST
_BY_NAME = {patch.name: patch for patch in PATCHES}


def original(patch_name: str):
    """The upstream value the named entry replaces (whether or not the set is applied now), for
    replacements that hand some cases back to it."""
    return _BY_NAME[patch_name].original()
