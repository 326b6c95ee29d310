"""Synthetic tasks of the trained organisms: vocabularies, generators, evaluators.

Two tasks, each with its own small word-level vocabulary (every token reads as
a word, so traces are legible):

``recall`` — multi-query associative recall (MQAR). ``N`` distinct keys are
each paired with a value; after ``?`` the keys are asked again in a shuffled
order and each is followed by its value::

    k12 v7 k3 v40 k51 v9 ? k3 v40 k51 v9 k12 v7

The answers are the values after the ``?`` (loss and accuracy on those only).
``length`` is the number of pairs ``N`` (1 to 64); a sequence has ``4N + 1``
tokens.

``needles`` — many key → value needles in a long haystack of filler
sentences, one of them asked for at the end::

    the sky is blue . k12:v7 the sun is warm . k3:v4 here we go again . ? k12 v7 k3 v4

A needle is one word ``k12:v7`` (key ``k0``–``k31`` holds value ``v0``–``v15``):
the final ``k12`` finds the needle of its key by content and reads its value.
``length`` is the number of haystack tokens (filler plus one per needle);
``N`` needles (distinct keys, default 16) sit at random sentence
boundaries; with ``stale`` copies, a key is assigned twice and the later value
counts. In training every key is asked after ``?`` (shuffled, each
followed by its value); for evaluation only the first query counts, so a
prompt is ``length + 2`` tokens with one answer. With more needles than the
Gated DeltaNet heads can hold, the look-up has to go through the attention
layer — and, to order the copies, through RoPE.

``passkey`` — one key word hidden at a random depth in filler sentences, asked
for at the end::

    the sky is blue . the key is lemon . the grass is green . what is the key ? lemon

``length`` is the number of filler tokens (a multiple of nothing in
particular: sentences are cut to fit exactly); the needle ``the key is W .``
(5 tokens) sits at a uniformly random sentence boundary, and the question
``what is the key ?`` (5 tokens) follows, so a prompt has ``length + 10``
tokens and the answer is the one token after it.

Generators are pure functions of a ``random.Random`` / seed, so data are
reproducible. :func:`evaluate` measures an organism on fresh data at any
length, including lengths far beyond training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..checks import BadValue, check_choice, check_int

__all__ = [
    "TASKS", "RECALL_NUM_KEYS", "RECALL_NUM_VALUES", "PASSKEY_WORDS", "FILLER_SENTENCES",
    "vocabulary", "build_tokenizer", "Example", "recall_example", "passkey_example",
    "make_batch", "accuracy_from_logits", "evaluate", "NEEDLES_DEFAULT", "NEEDLES_STALE_DEFAULT",
    "NEEDLES_NUM_KEYS", "NEEDLES_NUM_VALUES", "needle_word", "split_needle", "needles_example", "wilson_interval",
]

TASKS = ("recall", "passkey", "needles")
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>"]

RECALL_NUM_KEYS = 64
RECALL_NUM_VALUES = 64
RECALL_QUERY = "?"

# 32 one-token key words for the passkey.
PASSKEY_WORDS = [
    "apple", "river", "tiger", "lemon", "cloud", "stone", "piano", "candle",
    "forest", "rocket", "silver", "garden", "window", "orange", "dragon", "castle",
    "bottle", "pepper", "shadow", "winter", "harbor", "violet", "copper", "meadow",
    "falcon", "marble", "ribbon", "comet", "island", "thunder", "velvet", "walnut",
]
FILLER_SENTENCES = [
    "the grass is green .",
    "the sky is blue .",
    "the sun is warm .",
    "here we go again .",
    "there and back .",
    "the sea is deep .",
    "a day is long .",
    "the road goes on .",
]
NEEDLE = "the key is {} ."
# needles: N one-token key → value needles (keys k0..k31, values v0..v15) hidden in filler sentences
NEEDLES_DEFAULT = 16
NEEDLES_MAX = 24
NEEDLES_NUM_KEYS = 32  # keys k0..k31 ...
NEEDLES_NUM_VALUES = 16  # ... values v0..v15: one needle is one token ``k12:v7`` (512 such words)
NEEDLES_STALE_DEFAULT = 1  # the asked needle was assigned twice: the answer is the later value
QUESTION = "what is the key ?"


def vocabulary(task: str) -> list[str]:
    """The word-level vocabulary of ``task``: token strings in id order."""
    _check_task(task)
    if task in ("recall", "needles"):
        words = SPECIAL_TOKENS + [RECALL_QUERY] + [f"k{i}" for i in range(RECALL_NUM_KEYS)]
        words += [f"v{i}" for i in range(RECALL_NUM_VALUES)]
        if task == "needles":
            words += [needle_word(k, v) for k in range(NEEDLES_NUM_KEYS) for v in range(NEEDLES_NUM_VALUES)]
            for text in FILLER_SENTENCES:
                words += [w for w in text.split() if w not in words]
        return words
    words = []
    for text in FILLER_SENTENCES + [NEEDLE.format(""), QUESTION]:
        for w in text.split():
            if w not in words:
                words.append(w)
    return SPECIAL_TOKENS + words + PASSKEY_WORDS


def needle_word(key: int, value: int) -> str:
    """The one-token needle that assigns ``value`` to ``key``: ``k12:v7``."""
    return f"k{key}:v{value}"


def split_needle(word: str) -> tuple[str, str] | None:
    """``("k12", "v7")`` for the needle word ``k12:v7``; None for any other word."""
    key, sep, value = word.partition(":")
    return (key, value) if sep else None


def build_tokenizer(task: str):
    """A ``PreTrainedTokenizerFast`` over a WordLevel model with a whitespace pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(task))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", clean_up_tokenization_spaces=False)


