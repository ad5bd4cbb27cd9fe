"""Media loading without torchvision: images with PIL, audio and video with PyAV (FFmpeg's decoders:
every WAV variant, MP3, FLAC, Ogg/Opus, AAC/M4A, ... at any rate and channel count).

Images come out RGB and upright (EXIF orientation applied), audio mono float32 at 16 kHz, videos as
upright RGB frames on a uniform time grid (rotation metadata and variable frame rates handled).

Every failure to read a medium — missing file, unreadable, corrupt or truncated data, an empty
stream, a wrong array shape, an image or video frame the Qwen vision processors cannot take (a side
under `MIN_IMAGE_SIDE` pixels or an aspect ratio over `MAX_ASPECT_RATIO`) — raises `MediaError`
carrying the source and the reason, so a data pipeline can skip the sample with a warning instead
of dying in a worker.
"""

from __future__ import annotations

import io
import os
import struct
import wave
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageCms, ImageOps

__all__ = [
    "MediaError",
    "Video",
    "SAMPLING_RATE",
    "MIN_IMAGE_SIDE",
    "MAX_ASPECT_RATIO",
    "load_image",
    "load_audio",
    "load_video",
    "resample_audio",
    "save_wav",
    "save_video",
]

SAMPLING_RATE = 16000  # Whisper feature extractor / Qwen3-Omni audio encoder
# The Qwen ViT merges 2x2 patches of 16 px, so a side needs 32 px; HF's `smart_resize` raises a
# ValueError beyond an aspect ratio of 200 (the processors' MAX_RATIO).
MIN_IMAGE_SIDE = 32
MAX_ASPECT_RATIO = 200


