"""The MoE block instrumented, against transformers' own Qwen3_5MoeSparseMoeBlock (fp32, `tiny-moe`).

Guards against: an instrumented MoE model drifting from HF's logits (per layer, prefill and cached decode,
text / image / video), router probes captured at the wrong point (checked against what
``output_router_logits=True`` returns and against the router's own top-k), routing edits that leak or do
nothing (each compared with HF's model changed by a hook written here), bad routing edits reaching the
model, and routing statistics that do not add up.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import moe
from qwen35_lab.checks import BadIndex, BadType, BadValue, OverBudget
from qwen35_lab.instrument import force_experts, patch, remove_experts, scale, zero

TOL = 1e-5
TEXT = "Experts are chosen per token by a router; the shared expert sees every token. " * 2
E, K = 8, 2


@pytest.fixture(scope="module")
def lab():
    return ql.load("tiny-moe", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ids(lab):
    return lab.encode(TEXT)


@pytest.fixture(scope="module")
def mm_inputs(lab):
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(64, 80, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    image = dict(lab.processor(text=[lab.render(msgs)], images=[img], return_tensors="pt"))
    frames = (np.random.RandomState(1).rand(8, 64, 64, 3) * 255).astype("uint8")
    vmsgs = [{"role": "user", "content": [{"type": "video", "video": "clip"}, {"type": "text", "text": "And?"}]}]
    video = dict(lab.processor(text=[lab.render(vmsgs)], videos=[frames], return_tensors="pt",
                               do_sample_frames=False, video_metadata=[{"fps": 4.0, "total_num_frames": 8,
                                                                   "frames_indices": list(range(8))}]))
    return {"image": image, "video": video}


def layers(lab):
    return lab.model.model.language_model.layers


def hf_run(lab, inputs, hooks=()):
    """Plain HF (not instrumented): logits, each layer's output and HF's router logits; ``hooks`` are
    (module, forward hook) pairs that change HF's computation for a reference."""
    assert not lab.is_instrumented
    outs = {}
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
               for i, layer in enumerate(layers(lab))]
    handles += [m.register_forward_hook(h) for m, h in hooks]
    try:
        with torch.no_grad():
            res = lab.model(**inputs, use_cache=False, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return res, outs


def reference_route(logits, k=K):
    """Routing written out here (softmax in fp32, top-k, renormalise) for the hook references."""
    p = torch.softmax(logits.float(), -1)
    w, i = torch.topk(p, k, -1)
    return (w / w.sum(-1, keepdim=True)).to(logits.dtype), i


# ------------------------------------------------------------------------------------------- probes
def test_moe_probe_names_and_the_dense_model_refusal(lab, tiny):
    names = lab.probe_names("layers.3.*")
    moe_names = [n for n in names if ".moe." in n]
    assert moe_names == [f"layers.3.moe.{p}" for p in ("router_logits", "topk_ids", "topk_weights", "shared_gate",
                                                       "shared_out", "routed_out", "expert_out")]
    assert names.index("layers.3.resid_mid") < names.index("layers.3.moe.router_logits") < names.index("layers.3.mlp_out")
    with pytest.raises(BadValue, match="dense model, it has no routed"):
        tiny.run("hi", capture="layers.0.moe.router_logits")
    with pytest.raises(BadValue, match="dense model, it has no routed"):
        tiny.run("hi", capture="layers.*.moe.*")
    with pytest.raises(BadValue, match="dense model, it has no routed"):
        tiny.run("hi", edits={"layers.0.mlp_out": remove_experts([1])})


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_parity_with_hf_nothing_and_everything_captured(lab, ids, mm_inputs, kind):
    inputs = {"input_ids": ids} if kind == "text" else mm_inputs[kind]
    ref, ref_layers = hf_run(lab, inputs)
    with lab.instrumented(), torch.no_grad():  # instrumented, nothing captured: HF's forward, bit for bit
        assert torch.equal(lab.model(**inputs, use_cache=False).logits, ref.logits)
    with lab.trace("*") as tr, torch.no_grad():
        out = lab.model(**inputs, use_cache=False, output_router_logits=True)
    assert {"moe", "deltanet", "attn", "layer"} <= set(tr.meta["ran_instrumented"])
    assert (out.logits - ref.logits).abs().max() <= TOL
    B, T = inputs["input_ids"].shape
    for i, o in ref_layers.items():  # per layer: errors that cancel are caught
        assert (tr[f"layers.{i}.resid_post"] - o).abs().max() <= TOL, i
        logits = tr[f"layers.{i}.moe.router_logits"]
        assert logits.shape == (B, T, E)
        assert torch.equal(logits.reshape(-1, E), out.router_logits[i])  # what output_router_logits gives
        assert (logits.reshape(-1, E) - ref.router_logits[i]).abs().max() <= TOL
        w, top = reference_route(out.router_logits[i])
        assert torch.equal(tr[f"layers.{i}.moe.topk_ids"].reshape(-1, K), top)
        assert tr[f"layers.{i}.moe.topk_ids"].dtype == torch.int64
        assert torch.allclose(tr[f"layers.{i}.moe.topk_weights"].reshape(-1, K), w, atol=1e-6)
        mlp = tr[f"layers.{i}.moe.routed_out"] + tr[f"layers.{i}.moe.shared_out"]
        assert torch.equal(mlp, tr[f"layers.{i}.mlp_out"])
        gate = tr[f"layers.{i}.moe.shared_gate"]
        assert gate.shape == (B, T, 1) and bool(((gate > 0) & (gate < 1)).all())
        # each chosen expert's own output, weighted, is the routed output
        mixed = (tr[f"layers.{i}.moe.expert_out"] * tr[f"layers.{i}.moe.topk_weights"][..., None]).sum(2)
        assert (mixed - tr[f"layers.{i}.moe.routed_out"]).abs().max() <= TOL
    assert not lab.is_instrumented


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_parity_over_twenty_decode_steps(lab, ids, mm_inputs, kind):
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if kind == "text" else mm_inputs[kind]
    T = inputs["input_ids"].shape[1]

    def generate():
        with torch.no_grad():
            return lab.model.generate(**inputs, max_new_tokens=21, do_sample=False, output_logits=True,
                                      return_dict_in_generate=True)  # prefill + 20 cached single-token steps

    ref = generate()
    with lab.trace(["layers.*.moe.*", "layers.*.resid_post"]) as tr:
        got = generate()
    assert torch.equal(got.sequences, ref.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, ref.logits)) <= TOL
    assert tr["layers.0.moe.topk_ids"].shape == (1, T + 20, K)
    assert tr.positions("layers.5.moe.router_logits") == list(range(T + 20))
    # decode-step routing is the router's top-k of the decode step's captured logits
    w, top = reference_route(tr["layers.5.moe.router_logits"][0, T:])
    assert torch.equal(tr["layers.5.moe.topk_ids"][0, T:], top)


