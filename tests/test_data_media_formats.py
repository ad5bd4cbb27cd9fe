"""Real-world media through the data path: every WAV variant and the common compressed audio codecs
at 48 kHz stereo, every PIL image mode, EXIF orientation, rotated / variable-rate / odd-sized videos,
and truncated or non-media files. The files are written here with PyAV and PIL; the decoded values
are checked (pitch, level, channel mix, pixel colours, marker positions, frame order)."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from veomni_omni.data.media import MediaError, load_audio, load_image, load_video

RATE = 48000


def _tone(freq, seconds=1.0, rate=RATE, amplitude=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _amplitude_at(audio, freq, rate=16000):
    """Amplitude of the sinusoid at `freq` (Hann-windowed spectrum, corrected for the window's gain)."""
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    bin_ = int(round(freq * len(audio) / rate))
    return spectrum[bin_ - 2 : bin_ + 3].max() * 4 / len(audio)


def _peak_hz(audio, rate=16000):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.argmax(spectrum) * rate / len(audio)


def _encoder(codec):
    try:
        av.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        pytest.skip(f"PyAV's FFmpeg has no {codec} encoder")


def _write_audio(codec, channels, container_format, rate=RATE, layout=None):
    """Bytes of a file holding `channels` (a (C, N) float array) encoded with `codec`."""
    _encoder(codec)
    buf = io.BytesIO()
    with av.open(buf, "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout or {1: "mono", 2: "stereo"}[len(channels)]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, np.float32), format="fltp", layout=stream.layout.name)
        frame.sample_rate = rate
        # the encoder's own sample format, through FFmpeg's converter
        converter = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=stream.layout.name, rate=rate)
        for converted in converter.resample(frame) + converter.resample(None):
            out.mux(stream.encode(converted))
        out.mux(stream.encode())
    return buf.getvalue()


def _stereo_440_1000():
    """Left 440 Hz, right 1 kHz, each at amplitude 0.5: an equal-weight mono mix holds both at 0.25."""
    return np.stack([_tone(440), _tone(1000)])


# (codec, bits of the WAV's fmt chunk, extensible format tag expected?)
WAV_VARIANTS = [
    ("pcm_u8", 8, False),
    ("pcm_s16le", 16, False),
    ("pcm_s24le", 24, True),
    ("pcm_s32le", 32, True),
    ("pcm_f32le", 32, False),
    ("pcm_f64le", 64, False),
    ("pcm_mulaw", 8, False),
    ("pcm_alaw", 8, False),
]


@pytest.mark.parametrize("codec,bits,extensible", WAV_VARIANTS)
def test_wav_variants_48k_stereo_decode_to_a_16k_equal_weight_mix(codec, bits, extensible):
    data = _write_audio(codec, _stereo_440_1000(), "wav")
    format_tag = int.from_bytes(data[20:22], "little")
    assert int.from_bytes(data[34:36], "little") == bits
    assert (format_tag == 0xFFFE) == extensible  # WAVE_FORMAT_EXTENSIBLE for > 16-bit integer PCM
    audio = load_audio(data)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == 16000  # 1 s at 48 kHz → 16 kHz
    coarse = codec in ("pcm_u8", "pcm_mulaw", "pcm_alaw")  # 8-bit codes: ~1% quantisation
    for freq in (440, 1000):
        assert _amplitude_at(audio, freq) == pytest.approx(0.25, rel=0.03 if coarse else 0.01), freq
    # the decoded signal itself, not only its spectrum: equal to the mix of the two tones at 16 kHz
    expected = (_tone(440, rate=16000) + _tone(1000, rate=16000)) / 2
    middle = slice(200, -200)  # away from the resampler's edges
    assert np.abs(audio[middle] - expected[middle]).max() < (0.02 if coarse else 2e-3)


def test_extensible_5_1_wav_is_averaged_over_its_channels():
    channels = np.stack([_tone(440)] * 3 + [np.zeros(RATE, np.float32)] * 3)  # FL FR FC tone, LFE BL BR silent
    data = _write_audio("pcm_s16le", channels, "wav", layout="5.1")
    assert int.from_bytes(data[20:22], "little") == 0xFFFE
    audio = load_audio(data)
    assert _peak_hz(audio) == pytest.approx(440, abs=2)
    assert _amplitude_at(audio, 440) == pytest.approx(0.25, rel=0.01)  # 3 of 6 channels carry 0.5


# (codec, container, file rate): compressed formats as users have them
COMPRESSED = [
    ("libmp3lame", "mp3", 44100),
    ("flac", "flac", 48000),
    ("libopus", "ogg", 48000),
    ("aac", "ipod", 48000),  # .m4a
    ("aac", "adts", 22050),
]


@pytest.mark.parametrize("codec,container,rate", COMPRESSED)
def test_compressed_audio_decodes_to_the_tones(codec, container, rate):
    channels = np.stack([_tone(440, 2.0, rate), _tone(1000, 2.0, rate)])
    audio = load_audio(_write_audio(codec, channels, container, rate=rate))
    # encoder delay / padding adds at most a few codec frames
    assert 32000 <= len(audio) <= 32000 + 2048, len(audio)
    for freq in (440, 1000):
        assert _amplitude_at(audio[:32000], freq) == pytest.approx(0.25, rel=0.1), freq  # lossy codecs


def test_rate_and_layout_changing_midstream():
    """Concatenated ADTS streams (22.05 kHz mono, then 44.1 kHz stereo) decode as one clip."""
    first = _write_audio("aac", _tone(440, 1.0, 22050)[None], "adts", rate=22050)
    second = _write_audio("aac", np.stack([_tone(1000, 1.0, 44100)] * 2), "adts", rate=44100)
    audio = load_audio(first + second)
    assert 32000 <= len(audio) <= 32000 + 2048
    first_half, second_half = audio[2000:14000], audio[18000:30000]  # away from the junction and the ends
    assert _peak_hz(first_half) == pytest.approx(440, abs=3)
    assert _peak_hz(second_half) == pytest.approx(1000, abs=3)
    assert _amplitude_at(first_half, 440) == pytest.approx(0.5, rel=0.1)
    assert _amplitude_at(second_half, 1000) == pytest.approx(0.5, rel=0.1)  # both channels carry it


def test_audio_from_a_path_equals_audio_from_bytes(tmp_path):
    path = tmp_path / "tone.flac"
    path.write_bytes(_write_audio("flac", _tone(440)[None], "flac"))
    np.testing.assert_array_equal(load_audio(path), load_audio(path.read_bytes()))
    assert _peak_hz(load_audio(path)) == pytest.approx(440, abs=2)


def test_short_audio_keeps_its_length(tmp_path):
    """A 10 ms clip decodes to 160 samples at 16 kHz; the samples pipeline refuses it (see
    test_data_media_samples.py), the loader itself reports what is there."""
    audio = load_audio(_write_audio("pcm_s16le", np.stack([_tone(440, 0.01)] * 2), "wav"))
    assert len(audio) == 160


# ------------------------------------------------------------------------------------------ images
def _encoded(image, fmt, **options):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _pixel(image, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(image)[xy[1], xy[0]])


SIZE = (40, 36)  # (width, height): over the 32 px minimum


def test_every_pil_mode_becomes_sensible_rgb():
    def solid(mode, value):
        return Image.new(mode, SIZE, value)

    cases = [
        (solid("1", 1), (255, 255, 255)),
        (solid("L", 100), (100, 100, 100)),
        (solid("RGB", (10, 20, 30)), (10, 20, 30)),
        (solid("CMYK", (0, 255, 255, 0)), (255, 0, 0)),  # CMYK red
        (solid("CMYK", (0, 0, 0, 255)), (0, 0, 0)),  # full black ink
        (solid("YCbCr", (255, 128, 128)), (255, 255, 255)),
        (solid("HSV", (0, 255, 255)), (255, 0, 0)),
        (solid("F", 100.4), (100, 100, 100)),  # PIL's 0–255 float scale
        (Image.fromarray(np.full(SIZE[::-1], 32896, np.uint16)), (128, 128, 128)),  # I;16: 16-bit range
        (solid("I", 65535), (255, 255, 255)),
        (solid("RGBA", (200, 0, 0, 0)), (255, 255, 255)),  # fully transparent → white background
        (solid("RGBA", (200, 0, 0, 255)), (200, 0, 0)),
        (solid("LA", (100, 128)), (177, 177, 177)),  # half transparent grey over white
    ]
    assert cases[8][0].mode == "I;16"
    for image, expected in cases:
        rgb = load_image(image)
        assert rgb.mode == "RGB" and rgb.size == SIZE
        np.testing.assert_allclose(_pixel(rgb), expected, atol=1, err_msg=image.mode)


def test_lab_image_goes_through_a_colour_transform():
    grey = load_image(Image.new("LAB", SIZE, (128, 128, 128)))  # L* = 50, a* = b* = 0
    np.testing.assert_allclose(_pixel(grey), (119, 119, 119), atol=2)  # sRGB of L* = 50


def test_files_in_16_bit_palette_and_cmyk_formats():
    sixteen = Image.fromarray(np.array([[0, 65535] * 20] * 36, np.uint16))
    decoded = load_image(_encoded(sixteen, "PNG"))
    assert _pixel(decoded, (0, 0)) == (0, 0, 0) and _pixel(decoded, (1, 0)) == (255, 255, 255)

    # palette with a transparent entry: index 0 (red) transparent, index 1 (blue) opaque
    pal = Image.new("P", SIZE, 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((5, 5), 1)
    for fmt in ("PNG", "GIF"):
        decoded = load_image(_encoded(pal, fmt, transparency=0))
        assert _pixel(decoded, (0, 0)) == (255, 255, 255), fmt  # transparent red → white, not red
        assert _pixel(decoded, (5, 5)) == (0, 0, 255), fmt

    cmyk = Image.new("CMYK", SIZE, (0, 255, 255, 0))
    assert _pixel(load_image(_encoded(cmyk, "TIFF"))) == (255, 0, 0)
    np.testing.assert_allclose(_pixel(load_image(_encoded(cmyk, "JPEG"))), (255, 0, 0), atol=8)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_6_is_applied(fmt):
    """Orientation 6: the stored picture must be turned 90° clockwise to be upright."""
    stored = np.zeros((36, 60, 3), np.uint8)
    stored[:12, :12] = (255, 0, 0)  # marker in the stored top-left corner (inner 8x8 checked: JPEG blurs edges)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = np.asarray(load_image(_encoded(Image.fromarray(stored), fmt, exif=exif)))
    assert upright.shape == (60, 36, 3)
    # turned clockwise, the top-left corner goes to the top-right
    assert upright[2:10, -10:-2].mean(axis=(0, 1)) == pytest.approx((255, 0, 0), abs=10)
    assert upright[:12, :12].max() < 20 and upright[-12:, -12:].max() < 20
    if fmt == "PNG":
        np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))


