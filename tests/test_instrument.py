"""Instrumentation against HF's own modules and the naive recurrence (fp32, the `tiny` organism).

Guards against: instrumented forwards drifting from HF's (caught per layer, not only at the logits,
so errors that cancel are seen), probes captured at the wrong point (β, g, z, q, k, v compared with
what HF itself passes to its recurrence), states rebuilt wrongly from checkpoints, and edits that
leak or do nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

import qwen35_lab as ql
from qwen35_lab.instrument import Trace, patch, scale, zero
from qwen35_lab.ops import naive_recurrent_gated_delta_rule

TOL = 1e-5
TEXT = "The Gated DeltaNet writes keys and values into a matrix state and reads it with queries. " * 2


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def ids(tiny):
    return tiny.encode(TEXT)  # ~40 tokens


@pytest.fixture(scope="module")
def long_ids(tiny):
    return tiny.encode(TEXT * 4)  # > 2 chunks of 64


@pytest.fixture(scope="module")
def mm_inputs(tiny):
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(64, 80, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    image = dict(tiny.processor(text=[tiny.render(msgs)], images=[img], return_tensors="pt"))
    frames = (np.random.RandomState(1).rand(8, 64, 64, 3) * 255).astype("uint8")
    vmsgs = [{"role": "user", "content": [{"type": "video", "video": "clip"}, {"type": "text", "text": "And?"}]}]
    video = dict(tiny.processor(text=[tiny.render(vmsgs)], videos=[frames], return_tensors="pt",
                                do_sample_frames=False, video_metadata=[{"fps": 4.0, "total_num_frames": 8,
                                                                    "frames_indices": list(range(8))}]))
    return {"image": image, "video": video}


class HFRecorder:
    """Record what HF's own modules compute: layer outputs and the inputs/outputs of its recurrence."""

    def __init__(self, lab):
        self.lab, self.layers, self.recurrence, self.z = lab, {}, {}, {}

    def __enter__(self):
        layers = self.lab.model.model.language_model.layers
        self.handles = [layer.register_forward_hook(lambda m, a, o, i=i: self.layers.__setitem__(i, o))
                        for i, layer in enumerate(layers)]
        for i, layer in enumerate(layers):
            if layer.block_type == "linear_attention":
                self.handles.append(layer.linear_attn.in_proj_z.register_forward_hook(
                    lambda m, a, o, i=i: self.z.__setitem__(i, o)))
        self.orig = hf.torch_chunk_gated_delta_rule
        calls = []

        def recording(q, k, v, g, beta, **kw):
            out = self.orig(q, k, v, g=g, beta=beta, **kw)
            calls.append(dict(q=q, k=k, v=v, g=g, beta=beta, o=out[0]))
            return out

        hf.torch_chunk_gated_delta_rule = recording
        self.calls = calls
        return self

    def __exit__(self, *exc):
        hf.torch_chunk_gated_delta_rule = self.orig
        for h in self.handles:
            h.remove()
        lin = [i for i, t in enumerate(self.lab.layer_types) if t == "linear_attention"]
        self.recurrence = dict(zip(lin, self.calls))


def plain_hf(lab, inputs):
    assert not lab.is_instrumented
    with HFRecorder(lab) as rec, torch.no_grad():
        logits = lab.model(**inputs, use_cache=False).logits
    return logits, rec


# ------------------------------------------------------------------------- parity
@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_parity_with_plain_hf_capture_off_and_on(tiny, ids, mm_inputs, kind):
    inputs = {"input_ids": ids} if kind == "text" else mm_inputs[kind]
    ref, rec = plain_hf(tiny, inputs)
    with tiny.instrumented():  # instrumented, nothing captured: HF's own forward, bit for bit
        with torch.no_grad():
            off = tiny.model(**inputs, use_cache=False).logits
    assert torch.equal(off, ref)
    tr = tiny.run(inputs, capture="*")
    assert {"deltanet", "attn", "layer"} <= set(tr.meta["ran_instrumented"])  # the instrumented path ran
    assert (tr["logits"] - ref).abs().max() <= TOL
    for i, out in rec.layers.items():  # per layer, so errors that cancel are caught
        assert (tr[f"layers.{i}.resid_post"] - out).abs().max() <= TOL, i
    if kind != "text":
        assert tr["visual.merger.out"].shape[0] == int((inputs["input_ids"] == (
            248056 if kind == "image" else 248057)).sum())
    assert not tiny.is_instrumented