def test_selections_narrow_the_router_probes(lab, ids):
    tr = lab.run(torch.cat([ids, ids]), capture="layers.2.moe.*", positions=[1, 4, 7], batch=[1])
    assert tr["layers.2.moe.router_logits"].shape == (1, 3, E)
    assert tr["layers.2.moe.expert_out"].shape == (1, 3, K, 64)
    full = lab.run(ids, capture="layers.2.moe.router_logits")
    assert torch.equal(tr["layers.2.moe.router_logits"][0], full["layers.2.moe.router_logits"][0, [1, 4, 7]])


# -------------------------------------------------------------------------------------------- edits
def test_removing_experts_equals_masking_hfs_router(lab, ids):
    where = [2, 5, 9]
    plain = lab.run(ids, capture="layers.1.moe.topk_ids")["layers.1.moe.topk_ids"][0]
    removed = plain[where[0]].tolist()  # the experts token 2 uses

    def mask(module, args, out):
        logits = out[0].clone()
        logits[where[0]:where[0] + 1, removed] = float("-inf")
        for p in where[1:]:
            logits[p, removed] = float("-inf")
        w, i = reference_route(logits)
        return out[0], w, i

    ref, _ = hf_run(lab, {"input_ids": ids}, hooks=[(layers(lab)[1].mlp.gate, mask)])
    tr = lab.run(ids, capture="layers.1.moe.topk_ids",
                 edits={"layers.1.moe.router_logits": remove_experts(removed, positions=where)})
    assert (tr.meta["last_logits"] - ref.logits[:, -1]).abs().max() <= TOL
    chosen = tr["layers.1.moe.topk_ids"][0]
    assert not any(e in removed for p in where for e in chosen[p].tolist())
    others = [p for p in range(ids.shape[1]) if p not in where]
    assert torch.equal(chosen[others], plain[others])  # and nothing elsewhere


