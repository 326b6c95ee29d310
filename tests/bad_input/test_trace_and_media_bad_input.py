"""Bad inputs to saved traces, trace access, media files and plots: a trace file of another format
version or with missing fields / tensors, wrong argument types said as types, save paths under a
file, truncated images and non-videos — each refused with the value and what is valid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import media, viz
from qwen35_lab.checks import BadIndex, BadType, BadValue, MissingFile, NotCaptured
from qwen35_lab.instrument import Trace

IDS = torch.arange(300, 312)[None]
MEDIA = Path(__file__).resolve().parents[2] / "data" / "media"


@pytest.fixture(scope="module")
def lab():
    return ql.load("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def trace(lab):
    return lab.run(IDS, capture=["layers.0.deltanet.state", "layers.0.deltanet.beta"])


@pytest.fixture
def saved(trace, tmp_path) -> Path:
    return trace.save(tmp_path / "trace")


def _edit_doc(folder: Path, change) -> None:
    doc = json.loads((folder / "trace.json").read_text())
    change(doc)
    (folder / "trace.json").write_text(json.dumps(doc))


def test_a_saved_trace_loads_back(saved, trace):
    back = Trace.load(saved)
    assert torch.equal(back.state(0, 5), trace.state(0, 5))


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(version=2), r"format version 2; this qwen35_lab reads version 1"),
    (lambda d: d.pop("version"), r"format version None"),
    (lambda d: d.update(format="other"), r"is not a qwen35_lab trace"),
    (lambda d: d.pop("states"), r"field 'states' should be an object"),
    (lambda d: d.pop("chunk_size"), r"field 'chunk_size' should be a positive int"),
    (lambda d: d.update(chunk_size="64"), r"field 'chunk_size'"),
    (lambda d: d.update(chunk_size=0), r"field 'chunk_size'"),
    (lambda d: d.update(positions=[]), r"field 'positions' should be an object"),
    (lambda d: d.update(positions={"x": ["a"]}), r"field 'positions'"),
    (lambda d: d.update(tensors="all"), r"field 'tensors' should be a list"),
    (lambda d: d["states"]["0"].pop("checkpoints"), r"field 'states'"),
    (lambda d: d["states"].update({"x": {}}), r"field 'states'"),
    (lambda d: d["tensors"].append("probe/layers.9.deltanet.beta"), r"lists tensors that trace.safetensors does not "
                                                                      r"hold: \['probe/layers.9.deltanet.beta'\]"),
    (lambda d: d["states"]["0"]["checkpoints"].append(999), r"does not hold: \['state/0/ckpt/999'\]"),
])
def test_broken_trace_documents(saved, change, match):
    _edit_doc(saved, change)
    with pytest.raises(BadValue, match=match):
        Trace.load(saved)


def test_trace_json_that_is_not_an_object_or_json(saved):
    (saved / "trace.json").write_text("[1, 2]")
    with pytest.raises(BadValue, match="is not a qwen35_lab trace"):
        Trace.load(saved)
    (saved / "trace.json").write_text("{oops")
    with pytest.raises(BadValue, match="not valid JSON"):
        Trace.load(saved)


def test_missing_trace_files(saved, tmp_path):
    (saved / "trace.safetensors").unlink()
    with pytest.raises(MissingFile, match="trace.safetensors is missing"):
        Trace.load(saved)
    with pytest.raises(MissingFile, match="no trace directory"):
        Trace.load(tmp_path / "nothing")
    with pytest.raises(BadType, match="path must be a path"):
        Trace.load(3)


def test_save_paths_under_a_file_or_onto_a_file(trace, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadValue, match=r"cannot write path '.*file/trace': '.*file' is a file, not a directory"):
        trace.save(tmp_path / "file" / "trace")
    with pytest.raises(BadValue, match=r"is a file; this writes a directory there"):
        trace.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"  # nothing half-written, nothing lost


@pytest.mark.parametrize("args, error, match", [
    (("0", 0), BadType, r"layer must be an int, got '0'"),
    ((0, 1.0), BadType, r"t must be an int, got 1.0"),
    ((0, "5"), BadType, r"t must be an int"),
    ((None, 0), BadType, r"layer must be an int, got None"),
    ((0, 12), BadIndex, r"position 12 is out of range for layer 0's state: valid 0–11"),
    ((0, -1), BadIndex, r"position -1 is out of range"),
    ((1, 0), NotCaptured, r"the DeltaNet state of layer 1 was not captured \(add 'layers.1.deltanet.state'"),
])
def test_state_arguments(trace, args, error, match):
    with pytest.raises(error, match=match):
        trace.state(*args)


def test_trace_item_access(trace):
    with pytest.raises(NotCaptured, match=r"'layers.1.deltanet.beta' was not captured; captured: ") as info:
        trace["layers.1.deltanet.beta"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert str(info.value) == info.value.args[0]  # the message itself, not KeyError's quoted repr
    with pytest.raises(BadType, match=r"indexed by probe name \(str\)"):
        trace[0]
    with pytest.raises(NotCaptured, match="stored as checkpoints: use trace.state"):
        trace["layers.0.deltanet.state"]


@pytest.mark.parametrize("call, error, match", [
    (lambda tr: viz.plot_gates(tr, 1, "beta"), NotCaptured, r"needs 'layers.1.deltanet.beta'.*capture="),
    (lambda tr: viz.plot_gates(tr, 3, "beta"), BadValue, r"layer 3 is a full_attention layer"),
    (lambda tr: viz.plot_gates(tr, 99, "beta"), BadIndex, r"layer 99 is out of range: the model has 8 layers"),
    (lambda tr: viz.plot_gates(tr, 0, "alpha"), BadValue, r"gate must be one of"),
    (lambda tr: viz.plot_gates(tr, "0", "beta"), BadType, r"layer must be an int"),
    (lambda tr: viz.plot_gates(tr, 0, "beta", batch=1), BadIndex, r"batch 1 is out of range"),
    (lambda tr: viz.plot_gates({}, 0), BadType, r"expected a Trace"),
    (lambda tr: viz.plot_attention(tr, 3, head=0), NotCaptured, r"layers.3.attn.probs"),
])
def test_plots_refuse_what_they_cannot_draw(trace, call, error, match):
    with pytest.raises(error, match=match):
        call(trace)


# ----------------------------------------------------------------------------- media
def _message(kind: str, source) -> list:
    return [{"role": "user", "content": [{"type": kind, kind: source}, {"type": "text", "text": "What is it?"}]}]


def test_a_truncated_image_is_named(lab, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((MEDIA / "grace_hopper.jpg").read_bytes()[:3000])
    with pytest.raises(BadValue, match=r"messages\[0\] content\[0\] image .*cannot be decoded.*truncated"):
        lab.run(_message("image", str(cut)))


@pytest.mark.parametrize("make, match", [
    (lambda d: shutil.copy(MEDIA / "grace_hopper.jpg", d / "photo.mp4"), r"is an image, not a video; pass it as"),
    (lambda d: (d / "text.mp4").write_bytes(b"not a video at all" * 20), r"is not a readable video"),
    (lambda d: (d / "empty.mp4").write_bytes(b""), r"not a readable video|has no video stream"),
])
def test_non_videos_passed_as_video(lab, tmp_path, make, match):
    make(tmp_path)
    path = next(tmp_path.iterdir())
    with pytest.raises(BadValue, match=match):
        lab.run(_message("video", str(path)))


def test_a_text_file_passed_as_an_image(lab, tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(BadValue, match=r"is not a readable image"):
        lab.run(_message("image", str(tmp_path / "notes.png")))


def test_a_missing_media_file(lab, tmp_path):
    with pytest.raises(MissingFile, match=r"does not exist"):
        lab.run(_message("image", str(tmp_path / "nope.png")))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"fps": 0}, BadValue, r"fps"),
    ({"fps": "2"}, BadType, r"fps"),
    ({"num_frames": 0}, BadValue, r"num_frames"),
    ({"num_frames": 1000}, BadValue, r"num_frames"),
    ({"fps": 2, "num_frames": 4}, BadValue, r"fps.*num_frames|num_frames.*fps"),
])
def test_frame_sampling_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        media.sample_frame_indices(32, 8.0, **kwargs)


@pytest.mark.parametrize("writer", ["file", "directory"])
def test_every_atomic_save_names_a_path_it_cannot_write(tmp_path, writer):
    from qwen35_lab._io import atomic_directory, atomic_file

    (tmp_path / "plain").write_text("x")
    target = tmp_path / "plain" / "out"
    with pytest.raises(BadValue, match=r"cannot write path '.*plain/out': '.*plain' is a file"):
        with (atomic_file(target) if writer == "file" else atomic_directory(target)):
            pass
    (tmp_path / "folder").mkdir()
    wrong = tmp_path / ("folder" if writer == "file" else "plain")
    with pytest.raises(BadValue, match=r"is a (directory|file);"):
        with (atomic_file(wrong) if writer == "file" else atomic_directory(wrong)):
            pass
    assert (tmp_path / "plain").read_text() == "x"



def test_an_atomic_save_has_the_mode_a_plain_write_gives(tmp_path):
    """The temporary file behind an atomic save starts private (0600); the saved file must not stay so."""
    from qwen35_lab._io import atomic_file

    (tmp_path / "plain").write_bytes(b"x")
    with atomic_file(tmp_path / "saved") as f:
        f.write(b"x")
    assert oct((tmp_path / "saved").stat().st_mode & 0o777) == oct((tmp_path / "plain").stat().st_mode & 0o777)
