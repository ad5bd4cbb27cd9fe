"""Teacher-forced training forward of the talker (speech output) and its code predictor.

HF 5.22 trains neither: the talker's forward fails when given labels and the top-level model only has
`generate`. `speech_training_forward` runs the whole omni model once on a batch whose spoken assistant
turns carry their codec codes (data/speech.py) and builds, per spoken turn, the talker's input exactly
as `Qwen3OmniMoeForConditionalGeneration.generate` does when it speaks that turn:

    user part   every token of the user turns before it: `hidden_projection` of the thinker's hidden
                state at `talker_config.accept_hidden_layer` at image/video/audio placeholders,
                `text_projection` of the thinker's input embedding elsewhere;
    assistant   "<|im_start|>assistant\\n" (projected), 4 × tts_pad, tts_bos, the first text token,
                each summed with the codec prefix (0, 0, 0, nothink, think_bos, think_eos, speaker,
                codec_pad, codec_bos);
    frames      per frame, the codec embeddings of its codes summed over the code groups, plus the
                next trailing text token (the turn's text after the first token, then tts_eos, then
                tts_pad) — what generate feeds back one step at a time;

with 3-axis positions from HF's rope index over the user ids followed by tts_pad ids, with the talker's
settings (HF passes no `use_audio_in_video` to the talker). The talker predicts codebook 0 of every frame and
then the end of speech; the code predictor, fed the talker's last hidden state of each frame and the
frame's codes, predicts the other groups. The losses are token means (cross entropy), returned by name
(VeOmni's convention for several losses): `talker_loss`, `code_predictor_loss`, and the thinker's text
loss `foundation_loss` when the thinker trains too (`train_thinker=True`). By default the thinker is frozen: it runs without autograd and only the talker (with its projections and code
predictor) learns.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from ..data.samples import rope_positions
from ..data.speech import speech_labels

__all__ = ["SpeechTrainingOutput", "speech_training_forward"]

# "<|im_start|>assistant\n": HF's generate places the first text token 3 positions after the opening
ASSISTANT_PREFIX = 3
TTS_PAD_BEFORE_BOS = 4


@dataclass
class SpeechTrainingOutput(ModelOutput):
    """Losses of a speech training step (`loss`: the named losses, see `speech_training_forward`), and
    the logits they come from, per spoken turn:
    `talker_logits[i]` (frames + 1, codec vocabulary): codebook 0 of every frame, then end of speech;
    `code_predictor_logits[i]` (frames, groups - 1, codebook): groups 1.. of every frame."""

    loss: Optional[dict] = None
    thinker_loss: Optional[torch.Tensor] = None
    talker_loss: Optional[torch.Tensor] = None
    code_predictor_loss: Optional[torch.Tensor] = None
    talker_logits: Optional[list] = None
    code_predictor_logits: Optional[list] = None


@dataclass
class _Turn:
    row: int
    opening: int  # position of the turn's <|im_start|>
    end: int  # position of its <|im_end|>
    users: torch.Tensor  # positions of the user turns' tokens before it
    codes: torch.Tensor  # (groups, frames)
    speaker: int


@contextmanager
def _captured_hidden(thinker, layer: int):
    """Capture the thinker's hidden state `layer` as generate's `hidden_states[layer]` holds it: 0 the
    decoder's input embeddings, k the output of decoder layer k (before deepstack adds to it), the last
    one after the final norm. Hooks live only for this forward (gradient checkpointing re-runs layers)."""
    text = thinker.model.language_model
    layers = len(text.layers)
    if not 0 <= layer <= layers:
        raise ValueError(f"talker_config.accept_hidden_layer={layer} outside the thinker's 0..{layers} hidden states")
    found: dict = {}

    def keep(value):
        found["hidden"] = value[0] if isinstance(value, tuple) else value

    if layer == 0:
        handle = text.layers[0].register_forward_pre_hook(lambda module, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    elif layer == layers:
        handle = text.norm.register_forward_hook(lambda module, args, output: keep(output))
    else:
        handle = text.layers[layer - 1].register_forward_hook(lambda module, args, output: keep(output))
    try:
        yield found
    finally:
        handle.remove()


def _segments(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cu_seq_lens: Optional[torch.Tensor]) -> list[list[tuple[int, int]]]:
    """Per row, the [start, end) of each sample: the packed row's `cu_seq_lens_q`, else the row's tokens."""
    rows, length = input_ids.shape
    if cu_seq_lens is not None:
        if rows != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row; got {rows} rows")
        bounds = cu_seq_lens.tolist()
        return [list(zip(bounds[:-1], bounds[1:]))]
    if attention_mask is None:
        return [[(0, length)] for _ in range(rows)]
    lengths = attention_mask.sum(-1).tolist()
    if not torch.equal(attention_mask, (torch.arange(length) < attention_mask.sum(-1, keepdim=True)).to(attention_mask)):
        raise ValueError("speech training takes right-padded rows (attention_mask 1…1 0…0)")
    return [[(0, int(n))] for n in lengths]


def _turns(model, input_ids, segments, talker_codes, talker_frames, talker_speakers) -> list[_Turn]:
    """The spoken turns, row by row, left to right: where the markers are, as the codes are ordered."""
    config = model.config
    if talker_frames.shape != input_ids.shape or talker_speakers.shape != input_ids.shape:
        raise ValueError(
            f"talker_frames {tuple(talker_frames.shape)} and talker_speakers {tuple(talker_speakers.shape)} must be "
            f"aligned with input_ids {tuple(input_ids.shape)}"
        )
    groups, total = config.talker_config.num_code_groups, int(talker_frames.sum())
    if talker_codes.ndim != 2 or talker_codes.shape[0] != groups or talker_codes.shape[1] != total:
        raise ValueError(f"talker_codes {tuple(talker_codes.shape)} must be ({groups}, Σ talker_frames = {total})")
    turns, first_frame = [], 0
    for row, opening in talker_frames.nonzero().tolist():
        ids = input_ids[row]
        start, stop = next(((a, b) for a, b in segments[row] if a <= opening < b), (None, None))
        if start is None or opening + ASSISTANT_PREFIX >= stop:
            raise ValueError(f"spoken turn at row {row} position {opening}: not inside a sample, or no text follows")
        if int(ids[opening]) != config.im_start_token_id or int(ids[opening + 1]) != config.assistant_token_id:
            raise ValueError(f"spoken turn at row {row} position {opening}: no '<|im_start|>assistant' there")
        ends = (ids[opening + ASSISTANT_PREFIX : stop] == config.im_end_token_id).nonzero()
        if len(ends) == 0 or int(ends[0]) == 0:
            raise ValueError(f"spoken turn at row {row} position {opening}: no text, or no <|im_end|> in its sample")
        openings = ((ids[start:opening] == config.im_start_token_id).nonzero().flatten() + start).tolist() + [opening]
        users = [torch.arange(a, b) for a, b in zip(openings[:-1], openings[1:]) if int(ids[a + 1]) == config.user_token_id]
        frames = int(talker_frames[row, opening])
        turns.append(
            _Turn(
                row=row,
                opening=opening,
                end=opening + ASSISTANT_PREFIX + int(ends[0]),
                users=torch.cat(users) if users else torch.zeros(0, dtype=torch.long),
                codes=talker_codes[:, first_frame : first_frame + frames],
                speaker=int(talker_speakers[row, opening]),
            )
        )
        first_frame += frames
    return turns


def _media_of(model, input_ids: torch.Tensor, thinker_inputs: dict):
    """Per medium, in the order the batch's grids and audio lengths list them (row by row, left to
    right): its kind, row and the position of its start token, with its grid / feature length."""
    thinker = model.config.thinker_config
    audio_lengths = thinker_inputs.get("audio_feature_lengths")
    if audio_lengths is None and thinker_inputs.get("feature_attention_mask") is not None:
        audio_lengths = thinker_inputs["feature_attention_mask"].sum(-1)
    listed = {
        "image": thinker_inputs.get("image_grid_thw"),
        "video": thinker_inputs.get("video_grid_thw"),
        "audio": audio_lengths,
        "seconds": thinker_inputs.get("video_second_per_grid"),
    }
    follows = input_ids[:, 1:]
    starts = {
        "image": (input_ids[:, :-1] == thinker.vision_start_token_id) & (follows == thinker.image_token_id),
        "video": (input_ids[:, :-1] == thinker.vision_start_token_id) & (follows == thinker.video_token_id),
        "audio": (input_ids[:, :-1] == thinker.audio_start_token_id) & (follows == thinker.audio_token_id),
    }
    if bool(((input_ids[:, :-1] == thinker.vision_start_token_id) & (follows == thinker.audio_start_token_id)).any()):
        raise ValueError(
            "speech training on a video with its audio interleaved (use_audio_in_video): HF's generate builds the "
            "talker's positions without use_audio_in_video, which does not place such a block"
        )
    media = {}
    for kind, mask in starts.items():
        places = mask.nonzero().tolist()
        if places and (listed[kind] is None or len(listed[kind]) != len(places)):
            raise ValueError(f"{len(places)} {kind} blocks in input_ids but {0 if listed[kind] is None else len(listed[kind])} {kind}s listed")
        media[kind] = places
    return media, listed


def _rope_settings(model) -> SimpleNamespace:
    """What HF's rope index reads, for the talker: its token ids, merge size and seconds, and the audio
    window of the thinker's audio tower. HF's talker rope index reads `config.audio_config`, which the
    talker config lacks: 5.22's generate(return_audio=True) fails on a prompt with audio and an image
    or video; the thinker's audio window is the one the audio placeholders were counted with."""
    talker = model.config.talker_config
    keys = ("image_token_id", "video_token_id", "audio_token_id", "vision_start_token_id", "audio_start_token_id", "position_id_per_seconds")
    return SimpleNamespace(
        **{key: getattr(talker, key) for key in keys},
        audio_config=model.config.thinker_config.audio_config,
        vision_config=SimpleNamespace(spatial_merge_size=talker.spatial_merge_size),
    )