class MediaError(Exception):
    """A medium could not be loaded. `source` names it (a path, or '<N bytes>'); `reason` says why."""

    def __init__(self, source: Any, reason: str):
        self.source = _describe(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")

    # Exceptions cross DataLoader worker processes by pickling; keep both fields on the way.
    def __reduce__(self):
        return (_rebuild_media_error, (self.source, self.reason))


def _rebuild_media_error(source, reason):
    err = MediaError.__new__(MediaError)
    err.source, err.reason = source, reason
    Exception.__init__(err, f"{source}: {reason}")
    return err


def _describe(source: Any) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"<{type(source).__name__}>"


def _is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


def _check_file(path) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file not found")
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty")


def _decoder_errors() -> tuple:
    import av

    # What PIL's and FFmpeg's parsers raise on malformed data; others (a TypeError: a bug here) propagate.
    return (av.FFmpegError, OSError, ValueError, EOFError, SyntaxError, struct.error, IndexError, KeyError,
            ZeroDivisionError, Image.DecompressionBombError)


@contextmanager
def _decoding(source: Any, what: str):
    """Turns a decoder's failure on the data into MediaError naming `what` could not be decoded."""
    try:
        yield
    except MediaError:
        raise
    except _decoder_errors() as err:
        cut = " (truncated?)" if isinstance(err, EOFError) else ""
        raise MediaError(source, f"cannot decode {what}{cut} ({type(err).__name__}: {err})") from err


def _check_size(source: Any, width: int, height: int, what: str) -> None:
    """Refuse pictures the Qwen vision processors cannot take, before HF's resize raises on them."""
    if width == 0 or height == 0:
        raise MediaError(source, f"{what} has no pixels")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise MediaError(source, f"{what} too small ({width}x{height}; each side needs ≥ {MIN_IMAGE_SIDE} px)")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(source, f"{what} aspect ratio {ratio:.0f}:1 ({width}x{height}) exceeds {MAX_ASPECT_RATIO}:1")


# ------------------------------------------------------------------------------------------ images
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every PIL mode: 16/32-bit grey scaled from the 16-bit range, "F" on PIL's 0–255 scale,
    transparency (alpha, palette or tRNS) composited onto white as Qwen's own loader does, CMYK /
    YCbCr / HSV through PIL, CIELAB through LittleCMS."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.round(grey).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.round(np.clip(np.nan_to_num(np.asarray(image)), 0, 255)).astype(np.uint8))
    elif image.mode == "LAB":
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, lab_to_srgb)
    if image.has_transparency_data:
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(source: Any) -> Image.Image:
    """An RGB PIL image, upright (EXIF orientation applied), from a path, encoded bytes, a PIL image
    or an (H, W[, C]) uint8 array. Refuses images the Qwen processors cannot take (`_check_size`)."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise MediaError(source, f"expected an (H, W[, 1|3|4]) uint8 array, got {source.dtype} {source.shape}")
        image = _to_rgb(Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source))
    elif isinstance(source, Image.Image) or _is_path(source) or isinstance(source, (bytes, bytearray)):
        if _is_path(source):
            _check_file(source)
        with _decoding(source, "image"):
            image = source
            if not isinstance(source, Image.Image):
                image = Image.open(source if _is_path(source) else io.BytesIO(source))
                image.load()  # decode now: truncated or corrupt data fails here, not later in a worker
            image = _to_rgb(ImageOps.exif_transpose(image))
    else:
        raise MediaError(source, "unsupported image source type")
    _check_size(source, image.width, image.height, "image")
    return image


# ------------------------------------------------------------------------------------------- audio
def resample_audio(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLING_RATE) -> np.ndarray:
    """Band-limited resampling in the frequency domain (ideal low-pass: content above the lower
    Nyquist frequency is dropped). Output length round(len · target / orig)."""
    audio = np.asarray(audio, dtype=np.float32)
    if orig_sr == target_sr or audio.size == 0:
        return audio
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sampling rates must be positive, got {orig_sr} → {target_sr}")
    n_in = audio.shape[-1]
    n_out = max(1, int(round(n_in * target_sr / orig_sr)))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    bins = n_out // 2 + 1
    if bins <= spectrum.shape[-1]:
        spectrum = spectrum[..., :bins].copy()
        if n_out % 2 == 0 and n_in > n_out:
            spectrum[..., -1] = spectrum[..., -1].real  # the new Nyquist bin must be real
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - spectrum.shape[-1], dtype=spectrum.dtype)])
    return (np.fft.irfft(spectrum, n_out) * (n_out / n_in)).astype(np.float32)


def _check_finite(samples: np.ndarray, source: Any) -> np.ndarray:
    if not np.all(np.isfinite(samples)):
        raise MediaError(source, "audio contains NaN or infinite samples")
    return samples


def _to_mono_float(samples: np.ndarray, source: Any) -> np.ndarray:
    samples = np.asarray(samples)
    if np.issubdtype(samples.dtype, np.integer):
        samples = samples.astype(np.float64) / float(np.iinfo(samples.dtype).max + 1)
    elif not np.issubdtype(samples.dtype, np.floating):
        raise MediaError(source, f"audio samples must be integers or floats, got {samples.dtype}")
    if samples.ndim == 2:  # (channels, samples) or (samples, channels): average the short axis
        samples = samples.mean(axis=0 if samples.shape[0] <= samples.shape[1] else 1)
    if samples.ndim != 1:
        raise MediaError(source, f"expected mono or (channels, samples) audio, got shape {samples.shape}")
    return _check_finite(samples.astype(np.float32), source)


def _decode_audio(container, source: Any, sampling_rate: int) -> np.ndarray:
    """The first audio stream as mono float32 at `sampling_rate`: FFmpeg's resampler turns every
    sample format into float at the target rate; channels are then averaged with equal weights (as
    for arrays; FFmpeg's own downmix would scale stereo by 1/√2 each). A stream whose format, layout
    or rate changes midway gets a fresh resampler for each part."""
    import av

    chunks, resampler, setup = [], None, None

    def mono(frames) -> list:
        return [out.to_ndarray().mean(axis=0) for out in frames]

    for frame in container.decode(container.streams.audio[0]):
        if (frame.format.name, frame.layout.name, frame.sample_rate) != setup:
            chunks += mono(resampler.resample(None)) if resampler else []
            resampler = av.AudioResampler(format="fltp", rate=sampling_rate)
            setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        chunks += mono(resampler.resample(frame))
    chunks += mono(resampler.resample(None)) if resampler else []
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise MediaError(source, "audio stream has no samples")
    return _check_finite(samples, source)


def load_audio(source: Any, sampling_rate: int = SAMPLING_RATE, source_rate: Optional[int] = None) -> np.ndarray:
    """Mono float32 audio at `sampling_rate`, from a path or encoded bytes (any format FFmpeg reads,
    video soundtracks included, decoded with PyAV), a float/int array (`source_rate` says its rate,
    default `sampling_rate`), `(array, rate)` or `{"array": ..., "sampling_rate": ...}`."""
    if isinstance(source, dict) and "array" in source:
        return load_audio(source["array"], sampling_rate, source.get("sampling_rate", source_rate))
    if isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        return load_audio(source[0], sampling_rate, int(source[1]))
    if isinstance(source, (np.ndarray, list)):
        samples = _to_mono_float(np.asarray(source), source)
        if samples.size == 0:
            raise MediaError(source, "audio has no samples")
        return resample_audio(samples, source_rate or sampling_rate, sampling_rate)
    if not (_is_path(source) or isinstance(source, (bytes, bytearray))):
        raise MediaError(source, "unsupported audio source type")
    return _with_container(source, lambda c: _decode_audio(c, source, sampling_rate), need="audio")


# ------------------------------------------------------------------------------------------- video
@dataclass
class Video:
    """Decoded frames (T, H, W, 3) uint8 at `fps` frames per second (of the sampled frames), and the
    soundtrack as mono float32 at `sampling_rate` when there is one (and it was asked for)."""

    frames: np.ndarray
    fps: float
    audio: Optional[np.ndarray] = None
    sampling_rate: int = SAMPLING_RATE

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


def _head_and_size(source: Any) -> tuple[bytes, int]:
    if not _is_path(source):
        return bytes(source[:12]), len(source)
    with open(source, "rb") as f:
        return f.read(12), os.path.getsize(source)


def _check_not_cut_short(source: Any, head: bytes, size: int) -> None:
    """RIFF (WAV, AVI) and FORM (AIFF) files state their length in their first 8 bytes. FFmpeg
    quietly decodes whatever part of a cut-off one is there; refuse it instead."""
    if head[:4] not in (b"RIFF", b"FORM") or len(head) < 8:
        return
    stated = int.from_bytes(head[4:8], "little" if head[:4] == b"RIFF" else "big")
    if stated in (0, 0xFFFFFFFF):  # written by a streaming muxer: length unknown
        return
    if size < stated + 8 - 1:  # - 1: a missing final pad byte loses nothing
        raise MediaError(source, f"file is truncated ({size} of the {stated + 8} bytes its header states)")


def _with_container(source: Any, fn, need: str):
    """`fn(container)` on the file or bytes opened with PyAV, with every decoding failure → MediaError."""
    import av

    if _is_path(source):
        _check_file(source)
    head, size = _head_and_size(source)
    _check_not_cut_short(source, head, size)
    what = "WAV" if head[:4] == b"RIFF" and head[8:12] == b"WAVE" else need
    with _decoding(source, what):
        # metadata_errors: a tag in another encoding than UTF-8 must not fail an otherwise valid file
        with av.open(os.fspath(source) if _is_path(source) else io.BytesIO(source), "r", metadata_errors="ignore") as container:
            if need == "video" and not container.streams.video:
                raise MediaError(source, "no video stream")
            if need == "audio" and not container.streams.audio:
                raise MediaError(source, "no audio stream")
            return fn(container)


def _display_matrix(frame) -> Optional[np.ndarray]:
    from av.sidedata.sidedata import Type

    for side_data in frame.side_data:
        if side_data.type == Type.DISPLAYMATRIX:
            return np.frombuffer(bytes(side_data), np.int32)
    return None


def _upright(frame, matrix: Optional[np.ndarray], width: int, height: int, source: Any) -> np.ndarray:
    """The frame as (H, W, 3) RGB at the stream's first size, turned/mirrored as the stream's display
    matrix says. FFmpeg's matrix maps a stored pixel (x, y) to the displayed (a·x + c·y, b·x + d·y)."""
    # One swscale thread: a frame whose side data was read sits in a reference cycle with PyAV's side-data
    # object until the garbage collector's next full pass, and kept its converter's threads with it: a few
    # per video, thousands after a few thousand samples in a training process, until thread creation
    # failed (EAGAIN) and the job aborted. The DataLoader's workers are what parallelise decoding.
    rgb = frame.to_ndarray(format="rgb24", width=width, height=height, threads=1)
    if matrix is None:
        return rgb
    a, b, c, d = (int(v) for v in matrix[[0, 1, 3, 4]])
    if b == 0 and c == 0:  # axes kept: x' = a·x, y' = d·y
        flip_rows, flip_cols = d < 0, a < 0
    elif a == 0 and d == 0:  # axes swapped: x' = c·y, y' = b·x
        rgb, flip_rows, flip_cols = rgb.transpose(1, 0, 2), b < 0, c < 0
    else:
        raise MediaError(source, f"video display matrix {matrix.tolist()} is not a quarter turn or mirror; only those are supported")
    if flip_rows:
        rgb = rgb[::-1]
    if flip_cols:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


def _frame_times(frames: list, stream) -> tuple[np.ndarray, float]:
    """Presentation times (s, from 0) of the decoded frames, and the video's duration (the last
    frame lasts the median frame interval). Intervals all within 5% of their mean are a constant
    rate whose timestamps the container rounded (Matroska keeps milliseconds): evenly spaced times
    are used then. Frames without usable timestamps (missing or not increasing) are taken as evenly
    spaced at the stream's nominal rate."""
    times = np.array([f.time if f.time is not None else np.nan for f in frames], dtype=np.float64)
    if np.isnan(times).any() or (np.diff(times) <= 0).any():
        rate = float(stream.average_rate or stream.guessed_rate or 1)
        return np.arange(len(frames)) / rate, len(frames) / rate
    if len(frames) == 1:
        only, nominal = frames[0], stream.average_rate or stream.guessed_rate
        last = float(only.duration * only.time_base) if only.duration else (1 / float(nominal) if nominal else 1.0)
        return np.zeros(1), last
    intervals = np.diff(times)
    mean = (times[-1] - times[0]) / (len(frames) - 1)
    if np.abs(intervals - mean).max() <= 0.05 * mean:
        return np.arange(len(frames)) * mean, len(frames) * mean
    times -= times[0]
    return times, float(times[-1] + np.median(intervals))


def _sample_times(times: np.ndarray, duration: float, num_frames: Optional[int], fps: Optional[float], source: Any):
    """Indices of the frames shown at the times of a uniform grid, and the grid's rate: `num_frames`
    over the duration (for evenly spaced frames HF's `arange(0, T, T / n)` pick), else `fps` frames
    per second, else as many frames as there are at their average rate (a variable-rate video comes
    out at a constant rate, frames repeated or dropped as a player would show them)."""
    total = len(times)
    if num_frames is not None:
        wanted, step = int(num_frames), duration / max(int(num_frames), 1)
    elif fps is not None:
        if fps <= 0:
            raise MediaError(source, f"fps must be positive, got {fps}")
        wanted, step = max(1, int(round(duration * fps))), 1.0 / fps
    else:
        wanted, step = total, duration / total
    if wanted <= 0 or wanted > total:
        raise MediaError(source, f"cannot take {wanted} frames from {total}")
    grid = np.arange(wanted) * step + 1e-3 * duration / total  # tolerance: float rounding of the times
    index = np.clip(np.searchsorted(times, grid, side="right") - 1, 0, total - 1)
    return index, 1.0 / step


def _frames_from_array(source: Any) -> np.ndarray:
    if isinstance(source, (list, tuple)):
        frames = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in source]
        if not frames or any(f.shape != frames[0].shape for f in frames):
            raise MediaError(source, "frames must be a non-empty list of equally sized images")
        source = np.stack(frames)
    frames = np.asarray(source)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise MediaError(source, f"expected (T, H, W, 3) uint8 frames, got {frames.dtype} {frames.shape}")
    return frames


