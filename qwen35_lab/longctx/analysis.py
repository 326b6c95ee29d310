"""What YaRN does to each rotary frequency, computed from the YaRN paper's definitions.

Frequency ``i`` of ``d`` rotary dims turns by ``ω_i = θ^(-2i/d)`` radians per
token; its wavelength is ``λ_i = 2π / ω_i`` tokens. In a model trained for
``L`` tokens it makes ``r_i = L / λ_i`` turns over the whole context. YaRN
(Peng et al., 2023, "NTK-by-parts") leaves fast frequencies alone (many turns:
their relative angles were all seen in training), divides slow ones by the
scale factor ``s`` (less than one turn: positions beyond ``L`` would give
unseen angles), and blends in between:

    ω'_i = (1 - γ_i) · ω_i + γ_i · ω_i / s

with ``γ_i`` a linear ramp in the frequency index between the indices where
``r = beta_fast`` (γ = 0) and ``r = beta_slow`` (γ = 1). The index of ``r``
turns is ``d · ln(L / (2π r)) / (2 ln θ)``; like transformers (``truncate``,
the default) the lower bound is floored and the upper one ceiled. Logits are
sharpened back by the attention factor ``0.1 ln s + 1`` (1.1386 at ``s = 4``),
which multiplies cos and sin, so ``q·k`` grows by its square.

On the released models (θ = 1e7, d = 64, L = 262,144, s = 4): frequencies
0–14 are kept, 15–21 ramp, 22–31 are divided by 4.

:func:`rope_frequencies` returns the numbers, :func:`rope_table` one row per
frequency (with its M-RoPE axis), :func:`plot_rope_frequencies` and
:func:`plot_rope_decay` the pictures.
"""

from __future__ import annotations

import copy
import math

import torch

from .rope import RopeInfo, _hf_inv_freq, _validate, rotary_dim, text_config_of

__all__ = ["RopeCheck", "verify_rope", "RopeTable", "mrope_axes", "plot_rope_decay", "plot_rope_frequencies", "rope_frequencies",
           "rope_table", "yarn_attention_factor", "yarn_inv_freq"]

KEEP, RAMP, INTERPOLATE = "keep", "ramp", "interpolate"
COLORS = {KEEP: "tab:blue", RAMP: "tab:orange", INTERPOLATE: "tab:red"}


def yarn_attention_factor(factor: float, *, attention_factor=None, mscale=None, mscale_all_dim=None) -> float:
    """YaRN's logit sharpening: ``0.1 ln(factor) + 1`` (or the given ``attention_factor``)."""
    if attention_factor is not None:
        return float(attention_factor)

    def m(scale, k=1.0):
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return m(factor, mscale) / m(factor, mscale_all_dim)
    return m(factor)


