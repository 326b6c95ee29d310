"""Images and video for the vision tower: loading, frame sampling, timestamps, a synthetic clip.

Frame sampling follows Hugging Face's ``Qwen3VLVideoProcessor`` exactly, so indices chosen here
are the ones a stock pipeline would choose:

- by rate: ``n = int(total_frames / video_fps * fps)``, clamped to
  ``[min_frames, min(max_frames, total_frames)]`` (defaults ``fps=2``, ``min_frames=4``,
  ``max_frames=768``);
- by count: ``n = num_frames``;
- indices ``linspace(0, total_frames - 1, n).round()`` (NumPy rounds halves to even).

Two frames make one temporal patch; an odd count is padded with the last frame, and each
pair is labelled with the mean time of its first and last frame
(``pair_timestamps``, as ``Qwen3VLProcessor._calculate_timestamps``).

Beyond HF: ``start`` / ``end`` (seconds) restrict sampling to the frames whose time
``index / video_fps`` lies in ``[start, end)``; the window is sampled as if it were the whole
video and the indices stay absolute, so timestamps are times in the source video. Asking for
more frames than the window holds (``num_frames > frames``) is an error here, where HF would
repeat frames.
"""

from __future__ import annotations

import base64
import io
import math
import numbers
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from .checks import BadType, BadValue, MissingFile, check_float, check_int

__all__ = [
    "SAMPLE_IMAGE",
    "SAMPLE_VIDEO",
    "VideoInfo",
    "load_image",
    "open_image",
    "pair_timestamps",
    "probe_video",
    "read_frames",
    "sample_frame_indices",
    "synthetic_video",
    "write_video",
]

#: The sample media shipped in ``data/media`` (see its ATTRIBUTION.md).
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "media"
SAMPLE_IMAGE = SAMPLE_DIR / "grace_hopper.jpg"  # 512×600 photo, public domain
SAMPLE_VIDEO = SAMPLE_DIR / "shapes.mp4"  # 4 s, 8 fps, 128×96, made by data/media/make_video.py

#: Defaults of Qwen3VLVideoProcessor (and of the Qwen3.5 video_preprocessor_config.json).
DEFAULT_FPS = 2
DEFAULT_MIN_FRAMES = 4
DEFAULT_MAX_FRAMES = 768


# --------------------------------------------------------------------------------------
# Sources: paths, file:// URLs, data: URLs
# --------------------------------------------------------------------------------------

def source_path(source, what: str) -> Path:
    """A local path from a str / Path / ``file://`` URL; remote URLs are refused."""
    if isinstance(source, Path):
        path = source
    elif isinstance(source, str):
        parsed = urllib.parse.urlparse(source)
        if parsed.scheme == "file":
            path = Path(urllib.parse.unquote(parsed.path))
        elif parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
            raise BadValue(f"{what} {source!r} is a remote URL; it is not downloaded here. Download it and pass "
                             f"the local path (or a file:// URL)")
        else:
            path = Path(source).expanduser()
    else:
        raise BadType(f"{what} must be a path, a file:// URL, a PIL image or an array; got {type(source).__name__}")
    if not path.exists():
        raise MissingFile(f"{what} file {str(path)!r} does not exist")
    if not path.is_file():
        raise BadValue(f"{what} {str(path)!r} is not a file")
    return path


def _describe(source) -> str:
    if isinstance(source, (str, Path)):
        s = str(source)
        return s if len(s) <= 60 else s[:40] + "…" + s[-15:]
    if isinstance(source, Image.Image):
        return f"PIL image {source.width}×{source.height}"
    if isinstance(source, np.ndarray):
        return f"array {list(source.shape)} {source.dtype}"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} frames"
    return type(source).__name__


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------

def _as_numpy(x):
    """numpy view of a torch tensor (without importing torch when none is given)."""
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    return x