@dataclass
class Example:
    """One sequence: ``text`` (space-separated words), the ``answers`` and where they are.

    ``answer_positions[i]`` is the index (in words / tokens) of ``answers[i]``
    in ``text``; the model predicts it from the logits at ``answer_positions[i] - 1``.
    """

    text: str
    answers: list[str]
    answer_positions: list[int]

    @property
    def words(self) -> list[str]:
        return self.text.split()

    @property
    def prompt(self) -> str:
        """The text up to (not including) the first answer."""
        return " ".join(self.words[: self.answer_positions[0]])


def recall_example(rng: random.Random, num_pairs: int) -> Example:
    """An MQAR sequence with ``num_pairs`` distinct keys, all asked after ``?`` in shuffled order."""
    _check_int("num_pairs", num_pairs, 1, RECALL_NUM_KEYS)
    keys = rng.sample(range(RECALL_NUM_KEYS), num_pairs)
    values = [rng.randrange(RECALL_NUM_VALUES) for _ in keys]
    words = []
    for k, v in zip(keys, values):
        words += [f"k{k}", f"v{v}"]
    words.append(RECALL_QUERY)
    order = rng.sample(range(num_pairs), num_pairs)
    answers, positions = [], []
    for i in order:
        words.append(f"k{keys[i]}")
        positions.append(len(words))
        answers.append(f"v{values[i]}")
        words.append(answers[-1])
    return Example(" ".join(words), answers, positions)


def _filler(rng: random.Random, n_tokens: int) -> list[list[str]]:
    """Random filler sentences totalling exactly ``n_tokens`` words (the last one cut to fit)."""
    sentences, total = [], 0
    while total < n_tokens:
        s = rng.choice(FILLER_SENTENCES).split()[: n_tokens - total]
        sentences.append(s)
        total += len(s)
    return sentences


def passkey_example(rng: random.Random, length: int, depth: float | None = None) -> Example:
    """A passkey prompt with ``length`` filler tokens; the needle at relative ``depth`` (random if None)."""
    _check_int("length", length, 0, 10_000_000)
    if depth is not None and not (isinstance(depth, (int, float)) and 0.0 <= depth <= 1.0):
        raise ValueError(f"depth must be a number in [0, 1] or None, got {depth!r}")
    sentences = _filler(rng, length)
    slot = rng.randint(0, len(sentences)) if depth is None else round(depth * len(sentences))
    key = rng.choice(PASSKEY_WORDS)
    words = [w for s in sentences[:slot] for w in s] + NEEDLE.format(key).split()
    words += [w for s in sentences[slot:] for w in s] + QUESTION.split()
    return Example(" ".join(words + [key]), [key], [len(words)])


