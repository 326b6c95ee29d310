"""Memory planner: what a context length costs a Qwen3.5, next to an all-attention transformer.

Only the gated-attention layers (1 in 4) keep a KV cache that grows with the
context; the Gated DeltaNet layers keep a fixed-size state. For a context of
``T`` tokens, batch ``B`` and ``b`` bytes per value of the model dtype:

============================  ==================================================================
weights                       parameter count × b (the vision tower listed apart)
KV cache                      L_full × 2 (K, V) × Hkv × head_dim × T × b × B
DeltaNet state                L_linear × HV × K × V × 4 × B (fp32, as transformers keeps it)
conv state                    L_linear × (2·H·K + HV·V) × kernel × b × B
prefill activations           the largest per-layer working set on one chunk of ``c`` tokens
============================  ==================================================================

Prefill activations (c tokens per forward, ``prefill_chunk``; the whole
context when None), counted from the tensors transformers' forward keeps alive
at each layer's peak, per token and batch item:

* every layer: ``3 · D · b`` (the embeddings, the residual and the normed input);
* Gated DeltaNet: the conv output and the z gate in the model dtype
  ``(2·H·K + HV·V + HV·V) · b``, plus the fp32 working set of
  ``torch_chunk_gated_delta_rule`` — five key-sized tensors (q, k, k·β, decayed
  k·β, k_cumdecay) ``5 · HV · K``, four value-sized ones (v, v·β, the new
  values, the output) ``4 · HV · V`` and three ``64 × 64`` chunk matrices
  ``3 · HV · 64`` — all × 4 bytes, and the output cast back ``HV · V · b``;
* gated attention, when the attention kernel runs: the output gate, the
  normed and rotated q, the output and its reshaped copy ``4 · Hq · head_dim · b``
  (this chunk's k and v are in the cache by then). ``sdpa`` never forms the
  ``c × T`` scores; without a mask (one forward over the whole unpadded input)
  it runs grouped-query attention directly, but with a mask (chunked prefill)
  transformers first repeats K and V to every query head,
  ``2 · Hq · head_dim · T · b`` over the whole cached length ``T``, and sdpa
  converts the mask to the model dtype, ``c · T · b`` (per chunk, not per
  token). ``eager`` always repeats K and V and also forms
  ``Hq · c · T · (2b + 4)`` bytes of scores and fp32 softmax.
  ``qwen35_lab_chunked`` (:func:`~qwen35_lab.longctx.attention.chunk_attention`,
  what :func:`~qwen35_lab.longctx.chunked_prefill` runs) forms neither the mask
  nor the repeated K/V: it holds the two partial outputs, their fp32 merge and
  the folded queries, ``Hq · head_dim · c · (3b + 12)``; while the cache grows
  by one chunk, the layer's previous K and V, ``2 · Hkv · head_dim · (T - c) · b``,
  are alive beside the new ones (``torch.cat``);
* FFN: ``(3 · I + D) · b`` (the activated gate, the up projection, their
  product and the output); for a MoE model ``I`` is the shared expert's width
  plus k expert widths, and the router's fp32 logits add ``4 · E``;
* logits: ``vocab · b`` for the last position only (``logits="last"``, what a
  prefill needs), or for every position of the chunk (``logits="all"``);
* chunked: the boolean causal mask ``c · T`` is built once per chunk and alive
  through every layer.

The peak of a prefill is the cache (KV at the full context, DeltaNet and conv
states) plus the largest of these working sets. The all-attention comparison
puts a full-attention layer (same heads and head_dim) in every layer and
compares what is held after prefill (weights + cache + state).
``benchmarks/memory_planner_check.py`` measures real runs against it.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import torch

from .._io import fmt_bytes
from .. import configs

__all__ = ["MemoryPlan", "plan_memory", "check_fits", "memory_table", "format_memory_table", "plot_memory"]

DELTA_RULE_CHUNK = 64  # transformers' torch_chunk_gated_delta_rule chunk size
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}
CHUNKED = "qwen35_lab_chunked"  # longctx.attention.chunk_attention, what chunked_prefill runs
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", CHUNKED)
COMPONENTS = ("weights", "vision_weights", "kv_cache", "deltanet_state", "conv_state", "activations")


class MemoryPlan(dict):
    """Bytes by component (a dict), with a readable table as repr; ``.total``, ``.runtime`` etc. as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        chunk = "whole context" if self["prefill_chunk"] is None else f"chunks of {self['prefill_chunk']:,}"
        lines = [f"Memory plan: {self['model']}, {self['context']:,} tokens, batch {self['batch']}, "
                 f"{self['dtype']}, prefill in {chunk} ({self['attn_implementation']})"]
        rows = [("weights (language model)", self["weights"]), ("weights (vision tower)", self["vision_weights"]),
                ("KV cache", self["kv_cache"]), ("DeltaNet state (fp32)", self["deltanet_state"]),
                ("conv state", self["conv_state"]),
                (f"prefill activations ({self['peak_layer']})", self["activations"]),
                ("total", self["total"])]
        for name, n in rows:
            lines.append(f"  {name:<40} {fmt_bytes(n):>10}")
        lines.append(f"  {'held after prefill (weights + cache)':<40} {fmt_bytes(self['decode_total']):>10}")
        lines.append(f"  {'same, all-attention transformer':<40} {fmt_bytes(self['all_attention_decode_total']):>10}"
                     f"   (KV cache {fmt_bytes(self['all_attention_kv_cache'])})")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {k: (v if not isinstance(v, dict) else dict(v)) for k, v in self.items()}