def _image_from_array(array: np.ndarray, what: str) -> Image.Image:
    """PIL image of a ``[H, W, 3]`` uint8 array."""
    if array.ndim != 3 or array.shape[-1] != 3:
        raise BadValue(f"{what} array must be [H, W, 3] (RGB, channels last); got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        raise BadValue(f"{what} array must be uint8 (0–255); got {array.dtype}. Convert with "
                         f"(x * 255).round().clip(0, 255).astype(np.uint8) for values in [0, 1]")
    if 0 in array.shape:
        raise BadValue(f"{what} array is empty: shape {list(array.shape)}")
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def open_image(source, what: str = "image") -> Image.Image:
    """A PIL image of ``source`` without decoding its pixels yet (its size is known).

    ``source``: a path, a ``file://`` URL, a ``data:image/...;base64,`` URL, a PIL image, or a
    uint8 array ``[H, W, 3]`` (numpy or torch).
    """
    if isinstance(source, Image.Image):
        return source
    source = _as_numpy(source)
    if isinstance(source, np.ndarray):
        return _image_from_array(source, what)
    if isinstance(source, str) and source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header or not payload:
            raise BadValue(f"{what} data URL must be 'data:image/...;base64,<payload>'; got {source[:40]!r}…")
        try:
            data = base64.b64decode(payload, validate=True)
            image = Image.open(io.BytesIO(data))
        except Exception as error:
            raise BadValue(f"{what} data URL does not hold a readable image ({error})") from None
        return image
    path = source_path(source, what)
    try:
        return Image.open(path)
    except Exception as error:
        raise BadValue(f"{what} file {str(path)!r} is not a readable image "
                         f"({type(error).__name__}: {error})") from None


def load_image(source, what: str = "image") -> Image.Image:
    """The RGB PIL image of ``source`` (see :func:`open_image` for what a source may be)."""
    image = open_image(source, what)
    try:
        image.load()  # decode now: a truncated file fails here, with its name, not deep in the processor
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as error:
        raise BadValue(f"{what} {_describe(source)} cannot be decoded ({type(error).__name__}: {error})") from None


