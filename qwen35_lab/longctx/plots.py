"""Figures of notebook 06: the attention summaries of a chunked prefill with the needle marked, and the
long-context experiments (``benchmarks/long_context_experiments.py``'s JSON): accuracy against prompt length per RoPE, the attention layer at the question, the answer's loss against
the distance to the key word, and what static YaRN does to short prompts.

Every figure is no wider than ``viz.DISPLAY_WIDTH``, its text at least 8 pt; curves that lie on an
earlier one are drawn dashed and named in the legend (``yarn x2 (on default)``), so none hides unseen.
"""

from __future__ import annotations

import numpy as np

from ..checks import BadType, BadValue, check_float, check_int

__all__ = ["format_needles_short_inputs", "format_short_inputs", "plot_answer_loss", "plot_attention_at_question",
           "plot_length_accuracy", "plot_needles_accuracy", "plot_needles_attention", "plot_prefill_summary"]

_ACCURACY_PANELS = (("passkey", "accuracy", "passkey: accuracy"),
                    ("passkey", "attention_only_accuracy", "passkey, attention alone (β = 0)"),
                    ("recall", "accuracy", "recall: accuracy"))
_ATTENTION_KEYS = {"needle_attention": "attention on the key word", "entropy": "entropy (nats)",
                   "sink_mass": "mass on token 0", "mean_distance": "mean distance (tokens)"}


def _need(result, keys, what: str) -> dict:
    if not isinstance(result, dict):
        raise BadType(f"{what} must be a dict (the experiments' JSON), got {type(result).__name__}")
    missing = [k for k in keys if k not in result]
    if missing:
        raise BadValue(f"{what} lacks {missing}; it has {sorted(result)}")
    return result


def _on_earlier(curves: list[tuple[list, list]]) -> dict[int, int]:
    """``{i: j}`` where every point of curve ``i`` lies on curve ``j`` (an earlier one, same x, equal y)."""
    out: dict[int, int] = {}
    for i, (xi, yi) in enumerate(curves):
        for j in range(i):
            if j in out:
                continue
            at = dict(zip(curves[j][0], curves[j][1]))
            if xi and all(x in at and np.isclose(y, at[x], rtol=1e-9, atol=1e-12) for x, y in zip(xi, yi)):
                out[i] = j
                break
    return out


def _curves(ax, curves: list[tuple[list, list]], names: list[str]) -> None:
    """One line per curve; a curve on an earlier one dashed, with crosses, and named so."""
    on = _on_earlier(curves)
    for i, ((x, y), name) in enumerate(zip(curves, names)):
        dup = i in on
        ax.plot(x, y, color=f"C{i}", ls=(0, (4, 3)) if dup else "-", lw=1.8 if dup else 1.4,
                marker="x" if dup else "o", ms=5 if dup else 4,
                label=f"{name} (on {names[on[i]]})" if dup else name)


def _log_tokens(ax, label: str) -> None:
    """A log token axis labelled 100, 200, 500, 1,000 … (plain numbers)."""
    from .. import viz

    viz._log_scale(ax, "x")
    viz._plain_numbers(ax, "x")
    ax.set_xlabel(label, fontsize=viz.TEXT_PT["label"])
    ax.tick_params(axis="both", labelsize=viz.TEXT_PT["tick"])


def plot_prefill_summary(result, layer: int, *, needle_span=None, width: float = 10.0):
    """``viz.plot_attention_summary`` of a :class:`PrefillResult`'s trace (or a Trace) at ``width`` inches,
    the needle's tokens ``needle_span = (start, end)`` shaded on every panel. Returns the Figure."""
    from .. import viz

    trace = getattr(result, "trace", result)
    if trace is None:
        raise BadValue("the prefill captured nothing: run chunked_prefill(..., capture='layers.N.attn.summary')")
    width = check_float("width", width, lo=4.0, hi=viz.DISPLAY_WIDTH)
    fig = viz.plot_attention_summary(trace, layer)
    fig.set_size_inches(width, fig.get_size_inches()[1])
    if needle_span is not None:
        if not (isinstance(needle_span, (tuple, list)) and len(needle_span) == 2):
            raise BadType(f"needle_span must be (start, end) token positions, got {needle_span!r}")
        start = check_int("needle_span[0]", needle_span[0], lo=0)
        end = check_int("needle_span[1]", needle_span[1], lo=start + 1)
        positions = list(trace.positions(f"layers.{layer}.attn.summary"))
        inside = [i for i, p in enumerate(positions) if start <= p < end]
        if not inside:
            raise BadValue(f"needle_span {needle_span!r} holds none of the captured positions "
                           f"({positions[0]}…{positions[-1]})")
        for ax in fig.axes:
            ax.axvspan(inside[0] - 0.5, inside[-1] + 0.5, color="gold", alpha=0.5, lw=0)
        viz._suptitle(fig, f"Layer {layer} (gated attention) along the prompt; shaded: the needle "
                           f"(tokens {start:,}–{end - 1:,})")
    return fig


