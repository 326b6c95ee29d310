"""Where the ``recall`` organisms keep the key → value associations: reading the DeltaNet state.

After the pairs ``k v k v …`` a Gated DeltaNet layer holds ``S_t ≈ Σ_p v_p k_pᵀ``
(decayed). At a query key at position ``t`` the layer reads ``S_tᵀ q_t``
(``q_t`` the normalised query of that head). If that layer does the recall,
the read vector points at the value written for the queried key.

:func:`state_readout` measures this train-free: for every query it compares
the read vector ``S_tᵀ q_t`` of a value head with the write vectors ``v_p``
of the ``N`` value tokens of the prompt (cosine similarity) and counts how
often the nearest one belongs to the queried pair (chance ``1/N``).
:func:`beta_ablation` is the causal check: with ``β = 0`` at a layer nothing
is written to its state, and recall accuracy should fall to chance.
"""

from __future__ import annotations

import random

import torch

from ..checks import check_choice
from . import tasks

__all__ = ["state_readout", "beta_ablation", "WRITE_OFFSETS"]

WRITE_OFFSETS = {"value": (1,), "next": (2,), "both": (1, 2)}  # a pair's writes after its key token 2j


def _batch(lab, num_pairs: int, n: int, seed: int):
    rng = random.Random(seed)
    examples = [tasks.recall_example(rng, num_pairs) for _ in range(n)]
    vocab = lab.tokenizer.get_vocab()
    ids = torch.tensor([[vocab[w] for w in ex.words] for ex in examples])  # [B, T]
    return examples, ids


def _linear_layers(lab) -> list[int]:
    return [i for i, kind in enumerate(lab.layer_types) if kind == "linear_attention"]


def state_readout(lab, *, layer: int | None = None, num_pairs: int | None = None, n: int = 100,
                  seed: int = 2024, read: str = "q", writes: str = "value") -> dict:
    """Accuracy of decoding the queried value from ``S_tᵀ q_t`` (or ``S_tᵀ k_t``) by nearest write vector.

    The causal conv (kernel 4) mixes each token with the three before it, so a
    pair ``k_j v_j`` (tokens ``2j``, ``2j + 1``) can reach the state through the
    write at its value token ``2j + 1`` or at the next token ``2j + 2``, whose
    window still holds both; models differ in which one carries it.

    Args:
        lab: a recall organism (``ql.load("recall")``).
        layer: the DeltaNet layer to read; default: every linear layer, best reported.
        num_pairs: pairs per prompt (default: the training length).
        n: prompts; every query of every prompt is scored.
        read: ``"q"`` reads ``S_tᵀ q_t``, ``"k"`` reads ``S_tᵀ k_t`` (both normalised, per value head).
        writes: the write vectors a pair is named by: ``"value"`` the value token's (``2j + 1``),
            ``"next"`` the next token's (``2j + 2``), ``"both"`` the nearer of the two.

    Returns ``{"accuracy", "chance", "layer", "head", "read", "writes", "n", "queries",
    "per_head": {(layer, head): accuracy}}`` where ``accuracy`` is the best
    (layer, head).
    """
    check_choice("read", read, ("q", "k"))
    check_choice("writes", writes, tuple(WRITE_OFFSETS))
    linear = _linear_layers(lab)
    if layer is not None and layer not in linear:
        raise ValueError(f"layer {layer!r} is not a linear_attention layer; linear layers: {linear}")
    num_pairs = num_pairs if num_pairs is not None else (lab.meta or {}).get("train_length", 8)
    layers = linear if layer is None else [layer]
    examples, ids = _batch(lab, num_pairs, n, seed)
    tr = lab.run(ids, capture=[f"layers.{i}.deltanet.state" for i in layers])
    query_pos = examples[0].answer_positions  # the value answering query j is at p; its key sits at p - 1
    value_pos = [2 * i + 1 for i in range(num_pairs)]  # value tokens of the pairs
    write_pos = [[2 * i + o for i in range(num_pairs)] for o in WRITE_OFFSETS[writes]]
    per_head: dict[tuple[int, int], float] = {}
    for i in layers:
        x = tr.state_inputs(i)
        reader = x[read]  # [B, T, HV, K]
        v = x["v"].float()  # [B, T, HV, V]
        hits = None
        for p in query_pos:
            t = p - 1  # the query key token
            S = tr.state(i, t)  # [B, HV, K, V]
            r = torch.einsum("bhkv,bhk->bhv", S, reader[:, t].float())  # [B, HV, V]
            sim = torch.stack([torch.nn.functional.cosine_similarity(r[:, None], v[:, pos], dim=-1)
                               for pos in write_pos]).amax(0)  # [B, N, HV]: the nearer write of each pair
            picked = sim.argmax(1)  # [B, HV] pair index
            words = [ex.words for ex in examples]
            ok = torch.tensor([[words[b][value_pos[picked[b, h]]] == words[b][p] for h in range(picked.shape[1])]
                               for b in range(len(examples))], dtype=torch.float)  # [B, HV]
            hits = ok if hits is None else hits + ok
        acc = hits.sum(0) / (len(examples) * len(query_pos))  # [HV]
        for h, a in enumerate(acc.tolist()):
            per_head[(i, h)] = a
    (best_layer, best_head), best = max(per_head.items(), key=lambda kv: kv[1])
    return {"accuracy": best, "chance": _chance(examples), "layer": best_layer, "head": best_head, "read": read,
            "writes": writes, "n": n, "queries": n * num_pairs, "per_head": per_head}


def _chance(examples) -> float:
    """Accuracy of picking one of the N value tokens uniformly (duplicates of the answer count as right)."""
    total = 0.0
    for ex in examples:
        values = [ex.words[2 * i + 1] for i in range(len(ex.answers))]
        total += sum(values.count(a) / len(values) for a in ex.answers)
    return total / sum(len(ex.answers) for ex in examples)


def beta_ablation(lab, layer: int, *, num_pairs: int | None = None, n: int = 100, seed: int = 2024) -> dict:
    """Recall accuracy with ``β = 0`` (no writes) in DeltaNet ``layer``, next to the unedited accuracy."""
    linear = _linear_layers(lab)
    if layer not in linear:
        raise ValueError(f"layer {layer!r} is not a linear_attention layer; linear layers: {linear}")
    num_pairs = num_pairs if num_pairs is not None else (lab.meta or {}).get("train_length", 8)
    examples, ids = _batch(lab, num_pairs, n, seed)
    vocab = lab.tokenizer.get_vocab()
    result = {"layer": layer, "n": n, "chance": _chance(examples)}
    for key, edits in (("accuracy", None), ("ablated_accuracy", {f"layers.{layer}.deltanet.beta": 0.0})):
        tr = lab.run(ids, capture="logits", edits=edits)
        logits = tr["logits"].float()  # [B, T, vocab]
        correct = total = 0
        for b, ex in enumerate(examples):
            for p, a in zip(ex.answer_positions, ex.answers):
                correct += int(logits[b, p - 1].argmax()) == vocab[a]
                total += 1
        result[key] = correct / total
    return result