def test_forcing_experts_equals_hfs_router_told_so(lab, ids):
    forced, where = [7, 0], [4, 8]

    def force(module, args, out):
        logits, w, i = out
        i, w = i.clone(), w.clone()
        p = torch.softmax(logits.float(), -1)
        for t in where:
            i[t] = torch.tensor(forced)
            w[t] = p[t, forced] / p[t, forced].sum()
        return logits, w, i

    ref, _ = hf_run(lab, {"input_ids": ids}, hooks=[(layers(lab)[4].mlp.gate, force)])
    tr = lab.run(ids, capture="layers.4.moe.*", edits={"layers.4.moe.topk_ids": force_experts(forced, positions=where)})
    assert (tr.meta["last_logits"] - ref.logits[:, -1]).abs().max() <= TOL
    assert tr["layers.4.moe.topk_ids"][0, where].tolist() == [forced, forced]
    assert torch.allclose(tr["layers.4.moe.topk_weights"][0, where].sum(-1), torch.ones(2))


def test_zeroing_and_scaling_the_shared_gate(lab, ids):
    off, _ = hf_run(lab, {"input_ids": ids}, hooks=[(layers(lab)[0].mlp.shared_expert_gate,
                                                     lambda m, a, o: torch.full_like(o, float("-inf")))])
    tr = lab.run(ids, capture="layers.0.moe.shared_out", edits={"layers.0.moe.shared_gate": zero()})
    assert (tr.meta["last_logits"] - off.logits[:, -1]).abs().max() <= TOL
    assert tr["layers.0.moe.shared_out"].abs().max() == 0
    half, _ = hf_run(lab, {"input_ids": ids}, hooks=[(layers(lab)[0].mlp.shared_expert, lambda m, a, o: 0.5 * o)])
    tr = lab.run(ids, edits={"layers.0.moe.shared_gate": scale(0.5)})
    assert (tr.meta["last_logits"] - half.logits[:, -1]).abs().max() <= TOL
    plain, _ = hf_run(lab, {"input_ids": ids})
    assert (half.logits - plain.logits).abs().max() > 1e-4  # the reference differs from the unedited model


def test_replaced_router_logits_reroute_every_token(lab, ids):
    prefer = torch.tensor([0.0, 0, 0, 5, 0, 4, 0, 0])
    tr = lab.run(ids, capture="layers.2.moe.topk_ids", edits={"layers.2.moe.router_logits": prefer})
    assert (tr["layers.2.moe.topk_ids"] == torch.tensor([3, 5])).all()


def test_patching_routing_from_another_prompt(lab, ids):
    other = lab.encode("A completely different prompt about the weather, the sea and the long summer days. " * 2)
    n = min(ids.shape[1], other.shape[1])
    a, b = ids[:, :n], other[:, :n]
    donor = lab.run(b, capture=["layers.2.moe.router_logits", "layers.2.moe.topk_ids"])
    tr = lab.run(a, capture="layers.2.moe.topk_ids", edits={"layers.2.moe.router_logits": patch(donor)})
    assert torch.equal(tr["layers.2.moe.topk_ids"], donor["layers.2.moe.topk_ids"])
    plain = lab.run(a, capture="layers.2.moe.topk_ids")
    assert not torch.equal(plain["layers.2.moe.topk_ids"], donor["layers.2.moe.topk_ids"])