def plot_length_accuracy(exp: dict):
    """Accuracy against prompt tokens per RoPE: ``passkey``, ``passkey`` with attention alone, and ``recall``
    (the panels whose organism ``exp`` holds); dotted: the training length. Returns the Figure."""
    from .. import viz

    _need(exp, [], "exp")
    panels = [p for p in _ACCURACY_PANELS if p[0] in exp and p[1] in exp[p[0]]]
    if not panels:
        raise BadValue(f"exp holds none of the accuracy results {[f'{t}.{k}' for t, k, _ in _ACCURACY_PANELS]}")
    fig = viz._new_figure((min(10.0, 0.6 + 3.1 * len(panels)), 3.9))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (task, key, title) in zip(axes, panels):
        e = exp[task]
        names = list(e[key])
        _curves(ax, [([r["tokens"] for r in e[key][n]], [r["accuracy"] for r in e[key][n]]) for n in names], names)
        trained = e["train_length"] + 10 if task == "passkey" else e["train_tokens"]
        ax.axvline(trained, color="grey", ls=":", lw=1, label="training length")
        ax.set_ylim(-0.03, 1.03)
        _log_tokens(ax, "prompt tokens")
        ax.set_ylabel("accuracy", fontsize=viz.TEXT_PT["label"])
        viz._title(ax, title)
        ax.legend(fontsize=viz.TEXT_PT["tick"], loc="best")
    return fig


def plot_attention_at_question(e: dict):
    """The attention layer at the final ``?`` of ``passkey`` prompts against their length, per RoPE: the
    mass on the key word, the entropy, the mass on token 0 and the mean distance (2 × 2 panels). Returns the Figure."""
    from .. import viz

    e = _need(e, ["attention", "train_length"], "the passkey experiment")
    names = list(e["attention"])
    fig = viz._new_figure((8.5, 6.0))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, _ATTENTION_KEYS.items()):
        _curves(ax, [([r["tokens"] for r in e["attention"][n]], [r[key] for r in e["attention"][n]])
                     for n in names], names)
        ax.axvline(e["train_length"] + 10, color="grey", ls=":", lw=1)
        _log_tokens(ax, "prompt tokens")
        viz._plain_numbers(ax, "y")
        viz._title(ax, title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=viz.TEXT_PT["tick"], ncols=min(len(labels), 4))
    viz._suptitle(fig, "passkey: the attention layer at the final '?' (dotted: training length)")
    return fig


def plot_answer_loss(e: dict):
    """The answer's loss against the distance from the key word to the question, per RoPE: the whole model
    (log scale) and attention alone (β = 0); dotted: the training length. Returns the Figure."""
    from .. import viz

    e = _need(e, ["loss_by_needle_position", "train_length"], "the passkey experiment")
    runs = e["loss_by_needle_position"]
    names = list(runs)
    fig = viz._new_figure((9.0, 3.9))
    axes = fig.subplots(1, 2)
    tokens = next(iter(runs.values()))["rows"][0]["tokens"]
    for ax, key, title in zip(axes, ("loss", "loss_attention_only"), ("whole model", "attention alone (β = 0)")):
        _curves(ax, [([r["distance"] for r in runs[n]["rows"]], [r[key] for r in runs[n]["rows"]]) for n in names],
                names)
        ax.axvline(e["train_length"], color="grey", ls=":", lw=1, label="training length")
        ax.set_xlabel("tokens from the key word to the question", fontsize=viz.TEXT_PT["label"])
        ax.set_ylabel("answer loss (nats)", fontsize=viz.TEXT_PT["label"])
        if key == "loss":
            viz._log_scale(ax, "y")
        else:
            viz._plain_numbers(ax, "y")
        ax.tick_params(axis="x", labelsize=viz.TEXT_PT["tick"])
        viz._title(ax, f"{title}, {tokens:,}-token prompts")
        ax.legend(fontsize=viz.TEXT_PT["tick"], loc="best")
    return fig


def format_short_inputs(e: dict) -> str:
    """What static YaRN does to prompts no longer than the training length, against the default RoPE: one
    line per RoPE and length, with the KL of the answer distribution and the top-1 agreement, for the whole
    model and for attention alone (β = 0)."""
    e = _need(e, ["short_inputs"], "the passkey experiment")
    head = f"{'rope':<8} {'tokens':>6}  {'KL whole':>9}  {'KL attn alone':>13}  {'top-1 attn alone':>16}"
    out = [head]
    for name, rows in e["short_inputs"].items():
        for r in rows:
            out.append(f"{name:<8} {r['tokens']:>6}  {r['kl_default_to_yarn']:>9.1e}  "
                       f"{r['kl_default_to_yarn_attention_only']:>13.1e}  {r['top1_agreement_attention_only']:>16.2f}")
    return "\n".join(out)


