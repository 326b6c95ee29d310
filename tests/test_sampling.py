"""Sampling: presets against the model cards, the sampler against a straight numpy implementation of
vLLM's formulas (vllm/v1/sample/sampler.py, vllm/model_executor/layers/utils.py apply_penalties,
vllm/v1/sample/ops/topk_topp_sampler.py, logits_processor/builtin.py MinPLogitsProcessor), real
generation on the tiny organism against a token-by-token reference loop, sweeps, and the panel."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from qwen35_lab import sampling as S
from qwen35_lab.sampling_panel import SamplingPanel

PROMPT = "Name three colours."
MESSAGES = [{"role": "user", "content": PROMPT}]


# ============================================================================ presets vs the cards

# every place a card states a preset's values (tests/data/model_facts.json, each with its source)
CARD_PLACES = json.loads((Path(__file__).parent / "data" / "model_facts.json").read_text(encoding="utf-8"))[
    "sampling_presets"]


@pytest.mark.parametrize("place", CARD_PLACES, ids=[f"{p['preset']}@{p['source'].split(':')[0]}" for p in CARD_PLACES])
def test_preset_values_are_the_cards(place):
    preset = S.PRESETS[place["preset"]]
    for key in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty",
                "enable_thinking"):
        assert getattr(preset, key) == place[key], (key, place["source"])


def test_every_preset_is_checked_against_a_card():
    assert set(S.PRESETS) == {place["preset"] for place in CARD_PLACES}


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown preset 'qwen3.5-thinking-genral'.*did you mean "
                                         r"'qwen3.5-thinking-general'"):
        S.get_preset("qwen3.5-thinking-genral")


# ============================================================================ bad input

BAD = [
    ({"temperature": -0.1}, ValueError, r"temperature=-0.1 .*\[0, 2\]"),
    ({"temperature": 2.5}, ValueError, r"temperature=2.5 .*\[0, 2\]"),
    ({"temperature": float("nan")}, ValueError, r"temperature=nan"),
    ({"top_p": 0.0}, ValueError, r"top_p=0.0 .*\(0, 1\]"),
    ({"top_p": 1.01}, ValueError, r"top_p=1.01 .*\(0, 1\]"),
    ({"top_k": -2}, ValueError, r"top_k=-2 .*>= -1"),
    ({"top_k": 2.5}, TypeError, r"top_k must be an integer"),
    ({"min_p": -0.01}, ValueError, r"min_p=-0.01 .*\[0, 1\]"),
    ({"min_p": 1.5}, ValueError, r"min_p=1.5 .*\[0, 1\]"),
    ({"presence_penalty": 2.5}, ValueError, r"presence_penalty=2.5 .*\[-2, 2\]"),
    ({"presence_penalty": -3}, ValueError, r"presence_penalty=-3.0 .*\[-2, 2\]"),
    ({"frequency_penalty": -2.01}, ValueError, r"frequency_penalty=-2.01 .*\[-2, 2\]"),
    ({"repetition_penalty": 0.0}, ValueError, r"repetition_penalty=0.0 .*> 0"),
    ({"repetition_penalty": -1.0}, ValueError, r"repetition_penalty=-1.0 .*> 0"),
    ({"temperature": "hot"}, TypeError, r"temperature must be a number"),
    ({"preset": "qwen3.5-instruct-generl"}, ValueError, r"did you mean 'qwen3.5-instruct-general'"),
    ({"temprature": 0.5}, TypeError, r"unknown sampling argument.*'temprature' \(did you mean 'temperature'\?\)"),
    ({"do_sample": True, "temperature": 0}, ValueError, r"do_sample=True with temperature=0"),
]


@pytest.mark.parametrize("kwargs,error,pattern", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_sampling_arguments_are_refused_before_work(tiny, kwargs, error, pattern, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny.model, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(error, match=pattern):
        tiny.generate(PROMPT, max_new_tokens=2, **kwargs)
    with pytest.raises(error, match=pattern):
        S.sample(tiny, PROMPT, max_new_tokens=2, **kwargs)
    assert not calls  # refused before generating


def test_bad_seed_is_refused(tiny):
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer.*got -1"):
        S.sample(tiny, PROMPT, seed=-1)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer, got 1.5"):
        S.sweep(tiny, [PROMPT], grid={"temperature": [0]}, seed=1.5)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"grid": {}}, r"the grid is empty"),
    ({"grid": {"temperature": []}}, r"grid\['temperature'\] is empty"),
    ({"grid": {"temprature": [0.5]}}, r"unknown grid parameter 'temprature' \(did you mean 'temperature'\?\)"),
    ({"grid": {"top_p": [0.5, 0.0]}}, r"top_p=0.0 .*\(0, 1\]"),
    ({"presets": []}, r"presets is empty"),
    ({"presets": ["nope"]}, r"unknown preset 'nope'"),
    ({}, r"give grid="),
])
def test_bad_sweeps_are_refused_before_work(tiny, kwargs, pattern, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny.model, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=pattern):
        S.sweep(tiny, [PROMPT], progress=False, **kwargs)
    assert not calls


# ============================================================================ the sampler vs straight formulas

def reference_process(logits, prompt, output, *, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                      presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0):
    """vLLM's sampler written straight from its definitions, one row at a time, in float64 numpy.

    Returns the logits the token is drawn from (-inf where removed).
    """
    x = np.array(logits, dtype=np.float64)
    V = x.shape[0]
    counts = np.bincount(np.asarray(output, dtype=np.int64), minlength=V)[:V]
    seen = np.zeros(V, dtype=bool)
    seen[list(prompt)] = True
    seen[list(output)] = True
    if repetition_penalty != 1.0:  # repetition: over prompt and output
        for v in np.flatnonzero(seen):
            x[v] = x[v] / repetition_penalty if x[v] > 0 else x[v] * repetition_penalty
    x = x - frequency_penalty * counts - presence_penalty * (counts > 0)  # output only
    if temperature == 0:
        out = np.full(V, -np.inf)
        out[int(np.argmax(x))] = x[int(np.argmax(x))]
        return out
    x = x / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    x = np.where(probs < min_p * probs.max(), -np.inf, x)
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, V) - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        probs = np.exp(x[order] - x[order][0])
        probs /= probs.sum()
        mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        keep = np.zeros(V, dtype=bool)
        keep[order[mass_before < top_p]] = True  # the smallest most-likely set reaching top_p
        x = np.where(keep, x, -np.inf)
    return x


def _assert_same(ours: torch.Tensor, ref: np.ndarray, rtol=1e-5, atol=1e-5):
    ours = ours.double().numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref)), "different tokens kept"
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=rtol, atol=atol)


PARAM_CASES = [
    dict(),
    dict(temperature=0.5),
    dict(temperature=1.7, top_k=5),
    dict(top_k=-1, top_p=0.5),
    dict(min_p=0.2),
    dict(temperature=0.6, min_p=0.1, top_k=8, top_p=0.7),
    dict(presence_penalty=1.5),
    dict(presence_penalty=-1.0, frequency_penalty=0.7),
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.5, frequency_penalty=-0.4, temperature=0.3, top_p=0.9),
    dict(temperature=0.0, presence_penalty=2.0, repetition_penalty=1.3),
    dict(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),  # an instruct preset's values
]


@pytest.mark.parametrize("params", PARAM_CASES, ids=[str(p) for p in PARAM_CASES])
def test_sampler_matches_the_formulas_on_hand_made_logits(params):
    gen = torch.Generator().manual_seed(0)
    B, V = 3, 60
    logits = torch.randn(B, V, generator=gen) * 3  # positive and negative logits
    prompt = torch.randint(0, V, (B, 7), generator=gen)
    output = torch.randint(0, V // 3, (B, 12), generator=gen)  # repeats, so counts > 1
    sp = S.SamplingParams(**params)
    got = S.process(logits, sp, prompt_ids=prompt, output_ids=output)
    for b in range(B):
        _assert_same(got[b], reference_process(logits[b].tolist(), prompt[b].tolist(), output[b].tolist(), **params))


def test_penalty_arithmetic_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    prompt = torch.tensor([[0]])  # token 0 only in the prompt
    output = torch.tensor([[1, 1, 2]])  # token 1 twice, token 2 once
    got = S.apply_penalties(logits, prompt, output, presence_penalty=0.5, frequency_penalty=0.25,
                            repetition_penalty=2.0)
    # 0: prompt only -> 2/2 = 1; 1: -1*2 - 0.25*2 - 0.5 = -3; 2: 0.5/2 - 0.25 - 0.5 = -0.5; 3: untouched
    assert got.tolist() == [[1.0, -3.0, -0.5, 3.0]]


def test_top_k_keeps_ties_and_zero_or_minus_one_is_off():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(S.apply_top_k(logits, 1)).tolist() == [[False, True, True, False, False]]
    assert torch.equal(S.apply_top_k(logits, 0), logits) and torch.equal(S.apply_top_k(logits, -1), logits)


def test_min_p_is_relative_to_the_top_probability_after_temperature():
    logits = torch.tensor([[0.0, -1.0, -3.0]])  # p ∝ 1, e^-1, e^-3
    # at T = 1, e^-3 = 0.05 < 0.1 of the top: dropped; at T = 2 it is e^-1.5 = 0.22: kept
    assert torch.isfinite(S.process(logits, S.SamplingParams(min_p=0.1))).tolist() == [[True, True, False]]
    assert torch.isfinite(S.process(logits, S.SamplingParams(min_p=0.1, temperature=2.0))).tolist() == [[True] * 3]


# ============================================================================ real generation on tiny

REAL_CASES = [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, presence_penalty=1.5, frequency_penalty=0.5,
         repetition_penalty=1.3),
    dict(preset="qwen3.5-instruct-reasoning"),
    dict(temperature=0, presence_penalty=2.0, repetition_penalty=1.2),
]


def _reference_params(case: dict) -> dict:
    if "preset" in case:
        p = S.PRESETS[case["preset"]]
        return dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                    presence_penalty=p.presence_penalty, repetition_penalty=p.repetition_penalty)
    return dict(case)


@pytest.mark.parametrize("case", REAL_CASES, ids=["all-seven", "preset", "greedy-penalties"])
def test_generate_applies_exactly_the_sampler_and_nothing_else(tiny, case):
    """HF's own warpers (the checkpoint says top_k 20, top_p 0.95) must not act a second time:
    every step's processed scores equal the reference applied to that step's raw logits."""
    ids = tiny.encode("The quick brown fox jumps")
    kw = S.generation_kwargs(tiny, {**case, "seed": 1}, prompt_ids=ids)
    out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                              return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    new = out.sequences[0, ids.shape[1]:].tolist()
    ref_params = _reference_params(case)
    for step, (scores, raw) in enumerate(zip(out.scores, out.logits)):
        ref = reference_process(raw[0].tolist(), ids[0].tolist(), new[:step], **ref_params)
        if ref_params.get("temperature") == 0:  # greedy: HF sees the penalised logits and takes the argmax
            assert new[step] == int(np.argmax(ref))
            fin = np.isfinite(ref)
            np.testing.assert_allclose(scores[0].double().numpy()[fin], ref[fin], rtol=1e-5, atol=1e-5)
        else:
            _assert_same(scores[0], ref)
            assert math.isfinite(float(scores[0, new[step]]))  # the sampled token was allowed


def test_seeded_generation_matches_a_token_by_token_reference(tiny):
    """lab.generate with a seed draws the same tokens as: full forward (no cache) -> reference
    sampler -> softmax -> torch.multinomial, from the same seed."""
    params = dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.02, presence_penalty=1.0, repetition_penalty=1.1)
    gen = tiny.generate(PROMPT, max_new_tokens=6, seed=123, **params)
    prompt = gen.prompt_ids
    torch.manual_seed(123)
    seq = prompt.clone()
    for _ in range(6):
        with torch.no_grad():
            raw = tiny.model(input_ids=seq).logits[0, -1].float()
        ref = reference_process(raw.tolist(), prompt[0].tolist(), seq[0, prompt.shape[1]:].tolist(), **params)
        probs = torch.tensor(ref, dtype=torch.float32).softmax(-1)
        nxt = torch.multinomial(probs[None], num_samples=1)
        seq = torch.cat([seq, nxt], dim=1)
    assert gen.ids[0].tolist() == seq[0, prompt.shape[1]:].tolist()


def test_presence_penalty_cuts_repeats_in_greedy_decoding(tiny):
    """Greedy tiny loops on one token; presence_penalty (generated tokens only) breaks the loop."""
    plain = tiny.generate(PROMPT, max_new_tokens=10, do_sample=False).ids[0].tolist()
    penalised = tiny.generate(PROMPT, max_new_tokens=10, do_sample=False, presence_penalty=2.0).ids[0].tolist()
    repeats = lambda ids: sum(c - 1 for c in Counter(ids).values())  # noqa: E731
    assert repeats(plain) >= 5
    assert repeats(penalised) < repeats(plain) // 2


def test_no_sampling_arguments_follow_the_checkpoint_generation_config(tiny):
    """Unspecified parameters come from generation_config.json (here temperature 1, top_k 20,
    top_p 0.95), as vLLM's --generation-config auto: exactly 20 candidates or fewer each step."""
    ids = tiny.encode(PROMPT)
    kw = S.generation_kwargs(tiny, {}, prompt_ids=ids)
    out = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                              return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    gc = tiny.model.generation_config
    for scores, raw in zip(out.scores, out.logits):
        _assert_same(scores[0], reference_process(raw[0].tolist(), [], [], temperature=gc.temperature,
                                                  top_k=gc.top_k, top_p=gc.top_p))


