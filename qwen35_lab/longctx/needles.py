"""Needle in a haystack: retrieval accuracy over needle depth × context length, for any model.

:func:`needle_heatmap` measures, for each RoPE setting asked, the fraction of
fresh prompts answered right with the needle at relative ``depth`` (0 = the
start of the haystack, 1 = just before the question) in a haystack of
``length`` tokens — the field's standard picture — and
:func:`plot_needle_heatmap` draws the grids side by side.

What a prompt is depends on the model:

* a ``needles`` organism: its own task (16 key → value needles, one asked;
  :mod:`qwen35_lab.organisms.needles`);
* a ``passkey`` organism: its key word in filler sentences;
* any other model (a real checkpoint): the classic pass-key prompt built by
  :func:`~qwen35_lab.longctx.long_document` — ``The pass key is 48213.`` in
  filler sentences, then ``What is the pass key? The pass key is`` — scored as
  an exact greedy match of the key's tokens (teacher forced, one forward).

Before any work the grid is checked: depths in ``[0, 1]``, lengths that hold
the needle, RoPE settings the model accepts, and the time and memory the grid
would take (estimated from two short timed forwards and the memory planner)
against the budgets — a grid over budget is refused with the estimate.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from ..checks import BadType, BadValue, OverBudget, check_float, check_int
from .memory import plan_memory
from .rope import _validate, set_rope, text_config_of

__all__ = ["NeedleHeatmap", "needle_heatmap", "plot_needle_heatmap", "needle_task"]

PASSKEY_QUESTION = " What is the pass key? The pass key is"


def needle_task(lab) -> str:
    """``"needles"``, ``"passkey"`` (the organisms' own tasks) or ``"generic"`` (the pass-key prompt)."""
    task = (getattr(lab, "meta", None) or {}).get("task")
    return task if task in ("needles", "passkey") else "generic"


def _min_length(lab, task: str) -> int:
    """The fewest haystack tokens that hold the needle."""
    if task == "needles":
        from ..organisms.tasks import NEEDLES_DEFAULT, NEEDLES_STALE_DEFAULT

        return 2 * (NEEDLES_DEFAULT + NEEDLES_STALE_DEFAULT)
    if task == "passkey":
        return 1
    return len(lab.tokenizer.encode(" The pass key is 00000.", add_special_tokens=False)) + 1


def _generic_prompts(lab, length: int, n: int, seed: int, depth: float):
    """Pass-key prompts for any tokenizer: ids [n, T] with the answer appended, answer span (start, end)."""
    from .prefill import long_document

    rng = random.Random(seed)
    tok = lab.tokenizer
    question = tok.encode(PASSKEY_QUESTION, add_special_tokens=False)
    rows, spans = [], []
    for i in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        doc = long_document(tok, length, seed=seed * 1_000_003 + i, needle=f"The pass key is {key}.", depth=depth)
        answer = tok.encode(" " + key, add_special_tokens=False)
        ids = doc.input_ids[0].tolist() + question
        spans.append((len(ids), len(ids) + len(answer)))
        rows.append(ids + answer)
    width = max(len(r) for r in rows)
    if any(len(r) != width for r in rows):  # keys of different token counts: score one at a time
        return rows, spans
    return torch.tensor(rows), spans


def _cell_accuracy(lab, task: str, length: int, depth: float, n: int, seed: int, batch_size: int) -> int:
    """Number of the ``n`` prompts answered right."""
    if task == "needles":
        from ..organisms import needles

        return needles.accuracy(lab, length, n=n, seed=seed, depth=depth, batch_size=batch_size)["correct"]
    if task == "passkey":
        from ..organisms import tasks

        rng = random.Random(seed)
        examples = [tasks.passkey_example(rng, length, depth=depth) for _ in range(n)]
        vocab = lab.tokenizer.get_vocab()
        ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])
        answers = torch.tensor([vocab[ex.answers[0]] for ex in examples])
        correct = 0
        with torch.no_grad():
            for b0 in range(0, n, batch_size):
                logits = lab.model(input_ids=ids[b0:b0 + batch_size].to(lab.device), logits_to_keep=1).logits
                correct += int((logits[:, -1].argmax(-1).cpu() == answers[b0:b0 + batch_size]).sum())
        return correct
    rows, spans = _generic_prompts(lab, length, n, seed, depth)
    correct = 0
    with torch.no_grad():
        for i, (s, e) in enumerate(spans):
            ids = rows[i:i + 1] if torch.is_tensor(rows) else torch.tensor([rows[i]])
            # logits at positions s-1 … e-2 predict the answer tokens s … e-1
            logits = lab.model(input_ids=ids[:, :e].to(lab.device), logits_to_keep=e - s + 1).logits[0, :-1]
            correct += bool((logits.argmax(-1).cpu() == ids[0, s:e]).all())
    return correct