# -------------------------------------------------------------------------------------- bad input
def test_bad_routing_edits_are_refused_before_the_model_runs(lab, ids):
    calls = []
    h = lab.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(BadIndex, match="has 8 experts"):
            lab.run(ids, edits={"layers.1.moe.router_logits": remove_experts([2, 8])})
        with pytest.raises(BadValue, match="exactly 2"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": force_experts([1])})
        with pytest.raises(BadValue, match="exactly 2"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": force_experts([1, 2, 3])})
        with pytest.raises(BadValue, match="no expert to route to"):
            lab.run(ids, edits={"layers.*.moe.router_logits": remove_experts(range(8))})
        with pytest.raises(BadValue, match="last axis must be the layer's 8 experts"):
            lab.run(ids, edits={"layers.1.moe.router_logits": torch.zeros(5)})
        with pytest.raises(BadValue, match="key it by 'layers.i.moe.router_logits'"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": remove_experts([1])})
        with pytest.raises(BadType, match="force_experts"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": 3.0})
        with pytest.raises(BadIndex, match="expert indices are integers 0–7"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": torch.tensor([1, 9])})
        with pytest.raises(BadValue, match="repeat"):
            force_experts([1, 1])
        with pytest.raises(BadValue, match="one expert twice"):
            lab.run(ids, edits={"layers.1.moe.topk_ids": torch.tensor([4, 4])})
        with pytest.raises(BadValue, match="read-only"):
            lab.run(ids, edits={"layers.1.moe.expert_out": 0.0})
        with pytest.raises(OverBudget, match=r"layers\.\d\.moe\.expert_out"):
            lab.run(ids, capture="layers.*.moe.expert_out", budget_bytes=10_000)
    finally:
        h.remove()
    assert calls == []


# ----------------------------------------------------------------------------------------- analysis
@pytest.fixture(scope="module")
def routed(lab, ids):
    out, _ = hf_run(lab, {"input_ids": ids})
    return lab.run(ids, capture="layers.*.moe.*"), out.router_logits


def test_expert_load_and_coactivation_add_up(routed, ids):
    tr, hf_logits = routed
    N = ids.shape[1]
    load = moe.expert_load(tr)
    assert sorted(load) == list(range(8))
    for L, r in load.items():
        _, top = reference_route(hf_logits[L])
        assert torch.equal(r["counts"], torch.bincount(top.flatten(), minlength=E).float())
        assert r["counts"].sum() == N * K and abs(float(r["mass"].sum()) - N) < 1e-4
        assert r["balanced_counts"] == N * K / E and r["balanced_mass"] == N / E
        c = moe.coactivation(tr, L)
        assert torch.equal(c.diagonal(), r["counts"]) and torch.equal(c, c.T)
        assert c.sum() - c.diagonal().sum() == N * K * (K - 1)


def test_token_map_entropy_and_similarity(routed, ids):
    tr, hf_logits = routed
    m = moe.token_expert_map(tr, 3)
    assert m.shape == (ids.shape[1], E)
    assert torch.allclose(m.sum(1), torch.ones(m.shape[0])) and bool(((m > 0).sum(1) == K).all())
    h = moe.router_entropy(tr, 3)
    p = torch.softmax(hf_logits[3], -1)
    assert torch.allclose(h[0], -(p * p.log()).sum(-1), atol=1e-5)
    assert bool((h <= math.log(E) + 1e-6).all())
    assert all(abs(s - 1) < 1e-6 for s in moe.routing_similarity(tr, tr).values())


def test_disjoint_routing_has_zero_similarity(lab, ids):
    a = lab.run(ids, capture="layers.*.moe.*", edits={"layers.*.moe.topk_ids": force_experts([0, 1])})
    b = lab.run(ids, capture="layers.*.moe.*", edits={"layers.*.moe.topk_ids": force_experts([2, 3])})
    assert all(s == 0 for s in moe.routing_similarity(a, b).values())


def test_chat_segments_and_routing_by_segment(lab):
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(2).rand(32, 32, 3) * 255).astype("uint8"))
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "<think>\nA grey square.\n</think>\n\nA square."}]
    tr = lab.run(msgs, capture="layers.*.moe.*", enable_thinking=True)
    labels = moe.chat_segments(tr.token_strings, tr.tokens[0])
    strings = tr.token_strings
    assert len(labels) == len(strings)
    assert labels[strings.index("system") + 2] == "system"  # the system text
    assert labels[strings.index("A", strings.index("<think>"))] == "thinking"
    assert labels[strings.index("A", strings.index("</think>"))] == "answer"
    assert labels.count("image") == int((tr.tokens == 248056).sum()) > 0
    assert labels[strings.index("What")] == "user"
    by = moe.routing_by_segment(tr, 2)
    assert {"system", "user", "image", "thinking", "answer", "template"} <= set(by)
    for share in by.values():
        assert abs(float(share.sum()) - 1) < 1e-5


def test_mutual_information_in_bits():
    assert moe.mutual_information(torch.tensor([0, 1] * 50), torch.tensor([0, 1] * 50)) == pytest.approx(1.0)
    assert moe.mutual_information(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0)
    four = torch.arange(4).repeat(25)
    assert moe.mutual_information(four, four) == pytest.approx(2.0)
    with pytest.raises(BadValue, match="as many labels"):
        moe.mutual_information(torch.zeros(3), torch.zeros(4))


def test_analysis_refuses_traces_without_routing(tiny):
    tr = tiny.run("hello", capture="layers.0.resid_post")
    with pytest.raises(KeyError, match="moe"):
        moe.expert_load(tr)
    with pytest.raises(BadType, match="Trace"):
        moe.expert_load({"layers.0.moe.topk_ids": None})


def test_plots_draw(routed, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr, _ = routed
    for draw in (lambda: moe.plot_expert_load(tr), lambda: moe.plot_token_experts(tr, 3),
                 lambda: moe.plot_router_entropy(tr, [0, 7]), lambda: moe.plot_coactivation(tr, 3),
                 lambda: moe.plot_routing_by_segment(tr, 3, ["user"] * tr.length),
                 lambda: moe.plot_routing_similarity(tr, tr)):
        ax = draw()
        ax.figure.savefig(tmp_path / "p.png")
        assert (tmp_path / "p.png").stat().st_size > 1000
        plt.close(ax.figure)


def test_generate_captures_routing_and_traces_round_trip(lab, tmp_path):
    from qwen35_lab.instrument import Trace

    gen = lab.generate("Route me", max_new_tokens=5, seed=0, capture=["layers.0.moe.topk_ids", "layers.0.moe.topk_weights"])
    tr = gen.trace
    n = gen.prompt_ids.shape[1] + gen.ids.shape[1] - 1  # the last generated token is not fed back
    assert tr["layers.0.moe.topk_ids"].shape == (1, n, K) and tr.positions("layers.0.moe.topk_ids") == list(range(n))
    tr.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    assert torch.equal(back["layers.0.moe.topk_ids"], tr["layers.0.moe.topk_ids"])
    assert back["layers.0.moe.topk_ids"].dtype == torch.int64


def test_parity_with_many_experts_and_top8():
    """The real models route to 8 (or 10) of 256 (512) experts: the same code at E = 64, k = 8."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    from qwen35_lab.instrument import Session, instrument, uninstrument

    torch.manual_seed(0)
    config = Qwen3_5MoeTextConfig(vocab_size=500, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=32, linear_num_key_heads=2,
                                  linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                  num_experts=64, num_experts_per_tok=8, moe_intermediate_size=16,
                                  shared_expert_intermediate_size=32)
    model = Qwen3_5MoeForCausalLM(config).eval()
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.mlp.gate.weight, std=0.5)
    ids = torch.randint(0, 500, (2, 30))
    with torch.no_grad():
        ref = model(input_ids=ids, output_router_logits=True)
    hub = instrument(model)
    names = [f"layers.{i}.moe.{p}" for i in range(4) for p in ("router_logits", "topk_ids", "topk_weights")]
    hub.session = Session(capture=names, edits={})
    try:
        with torch.no_grad():
            got = model(input_ids=ids, output_router_logits=True)
        store = hub.session.store
    finally:
        uninstrument(model)
    assert (got.logits - ref.logits).abs().max() <= TOL
    for i in range(4):
        assert torch.equal(store[f"layers.{i}.moe.router_logits"][0].reshape(-1, 64), got.router_logits[i])
        assert (got.router_logits[i] - ref.router_logits[i]).abs().max() <= TOL
        w, top = reference_route(got.router_logits[i], k=8)
        assert torch.equal(store[f"layers.{i}.moe.topk_ids"][0].reshape(-1, 8), top)
        assert torch.allclose(store[f"layers.{i}.moe.topk_weights"][0].reshape(-1, 8), w, atol=1e-6)