# ============================================================================ measures and sweeps

def test_text_measures_by_hand():
    ids = [1, 2, 1, 2, 3]
    assert S.distinct_n(ids, 1) == 3 / 5
    assert S.distinct_n(ids, 2) == 3 / 4  # (1,2) (2,1) (1,2) (2,3)
    assert S.repetition_rate([5, 6, 7, 8, 5, 6, 7, 8], 4) == 1 - 4 / 5  # 5 four-grams, 4 distinct
    assert S.repeated_tokens(ids) == 2
    assert S.distinct_n([], 2) == 1.0 and S.repetition_rate([1, 2], 4) == 0.0


@pytest.fixture(scope="module")
def swept(tiny):
    return S.sweep(tiny, [PROMPT], grid={"temperature": [0, 1.0], "presence_penalty": [0.0, 2.0]}, n=2, seed=5,
                   max_new_tokens=4, progress=False)


def test_sweep_rows_are_tidy_and_complete(swept):
    df = swept.to_pandas()
    assert len(df) == 2 * 2 * 2 and set(df.generated_tokens) == {4}
    for column in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty", "text",
                   "reasoning", "answer", "generated_tokens", "distinct_1", "distinct_2", "repetition_rate",
                   "entropy", "entropy_raw", "thinking_loop", "seed", "sample"):
        assert column in df
    assert sorted(set(zip(df.temperature, df.presence_penalty))) == [(0, 0), (0, 2), (1, 0), (1, 2)]
    assert sorted(df.seed.unique()) == [5, 6]
    # unspecified parameters are the checkpoint's
    assert set(df.top_k) == {20} and set(df.top_p) == {0.95}


