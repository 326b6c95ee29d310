"""Plots of a :class:`~qwen35_lab.instrument.Trace`: DeltaNet gates, decay half-lives, states,
the exact DeltaNet mixing matrix, and attention maps.

Every function takes a trace (plus layer / head) and returns a matplotlib ``Figure``. Figures
are made without pyplot's global state, so nothing is shown twice or kept alive: in a notebook
a figure shows as a cell's last value (or with ``display(fig)``), ``fig.savefig(path)`` saves it.

>>> tr = lab.run("The quick brown fox", capture=["layers.*.deltanet.beta", "layers.*.deltanet.g"])
>>> plot_gates(tr, 0, "beta")           # token × head heatmap of the write strength β
>>> plot_half_life(tr)                   # tokens for each head's state to decay to half

Axes are labelled with the tokens themselves for prompts up to ``MAX_LABELLED_TOKENS`` tokens,
with positions otherwise. A plot that needs a probe the trace did not capture raises a
``KeyError`` that names the capture string to add.
"""

from __future__ import annotations

import math
import re
import textwrap

import matplotlib
import numpy as np
import torch
from matplotlib import pyplot
from matplotlib.figure import Figure

from .instrument import Trace
from .checks import BadIndex, BadType, BadValue, NotCaptured

__all__ = [
    "GATES",
    "MAX_LABELLED_TOKENS",
    "gate_values",
    "half_lives",
    "plot_attention",
    "plot_attention_gate",
    "plot_attention_summary",
    "plot_effective_attention",
    "plot_gates",
    "plot_gates_overview",
    "plot_half_life",
    "plot_next_token",
    "plot_state_norms",
    "plot_state_readout",
    "read_norms",
    "state_norms",
    "token_labels",
]

GATES = ("beta", "g", "decay")
MAX_LABELLED_TOKENS = 80
SUMMARY_KEYS = ("entropy", "max_prob", "sink_mass", "mean_distance")

_GATE_TEXT = {
    "beta": "β = sigmoid(in_proj_b x): write strength",
    "g": "g: log decay per token (≤ 0)",
    "decay": "1 − exp(g): share of the state forgotten per token",
}
# what the colour bar of each gate names: exp(g) is ≈ 1 almost everywhere, so the decay plots show what
# differs, the forgotten share 1 − exp(g), on a log scale (half-life in tokens: ln 2 / −g)
_GATE_LABEL = {"beta": "β", "g": "g (log decay)", "decay": "1 − exp(g)"}


# ----------------------------------------------------------------------------- one style
# Every plot of the toolkit (viz, widgets, multimodal, longctx, sampling) draws through these helpers, so
# sizes, colour maps and scales read the same everywhere (fig-viz-style).

DISPLAY_WIDTH = 11.0   # inches: the widest figure, shown at about 1,100 px in a notebook without shrinking
MIN_TEXT_PT = 8        # the smallest text in any figure, at that width
TEXT_PT = {"tick": 8, "label": 9, "title": 10, "suptitle": 11}
SEQUENTIAL = "viridis"  # magnitudes (probabilities, norms, gates, fractions)
DIVERGING = "RdBu_r"    # signed values, centred on 0 (effective attention, changes)
_BAD = "white"          # masked cells (the future of a causal map)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure made through pyplot (which sets up notebook display) and closed there at once, so it
    is shown once, as a cell's value or with ``display(fig)``, and not kept alive by pyplot.

    Never wider than :data:`DISPLAY_WIDTH`: a notebook shrinks wider figures, and their text with them.
    """
    width, height = figsize
    fig = pyplot.figure(figsize=(min(float(width), DISPLAY_WIDTH), float(height)), layout="constrained")
    pyplot.close(fig)
    return fig


def _png(fig: Figure, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes, for an ``ipywidgets.Image``: a widget redraw is then one plain state update.
    (An Output widget captures display messages, which non-interactive runners such as nbclient /
    nbconvert / papermill must route through comm messages; runs stalled there.)"""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _show_png(image, fig: Figure | None) -> None:
    """Show ``fig`` in the ``ipywidgets.Image`` ``image`` as PNG bytes, or hide the image when ``fig`` is None."""
    image.value = b"" if fig is None else _png(fig)
    image.layout.display = "none" if fig is None else None


def _figsize_for_tokens(n_tokens: int, height: float) -> tuple[float, float]:
    return (min(DISPLAY_WIDTH, max(6.0, 2.5 + 0.16 * n_tokens)), height)


def _cmap(name: str):
    """A colour map with masked cells drawn blank."""
    return matplotlib.colormaps[name].with_extremes(bad=_BAD)


def _finite(data) -> np.ndarray:
    x = np.ma.filled(np.ma.masked_invalid(np.ma.asarray(data, dtype=float)), np.nan)
    return x[np.isfinite(x)]


def _magnitude_norm(data, *, bounds: tuple[float, float] | None = None, log: bool | str = False,
                    decades: float = 4.0):
    """``(norm, scale)`` for a heatmap of non-negative magnitudes, chosen from the data.

    ``bounds``: the quantity's natural range (β in [0, 1]); kept when the data fill at least a tenth
    of it, else the data's own range (so a block of values near 0.97 still shows what differs).
    ``log``: True, False or "auto" (log when the positive values span more than two decades); a log
    scale shows at most ``decades`` decades below the maximum. ``scale`` names the choice for the
    colour bar.
    """
    x = _finite(data)
    if x.size == 0:
        return matplotlib.colors.Normalize(0.0, 1.0), "linear"
    lo, hi = float(x.min()), float(x.max())
    positive = x[x > 0]
    if log == "auto":
        log = positive.size > 0 and float(positive.max()) / max(float(np.percentile(positive, 5)), 1e-300) > 100
    if log and positive.size:
        top = float(positive.max())
        bottom = max(float(positive.min()), top * 10.0 ** -decades)
        if bottom >= top:
            bottom = top / 10
        return matplotlib.colors.LogNorm(bottom, top, clip=True), "log scale"
    if bounds is not None:
        b0, b1 = bounds
        if hi - lo >= 0.1 * (b1 - b0):
            return matplotlib.colors.Normalize(b0, b1), f"linear, {b0:g} to {b1:g}"
        pad = max((hi - lo) * 0.05, 1e-12 * max(abs(hi), 1.0))
        return matplotlib.colors.Normalize(max(b0, lo - pad), min(b1, hi + pad)), "linear, data range"
    if hi <= lo:
        return matplotlib.colors.Normalize(lo - 0.5 if lo == 0 else lo * 0.9, hi + 0.5 if hi == 0 else hi * 1.1), "linear"
    start = 0.0 if lo >= 0 and lo < 0.5 * hi else lo
    return matplotlib.colors.Normalize(start, hi), "linear" if start == 0.0 else "linear, data range"


