"""Chunked gated delta rule, forward, in Triton: ``chunk_gated_delta_rule`` on CUDA tensors.

Same arguments, results and conventions as the torch reference
``qwen35_lab.ops.gated_delta.chunk_gated_delta_rule`` (read its docstring for the math). The
sequence is cut into chunks of ``C = chunk_size`` tokens; with ``gamma = cumsum(g)`` from the chunk
start and ``L[r, j] = beta_r exp(gamma_r - gamma_j) k_r·k_j`` for ``j < r`` (zero elsewhere), the
WY/UT form of a chunk is::

    w = (I + L)⁻¹ (beta exp(gamma) k)          # [C, K]
    u = (I + L)⁻¹ (beta v)                     # [C, V]
    v_new = u - w S_0                          # what the chunk writes, given its start state S_0
    S_C = exp(gamma_C) S_0 + kᵀ (exp(gamma_C - gamma) v_new)
    o   = exp(gamma) q S_0 + (q kᵀ ⊙ exp(gamma_r - gamma_j) [j <= r]) v_new

Three kernels, one pass each over the sequence:

1. ``_chunk_wy_kernel``, one program per (chunk, batch × value head): loads ``k`` (L2-normalised in
   the kernel), ``g``, ``beta``; builds ``L``; inverts ``I + L`` (the 16 × 16 diagonal blocks by
   forward substitution, then a block Neumann series, ``_unit_lower_inverse``); writes ``w``, ``u``.
2. ``_chunk_state_kernel``, one program per (V block, batch × value head), sequential over chunks:
   stores the chunk's start state ``S_0`` (these are the chunk states), then ``v_new`` and the
   next state. The only sequential part; each program carries ``K × BV`` of one head's state.
3. ``_chunk_output_kernel``, one program per (V block, chunk, batch × value head): the outputs.

Every product accumulates in fp32. Scratch tensors (``w``, ``u``, ``v_new``, and the chunk states
when they are not returned) take the inputs' dtype when q, k and v share a half dtype, and the
products then take half operands, as flash-linear-attention does; with fp32 inputs everything is
fp32 and products of fp32 operands run as three TF32 products (``tf32x3``, about fp32 accuracy).
The inverse is fp32 (its fp32 products are TF32 for half inputs). Returned chunk states and the
final state are fp32. ``chunk_size`` is 16, 32 or 64 (the default) and ``K <= 256``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from qwen35_lab.ops.dispatch import UnsupportedByKernel
from qwen35_lab.ops.gated_delta import L2NORM_EPS, check_chunk_inputs

from ._common import (
    block,
    check_device,
    check_head_dim,
    check_kernel_dtypes,
    compute_dtype,
    configs,
    device_function,
    fp32_dot_precision,
)

__all__ = ["CHUNK_SIZES", "chunk_gated_delta_rule"]

CHUNK_SIZES = (16, 32, 64)  # four blocks of 16 rows cover a chunk
_EPS = tl.constexpr(L2NORM_EPS)


# ----------------------------------------------------------------------------- shared pieces


@device_function
def _load_tile(ptr, bos, rows, stop, head, HEADS: tl.constexpr, D: tl.constexpr, cols):
    """``x[b, rows, head, cols]`` of a ``[B, T, HEADS, D]`` tensor as fp32, zero for rows >= stop."""
    mask = (rows < stop)[:, None] & (cols < D)[None, :]
    x = tl.load(ptr + ((bos + rows[:, None]) * HEADS + head) * D + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32)


@device_function
def _store_tile(ptr, x, bos, rows, stop, head, HEADS: tl.constexpr, D: tl.constexpr, cols):
    mask = (rows < stop)[:, None] & (cols < D)[None, :]
    tl.store(ptr + ((bos + rows[:, None]) * HEADS + head) * D + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@device_function
def _load_gate(ptr, bos, rows, stop, head, HEADS: tl.constexpr):
    """``g[b, rows, head]`` (or beta) of a ``[B, T, HEADS]`` tensor as fp32, zero for rows >= stop."""
    return tl.load(ptr + (bos + rows) * HEADS + head, mask=rows < stop, other=0.0).to(tl.float32)


@device_function
def _l2norm_rows(x, L2NORM: tl.constexpr):
    """``x * rsqrt(sum(x²) + 1e-6)`` per row when L2NORM (zero rows stay zero)."""
    if L2NORM:
        x = x * tl.rsqrt(tl.sum(x * x, axis=1) + _EPS)[:, None]
    return x


@device_function
def _dot(a, b, DT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32, the operands cast to ``DT`` (the scratch dtype)."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PRECISION)


# ----------------------------------------------------------------------------- 1. WY transform


@device_function
def _unit_lower_inverse(L, BT: tl.constexpr, PRECISION: tl.constexpr):
    """``(I + L)⁻¹`` for the strictly lower ``[BT, BT]`` tile ``L`` of one chunk, in fp32.

    The ``NB = BT / 16`` diagonal ``16 × 16`` blocks ``D`` are inverted together by forward
    substitution (``X[r] = e_r - Σ_{j<r} D[r, j] X[j]``); with ``Xd`` their block-diagonal inverse and
    ``N = L - D``, ``(I + L)⁻¹ = (I + M)⁻¹ Xd`` where ``M = Xd N`` is strictly block-lower, so
    ``M^NB = 0`` and ``(I + M)⁻¹ Xd = Xd - M (Xd - M (Xd - …))`` takes ``NB - 1`` products.
    """
    NB: tl.constexpr = BT // 16
    a = tl.arange(0, NB)
    same_block = (a[:, None] == a[None, :])[:, None, :, None]  # [NB, 1, NB, 1]
    D = tl.sum(tl.where(same_block, tl.reshape(L, (NB, 16, NB, 16)), 0.0), axis=2)  # [NB, 16, 16]
    i = tl.arange(0, 16)
    X = tl.broadcast_to(tl.where(i[:, None] == i[None, :], 1.0, 0.0)[None, :, :], (NB, 16, 16))
    for r in range(1, 16):
        row_r = (i == r)[None, :, None]
        # rows j < r of X are final and D[r, j] = 0 for j >= r: the product reads finished rows only
        X = tl.where(row_r, X - tl.dot(tl.where(row_r, D, 0.0), X, input_precision="ieee"), X)
    Xd = tl.reshape(tl.where(same_block, X[:, :, None, :], 0.0), (BT, BT))  # block diagonal
    blk = tl.arange(0, BT) // 16
    M = tl.dot(Xd, tl.where(blk[:, None] > blk[None, :], L, 0.0), input_precision=PRECISION)
    inverse = Xd
    for _ in tl.static_range(NB - 1):
        inverse = Xd - tl.dot(M, inverse, input_precision=PRECISION)
    return inverse


@triton.autotune(configs=configs([{}], warps=(4, 2, 8)), key=["H", "HV", "K", "V", "BT"])
@triton.jit
def _chunk_wy_kernel(
    k, v, g, beta, w, u, T,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Chunk ``i_t`` of value head ``i_hv``: ``w = (I + L)⁻¹ (beta exp(gamma) k)``, ``u = (I + L)⁻¹ (beta v)``."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)  # the key head serving this value head
    bos = i_b.to(tl.int64) * T  # first token of this sequence
    j = tl.arange(0, BT)
    rows = i_t * BT + j
    ck = tl.arange(0, BK)

    k_t = _l2norm_rows(_load_tile(k, bos, rows, T, i_h, H, K, ck), L2NORM)  # [BT, BK]
    gamma = tl.cumsum(_load_gate(g, bos, rows, T, i_hv, HV), 0)  # log decay from the chunk start
    beta_t = _load_gate(beta, bos, rows, T, i_hv, HV)
    # L[r, j] = beta_r exp(gamma_r - gamma_j) k_r·k_j for j < r
    decay = tl.exp(tl.where(j[:, None] > j[None, :], gamma[:, None] - gamma[None, :], float("-inf")))
    DT = w.dtype.element_ty
    L = _dot(k_t, tl.trans(k_t), DT, PRECISION) * decay * beta_t[:, None]
    t_inv = _unit_lower_inverse(L, BT, PRECISION)  # [BT, BT], fp32

    w_t = _dot(t_inv, k_t * (beta_t * tl.exp(gamma))[:, None], DT, PRECISION)
    _store_tile(w, w_t, bos, rows, T, i_hv, HV, K, ck)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        v_t = _load_tile(v, bos, rows, T, i_hv, HV, V, cv)
        _store_tile(u, _dot(t_inv, v_t * beta_t[:, None], DT, PRECISION), bos, rows, T, i_hv, HV, V, cv)


# ----------------------------------------------------------------------------- 2. state scan


# narrow column blocks give the sequential scan more programs (B × HV × V / BV) to spread over the SMs
@triton.autotune(configs=configs([{"BV": 32}, {"BV": 16}, {"BV": 64}]), key=["H", "HV", "K", "V", "BT"])
@triton.jit
def _chunk_state_kernel(
    k, w, u, g, initial_state, chunk_states, v_new, final_state, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
):
    """Columns ``i_v * BV ...`` of the state of value head ``i_hv``, carried chunk by chunk."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos = i_b.to(tl.int64) * T
    j = tl.arange(0, BT)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    kv_offsets = ck[:, None] * V + cv[None, :]  # within one [K, V] state
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]

    DT = w.dtype.element_ty
    state = tl.zeros([BK, BV], dtype=tl.float32)  # S_0 of the current chunk
    if HAS_INITIAL_STATE:
        state = tl.load(initial_state + i_bh.to(tl.int64) * K * V + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
    for i_t in range(NT):
        # chunk_states[b, i_t, hv] = the state at the start of chunk i_t
        at = ((i_b.to(tl.int64) * NT + i_t) * HV + i_hv) * K * V
        tl.store(chunk_states + at + kv_offsets, state.to(chunk_states.dtype.element_ty), mask=kv_mask)
        rows = i_t * BT + j
        w_t = _load_tile(w, bos, rows, T, i_hv, HV, K, ck)  # [BT, BK]
        v_new_t = _load_tile(u, bos, rows, T, i_hv, HV, V, cv) - _dot(w_t, state, DT, PRECISION)
        _store_tile(v_new, v_new_t, bos, rows, T, i_hv, HV, V, cv)
        g_t = _load_gate(g, bos, rows, T, i_hv, HV)
        gamma = tl.cumsum(g_t, 0)
        # the chunk's total log decay: the cumsum's last entry itself (padding rows add 0), so that
        # gamma_last - gamma is exactly 0 on the last token however large |gamma| grows
        gamma_last = tl.sum(tl.where(j == BT - 1, gamma, 0.0), axis=0)
        k_t = _l2norm_rows(_load_tile(k, bos, rows, T, i_h, H, K, ck), L2NORM)  # [BT, BK]
        written = _dot(tl.trans(k_t), v_new_t * tl.exp(gamma_last - gamma)[:, None], DT, PRECISION)
        state = state * tl.exp(gamma_last) + written
    if STORE_FINAL_STATE:
        tl.store(final_state + i_bh.to(tl.int64) * K * V + kv_offsets, state, mask=kv_mask)


# ----------------------------------------------------------------------------- 3. outputs


@triton.autotune(configs=configs([{"BV": 32}, {"BV": 64}]), key=["H", "HV", "K", "V", "BT"])
@triton.jit
def _chunk_output_kernel(
    q, k, v_new, chunk_states, g, o, scale, T, NT,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr, PRECISION: tl.constexpr,
):
    """``o = exp(gamma) q S_0 + (q kᵀ ⊙ exp(gamma_r - gamma_j) [j <= r]) v_new`` for one chunk."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT = v_new.dtype.element_ty
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    bos = i_b.to(tl.int64) * T
    j = tl.arange(0, BT)
    rows = i_t * BT + j
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)

    q_t = _l2norm_rows(_load_tile(q, bos, rows, T, i_h, H, K, ck), L2NORM) * scale  # [BT, BK]
    k_t = _l2norm_rows(_load_tile(k, bos, rows, T, i_h, H, K, ck), L2NORM)
    gamma = tl.cumsum(_load_gate(g, bos, rows, T, i_hv, HV), 0)
    decay = tl.exp(tl.where(j[:, None] >= j[None, :], gamma[:, None] - gamma[None, :], float("-inf")))
    attn = _dot(q_t, tl.trans(k_t), DT, PRECISION) * decay  # [BT, BT]

    at = ((i_b.to(tl.int64) * NT + i_t) * HV + i_hv) * K * V
    kv_mask = (ck < K)[:, None] & (cv < V)[None, :]
    state = tl.load(chunk_states + at + ck[:, None] * V + cv[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    v_new_t = _load_tile(v_new, bos, rows, T, i_hv, HV, V, cv)  # [BT, BV]
    out = _dot(q_t, state, DT, PRECISION) * tl.exp(gamma)[:, None] + _dot(attn, v_new_t, DT, PRECISION)
    _store_tile(o, out, bos, rows, T, i_hv, HV, V, cv)


# ----------------------------------------------------------------------------- the op


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
    """The gated delta rule over a whole sequence, a chunk at a time, in Triton.

    Args:
        q, k: ``[B, T, H, K]``.  v: ``[B, T, HV, V]``.  g, beta: ``[B, T, HV]``.
        chunk_size: 16, 32 or 64 tokens per chunk.
        initial_state: ``[B, HV, K, V]`` or None (zeros).
        output_final_state / output_chunk_states / use_qk_l2norm / scale: as the torch reference.

    Returns:
        ``(o, final_state, chunk_states)``: o ``[B, T, HV, V]`` in ``q.dtype``; final_state
        ``[B, HV, K, V]`` fp32 or None; chunk_states ``[B, NT, HV, K, V]`` fp32 or None
        (``chunk_states[:, i]`` is the state at the start of chunk ``i``).
    """
    B, T, H, HV, K, V = check_chunk_inputs(q, k, v, g, beta, initial_state, chunk_size, scale)
    if chunk_size not in CHUNK_SIZES:
        raise UnsupportedByKernel(
            f"the Triton chunk kernel takes chunk_size {', '.join(map(str, CHUNK_SIZES))}, got {chunk_size}; "
            f"QWEN35_LAB_OPS=torch runs the torch reference, which takes any chunk_size"
        )
    check_head_dim("K", K)
    check_kernel_dtypes(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    check_device(q)
    scale = K**-0.5 if scale is None else float(scale)
    NT = math.ceil(T / chunk_size)
    dtype = compute_dtype(q, k, v)
    meta = dict(
        H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=block(K), L2NORM=bool(use_qk_l2norm),
        PRECISION=fp32_dot_precision(dtype),
    )
    device = q.device
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()

    w = torch.empty(B, T, HV, K, dtype=dtype, device=device)
    u = torch.empty(B, T, HV, V, dtype=dtype, device=device)
    v_new = torch.empty_like(u)
    chunk_states = torch.empty(
        B, NT, HV, K, V, dtype=torch.float32 if output_chunk_states else dtype, device=device
    )
    final_state = torch.empty(B, HV, K, V, dtype=torch.float32, device=device) if output_final_state else None
    o = torch.empty(B, T, HV, V, dtype=q.dtype, device=device)

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _chunk_wy_kernel[(NT, B * HV)](k, v, g, beta, w, u, T, BV=min(64, block(V)), **meta)
        _chunk_state_kernel[lambda m: (triton.cdiv(V, m["BV"]), B * HV)](
            k, w, u, g, initial_state, chunk_states, v_new, final_state, T, NT,
            HAS_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=bool(output_final_state), **meta,
        )
        _chunk_output_kernel[lambda m: (triton.cdiv(V, m["BV"]), NT, B * HV)](
            q, k, v_new, chunk_states, g, o, scale, T, NT, **meta
        )
    return o, final_state, chunk_states if output_chunk_states else None
