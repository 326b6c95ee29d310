"""Instrumentation: named probes, traces, interventions and the memory guard.

See :mod:`qwen35_lab.instrument.probes` for the table of probe names.
"""

from __future__ import annotations

import math

import torch

from .edits import Edit, as_edit, patch, replace, scale, zero
from .memory import (MemoryEdit, MemoryVector, StateContributions, erase_memory, key_from, key_of, value_from,
                     write_memory)
from .modules import instrument, is_instrumented, uninstrument
from .moe import RoutingEdit, check_moe_edit, force_experts, remove_experts
from .probes import READ_ONLY, parse, probe_names, select
from .session import Session
from .trace import Trace
from ..checks import BadValue

__all__ = [
    "Edit", "Session", "Trace", "estimate_capture_bytes", "instrument", "is_instrumented", "patch",
    "plan", "probe_names", "replace", "scale", "uninstrument", "zero",
    "MemoryEdit", "MemoryVector", "StateContributions", "erase_memory", "key_from", "key_of", "value_from",
    "write_memory", "RoutingEdit", "force_experts", "remove_experts",
]


def plan(config, capture, edits) -> tuple[list[str], dict[str, Edit]]:
    """Resolve capture patterns and edits to probe names, with clear errors for bad ones."""
    valid = probe_names(config)
    text = config.get_text_config()
    names = select(capture, valid, list(text.layer_types)) if capture is not None else []
    resolved: dict[str, Edit] = {}
    for key, spec in (edits or {}).items():
        if isinstance(spec, MemoryEdit):
            _check_memory_target(key, text)
        targets = select(key, valid, list(text.layer_types))
        for name in targets:
            kind = parse(name)[1]
            if kind in READ_ONLY:
                raise BadValue(f"{name!r} is read-only: "
                                 + ("edit 'attn.probs' instead of the summary" if kind == "attn.summary"
                                    else "edit the inputs of the conv instead"))
            resolved[name] = as_edit(name, spec)
            if kind.startswith("moe.") or isinstance(spec, RoutingEdit):
                check_moe_edit(name, kind, resolved[name], text)  # expert indices, top-k, shapes: before running
            if isinstance(spec, MemoryEdit):
                spec.validate(name, text)  # key / value sizes, heads, the layer's type: before running
    return names, resolved


def _check_memory_target(key, text) -> None:
    """A memory write / erase names a DeltaNet state; a gated-attention layer has none."""
    from ..checks import BadValue

    if not isinstance(key, str) or any(c in key for c in "*?["):
        return  # globs and lists: each selected name is checked by MemoryEdit.validate
    layer, kind = parse(key)
    types = list(text.layer_types)
    if layer is not None and key.startswith("layers.") and layer < len(types) and types[layer] != "linear_attention":
        raise BadValue(f"layer {layer} is a {types[layer]} (gated attention) layer: it has no recurrent state to write "
                       f"or erase; DeltaNet layers: {[i for i, t in enumerate(types) if t == 'linear_attention']}")
    if kind != "deltanet.state":
        raise BadValue(f"memory writes and erasures edit a DeltaNet state: key them by 'layers.i.deltanet.state', "
                       f"not {key!r}")


def head_counts(config) -> dict[str, int]:
    t = config.get_text_config()
    return {"deltanet.q": t.linear_num_key_heads, "deltanet.k": t.linear_num_key_heads,
            **{f"deltanet.{p}": t.linear_num_value_heads for p in ("v", "beta", "g", "z", "o", "state")},
            "attn.q": t.num_attention_heads, "attn.gate": t.num_attention_heads,
            "attn.probs": t.num_attention_heads, "attn.summary": t.num_attention_heads,
            "attn.k": t.num_key_value_heads, "attn.v": t.num_key_value_heads}


def estimate_capture_bytes(config, names: list[str], *, batch: int, length: int, n_positions: int | None = None,
                           n_heads: int | None = None, dtype_bytes: int = 4, chunk_size: int = 64) -> dict[str, int]:
    """Bytes each captured probe will take (the memory guard's estimate)."""
    t = config.get_text_config()
    T = length
    P = n_positions if n_positions is not None else T
    D, V = t.hidden_size, t.vocab_size
    H, HV, K, VV = t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_value_head_dim
    Hq, Hkv, Dh = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    def h(n):
        return min(n, n_heads) if n_heads is not None else n
    per = {
        "resid_pre": P * D, "resid_mid": P * D, "mlp_out": P * D, "resid_post": P * D, "embed": P * D,
        "logits": P * V,
        "deltanet.q": P * h(H) * K, "deltanet.k": P * h(H) * K, "deltanet.v": P * h(HV) * VV,
        "deltanet.beta": P * h(HV), "deltanet.g": P * h(HV), "deltanet.z": P * h(HV) * VV,
        "deltanet.o": P * h(HV) * VV, "deltanet.out": P * D,
        "deltanet.conv_state": (2 * H * K + HV * VV) * t.linear_conv_kernel_dim,
        # checkpoints every chunk + final state, and the replay inputs (fp32) per position
        "deltanet.state": (math.ceil(T / chunk_size) + 1) * h(HV) * K * VV + T * h(HV) * (2 * K + VV + 2),
        "attn.q": P * h(Hq) * Dh, "attn.k": P * h(Hkv) * Dh, "attn.v": P * h(Hkv) * Dh,
        "attn.gate": P * h(Hq) * Dh, "attn.probs": P * h(Hq) * T, "attn.summary": 4 * P * h(Hq),
        "attn.out": P * D,
    }
    if getattr(t, "num_experts", 0) and hasattr(t, "num_experts_per_tok"):  # MoE: ids are int64 (2 values)
        E, k = t.num_experts, t.num_experts_per_tok
        per.update({"moe.router_logits": P * E, "moe.topk_ids": P * k * 8 // dtype_bytes,
                    "moe.topk_weights": P * k, "moe.shared_gate": P, "moe.shared_out": P * D,
                    "moe.routed_out": P * D, "moe.expert_out": P * k * D})
    out = {}
    for name in names:
        kind = parse(name)[1]
        if kind in per:
            item = 4 if kind == "deltanet.state" else dtype_bytes
            out[name] = batch * per[kind] * item
        else:  # vision outputs: small next to the language model's
            out[name] = 0
    return out


def default_budget_bytes(device) -> int:
    """Half the free memory where captures go (RAM, or the GPU's free memory)."""
    import psutil

    d = torch.device(device) if device is not None else torch.device("cpu")
    if d.type == "cuda":
        return int(0.5 * torch.cuda.mem_get_info(d)[0])
    return int(0.5 * psutil.virtual_memory().available)
