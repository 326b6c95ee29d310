"""Softmax-attention summaries and chosen probability rows in Triton, without ``T × T`` maps.

Same arguments, results and conventions as the torch references ``attention_summaries`` and
``attention_probs_rows`` in ``qwen35_lab.ops.attention``: ``q`` ``[B, Hq, T, D]``, ``k``
``[B, Hkv, Tk, D]`` (query head ``h`` reads key head ``h // (Hq // Hkv)``), queries are the last
``T`` of the ``Tk`` positions, ``key_padding_mask`` ``[B, Tk]`` keeps keys where nonzero, logits
``q·k * scaling`` accumulate in fp32.

``_summary_kernel``: one program per (block of ``BM`` queries, batch × query head) streams over the
key blocks it can see with an online softmax. Relative to the running max ``m`` it keeps, per query::

    l = Σ_s exp(x_s - m)                 a = Σ_s exp(x_s - m) (x_s - m)
    d = Σ_s exp(x_s - m) (t - s)         (t the query position)

rescaling them by ``exp(m_old - m_new)`` when ``m`` grows (``a`` also gains ``(m_old - m_new) l``).
Then ``entropy = log l - a / l``, ``max_prob = 1 / l``, ``mean_distance = d / l`` and
``sink_mass = exp(x_0 - m) / l``. Extra memory is the ``[B, Hq, T]`` results; rows that see no key
are NaN.

``_rows_kernel``: one program per (block of chosen rows, batch × chosen head): a first pass over the
keys finds ``m`` and ``l``, a second writes ``exp(x - m) / l``.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from qwen35_lab.ops.attention import _check_attention_inputs, check_rows_inputs

from ._common import (
    block,
    check_device,
    check_head_dim,
    check_kernel_dtypes,
    configs,
    device_function,
    fp32_dot_precision,
)
from qwen35_lab.checks import BadValue

__all__ = ["attention_probs_rows", "attention_summaries"]


@device_function
def _logits(q_t, k, i_b, i_hk, cols, Tk, Hkv: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, scaling,
            PRECISION: tl.constexpr):
    """``q·k * scaling`` for keys ``cols`` of key head ``i_hk``: ``[BM, BN]`` fp32."""
    cd = tl.arange(0, BD)
    at = ((i_b.to(tl.int64) * Hkv + i_hk) * Tk + cols[:, None]) * D + cd[None, :]
    k_t = tl.load(k + at, mask=(cols < Tk)[:, None] & (cd < D)[None, :], other=0.0)  # [BN, BD]
    return tl.dot(q_t, tl.trans(k_t), input_precision=PRECISION) * scaling


@device_function
def _allowed(query_pos, cols, keep, i_b, Tk, HAS_MASK: tl.constexpr):
    """Causal, in range, and not padding: ``[BM, BN]``."""
    allowed = (cols[None, :] <= query_pos[:, None]) & (cols < Tk)[None, :]
    if HAS_MASK:
        kept = tl.load(keep + i_b.to(tl.int64) * Tk + cols, mask=cols < Tk, other=0) != 0
        allowed = allowed & kept[None, :]
    return allowed


@triton.autotune(configs=configs([{"BM": 64, "BN": 64}, {"BM": 128, "BN": 64}, {"BM": 64, "BN": 128}]),
                 key=["Hq", "Hkv", "D", "HAS_MASK"])
@triton.jit
def _summary_kernel(
    q, k, keep, entropy, max_prob, sink_mass, mean_distance, scaling, T, Tk,
    Hq: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hq = i_bh // Hq, i_bh % Hq
    i_hk = i_hq // (Hq // Hkv)
    rows = i_m * BM + tl.arange(0, BM)
    query_pos = Tk - T + rows  # the queries are the last T positions
    cd = tl.arange(0, BD)
    q_t = tl.load(q + (i_bh.to(tl.int64) * T + rows[:, None]) * D + cd[None, :],
                  mask=(rows < T)[:, None] & (cd < D)[None, :], other=0.0)  # [BM, BD]

    m = tl.full([BM], float("-inf"), tl.float32)  # running max of the logits
    l = tl.zeros([BM], tl.float32)  # Σ exp(x - m)
    a = tl.zeros([BM], tl.float32)  # Σ exp(x - m) (x - m)
    d = tl.zeros([BM], tl.float32)  # Σ exp(x - m) (t - s)
    first = tl.arange(0, BN) == 0
    x0 = tl.zeros([BM], tl.float32)  # logit of key 0 (-inf when padded), set by the first block
    end = tl.minimum(Tk, Tk - T + (i_m + 1) * BM)  # keys past the block's last query are never seen
    for j0 in range(0, end, BN):
        cols = j0 + tl.arange(0, BN)
        allowed = _allowed(query_pos, cols, keep, i_b, Tk, HAS_MASK)
        x = tl.where(allowed, _logits(q_t, k, i_b, i_hk, cols, Tk, Hkv, D, BD, scaling, PRECISION), float("-inf"))
        if j0 == 0:
            x0 = tl.sum(tl.where(first[None, :], x, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a finite reference while nothing is seen
        seen = l > 0
        shift = tl.where(seen, m - m_ref, 0.0)  # m_old - m_new, <= 0
        alpha = tl.where(seen, tl.exp(shift), 0.0)
        p = tl.exp(x - m_ref[:, None])  # 0 where not allowed
        x_rel = tl.where(allowed, x - m_ref[:, None], 0.0)
        dist = tl.where(allowed, query_pos[:, None] - cols[None, :], 0).to(tl.float32)
        a = alpha * (a + shift * l) + tl.sum(p * x_rel, axis=1)
        d = alpha * d + tl.sum(p * dist, axis=1)
        l = alpha * l + tl.sum(p, axis=1)
        m = m_new

    seen = l > 0
    l_safe = tl.where(seen, l, 1.0)
    nan = float("nan")
    out = i_bh.to(tl.int64) * T + rows
    valid = rows < T
    tl.store(entropy + out, tl.where(seen, tl.log(l_safe) - a / l_safe, nan), mask=valid)
    tl.store(max_prob + out, tl.where(seen, 1.0 / l_safe, nan), mask=valid)
    tl.store(mean_distance + out, tl.where(seen, d / l_safe, nan), mask=valid)
    sink = tl.exp(x0 - tl.where(seen, m, 0.0)) / l_safe
    tl.store(sink_mass + out, tl.where(seen, sink, nan), mask=valid)


@triton.autotune(configs=configs([{"BM": 16, "BN": 64}, {"BM": 32, "BN": 128}, {"BM": 64, "BN": 64}]),
                 key=["Hq", "Hkv", "D", "HAS_MASK"])
@triton.jit
def _rows_kernel(
    q, k, keep, heads, rows, probs, scaling, T, Tk, R, NH,
    Hq: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_sel = i_bh // NH, i_bh % NH
    i_hq = tl.load(heads + i_sel)
    i_hk = i_hq // (Hq // Hkv)
    slots = i_m * BM + tl.arange(0, BM)  # positions in the output rows
    valid = slots < R
    row = tl.load(rows + slots, mask=valid, other=0)
    query_pos = Tk - T + row
    cd = tl.arange(0, BD)
    q_t = tl.load(q + ((i_b.to(tl.int64) * Hq + i_hq) * T + row[:, None]) * D + cd[None, :],
                  mask=valid[:, None] & (cd < D)[None, :], other=0.0)

    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    end = tl.minimum(Tk, tl.max(tl.where(valid, query_pos, 0), axis=0) + 1)
    for j0 in range(0, end, BN):
        cols = j0 + tl.arange(0, BN)
        allowed = _allowed(query_pos, cols, keep, i_b, Tk, HAS_MASK)
        x = tl.where(allowed, _logits(q_t, k, i_b, i_hk, cols, Tk, Hkv, D, BD, scaling, PRECISION), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.where(l > 0, tl.exp(m - m_ref), 0.0)
        l = alpha * l + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    out = (i_bh.to(tl.int64) * R + slots) * Tk
    for j0 in range(0, Tk, BN):
        cols = j0 + tl.arange(0, BN)
        allowed = _allowed(query_pos, cols, keep, i_b, Tk, HAS_MASK)
        x = tl.where(allowed, _logits(q_t, k, i_b, i_hk, cols, Tk, Hkv, D, BD, scaling, PRECISION), float("-inf"))
        p = tl.exp(x - m_ref[:, None]) / l[:, None]  # 0 / 0 = NaN on rows that see no key, as softmax
        tl.store(probs + out[:, None] + cols[None, :], p, mask=valid[:, None] & (cols < Tk)[None, :])


def _checked(q, k, key_padding_mask, scaling):
    """Validate; return the shapes, q and k as the kernels read them, the int8 keep-mask and launch constants."""
    B, Hq, T, Hkv, Tk, D, scaling = _check_attention_inputs(q, k, key_padding_mask, scaling)
    check_head_dim("D", D)
    check_kernel_dtypes(q=q, k=k)
    check_device(q)
    if q.dtype != k.dtype:  # one dtype for the product; fp32 holds both exactly
        q, k = q.float(), k.float()
    keep = None
    if key_padding_mask is not None:
        keep = key_padding_mask.to(device=q.device).ne(0).to(torch.int8).contiguous()
    meta = dict(Hq=Hq, Hkv=Hkv, D=D, BD=block(D), HAS_MASK=keep is not None, PRECISION=fp32_dot_precision(q.dtype))
    return (B, Hq, T, Hkv, Tk, D, scaling), q.contiguous(), k.contiguous(), keep, meta


def _on(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def attention_summaries(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-query summaries of the attention distribution, streamed over key blocks in Triton.

    Args:
        q: ``[B, Hq, T, D]``.  k: ``[B, Hkv, Tk, D]``.  key_padding_mask: ``[B, Tk]`` or None.
        block_size: validated like the torch reference's; the kernel picks its own tiles.

    Returns:
        A dict of fp32 ``[B, Hq, T]`` tensors: ``entropy`` (nats), ``max_prob``, ``sink_mass``
        (the probability of key 0) and ``mean_distance`` (tokens); NaN where a query sees no key.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise BadValue(f"block_size must be an int >= 1, got {block_size!r}")
    (B, Hq, T, Hkv, Tk, D, scaling), q, k, keep, meta = _checked(q, k, key_padding_mask, scaling)
    out = {name: torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
           for name in ("entropy", "max_prob", "sink_mass", "mean_distance")}
    with _on(q.device):
        _summary_kernel[lambda m: (triton.cdiv(T, m["BM"]), B * Hq)](
            q, k, keep, out["entropy"], out["max_prob"], out["sink_mass"], out["mean_distance"], scaling,
            T, Tk, **meta,
        )
    return out


def attention_probs_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    heads=None,
    rows=None,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention probabilities for chosen query heads and rows, in Triton.

    Args:
        q: ``[B, Hq, T, D]``.  k: ``[B, Hkv, Tk, D]``.  key_padding_mask: ``[B, Tk]`` or None.
        heads: query heads (indices into Hq); None for all.
        rows: query rows (indices into T, i.e. position ``Tk - T + row``); None for all.

    Returns:
        probs ``[B, len(heads), len(rows), Tk]`` fp32; each row sums to 1 over the keys it sees.
    """
    (B, Hq, T, Hkv, Tk, D, scaling), heads, rows = check_rows_inputs(q, k, key_padding_mask, scaling, heads, rows)
    _, q, k, keep, meta = _checked(q, k, key_padding_mask, scaling)
    head_idx = torch.tensor(heads, dtype=torch.int32, device=q.device)
    row_idx = torch.tensor(rows, dtype=torch.int32, device=q.device)
    NH, R = len(heads), len(rows)
    probs = torch.empty(B, NH, R, Tk, dtype=torch.float32, device=q.device)
    with _on(q.device):
        _rows_kernel[lambda m: (triton.cdiv(R, m["BM"]), B * NH)](
            q, k, keep, head_idx, row_idx, probs, scaling, T, Tk, R, NH, **meta,
        )
    return probs