_NEEDLES_ATTENTION_KEYS = {"needle_mass": "mass on the asked needle (latest copy)",
                           "stale_mass": "mass on its stale copy", "entropy": "entropy (nats)",
                           "mean_distance": "mean distance (tokens)"}


def _needles_names(e: dict, names) -> list[str]:
    have = list(e["accuracy"])
    if names is None:
        return have
    unknown = [n for n in names if n not in have]
    if unknown:
        raise BadValue(f"no RoPE setting {unknown} in the needles experiment; it has {have}")
    return list(names)


def plot_needles_accuracy(e: dict, names=None):
    """``needles``: accuracy against prompt tokens per RoPE with 95% intervals (shaded), and how often the
    answer is the stale copy's value; dotted: the training length. ``names``: the RoPE settings to draw
    (default: all). Returns the Figure."""
    from .. import viz

    e = _need(e, ["accuracy", "train_length", "n"], "the needles experiment")
    names = _needles_names(e, names)
    fig = viz._new_figure((10.0, 4.0))
    axes = fig.subplots(1, 2)
    trained = e["train_length"] + 2
    for ax, key, title in zip(axes, ("accuracy", "stale_rate"),
                              ("accuracy (95% interval shaded)", "answered with the stale value")):
        curves = [([r["tokens"] for r in e["accuracy"][n]], [r[key] for r in e["accuracy"][n]]) for n in names]
        _curves(ax, curves, names)
        if key == "accuracy":
            for i, n in enumerate(names):
                rows = e["accuracy"][n]
                ax.fill_between([r["tokens"] for r in rows], [r["ci95"][0] for r in rows],
                                [r["ci95"][1] for r in rows], color=f"C{i}", alpha=0.15, lw=0)
            if e.get("controls"):
                chance = e["controls"]["attention_ablation"][0]["chance"]
            else:
                from ..organisms.tasks import NEEDLES_NUM_VALUES

                chance = 1 / NEEDLES_NUM_VALUES
            ax.axhline(chance, color="black", ls="--", lw=0.8, label=f"chance (1/{round(1 / chance)})")
        ax.axvline(trained, color="grey", ls=":", lw=1)
        ax.set_ylim(-0.03, 1.03)
        _log_tokens(ax, "prompt tokens")
        ax.set_ylabel("fraction of prompts", fontsize=viz.TEXT_PT["label"])
        viz._title(ax, title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=viz.TEXT_PT["tick"], ncols=min(len(labels), 5))
    viz._suptitle(fig, f"needles: retrieval against length, n = {e['n']} fresh prompts per point "
                       f"(dotted: training length, {trained} tokens)")
    return fig


def plot_needles_attention(e: dict, names=None):
    """``needles``: the attention layer's best head at the final ``kX`` against prompt length, per RoPE:
    mass on the asked needle, mass on its stale copy, entropy and mean distance (2 × 2). Returns the Figure."""
    from .. import viz

    e = _need(e, ["attention", "train_length"], "the needles experiment")
    names = _needles_names({"accuracy": e["attention"]}, names)
    fig = viz._new_figure((9.0, 6.4))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, _NEEDLES_ATTENTION_KEYS.items()):
        _curves(ax, [([r["tokens"] for r in e["attention"][n]], [r[key] for r in e["attention"][n]])
                     for n in names], names)
        ax.axvline(e["train_length"] + 2, color="grey", ls=":", lw=1)
        _log_tokens(ax, "prompt tokens")
        if key == "mean_distance":
            viz._log_scale(ax, "y")
            viz._plain_numbers(ax, "y")
        else:
            viz._plain_numbers(ax, "y")
        viz._title(ax, title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", fontsize=viz.TEXT_PT["tick"], ncols=min(len(labels), 4))
    viz._suptitle(fig, "needles: the attention layer at the asked key (best head; dotted: training length)")
    return fig


def format_needles_short_inputs(e: dict) -> str:
    """Static YaRN on ``needles`` prompts no longer than the training length: accuracy with the default RoPE
    and with YaRN on the same prompts (95% intervals), the stale-answer rates, and KL(default ‖ YaRN)."""
    e = _need(e, ["short_inputs"], "the needles experiment")
    out = [f"{'rope':<9} {'tokens':>6}  {'default':>20}  {'YaRN':>20}  {'stale d/Y':>9}  {'KL':>7}"]
    for name, rows in e["short_inputs"].items():
        for r in rows:
            d, y = r["ci95_default"], r["ci95_yarn"]
            out.append(f"{name:<9} {r['tokens']:>6}  {r['accuracy_default']:.3f} [{d[0]:.2f}, {d[1]:.2f}]  "
                       f"{r['accuracy_yarn']:.3f} [{y[0]:.2f}, {y[1]:.2f}]  "
                       f"{r['stale_rate_default']:.2f}/{r['stale_rate_yarn']:.2f}  {r['kl_default_to_yarn']:>7.3f}")
    return "\n".join(out)