def needles_example(rng: random.Random, length: int, num_needles: int = NEEDLES_DEFAULT,
                    depth: float | None = None, queries: int | None = 1, stale: int = 0) -> Example:
    """``num_needles`` key → value needles in a haystack of ``length`` tokens, then ``?`` and the queries.

    The first query asks the target needle, placed at relative ``depth`` of
    the haystack (random if None); ``queries`` keys are asked in all (None:
    every key, in shuffled order after the target), each followed by its value.
    ``stale`` needles (the target first) were assigned before: an earlier
    needle with the same key and another value sits at a random slot at or
    before the current one. The answer is always the latest value, so telling
    the two apart needs word order — which only RoPE gives the attention layer.
    """
    _check_int("num_needles", num_needles, 1, NEEDLES_MAX)
    _check_int("stale", stale, 0, num_needles)
    _check_int("length", length, num_needles + stale, 10_000_000)
    if depth is not None and not (isinstance(depth, (int, float)) and not isinstance(depth, bool)
                                  and 0.0 <= depth <= 1.0):
        raise BadValue(f"depth must be a number in [0, 1] or None, got {depth!r}")
    q = num_needles if queries is None else queries
    _check_int("queries", q, 1, num_needles)
    sentences = _filler(rng, length - (num_needles + stale))
    keys = rng.sample(range(NEEDLES_NUM_KEYS), num_needles)
    values = [rng.randrange(NEEDLES_NUM_VALUES) for _ in keys]
    n_slots = len(sentences) + 1
    slots = [rng.randrange(n_slots) for _ in keys]
    if depth is not None:
        slots[0] = round(depth * (n_slots - 1))
    # (slot, 0 = stale / 1 = current, needle index, value): a stale copy comes first within its slot
    entries = [(slots[i], 1, i, values[i]) for i in range(num_needles)]
    for i in range(stale):
        old = rng.randrange(NEEDLES_NUM_VALUES - 1)
        entries.append((rng.randint(0, slots[i]), 0, i, old + (old >= values[i])))
    entries.sort()
    at: dict[int, list[tuple[int, int]]] = {}
    for s, _, i, v in entries:
        at.setdefault(s, []).append((i, v))
    words: list[str] = []
    for s in range(n_slots):
        for i, v in at.get(s, []):
            words.append(needle_word(keys[i], v))
        if s < len(sentences):
            words += sentences[s]
    words.append(RECALL_QUERY)
    order = [0] + rng.sample(range(1, num_needles), num_needles - 1)
    answers, positions = [], []
    for i in order[:q]:
        words.append(f"k{keys[i]}")
        positions.append(len(words))
        answers.append(f"v{values[i]}")
        words.append(answers[-1])
    return Example(" ".join(words), answers, positions)


def make_example(task: str, rng: random.Random, length: int, **kwargs) -> Example:
    _check_task(task)
    if task == "recall":
        return recall_example(rng, length)
    if task == "needles":
        return needles_example(rng, length, **kwargs)
    return passkey_example(rng, length)


def make_batch(task: str, tokenizer, rng: random.Random, length: int, batch_size: int, **kwargs):
    """``batch_size`` examples of one ``length`` as tensors (``kwargs`` go to the task's generator).

    Returns ``(input_ids, labels)``, both ``[B, T]``; ``labels`` is -100 except
    at the answers (so a causal-LM loss counts the answers only).
    """
    _check_int("batch_size", batch_size, 1, 1_000_000)
    examples = [make_example(task, rng, length, **kwargs) for _ in range(batch_size)]
    vocab = tokenizer.get_vocab()
    rows = [[vocab[w] for w in ex.words] for ex in examples]
    T = len(rows[0])
    if any(len(r) != T for r in rows):
        raise AssertionError("examples of one length must have one token count")
    input_ids = torch.tensor(rows)  # [B, T]
    labels = torch.full_like(input_ids, -100)
    for b, ex in enumerate(examples):
        for p in ex.answer_positions:
            labels[b, p] = input_ids[b, p]
    return input_ids, labels


