"""One decode step of the gated delta rule in Triton: ``recurrent_gated_delta_step`` on CUDA tensors.

Same arguments, results and conventions as the torch reference
``qwen35_lab.ops.gated_delta.recurrent_gated_delta_step``::

    S   = exp(g) S                       # decay
    S  += k (beta (v - Sᵀ k))ᵀ           # delta-rule write
    o   = Sᵀ q * scale

One fused kernel, one program per (V block, batch × value head): it reads ``K × BV`` of the state
once, updates it in registers, writes it back (in place on the fp32 cache, or to a new tensor) and
writes the output. q and k are L2-normalised in the kernel. All math is fp32.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from qwen35_lab.ops.gated_delta import L2NORM_EPS, _check_scale, check_step_inputs

from ._common import block, check_device, check_head_dim, check_kernel_dtypes

__all__ = ["recurrent_gated_delta_step"]

_EPS = tl.constexpr(L2NORM_EPS)


@triton.jit
def _step_kernel(
    q, k, v, g, beta, state, new_state, o, scale,
    stride_b, stride_h, stride_k, stride_v,  # of state
    out_stride_b, out_stride_h, out_stride_k, out_stride_v,  # of new_state (may be state itself)
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
):
    """Columns ``i_v * BV ...`` of value head ``i_hv``'s state: decay, write, read.

    Each program reads its ``K × BV`` of the state before writing the same elements, so
    ``new_state`` may be ``state`` (the in-place update).
    """
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hv = i_bh // HV, i_bh % HV
    i_h = i_hv // (HV // H)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = ck < K, cv < V

    q_t = tl.load(q + (i_b * H + i_h) * K + ck, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
    k_t = tl.load(k + (i_b * H + i_h) * K + ck, mask=mask_k, other=0.0).to(tl.float32)
    if L2NORM:
        q_t = q_t * tl.rsqrt(tl.sum(q_t * q_t, axis=0) + _EPS)
        k_t = k_t * tl.rsqrt(tl.sum(k_t * k_t, axis=0) + _EPS)
    q_t = q_t * scale
    v_t = tl.load(v + (i_b * HV + i_hv) * V + cv, mask=mask_v, other=0.0).to(tl.float32)  # [BV]
    g_t = tl.load(g + i_b * HV + i_hv).to(tl.float32)
    beta_t = tl.load(beta + i_b * HV + i_hv).to(tl.float32)

    mask = mask_k[:, None] & mask_v[None, :]
    b = i_b.to(tl.int64)
    at = b * stride_b + i_hv * stride_h + ck[:, None] * stride_k + cv[None, :] * stride_v
    S = tl.load(state + at, mask=mask, other=0.0).to(tl.float32) * tl.exp(g_t)  # [BK, BV], decayed
    delta = beta_t * (v_t - tl.sum(S * k_t[:, None], axis=0))  # beta (v - Sᵀ k): [BV]
    S = S + k_t[:, None] * delta[None, :]
    out = tl.sum(S * q_t[:, None], axis=0)  # Sᵀ q scale: [BV]
    out_at = b * out_stride_b + i_hv * out_stride_h + ck[:, None] * out_stride_k + cv[None, :] * out_stride_v
    tl.store(new_state + out_at, S, mask=mask)
    tl.store(o + (i_b * HV + i_hv) * V + cv, out.to(o.dtype.element_ty), mask=mask_v)


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
    """One token of the gated delta rule (single-token decode), fused in one Triton kernel.

    Args:
        q, k: ``[B, H, K]``.  v: ``[B, HV, V]``.  g, beta: ``[B, HV]``.
        state: ``[B, HV, K, V]`` fp32, the state before this token (any strides).
        in_place: update ``state`` in place (it must then be fp32).

    Returns:
        o ``[B, HV, V]`` in ``q.dtype``; with ``in_place=False`` the pair ``(o, new_state)``
        (fp32, contiguous) and ``state`` is left untouched.
    """
    B, H, HV, K, V = check_step_inputs(q, k, v, g, beta, state, in_place)
    _check_scale(scale)
    check_head_dim("K", K)
    check_kernel_dtypes(q=q, k=k, v=v, g=g, beta=beta, state=state)
    check_device(q)
    scale = K**-0.5 if scale is None else float(scale)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    new_state = state if in_place else torch.empty(B, HV, K, V, dtype=torch.float32, device=state.device)
    o = torch.empty(B, HV, V, dtype=q.dtype, device=q.device)
    BK = block(K)
    BV = min(block(V), max(16, 4096 // BK))  # at most 4096 state elements per program
    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _step_kernel[(triton.cdiv(V, BV), B * HV)](
            q, k, v, g, beta, state, new_state, o, scale, *state.stride(), *new_state.stride(),
            H=H, HV=HV, K=K, V=V, BK=BK, BV=BV, L2NORM=bool(use_qk_l2norm), num_warps=4,
        )
    return o if in_place else (o, new_state)