def load_video(
    source: Any,
    num_frames: Optional[int] = None,
    fps: Optional[float] = None,
    with_audio: bool = False,
    sampling_rate: int = SAMPLING_RATE,
) -> Video:
    """Upright RGB frames of a video file/bytes (decoded with PyAV; rotation metadata applied, every
    frame at the first frame's size) or of a (T, H, W, 3) uint8 array / list of frames (`fps` is then
    the frames' rate, default 1). `num_frames` picks that many frames evenly over the duration (for a
    constant-rate video HF's `torch.arange(0, T, T / n).int()` rule), else `fps` (files only)
    resamples to that many frames per second, else all frames (a variable-rate file: on a uniform
    grid at its average rate). `with_audio` also returns the soundtrack (None when the file has none)."""
    if not (_is_path(source) or isinstance(source, (bytes, bytearray))):
        frames = _frames_from_array(source)
        rate = float(fps or 1.0)
        index, rate = _sample_times(np.arange(len(frames)) / rate, len(frames) / rate, num_frames, None, source)
        frames = frames[index]
        _check_size(source, frames.shape[2], frames.shape[1], "video frame")
        return Video(frames, rate, None, sampling_rate)

    def decode(container) -> Video:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        if not decoded:
            raise MediaError(source, "video stream has no frames")
        times, duration = _frame_times(decoded, stream)
        index, rate = _sample_times(times, duration, num_frames, fps, source)
        width, height = decoded[0].width, decoded[0].height
        matrix = _display_matrix(decoded[0])  # the stream's; read once (see _upright)
        upright = {i: _upright(decoded[i], matrix, width, height, source) for i in np.unique(index)}
        return Video(np.stack([upright[i] for i in index]), rate)

    video = _with_container(source, decode, need="video")
    _check_size(source, video.frames.shape[2], video.frames.shape[1], "video frame")
    if with_audio:
        try:
            video.audio = _with_container(source, lambda c: _decode_audio(c, source, sampling_rate), need="audio")
        except MediaError as err:
            if err.reason != "no audio stream":
                raise
    video.sampling_rate = sampling_rate
    return video


