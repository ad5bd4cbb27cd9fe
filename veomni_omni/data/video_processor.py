"""A torchvision-free Qwen-VL video processor (PIL + NumPy).

transformers' `Qwen2VLVideoProcessor` (the video processor of Qwen3-Omni checkpoints) is a
`TorchvisionBackend` class and refuses to load where torchvision cannot be imported (docs/design.md
§1). `Qwen2VLVideoProcessorPil` produces the same `pixel_values_videos` and `video_grid_thw`
from the same settings, with the operations of HF's PIL image backend applied frame by frame:

1. every frame of a video is resized to one `smart_resize`d size (factor patch_size·merge_size,
   pixel bounds `size.shortest_edge`/`size.longest_edge`) with PIL bicubic on uint8;
2. rescaled (uint8 → float64 · 1/255 → float32) and normalised ((x − mean) / std in float32);
3. frames are padded to a multiple of temporal_patch_size by repeating the last frame, grouped in
   temporal pairs and cut into patch rows of C·T·P·P values, rows ordered
   (t, h/merge, w/merge, merge_h, merge_w) and values ordered (C, T, P, P), i.e. exactly the layout
   of `Qwen2VLVideoProcessor.patchify` and of `Qwen2VLImageProcessorPil.patchify` for t = 1.

Against HF's torchvision `Qwen2VLVideoProcessor`: grids are identical; without resizing the rows
should agree to float32 round-off (torchvision fuses rescale and normalise as
(x − 255·mean) / (255·std)); a test checks this wherever torchvision imports (not on the CPU
machines of this project, where it was never run). With resizing, PIL's and torchvision's bicubic
kernels differ slightly, so rows differ by interpolation noise.

Two entries of the patch set (veomni_omni/patchset.py, group "video processor without torchvision")
make processors holding this class constructible and loadable through `AutoProcessor.from_pretrained`
without torchvision; the comment above `AUTO_LOADERS` says how.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.processing_utils import VideosKwargs, _LazyAutoProcessorMapping
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

__all__ = [
    "AUTO_LOADERS", "AutoVideoProcessorPil", "Qwen2VLVideoProcessorPil", "VIDEO_LOADER_PATCH", "sample_frame_indices", "without_torchvision",
]


class Qwen2VLVideoProcessorPilKwargs(VideosKwargs, total=False):
    """Same knobs as `Qwen2VLVideoProcessorInitKwargs` (min/max_pixels map onto `size`)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int


def sample_frame_indices(
    total_num_frames: int,
    temporal_patch_size: int = 2,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
) -> np.ndarray:
    """Uniform frame indices, as `Qwen2VLVideoProcessor.sample_frames` chooses them: `num_frames`
    (rounded to a multiple of temporal_patch_size) or `fps` frames per second of a `video_fps` video."""
    if num_frames is not None and fps is not None:
        raise ValueError("`num_frames` and `fps` are mutually exclusive")
    if num_frames is not None:
        num_frames = round(num_frames / temporal_patch_size) * temporal_patch_size
    elif fps is not None:
        if not video_fps:
            raise ValueError("sampling by `fps` needs the video's own frame rate (`video_fps`)")
        top = math.floor(min(max_frames, total_num_frames) / temporal_patch_size) * temporal_patch_size
        wanted = min(max(total_num_frames / video_fps * fps, min_frames), top, total_num_frames)
        num_frames = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if num_frames is None:
        return np.arange(total_num_frames)
    if num_frames <= 0 or num_frames > total_num_frames:
        raise ValueError(f"cannot sample {num_frames} frames from a {total_num_frames}-frame video")
    # HF: torch.arange(0, total, total / num).int(); float64 steps truncated toward zero.
    return np.floor(np.arange(num_frames, dtype=np.float64) * (total_num_frames / num_frames)).astype(np.int64)


