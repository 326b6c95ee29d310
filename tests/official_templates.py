"""Where the official Qwen3.5 / 3.6 chat templates are found: the tests' external oracle.

Qwen's own templates are not copied into the project. They are looked for where a user has them,
in this order:

1. the folder named by QWEN35_LAB_REFERENCE (``<folder>/chat_templates/<variant>.jinja`` or
   ``<folder>/<variant>.jinja``; CI points it at the team's reference folder),
2. the Hugging Face cache of any Qwen3.5 / 3.6 checkpoint already downloaded
   (``chat_template.jinja``, or the ``chat_template`` of ``tokenizer_config.json``),
3. the hub, when online (unless HF_HUB_OFFLINE=1).

When none is found, the byte-identity tests are skipped with OFFICIAL_TEMPLATES_MISSING.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


TEMPLATE_VARIANTS = ("qwen3.5", "qwen3.5-small", "qwen3.6")
# a checkpoint of each variant, for the cache and the hub
VARIANT_CHECKPOINTS = {"qwen3.5": ("Qwen/Qwen3.5-9B", "Qwen/Qwen3.5-4B", "Qwen/Qwen3.5-27B"),
                       "qwen3.5-small": ("Qwen/Qwen3.5-0.8B", "Qwen/Qwen3.5-2B"),
                       "qwen3.6": ("Qwen/Qwen3.6-27B", "Qwen/Qwen3.6-35B-A3B")}
OFFICIAL_TEMPLATES_MISSING = (
    "the official Qwen3.5/3.6 chat templates were not found: set QWEN35_LAB_REFERENCE to a folder holding "
    "chat_templates/{qwen3.5,qwen3.5-small,qwen3.6}.jinja, or download the tokenizer files of Qwen/Qwen3.5-9B, "
    "Qwen/Qwen3.5-0.8B and Qwen/Qwen3.6-27B into the Hugging Face cache (`hf download Qwen/Qwen3.5-9B "
    "tokenizer_config.json chat_template.jinja`, likewise for the other two)")


def _template_from_checkpoint_dir(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def _hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [home / "hub"]


def find_official_template(variant: str) -> tuple[str, str] | None:
    """(template text, where it was found) for one variant, or None."""
    folder = os.environ.get("QWEN35_LAB_REFERENCE")
    if folder:
        for path in (Path(folder) / "chat_templates" / f"{variant}.jinja", Path(folder) / f"{variant}.jinja"):
            if path.is_file():
                return path.read_text(encoding="utf-8"), str(path)
    for repo in VARIANT_CHECKPOINTS[variant]:
        for cache in _hf_cache_dirs():
            snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
            for snapshot in sorted(snapshots.glob("*")) if snapshots.is_dir() else []:
                if (text := _template_from_checkpoint_dir(snapshot)) is not None:
                    return text, str(snapshot)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes") and not _HUB_UNREACHABLE:
        import httpx

        repo = VARIANT_CHECKPOINTS[variant][0]
        try:
            reply = httpx.get(f"https://huggingface.co/{repo}/resolve/main/chat_template.jinja", timeout=5,
                              follow_redirects=True)
        except httpx.HTTPError:
            _HUB_UNREACHABLE.append(repo)  # offline: ask once, not once per variant
            return None
        if reply.status_code == 200:
            return reply.text, f"hub:{repo}"
    return None


_HUB_UNREACHABLE: list[str] = []


