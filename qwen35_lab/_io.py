"""Atomic writes: nothing the toolkit saves is ever half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .checks import check_writable_target


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On an exception the temporary directory is removed and ``target`` is left
    as it was.
    """
    target = check_writable_target("path", target, directory=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb"):
    """Open a temporary file beside ``target``; on success it replaces ``target``."""
    target = check_writable_target("path", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.chmod(tmp, _plain_file_mode())  # mkstemp's 0600 would make the saved file private
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _plain_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fmt_bytes(n: float) -> str:
    """``1234567`` → ``"1.2 MB"`` (decimal units, as memory is quoted on model cards)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