# ----------------------------------------------------------------- sources
def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; valid: {', '.join(_DTYPES)} or a torch.dtype of those")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(map(repr, _DTYPES))} or a torch.dtype")
    return _DTYPES[dtype]


@lru_cache(maxsize=None)
def _known_config(name: str):
    """``configs.config_for(name)``, built once (the planner only reads it)."""
    return configs.config_for(name)


def _count_from_config(config, text_only: bool) -> tuple[int, int]:
    """(language-model parameters, vision parameters) of a config, counted on the meta device."""
    is_text = not hasattr(config, "vision_config") or config.get_text_config() is config
    text_only = text_only or is_text
    cls = configs._model_class(text_only, configs.is_moe_config(config))  # dense or MoE (qwen3_5_moe)
    with torch.device("meta"):
        model = cls._from_config(copy.deepcopy(config.get_text_config() if text_only else config))
    return _count_module(model)


def _count_module(model) -> tuple[int, int]:
    seen, text, vision = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if ".visual." in f".{name}":
            vision += p.numel()
        else:
            text += p.numel()
    return text, vision


def _source(model, text_only: bool):
    """(name, full config, language-model params, vision params, default dtype, attn implementation)."""
    if isinstance(model, str):
        spec = configs.resolve_known(model)
        if spec is not None:
            full = configs.count_parameters(spec.name, text_only=False)
            text = configs.count_parameters(spec.name, text_only=True)
            return spec.name, _known_config(spec.name), text, full - text, None, None
        from transformers import AutoConfig

        from .. import organisms

        if model in organisms.available():
            path = organisms.organisms_dir() / model
        elif Path(model).expanduser().is_dir() and (Path(model).expanduser() / "config.json").is_file():
            path = Path(model).expanduser()
        else:
            raise ValueError(f"unknown model {model!r}; plan_memory takes a known model ({', '.join(configs.KNOWN_MODELS)}), "
                             f"an organism ({', '.join(organisms.available()) or 'none built'}), a checkpoint "
                             f"directory, a Lab, a model or a config")
        config = AutoConfig.from_pretrained(path)
        text, vision = _count_from_config(config, text_only)
        return model, config, text, vision, None, None
    if hasattr(model, "model") and hasattr(model, "tokenizer"):  # a Lab
        hf = model.model
        text, vision = _count_module(hf)
        return model.name, hf.config, text, vision, hf.get_input_embeddings().weight.dtype, \
            getattr(hf.config, "_attn_implementation", None)
    if isinstance(model, torch.nn.Module):
        text, vision = _count_module(model)
        return type(model).__name__, model.config, text, vision, model.get_input_embeddings().weight.dtype, \
            getattr(model.config, "_attn_implementation", None)
    if hasattr(model, "get_text_config"):
        text, vision = _count_from_config(model, text_only)
        return getattr(model, "name_or_path", "") or type(model).__name__, model, text, vision, None, None
    raise TypeError(f"plan_memory takes a model name, a Lab, a model or a config, got {type(model).__name__}")


