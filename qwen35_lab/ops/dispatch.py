"""Which implementation runs an op: the torch reference or the Triton kernel.

The environment variable ``QWEN35_LAB_OPS`` chooses, read at every call:

- ``auto`` (default): CUDA tensors go to the Triton kernels (``qwen35_lab._kernels``), everything
  else to the torch reference. A call the kernel does not cover (for example a ``chunk_size`` it
  was not written for) quietly takes the torch reference.
- ``torch``: always the torch reference.
- ``triton``: always the Triton kernel. CPU tensors then need Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported); that is how the kernels are tested
  without a GPU. A call the kernel does not cover raises ``ValueError``.

Triton is imported only when a kernel runs, so a machine without it imports ``qwen35_lab`` fine.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable

import torch
from ..checks import BadValue

__all__ = ["ENV", "MODES", "UnsupportedByKernel", "backend_for", "dispatched", "interpreting", "mode"]

ENV = "QWEN35_LAB_OPS"
MODES = ("auto", "torch", "triton")
_KERNELS_PACKAGE = "qwen35_lab._kernels"


class UnsupportedByKernel(ValueError):
    """Valid inputs that a Triton kernel was not written for (``auto`` then uses the torch reference)."""


def mode() -> str:
    """The current value of ``QWEN35_LAB_OPS``: ``"auto"``, ``"torch"`` or ``"triton"``."""
    raw = os.environ.get(ENV, "auto")
    value = raw.strip().lower() or "auto"
    if value not in MODES:
        raise BadValue(f"{ENV}={raw!r} is not a valid choice; use one of {', '.join(MODES)} (default auto)")
    return value


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` turns Triton's CPU interpreter on (read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def backend_for(device: torch.device) -> str:
    """``"torch"`` or ``"triton"``: what ``mode()`` picks for tensors on ``device``."""
    chosen = mode()
    if chosen == "auto":
        return "triton" if torch.device(device).type == "cuda" and _triton_installed() else "torch"
    return chosen


def _kernel(module: str, name: str, device: torch.device) -> Callable:
    """The Triton implementation ``qwen35_lab._kernels.<module>.<name>``, imported on first use."""
    if torch.device(device).type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{ENV}=triton got tensors on {device}; Triton runs non-CUDA tensors only in its interpreter: "
            f"set TRITON_INTERPRET=1 before triton is imported, or use {ENV}=auto (torch on CPU)"
        )
    if not _triton_installed():
        raise ImportError(f"{ENV}=triton needs the triton package (pip install triton); it is not installed")
    return getattr(importlib.import_module(f"{_KERNELS_PACKAGE}.{module}"), name)


def dispatched(reference: Callable, module: str) -> Callable:
    """The public op: ``reference`` (torch) or the kernel of the same name in ``kernels/<module>.py``.

    The device is that of the first tensor argument; a call without tensors goes to the torch
    reference, whose validation names the problem.
    """
    name = reference.__name__

    @functools.wraps(reference)
    def op(*args, **kwargs):
        first = next((x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), None)
        if first is None or backend_for(first.device) == "torch":
            return reference(*args, **kwargs)
        kernel = _kernel(module, name, first.device)
        if mode() == "triton":
            return kernel(*args, **kwargs)
        try:
            return kernel(*args, **kwargs)
        except UnsupportedByKernel:
            return reference(*args, **kwargs)

    op.__module__ = "qwen35_lab.ops"
    op.__doc__ = (reference.__doc__ or "").rstrip() + (
        f"\n\n    Runs the Triton kernel ``kernels/{module}.py`` on CUDA tensors and the torch reference "
        f"``{reference.__module__}.{name}`` otherwise; ``QWEN35_LAB_OPS=torch|triton|auto`` forces either.\n"
    )
    return op