def test_sweep_rows_match_lab_generate_and_recomputed_measures(tiny, swept):
    for row in swept.select([1, 3, 6]):  # greedy, greedy + presence, sampled + presence (seed 5 + 1, 5 + 0)
        kw = dict(temperature=row["temperature"], presence_penalty=row["presence_penalty"])
        gen = tiny.generate(MESSAGES, max_new_tokens=4, seed=row["seed"], **kw)
        assert row["text"] == gen.text and row["ids"] == gen.ids[0].tolist()
        ids = row["ids"]
        assert row["distinct_1"] == pytest.approx(len(set(ids)) / len(ids))
        # the model's own next-token entropy, recomputed with full forward passes
        seq = torch.cat([gen.prompt_ids, gen.ids], dim=1)
        with torch.no_grad():
            logp = tiny.model(input_ids=seq).logits[0, gen.prompt_ids.shape[1] - 1:-1].double().log_softmax(-1)
        entropy = float(-(logp.exp() * logp).sum(-1).mean())
        assert row["entropy_raw"] == pytest.approx(entropy, rel=1e-4)
        if row["temperature"] == 1.0:  # sampled at T=1 after top_k 20 / top_p 0.95: far below the raw entropy
            assert 0 < row["entropy"] < math.log(20) + 1e-6 < row["entropy_raw"]
        else:  # greedy: the token was certain
            assert row["entropy"] == 0.0


