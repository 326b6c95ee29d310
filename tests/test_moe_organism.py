"""The trained `moe-mix` organism: both tasks learnt, routing that specialises by task beyond shuffled
labels, and expert removal that hurts the task whose experts are removed — all measured here on fresh data
(seeds neither training nor the card used)."""

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
    assert "I(task; expert)" in card and "removed experts of" in card and "not for passkey's" in card
    rows = [json.loads(line) for line in (FOLDER / "train_log.jsonl").read_text().splitlines()]
    assert rows and {"step", "loss", "accuracy_recall", "accuracy_passkey"} <= set(rows[-1])
    assert type(mix.model).__name__ == "Qwen3_5MoeForCausalLM"


def test_both_tasks_are_learnt_on_fresh_data(mix):
    """The passkey fully; recall partly, far above chance (1/64 per answer), as the card says."""
    assert moe_mix.evaluate(mix, "passkey", n=100, seed=8081)["accuracy"] >= 0.95
    assert moe_mix.evaluate(mix, "recall", n=100, seed=8081)["accuracy"] >= 0.25


def test_routing_specialises_beyond_shuffled_labels(mix):
    spec = moe_mix.routing_specialisation(mix, n=40, seed=8082, shuffles=10)
    for layer, r in spec.items():  # every layer routes the two tasks differently
        assert r["mi_bits"] > 4 * r["shuffled_max_bits"] and r["mi_bits"] > 0.02, (layer, r)


def test_removing_recalls_experts_hurts_recall_not_the_passkey(mix):
    """The causal half that holds (see the card): recall's preferred experts carry recall. The passkey
    survives the removal of its own preferred experts, so no such claim is made for it."""
    r = moe_mix.removal_experiment(mix, n=100, seed=8083, stats_seed=8084)
    base, hit = r["baseline"], r["removed"]["recall"]
    drop_recall, drop_passkey = base["recall"] - hit["recall"], base["passkey"] - hit["passkey"]
    assert drop_recall >= 0.1 and drop_recall >= drop_passkey + 0.1, (base, hit)


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
