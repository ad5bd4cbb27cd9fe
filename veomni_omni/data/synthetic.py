"""A deterministic, learnable synthetic multimodal dataset for tiny Qwen3-Omni-MoE models.

Tasks (every answer is one word from at most 4 classes, so chance ≤ 0.25):

| task          | input                                           | question asks for        | classes |
|---------------|-------------------------------------------------|--------------------------|---------|
| image_shape   | a large coloured shape on noise (64×64)         | the shape                | 4       |
| image_colour  | same                                            | the colour               | 4       |
| audio_pitch   | a tone, 0.5–1 s at 16 kHz                       | its pitch class          | 4       |
| video_motion  | 4 frames of a small shape moving (64×64, 4 fps) | the direction            | 4       |
| av_motion     | same video with a tone soundtrack               | the direction (vision)   | 4       |
| av_pitch      | same                                            | the tone's pitch (audio) | 4       |
| text_arith    | "What is a plus b modulo four?"                 | the sum mod 4 as a word  | 4       |
| text_animal   | "Which animal says moo?"                        | the animal               | 4       |

Sizes are chosen for a tiny model on 2 CPU cores with patch 16 and merge 2: a 64×64 image is a
4×4 ViT grid (4 LM tokens), a 4-frame video 2×4×4 (8 tokens), 1 s of audio 100 mel frames
(13 tokens). av_* samples set `use_audio_in_video`: the soundtrack (as long as the video) is
interleaved with the video tokens.

Samples are chat messages in HF's multimodal format plus metadata:

    {"id": "train-00042", "task": "image_shape", "answer": "circle", "use_audio_in_video": False,
     "messages": [{"role": "user", "content": [{"type": "image", "image": <path or array>},
                                               {"type": "text", "text": "What shape is in the image?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]}

Video items carry `"fps"`; with `media_dir` given, media are written there (PNG, 16-bit WAV,
lossless FFV1+PCM Matroska) and items hold paths; without it they hold arrays (image (H, W, 3)
uint8, audio float32 at 16 kHz, video (T, H, W, 3) uint8 plus `"audio"` for a soundtrack).
Everything is a pure function of (seed, split, index): the train and eval splits use disjoint
random streams, and generating sample i never depends on how many others were generated.

Speech (`speech=SpokenAnswers(...)`, for talker training): each answer word has its own codec code
sequence (`answer_codes`: 3–6 frames, a pure function of the word), which the assistant turn carries as
its target speech; the av_* tasks cannot be spoken (their audio is interleaved with the video, which the
talker's positions do not place).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image, ImageDraw

from .media import SAMPLING_RATE, save_video, save_wav

__all__ = [
    "TASKS",
    "SHAPES",
    "COLOURS",
    "PITCHES",
    "DIRECTIONS",
    "ANSWERS",
    "SYSTEM_PROMPT",
    "SpokenAnswers",
    "answer_codes",
    "generate",
    "generate_sample",
    "corpus",
    "write_jsonl",
    "read_jsonl",
]

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
# Pitch classes two octaves apart from each other's neighbours: trivially separable in 128 mel bins.
PITCHES = {"bass": 200.0, "tenor": 400.0, "alto": 800.0, "soprano": 1600.0}
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ANIMALS = {"moo": "cow", "woof": "dog", "meow": "cat", "quack": "duck"}

QUESTIONS = {
    "image_shape": "What shape is in the image?",
    "image_colour": "What colour is the shape?",
    "audio_pitch": "Which pitch is the tone?",
    "video_motion": "Which way does the shape move?",
    "av_motion": "Which way does the shape move?",
    "av_pitch": "Which pitch is the sound in the video?",
    "image_position": "Where is the shape?",
}
ANSWERS = {
    "image_shape": SHAPES,
    "image_colour": tuple(COLOURS),
    "audio_pitch": tuple(PITCHES),
    "video_motion": tuple(DIRECTIONS),
    "av_motion": tuple(DIRECTIONS),
    "av_pitch": tuple(PITCHES),
    "text_arith": NUMBER_WORDS[:4],
    "text_animal": tuple(ANIMALS.values()),
    "image_position": tuple(DIRECTIONS),
}
# The main job's tasks (and the tiny tokenizer's corpus). `image_position` (a shape off centre: which way?) is
# for teaching something new afterwards (the LoRA demo): the main job never sees it.
TASKS = tuple(task for task in ANSWERS if task != "image_position")
SYSTEM_PROMPT = "You are a helpful assistant."

IMAGE_SIZE = 64
VIDEO_FRAMES = 4
VIDEO_FPS = 4.0
# Visual difficulty is sized for a tiny ViT trained from scratch in minutes (the main job): shapes
# large and near the centre (their outline, not their position, is the signal); moving shapes
# small and fast, so consecutive frames (one ViT tubelet) differ clearly.
SHAPE_RADIUS = (0.27, 0.33)  # fraction of the image size
SHAPE_JITTER = 6  # pixels the shape's centre may sit off the image centre, per axis
MOVER_RADIUS = (0.1, 0.125)
STEP = 12  # pixels per frame of motion
_SPLIT_STREAM = {"train": 0, "eval": 1}


# -------------------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(0, 60)
    return np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)


def _draw_shape(image: Image.Image, shape: str, cy: float, cx: float, r: float, colour) -> None:
    draw = ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = max(2.0, r / 2.5)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    else:
        raise ValueError(shape)


def _jitter_colour(rng: np.random.Generator, name: str) -> tuple:
    return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[name])


def make_image(
    rng: np.random.Generator, shape: str, colour: str, size: int = IMAGE_SIZE, off_centre: Optional[str] = None
) -> np.ndarray:
    """(size, size, 3) uint8: one shape of the colour, of random size near the centre, on a noisy background;
    `off_centre` (a direction): a smaller shape a quarter of the image away from the centre that way."""
    image = Image.fromarray(_background(rng, size))
    r = rng.uniform(size * SHAPE_RADIUS[0], size * SHAPE_RADIUS[1])
    cy, cx = size / 2 + rng.uniform(-SHAPE_JITTER, SHAPE_JITTER, 2)
    if off_centre is not None:
        r = rng.uniform(size * MOVER_RADIUS[0], size * MOVER_RADIUS[1]) * 1.5
        cy, cx = cy + DIRECTIONS[off_centre][0] * size / 4, cx + DIRECTIONS[off_centre][1] * size / 4
    _draw_shape(image, shape, cy, cx, r, _jitter_colour(rng, colour))
    return np.asarray(image)


def make_tone(rng: np.random.Generator, pitch: str, duration: float) -> np.ndarray:
    """Mono float32 at 16 kHz: the pitch class's tone (±3 %), a weaker 2nd harmonic, soft noise,
    10 ms fades; quantised to 16 bits."""
    n = int(round(duration * SAMPLING_RATE))
    t = np.arange(n) / SAMPLING_RATE
    f = PITCHES[pitch] * rng.uniform(0.97, 1.03)
    phase = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0.3, 0.6)
    wave = amp * (np.sin(2 * np.pi * f * t + phase) + 0.25 * np.sin(4 * np.pi * f * t + phase))
    wave += rng.normal(0, 0.01, n)
    fade = min(n // 2, int(0.01 * SAMPLING_RATE))
    ramp = np.linspace(0, 1, fade)
    wave[:fade] *= ramp
    wave[n - fade :] *= ramp[::-1]
    # on the 16-bit grid, so the WAV / Matroska copies decode to exactly these samples
    return (np.clip(np.round(wave * 32768), -32768, 32767) / 32768).astype(np.float32)


def make_video(rng: np.random.Generator, direction: str, frames: int = VIDEO_FRAMES, size: int = IMAGE_SIZE) -> np.ndarray:
    """(frames, size, size, 3) uint8: a random shape/colour moving STEP pixels per frame."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = tuple(COLOURS)[rng.integers(len(COLOURS))]
    fill = _jitter_colour(rng, colour)
    background = _background(rng, size)
    r = rng.uniform(size * MOVER_RADIUS[0], size * MOVER_RADIUS[1])
    dy, dx = DIRECTIONS[direction]
    travel = STEP * (frames - 1)
    lo, hi = r + 1, size - r - 1
    # start so that the whole path stays inside the frame
    y0 = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
    x0 = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
    out = []
    for i in range(frames):
        image = Image.fromarray(background.copy())
        _draw_shape(image, shape, y0 + dy * STEP * i, x0 + dx * STEP * i, r, fill)
        out.append(np.asarray(image))
    return np.stack(out)


