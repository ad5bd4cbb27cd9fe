"""Audio tower forward whose output for a clip does not depend on the other clips of the call.

HF's tower cuts each clip into chunks of 2·n_window mel frames and pads every chunk of the call to
the longest one. Its three stride-2 convolutions (kernel 3, padding 1, bias, GELU) turn that padding
into nonzero frames, and a chunk whose length is odd after the first or second convolution reads one
of them into its last output frame. Alone, HF pads a clip only to its own longest chunk: 2·n_window
frames (so a long clip's short last chunk does see its padding), or the clip's length when it is
shorter than one chunk (it sees none). Here every chunk gets that `reference width`: frames past it
are zeroed after each convolution (the zero padding at the edge of a narrower input), so a clip
encodes as alone whatever else is in the call."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    chunk_and_pad_features,
    get_audio_cu_seqlens,
    get_max_seqlen,
    get_valid_indices,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

REFERENCE_WIDTHS_KWARG = "chunk_reference_widths"


def chunk_reference_widths(
    feature_lens: torch.Tensor, n_window: int, clip_lens: Optional[torch.Tensor] = None, n_chunks: Optional[int] = None
) -> torch.Tensor:
    """Per chunk, the width HF pads it to when its clip is encoded alone: min(clip frames, 2·n_window).

    `feature_lens` are the frame counts of the pieces the tower chunks (whole clips, or under SP
    attention windows of a clip); `clip_lens` the frame count of the clip each piece comes from
    (default: the pieces are whole clips). Given `n_chunks` (the chunk count), no host sync."""
    chunk = 2 * n_window
    clip_lens = feature_lens if clip_lens is None else clip_lens
    chunks_per_piece = (feature_lens + chunk - 1) // chunk
    widths = clip_lens.clamp(max=chunk)
    return torch.repeat_interleave(widths, chunks_per_piece, output_size=n_chunks)


def _conv_length(length):
    """Output length of one of the tower's convolutions (kernel 3, stride 2, padding 1); int or tensor."""
    return (length - 1) // 2 + 1


def _downsample(tower, padded_feature: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """The tower's conv stem, (chunks, 1, mel, frames) -> (chunks, channels, mel', frames'), with each
    chunk's frames past its reference width zeroed after every convolution. A call whose chunks are
    all shorter than 2·n_window (under SP: e.g. only a long clip's short last window) is padded to
    2·n_window first, the width such a window's chunk has in its clip, and cut back after."""
    frames = padded_feature.shape[-1]
    out_frames = _conv_length(_conv_length(_conv_length(frames)))
    padded_feature = F.pad(padded_feature, (0, max(0, 2 * tower.n_window - frames)))
    out = []
    for chunk, width in zip(padded_feature.split(tower.conv_chunksize), widths.split(tower.conv_chunksize)):
        for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
            chunk = F.gelu(conv(chunk))
            width = _conv_length(width)
            beyond = torch.arange(chunk.shape[-1], device=chunk.device) >= width[:, None]
            chunk = chunk.masked_fill(beyond[:, None, None, :], 0.0)
        out.append(chunk[..., :out_frames])
    return torch.cat(out)


@merge_with_config_defaults
@capture_outputs(tie_last_hidden_states=False)
def audio_encoder_forward(self, input_features=None, feature_lens=None, **kwargs: Unpack[TransformersKwargs]):
    """HF's Qwen3OmniMoeAudioEncoder.forward with per-clip conv padding (module doc). Takes HF's
    precomputed chunking kwargs (padded_feature, chunk_lengths, valid_indices, cu_seqlens, max_seqlen)
    and, with them, `chunk_reference_widths` (see `chunk_reference_widths`; default: from feature_lens)."""
    padded_feature, chunk_lengths = chunk_and_pad_features(input_features, feature_lens, self.n_window, kwargs=kwargs)
    valid_indices = get_valid_indices(chunk_lengths, self.n_window, kwargs=kwargs)
    cu_seqlens = get_audio_cu_seqlens(chunk_lengths, feature_lens, self.n_window_infer, self.n_window, kwargs=kwargs)
    max_seqlen = get_max_seqlen(cu_seqlens, self.config, kwargs=kwargs)
    widths = kwargs.pop(REFERENCE_WIDTHS_KWARG, None)
    if widths is None:
        if feature_lens is None:
            raise ValueError(
                f"audio tower: precomputed chunking without feature_lens needs {REFERENCE_WIDTHS_KWARG} "
                "(see veomni_omni.models.audio_tower)"
            )
        widths = chunk_reference_widths(feature_lens, self.n_window, n_chunks=padded_feature.shape[0])

    features = padded_feature.unsqueeze(1).to(self.conv2d1.weight.dtype)
    embeds = _downsample(self, features, widths.to(features.device))
    chunks, channels, mel, frames = embeds.shape
    embeds = self.conv_out(embeds.permute(0, 3, 1, 2).reshape(chunks, frames, channels * mel))
    embeds = embeds + self.positional_embedding.positional_embedding[:frames].to(embeds.dtype)
    hidden_states = embeds.reshape(-1, embeds.shape[-1]).index_select(0, valid_indices)

    for layer in self.layers:
        hidden_states = layer(hidden_states, cu_seqlens, max_seqlen=max_seqlen)[0]
    hidden_states = self.proj2(self.act(self.proj1(self.ln_post(hidden_states))))
    return BaseModelOutputWithPooling(last_hidden_state=hidden_states, pooler_output=hidden_states)