# ------------------------------------------------------------------------------------------ writing
def _to_pcm16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def save_wav(path, audio: np.ndarray, sampling_rate: int = SAMPLING_RATE) -> None:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV (to a path or a binary file object).
    Samples are scaled by 32768, the inverse of how `load_audio` reads them, so audio already on
    the 16-bit grid (k / 32768) round-trips exactly."""
    pcm = _to_pcm16(audio).astype("<i2")
    with wave.open(path if hasattr(path, "write") else os.fspath(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sampling_rate)
        wav.writeframes(pcm.tobytes())


def save_video(path, frames: np.ndarray, fps: float, audio: Optional[np.ndarray] = None, sampling_rate: int = SAMPLING_RATE) -> None:
    """Write (T, H, W, 3) uint8 frames losslessly (FFV1, RGB) in Matroska, with an optional mono
    16-bit PCM soundtrack; decoding gives back exactly `frames` (and the audio as `save_wav` does)."""
    import av
    from fractions import Fraction

    frames = _frames_from_array(frames)
    with av.open(os.fspath(path), "w", format="matroska") as out:
        vstream = out.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1000))
        vstream.width, vstream.height, vstream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        astream = None
        if audio is not None:
            astream = out.add_stream("pcm_s16le", rate=sampling_rate)
            astream.layout = "mono"
        for frame in frames:
            out.mux(vstream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(vstream.encode())
        if astream is not None:
            pcm = _to_pcm16(audio)
            chunk = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            chunk.sample_rate = sampling_rate
            out.mux(astream.encode(chunk))
            out.mux(astream.encode())
