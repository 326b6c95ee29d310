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
    "decay": "exp(g): fraction of the state kept per token",
}
_GATE_STYLE = {"beta": dict(cmap="viridis", vmin=0.0, vmax=1.0),
               "decay": dict(cmap="magma", vmin=0.0, vmax=1.0),
               "g": dict(cmap="magma")}


# ----------------------------------------------------------------------------- tokens and axes

_BYTE_DECODER: dict[str, int] | None = None


def token_labels(trace: Trace, positions=None) -> list[str]:
    """Readable strings of the trace's tokens at ``positions`` (all by default).

    Byte-level BPE pieces are decoded (``"Ġfox"`` → ``" fox"``), a newline shows as ``↵``;
    without token strings in the trace, the positions themselves are returned.
    """
    _check_trace(trace)
    strings = trace.token_strings
    if positions is None:
        positions = range(len(strings) if strings else trace.length)
    return [_readable(strings[p]) if p < len(strings) else str(p) for p in positions]


def _readable(piece: str) -> str:
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
    if all(c in _BYTE_DECODER for c in piece):
        piece = bytes(_BYTE_DECODER[c] for c in piece).decode("utf-8", errors="replace")
    piece = piece.replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    piece = piece if piece.strip() else piece.replace(" ", "␣") or "∅"
    covered = _font_coverage()
    return "".join(c if ord(c) in covered else c.encode("unicode_escape").decode() for c in piece)


_COVERED: set[int] | None = None


def _font_coverage() -> set[int]:
    """Code points the configured matplotlib fonts can draw (others are written as escapes, not boxes)."""
    global _COVERED
    if _COVERED is None:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        generic = ("sans-serif", "serif", "monospace", "cursive", "fantasy")
        covered: set[int] = set()
        for family in matplotlib.rcParams["font.family"]:
            for name in (matplotlib.rcParams[f"font.{family}"] if family in generic else [family]):
                try:
                    path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
                except ValueError:
                    continue
                covered |= set(FT2Font(path).get_charmap())
        _COVERED = covered or set(range(0x20, 0x7F))
    return _COVERED


def _token_axis(ax, axis: str, trace: Trace, positions: list[int], *, max_labels: int = MAX_LABELLED_TOKENS) -> None:
    """Tick ``axis`` ("x" or "y") of an image/plot whose entries are the tokens at ``positions``."""
    n = len(positions)
    set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
    if 0 < n <= max_labels and trace.token_strings:
        size = 8 if n <= 40 else 6
        labels = token_labels(trace, positions)
        if axis == "x":
            set_ticks(range(n), labels, rotation=90, fontsize=size)
        else:
            set_ticks(range(n), labels, fontsize=size)
        return
    step = _nice_step(max(n, 1) / 16)
    idx = [i for i, p in enumerate(positions) if p % step == 0] or [0]
    set_ticks(idx, [str(positions[i]) for i in idx], fontsize=8)
    (ax.set_xlabel if axis == "x" else ax.set_ylabel)("position")


def _nice_step(raw: float) -> int:
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if base >= raw:
            return base
    return int(10 ** math.ceil(math.log10(raw)))


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure made through pyplot (which sets up notebook display) and closed there at once, so it
    is shown once, as a cell's value or with ``display(fig)``, and not kept alive by pyplot."""
    fig = pyplot.figure(figsize=figsize, layout="constrained")
    pyplot.close(fig)
    return fig


def _figsize_for_tokens(n_tokens: int, height: float) -> tuple[float, float]:
    return (min(16.0, max(6.0, 2.5 + 0.18 * n_tokens)), height)


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


