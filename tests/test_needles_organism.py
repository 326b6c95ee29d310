"""The trained `needles` organism on fresh data (seeds neither training, the card nor the experiment use):
its look-up goes through the gated-attention layer, the default RoPE loses it past the training length and
YaRN at the matching factor brings most of it back — with 95% intervals that do not overlap — and the card's
and the committed experiment's numbers hold."""

from __future__ import annotations

import json
import math

import pytest

import qwen35_lab as ql
from qwen35_lab import longctx as lc
from qwen35_lab import organisms
from qwen35_lab.organisms import needles, tasks

FOLDER = organisms.organisms_dir() / "needles"
RESULTS = organisms.organisms_dir().parents[1] / "benchmarks" / "results" / "long_context_experiments.json"
FRESH = 31_337  # training uses 0 and 10_000_019, the card 777, the experiment 4242…4248
N = 100
ONE_MIN = 0.95  # the card: 1.000 at the training length (n = 200)
SHARE_MIN = 0.5  # the card: YaRN ×8 recovers 90% of what the default RoPE loses at 8× (0.745 -> 0.975)


@pytest.fixture(scope="module")
def lab():
    return ql.load("needles", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def at_lengths(lab):
    """Fresh accuracy at 1× and 8× the training length with the default RoPE, and at 8× with YaRN ×8."""
    L = lab.meta["train_length"]
    out = {"one": needles.accuracy(lab, L, n=N, seed=FRESH), "far": needles.accuracy(lab, 8 * L, n=N, seed=FRESH + 1)}
    lc.set_rope(lab, lc.yarn_for_context(8 * L, original=L))
    try:
        out["yarn"] = needles.accuracy(lab, 8 * L, n=N, seed=FRESH + 1)
    finally:
        lc.set_rope(lab, None)
    return out


def card(*keys):
    value = json.loads((FOLDER / "qwen35_lab.json").read_text())["evaluation"]
    for k in keys:
        value = value[k]
    return value


def test_the_card_names_the_task_and_the_command(lab):
    text = (FOLDER / "README.md").read_text()
    assert "python -m qwen35_lab.organisms train needles --seed 0" in text
    assert "stale" in text and "YaRN ×8" in text
    config = lab.model.config
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    rope = config.rope_parameters
    assert rope["rope_theta"] <= 10_000 and rope["partial_rotary_factor"] == 0.25
    assert lab.meta["train_length"] == 256


def test_default_rope_fails_past_the_training_length_and_yarn_recovers(at_lengths):
    one, far, yarn = at_lengths["one"], at_lengths["far"], at_lengths["yarn"]
    assert one["accuracy"] >= ONE_MIN, one
    assert far["ci95"][1] < one["ci95"][0], (one, far)  # far below, intervals apart
    assert yarn["ci95"][0] > far["ci95"][1], (far, yarn)  # YaRN recovers, intervals apart
    share = (yarn["accuracy"] - far["accuracy"]) / (one["accuracy"] - far["accuracy"])
    assert share >= SHARE_MIN, share
    assert far["stale_rate"] > yarn["stale_rate"]  # the default RoPE's errors: the stale copy's value


def _close(fresh: float, ours: float, n_card: int = 200) -> bool:
    """Within three binomial standard errors of the difference (and 0.03 for rates near 0 or 1)."""
    p = (fresh + ours) / 2
    return abs(fresh - ours) <= 3 * math.sqrt(p * (1 - p) * (1 / N + 1 / n_card)) + 0.03


def test_fresh_accuracy_matches_the_card(lab, at_lengths):
    L = lab.meta["train_length"]
    by_tokens = {r["tokens"]: r for r in card("by_length")}  # the card's prompts: L and 8L tokens in all
    assert _close(at_lengths["one"]["accuracy"], by_tokens[L]["accuracy"])
    assert _close(at_lengths["far"]["accuracy"], by_tokens[8 * L]["accuracy"])
    yarn = {r["tokens"]: r for r in card("yarn_x8", "by_length")}
    assert _close(at_lengths["yarn"]["accuracy"], yarn[8 * L]["accuracy"])


def test_the_look_up_goes_through_the_attention_layer(lab):
    L = lab.meta["train_length"]
    cut = needles.attention_ablation(lab, L, n=N, seed=FRESH + 2)
    assert cut["accuracy"] >= ONE_MIN and cut["ablated_ci95"][1] < 0.15, cut  # near chance (1/16) without it
    ours = card("controls", "attention_ablation")[0]
    assert abs(cut["ablated_accuracy"] - ours["ablated_accuracy"]) <= 0.06


def test_the_committed_experiment_shows_the_phenomenon():
    e = json.loads(RESULTS.read_text())["needles"]
    L = e["train_length"]
    acc = {name: {r["length"]: r for r in rows} for name, rows in e["accuracy"].items()}
    assert e["n"] >= 200 and all(r["n"] >= 200 for rows in e["accuracy"].values() for r in rows)
    assert min(acc["default"]) <= L // 4 and max(acc["default"]) >= 16 * L
    assert {"yarn x2", "yarn x4", "yarn x8", "yarn x16", "linear x8", "dynamic x8"} <= set(acc)
    assert all(v["ok"] for v in e["verify_rope"].values())
    one, far, yarn = acc["default"][L], acc["default"][8 * L], acc["yarn x8"][8 * L]
    assert far["ci95"][1] < one["ci95"][0] and yarn["ci95"][0] > far["ci95"][1]
    assert e["short_inputs"]["yarn x8"] and e["heatmap"]["accuracy"]["yarn x8"]
    assert tasks.NEEDLES_STALE_DEFAULT == 1


def test_prompts_locate_the_latest_and_the_stale_copy(lab):
    p = needles.prompts(lab, 200, 30, seed=FRESH + 3, depth=0.5)
    words = lab.tokenizer.convert_ids_to_tokens
    for i in range(len(p)):
        row = words(p.ids[i].tolist())
        asked = row[-1]
        copies = [j for j, w in enumerate(row[:-2]) if w.split(":")[0] == asked]  # before "?" and the asked key
        assert len(copies) == 2 and [p.stale_pos[i], p.needle_pos[i]] == copies
        later, earlier = (row[j].split(":")[1] for j in copies[::-1])
        assert later == words(int(p.answers[i])) != earlier == words(int(p.stale_answers[i]))
    assert abs(float(p.needle_pos.float().mean()) / 200 - 0.5) < 0.05
    plain = needles.prompts(lab, 200, 5, seed=FRESH + 3, stale=0)
    assert (plain.stale_pos == -1).all()
    with pytest.raises(ValueError, match="length"):
        needles.prompts(lab, 16, 5, seed=0)  # 16 needles and a stale copy need 17 tokens