def _signed_norm(data):
    """``(norm, scale)`` for signed values: symmetric about 0 on a diverging map, limits from the data."""
    x = _finite(data)
    m = float(np.abs(x).max()) if x.size else 0.0
    m = m or 1.0
    return matplotlib.colors.Normalize(-m, m), "linear, symmetric about 0"


def _colorbar(fig: Figure, mappable, ax, label: str, scale: str | None = None, **kwargs):
    """A colour bar whose label names the quantity and its scale; ticks without offset text."""
    cbar = fig.colorbar(mappable, ax=ax, pad=kwargs.pop("pad", 0.01), **kwargs)
    cbar.set_label(label + (f"\n({scale})" if scale else ""), fontsize=TEXT_PT["label"])
    cbar.ax.tick_params(labelsize=TEXT_PT["tick"])
    if not isinstance(mappable.norm, matplotlib.colors.LogNorm):
        cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    return cbar


def _wrapped(text: str, width_in: float, size: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``size`` pt (existing breaks kept)."""
    chars = max(24, int(width_in * 72 / (0.55 * size)))
    return "\n".join("\n".join(textwrap.wrap(line, chars)) or line for line in text.split("\n"))


def _title(ax, text: str, *, size: float = TEXT_PT["title"], **kwargs) -> None:
    """An axes title wrapped to the axes' width (estimated from the figure and its grid)."""
    width = _axis_capacity(ax, "x", 72.0) + 0.5  # inches along x
    ax.set_title(_wrapped(text, width, size), fontsize=size, **kwargs)


def _suptitle(fig: Figure, text: str, *, size: float = TEXT_PT["suptitle"]) -> None:
    fig.suptitle(_wrapped(text, fig.get_size_inches()[0] - 0.4, size), fontsize=size)


def _log_scale(ax, axis: str = "y") -> None:
    """A log axis labelled at 1, 2 and 5 × each decade as plain numbers (no crowded minor labels)."""
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.2g}"))
    target.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.tick_params(axis=axis, labelsize=TEXT_PT["tick"])


def _plain_numbers(ax, axis: str = "y") -> None:
    """Tick labels as plain numbers (``2e-06``, ``0.35``, ``30,000``), never a separate offset text
    (``1e−6``) that can collide with a title, nor ``3e+04`` for a count of tokens."""
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"))
    ax.tick_params(axis=axis, labelsize=TEXT_PT["tick"])


def _axis_capacity(ax, axis: str, per_label_pt: float) -> int:
    """How many labels of ``per_label_pt`` fit along ``axis`` (estimated from the figure and grid)."""
    w, h = ax.figure.get_size_inches()
    try:
        spec = ax.get_subplotspec()
        rows, cols = spec.get_geometry()[:2]
        r0, r1 = spec.rowspan.start, spec.rowspan.stop
        c0, c1 = spec.colspan.start, spec.colspan.stop
        gs = spec.get_gridspec()
        wr = gs.get_width_ratios() or [1] * cols
        hr = gs.get_height_ratios() or [1] * rows
        frac_w, frac_h = sum(wr[c0:c1]) / sum(wr), sum(hr[r0:r1]) / sum(hr)
    except (AttributeError, TypeError):
        frac_w = frac_h = 1.0
    length = (w * frac_w * 0.82 - 0.5) if axis == "x" else (h * frac_h * 0.75 - 0.6)
    return max(2, int(length * 72 / per_label_pt))


def _thin(n: int, capacity: int) -> int:
    """The smallest nice step (1, 2, 5, 10, …) that leaves at most ``capacity`` of ``n`` labels."""
    return _nice_step(n / max(capacity, 1))


