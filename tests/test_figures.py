"""Every public plotting function, rendered on the `tiny` organism and checked from the drawn figure
itself: what a reader would see at the notebook's display width.

- head / layer axes carry whole-number ticks;
- no text is smaller than 8 pt (after the notebook shrinks a figure wider than ``viz.DISPLAY_WIDTH``);
- no two drawn texts overlap (their window extents after a draw), and none is cut off by the edge;
- each colour-mapped image spans its colour range (data occupying < 5% of it fails), and its colour
  bar names the quantity;
- no token text is a ``\\u`` escape.

The checker is tested too: figures with each defect are built by hand and must fail.
"""

from __future__ import annotations

import itertools
import re
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")

import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qwen35_lab import multimodal as mm  # noqa: E402
from qwen35_lab import sampling, viz  # noqa: E402
from qwen35_lab import longctx as lc  # noqa: E402
from qwen35_lab.widgets import TraceExplorer  # noqa: E402

# a Thai word (no installed font need draw it) and a newline among ordinary words
PROMPT = "The quick brown fox โคม jumps over the lazy dog.\nThe quick brown fox"
CAPTURE = ["layers.*.deltanet.beta", "layers.*.deltanet.g", "layers.*.deltanet.state",
           "layers.*.attn.probs", "layers.*.attn.summary", "layers.*.attn.gate"]
ESCAPE = re.compile(r"\\u[0-9a-fA-F]{4}|\\U[0-9a-fA-F]{8}|\\x[0-9a-fA-F]{2}")
WHOLE = re.compile(r"^[−-]?\d+$")
CATEGORY_AXIS = re.compile(r"^(value |query |key |kv )?(head|layer)s?\b")  # "value head", "layer", ...


# ----------------------------------------------------------------------------- the checker

@contextmanager
def _recording_texts():
    """Record every Text that really draws (ticks outside the view and empty strings do not)."""
    drawn = []
    original = matplotlib.text.Text.draw

    def draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self, self.get_window_extent(renderer)))

    matplotlib.text.Text.draw = draw
    try:
        yield drawn
    finally:
        matplotlib.text.Text.draw = original