def _positive_int(name, value, allow_none=False):
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


# ------------------------------------------------------------------ planner
def plan_memory(model, context: int, dtype=None, batch: int = 1, text_only: bool = False,
                prefill_chunk: int | None = None, attn_implementation: str | None = None,
                logits: str = "last") -> MemoryPlan:
    """Estimate the memory of running ``model`` on ``context`` tokens (formulas in the module docstring).

    Args:
        model: a known model name (``"Qwen3.5-9B"``), an organism name, a checkpoint
            directory, a Lab, an HF model or a config.
        context: tokens in the sequence (prompt and generated).
        dtype: weights, activations and KV cache; default: the loaded model's, else bfloat16.
        batch: sequences at once.
        text_only: leave out the vision tower (the cards' ``--language-model-only``).
        prefill_chunk: tokens per forward during prefill (see :func:`chunked_prefill`);
            None = the whole context in one forward.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` (forms the score matrix) or
            ``"qwen35_lab_chunked"`` (what :func:`chunked_prefill` runs: no mask, no repeated K/V).
        logits: ``"last"`` (prefill keeps the last position's logits) or ``"all"``.

    Returns a :class:`MemoryPlan`: ``weights``, ``active_weights`` (what one token reads: a MoE model's
    k of E routed experts per layer; the weights for a dense model), ``vision_weights``, ``kv_cache``,
    ``deltanet_state``, ``conv_state``, ``activations`` (bytes), ``working_sets`` (per layer
    kind), ``peak_layer``, ``runtime`` (everything but the weights), ``total`` (the prefill
    peak), ``decode_total`` (weights + cache + state, held after prefill), and
    ``all_attention_kv_cache`` / ``all_attention_decode_total`` for a same-size transformer
    with full attention in every layer (same heads and head_dim).
    """
    _positive_int("context", context)
    _positive_int("batch", batch)
    _positive_int("prefill_chunk", prefill_chunk, allow_none=True)
    if not isinstance(text_only, bool):
        raise TypeError(f"text_only must be True or False, got {text_only!r}")
    if logits not in ("last", "all"):
        raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
    name, config, n_text, n_vision, model_dtype, model_attn = _source(model, text_only)
    torch_dtype = _dtype(dtype) if dtype is not None else (model_dtype or torch.bfloat16)
    attn = attn_implementation or (model_attn if model_attn in ATTN_IMPLEMENTATIONS else "sdpa")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {attn!r}; valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    b = torch_dtype.itemsize
    tc = config.get_text_config()

    kinds = list(tc.layer_types)
    n_full, n_lin = kinds.count("full_attention"), kinds.count("linear_attention")
    moe = configs.is_moe_config(tc)
    # MoE: the FFN working set is the shared expert's plus k routed experts' (and the router's fp32 logits)
    I = tc.shared_expert_intermediate_size + tc.num_experts_per_tok * tc.moe_intermediate_size if moe \
        else tc.intermediate_size
    D, V_vocab = tc.hidden_size, tc.vocab_size
    Hq, Hkv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    H, K = tc.linear_num_key_heads, tc.linear_key_head_dim
    HV, V = tc.linear_num_value_heads, tc.linear_value_head_dim
    kernel = tc.linear_conv_kernel_dim
    conv_dim = 2 * H * K + HV * V
    T = context
    c = min(prefill_chunk or T, T)
    chunked = c < T

    kv_per_token_layer = 2 * Hkv * hd * b  # K and V of one attention layer
    kv_cache = n_full * kv_per_token_layer * T * batch
    deltanet_state = n_lin * HV * K * V * 4 * batch
    conv_state = n_lin * conv_dim * kernel * b * batch

    shared = 3 * D * b
    per_token = {
        "linear_attention": shared + (conv_dim + HV * V) * b
        + 4 * (5 * HV * K + 4 * HV * V + 3 * HV * DELTA_RULE_CHUNK) + HV * V * b,
        "full_attention": shared + 4 * Hq * hd * b,
        "mlp": shared + (3 * I + D) * b + (4 * tc.num_experts if moe else 0),
    }
    working_sets = {k: v * c * batch for k, v in per_token.items() if k in kinds or k == "mlp"}
    if "full_attention" in working_sets and attn == CHUNKED:
        working_sets["full_attention"] += Hq * hd * c * (3 * b + 12) * batch
        working_sets["full_attention"] += 2 * Hkv * hd * (T - c) * b * batch  # the cache before torch.cat
    elif "full_attention" in working_sets:
        masked = chunked or attn == "eager"  # a mask makes transformers repeat K and V per query head
        if masked and Hq != Hkv:
            working_sets["full_attention"] += 2 * Hq * hd * T * b * batch
        if chunked and attn == "sdpa":
            working_sets["full_attention"] += c * T * b * batch  # the mask in the model dtype
        if attn == "eager":
            working_sets["full_attention"] += Hq * c * T * (2 * b + 4) * batch
    working_sets["logits"] = (shared + V_vocab * b) * batch * (1 if logits == "last" else c)
    if chunked and attn != CHUNKED:  # the boolean causal mask lives through every layer of the forward
        working_sets = {k: v + c * T * batch for k, v in working_sets.items()}
    peak_layer = max(working_sets, key=working_sets.get)
    activations = working_sets[peak_layer]

    weights = n_text * b
    vision_weights = 0 if text_only else n_vision * b
    # MoE: a token reads only k of the E routed experts of each layer (the rest stay idle, or offloaded)
    idle_experts = len(kinds) * (tc.num_experts - tc.num_experts_per_tok) * 3 * tc.moe_intermediate_size * D if moe else 0
    active_weights = weights - idle_experts * b
    runtime = kv_cache + deltanet_state + conv_state + activations
    total = weights + vision_weights + runtime
    decode_total = weights + vision_weights + kv_cache + deltanet_state + conv_state
    all_kv = len(kinds) * kv_per_token_layer * T * batch
    return MemoryPlan(
        model=name, context=T, batch=batch, dtype=str(torch_dtype).replace("torch.", ""), text_only=text_only,
        prefill_chunk=prefill_chunk if chunked else None, attn_implementation=attn, logits=logits,
        weights=weights, active_weights=active_weights, vision_weights=vision_weights, kv_cache=kv_cache, deltanet_state=deltanet_state,
        conv_state=conv_state, activations=activations, working_sets=working_sets, peak_layer=peak_layer,
        runtime=runtime, total=total, decode_total=decode_total, all_attention_kv_cache=all_kv,
        all_attention_decode_total=weights + vision_weights + all_kv,
        layers={"full_attention": n_full, "linear_attention": n_lin},
    )


