"""Long-context experiments: the needles task, chunked attention against sdpa and a one-shot forward, the fused attention
summaries against a float64 softmax, ``verify_rope`` against hand-computed rotations, the needle heatmap and
the planner's chunked-attention terms."""

from __future__ import annotations

import copy
import math
import random
import re

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import checks
from qwen35_lab import longctx as lc
from qwen35_lab.longctx import attention as chunk_attn
from qwen35_lab.ops import attention as attn_ops
from qwen35_lab.organisms import needles, tasks

FRESH_SEED = 97_531  # neither training (0, 10_000_019), the card (777) nor the experiments (4242..) use it


@pytest.fixture(scope="module")
def passkey_lab():
    return ql.load("passkey", dtype="float32", device="cpu")


# ------------------------------------------------------------------ the task
def parse_needles(text: str):
    """Independent parser: ``{key: value}`` of the haystack's needles and the ``(query, answer)`` list."""
    words = text.split()
    cut = words.index("?")
    hay = words[:cut]
    needles = [m.groups() for m in map(re.compile(r"(k\d+):(v\d+)").fullmatch, hay) if m]
    table = dict(needles)  # a later needle of the same key overwrites the earlier one
    after = words[cut + 1:]
    return hay, table, list(zip(after[0::2], after[1::2]))


@pytest.mark.parametrize("length, num_needles", [(32, 16), (100, 4), (1000, 16)])
def test_needles_examples_answer_with_the_needles_value(length, num_needles):
    rng = random.Random(length)
    for _ in range(20):
        ex = tasks.needles_example(rng, length, num_needles, queries=None)
        hay, table, queries = parse_needles(ex.text)
        assert len(hay) == length and len(table) == num_needles  # distinct keys, all present
        assert sum(w.startswith("k") for w in hay) == num_needles  # keys only inside needles
        assert all(w in tasks.vocabulary("needles") for w in ex.words)
        assert sorted(q for q, _ in queries) == sorted(table)
        assert all(table[q] == a for q, a in queries) and [a for _, a in queries] == ex.answers
        assert [ex.words[p] for p in ex.answer_positions] == ex.answers
    one = tasks.needles_example(random.Random(1), 200, 8)
    assert len(one.answers) == 1 and len(one.words) == 200 + 3  # haystack, "?", key, answer


@pytest.mark.parametrize("length, num_needles, stale", [(48, 16, 8), (100, 4, 1), (1000, 16, 16)])
def test_stale_needles_answer_with_the_later_value(length, num_needles, stale):
    rng = random.Random(length + stale)
    for _ in range(20):
        ex = tasks.needles_example(rng, length, num_needles, queries=None, stale=stale)
        hay, table, queries = parse_needles(ex.text)  # the dict keeps each key's later value
        assert len(hay) == length and len(table) == num_needles
        keys = [w.split(":")[0] for w in hay if w.startswith("k")]
        twice = {k for k in keys if keys.count(k) == 2}
        assert len(keys) == num_needles + stale and len(twice) == stale and max(map(keys.count, keys)) <= 2
        assert queries[0][0] in twice  # the asked needle is the first to get a stale copy
        for k in twice:  # the two copies hold different values; the answer is the later one
            copies = [w.split(":")[1] for w in hay if w.startswith(k + ":")]
            assert copies[0] != copies[1] and table[k] == copies[1]
        assert all(table[q] == a for q, a in queries) and [a for _, a in queries] == ex.answers


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needles_depth_places_the_asked_needle(depth):
    rng = random.Random(3)
    for stale in (0, 1):
        for _ in range(10):
            ex = tasks.needles_example(rng, 500, 16, depth=depth, stale=stale)
            hay, _, [(query, _)] = parse_needles(ex.text)
            where = max(i for i, w in enumerate(hay) if w.startswith(query + ":")) / len(hay)  # the latest copy
            assert abs(where - depth) < 0.05


