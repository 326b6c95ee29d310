"""Images and video in prompts, against HF's own processor, sampler and model (fp32, the `tiny` organism).

Guards against: frame indices or timestamps drifting from HF's ``Qwen3VLVideoProcessor`` (so
results stop transferring), the transformers 5.23.0 video layout bug (an extra outer
``<|vision_start|>…<|vision_end|>`` around the per-pair blocks), token counts / grids that differ
from the processor's, M-RoPE positions that break the published rule, instrumentation that
changes logits once vision tokens are in the prompt, and bad input that is not refused before work.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata, read_video_pyav

from qwen35_lab import media
from qwen35_lab import multimodal as mm
from qwen35_lab.instrument import Trace

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "data" / "media" / "grace_hopper.jpg"
CLIP = ROOT / "data" / "media" / "shapes.mp4"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 248053, 248054, 248056, 248057  # checked against the facts below
SMALL = 128 * 128  # max_pixels that keeps the photo at a few dozen tokens


def user(*parts):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What do you see?"}]}]


def photo_part(**kw):
    return {"type": "image", "image": str(PHOTO), **kw}


def clip_part(**kw):
    return {"type": "video", "video": str(CLIP), **kw}


def drop_outer_video_markers(ids: list[int]) -> list[int]:
    """HF 5.23.0 ids without the extra outer <|vision_start|> / <|vision_end|> it leaves around a video."""
    out = []
    for i, t in enumerate(ids):
        if t == VISION_START and ids[i + 1] not in (IMAGE_PAD, VIDEO_PAD):
            continue  # a start that opens no pad run: the outer one
        if t == VISION_END and ids[i - 1] == VISION_END:
            continue  # a second end in a row: the outer one
        out.append(t)
    return out


def hf_reference(lab, messages, image, video_path, fps):
    """HF's own pipeline: its PyAV loader + its sampler, then the full Qwen3VLProcessor."""
    vp = lab.processor.video_processor
    frames, meta = read_video_pyav(str(video_path), sample_indices_fn=partial(vp.sample_frames, fps=fps))
    out = lab.processor(text=[lab.render(messages)], images=[image], videos=[frames], return_tensors="pt",
                        videos_kwargs={"do_sample_frames": False, "video_metadata": [meta],
                                       "cap_pixels_per_frame": False})
    return out, meta


# ------------------------------------------------------------------------------ sampling


GRID = [(total, video_fps) for total in (1, 2, 3, 7, 32, 100, 301, 997) for video_fps in (1.0, 7.5, 24.0, 30000 / 1001)]


def test_frame_indices_equal_hf_sampler_on_a_grid(tiny):
    vp = tiny.processor.video_processor
    bounded = Qwen3VLVideoProcessor(min_frames=2, max_frames=9)  # HF reads the bounds from the instance
    checked = 0
    for total, video_fps in GRID:
        for fps in (0.25, 1, 2, 3.3, 60):
            got = media.sample_frame_indices(total, video_fps, fps=fps)
            want = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
            np.testing.assert_array_equal(got, want, err_msg=f"total={total} video_fps={video_fps} fps={fps}")
            got = media.sample_frame_indices(total, video_fps, fps=fps, min_frames=2, max_frames=9)
            want = bounded.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps)
            np.testing.assert_array_equal(got, want, err_msg=f"bounded total={total} fps={fps}")
            checked += 2
        for num_frames in (1, 2, 5, 16, total):
            if num_frames > total:
                continue
            got = media.sample_frame_indices(total, video_fps, num_frames=num_frames)
            want = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), num_frames=num_frames)
            np.testing.assert_array_equal(got, want, err_msg=f"total={total} num_frames={num_frames}")
            checked += 1
        # the default (fps=2) is HF's default
        np.testing.assert_array_equal(media.sample_frame_indices(total, video_fps),
                                      vp.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps)))
    assert checked > 300


