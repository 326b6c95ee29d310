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

import torch

from .gated_delta import _check_index_list, _check_tensor

__all__ = ["attention_probs_rows", "attention_summaries"]


def _check_attention_inputs(q, k, key_padding_mask, scaling):
    """Validate; return ``(B, Hq, T, Hkv, Tk, D, scaling)``."""
    _check_tensor("q", q, 4, "[B, Hq, T, D]")
    _check_tensor("k", k, 4, "[B, Hkv, Tk, D]")
    B, Hq, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k has shape {tuple(k.shape)}, expected [B, Hkv, Tk, D] with B = {B} and D = {D} like q "
            f"(shape {tuple(q.shape)})"
        )
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"the number of query heads Hq = {Hq} (q shape {tuple(q.shape)}) must be a multiple of the "
            f"number of key heads Hkv = {Hkv} (k shape {tuple(k.shape)})"
        )
    if T < 1 or T > Tk:
        raise ValueError(
            f"q has T = {T} query positions and k has Tk = {Tk} keys; the queries are the last T of the "
            f"Tk positions, so 1 <= T <= Tk is required"
        )
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(
                f"key_padding_mask must be a torch.Tensor of shape [B, Tk] = {(B, Tk)}, "
                f"got {type(key_padding_mask).__name__}"
            )
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(
                f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected [B, Tk] = {(B, Tk)} "
                f"(1 = keep the key, 0 = padding)"
            )
    if scaling is None:
        scaling = D**-0.5
    elif isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not scaling > 0:
        raise ValueError(f"scaling must be a positive number or None (= D ** -0.5), got {scaling!r}")
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
    block_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per-query summaries of the attention distribution ``p_t(s)``, computed blockwise.

    Queries and keys are visited in blocks of ``block_size`` with an online (streaming) softmax,
    so extra memory is ``O(Hq · block_size²)`` per step plus the ``[B, Hq, T]`` results.

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
    q32 = q.float().view(B, Hkv, G, T, D)
    k32 = k.float()
    key_pos = torch.arange(Tk, device=device)
    query_pos = torch.arange(offset, Tk, device=device)

    # Running statistics over the keys seen so far, relative to the running max m:
    #   l = Σ exp(x - m),  a = Σ exp(x - m) (x - m),  b = Σ exp(x - m) s
    m = torch.full((B, Hq, T), float("-inf"), device=device)
    l, a, b = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    for i0 in range(0, T, block_size):
        i1 = min(T, i0 + block_size)
        nq = i1 - i0
        q_block = q32[:, :, :, i0:i1].reshape(B, Hkv, G * nq, D)
        m_i, l_i, a_i, b_i = (x[:, :, i0:i1] for x in (m, l, a, b))  # views, updated in place
        for j0 in range(0, offset + i1, block_size):  # key blocks that some query of the block sees
            j1 = min(Tk, j0 + block_size)
            logits = (q_block @ k32[:, :, j0:j1].transpose(-1, -2)).view(B, Hq, nq, j1 - j0) * scaling
            allowed = _allowed(query_pos[i0:i1], key_pos[j0:j1], None if keep is None else keep[:, j0:j1])
            logits = logits.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m_i, logits.amax(dim=-1))
            m_ref = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # finite reference
            shift = torch.where(torch.isinf(m_i), torch.zeros_like(m_i), m_i - m_ref)  # old m - new m
            alpha = shift.exp() * (l_i > 0)  # rescales the old sums; 0 while nothing was seen
            x = logits - m_ref.unsqueeze(-1)
            p = x.exp()  # 0 where masked
            a_i.copy_(alpha * (a_i + shift * l_i) + (p * x.masked_fill(~allowed, 0.0)).sum(-1))
            l_i.mul_(alpha).add_(p.sum(-1))
            b_i.mul_(alpha).add_(p @ key_pos[j0:j1].to(p.dtype))
            m_i.copy_(m_new)

    seen = l > 0
    nan = torch.full_like(l, float("nan"))
    l_safe = torch.where(seen, l, torch.ones_like(l))
    entropy = torch.where(seen, l_safe.log() - a / l_safe, nan)
    max_prob = torch.where(seen, 1.0 / l_safe, nan)
    mean_distance = torch.where(seen, query_pos.float() - b / l_safe, nan)
    logit0 = (q32 @ k32[:, :, :1].unsqueeze(2).transpose(-1, -2)).view(B, Hq, T) * scaling
    sink = (logit0 - torch.where(seen, m, torch.zeros_like(m))).exp() / l_safe
    if keep is not None:
        sink = sink * keep[:, :1, None]
    sink_mass = torch.where(seen, sink, nan)
    return {"entropy": entropy, "max_prob": max_prob, "sink_mass": sink_mass, "mean_distance": mean_distance}


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
    B, Hq, T, Hkv, Tk, D, scaling = _check_attention_inputs(q, k, key_padding_mask, scaling)
    heads = _check_index_list("heads", heads, Hq, f"query heads for Hq = {Hq}")
    rows = _check_index_list("rows", rows, T, f"query rows for T = {T}")
    G, device = Hq // Hkv, q.device
    keep = None if key_padding_mask is None else key_padding_mask.to(device=device).bool()
    head_idx = torch.tensor(heads, device=device)
    row_idx = torch.tensor(rows, device=device)
    q_sel = q[:, head_idx][:, :, row_idx].float()  # [B, nh, R, D]
    k_sel = k[:, head_idx // G].float()  # [B, nh, Tk, D]
    logits = (q_sel @ k_sel.transpose(-1, -2)) * scaling  # [B, nh, R, Tk]
    allowed = _allowed(row_idx + (Tk - T), torch.arange(Tk, device=device), keep)
    return logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