def accuracy_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of answers whose argmax prediction is right.

    ``logits`` [B, T, V] predict the next token: the answer at ``t`` is read
    from ``logits[:, t - 1]``.
    """
    if logits.shape[:2] != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"labels {tuple(labels.shape)}; expected [B, T, V], [B, T], [B, T]")
    mask = labels[:, 1:] != -100
    if not mask.any():
        raise ValueError("labels hold no answers (all -100)")
    pred = logits[:, :-1].argmax(-1)
    return (pred[mask] == labels[:, 1:][mask]).float().mean().item()


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``correct / n`` (95% for ``z = 1.96``)."""
    _check_int("n", n, 1, 10**12)
    _check_int("correct", correct, 0, n)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside despite rounding


def evaluate(lab, task: str, *, length: int | None = None, n: int = 200, seed: int = 12345,
             batch_size: int = 50, num_needles: int | None = None) -> dict:
    """Accuracy of an organism on ``n`` fresh examples of ``task`` at ``length``.

    Args:
        lab: a :class:`~qwen35_lab.Lab` (``ql.load("recall")``) or anything with
            ``.model`` and ``.tokenizer``.
        task: ``"recall"`` (``length`` = number of key-value pairs, 1..64),
            ``"passkey"`` (``length`` = number of filler tokens) or ``"needles"``
            (``length`` = haystack tokens; one query per prompt).
        length: default: the organism's training length (from its ``qwen35_lab.json``).
        n: number of sequences; recall scores every query of every sequence.
        seed: seed of the held-out data (training used other seeds).
        num_needles: needles per prompt for ``"needles"`` (default 16).

    Returns ``{"accuracy", "n", "length", "answers", "ci95"}`` (``answers``: how many
    answers were scored; ``ci95``: the Wilson interval over the answers).
    """
    _check_task(task)
    _check_int("n", n, 1, 10_000_000)
    _check_int("batch_size", batch_size, 1, 1_000_000)
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not hasattr(lab, "model") or not hasattr(lab, "tokenizer"):
        raise TypeError(f"evaluate() takes a Lab (qwen35_lab.load(...)), got {type(lab).__name__}")
    meta = getattr(lab, "meta", None) or {}
    if meta.get("task") not in (None, task):
        raise ValueError(f"organism {meta.get('organism')!r} was trained on {meta['task']!r}, not {task!r}")
    if length is None:
        if "train_length" not in meta:
            raise ValueError("pass length=...: this model has no training length in its qwen35_lab.json")
        length = meta["train_length"]
    kwargs = {}
    if task == "needles":
        kwargs["num_needles"] = NEEDLES_DEFAULT if num_needles is None else num_needles
        _check_int("num_needles", kwargs["num_needles"], 1, NEEDLES_MAX)
        kwargs["stale"] = min(NEEDLES_STALE_DEFAULT, kwargs["num_needles"])
    elif num_needles is not None:
        raise ValueError(f"num_needles is a parameter of the 'needles' task, not of {task!r}")
    lo = {"recall": 1, "passkey": 0, "needles": 2 * (kwargs.get("num_needles", 0) + kwargs.get("stale", 0))}[task]
    _check_int("length", length, lo, RECALL_NUM_KEYS if task == "recall" else 10_000_000)
    vocab = lab.tokenizer.get_vocab()
    missing = [w for w in vocabulary(task) if w not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks the {task!r} vocabulary (e.g. {missing[:3]}); "
                         f"evaluate() needs an organism trained on {task!r}")
    model = lab.model
    device = next(model.parameters()).device
    rng = random.Random(seed)
    correct = total = 0.0
    with torch.no_grad():
        done = 0
        while done < n:
            b = min(batch_size, n - done)
            input_ids, labels = make_batch(task, lab.tokenizer, rng, length, b, **kwargs)
            logits = model(input_ids=input_ids.to(device)).logits.float().cpu()
            answers = int((labels != -100).sum())
            correct += accuracy_from_logits(logits, input_ids, labels) * answers
            total += answers
            done += b
    hits = int(round(correct))
    return {"accuracy": correct / total, "n": n, "length": length, "answers": int(total),
            "ci95": list(wilson_interval(hits, int(total)))}


def _check_task(task) -> None:
    check_choice("task", task, TASKS)


def _check_int(name: str, value, lo: int, hi: int) -> None:
    check_int(name, value, lo=lo, hi=hi)
