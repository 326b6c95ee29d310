"""How the ``needles`` organism finds a value among many needles: the attention layer looks it up.

A prompt hides ``N`` needles in filler, each one token ``k12:v7`` (key 12
holds value 7), and asks ``? k12``; the answer is ``v7``. The asked key was
assigned twice (a *stale* needle ``k12:v3`` sits somewhere before the current
one): the answer is the later value, so the look-up must tell the two copies
apart by word order, which only RoPE gives the attention layer. Helpers here build such prompts at any length
and needle depth, score them (one answer per prompt, with a 95% Wilson
interval), look at what the attention layer does at the question
(:func:`attention_at_question`: mass on the target needle, entropy, mean
distance) and run the causal controls: the attention layer's output zeroed
(:func:`attention_ablation`) or nothing written to any Gated DeltaNet state
(``β = 0``, :func:`deltanet_ablation`).

Every function takes a Lab of a needles organism (``ql.load("needles")``);
the RoPE in use is whatever the model has (``longctx.set_rope`` changes it).
"""

from __future__ import annotations

import random

import torch

from ..checks import BadType, BadValue, check_float, check_int
from . import tasks

__all__ = ["Prompts", "prompts", "accuracy", "attention_at_question", "attention_ablation", "deltanet_ablation"]


class Prompts:
    """``n`` needles prompts of one length: ``ids`` [n, T] (without the answer), ``answers`` [n] (token ids),
    ``needle_pos`` [n] (where the target needle's token sits), ``stale_pos`` [n] (the stale copy's token;
    -1 where the prompts have none) and ``stale_answers`` [n] (its value)."""

    def __init__(self, ids, answers, needle_pos, length: int, depth, stale_pos=None, stale_answers=None):
        self.ids, self.answers, self.needle_pos = ids, answers, needle_pos
        self.length, self.depth = length, depth
        n = ids.shape[0]
        self.stale_pos = torch.full((n,), -1) if stale_pos is None else stale_pos
        self.stale_answers = torch.full((n,), -1) if stale_answers is None else stale_answers

    def __len__(self) -> int:
        return int(self.ids.shape[0])


def _check_lab(lab) -> None:
    if not hasattr(lab, "model") or not hasattr(lab, "tokenizer"):
        raise BadType(f"expected a Lab of a needles organism (qwen35_lab.load('needles')), got {type(lab).__name__}")
    vocab = lab.tokenizer.get_vocab()
    missing = [w for w in tasks.vocabulary("needles") if w not in vocab]
    if missing:
        raise BadValue(f"{getattr(lab, 'name', 'this model')!r} lacks the needles vocabulary (e.g. {missing[:3]}); "
                       f"these helpers need a needles organism (qwen35_lab.load('needles'))")


def prompts(lab, length: int, n: int, seed: int, depth: float | None = None,
            num_needles: int = tasks.NEEDLES_DEFAULT, stale: int = tasks.NEEDLES_STALE_DEFAULT) -> Prompts:
    """``n`` fresh prompts with a haystack of ``length`` tokens; the asked needle (its latest copy) at
    ``depth`` (random if None); ``stale`` needles, the asked one first, were assigned before."""
    _check_lab(lab)
    num_needles = check_int("num_needles", num_needles, lo=1, hi=tasks.NEEDLES_MAX)
    stale = check_int("stale", stale, lo=0, hi=num_needles)
    length = check_int("length", length, lo=num_needles + stale)
    n = check_int("n", n, lo=1)
    if depth is not None:
        depth = check_float("depth", depth, lo=0.0, hi=1.0)
    rng = random.Random(seed)
    examples = [tasks.needles_example(rng, length, num_needles, depth=depth, stale=stale) for _ in range(n)]
    vocab = lab.tokenizer.get_vocab()
    ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])  # [n, T]
    answers = torch.tensor([vocab[ex.answers[0]] for ex in examples])
    needles = [[(i, tasks.split_needle(w)) for i, w in enumerate(ex.words[:-3])] for ex in examples]
    seen = [[i for i, kv in row if kv and kv[0] == ex.words[-2]] for ex, row in zip(examples, needles)]  # asked key
    needle_pos = torch.tensor([s[-1] for s in seen])  # in the haystack, the latest copy ...
    stale_pos = torch.tensor([s[0] if len(s) > 1 else -1 for s in seen])  # ... and the stale one
    stale_answers = torch.tensor([vocab[tasks.split_needle(ex.words[s[0]])[1]] if len(s) > 1 else -1
                                  for ex, s in zip(examples, seen)])
    return Prompts(ids, answers, needle_pos, length, depth, stale_pos, stale_answers)


def _logits_last(lab, ids: torch.Tensor, edits=None, batch_size: int = 50) -> torch.Tensor:
    """Logits at the last position ``[n, vocab]`` (fp32), in batches."""
    out = []
    for b0 in range(0, ids.shape[0], batch_size):
        chunk = ids[b0:b0 + batch_size]
        if edits:
            out.append(lab.run(chunk, edits=edits).meta["last_logits"])
        else:
            with torch.no_grad():
                out.append(lab.model(input_ids=chunk.to(lab.device), logits_to_keep=1).logits[:, -1].float().cpu())
    return torch.cat(out)


