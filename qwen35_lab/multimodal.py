"""Images and video in chat messages: model inputs, frame sampling you can see, and inspection.

Messages take the model cards' shapes; an image or video part may carry its own options::

    {"type": "image", "image": "photo.jpg"}                 # path, file:// URL, PIL image, uint8 [H, W, 3]
    {"type": "image_url", "image_url": {"url": "file:///…/photo.jpg"}}
    {"type": "video", "video": "clip.mp4", "fps": 1}        # path, frames (list of images) or uint8 [T, H, W, 3]
    {"type": "video_url", "video_url": {"url": "file:///…/clip.mp4"}, "num_frames": 8}

Image options: ``min_pixels``, ``max_pixels`` (bounds on H×W after resizing; the image
processor's ``size`` shortest/longest edge). Video options: ``fps`` (frames per second to
sample, default 2) or ``num_frames``; ``min_frames`` / ``max_frames`` (bounds on the count
``fps`` gives, default 4 / 768); ``start`` / ``end`` (seconds); ``do_sample_frames``
(False: the frames are already sampled, take them all); ``video_fps`` (the frame rate of
in-memory frames, read from the file otherwise; HF assumes 24 when it is missing);
``min_pixels`` / ``max_pixels`` (bounds on frames×H×W of the clip, the video processor's
``size``). Keyword arguments of :func:`build_inputs` set defaults for every part
(``image_min_pixels`` / ``image_max_pixels`` / ``video_min_pixels`` / ``video_max_pixels``
for the pixel bounds); a part's own keys win. Frame sampling is :mod:`qwen35_lab.media`'s,
equal to HF's ``Qwen3VLVideoProcessor``.

Prompt layout. An image is ``<|vision_start|>`` + ``<|image_pad|>`` × (grid_h·grid_w/4) +
``<|vision_end|>``. A video is, for each temporal patch (two frames),
``<{t:.1f} seconds><|vision_start|>`` + ``<|video_pad|>`` × (grid_h·grid_w/4) + ``<|vision_end|>``,
with ``t`` the mean time of the pair's frames. (transformers 5.23.0's processor leaves an
extra outer ``<|vision_start|>…<|vision_end|>`` around a video; this module does not.)

M-RoPE. Text token ``i`` of a run that starts at position ``p`` gets ``(p+i, p+i, p+i)``;
the merged vision tokens of an image or a frame pair starting at ``p`` get
``(p, p + row, p + col)``, and the next token continues at ``p + max(rows, cols)``.

Checks made before any decoding or pixel work: files exist and open, option values, frame
counts (``num_frames`` above the frames available is an error; ``fps`` asking for more is
clamped, as HF does), ``start < end``, image / frame sides of at least one patch (16 px;
the processor would blow anything smaller up to ``min_pixels``), aspect ratio ≤ 200, no
media in a system message, and the whole prompt within ``max_position_embeddings``.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import media
from .checks import BadIndex, BadType, BadValue

__all__ = [
    "InputsTable",
    "build_inputs",
    "has_vision",
    "inspect_inputs",
    "mark_segments",
    "plot_frames",
    "plot_patches",
    "plot_positions",
    "segment_slices",
    "segments",
    "vision_budget",
]

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
_PLACEHOLDER = re.compile(re.escape(VISION_START) + "(" + re.escape(IMAGE_PAD) + "|" + re.escape(VIDEO_PAD) + ")"
                          + re.escape(VISION_END))
_PART_TYPES = ("image", "image_url", "video", "video_url")
_TIMESTAMP = re.compile(r"<(\d+(?:\.\d+)?) seconds>$")

IMAGE_OPTIONS = ("min_pixels", "max_pixels")
VIDEO_OPTIONS = ("fps", "num_frames", "min_frames", "max_frames", "start", "end", "do_sample_frames", "video_fps",
                 "min_pixels", "max_pixels")
#: build_inputs keyword -> (kind, part option)
BUILD_OPTIONS = {
    **{k: ("video", k) for k in VIDEO_OPTIONS if k not in ("min_pixels", "max_pixels")},
    "image_min_pixels": ("image", "min_pixels"), "image_max_pixels": ("image", "max_pixels"),
    "video_min_pixels": ("video", "min_pixels"), "video_max_pixels": ("video", "max_pixels"),
}
#: Frame rate HF assumes for frames given without one.
ASSUMED_VIDEO_FPS = 24.0


def has_vision(messages) -> bool:
    """Whether any message carries an image or a video part."""
    return any(True for _ in _media_parts(messages))


# --------------------------------------------------------------------------------------
# Resolving parts
# --------------------------------------------------------------------------------------

@dataclass
class _Image:
    where: str
    source: object
    image: Image.Image  # opened, pixels maybe not decoded yet
    min_pixels: int
    max_pixels: int
    resized: tuple[int, int] = (0, 0)  # (H, W) the processor resizes to
    grid: tuple[int, int, int] = (0, 0, 0)  # (t, h, w) patches


@dataclass
class _Video:
    where: str
    source: object
    path: object  # Path of a file, or None for in-memory frames
    frames: np.ndarray | None  # uint8 [N, H, W, 3]: all frames given (in memory) or, after decoding, the sampled ones
    info: media.VideoInfo
    indices: np.ndarray  # [n] sampled frame indices
    timestamps: list[float]  # seconds, one per temporal patch
    min_pixels: int
    max_pixels: int
    cap_pixels_per_frame: bool
    resized: tuple[int, int] = (0, 0)
    grid: tuple[int, int, int] = (0, 0, 0)


def _media_parts(messages):
    """``(kind, part, where)`` for every image / video part, in message order."""
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            kind = part.get("type") or next((k for k in _PART_TYPES if k in part), None)
            if kind in ("image", "image_url"):
                yield "image", part, f"messages[{i}] content[{j}]"
            elif kind in ("video", "video_url"):
                yield "video", part, f"messages[{i}] content[{j}]"


def _split_build_options(options: dict) -> dict[str, dict]:
    """build_inputs keywords -> {"image": {...}, "video": {...}} part defaults."""
    out: dict[str, dict] = {"image": {}, "video": {}}
    for key, value in options.items():
        if key not in BUILD_OPTIONS:
            raise BadType(f"unknown option {key!r}; valid: {sorted(BUILD_OPTIONS)}")
        if value is None:
            continue
        kind, name = BUILD_OPTIONS[key]
        out[kind][name] = value
    return out


def _part_payload(part: dict, kind: str, where: str):
    """``(source, options)`` of an image / video part (options from the part and its *_url dict)."""
    type_ = part.get("type") or next(k for k in _PART_TYPES if k in part)
    valid = IMAGE_OPTIONS if kind == "image" else VIDEO_OPTIONS
    opts = {k: v for k, v in part.items() if k not in ("type", type_)}
    payload = part.get(type_)
    if type_.endswith("_url"):
        if isinstance(payload, dict):
            if "url" not in payload:
                raise BadValue(f"{where}: {type_} needs {{'url': ...}}; got keys {sorted(payload)}")
            extra = {k: v for k, v in payload.items() if k not in ("url", "detail")}
            opts.update(extra)
            payload = payload["url"]
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise BadValue(f"{where}: unknown {kind} option(s) {unknown}; valid: {list(valid)}")
    if payload is None:
        raise BadValue(f"{where}: the {type_!r} part has no {type_!r} value (a path, URL, image or frames)")
    return payload, opts


def _merge(defaults: dict, own: dict) -> dict:
    merged = dict(defaults)
    if "fps" in own or "num_frames" in own or own.get("do_sample_frames") is False:
        merged.pop("fps", None)
        merged.pop("num_frames", None)
    merged.update(own)
    return merged


def _pixels(name: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise BadValue(f"{where}: {name} must be a positive integer number of pixels; got {value!r}")
    return int(value)


def _pixel_bounds(opts: dict, size: Mapping, where: str) -> tuple[int, int]:
    """``(min_pixels, max_pixels)``; a max_pixels below the default min_pixels lowers the min to it."""
    hi = _pixels("max_pixels", opts.get("max_pixels", size["longest_edge"]), where)
    if "min_pixels" not in opts:
        return min(int(size["shortest_edge"]), hi), hi
    lo = _pixels("min_pixels", opts["min_pixels"], where)
    if lo > hi:
        raise BadValue(f"{where}: min_pixels ({lo}) must be ≤ max_pixels ({hi})")
    return lo, hi


def _check_frame_size(height: int, width: int, patch: int, what: str) -> None:
    if min(height, width) < patch:
        raise BadValue(f"{what} is {width}×{height} px; each side must be at least {patch} px (one vision patch). "
                         f"Scale it up yourself if you mean to (the processor would blow it up to min_pixels)")
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise BadValue(f"{what} is {width}×{height} px, an aspect ratio of {ratio:.0f}; the vision processor takes "
                         "at most 200")


def _processors(lab):
    proc = getattr(lab, "processor", None)
    ip, vp = getattr(proc, "image_processor", None), getattr(proc, "video_processor", None)
    if not getattr(lab, "is_multimodal", False) or ip is None or vp is None:
        raise BadValue(f"{getattr(lab, 'name', 'this model')!r} has no vision tower or no image/video processor "
                         "here (was it loaded text-only?); load the multimodal model to prompt with images or video")
    return proc, ip, vp


def _resolve_image(ip, payload, opts, where) -> _Image:
    what = f"{where} image {media._describe(payload)}"
    image = media.open_image(payload, what)
    _check_frame_size(image.height, image.width, ip.patch_size, what)
    lo, hi = _pixel_bounds(opts, ip.size, where)
    return _Image(where=where, source=payload, image=image, min_pixels=lo, max_pixels=hi)


def _frames_array(payload, what: str) -> np.ndarray:
    """uint8 [T, H, W, 3] of in-memory frames (an array or a list of images / arrays / paths)."""
    payload = media._as_numpy(payload)
    if isinstance(payload, np.ndarray):
        if payload.ndim != 4 or payload.shape[-1] != 3:
            raise BadValue(f"{what}: a video array must be [T, H, W, 3] (RGB, channels last); "
                             f"got {list(payload.shape)}")
        if payload.dtype != np.uint8:
            raise BadValue(f"{what}: a video array must be uint8 (0–255); got {payload.dtype}")
        if payload.shape[0] == 0:
            raise BadValue(f"{what}: the video has no frames (shape {list(payload.shape)})")
        return payload
    if len(payload) == 0:
        raise BadValue(f"{what}: the video has no frames (an empty list)")
    frames = [np.asarray(media.load_image(f, f"{what} frame {k}")) for k, f in enumerate(payload)]
    sizes = sorted({f.shape for f in frames})
    if len(sizes) > 1:
        raise BadValue(f"{what}: all frames must have one size; got {[s[:2] for s in sizes]}")
    return np.stack(frames)


def _resolve_video(vp, payload, opts, where) -> _Video:
    what = f"{where} video {media._describe(payload)}"
    if isinstance(payload, (str, Path)):
        if "video_fps" in opts:
            raise BadValue(f"{where}: video_fps is for in-memory frames; a file's frame rate is read from the file")
        path, frames = media.source_path(payload, what), None
        info = media.probe_video(path, what)
    elif isinstance(payload, (list, tuple, np.ndarray)) or type(payload).__module__.startswith("torch"):
        path, frames = None, _frames_array(payload, what)
        info = media.VideoInfo(total_frames=len(frames), video_fps=_video_fps(opts, what), height=frames.shape[1],
                               width=frames.shape[2])
    else:
        raise BadType(f"{where}: a video is a file path / file:// URL, a list of frames or a uint8 array "
                        f"[T, H, W, 3]; got {type(payload).__name__}")
    return _sampled_video(vp, info, opts, where, what, source=payload, path=path, frames=frames)


def _video_fps(opts: dict, what: str) -> float:
    if "video_fps" in opts:
        return media._positive_number("video_fps", opts["video_fps"])
    warnings.warn(f"{what}: no video_fps given for in-memory frames; assuming {ASSUMED_VIDEO_FPS:g} fps as HF does. "
                  "Pass video_fps= in the part for true timestamps and fps sampling", stacklevel=5)
    return ASSUMED_VIDEO_FPS


def _sampled_video(vp, info: media.VideoInfo, opts, where, what, *, source, path, frames) -> _Video:
    _check_frame_size(info.height, info.width, vp.patch_size, f"{what} (frame size)")
    try:
        indices = media.sample_frame_indices(
            info.total_frames, info.video_fps, fps=opts.get("fps"), num_frames=opts.get("num_frames"),
            min_frames=opts.get("min_frames", vp.min_frames), max_frames=opts.get("max_frames", vp.max_frames),
            start=opts.get("start"), end=opts.get("end"), do_sample_frames=opts.get("do_sample_frames", True))
    except (ValueError, TypeError) as error:
        raise type(error)(f"{what}: {error}") from None
    lo, hi = _pixel_bounds(opts, vp.size, where)
    return _Video(where=where, source=source, path=path, frames=frames, info=info, indices=indices,
                  timestamps=media.pair_timestamps(indices, info.video_fps, vp.temporal_patch_size),
                  min_pixels=lo, max_pixels=hi, cap_pixels_per_frame=bool(getattr(vp, "cap_pixels_per_frame", None)))


# --------------------------------------------------------------------------------------
# Sizes (before any pixel work): HF's own resize rules
# --------------------------------------------------------------------------------------

def _image_resize(ip, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=ip.patch_size * ip.merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)


def _video_resize(vp, num_frames: int, height: int, width: int, min_pixels: int, max_pixels: int,
                  cap_pixels_per_frame: bool) -> tuple[int, int]:
    """(H, W) each frame is resized to, as ``Qwen3VLVideoProcessor.resize``."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    factor = vp.patch_size * vp.merge_size
    if cap_pixels_per_frame:
        frame_cap = vp.max_video_tokens * factor * factor
        max_pixels = max(min(frame_cap, max_pixels // num_frames), int(min_pixels * 1.05)) * num_frames
    # smart_resize refuses t < temporal_patch_size; the processor pads one frame to a pair first
    t = max(num_frames, vp.temporal_patch_size)
    return smart_resize(num_frames=t, height=height, width=width, temporal_factor=vp.temporal_patch_size,
                        factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _plan(ip, vp, images: list[_Image], videos: list[_Video]) -> None:
    for im in images:
        im.resized = _image_resize(ip, im.image.height, im.image.width, im.min_pixels, im.max_pixels)
        im.grid = (1, im.resized[0] // ip.patch_size, im.resized[1] // ip.patch_size)
    for v in videos:
        n = len(v.indices)
        v.resized = _video_resize(vp, n, v.info.height, v.info.width, v.min_pixels, v.max_pixels,
                                  v.cap_pixels_per_frame)
        v.grid = (math.ceil(n / vp.temporal_patch_size), v.resized[0] // vp.patch_size, v.resized[1] // vp.patch_size)


def _video_text(v: _Video, merge: int) -> str:
    per_pair = v.grid[1] * v.grid[2] // merge**2
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_PAD * per_pair}{VISION_END}" for t in v.timestamps)


def _image_text(im: _Image, merge: int) -> str:
    return VISION_START + IMAGE_PAD * (im.grid[1] * im.grid[2] // merge**2) + VISION_END


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------

@dataclass
class _Built:
    inputs: dict
    images: list[_Image]
    videos: list[_Video]
    prompt: str  # the expanded prompt text


def _build(lab, messages, *, enable_thinking=None, tools=None, add_generation_prompt=True, preserve_thinking=None,
           add_vision_id=False, **options) -> _Built:
    defaults = _split_build_options(options)
    template_text = lab.render(messages, enable_thinking=enable_thinking, tools=tools,
                               add_generation_prompt=add_generation_prompt, preserve_thinking=preserve_thinking,
                               add_vision_id=add_vision_id)  # validates the messages (no media in system messages)
    parts = list(_media_parts(messages))
    pieces = _PLACEHOLDER.split(template_text)  # text, pad, text, pad, ..., text
    texts, slots = pieces[0::2], ["image" if p == IMAGE_PAD else "video" for p in pieces[1::2]]
    for text in texts:
        for special in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD):
            if special in text:
                raise BadValue(f"the message text contains the special token {special}; vision tokens come only "
                                 "from image / video parts")
    if slots != [kind for kind, _, _ in parts]:
        raise BadValue(f"the chat template placed {slots} but the messages hold {[k for k, _, _ in parts]}; the "
                         "template renders media only in user / assistant / tool content")
    if not parts:
        ids = lab.tokenizer(template_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        _check_context(lab, ids.shape[1], 0)
        return _Built({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [], [], template_text)

    proc, ip, vp = _processors(lab)
    images, videos = [], []
    for kind, part, where in parts:
        payload, own = _part_payload(part, kind, where)
        opts = _merge(defaults[kind], own)
        if kind == "image":
            images.append(_resolve_image(ip, payload, opts, where))
        else:
            videos.append(_resolve_video(vp, payload, opts, where))
    _plan(ip, vp, images, videos)

    it_images, it_videos = iter(images), iter(videos)
    expanded = [texts[0]]
    for kind, text in zip(slots, texts[1:]):
        expanded.append(_image_text(next(it_images), ip.merge_size) if kind == "image"
                        else _video_text(next(it_videos), vp.merge_size))
        expanded.append(text)
    prompt = "".join(expanded)
    ids = lab.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # [1, T]
    n_vision = sum(im.grid[1] * im.grid[2] // ip.merge_size**2 for im in images) + sum(
        v.grid[0] * v.grid[1] * v.grid[2] // vp.merge_size**2 for v in videos)
    _check_context(lab, ids.shape[1], n_vision)

    # ---- the pixel work, once everything is known to fit
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if images:
        outs = []
        for im in images:
            im.image = media.load_image(im.image, f"{im.where} image")
            outs.append(ip(images=[im.image], size={"shortest_edge": im.min_pixels, "longest_edge": im.max_pixels},
                           return_tensors="pt"))
        inputs["pixel_values"] = torch.cat([o["pixel_values"] for o in outs])
        inputs["image_grid_thw"] = torch.cat([o["image_grid_thw"] for o in outs])
        _check_grids("image", inputs["image_grid_thw"], [im.grid for im in images])
    if videos:
        outs = []
        for v in videos:
            v.frames = (media.read_frames(v.path, v.indices, f"{v.where} video") if v.path is not None
                        else v.frames[v.indices])
            metadata = {"total_num_frames": v.info.total_frames, "fps": v.info.video_fps,
                        "duration": v.info.duration, "frames_indices": [int(i) for i in v.indices],
                        "height": v.info.height, "width": v.info.width}
            outs.append(vp(videos=[v.frames], do_sample_frames=False, video_metadata=[metadata],
                           size={"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels},
                           cap_pixels_per_frame=v.cap_pixels_per_frame, return_tensors="pt"))
        inputs["pixel_values_videos"] = torch.cat([o["pixel_values_videos"] for o in outs])
        inputs["video_grid_thw"] = torch.cat([o["video_grid_thw"] for o in outs])
        _check_grids("video", inputs["video_grid_thw"], [v.grid for v in videos])
    inputs["mm_token_type_ids"] = torch.tensor(proc.create_mm_token_type_ids(ids.tolist()), dtype=torch.long)
    return _Built(inputs, images, videos, prompt)


def _check_grids(kind: str, got: torch.Tensor, planned: list) -> None:
    if [tuple(g) for g in got.tolist()] != [tuple(g) for g in planned]:
        raise RuntimeError(f"the {kind} processor made grids {got.tolist()}, not the planned {planned}; its resize "
                           "rule differs from the one this module knows")


def _check_context(lab, n_tokens: int, n_vision: int) -> None:
    limit = getattr(lab.text_config, "max_position_embeddings", None)
    if limit is not None and n_tokens > limit:
        raise BadValue(f"the prompt would be {n_tokens} tokens ({n_vision} of them vision tokens), more than the "
                         f"model's max_position_embeddings of {limit}. Use fewer pixels (max_pixels=), fewer frames "
                         "(fps= / num_frames= / max_frames=) or a shorter window (start= / end=)")


def build_inputs(lab, messages, *, enable_thinking=None, tools=None, add_generation_prompt=True,
                 preserve_thinking=None, add_vision_id=False, **options) -> dict:
    """Model inputs for chat ``messages`` with text, images and videos.

    Returns ``input_ids`` / ``attention_mask`` ``[1, T]``, and with media ``pixel_values``
    ``[N_img_patches, C·2·16·16]``, ``image_grid_thw`` ``[n_images, 3]``, ``pixel_values_videos``,
    ``video_grid_thw`` ``[n_videos, 3]`` and ``mm_token_type_ids`` ``[1, T]`` (0 text, 1 image,
    2 video). ``options`` are per-part defaults (see the module docstring).
    """
    return _build(lab, messages, enable_thinking=enable_thinking, tools=tools,
                  add_generation_prompt=add_generation_prompt, preserve_thinking=preserve_thinking,
                  add_vision_id=add_vision_id, **options).inputs


# --------------------------------------------------------------------------------------
# Segments: where each piece of the prompt sits
# --------------------------------------------------------------------------------------

def _token_id(lab, attr: str, token: str) -> int:
    value = getattr(lab.config, attr, None)
    return int(value) if value is not None else int(lab.tokenizer.convert_tokens_to_ids(token))


def segments(lab, inputs, *, batch: int = 0, text: bool = False) -> list[dict]:
    """The prompt split into text runs, images and video frame pairs (JSON-ready dicts).

    Every row has ``kind`` ("text", "image" or "video"), ``start`` / ``end`` (token span,
    end exclusive) and ``tokens``. Vision rows add ``media`` ("image 0", "video 1"), ``grid``
    (t, h, w) in patches, ``patches`` (start, end) rows of the vision tower's output
    (``visual.blocks.j.out``: images first, then videos); video rows add ``pair`` and the
    ``timestamp`` (seconds) the prompt gives the pair. With ``text=True`` text rows add their
    decoded ``text``. Made from the ids and grids alone, so any model inputs can be split.
    """
    ids = inputs["input_ids"][batch].tolist()
    if inputs.get("attention_mask") is not None:
        keep = inputs["attention_mask"][batch].bool().tolist()
        if not all(keep):
            raise BadValue("segments() reads unpadded prompts; this one has padding")
    image_pad = _token_id(lab, "image_token_id", IMAGE_PAD)
    video_pad = _token_id(lab, "video_token_id", VIDEO_PAD)
    merge = getattr(getattr(lab.config, "vision_config", None), "spatial_merge_size", 2)
    image_grids = inputs.get("image_grid_thw")
    video_grids = inputs.get("video_grid_thw")
    image_grids = [] if image_grids is None else [tuple(int(x) for x in g) for g in image_grids]
    video_grids = [] if video_grids is None else [tuple(int(x) for x in g) for g in video_grids]
    patch_at = 0
    image_patch_start = []
    for g in image_grids:
        image_patch_start.append(patch_at)
        patch_at += g[0] * g[1] * g[2]
    video_patch_start = []
    for g in video_grids:
        video_patch_start.append(patch_at)
        patch_at += g[0] * g[1] * g[2]

    kinds = ["image" if t == image_pad else "video" if t == video_pad else "text" for t in ids]
    rows: list[dict] = []
    n_image, n_video, pair = 0, 0, 0
    start = 0
    while start < len(ids):
        end = start
        while end < len(ids) and kinds[end] == kinds[start]:
            end += 1
        kind = kinds[start]
        row = {"kind": kind, "start": start, "end": end, "tokens": end - start}
        if kind == "text":
            if text:
                row["text"] = lab.tokenizer.decode(ids[start:end], skip_special_tokens=False)
        elif kind == "image":
            if n_image >= len(image_grids):
                raise BadValue(f"the prompt has more image blocks than image_grid_thw rows ({len(image_grids)})")
            g = image_grids[n_image]
            _expect(end - start, g[0] * g[1] * g[2] // merge**2, f"image {n_image}")
            row.update(media=f"image {n_image}", grid=list(g),
                       patches=[image_patch_start[n_image], image_patch_start[n_image] + g[0] * g[1] * g[2]])
            n_image += 1
        else:
            if n_video >= len(video_grids):
                raise BadValue(f"the prompt has more video blocks than video_grid_thw rows ({len(video_grids)})")
            g = video_grids[n_video]
            per_pair = g[1] * g[2]
            _expect(end - start, per_pair // merge**2, f"video {n_video} pair {pair}")
            p0 = video_patch_start[n_video] + pair * per_pair
            before = lab.tokenizer.decode(ids[max(0, start - 12):start], skip_special_tokens=False)
            match = _TIMESTAMP.search(before.removesuffix(VISION_START))
            row.update(media=f"video {n_video}", pair=pair, grid=[1, g[1], g[2]], patches=[p0, p0 + per_pair],
                       timestamp=float(match.group(1)) if match else None)
            pair += 1
            if pair == g[0]:
                n_video, pair = n_video + 1, 0
        rows.append(row)
        start = end
    if n_image != len(image_grids) or n_video != len(video_grids) or pair:
        raise BadValue(f"the prompt's vision blocks ({n_image} images, {n_video} videos) do not match "
                         f"image_grid_thw / video_grid_thw ({len(image_grids)} / {len(video_grids)} rows)")
    return rows


def _expect(got: int, want: int, what: str) -> None:
    if got != want:
        raise BadValue(f"{what} has {got} tokens in the prompt but its grid makes {want}")


def segment_slices(source, kind: str | None = None) -> list[slice]:
    """Token slices of the segments (of one ``kind``: "text", "image", "video"), in prompt order.

    ``source``: an :class:`InputsTable`, a list of segment dicts, or a Trace (its
    ``meta["segments"]``). ``tr["layers.0.deltanet.beta"][:, s]`` is the gate over a segment.
    """
    rows = source.meta.get("segments") if hasattr(source, "meta") else source
    if rows is None:
        raise BadValue("this trace has no meta['segments']")
    if kind is not None and kind not in ("text", "image", "video"):
        raise BadValue(f"kind must be 'text', 'image', 'video' or None; got {kind!r}")
    return [slice(r["start"], r["end"]) for r in rows if kind is None or r["kind"] == kind]


# --------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------

_COLUMNS = ("kind", "start", "end", "tokens", "media", "grid", "timestamp", "frames", "t", "h", "w", "text")


class InputsTable(list):
    """Rows (dicts) describing a prompt's segments; made by :func:`inspect_inputs`.

    Rows are :func:`segments` rows plus ``frames`` (source frame indices of a video pair),
    ``frame_times`` (their seconds) and ``t`` / ``h`` / ``w``: the (first, last) M-RoPE
    position of the segment on each axis. Attributes:

    - ``inputs``: the model inputs (as :func:`build_inputs` returns them)
    - ``position_ids``: ``[3, T]`` M-RoPE positions (t, h, w) per token
    - ``images``: per image ``{"image": PIL, "size": (H, W), "resized": (H, W), "grid", "tokens"}``
    - ``videos``: per video ``{"frames": uint8 [n, H, W, 3], "frame_indices", "frame_times",
      "timestamps", "video_fps", "total_frames", "resized", "grid", "tokens"}``
    - ``prompt``: the prompt text with every placeholder expanded
    """

    def __init__(self, rows, *, inputs, position_ids, images, videos, prompt):
        super().__init__(rows)
        self.inputs, self.position_ids, self.images, self.videos, self.prompt = (
            inputs, position_ids, images, videos, prompt)

    @property
    def segments(self) -> list[dict]:
        """The rows as JSON-ready dicts without per-token arrays (what a trace's ``meta["segments"]`` holds)."""
        return [dict(r) for r in self]

    def slices(self, kind: str | None = None) -> list[slice]:
        """See :func:`segment_slices`."""
        return segment_slices(self, kind)

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame([{c: r.get(c) for c in _COLUMNS} for r in self], columns=list(_COLUMNS))

    def __repr__(self) -> str:
        def cell(r, c):
            v = r.get(c)
            if v is None:
                return ""
            if c == "text":
                v = v.replace("\n", "\\n")
                return v if len(v) <= 32 else v[:22] + "…" + v[-9:]
            if c in ("t", "h", "w"):
                return f"{v[0]}" if v[0] == v[1] else f"{v[0]}–{v[1]}"
            if c == "grid":
                return "×".join(map(str, v))
            if c == "timestamp":
                return f"{v:.1f}s"
            if c == "frames":
                return ",".join(map(str, v))
            return str(v)

        cells = [[cell(r, c) for c in _COLUMNS] for r in self]
        widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(_COLUMNS)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths)).rstrip()]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
        n_img = sum(r["tokens"] for r in self if r["kind"] == "image")
        n_vid = sum(r["tokens"] for r in self if r["kind"] == "video")
        total = sum(r["tokens"] for r in self)
        return (f"InputsTable: {total} tokens ({total - n_img - n_vid} text, {n_img} image, {n_vid} video), "
                f"{len(self)} segments\n" + "\n".join(lines))


def inspect_inputs(lab, messages, **options) -> InputsTable:
    """Build the inputs of ``messages`` and describe them: a table of segments (see :class:`InputsTable`).

    ``options`` are :func:`build_inputs`'s keywords (``enable_thinking``, ``fps``, …).
    """
    built = _build(lab, messages, **options)
    inputs = built.inputs
    rows = segments(lab, inputs, text=True)
    position_ids = rope_positions(lab, inputs)[:, 0]  # [3, T]
    for r in rows:
        p = position_ids[:, r["start"]:r["end"]]
        r["t"], r["h"], r["w"] = ([int(p[a].min()), int(p[a].max())] for a in range(3))
        if r["kind"] == "video":
            v = built.videos[int(r["media"].split()[1])]
            tp = lab.processor.video_processor.temporal_patch_size
            idx = [int(i) for i in v.indices]
            idx += [idx[-1]] * (-len(idx) % tp)
            frames = idx[r["pair"] * tp:(r["pair"] + 1) * tp]
            r["frames"] = frames
            r["frame_times"] = [round(i / v.info.video_fps, 6) for i in frames]
    merge_i = lab.processor.image_processor.merge_size if built.images else 2
    merge_v = lab.processor.video_processor.merge_size if built.videos else 2
    images = [{"image": im.image, "size": (im.image.height, im.image.width), "resized": im.resized,
               "grid": im.grid, "tokens": im.grid[1] * im.grid[2] // merge_i**2, "where": im.where}
              for im in built.images]
    videos = [{"frames": v.frames, "frame_indices": [int(i) for i in v.indices],
               "frame_times": [int(i) / v.info.video_fps for i in v.indices], "timestamps": list(v.timestamps),
               "video_fps": v.info.video_fps, "total_frames": v.info.total_frames,
               "size": (v.info.height, v.info.width),
               "resized": v.resized, "grid": v.grid, "tokens": v.grid[0] * v.grid[1] * v.grid[2] // merge_v**2,
               "where": v.where} for v in built.videos]
    return InputsTable(rows, inputs=inputs, position_ids=position_ids, images=images, videos=videos,
                       prompt=built.prompt)


def rope_positions(lab, inputs) -> torch.Tensor:
    """M-RoPE position ids ``[3, B, T]`` (t, h, w) of model inputs, from the model's ``get_rope_index``."""
    inner = getattr(lab.model, "model", None)
    ids = inputs["input_ids"]
    if inner is None or not hasattr(inner, "get_rope_index"):  # text-only model: 1-D positions on all axes
        return torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    mm = inputs.get("mm_token_type_ids")
    if mm is None:
        mm = torch.zeros_like(ids)
    kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "attention_mask") if inputs.get(k) is not None}
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=mm, **kw)
    return pos.cpu()


# --------------------------------------------------------------------------------------
# Budgets: tokens for pixels and frames
# --------------------------------------------------------------------------------------

def vision_budget(lab, image=None, video=None, **options) -> dict:
    """Tokens an image or a video costs, computed from sizes only (no pixel work).

    ``image``: anything an image part takes, or a size ``(height, width)``. ``video``:
    anything a video part takes, or ``(total_frames, height, width)`` with ``video_fps=``.
    ``options``: the part options (``max_pixels``, ``fps``, ``num_frames``, ``start``, …).

    Returns ``{"kind", "size": (H, W), "resized": (H, W), "grid": (t, h, w), "patches",
    "tokens"}`` (vision tokens) plus, for a video, ``"frames"`` (sampled count),
    ``"frame_indices"``, ``"timestamps"``, ``"tokens_per_pair"`` and ``"prompt_tokens"``
    (vision tokens plus the timestamp and marker tokens).
    """
    if (image is None) == (video is None):
        raise BadValue("give exactly one of image= or video=")
    _, ip, vp = _processors(lab)
    if image is not None:
        unknown = sorted(set(options) - set(IMAGE_OPTIONS))
        if unknown:
            raise BadValue(f"unknown image option(s) {unknown}; valid: {list(IMAGE_OPTIONS)}")
        if isinstance(image, tuple) and len(image) == 2 and all(isinstance(x, numbers.Integral) for x in image):
            _check_frame_size(int(image[0]), int(image[1]), ip.patch_size, f"image size {image}")
            lo, hi = _pixel_bounds(options, ip.size, "vision_budget")
            im = _Image(where="image", source=image, image=Image.new("RGB", (1, 1)), min_pixels=lo, max_pixels=hi)
            h, w = int(image[0]), int(image[1])
        else:
            im = _resolve_image(ip, image, options, "vision_budget")
            h, w = im.image.height, im.image.width
        im.resized = _image_resize(ip, h, w, im.min_pixels, im.max_pixels)
        im.grid = (1, im.resized[0] // ip.patch_size, im.resized[1] // ip.patch_size)
        patches = im.grid[1] * im.grid[2]
        return {"kind": "image", "size": (h, w), "resized": im.resized, "grid": im.grid, "patches": patches,
                "tokens": patches // ip.merge_size**2}
    unknown = sorted(set(options) - set(VIDEO_OPTIONS))
    if unknown:
        raise BadValue(f"unknown video option(s) {unknown}; valid: {list(VIDEO_OPTIONS)}")
    if isinstance(video, tuple) and len(video) == 3 and all(isinstance(x, numbers.Integral) for x in video):
        total, h, w = (int(x) for x in video)
        if total < 1:
            raise BadValue(f"video size {video}: the video has no frames")
        what = f"video size {video}"
        info = media.VideoInfo(total_frames=total, video_fps=_video_fps(options, what), height=h, width=w)
        v = _sampled_video(vp, info, options, "vision_budget", what, source=video, path=None, frames=None)
    else:
        v = _resolve_video(vp, video, options, "vision_budget")
    _plan(ip, vp, [], [v])
    per_pair = v.grid[1] * v.grid[2] // vp.merge_size**2
    stamps = sum(len(lab.tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False)["input_ids"]) for t in v.timestamps)
    return {"kind": "video", "size": (v.info.height, v.info.width), "resized": v.resized, "grid": v.grid,
            "patches": v.grid[0] * v.grid[1] * v.grid[2], "tokens": per_pair * v.grid[0],
            "frames": len(v.indices), "frame_indices": [int(i) for i in v.indices],
            "timestamps": list(v.timestamps), "tokens_per_pair": per_pair,
            "prompt_tokens": per_pair * v.grid[0] + 2 * v.grid[0] + stamps}


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------

def _figure(figsize):
    from .viz import _new_figure  # the toolkit's one figure style (width, layout)

    return _new_figure(figsize)


def _check_table(info) -> None:
    if not isinstance(info, InputsTable):
        raise BadType(f"expected the InputsTable from inspect_inputs(...), got {type(info).__name__}")


def plot_frames(info: InputsTable, video: int = 0, *, columns: int = 8):
    """Contact sheet of a video's sampled frames: source frame index, its time, and the pair's timestamp."""
    _check_table(info)
    if not info.videos:
        raise BadValue("the prompt has no video")
    if not 0 <= video < len(info.videos):
        raise BadIndex(f"video {video} out of range: the prompt has {len(info.videos)} videos")
    v = info.videos[video]
    from .viz import DISPLAY_WIDTH, TEXT_PT

    n = len(v["frame_indices"])
    fit = max(2, int(DISPLAY_WIDTH // 1.45) // 2 * 2)  # 8-pt titles ('pair 0: <0.2 seconds>') need ~1.4 in
    cols = max(1, min(columns, n, fit))
    rows = math.ceil(n / cols)
    h, w = v["frames"].shape[1:3]
    cell = min(1.9, DISPLAY_WIDTH / cols)
    fig = _figure((cell * cols, cell * rows * h / w + 0.6 * rows + 0.5))
    colors = ("tab:blue", "tab:orange")
    for k in range(n):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(v["frames"][k])
        ax.set_xticks([])
        ax.set_yticks([])
        pair = k // 2
        for spine in ax.spines.values():
            spine.set_edgecolor(colors[pair % 2])
            spine.set_linewidth(2.5)
        title = f"#{v['frame_indices'][k]} · {v['frame_times'][k]:.2f} s"
        if k % 2 == 0:
            title = f"pair {pair}: <{v['timestamps'][pair]:.1f} seconds>\n" + title
        ax.set_title(title, fontsize=TEXT_PT["tick"])
    fig.suptitle(f"video {video}: {n} of {v['total_frames']} frames ({v['video_fps']:g} fps) → "
                 f"{v['grid'][0]} pairs × {v['tokens'] // max(v['grid'][0], 1)} tokens", fontsize=TEXT_PT["title"])
    return fig


def plot_patches(info: InputsTable, image: int = 0):
    """The image as the vision tower sees it (resized), with its 16-px patches and 2×2 merged tokens."""
    _check_table(info)
    if not info.images:
        raise BadValue("the prompt has no image")
    if not 0 <= image < len(info.images):
        raise BadIndex(f"image {image} out of range: the prompt has {len(info.images)} images")
    im = info.images[image]
    (H, W), (_, gh, gw) = im["resized"], im["grid"]
    patch = H // gh
    shown = im["image"].resize((W, H), Image.BICUBIC)
    from .viz import TEXT_PT, _title

    fig = _figure((5.2, 5.2 * H / W + 0.9))
    ax = fig.add_subplot()
    ax.imshow(shown, extent=(0, W, H, 0))
    for x in range(0, W + 1, patch):
        ax.axvline(x, color="white", lw=1.2 if x % (2 * patch) == 0 else 0.3, alpha=0.8)
    for y in range(0, H + 1, patch):
        ax.axhline(y, color="white", lw=1.2 if y % (2 * patch) == 0 else 0.3, alpha=0.8)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    _title(ax, f"image {image}: {im['size'][1]}×{im['size'][0]} px → resized {W}×{H} → {gh}×{gw} patches of "
           f"{patch} px → {im['tokens']} tokens (2×2 merged)")
    ax.tick_params(labelsize=TEXT_PT["tick"])
    ax.set_xlabel("x (px)", fontsize=TEXT_PT["label"])
    ax.set_ylabel("y (px)", fontsize=TEXT_PT["label"])
    return fig


def mark_segments(ax, source, kinds=("image", "video"), *, labels: bool = True) -> None:
    """Mark the ``kinds`` segments on an axis whose x is the token index (a line plot or a heatmap).

    Each segment is a shaded span (drawn over a heatmap too) with dashed lines at each image's /
    video's first and last token; the names sit above the axes (a top axis), never over the data.
    ``source``: an :class:`InputsTable`, a segments list or a trace with ``meta["segments"]``.
    """
    from .viz import TEXT_PT

    rows = source.meta.get("segments") if hasattr(source, "meta") else source
    if rows is None:
        raise BadValue("no segments: pass an InputsTable, a segments list, or a trace with meta['segments']")
    colors = {"image": "tab:green", "video": "tab:purple", "text": "tab:gray"}
    spans: dict[str, list[int]] = {}
    for r in rows:
        if r["kind"] not in kinds:
            continue
        c = colors[r["kind"]]
        ax.axvspan(r["start"] - 0.5, r["end"] - 0.5, facecolor=c, alpha=0.22, edgecolor=c, hatch="//", lw=0)
        name = r.get("media", r["kind"])
        span = spans.setdefault(name, [r["start"], r["end"]])
        span[1] = r["end"]
    for name, (start, end) in spans.items():
        c = colors[name.split()[0]] if name.split()[0] in colors else "black"
        for x in (start - 0.5, end - 0.5):
            ax.axvline(x, color=c, ls="--", lw=1.2)
    if labels and spans:
        top = ax.secondary_xaxis("top")
        top.set_xticks([(a + b - 1) / 2 for a, b in spans.values()], list(spans), fontsize=TEXT_PT["tick"])
        for label, name in zip(top.get_xticklabels(), spans):
            label.set_color(colors.get(name.split()[0], "black"))


def plot_positions(info: InputsTable):
    """M-RoPE position ids (t, h, w) against the token index, vision segments shaded."""
    _check_table(info)
    pos = info.position_ids.numpy()  # [3, T]
    T = pos.shape[1]
    from .viz import TEXT_PT, _plain_numbers

    fig = _figure((min(14, max(6, 2 + T / 40)), 3.8))
    ax = fig.add_subplot()
    x = np.arange(T)
    for a, (name, style) in enumerate(zip("thw", ("-", "--", ":"))):
        ax.step(x, pos[a], where="mid", ls=style, lw=1.4, label=name)
    mark_segments(ax, info)
    ax.set_xlabel("token index", fontsize=TEXT_PT["label"])
    ax.set_ylabel("position id", fontsize=TEXT_PT["label"])
    _plain_numbers(ax, "y")
    ax.tick_params(labelsize=TEXT_PT["tick"])
    ax.set_title(f"M-RoPE positions: {T} tokens, last position {int(pos.max())}", fontsize=TEXT_PT["title"])
    ax.legend(loc="upper left", fontsize=TEXT_PT["tick"])
    return fig
