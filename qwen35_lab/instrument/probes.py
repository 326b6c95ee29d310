"""Probe names: one scheme for capture, edits, plots and saved traces.

Every observable value of the model has a name. Per decoder layer ``i``:

=================================  ==================  ================================================================
name                               shape               meaning
=================================  ==================  ================================================================
``layers.i.resid_pre``             ``[B, T, D]``       input of layer ``i`` (the residual stream before it)
``layers.i.resid_mid``             ``[B, T, D]``       residual stream after the token mixer, before the FFN
``layers.i.mlp_out``               ``[B, T, D]``       the FFN's output (added to ``resid_mid``)
``layers.i.resid_post``            ``[B, T, D]``       output of layer ``i``
``layers.i.deltanet.q``            ``[B, T, H, K]``    query entering the recurrence: after the causal conv, SiLU and the
                                                       L2 norm (fp32; the 1/sqrt(K) scale is not applied)
``layers.i.deltanet.k``            ``[B, T, H, K]``    key entering the recurrence: after conv, SiLU and L2 norm (fp32)
``layers.i.deltanet.v``            ``[B, T, HV, V]``   value entering the recurrence: after conv and SiLU
``layers.i.deltanet.beta``         ``[B, T, HV]``      write strength ``sigmoid(in_proj_b x)``
``layers.i.deltanet.g``            ``[B, T, HV]``      log decay ``-exp(A_log) * softplus(in_proj_a x + dt_bias)`` (≤ 0)
``layers.i.deltanet.z``            ``[B, T, HV, V]``   output-gate pre-activation ``in_proj_z x`` (the gate is silu(z))
``layers.i.deltanet.o``            ``[B, T, HV, V]``   core recurrent output ``o_t = S_tᵀ q_t / sqrt(K)``, before the
                                                       gated RMSNorm
``layers.i.deltanet.state``        ``[B, HV, K, V]``   ``S_t``, the state after token ``t`` was written. Stored as
                                                       chunk-boundary checkpoints; ``Trace.state(i, t)`` replays at
                                                       most one chunk to serve any ``t``
``layers.i.deltanet.conv_state``   ``[B, C, W]``       the causal conv's input window after the last token (W = kernel)
``layers.i.deltanet.out``          ``[B, T, D]``       the layer's token-mixer output (after ``out_proj``)
``layers.i.attn.q``                ``[B, Hq, T, Dh]``  queries after q_norm and (partial, M-)RoPE
``layers.i.attn.k``                ``[B, Hkv, T, Dh]`` keys after k_norm and RoPE (this step's keys only)
``layers.i.attn.v``                ``[B, Hkv, T, Dh]`` values
``layers.i.attn.gate``             ``[B, T, Hq, Dh]``  the output gate ``sigmoid(gate)`` multiplying the attention output
``layers.i.attn.probs``            ``[B, Hq, T, Tk]``  attention probabilities (rows for the captured positions)
``layers.i.attn.summary``          ``dict of [B,Hq,T]`` per head and query: ``entropy`` (nats), ``max_prob``, ``sink_mass``
                                                       (on token 0) and ``mean_distance`` (tokens), computed blockwise
``layers.i.attn.out``              ``[B, T, D]``       the layer's token-mixer output (after ``o_proj``)
``layers.i.moe.router_logits``     ``[B, T, E]``       MoE models: the router's logits ``x Wgᵀ`` before the softmax (an
                                                       edit re-routes: softmax, top-k, renormalisation recomputed)
``layers.i.moe.topk_ids``          ``[B, T, k]``       the k experts each token is sent to (int64, by weight)
``layers.i.moe.topk_weights``      ``[B, T, k]``       their weights: top-k of the fp32 softmax, renormalised to sum 1
``layers.i.moe.shared_gate``       ``[B, T, 1]``       the shared expert's gate ``sigmoid(shared_expert_gate x)``
``layers.i.moe.shared_out``        ``[B, T, D]``       the gated shared expert's output
``layers.i.moe.routed_out``        ``[B, T, D]``       the weighted sum of the routed experts' outputs
``layers.i.moe.expert_out``        ``[B, T, k, D]``    on request: each chosen expert's own output (unweighted), in
                                                       ``topk_ids`` order (read-only)
``embed``                          ``[B, T, D]``       token embeddings (before vision features are scattered in)
``logits``                         ``[B, T, vocab]``   output logits
``visual.blocks.j.out``            ``[N, Dv]``         output of vision block ``j`` (all patches of all images/videos)
``visual.merger.out``              ``[M, D]``          merged vision tokens as they enter the language model
=================================  ==================  ================================================================

``D`` hidden size, ``H``/``HV`` DeltaNet key/value heads, ``K``/``V`` their
dims, ``Hq``/``Hkv`` attention query/KV heads, ``Tk`` keys seen (cache
included), ``E`` routed experts, ``k`` experts per token (MoE models:
``mlp_out = routed_out + shared_out``). Patterns select probes: a glob (``"layers.*.deltanet.beta"``), a
list of names or globs, or a callable ``name -> bool``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from ..checks import BadType, BadValue, check_indices

__all__ = ["DELTANET_PROBES", "ATTN_PROBES", "LAYER_PROBES", "MOE_PROBES", "LAYOUTS", "probe_names", "select", "parse"]

DELTANET_PROBES = ("q", "k", "v", "beta", "g", "z", "o", "state", "conv_state", "out")
ATTN_PROBES = ("q", "k", "v", "gate", "probs", "summary", "out")
LAYER_PROBES = ("resid_pre", "resid_mid", "mlp_out", "resid_post")
MOE_PROBES = ("router_logits", "topk_ids", "topk_weights", "shared_gate", "shared_out", "routed_out", "expert_out")
READ_ONLY = {"deltanet.conv_state", "attn.summary", "moe.expert_out"}

# Axis layout of each probe: B batch, T position, H head; trailing axes are free.
LAYOUTS = {
    **{p: "BT" for p in LAYER_PROBES},
    "deltanet.q": "BTH", "deltanet.k": "BTH", "deltanet.v": "BTH", "deltanet.beta": "BTH",
    "deltanet.g": "BTH", "deltanet.z": "BTH", "deltanet.o": "BTH", "deltanet.out": "BT",
    "deltanet.state": "BH", "deltanet.conv_state": "B",
    "attn.q": "BHT", "attn.k": "BHT", "attn.v": "BHT", "attn.gate": "BTH", "attn.probs": "BHT",
    "attn.summary": "BHT", "attn.out": "BT",
    **{f"moe.{p}": "BT" for p in MOE_PROBES},
    "embed": "BT", "logits": "BT",
    "visual.out": "", "visual.merger": "",
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_VISUAL_RE = re.compile(r"^visual\.blocks\.(\d+)\.out$")


def probe_names(config, *, include_visual: bool = True) -> list[str]:
    """Every probe name of a model, in layer order (``config`` is the full or text config)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    moe = getattr(text, "num_experts", 0) > 0 and hasattr(text, "num_experts_per_tok")  # qwen3_5_moe: every layer
    names = ["embed"]
    for i, kind in enumerate(text.layer_types):
        names += [f"layers.{i}.resid_pre"]
        if kind == "linear_attention":
            names += [f"layers.{i}.deltanet.{p}" for p in DELTANET_PROBES]
        else:
            names += [f"layers.{i}.attn.{p}" for p in ATTN_PROBES]
        names.append(f"layers.{i}.resid_mid")
        if moe:
            names += [f"layers.{i}.moe.{p}" for p in MOE_PROBES]
        names += [f"layers.{i}.{p}" for p in ("mlp_out", "resid_post")]
    names.append("logits")
    vision = getattr(config, "vision_config", None)
    if include_visual and vision is not None:
        names += [f"visual.blocks.{j}.out" for j in range(vision.depth)] + ["visual.merger.out"]
    return names


