"""Interactive panels (ipywidgets) over a :class:`~qwen35_lab.instrument.Trace`.

``TraceExplorer(trace)`` walks through a prompt one token at a time and shows, for the chosen
Gated DeltaNet layer, what each head *writes* (β_t), *forgets* (exp(g_t), the fraction of the
state kept) and *reads* (‖S_tᵀ q_t‖/√K, and the exact mixing row ``A[t, :]`` of one head as a
bar chart over the source tokens)::

    tr = lab.run(prompt, capture=["layers.*.deltanet.beta", "layers.*.deltanet.g",
                                  "layers.*.deltanet.state"])
    ex = TraceExplorer(tr)
    ex                      # in a notebook: the controls and the panel
    ex.layer.value = 4      # or ex.select(layer=4, token=10): one redraw
    ex.token.value = 10
    ex.current["beta"]      # [HV] β at token 10 of layer 4; ex.current_figure, ex.summary_text()

Everything the panel shows is computed in :meth:`TraceExplorer.refresh` into ``ex.current``;
a selection the trace cannot serve shows a message in the panel instead of a traceback.
"""

from __future__ import annotations

import math

import ipywidgets as W
import numpy as np
import torch
from IPython import get_ipython
from IPython.display import display
from matplotlib.figure import Figure

from . import viz
from .instrument import Trace
from .checks import BadIndex, BadType, BadValue, error_text

__all__ = ["TraceExplorer"]

_MAX_CACHED_TOKENS = 2048  # mixing matrices of up to this many tokens are computed once per head