def _frame_to_rgb_uint8(frame: Any) -> np.ndarray:
    """One frame (PIL image, HWC/CHW/HW array or tensor, uint8) as an (H, W, 3) uint8 array."""
    if isinstance(frame, Image.Image):
        return np.asarray(frame.convert("RGB"))
    if hasattr(frame, "detach") and hasattr(frame, "numpy"):  # torch.Tensor, without importing torch here
        frame = frame.detach().cpu().numpy()
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise ValueError(
            f"video frames must be uint8 (0..255) arrays or PIL images, got dtype {frame.dtype}; "
            "convert float frames explicitly so the rounding is yours, not this processor's"
        )
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim != 3:
        raise ValueError(f"a video frame must have 2 or 3 dimensions, got shape {frame.shape}")
    if frame.shape[-1] not in (1, 3, 4) and frame.shape[0] in (1, 3, 4):
        frame = np.moveaxis(frame, 0, -1)  # channels first → last
    if frame.shape[-1] == 1:
        return np.repeat(frame, 3, axis=2)
    if frame.shape[-1] == 4:
        return np.asarray(Image.fromarray(frame, "RGBA").convert("RGB"))
    if frame.shape[-1] != 3:
        raise ValueError(f"cannot find the channel axis of a frame of shape {frame.shape}")
    return frame


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (hasattr(x, "ndim") and x.ndim in (2, 3))


def _as_videos(videos: Any) -> list[list[np.ndarray]]:
    """A batch of videos, each a list of (H, W, 3) uint8 frames. Accepts one video (a 4-D array or a
    list of frames) or a list of videos; a 5-D array is a batch."""
    if hasattr(videos, "ndim") and not isinstance(videos, Image.Image):
        if videos.ndim == 5:
            videos = list(videos)
        elif videos.ndim == 4:
            videos = [videos]
        else:
            raise ValueError(f"a video array must have 4 (one video) or 5 (a batch) dimensions, got {videos.ndim}")
    elif isinstance(videos, Sequence) and videos and _is_frame(videos[0]):
        videos = [videos]  # one video given as a list of frames
    elif not isinstance(videos, Sequence):
        raise ValueError(f"unsupported video input of type {type(videos).__name__}")
    batch = []
    for video in videos:
        frames = [_frame_to_rgb_uint8(f) for f in (list(video) if hasattr(video, "ndim") else video)]
        if not frames:
            raise ValueError("a video has no frames")
        if any(f.shape != frames[0].shape for f in frames):
            raise ValueError("all frames of a video must have the same size")
        batch.append(frames)
    return batch