def plot_gates(trace: Trace, layer: int, gate: str = "beta", *, batch: int = 0) -> Figure:
    """Heatmap head × token of one DeltaNet layer's gate: ``"beta"`` (write strength), ``"g"``
    (log decay) or ``"decay"`` (``exp(g)``, the fraction of the state kept per token).

    The image is ``values[batch].T`` ``[HV, T]``.
    """
    x, positions = gate_values(trace, layer, gate)
    batch = _check_batch(batch, x.shape[0])
    data = x[batch].T.numpy()  # [HV, T]
    fig = _new_figure(_figsize_for_tokens(len(positions), 1.6 + 0.3 * data.shape[0]))
    ax = fig.add_subplot()
    style = dict(_GATE_STYLE[gate])
    if gate == "g":
        style.update(vmin=float(min(data.min(), -1e-6)), vmax=0.0)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", **style)
    fig.colorbar(im, ax=ax, label=gate if gate != "decay" else "exp(g)", pad=0.01)
    _token_axis(ax, "x", trace, positions)
    ax.set_yticks(range(data.shape[0]), [str(h) for h in _head_names(trace, data.shape[0])])
    ax.set_ylabel("value head")
    ax.set_title(f"Layer {layer} (Gated DeltaNet): {_GATE_TEXT[gate]}")
    return fig