def accuracy(lab, length: int, *, n: int = 200, seed: int = 12345, depth: float | None = None,
             num_needles: int = tasks.NEEDLES_DEFAULT, stale: int = tasks.NEEDLES_STALE_DEFAULT, edits=None,
             batch_size: int = 50) -> dict:
    """Fraction of ``n`` fresh prompts answered right (argmax at ``?  kX``), with its 95% Wilson interval.

    Returns ``{"accuracy", "correct", "n", "ci95", "stale_rate", "answer_nll", "length", "tokens", "depth"}``
    (``stale_rate``: fraction answered with the stale copy's value — the error of a model that cannot
    tell which copy came later; ``answer_nll``: mean ``-log p(answer)`` in nats, more sensitive than
    accuracy to small changes).
    """
    p = prompts(lab, length, n, seed, depth, num_needles, stale)
    batch_size = check_int("batch_size", batch_size, lo=1)
    logits = _logits_last(lab, p.ids, edits, batch_size).double()  # [n, vocab]
    pred = logits.argmax(-1)
    correct = int((pred == p.answers).sum())
    nll = float(-logits.log_softmax(-1).gather(-1, p.answers[:, None]).mean())
    return {"accuracy": correct / n, "correct": correct, "n": n, "ci95": list(tasks.wilson_interval(correct, n)),
            "stale_rate": float((pred == p.stale_answers).float().mean()),
            "answer_nll": nll, "length": length, "tokens": int(p.ids.shape[1]), "depth": depth}


def _attention_layer(lab) -> int:
    full = [i for i, kind in enumerate(lab.layer_types) if kind == "full_attention"]
    if not full:
        raise BadValue(f"{lab.name!r} has no full_attention layer")
    return full[-1]


def attention_at_question(lab, length: int, *, n: int = 50, seed: int = 2024, batch_size: int = 25) -> dict:
    """What the attention layer does at the final query key (``? kX``), averaged over ``n`` prompts.

    ``needle_mass``: probability on the target needle's token, best head and per head;
    ``stale_mass``: the same head's probability on the stale copy's token;
    ``entropy`` (nats), ``max_prob``, ``mean_distance`` (tokens) of the best head's
    distribution (``layers.i.attn.summary``); ``accuracy`` of the same prompts.
    """
    layer = _attention_layer(lab)
    p = prompts(lab, length, n, seed)
    T = p.ids.shape[1]
    mass, stale_mass, summaries, correct = [], [], {}, 0
    for b0 in range(0, n, batch_size):
        sl = slice(b0, b0 + batch_size)
        tr = lab.run(p.ids[sl], capture=[f"layers.{layer}.attn.probs", f"layers.{layer}.attn.summary"],
                     positions=[T - 1])
        probs = tr[f"layers.{layer}.attn.probs"][:, :, -1].float()  # [b, Hq, T]
        rows = torch.arange(probs.shape[0])
        mass.append(probs[rows, :, p.needle_pos[sl]])  # [b, Hq]
        sp = p.stale_pos[sl]
        stale_mass.append(torch.where((sp >= 0)[:, None], probs[rows, :, sp.clamp_min(0)], 0.0))
        for k, v in tr[f"layers.{layer}.attn.summary"].items():
            summaries.setdefault(k, []).append(v[:, :, -1].float())  # [b, Hq]
        correct += int((tr.meta["last_logits"].argmax(-1) == p.answers[sl]).sum())
    per_head = torch.cat(mass).mean(0)  # [Hq]
    head = int(per_head.argmax())
    summary = {k: torch.cat(v)[:, head].mean().item() for k, v in summaries.items()}
    return {"length": length, "tokens": T, "n": n, "layer": layer, "head": head,
            "needle_mass": per_head[head].item(), "needle_mass_per_head": per_head.tolist(),
            "stale_mass": torch.cat(stale_mass)[:, head].mean().item(), **summary,
            "uniform_entropy": float(torch.log(torch.tensor(float(T)))), "accuracy": correct / n}


def attention_ablation(lab, length: int, *, n: int = 200, seed: int = 2024) -> dict:
    """Accuracy with the attention layer's output zeroed (``layers.i.attn.out = 0``), beside the unedited one."""
    layer = _attention_layer(lab)
    return _ablation(lab, {f"layers.{layer}.attn.out": 0.0}, length, n, seed) | {"layer": layer}


def deltanet_ablation(lab, length: int, *, n: int = 200, seed: int = 2024) -> dict:
    """Accuracy with ``β = 0`` (nothing written to the state) in every Gated DeltaNet layer."""
    linear = [i for i, kind in enumerate(lab.layer_types) if kind == "linear_attention"]
    if not linear:
        raise BadValue(f"{lab.name!r} has no linear_attention layer")
    return _ablation(lab, {f"layers.{i}.deltanet.beta": 0.0 for i in linear}, length, n, seed) | {"layers": linear}


def _ablation(lab, edits: dict, length: int, n: int, seed: int) -> dict:
    base = accuracy(lab, length, n=n, seed=seed)
    cut = accuracy(lab, length, n=n, seed=seed, edits=edits)
    return {"length": length, "n": n, "accuracy": base["accuracy"], "ci95": base["ci95"],
            "ablated_accuracy": cut["accuracy"], "ablated_ci95": cut["ci95"],
            "chance": 1.0 / tasks.NEEDLES_NUM_VALUES, "edits": sorted(edits)}