@dataclass
class NeedleHeatmap:
    """Accuracy grids of :func:`needle_heatmap`: ``accuracy[rope]`` is ``[len(depths), len(lengths)]``."""

    lengths: list[int]
    depths: list[float]
    ropes: dict
    n: int
    task: str
    accuracy: dict = field(default_factory=dict)  # name -> [[float]] (depth rows, length columns)
    ci95: dict = field(default_factory=dict)  # name -> [[[lo, hi]]]
    seconds: float = 0.0
    estimate: dict = field(default_factory=dict)
    model: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("model", "task", "lengths", "depths", "ropes", "n", "accuracy", "ci95",
                                               "seconds", "estimate")}

    def plot(self, **kwargs):
        return plot_needle_heatmap(self, **kwargs)

    def __repr__(self) -> str:
        lines = [f"NeedleHeatmap({self.model!r}, task {self.task!r}, n={self.n} per cell, {self.seconds:.0f} s)"]
        for name, grid in self.accuracy.items():
            lines.append(f"  {name}: depth × length, mean accuracy {sum(map(sum, grid)) / (len(grid) * len(grid[0])):.3f}")
        return "\n".join(lines)


def _check_grid(lab, lengths, depths, ropes, task):
    if isinstance(lengths, (str, bytes)) or not hasattr(lengths, "__iter__"):
        raise BadType(f"lengths must be a list of token counts, got {lengths!r}")
    if isinstance(depths, (str, bytes)) or not hasattr(depths, "__iter__"):
        raise BadType(f"depths must be a list of numbers in [0, 1], got {depths!r}")
    lengths = [check_int("length", x, lo=1) for x in lengths]
    depths = [check_float("depth", d, lo=0.0, hi=1.0) for d in depths]
    if not lengths or not depths:
        raise BadValue(f"lengths and depths must not be empty (got {len(lengths)} lengths, {len(depths)} depths)")
    low = _min_length(lab, task)
    short = [x for x in lengths if x < low]
    if short:
        raise BadValue(f"length(s) {short} cannot hold the needle: the {task!r} needle needs at least {low} tokens "
                       f"of haystack")
    if ropes is None:
        ropes = {"model": None}
    if not isinstance(ropes, dict) or not ropes:
        raise BadType(f"ropes must be a dict {{name: rope_parameters or None}}, e.g. {{'default': {{'rope_type': "
                      f"'default'}}, 'yarn x8': yarn_for_context(8 * L, L)}}; got {ropes!r}")
    text = text_config_of(lab.model)
    for name, rope in ropes.items():
        if rope is not None:
            try:
                _validate(rope, text)
            except (ValueError, TypeError) as e:
                raise BadValue(f"rope {name!r} is not one this model supports: {e}") from None
    return lengths, depths, ropes


def _estimate(lab, task, lengths, depths, ropes, n, seed, batch_size) -> dict:
    """Seconds (from two short timed cells, fitted as a·T + b·T²) and peak bytes (memory planner) of the grid.

    One untimed cell first (the first forward pays for allocation and kernel selection), then cells at
    a short length and at up to 8× it: two points far apart, so millisecond noise at the short one
    does not turn into a large quadratic term at the grid's longest length."""
    base = max(_min_length(lab, task), 64)
    probe = [base, max(2 * base, min(max(lengths), 8 * base))]
    _cell_accuracy(lab, task, base, 0.5, 1, seed, batch_size)
    timings = []
    for length in probe:
        m = min(n, 4)
        t0 = time.perf_counter()
        _cell_accuracy(lab, task, length, 0.5, m, seed, batch_size)
        timings.append((time.perf_counter() - t0) / m)
    (t1, t2), (l1, l2) = timings, probe
    b = max(0.0, (t2 / l2 - t1 / l1) / (l2 - l1))  # per-prompt seconds = a·T + b·T²
    a = max(t1 / l1 - b * l1, 1e-9)
    per_prompt = {x: a * x + b * x * x for x in lengths}
    seconds = len(ropes) * len(depths) * n * sum(per_prompt.values())
    rows = min(n, batch_size) if task != "generic" else 1
    peak = plan_memory(lab, max(lengths) + 64, batch=rows, logits="last" if task != "generic" else "all").runtime
    return {"seconds": seconds, "peak_bytes": int(peak), "cells": len(ropes) * len(depths) * len(lengths)}


