"""Long context: YaRN settings against the model cards, frequencies against transformers,
the memory planner against the cards' KV figure, real caches and measured peaks, and
chunked prefill against one forward."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import configs
from qwen35_lab import longctx as lc

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lab():
    """A private `tiny` (set_rope changes a model; the session-wide fixture stays untouched)."""
    return ql.load("tiny", dtype="float32", device="cpu")


@pytest.fixture
def card_yarn(facts) -> tuple[dict, int]:
    """The rope_parameters dict the 9B card gives for 1,010,000 tokens, and that target length."""
    card = facts["yarn"]["card_9b"]
    return card["rope_parameters"], card["max_model_len"]


def real_config(name="Qwen3.5-9B"):
    return configs.config_for(name)


def hf_rotary(text_config):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    return Qwen3_5TextRotaryEmbedding(config=copy.deepcopy(text_config))


# ------------------------------------------------------------------ RoPE config
def test_yarn_for_context_gives_the_cards_settings(card_yarn, facts):
    params, target = card_yarn
    assert target == 1_010_000
    assert lc.yarn_for_context(target, like=real_config()) == params
    # merged into a real config the short form gives the same dict, nothing of M-RoPE lost
    config = real_config()
    lc.apply_rope_to_config(config, lc.yarn_for_context(target))
    assert config.text_config.rope_parameters == params
    # the 3.6 card: a typical context of 524,288 tokens -> factor 2.0
    card36 = facts["yarn"]["card_3.6"]
    assert lc.yarn_for_context(card36["tokens"])["factor"] == card36["factor"]
    assert lc.max_context(config) >= target


def test_apply_rope_replaces_fields_and_keeps_mrope():
    config = real_config()
    before = dict(config.text_config.rope_parameters)
    lc.apply_rope_to_config(config, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 262_144,
                                     "beta_fast": 16})
    p = config.text_config.rope_parameters
    for k in ("mrope_interleaved", "mrope_section", "rope_theta", "partial_rotary_factor"):
        assert p[k] == before[k]
    assert (p["factor"], p["beta_fast"]) == (2.0, 16)
    lc.apply_rope_to_config(config, {"factor": 3.0})  # same type: merged
    assert (p := config.text_config.rope_parameters)["factor"] == 3.0 and p["beta_fast"] == 16
    lc.apply_rope_to_config(config, None)  # back to default: scaling fields dropped
    assert config.text_config.rope_parameters == before
    assert lc.max_context(config) == configs.NATIVE_CONTEXT


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 262_144}, "factor must be a number > 1"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 262_144}, "factor must be a number > 1"),
    ({"rope_type": "yarn", "factor": 4.0}, "original_max_position_embeddings"),
    ({"rope_type": "ntk", "factor": 4.0}, "unknown rope_type 'ntk'.*'yarn'.*'longrope'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262_144, "scale": 2},
     r"unknown rope_parameters field\(s\) \['scale'\]"),
    ({"type": "yarn"}, "rope_type"),
    ({"mrope_section": [11, 11, 11]}, "summing to the 32"),
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 262_144}, "transformers cannot"),
    ("yarn", "must be a dict"),
    # transformers' dynamic NTK reads the config's max_position_embeddings (262,144), never this field
    ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 4096},
     r"'dynamic'.*ignores original_max_position_embeddings \(4096\)"),
])
def test_bad_rope_is_refused_before_anything_changes(rope, match):
    config = real_config()
    before = copy.deepcopy(config.text_config.rope_parameters)
    with pytest.raises((ValueError, TypeError), match=match):
        lc.apply_rope_to_config(config, rope)
    assert config.text_config.rope_parameters == before


def test_yarn_for_context_bad_input():
    with pytest.raises(ValueError, match="YaRN is not needed"):
        lc.yarn_for_context(100_000)  # shorter than the original context
    with pytest.raises(ValueError, match="fits in the original context of 300,000"):
        lc.yarn_for_context(262_144, original=300_000)
    for bad in (0, -5, 1.5e6, "1M", True):
        with pytest.raises(ValueError, match="positive number of tokens"):
            lc.yarn_for_context(bad)


def test_context_over_the_maximum_says_how_to_enable_yarn():
    config = real_config()
    lc.check_context(config, 262_144)
    with pytest.raises(ValueError, match=r"262,145 tokens exceed the model's native context of 262,144.*"
                                         r"yarn_for_context\(262145, 262144\)"):
        lc.check_context(config, 262_145)
    lc.apply_rope_to_config(config, lc.yarn_for_context(1_010_000))
    lc.check_context(config, 1_010_000)
    with pytest.raises(ValueError, match="factor 4.0 allows"):
        lc.check_context(config, 1_048_577)


# ------------------------------------------------------------------ frequencies
def test_yarn_frequencies_match_the_facts_and_transformers(facts):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fr = facts["yarn"]["frequencies"]
    (a, b), (c, d), (e, f), s = fr["keep"], fr["ramp"], fr["interpolate"], fr["factor"]
    attention = fr["attention_factor"]
    config = real_config()
    rope = lc.yarn_for_context(262_144 * s)
    table = lc.rope_table(config, rope)
    treat = table.column("treatment")
    assert set(treat[a:b + 1]) == {"keep"} and set(treat[c:d + 1]) == {"ramp"} and set(treat[e:f + 1]) == {"interpolate"}
    assert len(table) == f + 1 == 32
    ratio = torch.tensor(table.column("ratio"))
    assert torch.allclose(ratio[e:], torch.full((f - e + 1,), 1 / s, dtype=ratio.dtype))
    assert round(table.meta["attention_factor"], 4) == float(attention)

    # the same numbers from transformers, from the same rope_parameters
    lc.apply_rope_to_config(config, rope)
    hf_inv, hf_att = ROPE_INIT_FUNCTIONS["yarn"](copy.deepcopy(config.text_config), None)
    ours = lc.rope_frequencies(config)
    torch.testing.assert_close(ours["inv_freq"].float(), hf_inv, rtol=1e-6, atol=0)
    assert ours["attention_factor"] == pytest.approx(hf_att, rel=1e-12)
    module = hf_rotary(config.text_config)
    torch.testing.assert_close(module.inv_freq, ours["inv_freq"].float(), rtol=1e-6, atol=0)
    assert module.attention_scaling == pytest.approx(ours["attention_factor"], rel=1e-12)


@pytest.mark.parametrize("extra", [{}, {"beta_fast": 8, "beta_slow": 2}, {"attention_factor": 1.5},
                                   {"truncate": False}])
def test_yarn_variants_match_transformers(extra):
    config = real_config("Qwen3.5-0.8B")
    lc.apply_rope_to_config(config, {**lc.yarn_for_context(700_000), **extra})
    module = hf_rotary(config.text_config)
    ours = lc.rope_frequencies(config)
    torch.testing.assert_close(module.inv_freq, ours["inv_freq"].float(), rtol=1e-6, atol=0)
    assert module.attention_scaling == pytest.approx(ours["attention_factor"], rel=1e-12)


def test_mrope_axes_match_the_facts_and_transformers(facts):
    t, h, w = (facts["mrope"][axis] for axis in "THW")
    config = real_config()
    axes = lc.mrope_axes(32, config.text_config.rope_parameters["mrope_section"])
    assert [axes[i] for i in t] == ["T"] * len(t) and [axes[i] for i in h] == ["H"] * len(h)
    assert [axes[i] for i in w] == ["W"] * len(w)
    assert axes.count("T") == 11 and axes.count("H") == 11 and axes.count("W") == 10
    # transformers: move one axis at a time; the frequencies that turn belong to it
    module = hf_rotary(config.text_config)
    x = torch.zeros(1, 1, 8)
    for k, name in enumerate("THW"):
        pos = torch.zeros(3, 1, 1, dtype=torch.long)
        pos[k] = 1_000_003  # far enough that even the slowest frequency turns visibly
        cos, sin = module(x, pos)
        moved = ((cos[0, 0, :32] < 1 - 1e-6) | (sin[0, 0, :32].abs() > 1e-6)).tolist()
        assert [a == name for a in axes] == moved


# ------------------------------------------------------------------ set_rope
def test_set_rope_rebuilds_the_rotary_embedding_as_transformers_does(lab):
    ids = torch.randint(0, 5000, (1, 96), generator=torch.Generator().manual_seed(1))
    base = lab.run(ids).meta["last_logits"]
    rope = lc.yarn_for_context(400, original=100)
    try:
        info = lc.set_rope(lab, rope)
        module = lab.model.model.language_model.rotary_emb
        expect = copy.deepcopy(lab.text_config)
        fresh = hf_rotary(expect)
        assert torch.equal(module.inv_freq, fresh.inv_freq) and module.attention_scaling == fresh.attention_scaling
        ours = lc.yarn_inv_freq(lab.text_config.rope_parameters, 16)
        torch.testing.assert_close(module.inv_freq, ours["inv_freq"].float(), rtol=1e-6, atol=0)
        assert info.in_sync and info.max_context == 400 and info.factor == 4.0
        assert lab.text_config.rope_parameters["mrope_section"] == [3, 3, 2]
        assert "yarn" in repr(info) and "max context 400" in repr(info)
        changed = lab.run(ids).meta["last_logits"]
        assert (changed - base).abs().max() > 1e-4
        with pytest.raises(ValueError, match="factor must be"):
            lc.set_rope(lab, {"factor": 1.0})
        assert lab.text_config.rope_parameters["factor"] == 4.0  # the refused call changed nothing
    finally:
        lc.set_rope(lab, None)
    assert torch.equal(lab.run(ids).meta["last_logits"], base)
    assert lc.rope_info(lab).rope_type == "default"


def test_set_rope_on_a_text_only_model_equals_loading_with_rope():
    rope = lc.yarn_for_context(1000, original=250)
    loaded = ql.load("tiny", dtype="float32", device="cpu", text_only=True, rope=rope)
    switched = ql.load("tiny", dtype="float32", device="cpu", text_only=True)
    assert not hasattr(switched.model.model, "language_model")  # the text-only path: model.model.rotary_emb
    lc.set_rope(switched, rope)
    assert switched.text_config.rope_parameters == loaded.text_config.rope_parameters
    assert torch.equal(switched.model.model.rotary_emb.inv_freq, loaded.model.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(2))
    assert torch.equal(switched.run(ids).meta["last_logits"], loaded.run(ids).meta["last_logits"])


def test_rope_info_notices_a_stale_module(lab):
    lab.text_config.rope_parameters = {**lab.text_config.rope_parameters, "rope_type": "yarn", "factor": 2.0,
                                       "original_max_position_embeddings": 100}
    try:
        assert lc.rope_info(lab).in_sync is False
        assert "does not match" in repr(lc.rope_info(lab))
    finally:
        lc.set_rope(lab, None)
    assert lc.rope_info(lab).in_sync


# ------------------------------------------------------------------ memory planner
def test_planner_reproduces_the_cards_kv_figure(facts):
    kv = facts["kv_cache"]
    layers, heads, dim, nbytes, tokens, gb = (kv[k] for k in ("attention_layers", "kv_heads", "head_dim", "bytes",
                                                             "tokens", "gb"))
    plan = lc.plan_memory("Qwen3.5-9B", tokens, dtype="bfloat16")
    assert plan.layers["full_attention"] == int(layers)
    assert plan.kv_cache == int(layers) * int(heads) * int(dim) * 2 * int(nbytes) * tokens
    assert round(plan.kv_cache / 1e9, 1) == float(gb)
    # "the DeltaNet state is constant in length"
    short = lc.plan_memory("Qwen3.5-9B", 1024, dtype="bfloat16")
    assert short.deltanet_state == plan.deltanet_state > 0 and short.conv_state == plan.conv_state
    assert plan.all_attention_kv_cache == 4 * plan.kv_cache  # every layer attention instead of 1 in 4
    assert "KV cache" in repr(plan) and "8.6 GB" in repr(plan)


def test_planner_weights_use_the_known_parameter_counts():
    for name in ("Qwen3.5-0.8B", "Qwen3.5-27B"):
        plan = lc.plan_memory(name, 4096, dtype="bfloat16")
        assert plan.weights == configs.estimate_weight_bytes(name, "bfloat16", text_only=True)
        assert plan.weights + plan.vision_weights == configs.estimate_weight_bytes(name, "bfloat16")
        assert lc.plan_memory(name, 4096, dtype="bfloat16", text_only=True).vision_weights == 0


def test_planner_cache_equals_the_real_cache(lab):
    from transformers import DynamicCache

    T = 70
    ids = torch.randint(0, 5000, (2, T), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache(config=lab.model.config)
    with torch.no_grad():
        lab.model(input_ids=ids, past_key_values=cache, use_cache=True)
    kv = state = conv = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
            kv += layer.keys.nbytes + layer.values.nbytes
        for s in getattr(layer, "recurrent_states", {}).values():
            state += s.nbytes if s is not None else 0
        for s in getattr(layer, "conv_states", {}).values():
            conv += s.nbytes if s is not None else 0
    plan = lc.plan_memory(lab, T, batch=2)
    assert (plan.kv_cache, plan.deltanet_state, plan.conv_state) == (kv, state, conv)
    assert plan.weights == sum(p.nbytes for p in lab.model.parameters()) - plan.vision_weights


def test_planner_agrees_with_measured_peaks():
    """The committed check (benchmarks/memory_planner_check.py): every run within 15 %, and the
    planner still gives the estimates recorded beside the measurements."""
    import importlib.util

    path = ROOT / "benchmarks" / "results" / "memory_planner_check.json"
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert len(rows) >= 3 and result["tolerance"] == 0.15
    assert {r["context"] for r in rows} >= {512, 2048, 8192} and any(r["prefill_chunk"] for r in rows)
    spec = importlib.util.spec_from_file_location("memory_planner_check", ROOT / "benchmarks" / "memory_planner_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for r in rows:
        ratio = r["measured_peak_growth"] / r["planned_runtime"]
        assert abs(ratio - 1) <= 0.15, r
        plan = check.plan(r["dtype"], r["context"], r["prefill_chunk"])
        assert plan.runtime == r["planned_runtime"] and plan.kv_cache == r["planned_kv_cache"]
        assert plan.activations == r["planned_activations"]


def test_planner_grows_with_chunk_and_eager_scores():
    whole = lc.plan_memory("Qwen3.5-0.8B", 65_536)
    chunked = lc.plan_memory("Qwen3.5-0.8B", 65_536, prefill_chunk=2048)
    assert chunked.activations < whole.activations / 4 and chunked.kv_cache == whole.kv_cache
    # chunks after the first carry a mask: transformers repeats the whole K and V to every query head
    assert chunked.peak_layer == "full_attention" and whole.peak_layer == "linear_attention"
    eager = lc.plan_memory("Qwen3.5-0.8B", 65_536, prefill_chunk=2048, attn_implementation="eager")
    scores = 8 * 2048 * 65_536 * 4  # Hq × c × T fp32 softmax alone
    assert eager.working_sets["full_attention"] - chunked.working_sets["full_attention"] > scores


def test_a_plan_that_does_not_fit_is_refused_with_numbers(lab, monkeypatch):
    plan = lc.plan_memory("Qwen3.5-9B", 1_010_000)
    with pytest.raises(MemoryError, match=r"1,010,000 tokens of Qwen3.5-9B need about .* GB .*KV cache 33.1 GB.*"
                                          r"only 16.0 GB is free"):
        lc.check_fits(plan, available=16_000_000_000)
    lc.check_fits(lc.plan_memory("Qwen3.5-0.8B", 1024), available=16_000_000_000)

    import qwen35_lab.loading

    calls = []
    monkeypatch.setattr(qwen35_lab.loading, "free_memory_bytes", lambda device: 1_000_000)
    monkeypatch.setattr(lab.model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(MemoryError, match="only 1.0 MB is free"):
        lc.chunked_prefill(lab, torch.zeros(1, 5000, dtype=torch.long), chunk_size=512, progress=False)
    assert not calls  # refused before the first chunk


@pytest.mark.parametrize("bad, match", [
    (dict(model="Qwen9"), "unknown model 'Qwen9'"), (dict(context=0), "context must be a positive int"),
    (dict(dtype="int8"), "unknown dtype 'int8'"), (dict(prefill_chunk=-1), "prefill_chunk"),
    (dict(attn_implementation="flash"), "unknown attn_implementation"), (dict(logits="none"), "logits must be"),
])
def test_planner_bad_input(bad, match):
    kwargs = {"model": "Qwen3.5-0.8B", "context": 1024, **bad}
    with pytest.raises(ValueError, match=match):
        lc.plan_memory(**kwargs)


def test_memory_table_and_plot_cover_every_known_size():
    rows = lc.memory_table(contexts=(262_144, 1_010_000))
    assert {r["model"] for r in rows} == set(configs.KNOWN_MODELS) and len(rows) == 2 * len(configs.KNOWN_MODELS)
    for r in rows:
        assert r["all_attention_kv_cache"] == 4 * r["kv_cache"] and r["all_attention_total"] > r["total"]
    assert "Qwen3.5-9B" in lc.format_memory_table(rows)
    fig = lc.plot_memory(models=["Qwen3.5-0.8B", "Qwen3.5-9B"])
    assert len(fig.axes[0].lines) >= 4


# ------------------------------------------------------------------ chunked prefill
def test_chunked_prefill_equals_one_forward(lab):
    ids = torch.randint(0, 5000, (1, 150), generator=torch.Generator().manual_seed(4))
    capture = ["layers.*.deltanet.beta", "layers.0.deltanet.state", "layers.4.deltanet.state",
               "layers.3.attn.summary", "layers.7.attn.summary"]
    single = lab.run(ids, capture=capture)
    res = lc.chunked_prefill(lab, ids, chunk_size=64, capture=capture, progress=False, nll=True)
    tr = res.trace
    assert tr.positions("layers.1.deltanet.beta") == list(range(150))
    for i in (0, 1, 2, 4, 5, 6):
        name = f"layers.{i}.deltanet.beta"
        torch.testing.assert_close(tr[name], single[name], rtol=1e-5, atol=1e-5)
    for i in (3, 7):
        ours, ref = tr[f"layers.{i}.attn.summary"], single[f"layers.{i}.attn.summary"]
        assert set(ours) == {"entropy", "max_prob", "sink_mass", "mean_distance"}
        for k in ours:
            torch.testing.assert_close(ours[k], ref[k], rtol=1e-5, atol=1e-5)
    for layer in (0, 4):
        for t in (0, 63, 64, 100, 149):
            torch.testing.assert_close(tr.state(layer, t), single.state(layer, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.logits, single.meta["last_logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(tr.tokens, ids)
    # next-token loss at every position, against the full logits of one plain forward
    with torch.no_grad():
        full = lab.model(input_ids=ids).logits.float()
    ref_nll = -torch.log_softmax(full[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(res.nll, ref_nll, rtol=1e-5, atol=1e-5)
    assert res.cache.get_seq_length() == 150


def test_chunked_prefill_bad_input(lab):
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lc.chunked_prefill(lab, torch.zeros(1, 8, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="out of range for a vocabulary"):
        lc.chunked_prefill(lab, torch.full((1, 8), 10**7), progress=False)
    with pytest.raises(ValueError, match="empty"):
        lc.chunked_prefill(lab, torch.zeros(1, 0, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="text token ids only"):
        lc.chunked_prefill(lab, {"input_ids": torch.zeros(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match="exceed the model's native context of 262,144.*Enable YaRN"):
        lc.chunked_prefill(lab, torch.zeros(1, 262_145, dtype=torch.long), progress=False)
    with pytest.raises(MemoryError, match="capturing .* over the budget"):
        lc.chunked_prefill(lab, torch.zeros(1, 64, dtype=torch.long), capture="layers.0.deltanet.state",
                           budget_bytes=1000, progress=False)


def test_long_document(lab):
    doc = lc.long_document(lab, 300, seed=5, needle="the key is lemon .", depth=0.25)
    assert len(doc) == 300 and doc.input_ids.shape == (1, 300)
    a, b = doc.needle_span
    assert lab.tokenizer.decode(doc.input_ids[0, a:b]).strip() == "the key is lemon ."
    assert 0.15 * 300 < a < 0.35 * 300
    assert torch.equal(lc.long_document(lab, 300, seed=5, needle="the key is lemon .", depth=0.25).input_ids,
                       doc.input_ids)
    assert not torch.equal(lc.long_document(lab, 300, seed=6).input_ids, doc.input_ids)
    assert lc.long_document(lab.tokenizer, 17, seed=0).needle_span is None
    with pytest.raises(ValueError, match="n_tokens must be a positive int"):
        lc.long_document(lab, 0)
    with pytest.raises(ValueError, match="leaves no room"):
        lc.long_document(lab, 3, needle="the key is lemon .")
    with pytest.raises(ValueError, match="depth must be"):
        lc.long_document(lab, 30, depth=2)


# ------------------------------------------------------------------ plots
def test_rope_plots():
    import matplotlib

    matplotlib.use("Agg")
    config = real_config()
    rope = lc.yarn_for_context(1_010_000)
    fig = lc.plot_rope_frequencies(config, rope)
    ax = fig.axes[0]
    assert [len(c.get_offsets()) for c in ax.collections] == [32, 32]
    fig = lc.plot_rope_decay(config, rope)
    assert len(fig.axes[0].lines) == 4  # two curves, two context markers
    d = torch.tensor([0.0, 1.0, 1e5])
    sim = lc.rotated_similarity(torch.tensor([1.0, 0.5]), d, 1.0)
    assert sim[0] == 1 and sim[1] == pytest.approx((torch.cos(torch.tensor(1.0)) + torch.cos(torch.tensor(0.5))) / 2)
    with pytest.raises(ValueError, match="nothing scaled"):
        lc.plot_rope_frequencies(config)


def test_lab_methods_reach_the_same_functions(lab):
    assert lab.max_context == lc.max_context(lab) == configs.NATIVE_CONTEXT
    assert lab.rope == lc.rope_info(lab) and lab.rope.rope_type == "default"
    ids = torch.randint(0, 5000, (1, 40), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(lab.prefill(ids, chunk_size=16, progress=False).logits,
                               lc.chunked_prefill(lab, ids, chunk_size=40, progress=False).logits,
                               rtol=1e-5, atol=1e-5)
    try:
        assert lab.set_rope(lc.yarn_for_context(1000, original=250)).max_context == 1000 == lab.max_context
    finally:
        lab.set_rope(None)