# --------------------------------------------------------------------------------------
# Video files
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoInfo:
    """What a video holds: frame count, frame rate (frames per second) and frame size."""

    total_frames: int
    video_fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds: ``total_frames / video_fps``."""
        return self.total_frames / self.video_fps


def _open_container(path: Path, what: str):
    import av

    try:
        container = av.open(str(path))
    except Exception as error:
        raise BadValue(f"{what} file {str(path)!r} is not a readable video "
                         f"({type(error).__name__}: {error})") from None
    if not container.streams.video:
        container.close()
        raise BadValue(f"{what} file {str(path)!r} has no video stream")
    if container.format.name in ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe"):
        container.close()
        raise BadValue(f"{what} file {str(path)!r} is an image, not a video; pass it as "
                       "{'type': 'image', 'image': ...}")
    return container


def probe_video(source, what: str = "video") -> VideoInfo:
    """Frame count, rate and size of a video file, read from its header as HF's PyAV loader does.

    The frame count is the stream's ``frames`` field and the rate its ``average_rate``; a file
    whose header has no frame count is counted by decoding it.
    """
    path = source_path(source, what)
    container = _open_container(path, what)
    try:
        stream = container.streams.video[0]
        total = int(stream.frames or 0)
        rate = stream.average_rate
        height, width = int(stream.height or 0), int(stream.width or 0)
        if total == 0:
            for total, frame in enumerate(container.decode(video=0), start=1):
                height, width = frame.height, frame.width
    except Exception as error:
        raise BadValue(f"{what} file {str(path)!r} cannot be decoded ({type(error).__name__}: {error})") from None
    finally:
        container.close()
    if total == 0:
        raise BadValue(f"{what} file {str(path)!r} has no frames")
    if total < 2:
        raise BadValue(f"{what} file {str(path)!r} has 1 frame; a video needs at least 2 (frames are read in pairs, "
                       "temporal patch 2): pass a single frame as an image")
    if not rate or float(rate) <= 0:
        raise BadValue(f"{what} file {str(path)!r} does not say its frame rate; decode it yourself and pass the "
                         f"frames with video_fps=")
    return VideoInfo(total_frames=total, video_fps=float(rate), height=height, width=width)


def read_frames(source, indices, what: str = "video") -> np.ndarray:
    """Decode the frames at ``indices`` of a video file: uint8 ``[N, H, W, 3]`` (RGB), in order of ``indices``.

    Frames are decoded in stream order and converted with ``to_ndarray(format="rgb24")``, as
    HF's PyAV loader does, so the pixels are the same.
    """
    path = source_path(source, what)
    wanted = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not wanted:
        raise BadValue(f"no frame indices given for {what} {str(path)!r}")
    if min(wanted) < 0:
        raise BadValue(f"frame indices must be ≥ 0; got {min(wanted)}")
    found: dict[int, np.ndarray] = {}
    last = max(wanted)
    need = set(wanted)
    container = _open_container(path, what)
    try:
        for i, frame in enumerate(container.decode(video=0)):
            if i > last:
                break
            if i in need:
                found[i] = frame.to_ndarray(format="rgb24")
    except Exception as error:
        raise BadValue(f"{what} file {str(path)!r} cannot be decoded ({type(error).__name__}: {error})") from None
    finally:
        container.close()
    missing = sorted(need - set(found))
    if missing:
        raise BadValue(f"{what} file {str(path)!r} ended before frame {missing[0]} (decoded {len(found)} of the "
                         f"wanted frames); its header over-states its length. Decode it yourself and pass the frames")
    return np.stack([found[i] for i in wanted])


# --------------------------------------------------------------------------------------
# Frame sampling and timestamps
# --------------------------------------------------------------------------------------

def _positive_number(name: str, value) -> float:
    return check_float(name, value, lo=0, lo_open=True)


def _positive_int(name: str, value) -> int:
    return check_int(name, value, lo=1)


def frame_window(total_frames: int, video_fps: float, start=None, end=None) -> tuple[int, int]:
    """``(first, last)`` frame indices whose time ``index / video_fps`` lies in ``[start, end)``.

    ``end`` past the end of the video means "to the end".
    """
    total_frames = _positive_int("total_frames", total_frames)
    video_fps = _positive_number("video_fps", video_fps)
    duration = total_frames / video_fps
    for name, value in (("start", start), ("end", end)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or value < 0):
            raise BadValue(f"{name} must be a time in seconds ≥ 0; got {value!r}")
    if start is not None and end is not None and start >= end:
        raise BadValue(f"start ({start} s) must be before end ({end} s)")
    first = 0 if start is None else math.ceil(start * video_fps - 1e-6)
    last = total_frames - 1 if end is None else min(total_frames, math.ceil(end * video_fps - 1e-6)) - 1
    if first > total_frames - 1:
        raise BadValue(f"start={start} s is at or past the end of the video ({total_frames} frames at "
                         f"{video_fps:g} fps = {duration:.3f} s)")
    if last < first:
        raise BadValue(f"no frame lies in [start={start or 0} s, end={end} s) of the video ({total_frames} frames at "
                         f"{video_fps:g} fps: one every {1 / video_fps:.3f} s); widen the window")
    return first, last


def sample_frame_indices(total_frames: int, video_fps: float, *, fps=None, num_frames=None,
                         min_frames: int = DEFAULT_MIN_FRAMES, max_frames: int = DEFAULT_MAX_FRAMES,
                         start=None, end=None, do_sample_frames: bool = True) -> np.ndarray:
    """Indices of the frames to feed the vision tower: int64 ``[N]``, ascending, absolute.

    ``fps`` (default 2) and ``num_frames`` are exclusive; ``min_frames`` / ``max_frames`` bound
    the count ``fps`` gives (not an explicit ``num_frames``). ``do_sample_frames=False`` takes
    every frame of the window (the frames were sampled already). See the module docstring.
    """
    if fps is not None and num_frames is not None:
        raise BadValue(f"fps ({fps}) and num_frames ({num_frames}) are exclusive: give one")
    if not isinstance(do_sample_frames, bool):
        raise BadType(f"do_sample_frames must be True or False; got {do_sample_frames!r}")
    if fps is not None:
        fps = _positive_number("fps", fps)
    if num_frames is not None:
        num_frames = _positive_int("num_frames", num_frames)
    min_frames = _positive_int("min_frames", min_frames)
    max_frames = _positive_int("max_frames", max_frames)
    if max_frames < min_frames:
        raise BadValue(f"max_frames ({max_frames}) must be ≥ min_frames ({min_frames})")
    first, last = frame_window(total_frames, video_fps, start, end)
    total = last - first + 1
    if not do_sample_frames:
        if fps is not None or num_frames is not None:
            raise BadValue("do_sample_frames=False takes every frame as given; drop fps / num_frames "
                             f"(got fps={fps}, num_frames={num_frames})")
        return np.arange(first, last + 1, dtype=np.int64)
    if num_frames is not None:
        if num_frames > total:
            where = "the video has" if (start is None and end is None) else "the window [start, end) holds"
            raise BadValue(f"num_frames={num_frames} is more than {where} ({total} frames); ask for at most "
                             f"{total}, or sample by rate with fps=")
        n = num_frames
    else:
        rate = DEFAULT_FPS if fps is None else fps
        n = int(total / video_fps * rate)
        n = min(max(n, min_frames), max_frames, total)
    return first + np.linspace(0, total - 1, n).round().astype(np.int64)


def pair_timestamps(indices, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame.

    An odd count is padded with the last frame (as the vision processor pads the pixels), so
    there are ``ceil(N / temporal_patch_size)`` timestamps.
    """
    video_fps = _positive_number("video_fps", video_fps)
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    if not idx:
        raise BadValue("no frame indices given")
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    times = [i / video_fps for i in idx]
    return [(times[k] + times[k + temporal_patch_size - 1]) / 2 for k in range(0, len(times), temporal_patch_size)]