def plot_gates_overview(trace: Trace, gate: str = "beta", *, batch: int = 0, columns: int = 3) -> Figure:
    """One head × token heatmap of ``gate`` per DeltaNet layer that has it, on one colour scale."""
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
    values = {i: gate_values(trace, i, gate) for i in layers}
    batch = _check_batch(batch, values[layers[0]][0].shape[0])
    style = dict(_GATE_STYLE[gate])
    if gate == "g":
        style.update(vmin=min(float(v[batch].min()) for v, _ in values.values()), vmax=0.0)
    ncols = min(columns, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    n_tok = max(len(p) for _, p in values.values())
    width = min(18.0, ncols * max(4.0, 1.5 + 0.12 * n_tok))
    fig = _new_figure((width, 0.6 + nrows * (1.4 + 0.15 * values[layers[0]][0].shape[2])))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for k, layer in enumerate(layers):
        ax = axes[k // ncols][k % ncols]
        x, positions = values[layer]
        im = ax.imshow(x[batch].T.numpy(), aspect="auto", interpolation="nearest", **style)
        _token_axis(ax, "x", trace, positions, max_labels=40)
        ax.set_ylabel("head", fontsize=8)
        ax.set_title(f"layer {layer}", fontsize=10)
    for k in range(len(layers), nrows * ncols):
        fig.delaxes(axes[k // ncols][k % ncols])
    fig.colorbar(im, ax=[a for row in axes for a in row if a in fig.axes], label=gate if gate != "decay" else "exp(g)")
    fig.suptitle(f"Gated DeltaNet {_GATE_TEXT[gate]}, per layer (head × token)")
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

    One column of points per layer, one point per value head (coloured by head index).
    """
    lives = half_lives(source, batch=batch)
    from_trace = isinstance(source, Trace)
    layers = sorted(lives)
    n_heads = max(len(v) for v in lives.values())
    fig = _new_figure((max(7.0, 1.5 + 0.45 * len(layers)), 4.0))
    ax = fig.add_subplot()
    sc = None
    for j, layer in enumerate(layers):
        hl = lives[layer].numpy()
        offsets = (np.arange(len(hl)) - (len(hl) - 1) / 2) * (0.6 / max(n_heads, 1))
        sc = ax.scatter(j + offsets, hl, c=np.arange(len(hl)), cmap="viridis", vmin=0, vmax=max(n_heads - 1, 1),
                        s=22, edgecolors="none")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("half-life (tokens)")
    if from_trace and source.length:
        ax.axhline(source.length, color="0.5", ls="--", lw=1)
        ax.text(len(layers) - 0.5, source.length, f" prompt length {source.length}", va="bottom", ha="right",
                fontsize=8, color="0.4")
    fig.colorbar(sc, ax=ax, label="value head", pad=0.01)
    how = ("ln 2 / −mean(g) over this prompt" if from_trace
           else "parameters only (in_proj_a x = 0): ln 2 / (exp(A_log)·softplus(dt_bias))")
    ax.set_title(f"Gated DeltaNet: decay half-life of each head\n{how}", fontsize=10)
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


def plot_state_norms(trace: Trace, layer: int, heads=None, *, positions=None, batch: int = 0) -> Figure:
    """``‖S_t‖_F`` along the sequence, one line per value head (all captured heads by default)."""
    norms, positions = state_norms(trace, layer, positions, batch=batch)
    hs = _check_heads(heads, norms.shape[1], f"layer {layer}'s state")
    names = _head_names(trace, norms.shape[1])
    fig = _new_figure(_figsize_for_tokens(len(positions), 3.6))
    ax = fig.add_subplot()
    for h in hs:
        ax.plot(range(len(positions)), norms[:, h].numpy(), marker="." if len(positions) <= 80 else None,
                label=f"head {names[h]}")
    _token_axis(ax, "x", trace, positions)
    ax.set_ylabel("‖S_t‖_F")
    ax.set_xlim(-0.5, len(positions) - 0.5)
    ax.legend(fontsize=8, ncols=min(len(hs), 8), loc="upper left")
    ax.set_title(f"Layer {layer} (Gated DeltaNet): size of each head's state after token t")
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
    fig = _new_figure(_figsize_for_tokens(len(positions), 1.6 + 0.3 * data.shape[0]))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="cividis", vmin=0.0)
    fig.colorbar(im, ax=ax, label="‖o_t‖", pad=0.01)
    _token_axis(ax, "x", trace, positions)
    ax.set_yticks(range(data.shape[0]), [str(h) for h in _head_names(trace, data.shape[0])])
    ax.set_ylabel("value head")
    ax.set_title(f"Layer {layer} (Gated DeltaNet): read-out ‖S_tᵀ q_t‖/√K per head and token")
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
    m = float(np.abs(data).max()) or 1.0
    fig = _new_figure((min(14.0, max(5.5, 2.5 + 0.2 * T)), min(12.0, max(4.0, 1.8 + 0.2 * len(rows)))))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-m, vmax=m)
    fig.colorbar(im, ax=ax, label="A[t, s]", pad=0.01)
    _token_axis(ax, "x", trace, list(range(T)))
    _token_axis(ax, "y", trace, rows)
    ax.set_xlabel("source token s")
    ax.set_ylabel("query token t")
    ax.set_title(f"Layer {layer}, head {_head_names(trace, HV)[head]}: exact DeltaNet mixing "
                 f"o_t = Σ_s A[t,s] v_s", fontsize=10)
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
    data = P[batch, head].numpy()
    Tk = data.shape[1]
    fig = _new_figure((min(14.0, max(5.5, 2.5 + 0.2 * Tk)), min(12.0, max(4.0, 1.8 + 0.2 * len(rows)))))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="Blues", vmin=0.0,
                   vmax=max(float(data.max()), 1e-6))
    fig.colorbar(im, ax=ax, label="attention probability", pad=0.01)
    _token_axis(ax, "x", trace, list(range(Tk)))
    _token_axis(ax, "y", trace, rows)
    ax.set_xlabel("key token")
    ax.set_ylabel("query token")
    ax.set_title(f"Layer {layer} (gated attention), head {_head_names(trace, P.shape[1])[head]}: "
                 "attention probabilities", fontsize=10)
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
    fig = _new_figure((min(16.0, max(9.0, 3.0 + 0.2 * len(positions))), 6.5))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    x = np.arange(len(positions))
    pos = np.asarray(positions, dtype=float)
    uniform = {"entropy": np.log(pos + 1), "max_prob": 1 / (pos + 1), "sink_mass": 1 / (pos + 1),
               "mean_distance": pos / 2}
    for ax, key in zip(axes, SUMMARY_KEYS):
        values = s[key][batch].float()  # [Hq, T]
        for h in hs:
            ax.plot(x, values[h].numpy(), marker="." if len(x) <= 80 else None, label=f"head {names[h]}")
        ax.plot(x, uniform[key], color="0.6", ls="--", lw=1, label="uniform")
        ax.set_title(_SUMMARY_TEXT[key], fontsize=10)
        ax.set_xlim(-0.5, len(x) - 0.5)
    for ax in axes[2:]:
        _token_axis(ax, "x", trace, positions)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
               ncols=min(len(hs) + 1, 9))
    fig.suptitle(f"Layer {layer} (gated attention): attention per head along the query position")
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
    fig = _new_figure((min(18.0, max(11.0, 6.0 + 0.18 * len(positions))), 3.3 + 0.45 * Hq))
    left, right = fig.subplots(1, 2, width_ratios=[3, 1.2])
    im = left.imshow(mean, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=left, label="mean over head dim", pad=0.01)
    _token_axis(left, "x", trace, positions)
    left.set_yticks(range(Hq), [str(h) for h in names])
    left.set_ylabel("query head")
    left.set_title("mean gate per head and token", fontsize=10)
    per_head = [gate[batch, :, h].reshape(-1).numpy() for h in range(Hq)]
    right.violinplot(per_head, positions=range(Hq), orientation="horizontal", showmedians=True)
    right.set_yticks(range(Hq), [str(h) for h in names])
    right.set_ylim(Hq - 0.5, -0.5)  # head 0 on top, as in the heatmap
    right.set_xlim(0, 1)
    right.set_xlabel("sigmoid(gate)")
    right.set_title("all values, per head", fontsize=10)
    fig.suptitle(f"Layer {layer} (gated attention): output gate sigmoid(gate) ⊙ attn_out")
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
        return [_readable(t) for t in tok.convert_ids_to_tokens(ids.tolist())]

    top = first.topk(min(k, first.numel())).indices  # [k]
    compare = len(labels) > 1
    fig = _new_figure((max(6.0, 1.5 + 0.6 * len(top) * max(1, len(labels) / 2)) + (4.5 if compare else 0), 4.2))
    if compare:
        ax, movers = fig.subplots(1, 2, width_ratios=[2.2, 1])
    else:
        ax, movers = fig.add_subplot(), None
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        ax.bar(np.arange(len(top)) + (j - (len(labels) - 1) / 2) * width, logprobs[label][top].exp().numpy(),
               width=width, label=label)
    ax.set_xticks(range(len(top)), names(top), rotation=45, ha="right", fontsize=9)
    ax.set_ylabel("probability")
    ax.legend(fontsize=9)
    notes = []
    for label in labels[1:]:
        lp = logprobs[label]
        kl = float((first.exp() * (first - lp)).sum())
        best = names(lp.argmax()[None])[0]
        notes.append(f"{label}: KL = {kl:.3g} nats, top token {best!r}")
    title = f"Next-token probabilities (top {len(top)} of {labels[0]!r})"
    ax.set_title(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
    if movers is not None:
        delta = last - first  # [vocab]
        moved = delta.abs().topk(min(k, delta.numel())).indices
        moved = moved[delta[moved].argsort(descending=True)]
        values = delta[moved].numpy()
        movers.barh(np.arange(len(moved)), values, color=np.where(values >= 0, "C2", "C3"))
        movers.set_yticks(range(len(moved)), names(moved), fontsize=9)
        movers.invert_yaxis()
        movers.axvline(0, color="0.3", lw=0.6)
        movers.set_xlabel(f"log p({labels[-1]}) − log p({labels[0]})", fontsize=9)
        movers.set_title("largest changes", fontsize=10)
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
    fig = _new_figure((min(16.0, max(6.0, 3.0 + 0.22 * n)), 2.2 + 0.45 * len(c.heads) * 2))
    top, bottom = fig.subplots(2, 1, sharex=True)
    im = top.imshow(held, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                    vmax=float(held.max()) or 1.0)
    fig.colorbar(im, ax=top, label="‖C_s‖ (held)", pad=0.01)
    im2 = bottom.imshow(erased, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=1.0)
    fig.colorbar(im2, ax=bottom, label="erased fraction", pad=0.01)
    for ax in (top, bottom):
        ax.set_yticks(range(len(c.heads)), [str(h) for h in c.heads], fontsize=8)
        ax.set_ylabel("head")
    if n <= MAX_LABELLED_TOKENS:
        bottom.set_xticks(range(n), [_readable(s) for s in c.tokens], rotation=90, fontsize=8 if n <= 40 else 6)
    else:
        step = _nice_step(n / 16)
        idx = [i for i, p in enumerate(c.positions) if p % step == 0] or [0]
        bottom.set_xticks(idx, [str(c.positions[i]) for i in idx], fontsize=8)
    bottom.set_xlabel("source token s")
    top.set_title(f"Layer {c.layer}: what S_t at t = {c.t} ({_readable(c.tokens[-1])!r}) still holds of each token",
                  fontsize=10)
    bottom.set_title("how much of each write later writes erased (beyond decay)", fontsize=10)
    return fig