def test_sweep_shows_a_progress_bar(tiny, capsys):
    S.sweep(tiny, [PROMPT], grid={"temperature": [0]}, max_new_tokens=2)
    err = capsys.readouterr().err
    assert "sweep" in err and "1/1" in err


def test_thinking_loop_flag(tiny):
    rows = S.sweep(tiny, [PROMPT], grid={"temperature": [0], "enable_thinking": [True, False]}, max_new_tokens=10,
                   progress=False)
    thinking, plain = sorted(rows, key=lambda r: not r["enable_thinking"])
    # thinking: the prompt opened <think>, greedy tiny repeats one token and never closes it
    assert thinking["reasoning"] is not None and not thinking["finished_thinking"] and thinking["answer"] == ""
    assert thinking["reasoning_tokens"] == 10
    assert thinking["repetition_rate"] == pytest.approx(S.repetition_rate(thinking["ids"]))
    assert thinking["thinking_loop"] is (thinking["repetition_rate"] >= 0.3) is True
    assert plain["reasoning"] is None and plain["thinking_loop"] is False


def test_sweep_over_presets(tiny):
    rows = S.sweep(tiny, [PROMPT], presets=["qwen3.5-instruct-general", "qwen3.5-thinking-general"],
                   max_new_tokens=3, progress=False)
    assert [r["preset"] for r in rows] == ["qwen3.5-instruct-general", "qwen3.5-thinking-general"]
    assert [r["enable_thinking"] for r in rows] == [False, True]
    assert [r["presence_penalty"] for r in rows] == [1.5, 1.5] and [r["top_p"] for r in rows] == [0.8, 0.95]