# --------------------------------------------------------------------------------------
# A synthetic clip
# --------------------------------------------------------------------------------------

def synthetic_video(seconds: float = 4.0, fps: int = 8, width: int = 128, height: int = 96) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` frames of moving shapes, each frame labelled with its number and time.

    A red disc crosses left to right, a blue square falls top to bottom, a green bar grows;
    ``T = round(seconds * fps)``. The same arguments always give the same frames.
    """
    fps = _positive_int("fps", fps)
    seconds = _positive_number("seconds", seconds)
    width, height = _positive_int("width", width), _positive_int("height", height)
    n = round(seconds * fps)
    if n < 1:
        raise BadValue(f"seconds × fps = {seconds * fps} gives no frame")
    font = ImageFont.load_default(size=max(8, height // 8))
    frames = []
    for i in range(n):
        u = i / max(n - 1, 1)  # 0 → 1 over the clip
        im = Image.new("RGB", (width, height), (236, 236, 228))
        d = ImageDraw.Draw(im)
        r = height // 8
        cx, cy = int(r + u * (width - 2 * r)), height // 2 + r
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 40, 40))
        s = height // 6
        sx, sy = width - s - 4, int(u * (height - s))
        d.rectangle((sx, sy, sx + s, sy + s), fill=(40, 70, 210))
        d.rectangle((0, height - 4, int(u * width), height - 1), fill=(30, 160, 60))
        d.text((3, 2), f"#{i}", fill=(0, 0, 0), font=font)
        d.text((3, 2 + height // 7), f"{i / fps:.3f}s", fill=(0, 0, 0), font=font)
        frames.append(np.asarray(im))
    return np.stack(frames)


def write_video(path, frames, fps: int, *, codec: str = "libx264", crf: int = 18) -> Path:
    """Encode uint8 ``[T, H, W, 3]`` frames to an .mp4 at ``fps`` (written atomically).

    Single-threaded with fixed settings, so the same frames give the same bytes with the same
    PyAV / FFmpeg build.
    """
    import av

    from ._io import atomic_file

    frames = _as_numpy(frames)
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise BadValue(f"frames must be a uint8 array [T, H, W, 3]; got {_describe(frames)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise BadValue(f"H.264 / MPEG-4 in yuv420p need an even height and width; got {frames.shape[1:3]}")
    fps = _positive_int("fps", fps)
    path = Path(path)
    with atomic_file(path) as f:
        container = av.open(f, mode="w", format="mp4", options={"fflags": "+bitexact"})
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1
        stream.codec_context.flags |= int(av.codec.context.Flags.bitexact)
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
    return path