def check_fits(plan: MemoryPlan, available: int | None = None, *, device: str = "cpu",
               include_weights: bool = False, margin: float = 0.9) -> None:
    """Refuse, with the numbers, a plan that will not fit: raise ``MemoryError`` before any work.

    ``available``: free bytes (default: free RAM, or free GPU memory for a CUDA ``device``).
    ``include_weights``: count the weights too (False when the model is already loaded).
    """
    if available is None:
        from ..loading import free_memory_bytes

        available = free_memory_bytes(str(device))
    need = plan["runtime"] + (plan["weights"] + plan["vision_weights"] if include_weights else 0)
    if need <= margin * available:
        return
    labels = {"weights": "weights", "vision_weights": "vision weights", "kv_cache": "KV cache",
              "deltanet_state": "DeltaNet state", "conv_state": "conv state", "activations": "prefill activations"}
    keys = (("weights", "vision_weights") if include_weights else ()) + \
        ("kv_cache", "deltanet_state", "conv_state", "activations")
    parts = ", ".join(f"{labels[k]} {fmt_bytes(plan[k])}" for k in keys if plan[k])
    hint = ("a smaller prefill chunk (chunk_size=...)" if plan["peak_layer"] != "logits" or plan["prefill_chunk"]
            else "fewer logits")
    raise MemoryError(
        f"{plan['context']:,} tokens of {plan['model']} need about {fmt_bytes(need)} ({parts}) but only "
        f"{fmt_bytes(available)} is free on {device}. Try {hint}, a shorter input, batch 1, bfloat16, or a "
        f"machine with more memory.")


