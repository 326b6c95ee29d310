"""Long inputs on a laptop: chunked prefill through a cache, and synthetic long documents.

A Qwen3.5 prefill can run in chunks of ``chunk_size`` tokens: each forward
continues the previous one through transformers' ``DynamicCache`` (the
DeltaNet layers carry their fixed-size state and conv window, the attention
layers a KV cache that grows by one chunk). The attention layers run
:func:`~qwen35_lab.longctx.attention.chunk_attention` (no ``[chunk, context]``
mask, no K/V repeated per query head), so peak memory is the cache plus one
chunk's working set instead of the whole input's (see
:func:`~qwen35_lab.longctx.plan_memory`), and the result is the same as one
forward over everything. Captures work across chunks: the instrumentation
session places every chunk at its absolute positions.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass

import torch

from .attention import ATTN_IMPLEMENTATION, chunked_attention
from .memory import check_fits, plan_memory
from .rope import check_context

__all__ = ["PrefillResult", "chunked_prefill", "LongDocument", "long_document"]


@dataclass
class PrefillResult:
    """What :func:`chunked_prefill` returns."""

    logits: torch.Tensor  # [B, vocab] fp32 logits at the last position
    cache: object  # the DynamicCache after the last chunk (continue decoding from it)
    trace: object | None  # a Trace of the captured probes over the whole input, or None
    nll: torch.Tensor | None  # [B, T - 1] fp32: -log p(x_{t+1} | x_<=t), when asked for
    n_tokens: int
    chunk_size: int
    seconds: float
    plan: object  # the MemoryPlan it was checked against

    def __repr__(self) -> str:
        return (f"PrefillResult({self.n_tokens:,} tokens in chunks of {self.chunk_size:,}, {self.seconds:.1f} s, "
                f"trace={'yes' if self.trace is not None else 'no'}, nll={'yes' if self.nll is not None else 'no'})")


def _input_ids(lab, inputs) -> torch.Tensor:
    if isinstance(inputs, LongDocument):
        inputs = inputs.input_ids
    if isinstance(inputs, dict):
        extra = sorted(k for k in inputs if k not in ("input_ids", "attention_mask") and inputs[k] is not None)
        if extra:
            raise ValueError(f"chunked_prefill takes text token ids only; these inputs are not supported: {extra} "
                             f"(run images and video with lab.run)")
        mask = inputs.get("attention_mask")
        if mask is not None and not bool((mask == 1).all()):
            raise ValueError("chunked_prefill takes unpadded inputs (attention_mask all ones); prefill "
                             "sequences of different lengths one at a time")
        inputs = inputs["input_ids"]
    if isinstance(inputs, str):
        if not inputs:
            raise ValueError("chunked_prefill got an empty string")
        return lab.encode(inputs)
    if not torch.is_tensor(inputs):
        raise TypeError(f"inputs must be token ids (tensor [T] or [B, T]), a string, a LongDocument or a dict "
                        f"with input_ids; got {type(inputs).__name__}")
    if inputs.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise TypeError(f"input_ids must be an integer tensor, got {inputs.dtype}")
    ids = inputs if inputs.dim() == 2 else inputs[None] if inputs.dim() == 1 else None
    if ids is None:
        raise ValueError(f"input_ids must have shape [T] or [B, T], got {tuple(inputs.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty (0 tokens)")
    vocab = lab.text_config.vocab_size
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for a vocabulary of {vocab:,} (0–{vocab - 1})")
    return ids.long().to(lab.device)


def chunked_prefill(lab, inputs, *, chunk_size: int = 2048, capture=None, progress: bool = True,
                    positions=None, heads=None, capture_device="cpu", capture_dtype=None,
                    state_chunk_size: int = 64, budget_bytes: int | None = None, nll: bool = False,
                    check_memory: bool = True, attention: str = "chunked") -> PrefillResult:
    """Run ``inputs`` through the model ``chunk_size`` tokens at a time, through one ``DynamicCache``.

    Everything is checked before the first chunk runs: the length against the
    active RoPE (a context over the maximum without YaRN is refused, saying how
    to enable it), the memory the planner predicts against free memory, and the
    capture's size against its budget.

    Args:
        inputs: token ids ``[T]`` / ``[B, T]``, a prompt string, a :class:`LongDocument`.
        chunk_size: tokens per forward; memory grows with it, the result does not change.
        capture, positions, heads, capture_device, capture_dtype, budget_bytes: as for
            ``lab.run``; probes cover the whole input at absolute positions
            (``state_chunk_size`` is the DeltaNet checkpoint spacing).
        nll: also return the next-token loss at every position (``[B, T - 1]``).
        check_memory: refuse an input the planner says will not fit.
        attention: ``"chunked"`` (default): :func:`~qwen35_lab.longctx.attention.chunk_attention`,
            whose working set grows with the chunk; ``"model"``: the model's own implementation
            (transformers' sdpa builds a ``[chunk, context]`` mask and repeats K/V per query head).

    Returns a :class:`PrefillResult` (``logits`` of the last position, ``cache``, ``trace``, ``nll``).
    """
    from tqdm.auto import tqdm

    from .. import instrument as _inst
    from .._io import fmt_bytes

    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (tokens per forward), got {chunk_size!r}")
    if attention not in ("chunked", "model"):
        raise ValueError(f"attention must be 'chunked' or 'model', got {attention!r}")
    ids = _input_ids(lab, inputs)
    B, T = ids.shape
    check_context(lab, T)
    plan = plan_memory(lab, T, batch=B, prefill_chunk=chunk_size, logits="all" if nll else "last",
                       attn_implementation=ATTN_IMPLEMENTATION if attention == "chunked" else None)
    if check_memory:
        check_fits(plan, device=str(lab.device))
    names: list[str] = []
    if capture is not None:
        names, _ = _inst.plan(lab.config, capture, None)
        est = lab.estimate(names, length=T, batch_size=B, positions=positions, heads=heads, dtype=capture_dtype,
                           chunk_size=state_chunk_size)
        budget = budget_bytes if budget_bytes is not None else _inst.default_budget_bytes(capture_device)
        if est["total"] > budget:
            top = sorted(est["per_probe"].items(), key=lambda kv: -kv[1])[:3]
            raise MemoryError(
                f"capturing {len(names)} probe(s) over {T:,} tokens needs about {fmt_bytes(est['total'])}, over the "
                f"budget of {fmt_bytes(budget)} (largest: {', '.join(f'{n} {fmt_bytes(b)}' for n, b in top)}). "
                f"Narrow it: fewer probes, positions=[...], heads=[...], capture_dtype=torch.bfloat16, "
                f"or raise budget_bytes=.")
    keep_all_logits = nll or "logits" in names

    from transformers import DynamicCache

    cache = DynamicCache(config=lab.model.config)
    session = (lab.trace(names, positions=positions, heads=heads, device=capture_device, dtype=capture_dtype,
                         chunk_size=state_chunk_size, budget_bytes=budget_bytes)
               if names else contextlib.nullcontext(None))
    losses = []
    prev_last = None  # logits at the last position of the previous chunk [B, vocab]
    bar = tqdm(total=T, unit="tok", desc="prefill", disable=not progress, mininterval=1.0)
    t0 = time.perf_counter()
    switch = chunked_attention(lab.model) if attention == "chunked" else contextlib.nullcontext()
    with torch.no_grad(), switch, session as tr:
        for start in range(0, T, chunk_size):
            piece = ids[:, start:start + chunk_size]
            out = lab.model(input_ids=piece, past_key_values=cache, use_cache=True,
                            logits_to_keep=0 if keep_all_logits else 1)
            cache = out.past_key_values
            logits = out.logits
            if nll:
                lp = torch.log_softmax(logits.float(), dim=-1)  # [B, c, vocab]
                step = -lp[:, :-1].gather(-1, piece[:, 1:, None])[..., 0]  # predicts piece[1:]
                if prev_last is not None:  # the previous chunk's last position predicts this chunk's first token
                    first = -torch.log_softmax(prev_last, dim=-1).gather(-1, piece[:, :1])
                    step = torch.cat([first, step], dim=1)
                losses.append(step.cpu())
            prev_last = logits[:, -1].float()
            bar.update(piece.shape[1])
    bar.close()
    seconds = time.perf_counter() - t0
    trace = tr if names else None
    if trace is not None:
        trace.meta["last_logits"] = prev_last.cpu()
        trace.meta["chunk_size"] = chunk_size
    return PrefillResult(logits=prev_last.cpu(), cache=cache, trace=trace,
                         nll=torch.cat(losses, dim=1) if nll else None, n_tokens=T, chunk_size=chunk_size,
                         seconds=seconds, plan=plan)


# ------------------------------------------------------------ long documents
@dataclass
class LongDocument:
    """A synthetic document: ``input_ids`` ``[1, T]``, its ``text``, and where the needle sits."""

    input_ids: torch.Tensor
    text: str
    needle_span: tuple[int, int] | None  # token positions [start, end) of the needle, or None
    seed: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[1])


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def long_document(tokenizer, n_tokens: int, seed: int = 0, needle: str | None = None,
                  depth: float = 0.5) -> LongDocument:
    """A document of exactly ``n_tokens`` tokens of filler sentences, with an optional ``needle``.

    The filler is the classic passkey filler ("the grass is green . the sky is
    blue . …", the sentences of the ``passkey`` organism), shuffled by ``seed``;
    it reads the same to the real tokenizer and to the organisms' word
    vocabularies. ``needle`` (e.g. ``"the key is lemon ."``) is placed at the
    sentence boundary nearest ``depth`` (0 = start, 1 = end).

    Args:
        tokenizer: an HF tokenizer, or a Lab (its tokenizer is used).
    """
    from ..organisms.tasks import FILLER_SENTENCES

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(tok, "encode"):
        raise TypeError(f"long_document needs a tokenizer or a Lab, got {type(tokenizer).__name__}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")
    unk = getattr(tok, "unk_token_id", None)
    sentences = [_encode(tok, " " + s) for s in FILLER_SENTENCES]
    if unk is not None and any(unk in s for s in sentences):
        raise ValueError("this tokenizer cannot spell the filler sentences (they map to its unknown token)")
    needle_ids: list[int] = []
    if needle is not None:
        if not isinstance(needle, str) or not needle.strip():
            raise ValueError(f"needle must be a non-empty string or None, got {needle!r}")
        needle_ids = _encode(tok, " " + needle.strip())
        if unk is not None and unk in needle_ids:
            raise ValueError(f"this tokenizer cannot spell the needle {needle!r} (unknown token)")
        if len(needle_ids) >= n_tokens:
            raise ValueError(f"the needle takes {len(needle_ids)} tokens; n_tokens={n_tokens} leaves no room for filler")
    rng = random.Random(seed)
    budget = n_tokens - len(needle_ids)
    pieces, total = [], 0
    while total < budget:
        s = rng.choice(sentences)[: budget - total]
        pieces.append(s)
        total += len(s)
    span = None
    if needle is not None:
        slot = round(depth * len(pieces))
        start = sum(len(p) for p in pieces[:slot])
        pieces.insert(slot, needle_ids)
        span = (start, start + len(needle_ids))
    ids = [t for p in pieces for t in p]
    return LongDocument(input_ids=torch.tensor([ids]), text=tok.decode(ids), needle_span=span, seed=seed)
