"""Real-world media through `encode_sample`: files the loaders refuse (too small / too elongated
images, too-short or truncated audio, non-media bytes) surface as MediaError naming the reason and
the sample is skipped with a warning, never another exception; ordinary files of other formats
(mu-law WAV, 48 kHz stereo FLAC, a rotated phone-style MP4 with AAC sound) encode."""

import logging

import av
import numpy as np
import pytest
from PIL import Image

from veomni_omni.data.media import MediaError
from veomni_omni.data.samples import encode_or_skip, encode_sample
from veomni_omni.tiny import TOKENS


def _tone(seconds, rate=48000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _audio_file(path, codec, container, seconds):
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=48000)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([_tone(seconds)] * 2), format="fltp", layout="stereo")
        frame.sample_rate = 48000
        converter = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="stereo", rate=48000)
        for converted in converter.resample(frame) + converter.resample(None):
            out.mux(stream.encode(converted))
        out.mux(stream.encode())


def _phone_video(path):
    """An H.264/AAC MP4 with a 90° display rotation, as phones write them."""
    with av.open(str(path), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=4)
        video.width, video.height, video.pix_fmt = 96, 64, "yuv420p"
        video.set_display_rotation(-90)
        sound = out.add_stream("aac", rate=48000)
        sound.layout = "mono"
        for i in range(4):
            pixels = np.full((64, 96, 3), 60 * i, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        out.mux(video.encode())
        chunk = av.AudioFrame.from_ndarray(_tone(1.0)[None], format="fltp", layout="mono")
        chunk.sample_rate = 48000
        out.mux(sound.encode(chunk))
        out.mux(sound.encode())


def _sample(part, use_audio_in_video=False):
    return {"id": "real-1", "use_audio_in_video": use_audio_in_video, "messages": [
        {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "a tone"}]}


def _png(tmp_path, name, size):
    Image.new("RGB", size, (200, 10, 10)).save(tmp_path / name)
    return name


def test_refused_media_are_media_errors_and_skipped(processor, config, tmp_path, caplog):
    _audio_file(tmp_path / "blip.wav", "pcm_s16le", "wav", 0.01)  # 160 samples at 16 kHz
    _audio_file(tmp_path / "long.wav", "pcm_s16le", "wav", 0.5)
    data = (tmp_path / "long.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    noise = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for name in ("noise.mp4", "noise.wav", "noise.png"):
        (tmp_path / name).write_bytes(noise)
    bad = [
        ({"type": "image", "image": _png(tmp_path, "line.png", (2000, 1))}, "image too small (2000x1"),
        ({"type": "image", "image": _png(tmp_path, "icon.png", (8, 8))}, "image too small (8x8"),
        ({"type": "image", "image": _png(tmp_path, "strip.png", (32, 7000))}, "aspect ratio 219:1"),
        ({"type": "image", "image": "noise.png"}, "cannot decode image"),
        ({"type": "audio", "audio": "blip.wav"}, "audio too short (160 samples < 400"),
        ({"type": "audio", "audio": "cut.wav"}, "file is truncated"),
        ({"type": "audio", "audio": "noise.wav"}, "cannot decode audio"),
        ({"type": "video", "video": "noise.mp4"}, "cannot decode video"),
    ]
    for part, reason in bad:
        with pytest.raises(MediaError, match=reason.replace("(", r"\(")):
            encode_sample(_sample(part), processor, config, media_root=str(tmp_path))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="veomni_omni.data.samples"):
            assert encode_or_skip(_sample(part), processor, config, media_root=str(tmp_path)) is None
        assert "real-1" in caplog.text and reason in caplog.text


def test_ordinary_files_of_other_formats_encode(processor, config, tmp_path):
    _audio_file(tmp_path / "call.wav", "pcm_mulaw", "wav", 1.0)
    _audio_file(tmp_path / "song.flac", "flac", "flac", 1.0)
    _phone_video(tmp_path / "phone.mp4")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96 wide, 64 high; upright 64 wide, 96 high
    Image.new("RGB", (96, 64), (0, 90, 200)).save(tmp_path / "photo.jpg", exif=exif)
    counts = {}
    for name, part, aiv in [
        ("mulaw", {"type": "audio", "audio": "call.wav"}, False),
        ("flac", {"type": "audio", "audio": "song.flac"}, False),
        ("photo", {"type": "image", "image": "photo.jpg"}, False),
        ("phone", {"type": "video", "video": "phone.mp4"}, True),
    ]:
        out = encode_sample(_sample(part, aiv), processor, config, media_root=str(tmp_path))
        counts[name] = {kind: int((out["input_ids"] == TOKENS[kind]).sum()) for kind in ("image", "video", "audio")}
        if name == "photo":
            assert out["image_grid_thw"].tolist() == [[1, 6, 4]]  # 96 high x 64 wide in 16 px patches: upright
        if name == "phone":
            t, h, w = out["video_grid_thw"][0].tolist()
            assert (h, w) == (6, 4)  # upright: taller than wide
    assert counts["mulaw"]["audio"] == counts["flac"]["audio"] > 0  # 1 s each at 16 kHz
    assert counts["phone"]["video"] > 0 and counts["phone"]["audio"] > 0
