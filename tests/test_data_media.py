"""Media loading: lossless round trips, resampling, and MediaError for every way a medium is bad."""

import io
import pickle
import wave

import numpy as np
import pytest
from PIL import Image

from veomni_omni.data.media import (
    MediaError, load_audio, load_image, load_video, resample_audio, save_video, save_wav,
)


def _tone(freq, seconds, rate):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * rate / len(audio)


def test_image_sources_agree(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(pixels).save(path)
    for source in (path, str(path), path.read_bytes(), Image.fromarray(pixels), pixels):
        image = load_image(source)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels)
    assert load_image(Image.fromarray(pixels).convert("L")).mode == "RGB"


def test_audio_wav_widths_resampling_and_arrays(tmp_path):
    tone = _tone(440, 0.5, 16000)
    path = tmp_path / "a.wav"
    save_wav(path, tone)
    np.testing.assert_allclose(load_audio(path), tone, atol=1 / 32767)
    on_grid = np.round(tone * 32768) / 32768
    save_wav(path, on_grid)
    np.testing.assert_array_equal(load_audio(path), on_grid)  # 16-bit audio round-trips exactly
    for width, dtype in ((2, "<i2"), (4, "<i4")):
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(width)
            w.setframerate(8000)
            pcm = (np.repeat(_tone(300, 0.5, 8000)[:, None], 2, 1) * np.iinfo(dtype).max).astype(dtype)
            w.writeframes(pcm.tobytes())
        audio = load_audio(buf.getvalue())
        assert audio.dtype == np.float32 and len(audio) == 8000  # resampled 8k → 16k
        assert abs(_peak_hz(audio, 16000) - 300) < 3
    down = resample_audio(_tone(1000, 1.0, 44100), 44100)
    assert len(down) == 16000 and abs(_peak_hz(down, 16000) - 1000) < 2
    assert np.abs(resample_audio(_tone(12000, 1.0, 48000), 48000)).max() < 1e-3  # above 8 kHz: removed
    np.testing.assert_array_equal(load_audio((tone, 16000)), tone)
    assert len(load_audio({"array": tone, "sampling_rate": 8000})) == 2 * len(tone)


def test_video_round_trip_with_soundtrack(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (6, 32, 64, 3), dtype=np.uint8)
    soundtrack = _tone(500, 1.5, 16000)
    path = tmp_path / "v.mkv"
    save_video(path, frames, fps=4.0, audio=soundtrack)
    video = load_video(path, with_audio=True)
    assert np.array_equal(video.frames, frames) and video.fps == 4.0
    np.testing.assert_allclose(video.audio, soundtrack, atol=1 / 32767)
    assert load_video(path).audio is None
    two = load_video(path.read_bytes(), num_frames=2)
    assert np.array_equal(two.frames, frames[[0, 3]]) and two.fps == pytest.approx(4.0 / 3)
    assert np.array_equal(load_video(path, fps=2.0).frames, frames[[0, 2, 4]])
    silent = tmp_path / "s.mkv"
    save_video(silent, frames, fps=2.0)
    assert load_video(silent, with_audio=True).audio is None
    assert np.array_equal(load_video(list(frames), fps=3).frames, frames)
    sub = load_video(frames, num_frames=3, fps=6)  # 1 s of frames at 6 fps: 3 of them are 3 per second
    assert np.array_equal(sub.frames, frames[[0, 2, 4]]) and sub.fps == 3.0


def _bad_media(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    wav = io.BytesIO()
    save_wav(wav, _tone(440, 0.2, 16000))
    good_video = tmp_path / "good.mkv"
    save_video(good_video, np.zeros((4, 16, 16, 3), np.uint8), 4.0)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (tmp_path / "cut.wav").write_bytes(wav.getvalue()[:1000])
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "junk.mp3").write_bytes(b"\x00\x01garbage" * 50)
    (tmp_path / "junk.mkv").write_bytes(good_video.read_bytes()[:200])
    (tmp_path / "dir.png").mkdir()
    return [
        (load_image, tmp_path / "missing.png", "not found"),
        (load_image, tmp_path / "dir.png", "not a regular file"),
        (load_image, tmp_path / "empty.png", "empty"),
        (load_image, tmp_path / "junk.png", "cannot decode image"),
        (load_image, tmp_path / "cut.png", "cannot decode image"),
        (load_image, b"\x89PNG garbage", "cannot decode image"),
        (load_image, np.zeros((4, 4), np.float32), "uint8"),
        (load_audio, tmp_path / "missing.wav", "not found"),
        (load_audio, tmp_path / "cut.wav", "truncated"),
        (load_audio, tmp_path / "junk.wav", "cannot decode WAV"),
        (load_audio, tmp_path / "junk.mp3", "cannot decode audio"),
        (load_audio, np.full(100, np.nan, np.float32), "NaN"),
        (load_audio, good_video, "no audio stream"),
        (load_video, tmp_path / "missing.mkv", "not found"),
        (load_video, tmp_path / "junk.mkv", "cannot decode video"),
        (load_video, tmp_path / "junk.png", "cannot decode video"),
        (load_video, np.zeros((2, 8, 8), np.uint8), "(T, H, W, 3) uint8"),
    ]


def test_bad_media_raise_media_error_with_source_and_reason(tmp_path):
    for loader, source, reason in _bad_media(tmp_path):
        with pytest.raises(MediaError) as info:
            loader(source)
        err = info.value
        assert reason in err.reason, (loader.__name__, source, err.reason)
        if not isinstance(source, np.ndarray):
            expected = f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
            assert err.source == expected and expected in str(err)
    clone = pickle.loads(pickle.dumps(err))  # survives DataLoader workers
    assert (clone.source, clone.reason) == (err.source, err.reason)