def test_video_defaults_and_ids_are_the_checkpoints(tiny, facts):
    """Our defaults and the tiny organism's processor carry the real video/image preprocessor
    configs and special-token ids (tests/data/model_facts.json)."""
    real = facts["video_frame_sampling"]["video_preprocessor_config"]
    assert (media.DEFAULT_FPS, media.DEFAULT_MIN_FRAMES, media.DEFAULT_MAX_FRAMES) == (
        real["fps"], real["min_frames"], real["max_frames"])
    vp = tiny.processor.video_processor
    for key in ("patch_size", "temporal_patch_size", "merge_size", "fps", "min_frames", "max_frames"):
        assert getattr(vp, key) == real[key], key
    image = facts["video_frame_sampling"]["preprocessor_config"]
    ip = tiny.processor.image_processor
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        assert getattr(ip, key) == image[key], key
    ids = facts["tokenizer"]["special_ids"]
    assert (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD) == (
        ids["<|vision_start|>"], ids["<|vision_end|>"], ids["<|image_pad|>"], ids["<|video_pad|>"])


def test_pair_timestamps_equal_hf(tiny):
    rng = np.random.RandomState(0)
    for n in (1, 2, 3, 8, 9, 31):
        idx = np.sort(rng.choice(400, n, replace=False))
        for video_fps in (1.0, 8.0, 29.97):
            want = tiny.processor._calculate_timestamps(list(idx), video_fps, 2)
            assert media.pair_timestamps(idx, video_fps) == pytest.approx(want, abs=0, rel=1e-12)


def test_start_end_window_samples_inside_it():
    # 32 frames at 8 fps; [1 s, 3 s) holds frames 8..23 by definition
    window = [i for i in range(32) if 1.0 <= i / 8 < 3.0]
    got = media.sample_frame_indices(32, 8.0, fps=2, start=1.0, end=3.0)
    want = window[0] + np.linspace(0, len(window) - 1, int(len(window) / 8 * 2)).round().astype(int)
    np.testing.assert_array_equal(got, want)
    assert media.sample_frame_indices(32, 8.0, do_sample_frames=False, start=3.5).tolist() == [28, 29, 30, 31]
    assert media.sample_frame_indices(32, 8.0, num_frames=3, end=99).tolist() == [0, 16, 31]  # end past the clip


# ------------------------------------------------------------------------------ inputs vs HF's processor


def test_inputs_equal_hf_processor_and_layout_has_no_outer_markers(tiny):
    """Pixels, grids and mm types as HF's processor gives them; ids as HF's minus its outer video markers."""
    messages = user(photo_part(), clip_part())
    ours = mm.build_inputs(tiny, messages)
    ref, _ = hf_reference(tiny, messages, Image.open(PHOTO), CLIP, fps=2)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0, msg=key)
    ref_ids = ref["input_ids"][0].tolist()
    assert len(ref_ids) == ours["input_ids"].shape[1] + 2  # transformers 5.23.0 adds one outer pair per video
    fixed = drop_outer_video_markers(ref_ids)
    assert ours["input_ids"][0].tolist() == fixed
    types = tiny.processor.create_mm_token_type_ids([fixed])[0]
    assert ours["mm_token_type_ids"][0].tolist() == types
    # every <|vision_start|> opens a pad run, every <|vision_end|> closes one
    ids = ours["input_ids"][0].tolist()
    assert all(ids[i + 1] in (IMAGE_PAD, VIDEO_PAD) for i, t in enumerate(ids) if t == VISION_START)
    assert all(ids[i - 1] in (IMAGE_PAD, VIDEO_PAD) for i, t in enumerate(ids) if t == VISION_END)


