"""RoPE configuration: YaRN settings as the model cards give them, applied to configs and loaded models.

The released Qwen3.5 / Qwen3.6 models rotate 64 of each attention head's 256
dims (``partial_rotary_factor`` 0.25, ``rope_theta`` 1e7): 32 frequencies,
interleaved between the three M-RoPE axes (sections ``[11, 11, 10]``). They
are trained for 262,144 tokens; the cards extend them to 1,010,000 with static
YaRN by replacing ``text_config.rope_parameters`` with::

    {"mrope_interleaved": true, "mrope_section": [11, 11, 10], "rope_type": "yarn",
     "rope_theta": 10000000, "partial_rotary_factor": 0.25, "factor": 4.0,
     "original_max_position_embeddings": 262144}

:func:`yarn_for_context` makes that dict for any target length,
:func:`apply_rope_to_config` merges it into a config (nothing of M-RoPE is
lost), :func:`set_rope` applies it to a loaded model in place, and
:func:`rope_info` says what is active and how long a context it allows.
"""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import torch
from ..checks import BadType, BadValue

__all__ = [
    "ROPE_TYPES",
    "RopeInfo",
    "apply_rope_to_config",
    "check_context",
    "max_context",
    "rope_info",
    "set_rope",
    "yarn_for_context",
]

NATIVE_CONTEXT = 262_144
# Fields that describe the rotation itself (kept across rope types) ...
BASE_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor", "mrope_section", "mrope_interleaved")
# ... and fields that only mean something for a scaled rope type (dropped when the type changes).
SCALING_KEYS = ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim", "truncate", "short_factor", "long_factor", "low_freq_factor",
                "high_freq_factor")
VALID_KEYS = BASE_KEYS + SCALING_KEYS
# Types whose context is "original × factor".
_EXTENDING_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _rope_types() -> tuple[str, ...]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ("default",) + tuple(ROPE_INIT_FUNCTIONS)


ROPE_TYPES = _rope_types()


# ------------------------------------------------------------------ helpers
def text_config_of(obj):
    """The text config of a Lab, an HF model, a full ``Qwen3_5Config`` or a ``Qwen3_5TextConfig``."""
    if hasattr(obj, "model") and hasattr(obj, "text_config") and not hasattr(obj, "get_text_config"):
        return obj.text_config  # a Lab
    config = getattr(obj, "config", obj) if isinstance(obj, torch.nn.Module) else obj
    if not hasattr(config, "get_text_config"):
        raise BadType(f"expected a Lab, a Qwen3.5 model or its config, got {type(obj).__name__}")
    text = config.get_text_config()
    if not hasattr(text, "rope_parameters") or not hasattr(text, "layer_types"):
        raise BadType(f"{type(text).__name__} is not a Qwen3.5 text config (no rope_parameters / layer_types)")
    return text


