"""One checker per kind of argument, shared by every module.

Every public entry point validates its arguments here *before any work starts*. A refused call
raises one of the exception types below: each subclasses the built-in a caller would expect
(``ValueError``, ``TypeError``, ``IndexError``, ``FileNotFoundError``, ``TimeoutError``,
``MemoryError``) and
:class:`InputError`, so ``except InputError`` catches every refusal of the toolkit and nothing else.
Messages name the bad value and what would be valid.

This module imports nothing from the rest of the package: any module may import it.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch


class InputError(Exception):
    """Base of every refusal of a bad input by qwen35_lab."""


class BadValue(InputError, ValueError):
    """The value has the right type but is not one that works."""


class BadType(InputError, TypeError):
    """The value is of the wrong type."""


class BadIndex(InputError, IndexError):
    """An index (layer, head, position, batch row, expert) is out of range."""


class MissingFile(InputError, FileNotFoundError):
    """A file or directory that was named does not exist."""


class TimedOut(InputError, TimeoutError):
    """A request did not answer in time."""


class NotCaptured(InputError, KeyError, ValueError):
    """A trace was asked for a probe it did not capture (a ``KeyError`` for dict-style access, and a
    ``ValueError`` like every other refusal); the message says what to capture."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class OverBudget(InputError, MemoryError):
    """What was asked (a capture, a model, a grid of runs) would not fit the memory budget."""


def error_text(error: BaseException) -> str:
    """``"ValueError: message"`` for display: a refusal shows the built-in kind a reader knows."""
    kind = type(error)
    if isinstance(error, InputError):
        kind = next(b for b in kind.__mro__ if b.__module__ == "builtins" and b is not InputError)
    return f"{kind.__name__}: {error}"


# ----------------------------------------------------------------------------- scalars