@pytest.mark.parametrize("options", [{"num_frames": 5}, {"fps": 3, "start": 1.0, "end": 3.0}])
def test_video_layout_equals_reference_built_from_grid_and_timestamps(tiny, options):
    """Reference: template text, then per pair `<t seconds>` + start + pads + end, from HF's grid and timestamps."""
    tok = tiny.tokenizer
    messages = user(clip_part(**options))
    ours = mm.build_inputs(tiny, messages)
    t_grid, h_grid, w_grid = ours["video_grid_thw"][0].tolist()
    first = [i for i in range(32) if i / 8 >= options.get("start", 0)][0]
    last = [i for i in range(32) if i / 8 < options.get("end", 99)][-1]
    total = last - first + 1
    sampler = tiny.processor.video_processor.sample_frames
    meta = VideoMetadata(total_num_frames=total, fps=8.0)
    rate = {"num_frames": options["num_frames"]} if "num_frames" in options else {"fps": options["fps"]}
    indices = first + sampler(meta, **rate)
    stamps = tiny.processor._calculate_timestamps(list(indices), 8.0, 2)
    assert t_grid == len(stamps) == -(-len(indices) // 2)
    n_pad = h_grid * w_grid // 4
    before, after = tiny.render(messages).split("<|vision_start|><|video_pad|><|vision_end|>")
    want = tok.encode(before, add_special_tokens=False)
    for t in stamps:
        want += tok.encode(f"<{t:.1f} seconds>", add_special_tokens=False)
        want += [VISION_START] + [VIDEO_PAD] * n_pad + [VISION_END]
    want += tok.encode(after, add_special_tokens=False)
    assert ours["input_ids"][0].tolist() == want
    info = mm.inspect_inputs(tiny, messages)
    assert info.videos[0]["frame_indices"] == indices.tolist()
    assert [r["timestamp"] for r in info if r["kind"] == "video"] == [float(f"{t:.1f}") for t in stamps]


def test_input_forms_agree(tiny, tmp_path):
    """Path, file:// URL, image_url, PIL and arrays give the same inputs; frames in memory equal the file's."""
    pil = Image.open(PHOTO).convert("RGB")
    forms = [photo_part(), {"type": "image", "image": PHOTO.as_uri()},
             {"type": "image_url", "image_url": {"url": PHOTO.as_uri()}}, {"type": "image", "image": pil},
             {"type": "image", "image": np.asarray(pil)}]
    base = mm.build_inputs(tiny, user(forms[0]), image_max_pixels=SMALL)
    for part in forms[1:]:
        got = mm.build_inputs(tiny, user({**part, "max_pixels": SMALL}))
        for key in base:
            torch.testing.assert_close(got[key], base[key], rtol=0, atol=0, msg=f"{part['type']}: {key}")
    every = media.read_frames(CLIP, range(32))
    file_inputs = mm.build_inputs(tiny, user({"type": "video_url", "video_url": {"url": CLIP.as_uri()}}))
    for video in (every, torch.from_numpy(every), [Image.fromarray(f) for f in every]):
        got = mm.build_inputs(tiny, user({"type": "video", "video": video, "video_fps": 8}))
        for key in file_inputs:
            torch.testing.assert_close(got[key], file_inputs[key], rtol=0, atol=0, msg=key)
    # options: a keyword sets the default, the part's own keys win; *_url dicts may carry them too
    six = mm.build_inputs(tiny, user(clip_part(num_frames=6)))
    for got in (mm.build_inputs(tiny, user(clip_part()), num_frames=6),
                mm.build_inputs(tiny, user(clip_part(num_frames=6)), fps=4),
                mm.build_inputs(tiny, user({"type": "video_url",
                                            "video_url": {"url": CLIP.as_uri(), "num_frames": 6}}))):
        for key in six:
            torch.testing.assert_close(got[key], six[key], rtol=0, atol=0, msg=key)
    # pre-sampled frames, taken as given
    presampled = mm.build_inputs(tiny, user({"type": "video", "video": every[[0, 4, 9, 13, 18, 22, 27, 31]],
                                             "video_fps": 8, "do_sample_frames": False}))
    torch.testing.assert_close(presampled["pixel_values_videos"], file_inputs["pixel_values_videos"], rtol=0, atol=0)


def test_token_counts_and_budget_equal_processor(tiny):
    ip, vp = tiny.processor.image_processor, tiny.processor.video_processor
    photo = Image.open(PHOTO)
    for max_pixels in (SMALL, 256 * 256, 400 * 400, 16777216):
        budget = mm.vision_budget(tiny, image=str(PHOTO), max_pixels=max_pixels, min_pixels=min(65536, max_pixels))
        out = ip(images=[photo], size={"shortest_edge": min(65536, max_pixels), "longest_edge": max_pixels})
        assert list(budget["grid"]) == out["image_grid_thw"][0].tolist()
        assert budget["tokens"] == out["pixel_values"].shape[0] // 4
        assert mm.vision_budget(tiny, image=(600, 512), max_pixels=max_pixels,
                                min_pixels=min(65536, max_pixels))["tokens"] == budget["tokens"]
    for options in ({"fps": 1}, {"fps": 4}, {"num_frames": 7}, {"fps": 2, "max_pixels": 8 * 4096}):
        budget = mm.vision_budget(tiny, video=str(CLIP), **options)
        rate = {k: v for k, v in options.items() if k in ("fps", "num_frames")}
        size = {"shortest_edge": vp.size["shortest_edge"],
                "longest_edge": options.get("max_pixels", vp.size["longest_edge"])}
        frames, meta = read_video_pyav(str(CLIP), sample_indices_fn=partial(vp.sample_frames, **rate))
        out = vp(videos=[frames], do_sample_frames=False, video_metadata=[meta], size=size, cap_pixels_per_frame=False)
        assert list(budget["grid"]) == out["video_grid_thw"][0].tolist(), options
        assert budget["tokens"] == out["pixel_values_videos"].shape[0] // 4
        assert budget["frame_indices"] == meta.frames_indices.tolist()
        n = mm.build_inputs(tiny, user(clip_part(**options)))["input_ids"].shape[1]
        n_text = mm.build_inputs(tiny, user())["input_ids"].shape[1]
        assert n - n_text == budget["prompt_tokens"]
    by_size = mm.vision_budget(tiny, video=(32, 96, 128), video_fps=8.0)
    assert by_size["tokens"] == mm.vision_budget(tiny, video=str(CLIP))["tokens"]


# ------------------------------------------------------------------------------ positions and inspection


def reference_positions(ids, image_grids, video_grids, merge=2):
    """The README's rule: text p, p, p; a vision block at p gets (p, p+row, p+col); then p += max(rows, cols)."""
    blocks = {IMAGE_PAD: iter([(g[1] // merge, g[2] // merge) for g in image_grids]),
              VIDEO_PAD: iter([(g[1] // merge, g[2] // merge) for g in video_grids for _ in range(g[0])])}
    out, p, i = [], 0, 0
    while i < len(ids):
        if ids[i] in blocks:
            rows, cols = next(blocks[ids[i]])
            out += [(p, p + r, p + c) for r in range(rows) for c in range(cols)]
            i += rows * cols
            p += max(rows, cols)
        else:
            out.append((p, p, p))
            p, i = p + 1, i + 1
    return torch.tensor(out).T  # [3, T]


def test_mrope_positions_follow_reference_rule(tiny):
    messages = user(photo_part(max_pixels=SMALL), clip_part(num_frames=6))
    info = mm.inspect_inputs(tiny, messages)
    ids = info.inputs["input_ids"][0].tolist()
    want = reference_positions(ids, info.inputs["image_grid_thw"].tolist(), info.inputs["video_grid_thw"].tolist())
    torch.testing.assert_close(info.position_ids, want, rtol=0, atol=0)
    rows = list(info)
    assert [r["kind"] for r in rows] == ["text", "image", "text", "video", "text", "video", "text", "video", "text"]
    assert sum(r["tokens"] for r in rows) == len(ids)
    assert all(a["end"] == b["start"] for a, b in zip(rows, rows[1:]))
    image = rows[1]
    assert image["t"] == [image["start"]] * 2 and image["grid"] == info.inputs["image_grid_thw"][0].tolist()
    assert image["h"][1] - image["h"][0] + 1 == image["grid"][1] // 2
    assert [r["frames"] for r in rows if r["kind"] == "video"] == [[0, 6], [12, 19], [25, 31]]
    assert info.videos[0]["frame_indices"] == [0, 6, 12, 19, 25, 31]
    df = info.to_pandas()
    assert list(df["kind"]) == [r["kind"] for r in rows] and int(df["tokens"].sum()) == len(ids)
    text = repr(info)
    assert "image 0" in text and "video 0" in text and "0,6" in text


def test_plots(tiny):
    info = mm.inspect_inputs(tiny, user(photo_part(max_pixels=SMALL), clip_part(num_frames=5)))
    sheet = mm.plot_frames(info)
    assert len(sheet.axes) == 5
    assert "pair 2: <3.9 seconds>" in sheet.axes[4].get_title()
    patches = mm.plot_patches(info)
    (gh, gw), (H, W) = info.images[0]["grid"][1:], info.images[0]["resized"]
    assert len(patches.axes[0].lines) == (gh + 1) + (gw + 1) and f"{W}×{H}" in patches.axes[0].get_title()
    positions = mm.plot_positions(info)
    lines = [line for line in positions.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["t", "h", "w"]
    np.testing.assert_array_equal(lines[1].get_ydata(), info.position_ids[1].numpy())
    with pytest.raises(ValueError, match="no video"):
        mm.plot_frames(mm.inspect_inputs(tiny, user(photo_part(max_pixels=SMALL))))


# ------------------------------------------------------------------------------ running the model


def test_instrumented_parity_and_vision_captures(tiny):
    """capture="*" over an image and a video: logits equal plain HF's; vision probes equal HF's modules."""
    messages = user(photo_part(max_pixels=SMALL), clip_part())
    inputs = mm.build_inputs(tiny, messages)
    assert not tiny.is_instrumented
    recorded = {}
    hooks = [tiny.model.model.visual.blocks[0].register_forward_hook(
                 lambda m, a, o: recorded.setdefault("block0", []).append(o.detach().clone())),
             tiny.model.model.language_model.layers[0].linear_attn.in_proj_b.register_forward_hook(
                 lambda m, a, o: recorded.__setitem__("b0", o.detach().clone()))]
    try:
        with torch.no_grad():
            plain = tiny.model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    tr = tiny.run(messages, capture="*")
    assert tr.meta["ran_instrumented"], "the instrumented path did not run"
    assert (tr["logits"] - plain).abs().max().item() <= 1e-5
    # vision tower block 0: images first, then videos, all patches
    torch.testing.assert_close(tr["visual.blocks.0.out"], torch.cat(recorded["block0"]), rtol=0, atol=1e-6)
    rows = mm.segments(tiny, inputs)
    n_patches = sum(int(g.prod()) for g in torch.cat([inputs["image_grid_thw"], inputs["video_grid_thw"]]))
    assert tr["visual.blocks.1.out"].shape[0] == n_patches == max(r["patches"][1] for r in rows if "patches" in r)
    # the write strength β over the video tokens is HF's sigmoid(in_proj_b x) there
    tr.meta["segments"] = rows
    video = [i for i, r in enumerate(rows) if r["kind"] == "video"]
    beta = torch.sigmoid(recorded["b0"])
    for i in video:
        s = tr.segment_slice(i)
        torch.testing.assert_close(tr["layers.0.deltanet.beta"][:, s], beta[:, s], rtol=0, atol=1e-6)
    assert [s.start for s in mm.segment_slices(tr, "video")] == [rows[i]["start"] for i in video]
    # the DeltaNet state after the last video token is served from the trace
    last = rows[video[-1]]["end"] - 1
    text = tiny.text_config
    assert tr.state(0, last).shape[-2:] == (text.linear_key_head_dim, text.linear_value_head_dim)


def test_generate_and_chat_read_the_pixels(tiny):
    messages = user(photo_part(max_pixels=SMALL))
    n = mm.build_inputs(tiny, messages)["input_ids"].shape[1]
    gen = tiny.generate(messages, max_new_tokens=2, do_sample=False)
    assert gen.prompt_ids.shape[1] == n and gen.ids.shape[1] >= 1
    reply = tiny.chat(messages, max_new_tokens=1, do_sample=False)
    assert reply.prompt_tokens == n, "lab.chat must build its prompt with multimodal.build_inputs"


def test_text_only_prompts_and_models(tiny, tiny_text):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    ids = mm.build_inputs(tiny, messages)["input_ids"]
    assert ids[0].tolist() == tiny.tokenizer(tiny.render(messages), add_special_tokens=False)["input_ids"]
    rows = mm.segments(tiny_text, {"input_ids": ids})
    assert rows == [{"kind": "text", "start": 0, "end": ids.shape[1], "tokens": ids.shape[1]}]
    with pytest.raises(ValueError, match="no vision tower"):
        mm.build_inputs(tiny_text, user(photo_part()))


# ------------------------------------------------------------------------------ the sample media


def test_sample_media(tmp_path):
    assert PHOTO.stat().st_size == 61306 and Image.open(PHOTO).size == (512, 600)
    assert "public domain" in (PHOTO.parent / "ATTRIBUTION.md").read_text().lower()
    info = media.probe_video(CLIP)
    assert (info.total_frames, info.video_fps, info.height, info.width) == (32, 8.0, 96, 128)
    frames = media.synthetic_video(4.0, 8, 128, 96)
    decoded = media.read_frames(CLIP, range(32))
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # lossy, but the same clip
    a, b = media.write_video(tmp_path / "a.mp4", frames, 8), media.write_video(tmp_path / "b.mp4", frames, 8)
    assert a.read_bytes() == b.read_bytes()  # regenerating is deterministic


# ------------------------------------------------------------------------------ bad input


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


BAD = {  # case: (messages from a tmp dir, build_inputs keywords, error, message pattern)
    "missing image": (lambda d: user({"type": "image", "image": str(d / "nope.jpg")}), {},
                      FileNotFoundError, "nope.jpg"),
    "unreadable image": (lambda d: user({"type": "image", "image": _write(d / "x.jpg", b"not a jpeg")}), {},
                         ValueError, "x.jpg.*not a readable image"),
    "missing video": (lambda d: user({"type": "video", "video": str(d / "nope.mp4")}), {},
                      FileNotFoundError, "nope.mp4"),
    "unreadable video": (lambda d: user({"type": "video", "video": _write(d / "v.mp4", b"\x00" * 64)}), {},
                         ValueError, "v.mp4.*not a readable video"),
    "no frames": (lambda d: user({"type": "video", "video": np.zeros((0, 32, 32, 3), np.uint8), "video_fps": 4}), {},
                  ValueError, "no frames"),
    "no frames (list)": (lambda d: user({"type": "video", "video": [], "video_fps": 4}), {},
                         ValueError, "no frames"),
    "fps 0": (lambda d: user(clip_part(fps=0)), {}, ValueError, "fps=0 is out of range; valid: \\(0, inf\\)"),
    "fps < 0 (keyword)": (lambda d: user(clip_part()), {"fps": -1},
                          ValueError, "fps=-1 is out of range; valid: \\(0, inf\\)"),
    "num_frames 0": (lambda d: user(clip_part(num_frames=0)), {},
                     ValueError, "num_frames=0 is out of range; valid: >= 1"),
    "too many frames": (lambda d: user(clip_part(num_frames=33)), {},
                        ValueError, r"num_frames=33 is more than the video has \(32 frames\)"),
    "fps and num_frames": (lambda d: user(clip_part(fps=1, num_frames=4)), {}, ValueError, "exclusive"),
    "start >= end": (lambda d: user(clip_part(start=2.0, end=1.0)), {},
                     ValueError, r"start \(2.0 s\) must be before end \(1.0 s\)"),
    "start past the end": (lambda d: user(clip_part(start=4.0)), {}, ValueError, "start=4.0 s is at or past the end"),
    "tiny image": (lambda d: user({"type": "image", "image": np.zeros((8, 40, 3), np.uint8)}), {},
                   ValueError, "40×8 px; each side must be at least 16 px"),
    "float image": (lambda d: user({"type": "image", "image": np.zeros((32, 32, 3), np.float32)}), {},
                    ValueError, "uint8"),
    "remote url": (lambda d: user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), {},
                   ValueError, "remote URL"),
    "unknown option": (lambda d: user(clip_part(frames=3)), {}, ValueError, "unknown video option.*'frames'"),
    "unknown keyword": (lambda d: user(clip_part()), {"frame_rate": 3}, TypeError, "unknown option 'frame_rate'"),
    "image in system": (lambda d: [{"role": "system", "content": [photo_part()]}] + user(), {},
                        ValueError, "system messages hold text only"),
    "pad token in text": (lambda d: [{"role": "user", "content": "look: <|image_pad|>"}], {},
                          ValueError, r"<\|image_pad\|>"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_work(tiny, tmp_path, monkeypatch, case):
    make, options, error, match = BAD[case]
    messages = make(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("pixel work started before the input was checked")

    monkeypatch.setattr(media, "read_frames", no_work)
    monkeypatch.setattr(type(tiny.processor.image_processor), "__call__", no_work)
    monkeypatch.setattr(type(tiny.processor.video_processor), "__call__", no_work)
    with pytest.raises(error, match=match):
        mm.build_inputs(tiny, messages, **options)


def test_too_many_vision_tokens_for_the_context(tiny, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("pixel work started before the context was checked")

    monkeypatch.setattr(media, "read_frames", no_work)
    config = copy.copy(tiny.text_config)
    config.max_position_embeddings = 300
    monkeypatch.setattr(type(tiny), "text_config", property(lambda self: config))
    with pytest.raises(ValueError, match=r"would be \d+ tokens \(3\d\d of them vision tokens\), more than the "
                                         r"model's max_position_embeddings of 300"):
        mm.build_inputs(tiny, user(photo_part(), clip_part()))
