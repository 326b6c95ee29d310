"""The OpenAI-compatible backend: request bodies against the model cards and the servers' own
request schemas, and real calls to a `transformers serve` process running the tiny organism,
checked against local greedy generation."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qwen35_lab import sampling as S
from qwen35_lab.backends import (SERVERS, BackendError, OpenAIBackend, ServerUnreachableError,
                                 UnsupportedFieldError)

from serving import free_port, transformers_serve

PROMPT = "Name three colours."
MESSAGES = [{"role": "user", "content": PROMPT}]


# The request fields of the servers' chat-completions schemas (the oracle), copied from:
# vLLM  vllm/entrypoints/openai/chat_completion/protocol.py, class ChatCompletionRequest
#       (vllm-project/vllm @ d5dba2d7b0ab9b98096560c69db7126b54b14d79)
VLLM_FIELDS = {
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools", "tool_choice", "reasoning_effort", "include_reasoning", "parallel_tool_calls",
    "user", "use_beam_search", "top_k", "min_p", "repetition_penalty", "length_penalty", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "echo", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template", "chat_template_kwargs",
    "mm_processor_kwargs", "structured_outputs", "priority", "request_id", "logits_processors",
    "return_tokens_as_token_ids", "return_token_ids", "cache_salt", "kv_transfer_params", "vllm_xargs",
    "max_repetition_pattern_size", "min_repetition_pattern_size", "repetition_min_count",
}
# SGLang python/sglang/srt/entrypoints/openai/protocol.py, class ChatCompletionRequest
#       (sgl-project/sglang @ 9b116dffe828b2dfa7ec0e4d061555b6c354b67a)
SGLANG_FIELDS = {
    "messages", "model", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "user", "tools", "tool_choice", "return_hidden_states", "top_k", "min_p", "min_tokens",
    "regex", "ebnf", "repetition_penalty", "stop_token_ids", "no_stop_trim", "ignore_eos", "continue_final_message",
    "skip_special_tokens", "lora_path", "session_params", "separate_reasoning", "stream_reasoning",
    "chat_template_kwargs", "rid", "bootstrap_host", "bootstrap_port", "bootstrap_room",
}


# ============================================================================ request bodies (no server)

def test_bodies_match_the_cards_requests(facts):
    cards = facts["card_requests"]  # the request examples of the 9B and 3.6-27B cards
    backend = OpenAIBackend(model="Qwen/Qwen3.5-9B", server="vllm")

    # instruct mode: the card sends enable_thinking False in chat_template_kwargs
    want = cards["instruct"]["sampling"]
    body = backend.request_body(MESSAGES, preset="qwen3.5-instruct-general", max_tokens=32768)
    assert {k: body[k] for k in want} == want
    assert body["chat_template_kwargs"] == cards["instruct"]["chat_template_kwargs"]
    assert body["min_p"] == 0.0 and body["repetition_penalty"] == 1.0 and body["model"] == "Qwen/Qwen3.5-9B"

    # video: mm_processor_kwargs as in the card
    mm = cards["video"]["mm_processor_kwargs"]
    body = backend.request_body(MESSAGES, preset="qwen3.5-thinking-general", mm_processor_kwargs=mm)
    assert body["mm_processor_kwargs"] == {"fps": 2, "do_sample_frames": True} == mm
    assert body["chat_template_kwargs"] == {"enable_thinking": True}

    # Qwen3.6 preserve_thinking, with the precise-coding preset's values
    want = cards["preserve_thinking"]["sampling"]
    body = backend.request_body(MESSAGES, preset="qwen3.6-thinking-precise-coding", preserve_thinking=True)
    assert {k: body[k] for k in want} == want
    assert body["chat_template_kwargs"]["preserve_thinking"] is True


def test_every_body_field_is_in_the_servers_schema():
    full = dict(max_tokens=8, stream=True, seed=1, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1,
                presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.1, enable_thinking=True,
                preserve_thinking=True)
    vllm = OpenAIBackend(model="m", server="vllm").request_body(MESSAGES, mm_processor_kwargs={"fps": 2}, **full)
    assert set(vllm) <= VLLM_FIELDS
    assert SERVERS["vllm"]["fields"] <= VLLM_FIELDS
    sglang = OpenAIBackend(model="m", server="sglang")
    assert set(sglang.request_body(MESSAGES, **full)) <= SGLANG_FIELDS
    assert SERVERS["sglang"]["fields"] <= SGLANG_FIELDS
    assert "mm_processor_kwargs" not in SGLANG_FIELDS
    with pytest.raises(UnsupportedFieldError, match="mm_processor_kwargs") as e:
        sglang.request_body(MESSAGES, mm_processor_kwargs={"fps": 2}, **full)
    assert e.value.fields == ["mm_processor_kwargs"]


def test_transformers_profile_follows_transformers_serve():
    """The profile's fields are what the installed `transformers serve` accepts and uses."""
    from transformers.cli.serving.chat_completion import (UNUSED_CHAT_COMPLETION_FIELDS,
                                                          TransformersCompletionCreateParamsStreaming)

    accepted = TransformersCompletionCreateParamsStreaming.__mutable_keys__
    assert SERVERS["transformers"]["fields"] <= accepted - UNUSED_CHAT_COMPLETION_FIELDS
    for rejected in ("top_k", "min_p", "repetition_penalty", "mm_processor_kwargs"):
        assert rejected not in accepted and rejected not in SERVERS["transformers"]["fields"]
    assert "presence_penalty" in UNUSED_CHAT_COMPLETION_FIELDS


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(temperature=3.0), ValueError, r"temperature=3.0 .*\[0, 2\]"),
    (dict(top_p=0.0), ValueError, r"top_p=0.0 .*\(0, 1\]"),
    (dict(top_k=-5), ValueError, r"top_k=-5"),
    (dict(repetition_penalty=0.0), ValueError, r"repetition_penalty=0.0 .*> 0"),
    (dict(preset="qwen3.6-instrct"), ValueError, r"did you mean 'qwen3.6-instruct'"),
    (dict(max_tokens=0), ValueError, r"max_tokens must be a positive integer"),
    (dict(mm_processor_kwargs={"fps": -1}), ValueError, r"fps"),
    (dict(top_kk=3), TypeError, r"unknown argument"),
])
def test_bad_requests_are_refused_before_sending(kwargs, error, pattern):
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens: a send would fail otherwise
    with pytest.raises(error, match=pattern):
        backend.chat(MESSAGES, **kwargs)