def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound optional). Bools and floats are refused."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if not _is_int(value):
        raise BadType(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadValue(f"{name}={value} is out of range; valid: {_range_text(lo, hi)}")
    return value


def check_float(name: str, value, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval (bounds optional, closed unless ``*_open``)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise BadValue(f"{name} must be finite, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        left = "(" if lo_open or lo is None else "["
        right = ")" if hi_open or hi is None else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise BadValue(f"{name}={value:g} is out of range; valid: {left}{lo_s}, {hi_s}{right}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise BadType(f"{name} must be True or False, got {value!r}")
    return value


def check_str(name: str, value, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise BadType(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    if not empty and not value:
        raise BadValue(f"{name} must not be empty")
    return value


def check_choice(name: str, value, choices: Iterable):
    """``value`` if it is one of ``choices`` (compared with ==), else a message listing them."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:  # unhashable / incomparable
        ok = False
    if not ok:
        raise BadValue(f"unknown {name} {value!r}; valid: {', '.join(map(repr, choices))}")
    return value


def check_seed(value) -> int | None:
    """A sampling seed: None or a non-negative int below 2**63."""
    if value is None:
        return None
    return check_int("seed", value, lo=0, hi=2**63 - 1)


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"{lo}..{hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


# ----------------------------------------------------------------------------- indices

def check_index(name: str, value, size: int, *, what: str = "") -> int:
    """One index into ``size`` things; negative indices count from the end (Python's rule)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if not _is_int(value):
        raise BadType(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if not -size <= value < size:
        valid = f"0..{size - 1} (or -{size}..-1 from the end)" if size else "none: there are none"
        raise BadIndex(f"{name} {value} is out of range; valid: {valid}" + (f" ({what})" if what else ""))
    return value % size


def check_indices(name: str, value, size: int | None, *, what: str = "") -> list[int] | None:
    """A selection (``positions``, ``heads``, ``batch``, ``experts``) as a sorted list of distinct
    non-negative ints; ``None`` means all. Accepts an int, a list / tuple / range of ints, a 1-D
    integer tensor or array, or a slice. An empty selection is refused: it would select nothing."""
    if value is None:
        return None
    if isinstance(value, slice):
        if size is None:
            raise BadType(f"{name} as a slice needs a known size; give a list of ints")
        out = list(range(size))[value]
        if not out:
            raise BadValue(f"{name}={value} selects nothing of {size}{_of(what)}")
        return out
    if isinstance(value, (str, bytes, dict, set, float)) or isinstance(value, bool):
        raise BadType(f"{name} must be an int, a list of ints, a range or a slice; got {value!r}")
    if _is_int(value):
        value = [value]
    elif hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        if getattr(value, "ndim", 1) > 1:
            raise BadValue(f"{name} must be one-dimensional, got shape {tuple(value.shape)}")
        value = value.tolist()
        value = [value] if not isinstance(value, list) else value
    elif not isinstance(value, Iterable):
        raise BadType(f"{name} must be an int, a list of ints, a range or a slice; got {value!r}")
    out = []
    for v in value:
        if not _is_int(v):
            raise BadType(f"{name} must contain ints, got {v!r} ({type(v).__name__})")
        out.append(check_index(name[:-1] if name.endswith("s") else name, v, size, what=what)
                   if size is not None else int(v))
    if not out:
        raise BadValue(f"{name} is empty: it would select nothing; give at least one index or None for all")
    return sorted(set(out))


def _of(what: str) -> str:
    return f" ({what})" if what else ""


# ----------------------------------------------------------------------------- torch things

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(value, *, name: str = "dtype", allow_auto: bool = False,
                allowed: Sequence[torch.dtype] = FLOAT_DTYPES):
    """A floating dtype given as ``torch.float32`` or a string (``"bfloat16"``, ``"fp16"`` …);
    ``"auto"`` when ``allow_auto``."""
    if allow_auto and value == "auto":
        return "auto"
    valid = ", ".join(str(d).removeprefix("torch.") for d in allowed)
    if allow_auto:
        valid = "'auto', " + valid
    if isinstance(value, str):
        if value.removeprefix("torch.") not in _DTYPES:
            raise BadValue(f"unknown {name} {value!r}; valid: {valid} (as strings or torch dtypes)")
        value = _DTYPES[value.removeprefix("torch.")]
    if not isinstance(value, torch.dtype):
        raise BadType(f"{name} must be a torch.dtype or a string such as 'float32', got {value!r}")
    if value not in allowed:
        raise BadValue(f"{name} {value} is not supported here; valid: {valid}")
    return value


def check_device(value, *, name: str = "device", allow_auto: bool = False) -> str:
    """A device that exists on this machine, as a string (``'cpu'``, ``'cuda:0'`` …)."""
    valid = "'cpu', 'cuda', 'cuda:N' or 'mps'"
    if allow_auto:
        valid = "'auto', " + valid
    if isinstance(value, torch.device):
        value = str(value)
    if not isinstance(value, str):
        raise BadType(f"{name} must be a string such as {valid}, got {value!r}")
    if allow_auto and value == "auto":
        return "auto"
    try:
        d = torch.device(value)
    except RuntimeError:
        raise BadValue(f"unknown {name} {value!r}; valid: {valid}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise BadValue(f"{name} {value!r} is not available: no CUDA GPU is visible here; use 'cpu'"
                           + (" or 'auto'" if allow_auto else ""))
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise BadValue(f"{name} {value!r} is not available: {torch.cuda.device_count()} GPU(s) visible")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadValue(f"{name} {value!r} is not available here; use 'cpu'")
    elif d.type != "cpu":
        raise BadValue(f"unsupported {name} {value!r}; valid: {valid}")
    return str(d)


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Refuse NaN / inf in a user-given tensor (an edit, a key, a value …)."""
    if not isinstance(tensor, torch.Tensor):
        raise BadType(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise BadValue(f"{name} holds {bad} non-finite value(s) (NaN or inf); give finite numbers")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None], *, meaning: str = "") -> None:
    """``tensor.shape`` equals ``expected`` (None entries match any size)."""
    got = tuple(tensor.shape)
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise BadValue(f"{name} has shape {list(got)}; expected {shown}" + (f" ({meaning})" if meaning else ""))


# ----------------------------------------------------------------------------- files

def check_path(name: str, value) -> Path:
    if isinstance(value, (str, os.PathLike)) and str(value):
        return Path(value).expanduser()
    raise BadType(f"{name} must be a path (str or os.PathLike), got {value!r}")


def check_existing_file(name: str, value) -> Path:
    path = check_path(name, value)
    if not path.exists():
        raise MissingFile(f"{name} {str(path)!r} does not exist")
    if path.is_dir():
        raise BadValue(f"{name} {str(path)!r} is a directory; expected a file")
    return path


def check_writable_target(name: str, value, *, directory: bool = False) -> Path:
    """A path to be written (a file, or with ``directory=True`` a folder that is replaced whole): its
    nearest existing ancestor must be a writable directory, and the path itself must not be the other
    kind of thing. Checked before any work, so nothing is lost to a late failure."""
    path = check_path(name, value)
    if path.is_dir() and not directory:
        raise BadValue(f"{name} {str(path)!r} is a directory; give a file path inside it")
    if path.exists() and not path.is_dir() and directory:
        raise BadValue(f"{name} {str(path)!r} is a file; this writes a directory there, give another path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BadValue(f"cannot write {name} {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadValue(f"cannot write {name} {str(path)!r}: {str(parent)!r} is not writable")
    return path