def _category_axis(ax, axis: str, names, *, label: str | None = None) -> None:
    """Whole-number (or named) ticks at 0, 1, … for a head / layer / category axis of an image or a
    bar chart, thinned to every 2nd, 5th … when they would not fit at 8 pt."""
    names = [str(x) for x in names]
    n = len(names)
    step = _thin(n, _axis_capacity(ax, axis, TEXT_PT["tick"] * 1.6 if axis == "x" else TEXT_PT["tick"] * 1.4))
    idx = list(range(0, n, step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(idx, [names[i] for i in idx], fontsize=TEXT_PT["tick"])
    if label is not None:
        (ax.set_xlabel if axis == "x" else ax.set_ylabel)(label, fontsize=TEXT_PT["label"])


def _token_axis(ax, axis: str, trace: Trace, positions: list[int], *, max_labels: int = MAX_LABELLED_TOKENS) -> None:
    """Tick ``axis`` ("x" or "y") of an image/plot whose entries are the tokens at ``positions``.

    Up to ``max_labels`` tokens: the tokens themselves at 8 pt, every one where they fit, else every
    2nd, 5th … (the axis label says so; ``token_labels`` gives them all). Longer: positions.
    """
    n = len(positions)
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    set_label = ax.set_xlabel if axis == "x" else ax.set_ylabel
    if 0 < n <= max_labels and trace.token_strings:
        step = _thin(n, _axis_capacity(ax, axis, TEXT_PT["tick"] * 1.3))
        idx = list(range(0, n, step))
        labels = token_labels(trace, [positions[i] for i in idx])
        labels = [_short(t, 14) for t in labels]
        set_ticks(idx, labels, fontsize=TEXT_PT["tick"], fontfamily=_token_fonts(),
                  **({"rotation": 90} if axis == "x" else {}))
        if step > 1:
            set_label(f"token (every {_ordinal(step)} labelled)", fontsize=TEXT_PT["label"])
        return
    capacity = _axis_capacity(ax, axis, TEXT_PT["tick"] * (3.5 if axis == "x" else 1.4))
    step = _nice_step(max(n, 1) / max(min(capacity, 16), 2))
    idx = [i for i, p in enumerate(positions) if p % step == 0] or [0]
    set_ticks(idx, [str(positions[i]) for i in idx], fontsize=TEXT_PT["tick"])
    set_label("position", fontsize=TEXT_PT["label"])


def _short(label: str, n: int = 24) -> str:
    """A tick label of at most ``n`` characters (the full text is in ``token_labels`` / the table)."""
    return label if len(label) <= n else label[: n - 1] + "…"


def _ordinal(k: int) -> str:
    return {2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _nice_step(raw: float) -> int:
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if base >= raw:
            return base
    return int(10 ** math.ceil(math.log10(raw)))


def _same_as(series: list) -> dict[int, int]:
    """``{i: j}`` for every series ``i`` equal (to 1e-9 relative) to an earlier series ``j``: lines
    that would hide each other, to be marked in the legend and drawn dashed."""
    out: dict[int, int] = {}
    arrays = [np.asarray(s, dtype=float) for s in series]
    for i, a in enumerate(arrays):
        for j in range(i):
            b = arrays[j]
            if j not in out and a.shape == b.shape and np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True):
                out[i] = j
                break
    return out


def _head_colors(n: int) -> list:
    """One distinct colour per head (a discrete palette, not a continuous scale)."""
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- token text

_BYTE_DECODER: dict[str, int] | None = None


def token_labels(trace: Trace, positions=None) -> list[str]:
    """Readable strings of the trace's tokens at ``positions`` (all by default).

    Byte-level BPE pieces are decoded (``"Ġfox"`` → ``" fox"``), a newline shows as ``↵``;
    characters no installed font can draw show as their UTF-8 bytes after the token id
    (``#48210 ⟨e0 b9 82⟩``). Without token strings in the trace, the positions themselves.
    """
    _check_trace(trace)
    strings = trace.token_strings
    if positions is None:
        positions = range(len(strings) if strings else trace.length)
    tokens = trace.meta.get("tokens")
    ids = tokens[0].tolist() if tokens is not None and getattr(tokens, "ndim", 0) == 2 else []
    return [_readable(strings[p], ids[p] if p < len(ids) else None) if p < len(strings) else str(p)
            for p in positions]


def _readable(piece: str, token_id: int | None = None) -> str:
    """A token as text a reader can read: bytes decoded, whitespace made visible, and any run of
    characters no installed font draws (or bytes that are not whole UTF-8) as hex bytes ``⟨e0 b9⟩``,
    the token id in front (``#48210 ⟨e0 b9 82⟩``) — never a ``\\u`` escape or a box."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
    if piece and all(c in _BYTE_DECODER for c in piece):
        piece = bytes(_BYTE_DECODER[c] for c in piece).decode("utf-8", errors="surrogateescape")
    piece = piece.replace("\n", "↵").replace("\t", "⇥").replace("\r", "↵")
    piece = piece if piece.strip() else piece.replace(" ", "␣") or "∅"
    covered = _font_coverage()
    out, run = [], []
    for c in piece:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that is not part of whole UTF-8
            run.append(ord(c) - 0xDC00)
        elif ord(c) in covered:
            if run:
                out.append("⟨" + " ".join(f"{b:02x}" for b in run) + "⟩")
                run = []
            out.append(c)
        else:
            run.extend(c.encode("utf-8"))
    if run:
        out.append("⟨" + " ".join(f"{b:02x}" for b in run) + "⟩")
    text = "".join(out)
    return f"#{token_id} {text}" if token_id is not None and "⟨" in text and "⟨" not in piece else text


_COVERED: set[int] | None = None
_FONTS: list[str] | None = None
_NOT_FALLBACK = re.compile(r"^(Last Resort|cm|STIXSize|STIXNonUnicode|DejaVu Math)", re.I)


def _token_fonts() -> list[str]:
    """Font families for token text, in fallback order: the configured sans-serif font, then each
    installed font (regular face) that draws characters the ones before it cannot."""
    _font_coverage()
    return list(_FONTS)


def _font_coverage() -> set[int]:
    """Code points that the fonts of :func:`_token_fonts` draw (matplotlib falls back along that list)."""
    global _COVERED, _FONTS
    if _COVERED is None:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        families, covered = [], set()
        first = font_manager.findfont(font_manager.FontProperties(family=["sans-serif"]))
        entries = sorted(font_manager.fontManager.ttflist, key=lambda f: (f.fname != first, f.name))
        for f in entries:
            regular = f.style == "normal" and f.weight in (400, "normal", "regular", "book")
            if f.fname != first and (f.name in families or _NOT_FALLBACK.match(f.name) or not regular):
                continue
            try:
                chars = set(FT2Font(f.fname).get_charmap())
            except (OSError, RuntimeError, ValueError):
                continue
            if not families or len(chars - covered) > 32:  # a font that adds a script, not a few symbols
                families.append(f.name)
                covered |= chars
        _FONTS = families or ["sans-serif"]
        _COVERED = covered or set(range(0x20, 0x7F))
    return _COVERED


# ----------------------------------------------------------------------------- checks

def _check_trace(trace) -> None:
    if not isinstance(trace, Trace):
        raise BadType(f"expected a Trace (from lab.run(..., capture=...)), got {type(trace).__name__}")


def _check_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise BadType(f"{name} must be an int, got {value!r}")
    return int(value)


def _deltanet_layers(trace: Trace) -> list[int] | None:
    types = trace.meta.get("layer_types")
    return None if types is None else [i for i, t in enumerate(types) if t == "linear_attention"]


def _attention_layers(trace: Trace) -> list[int] | None:
    types = trace.meta.get("layer_types")
    return None if types is None else [i for i, t in enumerate(types) if t != "linear_attention"]


def _check_layer(trace: Trace, layer, family: str) -> int:
    """``layer`` as an int, refused if the trace's model has no such layer of this family."""
    layer = _check_int("layer", layer)
    types = trace.meta.get("layer_types")
    if types is None:
        return layer
    if not 0 <= layer < len(types):
        raise BadIndex(f"layer {layer} is out of range: the model has {len(types)} layers (0–{len(types) - 1})")
    want = "linear_attention" if family == "deltanet" else "full_attention"
    if (types[layer] == "linear_attention") != (want == "linear_attention"):
        same = _deltanet_layers(trace) if family == "deltanet" else _attention_layers(trace)
        what = "Gated DeltaNet (linear_attention)" if family == "deltanet" else "attention (full_attention)"
        raise BadValue(f"layer {layer} is a {types[layer]} layer; this plot needs a {what} layer: {same}")
    return layer


def _check_batch(batch, size: int) -> int:
    batch = _check_int("batch", batch)
    if not 0 <= batch < size:
        raise BadIndex(f"batch {batch} is out of range: the trace holds {size} sequences (0–{size - 1})")
    return batch


def _check_head(head, n: int, what: str) -> int:
    head = _check_int("head", head)
    if not 0 <= head < n:
        raise BadIndex(f"head {head} is out of range: {what} has {n} captured heads (0–{n - 1})")
    return head


def _check_heads(heads, n: int, what: str) -> list[int]:
    if heads is None:
        return list(range(n))
    hs = [heads] if isinstance(heads, (int, np.integer)) and not isinstance(heads, bool) else list(heads)
    return [_check_head(h, n, what) for h in hs]


def _head_names(trace: Trace, n: int) -> list[int]:
    """Model head indices of the ``n`` captured heads (those of ``meta["heads"]`` when narrowed)."""
    heads = trace.meta.get("heads")
    return list(heads) if isinstance(heads, (list, tuple)) and len(heads) == n else list(range(n))


def _missing(what: str, name: str, glob: str | None = None) -> NotCaptured:
    also = f" (or {glob!r} for every layer)" if glob else ""
    return NotCaptured(f"{what} needs {name!r}, which this trace did not capture: run with capture={name!r}{also}")


def _probe(trace: Trace, name: str, what: str, glob: str | None = None):
    if name not in trace:
        raise _missing(what, name, glob)
    return trace[name]


# ----------------------------------------------------------------------------- DeltaNet gates

def _has_state(trace: Trace, layer: int) -> bool:
    return f"layers.{layer}.deltanet.state" in trace


def gate_values(trace: Trace, layer: int, gate: str = "beta") -> tuple[torch.Tensor, list[int]]:
    """``(values [B, T, HV] fp32, positions)`` of a DeltaNet gate: "beta", "g" or "decay" (= exp(g)).

    Read from the ``layers.i.deltanet.beta`` / ``.g`` probe, or else from the replay inputs of a
    captured ``layers.i.deltanet.state`` (which hold both gates at every position).
    """
    _check_trace(trace)
    if gate not in GATES:
        raise BadValue(f"gate must be one of {', '.join(map(repr, GATES))}; got {gate!r}")
    layer = _check_layer(trace, layer, "deltanet")
    probe = "beta" if gate == "beta" else "g"
    name = f"layers.{layer}.deltanet.{probe}"
    if name in trace:
        x, positions = trace[name].float(), trace.positions(name)
    elif _has_state(trace, layer):
        x = trace.state_inputs(layer)[probe].float()
        positions = list(range(x.shape[1]))
    else:
        raise _missing(f"the {gate!r} gate of layer {layer}", name, f"layers.*.deltanet.{probe}")
    return (x.exp() if gate == "decay" else x), positions


def _gate_layers(trace: Trace, gate: str) -> list[int]:
    probe = "beta" if gate == "beta" else "g"
    layers = _deltanet_layers(trace)
    if layers is None:  # no layer types recorded: whichever layers have the data
        layers = sorted({int(n.split(".")[1]) for n in trace.names if ".deltanet." in n})
    return [i for i in layers if f"layers.{i}.deltanet.{probe}" in trace or _has_state(trace, i)]


def _gate_source(gate: str) -> str:
    return "g" if gate == "decay" else gate  # the decay plots are computed from g itself (full precision)


def _gate_image(x: torch.Tensor, gate: str) -> np.ndarray:
    """What a gate heatmap shows from β or g: β, g, or for "decay" the forgotten share ``1 − exp(g)``."""
    x = x.double()
    return (-torch.expm1(x) if gate == "decay" else x).numpy()


def _gate_norm(data, gate: str):
    if gate == "beta":
        return _magnitude_norm(data, bounds=(0.0, 1.0))
    if gate == "decay":
        return _magnitude_norm(data, log=True)
    x = _finite(data)  # g ≤ 0: the data's own range
    lo, hi = (float(x.min()), float(x.max())) if x.size else (-1.0, 0.0)
    return matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1e-6), "linear, data range"


def _gate_colorbar(fig: Figure, im, ax, gate: str, scale: str):
    if gate != "decay":
        return _colorbar(fig, im, ax, _GATE_LABEL[gate], scale)
    # the forgotten share f, each tick also read as the half-life ln 2 / −ln(1 − f) in tokens
    cbar = _colorbar(fig, im, ax, "1 − exp(g) · half-life", f"{scale}; tokens")
    lo, hi = im.norm.vmin, im.norm.vmax
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
    if len(ticks) > 7:
        ticks = [t for t in ticks if f"{t:.0e}".startswith("1")]
    cbar.set_ticks(ticks)
    cbar.ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda f, _: f"{f:.2g} · {math.log(2) / -math.log1p(-min(f, 1 - 1e-16)):.3g}"))
    return cbar