def yarn_inv_freq(rope_parameters: dict, dim: int) -> dict:
    """YaRN frequencies of ``dim`` rotary dims from ``rope_parameters`` (float64, from the definitions above).

    Returns ``{"inv_freq", "inv_freq_default", "gamma", "low", "high", "attention_factor"}``:
    ``inv_freq`` / ``inv_freq_default`` / ``gamma`` are ``[dim / 2]`` tensors (``gamma`` = the
    interpolated fraction, 0 kept … 1 divided by the factor); ``low`` / ``high`` the ramp's ends.
    """
    theta = float(rope_parameters["rope_theta"])
    s = float(rope_parameters["factor"])
    L = float(rope_parameters["original_max_position_embeddings"])
    beta_fast = float(rope_parameters.get("beta_fast") or 32)
    beta_slow = float(rope_parameters.get("beta_slow") or 1)
    truncate = rope_parameters.get("truncate", True)
    n = dim // 2
    i = torch.arange(n, dtype=torch.float64)
    omega = theta ** (-2.0 * i / dim)  # radians per token

    def index_of_turns(turns: float) -> float:
        return dim * math.log(L / (2 * math.pi * turns)) / (2 * math.log(theta))

    low, high = index_of_turns(beta_fast), index_of_turns(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if high == low:
        high += 0.001
    gamma = ((i - low) / (high - low)).clamp(0, 1)
    inv_freq = (1 - gamma) * omega + gamma * omega / s
    factor_a = yarn_attention_factor(s, attention_factor=rope_parameters.get("attention_factor"),
                                     mscale=rope_parameters.get("mscale"),
                                     mscale_all_dim=rope_parameters.get("mscale_all_dim"))
    return {"inv_freq": inv_freq, "inv_freq_default": omega, "gamma": gamma, "low": low, "high": high,
            "attention_factor": factor_a}


def mrope_axes(n_frequencies: int, mrope_section=(11, 11, 10)) -> list[str]:
    """The M-RoPE axis (``"T"``, ``"H"``, ``"W"``) of each frequency, interleaved as Qwen3.5 does.

    H takes frequencies ``1, 4, 7, …`` (``mrope_section[1]`` of them), W ``2, 5, 8, …``
    (``mrope_section[2]``), T the rest (``0, 3, 6, …``). For text all three axes carry the
    same position, so the axis matters only for images and video.
    """
    axes = ["T"] * n_frequencies
    for axis, offset in (("H", 1), ("W", 2)):
        for j in range(offset, min(3 * mrope_section[offset], n_frequencies), 3):
            axes[j] = axis
    return axes


def _scaled_config(obj, rope):
    text = copy.deepcopy(text_config_of(obj))
    if rope is not None:
        text.rope_parameters = _validate(rope, text)
    return text


def rope_frequencies(obj, rope: dict | None = None) -> dict:
    """Per-frequency numbers of ``obj``'s RoPE (or of ``rope`` merged into it, without changing ``obj``).

    Returns ``{"inv_freq", "inv_freq_default", "gamma", "attention_factor", "original_context",
    "factor", "rope_type", "rotary_dim", "axes"}`` with ``[rotary_dim / 2]`` float64 tensors.
    Default and linear RoPE and YaRN are computed here from their definitions; other types
    take transformers' frequencies and classify them by their ratio to the default ones.
    """
    text = _scaled_config(obj, rope)
    params = text.rope_parameters
    rope_type = params.get("rope_type", "default")
    dim = rotary_dim(text)
    n = dim // 2
    theta = float(params["rope_theta"])
    omega = theta ** (-2.0 * torch.arange(n, dtype=torch.float64) / dim)
    factor = float(params.get("factor", 1.0)) if rope_type != "default" else 1.0
    original = int(params.get("original_max_position_embeddings") or text.max_position_embeddings)
    if rope_type == "default":
        inv, gamma, att = omega, torch.zeros(n, dtype=torch.float64), 1.0
    elif rope_type == "linear":
        inv, gamma, att = omega / factor, torch.ones(n, dtype=torch.float64), 1.0
    elif rope_type == "yarn":
        y = yarn_inv_freq(params, dim)
        inv, gamma, att = y["inv_freq"], y["gamma"], y["attention_factor"]
    else:
        hf_inv, att = _hf_inv_freq(text)
        inv = hf_inv.double()
        # fraction interpolated in log space: 0 kept, 1 divided by the factor
        gamma = (torch.log(omega / inv) / math.log(factor)).clamp(0, 1) if factor > 1 else torch.zeros(n)
    return {"inv_freq": inv, "inv_freq_default": omega, "gamma": gamma, "attention_factor": float(att),
            "original_context": original, "factor": factor, "rope_type": rope_type, "rotary_dim": dim,
            "axes": mrope_axes(n, params.get("mrope_section", [11, 11, 10]))}


def _treatment(gamma: float) -> str:
    if gamma <= 1e-9:
        return KEEP
    if gamma >= 1 - 1e-9:
        return INTERPOLATE
    return RAMP


class RopeTable(list):
    """Rows (dicts) of :func:`rope_table`, printed as a table; ``.meta`` holds the shared numbers."""

    def __init__(self, rows, meta):
        super().__init__(rows)
        self.meta = meta

    def column(self, name: str) -> list:
        return [r[name] for r in self]

    def __repr__(self) -> str:
        m = self.meta
        head = (f"RoPE {m['rope_type']!r}, factor {m['factor']:g}, original context {m['original_context']:,}, "
                f"attention factor {m['attention_factor']:.4f}, {m['rotary_dim']} rotary dims")
        cols = f"{'i':>3} {'dims':>8} {'axis':>4} {'wavelength':>12} {'turns in L':>11} {'treatment':>11} " \
               f"{'γ':>5} {'new wavelength':>15}"
        lines = [head, cols]
        for r in self:
            lines.append(f"{r['i']:>3} {str(r['dims']):>8} {r['axis']:>4} {r['wavelength']:>12.4g} "
                         f"{r['turns_in_original']:>11.4g} {r['treatment']:>11} {r['gamma']:>5.2f} "
                         f"{r['scaled_wavelength']:>15.4g}")
        return "\n".join(lines)


def rope_table(obj, rope: dict | None = None) -> RopeTable:
    """One row per rotary frequency of a Lab / model / config (with ``rope`` merged in if given).

    Row fields: ``i``; ``dims`` (the two head dims it rotates: ``i`` and ``i + rotary_dim/2``,
    transformers' rotate-half layout); ``axis`` (M-RoPE T/H/W); ``inv_freq`` (radians per
    token, before scaling); ``wavelength`` (tokens); ``turns_in_original`` (turns over the
    original context); ``treatment`` (``keep`` / ``ramp`` / ``interpolate``); ``gamma`` (the
    interpolated fraction); ``scaled_inv_freq``; ``scaled_wavelength``; ``ratio`` (scaled /
    original frequency).
    """
    f = rope_frequencies(obj, rope)
    half = f["rotary_dim"] // 2
    rows = []
    for i in range(half):
        omega, new = float(f["inv_freq_default"][i]), float(f["inv_freq"][i])
        g = float(f["gamma"][i])
        rows.append({
            "i": i, "dims": (i, i + half), "axis": f["axes"][i], "inv_freq": omega,
            "wavelength": 2 * math.pi / omega, "turns_in_original": f["original_context"] * omega / (2 * math.pi),
            "treatment": _treatment(g), "gamma": g, "scaled_inv_freq": new,
            "scaled_wavelength": 2 * math.pi / new, "ratio": new / omega,
        })
    meta = {k: f[k] for k in ("rope_type", "factor", "original_context", "attention_factor", "rotary_dim")}
    return RopeTable(rows, meta)


# ------------------------------------------------------------------- plots
def _scaled_table(obj, rope):
    """The rope table of a scaled RoPE (its rows hold the frequencies before and after scaling)."""
    after = rope_table(obj, rope)
    if after.meta["rope_type"] == "default":
        raise ValueError("the RoPE is 'default' (nothing scaled); pass rope=yarn_for_context(...) to compare")
    return after


def plot_rope_frequencies(obj, rope: dict | None = None, ax=None):
    """Wavelength of every rotary frequency (log scale) before and after scaling, coloured keep /
    ramp / interpolate, with the original and the extended context marked. Returns the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    table = _scaled_table(obj, rope)
    m = table.meta
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4))
    idx = table.column("i")
    colors = [COLORS[t] for t in table.column("treatment")]
    ax.scatter(idx, table.column("wavelength"), c="none", edgecolors=colors, s=36, label="original")
    ax.scatter(idx, table.column("scaled_wavelength"), c=colors, s=16, label=f"{m['rope_type']} ×{m['factor']:g}")
    ax.axhline(m["original_context"], color="grey", ls="--", lw=1)
    ax.axhline(m["original_context"] * m["factor"], color="grey", ls=":", lw=1)
    ax.text(0, m["original_context"], f" original context {m['original_context']:,}", va="bottom", fontsize=9)
    ax.text(0, m["original_context"] * m["factor"], f" ×{m['factor']:g} = {int(m['original_context'] * m['factor']):,}",
            va="bottom", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("rotary frequency i (dims i and i + d/2)")
    ax.set_ylabel("wavelength (tokens)")
    ax.set_title(f"RoPE wavelengths, {m['rope_type']} ×{m['factor']:g} (attention factor {m['attention_factor']:.4f})")
    handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in COLORS.items()]
    handles += [Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="before"),
                Line2D([], [], marker="o", ls="", color="k", label="after")]
    ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def rotated_similarity(inv_freq: torch.Tensor, distances: torch.Tensor, attention_factor: float = 1.0) -> torch.Tensor:
    """``a² · mean_i cos(ω_i Δ)``: the dot product of a unit vector (isotropic over the rotary pairs)
    with itself rotated by ``Δ`` tokens, relative to ``Δ = 0`` without scaling. ``[len(distances)]``."""
    return attention_factor**2 * torch.cos(distances.double()[:, None] * inv_freq.double()[None, :]).mean(-1)


def plot_rope_decay(obj, rope: dict | None = None, max_distance: int | None = None, ax=None, points: int = 4000):
    """How ``q · R(Δ) q`` falls with distance ``Δ`` before and after scaling (see
    :func:`rotated_similarity`), on a log distance axis up to ``max_distance`` (default: twice
    the extended context). Returns the Figure."""
    import matplotlib.pyplot as plt

    table = _scaled_table(obj, rope)
    f = rope_frequencies(obj, rope)
    m = table.meta
    extended = int(m["original_context"] * m["factor"])
    top = max_distance or 2 * extended
    d = torch.logspace(0, math.log10(top), points)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4))
    ax.plot(d, rotated_similarity(f["inv_freq_default"], d), lw=0.8, label="original RoPE")
    ax.plot(d, rotated_similarity(f["inv_freq"], d, f["attention_factor"]), lw=0.8,
            label=f"{m['rope_type']} ×{m['factor']:g} (× attention factor²)")
    ax.axvline(m["original_context"], color="grey", ls="--", lw=1)
    ax.axvline(extended, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("distance Δ (tokens)")
    ax.set_ylabel("mean cos(ω Δ)  (rotated dot product)")
    ax.set_title("Rotated-vector similarity against distance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------- is the RoPE really applied?
class RopeCheck(RopeInfo):
    """What :func:`verify_rope` found (a dict with attribute access and a readable repr); ``.ok`` is the verdict."""

    def __repr__(self) -> str:
        head = (f"verify_rope: {'OK' if self['ok'] else 'MISMATCH'} — rope_type {self['rope_type']!r} "
                f"×{self['factor']:g}, {self['rotary_dim']} rotary dims, checked at positions "
                f"{self['positions'][0]:,}…{self['positions'][-1]:,}")
        lines = [head,
                 f"  frequencies: max relative error {self['max_rel_freq_error']:.2e} (reference: {self['reference']})",
                 f"  attention factor: module {self['module_attention_factor']:.6f}, "
                 f"expected {self['expected_attention_factor']:.6f}",
                 f"  cos/sin reaching layer {self['layer']}: max error {self['max_cos_sin_error']:.2e}"]
        lines += [f"  DIFFERS: {d}" for d in self["differences"]]
        return "\n".join(lines)


def verify_rope(lab, *, positions=None, rtol: float = 1e-5) -> RopeCheck:
    """Check that the model really rotates by the frequencies and attention factor its config asks for.

    Engines have silently ignored YaRN (and kept the default frequencies); this
    catches it. Three things are compared with the RoPE computed from its
    definition in this module (:func:`rope_frequencies`; default, linear and YaRN
    from their formulas, other types from transformers' own functions):

    1. the text rotary module's ``inv_freq`` ``[rotary_dim / 2]``;
    2. its ``attention_scaling`` (YaRN's ``0.1 ln s + 1``);
    3. the ``cos`` / ``sin`` ``[B, T, rotary_dim]`` that actually reach the first
       full-attention layer in a forward at ``positions`` (default: the last 4
       positions of the extended context, where scaling matters most), against
       ``cos(p ω) · a``, ``sin(p ω) · a``.

    Args:
        lab: a Lab (or anything with ``.model``) of a Qwen3.5 model.
        positions: absolute positions (ints ≥ 0) to run the check forward at.
        rtol: relative tolerance of every comparison.

    Returns a :class:`RopeCheck`: ``ok``, ``differences`` (what differs, in words),
    the numbers compared.
    """
    from ..checks import BadType, check_float, check_int
    from .rope import _rotary_modules, max_context

    if not hasattr(lab, "model") or not isinstance(lab.model, torch.nn.Module):
        raise BadType(f"verify_rope takes a Lab (qwen35_lab.load(...)), got {type(lab).__name__}")
    try:
        rotary = _rotary_modules(lab.model)[0][1]
    except TypeError as e:
        raise BadType(f"verify_rope: {e}") from None
    text = text_config_of(lab.model)
    full = [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"]
    if not full:
        raise BadType(f"verify_rope: the model has no full_attention layer, so nothing applies RoPE "
                      f"(layer_types {list(text.layer_types)})")
    rtol = check_float("rtol", rtol, lo=0.0, lo_open=True)
    limit = max_context(lab.model)
    if positions is None:
        positions = list(range(max(0, limit - 4), limit))
    if isinstance(positions, (str, bytes)) or not hasattr(positions, "__iter__"):
        raise BadType(f"positions must be a list of ints, got {positions!r}")
    positions = [check_int("position", p, lo=0, hi=2**31 - 1) for p in positions]
    if not positions:
        raise BadType("positions must not be empty")

    f = rope_frequencies(lab.model)
    rope_type = f["rope_type"]
    expected = f["inv_freq"].double()
    expected_att = float(f["attention_factor"])
    reference = ("its definition (qwen35_lab.longctx.analysis)" if rope_type in ("default", "linear", "yarn")
                 else "transformers' ROPE_INIT_FUNCTIONS")
    differences: list[str] = []

    module_freq = rotary.inv_freq.detach().double().cpu()
    if module_freq.shape != expected.shape:
        differences.append(f"the rotary module has {module_freq.numel()} frequencies, the config implies "
                           f"{expected.numel()} ({f['rotary_dim']} rotary dims)")
        rel = float("inf")
    else:
        rel = float(((module_freq - expected).abs() / expected.abs()).max())
        if rel > rtol:
            default = f["inv_freq_default"].double()
            looks_default = rope_type != "default" and torch.allclose(module_freq, default, rtol=rtol, atol=0)
            differences.append(
                f"inv_freq differs from what rope_type {rope_type!r} implies by up to {rel:.2e} (relative)"
                + ("; it holds the *default* (unscaled) frequencies: the scaling was ignored" if looks_default else ""))
    module_att = float(getattr(rotary, "attention_scaling", 1.0))
    if abs(module_att - expected_att) > rtol * expected_att:
        differences.append(f"attention factor {module_att:.6f} where rope_type {rope_type!r} implies "
                           f"{expected_att:.6f}")

    # what reaches the attention layer in a real forward
    attn = lab.model.get_decoder().layers[full[0]].self_attn if hasattr(lab.model, "get_decoder") else None
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["pe"] = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)

    device = rotary.inv_freq.device
    ids = torch.zeros(1, len(positions), dtype=torch.long, device=device)
    pos = torch.tensor([positions], device=device)
    saved = {k: v.clone() for k, v in rotary.named_buffers(recurse=False)}
    saved_len = getattr(rotary, "max_seq_len_cached", None)
    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            lab.model(input_ids=ids, position_ids=pos, use_cache=False)
    finally:
        handle.remove()
        for k, v in saved.items():  # dynamic types change their buffers (and cached length) in the forward
            setattr(rotary, k, v)
        if saved_len is not None:
            rotary.max_seq_len_cached = saved_len
    cos, sin = (t.detach().double().cpu()[0] for t in grabbed["pe"])  # [T, rotary_dim]
    applied = expected
    if rope_type == "dynamic":
        # dynamic NTK (transformers' definition): for a sequence of n > max_position_embeddings tokens
        # the base becomes θ · (s · n / L - (s - 1)) ^ (d / (d - 2)), L = max_position_embeddings
        d, L = f["rotary_dim"], text.max_position_embeddings
        n = max(max(positions) + 1, L)
        base = float(text.rope_parameters["rope_theta"]) * (f["factor"] * n / L - (f["factor"] - 1)) ** (d / (d - 2))
        applied = base ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angle = torch.tensor(positions, dtype=torch.float64)[:, None] * applied[None, :]  # [T, d/2]
    want_cos = torch.cat([angle.cos(), angle.cos()], -1) * expected_att
    want_sin = torch.cat([angle.sin(), angle.sin()], -1) * expected_att
    if cos.shape != want_cos.shape:
        differences.append(f"the attention layer receives cos of shape {tuple(cos.shape)}, expected "
                           f"{tuple(want_cos.shape)}")
        err = float("inf")
    else:
        # fp32 angles at large positions carry ~p·2^-24 rad of rounding: allow it
        tol = rtol * expected_att + max(positions) * 2.0 ** -23 * expected_att
        err = float(max((cos - want_cos).abs().max(), (sin - want_sin).abs().max()))
        if err > tol:
            differences.append(f"the cos/sin reaching layer {full[0]} differ from cos(pω)·a by up to {err:.3g} "
                               f"(tolerance {tol:.2g}) at positions {positions[0]}…{positions[-1]}")
    return RopeCheck(ok=not differences, differences=differences, rope_type=rope_type, factor=f["factor"],
                     rotary_dim=f["rotary_dim"], reference=reference, positions=positions, layer=full[0],
                     max_rel_freq_error=rel, module_attention_factor=module_att,
                     expected_attention_factor=expected_att, max_cos_sin_error=err,
                     expected_inv_freq=expected.tolist(), module_inv_freq=module_freq.tolist())
