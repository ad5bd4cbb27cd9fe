"""A real `Qwen3OmniMoeProcessor` for the tiny test vocabulary, built from local parts only.

- tokenizer: `Qwen2Tokenizer` (what Qwen3-Omni checkpoints name) around a byte-level BPE trained
  with `tokenizers` on the synthetic dataset's text, using Qwen2's own pre-tokenizer (NFC, Qwen's
  split regex, byte-level) so that training and loading see the same pipeline. Ids:
  0 = <|endoftext|> (pad), 1..256 the byte alphabet, 257..476 merges, 477..479 the chat roles
  "system", "user", "assistant" (one token each, as in Qwen's vocabulary: HF's talker input reads
  the role as the one token after <|im_start|>), 480..511 Qwen's special tokens, placed so that the
  ones the model uses sit at `veomni_omni.tiny.TOKENS`;
- chat template: Qwen3-Omni's ChatML layout (see `CHAT_TEMPLATE`);
- feature extractor: `WhisperFeatureExtractor`, 128 mel bins at 16 kHz (Qwen3-Omni's settings);
- image processor: `Qwen2VLImageProcessorPil` (what transformers picks without torchvision; it
  saves itself as "Qwen2VLImageProcessor", like a released checkpoint);
- video processor: `Qwen2VLVideoProcessorPil` (torchvision-free, see video_processor.py).

`build_tiny_processor(save_dir)` saves it; `load_processor(save_dir)` loads it back, and so do
`AutoProcessor.from_pretrained(save_dir)` and VeOmni's `build_processor(save_dir)` while the patch set
is applied (`import veomni_omni`; its video-processor entries make this loadable without torchvision).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from . import synthetic
from .video_processor import Qwen2VLVideoProcessorPil

__all__ = [
    "CHAT_TEMPLATE",
    "ROLE_TOKENS",
    "SPECIAL_TOKENS",
    "TEXT_VOCAB",
    "VOCAB_SIZE",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "load_processor",
]

TEXT_VOCAB = 480  # ids [0, 480): <|endoftext|>, 256 bytes, BPE merges (= tiny.FIRST_SPECIAL)
VOCAB_SIZE = 512  # = tiny.TINY_VOCAB
# The chat roles at fixed ids below the special tokens (= tiny.TOKENS system/user/assistant).
ROLE_TOKENS = {477: "system", 478: "user", 479: "assistant"}
BPE_VOCAB = min(ROLE_TOKENS)  # ids [0, 477) are learnt

# id → (token, special). Qwen's special tokens; the multimodal and chat ones at tiny.TOKENS.
SPECIAL_TOKENS: dict[int, tuple[str, bool]] = {
    480: ("<|object_ref_start|>", True),
    481: ("<|object_ref_end|>", True),
    482: ("<|box_start|>", True),
    483: ("<|box_end|>", True),
    484: ("<|quad_start|>", True),
    485: ("<|quad_end|>", True),
    486: ("<tool_call>", False),
    487: ("</tool_call>", False),
    488: ("<think>", False),
    489: ("</think>", False),
    490: ("<|im_start|>", True),
    491: ("<|im_end|>", True),
    492: ("<|vision_pad|>", True),
    493: ("<|fim_prefix|>", False),
    494: ("<|fim_middle|>", False),
    495: ("<|fim_suffix|>", False),
    496: ("<|fim_pad|>", False),
    497: ("<|repo_name|>", False),
    498: ("<|file_sep|>", False),
    499: ("<tool_response>", False),
    500: ("<|vision_start|>", True),
    501: ("<|vision_end|>", True),
    502: ("<|audio_start|>", True),
    503: ("<|audio_end|>", True),
    504: ("<|image_pad|>", True),
    505: ("<|video_pad|>", True),
    506: ("<|audio_pad|>", True),
    507: ("</tool_response>", False),
    508: ("<tts_pad>", True),
    509: ("<tts_text_bos>", True),
    510: ("<tts_text_eod>", True),
    511: ("<tts_text_bos_single>", True),
}
PAD_TOKEN = "<|endoftext|>"

# Attribute names Qwen3OmniMoeProcessor.__init__ reads from the tokenizer (tokenizer.image_token, ...),
# stored as named model-specific special tokens, as in Qwen3-Omni's tokenizer_config.json.
NAMED_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "audio_token": "<|audio_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

# Qwen3-Omni (Instruct) ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message; content
# parts render in order, media as their start/pad/end triple (expanded later by the processor);
# string content is accepted too. Tool calls and thinking blocks of the released template are not
# reproduced (the synthetic data has none). Rendering is prefix-stable: rendering messages[:k] is a
# prefix of rendering messages — samples.py relies on it (and checks it) to find assistant spans.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'audio' or 'audio' in part or 'audio_url' in part -%}"
    "{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif part.type == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part.type == 'text' or 'text' in part -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render(message.content) + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _qwen_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    """The normaliser and pre-tokenizer `Qwen2Tokenizer.__init__` installs, so BPE learns on the
    same pieces it will see."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return tokenizer