def test_parity_over_twenty_cached_decode_steps(tiny, ids):
    def decode(capture):
        logits, cur, cache = [], ids, DynamicCache(config=tiny.text_config)
        ctx = tiny.trace(capture) if capture else _null()
        with ctx as tr, torch.no_grad():
            for _ in range(21):  # prefill + 20 single-token steps
                out = tiny.model(input_ids=cur, past_key_values=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                cur = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits, 1), tr

    ref, _ = decode(None)
    got, tr = decode(["layers.*.deltanet.*", "layers.*.attn.*", "layers.*.resid_post"])
    assert (got - ref).abs().max() <= TOL
    T = ids.shape[1] + 20
    assert tr["layers.0.deltanet.beta"].shape[1] == T and tr["layers.3.attn.summary"]["entropy"].shape[-1] == T
    assert tr.positions("layers.0.deltanet.g") == list(range(T))


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_captured_gates_equal_hf_projections(tiny, ids):
    _, rec = plain_hf(tiny, {"input_ids": ids})
    tr = tiny.run(ids, capture=["layers.*.deltanet.*"])
    H = tiny.text_config.linear_num_key_heads
    for i, call in rec.recurrence.items():
        torch.testing.assert_close(tr[f"layers.{i}.deltanet.beta"], call["beta"], rtol=0, atol=1e-6)
        torch.testing.assert_close(tr[f"layers.{i}.deltanet.g"], call["g"], rtol=0, atol=1e-6)
        torch.testing.assert_close(tr[f"layers.{i}.deltanet.v"], call["v"], rtol=0, atol=1e-6)
        q = hf.l2norm(call["q"].float())  # HF normalises inside its kernel
        torch.testing.assert_close(tr[f"layers.{i}.deltanet.q"], q, rtol=0, atol=1e-6)
        assert tr[f"layers.{i}.deltanet.k"].shape[2] == H
        z = rec.z[i].reshape(tr[f"layers.{i}.deltanet.z"].shape)
        torch.testing.assert_close(tr[f"layers.{i}.deltanet.z"], z, rtol=0, atol=1e-6)
        assert rel(tr[f"layers.{i}.deltanet.o"], call["o"]) <= TOL
        assert (tr[f"layers.{i}.deltanet.g"] <= 0).all()


def test_state_at_any_position_equals_the_naive_recurrence(tiny, long_ids):
    _, rec = plain_hf(tiny, {"input_ids": long_ids})
    tr = tiny.run(long_ids, capture="layers.*.deltanet.state")
    T = long_ids.shape[1]
    assert T > 2 * 64
    rng = np.random.RandomState(0)
    for i, call in rec.recurrence.items():
        _, _, S = naive_recurrent_gated_delta_rule(call["q"], call["k"], call["v"], call["g"], call["beta"],
                                                   use_qk_l2norm=True, output_states=True)
        assert tr.checkpoint_positions(i) == [0, 64, 128]  # chunk checkpoints, not a trajectory
        for t in [0, 63, 64, 65, T - 1, *rng.randint(0, T, 5)]:
            assert rel(tr.state(i, int(t)), S[:, t]) <= TOL, (i, t)


