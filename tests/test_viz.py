"""Plots and the trace explorer show the trace's own values, checked against independent references:
the model's DeltaNet output o (for the mixing matrix and the read-outs), the naive per-token
recurrence (for state norms), entropies recomputed from the probabilities, the tokenizer's own
decoding (for axis labels) and a forward pass with the input term of the decay removed (for the
parameter-only half-life)."""

from __future__ import annotations

import math
import re
import warnings

import matplotlib
import matplotlib.collections

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from qwen35_lab import ops, viz
from qwen35_lab.instrument import Trace, zero
from qwen35_lab.widgets import TraceExplorer

PROMPT = "The quick brown fox jumps over the lazy dog.\nThe quick brown fox"
CAPTURE = ["layers.*.deltanet.beta", "layers.*.deltanet.g", "layers.*.deltanet.o", "layers.*.deltanet.state",
           "layers.*.attn.probs", "layers.*.attn.summary", "layers.*.attn.gate"]


@pytest.fixture(scope="module")
def trace(tiny):
    # chunk_size 4: states are served from several checkpoints plus a replay
    return tiny.run(PROMPT, capture=CAPTURE, chunk_size=4)


@pytest.fixture(scope="module")
def state_only(tiny):
    return tiny.run(PROMPT, capture="layers.*.deltanet.state")


@pytest.fixture(scope="module")
def attention_only(tiny):
    return tiny.run(PROMPT, capture="layers.*.attn.summary")


@pytest.fixture(scope="module")
def layers(tiny):
    deltanet = [i for i, t in enumerate(tiny.layer_types) if t == "linear_attention"]
    attention = [i for i, t in enumerate(tiny.layer_types) if t == "full_attention"]
    return deltanet, attention


def _image(fig, k=0):
    """The data of the k-th image of the figure's first axes that has images."""
    axes = [ax for ax in fig.axes if ax.images]
    return np.ma.getdata(axes[k].images[0].get_array())