def figure_problems(fig) -> list[str]:
    """What is wrong with ``fig`` for a reader; empty when it passes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # figures leave pyplot closed, with a blank canvas: draw as savefig would
    with _recording_texts() as drawn:
        canvas.draw()
    problems = []
    width = fig.get_size_inches()[0]
    shrink = min(1.0, viz.DISPLAY_WIDTH / width)
    edge = fig.bbox
    for text, box in drawn:
        s = text.get_text()
        if text.get_fontsize() * shrink < viz.MIN_TEXT_PT - 1e-6:
            problems.append(f"text {s!r} is {text.get_fontsize() * shrink:.1f} pt at the display width")
        if ESCAPE.search(s):
            problems.append(f"text {s!r} is an escape sequence")
        if box.x0 < edge.x0 - 2 or box.y0 < edge.y0 - 2 or box.x1 > edge.x1 + 2 or box.y1 > edge.y1 + 2:
            problems.append(f"text {s!r} is cut off by the figure's edge")
    for (t1, b1), (t2, b2) in itertools.combinations(drawn, 2):
        overlap_w = min(b1.x1, b2.x1) - max(b1.x0, b2.x0)
        overlap_h = min(b1.y1, b2.y1) - max(b1.y0, b2.y0)
        if overlap_w > 1.0 and overlap_h > 1.0:
            problems.append(f"texts {t1.get_text()!r} and {t2.get_text()!r} overlap")
    def scale(im):  # images on one scale share one colour bar
        return type(im.norm), im.norm.vmin, im.norm.vmax, im.get_cmap().name

    named = {scale(im) for ax in fig.axes for im in ax.images
             if im.colorbar is not None and im.colorbar.ax.get_ylabel().strip()}
    for ax in fig.axes:
        for axis, name in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if CATEGORY_AXIS.match(name):
                lo, hi = sorted(axis.get_view_interval())
                for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels()):
                    if lo - 1e-9 <= loc <= hi + 1e-9 and label.get_text() and (
                            not WHOLE.match(label.get_text()) or abs(loc - round(loc)) > 1e-9):
                        problems.append(f"{name!r} axis has the tick {label.get_text()!r} at {loc:g}")
        for im in ax.images:
            data = np.ma.masked_invalid(np.ma.asarray(im.get_array(), dtype=float))
            if data.ndim != 2:  # a photograph or a video frame: no colour scale
                continue
            values = data.compressed()
            if values.size == 0 or values.min() == values.max():
                continue
            normed = np.clip(np.ma.filled(im.norm(values), np.nan), 0, 1)
            spread = float(np.nanmax(normed) - np.nanmin(normed))
            if spread < 0.05:
                problems.append(f"image in {ax.get_title()!r} occupies {spread:.1%} of its colour range")
            if scale(im) not in named:
                problems.append(f"image in {ax.get_title()!r} has no named colour bar")
    return problems


def assert_readable(fig):
    problems = figure_problems(fig)
    assert not problems, "\n".join(problems[:20])


# ----------------------------------------------------------------------------- the checker fails

def test_the_checker_finds_each_defect():
    fig = viz._new_figure((6, 3))
    ax = fig.add_subplot()
    im = ax.imshow(np.array([[0.97, 0.98], [0.975, 0.99]]), vmin=0, vmax=1)
    fig.colorbar(im, ax=ax)
    ax.set_ylabel("head")
    ax.set_yticks([-0.5, 0.0, 0.5])
    ax.set_title("tiny title", fontsize=6)
    ax.text(0.1, 0.1, "\\u0e42\\u0e04", transform=ax.transAxes, fontsize=9)
    ax.text(0.1, 0.1, "on top", transform=ax.transAxes, fontsize=9)
    found = "\n".join(figure_problems(fig))
    for what in ("occupies", "no named colour bar", "tick '−0.5'", "'tiny title' is 6.0 pt", "escape sequence",
                 "overlap"):
        assert what in found, (what, found)
    wide = viz._new_figure((6, 3))
    wide.set_size_inches(22, 3)  # as if made without the width cap: the notebook shrinks it by half
    wide.add_subplot().set_title("title", fontsize=10)
    assert "pt at the display width" in "\n".join(figure_problems(wide))


# ----------------------------------------------------------------------------- every plot

@pytest.fixture(scope="module")
def trace(tiny):
    return tiny.run(PROMPT, capture=CAPTURE, chunk_size=4)


@pytest.fixture(scope="module")
def layers(tiny):
    deltanet = [i for i, t in enumerate(tiny.layer_types) if t == "linear_attention"]
    attention = [i for i, t in enumerate(tiny.layer_types) if t == "full_attention"]
    return deltanet, attention


def test_token_text_is_readable_where_no_font_draws_it(tiny, trace):
    labels = viz.token_labels(trace)
    ids = trace.tokens[0].tolist()
    for label, i in zip(labels, ids):
        text = tiny.tokenizer.decode([i]).replace("\n", "↵")
        assert not ESCAPE.search(label)
        drawable = all(ord(c) in viz._font_coverage() for c in text) and "\ufffd" not in text
        if drawable:
            assert label == text
        else:  # the id and the token's own UTF-8 bytes, in hex
            raw = bytes(viz._BYTE_DECODER[c] for c in tiny.tokenizer.convert_ids_to_tokens(i))
            assert label.startswith(f"#{i} "), label
            parts = re.split(r"(⟨[0-9a-f ]+⟩)", label[len(f"#{i} "):])
            assert b"".join(bytes.fromhex(p[1:-1]) if p.startswith("⟨") else p.encode() for p in parts) == raw
    assert any(label.startswith("#") for label in labels)  # the Thai word really was exercised


@pytest.mark.parametrize("gate", ["beta", "g", "decay"])
def test_gate_plots(trace, layers, gate):
    assert_readable(viz.plot_gates(trace, layers[0][0], gate))
    assert_readable(viz.plot_gates_overview(trace, gate))


def test_decay_shows_the_forgotten_share_on_a_log_scale(trace, layers):
    layer = layers[0][0]
    fig = viz.plot_gates(trace, layer, "decay")
    im = fig.axes[0].images[0]
    g = trace[f"layers.{layer}.deltanet.g"][0].double()
    np.testing.assert_allclose(im.get_array(), (1 - g.exp()).T.numpy(), rtol=1e-6)
    assert isinstance(im.norm, matplotlib.colors.LogNorm)
    assert "1 − exp(g)" in im.colorbar.ax.get_ylabel() and "log" in im.colorbar.ax.get_ylabel()


def test_deltanet_plots(tiny, trace, layers):
    layer = layers[0][1]
    for fig in (viz.plot_half_life(trace), viz.plot_half_life(tiny), viz.plot_state_norms(trace, layer),
                viz.plot_state_readout(trace, layer), viz.plot_effective_attention(trace, layer, 1),
                viz.plot_state_contributions(trace.state_contributions(layer, trace.length - 1))):
        assert_readable(fig)


def test_attention_plots(tiny, trace, layers):
    a = layers[1][0]
    fig = viz.plot_attention(trace, a, 0)
    assert_readable(fig)
    assert isinstance(fig.axes[0].images[0].norm, matplotlib.colors.LogNorm)
    for fig in (viz.plot_attention_summary(trace, a), viz.plot_attention_gate(trace, a),
                viz.plot_next_token({"as run": trace, "again": trace}, tiny, k=8)):
        assert_readable(fig)


def test_explorer_figure(trace, layers):
    ex = TraceExplorer(trace)
    ex.select(layer=layers[0][-1], token=trace.length - 1)
    assert_readable(ex.current_figure)


def test_multimodal_plots(tiny):
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data"
    photo = next(p for p in sorted(data.rglob("*")) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    clip = next(p for p in sorted(data.rglob("*")) if p.suffix.lower() in (".mp4", ".webm", ".avi", ".mov"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(photo), "max_pixels": 128 * 128},
                                          {"type": "video", "video": str(clip), "num_frames": 8},
                                          {"type": "text", "text": "Describe both."}]}]
    info = mm.inspect_inputs(tiny, msgs)
    for fig in (mm.plot_frames(info), mm.plot_patches(info), mm.plot_positions(info)):
        assert_readable(fig)
    tr = tiny.run(msgs, capture="layers.0.deltanet.beta")
    fig = viz.plot_gates(tr, 0, "beta")
    mm.mark_segments(fig.axes[0], info)
    assert_readable(fig)


def test_long_context_plots():
    import qwen35_lab as ql

    real = ql.config_for("Qwen3.5-9B")
    rope = lc.yarn_for_context(1_010_000)
    for fig in (lc.plot_rope_frequencies(real, rope), lc.plot_rope_decay(real, rope), lc.plot_memory()):
        assert_readable(fig)
    result = {"lengths": [254, 510, 1022], "depths": [0.0, 0.5, 1.0], "n": 8, "task": "passkey", "model": "needles",
              "accuracy": {"default": [[1.0, 0.5, 0.125], [1.0, 0.375, 0.0], [1.0, 0.25, 0.0]],
                           "yarn x4": [[1.0, 1.0, 0.875], [1.0, 0.875, 0.75], [1.0, 1.0, 0.625]]}}
    assert_readable(lc.plot_needle_heatmap(result, train_length=254))


def test_needles_experiment_plots():
    from qwen35_lab.organisms.tasks import wilson_interval

    tokens = [66, 130, 258, 514, 1026, 2050, 4098]
    def rows(acc, stale):
        return [{"tokens": t, "length": t - 2, "accuracy": a, "n": 200, "ci95": list(wilson_interval(round(200 * a), 200)),
                 "stale_rate": r} for t, a, r in zip(tokens, acc, stale)]
    curves = {"default": rows([0.97, 0.97, 0.96, 0.7, 0.4, 0.3, 0.25], [0, 0, 0.02, 0.2, 0.4, 0.45, 0.4]),
              "yarn x8": rows([0.9, 0.93, 0.94, 0.93, 0.9, 0.85, 0.6], [0.05, 0.04, 0.03, 0.03, 0.05, 0.1, 0.3]),
              "linear x8": rows([0.9, 0.93, 0.94, 0.93, 0.9, 0.85, 0.6], [0.05, 0.04, 0.03, 0.03, 0.05, 0.1, 0.3])}
    attention = {name: [{"tokens": t, "needle_mass": 0.5 / (1 + i * f), "stale_mass": 0.1 * i * f, "entropy": 2 + i,
                         "mean_distance": 40 * 2 ** i} for i, t in enumerate(tokens[1:])]
                 for name, f in (("default", 1.0), ("yarn x8", 0.3))}
    e = {"train_length": 256, "n": 200, "accuracy": curves, "attention": attention,
         "short_inputs": {"yarn x8": [{"tokens": 66, "n": 200, "accuracy_default": 0.97, "accuracy_yarn": 0.9,
                                       "ci95_default": [0.94, 0.99], "ci95_yarn": [0.85, 0.93],
                                       "stale_rate_default": 0.0, "stale_rate_yarn": 0.05,
                                       "kl_default_to_yarn": 0.21}]}}
    fig = lc.plot_needles_accuracy(e)
    assert_readable(fig)
    assert fig.get_size_inches()[0] <= 10
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "linear x8 (on yarn x8)" in legend and "chance (1/16)" in legend  # 16 values
    assert len(fig.axes[0].collections) == 3  # one shaded interval per RoPE setting
    assert_readable(lc.plot_needles_accuracy(e, names=["default", "yarn x8"]))
    with pytest.raises(ValueError, match=r"no RoPE setting \['yarn x3'\].*'default'"):
        lc.plot_needles_accuracy(e, names=["yarn x3"])
    with pytest.raises(ValueError, match="lacks"):
        lc.plot_needles_accuracy({"train_length": 256})
    fig = lc.plot_needles_attention(e)
    assert_readable(fig)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["mass on the asked needle (latest copy)", "mass on its stale copy"]
    table = lc.format_needles_short_inputs(e)
    assert "0.900 [0.85, 0.93]" in table and max(map(len, table.splitlines())) <= 90


def test_sampling_plots(tiny):
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for t, k, s in itertools.product([0.3, 0.7, 1.0, 1.5], [20, 50], range(6)):
        d2 = float(np.clip(0.9 - 0.1 / t + rng.normal(0, 0.15), 0, 1))
        rows.append({"temperature": t, "top_k": k, "distinct_2": d2, "repetition_rate": max(0.0, 0.05 - 0.02 * t +
                     rng.normal(0, 0.05)), "entropy": 1.0 * t})  # entropy equal for both top_k: two lines on top
    fig = sampling.plot_sweep(pd.DataFrame(rows), x="temperature", by="top_k",
                              metrics=["distinct_2", "repetition_rate", "entropy"])
    assert_readable(fig)
    for ax in fig.axes[:2]:  # error bars stay inside the metric's [0, 1]
        for coll in ax.collections:
            for seg in coll.get_segments():
                assert seg[:, 1].min() >= -1e-9 and seg[:, 1].max() <= 1 + 1e-9
    # equal entropy curves: the panel names the line that lies on the other, and draws it dashed
    assert "equal lines, dashed: top_k = 50 on 20" in fig.axes[2].get_title().replace("\n", " ")
    assert "equal" not in fig.axes[0].get_title()
    from qwen35_lab.sampling_panel import SamplingPanel

    panel = SamplingPanel(tiny, prompt="โคม and colours", max_new_tokens=4)
    assert_readable(panel.figure())


@pytest.fixture(scope="module")
def moe_trace():
    import qwen35_lab as ql

    lab = ql.load("tiny-moe", dtype="float32", device="cpu")
    text = "Experts are chosen per token by a router; the shared expert sees every token. โคม\n" * 2
    return lab.run(text, capture="layers.*.moe.*")


def test_moe_plots(moe_trace):
    import matplotlib.pyplot as plt

    from qwen35_lab import moe

    tr = moe_trace
    layer = moe.moe_layers(tr)[-1]
    half = tr.length // 2
    segments = ["first"] * half + ["second"] * (tr.length - half)
    for ax in (moe.plot_expert_load(tr), moe.plot_expert_load(tr, what="counts"), moe.plot_token_experts(tr, layer),
               moe.plot_router_entropy(tr), moe.plot_coactivation(tr, layer),
               moe.plot_routing_by_segment(tr, layer, segments), moe.plot_routing_similarity(tr, tr)):
        assert ax.figure.get_size_inches()[0] <= viz.DISPLAY_WIDTH
        assert plt.fignum_exists(ax.figure.number)  # open in pyplot: the notebooks show it with plt.show()
        assert_readable(ax.figure)
        plt.close(ax.figure)


def test_long_context_notebook_plots(tiny):
    from qwen35_lab import longctx as lc

    rows = lambda xs, ys, **k: [dict(tokens=x, accuracy=y, **k) for x, y in zip(xs, ys)]  # noqa: E731
    lengths = [74, 266, 1034, 4106]
    attention = {name: [{"tokens": t, "needle_attention": a / (1 + i), "entropy": 4 + i * s, "sink_mass": 0.003 / (1 + i),
                         "mean_distance": 120 * (1 + i) * 4 ** i} for i, t in enumerate(lengths[1:])]
                 for name, a, s in (("default", 0.16, 1.2), ("yarn x4", 0.15, 0.8))}
    loss = {name: {"rows": [{"tokens": 2058, "distance": d, "loss": 1e-4 * f * (1 + d / 1000),
                             "loss_attention_only": 10 + f * d / 1000} for d in (4, 512, 1024, 2048)]}
            for name, f in (("default", 2.0), ("yarn x8", 1.0))}
    short = {"yarn x2": [{"tokens": 42, "kl_default_to_yarn": 1.6e-9, "kl_default_to_yarn_attention_only": 3.3e-6,
                          "top1_agreement_attention_only": 1.0}]}
    exp = {"passkey": {"train_length": 256, "accuracy": {"default": rows(lengths, [1, 1, 1, 1]),
                                                         "yarn x4": rows(lengths, [1, 1, 1, 1])},
                       "attention_only_accuracy": {"default": rows(lengths, [0.12, 0.12, 0.04, 0.0]),
                                                   "yarn x4": rows(lengths, [0.12, 0.12, 0.15, 0.1])},
                       "attention": attention, "loss_by_needle_position": loss, "short_inputs": short},
           "recall": {"train_tokens": 33, "accuracy": {"default": rows([17, 33, 65], [1.0, 0.97, 0.7])}}}
    fig = lc.plot_length_accuracy(exp)
    assert_readable(fig)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "yarn x4 (on default)" in legend  # equal accuracy curves: named, not hidden
    assert not any("(on" in t.get_text() for t in fig.axes[1].get_legend().get_texts())
    for fig in (lc.plot_attention_at_question(exp["passkey"]), lc.plot_answer_loss(exp["passkey"])):
        assert fig.get_size_inches()[0] <= 10
        assert_readable(fig)
    assert max(len(line) for line in lc.format_short_inputs(exp["passkey"]).splitlines()) <= 80
    # the 27B models of 3.5 and 3.6 need the same memory: the second curve is named, in the legend and the title
    fig = lc.plot_memory(models=["Qwen3.5-9B", "Qwen3.5-27B", "Qwen3.6-27B"])
    assert_readable(fig)
    assert "Qwen3.6-27B (= Qwen3.5-27B)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "Qwen3.6-27B = Qwen3.5-27B" in fig.axes[0].get_title().replace("\n", " ")
    # a chunked prefill's summaries, the needle shaded
    tr = tiny.run(PROMPT, capture="layers.*.attn.summary")
    layer = [i for i, t in enumerate(tiny.layer_types) if t == "full_attention"][0]
    fig = lc.plot_prefill_summary(tr, layer, needle_span=(3, 6))
    assert fig.get_size_inches()[0] <= 10
    assert_readable(fig)
    assert "shaded: the needle" in fig.get_suptitle().replace("\n", " ")
