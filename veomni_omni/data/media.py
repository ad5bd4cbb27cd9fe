"""Media loading without torchvision: images (PIL), audio (WAV via the stdlib, anything else via
PyAV; resampled to 16 kHz with NumPy) and video (PyAV, or frame arrays given directly).

Every failure to read a medium — missing file, unreadable or corrupt data, an empty stream, a
wrong array shape — raises `MediaError` carrying the source and the reason, so a data pipeline can
skip the sample with a warning instead of dying in a worker.
"""

from __future__ import annotations

import io
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "MediaError",
    "Video",
    "SAMPLING_RATE",
    "load_image",
    "load_audio",
    "load_video",
    "resample_audio",
    "save_wav",
    "save_video",
]

SAMPLING_RATE = 16000  # Whisper feature extractor / Qwen3-Omni audio encoder

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


# ------------------------------------------------------------------------------------------ images
def load_image(source: Any) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes, a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (1, 3, 4)):
            raise MediaError(source, f"expected an (H, W[, 1|3|4]) uint8 array, got {source.dtype} {source.shape}")
        image = Image.fromarray(source[..., 0] if source.ndim == 3 and source.shape[2] == 1 else source)
    elif _is_path(source) or isinstance(source, (bytes, bytearray)):
        if _is_path(source):
            _check_file(source)
        try:
            image = Image.open(source if _is_path(source) else io.BytesIO(source))
            image.load()  # decode now: truncated or corrupt data fails here, not later in a worker
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise MediaError(source, f"cannot decode image ({err})") from err
    else:
        raise MediaError(source, "unsupported image source type")
    if image.width == 0 or image.height == 0:
        raise MediaError(source, "image has no pixels")
    return image if image.mode == "RGB" else image.convert("RGB")


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
    samples = samples.astype(np.float32)
    if not np.all(np.isfinite(samples)):
        raise MediaError(source, "audio contains NaN or infinite samples")
    return samples


def _read_wav(data: bytes, source: Any) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data)) as wav:
            width, channels, rate, n = wav.getsampwidth(), wav.getnchannels(), wav.getframerate(), wav.getnframes()
            raw = wav.readframes(n)
    except (wave.Error, EOFError, ValueError) as err:
        raise MediaError(source, f"cannot decode WAV ({err})") from err
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.int16) - 128) * 256
    elif width == 2:
        samples = np.frombuffer(raw, "<i2")
    elif width == 3:
        b = np.frombuffer(raw, np.uint8)
        b = b[: len(b) // 3 * 3].reshape(-1, 3)
        samples = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int32) << 16))
        samples = (samples << 8).astype(np.int32)  # sign-extend 24 → 32 bit
    elif width == 4:
        samples = np.frombuffer(raw, "<i4")
    else:
        raise MediaError(source, f"unsupported WAV sample width {width}")
    usable = len(samples) // channels * channels
    if usable == 0:
        raise MediaError(source, "WAV has no samples")
    if usable != n * channels:
        raise MediaError(source, f"WAV is truncated ({usable // channels} of {n} frames present)")
    return samples[:usable].reshape(-1, channels).T, rate


def _decode_audio_stream(container, source: Any) -> tuple[np.ndarray, int]:
    stream = container.streams.audio[0]
    chunks, rate = [], stream.rate
    for frame in container.decode(stream):
        data = frame.to_ndarray()
        if frame.format.is_planar:
            data = data.reshape(len(frame.layout.channels), -1)
        else:
            data = data.reshape(-1, len(frame.layout.channels)).T
        if np.issubdtype(data.dtype, np.integer):
            data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
        chunks.append(data.astype(np.float32))
        rate = frame.sample_rate or rate
    if not chunks:
        raise MediaError(source, "audio stream has no samples")
    return np.concatenate(chunks, axis=1), int(rate)


def load_audio(source: Any, sampling_rate: int = SAMPLING_RATE, source_rate: Optional[int] = None) -> np.ndarray:
    """Mono float32 audio at `sampling_rate`, from a path or encoded bytes (WAV read directly, other
    formats and video soundtracks via PyAV), a float/int array (`source_rate` says its rate, default
    `sampling_rate`), `(array, rate)` or `{"array": ..., "sampling_rate": ...}`."""
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
    if _is_path(source):
        _check_file(source)
        data = Path(source).read_bytes()
    else:
        data = bytes(source)
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        samples, rate = _read_wav(data, source)
    else:
        samples, rate = _with_container(source, data, lambda c: _decode_audio_stream(c, source), need="audio")
    return resample_audio(_to_mono_float(samples, source), rate, sampling_rate)


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


def _with_container(source: Any, data: Optional[bytes], fn, need: str):
    import av

    try:
        with av.open(io.BytesIO(data) if data is not None else os.fspath(source), "r") as container:
            if need == "video" and not container.streams.video:
                raise MediaError(source, "no video stream")
            if need == "audio" and not container.streams.audio:
                raise MediaError(source, "no audio stream")
            return fn(container)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as err:
        raise MediaError(source, f"cannot decode {need} ({type(err).__name__}: {err})") from err


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
    """Frames of a video file/bytes (decoded with PyAV) or of a (T, H, W, 3) uint8 array / list of
    frames (`fps` is then the frames' rate, default 1). For files, `num_frames` picks that many frames
    uniformly (HF's `torch.arange(0, T, T / n).int()` rule), else all frames; `fps` (files only)
    resamples to that many frames per second. `with_audio` also returns the soundtrack (None when
    the file has none)."""
    if not (_is_path(source) or isinstance(source, (bytes, bytearray))):
        frames = _frames_from_array(source)
        if num_frames is not None:
            frames = frames[_uniform_indices(len(frames), num_frames, source)]
        return Video(frames, float(fps or 1.0), None, sampling_rate)
    if _is_path(source):
        _check_file(source)
    data = None if _is_path(source) else bytes(source)

    def decode(container) -> Video:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            raise MediaError(source, "video stream has no frames")
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if rate is None:
            duration = float(stream.duration * stream.time_base) if stream.duration else None
            rate = len(frames) / duration if duration else 1.0
        return Video(np.stack(frames), rate)

    video = _with_container(source, data, decode, need="video")
    if fps is not None and num_frames is None:
        num_frames = max(1, int(round(len(video.frames) / video.fps * fps)))
    if num_frames is not None:
        idx = _uniform_indices(len(video.frames), num_frames, source)
        video = Video(video.frames[idx], video.fps * len(idx) / len(video.frames))
    if with_audio:
        try:
            samples, rate = _with_container(source, data, lambda c: _decode_audio_stream(c, source), need="audio")
        except MediaError as err:
            if err.reason != "no audio stream":
                raise
        else:
            video.audio = resample_audio(_to_mono_float(samples, source), rate, sampling_rate)
    video.sampling_rate = sampling_rate
    return video


def _uniform_indices(total: int, wanted: int, source: Any) -> np.ndarray:
    if wanted <= 0 or wanted > total:
        raise MediaError(source, f"cannot take {wanted} frames from {total}")
    return np.floor(np.arange(wanted, dtype=np.float64) * (total / wanted)).astype(np.int64)


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
