"""Checks of checkpoint files that read headers only: never a weight.

A low layer: it imports nothing of the package but :mod:`qwen35_lab.checks`, so both the loader
and saved traces use it without importing each other.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .checks import BadValue, MissingFile

__all__ = ["check_safetensors", "read_config", "safetensors_header"]

_MAX_HEADER = 100_000_000


def safetensors_header(file: Path) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, checked for
    truncation and corruption (``BadValue`` naming the file), without reading any tensor."""
    file = Path(file)
    if not file.is_file():
        raise MissingFile(f"no safetensors file {str(file)!r}")
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadValue(f"corrupt safetensors file {str(file)!r}: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER:
            raise BadValue(f"corrupt safetensors file {str(file)!r}: header of {n} bytes in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadValue(f"corrupt safetensors file {str(file)!r}: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadValue(f"corrupt safetensors file {str(file)!r}: its header is a JSON {type(header).__name__}, "
                       "not an object of tensors")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 8 + n
    for name, t in tensors.items():
        ok = (isinstance(t, dict) and isinstance(t.get("shape"), list) and isinstance(t.get("dtype"), str)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t["shape"])
              and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2
              and all(isinstance(o, int) and o >= 0 for o in t["data_offsets"])
              and t["data_offsets"][0] <= t["data_offsets"][1])
        if not ok:
            raise BadValue(f"corrupt safetensors file {str(file)!r}: the header entry of {name!r} is {t!r}; "
                           "expected {'dtype': str, 'shape': [ints], 'data_offsets': [start, end]}")
        end = max(end, 8 + n + t["data_offsets"][1])
    if end != size:
        raise BadValue(f"corrupt or truncated safetensors file {str(file)!r}: the header describes {end} bytes, "
                       f"the file has {size}; download it again")
    return tensors


def check_safetensors(file: Path) -> int:
    """Check a safetensors file's header and size; return its number of parameters. A file that
    holds no tensor at all is refused: loading it would leave every weight randomly initialised."""
    tensors = safetensors_header(file)
    if not tensors:
        raise BadValue(f"safetensors file {str(file)!r} holds no tensors; it is not a checkpoint's weights")
    count = 0
    for t in tensors.values():
        numel = 1
        for d in t["shape"]:
            numel *= d
        count += numel
    return count


def read_config(path: Path) -> dict:
    """A checkpoint's ``config.json`` as a dict (``BadValue`` if it is not JSON or not an object)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{str(path)!r} has no config.json; a checkpoint directory holds config.json and "
                          "model*.safetensors (as written by save_pretrained or `hf download`)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadValue(f"{str(config_file)!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise BadValue(f"{str(config_file)!r} holds a JSON {type(config).__name__}; a config.json is an object "
                       "such as {\"model_type\": \"qwen3_5\", ...}")
    return config
