"""Sampling as vLLM does it, on Hugging Face ``generate``: the model cards' presets, exact logits
processors, sweeps over sampling parameters, and their plots.

The sampler (vLLM ``v1/sample/sampler.py``), applied to the next-token logits ``[B, V]`` in this order:

1. **penalties** (``vllm/model_executor/layers/utils.py: apply_penalties``)

   - repetition: for every token seen in the prompt *or* the output,
     ``logit / r`` when the logit is positive, ``logit * r`` otherwise;
   - frequency and presence, over the *generated* tokens only (OpenAI's definition):
     ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
2. **temperature**: ``logit / T``; ``T = 0`` means greedy, the argmax of the penalised logits.
3. **min_p**: drop tokens whose probability (after temperature) is below ``min_p * max_prob``.
4. **top_k**: keep the tokens whose logit is at least the k-th largest (0 or -1: off).
5. **top_p**: keep the smallest set of most likely tokens whose probability reaches ``top_p``
   (the most likely token always stays).

>>> kw = generation_kwargs(lab, {"preset": "qwen3.5-thinking-general"}, prompt_ids=ids)
>>> lab.model.generate(ids, max_new_tokens=32, **kw)       # what lab.generate does
>>> rows = sweep(lab, ["Name three colours."], grid={"temperature": [0.3, 1.0], "top_k": [5, 20]})
>>> plot_sweep(rows, x="temperature")

Unspecified parameters take the checkpoint's ``generation_config.json`` values (temperature,
top_p, top_k, min_p, repetition_penalty), as vLLM's ``--generation-config auto`` does, and vLLM's
defaults where the checkpoint is silent (1.0, 1.0, off, 0.0, 1.0; penalties 0).
"""
from __future__ import annotations

import numbers

from . import checks, sampler
from .checks import BadType, BadValue
from .sampler import *  # noqa: F403 - the sampling API is the sampler's plus sweeps
from .sampler import PARAMETERS, _check_positive_int, _settings

__all__ = [*sampler.__all__, "plot_sweep", "sweep"]