def test_plot_sweep(swept):
    fig = S.plot_sweep(swept, x="temperature", metrics=["distinct_2", "entropy"])
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["distinct_2", "entropy"]
    assert all(ax.get_xlabel() == "temperature" for ax in axes)
    # one line per presence_penalty value; its points are the means over samples
    df = swept.to_pandas()
    lines = axes[1].get_lines()
    want = df[df.presence_penalty == 2.0].groupby("temperature").entropy.mean().tolist()
    assert any(np.allclose(line.get_ydata(), want) for line in lines)
    with pytest.raises(ValueError, match="unknown metric"):
        S.plot_sweep(swept, metrics=["nope"])


# ============================================================================ the panel (no browser)

@pytest.fixture(scope="module")
def panel(tiny):
    return SamplingPanel(tiny, prompt=PROMPT, max_new_tokens=6, seed=3)


def test_panel_preset_fills_the_sliders(panel):
    for name in ("qwen3.5-thinking-general", "qwen3.5-instruct-reasoning", "qwen3.6-instruct"):
        preset = S.PRESETS[name]
        panel.preset.value = name
        got = {k: panel.sliders[k].value for k in panel.sliders}
        want = {k: getattr(preset, k) for k in panel.sliders}
        assert got == pytest.approx(want)
        assert panel.thinking.value is preset.enable_thinking
        assert panel.current["params"]["top_k"] == preset.top_k


