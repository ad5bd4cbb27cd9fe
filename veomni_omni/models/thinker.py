"""Thinker forward: embeddings → encoders → fill-back of encoder outputs → text decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling, MoeModelOutputWithPast
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_modeling
from transformers.utils import can_return_tuple

from ..data.checks import IGNORE_INDEX
from ..parallel.sequence_parallel import sequence_parallel_forward
from .talker import speech_training_forward
from .encoders import dummy_audio_forward, dummy_vision_forward, encode_audio, encode_vision, encoders_must_run

if TYPE_CHECKING:
    from ..data.sequence_parallel import SequenceParallelShard


def placeholder_mask(
    thinker_model,
    input_ids: Optional[torch.LongTensor],
    inputs_embeds: torch.Tensor,
    image_features: Optional[torch.Tensor] = None,
    video_features: Optional[torch.Tensor] = None,
    audio_features: Optional[torch.Tensor] = None,
):
    """The masks of HF's `get_placeholder_mask`, (B, S, 1) each, with the token/feature count checked for
    every modality given features (HF's never checks audio, so a mismatch scattered garbage)."""
    config = thinker_model.config
    token_ids = {"image": config.image_token_id, "video": config.video_token_id, "audio": config.audio_token_id}
    features = {"image": image_features, "video": video_features, "audio": audio_features}
    masks = []
    for modality, token_id in token_ids.items():
        if input_ids is None:
            token_embed = thinker_model.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == token_embed).all(-1)
        else:
            mask = input_ids == token_id
        if features[modality] is not None:
            n_tokens, n_features = int(mask.sum()), features[modality].shape[0]
            if n_tokens != n_features:
                raise ValueError(
                    f"{modality.capitalize()} features and {modality} tokens do not match: "
                    f"{n_tokens} {modality} placeholder tokens in input_ids, {n_features} {modality} encoder outputs."
                )
        masks.append(mask.unsqueeze(-1).to(inputs_embeds.device))
    return tuple(masks)


