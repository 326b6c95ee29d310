"""The Gated DeltaNet state as an associative memory: read, write, erase, and attribute it.

A DeltaNet value head holds a matrix ``S [K, V]`` and updates it with the delta rule::

    S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ

which writes value ``v`` under key ``k`` (replacing what ``S`` returned for ``k``), and reads with
``S_tᵀ q``. This module uses it as one:

- **read**: ``trace.read_memory(layer, t, key)`` is ``S_tᵀ k̂`` ``[B, h, V]`` for a key given as a
  vector, as a position of a trace (:func:`key_from`) or as a token with its context
  (:func:`key_of`); ``trace.nearest_values(layer, read)`` names the tokens whose written value
  vectors ``v_p`` are nearest (cosine), as the organism cards' state readout does.
- **write / erase** are edits of ``layers.i.deltanet.state`` at chosen positions, usable in
  ``lab.run`` / ``lab.generate`` like every edit. :func:`write_memory` applies one delta-rule write
  ``S ← S + β k̂ (v − Sᵀk̂)ᵀ``; :func:`erase_memory` removes what the head returns for a key,
  ``S ← S − k̂ (Sᵀk̂)ᵀ``. The edited state then flows on through the recurrence. Keys and values can
  come from a donor prompt (:func:`key_from`, :func:`value_from`), so an association the model wrote
  elsewhere is transplanted. ``edit.random_control(seed)`` is the same edit with its change
  ``ΔS`` replaced by a random rank-one change of the same Frobenius norm: the control.
- **attribution**: ``trace.state_contributions(layer, t)`` decomposes ``S_t`` exactly into what
  each earlier token still contributes (:func:`state_contributions`).

Keys are L2-normalised (``k̂ = k / ‖k‖``) everywhere, as the model normalises its own q and k.
A key or value "of a position" is the one the model computed *at* that position: after the causal
conv (kernel ``W``, 4 in Qwen3.5), so it mixes the token with the ``W − 1`` before it. In the
``recall`` organisms a pair ``k_j v_j`` is therefore written at the value token *and* at the token
after it (whose conv window still holds both): that is where to take it from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ops
from ..checks import (BadType, BadValue, check_choice, check_finite, check_float, check_index, check_indices,
                      check_int)
from .edits import Edit
from .probes import parse

__all__ = [
    "MemoryVector", "MemoryEdit", "StateContributions", "key_from", "value_from", "key_of", "write_memory",
    "erase_memory", "read_memory", "nearest_values", "state_contributions",
]

_KINDS = ("k", "q", "v")


# ----------------------------------------------------------------------------- keys and values

@dataclass
class MemoryVector:
    """A key (or query, or value) the model computed at ``position`` of ``trace``, per value head.

    Resolved for a DeltaNet layer by :meth:`resolve` (the layer of the edit or read that uses it,
    unless ``layer`` pins one): ``[B, HV, K]`` for ``kind`` ``"k"`` / ``"q"``, ``[B, HV, V]`` for ``"v"``.
    ``position`` is one position for every batch item, or one per batch item of ``trace``.
    """

    trace: object
    position: int | list[int]
    kind: str = "k"
    layer: int | None = None

    def resolve(self, layer: int | None = None) -> torch.Tensor:
        layer = self.layer if self.layer is not None else layer
        if layer is None:
            raise BadValue("this key / value needs a layer: give key_from(trace, position, layer=...)")
        x = _state_inputs(self.trace, layer, f"a {_NOUN[self.kind]} of layer {layer}")
        src = x[self.kind].float()  # [B, T, HV, D]
        B, T = src.shape[:2]
        if isinstance(self.position, int):
            pos = torch.full((B,), check_index("position", self.position, T, what=f"the donor trace ({T} tokens)"))
        else:
            if len(self.position) != B:
                raise BadValue(f"position lists one position per batch item of the donor trace: expected {B}, "
                               f"got {len(self.position)}")
            pos = torch.tensor([check_index("position", p, T, what=f"the donor trace ({T} tokens)")
                                for p in self.position])
        return src[torch.arange(B), pos]  # [B, HV, D]


_NOUN = {"k": "key", "q": "query", "v": "value"}


def _require_trace(trace) -> None:
    """A Trace, recognised by what it holds: memory.py sits below trace.py and does not import it."""
    if not (hasattr(trace, "_states") and callable(getattr(trace, "state", None))):
        raise BadType(f"expected a Trace (from lab.run(..., capture='layers.i.deltanet.state')), "
                      f"got {type(trace).__name__}")


def _state_inputs(trace, layer: int, what: str) -> dict[str, torch.Tensor]:
    _require_trace(trace)
    check_int("layer", layer, lo=0)
    if layer not in trace._states:
        have = sorted(trace._states)
        raise BadValue(f"{what} needs the DeltaNet state of layer {layer}, which this trace did not capture: "
                       f"run with capture='layers.{layer}.deltanet.state' (captured state layers: {have or 'none'})")
    return trace._states[layer]["inputs"]


def _positions_arg(position):
    if isinstance(position, (list, tuple, range)) or (torch.is_tensor(position) and position.ndim == 1):
        out = [int(p) for p in (position.tolist() if torch.is_tensor(position) else position)]
        for p in out:
            check_int("position", p, lo=0)
        if not out:
            raise BadValue("position is empty: give one position, or one per batch item")
        return out
    return check_int("position", position, lo=0)


def key_from(trace, position, *, layer: int | None = None, kind: str = "k") -> MemoryVector:
    """The key the model computed at ``position`` of ``trace`` (normalised, per value head).

    ``kind="q"`` takes the query instead (what the head reads with there). ``position`` is one
    position, or one per batch item of ``trace``. The layer is that of the edit or read using it,
    unless given. ``trace`` must have captured ``layers.i.deltanet.state``.
    """
    check_choice("kind", kind, ("k", "q"))
    mv = MemoryVector(trace, _positions_arg(position), kind, None if layer is None else check_int("layer", layer, lo=0))
    if mv.layer is not None:
        mv.resolve()  # refuse a missing layer or a bad position now, not at use
    else:
        _check_trace_positions(trace, mv.position)
    return mv


def value_from(trace, position, *, layer: int | None = None) -> MemoryVector:
    """The value vector ``v`` the model wrote at ``position`` of ``trace`` (per value head)."""
    mv = MemoryVector(trace, _positions_arg(position), "v", None if layer is None else check_int("layer", layer, lo=0))
    if mv.layer is not None:
        mv.resolve()
    else:
        _check_trace_positions(trace, mv.position)
    return mv


def _check_trace_positions(trace, position) -> None:
    _require_trace(trace)
    if not trace._states:
        raise BadValue("this trace holds no DeltaNet state: run with capture='layers.i.deltanet.state' "
                       "for the layer(s) whose keys / values you want")
    T = next(iter(trace._states.values()))["inputs"]["k"].shape[1]
    for p in [position] if isinstance(position, int) else position:
        check_index("position", p, T, what=f"the donor trace ({T} tokens)")


def key_of(lab, text, *, layer: int, kind: str = "k") -> MemoryVector:
    """The key the model computes for the *last* token of ``text`` (a string or token ids), the tokens
    before it being its context, made explicit: in DeltaNet layer 0 the causal conv sees the last
    ``W − 1`` of them (3 in Qwen3.5), deeper layers see all of it. ``key_of(lab, "k8", layer=0)``
    is the key of ``k8`` with nothing before it (the conv's zero padding)."""
    layer = check_int("layer", layer, lo=0)
    check_choice("kind", kind, ("k", "q"))
    types = list(lab.layer_types)
    check_index("layer", layer, len(types), what="the model's layers")
    if types[layer] != "linear_attention":
        raise BadValue(f"layer {layer} is a {types[layer]} (gated attention) layer: it has no recurrent state and "
                       f"no DeltaNet key; DeltaNet layers: {[i for i, t in enumerate(types) if t == 'linear_attention']}")
    tr = lab.run(text, capture=f"layers.{layer}.deltanet.state")
    return MemoryVector(tr, tr.state_length(layer) - 1, kind, layer)


# ----------------------------------------------------------------------------- write / erase edits

def _as_key_list(key) -> list:
    return list(key) if isinstance(key, (list, tuple)) else [key]


def _check_vector(name: str, x) -> None:
    if isinstance(x, MemoryVector):
        return
    if not torch.is_tensor(x):
        raise BadType(f"{name} must be a tensor ([D], [heads, D] or [B, heads, D]) or key_from / value_from(trace, "
                      f"position); got {type(x).__name__}")
    check_finite(name, x)
    if x.ndim not in (1, 2, 3):
        raise BadValue(f"{name} has shape {list(x.shape)}; expected [D], [heads, D] or [B, heads, D]")
    if x.ndim >= 1 and x.shape[-1] and name.startswith("key") and float(x.float().norm(dim=-1).min()) == 0.0:
        raise BadValue(f"{name} has a zero vector: a key must have a direction")


@dataclass
class MemoryEdit(Edit):
    """A delta-rule write or an erase of a DeltaNet state (an edit of ``layers.i.deltanet.state``)."""

    mode: str = "write"
    keys: list = field(default_factory=list)
    mem_value: object = None
    beta: float = 1.0
    control_seed: int | None = None
    control_match: str = "norm"
    erase_by: str = "key"
    control_scale: float = 1.0

    def describe(self) -> str:
        what = "write" if self.mode == "write" else "erase"
        ctrl = (f", random control matching the {self.control_match} (seed {self.control_seed}"
                f"{'' if self.control_scale == 1.0 else f', ×{self.control_scale}'})"
                if self.control_seed is not None else "")
        if self.erase_by == "write":
            return f"erase the writes at {len(self.keys)} key position(s){ctrl}"
        return f"{what} memory ({len(self.keys)} key(s), beta={self.beta}){ctrl}"

    def random_control(self, seed: int = 0, *, match: str = "norm", scale: float = 1.0) -> MemoryEdit:
        """The control of this edit, at the same positions, heads and batch items.

        ``match="norm"``: the change ``ΔS`` is replaced by a random rank-one ``u wᵀ`` of the same Frobenius
        norm (``u`` a random unit key, ``w`` a random value direction), per head and batch item; ``scale``
        multiplies that norm (a dose-response: how large a random change the head tolerates).
        ``match="key"``: the same write / erase with each key replaced by a random unit key (for
        ``erase_memory(..., by="write")``: each removed write ``(β_s u_s) v_sᵀ`` with ``u_s`` replaced by a
        random direction of the same norm, its value kept; each term keeps its norm, their sum need not).
        """
        seed = check_int("seed", seed, lo=0)
        check_choice("match", match, ("norm", "key"))
        scale = check_float("scale", scale, lo=0.0)
        if match == "key" and scale != 1.0:
            raise BadValue(f"scale={scale} applies to match='norm' (the random rank-one change); match='key' "
                           "replaces the keys and keeps the edit's own size")
        return MemoryEdit(positions=self.positions, heads=self.heads, batch=self.batch, mode=self.mode,
                          keys=list(self.keys), mem_value=self.mem_value, beta=self.beta, control_seed=seed,
                          control_match=match, erase_by=self.erase_by, control_scale=scale)

    # -- validation against the model, before running (called by instrument.plan)
    def validate(self, name: str, text_config) -> None:
        layer, kind = parse(name)
        types = list(text_config.layer_types)
        if kind != "deltanet.state":
            raise BadValue(f"{self.mode}_memory edits a DeltaNet state: key it by 'layers.i.deltanet.state', "
                           f"not {name!r}")
        if types[layer] != "linear_attention":
            raise BadValue(f"layer {layer} is a {types[layer]} (gated attention) layer: it has no recurrent state "
                           f"to {self.mode}; DeltaNet layers: {_linear(types)}")
        HV, K, V = (text_config.linear_num_value_heads, text_config.linear_key_head_dim,
                    text_config.linear_value_head_dim)
        heads = check_indices("heads", self.heads, HV, what=f"layer {layer}'s value heads")
        h = HV if heads is None else len(heads)
        for i, key in enumerate(self.keys):
            self._check_size(f"key{'' if len(self.keys) == 1 else f' {i}'}", key, layer, h, HV, K, "K (key head dim)")
        if self.mem_value is not None:
            self._check_size("value", self.mem_value, layer, h, HV, V, "V (value head dim)")

    @staticmethod
    def _check_size(name, x, layer, h, HV, D, what) -> None:
        if isinstance(x, MemoryVector):
            r = x.resolve(layer)  # [B, HV, D]
            got_h, got_d = r.shape[1], r.shape[2]
            if got_h != HV or got_d != D:
                raise BadValue(f"{name} from the donor trace has {got_h} heads of size {got_d}; layer {layer} has "
                               f"{HV} value heads with {what} = {D} (a donor of another model?)")
            return
        if x.shape[-1] != D:
            raise BadValue(f"{name} has size {x.shape[-1]} in its last dim; layer {layer} has {what} = {D}")
        if x.ndim >= 2 and x.shape[-2] != h:
            raise BadValue(f"{name} has shape {list(x.shape)}: {x.shape[-2]} heads, but the edit selects {h} "
                           f"value head(s); give [{D}], [{h}, {D}] or [B, {h}, {D}]")

    # -- application (the session calls this with the selected slice of S_t)
    def new_values(self, name: str, old: torch.Tensor, rel_positions, abs_positions) -> torch.Tensor:
        """``old`` ``[B', h, K, V]``: the state of the selected batch items and heads after token t."""
        layer = parse(name)[0]
        S = old.float()
        if self.mode == "erase" and self.erase_by == "write":
            return self._erase_writes(layer, S, abs_positions).to(old.dtype)
        if self.mode == "erase" and len(self.keys) > 1:
            return self._erase_span(layer, S, abs_positions).to(old.dtype)
        for i, key in enumerate(self.keys):
            k = _l2(self._vectors(key, layer, S, "key"))  # [B', h, K]
            seed = None if self.control_seed is None else self.control_seed + 1_000_003 * i + (abs_positions or [0])[0]
            if seed is not None and self.control_match == "key":
                k = _l2(torch.randn(k.shape, generator=torch.Generator().manual_seed(seed))).to(k)
            read = torch.einsum("bhkv,bhk->bhv", S, k)  # what the head returns for k
            if self.mode == "write":
                v = self._vectors(self.mem_value, layer, S, "value")  # [B', h, V]
                delta = self.beta * k[..., :, None] * (v - read)[..., None, :]
            else:
                delta = -k[..., :, None] * read[..., None, :]
            if seed is not None and self.control_match == "norm":
                delta = _random_like(delta, seed) * self.control_scale
            S = S + delta
        return S.to(old.dtype)

    def _erase_span(self, layer: int, S: torch.Tensor, abs_positions) -> torch.Tensor:
        """``S ← (I − Q Qᵀ) S`` with ``Q`` an orthonormal basis of the keys: the head returns 0 for each of them."""
        keys = torch.stack([_l2(self._vectors(k, layer, S, "key")) for k in self.keys], -1)  # [B', h, K, m]
        seed = None if self.control_seed is None else self.control_seed + (abs_positions or [0])[0]
        if seed is not None and self.control_match == "key":
            keys = torch.randn(keys.shape, generator=torch.Generator().manual_seed(seed)).to(keys)
        Q, _ = torch.linalg.qr(keys)  # [B', h, K, m]
        delta = -Q @ (Q.transpose(-1, -2) @ S)
        if seed is not None and self.control_match == "norm":
            delta = _random_like(delta, seed) * self.control_scale
        return S + delta

    def _erase_writes(self, layer: int, S: torch.Tensor, abs_positions) -> torch.Tensor:
        """``S_t ← S_t − Σ_s C_s``: remove what the writes at the keys' positions ``s`` still hold at ``t``.

        ``C_s = (β_s u_s) v_sᵀ`` with ``u_s = M_t⋯M_{s+1} k_s`` (:func:`state_contributions` of the keys'
        trace, which must be a plain run of the edited input). ``S`` ``[B', h, K, V]``.
        """
        if not abs_positions or len(abs_positions) != 1:
            raise BadValue(f"erase_memory(..., by='write') edits one position (the state holds the writes' "
                           f"contributions as of that token); this run selects positions {abs_positions}")
        t = abs_positions[0]
        trace = self.keys[0].trace
        Bt = _state_inputs(trace, layer, f"erasing the writes of layer {layer}")["k"].shape[0]
        per_key = [[k.position] * Bt if isinstance(k.position, int) else list(k.position) for k in self.keys]
        sel_b = check_indices("batch", self.batch, Bt, what="the keys' trace") or list(range(Bt))
        if len(sel_b) != S.shape[0]:
            raise BadValue(f"the keys' trace has {Bt} batch items and the edit selects {S.shape[0]} of the run: "
                           "by='write' removes the writes of the run itself, one trace item per edited item")
        late = [p[b] for p in per_key for b in sel_b if p[b] > t]
        if late:
            raise BadValue(f"erase_memory(..., by='write') at token {t} cannot remove the write at {late[0]}: it "
                           f"comes later (erase at a position at or after the write)")
        since = min(p[b] for p in per_key for b in sel_b)
        c = state_contributions(trace, layer, t, heads=self.heads, since=since)
        gen = None if self.control_seed is None else torch.Generator().manual_seed(self.control_seed + t)
        delta = torch.zeros_like(S)
        for i, b in enumerate(sel_b):
            for s in sorted({p[b] for p in per_key}):  # a write named twice is removed once
                u = c.weighted_keys[b, :, s - since]  # [h, K]: β_s u_s
                if gen is not None and self.control_match == "key":
                    u = _l2(torch.randn(u.shape, generator=gen)) * u.norm(dim=-1, keepdim=True)
                delta[i] -= u[:, :, None] * c.values[b, :, s - since][:, None, :].to(u)
        if gen is not None and self.control_match == "norm":
            delta = _random_like(delta, self.control_seed + t) * self.control_scale
        return S + delta

    def _vectors(self, x, layer: int, S: torch.Tensor, what: str) -> torch.Tensor:
        """``x`` as ``[B', h, D]`` for the selected batch items and heads."""
        Bsel, h = S.shape[:2]
        if isinstance(x, MemoryVector):
            full = x.resolve(layer)  # [Bd, HV, D]
            if self.heads is not None:
                full = full[:, check_indices("heads", self.heads, full.shape[1])]
            if full.shape[0] == 1:
                return full.expand(Bsel, -1, -1).to(S)
            if self.batch is not None:
                full = full[check_indices("batch", self.batch, full.shape[0])]
            if full.shape[0] != Bsel:
                raise BadValue(f"the donor trace has {full.shape[0]} batch items and the edited run {Bsel}: a donor "
                               "gives one item for all, or one per item")
            return full.to(S)
        x = x.to(S)
        if x.ndim == 1:
            return x.expand(Bsel, h, -1)
        if x.ndim == 2:
            return x.expand(Bsel, -1, -1)
        if x.shape[0] not in (1, Bsel):
            raise BadValue(f"the {what} has {x.shape[0]} batch items and the edited run {Bsel}; give 1 or {Bsel}")
        return x.expand(Bsel, -1, -1)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _random_like(delta: torch.Tensor, seed: int) -> torch.Tensor:
    """A random rank-one ``u wᵀ`` with the Frobenius norm of ``delta`` ``[..., K, V]``, per leading index."""
    gen = torch.Generator().manual_seed(int(seed))
    u = _l2(torch.randn(*delta.shape[:-1], generator=gen, dtype=torch.float32))  # [..., K]
    w = _l2(torch.randn(*delta.shape[:-2], delta.shape[-1], generator=gen, dtype=torch.float32))  # [..., V]
    norm = delta.flatten(-2).norm(dim=-1)  # [...]
    return (norm[..., None, None] * u[..., :, None] * w[..., None, :]).to(delta)


def _linear(types) -> list[int]:
    return [i for i, t in enumerate(types) if t == "linear_attention"]


def _edit_selection(positions, heads, batch):
    positions = check_indices("positions", positions, None)
    heads = check_indices("heads", heads, None)
    batch = check_indices("batch", batch, None)
    return positions, heads, batch


def write_memory(key, value, *, beta: float = 1.0, heads=None, positions=None, batch=None) -> MemoryEdit:
    """One delta-rule write ``S ← S + β k̂ (v − Sᵀk̂)ᵀ`` into the state after each chosen position.

    Use it as the edit of a DeltaNet state, in ``run`` or ``generate``::

        lab.run(prompt, edits={"layers.0.deltanet.state":
                               write_memory(key_from(donor, 6), value_from(donor, 6), heads=[1], positions=[16])})

    ``key``: ``[K]`` (every selected head), ``[h, K]``, ``[B, h, K]`` (``h`` the selected heads), or
    :func:`key_from` / :func:`key_of`; a list of keys writes each in turn (then ``value`` is a list
    too). ``value``: likewise with ``V``. ``beta`` in ``[0, 1]``: with 1 the head returns exactly
    ``v`` for ``k`` afterwards. ``positions``: absolute token positions (all when None; in
    ``generate``, positions past the prompt are generated tokens). Later tokens see the written state.
    """
    beta = check_float("beta", beta, lo=0.0, hi=1.0)
    keys, values = _as_key_list(key), _as_key_list(value)
    if len(keys) != len(values):
        raise BadValue(f"write_memory got {len(keys)} key(s) and {len(values)} value(s): give one value per key")
    if not keys:
        raise BadValue("write_memory needs at least one key")
    for i, (k, v) in enumerate(zip(keys, values)):
        _check_vector("key" if len(keys) == 1 else f"key {i}", k)
        _check_vector("value" if len(keys) == 1 else f"value {i}", v)
    positions, heads, batch = _edit_selection(positions, heads, batch)
    if len(keys) == 1:
        return MemoryEdit(positions=positions, heads=heads, batch=batch, mode="write", keys=keys,
                          mem_value=values[0], beta=beta)
    return _Chain([MemoryEdit(positions=positions, heads=heads, batch=batch, mode="write", keys=[k], mem_value=v,
                              beta=beta) for k, v in zip(keys, values)])


def erase_memory(key, *, heads=None, positions=None, batch=None, by: str = "key") -> MemoryEdit:
    """Remove what the head returns for ``key``: ``S ← S − k̂ (Sᵀk̂)ᵀ`` after each chosen position.

    Afterwards ``Sᵀk̂ = 0``; reads with other keys change by ``(q·k̂)`` times what was removed. A list of
    keys erases them all at once: ``S ← (I − Q Qᵀ) S`` with ``Q`` an orthonormal basis of their span, so
    the head returns 0 for every one of them (rank-one erasures in turn would not: each would bring
    back part of the one before when keys overlap). Shapes and selections as :func:`write_memory`.

    ``by="write"``: remove the *writes* the keys name instead of everything stored along their
    directions. Each key is ``key_from(trace, s)`` of a plain run of the edited input, and the edit
    (one position ``t``) subtracts what the write at ``s`` still holds at ``t``,
    ``C_s = M_t⋯M_{s+1} β_s k_s v_sᵀ`` (:func:`state_contributions`): the state becomes what it would
    be had token ``s`` written nothing, and every other token's contribution stays exactly as it was.
    Keys of pairs whose conv windows overlap share directions, so projecting one out (``by="key"``)
    also takes part of its neighbours; removing its writes does not.
    """
    check_choice("by", by, ("key", "write"))
    keys = _as_key_list(key)
    if not keys:
        raise BadValue("erase_memory needs at least one key")
    for i, k in enumerate(keys):
        _check_vector("key" if len(keys) == 1 else f"key {i}", k)
    positions, heads, batch = _edit_selection(positions, heads, batch)
    if by == "write":
        bad = [k for k in keys if not (isinstance(k, MemoryVector) and k.kind == "k")]
        if bad:
            raise BadValue("erase_memory(..., by='write') names writes by where they were made: give keys as "
                           f"key_from(trace, position), not {type(bad[0]).__name__}")
        if len({id(k.trace) for k in keys}) != 1:
            raise BadValue("erase_memory(..., by='write') removes writes of one run: give keys of one trace")
        if positions is None or len(positions) != 1:
            raise BadValue(f"erase_memory(..., by='write') edits one position (the writes' contributions are "
                           f"those held at that token); got positions={positions}")
    return MemoryEdit(positions=positions, heads=heads, batch=batch, mode="erase", keys=keys, erase_by=by)


class _Chain(MemoryEdit):
    """Several writes at the same positions, applied in turn (``write_memory`` with lists)."""

    def __init__(self, parts: list[MemoryEdit]):
        first = parts[0]
        super().__init__(positions=first.positions, heads=first.heads, batch=first.batch, mode="write",
                         keys=[k for p in parts for k in p.keys], beta=first.beta)
        self.parts = parts

    def describe(self) -> str:
        return f"{len(self.parts)} memory writes in turn" + (
            f", random control matching the {self.parts[0].control_match} (seed {self.parts[0].control_seed})"
            if self.parts[0].control_seed is not None else "")

    def random_control(self, seed: int = 0, *, match: str = "norm", scale: float = 1.0) -> MemoryEdit:
        return _Chain([p.random_control(seed + 7919 * i, match=match, scale=scale) for i, p in enumerate(self.parts)])

    def validate(self, name: str, text_config) -> None:
        for p in self.parts:
            p.validate(name, text_config)

    def new_values(self, name, old, rel_positions, abs_positions):
        for p in self.parts:
            old = p.new_values(name, old, rel_positions, abs_positions)
        return old


# ----------------------------------------------------------------------------- reading

def _resolve_key(trace, layer: int, key, lab=None, kind: str = "k") -> torch.Tensor:
    """A key as ``[B or 1, HV or h, K]`` (or ``[K]``) for reading layer ``layer`` of ``trace``."""
    if isinstance(key, str) or (isinstance(key, list) and key and isinstance(key[0], str)):
        if lab is None:
            raise BadValue(f"a key given as a token ({key!r}) needs lab=...: the model computes its key")
        return key_of(lab, key if isinstance(key, str) else " ".join(key), layer=layer, kind=kind).resolve(layer)
    if isinstance(key, bool):
        raise BadType(f"key must be a tensor, a position (int), a token (str) or key_from(...); got {key!r}")
    if isinstance(key, int):
        return key_from(trace, key, layer=layer, kind=kind).resolve(layer)
    if isinstance(key, MemoryVector):
        return key.resolve(layer)
    if torch.is_tensor(key):
        check_finite("key", key)
        return key.float()
    raise BadType(f"key must be a tensor ([K], [h, K] or [B, h, K]), a position of this trace (int), a token "
                  f"(str, with lab=) or key_from(trace, position); got {type(key).__name__}")


def read_memory(trace, layer: int, t: int, key, *, heads=None, lab=None, kind: str = "k") -> torch.Tensor:
    """``S_tᵀ k̂`` ``[B, h, V]``: what value head(s) ``heads`` of DeltaNet ``layer`` return for ``key`` after token ``t``.

    ``key``: a vector ``[K]`` / ``[h, K]`` / ``[B, h, K]``; a position of ``trace`` (the key the model
    computed there; ``kind="q"`` for its query); :func:`key_from` of another trace; or a token as a
    string (with ``lab=``; the text before its last token is the explicit context, see :func:`key_of`).
    """
    x = _state_inputs(trace, layer, f"reading layer {layer}'s memory")
    T, HV, K = x["k"].shape[1], x["k"].shape[2], x["k"].shape[3]
    t = check_index("t", t, T, what=f"layer {layer}'s state ({T} positions)")
    heads = check_indices("heads", heads, HV, what=f"layer {layer}'s {HV} captured value heads")
    sel = list(range(HV)) if heads is None else heads
    k = _resolve_key(trace, layer, key, lab, kind)
    if k.shape[-1] != K:
        raise BadValue(f"key has size {k.shape[-1]}; layer {layer} has key head dim K = {K}")
    if k.ndim == 3 and k.shape[1] == HV and len(sel) != HV:
        k = k[:, sel]  # a key resolved for every head
    elif k.ndim >= 2 and k.shape[-2] != len(sel):
        raise BadValue(f"key has {k.shape[-2]} heads; the read selects {len(sel)} value head(s)")
    S = trace.state(layer, t)[:, sel]  # [B, h, K, V]
    k = _l2(k).to(S)
    if k.ndim == 1:
        k = k.expand(S.shape[0], len(sel), -1)
    elif k.ndim == 2:
        k = k.expand(S.shape[0], -1, -1)
    elif k.shape[0] not in (1, S.shape[0]):
        raise BadValue(f"key has {k.shape[0]} batch items, the trace {S.shape[0]}; give 1 or {S.shape[0]}")
    return torch.einsum("bhkv,bhk->bhv", S, k.expand(S.shape[0], -1, -1))


def nearest_values(trace, layer: int, read: torch.Tensor, *, heads=None, positions=None, top: int = 5,
                   batch: int = 0) -> list[list[dict]]:
    """Name the value tokens nearest to ``read`` ``[B, h, V]`` (e.g. from :func:`read_memory`).

    Candidates are the value vectors ``v_p`` the model wrote at ``positions`` of ``trace`` (all by
    default), compared by cosine similarity, as the organism cards' readout does. Returns, per
    selected head, the ``top`` candidates of batch item ``batch``:
    ``[{"token", "position", "score"}, ...]``, best first.
    """
    x = _state_inputs(trace, layer, f"decoding layer {layer}'s memory")
    v = x["v"].float()  # [B, T, HV, V]
    B, T, HV, V = v.shape
    heads = check_indices("heads", heads, HV, what=f"layer {layer}'s {HV} captured value heads")
    sel = list(range(HV)) if heads is None else heads
    positions = check_indices("positions", positions, T, what=f"the trace ({T} tokens)") or list(range(T))
    top = check_int("top", top, lo=1)
    batch = check_index("batch", batch, B, what="the trace's batch")
    if not torch.is_tensor(read):
        raise BadType(f"read must be a tensor [B, h, V] (from read_memory), got {type(read).__name__}")
    if read.ndim == 2:
        read = read[None]
    if read.ndim != 3 or read.shape[1] != len(sel) or read.shape[2] != V:
        raise BadValue(f"read has shape {list(read.shape)}; expected [B, {len(sel)}, {V}] for the selected heads")
    r = read[min(batch, read.shape[0] - 1)].float()  # [h, V]
    cand = v[batch][positions][:, sel]  # [P, h, V]
    sim = torch.nn.functional.cosine_similarity(cand, r[None], dim=-1)  # [P, h]
    names = trace.token_strings or [str(i) for i in range(T)]
    out = []
    for j in range(len(sel)):
        order = sim[:, j].argsort(descending=True)[:top].tolist()
        out.append([{"token": names[positions[i]] if positions[i] < len(names) else str(positions[i]),
                     "position": positions[i], "score": float(sim[i, j])} for i in order])
    return out


# ----------------------------------------------------------------------------- attribution

@dataclass
class StateContributions:
    """``S_t = carried + Σ_s C_s`` exactly, with ``C_s = M_t⋯M_{s+1} β_s k_s v_sᵀ`` (``M_r = exp(g_r)(I − β_r k_r k_rᵀ)``).

    Per token ``s`` in ``positions`` (``since … t``), batch item and selected head:

    - ``held`` ``[B, h, S]``: ``‖C_s‖_F``, what the state still holds of token ``s``'s write;
    - ``written`` ``[B, h, S]``: ``β_s ‖k_s‖ ‖v_s‖``, the write's norm when it was made;
    - ``decayed`` ``[B, h, S]``: ``exp(Σ_{s<r≤t} g_r) · written``, what decay alone would have left;
    - ``erased`` ``[B, h, S]``: ``decayed − held`` (≥ 0), what later writes removed (the delta rule's
      ``−β_r k_r k_rᵀ``; the negative part of the effective attention);
    - ``carried`` ``[B, h, K, V]``: ``M_t⋯M_since S_{since−1}``, the state from before ``since``
      (zero for a prompt decomposed from its start);
    - ``matrices``: ``{s: C_s [B, h, K, V]}`` for the positions asked for.

    ``C_s`` is rank one, ``(β_s u_s) v_sᵀ`` with ``u_s = M_t⋯M_{s+1} k_s``: ``weighted_keys``
    ``[B, h, S, K]`` holds ``β_s u_s`` and ``values`` ``[B, h, S, V]`` holds ``v_s``.
    """

    layer: int
    t: int
    heads: list[int]
    positions: list[int]
    tokens: list[str]
    weighted_keys: torch.Tensor
    values: torch.Tensor
    held: torch.Tensor
    written: torch.Tensor
    decayed: torch.Tensor
    carried: torch.Tensor
    matrices: dict[int, torch.Tensor]

    @property
    def erased(self) -> torch.Tensor:
        return (self.decayed - self.held).clamp_min(0)

    def share(self) -> torch.Tensor:
        """``held`` as a fraction of its sum over tokens ``[B, h, S]``: the mass each token carries."""
        return self.held / self.held.sum(-1, keepdim=True).clamp_min(1e-30)

    def reconstruct(self) -> torch.Tensor:
        """``carried + Σ_s C_s`` ``[B, h, K, V]`` (equals ``S_t``)."""
        return self.carried + torch.einsum("bhsk,bhsv->bhkv", self.weighted_keys, self.values)


def state_contributions(trace, layer: int, t: int, *, heads=None, matrices=None, since: int = 0,
                        budget_bytes: int = 1 << 27) -> StateContributions:
    """Decompose ``S_t`` of DeltaNet ``layer`` into the contributions of tokens ``since … t`` (exact).

    ``β_s u_s = β_s M_t⋯M_{s+1} k_s`` is the effective attention of ``t`` onto ``s`` with the basis
    vectors ``e_1 … e_K`` as queries (``M_r`` is symmetric), computed by the chunked WY backward
    pass of :func:`qwen35_lab.ops.deltanet_effective_attention` over the replay inputs; the state
    before ``since`` comes from the chunk checkpoints (``trace.state``) and is carried through
    ``M_t⋯M_since`` by the same pass. No per-token state is materialised: the cost is
    ``K`` effective-attention rows, in blocks of at most ``budget_bytes``.

    ``matrices``: positions ``s`` whose full ``C_s`` ``[B, h, K, V]`` to return.
    """
    x = _state_inputs(trace, layer, f"the attribution of layer {layer}'s state")
    k_all = x["k"]
    B, T, HV, K = k_all.shape
    V = x["v"].shape[-1]
    t = check_index("t", t, T, what=f"layer {layer}'s state ({T} positions)")
    since = check_int("since", since, lo=0, hi=t)
    heads = check_indices("heads", heads, HV, what=f"layer {layer}'s {HV} captured value heads")
    sel = list(range(HV)) if heads is None else heads
    positions = list(range(since, t + 1))
    wanted = check_indices("matrices", matrices, None) or []
    bad = [s for s in wanted if not since <= s <= t]
    if bad:
        raise BadValue(f"matrices asks for C_{bad[0]}, outside the decomposed tokens {since}..{t}")
    budget_bytes = check_int("budget_bytes", budget_bytes, lo=1)
    window = slice(since, t + 1)
    k = x["k"][:, window][:, :, sel].float()  # [B, S, h, K]
    v = x["v"][:, window][:, :, sel].float()  # [B, S, h, V]
    g = x["g"][:, window][:, :, sel].float()  # [B, S, h]
    beta = x["beta"][:, window][:, :, sel].float()  # [B, S, h]
    S_len, h = t + 1 - since, len(sel)

    U = torch.empty(B, h, S_len, K)  # β_s u_s
    carry_q = torch.empty(B, h, K, K)  # rows: (M_since … M_t) e_i
    eye = torch.eye(K)
    per_item = 4 * K * S_len * K * 6  # the basis queries, keys and the op's chunk tensors, roughly
    step = max(1, budget_bytes // max(per_item, 1))
    for hi in range(h):
        for b0 in range(0, B, step):
            b1 = min(B, b0 + step)
            nb = b1 - b0
            kb = k[b0:b1, :, hi:hi + 1].repeat_interleave(K, dim=0)  # [nb*K, S, 1, K]
            qb = torch.zeros_like(kb)
            qb[:, -1, 0] = eye.repeat(nb, 1)  # query e_i at position t
            gb = g[b0:b1, :, hi:hi + 1].repeat_interleave(K, dim=0)
            bb = beta[b0:b1, :, hi:hi + 1].repeat_interleave(K, dim=0)
            A, w = ops.deltanet_effective_attention(qb, kb, gb, bb, rows=[S_len - 1], use_qk_l2norm=False,
                                                    scale=1.0, chunk_size=trace.chunk_size,
                                                    return_state_query=True)  # [nb*K, 1, 1, S], [nb*K, 1, 1, K]
            U[b0:b1, hi] = A[:, 0, 0].view(nb, K, S_len).transpose(1, 2)
            carry_q[b0:b1, hi] = w[:, 0, 0].view(nb, K, K)
    if since > 0:
        S0 = trace.state(layer, since - 1)[:, sel].float()  # [B, h, K, V], from the nearest checkpoint
        carried = carry_q @ S0
    else:
        first = min(trace._states[layer]["checkpoints"]) if trace._states[layer]["checkpoints"] else None
        S0 = trace._states[layer]["checkpoints"].get(0) if first == 0 else None
        carried = carry_q @ S0[:, sel].float() if S0 is not None else torch.zeros(B, h, K, V)
    vt = v.permute(0, 2, 1, 3)  # [B, h, S, V]
    held = U.norm(dim=-1) * vt.norm(dim=-1)
    written = beta.permute(0, 2, 1) * k.norm(dim=-1).permute(0, 2, 1) * vt.norm(dim=-1)
    gt = g.permute(0, 2, 1)  # [B, h, S]
    after = gt.flip(-1).cumsum(-1).flip(-1) - gt  # Σ_{s<r≤t} g_r
    decayed = written * after.exp()
    mats = {s: U[:, :, s - since, :, None] * vt[:, :, s - since, None, :] for s in wanted}
    names = trace.token_strings
    tokens = [names[s] if s < len(names) else str(s) for s in positions]
    return StateContributions(layer=layer, t=t, heads=sel, positions=positions, tokens=tokens, weighted_keys=U,
                              values=vt, held=held, written=written, decayed=decayed, carried=carried,
                              matrices=mats)