class TraceExplorer:
    """Controls (layer, head, token) and a panel of what each DeltaNet head writes, forgets and reads.

    Layers offered are the DeltaNet layers with β or g captured (or their state, which holds both).
    With ``layers.i.deltanet.state`` captured the panel also shows the reads; with
    ``layers.i.deltanet.o`` alone, the read norms only.
    """

    def __init__(self, trace: Trace, *, batch: int = 0):
        if not isinstance(trace, Trace):
            raise BadType(f"TraceExplorer needs a Trace (from lab.run(..., capture=...)), got {type(trace).__name__}")
        layers = sorted(set(viz._gate_layers(trace, "beta")) | set(viz._gate_layers(trace, "g")))
        if not layers:
            raise BadValue("this trace holds no Gated DeltaNet gates: run with capture=['layers.*.deltanet.beta', "
                             "'layers.*.deltanet.g', 'layers.*.deltanet.state'] (the state adds what each head reads)")
        first = self._gates(trace, layers[0])
        x = first["beta"] if first["beta"] is not None else first["g"]  # [B, P, HV]
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 <= batch < x.shape[0]:
            raise BadIndex(f"batch {batch!r} is out of range: the trace holds {x.shape[0]} sequences "
                             f"(0–{x.shape[0] - 1})")
        self.trace = trace
        self.batch = batch
        self.layers = layers
        n_heads = x.shape[2]
        length = trace.length or max(first["positions"], default=0) + 1
        self._labels = viz.token_labels(trace, range(length))
        self._mixing: dict[tuple[int, int], torch.Tensor] = {}

        self.layer = W.Dropdown(options=[(f"layer {i}", i) for i in layers], value=layers[0], description="layer")
        self.head = W.IntSlider(value=0, min=0, max=n_heads - 1, description="head", continuous_update=False)
        self.token = W.IntSlider(value=0, min=0, max=max(length - 1, 0), description="token",
                                 continuous_update=False, layout=W.Layout(width="60%"))
        self.token_text = W.HTML()
        # the panel is a PNG in an Image widget and a message in an HTML widget: each redraw is one plain
        # state update. (An Output widget captures display messages, which non-interactive runners such as
        # nbclient / nbconvert / papermill must route through comm messages; runs stalled there.)
        self.image = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))
        self.message = W.HTML()
        self.widget = W.VBox([W.HBox([self.layer, self.head]), W.HBox([self.token, self.token_text]),
                              self.message, self.image])

        self.current: dict = {}
        self.current_figure: Figure | None = None
        self._holding = False
        for control in (self.layer, self.head, self.token):
            control.observe(self._on_change, names="value")
        self.refresh()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self):
        display(self.widget)

    def _on_change(self, _change) -> None:
        if not self._holding:
            self.refresh()

    def select(self, *, layer: int | None = None, head: int | None = None, token: int | None = None) -> "TraceExplorer":
        """Set several controls at once and redraw once: ``ex.select(layer=4, token=10)``.

        A value the controls do not offer raises a ``ValueError`` naming the valid ones.
        """
        checks = [(self.layer, layer, list(self.layers)), (self.head, head, range(self.head.min, self.head.max + 1)),
                  (self.token, token, range(self.token.min, self.token.max + 1))]
        for control, value, valid in checks:
            if value is not None and value not in valid:
                shown = valid if isinstance(valid, list) else f"{valid.start}–{valid.stop - 1}"
                raise BadValue(f"{control.description} {value!r} is not offered; valid: {shown}")
        self._holding = True
        try:
            for control, value, _ in checks:
                if value is not None:
                    control.value = value
        finally:
            self._holding = False
        self.refresh()
        return self

    # ------------------------------------------------------------------ data
    @staticmethod
    def _gates(trace: Trace, layer: int) -> dict:
        """``{"beta": [B, P, HV] | None, "g": [B, P, HV] | None, "positions": [P]}`` of a layer.

        A gate the trace lacks is None; with both, only positions captured for both are kept.
        """
        found = {}
        for gate in ("beta", "g"):
            try:
                found[gate] = viz.gate_values(trace, layer, gate)
            except KeyError:
                found[gate] = None
        have = [v for v in found.values() if v is not None]
        positions = sorted(set.intersection(*(set(p) for _, p in have)))
        out = {"positions": positions}
        for gate, v in found.items():
            out[gate] = None if v is None else v[0][:, [v[1].index(p) for p in positions]]
        return out

    def _mixing_row(self, layer: int, head: int, t: int) -> torch.Tensor:
        """``A[t, :t+1]`` of one head: the exact weights of the values it reads at token t."""
        T = int(self.trace.state_inputs(layer)["g"].shape[1])
        if T > _MAX_CACHED_TOKENS:
            return self.trace.effective_attention(layer, heads=[head], rows=[t])[self.batch, 0, 0, : t + 1]
        if (layer, head) not in self._mixing:
            self._mixing[(layer, head)] = self.trace.effective_attention(layer, heads=[head])[self.batch, 0]
        return self._mixing[(layer, head)][t, : t + 1]

    def _compute(self, layer: int, head: int, t: int) -> dict:
        tr, b = self.trace, self.batch
        gates = self._gates(tr, layer)
        positions = gates["positions"]
        x = gates["beta"] if gates["beta"] is not None else gates["g"]
        n_heads = x.shape[2]
        if head >= n_heads:
            raise BadIndex(f"head {head} is out of range: layer {layer} has {n_heads} captured heads "
                             f"(0–{n_heads - 1})")
        if t not in positions:
            where = f"positions {positions[0]}–{positions[-1]}, {len(positions)} in all" if positions else "none"
            raise BadIndex(f"token {t} was not captured for layer {layer} (captured: {where})")
        i = positions.index(t)
        beta, g = gates["beta"], gates["g"]
        cur = {"layer": layer, "head": head, "token": t,
               "token_string": self._labels[t] if t < len(self._labels) else str(t), "positions": positions,
               "beta_layer": None if beta is None else beta[b],  # [P, HV]
               "decay_layer": None if g is None else g[b].exp(),  # [P, HV]
               "beta": None if beta is None else beta[b, i], "g": None if g is None else g[b, i],
               "decay": None if g is None else g[b, i].exp(), "read_norm": None, "mixing_row": None, "note": None}
        state = f"layers.{layer}.deltanet.state" in tr
        if state and t < int(tr.state_inputs(layer)["g"].shape[1]):
            q = tr.state_inputs(layer)["q"][b, t].float()  # [HV, K]
            S = tr.state(layer, t)[b]  # [HV, K, V]
            cur["read_norm"] = torch.einsum("hkv,hk->hv", S, q).norm(dim=-1) * q.shape[-1] ** -0.5
            cur["mixing_row"] = self._mixing_row(layer, head, t)
        elif f"layers.{layer}.deltanet.o" in tr:
            norms, pos_o = viz.read_norms(tr, layer, batch=b)
            if t in pos_o:
                cur["read_norm"] = norms[pos_o.index(t)]
            cur["note"] = f"capture 'layers.{layer}.deltanet.state' to see which tokens head {head} reads from"
        else:
            cur["note"] = f"capture 'layers.{layer}.deltanet.state' to see what the heads read"
        return cur

    # ------------------------------------------------------------------ panel
    def refresh(self) -> None:
        """Recompute ``current`` and redraw the panel for the selected layer, head and token."""
        layer, head, t = self.layer.value, self.head.value, self.token.value
        label = self._labels[t] if 0 <= t < len(self._labels) else "?"
        self.token_text.value = f"<code>{t}: {_html(repr(label))}</code>"
        try:
            self.current = self._compute(layer, head, t)
            self.current_figure = self._figure(self.current)
            message = None
        except Exception as e:  # a selection the trace cannot serve: say so in the panel
            self.current = {"layer": layer, "head": head, "token": t, "error": error_text(e)}
            self.current_figure = None
            message = self.current["error"]
        self.message.value = "" if message is None else f"<pre style='color:#a00'>{_html(message)}</pre>"
        if get_ipython() is None:  # plain Python (scripts, tests): no PNG to draw
            return
        viz._show_png(self.image, self.current_figure)

    def summary_text(self) -> str:
        """What the panel shows, in words."""
        c = self.current
        if "error" in c:
            return f"layer {c['layer']}, head {c['head']}, token {c['token']}: {c['error']}"
        lines = [f"layer {c['layer']}, token {c['token']} {c['token_string']!r}"]
        if c["beta"] is not None:
            lines.append(f"  writes   β_t      = {_fmt(c['beta'])}")
        if c["g"] is not None:
            half_life = math.log(2) / -c["g"].double().clamp_max(-1e-12)
            lines.append(f"  forgets  exp(g_t) = {_fmt(c['decay'])}  (half-life {_fmt(half_life)} tokens)")
        if c["read_norm"] is not None:
            lines.append(f"  reads    ‖S_tᵀq_t‖/√K = {_fmt(c['read_norm'])}")
        if c["mixing_row"] is not None:
            row = c["mixing_row"]
            s = int(row.abs().argmax())
            lines.append(f"  head {c['head']} reads most from token {s} {self._labels[s]!r} "
                         f"(A[t, s] = {float(row[s]):+.4f})")
        if c["note"]:
            lines.append(f"  ({c['note']})")
        return "\n".join(lines)

    def _figure(self, c: dict) -> Figure:
        tr, layer, head, t = self.trace, c["layer"], c["head"], c["token"]
        positions = c["positions"]
        n_heads = len(c["beta"] if c["beta"] is not None else c["decay"])
        heads = np.arange(n_heads)
        colors = ["C3" if h == head else "C0" for h in heads]
        fig = viz._new_figure((viz.DISPLAY_WIDTH, 8.0))
        grid = fig.add_gridspec(3, 2, height_ratios=[1.1, 1, 1.2])

        top = fig.add_subplot(grid[0, :])
        if c["beta_layer"] is not None:
            shown, gate = c["beta_layer"].T.numpy(), "beta"  # [HV, P]
        else:
            shown, gate = -np.expm1(c["decay_layer"].double().log().T.numpy()), "decay"
        norm, scale = viz._gate_norm(shown, gate)
        im = top.imshow(shown, aspect="auto", interpolation="nearest", cmap=viz._cmap(viz.SEQUENTIAL), norm=norm)
        viz._gate_colorbar(fig, im, top, gate, scale)
        top.axvline(positions.index(t), color="w", lw=2)
        top.axhline(head, color="w", lw=0.8, ls=":")
        viz._token_axis(top, "x", tr, positions)
        viz._category_axis(top, "y", range(n_heads), label="head")
        viz._title(top, f"{viz._GATE_TEXT[gate]}, layer {layer}; the line marks token {t}")

        panels = [("beta", f"writes: β_t at {c['token_string']!r}"),
                  ("decay", "forgets: 1 − exp(g_t), the share of the state forgotten (log)")]
        for k, (key, title) in enumerate(panels):
            ax = fig.add_subplot(grid[1, k])
            if c[key] is not None:
                if key == "beta":
                    ax.bar(heads, c[key].numpy(), color=colors)
                    ax.set_ylim(0, 1)
                else:  # exp(g) ≈ 1 for every head: the forgotten share shows what differs
                    ax.bar(heads, -np.expm1(c["g"].double().numpy()), color=colors)
                    viz._log_scale(ax, "y")
                viz._category_axis(ax, "x", heads, label="head")
                ax.tick_params(axis="y", labelsize=viz.TEXT_PT["tick"])
            else:
                probe = "beta" if key == "beta" else "g"
                _blank(ax, f"capture 'layers.{layer}.deltanet.{probe}'")
            viz._title(ax, title, fontfamily=viz._token_fonts())

        reads = fig.add_subplot(grid[2, 0])
        if c["read_norm"] is not None:
            reads.bar(heads, c["read_norm"].numpy(), color=colors)
            viz._category_axis(reads, "x", heads, label="head")
            viz._plain_numbers(reads, "y")
        else:
            _blank(reads, c["note"])
        viz._title(reads, "reads: ‖S_tᵀ q_t‖/√K")

        source = fig.add_subplot(grid[2, 1])
        if c["mixing_row"] is not None:
            row = c["mixing_row"].numpy()
            source.bar(np.arange(len(row)), row, color=np.where(row >= 0, "C3", "C0"))  # signed: red +, blue −
            source.axhline(0, color="0.3", lw=0.6)
            viz._token_axis(source, "x", tr, list(range(len(row))), max_labels=60)
            source.set_xlim(-0.5, max(len(row), 2) - 0.5)
            viz._plain_numbers(source, "y")
        else:
            _blank(source, c["note"])
        viz._title(source, f"head {head} reads from: A[t, s] over source tokens s ≤ {t}")
        fig.suptitle(f"Gated DeltaNet layer {layer}, token {t} {c['token_string']!r}", fontsize=viz.TEXT_PT["suptitle"],
                     fontfamily=viz._token_fonts())
        return fig


def _blank(ax, text: str | None) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text or "not captured", ha="center", va="center", wrap=True, fontsize=viz.TEXT_PT["label"],
            transform=ax.transAxes)


def _fmt(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in x.tolist()) + "]"


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