def test_effective_attention_reconstructs_the_core_output(tiny, long_ids):
    _, rec = plain_hf(tiny, {"input_ids": long_ids})
    tr = tiny.run(long_ids, capture="layers.0.deltanet.state")
    A = tr.effective_attention(0)  # [B, HV, T, T]
    v = rec.recurrence[0]["v"].float()
    o = torch.einsum("bhts,bshv->bthv", A, v)
    assert rel(o, rec.recurrence[0]["o"]) <= TOL
    assert torch.all(A.triu(1) == 0)  # causal
    rows = tr.effective_attention(0, heads=[1], rows=[5, 70])
    torch.testing.assert_close(rows[:, 0], A[:, 1, [5, 70]], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- interventions
def test_zero_beta_changes_logits_and_identity_edit_does_not(tiny, ids):
    base = tiny.run(ids).meta["last_logits"]
    zeroed = tiny.run(ids, edits={"layers.0.deltanet.beta": 0.0}).meta["last_logits"]
    same = tiny.run(ids, edits={"layers.0.deltanet.beta": scale(1.0)}).meta["last_logits"]
    assert (zeroed - base).abs().max() > 1e-3
    assert (same - base).abs().max() <= TOL
    tr = tiny.run(ids, edits={"layers.0.deltanet.beta": zero(heads=[1])}, capture="layers.0.deltanet.beta")
    assert torch.all(tr["layers.0.deltanet.beta"][:, :, 1] == 0) and torch.all(tr["layers.0.deltanet.beta"][:, :, 0] > 0)


def test_zero_beta_means_nothing_is_written(tiny, ids):
    tr = tiny.run(ids, edits={"layers.0.deltanet.beta": 0.0}, capture="layers.0.deltanet.state")
    assert tr.final_state(0).abs().max() == 0


def test_state_overwrite_at_a_position(tiny, ids):
    t = 10
    tr = tiny.run(ids, edits={"layers.0.deltanet.state": zero(positions=[t])}, capture="layers.0.deltanet.state")
    assert tr.state(0, t).abs().max() == 0
    assert tr.state(0, t - 1).abs().max() > 0 and tr.state(0, t + 1).abs().max() > 0
    # after the overwrite, S_{t+1} is one step from zero: exp(g) (I - βkkᵀ) 0 + β k vᵀ
    x = tr.state_inputs(0)
    k, v, beta = x["k"][:, t + 1], x["v"][:, t + 1], x["beta"][:, t + 1]
    expected = beta[..., None, None] * k[..., :, None] * v[..., None, :]
    assert rel(tr.state(0, t + 1), expected) <= TOL


def _all_deltanet_lab(tiny):
    """A one-layer, all-DeltaNet model: the state is the only path from the prefix to the future."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=tiny.text_config.vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, layer_types=["linear_attention"], num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
                            linear_key_head_dim=16, linear_value_head_dim=16, tie_word_embeddings=True,
                            initializer_range=0.5)  # large weights: prompts must visibly differ
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(cfg).eval()
    return ql.Lab(model=model, tokenizer=tiny.tokenizer, processor=None, name="one-layer")


def test_patched_state_reproduces_the_donor_where_it_should(tiny):
    lab = _all_deltanet_lab(tiny)
    suffix = " and then the answer is"
    a = lab.encode("Apples grow on trees in the orchard" + suffix)
    b = lab.encode("My password is hunter two" + suffix)
    n_suffix = lab.encode(suffix).shape[1]
    assert torch.equal(a[0, -n_suffix:], b[0, -n_suffix:]) and n_suffix >= 4
    ta, tb = a.shape[1], b.shape[1]
    donor = lab.run(b, capture="layers.0.deltanet.state")
    base = lab.run(a).meta["last_logits"]
    # Patch S at the last prefix token; the conv window (4) then sees only shared suffix tokens.
    p_a, p_b = ta - n_suffix + 2, tb - n_suffix + 2
    patched = lab.run(a, edits={"layers.0.deltanet.state": patch(donor, positions=[p_a], donor_positions=[p_b])})
    want = donor.meta["last_logits"]
    assert (base - want).abs().max() > 1e-4  # the prompts really differ at the last position
    assert (patched.meta["last_logits"] - want).abs().max() <= TOL
    # In tiny the attention layers also read the prefix: patching DeltaNet states alone does not suffice.
    ta_t = tiny.encode("Apples grow on trees in the orchard" + suffix)
    tb_t = tiny.encode("My password is hunter two" + suffix)
    d = tiny.run(tb_t, capture="layers.*.deltanet.state")
    lin = [i for i, t in enumerate(tiny.layer_types) if t == "linear_attention"]
    e = {f"layers.{i}.deltanet.state": patch(d, positions=[ta_t.shape[1] - n_suffix + 2],
                                             donor_positions=[tb_t.shape[1] - n_suffix + 2]) for i in lin}
    p = tiny.run(ta_t, edits=e).meta["last_logits"]
    assert (p - d.meta["last_logits"]).abs().max() > 1e-4


def test_activation_patching_of_a_residual(tiny, ids):
    other = tiny.encode("A completely different prompt about cooking pasta with tomatoes and basil here")
    donor = tiny.run(other, capture="layers.7.resid_post")
    t_last, d_last = ids.shape[1] - 1, other.shape[1] - 1
    out = tiny.run(ids, edits={"layers.7.resid_post": patch(donor, positions=[t_last], donor_positions=[d_last])})
    # the last layer's residual at the last position fixes the last logits entirely
    torch.testing.assert_close(out.meta["last_logits"], donor.meta["last_logits"], rtol=0, atol=1e-5)


def test_edits_apply_during_generation(tiny, ids):
    plain = tiny.generate(ids, max_new_tokens=6, do_sample=False, capture="logits")
    edited = tiny.generate(ids, max_new_tokens=6, do_sample=False,
                           edits={"layers.*.deltanet.beta": 0.0, "layers.*.attn.gate": 0.0},
                           capture=["layers.0.deltanet.beta", "logits"])
    assert plain.trace["logits"].shape[1] == 6  # one row per generated token
    assert (plain.trace["logits"] - edited.trace["logits"]).abs().amax(-1).min() > 1e-3  # every step moved
    beta = edited.trace["layers.0.deltanet.beta"]
    assert beta.shape[1] == ids.shape[1] + 5 and beta.abs().max() == 0  # prompt and decode steps


def test_generation_capture_matches_a_prefill_of_the_whole_sequence(tiny, ids):
    gen = tiny.generate(ids, max_new_tokens=12, do_sample=False,
                        capture=["layers.0.deltanet.state", "layers.*.deltanet.beta", "layers.3.attn.summary"])
    full = torch.cat([ids, gen.ids], 1)
    ref = tiny.run(full, capture=["layers.0.deltanet.state", "layers.*.deltanet.beta", "layers.3.attn.summary"])
    n = full.shape[1] - 1  # the last generated token is never fed back
    tr = gen.trace
    assert torch.equal(tr.tokens, full)
    assert (tr["layers.4.deltanet.beta"] - ref["layers.4.deltanet.beta"][:, :n]).abs().max() <= TOL
    for t in (0, ids.shape[1] - 1, ids.shape[1] + 3, n - 1):
        assert rel(tr.state(0, t), ref.state(0, t)) <= TOL
    for k, v in tr["layers.3.attn.summary"].items():
        assert (v - ref["layers.3.attn.summary"][k][..., :n]).abs().max() <= 1e-4, k


# ----------------------------------------------------------------- selection & storage
def test_patterns_positions_heads_batch_and_dtype(tiny, ids):
    tr = tiny.run(ids, capture=lambda n: n.endswith(".beta"), positions=[2, 5, 7], heads=[1, 3],
                  dtype=torch.bfloat16)
    beta = tr["layers.0.deltanet.beta"]
    full = tiny.run(ids, capture="layers.0.deltanet.beta")["layers.0.deltanet.beta"]
    assert beta.shape == (1, 3, 2) and beta.dtype == torch.bfloat16
    torch.testing.assert_close(beta.float(), full[:, [2, 5, 7]][:, :, [1, 3]], rtol=1e-2, atol=1e-2)
    assert tr.positions("layers.0.deltanet.beta") == [2, 5, 7]
    names = tiny.probe_names("layers.*.deltanet.beta")
    assert len(names) == tiny.layer_types.count("linear_attention")
    batch = torch.cat([ids, ids.flip(1)], 0)
    tr2 = tiny.run(batch, capture="layers.3.attn.gate", batch=[1])
    assert tr2["layers.3.attn.gate"].shape[0] == 1


def test_probs_rows_only_where_asked(tiny, ids):
    tr = tiny.run(ids, capture="layers.3.attn.probs", positions=[4, 9], heads=[0])
    p = tr["layers.3.attn.probs"]
    assert p.shape == (1, 1, 2, ids.shape[1])
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 1, 2))
    assert torch.all(p[0, 0, 0, 5:] == 0)  # causal: row 4 sees tokens 0–4


def test_save_and_load_roundtrip(tiny, ids, tmp_path):
    tr = tiny.run(ids, capture=["layers.0.deltanet.state", "layers.0.deltanet.beta", "layers.3.attn.summary"])
    tr.save(tmp_path / "tr")
    back = Trace.load(tmp_path / "tr")
    assert torch.equal(back["layers.0.deltanet.beta"], tr["layers.0.deltanet.beta"])
    assert torch.equal(back.state(0, 17), tr.state(0, 17))
    assert back["layers.3.attn.summary"].keys() == tr["layers.3.attn.summary"].keys()
    assert torch.equal(back.tokens, tr.tokens)


# ------------------------------------------------------------------------ bad input
def test_unknown_probe_lists_the_layer_type_probes(tiny, ids):
    with pytest.raises(ValueError, match=r"layer 3 is a full_attention layer, it has no deltanet probes.*layers\.3\.attn\.probs"):
        tiny.run(ids, capture="layers.3.deltanet.beta")
    with pytest.raises(ValueError, match=r"the model has 8 layers"):
        tiny.run(ids, capture="layers.12.attn.q")
    with pytest.raises(ValueError, match=r"matches no probe"):
        tiny.run(ids, capture="layers.*.mamba.*")
    with pytest.raises(ValueError, match=r"layer 0 is a linear_attention layer.*no attn probes"):
        tiny.run(ids, edits={"layers.0.attn.gate": 0.0})


def test_out_of_range_heads_positions_batch(tiny, ids):
    with pytest.raises(IndexError, match=r"head 9 is out of range; valid: 0..3 .*probe 'layers.0.deltanet.beta' has 4 heads"):
        tiny.run(ids, capture="layers.0.deltanet.beta", heads=[9])
    with pytest.raises(IndexError, match=r"position 999 is out of range"):
        tiny.run(ids, capture="layers.0.deltanet.beta", positions=[999])
    with pytest.raises(IndexError, match=r"batch 3 is out of range; valid: 0..0 .*the batch has 1 sequences"):
        tiny.run(ids, capture="layers.0.deltanet.beta", batch=[3])
    tr = tiny.run(ids, capture="layers.0.deltanet.state")
    with pytest.raises(IndexError, match=r"position 500 is out of range"):
        tr.state(0, 500)
    with pytest.raises(KeyError, match=r"state of layer 1 was not captured"):
        tr.state(1, 0)


def test_edit_shape_mismatch_and_read_only(tiny, ids):
    with pytest.raises(ValueError, match=r"edit tensor of shape \(3,\) does not fit probe 'layers.0.deltanet.beta'"):
        tiny.run(ids, edits={"layers.0.deltanet.beta": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"read-only"):
        tiny.run(ids, edits={"layers.3.attn.summary": 0.0})
    with pytest.raises(TypeError, match=r"must be a number, a tensor, a function"):
        tiny.run(ids, edits={"layers.0.deltanet.beta": "zero"})


def test_capture_over_budget_is_refused_before_running(tiny, ids):
    calls = []
    h = tiny.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(MemoryError, match=r"needs about .*over the budget.*Narrow it"):
            tiny.run(ids, capture="logits", budget_bytes=10_000)
    finally:
        h.remove()
    assert not calls
    est = tiny.estimate("logits", ids)
    assert est["total"] == ids.shape[1] * tiny.text_config.vocab_size * 4
    assert not tiny.is_instrumented


def test_truncated_trace_is_refused(tiny, ids, tmp_path):
    tr = tiny.run(ids, capture="layers.0.deltanet.beta")
    tr.save(tmp_path / "t")
    f = tmp_path / "t" / "trace.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"truncated safetensors"):
        Trace.load(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match=r"no trace directory"):
        Trace.load(tmp_path / "nothing")


def test_uninstrument_restores_after_an_exception(tiny, ids):
    with pytest.raises(RuntimeError):
        with tiny.instrumented():
            assert type(tiny.model.model.language_model.layers[0].linear_attn).__name__ == "InstrumentedGatedDeltaNet"
            raise RuntimeError("boom")
    assert type(tiny.model.model.language_model.layers[0].linear_attn) is hf.Qwen3_5GatedDeltaNet
    params = dict(tiny.model.named_parameters())
    tiny.instrument()
    try:
        assert {n: p.data_ptr() for n, p in tiny.model.named_parameters()} == {n: p.data_ptr() for n, p in params.items()}
    finally:
        tiny.uninstrument()


def test_offloaded_model_is_instrumented(tiny, ids, tmp_path):
    lab = ql.load("tiny", dtype="float32", device="auto", max_memory={"cpu": "20MB"},
                  offload_folder=tmp_path / "off")
    ref, _ = plain_hf(tiny, {"input_ids": ids})
    tr = lab.run(ids, capture=["layers.*.deltanet.beta", "layers.0.deltanet.state", "logits"])
    assert (tr["logits"] - ref).abs().max() <= TOL
    assert "deltanet" in tr.meta["ran_instrumented"]
