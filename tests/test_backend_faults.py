"""The backend against a misbehaving server: every reply is checked (JSON at all, field types, stream
framing), retries follow the policy, timeouts say how to raise them. The faults are scripted on the
local FakeServer (127.0.0.1), each test's reply written by hand in the test or the server's docstring."""

from __future__ import annotations

import _thread
import asyncio
import re
import signal
import threading

import httpx
import pytest

from qwen35_lab import checks
from qwen35_lab.backends import (BackendError, BadReply, OpenAIBackend, RateLimited, RetryPolicy,
                                 ServerUnreachableError, UnsupportedFieldError, run_sync)
from qwen35_lab.testing import FakeServer

MESSAGES = [{"role": "user", "content": "Name three colours."}]
FAST = RetryPolicy(retries=3, backoff=0.01, max_backoff=0.05, budget=10)


def _backend(server: FakeServer, **kwargs) -> OpenAIBackend:
    return OpenAIBackend(server.url, model="fake/qwen3.5", server="vllm", **{"retry": FAST, **kwargs})


def test_a_good_reply_is_read():
    with FakeServer() as server:
        r = _backend(server).chat(MESSAGES, temperature=0.7, seed=3, enable_thinking=True, max_tokens=8)
        assert (r.answer, r.reasoning, r.finish_reason) == ("Name three colours. | seed=3 T=0.7",
                                                           "thinking about Name three colours.", "stop")
        assert r.usage["prompt_tokens"] == 3
        streamed = _backend(server).chat(MESSAGES, temperature=0.7, seed=3, stream=True)
        assert streamed.answer == "Name three colours. | seed=3 T=0.7" and len(streamed.chunks) == 7
        assert _backend(server).models() == ["fake/qwen3.5"]


@pytest.mark.parametrize("fault,got,first_bytes", [
    ("html", r"a body that is not JSON \(HTTP 200, Content-Type: text/html\)", "b'<!DOCTYPE html>"),
    ("bad-types", r"choices\[0\]\.message\.content = 42 \(int\)", """b'{"object": "chat.completion\""""),
    ("no-choices", r"choices = null \(NoneType\)", """b'{"object": "chat.completion"}'"""),
])
def test_a_reply_that_is_not_a_chat_completion_names_url_expectation_and_bytes(fault, got, first_bytes):
    with FakeServer(script={"*": [fault]}) as server:
        with pytest.raises(BadReply) as e:
            _backend(server).chat(MESSAGES, max_tokens=4)
    message = str(e.value)
    assert re.search(rf"the server at {re.escape(server.url)}/chat/completions sent {got}", message), message
    assert "expected a chat.completion JSON object" in message
    assert f"First bytes received: {first_bytes}" in message
    assert len(server.requests) == 1  # a bad reply is not retried: it would come again


def test_a_stream_without_data_lines_is_an_error_not_an_empty_completion():
    with FakeServer(script={"*": ["no-data"]}) as server:
        with pytest.raises(BadReply, match=r"sent a stream without any 'data:' event; expected server-sent events"
                                           r".*First bytes received: b': keep-alive\\n") as e:
            _backend(server).chat(MESSAGES, stream=True, max_tokens=4)
    assert server.url in str(e.value)


def test_a_timeout_says_it_timed_out_and_how_to_raise_it():
    with FakeServer(script={"*": ["stall"]}, stall=5) as server:
        with pytest.raises(checks.TimedOut) as e:
            _backend(server, timeout=0.25).chat(MESSAGES, max_tokens=4)
    assert isinstance(e.value, TimeoutError)
    assert re.search(r"did not answer within timeout=0.25 s \(ReadTimeout\); a generation of max_tokens=4 can "
                     r"take longer; raise the limit with OpenAIBackend\('http://127.0.0.1:\d+/v1', \.\.\., "
                     r"timeout=1\)", str(e.value)), str(e.value)


def test_passing_failures_are_retried():
    with FakeServer(script={"*": ["503", "reset", "429", "502"]}) as server:
        r = _backend(server, retry=RetryPolicy(retries=4, backoff=0.01, budget=10)).chat(MESSAGES, seed=1)
    assert r.answer.endswith("seed=1 T=None")
    assert len(server.requests) == 5  # four failures, then the answer


def test_429_past_the_retry_budget_stops_with_the_count_and_the_last_reply():
    with FakeServer(script={"*": ["429"] * 10}) as server:
        with pytest.raises(RateLimited, match=r"HTTP 429 \(too many requests\) to all 4 tries .*retry budget is 3 "
                                              r"retries.*Its last reply: scripted HTTP 429") as e:
            _backend(server).chat(MESSAGES)
    assert e.value.tries == 4 and e.value.last_reply == "scripted HTTP 429" and len(server.requests) == 4