def test_bad_backend_settings():
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIBackend("localhost:8000")
    with pytest.raises(ValueError, match="unknown server 'vlm'"):
        OpenAIBackend(server="vlm")
    with pytest.raises(ValueError, match="SGLang needs the model name"):
        OpenAIBackend(server="sglang")


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerUnreachableError, match=re.escape(url + "/chat/completions")):
        OpenAIBackend(url).chat(MESSAGES, max_tokens=2)
    with pytest.raises(ServerUnreachableError, match=re.escape(url)):
        S.sweep(OpenAIBackend(url), [PROMPT], grid={"temperature": [0]}, progress=False)


def test_transformers_profile_refuses_before_sending():
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", server="transformers")
    for field in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        with pytest.raises(UnsupportedFieldError, match=rf"cannot take {field}") as e:
            backend.chat(MESSAGES, **{field: 1.0 if field != "top_k" else 20})
        assert e.value.fields == [field] and e.value.server == "transformers"
    with pytest.raises(UnsupportedFieldError, match="top_k"):  # presets carry top_k: refused in a sweep up front
        S.sweep(backend, [PROMPT], presets=["qwen3.5-instruct-general"], progress=False)


# ============================================================================ vLLM / SGLang response shapes

class _Recorder(BaseHTTPRequestHandler):
    """Answers chat completions the way a server's schema says (``reasoning`` for vLLM's
    ChatMessage / DeltaMessage, ``reasoning_content`` for SGLang's), and records each body."""

    reasoning_key = "reasoning"
    bodies: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        key = type(self).reasoning_key
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            deltas = [{"role": "assistant"}, {key: "Red, green"}, {key: ", blue."}, {"content": "Red, "},
                      {"content": "green, blue."}]
            for i, delta in enumerate(deltas):
                choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) - 1 else None}
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            return
        answer = {"choices": [{"index": 0, "finish_reason": "length",
                               "message": {"role": "assistant", "content": "Red, green, blue.",
                                           key: "Three colours."}}],
                  "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21}}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server,key", [("vllm", "reasoning"), ("vllm", "reasoning_content"),
                                        ("sglang", "reasoning_content")])
