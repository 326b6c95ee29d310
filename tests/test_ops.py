"""The torch reference ops against independent references.

- The gated delta rule (chunked form, decode step, state replay, effective attention) against a
  per-token recurrence and against transformers' own ``torch_chunk_gated_delta_rule`` /
  ``torch_recurrent_gated_delta_rule``, and inside a real ``Qwen3_5GatedDeltaNet`` forward.
- Attention summaries and rows against a full softmax and against transformers'
  ``eager_attention_forward``.

Tolerance: relative RMS ``||a - b|| / ||b||`` at most 1e-5 in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig

from qwen35_lab import ops
from qwen35_lab.ops import (
    attention_probs_rows,
    attention_summaries,
    chunk_gated_delta_rule,
    deltanet_effective_attention,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_step,
    replay_state,
    replay_states,
)

TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on a busy 2-core machine are faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


GATES = {  # g = -strength * U(0.5, 1.5)
    "weak": 0.001,
    "medium": 0.3,
    "strong": 5.0,
}
BETAS = {  # beta range
    "near0": (0.0, 0.02),
    "uniform": (0.0, 1.0),
    "near1": (0.98, 1.0),
}


def make_inputs(B=2, T=65, H=2, HV=4, K=16, V=8, gate="medium", beta="uniform", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -GATES[gate] * (0.5 + torch.rand(B, T, HV, generator=gen))
    lo, hi = BETAS[beta]
    b = lo + (hi - lo) * torch.rand(B, T, HV, generator=gen)
    state = torch.randn(B, HV, K, V, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, b, state


def hf_chunk(q, k, v, g, beta, state, chunk_size):
    return hf.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=chunk_size, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )


def hf_recurrent(q, k, v, g, beta, state):
    return hf.torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True
    )


# ----------------------------------------------------------------------------- chunked form


@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_chunk_any_length(T, chunk_size):
    q, k, v, g, beta, state = make_inputs(T=T, seed=T + chunk_size)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    o, s, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, initial_state=state)
    assert o.shape == (2, T, 4, 8) and s.shape == (2, 4, 16, 8)
    assert rel(o, o_ref) <= TOL and rel(s, s_ref) <= TOL
    o_hf, s_hf = hf_chunk(q, k, v, g, beta, state, chunk_size)
    assert rel(o_hf, o_ref) <= TOL and rel(s_hf, s_ref) <= TOL


@pytest.mark.parametrize("gate", list(GATES))
@pytest.mark.parametrize("beta_range", list(BETAS))
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)], ids=["HV=H", "HV=2H"])
def test_chunk_gates_betas_heads(gate, beta_range, heads):
    H, HV = heads
    q, k, v, g, beta, state = make_inputs(T=100, H=H, HV=HV, gate=gate, beta=beta_range, seed=HV)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    o, s, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32, initial_state=state)
    assert rel(o, o_ref) <= TOL and rel(s, s_ref) <= TOL
    # the per-token reference is transformers' own recurrence
    o_hf, s_hf = hf_recurrent(q, k, v, g, beta, state)
    assert rel(o_hf, o_ref) <= TOL and rel(s_hf, s_ref) <= TOL
    o_hf, s_hf = hf_chunk(q, k, v, g, beta, state, 32)
    assert rel(o, o_hf) <= TOL and rel(s, s_hf) <= TOL


def test_chunk_zero_initial_state_and_options():
    q, k, v, g, beta, _ = make_inputs(T=70, H=1, HV=3, K=8, V=4)
    o_hf, s_hf = hf.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=False
    )
    o, s, states = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False, scale=8**-0.5)
    assert states is None
    assert rel(o, o_hf) <= TOL and rel(s, s_hf) <= TOL
    o2, s2, _ = chunk_gated_delta_rule(q, k, v, g, beta, output_final_state=False, scale=0.5)
    o2_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, scale=0.5)
    assert s2 is None and rel(o2, o2_ref) <= TOL


def test_chunk_does_not_modify_inputs():
    # H = 1 and T a multiple of chunk_size: layouts where a lazy copy could alias the input
    q, k, v, g, beta, state = make_inputs(T=64, H=1, HV=1)
    before = [x.clone() for x in (q, k, v, g, beta, state)]
    chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_chunk_states=True)
    for x, y in zip((q, k, v, g, beta, state), before):
        assert torch.equal(x, y)


@pytest.mark.parametrize("T,chunk_size", [(65, 16), (130, 32), (128, 64), (5, 64)])
def test_chunk_states_are_states_at_chunk_starts(T, chunk_size):
    q, k, v, g, beta, state = make_inputs(T=T, seed=T)
    _, _, states_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_states=True)
    _, final, chunk_states = chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=chunk_size, initial_state=state, output_chunk_states=True
    )
    NT = math.ceil(T / chunk_size)
    assert chunk_states.shape == (2, NT, 4, 16, 8) and chunk_states.dtype == torch.float32
    assert torch.equal(chunk_states[:, 0], state)
    for i in range(1, NT):
        assert rel(chunk_states[:, i], states_ref[:, i * chunk_size - 1]) <= TOL
    assert rel(final, states_ref[:, -1]) <= TOL


def test_bf16_inputs():
    q, k, v, g, beta, state = make_inputs(T=77, dtype=torch.bfloat16)
    o, s, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32, initial_state=state)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    o_hf, _ = hf_chunk(q, k, v, g, beta, state, 32)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert rel(s, s_ref) <= TOL  # the state never leaves fp32
    assert rel(o, o_ref) <= 1e-2 and rel(o, o_hf) <= 1e-2  # bf16 rounding of the output only


def test_chunk_inside_real_gated_deltanet_layer(monkeypatch):
    """The op sees and reproduces exactly what Qwen3_5GatedDeltaNet feeds its kernel."""
    config = Qwen3_5TextConfig(
        hidden_size=32, num_hidden_layers=1, layer_types=["linear_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64, vocab_size=100,
    )
    torch.manual_seed(0)
    layer = hf.Qwen3_5GatedDeltaNet(config, layer_idx=0).eval()
    seen = {}
    original = hf.torch_chunk_gated_delta_rule

    def spy(query, key, value, g, beta, **kwargs):
        out = original(query, key, value, g=g, beta=beta, **kwargs)
        seen.update(q=query, k=key, v=value, g=g, beta=beta, o=out[0])
        return out

    monkeypatch.setattr(hf, "torch_chunk_gated_delta_rule", spy)
    with torch.no_grad():
        layer(torch.randn(2, 70, 32))
    assert seen, "the layer did not call torch_chunk_gated_delta_rule"
    q, k, v, g, beta = (seen[n] for n in ("q", "k", "v", "g", "beta"))
    o, _, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    assert rel(o, seen["o"]) <= TOL
    A = deltanet_effective_attention(q, k, g, beta)  # [B, HV, T, T]
    assert rel(torch.einsum("bhts,bshv->bthv", A, v), seen["o"]) <= TOL


# ----------------------------------------------------------------------------- decode step


@pytest.mark.parametrize("heads", [(2, 2), (2, 4)], ids=["HV=H", "HV=2H"])
def test_step_matches_naive_in_place(heads):
    H, HV = heads
    q, k, v, g, beta, state0 = make_inputs(T=20, H=H, HV=HV)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state0)
    state = state0.clone()
    ptr = state.data_ptr()
    outs = [recurrent_gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state) for t in range(20)]
    assert state.data_ptr() == ptr
    assert rel(state, s_ref) <= TOL  # the caller's tensor now holds the final state
    assert outs[0].shape == (2, HV, 8)
    assert rel(torch.stack(outs, dim=1), o_ref) <= TOL


def test_step_not_in_place_and_dtypes():
    q, k, v, g, beta, state = make_inputs(T=1, dtype=torch.bfloat16)
    before = state.clone()
    o, new_state = recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, in_place=False)
    assert torch.equal(state, before)
    o_ref, s_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    assert o.dtype == torch.bfloat16 and rel(o, o_ref[:, 0]) <= 1e-2
    assert rel(new_state, s_ref) <= TOL
    with pytest.raises(TypeError, match="float32 state"):
        recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.bfloat16())


# ----------------------------------------------------------------------------- replay


@pytest.mark.parametrize("T,chunk_size", [(130, 32), (70, 64), (33, 16)])
def test_replay_matches_naive(T, chunk_size):
    q, k, v, g, beta, state = make_inputs(T=T, seed=3)
    _, _, states_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_states=True)
    _, _, chunk_states = chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=chunk_size, initial_state=state, output_chunk_states=True
    )
    gen = torch.Generator().manual_seed(T)
    positions = [0, T - 1, chunk_size - 1, chunk_size % T] + torch.randint(0, T, (6,), generator=gen).tolist()
    for t in positions:
        s_t = replay_state(k, v, g, beta, chunk_states, t, chunk_size=chunk_size)
        assert s_t.shape == (2, 4, 16, 8)
        assert rel(s_t, states_ref[:, t]) <= TOL, t
    batch = replay_states(k, v, g, beta, chunk_states, positions, chunk_size=chunk_size)
    assert batch.shape == (2, len(positions), 4, 16, 8)
    assert rel(batch, states_ref[:, positions]) <= TOL


def test_replay_errors():
    q, k, v, g, beta, _ = make_inputs(T=40)
    _, _, chunk_states = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, output_chunk_states=True)
    for t in (40, -1):
        with pytest.raises(ValueError, match=r"valid token positions for T = 40 are 0 \.\.\. 39"):
            replay_state(k, v, g, beta, chunk_states, t, chunk_size=16)
    with pytest.raises(TypeError, match="t must be an int"):
        replay_state(k, v, g, beta, chunk_states, 3.0, chunk_size=16)
    with pytest.raises(ValueError, match="chunk_states has shape"):
        replay_state(k, v, g, beta, chunk_states, 3, chunk_size=64)  # states were made with 16


# ----------------------------------------------------------------------------- effective attention


def brute_force_A(q, k, g, beta, head, t, s):
    """``scale * beta_s * k_sᵀ M_{s+1} … M_t q_t`` with explicit K × K matrices (batch 0)."""
    H, HV, K = k.shape[2], g.shape[2], k.shape[3]
    kh = head // (HV // H)
    qn = hf.l2norm(q[0, :, kh].double()) * K**-0.5
    kn = hf.l2norm(k[0, :, kh].double())
    w = qn[t]
    for r in range(t, s, -1):  # apply M_t first
        M = math.exp(g[0, r, head].item()) * (torch.eye(K, dtype=torch.float64) - beta[0, r, head].item() * torch.outer(kn[r], kn[r]))
        w = M @ w
    return (beta[0, s, head].item() * kn[s] @ w).item()


@pytest.mark.parametrize("T,chunk_size", [(65, 16), (100, 64), (7, 32)])
@pytest.mark.parametrize("heads", [(2, 2), (2, 4)], ids=["HV=H", "HV=2H"])
def test_effective_attention_reconstructs_output(T, chunk_size, heads):
    H, HV = heads
    q, k, v, g, beta, state = make_inputs(T=T, H=H, HV=HV, seed=T)
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta)
    A = deltanet_effective_attention(q, k, g, beta, chunk_size=chunk_size)
    assert A.shape == (2, HV, T, T)
    assert rel(torch.einsum("bhts,bshv->bthv", A, v), o_ref) <= TOL
    assert torch.all(A.triu(1) == 0)  # causal: no weight on future tokens
    # with an initial state, the state query reads it
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state)
    A, state_query = deltanet_effective_attention(q, k, g, beta, chunk_size=chunk_size, return_state_query=True)
    rebuilt = torch.einsum("bhts,bshv->bthv", A, v) + torch.einsum("bhtk,bhkv->bthv", state_query, state)
    assert rel(rebuilt, o_ref) <= TOL


def test_effective_attention_matches_product_formula_and_selection():
    q, k, v, g, beta, _ = make_inputs(T=50, H=2, HV=4, gate="medium", beta="near1", seed=5)
    heads, rows = [3, 0], [49, 0, 17, 31, 32]
    A = deltanet_effective_attention(q, k, g, beta, heads=heads, rows=rows, chunk_size=16)
    assert A.shape == (2, 2, 5, 50)
    full = deltanet_effective_attention(q, k, g, beta, chunk_size=16)
    assert torch.allclose(A, full[:, heads][:, :, rows], rtol=1e-5, atol=1e-7)
    for hi, head in enumerate(heads):
        for ri, t in enumerate(rows):
            for s in sorted({0, t // 2, max(t - 1, 0), t}):
                expected = brute_force_A(q, k, g, beta, head, t, s)
                assert abs(A[0, hi, ri, s].item() - expected) <= 1e-5 * (1 + abs(expected)), (head, t, s)


def test_decay_only_heuristic_is_not_exact():
    """``beta_s exp(Σ_{s<r<=t} g_r) q_tᵀ k_s`` (decay-only attribution) ignores the erasures
    ``-beta_r k_r k_rᵀ`` of later writes; with strong writes it misses the output badly."""
    q, k, v, g, beta, _ = make_inputs(B=1, T=64, H=1, HV=1, K=8, V=4, gate="weak", beta="near1", seed=7)
    o_ref, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta)
    A = deltanet_effective_attention(q, k, g, beta)
    exact_error = rel(torch.einsum("bhts,bshv->bthv", A, v), o_ref)

    qn, kn = hf.l2norm(q[0, :, 0]) * 8**-0.5, hf.l2norm(k[0, :, 0])  # [T, K]
    G = g[0, :, 0].cumsum(0)
    decay = (G[:, None] - G[None, :]).exp().tril()  # exp(Σ_{s<r<=t} g_r)
    heuristic = (qn @ kn.T) * decay * beta[0, :, 0][None, :]  # [T, T]
    heuristic_error = rel(torch.einsum("ts,sv->tv", heuristic, v[0, :, 0]), o_ref[0, :, 0])
    assert exact_error <= TOL
    assert heuristic_error > 0.3  # measured 1.77
    assert heuristic_error > 1e4 * exact_error


# ----------------------------------------------------------------------------- attention


def reference_probs(q, k, scaling, key_padding_mask=None):
    """Full softmax(q kᵀ · scaling + causal mask), queries = the last T of Tk positions."""
    B, Hq, T, D = q.shape
    Tk = k.shape[2]
    kk = hf.repeat_kv(k, Hq // k.shape[1])
    logits = (q.double() @ kk.double().transpose(-1, -2)) * scaling
    allowed = torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def reference_summaries(probs, T, Tk):
    """Rows that see no key have NaN probabilities and NaN summaries."""
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    distance = (torch.arange(Tk - T, Tk)[:, None] - torch.arange(Tk)[None, :]).double()
    undefined = probs.isnan().any(-1)
    return {
        "entropy": torch.where(undefined, float("nan"), -plogp.sum(-1)),
        "max_prob": probs.amax(-1),
        "sink_mass": probs[..., 0],
        "mean_distance": (probs * distance).sum(-1),
    }


ATTENTION_CASES = {
    # name: (B, Hq, Hkv, T, Tk, D, block_size, padded keys in batch row 1)
    "mha": (1, 2, 2, 40, 40, 16, 16, 0),
    "gqa_tail_block": (2, 4, 2, 37, 37, 8, 16, 0),
    "gqa_padding": (2, 4, 1, 33, 33, 8, 8, 3),
    "padding_spans_blocks": (2, 2, 1, 21, 21, 8, 4, 9),
    "decode_cache": (2, 4, 2, 5, 40, 8, 16, 3),
    "one_block": (1, 2, 1, 10, 10, 8, 256, 0),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_summaries_and_rows(case):
    B, Hq, Hkv, T, Tk, D, block_size, padded = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(Tk)
    q = 2 * torch.randn(B, Hq, T, D, generator=gen)
    k = 2 * torch.randn(B, Hkv, Tk, D, generator=gen)
    mask = None
    if padded:  # batch row 1 is left-padded: no sink there, and its first queries may see no key
        mask = torch.ones(B, Tk, dtype=torch.long)
        mask[1, :padded] = 0
    probs = reference_probs(q, k, D**-0.5, mask)
    expected = reference_summaries(probs, T, Tk)
    got = attention_summaries(q, k, key_padding_mask=mask, block_size=block_size)
    assert set(got) == {"entropy", "max_prob", "sink_mass", "mean_distance"}
    for name, value in got.items():
        assert value.shape == (B, Hq, T) and value.dtype == torch.float32
        assert torch.allclose(value.double(), expected[name], rtol=1e-5, atol=1e-5, equal_nan=True), name
    if padded:
        sink = got["sink_mass"][1]
        assert torch.all((sink == 0) | sink.isnan()) and not sink[:, -1].isnan().any()
    rows = attention_probs_rows(q, k, key_padding_mask=mask)
    assert rows.shape == (B, Hq, T, Tk)
    assert torch.allclose(rows.double(), probs, atol=1e-6, equal_nan=True)
    some = attention_probs_rows(q, k, heads=[Hq - 1, 0], rows=[T - 1, 0], key_padding_mask=mask)
    assert torch.allclose(some, rows[:, [Hq - 1, 0]][:, :, [T - 1, 0]], atol=1e-7, equal_nan=True)


def test_attention_bf16_inputs():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 30, 16, generator=gen).bfloat16()
    k = torch.randn(1, 2, 30, 16, generator=gen).bfloat16()
    probs = reference_probs(q.float(), k.float(), 0.25)  # logits in fp32 from the bf16 values
    expected = reference_summaries(probs, 30, 30)
    got = attention_summaries(q, k, block_size=8)
    for name, value in got.items():
        assert value.dtype == torch.float32
        assert torch.allclose(value.double(), expected[name], rtol=1e-5, atol=1e-5), name
    assert torch.allclose(attention_probs_rows(q, k).double(), probs, atol=1e-6)


def test_attention_matches_hf_eager():
    B, Hq, Hkv, T, Tk, D = 2, 4, 2, 6, 20, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, Tk, D, generator=gen)
    v = torch.randn(B, Hkv, Tk, D, generator=gen)
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, :4] = 0
    allowed = torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T)[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(B, 1, T, Tk).masked_fill(~allowed, torch.finfo(torch.float32).min)

    class Module(torch.nn.Module):
        num_key_value_groups = Hq // Hkv

    _, weights = hf.eager_attention_forward(Module().eval(), q, k, v, additive, scaling=D**-0.5)
    assert torch.allclose(attention_probs_rows(q, k, key_padding_mask=mask), weights, atol=1e-6)
    s = attention_summaries(q, k, key_padding_mask=mask, block_size=4)
    assert torch.allclose(s["max_prob"], weights.amax(-1), atol=1e-6)
    assert torch.allclose(s["sink_mass"], weights[..., 0], atol=1e-6)


def test_attention_row_without_keys_is_nan():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    mask = torch.tensor([[0, 0, 1, 1]])  # queries 0 and 1 see only padding
    s = attention_summaries(q, k, key_padding_mask=mask, block_size=2)
    for value in s.values():
        assert torch.isnan(value[..., :2]).all() and not torch.isnan(value[..., 2:]).any()
    rows = attention_probs_rows(q, k, key_padding_mask=mask)
    assert torch.isnan(rows[..., :2, :]).all()
    assert torch.allclose(rows[..., 2:, :].sum(-1), torch.ones(1, 2, 2))


# ----------------------------------------------------------------------------- validation


def _good():
    q, k, v, g, beta, state = make_inputs(B=1, T=8, H=2, HV=4, K=4, V=3)
    return dict(q=q, k=k, v=v, g=g, beta=beta), state


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(q=a["q"][0]), ValueError, r"q must have shape \[B, T, H, K\] \(4 dims\), got shape \(8, 2, 4\)"),
        (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, r"q has shape .* expected \[B, T, H, K\] like k"),
        (lambda a: a.update(v=a["v"][:, :, :3]), ValueError, r"HV = 3 .* must be a multiple of the number of key heads H = 2"),
        (lambda a: a.update(v=a["v"][:, :5]), ValueError, r"v has shape \(1, 5, 4, 3\)"),
        (lambda a: a.update(g=a["g"][:, :, :2]), ValueError, r"g has shape \(1, 8, 2\), expected \[B, T, HV\] = \(1, 8, 4\)"),
        (lambda a: a.update(beta=a["beta"][..., None]), ValueError, r"beta must have shape \[B, T, HV\]"),
        (lambda a: a.update(q=a["q"].long()), TypeError, "q must be a floating-point tensor"),
        (lambda a: a.update(k=a["k"].numpy()), TypeError, "k must be a torch.Tensor"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be an int >= 1, got 0"),
        (lambda a: a.update(scale=-1.0), ValueError, "scale must be a positive number"),
        (lambda a: a.update(initial_state=torch.zeros(1, 4, 4, 4)), ValueError, r"initial_state has shape \(1, 4, 4, 4\), expected \[B, HV, K, V\] = \(1, 4, 4, 3\)"),
    ],
)
def test_chunk_input_errors(change, error, match):
    args, _ = _good()
    change(args)
    with pytest.raises(error, match=match):
        chunk_gated_delta_rule(**args)


def test_other_gated_delta_errors():
    args, state = _good()
    q, k, g, beta = args["q"], args["k"], args["g"], args["beta"]
    with pytest.raises(ValueError, match=r"heads contains 4, valid value heads for HV = 4 are 0 \.\.\. 3"):
        deltanet_effective_attention(q, k, g, beta, heads=[4])
    with pytest.raises(ValueError, match=r"rows contains 8, valid query positions for T = 8"):
        deltanet_effective_attention(q, k, g, beta, rows=[0, 8])
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        deltanet_effective_attention(q, k, g, beta, chunk_size=-4)
    with pytest.raises(ValueError, match=r"state has shape \(1, 4, 4, 4\), expected \[B, HV, K, V\] = \(1, 4, 4, 3\)"):
        recurrent_gated_delta_step(q[:, 0], k[:, 0], args["v"][:, 0], g[:, 0], beta[:, 0], torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"q must have shape \[B, H, K\]"):
        recurrent_gated_delta_step(q, k[:, 0], args["v"][:, 0], g[:, 0], beta[:, 0], state)
    with pytest.raises(ValueError, match="at least one token"):
        naive_recurrent_gated_delta_rule(q[:, :0], k[:, :0], args["v"][:, :0], g[:, :0], beta[:, :0])


def test_attention_errors():
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=r"Hq = 4 .* multiple of the number of key heads Hkv = 3"):
        attention_summaries(q, torch.randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match=r"1 <= T <= Tk"):
        attention_summaries(q, k[:, :, :4])
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 5, 4\), expected \[B, Hkv, Tk, D\]"):
        attention_probs_rows(q, k[..., :4])
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 4\), expected \[B, Tk\] = \(1, 5\)"):
        attention_summaries(q, k, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        attention_summaries(q, k, block_size=0)
    with pytest.raises(ValueError, match=r"heads contains 4, valid query heads for Hq = 4"):
        attention_probs_rows(q, k, heads=[4])
    with pytest.raises(ValueError, match=r"q must have shape \[B, Hq, T, D\]"):
        attention_probs_rows(q[0], k)


def test_public_names_run_the_torch_references_on_cpu():
    """On CPU tensors the dispatched public ops are the torch references (bit for bit)."""
    from qwen35_lab.ops import attention, gated_delta

    assert ops.chunk_gated_delta_rule.__wrapped__ is gated_delta.chunk_gated_delta_rule
    torch.manual_seed(0)
    q, k = torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8)
    v, g, beta = torch.randn(1, 20, 2, 8), -torch.rand(1, 20, 2), torch.rand(1, 20, 2)
    a = ops.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    b = gated_delta.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    qa, ka = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    sa, sb = ops.attention_summaries(qa, ka), attention.attention_summaries(qa, ka)
    assert all(torch.equal(sa[n], sb[n]) for n in sa)