def test_5xx_and_resets_past_the_budget_say_so():
    with FakeServer(script={"*": ["500"] * 10}) as server:
        with pytest.raises(BackendError, match=r"answered HTTP 500 to all 4 tries") as e:
            _backend(server).chat(MESSAGES)
    assert not isinstance(e.value, RateLimited)
    with FakeServer(script={"*": ["reset"] * 10}) as server:
        with pytest.raises(BackendError, match=r"the connection to .* broke on all 4 tries"):
            _backend(server).chat(MESSAGES)


def test_the_time_budget_bounds_the_retries():
    with FakeServer(script={"*": ["503"] * 50}) as server:
        policy = RetryPolicy(retries=50, backoff=0.2, max_backoff=0.2, budget=0.3)
        with pytest.raises(BackendError, match="HTTP 503"):
            _backend(server, retry=policy).chat(MESSAGES)
    assert len(server.requests) < 50  # the 0.3 s budget ran out long before 50 retries


def test_retry_waits_are_bounded_and_jittered():
    policy = RetryPolicy(backoff=0.5, max_backoff=3.0)
    for tries, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [policy.wait(tries) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits) and len(set(waits)) > 100
    assert all(policy.wait(1, retry_after=2.0) == 2.0 for _ in range(20))  # the server's Retry-After
    assert policy.wait(1, retry_after=60.0) == 3.0  # capped


def test_unreachable_is_not_retried():
    with FakeServer() as server:
        url = server.url
    backend = OpenAIBackend(url, retry=RetryPolicy(retries=50, backoff=10, budget=1000))
    with pytest.raises(ServerUnreachableError, match=re.escape(url)):
        backend.chat(MESSAGES)  # would take minutes if refused connections were retried


def test_n_choices_come_back_in_order_and_greedy_n_is_refused():
    with FakeServer() as server:
        backend = _backend(server)
        body = backend.request_body(MESSAGES, temperature=1.0, seed=7, n=3)
        completions = run_sync(backend.complete(body))
        assert [c.answer.split(" | ")[1] for c in completions] == ["seed=7 T=1.0", "seed=8 T=1.0", "seed=9 T=1.0"]
        with pytest.raises(UnsupportedFieldError, match=r"rejected n \(HTTP 400: n must be 1 when using greedy"):
            run_sync(backend.complete(backend.request_body(MESSAGES, temperature=0.0, n=2)))


@pytest.mark.parametrize("make,error,pattern", [
    (lambda: RetryPolicy(retries=-1), checks.BadValue, r"retries=-1 is out of range; valid: 0..100"),
    (lambda: RetryPolicy(backoff=float("nan")), checks.BadValue, r"backoff must be finite"),
    (lambda: OpenAIBackend(retry=3), checks.BadType, r"retry must be a RetryPolicy"),
    (lambda: OpenAIBackend(timeout=0), ValueError, r"timeout must be a positive number"),
    (lambda: OpenAIBackend().chat(MESSAGES, n=2), checks.BadValue, r"chat\(\) returns one completion, got n=2"),
    (lambda: OpenAIBackend().request_body(MESSAGES, n=0), checks.BadValue, r"n=0 is out of range"),
    (lambda: OpenAIBackend().request_body(MESSAGES, n=2, stream=True), checks.BadValue, r"stream=True reads one"),
    (lambda: OpenAIBackend(server="transformers").request_body(MESSAGES, n=2), UnsupportedFieldError, r"cannot take n"),
    (lambda: FakeServer(script={"*": ["teapot"]}), checks.BadValue, r"unknown fault 'teapot'"),
])
def test_bad_settings_are_refused(make, error, pattern):
    with pytest.raises(error, match=pattern):
        make()


def test_the_fake_server_binds_localhost_and_stops_by_itself():
    server = FakeServer(lifetime=0.5).start()
    assert server.url.startswith("http://127.0.0.1:")
    server._thread.join(10)
    assert not server._thread.is_alive()  # its lifetime ran out: nothing left running
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/models", timeout=2)
    with FakeServer(max_requests=2) as server:
        backend = _backend(server, retry=RetryPolicy(retries=0))
        backend.chat(MESSAGES), backend.chat(MESSAGES)
        with pytest.raises((BackendError, ServerUnreachableError)):
            backend.chat(MESSAGES)


def test_run_sync_inside_a_running_loop_stops_when_interrupted():
    """In Jupyter a loop already runs: the request runs on a loop in a thread, and the kernel's
    interrupt (a KeyboardInterrupt in the main thread) cancels it instead of waiting for it."""
    seen = []

    async def slow():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def cell():  # what a notebook cell is: code running while the kernel's loop runs
        assert run_sync(asyncio.sleep(0, result="done")) == "done"
        threading.Timer(0.3, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):
            run_sync(slow())
        assert seen == ["cancelled"]  # cancelled, not left running

    loop = asyncio.new_event_loop()  # run_until_complete leaves SIGINT to Python, as ipykernel does
    # Python's own SIGINT handler, as in a kernel: a process started in the background (nohup, `cmd &`) inherits
    # SIGINT ignored, and interrupt_main then does nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loop.run_until_complete(cell())
    finally:
        loop.close()
        signal.signal(signal.SIGINT, previous)
    assert seen == ["cancelled"]