@pytest.mark.parametrize(
    "size,reason",
    [((1, 2000), "too small"), ((2000, 1), "too small"), ((20, 64), "too small"), ((64, 31), "too small"),
     ((32, 6500), "aspect ratio 203:1"), ((6500, 32), "aspect ratio 203:1")],
)
def test_images_the_vision_processor_cannot_take_are_refused(size, reason):
    image = Image.new("RGB", size, (9, 9, 9))
    for source in (image, _encoded(image, "PNG"), np.asarray(image)):
        with pytest.raises(MediaError, match=reason):
            load_image(source)
    assert load_image(Image.new("RGB", (32, 6400))).size == (32, 6400)  # 200:1 and 32 px: accepted


# ------------------------------------------------------------------------------------------- video
def _write_video(path, frames, codec="png", container=None, pix_fmt="rgb24", rate=4, rotation=None, hflip=False,
                 times_ms=None, audio=None):
    """Frames (T, H, W, 3) as a video file; `rotation`/`hflip` set its display matrix (PyAV:
    degrees counter-clockwise, then mirrored), `times_ms` gives each frame's presentation time."""
    _encoder(codec)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if times_ms is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        astream = None
        if audio is not None:
            astream = out.add_stream("aac", rate=RATE)
            astream.layout = "mono"
        for i, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if times_ms is not None:
                frame.pts, frame.time_base = times_ms[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if astream is not None:
            chunk = av.AudioFrame.from_ndarray(audio[None], format="fltp", layout="mono")
            chunk.sample_rate = RATE
            out.mux(astream.encode(chunk))
            out.mux(astream.encode())


def _marked_frames(t=3, h=40, w=64):
    """Upright frames: a red block top-left, a green block top-right, frame index in the blue channel."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:, :8, :8, 0] = 255
    frames[:, :8, -8:, 1] = 255
    frames[..., 2] = (np.arange(t) * 40)[:, None, None]
    return frames


@pytest.mark.parametrize("rotation,hflip", [(90, False), (-90, False), (180, False), (90, True), (0, True)])
def test_rotated_video_frames_come_out_upright(tmp_path, rotation, hflip):
    upright = _marked_frames()
    # stored so that showing it (turn `rotation` counter-clockwise, then mirror) gives `upright`
    mirrored = upright[:, :, ::-1] if hflip else upright
    stored = np.ascontiguousarray(np.rot90(mirrored, k=-rotation // 90, axes=(1, 2)))
    path = tmp_path / "rotated.mov"
    _write_video(path, stored, rotation=rotation, hflip=hflip)
    with av.open(str(path)) as c:  # the file really carries the matrix
        assert [str(d.type) for d in next(c.decode(video=0)).side_data] == ["Type.DISPLAYMATRIX"]
    np.testing.assert_array_equal(load_video(path).frames, upright)


def test_rotated_phone_style_h264_mp4_with_soundtrack(tmp_path):
    upright = _marked_frames(t=8, h=64, w=96)
    path = tmp_path / "phone.mp4"
    # a phone held upright stores landscape frames and a 90° clockwise display rotation
    _write_video(path, np.ascontiguousarray(np.rot90(upright, k=1, axes=(1, 2))), codec="libx264",
                 container="mp4", pix_fmt="yuv420p", rate=8, rotation=-90, audio=_tone(440, 1.0))
    video = load_video(path, with_audio=True)
    assert video.frames.shape == upright.shape and video.fps == pytest.approx(8)
    assert np.abs(video.frames.astype(int) - upright).mean() < 4  # lossy, but upright
    assert video.frames[0, :8, :8, 0].mean() > 200 and video.frames[0, :8, -8:, 1].mean() > 200
    assert _peak_hz(video.audio) == pytest.approx(440, abs=2)
    assert 16000 <= len(video.audio) <= 16000 + 2048


def test_variable_frame_rate_video_is_put_on_a_uniform_grid(tmp_path):
    times_ms = [0, 100, 150, 600, 700, 1500]
    frames = np.zeros((6, 36, 48, 3), np.uint8)
    frames[..., 0] = (np.arange(6) * 40)[:, None, None]  # frame id in the red channel
    path = tmp_path / "vfr.mkv"
    _write_video(path, frames, codec="ffv1", container="matroska", pix_fmt="bgr0", times_ms=times_ms)

    def ids(video):
        return (video.frames[:, 0, 0, 0] // 40).tolist()

    # duration 1.5 s + the median interval (0.1 s) = 1.6 s: 6 frames every 0.2667 s show frames
    # shown at 0, .27, .53, .8, 1.07, 1.33 s
    video = load_video(path)
    assert ids(video) == [0, 2, 2, 4, 4, 4] and video.fps == pytest.approx(6 / 1.6)
    two_per_second = load_video(path, fps=2)  # at 0, 0.5, 1.0 s
    assert ids(two_per_second) == [0, 2, 4] and two_per_second.fps == 2
    four = load_video(path.read_bytes(), num_frames=4)  # at 0, 0.4, 0.8, 1.2 s
    assert ids(four) == [0, 2, 4, 4] and four.fps == pytest.approx(4 / 1.6)
    with pytest.raises(MediaError, match="cannot take 10 frames from 6"):
        load_video(path, num_frames=10)


def test_odd_sized_video_without_audio(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (5, 33, 47, 3), dtype=np.uint8)
    path = tmp_path / "odd.mkv"
    _write_video(path, frames, codec="ffv1", container="matroska", pix_fmt="bgr0")
    video = load_video(path, with_audio=True)
    assert video.audio is None
    np.testing.assert_array_equal(video.frames, frames)
    h264 = tmp_path / "odd.mp4"  # 4:2:0 chroma on odd sizes needs padding in the decoder
    _write_video(h264, frames, codec="libx264", container="mp4", pix_fmt="yuv444p")
    assert load_video(h264).frames.shape == frames.shape


def test_constant_rate_mp4_picks_the_hf_frame_indices(tmp_path):
    frames = np.zeros((30, 32, 32, 3), np.uint8)
    frames[..., 0] = (np.arange(30) * 8)[:, None, None]
    path = tmp_path / "ntsc.mkv"
    _write_video(path, frames, codec="ffv1", container="matroska", pix_fmt="bgr0", rate=Fraction(30000, 1001))
    for n in range(1, 31):
        video = load_video(path, num_frames=n)
        expected = [k * 30 // n for k in range(n)]  # HF's torch.arange(0, T, T / n).int(), in exact arithmetic
        assert (video.frames[:, 0, 0, 0] // 8).tolist() == expected, n


def test_too_small_video_frames_are_refused(tmp_path):
    path = tmp_path / "small.mkv"
    _write_video(path, np.zeros((2, 16, 64, 3), np.uint8), codec="ffv1", container="matroska", pix_fmt="bgr0")
    with pytest.raises(MediaError, match="video frame too small"):
        load_video(path)
    with pytest.raises(MediaError, match="video frame too small"):
        load_video(np.zeros((2, 16, 64, 3), np.uint8))


# ----------------------------------------------------------------------------- broken / non-media
def _wav_bytes():
    return _write_audio("pcm_s16le", _tone(440, 0.5)[None], "wav")


def _broken_files(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    wav = _wav_bytes()
    flac = _write_audio("flac", _tone(440, 2.0)[None], "flac")
    mp4 = tmp_path / "good.mp4"
    _write_video(mp4, _marked_frames(t=8), codec="libx264", container="mp4", pix_fmt="yuv420p")
    files = {
        "noise.wav": noise, "noise.png": noise, "noise.mp4": noise, "noise.mp3": noise,
        "cut.wav": wav[: len(wav) // 2],
        "cut_header.wav": wav[:30],
        "cut.flac": flac[: len(flac) // 2],
        "cut.mp4": mp4.read_bytes()[: mp4.stat().st_size // 2],
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize(
    "loader,name,reason",
    [
        (load_audio, "noise.wav", "cannot decode audio"),
        (load_audio, "noise.mp4", "cannot decode audio"),
        (load_audio, "noise.mp3", "cannot decode audio"),
        (load_image, "noise.png", "cannot decode image"),
        (load_video, "noise.mp4", "cannot decode video"),
        (load_video, "noise.wav", "cannot decode video"),
        (load_audio, "cut.wav", "file is truncated"),
        (load_audio, "cut_header.wav", "file is truncated"),
        (load_audio, "cut.flac", "cannot decode audio"),
        (load_video, "cut.mp4", "cannot decode video"),
        (load_audio, "cut.mp4", "cannot decode audio"),
    ],
)
def test_broken_and_non_media_files_raise_media_error(tmp_path, loader, name, reason):
    path = _broken_files(tmp_path) / name
    for source in (path, path.read_bytes()):
        with pytest.raises(MediaError) as info:
            loader(source)
        assert reason in info.value.reason


def test_decoding_many_videos_leaves_no_threads_behind(tmp_path):
    """A training process decodes thousands of videos: each must leave no thread behind (they piled up
    until thread creation failed with EAGAIN and the job aborted, after ~3000 samples)."""
    import gc
    import os

    path = tmp_path / "clip.mp4"
    _write_video(path, _marked_frames(t=6, h=64, w=64), codec="libx264", pix_fmt="yuv420p", rotation=90)
    gc.collect()
    gc.disable()  # as in a training process, where a full collection is rare
    try:
        before = len(os.listdir("/proc/self/task"))
        for _ in range(60):
            load_video(path)
        after = len(os.listdir("/proc/self/task"))
    finally:
        gc.enable()
    assert after - before <= 2, f"{after - before} threads left behind by 60 decoded videos"