def parse(name: str) -> tuple[int | None, str]:
    """``"layers.3.deltanet.beta"`` → ``(3, "deltanet.beta")``; ``"logits"`` → ``(None, "logits")``."""
    m = _LAYER_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    if _VISUAL_RE.match(name):
        return int(_VISUAL_RE.match(name).group(1)), "visual.out"
    if name == "visual.merger.out":
        return None, "visual.merger"
    return None, name


def layout(name: str) -> str:
    return LAYOUTS[parse(name)[1]]


def _explain_unknown(name: str, valid: list[str], layer_types: list[str]) -> str:
    layer, kind = parse(name)
    if layer is not None and name.startswith("layers."):
        if layer >= len(layer_types):
            return (f"unknown probe {name!r}: the model has {len(layer_types)} layers (0–{len(layer_types) - 1})")
        lt = layer_types[layer]
        if kind.startswith("moe.") and not any(".moe." in n for n in valid):
            return (f"unknown probe {name!r}: this is a dense model, it has no routed (MoE) layers; router probes "
                    f"exist in the qwen3_5_moe models (Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B, Qwen3.6-35B-A3B)")
        family = "deltanet" if lt == "linear_attention" else "attn"
        own = [n for n in valid if n.startswith(f"layers.{layer}.")]
        wrong_family = kind.split(".")[0] in ("deltanet", "attn") and not kind.startswith(family)
        why = f" layer {layer} is a {lt} layer" + (f", it has no {kind.split('.')[0]} probes" if wrong_family else "")
        return f"unknown probe {name!r};{why}. Its probes are: {', '.join(own)}"
    import difflib

    close = difflib.get_close_matches(name, valid, n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"unknown probe {name!r}.{hint} List them with lab.probe_names()."


def select(pattern, valid: list[str], layer_types: list[str]) -> list[str]:
    """The probe names a pattern selects, in model order; raise for names that match nothing.

    ``pattern``: a name, a glob (``*`` any run of characters, ``?`` one), a list
    of those, or a callable ``name -> bool``.
    """
    if pattern is None:
        return []
    if callable(pattern):
        chosen = {n for n in valid if pattern(n)}
        if not chosen:
            raise BadValue(f"the capture filter {getattr(pattern, '__name__', pattern)!r} selects no probe of this "
                           "model; list them with lab.probe_names()")
    else:
        if not isinstance(pattern, (str, list, tuple, set, frozenset)):
            raise BadType(f"a probe selection is a name or glob, a list of them, or a callable name -> bool; "
                          f"got {pattern!r} ({type(pattern).__name__})")
        items = [pattern] if isinstance(pattern, str) else list(pattern)
        if not items:
            raise BadValue("the probe selection is an empty list: it selects nothing; give names or globs "
                           "(lab.probe_names() lists them), or None to capture nothing")
        chosen = set()
        for item in items:
            if not isinstance(item, str):
                raise BadType(f"probe patterns are strings, lists of strings or callables; got {item!r}")
            if any(c in item for c in "*?["):
                hits = fnmatch.filter(valid, item)
                if not hits and ".moe." in item and not any(".moe." in n for n in valid):
                    raise BadValue(f"probe pattern {item!r} matches no probe: this is a dense model, it has no "
                                   "routed (MoE) layers")
                if not hits:
                    raise BadValue(f"probe pattern {item!r} matches no probe; list them with lab.probe_names()")
                chosen.update(hits)
            elif item in valid:
                chosen.add(item)
            else:
                raise BadValue(_explain_unknown(item, valid, layer_types))
    return [n for n in valid if n in chosen]


def as_index_list(value, size: int, what: str) -> list[int] | None:
    """Normalise ``positions`` / ``heads`` / ``batch`` selections to a sorted list of ints (None = all);
    an empty selection is refused (it would select nothing)."""
    return check_indices(what, value, size)


Pattern = str | list[str] | Callable[[str], bool]