# -------------------------------------------------------------------------------------- samples
def _rng(seed: int, split: str, index: int, task: str) -> np.random.Generator:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be one of {sorted(_SPLIT_STREAM)}, got {split!r}")
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index, list(ANSWERS).index(task)])


@dataclass(frozen=True)
class SpokenAnswers:
    """How answers are spoken: the talker's code groups and codebook size, and the speaker."""

    groups: int
    codebook: int
    speaker: str = "ethan"


def answer_codes(answer: str, groups: int, codebook: int) -> np.ndarray:
    """(groups, frames) codes of a spoken answer word: 3–6 frames, a pure function of the word."""
    key = zlib.crc32(answer.encode())
    return np.random.default_rng(key).integers(0, codebook, (groups, 3 + key % 4))


def _chat(user_content: list, answer: str, system: Optional[str]) -> list:
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    messages.append({"role": "user", "content": user_content})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def generate_sample(
    index: int,
    task: str,
    seed: int = 0,
    split: str = "train",
    media_dir: Optional[os.PathLike] = None,
    system: Optional[str] = None,
    speech: Optional[SpokenAnswers] = None,
) -> dict:
    """Sample `index` of `task` (deterministic in (seed, split, index, task)); with `speech`, the answer spoken."""
    if task not in ANSWERS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    if speech is not None and task.startswith("av_"):
        raise ValueError(f"task {task} cannot be spoken: its audio is interleaved with the video (use_audio_in_video), "
                         "which the talker's positions do not place; leave the av_* tasks out of a spoken set")
    rng = _rng(seed, split, index, task)
    sample_id = f"{split}-{index:06d}"
    answer = ANSWERS[task][rng.integers(len(ANSWERS[task]))]
    stem = Path(media_dir) / f"{sample_id}-{task}" if media_dir is not None else None
    use_audio_in_video = False

    if task in ("image_shape", "image_colour", "image_position"):
        if task == "image_shape":
            shape, colour = answer, tuple(COLOURS)[rng.integers(len(COLOURS))]
        elif task == "image_colour":
            shape, colour = SHAPES[rng.integers(len(SHAPES))], answer
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], tuple(COLOURS)[rng.integers(len(COLOURS))]
        pixels = make_image(rng, shape, colour, off_centre=answer if task == "image_position" else None)
        item = pixels
        if stem is not None:
            item = str(stem.with_suffix(".png"))
            Image.fromarray(pixels).save(item)
        content = [{"type": "image", "image": item}, {"type": "text", "text": QUESTIONS[task]}]
    elif task == "audio_pitch":
        tone = make_tone(rng, answer, duration=float(rng.choice([0.5, 0.75, 1.0])))
        item = tone
        if stem is not None:
            item = str(stem.with_suffix(".wav"))
            save_wav(item, tone)
        content = [{"type": "audio", "audio": item}, {"type": "text", "text": QUESTIONS[task]}]
    elif task in ("video_motion", "av_motion", "av_pitch"):
        if task == "av_pitch":
            pitch, direction = answer, tuple(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        else:
            direction, pitch = answer, tuple(PITCHES)[rng.integers(len(PITCHES))]
        frames = make_video(rng, direction)
        soundtrack = make_tone(rng, pitch, VIDEO_FRAMES / VIDEO_FPS) if task != "video_motion" else None
        use_audio_in_video = soundtrack is not None
        if stem is not None:
            path = str(stem.with_suffix(".mkv"))
            save_video(path, frames, VIDEO_FPS, soundtrack)
            video_item = {"type": "video", "video": path, "fps": VIDEO_FPS}
        else:
            video_item = {"type": "video", "video": frames, "fps": VIDEO_FPS}
            if soundtrack is not None:
                video_item["audio"] = soundtrack
        content = [video_item, {"type": "text", "text": QUESTIONS[task]}]
    elif task == "text_arith":
        target = NUMBER_WORDS.index(answer)
        a = int(rng.integers(10))
        b = int((target - a) % 4 + 4 * rng.integers(0, 3))
        b = b if b < 10 else b - 4
        content = [{"type": "text", "text": f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} modulo four?"}]
    elif task == "text_animal":
        sound = {v: k for k, v in ANIMALS.items()}[answer]
        content = [{"type": "text", "text": f"Which animal says {sound}?"}]
    messages = _chat(content, answer, system)
    if speech is not None:
        codes = answer_codes(answer, speech.groups, speech.codebook)
        messages[-1]["speech"] = {"codes": codes.tolist(), "speaker": speech.speaker}
    return {"id": sample_id, "task": task, "answer": answer, "use_audio_in_video": use_audio_in_video, "messages": messages}


def generate(
    num_samples: int,
    split: str = "train",
    seed: int = 0,
    tasks: Iterable[str] = TASKS,
    media_dir: Optional[os.PathLike] = None,
    system: Optional[str] = None,
) -> list[dict]:
    """`num_samples` samples cycling through `tasks` (sample i has task tasks[i % len(tasks)])."""
    tasks = tuple(tasks)
    if media_dir is not None:
        Path(media_dir).mkdir(parents=True, exist_ok=True)
    return [generate_sample(i, tasks[i % len(tasks)], seed, split, media_dir, system) for i in range(num_samples)]


def write_jsonl(samples: list[dict], path: os.PathLike) -> None:
    """Write file-backed samples (media as paths) one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, default=_no_arrays) + "\n")


def read_jsonl(path: os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _no_arrays(obj):
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable; generate with media_dir= to store media as files")


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every question and answer of the dataset, the system
    prompt, chat role names, and some plain English so other text still tokenizes compactly."""
    lines = [SYSTEM_PROMPT, "system", "user", "assistant"]
    lines += [QUESTIONS[task] for task in TASKS if task in QUESTIONS]
    lines += [" ".join(ANSWERS[task]) for task in TASKS]
    # answers follow "assistant\n", i.e. start a line: make each of them one token there
    lines += [word for task in TASKS for word in ANSWERS[task]] * 3
    lines += [f"What is {a} plus {b} modulo four?" for a in NUMBER_WORDS for b in NUMBER_WORDS]
    lines += [f"Which animal says {s}? The {a} says {s}." for s, a in ANIMALS.items()]
    lines += list(_ENGLISH)
    return lines


_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture shows a red circle, a green square, a blue triangle and a yellow cross.",
    "Listen to the sound and tell me what you hear in the audio clip.",
    "Watch the video and describe how the object moves from one frame to the next.",
    "Answer the question with a single word, please.",
    "This is a small model trained on synthetic data to check that the pipeline works.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000; symbols: + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
    "The left side, the right side, going up and coming down; first, second, third and last.",
    "Colour, color, shape, size, pitch, tone, voice, music, speech, image, video, audio, text.",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "def main():\n    return {'answer': 42}\n",
    "Qwen can see, hear and speak; it reads images, listens to audio and watches videos.",
)