def _positions(settings, rope_ids: torch.Tensor, turn: _Turn, media, listed) -> torch.Tensor:
    """(3, L) positions of one talker sequence: HF's rope index over it, with the media of its user part
    and without use_audio_in_video, as generate computes them."""
    users = set(turn.users.tolist())
    picked = {kind: [i for i, (row, pos) in enumerate(places) if row == turn.row and pos in users] for kind, places in media.items()}

    def chosen(kind, values):
        return values[picked[kind]] if picked[kind] and values is not None else None

    return rope_positions(
        settings,
        rope_ids,
        image_grid_thw=chosen("image", listed["image"]),
        video_grid_thw=chosen("video", listed["video"]),
        audio_seqlens=chosen("audio", listed["audio"]),
        video_second_per_grid=chosen("video", listed["seconds"]),
    )


def _codec_embeddings(talker, codes: torch.Tensor) -> torch.Tensor:
    """(groups, frames, H): each group's codes embedded as generate embeds them, group 0 by the talker,
    group g ≥ 1 by the code predictor's embedding g − 1. A frame's talker input sums them; the code
    predictor reads groups 0 .. groups − 2 after the talker's state."""
    predictor_embeddings = talker.code_predictor.get_input_embeddings()
    first = talker.get_input_embeddings()(codes[0])
    return torch.stack([first, *(predictor_embeddings[group - 1](codes[group]) for group in range(1, codes.shape[0]))])