def sweep(lab, prompts, *, grid: dict | None = None, presets=None, n: int = 1, seed: int = 0,
          max_new_tokens: int = 64, chat: bool = True, progress: bool = True, loop_threshold: float = 0.3,
          column: str | None = None, concurrency: int | None = None, output=None):
    """Generate for every prompt × setting × sample and return tidy rows (a ``datasets.Dataset``).

    ``prompts``: a list of prompts (str, or chat messages), or a ``datasets.Dataset`` whose
    ``column`` holds them. ``grid``: ``{parameter: [values]}`` over ``PARAMETERS`` and
    ``enable_thinking``; every combination is a setting. ``presets``: preset names; with a grid
    too, each preset is the base the grid's values go on. ``n`` samples per setting, sample j
    seeded with ``seed + j`` (the same seeds for every setting, so settings are compared on the
    same random numbers).

    ``lab`` may also be an :class:`~qwen35_lab.backends.OpenAIBackend`: the same sweep against a
    served model, with up to ``concurrency`` requests in flight (default
    ``sweeps.DEFAULT_CONCURRENCY``; at most ``sweeps.MAX_CONCURRENCY``; a local ``Lab`` generates
    one row at a time). A request that fails past its retries is kept as a row with its
    ``error``. ``output``: a ``.parquet`` or ``.arrow`` file the rows stream to as they come;
    the same sweep run again with the same output skips the rows already there and finishes the
    rest (see :mod:`qwen35_lab.sweeps`).

    Columns, in the order (setting, prompt_index, sample): prompt_index, prompt, setting (its
    index), preset, the seven parameters (from a server: as sent, None where the server's default
    applied), enable_thinking, sample, seed, text, ids, reasoning, answer, finished,
    finished_thinking, prompt_tokens, generated_tokens, reasoning_tokens, distinct_1, distinct_2,
    repetition_rate (seq-rep-4), repeated_tokens, entropy (of what each token was drawn from; 0
    when greedy), entropy_raw (the model's own; both mean nats, NaN from a server), thinking_loop
    (reasoning cut off at max_new_tokens while repeating: seq-rep-4 >= ``loop_threshold``), error
    (None, or why the row failed).
    """
    from . import sweeps
    from .backends import OpenAIBackend

    prompts = _sweep_prompts(prompts, column)
    n = _check_positive_int("n", n)
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise BadValue(f"seed must be a non-negative integer, got {seed!r}")
    checks.check_bool("chat", chat)
    checks.check_bool("progress", progress)
    loop_threshold = checks.check_float("loop_threshold", loop_threshold, lo=0, hi=1)
    remote = isinstance(lab, OpenAIBackend)
    if concurrency is None:
        concurrency = sweeps.DEFAULT_CONCURRENCY if remote else 1
    concurrency = checks.check_int("concurrency", concurrency, lo=1, hi=sweeps.MAX_CONCURRENCY)
    if concurrency > 1 and not remote:
        raise checks.BadValue(f"concurrency={concurrency} is for served models: a local Lab generates one row "
                              f"at a time (each with its own seed). Leave concurrency out, or sweep an "
                              f"OpenAIBackend")
    if output is not None:
        output = checks.check_writable_target("output", output)
        if output.suffix not in (".parquet", ".arrow"):
            raise checks.BadValue(f"output {str(output)!r} must name a .parquet or .arrow file, "
                                  f"e.g. 'runs/colours.parquet'")
    settings = _settings(grid, presets)
    if remote:
        for s in settings:  # a field the server cannot honour fails here, before any request
            lab.request_body([{"role": "user", "content": "check"}], max_tokens=max_new_tokens, **s)
    return sweeps.run(lab, prompts, settings, n=n, seed=int(seed), max_new_tokens=max_new_tokens, chat=chat,
                      progress=progress, loop_threshold=loop_threshold, concurrency=concurrency, output=output)


def _sweep_prompts(prompts, column) -> list:
    """The prompts of a sweep as a list: from a list, or from a ``datasets.Dataset``'s ``column``."""
    from datasets import Dataset

    if isinstance(prompts, Dataset):
        if column is None:
            raise checks.BadValue(f"prompts is a Dataset: name the column that holds them, column=...; "
                                  f"its columns: {', '.join(prompts.column_names)}")
        checks.check_choice("column", column, prompts.column_names)
        prompts = list(prompts[column])
    elif column is not None:
        raise checks.BadValue(f"column={column!r} picks a column of a datasets.Dataset, but prompts is a "
                              f"{type(prompts).__name__}")
    if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)):
        raise BadType("prompts must be a list of prompts (str or chat messages), e.g. ['Name three colours.'], "
                        "or a datasets.Dataset with column=")
    if not prompts:
        raise BadValue("prompts is empty; give at least one prompt")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and prompt:
            continue
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            continue
        raise checks.BadValue(f"prompt {i} is {prompt!r}; a prompt is a non-empty str or a list of chat "
                              f"messages ({{'role': ..., 'content': ...}})")
    return list(prompts)


_METRICS = ("distinct_2", "repetition_rate", "entropy", "generated_tokens")