def test_needles_bad_input():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="depth"):
        tasks.needles_example(rng, 100, 4, depth=1.5)
    with pytest.raises(ValueError, match="length"):
        tasks.needles_example(rng, 3, 4)  # 4 needles need 4 tokens
    with pytest.raises(ValueError, match="num_needles"):
        tasks.needles_example(rng, 100, 25)
    with pytest.raises(ValueError, match="length"):
        tasks.needles_example(rng, 4, 4, stale=1)  # 4 needles and a stale copy need 5 tokens
    with pytest.raises(ValueError, match="stale"):
        tasks.needles_example(rng, 100, 4, stale=5)


def test_wilson_interval_matches_the_textbook_values():
    # Wilson score intervals (z = 1.96), e.g. Newcombe (1998), Table I: 0/10 and 5/10 ... here to 4 decimals
    assert tasks.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert tasks.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert tasks.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    with pytest.raises(checks.BadValue):
        tasks.wilson_interval(11, 10)


# ------------------------------------------------------------------ chunked attention
def reference_attention(q, k, v, scaling):
    """float64 softmax attention of the last Tq positions over Tk keys, K/V repeated per query head."""
    G = q.shape[1] // k.shape[1]
    kr, vr = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    Tq, Tk = q.shape[2], k.shape[2]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    logits = (q.double() @ kr.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1) @ vr  # [B, Hq, Tq, D]


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("Hq, Hkv, Tq, Tk", [(4, 2, 37, 37), (4, 1, 64, 300), (2, 2, 5, 70), (8, 2, 1, 33)])
def test_chunk_attention_matches_a_float64_softmax(monkeypatch, flash, Hq, Hkv, Tq, Tk):
    if not flash:
        monkeypatch.setattr(chunk_attn, "_flash_cpu", lambda: None)
        monkeypatch.setattr(chunk_attn, "KEY_BLOCK", 16)  # several key blocks
    gen = torch.Generator().manual_seed(Tk)
    q = torch.randn(2, Hq, Tq, 16, generator=gen)
    k, v = torch.randn(2, Hkv, Tk, 16, generator=gen), torch.randn(2, Hkv, Tk, 16, generator=gen)

    class Module:
        num_key_value_groups = Hq // Hkv

    out, weights = chunk_attn.chunk_attention(Module(), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, Tq, Hq, 16)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 0.3).transpose(1, 2), rtol=0, atol=2e-6)