def _talker_sequence(model, turn: _Turn, input_ids, embeds, hidden, multimodal, specials):
    """Input embeddings (L, H) and rope ids (L,) of one turn's talker sequence, its prefix length and its
    frames' codec embeddings (groups, frames, H)."""
    talker, config = model.talker, model.config
    tts_bos, tts_eos, tts_pad = specials
    row = turn.row
    users = turn.users.to(input_ids.device)
    is_media = multimodal[row, users]
    user_part = torch.empty(len(users), talker.config.text_config.hidden_size, device=embeds.device, dtype=talker.dtype)
    user_part[is_media] = talker.hidden_projection(hidden[row, users[is_media]]).to(user_part.dtype)
    user_part[~is_media] = talker.text_projection(embeds[row, users[~is_media]]).to(user_part.dtype)

    spoken = talker.text_projection(embeds[row, turn.opening : turn.end])
    text_side = torch.cat((spoken[:ASSISTANT_PREFIX], tts_pad.expand(TTS_PAD_BEFORE_BOS, -1), tts_bos, spoken[ASSISTANT_PREFIX : ASSISTANT_PREFIX + 1]))
    tcfg = config.talker_config
    codec_prefix = torch.tensor(
        [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id, turn.speaker, tcfg.codec_pad_id, tcfg.codec_bos_id],
        device=embeds.device,
    )
    codec_side = torch.cat((text_side.new_zeros(ASSISTANT_PREFIX, text_side.shape[-1]), talker.get_input_embeddings()(codec_prefix)))
    assistant_part = text_side + codec_side

    codec = _codec_embeddings(talker, turn.codes.to(embeds.device))
    frames = codec.shape[1]
    trailing = torch.cat((spoken[ASSISTANT_PREFIX + 1 :], tts_eos))[:frames]
    text_per_frame = torch.cat((trailing, tts_pad.expand(frames - len(trailing), -1)))
    sequence = torch.cat((user_part, assistant_part, codec.sum(0) + text_per_frame))
    rope_ids = torch.cat((input_ids[row, users], input_ids.new_full((len(assistant_part) + frames,), config.tts_pad_token_id)))
    return sequence, rope_ids, len(users) + len(assistant_part), codec