def plot_gates(trace: Trace, layer: int, gate: str = "beta", *, batch: int = 0) -> Figure:
    """Heatmap head × token of one DeltaNet layer's gate: ``"beta"`` (write strength), ``"g"``
    (log decay) or ``"decay"``.

    ``"decay"`` shows what differs between heads and tokens: the share of the state forgotten per
    token, ``1 − exp(g)``, on a log colour scale, with the same scale read as a half-life in tokens
    beside it (``exp(g)`` itself is ≈ 1 almost everywhere). The image is ``[HV, T]``.
    """
    if gate not in GATES:
        raise BadValue(f"gate must be one of {', '.join(map(repr, GATES))}; got {gate!r}")
    x, positions = gate_values(trace, layer, _gate_source(gate))
    batch = _check_batch(batch, x.shape[0])
    data = _gate_image(x[batch].T, gate)  # [HV, T]
    fig = _new_figure(_figsize_for_tokens(len(positions), max(3.2, 1.9 + 0.3 * data.shape[0])))
    ax = fig.add_subplot()
    norm, scale = _gate_norm(data, gate)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _gate_colorbar(fig, im, ax, gate, scale)
    _token_axis(ax, "x", trace, positions)
    _category_axis(ax, "y", _head_names(trace, data.shape[0]), label="value head")
    _title(ax, f"Layer {layer} (Gated DeltaNet): {_GATE_TEXT[gate]}")
    return fig