def test_chunked_prefill_equals_one_forward_without_mask_or_repeated_kv(passkey_lab, monkeypatch):
    ids = torch.randint(3, 60, (2, 640), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = passkey_lab.model(input_ids=ids).logits[:, -1]
    seen = []
    real = chunk_attn.chunk_attention

    def spy(module, query, key, value, attention_mask=None, **kw):
        seen.append((attention_mask, query.shape[1], key.shape[1], key.shape[2]))
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(chunk_attn, "chunk_attention", spy)
    monkeypatch.setitem(__import__("transformers").AttentionInterface._global_mapping, chunk_attn.ATTN_IMPLEMENTATION,
                        spy)
    res = lc.chunked_prefill(passkey_lab, ids, chunk_size=128, progress=False)
    torch.testing.assert_close(res.logits, ref.float(), rtol=0, atol=1e-5)
    assert len(seen) == 5  # one call per chunk in the one attention layer
    assert all(mask is None for mask, *_ in seen)  # no [chunk, context] mask was built
    assert [tk for *_, tk in seen] == [128, 256, 384, 512, 640]  # the cache, K/V never repeated (Hkv heads)
    assert all(hkv == passkey_lab.text_config.num_key_value_heads for _, _, hkv, _ in seen)
    assert passkey_lab.model.config._attn_implementation == "sdpa"  # restored


def test_planner_chunked_attention_has_no_mask_and_no_repeated_kv():
    T, c = 65_536, 4096
    sdpa = lc.plan_memory("passkey", T, dtype="float32", prefill_chunk=c, attn_implementation="sdpa")
    ours = lc.plan_memory("passkey", T, dtype="float32", prefill_chunk=c, attn_implementation="qwen35_lab_chunked")
    cfg = ql.load("passkey", dtype="float32", device="cpu").text_config
    mask = c * T * (1 + 4)  # the bool mask and its fp32 copy
    repeat = 2 * cfg.num_attention_heads * cfg.head_dim * T * 4
    assert sdpa.activations - ours.activations >= mask  # the mask is gone
    assert ours.working_sets["full_attention"] < sdpa.working_sets["full_attention"] - repeat
    assert ours.kv_cache == sdpa.kv_cache
    # the attention working set beyond the cache grows with the chunk: doubling the chunk doubles it
    grow = [lc.plan_memory("passkey", T, dtype="float32", prefill_chunk=x, attn_implementation="qwen35_lab_chunked")
            for x in (1024, 2048)]
    extra = [g.working_sets["full_attention"] - 2 * cfg.num_key_value_heads * cfg.head_dim * (T - x) * 4
             for g, x in zip(grow, (1024, 2048))]
    assert extra[1] == 2 * extra[0]


# ------------------------------------------------------------------ fused summaries
def test_fused_attention_and_summaries_match_a_float64_softmax():
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, D = 2, 4, 2, 150, 16
    q, k = 2 * torch.randn(B, Hq, T, D, generator=gen), 2 * torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    out, s = attn_ops.causal_attention_with_summaries(q, k, v, block_size=32)
    G = Hq // Hkv
    logits = (q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)) * D**-0.5
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    p = logits.softmax(-1)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()
    expected = {"entropy": -(p * p.clamp_min(1e-300).log()).sum(-1), "max_prob": p.amax(-1),
                "sink_mass": p[..., 0], "mean_distance": (p * dist.clamp_min(0)).sum(-1)}
    for name, value in s.items():
        assert value.shape == (B, Hq, T)
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-5, atol=3e-5 if name != "mean_distance"
                                   else 1e-3, msg=name)
    torch.testing.assert_close(out.double(), p @ v.double().repeat_interleave(G, 1), rtol=0, atol=1e-5)
    # the output is what sdpa gives (the layer's own implementation)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=1e-6)
    assert attn_ops.causal_attention_with_summaries(q[:, :, :10], k, v) is None  # T != Tk: not fused



