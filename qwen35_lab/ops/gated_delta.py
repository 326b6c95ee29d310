"""Gated delta rule: torch reference implementations.

The recurrence of the Gated DeltaNet layer (Yang et al., "Gated Delta Networks"),
written exactly as transformers' ``modeling_qwen3_5`` computes it::

    S_t = exp(g_t) (I - beta_t k_t k_tᵀ) S_{t-1} + beta_t k_t v_tᵀ      # [K, V] per value head
    o_t = S_tᵀ q_t * scale                                               # [V]

Conventions (shared by every function here and by the Triton kernels):

- ``q``, ``k``: ``[B, T, H, K]``; ``v``: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H``.
  Key head ``h`` serves the ``HV // H`` *consecutive* value heads
  ``h * (HV // H) ... (h + 1) * (HV // H) - 1`` (``repeat_interleave`` on dim 2).
- ``g`` (log decay, ``<= 0``) and ``beta`` (write strength, in ``[0, 1]``): ``[B, T, HV]``.
- ``state``: ``[B, HV, K, V]``.
- With ``use_qk_l2norm`` q and k are L2-normalised per head, ``x * rsqrt(sum(x²) + 1e-6)``;
  q is then multiplied by ``scale`` (default ``K ** -0.5``).
- All math runs in fp32; outputs are cast back to ``q.dtype``; states stay fp32.

Chunk states follow flash-linear-attention's ``h``: ``chunk_states[:, i]`` is the state at the
*start* of chunk ``i`` (before token ``i * chunk_size`` is written). Any single state is then
``replay_state``: one stored chunk state plus at most one chunk of updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from ..checks import BadType, BadValue

__all__ = [
    "chunk_gated_delta_rule",
    "deltanet_effective_attention",
    "naive_recurrent_gated_delta_rule",
    "recurrent_gated_delta_step",
    "replay_state",
    "replay_states",
]

L2NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- validation


def _check_tensor(name: str, x, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise BadType(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise BadValue(f"{name} must have shape {layout} ({rank} dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BadType(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise BadValue(
            f"{name} has shape {tuple(x.shape)}, expected {layout} = {tuple(expected)}"
        )


def _check_scale(scale) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
    ):
        raise BadValue(f"scale must be a positive number or None (= K ** -0.5), got {scale!r}")


def _check_chunk_size(chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise BadValue(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def _check_sequence_inputs(q, k, v, g, beta, initial_state=None) -> tuple[int, int, int, int, int, int]:
    """Validate the ``[B, T, ...]`` inputs of the gated delta rule; return ``(B, T, H, HV, K, V)``.

    ``q`` or ``v`` may be None for functions that do not take them (then ``V`` is None).
    """
    if q is not None:
        _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 4, "[B, T, H, K]")
    if v is not None:
        _check_tensor("v", v, 4, "[B, T, HV, V]")
    _check_tensor("g", g, 3, "[B, T, HV]")
    _check_tensor("beta", beta, 3, "[B, T, HV]")
    B, T, H, K = k.shape
    if q is not None:
        _check_shape("q", q, (B, T, H, K), "[B, T, H, K] like k")
    if T < 1:
        raise BadValue(f"the sequence must have at least one token, got T = {T} (k shape {tuple(k.shape)})")
    if v is not None:
        HV, V = v.shape[2], v.shape[3]
        if v.shape[:2] != (B, T):
            raise BadValue(f"v has shape {tuple(v.shape)}, expected [B, T, HV, V] with B, T = {B}, {T} like k")
        what = f"v shape {tuple(v.shape)}"
    else:
        HV, V = g.shape[2], None
        what = f"g shape {tuple(g.shape)}"
    if HV % H != 0:
        raise BadValue(
            f"the number of value heads HV = {HV} ({what}) must be a multiple of the "
            f"number of key heads H = {H} (k shape {tuple(k.shape)})"
        )
    _check_shape("g", g, (B, T, HV), "[B, T, HV]")
    _check_shape("beta", beta, (B, T, HV), "[B, T, HV]")
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4, "[B, HV, K, V]")
        _check_shape("initial_state", initial_state, (B, HV, K, V), "[B, HV, K, V]")
    tensors = [x for x in (q, k, v, g, beta, initial_state) if x is not None]
    devices = {x.device for x in tensors}
    if len(devices) > 1:
        raise BadValue(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    return B, T, H, HV, K, V


def _check_index_list(name: str, values, size: int, what: str) -> list[int]:
    """Normalise ``None`` / int / sequence / 1-D tensor of indices into a list in ``[0, size)``."""
    if values is None:
        return list(range(size))
    if isinstance(values, torch.Tensor):
        if values.dim() > 1 or values.is_floating_point():
            raise BadValue(f"{name} must be a 1-D integer tensor or a list of ints, got {values!r}")
        values = values.reshape(-1).tolist()
    elif isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    elif not isinstance(values, Sequence) or isinstance(values, str):
        raise BadType(f"{name} must be None, an int or a sequence of ints, got {type(values).__name__}")
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int):
            raise BadType(f"{name} must contain ints, got {x!r}")
        if not 0 <= x < size:
            raise BadValue(f"{name} contains {x}, valid {what} are 0 ... {size - 1}")
        out.append(x)
    if not out:
        raise BadValue(f"{name} is empty; pass None for all {what}")
    return out


# ----------------------------------------------------------------------------- shared math


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x * rsqrt(sum(x²) + 1e-6)`` over the last dim, exactly as transformers' ``l2norm``."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + L2NORM_EPS)


def _l2norm_(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In place: ``x * rsqrt(sum(x²) + 1e-6) * scale`` over the last dim (transformers' ``l2norm``)."""
    sum_sq = torch.einsum("...k,...k->...", x, x).unsqueeze(-1)
    return x.mul_(sum_sq.add_(L2NORM_EPS).rsqrt_().mul_(scale))


