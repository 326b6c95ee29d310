"""The Triton kernels against the torch references, the per-token recurrence and a full softmax.

CI has no GPU: the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) in one worker
process that this module starts (``interpreter`` fixture), so the interpreter never reaches the other
test modules of the same pytest run. The interpreter computes bf16 wrong and needs a single autotune
configuration (the kernels give it one): the kernels are checked in fp32 and fp16, at small shapes.
A second worker, without the interpreter, compiles every kernel for an H100 (sm_90) to prove the
GPU path builds.

Tolerances are relative RMS ``||a - b|| / ||b||``: 1e-5 in fp32 (the interpreter multiplies fp32
exactly, like the torch reference) and 5e-3 in fp16 (the kernels then keep half scratch tensors and
multiply half operands, as they do on a GPU).

In this process: the dispatch (``QWEN35_LAB_OPS``, CPU tensors to torch, the fallback for what a
kernel does not cover) and that ``qwen35_lab`` imports and runs on CPU without triton.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import os
import subprocess
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from qwen35_lab import ops
from qwen35_lab.ops import attention as attention_torch
from qwen35_lab.ops import dispatch
from qwen35_lab.ops import gated_delta as gated_delta_torch

TOL = {torch.float32: 1e-5, torch.float16: 5e-3}
ROOT = Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- workers


def _start_worker() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy's 0 / 0 on rows that see no key


def _worker(environment: dict):
    """A one-process pool started with ``environment`` set, and ``call(fn, *args)`` to run in it.

    The worker must see ``TRITON_INTERPRET`` when it first imports triton (which it does while it
    imports this module): triton's own library functions are made interpreted or compiled then.
    """
    saved = {name: os.environ.get(name) for name in environment}
    spawn = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=spawn, initializer=_start_worker)
    try:
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        pool.submit(os.getpid).result(timeout=300)  # the worker starts now, with this environment
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return pool, lambda fn, *args: pool.submit(fn, *args).result(timeout=900)


@pytest.fixture(scope="module")
def interpreter():
    """``interpreter(fn, *args)`` runs ``fn`` in the worker that has ``TRITON_INTERPRET=1``."""
    pool, call = _worker({"TRITON_INTERPRET": "1", "QWEN35_LAB_OPS": "triton"})
    with pool:
        yield call


# ----------------------------------------------------------------------------- inputs (in the worker)

GATES = {"weak": 0.001, "medium": 0.3, "strong": 5.0}  # g = -strength * U(0.5, 1.5)
BETAS = {"near0": (0.0, 0.02), "uniform": (0.0, 1.0), "near1": (0.98, 1.0)}


def _gated_delta_inputs(B, T, H, HV, K, V, gate, beta_range, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen).to(dtype)
    k = torch.randn(B, T, H, K, generator=gen).to(dtype)
    v = torch.randn(B, T, HV, V, generator=gen).to(dtype)
    g = -GATES[gate] * (0.5 + torch.rand(B, T, HV, generator=gen))
    lo, hi = BETAS[beta_range]
    beta = lo + (hi - lo) * torch.rand(B, T, HV, generator=gen)
    state = torch.randn(B, HV, K, V, generator=gen)
    return q, k, v, g, beta, state


# ----------------------------------------------------------------------------- chunked gated delta rule

CHUNK_CASES = {
    # name: (B, T, H, HV, K, V, chunk_size, gate, beta, initial state, dtype)
    "fp32_tail_hv2h": (2, 70, 1, 2, 16, 16, 64, "medium", "uniform", True, torch.float32),
    "fp32_chunk16_strong": (1, 50, 2, 2, 32, 16, 16, "strong", "uniform", True, torch.float32),
    "fp32_chunk32_weak_beta1_hv3h": (1, 45, 1, 3, 16, 32, 32, "weak", "near1", False, torch.float32),
    "fp32_whole_chunks_v80": (1, 128, 2, 4, 32, 80, 64, "medium", "near0", True, torch.float32),
    "fp32_one_token": (2, 1, 2, 2, 16, 16, 64, "strong", "uniform", True, torch.float32),
    "fp16_tail_hv2h": (1, 100, 2, 4, 32, 32, 64, "medium", "uniform", True, torch.float16),
    "fp16_chunk32_strong": (1, 40, 1, 1, 64, 16, 32, "strong", "near1", True, torch.float16),
}


def _chunk_errors(case: str) -> dict:
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    from qwen35_lab._kernels.gated_delta_chunk import chunk_gated_delta_rule

    B, T, H, HV, K, V, C, gate, beta_range, with_state, dtype = CHUNK_CASES[case]
    q, k, v, g, beta, state = _gated_delta_inputs(B, T, H, HV, K, V, gate, beta_range, dtype, seed=T + C)
    state = state if with_state else None
    before = [x.clone() for x in (q, k, v, g, beta, state) if x is not None]
    o, final, chunks = chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=C, initial_state=state, output_chunk_states=True
    )
    unchanged = all(torch.equal(x, y) for x, y in zip([x for x in (q, k, v, g, beta, state) if x is not None], before))
    o_ref, final_ref, chunks_ref = gated_delta_torch.chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=C, initial_state=state, output_chunk_states=True
    )
    o_naive, _, states = gated_delta_torch.naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=state, output_states=True
    )
    start = torch.zeros(B, HV, K, V) if state is None else state
    chunks_naive = torch.stack([start] + [states[:, i * C - 1] for i in range(1, math.ceil(T / C))], dim=1)
    # transformers' own recurrence takes one key head per value head
    G = HV // H
    o_hf, final_hf = torch_recurrent_gated_delta_rule(
        q.repeat_interleave(G, 2), k.repeat_interleave(G, 2), v, g, beta, initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    return {
        "shapes": (tuple(o.shape), tuple(final.shape), tuple(chunks.shape)),
        "dtypes": (o.dtype, final.dtype, chunks.dtype),
        "inputs_unchanged": unchanged,
        "o_vs_torch": rel(o, o_ref), "final_vs_torch": rel(final, final_ref),
        "chunks_vs_torch": rel(chunks, chunks_ref),
        "o_vs_naive": rel(o, o_naive), "final_vs_naive": rel(final, states[:, -1]),
        "chunks_vs_naive": rel(chunks, chunks_naive), "o_vs_hf": rel(o, o_hf), "final_vs_hf": rel(final, final_hf),
    }


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunk_kernel_matches_references(interpreter, case):
    B, T, H, HV, K, V, C, *_, dtype = CHUNK_CASES[case]
    got = interpreter(_chunk_errors, case)
    NT = math.ceil(T / C)
    assert got["shapes"] == ((B, T, HV, V), (B, HV, K, V), (B, NT, HV, K, V))
    assert got["dtypes"] == (dtype, torch.float32, torch.float32)
    assert got["inputs_unchanged"]
    errors = {name: value for name, value in got.items() if "_vs_" in name}
    assert max(errors.values()) <= TOL[dtype], errors


def _chunk_option_results() -> dict:
    from qwen35_lab._kernels.gated_delta_chunk import chunk_gated_delta_rule

    q, k, v, g, beta, _ = _gated_delta_inputs(1, 70, 1, 3, 8, 4, "medium", "uniform", torch.float32, seed=5)
    out = {}
    # no L2 norm, a given scale, nothing but the output
    o, final, chunks = chunk_gated_delta_rule(
        q, k, v, g, beta, use_qk_l2norm=False, scale=0.5, output_final_state=False
    )
    o_ref, _ = gated_delta_torch.naive_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=False, scale=0.5)
    out["plain"] = (final is None, chunks is None, rel(o, o_ref))
    # one sequence, then the same sequence in two calls carrying the state
    o, final, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=32)
    o1, s1, _ = chunk_gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37], chunk_size=32)
    o2, s2, _ = chunk_gated_delta_rule(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], chunk_size=32,
                                       initial_state=s1)
    out["split"] = (rel(torch.cat([o1, o2], 1), o), rel(s2, final))
    return out


def test_chunk_kernel_options_and_carried_state(interpreter):
    got = interpreter(_chunk_option_results)
    no_final, no_chunks, error = got["plain"]
    assert no_final and no_chunks and error <= TOL[torch.float32]
    assert max(got["split"]) <= TOL[torch.float32]


# ----------------------------------------------------------------------------- decode step


def _step_errors(H: int, HV: int, dtype) -> dict:
    from qwen35_lab._kernels.gated_delta_step import recurrent_gated_delta_step

    T = 6
    q, k, v, g, beta, state0 = _gated_delta_inputs(2, T, H, HV, 16, 40, "medium", "uniform", dtype, seed=HV)
    o_ref, s_ref = gated_delta_torch.naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state0)
    state = state0.clone()
    ptr = state.data_ptr()
    outs = [recurrent_gated_delta_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state) for t in range(T)]
    out = {"same_tensor": state.data_ptr() == ptr, "o_dtype": outs[0].dtype, "o_shape": tuple(outs[0].shape),
           "o_vs_naive": rel(torch.stack(outs, 1), o_ref), "state_vs_naive": rel(state, s_ref)}
    # not in place, from a transposed (non-contiguous) state; then in place on such a state
    strided = state0.transpose(2, 3).contiguous().transpose(2, 3)
    o1, new = recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], strided, in_place=False)
    o_ref1, s_ref1 = gated_delta_torch.naive_recurrent_gated_delta_rule(
        q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=state0
    )
    out["untouched"] = torch.equal(strided, state0)
    o2 = recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], strided)
    out["copy_vs_naive"] = max(rel(o1, o_ref1[:, 0]), rel(new, s_ref1), rel(o2, o_ref1[:, 0]), rel(strided, s_ref1))
    try:
        recurrent_gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state0.half())
        out["half_state_error"] = None
    except TypeError as e:
        out["half_state_error"] = str(e)
    return out


@pytest.mark.parametrize("H,HV,dtype", [(2, 2, torch.float32), (1, 4, torch.float32), (2, 4, torch.float16)])
def test_step_kernel_matches_the_recurrence(interpreter, H, HV, dtype):
    got = interpreter(_step_errors, H, HV, dtype)
    assert got["same_tensor"] and got["untouched"]
    assert got["o_dtype"] == dtype and got["o_shape"] == (2, HV, 40)
    assert max(got["o_vs_naive"], got["state_vs_naive"], got["copy_vs_naive"]) <= TOL[dtype], got
    assert "float32 state" in got["half_state_error"]


# ----------------------------------------------------------------------------- attention

ATTENTION_CASES = {
    # name: (B, Hq, Hkv, T, Tk, D, padded keys in batch row 1, dtype)
    "mha": (1, 2, 2, 40, 40, 16, 0, torch.float32),
    "gqa_long_keys": (1, 4, 2, 70, 150, 32, 0, torch.float32),
    "gqa_padding": (2, 4, 1, 33, 33, 8, 3, torch.float32),
    "padding_longer_than_a_query_block": (2, 2, 1, 90, 90, 8, 70, torch.float32),
    "decode_with_cache": (2, 4, 2, 5, 40, 8, 3, torch.float32),
    "fp16": (2, 4, 2, 37, 37, 16, 5, torch.float16),
}


def _full_softmax(q, k, scaling, mask):
    """softmax(q kᵀ · scaling) with the causal and padding masks, in float64 from the given values."""
    T, Tk = q.shape[2], k.shape[2]
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scaling
    allowed = torch.ones(T, Tk, dtype=torch.bool).tril(Tk - T)[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1)


def _attention_results(case: str) -> dict:
    from qwen35_lab._kernels.attention_summary import attention_probs_rows, attention_summaries

    B, Hq, Hkv, T, Tk, D, padded, dtype = ATTENTION_CASES[case]
    gen = torch.Generator().manual_seed(Tk)
    q = (2 * torch.randn(B, Hq, T, D, generator=gen)).to(dtype)
    k = (2 * torch.randn(B, Hkv, Tk, D, generator=gen)).to(dtype)
    mask = None
    if padded:  # batch row 1 is left-padded: no sink there, and its first queries may see no key
        mask = torch.ones(B, Tk, dtype=torch.long)
        mask[1, :padded] = 0
    probs = _full_softmax(q, k, D**-0.5, mask)
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    distance = (torch.arange(Tk - T, Tk)[:, None] - torch.arange(Tk)[None, :]).double()
    expected = {
        "entropy": torch.where(probs.isnan().any(-1), float("nan"), -plogp.sum(-1)),
        "max_prob": probs.amax(-1), "sink_mass": probs[..., 0], "mean_distance": (probs * distance).sum(-1),
    }
    got = attention_summaries(q, k, key_padding_mask=mask)
    reference = attention_torch.attention_summaries(q, k, key_padding_mask=mask, block_size=16)
    heads, rows = [Hq - 1, 0], [T - 1, 0, T // 2]
    some = attention_probs_rows(q, k, heads=heads, rows=rows, key_padding_mask=mask)
    every = attention_probs_rows(q, k, key_padding_mask=mask)
    return {
        "keys": sorted(got), "shapes": {n: (tuple(x.shape), x.dtype) for n, x in got.items()},
        "summaries": {n: (got[n], expected[n], reference[n]) for n in got},
        "rows": (some, probs[:, heads][:, :, rows]), "every": (every, probs),
    }


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-5, atol=atol, equal_nan=True)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_kernels_match_a_full_softmax(interpreter, case):
    B, Hq, Hkv, T, Tk, D, padded, dtype = ATTENTION_CASES[case]
    got = interpreter(_attention_results, case)
    assert got["keys"] == ["entropy", "max_prob", "mean_distance", "sink_mass"]
    for name, (value, expected, reference) in got["summaries"].items():
        assert got["shapes"][name] == ((B, Hq, T), torch.float32)
        assert _close(value, expected, 1e-5), name  # against float64 softmax
        assert _close(value, reference, 1e-5), name  # against the torch reference
        assert torch.equal(value.isnan(), expected.isnan()), name  # NaN exactly where no key is seen
    if padded:
        sink = got["summaries"]["sink_mass"][0][1]
        assert torch.all((sink == 0) | sink.isnan()) and not sink[:, -1].isnan().any()
    some, expected = got["rows"]
    assert some.shape == (B, 2, 3, Tk) and _close(some, expected, 1e-6)
    every, probs = got["every"]
    assert every.shape == (B, Hq, T, Tk) and _close(every, probs, 1e-6)


# ----------------------------------------------------------------------------- the public ops run the kernels


def _dispatch_results() -> dict:
    """With QWEN35_LAB_OPS=triton the public ops call the kernels; with torch they do not."""
    import importlib
    from unittest import mock

    names = {
        "chunk_gated_delta_rule": "gated_delta_chunk", "recurrent_gated_delta_step": "gated_delta_step",
        "attention_summaries": "attention_summary", "attention_probs_rows": "attention_summary",
    }
    q, k, v, g, beta, state = _gated_delta_inputs(1, 20, 1, 2, 16, 16, "medium", "uniform", torch.float32, seed=1)
    qa, ka = torch.randn(1, 2, 12, 16), torch.randn(1, 1, 12, 16)
    calls = {
        "chunk_gated_delta_rule": lambda: ops.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)[0],
        "recurrent_gated_delta_step": lambda: ops.recurrent_gated_delta_step(
            q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state.clone()),
        "attention_summaries": lambda: ops.attention_summaries(qa, ka)["entropy"],
        "attention_probs_rows": lambda: ops.attention_probs_rows(qa, ka, rows=[3]),
    }
    out = {}
    for mode in ("triton", "torch"):
        os.environ["QWEN35_LAB_OPS"] = mode
        for name, module in names.items():
            kernels = importlib.import_module(f"qwen35_lab._kernels.{module}")
            with mock.patch.object(kernels, name, wraps=getattr(kernels, name)) as spy:
                result = calls[name]()
            out[(mode, name)] = (spy.call_count, result)
    os.environ["QWEN35_LAB_OPS"] = "triton"
    return out


def test_public_ops_run_the_kernels_when_asked(interpreter):
    got = interpreter(_dispatch_results)
    for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_step", "attention_summaries", "attention_probs_rows"):
        kernel_calls, with_kernel = got[("triton", name)]
        torch_calls, with_torch = got[("torch", name)]
        assert (kernel_calls, torch_calls) == (1, 0), name
        assert rel(with_kernel, with_torch) <= TOL[torch.float32], name


def _kernel_limit_errors() -> dict:
    from qwen35_lab._kernels.attention_summary import attention_summaries
    from qwen35_lab._kernels.gated_delta_chunk import chunk_gated_delta_rule

    q, k, v, g, beta, _ = _gated_delta_inputs(1, 8, 1, 1, 8, 4, "medium", "uniform", torch.float32, seed=0)
    attempts = {
        "chunk_size": lambda: chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=48),
        "K": lambda: chunk_gated_delta_rule(torch.randn(1, 8, 1, 300), torch.randn(1, 8, 1, 300), v, g, beta),
        "dtype": lambda: chunk_gated_delta_rule(q.double(), k.double(), v.double(), g, beta),
        "D": lambda: attention_summaries(torch.randn(1, 1, 4, 512), torch.randn(1, 1, 4, 512)),
        "shape": lambda: chunk_gated_delta_rule(q, k[:, :5], v, g, beta),  # a plain bad input
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = None
        except Exception as e:  # noqa: BLE001 - the test inspects what was raised
            out[name] = (type(e).__name__, isinstance(e, dispatch.UnsupportedByKernel), isinstance(e, ValueError),
                         isinstance(e, TypeError), str(e))
    return out


def test_kernel_limits_raise_before_any_work(interpreter):
    got = interpreter(_kernel_limit_errors)
    for name in ("chunk_size", "K", "dtype", "D"):
        _, unsupported, is_value_error, _, message = got[name]
        assert unsupported and is_value_error and "QWEN35_LAB_OPS=torch" in message, got[name]
    assert "chunk_size 16, 32, 64, got 48" in got["chunk_size"][-1]
    assert "K <= 256, got K = 300" in got["K"][-1]
    assert "torch.float64" in got["dtype"][-1]
    name, unsupported, is_value_error, _, message = got["shape"]
    assert is_value_error and not unsupported and "q has shape (1, 8, 1, 8), expected [B, T, H, K] like k" in message


def _instrumented_results() -> dict:
    """The `tiny` organism captured with the torch ops and with the kernels (through the instrumented modules)."""
    from unittest import mock

    import qwen35_lab as ql
    from qwen35_lab._kernels import attention_summary, gated_delta_chunk

    lab = ql.load("tiny", dtype="float32", device="cpu")
    ids = lab.encode("The Gated DeltaNet writes keys and values into a matrix state and reads it. " * 2)
    capture = ["layers.0.deltanet.state", "layers.3.attn.summary", "layers.3.attn.probs"]
    T = ids.shape[1]
    seen = {}
    with mock.patch.object(gated_delta_chunk, "chunk_gated_delta_rule",
                           wraps=gated_delta_chunk.chunk_gated_delta_rule) as chunk_spy, \
            mock.patch.object(attention_summary, "attention_summaries",
                              wraps=attention_summary.attention_summaries) as summary_spy:
        for mode in ("torch", "triton"):
            os.environ["QWEN35_LAB_OPS"] = mode
            trace = lab.run(ids, capture=capture, positions=[3, T - 1])
            calls = (chunk_spy.call_count, summary_spy.call_count)
            summary = trace["layers.3.attn.summary"]
            seen[mode] = {  # states between chunk checkpoints are replayed, by the same ops
                "state": torch.stack([trace.state(0, t) for t in (0, 10, T - 1)]),
                "summary": torch.stack([summary[n] for n in ("entropy", "max_prob", "sink_mass", "mean_distance")]),
                "probs": trace["layers.3.attn.probs"], "logits": trace.meta["last_logits"], "calls": calls,
            }
    os.environ["QWEN35_LAB_OPS"] = "triton"
    return {
        "calls": (seen["torch"]["calls"], seen["triton"]["calls"]),
        "errors": {name: rel(seen["triton"][name], seen["torch"][name])
                   for name in ("state", "summary", "probs", "logits")},
    }


def test_instrumented_model_gets_the_kernels(interpreter):
    got = interpreter(_instrumented_results)
    torch_calls, triton_calls = got["calls"]
    assert torch_calls == (0, 0) and triton_calls[0] >= 1 and triton_calls[1] == 1, got["calls"]
    assert max(got["errors"].values()) <= TOL[torch.float32], got["errors"]


# ----------------------------------------------------------------------------- GPU build


def _compile_for_h100() -> dict:
    """Compile every kernel to an sm_90 cubin (no GPU needed); return the kernels and their sizes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qwen35_lab._kernels import attention_summary as att
    from qwen35_lab._kernels import gated_delta_chunk as chunk
    from qwen35_lab._kernels import gated_delta_step as step

    chunk_meta = dict(H=2, HV=4, K=32, V=32, BT=64, BK=32, BV=32, L2NORM=True, PRECISION="tf32")
    attention_meta = dict(Hq=4, Hkv=2, D=32, BD=32, HAS_MASK=True, PRECISION="tf32", BM=32, BN=32)

    def pointers(*names, dtype="bf16"):
        return {name: f"*{dtype}" for name in names}

    kernels = {
        "chunk_wy": (chunk._chunk_wy_kernel, {**pointers("k", "v", "w", "u"), **pointers("g", "beta", dtype="fp32"),
                                               "T": "i32"}, chunk_meta),
        "chunk_state": (chunk._chunk_state_kernel, {
            **pointers("k", "w", "u", "v_new"),
            **pointers("g", "initial_state", "chunk_states", "final_state", dtype="fp32"),
            "T": "i32", "NT": "i32"}, dict(chunk_meta, HAS_INITIAL_STATE=True, STORE_FINAL_STATE=True)),
        "chunk_output": (chunk._chunk_output_kernel, {
            **pointers("q", "k", "v_new", "chunk_states", "o"), "g": "*fp32", "scale": "fp32", "T": "i32", "NT": "i32"},
            chunk_meta),
        "step": (step._step_kernel, {
            **pointers("q", "k", "v", "o"), **pointers("g", "beta", "state", "new_state", dtype="fp32"),
            "scale": "fp32",
            **{f"{p}stride_{d}": "i64" for p in ("", "out_") for d in "bhkv"}},
            dict(H=2, HV=4, K=32, V=32, BK=32, BV=32, L2NORM=True)),
        "attention_summary": (att._summary_kernel, {
            **pointers("q", "k"), "keep": "*i8",
            **pointers("entropy", "max_prob", "sink_mass", "mean_distance", dtype="fp32"),
            "scaling": "fp32", "T": "i32", "Tk": "i32"}, attention_meta),
        "attention_rows": (att._rows_kernel, {
            **pointers("q", "k"), "keep": "*i8", **pointers("heads", "rows", dtype="i32"), "probs": "*fp32",
            "scaling": "fp32", "T": "i32", "Tk": "i32", "R": "i32", "NH": "i32"}, attention_meta),
    }
    sizes = {}
    for name, (kernel, signature, constants) in kernels.items():
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        full = {arg: "constexpr" if arg in constants else signature[arg] for arg in fn.arg_names}
        source = ASTSource(fn=fn, signature=full, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        sizes[name] = len(compiled.asm["cubin"])
    return sizes


@pytest.mark.slow
def test_every_kernel_compiles_for_an_h100():
    pool, call = _worker({"TRITON_INTERPRET": None})
    with pool:
        sizes = call(_compile_for_h100)
    assert set(sizes) == {"chunk_wy", "chunk_state", "chunk_output", "step", "attention_summary", "attention_rows"}
    assert all(size > 1000 for size in sizes.values()), sizes


# ----------------------------------------------------------------------------- dispatch, in this process


def test_mode_reads_the_environment(monkeypatch):
    for value, expected in [("torch", "torch"), (" Triton ", "triton"), ("", "auto"), ("auto", "auto")]:
        monkeypatch.setenv("QWEN35_LAB_OPS", value)
        assert dispatch.mode() == expected and ops.BACKEND == expected
    monkeypatch.delenv("QWEN35_LAB_OPS")
    assert ops.BACKEND == "auto"
    monkeypatch.setenv("QWEN35_LAB_OPS", "cuda")
    with pytest.raises(ValueError, match=r"QWEN35_LAB_OPS='cuda' is not a valid choice; use one of auto, torch"):
        ops.chunk_gated_delta_rule(*_gated_delta_inputs(1, 4, 1, 1, 4, 4, "weak", "uniform", torch.float32, 0)[:5])


def test_public_ops_keep_the_reference_signatures():
    pairs = [
        (ops.chunk_gated_delta_rule, gated_delta_torch.chunk_gated_delta_rule),
        (ops.recurrent_gated_delta_step, gated_delta_torch.recurrent_gated_delta_step),
        (ops.attention_summaries, attention_torch.attention_summaries),
        (ops.attention_probs_rows, attention_torch.attention_probs_rows),
    ]
    for public, reference in pairs:
        assert public.__wrapped__ is reference
        assert inspect.signature(public) == inspect.signature(reference)
        assert "QWEN35_LAB_OPS" in public.__doc__
    assert ops.naive_recurrent_gated_delta_rule is gated_delta_torch.naive_recurrent_gated_delta_rule
    assert ops.replay_state is gated_delta_torch.replay_state
    assert set(ops.__all__) >= {"BACKEND", "chunk_gated_delta_rule", "attention_summaries", "replay_states"}


def test_cpu_tensors_take_the_torch_reference(monkeypatch):
    monkeypatch.delenv("QWEN35_LAB_OPS", raising=False)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a CPU tensor reached a Triton kernel")

    monkeypatch.setattr(dispatch, "_kernel", no_kernel)
    assert dispatch.backend_for(torch.device("cpu")) == "torch"
    q, k, v, g, beta, state = _gated_delta_inputs(1, 30, 1, 2, 8, 8, "medium", "uniform", torch.float32, 3)
    o, final, _ = ops.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=state)
    o_ref, final_ref, _ = gated_delta_torch.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16, initial_state=state)
    assert torch.equal(o, o_ref) and torch.equal(final, final_ref)
    monkeypatch.setenv("QWEN35_LAB_OPS", "torch")
    assert dispatch.backend_for(torch.device("cuda")) == "torch"


