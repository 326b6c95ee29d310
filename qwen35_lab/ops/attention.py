"""Softmax attention of the full-attention layers, looked at without materialising ``T × T`` maps.

Inputs are the tensors transformers passes to ``eager_attention_forward`` (after q/k RMSNorm and
RoPE): ``q`` ``[B, Hq, T, D]``, ``k`` ``[B, Hkv, Tk, D]`` with ``Hq`` a multiple of ``Hkv`` (query
head ``h`` reads key head ``h // (Hq // Hkv)``, as ``repeat_kv``). Attention is causal with the
queries being the *last* ``T`` of the ``Tk`` positions (``T < Tk`` when decoding with a cache):
query ``i`` sits at position ``Tk - T + i`` and sees keys ``0 ... Tk - T + i``.
``key_padding_mask`` ``[B, Tk]`` marks keys to keep (nonzero / True) as transformers' 2-D
``attention_mask`` does. Logits are ``q·k * scaling`` in fp32 (default ``scaling = D ** -0.5``).

A query row that can see no key at all (only padding) has no distribution: its outputs are NaN.
"""

from __future__ import annotations

import math

import torch

from ..checks import BadType, BadValue, check_int
from .gated_delta import _check_index_list, _check_tensor

__all__ = ["attention_probs_rows", "attention_summaries", "causal_attention_with_summaries"]


def check_rows_inputs(q, k, key_padding_mask, scaling, heads, rows):
    """The argument handling of ``attention_probs_rows``, shared by this reference and the Triton
    kernel: returns ``((B, Hq, T, Hkv, Tk, D, scaling), heads, rows)`` with the selections as lists."""
    shapes = _check_attention_inputs(q, k, key_padding_mask, scaling)
    Hq, T = shapes[1], shapes[2]
    heads = _check_index_list("heads", heads, Hq, f"query heads for Hq = {Hq}")
    rows = _check_index_list("rows", rows, T, f"query rows for T = {T}")
    return shapes, heads, rows