def _token_mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))


def speech_training_forward(
    model,
    input_ids: torch.LongTensor,
    talker_codes: torch.LongTensor,
    talker_frames: torch.LongTensor,
    talker_speakers: torch.LongTensor,
    talker_labels: Optional[torch.LongTensor] = None,
    code_predictor_labels: Optional[torch.LongTensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    labels: Optional[torch.LongTensor] = None,
    train_thinker: bool = False,
    **thinker_inputs,
) -> SpeechTrainingOutput:
    """The loss of speaking every spoken turn of the batch (module doc), on a `Qwen3OmniMoeForConditionalGeneration`
    with its talker. `talker_frames` / `talker_speakers` (like input_ids): at each spoken turn's <|im_start|>,
    its frames / speaker id, 0 elsewhere; `talker_codes` (groups, Σ frames) in the order of the turns (row by
    row, left to right); `talker_labels` / `code_predictor_labels`, when given (the data's, which VeOmni's
    trainer counts), must be the targets those codes make. The other inputs are the thinker's (a packed
    row with `cu_seq_lens_q`, or right-padded rows).

    `loss` is a dict of named token-mean losses, VeOmni's convention for several losses: `talker_loss`,
    `code_predictor_loss`, and `foundation_loss` (the thinker's text) when the thinker trains."""
    if not getattr(model, "has_talker", False):
        raise ValueError("speech training needs the talker: build the model with enable_audio_output (or call enable_talker())")
    if train_thinker and labels is None:
        raise ValueError("train_thinker=True trains the thinker's text too: give labels")
    if "sp_inputs" in thinker_inputs:
        raise NotImplementedError("speech training under Ulysses sequence parallelism is not supported yet")
    thinker, talker = model.thinker, model.talker
    tcfg = model.config.talker_config
    segments = _segments(input_ids, attention_mask, thinker_inputs.get("cu_seq_lens_q"))
    turns = _turns(model, input_ids, segments, talker_codes, talker_frames, talker_speakers)
    media, listed = _media_of(model, input_ids, thinker_inputs)

    thinker_loss = None
    with torch.set_grad_enabled(torch.is_grad_enabled() and train_thinker), _captured_hidden(thinker, tcfg.accept_hidden_layer) as captured:
        if train_thinker:
            thinker_loss = thinker(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **thinker_inputs).loss
        else:
            thinker.model(input_ids=input_ids, attention_mask=attention_mask, **thinker_inputs)
        embeds = thinker.get_input_embeddings()(input_ids)
        specials = thinker.get_input_embeddings()(
            torch.tensor([model.config.tts_bos_token_id, model.config.tts_eos_token_id, model.config.tts_pad_token_id], device=input_ids.device)
        )
    hidden = captured["hidden"]
    specials = talker.text_projection(specials).split(1)
    thinker_ids = model.config.thinker_config
    multimodal = (input_ids == thinker_ids.audio_token_id) | (input_ids == thinker_ids.image_token_id) | (input_ids == thinker_ids.video_token_id)

    if not turns:  # a rank without speech still runs the talker, so every rank issues the same collectives
        return _without_speech(model, hidden, thinker_loss, specials)

    sequences, rope, prefixes, codecs = zip(*(_talker_sequence(model, turn, input_ids, embeds, hidden, multimodal, specials) for turn in turns))
    longest = max(len(s) for s in sequences)
    inputs = torch.stack([F.pad(s, (0, 0, 0, longest - len(s))) for s in sequences])
    mask = torch.stack([(torch.arange(longest) < len(s)).long() for s in sequences]).to(inputs.device)
    settings = _rope_settings(model)
    axes = torch.stack([F.pad(_positions(settings, r, turn, media, listed), (0, longest - len(r))) for r, turn in zip(rope, turns)], dim=1)
    text_axis = torch.arange(longest, device=inputs.device).expand(len(turns), -1)
    positions = torch.cat((text_axis[None], axes.to(inputs.device)))
    states = talker.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state

    targets = speech_labels([turn.codes.to(inputs.device) for turn in turns], tcfg.codec_eos_token_id)
    for name, given in (("talker_labels", talker_labels), ("code_predictor_labels", code_predictor_labels)):
        if given is not None and not torch.equal(given.to(targets[name].device), targets[name]):
            raise ValueError(f"{name} {tuple(given.shape)} are not the targets talker_codes make ({tuple(targets[name].shape)})")
    talker_logits, predictor_inputs = [], []
    predictor = talker.code_predictor
    for index, (prefix, codec) in enumerate(zip(prefixes, codecs)):
        frames = codec.shape[1]
        talker_logits.append(talker.codec_head(states[index, prefix - 1 : prefix + frames]))
        # per frame: the talker's state that predicted its codebook 0, then groups 0 .. groups − 2
        predictor_inputs.append(torch.cat((states[index, prefix - 1 : prefix - 1 + frames, None], codec[:-1].transpose(0, 1)), dim=1))
    predicted = predictor.model(inputs_embeds=torch.cat(predictor_inputs), use_cache=False).last_hidden_state
    predictor_logits = torch.stack([head(predicted[:, group + 1]) for group, head in enumerate(predictor.lm_head)], dim=1)

    talker_loss = _token_mean_cross_entropy(torch.cat(talker_logits), targets["talker_labels"])
    predictor_loss = _token_mean_cross_entropy(predictor_logits, targets["code_predictor_labels"])
    # hidden_projection only sees user-turn media; without any it still runs, so every rank reduces its gradient
    talker_loss = talker_loss + 0.0 * talker.hidden_projection(hidden[0, :1]).sum()
    return SpeechTrainingOutput(
        loss=_named_losses(thinker_loss, talker_loss, predictor_loss),
        thinker_loss=thinker_loss,
        talker_loss=talker_loss,
        code_predictor_loss=predictor_loss,
        talker_logits=talker_logits,
        code_predictor_logits=list(predictor_logits.split([turn.codes.shape[1] for turn in turns])),
    )


def _named_losses(thinker_loss, talker_loss, predictor_loss) -> dict:
    losses = {"talker_loss": talker_loss, "code_predictor_loss": predictor_loss}
    if thinker_loss is not None:
        losses["foundation_loss"] = thinker_loss
    return losses


def _without_speech(model, hidden, thinker_loss, specials) -> SpeechTrainingOutput:
    """A batch without spoken turns: one made-up frame runs through every part of the talker and code
    predictor, times 0, so their parameters get (zero) gradients like every other rank's."""
    talker, predictor = model.talker, model.talker.code_predictor
    codes = torch.zeros(model.config.talker_config.num_code_groups, 1, dtype=torch.long, device=specials[0].device)
    frame = specials[0] + _codec_embeddings(talker, codes).sum(0) + talker.hidden_projection(hidden[0, :1]).to(specials[0].dtype)
    state = talker.model(inputs_embeds=frame[None], use_cache=False).last_hidden_state
    predicted = predictor.model(inputs_embeds=state.expand(-1, 2, -1), use_cache=False).last_hidden_state
    talker_zero = talker.codec_head(state).sum() * 0.0
    predictor_zero = sum(head(predicted).sum() for head in predictor.lm_head) * 0.0
    return SpeechTrainingOutput(
        loss=_named_losses(thinker_loss, talker_zero, predictor_zero), thinker_loss=thinker_loss, talker_loss=talker_zero,
        code_predictor_loss=predictor_zero, talker_logits=[], code_predictor_logits=[],
    )