def test_auto_sends_cuda_to_triton_and_falls_back_where_a_kernel_stops(monkeypatch):
    monkeypatch.delenv("QWEN35_LAB_OPS", raising=False)
    assert dispatch.backend_for(torch.device("cuda")) == "triton"  # triton is installed here
    with monkeypatch.context() as m:
        m.setattr(dispatch, "_triton_installed", lambda: False)
        assert dispatch.backend_for(torch.device("cuda")) == "torch"

    # a stand-in kernel that declines (as the chunk kernel declines chunk_size=48), on "CUDA" tensors
    def declining_kernel(*args, **kwargs):
        raise dispatch.UnsupportedByKernel("the Triton chunk kernel takes chunk_size 16, 32, 64, got 48")

    monkeypatch.setattr(dispatch, "backend_for", lambda device: "torch" if dispatch.mode() == "torch" else "triton")
    monkeypatch.setattr(dispatch, "_kernel", lambda module, name, device: declining_kernel)
    q, k, v, g, beta, _ = _gated_delta_inputs(1, 30, 1, 1, 8, 8, "medium", "uniform", torch.float32, 4)
    o, _, _ = ops.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=48)  # auto: the torch reference
    assert torch.equal(o, gated_delta_torch.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=48)[0])
    monkeypatch.setenv("QWEN35_LAB_OPS", "triton")  # forced: the kernel's error
    with pytest.raises(ValueError, match="chunk_size 16, 32, 64, got 48"):
        ops.chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=48)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("QWEN35_LAB_OPS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    imported_before = "qwen35_lab._kernels.attention_summary" in sys.modules
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before triton is imported"):
        ops.attention_summaries(q, k)
    assert ("qwen35_lab._kernels.attention_summary" in sys.modules) == imported_before  # refused before importing


def test_qwen35_lab_imports_and_runs_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, qwen35_lab\n"
        "from qwen35_lab import ops\n"
        "q = torch.randn(1, 5, 1, 4); v = torch.randn(1, 5, 1, 3); g = -torch.rand(1, 5, 1)\n"
        "o, s, _ = ops.chunk_gated_delta_rule(q, q, v, g, torch.rand(1, 5, 1))\n"
        "assert o.shape == (1, 5, 1, 3) and ops.BACKEND == 'auto'\n"
        "assert not [m for m in sys.modules if m.startswith('qwen35_lab._kernels.')]\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("QWEN35_LAB_OPS", "TRITON_INTERPRET")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