def _check_attention_inputs(q, k, key_padding_mask, scaling):
    """Validate; return ``(B, Hq, T, Hkv, Tk, D, scaling)``."""
    _check_tensor("q", q, 4, "[B, Hq, T, D]")
    _check_tensor("k", k, 4, "[B, Hkv, Tk, D]")
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise BadValue(
            f"k has shape {tuple(k.shape)}, expected [B, Hkv, Tk, D] with B = {B} and D = {D} like q "
            f"(shape {tuple(q.shape)})"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise BadValue(
            f"the number of query heads Hq = {Hq} (q shape {tuple(q.shape)}) must be a multiple of the "
            f"number of key heads Hkv = {Hkv} (k shape {tuple(k.shape)})"
        )
    if T < 1 or T > Tk:
        raise BadValue(
            f"q has T = {T} query positions and k has Tk = {Tk} keys; the queries are the last T of the "
            f"Tk positions, so 1 <= T <= Tk is required"
        )
    if q.device != k.device:
        raise BadValue(f"q and k must be on one device, got {q.device} and {k.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise BadType(
                f"key_padding_mask must be a torch.Tensor of shape [B, Tk] = {(B, Tk)}, "
                f"got {type(key_padding_mask).__name__}"
            )
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise BadValue(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [B, Tk] = {(B, Tk)} "
                f"(1 = keep the key, 0 = padding)"
            )
    if scaling is None:
        scaling = D**-0.5
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise BadValue(f"scaling must be a positive number or None (= D ** -0.5), got {scaling!r}")
    return B, Hq, T, Hkv, Tk, D, float(scaling)


def _allowed(query_pos: torch.Tensor, key_pos: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Causal and padding mask ``[B or 1, 1, nq, nk]`` (True = the query may attend to the key)."""
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, nq, nk]
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    return allowed


def attention_summaries(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    block_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Per-query summaries of the attention distribution ``p_t(s)``, computed blockwise.

    Queries and keys are visited in blocks of ``block_size`` with an online (streaming) softmax,
    so extra memory is ``O(Hq · block_size²)`` per step plus the ``[B, Hq, T]`` results.
    The cost is about one extra ``q·k`` pass: per block one matmul for the logits, one
    ``exp``, and one matmul of the probabilities with ``[k | s | 1]``, which gives at once
    ``Σ p k`` (so ``Σ p x = scaling · q · Σ p k``, the logit average the entropy needs),
    ``Σ p s`` (mean distance) and ``Σ p`` (the normaliser). Only blocks that cross the
    diagonal (or padding) are masked.

    Args:
        q: ``[B, Hq, T, D]``.  k: ``[B, Hkv, Tk, D]``.  key_padding_mask: ``[B, Tk]`` or None.

    Returns:
        A dict of fp32 ``[B, Hq, T]`` tensors:

        - ``entropy``: ``-Σ_s p(s) log p(s)`` in nats.
        - ``max_prob``: ``max_s p(s)``.
        - ``sink_mass``: ``p(0)``, the mass on the first key (the "attention sink").
        - ``mean_distance``: ``Σ_s p(s) (t - s)`` in tokens, ``t`` the query's position.
    """
    B, Hq, T, Hkv, Tk, D, scaling = _check_attention_inputs(q, k, key_padding_mask, scaling)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    G, offset, device = Hq // Hkv, Tk - T, q.device
    keep = None if key_padding_mask is None else key_padding_mask.to(device=device).bool()
    q32 = q.float().reshape(B, Hkv, G, T, D)
    key_pos = torch.arange(Tk, device=device)
    query_pos = torch.arange(offset, Tk, device=device)
    # [k | s | 1]: one matmul with the probabilities gives Σ p k, Σ p s and Σ p
    k_ext = torch.cat([k.float(), key_pos.float()[None, None, :, None].expand(B, Hkv, Tk, 1),
                       torch.ones(B, Hkv, Tk, 1, device=device)], dim=-1)  # [B, Hkv, Tk, D + 2]

    m = torch.full((B, Hkv, G, T), float("-inf"), device=device)  # running max of the logits
    acc = torch.zeros(B, Hkv, G, T, D + 2, device=device)  # Σ exp(x - m) [k | s | 1]
    for i0 in range(0, T, block_size):
        i1 = min(T, i0 + block_size)
        nq = i1 - i0
        q_block = q32[:, :, :, i0:i1].reshape(B, Hkv, G * nq, D)
        m_i, acc_i = m[..., i0:i1], acc[..., i0:i1, :]  # views, updated in place
        for j0 in range(0, offset + i1, block_size):  # key blocks that some query of the block sees
            j1 = min(Tk, j0 + block_size, offset + i1)
            logits = (q_block @ k_ext[:, :, j0:j1, :D].transpose(-1, -2)).view(B, Hkv, G, nq, j1 - j0)
            logits.mul_(scaling)
            allowed = None
            if j1 - 1 > offset + i0 or keep is not None:  # crosses the diagonal, or padding
                allowed = _allowed(query_pos[i0:i1], key_pos[j0:j1], None if keep is None else keep[:, j0:j1])
                allowed = allowed[:, :, None]  # [B or 1, 1, 1, nq, nk]
                logits.masked_fill_(~allowed, float("-inf"))
            m_new = torch.maximum(m_i, logits.amax(dim=-1))
            m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # finite reference
            alpha = torch.where(torch.isinf(m_i), torch.zeros_like(m_i), (m_i - m_ref).exp())
            p = logits.sub_(m_ref.unsqueeze(-1)).exp_()  # 0 where masked
            acc_i.mul_(alpha.unsqueeze(-1)).add_(
                (p.view(B, Hkv, G * nq, j1 - j0) @ k_ext[:, :, j0:j1]).view(B, Hkv, G, nq, D + 2))
            m_i.copy_(m_new)

    l = acc[..., D + 1]
    seen = l > 0
    nan = torch.full_like(l, float("nan"))
    l_safe = torch.where(seen, l, torch.ones_like(l))
    m_safe = torch.where(seen, m, torch.zeros_like(m))
    mean_logit = scaling * (q32 * acc[..., :D]).sum(-1) / l_safe  # Σ p x
    entropy = torch.where(seen, l_safe.log() + m_safe - mean_logit, nan)
    max_prob = torch.where(seen, 1.0 / l_safe, nan)
    mean_distance = torch.where(seen, query_pos.float() - acc[..., D] / l_safe, nan)
    logit0 = (q32 * k.float()[:, :, None, :1]).sum(-1) * scaling  # [B, Hkv, G, T]
    sink = (logit0 - m_safe).exp() / l_safe
    if keep is not None:
        sink = sink * keep[:, :1, None, None]
    sink_mass = torch.where(seen, sink, nan)
    out = {"entropy": entropy, "max_prob": max_prob, "sink_mass": sink_mass, "mean_distance": mean_distance}
    return {name: v.reshape(B, Hq, T) for name, v in out.items()}


def _flash_cpu(q: torch.Tensor):
    """PyTorch's fused CPU flash-attention kernel (returns the log-sum-exp), or None where it does not apply."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op if op is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) else None


def causal_attention_with_summaries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scaling: float | None = None, block_size: int = 128,
    key_block_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Causal attention output and :func:`attention_summaries`: the flash kernel plus one exact pass (CPU; ``T = Tk``).

    PyTorch's flash kernel runs once on ``q``, ``k``, ``v`` as the plain forward
    does, and returns with the output the log-sum-exp ``lse`` of every row.
    Knowing ``lse``, one blockwise pass over the causal tiles gets the exact
    log-probabilities ``y = (x - lse) · log2(e) = log2(e) · [scaling·q | -lse] · [k | 1]``
    from a single matmul, with no online rescaling. Per tile: a row max
    (``max_prob = 2^max y``), ``p = 2^y`` (``exp2``, about three times cheaper than
    ``exp`` on CPU), a row-wise dot ``Σ p y`` (``entropy = -ln 2 · Σ p y``) and
    ``p @ s`` (``mean_distance = t - Σ p s``); ``sink_mass = exp(x₀ - lse)``.
    Queries go in blocks of ``block_size`` (the ``Hq / Hkv`` heads of a key head
    together), keys in chunks of ``key_block_size``; only the square on the
    diagonal is masked, and the two tile buffers are reused, so extra memory is
    ``O(Hq · block_size · key_block_size)`` plus the results (no tile-sized temporaries). The pass costs
    about as much as the kernel itself. The output equals the sdpa output up to
    fp32 rounding (the kernel sums in another order), not bit for bit.

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, T, D]`` (queries and keys at the same positions).

    Returns ``(out [B, Hq, T, D] in q's dtype, summaries)`` — or None when the fused kernel
    does not apply (not CPU, not fp32/bf16, ``T != Tk``, v's head size not D); use
    :func:`attention_summaries` then.
    """
    B, Hq, T, Hkv, Tk, D, scaling = _check_attention_inputs(q, k, None, scaling)
    block_size, key_block_size = check_int("block_size", block_size, lo=1), check_int("key_block_size", key_block_size, lo=1)
    op = _flash_cpu(q)
    if op is None or T != Tk or v.shape[:3] != k.shape[:3] or v.shape[-1] != D:
        return None
    G, Dv, device = Hq // Hkv, v.shape[-1], q.device
    q32, k32, v32 = q.float().reshape(B, Hkv, G, T, D), k.float(), v.float()
    outs, lses = [], []
    for g in range(G):  # query heads sharing a key head: one call each (the kernel wants equal head counts)
        o, lse = op(q32[:, :, g], k32, v32, 0.0, True, scale=scaling)[:2]
        outs.append(o)
        lses.append(lse.float())
    out = torch.stack(outs, dim=2).reshape(B, Hq, T, Dv).to(q.dtype)
    del outs
    lse = torch.stack(lses, dim=2)  # [B, Hkv, G, T]
    # [scaling·q | -lse] · [k | 1] · log2(e) = (x - lse) / ln 2, the log-probabilities in bits, from one
    # matmul: p = exp2 of it (exp2 is about three times cheaper than exp on CPU)
    q_ext = torch.cat([q32 * scaling, -lse.unsqueeze(-1)], dim=-1).mul_(math.log2(math.e))  # [B, Hkv, G, T, D + 1]
    k_ext = torch.cat([k32, torch.ones(B, Hkv, T, 1, device=device)], dim=-1).transpose(-1, -2)  # [B, Hkv, D + 1, T]
    pos = torch.arange(T, device=device, dtype=torch.float32)
    row_max = torch.empty(B, Hkv, G, T, device=device)  # max_s log2 p_s
    plogp = torch.empty(B, Hkv, G, T, device=device)  # Σ p log2 p
    dist = torch.empty(B, Hkv, G, T, device=device)  # Σ p (t - s)
    mass = torch.empty(B, Hkv, G, T, device=device)  # Σ p, 1 up to rounding: the summaries are normalised by it
    lowest = torch.finfo(torch.float32).min  # exp2 gives 0 and 0 · lowest = 0 (-inf would give NaN)
    above = torch.ones(block_size, block_size, dtype=torch.bool, device=device).triu_(1)  # s > t on the diagonal
    nk_max = min(max(key_block_size, block_size), T)  # the widest tile: a key chunk or the diagonal square
    x_buf = torch.empty(B, Hkv, G * block_size * nk_max, device=device)
    p_buf = torch.empty_like(x_buf)
    for i0 in range(0, T, block_size):
        i1 = min(T, i0 + block_size)
        nq = i1 - i0
        qb = q_ext[:, :, :, i0:i1].reshape(B, Hkv, G * nq, D + 1)
        m_i = torch.full((B, Hkv, G * nq), float("-inf"), device=device)
        h_i, d_i, z_i = (torch.zeros(B, Hkv, G * nq, device=device) for _ in range(3))
        # key chunks left of the block (no mask), then the diagonal square [i0, i1)
        bounds = [(j0, min(i0, j0 + key_block_size)) for j0 in range(0, i0, key_block_size)] + [(i0, i1)]
        for j0, j1 in bounds:
            size = G * nq * (j1 - j0)
            x = torch.matmul(qb, k_ext[..., j0:j1], out=x_buf[..., :size].view(B, Hkv, G * nq, j1 - j0))
            if j0 == i0:
                x.view(B, Hkv, G, nq, nq).masked_fill_(above[:nq, :nq], lowest)
            torch.maximum(m_i, x.amax(-1), out=m_i)
            p = torch.exp2(x, out=p_buf[..., :size].view_as(x))
            d_i.add_(p @ (i0 - pos[j0:j1]))  # Σ p (i0 - s): distances from the block, no cancellation
            z_i.add_(p.sum(-1))
            h_i.add_(x.mul_(p).sum(-1))  # in place: no tile-sized temporary
        for acc, acc_i in ((row_max, m_i), (plogp, h_i), (dist, d_i), (mass, z_i)):
            acc[..., i0:i1] = acc_i.view(B, Hkv, G, nq)
    dist.add_((pos - (pos // block_size) * block_size) * mass)  # + (t - i0) Σ p
    logit0 = scaling * (q32 * k32[:, :, None, :1]).sum(-1)  # x₀, [B, Hkv, G, T]
    summaries = {  # of p / Σ p
        "entropy": mass.log() - plogp.mul_(math.log(2.0)).div_(mass),
        "max_prob": row_max.exp2_().div_(mass),
        "sink_mass": (logit0 - lse).exp().div_(mass),
        "mean_distance": dist.div_(mass),
    }
    return out, {name: t.reshape(B, Hq, T) for name, t in summaries.items()}


def attention_probs_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    heads=None,
    rows=None,
    scaling: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact attention probabilities for chosen query heads and rows.

    Args:
        q: ``[B, Hq, T, D]``.  k: ``[B, Hkv, Tk, D]``.  key_padding_mask: ``[B, Tk]`` or None.
        heads: query heads (indices into Hq); None for all.
        rows: query rows (indices into T, i.e. position ``Tk - T + row``); None for all.

    Returns:
        probs ``[B, len(heads), len(rows), Tk]`` fp32; each row sums to 1 over the keys it sees.
    """
    (_B, Hq, T, Hkv, Tk, _D, scaling), heads, rows = check_rows_inputs(q, k, key_padding_mask, scaling, heads, rows)
    G, device = Hq // Hkv, q.device
    keep = None if key_padding_mask is None else key_padding_mask.to(device=device).bool()
    head_idx = torch.tensor(heads, device=device)
    row_idx = torch.tensor(rows, device=device)
    q_sel = q[:, head_idx][:, :, row_idx].float()  # [B, nh, R, D]
    k_sel = k[:, head_idx // G].float()  # [B, nh, Tk, D]
    logits = (q_sel @ k_sel.transpose(-1, -2)) * scaling  # [B, nh, R, Tk]
    allowed = _allowed(row_idx + (Tk - T), torch.arange(Tk, device=device), keep)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
