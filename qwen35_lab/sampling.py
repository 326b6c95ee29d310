"""Sampling: the keyword arguments ``Lab.generate`` passes to HF ``generate``.

This first version passes HF's own sampling arguments through; presets, vLLM-exact penalties and
sweeps are added by the sampling work.
"""

from __future__ import annotations

__all__ = ["generation_kwargs"]

_HF_KEYS = {"temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "min_p", "num_beams"}


def _eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def generation_kwargs(lab, sampling: dict, *, prompt_ids=None) -> dict:
    """HF ``generate`` kwargs for the user's sampling arguments (validated)."""
    unknown = set(sampling) - _HF_KEYS
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {', '.join(sorted(unknown))}; "
                        f"valid: {', '.join(sorted(_HF_KEYS))}")
    kw = dict(sampling)
    if kw.get("temperature") == 0:
        kw.pop("temperature")
        kw["do_sample"] = False
    if lab.model.generation_config.pad_token_id is None and _eos_ids(lab.model):
        kw["pad_token_id"] = _eos_ids(lab.model)[0]
    return kw
