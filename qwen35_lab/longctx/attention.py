"""Attention for chunked prefill whose working set grows with the chunk, not with the context.

During a chunked prefill the ``c`` queries of a chunk are the *last* ``c`` of
``Tk`` cached positions (``Tk = P + c``, ``P`` tokens before the chunk).
transformers' ``sdpa`` path then builds a ``[c, Tk]`` causal mask and, because a
mask is present, repeats K and V to every query head
(``2 · Hq · head_dim · Tk`` values): both grow with the whole context.

:func:`chunk_attention` splits the keys in two and merges the halves by their
log-sum-exp, the way blockwise (flash) attention merges blocks:

* the ``P`` past keys, which every query of the chunk sees: no mask at all, and
  grouped-query attention by folding the ``G = Hq / Hkv`` query heads that share
  a key head into the query axis (``[B, Hkv, G · c, D]``), so K and V are never
  repeated;
* the chunk's own ``c`` keys, a square causal block (``is_causal``; for a square
  block the top-left and bottom-right alignments agree), one call per query
  head of each group (``[B, Hkv, c, D]`` against the shared key head), so
  nothing is repeated there either.

``out = (e^{lse₁} out₁ + e^{lse₂} out₂) / (e^{lse₁} + e^{lse₂})`` is the softmax
over all ``Tk`` keys, exact up to fp32 rounding. On CPU both halves run in
PyTorch's fused flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``,
which returns the log-sum-exp), whose working set is a few blocks of scores;
elsewhere (or if that kernel is missing) a streaming softmax over key blocks of
:data:`KEY_BLOCK` in plain torch does the same with ``O(Hq · c · KEY_BLOCK)``
scores. No ``[c, Tk]`` tensor is ever formed.

Use it through :func:`chunked_attention` (a context manager that switches a
model to this implementation and back); :func:`~qwen35_lab.longctx.chunked_prefill`
does so by default.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["ATTN_IMPLEMENTATION", "KEY_BLOCK", "chunk_attention", "chunked_attention"]

ATTN_IMPLEMENTATION = "qwen35_lab_chunked"
KEY_BLOCK = 4096  # keys per block of the plain-torch path


def _flash_cpu():
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op


def _attend(q, k, v, scaling: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` [B, H, n, D] over ``k, v`` [B, H, m, D] (same heads).

    Returns ``(out [B, H, n, D] in q's dtype, lse [B, H, n] fp32)``; ``causal``
    (square blocks only) lets query ``i`` see keys ``0..i``.
    """
    op = _flash_cpu()
    if op is not None and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = op(q, k, v, 0.0, causal, scale=scaling)
        return out, lse.float()
    # Streaming softmax over key blocks (any device): O(H · n · KEY_BLOCK) scores at a time.
    B, H, n, D = q.shape
    m = k.shape[2]
    q32 = q.float()
    acc = torch.zeros(B, H, n, v.shape[-1], device=q.device, dtype=torch.float32)
    run_max = torch.full((B, H, n), float("-inf"), device=q.device)
    run_sum = torch.zeros(B, H, n, device=q.device)
    rows = torch.arange(n, device=q.device)
    for j0 in range(0, m, KEY_BLOCK):
        j1 = min(m, j0 + KEY_BLOCK)
        s = (q32 @ k[:, :, j0:j1].float().transpose(-1, -2)) * scaling  # [B, H, n, kb]
        if causal:
            s = s.masked_fill(torch.arange(j0, j1, device=q.device)[None, :] > rows[:, None], float("-inf"))
        new_max = torch.maximum(run_max, s.amax(-1))
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        scale_old = torch.exp(run_max - safe)
        p = torch.exp(s - safe[..., None])
        run_sum = run_sum * scale_old + p.sum(-1)
        acc = acc * scale_old[..., None] + p @ v[:, :, j0:j1].float()
        run_max = new_max
    out = acc / run_sum[..., None]
    return out.to(q.dtype), run_max + run_sum.log()


def chunk_attention(module, query, key, value, attention_mask=None, dropout: float = 0.0, scaling=None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: causal attention of the last ``c`` positions over ``Tk`` keys.

    Args:
        query: ``[B, Hq, c, D]``; key, value: ``[B, Hkv, Tk, D]`` (the cache, this chunk last).
        attention_mask: must be None (unpadded input); a padded batch goes to transformers' sdpa.

    Returns ``(out [B, c, Hq, D], None)`` as transformers' ``sdpa_attention_forward``.
    """
    if attention_mask is not None or dropout:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, Hq, c, D = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    G = Hq // Hkv
    P = Tk - c
    scaling = float(scaling if scaling is not None else D ** -0.5)
    # the chunk's own keys: a square causal block, one call per query head g of each group
    q_grouped = query.reshape(B, Hkv, G, c, D)
    k_own, v_own = key[:, :, P:], value[:, :, P:]
    parts = [_attend(q_grouped[:, :, g], k_own, v_own, scaling, causal=True) for g in range(G)]
    out = torch.stack([o for o, _ in parts], dim=2).view(B, Hq, c, -1)  # [B, Hq, c, D]
    lse = torch.stack([s for _, s in parts], dim=2).view(B, Hq, c)  # [B, Hq, c]
    del parts
    if P > 0:
        # the past keys, seen by every query: fold the G query heads of a key head into the query axis
        q_fold = query.reshape(B, Hkv, G * c, D)
        out_p, lse_p = _attend(q_fold, key[:, :, :P], value[:, :, :P], scaling, causal=False)
        out_p, lse_p = out_p.reshape(B, Hq, c, -1), lse_p.reshape(B, Hq, c)
        lse_all = torch.logaddexp(lse, lse_p)
        out = (out.float() * torch.exp(lse - lse_all)[..., None]
               + out_p.float() * torch.exp(lse_p - lse_all)[..., None]).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, chunk_attention)


@contextlib.contextmanager
def chunked_attention(model):
    """Run ``model``'s full-attention layers with :func:`chunk_attention` inside the block.

    transformers builds no attention mask for an implementation it does not
    know, so the ``[c, Tk]`` mask disappears too. The previous implementation is
    restored on exit, also after an error.
    """
    _register()
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "layer_types")]
    configs = list({id(c): c for c in configs}.values())
    old = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_IMPLEMENTATION
        yield model
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
