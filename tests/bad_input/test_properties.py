"""Property tests over each public entry point's argument space (hypothesis): whatever is passed,
the call either works or raises one of the toolkit's refusals (``InputError``: a ValueError /
TypeError / IndexError / FileNotFoundError / MemoryError subclass whose message names the value)
— never a KeyError, AttributeError or RuntimeError from deep inside — and after any refused call
the model is exactly as before: plain HF modules, its rope unchanged, the same logits bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen35_lab as ql
from qwen35_lab import chat_format, longctx, media, viz
from qwen35_lab.checks import InputError
from qwen35_lab.instrument import patch, replace, scale, zero

IDS = torch.arange(200, 210)[None]  # 10 tokens
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def trace(lab):
    return lab.run(IDS, capture=["layers.0.deltanet.state", "layers.0.deltanet.beta", "layers.3.attn.probs"])


def _refused_or_ok(call):
    """Run ``call``; an exception must be an InputError whose message is not empty."""
    try:
        call()
    except InputError as error:
        assert str(error), f"{type(error).__name__} without a message"
    except Exception as error:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(error).__name__} escaped from deep inside: {error}")


def _unchanged(lab, plain, rope_before=None):
    assert not lab.is_instrumented
    if rope_before is not None:
        assert lab.text_config.rope_parameters == rope_before
    assert torch.equal(lab.run(IDS).meta["last_logits"], plain)


# anything a user might pass, valid or not
scalars = st.one_of(st.none(), st.booleans(), st.integers(-20, 20), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.just("cpu"), st.just("cuda"), st.just("gpu"), st.just("bfloat16"), st.just("int8"))
selections = st.one_of(scalars, st.lists(st.integers(-15, 15), max_size=4), st.lists(scalars, max_size=3),
                       st.just(slice(1, 4)), st.just(torch.tensor([1, 2])), st.just(torch.tensor([0.5])))
probe_patterns = st.one_of(
    st.sampled_from(["layers.0.deltanet.beta", "layers.*.deltanet.g", "layers.3.attn.probs", "layers.3.attn.gate",
                     "layers.0.deltanet.state", "layers.0.attn.gate", "layers.9.deltanet.beta", "resid_pre",
                     "layers.*", "nothing*", "", "layers.0.deltanet.conv_state"]),
    scalars, st.lists(st.sampled_from(["layers.0.deltanet.beta", "layers.1.resid_post", 3]), max_size=3))
edit_values = st.one_of(scalars, st.just(torch.tensor(float("nan"))), st.just(torch.zeros(3)),
                        st.just(torch.zeros(1, 10, 4)), st.builds(lambda f: scale(f) if isinstance(f, float)
                                                                  and math.isfinite(f) else zero(), st.floats()),
                        st.builds(lambda p: zero(positions=p), selections),
                        st.builds(lambda h: zero(heads=h), selections),
                        st.just(lambda x: x * 0), st.just(lambda x: "nope"), st.just(lambda x: x[..., :1]))


@SETTINGS
@given(capture=probe_patterns, positions=selections, heads=selections, batch=selections, device=scalars,
       dtype=scalars, chunk_size=scalars)
def test_run_capture(lab, plain, capture, positions, heads, batch, device, dtype, chunk_size):
    _refused_or_ok(lambda: lab.run(IDS, capture=capture, positions=positions, heads=heads, batch=batch,
                                   device=device, dtype=dtype, chunk_size=chunk_size))
    _unchanged(lab, plain)


@SETTINGS
@given(key=probe_patterns, value=edit_values, capture=st.one_of(st.none(), probe_patterns))
def test_run_edits(lab, plain, key, value, capture):
    edits = {key: value} if isinstance(key, str) else key
    _refused_or_ok(lambda: lab.run(IDS, edits=edits, capture=capture))
    _unchanged(lab, plain)


@SETTINGS
@given(positions=selections, donor_positions=selections, name=st.one_of(st.none(), probe_patterns))
def test_patch(lab, plain, trace, positions, donor_positions, name):
    def call():
        edit = patch(trace, name if isinstance(name, str) or name is None else None, positions=positions,
                     donor_positions=donor_positions)
        lab.run(IDS, edits={"layers.0.deltanet.beta": edit})
    _refused_or_ok(call)
    _unchanged(lab, plain)


@SETTINGS
@given(inputs=st.one_of(scalars, st.just(torch.tensor([[1.5]])), st.just(torch.tensor([[10**9]])),
                        st.lists(st.integers(-3, 300_000), max_size=4).map(lambda v: torch.tensor([v], dtype=torch.long)),
                        st.just({"input_ids": "x"}), st.just([{"role": "user"}]), st.just([{"role": "x", "content": ""}]),
                        st.just([{"role": "user", "content": [{"type": "image"}]}])),
       max_new_tokens=scalars, seed=scalars)
def test_generate(lab, plain, inputs, max_new_tokens, seed):
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and 0 < max_new_tokens:
        max_new_tokens = min(max_new_tokens, 3)
    _refused_or_ok(lambda: lab.generate(inputs, max_new_tokens=max_new_tokens, seed=seed))
    _unchanged(lab, plain)


@SETTINGS
@given(temperature=scalars, top_p=scalars, top_k=scalars, min_p=scalars, presence_penalty=scalars,
       preset=st.one_of(st.none(), st.sampled_from(["qwen3.5-thinking-general", "nope"])))
def test_sampling_arguments(lab, plain, temperature, top_p, top_k, min_p, presence_penalty, preset):
    kwargs = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                     presence_penalty=presence_penalty, preset=preset).items() if v is not None}
    _refused_or_ok(lambda: lab.generate(IDS, max_new_tokens=2, seed=0, **kwargs))
    _unchanged(lab, plain)


@SETTINGS
@given(layer=scalars, t=scalars)
def test_trace_state(lab, trace, layer, t):
    _refused_or_ok(lambda: trace.state(layer, t))


@SETTINGS
@given(layer=scalars, head=scalars, kind=st.sampled_from(["beta", "decay", "g", "nope", 3]))
def test_plots(lab, trace, layer, head, kind):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _refused_or_ok(lambda: plt.close(viz.plot_gates(trace, layer, kind)))
    _refused_or_ok(lambda: plt.close(viz.plot_attention(trace, layer, head=head)))


@SETTINGS
@given(rope=st.one_of(scalars, st.fixed_dictionaries({"rope_type": st.sampled_from(["yarn", "linear", "dynamic",
                                                                                   "default", "longrope", "x"])},
                                                    optional={"factor": scalars,
                                                              "original_max_position_embeddings": scalars,
                                                              "beta_fast": scalars})))
def test_set_rope(lab, plain, rope):
    before = dict(lab.text_config.rope_parameters)
    try:
        _refused_or_ok(lambda: lab.set_rope(rope))
    finally:
        lab.set_rope(None)
    _unchanged(lab, plain, before)


@SETTINGS
@given(total=scalars, video_fps=scalars, fps=scalars, num_frames=scalars)
def test_frame_sampling(total, video_fps, fps, num_frames):
    kwargs = {"fps": fps} if num_frames is None else {"num_frames": num_frames}
    _refused_or_ok(lambda: media.sample_frame_indices(total, video_fps, **kwargs))


@SETTINGS
@given(messages=st.one_of(scalars, st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "bot", 1])},
    optional={"content": st.one_of(scalars, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image", "video", "audio", None])}, optional={"text": scalars}),
        max_size=2)), "tool_calls": st.one_of(scalars, st.lists(scalars, max_size=1))}), max_size=3)),
       enable_thinking=scalars, tools=st.one_of(st.none(), scalars, st.lists(scalars, max_size=1)))
def test_render(lab, messages, enable_thinking, tools):
    _refused_or_ok(lambda: lab.render(messages, enable_thinking=enable_thinking, tools=tools))
    _refused_or_ok(lambda: chat_format.parse_output(messages))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(dtype=scalars, device=scalars, text_only=scalars, max_memory=st.one_of(scalars, st.dictionaries(
    scalars.filter(lambda v: isinstance(v, (str, int))), scalars, max_size=2)), strict=scalars)
def test_load(dtype, device, text_only, max_memory, strict):
    kwargs = {k: v for k, v in dict(dtype=dtype, device=device, text_only=text_only, max_memory=max_memory,
                                     strict=strict).items() if v is not None}
    _refused_or_ok(lambda: ql.load("recall", **kwargs))


@SETTINGS
@given(target=scalars, original=scalars)
def test_yarn_for_context(target, original):
    kwargs = {} if original is None else {"original": original}
    _refused_or_ok(lambda: longctx.yarn_for_context(target, **kwargs))