class Qwen2VLVideoProcessorPil(VideoProcessorMixin):
    """Torchvision-free twin of `transformers.Qwen2VLVideoProcessor` (same config keys, same output)."""

    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    patch_size = 14
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    do_sample_frames = False
    cap_pixels_per_frame = None
    max_video_tokens = 128000
    valid_kwargs = Qwen2VLVideoProcessorPilKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs):
        size = kwargs.pop("size", None)
        size = dict(self.size) if size is None else dict(size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        size.pop("min_pixels", None)
        size.pop("max_pixels", None)
        kwargs["size"] = size
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_valid_kwargs_names", None)
        for key, value in list(out.items()):
            if isinstance(value, SizeDict):
                out[key] = dict(value)
        return out

    # ---------------------------------------------------------------- options
    def _options(self, kwargs: dict) -> dict:
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors"}
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unknown)}")
        opts = {key: getattr(self, key, None) for key in self.valid_kwargs.__annotations__}
        opts.update({k: v for k, v in kwargs.items() if v is not None})
        size = opts["size"]
        size = dict(size) if size is not None else {}
        if kwargs.get("min_pixels") is not None:
            size["shortest_edge"] = kwargs["min_pixels"]
        if kwargs.get("max_pixels") is not None:
            size["longest_edge"] = kwargs["max_pixels"]
        if opts["do_resize"] and not (size.get("shortest_edge") and size.get("longest_edge")):
            raise ValueError(f"`size` must hold 'shortest_edge' and 'longest_edge', got {size}")
        opts["size"] = size
        return opts

    def target_size(self, height: int, width: int, num_frames: int, **kwargs) -> tuple[int, int]:
        """The (height, width) every frame of a `num_frames`-frame video is resized to."""
        opts = self._options(kwargs)
        if not opts["do_resize"]:
            return height, width
        factor = opts["patch_size"] * opts["merge_size"]
        max_pixels = opts["size"]["longest_edge"]
        if opts["cap_pixels_per_frame"]:
            total_pixels = int(opts["max_video_tokens"] * factor * factor * 0.9)
            max_pixels = max(
                min(max_pixels, total_pixels * opts["temporal_patch_size"] // num_frames),
                int(opts["size"]["shortest_edge"] * 1.05),
            )
        return smart_resize(height, width, factor=factor, min_pixels=opts["size"]["shortest_edge"], max_pixels=max_pixels)

    # ------------------------------------------------------------- processing
    def _process_video(self, frames: list[np.ndarray], opts: dict) -> tuple[np.ndarray, list[int]]:
        height, width = frames[0].shape[:2]
        new_h, new_w = self.target_size(height, width, len(frames), **{k: opts[k] for k in (
            "do_resize", "size", "patch_size", "merge_size", "cap_pixels_per_frame", "max_video_tokens",
            "temporal_patch_size")})
        if (new_h, new_w) != (height, width):
            resample = int(opts["resample"])
            frames = [np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=resample)) for f in frames]
        video = np.stack(frames).transpose(0, 3, 1, 2)  # (T, C, H, W) uint8
        if opts["do_rescale"]:
            video = (video.astype(np.float64) * opts["rescale_factor"]).astype(np.float32)
        else:
            video = video.astype(np.float32)
        if opts["do_normalize"]:
            channels = video.shape[1]
            mean = np.array(_per_channel(opts["image_mean"], channels), dtype=np.float32)[:, None, None]
            std = np.array(_per_channel(opts["image_std"], channels), dtype=np.float32)[:, None, None]
            video = (video - mean) / std
        return self.patchify(video, opts["patch_size"], opts["merge_size"], opts["temporal_patch_size"])

    @staticmethod
    def patchify(video: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int):
        """(T, C, H, W) → rows (grid_t·grid_h·grid_w, C·temporal·patch²) and [grid_t, grid_h, grid_w]."""
        num_frames, channels, height, width = video.shape
        if pad := -num_frames % temporal_patch_size:
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
            num_frames += pad
        grid_t, grid_h, grid_w = num_frames // temporal_patch_size, height // patch_size, width // patch_size
        if grid_h % merge_size or grid_w % merge_size or height % patch_size or width % patch_size:
            raise ValueError(f"frame size {height}x{width} is not a multiple of patch_size·merge_size")
        patches = video.reshape(
            grid_t, temporal_patch_size, channels,
            grid_h // merge_size, merge_size, patch_size,
            grid_w // merge_size, merge_size, patch_size,
        )
        # → (t, h/m, w/m, m_h, m_w, C, T, P_h, P_w)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        rows = patches.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
        return np.ascontiguousarray(rows), [grid_t, grid_h, grid_w]

    def preprocess(self, videos: Any, **kwargs) -> BatchFeature:
        return_tensors = kwargs.pop("return_tensors", None)
        metadata = kwargs.pop("video_metadata", None)
        opts = self._options(kwargs)
        batch = _as_videos(videos)
        if opts["do_sample_frames"]:
            metadata = metadata if isinstance(metadata, (list, tuple)) else [metadata] * len(batch)
            sampled = []
            for frames, meta in zip(batch, metadata):
                video_fps = (meta or {}).get("fps") if isinstance(meta, dict) else getattr(meta, "fps", None)
                idx = sample_frame_indices(
                    len(frames), opts["temporal_patch_size"], opts.get("num_frames"), opts.get("fps"), video_fps,
                    opts["min_frames"], opts["max_frames"],
                )
                sampled.append([frames[i] for i in idx])
            batch = sampled
        rows, grids = [], []
        for frames in batch:
            patches, grid = self._process_video(frames, opts)
            rows.append(patches)
            grids.append(grid)
        data = {"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.array(grids, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, videos=None, **kwargs) -> BatchFeature:
        return self.preprocess(videos, **kwargs)

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        """ViT patches of a video of this size (as `Qwen2VLVideoProcessor.get_num_of_video_patches`)."""
        videos_kwargs = dict(videos_kwargs or {})
        new_h, new_w = self.target_size(height, width, num_frames, **videos_kwargs)
        patch = videos_kwargs.get("patch_size") or self.patch_size
        temporal = videos_kwargs.get("temporal_patch_size") or self.temporal_patch_size
        return -(-num_frames // temporal) * (new_h // patch) * (new_w // patch)


def _per_channel(value, channels: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * channels
    value = list(value)
    if len(value) != channels:
        raise ValueError(f"expected {channels} per-channel values, got {value}")
    return value


VIDEO_LOADER_PATCH = "video_processor_loader"


def without_torchvision() -> bool:
    """transformers cannot import torchvision here"""
    return not is_torchvision_available()


class AutoVideoProcessorPil:
    """What `ProcessorMixin.from_pretrained` uses to load a processor's `video_processor` once the patch
    set is applied: our class for our saved configs; HF's `AutoVideoProcessor` for everything else
    where torchvision is importable; and, where it is not, our class as a stand-in for
    `Qwen2VLVideoProcessor` configs (same keys, same output), so released Qwen-Omni/Qwen-VL
    checkpoints load on torchvision-free machines too."""

    STANDS_IN_FOR = ("Qwen2VLVideoProcessor",)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        load_kwargs = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        config, _ = Qwen2VLVideoProcessorPil.get_video_processor_dict(pretrained_model_name_or_path, **load_kwargs)
        name = config.get("video_processor_type") or str(config.get("image_processor_type", "")).replace(
            "ImageProcessor", "VideoProcessor"
        )
        if name == Qwen2VLVideoProcessorPil.__name__ or (not is_torchvision_available() and name in cls.STANDS_IN_FOR):
            return Qwen2VLVideoProcessorPil.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from ..patchset import original

        module_name, attr = original(VIDEO_LOADER_PATCH)["video_processor"]
        module = __import__(module_name, fromlist=[attr])
        return getattr(module, attr).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# Two gaps in transformers 5.22 without torchvision, each closed by an entry of the patch set:
#
# 1. `ProcessorMixin.__init__` type-checks a `video_processor` argument against
#    `transformers.VideoProcessorMixin`, found by name on the top-level module; that name is only
#    exported when torchvision is importable, and the lookup's fallback then reads
#    `VIDEO_PROCESSOR_MAPPING._extra_content` from a dummy object and raises AttributeError. So no
#    processor with a video processor can be built at all. The patch set exports the (torchvision-free)
#    `VideoProcessorMixin` under that name (only where torchvision is missing).
# 2. `ProcessorMixin.from_pretrained` loads each primary sub-processor with the Auto class named in
#    `processing_utils.MODALITY_TO_AUTOPROCESSOR_MAPPING` (its class-level `_MAPPING_NAMES`);
#    `AutoVideoProcessor` is an import placeholder whose every attribute access raises ImportError, so
#    nothing registered with it is reachable. The patch set points the table's "video_processor" at
#    `AutoVideoProcessorPil`, which hands every other class back to `AutoVideoProcessor`.
#
# With torchvision both gaps are absent and `AutoVideoProcessorPil` only adds our class name
# (`AutoVideoProcessor.from_pretrained` itself does not know it: load the class directly or through
# `AutoProcessor`). We do not use `AutoVideoProcessor.register`: it stores a dict in
# `VIDEO_PROCESSOR_MAPPING._extra_content`, which `ProcessorMixin.get_possibly_dynamic_module` then
# reads as a class (`.__name__`) when it looks up any name transformers does not export.
AUTO_LOADERS = {**_LazyAutoProcessorMapping._MAPPING_NAMES, "video_processor": (__name__, AutoVideoProcessorPil.__name__)}