def build_tiny_tokenizer(corpus: Optional[Iterable[str]] = None) -> Qwen2Tokenizer:
    """Train the byte-level BPE on `corpus` (default: the synthetic dataset's text) and wrap it in a
    `Qwen2Tokenizer` with Qwen's special tokens at their fixed ids (deterministic)."""
    lines = list(corpus if corpus is not None else synthetic.corpus())
    bpe = _qwen_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    # Repeat the corpus so merges have counts to rank; the order of lines fixes tie-breaking.
    bpe.train_from_iterator(lines * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    if vocab.get(PAD_TOKEN) != 0 or len(vocab) > BPE_VOCAB or sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError(f"unexpected BPE vocabulary layout ({len(vocab)} entries)")
    if set(ROLE_TOKENS.values()) & set(vocab):
        raise RuntimeError(f"the BPE learnt a role word as a piece of its own: {set(ROLE_TOKENS.values()) & set(vocab)}")
    # A corpus too small to fill the text range leaves ids unused; claim them with inert tokens so
    # the special tokens still land on their fixed ids.
    for i in range(len(vocab), BPE_VOCAB):
        vocab[f"<|unused_{i}|>"] = i
    for token_id, role in ROLE_TOKENS.items():
        vocab[role] = token_id
    for token_id, (token, _) in SPECIAL_TOKENS.items():
        vocab[token] = token_id

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(NAMED_TOKENS),
        model_max_length=32768,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )
    extra = [tok for _, (tok, _) in sorted(SPECIAL_TOKENS.items())]
    extra += [f"<|unused_{i}|>" for i in range(len(model["vocab"]), BPE_VOCAB)]
    special = {tok for tok, is_special in SPECIAL_TOKENS.values() if is_special} | set(extra[len(SPECIAL_TOKENS):])
    extra += list(ROLE_TOKENS.values())  # matched before BPE, like any added token; plain text, not special
    tokenizer.add_tokens([AddedToken(t, special=t in special, normalized=False) for t in extra])
    _check_layout(tokenizer)
    return tokenizer


def _check_layout(tokenizer) -> None:
    for token_id, (token, _) in {**SPECIAL_TOKENS, **{i: (role, False) for i, role in ROLE_TOKENS.items()}}.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise RuntimeError(f"{token} has id {got}, expected {token_id}")
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"vocabulary has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")


def build_tiny_processor(
    save_dir: Optional[os.PathLike] = None,
    *,
    image_pixels: tuple[int, int] = (32 * 32, 128 * 128),
    video_pixels: tuple[int, int] = (32 * 32, 128 * 128),
    patch_size: int = 16,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    corpus: Optional[Iterable[str]] = None,
) -> Qwen3OmniMoeProcessor:
    """Assemble the tiny processor; save it to `save_dir` when given (then it loads back with
    `load_processor(save_dir)` / `AutoProcessor.from_pretrained(save_dir)`).

    `image_pixels` / `video_pixels` are the (min, max) pixel counts of `smart_resize` per image /
    frame: the defaults keep the synthetic 64×64 media at their size (a 4×4 ViT grid) and shrink
    anything larger than 128×128.
    """
    vision = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3OmniMoeProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=image_pixels[0], max_pixels=image_pixels[1], **vision),
        video_processor=Qwen2VLVideoProcessorPil(min_pixels=video_pixels[0], max_pixels=video_pixels[1], **vision),
        feature_extractor=WhisperFeatureExtractor(
            feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400,
            padding_value=0.0, return_attention_mask=True, dither=0.0,
        ),
        tokenizer=build_tiny_tokenizer(corpus),
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        processor.save_pretrained(os.fspath(save_dir))
    return processor


def load_processor(path: os.PathLike, **kwargs) -> Qwen3OmniMoeProcessor:
    """`AutoProcessor.from_pretrained(path)`; the patch set makes the torchvision-free video processor
    loadable. Works for `build_tiny_processor` output and, on machines
    without torchvision, for released Qwen3-Omni processors (their `Qwen2VLVideoProcessor` config is
    served by `Qwen2VLVideoProcessorPil`)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(os.fspath(path), **kwargs)
