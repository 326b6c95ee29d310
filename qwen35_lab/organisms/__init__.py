"""Organisms: small Qwen3.5-architecture models shipped in ``data/organisms/``.

``tiny`` is random-weight plumbing with the real vocabulary; the trained
organisms show real mechanisms: ``recall`` (multi-query associative recall,
one [3 × Gated DeltaNet, 1 × gated attention] group), ``recall-linear`` (the
same task, DeltaNet layers only) and ``passkey`` (one key word far back in
filler, small RoPE base); ``chat`` speaks the real chat format with the real
vocabulary — thinks when asked, calls tools, answers about images and video
(:mod:`qwen35_lab.organisms.chat`). Build or train them with
``python -m qwen35_lab.organisms build tiny`` /
``python -m qwen35_lab.organisms train recall``, and measure them with
:func:`evaluate`. The trainer is :func:`qwen35_lab.organisms.train.train`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .tasks import evaluate as _evaluate_task

__all__ = ["BUILDERS", "TRAINABLE", "organisms_dir", "available", "build", "evaluate"]

BUILDERS = {"tiny": "qwen35_lab.organisms.tiny:build_tiny",
            "tiny-moe": "qwen35_lab.organisms.tiny_moe:build_tiny_moe"}  # a random-weight qwen3_5_moe
TRAINABLE = ("recall", "recall-linear", "passkey", "needles")


def evaluate(lab, task: str, **kwargs) -> dict:
    """Measure an organism on fresh data.

    ``task="chat"``: :func:`qwen35_lab.organisms.chat_eval.evaluate` (``n``, ``seed``, ``parts``:
    replies generated to fresh conversations); on ``moe-mix``: :func:`qwen35_lab.organisms.moe_mix.evaluate`
    (``task`` one of its two tasks); any other task: :func:`qwen35_lab.organisms.tasks.evaluate`
    (``length``, ``n``, ``seed``: teacher-forced answer accuracy).
    """
    if task == "chat":
        from .chat_eval import evaluate as evaluate_chat

        return evaluate_chat(lab, **kwargs)
    if (getattr(lab, "meta", None) or {}).get("organism") == "moe-mix":
        from .moe_mix import evaluate as evaluate_moe_mix  # its prompts carry a task token

        return evaluate_moe_mix(lab, task, **kwargs)
    return _evaluate_task(lab, task, **kwargs)


def organisms_dir() -> Path:
    """Where organisms live: ``$QWEN35_LAB_ORGANISMS`` or the repository's ``data/organisms``."""
    env = os.environ.get("QWEN35_LAB_ORGANISMS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "data" / "organisms"


def available() -> list[str]:
    """Names of the organisms present on disk."""
    root = organisms_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())


def build(name: str, out_dir: str | Path | None = None) -> Path:
    """Build organism ``name`` into ``out_dir`` (default: its place under ``data/organisms``)."""
    import importlib

    if name not in BUILDERS:
        raise ValueError(f"unknown organism {name!r}; buildable organisms: {', '.join(BUILDERS)}")
    module, func = BUILDERS[name].split(":")
    out = Path(out_dir) if out_dir is not None else organisms_dir() / name
    return getattr(importlib.import_module(module), func)(out)