def _load_chunks(x: torch.Tensor, t0: int, n_chunks: int, chunk_size: int) -> torch.Tensor:
    """Tokens ``t0 ... t0 + n_chunks * chunk_size - 1`` of ``x`` as fresh fp32 chunks, zero past the end.

    ``[B, T, heads, D] -> [B, heads, n_chunks, C, D]`` and ``[B, T, heads] -> [B, heads, n_chunks, C]``.
    """
    B, T, heads = x.shape[:3]
    n = min(T, t0 + n_chunks * chunk_size) - t0
    out = torch.empty(B, heads, n_chunks * chunk_size, *x.shape[3:], dtype=torch.float32, device=x.device)
    out[:, :, :n].copy_(x[:, t0 : t0 + n].transpose(1, 2))
    if n < out.shape[2]:
        out[:, :, n:].zero_()
    return out.view(B, heads, n_chunks, chunk_size, *x.shape[3:])


def _causal_decay(gamma: torch.Tensor) -> torch.Tensor:
    """``D[..., r, j] = exp(gamma_r - gamma_j)`` for ``j <= r``, else 0.  ``[..., C] -> [..., C, C]``."""
    C = gamma.shape[-1]
    upper = torch.ones(C, C, dtype=torch.bool, device=gamma.device).triu(1)
    diff = gamma.unsqueeze(-1) - gamma.unsqueeze(-2)
    return diff.masked_fill_(upper, float("-inf")).exp_()


def _unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """``(I + strict_lower(L))⁻¹`` for ``[..., C, C]`` (the diagonal of ``L`` is ignored)."""
    C = L.shape[-1]
    eye = torch.eye(C, dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)