# ------------------------------------------------------------ tables, plots
def memory_table(models=None, contexts=(32_768, 131_072, 262_144, 524_288, 1_010_000), dtype="bfloat16",
                 text_only: bool = True) -> list[dict]:
    """One row per (model, context): KV cache, DeltaNet state, total; and the all-attention figures."""
    models = list(models or configs.KNOWN_MODELS)
    rows = []
    for m in models:
        for ctx in contexts:
            p = plan_memory(m, ctx, dtype=dtype, text_only=text_only)
            rows.append({"model": p["model"], "context": ctx, "weights": p["weights"] + p["vision_weights"],
                         "kv_cache": p["kv_cache"], "deltanet_state": p["deltanet_state"] + p["conv_state"],
                         "total": p["decode_total"], "all_attention_kv_cache": p["all_attention_kv_cache"],
                         "all_attention_total": p["all_attention_decode_total"]})
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """The rows of :func:`memory_table` as aligned text (decimal GB, as the cards quote memory)."""
    head = f"{'model':<13} {'context':>10} {'weights':>9} {'KV cache':>9} {'state':>8} {'total':>9} " \
           f"{'all-attn KV':>12} {'all-attn total':>15}"
    out = [head]
    for r in rows:
        out.append(f"{r['model']:<13} {r['context']:>10,} {fmt_bytes(r['weights']):>9} {fmt_bytes(r['kv_cache']):>9} "
                   f"{fmt_bytes(r['deltanet_state']):>8} {fmt_bytes(r['total']):>9} "
                   f"{fmt_bytes(r['all_attention_kv_cache']):>12} {fmt_bytes(r['all_attention_total']):>15}")
    return "\n".join(out)


def plot_memory(models=None, max_context: int = 1_010_000, dtype="bfloat16", text_only: bool = True, ax=None):
    """Memory (weights + cache + state) against context up to ``max_context`` for each model, solid,
    beside a same-size all-attention transformer, dashed, on a log GB axis. A model whose curve equals an
    earlier model's is drawn with crosses and named in the legend and the title. Returns the Figure."""
    import matplotlib.ticker

    from .. import viz

    models = list(models or configs.KNOWN_MODELS)
    if ax is None:
        fig = viz._new_figure((10.0, 5.0))
        ax = fig.add_subplot()
    fig = ax.figure
    xs = [int(x) for x in torch.linspace(1, max_context, 40).tolist()]

    tables = [memory_table([m], xs, dtype=dtype, text_only=text_only) for m in models]
    same = viz._same_as([[r["total"] for r in rows] for rows in tables])  # equal curves would hide: name them
    colors = viz._head_colors(len(models))
    for i, (m, rows) in enumerate(zip(models, tables)):
        label = f"{m} (= {models[same[i]]})" if i in same else m
        ax.plot(xs, [r["total"] / 1e9 for r in rows], color=colors[i], label=label,
                **({"marker": "x", "markevery": 4, "ls": (0, (4, 3)), "lw": 1.8} if i in same else {"lw": 1.4}))
        ax.plot(xs, [r["all_attention_total"] / 1e9 for r in rows], color=colors[i], ls=":", lw=1)
    ax.axvline(262_144, color="grey", ls="-.", lw=1)
    viz._log_scale(ax, "y")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1e3:,.0f}K" if v else "0"))
    ax.tick_params(axis="x", labelsize=viz.TEXT_PT["tick"])
    ax.set_xlabel("context (tokens; dash-dot: 262,144 native)", fontsize=viz.TEXT_PT["label"])
    ax.set_ylabel(f"GB, {dtype}: weights + KV cache + state", fontsize=viz.TEXT_PT["label"])
    ax.legend(fontsize=viz.TEXT_PT["tick"], loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    twins = "; ".join(f"{models[i]} = {models[j]}" for i, j in same.items())
    viz._title(ax, "Qwen3.5 (solid) against an all-attention transformer of the same size (dotted)"
                   + (f"; equal curves (dashed, crosses): {twins}" if twins else ""))
    return fig