def rotary_dim(text_config, rope_parameters: dict | None = None) -> int:
    """Rotated dims per head: ``int(head_dim * partial_rotary_factor)`` (64 for the released models)."""
    params = rope_parameters if rope_parameters is not None else text_config.rope_parameters
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _is_number(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _fmt(n: int) -> str:
    return f"{n:,}"


# --------------------------------------------------------------- the card's YaRN
def yarn_for_context(target: int, original: int = NATIVE_CONTEXT, *, like=None) -> dict:
    """YaRN ``rope_parameters`` that stretch a model trained for ``original`` tokens to ``target``.

    ``factor`` is the smallest whole number ≥ ``target / original``; this
    reproduces both settings of the cards: 1,010,000 tokens → ``factor`` 4.0
    (1,010,000 / 262,144 = 3.85) and 524,288 → 2.0. The context this allows is
    ``factor × original`` (4 × 262,144 = 1,048,576 ≥ 1,010,000).

    Args:
        target: the longest input (prompt plus generated tokens) you need.
        original: the context the model was trained for (262,144 for the
            released models; an organism's training length for organisms).
        like: a Lab, model or config whose other RoPE fields (``rope_theta``,
            ``partial_rotary_factor``, M-RoPE) the result repeats, giving the
            card's complete dict. Without it only the YaRN fields are returned;
            :func:`apply_rope_to_config` / :func:`set_rope` merge them into the
            model's own fields, which gives the same result.

    Returns:
        ``{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}``
        (plus the fields of ``like``).
    """
    for name, value in (("target", target), ("original", original)):
        if not _is_int(value) or value < 1:
            raise BadValue(f"{name} must be a positive number of tokens (int), got {value!r}")
    if target <= original:
        raise BadValue(
            f"target={_fmt(target)} tokens fits in the original context of {_fmt(original)} tokens: YaRN is not "
            f"needed (and static YaRN slightly changes short-input behaviour). Use it only for targets above "
            f"{_fmt(original)}, e.g. yarn_for_context(1_010_000) for the cards' 1,010,000 tokens.")
    factor = float(math.ceil(target / original))
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    if like is None:
        return params
    base = {k: copy.deepcopy(v) for k, v in text_config_of(like).rope_parameters.items() if k in BASE_KEYS}
    return {**base, **params}


# ------------------------------------------------------------------ validation
def _merge(current: dict, rope: dict) -> dict:
    """``current`` with ``rope``'s fields replaced; a change of rope type drops the old scaling fields."""
    merged = {k: copy.deepcopy(v) for k, v in current.items()}
    new_type = rope.get("rope_type", merged.get("rope_type", "default"))
    if new_type != merged.get("rope_type", "default"):
        for k in SCALING_KEYS:
            merged.pop(k, None)
    merged.update(copy.deepcopy(rope))
    merged["rope_type"] = new_type
    return merged


def _validate(rope, text_config) -> dict:
    """Check ``rope`` against ``text_config`` and return the merged parameters (nothing is changed)."""
    if rope is None:
        rope = {"rope_type": "default"}
    if not isinstance(rope, dict):
        raise BadType(f"rope must be a dict of rope_parameters (e.g. yarn_for_context(1_010_000)) or None "
                        f"for the default RoPE, got {type(rope).__name__}")
    if "type" in rope:
        raise BadValue("rope has a 'type' field: write 'rope_type' (the transformers 5 name), e.g. "
                         "{'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 262144}")
    unknown = sorted(set(rope) - set(VALID_KEYS))
    if unknown:
        raise BadValue(f"unknown rope_parameters field(s) {unknown}; valid fields: {', '.join(VALID_KEYS)}")
    rope_type = rope.get("rope_type", text_config.rope_parameters.get("rope_type", "default"))
    if rope_type not in ROPE_TYPES:
        raise BadValue(f"unknown rope_type {rope_type!r}; valid: {', '.join(map(repr, ROPE_TYPES))} "
                         f"(transformers' ROPE_INIT_FUNCTIONS plus 'default')")
    merged = _merge(text_config.rope_parameters, rope)
    if rope_type == "default":
        extra = sorted(k for k in rope if k in SCALING_KEYS)
        if extra:
            raise BadValue(f"rope_type 'default' takes no scaling field, got {extra}; give a scaling rope_type "
                           f"({', '.join(repr(t) for t in ROPE_TYPES if t != 'default')}) to use them")
        for k in SCALING_KEYS:  # back to plain RoPE: nothing of an earlier scaling stays behind
            merged.pop(k, None)

    theta = merged.get("rope_theta")
    if not _is_number(theta) or theta <= 1:
        raise BadValue(f"rope_theta must be a number > 1 (the released models use 10000000), got {theta!r}")
    prf = merged.get("partial_rotary_factor", 1.0)
    if not _is_number(prf) or not 0 < prf <= 1:
        raise BadValue(f"partial_rotary_factor must be in (0, 1] (the released models use 0.25), got {prf!r}")
    dim = rotary_dim(text_config, merged)
    if dim < 2 or dim % 2:
        raise BadValue(f"partial_rotary_factor={prf} gives {dim} rotary dims of head_dim "
                         f"{text_config.head_dim}; it must give a positive even number")
    if "mrope_section" in rope:
        sec = rope["mrope_section"]
        if (not isinstance(sec, (list, tuple)) or len(sec) != 3 or not all(_is_int(s) and s >= 0 for s in sec)
                or sum(sec) != dim // 2):
            raise BadValue(f"mrope_section must be 3 non-negative ints (T, H, W) summing to the {dim // 2} "
                             f"rotary frequencies, got {sec!r} (the released models: [11, 11, 10] of 32)")
    if "mrope_interleaved" in merged and not isinstance(merged["mrope_interleaved"], bool):
        raise BadValue(f"mrope_interleaved must be True or False, got {merged['mrope_interleaved']!r}")

    if rope_type != "default":
        factor = merged.get("factor")
        if factor is None:
            raise BadValue(f"rope_type {rope_type!r} needs a 'factor' (how many times the original context "
                             f"to reach), e.g. yarn_for_context(target) computes it")
        if not _is_number(factor) or factor <= 1:
            raise BadValue(f"factor must be a number > 1, got {factor!r}: a factor of 1 scales nothing "
                             f"(use {{'rope_type': 'default'}}), below 1 it would shrink the context")
    if rope_type in ("yarn", "longrope", "llama3"):
        original = merged.get("original_max_position_embeddings")
        if original is None:
            raise BadValue(f"rope_type {rope_type!r} needs 'original_max_position_embeddings', the context the "
                             f"model was trained for (262144 for the released models)")
        if not _is_int(original) or original < 1:
            raise BadValue(f"original_max_position_embeddings must be a positive int, got {original!r}")
    if rope_type == "dynamic":
        native = getattr(text_config, "max_position_embeddings", None)
        original = merged.get("original_max_position_embeddings")
        if original is not None and original != native:
            raise BadValue(f"rope_type 'dynamic' in transformers rescales only past the config's "
                           f"max_position_embeddings ({native}) and ignores original_max_position_embeddings "
                           f"({original}): below {native} tokens it would silently stay the default RoPE. "
                           f"Drop original_max_position_embeddings, or use 'yarn' / 'linear' for a context "
                           f"trained at {original}")
    for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        if key in merged and merged[key] is not None and (not _is_number(merged[key]) or merged[key] <= 0):
            raise BadValue(f"{key} must be a positive number, got {merged[key]!r}")
    if rope_type == "yarn" and merged.get("beta_fast", 32) <= merged.get("beta_slow", 1):
        raise BadValue(f"beta_fast ({merged.get('beta_fast', 32)}) must be greater than beta_slow "
                         f"({merged.get('beta_slow', 1)}): frequencies with more than beta_fast turns in the "
                         f"original context are kept, fewer than beta_slow are interpolated")

    # Dry run: the frequencies transformers will compute from these parameters (catches what is
    # specific to a type, e.g. longrope's short_factor / long_factor).
    trial = copy.deepcopy(text_config)
    trial.rope_parameters = copy.deepcopy(merged)
    try:
        _hf_inv_freq(trial)
    except Exception as e:  # noqa: BLE001 - re-raised with the parameters named
        raise BadValue(f"transformers cannot build rope_type {rope_type!r} from {merged}: "
                         f"{type(e).__name__}: {e}") from None
    return merged


def _hf_inv_freq(text_config) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim / 2], attention_scaling)`` as transformers computes them for ``text_config``."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    rope_type = text_config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        return Qwen3_5TextRotaryEmbedding.compute_default_rope_parameters(text_config)
    return ROPE_INIT_FUNCTIONS[rope_type](text_config, None)