def test_reasoning_is_read_from_each_servers_field(server, key):
    handler = type("Handler", (_Recorder,), {"reasoning_key": key, "bodies": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{httpd.server_port}/v1", model="Qwen/Qwen3.5-9B", server=server)
        r = backend.chat(MESSAGES, preset="qwen3.5-thinking-general", max_tokens=64)
        assert (r.reasoning, r.answer, r.finish_reason) == ("Three colours.", "Red, green, blue.", "length")
        assert r.usage["completion_tokens"] == 9
        assert handler.bodies[-1] == backend.request_body(MESSAGES, preset="qwen3.5-thinking-general", max_tokens=64)
        pieces = []
        r = backend.chat(MESSAGES, temperature=0.6, top_k=20, on_delta=lambda kind, text: pieces.append((kind, text)))
        assert (r.reasoning, r.answer, r.finish_reason) == ("Red, green, blue.", "Red, green, blue.", "stop")
        assert pieces == [("reasoning", "Red, green"), ("reasoning", ", blue."), ("content", "Red, "),
                          ("content", "green, blue.")]
        assert handler.bodies[-1]["stream"] is True and handler.bodies[-1]["top_k"] == 20
    finally:
        httpd.shutdown()
        httpd.server_close()


# ============================================================================ a real `transformers serve`

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve` on 127.0.0.1 with the tiny organism in float32 (as the local fixture)."""
    with transformers_serve(tmp_path_factory.mktemp("tiny-served")) as url:
        yield url


def _local_greedy(tiny, enable_thinking: bool, n: int) -> str:
    return tiny.generate(MESSAGES, max_new_tokens=n, do_sample=False, enable_thinking=enable_thinking).text.strip()


def test_served_greedy_reply_is_the_local_one(served, tiny):
    backend = OpenAIBackend(served, server="transformers")
    r = backend.chat(MESSAGES, temperature=0.0, enable_thinking=False, max_tokens=6)
    assert r.reasoning is None and r.finish_reason == "length" and r.usage["completion_tokens"] == 6
    assert r.answer == _local_greedy(tiny, False, 6)


def test_served_stream_carries_the_reasoning(served, tiny):
    backend = OpenAIBackend(served, server="transformers")
    pieces = []
    r = backend.chat(MESSAGES, temperature=0.0, enable_thinking=True, max_tokens=5, seed=0,
                     on_delta=lambda kind, text: pieces.append((kind, text)))
    assert r.answer == "" and r.finish_reason == "length"
    assert r.reasoning == _local_greedy(tiny, True, 5)  # the prompt opened <think>: all of it is reasoning
    assert {kind for kind, _ in pieces} == {"reasoning"} and "".join(t for _, t in pieces).strip() == r.reasoning


def test_server_rejecting_a_field_is_a_clear_error(served):
    backend = OpenAIBackend(served, server="openai")  # no profile: the request goes out as asked
    with pytest.raises(UnsupportedFieldError, match=r"rejected top_k \(HTTP 422") as e:
        backend.chat(MESSAGES, top_k=20, max_tokens=2)
    assert e.value.fields == ["top_k"] and served in str(e.value)


def test_other_server_errors_say_what_the_server_said(served):
    backend = OpenAIBackend(served, model="no-such-model", server="transformers")
    with pytest.raises(BackendError, match=r"HTTP 400: Server is pinned to .*requested 'no-such-model'") as e:
        backend.chat(MESSAGES, max_tokens=2)
    assert not isinstance(e.value, UnsupportedFieldError)


def test_sweep_against_the_server(served, tiny):
    backend = OpenAIBackend(served, server="transformers")
    rows = S.sweep(backend, [PROMPT], grid={"temperature": [0.0], "enable_thinking": [False]}, max_new_tokens=4,
                   progress=False)
    (row,) = rows
    assert row["answer"] == _local_greedy(tiny, False, 4) and row["generated_tokens"] == 4
    assert row["temperature"] == 0.0 and row["top_k"] is None  # top_k was not sent: the server's own applied
    assert row["distinct_1"] == pytest.approx(S.distinct_n(row["ids"], 1))