def plot_sweep(rows, *, x: str | None = None, metrics=_METRICS, by: str | None = None):
    """Metrics against one parameter: one panel per metric, mean ± std over prompts and samples.

    ``rows``: what :func:`sweep` returns (or a pandas DataFrame of it). ``x``: the parameter on
    the x axis (default: the first that varies; ``"preset"`` gives bars). ``by``: a parameter
    drawn as separate lines (default: the other varying parameters, combined).
    Returns a matplotlib ``Figure``.
    """
    import numpy as np

    from .viz import _new_figure, _title

    df = rows.to_pandas() if hasattr(rows, "to_pandas") else rows
    if not hasattr(df, "groupby"):
        raise BadType(f"rows must be what sweep() returns (a datasets.Dataset) or a DataFrame, "
                        f"got {type(rows).__name__}")
    if len(df) == 0:
        raise BadValue("rows is empty: nothing to plot")
    candidates = ["preset", *PARAMETERS, "enable_thinking"]
    varying = [c for c in candidates if c in df and df[c].astype(str).nunique() > 1]
    if x is None:
        if not varying:
            raise BadValue("no parameter varies across the rows; pass x=")
        x = varying[0]
    if x not in df:
        raise BadValue(f"x={x!r} is not a column; choose from {', '.join(c for c in candidates if c in df)}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    missing = [m for m in metrics if m not in df]
    if missing:
        raise BadValue(f"unknown metric(s) {missing}; columns: {', '.join(df.columns)}")
    others = [c for c in varying if c != x] if by is None else [by]
    for c in others:
        if c not in df:
            raise BadValue(f"by={c!r} is not a column")
    df = df.copy()
    df["_line"] = df[others].astype(str).agg(", ".join, axis=1) if others else "all"
    df["_x"] = df[x].astype(str) if x in ("preset", "enable_thinking") else df[x]
    categorical = df["_x"].dtype == object
    fig = _new_figure((max(6.0, 3.6 * len(metrics)), 3.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    lines = list(dict.fromkeys(df["_line"]))
    levels = list(dict.fromkeys(df["_x"])) if categorical else sorted(df["_x"].unique())
    span = (max(levels) - min(levels)) if not categorical and len(levels) > 1 else 1.0
    markers = "osD^vP*X"
    for ax, metric in zip(axes, metrics):
        # rates live in [0, 1]: mean ± std is clipped there (a band past the metric's range misleads)
        bounded = metric in _UNIT_METRICS
        means, hidden = [], []
        for i, line in enumerate(lines):
            part = df[df["_line"] == line]
            stats = part.groupby("_x")[metric].agg(["mean", "std"]).reindex(levels)
            means.append(stats["mean"].to_numpy())
            std = stats["std"].fillna(0).to_numpy()
            low, high = stats["mean"] - std, stats["mean"] + std
            if bounded:
                low, high = low.clip(0, 1), high.clip(0, 1)
            yerr = np.vstack([stats["mean"] - low, high - stats["mean"]])
            label = f"{', '.join(others)} = {line}" if others else None
            if categorical:
                width = 0.8 / len(lines)
                pos = np.arange(len(levels)) + (i - (len(lines) - 1) / 2) * width
                ax.bar(pos, stats["mean"], width=width, yerr=yerr, label=label, capsize=2)
            else:  # lines side by side (a small x offset) with their own marker, so none hides another
                same = _same_as_earlier(means)
                dx = (i - (len(lines) - 1) / 2) * 0.012 * span
                if same is not None:
                    hidden.append(f"{line} on {lines[same]}")
                ax.errorbar(np.asarray(stats.index, dtype=float) + dx, stats["mean"], yerr=yerr,
                            marker=markers[i % len(markers)], ms=5, capsize=3, label=label,
                            ls="--" if same is not None else "-")
        if categorical:
            ax.set_xticks(range(len(levels)), levels, rotation=30, ha="right", fontsize=8)
        if bounded:
            ax.set_ylim(-0.03, 1.03)
        ax.tick_params(labelsize=8)
        ax.set_xlabel(x, fontsize=9)
        _title(ax, metric + (f" (equal lines, dashed: {', '.join(others)} = {'; '.join(hidden)})" if hidden else ""))
    if others and len(lines) > 1:
        fig.legend(*axes[-1].get_legend_handles_labels(), loc="outside lower center", fontsize=8,
                   ncols=min(len(lines), 4))
    return fig


_UNIT_METRICS = ("distinct_1", "distinct_2", "repetition_rate", "thinking_loop", "finished", "finished_thinking")


def _same_as_earlier(series: list):
    """The index of an earlier series equal to the last one (their lines would coincide), or None."""
    from .viz import _same_as

    return _same_as(series).get(len(series) - 1)