def _visual_order(image_mask: Optional[torch.Tensor], video_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Index into cat(image_rows, video_rows) giving the rows in sequence order of all visual tokens."""
    visual = image_mask | video_mask
    is_image = image_mask[visual]
    image_rank = is_image.cumsum(0) - 1
    video_rank = (~is_image).cumsum(0) - 1 + is_image.sum()
    return torch.where(is_image, image_rank, video_rank)


def _join_visual(vision, image_mask, video_mask):
    """Merge image and video rows into one sequence-ordered tensor per deepstack level + main output."""
    pooled = (vision.image_embeds, vision.video_embeds)
    if vision.image_embeds is None or vision.video_embeds is None:
        mask = image_mask if vision.video_embeds is None else video_mask
        pick = 0 if vision.video_embeds is None else 1
        return mask, pooled[pick], [level[pick] for level in vision.deepstack]
    order = _visual_order(image_mask, video_mask)
    joint = [torch.cat(pair, dim=0)[order] for pair in [pooled, *vision.deepstack]]
    return image_mask | video_mask, joint[0], joint[1:]


@can_return_tuple
def thinker_model_forward(
    self,
    input_ids=None,
    input_features=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    feature_attention_mask=None,
    audio_feature_lengths=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    use_cache=None,
    output_router_logits: Optional[bool] = None,
    use_audio_in_video=None,
    video_second_per_grid=None,
    mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
    **kwargs,
) -> tuple | MoeModelOutputWithPast:
    if output_router_logits is None:
        output_router_logits = self.config.text_config.output_router_logits
    if position_ids is not None and position_ids.ndim == 3 and position_ids.shape[1] in (3, 4) and position_ids.shape[0] not in (3, 4):
        position_ids = position_ids.transpose(0, 1)  # collated as (batch, 3, seq); HF wants (3, batch, seq)
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is not None and tokens.shape[0] * tokens.shape[1] == 0:  # fails deep in attention otherwise
        raise ValueError(
            f"empty batch (shape {tuple(tokens.shape[:2])}): a rank without samples must still run the step; "
            "give it veomni_omni.data.checks.padding_batch(config)"
        )
    sp_inputs = kwargs.pop("sp_inputs", None)
    if sp_inputs is not None:  # this rank holds a slice of a packed sequence (Ulysses SP)
        if input_features is not None or pixel_values_videos is not None or inputs_embeds is not None:
            raise ValueError(
                "With sp_inputs (a sequence-parallel shard), audio comes in sp_inputs, videos are part of the "
                "joint pixel_values and embeddings are computed from input_ids: shard the batch with "
                "veomni_omni.data.sequence_parallel.shard_for_sequence_parallel."
            )
        return sequence_parallel_forward(
            self, input_ids, position_ids, sp_inputs, pixel_values, output_router_logits=output_router_logits, **kwargs
        )
    if (pixel_values is not None or pixel_values_videos is not None) and mm_encoder_outputs is not None:
        raise ValueError("You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time")

    if inputs_embeds is None:
        inputs_embeds = self.get_input_embeddings()(input_ids)

    # 1. Encoders, always in this order: audio tower, then one ViT pass for images and videos together.
    # A rank without audio or without images/videos runs that encoder on a dummy input instead, so
    # every rank issues the same FSDP collectives in the same order.
    distributed = encoders_must_run()
    audio_embeds = encode_audio(self, input_features, feature_attention_mask, audio_feature_lengths, kwargs)
    if audio_embeds is None and distributed:
        inputs_embeds = inputs_embeds + dummy_audio_forward(self).to(inputs_embeds.dtype)
    vision = encode_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_encoder_outputs, kwargs)
    if vision is None and distributed:
        inputs_embeds = inputs_embeds + dummy_vision_forward(self.visual).to(inputs_embeds.dtype)

    # 2. Fill encoder outputs into their placeholder positions (counts checked for all modalities).
    image_mask, video_mask, audio_mask = placeholder_mask(
        self,
        input_ids,
        inputs_embeds,
        image_features=vision.image_embeds if vision else None,
        video_features=vision.video_embeds if vision else None,
        audio_features=audio_embeds,
    )
    if audio_embeds is not None:
        inputs_embeds = inputs_embeds.masked_scatter(audio_mask, audio_embeds.to(inputs_embeds.device, inputs_embeds.dtype))
    visual_pos_masks, deepstack_visual_embeds = None, None
    if vision is not None:
        visual_pos_masks, visual_embeds, deepstack_visual_embeds = _join_visual(vision, image_mask[..., 0], video_mask[..., 0])
        visual_embeds = visual_embeds.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(visual_pos_masks.unsqueeze(-1), visual_embeds)

    # 3. 3-axis M-RoPE positions, computed as HF does when not given.
    if position_ids is None:
        has_media = any(x is not None for x in (image_grid_thw, video_grid_thw, feature_attention_mask))
        empty_rows = (~attention_mask.any(-1)).nonzero().flatten().tolist() if has_media and attention_mask is not None else []
        if empty_rows:  # HF's M-RoPE index fails on them deep inside (torch.cat of nothing)
            raise ValueError(
                f"batch rows {empty_rows} are all padding (attention_mask all 0) in a batch with media: HF's M-RoPE "
                "index cannot place them; pass position_ids computed per sample (veomni_omni.data.samples.rope_positions)"
            )
        if feature_attention_mask is not None:
            audio_feature_lengths = feature_attention_mask.sum(dim=1)
        position_ids = self.compute_3d_position_ids(
            input_ids=input_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_audio_in_video=use_audio_in_video,
            audio_feature_lengths=audio_feature_lengths,
            video_second_per_grid=video_second_per_grid,
        )

    # 4. Text decoder, with deepstack features added after its first layers.
    outputs = self.language_model(
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_router_logits=output_router_logits,
        deepstack_visual_embeds=deepstack_visual_embeds,
        visual_pos_masks=visual_pos_masks,
        **kwargs,
    )
    return MoeModelOutputWithPast(
        last_hidden_state=outputs.last_hidden_state,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        past_key_values=outputs.past_key_values,
        router_logits=outputs.router_logits,
    )


def omni_forward(self, *args, **kwargs):
    """Training forward of the top-level model: the thinker's; with speech targets (`talker_codes`), the
    talker's and code predictor's too (models/talker.py); whether the thinker trains with them is the
    call's `train_thinker`, else what VeOmni's trainer set up (`speech_training`, integration/speech_training.py).
    code2wav is carried, never run."""
    if "talker_codes" in kwargs:
        settings = getattr(self, "speech_training", None)
        if settings is not None:
            kwargs.setdefault("train_thinker", settings.train_thinker)
        return speech_training_forward(self, *args, **kwargs)
    return self.thinker(*args, **kwargs)


def _zero_without_targets(loss: torch.Tensor, labels: torch.Tensor, shift_labels) -> torch.Tensor:
    """HF's token mean over a batch with no supervised token is 0/0 = NaN; make it 0 (its gradients
    are already 0), so a padding-only batch adds nothing to the global loss. No host sync."""
    targets = shift_labels if shift_labels is not None else labels[..., 1:]
    return torch.where((targets != IGNORE_INDEX).any(), loss, torch.zeros_like(loss))


def _balancing_mask(attention_mask: Optional[torch.Tensor], sp_inputs: Optional[SequenceParallelShard]):
    """(mask, any_token): the mask the router balancing loss averages over, and whether the batch holds
    a token at all (see veomni_omni.data.checks.padding_batch). A padding-only batch averages over its
    padding instead of over no token (0/0, whose NaN gradient would survive the zeroing), and the caller
    zeroes that loss. Under SP the collator says so on the host; otherwise it is decided on device (no
    host sync, no graph break under torch.compile)."""
    if sp_inputs is not None:
        any_token = sp_inputs.sequence_length > 0
        return (attention_mask if any_token else None), any_token
    if attention_mask is None:
        return None, True
    any_token = attention_mask.any()
    return torch.where(any_token, attention_mask, torch.ones_like(attention_mask)), any_token


def _veomni_loss_installed(loss_function) -> bool:
    """VeOmni's builder replaces transformers' ForCausalLM loss with one returning
    (loss, logits, aux) that can fuse the lm_head (no full logits tensor)."""
    return getattr(loss_function, "func", loss_function).__module__.startswith("veomni.")


@can_return_tuple
def thinker_causal_lm_forward(
    self,
    input_ids=None,
    input_features=None,
    pixel_values=None,
    pixel_values_videos=None,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    feature_attention_mask=None,
    audio_feature_lengths=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    output_router_logits: Optional[bool] = None,
    use_audio_in_video=None,
    video_second_per_grid=None,
    mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
    **kwargs,
) -> tuple | hf_modeling.Qwen3OmniMoeThinkerCausalLMOutputWithPast:
    if output_router_logits is None:
        output_router_logits = self.config.text_config.output_router_logits
    outputs = self.model(
        input_ids=input_ids,
        input_features=input_features,
        pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        attention_mask=attention_mask,
        feature_attention_mask=feature_attention_mask,
        audio_feature_lengths=audio_feature_lengths,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        use_audio_in_video=use_audio_in_video,
        video_second_per_grid=video_second_per_grid,
        mm_encoder_outputs=mm_encoder_outputs,
        output_router_logits=output_router_logits,
        **kwargs,
    )
    hidden_states = outputs[0]
    vocab_size = self.config.get_text_config().vocab_size

    loss, logits = None, None
    if labels is not None and _veomni_loss_installed(self.loss_function):
        # VeOmni's loss takes the hidden states and lm_head weight; its fused kernels never build logits.
        loss, logits, _ = self.loss_function(
            logits=None, labels=labels, vocab_size=vocab_size,
            hidden_states=hidden_states, weights=self.lm_head.weight, **kwargs,
        )
        if logits is not None:  # its unfused path returns (tokens, vocab); HF's contract is (batch, seq, vocab)
            logits = logits.view(*hidden_states.shape[:-1], -1)
    else:
        logits = self.lm_head(hidden_states)
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)

    if loss is not None and "sp_inputs" not in kwargs:  # under SP, VeOmni's loss reduction already does this
        loss = _zero_without_targets(loss, labels, kwargs.get("shift_labels"))

    aux_loss = None
    if output_router_logits:
        mask, any_token = _balancing_mask(attention_mask, kwargs.get("sp_inputs"))
        aux_loss = hf_modeling.load_balancing_loss_func(outputs.router_logits, self.num_experts, self.num_experts_per_tok, mask)
        aux_loss = aux_loss * any_token  # a padding-only batch balances nothing
        if labels is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)

    return hf_modeling.Qwen3OmniMoeThinkerCausalLMOutputWithPast(
        loss=loss,
        logits=logits,
        aux_loss=aux_loss,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        past_key_values=outputs.past_key_values,
        rope_deltas=self.model.rope_deltas,
        router_logits=outputs.router_logits,
    )