def needle_heatmap(lab, lengths, depths, *, ropes: dict | None = None, n: int = 50, seed: int = 777,
                   batch_size: int = 25, budget_seconds: float = 1800.0, budget_bytes: int | None = None,
                   progress: bool = True) -> NeedleHeatmap:
    """Retrieval accuracy over needle ``depths`` × haystack ``lengths`` (tokens), per RoPE setting.

    Args:
        lab: a Lab (an organism or a real checkpoint).
        lengths: haystack lengths in tokens (the prompt adds the question).
        depths: relative needle positions in ``[0, 1]``.
        ropes: ``{name: rope_parameters}`` applied in turn with :func:`set_rope`
            (``None`` = the default RoPE), e.g. ``{"default": None, "yarn x8":
            yarn_for_context(8 * L, L)}``; without it, the model's current RoPE only.
            The model's RoPE is restored afterwards.
        n: prompts per cell (fresh data from ``seed``).
        budget_seconds / budget_bytes: refuse a grid estimated to take longer, or to need
            more memory (default: free memory), before any of it runs.

    Returns a :class:`NeedleHeatmap` (``.accuracy[name]`` is ``[depth][length]``, ``.plot()``).
    """
    from tqdm.auto import tqdm

    from ..organisms.tasks import wilson_interval

    if not hasattr(lab, "model") or not hasattr(lab, "tokenizer"):
        raise BadType(f"needle_heatmap takes a Lab (qwen35_lab.load(...)), got {type(lab).__name__}")
    task = needle_task(lab)
    lengths, depths, ropes = _check_grid(lab, lengths, depths, ropes, task)
    n = check_int("n", n, lo=1)
    batch_size = check_int("batch_size", batch_size, lo=1)
    budget_seconds = check_float("budget_seconds", budget_seconds, lo=0.0, lo_open=True)
    if budget_bytes is None:
        from ..loading import free_memory_bytes

        budget_bytes = int(0.9 * free_memory_bytes(str(lab.device)))
    budget_bytes = check_int("budget_bytes", budget_bytes, lo=1)

    text = text_config_of(lab.model)
    original = dict(text.rope_parameters)
    est = _estimate(lab, task, lengths, depths, ropes, n, seed, batch_size)
    if est["seconds"] > budget_seconds:
        raise OverBudget(f"the grid ({est['cells']} cells × {n} prompts, lengths up to {max(lengths):,}) would take "
                         f"about {est['seconds']:,.0f} s, over budget_seconds={budget_seconds:g}; use fewer lengths, "
                         f"depths or ropes, a smaller n, or raise budget_seconds")
    if est["peak_bytes"] > budget_bytes:
        raise OverBudget(f"the longest cell ({max(lengths):,} tokens × batch {min(n, batch_size)}) needs about "
                         f"{est['peak_bytes'] / 1e9:.2f} GB, over the budget of {budget_bytes / 1e9:.2f} GB; "
                         f"lower batch_size or the longest length")

    result = NeedleHeatmap(lengths=lengths, depths=depths, ropes=ropes, n=n, task=task, estimate=est,
                           model=getattr(lab, "name", ""))
    bar = tqdm(total=len(ropes) * len(depths) * len(lengths), desc="needle heatmap", disable=not progress)
    t0 = time.perf_counter()
    try:
        for name, rope in ropes.items():
            if name != "model" or rope is not None:
                set_rope(lab, rope)
            grid, cis = [], []
            for d_i, depth in enumerate(depths):
                row, ci_row = [], []
                for length in lengths:
                    correct = _cell_accuracy(lab, task, length, depth, n, seed + 7919 * d_i, batch_size)
                    row.append(correct / n)
                    ci_row.append(list(wilson_interval(correct, n)))
                    bar.set_postfix_str(f"{name} depth {depth:g} length {length}")
                    bar.update(1)
                grid.append(row)
                cis.append(ci_row)
            result.accuracy[name], result.ci95[name] = grid, cis
    finally:
        bar.close()
        set_rope(lab, original)
    result.seconds = time.perf_counter() - t0
    return result


def plot_needle_heatmap(result, *, train_length: int | None = None, axes=None):
    """The accuracy grids side by side (depth down, length across), one per RoPE, sharing one colour scale.

    ``result``: a :class:`NeedleHeatmap` or its ``as_dict()``. ``train_length``: marks the
    training length on the length axis. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    r = result.as_dict() if isinstance(result, NeedleHeatmap) else result
    names = list(r["accuracy"])
    if axes is None:
        fig, axes = plt.subplots(1, len(names), figsize=(min(11.0, 3.6 * len(names) + 1.4), 3.8), squeeze=False,
                                 layout="constrained")  # viz.DISPLAY_WIDTH: text stays >= 8 pt in a notebook
        axes = axes[0]
    else:
        fig = axes[0].figure
    lengths, depths = r["lengths"], r["depths"]
    im = None
    for ax, name in zip(axes, names):
        grid = torch.tensor(r["accuracy"][name])
        im = ax.imshow(grid.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{x:,}" for x in lengths], rotation=45, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("haystack length (tokens)", fontsize=9)
        ax.set_title(name, fontsize=10)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = float(grid[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,  # viz.MIN_TEXT_PT
                        color="white" if v < 0.5 else "black")
        if train_length is not None and train_length in lengths:
            j = lengths.index(train_length)
            ax.axvline(j + 0.5, color="white", ls="--", lw=1)
    axes[0].set_ylabel("needle depth (0 = start)", fontsize=9)
    fig.colorbar(im, ax=list(axes), label=f"accuracy (n = {r['n']} per cell)", fraction=0.03)
    fig.suptitle(f"Needle in a haystack: {r.get('model', '')} ({r['task']})", fontsize=11)
    return fig