class _Chunks:
    """The fp32 inputs of ``n`` consecutive chunks and their WY/UT quantities.

    With ``gamma = cumsum(g)`` inside each chunk and
    ``L[r, j] = beta_r exp(gamma_r - gamma_j) k_r·k_j`` for ``j < r``, the values a chunk writes into
    the state are ``u = t_inv (beta v - beta exp(gamma) k S_0)`` with ``t_inv = (I + L)⁻¹``.
    Key-side tensors carry a broadcast group axis so that they meet value-side ones without copies:
    ``[B, H, 1, n, C, K]`` against ``[B, H, G, n, C, *]`` (value head = key head * G + group).
    """

    def __init__(self, q, k, v, g, beta, t0, n, chunk_size, use_qk_l2norm, scale):
        B, _, H, _ = k.shape
        HV = g.shape[2]
        G = HV // H
        self.k = _load_chunks(k, t0, n, chunk_size).unsqueeze(2)  # [B, H, 1, n, C, K]
        if use_qk_l2norm:
            _l2norm_(self.k)
        if q is not None:
            self.q = _load_chunks(q, t0, n, chunk_size).unsqueeze(2)  # [B, H, 1, n, C, K]
            if use_qk_l2norm:
                _l2norm_(self.q, scale)
            else:
                self.q.mul_(scale)
        self.v = None if v is None else _load_chunks(v, t0, n, chunk_size).view(B, H, G, n, chunk_size, -1)
        self.beta = _load_chunks(beta, t0, n, chunk_size).view(B, H, G, n, chunk_size)
        self.gamma = _load_chunks(g, t0, n, chunk_size).view(B, H, G, n, chunk_size).cumsum(dim=-1)
        self.decay = _causal_decay(self.gamma)  # [B, H, G, n, C, C]
        L = self.decay * (self.k @ self.k.transpose(-1, -2))
        self.t_inv = _unit_lower_inverse(L.mul_(self.beta.unsqueeze(-1)))  # [B, H, G, n, C, C]


