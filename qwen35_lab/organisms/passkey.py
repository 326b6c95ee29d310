"""How the ``passkey`` organism finds the key: the attention layer looks back at the needle.

:func:`needle_attention` measures, at the last prompt token (``?``), the
attention probability the attention layer puts on the key word of the
needle (best head), averaged over prompts — the quantity that falls apart
when RoPE is pushed past its training length. :func:`attention_ablation`
and :func:`deltanet_ablation` are the causal checks: zero the attention
layer's output, or stop every write to the DeltaNet state (``β = 0``), and
see what is left.
"""

from __future__ import annotations

import random

import torch

from . import tasks

__all__ = ["needle_attention", "attention_ablation", "deltanet_ablation"]


def _attention_layer(lab) -> int:
    full = [i for i, kind in enumerate(lab.layer_types) if kind == "full_attention"]
    if not full:
        raise ValueError(f"{lab.name!r} has no full_attention layer")
    return full[-1]


def _prompts(lab, length: int, n: int, seed: int):
    rng = random.Random(seed)
    examples = [tasks.passkey_example(rng, length) for _ in range(n)]
    vocab = lab.tokenizer.get_vocab()
    ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])  # [B, T] prompts (no answer)
    return examples, ids


def needle_attention(lab, *, length: int | None = None, n: int = 50, seed: int = 2024) -> dict:
    """Mean attention from the final ``?`` to the needle's key word (best head) at ``length`` filler tokens.

    Returns ``{"attention", "head", "per_head", "layer", "length", "n"}``.
    """
    length = length if length is not None else (lab.meta or {}).get("train_length", 256)
    layer = _attention_layer(lab)
    examples, ids = _prompts(lab, length, n, seed)
    T = ids.shape[1]
    tr = lab.run(ids, capture=f"layers.{layer}.attn.probs", positions=[T - 1])
    probs = tr[f"layers.{layer}.attn.probs"][:, :, -1].float()  # [B, Hq, Tk]
    key_pos = torch.tensor([ex.words.index("key") + 2 for ex in examples])  # "the key is W": W two after "key"
    on_key = probs[torch.arange(n), :, key_pos]  # [B, Hq]
    per_head = on_key.mean(0).tolist()
    head = max(range(len(per_head)), key=per_head.__getitem__)
    return {"attention": per_head[head], "head": head, "per_head": per_head, "layer": layer, "length": length, "n": n}


def attention_ablation(lab, *, length: int | None = None, n: int = 100, seed: int = 2024) -> dict:
    """Passkey accuracy with the attention layer's output zeroed, next to the unedited accuracy."""
    layer = _attention_layer(lab)
    return _ablation(lab, layer, f"layers.{layer}.attn.out", length, n, seed)


def deltanet_ablation(lab, *, length: int | None = None, n: int = 100, seed: int = 2024) -> dict:
    """Passkey accuracy with ``β = 0`` (nothing written to the state) in every DeltaNet layer."""
    linear = [i for i, kind in enumerate(lab.layer_types) if kind == "linear_attention"]
    if not linear:
        raise ValueError(f"{lab.name!r} has no linear_attention layer")
    return _ablation(lab, linear, [f"layers.{i}.deltanet.beta" for i in linear], length, n, seed)


def _ablation(lab, layer, probes, length, n, seed) -> dict:
    length = length if length is not None else (lab.meta or {}).get("train_length", 256)
    probes = [probes] if isinstance(probes, str) else probes
    examples, ids = _prompts(lab, length, n, seed)
    vocab = lab.tokenizer.get_vocab()
    answers = torch.tensor([vocab[ex.answers[0]] for ex in examples])
    result = {"layer": layer, "length": length, "n": n, "chance": 1.0 / len(tasks.PASSKEY_WORDS)}
    for key, edits in (("accuracy", None), ("ablated_accuracy", {p: 0.0 for p in probes})):
        tr = lab.run(ids, capture="logits", edits=edits, positions=[ids.shape[1] - 1])
        pred = tr["logits"][:, -1].argmax(-1)
        result[key] = (pred == answers).float().mean().item()
    return result