def plot_gates_overview(trace: Trace, gate: str = "beta", *, batch: int = 0, columns: int = 3) -> Figure:
    """One head × token heatmap of ``gate`` per DeltaNet layer that has it, on one colour scale
    (chosen from all layers' values; see :func:`plot_gates` for ``"decay"``)."""
    _check_trace(trace)
    if gate not in GATES:
        raise BadValue(f"gate must be one of {', '.join(map(repr, GATES))}; got {gate!r}")
    columns = _check_int("columns", columns)
    if columns < 1:
        raise BadValue(f"columns must be at least 1, got {columns}")
    layers = _gate_layers(trace, gate)
    if not layers:
        probe = "beta" if gate == "beta" else "g"
        raise _missing("plot_gates_overview", f"layers.*.deltanet.{probe}")
    values = {i: gate_values(trace, i, _gate_source(gate)) for i in layers}
    batch = _check_batch(batch, values[layers[0]][0].shape[0])
    images = {i: _gate_image(x[batch].T, gate) for i, (x, _) in values.items()}  # [HV, T] each
    norm, scale = _gate_norm(np.concatenate([im.ravel() for im in images.values()]), gate)
    n_tok = max(len(p) for _, p in values.values())
    ncols = min(columns, len(layers), max(1, int(DISPLAY_WIDTH // max(3.2, 1.2 + 0.1 * n_tok))))
    nrows = math.ceil(len(layers) / ncols)
    n_heads = images[layers[0]].shape[0]
    fig = _new_figure((DISPLAY_WIDTH if ncols > 1 else _figsize_for_tokens(n_tok, 0)[0],
                       0.8 + nrows * (1.7 + 0.2 * n_heads)))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for k, layer in enumerate(layers):
        ax = axes[k // ncols][k % ncols]
        im = ax.imshow(images[layer], aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
        _token_axis(ax, "x", trace, values[layer][1], max_labels=40)
        _category_axis(ax, "y", _head_names(trace, n_heads), label="head")
        _title(ax, f"layer {layer}")
    for k in range(len(layers), nrows * ncols):
        fig.delaxes(axes[k // ncols][k % ncols])
    _gate_colorbar(fig, im, [a for row in axes for a in row if a in fig.axes], gate, scale)
    _suptitle(fig, f"Gated DeltaNet {_GATE_TEXT[gate]}, per layer (head × token)")
    return fig


# ----------------------------------------------------------------------------- half-life

_DECAY_PARAM = re.compile(r"(?:^|\.)layers\.(\d+)\.linear_attn\.(A_log|dt_bias)$")


def half_lives(source, *, batch: int = 0) -> dict[int, torch.Tensor]:
    """Decay half-life in tokens, ``{layer: [HV]}``, of every DeltaNet head.

    From a trace with ``g`` (or the state) captured: ``ln 2 / (-mean_t g_t)``: decays multiply
    along the sequence, so the mean log decay is the typical per-token one, and after this many
    tokens the state has faded to half. From a :class:`~qwen35_lab.Lab`, the input-independent
    part from the parameters (``in_proj_a x = 0``): ``ln 2 / (exp(A_log) · softplus(dt_bias))``.
    """
    if isinstance(source, Trace):
        layers = _gate_layers(source, "g")
        if not layers:
            raise _missing("the half-life", "layers.*.deltanet.g")
        out = {}
        for layer in layers:
            g, _ = gate_values(source, layer, "g")
            b = _check_batch(batch, g.shape[0])
            out[layer] = math.log(2) / (-g[b].double().mean(0)).clamp_min(1e-12)
        return out
    model = getattr(source, "model", None)
    if model is None or not hasattr(source, "layer_types"):
        raise BadType(f"expected a Trace or a Lab (from ql.load), got {type(source).__name__}")
    params: dict[int, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        m = _DECAY_PARAM.search(name)
        if m:
            params.setdefault(int(m.group(1)), {})[m.group(2)] = p.detach().double().cpu()
    out = {}
    for layer in sorted(params):
        neg_g = params[layer]["A_log"].exp() * torch.nn.functional.softplus(params[layer]["dt_bias"])
        out[layer] = math.log(2) / neg_g.clamp_min(1e-12)
    if not out:
        raise BadValue("this model has no Gated DeltaNet parameters (A_log, dt_bias) to compute half-lives from")
    return out


def plot_half_life(source, *, batch: int = 0) -> Figure:
    """Per-head decay half-life (tokens, log scale) for each DeltaNet layer; see :func:`half_lives`.

    One column of points per layer, one point per value head, one colour per head (named in the
    legend; with more than 20 heads, a colour bar of whole head numbers).
    """
    lives = half_lives(source, batch=batch)
    from_trace = isinstance(source, Trace)
    layers = sorted(lives)
    n_heads = max(len(v) for v in lives.values())
    fig = _new_figure((max(7.0, 2.5 + 0.45 * len(layers)), 4.2))
    ax = fig.add_subplot()
    colors = _head_colors(n_heads)
    many = n_heads > 20
    for j, layer in enumerate(layers):
        hl = lives[layer].numpy()
        offsets = (np.arange(len(hl)) - (len(hl) - 1) / 2) * (0.6 / max(n_heads, 1))
        ax.scatter(j + offsets, hl, c=[colors[h] for h in range(len(hl))], s=30, edgecolors="none")
    from matplotlib.lines import Line2D

    handles = [] if many else [Line2D([], [], ls="", marker="o", color=colors[h], label=f"head {h}")  # discrete
                               for h in range(n_heads)]
    _log_scale(ax, "y")
    _category_axis(ax, "x", layers, label="layer")
    ax.set_ylabel("half-life (tokens)", fontsize=TEXT_PT["label"])
    ax.tick_params(labelsize=TEXT_PT["tick"])
    if from_trace and source.length:
        handles.append(ax.axhline(source.length, color="0.5", ls="--", lw=1, label=f"prompt length {source.length}"))
    if many:
        cmap = matplotlib.colors.ListedColormap(colors)
        norm = matplotlib.colors.BoundaryNorm(np.arange(n_heads + 1) - 0.5, n_heads)
        cbar = _colorbar(fig, matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax, "value head")
        cbar.set_ticks(range(0, n_heads, _nice_step(n_heads / 12)))
        cbar.ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:.0f}"))
    if handles:
        fig.legend(handles=handles, fontsize=TEXT_PT["tick"], loc="outside right upper")
    how = ("ln 2 / −mean(g) over this prompt" if from_trace
           else "parameters only (in_proj_a x = 0): ln 2 / (exp(A_log)·softplus(dt_bias))")
    _title(ax, f"Gated DeltaNet: decay half-life of each head\n{how}")
    return fig


# ----------------------------------------------------------------------------- states

def _state_positions(trace: Trace, layer: int) -> int:
    """Number of positions whose state the trace can serve (tokens the layer processed)."""
    return int(trace.state_inputs(layer)["g"].shape[1])


def _need_state(trace: Trace, layer: int, what: str) -> None:
    if not _has_state(trace, layer):
        raise _missing(what, f"layers.{layer}.deltanet.state", "layers.*.deltanet.state")


def state_norms(trace: Trace, layer: int, positions=None, *, batch: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``(‖S_t‖_F [P, HV], positions)``: the Frobenius norm of each head's state after token t.

    One replay (at most one chunk) per position: pass ``positions`` to thin long traces.
    """
    _check_trace(trace)
    layer = _check_layer(trace, layer, "deltanet")
    _need_state(trace, layer, f"the state norms of layer {layer}")
    T = _state_positions(trace, layer)
    positions = list(range(T)) if positions is None else [_check_int("position", p) for p in positions]
    bad = [p for p in positions if not 0 <= p < T]
    if bad:
        raise BadIndex(f"position {bad[0]} is out of range for layer {layer}'s state: valid 0–{T - 1}")
    norms = []
    for t in positions:
        S = trace.state(layer, t)  # [B, HV, K, V]
        b = _check_batch(batch, S.shape[0])
        norms.append(torch.linalg.matrix_norm(S[b]))  # [HV]
    return torch.stack(norms), positions


def _lines(ax, x, series: list, labels: list[str], *, markers: bool) -> None:
    """One line per series, one colour each; a series equal to an earlier one is drawn dashed over
    it and named in the legend (``head 1 (= head 0)``), so no line hides unseen."""
    same = _same_as(series)
    colors = _head_colors(len(series))
    for i, (y, label) in enumerate(zip(series, labels)):
        dup = i in same
        ax.plot(x, y, color=colors[i], ls=(0, (4, 3)) if dup else "-", lw=1.8 if dup else 1.4,
                marker=("x" if dup else ".") if markers else None,
                label=f"{label} (= {labels[same[i]]})" if dup else label)


def plot_state_norms(trace: Trace, layer: int, heads=None, *, positions=None, batch: int = 0) -> Figure:
    """``‖S_t‖_F`` along the sequence, one line per value head (all captured heads by default)."""
    norms, positions = state_norms(trace, layer, positions, batch=batch)
    hs = _check_heads(heads, norms.shape[1], f"layer {layer}'s state")
    names = _head_names(trace, norms.shape[1])
    fig = _new_figure(_figsize_for_tokens(len(positions), 3.8))
    ax = fig.add_subplot()
    _lines(ax, range(len(positions)), [norms[:, h].numpy() for h in hs], [f"head {names[h]}" for h in hs],
           markers=len(positions) <= 80)
    _token_axis(ax, "x", trace, positions)
    ax.set_ylabel("‖S_t‖_F", fontsize=TEXT_PT["label"])
    _plain_numbers(ax, "y")
    ax.set_xlim(-0.5, len(positions) - 0.5)
    ax.legend(fontsize=TEXT_PT["tick"], ncols=min(len(hs), 8), loc="upper left")
    _title(ax, f"Layer {layer} (Gated DeltaNet): size of each head's state after token t")
    return fig


def read_norms(trace: Trace, layer: int, *, batch: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``(‖o_t‖ [T, HV], positions)`` with ``o_t = S_tᵀ q_t / sqrt(K)``: how much each head reads.

    From the ``layers.i.deltanet.o`` probe, or else rebuilt from the captured state.
    """
    _check_trace(trace)
    layer = _check_layer(trace, layer, "deltanet")
    name = f"layers.{layer}.deltanet.o"
    if name in trace:
        o = trace[name].float()  # [B, T, HV, V]
        b = _check_batch(batch, o.shape[0])
        return o[b].norm(dim=-1), trace.positions(name)
    if not _has_state(trace, layer):
        raise NotCaptured(f"reading layer {layer}'s state needs {name!r} or 'layers.{layer}.deltanet.state', which "
                       f"this trace did not capture: run with capture={name!r}")
    q = trace.state_inputs(layer)["q"].float()  # [B, T, HV, K]
    b = _check_batch(batch, q.shape[0])
    scale = q.shape[-1] ** -0.5
    rows = [torch.einsum("hkv,hk->hv", trace.state(layer, t)[b], q[b, t]).norm(dim=-1) * scale
            for t in range(q.shape[1])]
    return torch.stack(rows), list(range(q.shape[1]))


def plot_state_readout(trace: Trace, layer: int, *, batch: int = 0) -> Figure:
    """Heatmap head × token of ``‖o_t‖ = ‖S_tᵀ q_t‖ / sqrt(K)``: what each head reads out of its state."""
    norms, positions = read_norms(trace, layer, batch=batch)
    data = norms.T.numpy()  # [HV, T]
    fig = _new_figure(_figsize_for_tokens(len(positions), 1.9 + 0.3 * data.shape[0]))
    ax = fig.add_subplot()
    norm, scale = _magnitude_norm(data)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _colorbar(fig, im, ax, "‖o_t‖", scale)
    _token_axis(ax, "x", trace, positions)
    _category_axis(ax, "y", _head_names(trace, data.shape[0]), label="value head")
    _title(ax, f"Layer {layer} (Gated DeltaNet): read-out ‖S_tᵀ q_t‖/√K per head and token")
    return fig


def plot_effective_attention(trace: Trace, layer: int, head: int, rows=None, *, batch: int = 0) -> Figure:
    """Heatmap of the exact DeltaNet mixing matrix ``A[t, s]`` of one value head, ``o_t = Σ_s A[t, s] v_s``.

    Rows are query positions ``t`` (all by default), columns source tokens ``s``; entries with
    ``s > t`` are blank. Values can be negative: a later write erases part of an earlier one.
    """
    _check_trace(trace)
    layer = _check_layer(trace, layer, "deltanet")
    _need_state(trace, layer, f"the effective attention of layer {layer}")
    x = trace.state_inputs(layer)
    HV, T = x["g"].shape[2], x["g"].shape[1]
    head = _check_head(head, HV, f"layer {layer}'s state")
    rows = list(range(T)) if rows is None else [_check_int("row", r) for r in rows]
    bad = [r for r in rows if not 0 <= r < T]
    if bad:
        raise BadIndex(f"row {bad[0]} is out of range: layer {layer}'s state covers positions 0–{T - 1}")
    A = trace.effective_attention(layer, heads=[head], rows=rows)  # [B, 1, R, T]
    batch = _check_batch(batch, A.shape[0])
    data = A[batch, 0].numpy()
    future = np.arange(T)[None, :] > np.asarray(rows)[:, None]
    data = np.ma.masked_array(data, mask=future)
    fig = _new_figure((min(DISPLAY_WIDTH, max(5.5, 2.8 + 0.17 * T)), min(11.0, max(4.0, 2.0 + 0.17 * len(rows)))))
    ax = fig.add_subplot()
    norm, scale = _signed_norm(data)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(DIVERGING), norm=norm)
    _colorbar(fig, im, ax, "A[t, s]", scale)
    _token_axis(ax, "x", trace, list(range(T)))
    _token_axis(ax, "y", trace, rows)
    ax.set_xlabel("source token s", fontsize=TEXT_PT["label"])
    ax.set_ylabel("query token t", fontsize=TEXT_PT["label"])
    _title(ax, f"Layer {layer}, head {_head_names(trace, HV)[head]}: exact DeltaNet mixing "
                 f"o_t = Σ_s A[t,s] v_s (blank: s > t)")
    return fig


# ----------------------------------------------------------------------------- attention

def plot_attention(trace: Trace, layer: int, head: int, *, batch: int = 0) -> Figure:
    """Heatmap of one attention head's probabilities: query token (rows) × key token (columns)."""
    _check_trace(trace)
    layer = _check_layer(trace, layer, "attn")
    name = f"layers.{layer}.attn.probs"
    P = _probe(trace, name, f"plot_attention (layer {layer})", "layers.*.attn.probs").float()  # [B, Hq, Tq, Tk]
    batch = _check_batch(batch, P.shape[0])
    head = _check_head(head, P.shape[1], name)
    rows = trace.positions(name)
    data = P[batch, head].numpy()  # [Tq, Tk]
    Tk = data.shape[1]
    future = np.arange(Tk)[None, :] > np.asarray(rows)[:, None]  # causal: keys after the query
    data = np.ma.masked_array(data, mask=future)
    fig = _new_figure((min(DISPLAY_WIDTH, max(5.5, 2.8 + 0.17 * Tk)), min(11.0, max(4.0, 2.0 + 0.17 * len(rows)))))
    ax = fig.add_subplot()
    # most of a row's mass sits on a few keys: a log scale shows the rest too (4 decades below the max)
    norm, scale = _magnitude_norm(data, log=True)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _colorbar(fig, im, ax, "attention probability", scale)
    _token_axis(ax, "x", trace, list(range(Tk)))
    _token_axis(ax, "y", trace, rows)
    ax.set_xlabel("key token", fontsize=TEXT_PT["label"])
    ax.set_ylabel("query token", fontsize=TEXT_PT["label"])
    _title(ax, f"Layer {layer} (gated attention), head {_head_names(trace, P.shape[1])[head]}: "
                 "attention probabilities (blank: future keys)")
    return fig


_SUMMARY_TEXT = {"entropy": "entropy (nats)", "max_prob": "max probability",
                 "sink_mass": "mass on token 0 (sink)", "mean_distance": "mean distance (tokens)"}


def plot_attention_summary(trace: Trace, layer: int, heads=None, *, batch: int = 0) -> Figure:
    """Four panels along the query position: entropy, max probability, sink mass (token 0) and mean
    distance to the attended tokens, one line per head. Dashed: what uniform attention would give."""
    _check_trace(trace)
    layer = _check_layer(trace, layer, "attn")
    name = f"layers.{layer}.attn.summary"
    s = _probe(trace, name, f"plot_attention_summary (layer {layer})", "layers.*.attn.summary")
    positions = trace.positions(name)
    first = s[SUMMARY_KEYS[0]]  # [B, Hq, T]
    batch = _check_batch(batch, first.shape[0])
    hs = _check_heads(heads, first.shape[1], name)
    names = _head_names(trace, first.shape[1])
    fig = _new_figure((DISPLAY_WIDTH, 7.0))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    x = np.arange(len(positions))
    pos = np.asarray(positions, dtype=float)
    uniform = {"entropy": np.log(pos + 1), "max_prob": 1 / (pos + 1), "sink_mass": 1 / (pos + 1),
               "mean_distance": pos / 2}
    for ax, key in zip(axes, SUMMARY_KEYS):
        values = s[key][batch].float()  # [Hq, T]
        _lines(ax, x, [values[h].numpy() for h in hs], [f"head {names[h]}" for h in hs], markers=len(x) <= 80)
        ax.plot(x, uniform[key], color="0.6", ls="--", lw=1, label="uniform")
        if key in ("max_prob", "sink_mass"):
            ax.set_ylim(-0.02, 1.02)
        _title(ax, _SUMMARY_TEXT[key])
        ax.set_xlim(-0.5, len(x) - 0.5)
        _plain_numbers(ax, "y")
    for ax in axes[2:]:
        _token_axis(ax, "x", trace, positions)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=TEXT_PT["tick"],
               ncols=min(len(hs) + 1, 6))
    _suptitle(fig, f"Layer {layer} (gated attention): attention per head along the query position")
    return fig


def plot_attention_gate(trace: Trace, layer: int, *, batch: int = 0) -> Figure:
    """The output gate ``sigmoid(gate)`` of an attention layer: its mean over the head dimension as a
    head × token heatmap (left), and the distribution of all its values per head (right)."""
    _check_trace(trace)
    layer = _check_layer(trace, layer, "attn")
    name = f"layers.{layer}.attn.gate"
    gate = _probe(trace, name, f"plot_attention_gate (layer {layer})", "layers.*.attn.gate").float()  # [B,T,Hq,Dh]
    batch = _check_batch(batch, gate.shape[0])
    positions = trace.positions(name)
    Hq = gate.shape[2]
    names = _head_names(trace, Hq)
    mean = gate[batch].mean(-1).T.numpy()  # [Hq, T]
    fig = _new_figure((DISPLAY_WIDTH, 3.4 + 0.3 * Hq))
    left, right = fig.subplots(1, 2, width_ratios=[3, 1.2])
    norm, scale = _magnitude_norm(mean, bounds=(0.0, 1.0))
    im = left.imshow(mean, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _colorbar(fig, im, left, "mean over head dim", scale)
    _token_axis(left, "x", trace, positions)
    _category_axis(left, "y", names, label="query head")
    _title(left, "mean gate per head and token")
    per_head = [gate[batch, :, h].reshape(-1).numpy() for h in range(Hq)]
    right.violinplot(per_head, positions=range(Hq), orientation="horizontal", showmedians=True)
    _category_axis(right, "y", names)
    right.set_ylim(Hq - 0.5, -0.5)  # head 0 on top, as in the heatmap
    right.set_xlim(0, 1)
    right.tick_params(labelsize=TEXT_PT["tick"])
    right.set_xlabel("sigmoid(gate)", fontsize=TEXT_PT["label"])
    _title(right, "all values, per head")
    _suptitle(fig, f"Layer {layer} (gated attention): output gate sigmoid(gate) ⊙ attn_out")
    return fig


# ----------------------------------------------------------------------------- next token

def plot_next_token(runs: dict, tokenizer, *, k: int = 10, batch: int = 0) -> Figure:
    """Next-token probabilities after the prompt, side by side for several runs of the same prompt
    (``{"before": tr, "after": tr_edited}``, traces from ``lab.run``).

    Left: the ``k`` most likely tokens of the first run and their probability in every run; the
    title gives each other run's KL divergence from the first (nats) and its most likely token.
    Right (two runs or more): the ``k`` tokens whose log-probability the last run changed most,
    ``log p_last − log p_first``. ``tokenizer``: a tokenizer, or a Lab (its ``.tokenizer``).
    """
    if not isinstance(runs, dict) or not runs:
        raise BadType("runs must be a non-empty dict {label: Trace}, e.g. {'before': tr, 'after': tr_edited}")
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "convert_ids_to_tokens"):
        raise BadType(f"tokenizer must be a tokenizer or a Lab, got {type(tokenizer).__name__}")
    k = _check_int("k", k)
    if k < 1:
        raise BadValue(f"k must be at least 1, got {k}")
    logprobs = {}
    for label, tr in runs.items():
        _check_trace(tr)
        logits = tr.meta.get("last_logits")
        if logits is None:
            raise NotCaptured(f"run {label!r} has no next-token logits: make it with lab.run(...), which keeps "
                           "meta['last_logits']")
        b = _check_batch(batch, logits.shape[0])
        logprobs[label] = logits[b].double().log_softmax(-1)  # [vocab]
    labels = list(logprobs)
    first, last = logprobs[labels[0]], logprobs[labels[-1]]

    def names(ids: torch.Tensor) -> list[str]:
        return [_readable(t, i) for t, i in zip(tok.convert_ids_to_tokens(ids.tolist()), ids.tolist())]

    top = first.topk(min(k, first.numel())).indices  # [k]
    compare = len(labels) > 1
    fig = _new_figure((DISPLAY_WIDTH if compare else max(6.0, 1.5 + 0.6 * len(top) * max(1, len(labels) / 2)),
                       4.6 + 0.2 * len(labels)))
    if compare:
        ax, movers = fig.subplots(1, 2, width_ratios=[2.2, 1])
    else:
        ax, movers = fig.add_subplot(), None
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        ax.bar(np.arange(len(top)) + (j - (len(labels) - 1) / 2) * width, logprobs[label][top].exp().numpy(),
               width=width, label=label, color=_head_colors(len(labels))[j])
    ax.set_xticks(range(len(top)), [_short(t) for t in names(top)], rotation=90, fontsize=TEXT_PT["tick"],
                  fontfamily=_token_fonts())
    ax.set_ylabel("probability", fontsize=TEXT_PT["label"])
    _plain_numbers(ax, "y")
    ax.legend(fontsize=TEXT_PT["tick"])
    notes = []
    for label in labels[1:]:
        lp = logprobs[label]
        kl = float((first.exp() * (first - lp)).sum())
        best = names(lp.argmax()[None])[0]
        notes.append(f"{label}: KL = {kl:.3g} nats, top token {best!r}")
    title = f"Next-token probabilities (top {len(top)} of {labels[0]!r})"
    _title(ax, title + ("\n" + "\n".join(notes) if notes else ""), fontfamily=_token_fonts())
    if movers is not None:
        delta = last - first  # [vocab]
        moved = delta.abs().topk(min(k, delta.numel())).indices
        moved = moved[delta[moved].argsort(descending=True)]
        values = delta[moved].numpy()
        movers.barh(np.arange(len(moved)), values, color=np.where(values >= 0, "C2", "C3"))
        movers.set_yticks(range(len(moved)), [_short(t) for t in names(moved)], fontsize=TEXT_PT["tick"], fontfamily=_token_fonts())
        movers.invert_yaxis()
        movers.axvline(0, color="0.3", lw=0.6)
        _plain_numbers(movers, "x")
        movers.set_xlabel(f"log p({labels[-1]}) − log p({labels[0]})", fontsize=TEXT_PT["label"])
        _title(movers, "largest changes")
    return fig


# ----------------------------------------------------------------------------- state attribution

def plot_state_contributions(contributions, *, batch: int = 0) -> Figure:
    """What a DeltaNet state still holds of each earlier token, per head (from ``trace.state_contributions``).

    Top: ``‖C_s‖_F``, the part of ``S_t`` that token ``s`` wrote and that is still there. Bottom: the
    fraction of token ``s``'s write that later writes erased (``erased / decayed``: the delta rule's
    ``−β_r k_r k_rᵀ``, on top of the decay), 0 for a write nothing overwrote.
    """
    from .checks import BadType, check_index
    from .instrument.memory import StateContributions

    if not isinstance(contributions, StateContributions):
        raise BadType(f"expected trace.state_contributions(layer, t), got {type(contributions).__name__}")
    c = contributions
    batch = check_index("batch", batch, c.held.shape[0], what="the contributions' batch")
    held = c.held[batch].numpy()  # [h, S]
    erased = (c.erased[batch] / c.decayed[batch].clamp_min(1e-30)).clamp(0, 1).numpy()
    n = len(c.positions)
    fig = _new_figure((min(DISPLAY_WIDTH, max(6.0, 3.0 + 0.2 * n)), 2.6 + 0.5 * len(c.heads) * 2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    norm, scale = _magnitude_norm(held, log="auto")
    im = top.imshow(held, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _colorbar(fig, im, top, "‖C_s‖ (held)", scale)
    norm, scale = _magnitude_norm(erased, bounds=(0.0, 1.0))
    im2 = bottom.imshow(erased, aspect="auto", interpolation="nearest", cmap=_cmap(SEQUENTIAL), norm=norm)
    _colorbar(fig, im2, bottom, "erased fraction", scale)
    for ax in (top, bottom):
        _category_axis(ax, "y", c.heads, label="head")
    if n <= MAX_LABELLED_TOKENS:
        step = _thin(n, _axis_capacity(bottom, "x", TEXT_PT["tick"] * 1.3))
        idx = list(range(0, n, step))
        bottom.set_xticks(idx, [_readable(c.tokens[i]) for i in idx], rotation=90, fontsize=TEXT_PT["tick"],
                          fontfamily=_token_fonts())
    else:
        step = _nice_step(n / 16)
        idx = [i for i, p in enumerate(c.positions) if p % step == 0] or [0]
        bottom.set_xticks(idx, [str(c.positions[i]) for i in idx], fontsize=TEXT_PT["tick"])
    bottom.set_xlabel("source token s" + (f" (every {_ordinal(step)} labelled)" if 1 < step and n <= MAX_LABELLED_TOKENS
                                          else ""), fontsize=TEXT_PT["label"])
    _title(top, f"Layer {c.layer}: what S_t at t = {c.t} ({_readable(c.tokens[-1])!r}) still holds of each token",
           fontfamily=_token_fonts())
    _title(bottom, "how much of each write later writes erased (beyond decay)")
    return fig