def _xlabels(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


# ----------------------------------------------------------------------------- labels

def test_token_labels_match_the_tokenizer(tiny, trace):
    ids = trace.tokens[0].tolist()
    expected = [tiny.tokenizer.decode([i]).replace("\n", "↵") for i in ids]
    assert viz.token_labels(trace) == expected
    assert "↵" in expected  # the newline token is made visible


def test_long_traces_get_numeric_ticks():
    T, HV = 120, 3
    beta = torch.rand(1, T, HV)
    tr = Trace({"layers.0.deltanet.beta": beta}, {"layers.0.deltanet.beta": list(range(T))},
               meta={"token_strings": ["Ġa"] * T, "tokens": torch.zeros(1, T, dtype=torch.long),
                     "layer_types": ["linear_attention", "full_attention"]})
    fig = viz.plot_gates(tr, 0)
    labels = _xlabels(fig.axes[0])
    assert all(s.isdigit() for s in labels) and 4 <= len(labels) <= 30
    np.testing.assert_array_equal(_image(fig), beta[0].T.numpy())


def test_characters_no_font_draws_show_as_the_token_id_and_its_bytes(tmp_path):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    pieces = ["".join(alphabet[b] for b in text.encode()) for text in (" fox", "创意", "\n")]
    tr = Trace({"layers.0.deltanet.beta": torch.rand(1, 3, 2)}, {"layers.0.deltanet.beta": [0, 1, 2]},
               meta={"token_strings": pieces, "tokens": torch.tensor([[7, 8, 9]]),
                     "layer_types": ["linear_attention"]})
    cjk = "创意"
    if all(ord(c) in viz._font_coverage() for c in cjk):  # a CJK font is installed: drawn through fallback
        assert viz.token_labels(tr) == [" fox", cjk, "↵"]
    else:  # the token id and its UTF-8 bytes, never a \\u escape
        assert viz.token_labels(tr) == [" fox", "#8 ⟨" + cjk.encode().hex(" ") + "⟩", "↵"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph would warn at draw time
        viz.plot_gates(tr, 0).savefig(tmp_path / "g.png", dpi=30)


# ----------------------------------------------------------------------------- gates

def test_plot_gates_shows_beta_g_and_decay(trace, layers):
    layer = layers[0][0]
    beta = trace[f"layers.{layer}.deltanet.beta"][0].float()
    g = trace[f"layers.{layer}.deltanet.g"][0].float()
    fig = viz.plot_gates(trace, layer, "beta")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    np.testing.assert_array_equal(_image(fig), beta.T.numpy())
    assert _xlabels(fig.axes[0]) == viz.token_labels(trace)
    assert f"Layer {layer}" in fig.axes[0].get_title() and "β" in fig.axes[0].get_title()
    np.testing.assert_array_equal(_image(viz.plot_gates(trace, layer, "g")), g.T.numpy())
    # decay: the forgotten share 1 − exp(g), computed from g in float64
    np.testing.assert_allclose(_image(viz.plot_gates(trace, layer, "decay")), (-g.double().expm1()).T.numpy(),
                               rtol=1e-9)


def test_gates_come_from_the_state_when_only_the_state_was_captured(state_only, trace, layers):
    layer = layers[0][1]
    fig = viz.plot_gates(state_only, layer, "beta")
    np.testing.assert_allclose(_image(fig), trace[f"layers.{layer}.deltanet.beta"][0].T.numpy(), atol=1e-6)


def test_plot_gates_overview_has_one_panel_per_deltanet_layer(trace, layers):
    deltanet = layers[0]
    fig = viz.plot_gates_overview(trace, "decay")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(deltanet)
    assert len(fig.axes) == len(deltanet) + 1  # one shared colour bar, empty grid cells removed
    for ax, layer in zip(panels, deltanet):
        assert ax.get_title() == f"layer {layer}"
        expected = (-trace[f"layers.{layer}.deltanet.g"][0].double().expm1()).T.numpy()
        np.testing.assert_allclose(ax.images[0].get_array(), expected, rtol=1e-9)


def test_half_life_from_a_trace(trace, layers):
    fig = viz.plot_half_life(trace)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(ax.collections) == len(layers[0])
    for points, layer in zip(ax.collections, layers[0]):
        g = trace[f"layers.{layer}.deltanet.g"][0].double()  # [T, HV]
        expected = math.log(2) / -g.mean(0)
        np.testing.assert_allclose(points.get_offsets()[:, 1], expected.numpy(), rtol=1e-6)


def test_half_life_from_parameters_matches_a_run_without_the_input_term(tiny, layers):
    """The parameter-only half-life is what the model computes when in_proj_a contributes nothing."""
    lives = viz.half_lives(tiny)
    assert sorted(lives) == layers[0]
    blocks = tiny.model.model.language_model.layers
    saved = {i: blocks[i].linear_attn.in_proj_a.weight.detach().clone() for i in layers[0]}
    try:
        with torch.no_grad():
            for i in layers[0]:
                blocks[i].linear_attn.in_proj_a.weight.zero_()
        tr = tiny.run(PROMPT, capture="layers.*.deltanet.g")
    finally:
        with torch.no_grad():
            for i, w in saved.items():
                blocks[i].linear_attn.in_proj_a.weight.copy_(w)
    for layer in layers[0]:
        g = tr[f"layers.{layer}.deltanet.g"][0].double()  # constant along T now
        np.testing.assert_allclose(lives[layer].numpy(), (math.log(2) / -g).numpy()[0], rtol=1e-5)
    fig = viz.plot_half_life(tiny)
    for points, layer in zip(fig.axes[0].collections, layers[0]):
        np.testing.assert_allclose(points.get_offsets()[:, 1], lives[layer].numpy())
    with pytest.raises(TypeError, match="Trace or a Lab"):
        viz.plot_half_life("tiny")


# ----------------------------------------------------------------------------- states

def test_state_norms_match_the_naive_recurrence(trace, layers):
    layer = layers[0][0]
    x = trace.state_inputs(layer)
    _, _, states = ops.naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"],
                                                        use_qk_l2norm=False, output_states=True)
    expected = states[0].flatten(-2).norm(dim=-1)  # [T, HV]
    fig = viz.plot_state_norms(trace, layer, heads=[1, 3])
    lines = [ln for ln in fig.axes[0].lines]
    assert [ln.get_label() for ln in lines] == ["head 1", "head 3"]
    np.testing.assert_allclose(lines[0].get_ydata(), expected[:, 1].numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(lines[1].get_ydata(), expected[:, 3].numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(IndexError, match="head 9"):
        viz.plot_state_norms(trace, layer, heads=[9])


def test_read_out_equals_the_model_output_norm(state_only, trace, layers):
    layer = layers[0][2]
    o = trace[f"layers.{layer}.deltanet.o"][0].float()  # [T, HV, V]
    fig = viz.plot_state_readout(trace, layer)
    np.testing.assert_allclose(_image(fig), o.norm(dim=-1).T.numpy(), rtol=1e-6)
    rebuilt, _ = viz.read_norms(state_only, layer)  # from S_t and q_t
    np.testing.assert_allclose(rebuilt.numpy(), o.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-8)


def test_effective_attention_heatmap_reconstructs_the_output(trace, layers):
    layer, head = layers[0][0], 2
    fig = viz.plot_effective_attention(trace, layer, head)
    A = fig.axes[0].images[0].get_array()  # masked above the diagonal
    T = trace.length
    assert A.shape == (T, T)
    assert np.ma.getmaskarray(A)[np.triu_indices(T, 1)].all() and not np.ma.getmaskarray(A)[np.tril_indices(T)].any()
    v = trace.state_inputs(layer)["v"][0, :, head].double()  # [T, V]
    o = trace[f"layers.{layer}.deltanet.o"][0, :, head].double()
    np.testing.assert_allclose(torch.from_numpy(A.filled(0.0)).double() @ v, o, atol=1e-6)
    rows = [3, 7]
    fig = viz.plot_effective_attention(trace, layer, head, rows=rows)
    np.testing.assert_allclose(np.ma.getdata(fig.axes[0].images[0].get_array()), np.ma.getdata(A)[rows],
                               rtol=1e-5, atol=1e-9)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == viz.token_labels(trace, rows)
    with pytest.raises(IndexError, match="row 99"):
        viz.plot_effective_attention(trace, layer, head, rows=[99])


# ----------------------------------------------------------------------------- attention

def test_plot_attention_is_the_probability_matrix(trace, layers):
    layer = layers[1][0]
    P = trace[f"layers.{layer}.attn.probs"][0, 1].float()
    fig = viz.plot_attention(trace, layer, 1)
    assert len(fig.axes) == 2
    np.testing.assert_array_equal(_image(fig), P.numpy())
    np.testing.assert_allclose(_image(fig).sum(-1), 1.0, atol=1e-5)
    assert _xlabels(fig.axes[0]) == viz.token_labels(trace)


def test_attention_summary_curves(trace, layers):
    layer = layers[1][-1]
    P = trace[f"layers.{layer}.attn.probs"][0].double()  # [Hq, T, T]
    entropy = -(P * P.clamp_min(1e-30).log()).sum(-1)
    fig = viz.plot_attention_summary(trace, layer)
    assert len(fig.axes) == 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["entropy (nats)", "max probability", "mass on token 0 (sink)", "mean distance (tokens)"]
    Hq = P.shape[0]
    for ax in fig.axes:
        assert len(ax.lines) == Hq + 1  # one per head and the uniform reference
    for h in range(Hq):
        np.testing.assert_allclose(fig.axes[0].lines[h].get_ydata(), entropy[h].numpy(), atol=1e-4)
        np.testing.assert_allclose(fig.axes[1].lines[h].get_ydata(), P[h].max(-1).values.numpy(), atol=1e-5)
        np.testing.assert_allclose(fig.axes[2].lines[h].get_ydata(), P[h, :, 0].numpy(), atol=1e-5)


def test_attention_gate_plot(trace, layers):
    layer = layers[1][0]
    gate = trace[f"layers.{layer}.attn.gate"][0].float()  # [T, Hq, Dh]
    fig = viz.plot_attention_gate(trace, layer)
    np.testing.assert_allclose(_image(fig), gate.mean(-1).T.numpy(), rtol=1e-6)
    violins = [ax for ax in fig.axes if ax.get_title() == "all values, per head"][0]
    bodies = [c for c in violins.collections if isinstance(c, matplotlib.collections.PolyCollection)]
    assert len(bodies) == gate.shape[1]


# ----------------------------------------------------------------------------- errors

def test_missing_probes_name_the_capture_to_add(attention_only, layers):
    deltanet, attention = layers
    tr = attention_only
    d, a = deltanet[0], attention[0]
    cases = [(lambda: viz.plot_gates(tr, d), f"layers.{d}.deltanet.beta"),
             (lambda: viz.plot_gates(tr, d, "decay"), f"layers.{d}.deltanet.g"),
             (lambda: viz.plot_gates_overview(tr), "layers.*.deltanet.beta"),
             (lambda: viz.plot_half_life(tr), "layers.*.deltanet.g"),
             (lambda: viz.plot_state_norms(tr, d), f"layers.{d}.deltanet.state"),
             (lambda: viz.plot_effective_attention(tr, d, 0), f"layers.{d}.deltanet.state"),
             (lambda: viz.plot_state_readout(tr, d), f"layers.{d}.deltanet.o"),
             (lambda: viz.plot_attention(tr, a, 0), f"layers.{a}.attn.probs"),
             (lambda: viz.plot_attention_gate(tr, a), f"layers.{a}.attn.gate")]
    for call, name in cases:
        with pytest.raises(KeyError, match=f"capture=.*{name.replace('*', '[*]')}"):
            call()


def test_bad_arguments_are_refused(trace, layers):
    deltanet, attention = layers
    with pytest.raises(ValueError, match="full_attention"):
        viz.plot_gates(trace, attention[0])
    with pytest.raises(ValueError, match="linear_attention"):
        viz.plot_attention(trace, deltanet[0], 0)
    with pytest.raises(ValueError, match="'beta', 'g', 'decay'"):
        viz.plot_gates(trace, deltanet[0], "alpha")
    with pytest.raises(IndexError, match="layer 40"):
        viz.plot_gates(trace, 40)
    with pytest.raises(IndexError, match="head 4"):
        viz.plot_attention(trace, attention[0], 4)
    with pytest.raises(IndexError, match="batch 1"):
        viz.plot_gates(trace, deltanet[0], batch=1)
    with pytest.raises(TypeError, match="Trace"):
        viz.plot_gates({"layers.0.deltanet.beta": 1}, 0)
    with pytest.raises(TypeError, match="layer must be an int"):
        viz.plot_gates(trace, "0")


def test_figures_render(trace, layers, tmp_path):
    for fig in (viz.plot_gates_overview(trace), viz.plot_attention_summary(trace, layers[1][0])):
        fig.savefig(tmp_path / "f.png", dpi=30)
        assert (tmp_path / "f.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- explorer

def test_explorer_follows_the_controls(trace, layers):
    deltanet = layers[0]
    ex = TraceExplorer(trace)
    assert ex.layer.options == tuple((f"layer {i}", i) for i in deltanet)
    for layer, head, t in [(deltanet[3], 2, 10), (deltanet[0], 1, 4)]:
        if t == 10:
            ex.layer.value, ex.head.value, ex.token.value = layer, head, t
        else:
            ex.select(layer=layer, head=head, token=t)
        c = ex.current
        assert (c["layer"], c["head"], c["token"]) == (layer, head, t)
        torch.testing.assert_close(c["beta"], trace[f"layers.{layer}.deltanet.beta"][0, t].float())
        torch.testing.assert_close(c["decay"], trace[f"layers.{layer}.deltanet.g"][0, t].float().exp())
        o = trace[f"layers.{layer}.deltanet.o"][0, t].float()  # [HV, V]
        torch.testing.assert_close(c["read_norm"], o.norm(dim=-1), rtol=1e-4, atol=1e-8)
        v = trace.state_inputs(layer)["v"][0, : t + 1, head]  # [t + 1, V]
        torch.testing.assert_close(c["mixing_row"] @ v, o[head], rtol=1e-4, atol=1e-7)
        writes = next(ax for ax in ex.current_figure.axes if ax.get_title().startswith("writes"))
        bars = [p.get_height() for p in writes.patches]
        np.testing.assert_allclose(bars, c["beta"].numpy())
        text = ex.summary_text()
        assert f"layer {layer}, token {t} {viz.token_labels(trace, [t])[0]!r}" in text
        assert f"head {head} reads most from token" in text
    assert "application/vnd.jupyter.widget-view+json" in ex._repr_mimebundle_()
    with pytest.raises(ValueError, match=f"layer {layers[1][0]} is not offered"):
        ex.select(layer=layers[1][0])
    with pytest.raises(ValueError, match="token 99 is not offered; valid: 0–"):
        ex.select(token=99)


def test_explorer_shows_a_message_for_what_it_cannot_serve(tiny, layers):
    layer = layers[0][0]
    tr = tiny.run(PROMPT, capture=f"layers.{layer}.deltanet.beta", positions=[2, 3, 5])
    ex = TraceExplorer(tr)
    assert ex.current["error"].startswith("IndexError: token 0 was not captured")
    assert ex.current_figure is None
    assert "was not captured" in ex.summary_text()
    ex.token.value = 3
    assert "error" not in ex.current
    torch.testing.assert_close(ex.current["beta"], tr[f"layers.{layer}.deltanet.beta"][0, 1].float())
    assert ex.current["decay"] is None and ex.current["read_norm"] is None
    assert f"capture 'layers.{layer}.deltanet.state'" in ex.summary_text()


def test_explorer_refuses_traces_without_deltanet_data(attention_only):
    with pytest.raises(ValueError, match="layers.\\*.deltanet.beta"):
        TraceExplorer(attention_only)
    with pytest.raises(TypeError, match="Trace"):
        TraceExplorer(None)


def test_explorer_after_an_edit_reads_nothing_where_beta_is_zero(tiny, layers):
    """With β = 0 in a layer nothing is written, so every head reads exactly zero."""
    layer = layers[0][1]
    tr = tiny.run(PROMPT, capture=[f"layers.{layer}.deltanet.beta", f"layers.{layer}.deltanet.state"],
                  edits={f"layers.{layer}.deltanet.beta": zero()})
    ex = TraceExplorer(tr)
    ex.token.value = 7
    assert torch.count_nonzero(ex.current["beta"]) == 0
    assert torch.count_nonzero(ex.current["read_norm"]) == 0
    assert torch.count_nonzero(ex.current["mixing_row"]) == 0


def test_plot_next_token_compares_runs(tiny, trace, layers):
    edited = tiny.run(PROMPT, edits={f"layers.{layers[1][0]}.attn.gate": zero()})
    fig = viz.plot_next_token({"before": trace, "after": edited}, tiny, k=5)
    ax = fig.axes[0]
    assert len(ax.patches) == 10  # 5 tokens × 2 runs
    before = trace.meta["last_logits"][0].double().softmax(-1)
    after = edited.meta["last_logits"][0].double().softmax(-1)
    top = before.topk(5).indices
    np.testing.assert_allclose([p.get_height() for p in ax.patches[:5]], before[top].numpy(), rtol=1e-6)
    np.testing.assert_allclose([p.get_height() for p in ax.patches[5:]], after[top].numpy(), rtol=1e-6)
    # labels are the tokens (or, where no font draws them, their id and bytes), at most 24 characters
    want = [viz._short(viz._readable(t, i)) for t, i in zip(tiny.tokenizer.convert_ids_to_tokens(top.tolist()),
                                                              top.tolist())]
    assert _xlabels(ax) == want
    assert all(viz._readable(t).startswith(tiny.tokenizer.decode([i]).replace("\n", "↵")[:1]) or "⟨" in viz._readable(t)
               for t, i in zip(tiny.tokenizer.convert_ids_to_tokens(top.tolist()), top.tolist()))
    kl = float((before * (before.log() - after.log())).sum())
    assert f"KL = {kl:.3g} nats" in ax.get_title()
    delta = after.log() - before.log()
    movers = [p.get_width() for p in fig.axes[1].patches]
    assert len(movers) == 5
    np.testing.assert_allclose(sorted(np.abs(movers)), sorted(delta.abs().topk(5).values.numpy()), rtol=1e-6)
    with pytest.raises(TypeError, match="non-empty dict"):
        viz.plot_next_token([trace], tiny)
    with pytest.raises(KeyError, match="last_logits"):
        viz.plot_next_token({"x": Trace(meta={})}, tiny)