def test_panel_distribution_follows_the_sliders(panel, tiny):
    panel.preset.value = "qwen3.5-instruct-general"
    panel.sliders["top_p"].value = 1.0
    assert panel.preset.value == "custom"  # the sliders no longer say what the preset says
    panel.sliders["min_p"].value = 0.0
    panel.sliders["top_k"].value = 7
    assert panel.current["stages"]["top_k"]["kept"] == 7
    # the chart's numbers are the reference sampler's, for the prompt's next token
    inputs = tiny.prepare(MESSAGES, enable_thinking=False)
    with torch.no_grad():
        raw = tiny.model(**inputs).logits[0, -1].float()
    params = {k: s.value for k, s in panel.sliders.items()}
    ref = reference_process(raw.tolist(), inputs["input_ids"][0].tolist(), [], **params)
    ref_p = np.exp(ref - ref[np.isfinite(ref)].max())
    ref_p /= ref_p.sum()
    final = panel.current["stages"]["top_p"]
    np.testing.assert_allclose(final["probs"], ref_p[final["ids"]], rtol=1e-5, atol=1e-7)
    low = panel.current["stages"]["temperature"]["entropy"]
    panel.sliders["temperature"].value = 1.5
    assert panel.current["stages"]["temperature"]["entropy"] > low  # hotter: flatter
    assert "7 tokens kept" in panel.summary.value


def test_panel_chart_is_a_png_in_an_image_widget(tiny, monkeypatch):
    """In a notebook the chart is PNG bytes in an ``ipywidgets.Image`` (no Output widget, whose display
    messages stalled nbconvert runs); hidden while the settings are invalid, shown again when fixed."""
    import io

    import ipywidgets as W
    from PIL import Image

    from qwen35_lab import sampling_panel

    monkeypatch.setattr(sampling_panel, "get_ipython", lambda: object())  # as inside a kernel
    p = SamplingPanel(tiny, prompt=PROMPT, max_new_tokens=2, seed=3)
    assert isinstance(p.chart, W.Image) and not any(isinstance(w, W.Output) for w in _descendants(p.widget))
    png = p.chart.value
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and p.chart.layout.display is None
    width, height = Image.open(io.BytesIO(png)).size
    fig_w, fig_h = p.figure().get_size_inches()
    assert (width, height) == (round(fig_w * 100), round(fig_h * 100))  # the panel's figure, at 100 dpi
    p.sliders["top_p"].value = 0.0
    assert p.chart.value == b"" and p.chart.layout.display == "none"
    p.sliders["top_p"].value = 0.8
    assert p.chart.value[:4] == b"\x89PNG" and p.chart.layout.display is None


def _descendants(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)


def test_panel_shows_invalid_settings_instead_of_raising(panel):
    panel.preset.value = "qwen3.5-instruct-general"
    panel.sliders["top_p"].value = 0.0
    assert "top_p=0.0" in panel.message and "(0, 1]" in panel.message
    assert "top_p=0.0" in panel.message_box.value and "error" in panel.current
    before = panel.last_sample
    panel.generate_button.click()  # refused, shown, nothing generated
    assert panel.last_sample is before and "top_p" in panel.message
    panel.sliders["top_p"].value = 0.8
    panel.sliders["repetition_penalty"].value = 0.0
    assert "repetition_penalty=0.0" in panel.message
    panel.sliders["repetition_penalty"].value = 1.0
    assert panel.message == "" and "error" not in panel.current


def test_panel_generate_streams_what_lab_generate_makes(panel, tiny):
    panel.preset.value = "qwen3.5-instruct-general"
    panel.seed.value = 11
    panel.generate_button.click()
    assert panel.message == ""
    s = panel.last_sample
    want = tiny.generate(MESSAGES, max_new_tokens=6, seed=11, enable_thinking=False, preset="qwen3.5-instruct-general")
    assert s.ids == want.ids[0].tolist()
    assert panel.output_text == want.text  # the streamed pieces add up to the reply
    assert "6 tokens" in panel.reply.value
    fig = panel.figure()
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == list(S.STAGES)