@pytest.mark.parametrize("block_size, key_block_size", [(16, 40), (32, 8), (512, 1024)])
def test_fused_summaries_match_a_naive_softmax_for_any_tiling(block_size, key_block_size):
    # GQA with three query heads per key head, T a multiple of neither block size; a naive float64 softmax
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, D = 2, 6, 2, 203, 8
    q, k = 3 * torch.randn(B, Hq, T, D, generator=gen), 3 * torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    out, s = attn_ops.causal_attention_with_summaries(q, k, v, scaling=0.4, block_size=block_size,
                                                      key_block_size=key_block_size)
    expected_out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                x = (0.4 * (k[b, h // 3, :t + 1].double() @ q[b, h, t].double())).tolist()  # keys 0..t
                z = sum(math.exp(xj - max(x)) for xj in x)
                p = [math.exp(xj - max(x)) / z for xj in x]
                expected = {"entropy": -sum(pj * math.log(pj) for pj in p if pj > 0), "max_prob": max(p),
                            "sink_mass": p[0], "mean_distance": sum(pj * (t - j) for j, pj in enumerate(p))}
                for name, value in expected.items():
                    assert s[name][b, h, t].item() == pytest.approx(value, rel=1e-4, abs=2e-5), (name, b, h, t)
                expected_out[b, h, t] = torch.tensor(p, dtype=torch.float64) @ v[b, h // 3, :t + 1].double()
    torch.testing.assert_close(out.double(), expected_out, rtol=0, atol=1e-5)
    with pytest.raises(checks.BadValue, match="key_block_size"):
        attn_ops.causal_attention_with_summaries(q, k, v, key_block_size=0)
    assert attn_ops.causal_attention_with_summaries(q, k, v[..., :4]) is None  # v's head size not D: not fused


def test_captured_summaries_leave_the_logits_and_match_the_blockwise_op(passkey_lab):
    ids = torch.randint(3, 60, (1, 300), generator=torch.Generator().manual_seed(2))
    plain = passkey_lab.run(ids)
    tr = passkey_lab.run(ids, capture=["layers.1.attn.summary", "layers.1.attn.q", "layers.1.attn.k"])
    torch.testing.assert_close(tr.meta["last_logits"], plain.meta["last_logits"], rtol=0, atol=1e-5)
    ref = attn_ops.attention_summaries(tr["layers.1.attn.q"], tr["layers.1.attn.k"], block_size=64)
    for name, value in tr["layers.1.attn.summary"].items():
        torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-4 if name != "mean_distance" else 5e-3)


# ------------------------------------------------------------------ verify_rope
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256},
                                  {"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 4.0}])
def test_verify_rope_passes_what_transformers_applies(passkey_lab, rope):
    try:
        lc.set_rope(passkey_lab, rope)
        check = lc.verify_rope(passkey_lab, positions=[0, 1, 700, 40_000])
    finally:
        lc.set_rope(passkey_lab, None)
    assert check.ok, check
    # the expected frequencies, by hand: θ^(-2i/d), scaled per type
    cfg = passkey_lab.text_config
    d = int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"])
    omega = torch.tensor([cfg.rope_parameters["rope_theta"] ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    if rope and rope["rope_type"] == "linear":
        torch.testing.assert_close(torch.tensor(check.expected_inv_freq, dtype=torch.float64), omega / 4)
    if rope and rope["rope_type"] == "yarn":
        assert check.expected_attention_factor == pytest.approx(0.1 * math.log(8) + 1)
        assert check.expected_inv_freq[0] == pytest.approx(float(omega[0]))  # fastest kept
        assert check.expected_inv_freq[-1] == pytest.approx(float(omega[-1]) / 8)  # slowest interpolated


def test_verify_rope_catches_an_engine_that_ignored_yarn(passkey_lab):
    try:
        lc.set_rope(passkey_lab, lc.yarn_for_context(2048, original=256))
        rotary = passkey_lab.model.model.rotary_emb
        rotary.inv_freq = lc.rope_frequencies(passkey_lab)["inv_freq_default"].float()  # what a careless engine keeps
        rotary.attention_scaling = 1.0
        check = lc.verify_rope(passkey_lab)
    finally:
        lc.set_rope(passkey_lab, None)
    assert not check.ok
    text = " ".join(check.differences)
    assert "default* (unscaled) frequencies" in text and "attention factor 1.000000" in text
    assert "MISMATCH" in repr(check)


def test_verify_rope_bad_input(passkey_lab):
    class NoRotary:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(checks.BadType, match="no text rotary embedding|Qwen3.5"):
        lc.verify_rope(NoRotary())
    with pytest.raises(checks.BadType, match="takes a Lab"):
        lc.verify_rope("passkey")
    with pytest.raises(checks.BadValue, match="position"):
        lc.verify_rope(passkey_lab, positions=[-1])


# ------------------------------------------------------------------ heatmap
def test_needle_heatmap_grid_restores_the_rope_and_plots(passkey_lab):
    before = dict(passkey_lab.text_config.rope_parameters)
    L = passkey_lab.meta["train_length"]
    hm = lc.needle_heatmap(passkey_lab, [L, 4 * L], [0.0, 1.0], n=6, seed=FRESH_SEED, progress=False,
                           ropes={"default": None, "yarn x4": lc.yarn_for_context(4 * L, original=L)})
    assert passkey_lab.text_config.rope_parameters == before
    assert hm.task == "passkey" and set(hm.accuracy) == {"default", "yarn x4"}
    for grid, cis in zip(hm.accuracy.values(), hm.ci95.values()):
        assert len(grid) == 2 and all(len(row) == 2 for row in grid)
        for row, ci_row in zip(grid, cis):
            for a, (lo, hi) in zip(row, ci_row):
                assert lo <= a <= hi and a * 6 == round(a * 6)
    # a cell, recomputed independently: the passkey prompts of that seed and depth, argmax at the question
    rng = random.Random(FRESH_SEED + 7919)
    examples = [tasks.passkey_example(rng, L, depth=1.0) for _ in range(6)]
    vocab = passkey_lab.tokenizer.get_vocab()
    ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])
    with torch.no_grad():
        pred = passkey_lab.model(input_ids=ids).logits[:, -1].argmax(-1)
    expected = sum(int(p) == vocab[ex.answers[0]] for p, ex in zip(pred, examples)) / 6
    assert hm.accuracy["default"][1][0] == expected
    fig = hm.plot(train_length=L)
    assert len(fig.axes) == 3  # two grids and the colour bar
    assert "accuracy" in fig.axes[-1].get_ylabel()


def test_needle_heatmap_generic_prompt_on_a_real_vocabulary(tiny):
    hm = lc.needle_heatmap(tiny, [40], [0.5], n=2, seed=1, progress=False)
    assert hm.task == "generic" and hm.accuracy["model"] == [[0.0]]  # random weights: no pass key recalled
    with pytest.raises(checks.BadValue, match="cannot hold the needle"):
        lc.needle_heatmap(tiny, [5], [0.5], n=2, progress=False)


@pytest.mark.parametrize("bad, error, match", [
    (dict(depths=[0.5, 1.2]), checks.BadValue, r"depth=1.2 is out of range; valid: \[0, 1\]"),
    (dict(lengths=[0]), checks.BadValue, "length=0 is out of range"),
    (dict(ropes={"x": {"rope_type": "longrope", "factor": 2.0}}), checks.BadValue, "not one this model supports"),
    (dict(ropes={"x": {"rope_type": "ntk"}}), checks.BadValue, "unknown rope_type"),
    (dict(n=100_000, budget_seconds=10), checks.OverBudget, r"would take about [\d,]+ s"),
    (dict(budget_bytes=1000), checks.OverBudget, "GB, over the budget"),
    (dict(lengths="256"), checks.BadType, "lengths must be a list"),
])
def test_needle_heatmap_bad_input(passkey_lab, bad, error, match):
    kwargs = dict(lengths=[256, 512], depths=[0.5], n=4, progress=False)
    kwargs.update(bad)
    with pytest.raises(error, match=match):
        lc.needle_heatmap(passkey_lab, **kwargs)


def test_committed_planner_check_covers_long_chunked_prefill():
    """benchmarks/memory_planner_check.py's committed chunked-prefill rows: measured peaks within 15% of the
    planner up to 64K tokens on an organism and 32K on the 0.8B shape, far below the sdpa (dense-mask) plan,
    and the planner still gives the recorded estimates."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "benchmarks/results/memory_planner_check.json").read_text())
    rows = {(r["model"], r["context"], r["attention"]): r for r in result["attention_rows"]}
    spec = importlib.util.spec_from_file_location("mpc", root / "benchmarks" / "memory_planner_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for key in (("passkey", 65_536, "chunked"), ("Qwen3.5-0.8B", 32_768, "chunked")):
        r = rows[key]
        assert abs(r["measured_peak_growth"] / r["planned_runtime"] - 1) <= 0.15, r
        assert r["cached_tokens"] == r["context"]
        plan = check.plan(r["dtype"], r["context"], r["prefill_chunk"], r["attention"], r["model"])
        assert plan.runtime == r["planned_runtime"]
    big = rows[("passkey", 65_536, "chunked")]
    assert big["measured_peak_growth"] < 0.25 * big["planned_runtime_sdpa"]
    sdpa, ours = rows[("passkey", 16_384, "sdpa")], rows[("passkey", 16_384, "chunked")]
    assert ours["measured_peak_growth"] < 0.5 * sdpa["measured_peak_growth"]  # measured, same input
