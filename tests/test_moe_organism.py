"""The trained `moe-mix` organism: both tasks learnt, routing that specialises by task beyond shuffled
labels, and expert removal that hurts the task whose experts are removed much more than the other task, in
both directions — all measured here on fresh data (seeds neither training nor the card used)."""

from __future__ import annotations

import json

import pytest

import qwen35_lab as ql
from qwen35_lab import organisms
from qwen35_lab.checks import BadValue
from qwen35_lab.organisms import moe_mix

FOLDER = organisms.organisms_dir() / "moe-mix"


@pytest.fixture(scope="module")
def mix():
    return ql.load("moe-mix", dtype="float32", device="cpu")


def test_card_log_and_meta_are_shipped(mix):
    names = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "qwen35_lab.json", "train_log.jsonl",
            "README.md"} <= names
    meta = json.loads((FOLDER / "qwen35_lab.json").read_text())
    assert meta["organism"] == "moe-mix" and meta["seed"] == 0
    card = (FOLDER / "README.md").read_text()
    assert "python -m qwen35_lab.organisms train moe-mix --seed 0" in card
    assert "I(task; expert)" in card and "removed experts of" in card and "holds in both directions" in card
    rows = [json.loads(line) for line in (FOLDER / "train_log.jsonl").read_text().splitlines()]
    assert rows and {"step", "loss", "accuracy_recall", "accuracy_passkey"} <= set(rows[-1])
    assert type(mix.model).__name__ == "Qwen3_5MoeForCausalLM"


def test_each_answer_is_the_successor_of_the_stored_word():
    """Each answer is the stored word's successor (cyclic): the passkey's in the task's list of key words,
    recall's in v0 … v63 — not the stored word itself."""
    import random

    from qwen35_lab.organisms import tasks

    tok = moe_mix.build_tokenizer()
    ids, labels = moe_mix.make_batch("passkey", tok, random.Random(5), 32, 8)
    words = tasks.PASSKEY_WORDS
    for row, lab in zip(ids.tolist(), labels.tolist()):
        text = tok.convert_ids_to_tokens(row)
        key = text[text.index("is", text.index("key")) + 1]  # "the key is <key> ."
        (at,) = [i for i, x in enumerate(lab) if x != -100]
        assert text[0] == "<passkey>" and text[at - 1] == "?"
        assert text[at] == words[(words.index(key) + 1) % len(words)] != key
    ids, labels = moe_mix.make_batch("recall", tok, random.Random(6), 6, 8)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        text = tok.convert_ids_to_tokens(row)
        q = text.index("?")
        stored = dict(zip(text[1:q:2], text[2:q:2]))  # k -> v as written before the query
        answers = [i for i, x in enumerate(lab) if x != -100]
        assert text[0] == "<recall>" and answers == list(range(q + 2, len(text), 2))
        for i in answers:
            assert int(text[i][1:]) == (int(stored[text[i - 1]][1:]) + 1) % 64


def test_both_tasks_are_learnt_on_fresh_data(mix):
    """Far above chance (1/64 per recall answer, 1/32 per passkey answer), as the card says."""
    assert moe_mix.evaluate(mix, "passkey", n=100, seed=8081)["accuracy"] >= 0.95
    assert moe_mix.evaluate(mix, "recall", n=100, seed=8081)["accuracy"] >= 0.5


def test_routing_specialises_beyond_shuffled_labels(mix):
    spec = moe_mix.routing_specialisation(mix, n=40, seed=8082, shuffles=10)
    for layer, r in spec.items():  # every layer routes the two tasks differently, beyond shuffled labels
        assert r["mi_bits"] > 4 * r["shuffled_max_bits"] and r["mi_bits"] > 0.01, (layer, r)
    assert max(r["mi_bits"] for r in spec.values()) >= 0.3, spec  # one layer strongly (the card: 0.70 bits, layer 0)


@pytest.fixture(scope="module")
def removal(mix):
    return moe_mix.removal_experiment(mix, n=100, seed=8083, stats_seed=8084)


@pytest.mark.parametrize("task", moe_mix.TASKS)
def test_removing_a_tasks_experts_hurts_that_task_much_more_than_the_other(removal, task):
    """Both directions: the experts a task prefers (chosen on other data) carry that task."""
    other = [t for t in moe_mix.TASKS if t != task][0]
    base, hit = removal["baseline"], removal["removed"][task]
    drop_own, drop_other = base[task] - hit[task], base[other] - hit[other]
    assert drop_own >= 0.1 and drop_own >= drop_other + 0.1, (task, base, hit)


def test_bad_input(mix, tiny):
    with pytest.raises(BadValue, match="task"):
        moe_mix.evaluate(mix, "needles")
    with pytest.raises(BadValue, match="not the moe-mix organism"):
        moe_mix.evaluate(tiny, "recall")


def test_the_common_evaluate_serves_moe_mix():
    import qwen35_lab as ql
    from qwen35_lab.organisms import evaluate, moe_mix

    lab = ql.load("moe-mix", device="cpu")
    for task in ("recall", "passkey"):
        assert evaluate(lab, task, n=20, seed=5)["accuracy"] == moe_mix.evaluate(lab, task, n=20, seed=5)["accuracy"]