def _as_groups(state: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, HV, ...] -> [B, H, G, ...]`` (a view)."""
    return state.view(state.shape[0], H, state.shape[1] // H, *state.shape[2:])


def _blocks(num_chunks: int, chunks_per_block: int):
    for c0 in range(0, num_chunks, chunks_per_block):
        yield c0, min(chunks_per_block, num_chunks - c0)


def _chunks_per_block(B: int, HV: int, chunk_size: int, K: int, V: int) -> int:
    # Blocks of about 4 MiB per tensor: reused by the allocator instead of fresh pages each time.
    return max(1, (1 << 20) // (B * HV * chunk_size * max(K, V, chunk_size)))


# ----------------------------------------------------------------------------- naive reference


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    initial_state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    output_states: bool = False,
):
    """The gated delta rule one token at a time: the readable reference.

    Args:
        q, k: ``[B, T, H, K]``.  v: ``[B, T, HV, V]``.  g, beta: ``[B, T, HV]``.
        initial_state: ``[B, HV, K, V]`` or None (zeros).
        output_states: also return every ``S_t`` (after token t is written).

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in ``q.dtype``, final_state ``[B, HV, K, V]`` fp32;
        with ``output_states`` a third tensor ``states`` ``[B, T, HV, K, V]`` fp32.
    """
    B, T, H, HV, K, V = _check_sequence_inputs(q, k, v, g, beta, initial_state)
    _check_scale(scale)
    scale = K**-0.5 if scale is None else float(scale)
    groups = HV // H
    out_dtype = q.dtype
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = (q * scale).repeat_interleave(groups, dim=2)  # [B, T, HV, K]
    k = k.repeat_interleave(groups, dim=2)  # [B, T, HV, K]
    v, g, beta = v.float(), g.float(), beta.float()

    if initial_state is None:
        state = torch.zeros(B, HV, K, V, dtype=torch.float32, device=v.device)
    else:
        state = initial_state.to(torch.float32).clone()
    o = torch.empty(B, T, HV, V, dtype=torch.float32, device=v.device)
    states = torch.empty(B, T, HV, K, V, dtype=torch.float32, device=v.device) if output_states else None

    for t in range(T):
        q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]  # [B, HV, K], [B, HV, K], [B, HV, V]
        state = state * g[:, t].exp()[..., None, None]  # decay first
        prediction = torch.einsum("bhkv,bhk->bhv", state, k_t)  # what the state recalls for k_t
        delta = beta[:, t, :, None] * (v_t - prediction)  # [B, HV, V]
        state = state + k_t.unsqueeze(-1) * delta.unsqueeze(-2)  # rank-one write
        o[:, t] = torch.einsum("bhkv,bhk->bhv", state, q_t)
        if states is not None:
            states[:, t] = state

    o = o.to(out_dtype)
    return (o, state, states) if output_states else (o, state)


# ----------------------------------------------------------------------------- chunked form

def check_chunk_inputs(q, k, v, g, beta, initial_state, chunk_size, scale) -> tuple[int, int, int, int, int, int]:
    """The argument handling of the chunked form, shared by this reference and the Triton kernel:
    shapes, dtypes and devices of the sequence, ``chunk_size`` and ``scale``. Returns
    ``(B, T, H, HV, K, V)``."""
    shapes = _check_sequence_inputs(q, k, v, g, beta, initial_state)
    _check_chunk_size(chunk_size)
    _check_scale(scale)
    return shapes


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    output_chunk_states: bool = False,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
):
    """The gated delta rule over a whole sequence, a chunk at a time (WY/UT form).

    Within a chunk of ``C = chunk_size`` tokens with ``gamma = cumsum(g)`` (from the chunk start),
    the values actually written to the state are ``u = (I + L)⁻¹ (beta v - beta exp(gamma) k S_0)``,
    ``L[r, j] = beta_r exp(gamma_r - gamma_j) k_r·k_j`` (``j < r``); then::

        o   = exp(gamma) q S_0 + (q kᵀ ⊙ exp(gamma_r - gamma_j) [j <= r]) u
        S_C = exp(gamma_C) S_0 + kᵀ (exp(gamma_C - gamma) u)

    The intra-chunk parts are computed for a block of chunks at once, the scan chunk by chunk.

    Args:
        q, k: ``[B, T, H, K]``.  v: ``[B, T, HV, V]``.  g, beta: ``[B, T, HV]``.
        chunk_size: tokens per chunk (any T works; the tail is zero-padded internally).
        initial_state: ``[B, HV, K, V]`` or None (zeros).
        output_final_state: return the state after the last token.
        output_chunk_states: return the state at the start of every chunk.

    Returns:
        ``(o, final_state, chunk_states)``: o ``[B, T, HV, V]`` in ``q.dtype``; final_state
        ``[B, HV, K, V]`` fp32 or None; chunk_states ``[B, NT, HV, K, V]`` fp32 or None, with
        ``NT = ceil(T / chunk_size)`` and ``chunk_states[:, 0]`` the initial state (or zeros).
    """
    B, T, H, HV, K, V = check_chunk_inputs(q, k, v, g, beta, initial_state, chunk_size, scale)
    scale = K**-0.5 if scale is None else float(scale)
    C, G, device = chunk_size, HV // H, q.device
    NT = math.ceil(T / C)

    if initial_state is None:
        state = torch.zeros(B, H, G, K, V, dtype=torch.float32, device=device)
    else:
        state = initial_state.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        state = _as_groups(state, H)  # [B, H, G, K, V]
    chunk_states = (
        torch.empty(B, NT, HV, K, V, dtype=torch.float32, device=device) if output_chunk_states else None
    )
    o = torch.empty(B, T, HV, V, dtype=q.dtype, device=device)

    for c0, n in _blocks(NT, _chunks_per_block(B, HV, C, K, V)):
        x = _Chunks(q, k, v, g, beta, c0 * C, n, C, use_qk_l2norm, scale)
        beta_ = x.beta.unsqueeze(-1)  # [B, H, G, n, C, 1]
        u0 = x.t_inv @ x.v.mul_(beta_)  # values to write if S_0 = 0: [B, H, G, n, C, V]
        w = x.t_inv @ (x.k * (beta_ * x.gamma.unsqueeze(-1).exp()))  # u = u0 - w S_0: [.., C, K]
        attn = x.decay.mul_(x.q @ x.k.transpose(-1, -2))  # intra-chunk q·k with decay, j <= r
        gamma_last = x.gamma[..., -1:]  # [B, H, G, n, 1]
        q_decay = x.gamma.exp().unsqueeze(-1)  # [B, H, G, n, C, 1]
        k_decay = (gamma_last - x.gamma).exp().unsqueeze(-1)  # [B, H, G, n, C, 1]
        state_decay = gamma_last.exp().unsqueeze(-1)  # [B, H, G, n, 1, 1]
        o_block = torch.empty(B, H, G, n, C, V, dtype=torch.float32, device=device)
        for i in range(n):
            if chunk_states is not None:
                chunk_states[:, c0 + i] = state.view(B, HV, K, V)
            u = u0[:, :, :, i] - w[:, :, :, i] @ state  # what the chunk writes: [B, H, G, C, V]
            read = x.q[:, :, :, i] @ state  # what the old state answers: [B, H, G, C, V]
            o_block[:, :, :, i] = torch.addcmul(attn[:, :, :, i] @ u, read, q_decay[:, :, :, i])
            write = x.k[:, :, :, i].transpose(-1, -2) @ (u * k_decay[:, :, :, i])  # [B, H, G, K, V]
            state = torch.addcmul(write, state, state_decay[:, :, :, i])
        t0, t1 = c0 * C, min(T, (c0 + n) * C)
        o[:, t0:t1].copy_(o_block.view(B, HV, n * C, V)[:, :, : t1 - t0].transpose(1, 2))

    final_state = state.view(B, HV, K, V) if output_final_state else None
    return o, final_state, chunk_states


# ----------------------------------------------------------------------------- decode step


def check_step_inputs(q, k, v, g, beta, state, in_place: bool) -> tuple[int, int, int, int, int]:
    """Validate the inputs of a single decode step (shared with the Triton kernel); ``(B, H, HV, K, V)``."""
    _check_tensor("q", q, 3, "[B, H, K]")
    _check_tensor("k", k, 3, "[B, H, K]")
    _check_tensor("v", v, 3, "[B, HV, V]")
    _check_tensor("g", g, 2, "[B, HV]")
    _check_tensor("beta", beta, 2, "[B, HV]")
    _check_tensor("state", state, 4, "[B, HV, K, V]")
    B, H, K = k.shape
    HV, V = v.shape[1:]
    _check_shape("q", q, (B, H, K), "[B, H, K] like k")
    if v.shape[0] != B:
        raise BadValue(f"v has shape {tuple(v.shape)}, expected [B, HV, V] with B = {B} like k")
    if HV % H != 0:
        raise BadValue(
            f"the number of value heads HV = {HV} (v shape {tuple(v.shape)}) must be a multiple of the "
            f"number of key heads H = {H} (k shape {tuple(k.shape)})"
        )
    _check_shape("g", g, (B, HV), "[B, HV]")
    _check_shape("beta", beta, (B, HV), "[B, HV]")
    _check_shape("state", state, (B, HV, K, V), "[B, HV, K, V]")
    devices = {x.device for x in (q, k, v, g, beta, state)}
    if len(devices) > 1:
        raise BadValue(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if in_place and state.dtype != torch.float32:
        raise BadType(f"an in-place update needs a float32 state, got {state.dtype}; pass in_place=False")
    return B, H, HV, K, V


def recurrent_gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    *,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    in_place: bool = True,
):
    """One token of the gated delta rule (single-token decode).

    Args:
        q, k: ``[B, H, K]``.  v: ``[B, HV, V]``.  g, beta: ``[B, HV]``.
        state: ``[B, HV, K, V]`` fp32, the state before this token.
        in_place: update ``state`` in place (it must then be fp32).

    Returns:
        o ``[B, HV, V]`` in ``q.dtype``; with ``in_place=False`` the pair ``(o, new_state)``
        and ``state`` is left untouched.
    """
    B, H, HV, K, V = check_step_inputs(q, k, v, g, beta, state, in_place)
    _check_scale(scale)
    scale = K**-0.5 if scale is None else float(scale)

    out_dtype = q.dtype
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = (q * scale).repeat_interleave(HV // H, dim=1)  # [B, HV, K]
    k = k.repeat_interleave(HV // H, dim=1)  # [B, HV, K]
    new_state = state if in_place else state.to(torch.float32, copy=True)

    new_state.mul_(g.float().exp()[..., None, None])  # decay first
    prediction = torch.einsum("bhkv,bhk->bhv", new_state, k)  # [B, HV, V]
    delta = beta.float().unsqueeze(-1) * (v.float() - prediction)  # [B, HV, V]
    new_state.add_(k.unsqueeze(-1) * delta.unsqueeze(-2))
    o = torch.einsum("bhkv,bhk->bhv", new_state, q).to(out_dtype)
    return o if in_place else (o, new_state)


# ----------------------------------------------------------------------------- state replay


def replay_states(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_states: torch.Tensor,
    positions,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """The states right after the tokens at ``positions`` were written, from stored chunk states.

    ``S_t`` is ``chunk_states[:, t // chunk_size]`` plus the updates of tokens
    ``(t // chunk_size) * chunk_size ... t``, applied in closed form (one small triangular system per
    chunk touched), so a state costs ``O(chunk_size · K · V)`` however long the sequence.

    Args:
        k: ``[B, T, H, K]``.  v: ``[B, T, HV, V]``.  g, beta: ``[B, T, HV]``: the full-length inputs
            that ``chunk_gated_delta_rule`` saw.
        chunk_states: ``[B, NT, HV, K, V]`` from ``chunk_gated_delta_rule(..., output_chunk_states=True)``
            with the same ``chunk_size``.
        positions: token indices in ``[0, T)`` (an int, a sequence or a 1-D tensor).

    Returns:
        ``[B, len(positions), HV, K, V]`` fp32.
    """
    B, T, H, HV, K, V = _check_sequence_inputs(None, k, v, g, beta)
    _check_chunk_size(chunk_size)
    NT = math.ceil(T / chunk_size)
    _check_tensor("chunk_states", chunk_states, 5, "[B, NT, HV, K, V]")
    if tuple(chunk_states.shape) != (B, NT, HV, K, V):
        raise BadValue(
            f"chunk_states has shape {tuple(chunk_states.shape)}, expected [B, NT, HV, K, V] = "
            f"{(B, NT, HV, K, V)} for T = {T} tokens in chunks of chunk_size = {chunk_size}"
        )
    positions = _check_index_list("positions", positions, T, f"token positions for T = {T}")
    C, G = chunk_size, HV // H

    out = torch.empty(B, len(positions), HV, K, V, dtype=torch.float32, device=k.device)
    by_chunk: dict[int, list[int]] = {}
    for p, t in enumerate(positions):
        by_chunk.setdefault(t // C, []).append(p)
    for c, slots in by_chunk.items():
        x = _Chunks(None, k, v, g, beta, c * C, 1, C, use_qk_l2norm, 1.0)
        k_c, gamma = x.k[:, :, :, 0], x.gamma[:, :, :, 0]  # [B, H, 1, C, K], [B, H, G, C]
        state0 = _as_groups(chunk_states[:, c].to(torch.float32), H)  # [B, H, G, K, V]
        # u = (I + L)⁻¹ beta (v - exp(gamma) k S_0): what each token of the chunk writes
        rhs = x.v[:, :, :, 0] - gamma.exp().unsqueeze(-1) * (k_c @ state0)  # [B, H, G, C, V]
        u = x.t_inv[:, :, :, 0] @ (x.beta[:, :, :, 0].unsqueeze(-1) * rhs)
        r = torch.tensor([positions[p] - c * C for p in slots], device=k.device)  # local indices [P]
        weights = x.decay[:, :, :, 0][:, :, :, r]  # exp(gamma_r - gamma_j) [j <= r]: [B, H, G, P, C]
        # S_r = exp(gamma_r) S_0 + kᵀ (weights_r ⊙ u)
        written = k_c.transpose(-1, -2).unsqueeze(3) @ (weights.unsqueeze(-1) * u.unsqueeze(3))
        states = written.add_(gamma[..., r, None, None].exp() * state0.unsqueeze(3))  # [B, H, G, P, K, V]
        out[:, slots] = states.reshape(B, HV, len(slots), K, V).transpose(1, 2)
    return out


def replay_state(
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_states: torch.Tensor,
    t: int,
    *,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """The state ``S_t`` ``[B, HV, K, V]`` (fp32) right after token ``t`` was written.

    Same arguments as ``replay_states`` with a single position ``0 <= t < T``.
    """
    if isinstance(t, bool) or not isinstance(t, int):
        raise BadType(f"t must be an int token position, got {t!r}")
    return replay_states(
        k, v, g, beta, chunk_states, [t], chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm
    )[:, 0]


# ----------------------------------------------------------------------------- effective attention


def deltanet_effective_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    heads=None,
    rows=None,
    chunk_size: int = 64,
    use_qk_l2norm: bool = True,
    scale: float | None = None,
    return_state_query: bool = False,
):
    """The exact token-to-token mixing matrix of the gated delta rule.

    With ``M_r = exp(g_r) (I - beta_r k_r k_rᵀ)`` (symmetric) the recurrence unrolls to::

        o_t = Σ_{s <= t} A[t, s] v_s  +  S_0ᵀ (M_0 M_1 … M_t) q_t * scale
        A[t, s] = scale * beta_s * k_sᵀ M_{s+1} M_{s+2} … M_t q_t        (0 for s > t)

    (0-based positions; the second term vanishes when the initial state is zero). This is exact:
    unlike the heuristic ``beta_s exp(Σ_{s<r<=t} g_r) q_tᵀ k_s``, it keeps the erasure
    ``-beta_r k_r k_rᵀ`` of every later write, which is what makes the rule a *delta* rule.

    The vectors ``w = M_{s+1} … M_t q_t`` of all requested rows are carried backwards over the
    sequence a chunk at a time; inside a chunk the product of the ``M_r`` is applied in WY form,
    so the cost is ``O(T · C · (K + C))`` per head for the chunk systems plus
    ``O(T · R · (K + C))`` for ``R`` rows; memory is the output ``R · T`` plus one block of chunks.

    Args:
        q, k: ``[B, T, H, K]``.  g, beta: ``[B, T, HV]``.
        heads: value heads (indices into HV) to return; None for all.
        rows: query positions ``t`` to return; None for all T.
        return_state_query: also return ``state_query`` ``[B, len(heads), len(rows), K]``, the
            vector ``(M_0 … M_t) q_t * scale`` that reads the initial state:
            ``o_t = A[t] @ v + state_query[t] @ S_0``.

    Returns:
        ``A`` ``[B, len(heads), len(rows), T]`` fp32, or ``(A, state_query)``.
    """
    B, T, H, HV, K, _ = _check_sequence_inputs(q, k, None, g, beta)
    _check_chunk_size(chunk_size)
    _check_scale(scale)
    scale = K**-0.5 if scale is None else float(scale)
    heads = _check_index_list("heads", heads, HV, f"value heads for HV = {HV}")
    rows = _check_index_list("rows", rows, T, f"query positions for T = {T}")
    C, G, device = chunk_size, HV // H, k.device

    # One "key head" per requested value head from here on: [B, T, nh, *]
    key_heads = [h // G for h in heads]
    q, k, g, beta = q[:, :, key_heads], k[:, :, key_heads], g[:, :, heads], beta[:, :, heads]
    nh, R, NT = len(heads), len(rows), math.ceil(T / C)
    row_t = torch.tensor(rows, device=device)  # [R]

    A = torch.zeros(B, nh, R, NT * C, dtype=torch.float32, device=device)
    w = torch.zeros(B, nh, R, K, dtype=torch.float32, device=device)  # M_{s+1} … M_t q_t, s = chunk end
    blocks = list(_blocks(NT, _chunks_per_block(B, nh, C, K, C)))
    for c0, n in reversed(blocks):
        x = _Chunks(q, k, None, g, beta, c0 * C, n, C, use_qk_l2norm, scale)
        for i in reversed(range(n)):
            start = (c0 + i) * C
            entering = [ri for ri, t in enumerate(rows) if start <= t < start + C]  # own token here
            if entering:
                local = torch.tensor([rows[ri] - start for ri in entering], device=device)
                w[:, :, entering] = x.q[:, :, 0, i][:, :, local]  # [B, nh, E, K]
            # each active row enters the chunk at local position r (its own token, or the chunk end)
            r = (row_t - start).clamp(0, C - 1)  # [R]; rows with t < start have w = 0
            gamma, k_c = x.gamma[:, :, 0, i], x.k[:, :, 0, i]  # [B, nh, C], [B, nh, C, K]
            z = x.decay[:, :, 0, i][:, :, r] * (w @ k_c.transpose(-1, -2))  # [B, nh, R, C]
            y = z @ x.t_inv[:, :, 0, i]  # [B, nh, R, C]
            beta_c = x.beta[:, :, 0, i].unsqueeze(-2)  # [B, nh, 1, C]
            A[..., start : start + C] = y * beta_c
            # w <- M_start … M_{start + r} w, in WY form
            w = gamma[:, :, r].exp().unsqueeze(-1) * w - (y * (beta_c * gamma.exp().unsqueeze(-2))) @ k_c
    A = A[..., :T].contiguous()
    return (A, w) if return_state_query else A