# ------------------------------------------------------------------ applying
def apply_rope_to_config(config, rope: dict | None) -> None:
    """Merge ``rope`` into ``config``'s ``text_config.rope_parameters``, in place (the cards' way).

    Fields in ``rope`` replace the config's; the others (``rope_theta``,
    ``partial_rotary_factor``, ``mrope_section``, ``mrope_interleaved``) are
    kept. When ``rope_type`` changes, the old type's scaling fields
    (``factor``, ``original_max_position_embeddings``, ...) are dropped;
    ``None`` or ``{"rope_type": "default"}`` returns to plain RoPE.
    Everything is checked before the config is touched.

    Args:
        config: a ``Qwen3_5Config`` (its ``text_config`` changes) or a
            ``Qwen3_5TextConfig``.
        rope: e.g. ``yarn_for_context(1_010_000)``.
    """
    text = text_config_of(config)
    merged = _validate(rope, text)
    text.rope_parameters = merged


def _rotary_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The language model's rotary embedding(s): ``model.language_model.rotary_emb`` or ``model.rotary_emb``."""
    found = [(n, m) for n, m in model.named_modules()
             if n.endswith("rotary_emb") and "visual" not in n and hasattr(m, "inv_freq")]
    if not found:
        raise BadType(f"{type(model).__name__} has no text rotary embedding (model.language_model.rotary_emb "
                        f"or model.rotary_emb); set_rope takes a Qwen3.5 Lab")
    return found


def set_rope(lab, rope: dict | None) -> "RopeInfo":
    """Switch a loaded model's RoPE in place, e.g. ``set_rope(lab, yarn_for_context(1_010_000))``.

    The config is updated as :func:`apply_rope_to_config` does, then the
    text rotary embedding (``model.model.language_model.rotary_emb``, or
    ``model.model.rotary_emb`` for a text-only model) is rebuilt by
    transformers' own ``Qwen3_5TextRotaryEmbedding`` from that config: its
    ``inv_freq`` and ``attention_scaling`` are then exactly those of a fresh
    ``from_pretrained`` with the same ``rope_parameters``. The module object is
    kept (device placement and hooks stay valid). ``None`` restores plain RoPE.
    Returns :func:`rope_info` of the result.
    """
    if not hasattr(lab, "model"):
        raise BadType(f"set_rope takes a Lab (qwen35_lab.load(...)), got {type(lab).__name__}")
    text = text_config_of(lab.model)
    modules = _rotary_modules(lab.model)
    merged = _validate(rope, text)  # raises before anything changes
    text.rope_parameters = merged
    for _, module in modules:
        fresh = type(module)(config=text)  # transformers computes inv_freq and attention_scaling
        device = module.inv_freq.device
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))
        for name, value in vars(fresh).items():
            if not name.startswith("_") and name != "training":
                setattr(module, name, value)
    return rope_info(lab)


# --------------------------------------------------------------- information
def max_context(obj) -> int:
    """Longest context the active RoPE is meant for: ``original × factor`` when scaled, else
    ``max_position_embeddings`` (262,144 for the released models)."""
    text = text_config_of(obj)
    params = text.rope_parameters
    rope_type = params.get("rope_type", "default")
    if rope_type in _EXTENDING_TYPES and params.get("factor"):
        original = params.get("original_max_position_embeddings") or text.max_position_embeddings
        return int(original * params["factor"])
    return int(text.max_position_embeddings)


def check_context(obj, n_tokens: int) -> None:
    """Raise ``ValueError`` if ``n_tokens`` exceed what the active RoPE allows, saying how to enable YaRN."""
    if not _is_int(n_tokens) or n_tokens < 1:
        raise BadValue(f"n_tokens must be a positive int, got {n_tokens!r}")
    limit = max_context(obj)
    if n_tokens <= limit:
        return
    text = text_config_of(obj)
    params = text.rope_parameters
    rope_type = params.get("rope_type", "default")
    native = params.get("original_max_position_embeddings") or text.max_position_embeddings
    factor = float(math.ceil(n_tokens / native))
    if rope_type == "default":
        raise BadValue(
            f"{_fmt(n_tokens)} tokens exceed the model's native context of {_fmt(limit)} (rope_type 'default'). "
            f"Enable YaRN first: set_rope(lab, yarn_for_context({n_tokens}, {native})) (factor {factor}), "
            f"or load(..., rope=yarn_for_context({n_tokens}, {native})).")
    raise BadValue(
        f"{_fmt(n_tokens)} tokens exceed the {_fmt(limit)} that rope_type {rope_type!r} with factor "
        f"{params.get('factor')} allows; use set_rope(lab, yarn_for_context({n_tokens}, {native})) (factor {factor}).")


class RopeInfo(dict):
    """What RoPE a model uses and how long a context it allows (a dict with a readable repr)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        head = f"RoPE {self['rope_type']!r}"
        if self["rope_type"] != "default":
            head += f" ×{self['factor']:g} (original {_fmt(self['original_context'])})"
        lines = [
            f"{head}: max context {_fmt(self['max_context'])} tokens",
            f"  rope_theta {self['rope_theta']:g}, {self['rotary_dim']} of {self['head_dim']} dims rotated "
            f"({self['n_frequencies']} frequencies), M-RoPE sections {self['mrope_section']}"
            f"{' interleaved' if self['mrope_interleaved'] else ''}",
            f"  attention factor {self['attention_factor']:.4f} (scales cos and sin)",
        ]
        if self.get("in_sync") is False:
            lines.append("  WARNING: the model's rotary embedding does not match its config; call set_rope(lab, rope)")
        return "\n".join(lines)


def rope_info(obj) -> RopeInfo:
    """The active RoPE: type, fields, rotary dims, attention factor, native and maximum context.

    For a Lab or model also ``in_sync``: whether the rotary embedding module
    holds the frequencies its config asks for.
    """
    text = text_config_of(obj)
    params = dict(text.rope_parameters)
    rope_type = params.get("rope_type", "default")
    dim = rotary_dim(text)
    inv_freq, attention_factor = _hf_inv_freq(copy.deepcopy(text))
    info = RopeInfo(
        rope_type=rope_type,
        rope_theta=params.get("rope_theta"),
        partial_rotary_factor=params.get("partial_rotary_factor", 1.0),
        head_dim=text.head_dim,
        rotary_dim=dim,
        n_frequencies=dim // 2,
        mrope_section=list(params.get("mrope_section", [11, 11, 10])),
        mrope_interleaved=bool(params.get("mrope_interleaved", True)),
        factor=params.get("factor", 1.0) if rope_type != "default" else 1.0,
        original_context=int(params.get("original_max_position_embeddings") or text.max_position_embeddings),
        max_context=max_context(text),
        attention_factor=float(attention_factor),
        rope_parameters=params,
    )
    model = getattr(obj, "model", obj) if not hasattr(obj, "get_text_config") else None
    if isinstance(model, torch.nn.Module):
        module = _rotary_modules(model)[0][1]
        info["in_sync"] = bool(
            module.inv_freq.shape == inv_freq.shape
            and torch.allclose(module.inv_freq.float().cpu(), inv_freq.float(), rtol=1e-6, atol=0)
            and abs(float(module.attention_scaling) - float(attention_factor)) < 1e-9)
    return info
