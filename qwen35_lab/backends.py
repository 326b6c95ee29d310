"""The same experiments against a served model: an OpenAI-compatible chat-completions client.

>>> backend = OpenAIBackend("http://localhost:8000/v1", server="vllm")   # vllm serve Qwen/Qwen3.5-9B ...
>>> r = backend.chat([{"role": "user", "content": "Hi"}], preset="qwen3.5-instruct-general", max_tokens=64)
>>> r.reasoning, r.answer, r.finish_reason
>>> sampling.sweep(backend, ["Name three colours."], grid={"temperature": [0.6, 1.0]})

Requests are shaped as in the model cards: ``temperature``, ``top_p``, ``presence_penalty`` as
OpenAI fields; ``top_k``, ``min_p``, ``repetition_penalty`` beside them (what the OpenAI SDK's
``extra_body`` adds); ``chat_template_kwargs`` with ``enable_thinking`` / ``preserve_thinking``;
``mm_processor_kwargs`` (e.g. ``{"fps": 2, "do_sample_frames": True}``) for video.

Servers differ in what they accept. ``server=`` picks a profile:

============== ===================================================================================
vllm           every field above; reasoning in ``reasoning`` (older versions: ``reasoning_content``)
sglang         no ``mm_processor_kwargs``; reasoning in ``reasoning_content``
transformers   ``transformers serve``: temperature, top_p, seed, max_tokens, chat_template_kwargs.
               It rejects top_k / min_p / repetition_penalty (HTTP 422), ignores presence_penalty
               and turns frequency_penalty into a repetition penalty, so those raise here
openai         no profile: everything is sent; a field the server rejects raises with its name
============== ===================================================================================

A field the profile lacks raises :class:`UnsupportedFieldError` before anything is sent, rather
than running a different experiment than the one asked for; an HTTP 400/422 naming a field raises
the same error; an unreachable server raises :class:`ServerUnreachableError` with the URL.

At scale (``sampling.sweep(backend, ..., concurrency=64)``) the same requests go out through
:meth:`OpenAIBackend.achat` on one ``httpx.AsyncClient``. HTTP 429 / 500 / 502 / 503 / 504 and
connections reset mid-request are retried with exponential backoff and full jitter, within a
:class:`RetryPolicy` (a count and a time budget); a server still answering 429 past it raises
:class:`RateLimited` with the count and its last reply. A request that outlives ``timeout`` raises
:class:`~qwen35_lab.checks.TimedOut` saying how to raise it. Every reply is checked against the API
before it is used: not JSON (an HTML error page), fields of the wrong type, a stream without
``data:`` lines all raise :class:`BadReply` with the URL, what was expected and the first bytes
received.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import numbers
import random
import re
import threading
import time
from dataclasses import dataclass, field

import httpx

from . import chat_format, checks, sampler
from .checks import BadType, BadValue

__all__ = ["SERVERS", "BackendError", "BadReply", "Completion", "OpenAIBackend", "RateLimited", "RetryPolicy",
           "ServerUnreachableError", "UnsupportedFieldError"]

# Sampling fields, as (request field, SamplingParams attribute).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")
_BASE_FIELDS = {"model", "messages", "max_tokens", "stream", "seed", "chat_template_kwargs"}

#: What each server profile accepts, and why it refuses the rest.
SERVERS: dict[str, dict] = {
    "vllm": {"fields": _BASE_FIELDS | set(_SAMPLING_FIELDS) | {"mm_processor_kwargs", "n"}, "why": {}},
    "sglang": {"fields": _BASE_FIELDS | set(_SAMPLING_FIELDS) | {"n"},
               "why": {"mm_processor_kwargs": "SGLang's ChatCompletionRequest has no mm_processor_kwargs "
                                              "(the model cards: video frame sampling is set this way only in vLLM)"}},
    "transformers": {"fields": _BASE_FIELDS | {"temperature", "top_p"},
                     "why": {"top_k": "transformers serve rejects it (HTTP 422); its value comes from the model's "
                                      "generation_config.json",
                             "min_p": "transformers serve rejects it (HTTP 422)",
                             "repetition_penalty": "transformers serve rejects it (HTTP 422)",
                             "presence_penalty": "transformers serve ignores it",
                             "frequency_penalty": "transformers serve turns it into repetition_penalty = 1 + value, "
                                                  "a different penalty",
                             "mm_processor_kwargs": "transformers serve rejects it (HTTP 422)",
                             "n": "transformers serve ignores it and returns one choice"}},
    "openai": {"fields": None, "why": {}},
}


class BackendError(RuntimeError):
    """A request the server could not serve."""


class UnsupportedFieldError(BackendError, ValueError):
    """The server (or its profile) does not take some request fields; ``fields`` names them."""

    def __init__(self, message: str, fields: list[str], server: str):
        super().__init__(message)
        self.fields = fields
        self.server = server


class ServerUnreachableError(BackendError, ConnectionError):
    """Nothing answers at the backend's URL."""


class BadReply(BackendError):
    """The server answered something that is not an OpenAI chat completion (see the message)."""


class RateLimited(BackendError):
    """The server kept answering HTTP 429 past the retry budget; ``tries`` and ``last_reply`` say so."""

    def __init__(self, message: str, tries: int, last_reply: str):
        super().__init__(message)
        self.tries = tries
        self.last_reply = last_reply


#: The answers worth another try: rate limited, and the server's or a proxy's passing failures.
RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry HTTP 429 / 5xx answers and connections reset mid-request.

    Try ``i`` (1, 2, …) waits a random time in ``[0, min(max_backoff, backoff * 2**(i-1))]``
    ("full jitter", so many clients do not retry in step), at least the server's ``Retry-After``.
    It gives up after ``retries`` retries or when waiting would pass ``budget`` seconds in all.
    """

    retries: int = 6
    backoff: float = 0.5
    max_backoff: float = 20.0
    budget: float = 120.0

    def __post_init__(self):
        checks.check_int("retries", self.retries, lo=0, hi=100)
        checks.check_float("backoff", self.backoff, lo=0)
        checks.check_float("max_backoff", self.max_backoff, lo=0)
        checks.check_float("budget", self.budget, lo=0)

    def wait(self, tries: int, retry_after: float | None = None) -> float:
        """Seconds to wait before the next try, after ``tries`` failed ones."""
        wait = random.uniform(0.0, min(self.max_backoff, self.backoff * 2 ** (tries - 1)))
        return min(self.max_backoff, max(wait, retry_after or 0.0))


class _Retry(Exception):
    """A try that failed in a way worth another (``failure``: the response or the exception)."""

    def __init__(self, failure):
        super().__init__(str(failure))
        self.failure = failure


@dataclass
class Completion:
    """One chat completion: the reasoning and answer, why it stopped, and what was sent."""

    reasoning: str | None
    answer: str
    finish_reason: str | None
    usage: dict
    request: dict  # the JSON body sent
    chunks: list = field(default_factory=list)  # streamed SSE events (parsed), when streaming

    @property
    def text(self) -> str:
        """Reasoning and answer as the model wrote them (``reasoning</think>\\n\\nanswer``)."""
        return f"{self.reasoning}\n</think>\n\n{self.answer}" if self.reasoning is not None else self.answer


class OpenAIBackend:
    """A chat-completions client for vLLM, SGLang or ``transformers serve``.

    ``base_url``: the API root (``http://localhost:8000/v1``); ``model``: the served model name
    (left out of requests when None: vLLM and transformers serve then use the one they serve;
    SGLang needs it); ``server``: the profile, a key of ``SERVERS``; ``timeout``: seconds one
    request may take (a long generation needs minutes); ``retry``: a :class:`RetryPolicy`.
    """

    def __init__(self, base_url: str = "http://localhost:8000/v1", *, model: str | None = None,
                 server: str = "vllm", api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy | None = None):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise BadValue(f"base_url must be an http(s) URL such as 'http://localhost:8000/v1', got {base_url!r}")
        if server not in SERVERS:
            raise BadValue(f"unknown server {server!r}; valid: {', '.join(SERVERS)}")
        if model is not None and not isinstance(model, str):
            raise BadType(f"model must be the served model's name (str) or None, got {model!r}")
        if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not timeout > 0:
            raise BadValue(f"timeout must be a positive number of seconds, got {timeout!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise checks.BadType(f"retry must be a RetryPolicy(retries=..., backoff=..., budget=...) or None, "
                                 f"got {retry!r}")
        if model is None and server == "sglang":
            raise BadValue("SGLang needs the model name: "
                             "OpenAIBackend(url, model='Qwen/Qwen3.5-9B', server='sglang')")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.server = server
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r}, server={self.server!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ------------------------------------------------------------------ requests
    def request_body(self, messages, *, max_tokens: int = 256, stream: bool = False, seed: int | None = None,
                     enable_thinking: bool | None = None, preserve_thinking: bool | None = None,
                     mm_processor_kwargs: dict | None = None, preset: str | None = None, n: int = 1,
                     **params) -> dict:
        """The JSON body for ``messages`` and the sampling arguments (checked; nothing is sent).

        Only the parameters given (directly or through ``preset``) are sent: the rest keep the
        server's defaults. A preset brings its ``enable_thinking`` unless one is given. ``n`` > 1
        asks for several choices in one request (vLLM seeds choice i with ``seed + i``).
        """
        chat_format.validate_messages(messages)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
            raise BadValue(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(stream, bool):
            raise BadType(f"stream must be True or False, got {stream!r}")
        unknown = set(params) - set(_SAMPLING_FIELDS)
        if unknown:
            raise BadType(f"unknown argument(s) {', '.join(sorted(unknown))}; sampling parameters: "
                            f"{', '.join(_SAMPLING_FIELDS)}; also preset, seed, enable_thinking, "
                            f"preserve_thinking, mm_processor_kwargs")
        # Validate with the local sampler's rules; send only what was asked for.
        checked, preset_thinking, seed = sampler.resolve({**params, "preset": preset, "seed": seed,
                                                           "enable_thinking": enable_thinking})
        asked = dict(sampler.get_preset(preset).params.as_dict()) if preset is not None else {}
        asked.pop("frequency_penalty", None)
        asked.update(params)
        body: dict = {}
        if self.model is not None:
            body["model"] = self.model
        body["messages"] = messages
        body["max_tokens"] = int(max_tokens)
        for name in _SAMPLING_FIELDS:
            if name in asked:
                value = getattr(checked, name)
                body[name] = int(value) if name == "top_k" else float(value)
        if seed is not None:
            body["seed"] = int(seed)
        template_kwargs = {}
        if preset_thinking is not None:
            template_kwargs["enable_thinking"] = preset_thinking
        if preserve_thinking is not None:
            if not isinstance(preserve_thinking, bool):
                raise BadType(f"preserve_thinking must be True, False or None, got {preserve_thinking!r}")
            template_kwargs["preserve_thinking"] = preserve_thinking
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        if mm_processor_kwargs is not None:
            _check_mm_kwargs(mm_processor_kwargs)
            body["mm_processor_kwargs"] = dict(mm_processor_kwargs)
        if checks.check_int("n", n, lo=1, hi=1024) > 1:
            if stream:
                raise checks.BadValue(f"stream=True reads one choice; got n={n}. Stream with n=1, or drop stream")
            body["n"] = int(n)
        if stream:
            body["stream"] = True
        self._check_fields(body)
        return body

    def _check_fields(self, body: dict) -> None:
        allowed = SERVERS[self.server]["fields"]
        if allowed is None:
            return
        refused = [k for k in body if k not in allowed]
        if refused:
            why = SERVERS[self.server]["why"]
            reasons = "; ".join(f"{k}: {why.get(k, 'not a field of this server')}" for k in refused)
            raise UnsupportedFieldError(
                f"server={self.server!r} cannot take {', '.join(refused)} ({reasons}). Leave "
                f"{'it' if len(refused) == 1 else 'them'} out to run with the server's own setting, or use a "
                f"server that supports {'it' if len(refused) == 1 else 'them'} (vLLM takes every field).",
                refused, self.server)

    # ------------------------------------------------------------------ calls
    def chat(self, messages, *, max_tokens: int = 256, stream: bool = False, on_delta=None, **kwargs) -> Completion:
        """Send one chat completion; with ``stream=True`` (or ``on_delta``) read it as server-sent events.

        ``on_delta(kind, text)`` gets each piece as it arrives, ``kind`` "reasoning" or "content".
        ``kwargs``: as :meth:`request_body` (``n`` > 1: use :meth:`complete`, which returns every choice).
        """
        body = self._chat_body(messages, max_tokens, stream or on_delta is not None, kwargs)
        return run_sync(self.complete(body, on_delta=on_delta))[0]

    async def achat(self, messages, *, client: httpx.AsyncClient | None = None, max_tokens: int = 256,
                    stream: bool = False, on_delta=None, **kwargs) -> Completion:
        """:meth:`chat` for asyncio code: ``await backend.achat(messages, client=client, ...)``.

        ``client``: an ``httpx.AsyncClient`` shared by many requests (:meth:`async_client`).
        """
        body = self._chat_body(messages, max_tokens, stream or on_delta is not None, kwargs)
        return (await self.complete(body, client=client, on_delta=on_delta))[0]

    def _chat_body(self, messages, max_tokens, stream, kwargs) -> dict:
        if kwargs.get("n", 1) != 1:
            raise checks.BadValue(f"chat() returns one completion, got n={kwargs['n']!r}; "
                                  f"for several choices send request_body(..., n=N) with complete()")
        return self.request_body(messages, max_tokens=max_tokens, stream=stream, **kwargs)

    def async_client(self, concurrency: int = 1) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` for this server keeping up to ``concurrency`` connections open."""
        concurrency = checks.check_int("concurrency", concurrency, lo=1)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, pool=None), headers=self._headers,
                                 limits=httpx.Limits(max_connections=concurrency,
                                                     max_keepalive_connections=concurrency))

    async def complete(self, body: dict, *, client: httpx.AsyncClient | None = None,
                       on_delta=None) -> list[Completion]:
        """Send a body made by :meth:`request_body`, retrying as ``self.retry`` says; one
        :class:`Completion` per choice (``n`` of them), in the server's choice order."""
        if client is None:
            async with self.async_client() as client:
                return await self.complete(body, client=client, on_delta=on_delta)

        async def attempt():
            if not body.get("stream"):
                response = await client.post(self.url, json=body)
                self._check_status(response, body)
                return _from_response(response, body, self.url)
            async with client.stream("POST", self.url, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check_status(response, body)
                return await _from_stream(response, body, on_delta, self.url)

        return await self._with_retries(attempt, self.url, body)

    def models(self) -> list[str]:
        """The model names the server lists (``GET /models``)."""
        url = f"{self.base_url}/models"

        async def attempt(client):
            response = await client.get(url)
            self._check_status(response, {})
            data = _json_of(response, url, _MODELS_EXPECTED)
            entries = data.get("data")
            if not isinstance(entries, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                        for m in entries):
                raise BadReply(_unexpected(url, _MODELS_EXPECTED, f"data = {_short(entries)}", response))
            return [m["id"] for m in entries]

        async def run():
            async with self.async_client() as client:
                return await self._with_retries(lambda: attempt(client), url, {})

        return run_sync(run())

    async def _with_retries(self, attempt, url: str, body: dict):
        """``await attempt()`` until it succeeds, retrying what :class:`_Retry` marks, within ``self.retry``."""
        started, tries = time.monotonic(), 0
        while True:
            tries += 1
            try:
                with self._transport(url, body):
                    return await attempt()
            except _Retry as r:
                failure = r.failure
            elapsed = time.monotonic() - started
            wait = self.retry.wait(tries, _retry_after(failure))
            if tries > self.retry.retries or elapsed + wait > self.retry.budget:
                raise self._gave_up(failure, url, tries, elapsed) from None
            await asyncio.sleep(wait)

    @contextlib.contextmanager
    def _transport(self, url: str, body: dict):
        """httpx's transport errors as ours: a timeout, nothing listening, or a reset worth a retry."""
        try:
            yield
        except httpx.TimeoutException as e:
            what = f"a generation of max_tokens={body['max_tokens']} can take longer; " if "max_tokens" in body else ""
            raise checks.TimedOut(
                f"the server at {url} did not answer within timeout={self.timeout:g} s ({type(e).__name__}); "
                f"{what}raise the limit with OpenAIBackend({self.base_url!r}, ..., timeout={self.timeout * 4:g})"
            ) from None
        except httpx.ConnectError as e:
            raise ServerUnreachableError(
                f"cannot reach the server at {url} ({type(e).__name__}: {e}). Is it running? e.g. "
                f"`vllm serve Qwen/Qwen3.5-0.8B --port 8000` serves http://localhost:8000/v1") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:  # reset mid-request
            raise _Retry(e) from None

    def _gave_up(self, failure, url: str, tries: int, elapsed: float) -> BackendError:
        budget = (f"the retry budget is {self.retry.retries} retries and {self.retry.budget:g} s: raise it with "
                  f"OpenAIBackend(..., retry=RetryPolicy(retries=..., budget=...))")
        if isinstance(failure, httpx.Response):
            message = _error_message(failure)
            if failure.status_code == 429:
                return RateLimited(f"the server at {url} answered HTTP 429 (too many requests) to all {tries} tries "
                                   f"in {elapsed:.1f} s; {budget}, or send fewer requests at once (a lower "
                                   f"concurrency). Its last reply: {message}", tries, message)
            return BackendError(f"the server at {url} answered HTTP {failure.status_code} to all {tries} tries in "
                                f"{elapsed:.1f} s ({budget}). Its last reply: {message}")
        return BackendError(f"the connection to {url} broke on all {tries} tries in {elapsed:.1f} s "
                            f"({type(failure).__name__}: {failure}; {budget})")

    def _check_status(self, response: httpx.Response, body: dict) -> None:
        if response.status_code in RETRY_STATUS:
            raise _Retry(response)
        self._raise_for(response, body)

    def _raise_for(self, response: httpx.Response, body: dict) -> None:
        if response.status_code < 400:
            return
        message = _error_message(response)
        named = [k for k in body if k != "messages"
                 and re.search(rf"(?<![\w-]){re.escape(k)}(?![\w-])", message)]  # the field as a word
        if response.status_code in (400, 422) and named:
            raise UnsupportedFieldError(
                f"the server at {self.url} rejected {', '.join(named)} (HTTP {response.status_code}: {message}). "
                f"Leave {'it' if len(named) == 1 else 'them'} out, or pick the matching profile "
                f"(server='vllm' / 'sglang' / 'transformers') so this is caught before sending.",
                named, self.server)
        raise BackendError(f"the server at {self.url} answered HTTP {response.status_code}: {message}")


def run_sync(coro):
    """Run a coroutine to its end from synchronous code, also where an event loop already runs
    (Jupyter): there on a loop in a thread of its own, cancelled if the caller is interrupted."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    loop = asyncio.new_event_loop()
    task = loop.create_task(coro)
    finished = threading.Event()  # (not Thread.join: an interrupted join can return early afterwards)

    def run():
        try:
            loop.run_until_complete(asyncio.wait([task]))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            finished.set()

    threading.Thread(target=run, name="qwen35_lab.run_sync", daemon=True).start()
    try:
        while not finished.wait(0.1):
            pass
    except BaseException:  # KeyboardInterrupt: the kernel's interrupt button
        loop.call_soon_threadsafe(task.cancel)
        finished.wait()
        raise
    return task.result()


def _check_mm_kwargs(kwargs) -> None:
    if not isinstance(kwargs, dict):
        raise BadType(f"mm_processor_kwargs must be a dict such as {{'fps': 2, 'do_sample_frames': True}}, "
                        f"got {kwargs!r}")
    fps = kwargs.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or fps <= 0):
        raise BadValue(f"mm_processor_kwargs['fps'] must be a positive number of frames per second, got {fps!r}")


def _retry_after(failure) -> float | None:
    """The server's ``Retry-After`` in seconds (the number form), if it sent one."""
    if isinstance(failure, httpx.Response):
        try:
            return max(0.0, float(failure.headers.get("retry-after", "")))
        except ValueError:
            return None
    return None


def _error_message(response: httpx.Response) -> str:
    """The server's error text: FastAPI ``detail``, OpenAI/vLLM ``error.message``, or the raw body."""
    try:
        data = response.json()
    except (json.JSONDecodeError, ValueError):
        return response.text.strip()[:500]
    if isinstance(data, dict):
        if isinstance(data.get("error"), dict) and "message" in data["error"]:
            return str(data["error"]["message"])
        for key in ("detail", "message", "error"):
            if key in data:
                return data[key] if isinstance(data[key], str) else json.dumps(data[key])
    return json.dumps(data)[:500]


# ============================================================================ replies, checked

_COMPLETION_EXPECTED = "a chat.completion JSON object ({'choices': [{'message': {'content': str, ...}, ...}], ...})"
_CHUNK_EXPECTED = "server-sent events: 'data: {\"choices\": [{\"delta\": {...}}]}' lines, then 'data: [DONE]'"
_MODELS_EXPECTED = "a model list JSON object ({'data': [{'id': str, ...}]})"
_TEXT_KEYS = ("content", "reasoning", "reasoning_content")


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return f"{text[:limit]}{'…' if len(text) > limit else ''} ({type(value).__name__})"


def _unexpected(url: str, expected: str, got: str, received) -> str:
    """What every bad reply says: where, what was expected, what came, and its first bytes."""
    if isinstance(received, httpx.Response):
        kind = received.headers.get("content-type")
        received = received.content
        got = f"{got} (HTTP 200, Content-Type: {kind})" if kind else got
    if isinstance(received, str):
        received = received.encode()
    return f"the server at {url} sent {got}; expected {expected}. First bytes received: {bytes(received[:200])!r}"


def _json_of(response: httpx.Response, url: str, expected: str) -> dict:
    try:
        data = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise BadReply(_unexpected(url, expected, "a body that is not JSON", response)) from None
    if not isinstance(data, dict):
        raise BadReply(_unexpected(url, expected, f"a JSON {type(data).__name__}, not an object", response))
    return data


def _bad_text_field(holder: dict) -> str | None:
    """The first of content / reasoning / reasoning_content that is neither a string nor null."""
    return next((k for k in _TEXT_KEYS if holder.get(k) is not None and not isinstance(holder[k], str)), None)


def _reasoning_of(message: dict) -> str | None:
    """vLLM writes the reasoning to ``reasoning`` (older versions and SGLang: ``reasoning_content``)."""
    for key in ("reasoning", "reasoning_content"):
        if message.get(key) is not None:
            return message[key]
    return None


def _split(reasoning: str | None, content: str) -> tuple[str | None, str]:
    """Reasoning and answer; without a reasoning parser on the server, split ``…</think>`` here."""
    if reasoning is None and "</think>" in content:
        parsed = chat_format.parse_output(content)
        return parsed.reasoning, parsed.answer
    return (reasoning.strip() if reasoning is not None else None), content.strip()


def _from_response(response: httpx.Response, body: dict, url: str) -> list[Completion]:
    """The completions of a (non-streamed) reply, every field checked for its type."""
    data = _json_of(response, url, _COMPLETION_EXPECTED)

    def bad(got: str) -> BadReply:
        return BadReply(_unexpected(url, _COMPLETION_EXPECTED, got, response))

    choices, n = data.get("choices"), body.get("n", 1)
    if not isinstance(choices, list) or not choices:
        raise bad(f"choices = {_short(choices)}")
    if len(choices) != n:
        raise bad(f"{len(choices)} choice(s) for n={n}")
    usage = data.get("usage")
    if usage is not None and (not isinstance(usage, dict) or not all(
            isinstance(usage.get(k, 0), int) and not isinstance(usage.get(k), bool)
            for k in ("prompt_tokens", "completion_tokens"))):
        raise bad(f"usage = {_short(usage)}")
    for i, choice in enumerate(choices):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            raise bad(f"choices[{i}].message = {_short(message)}")
        key = _bad_text_field(message)
        if key is not None:
            raise bad(f"choices[{i}].message.{key} = {_short(message[key])}")
        if not isinstance(choice.get("finish_reason"), (str, type(None))):
            raise bad(f"choices[{i}].finish_reason = {_short(choice['finish_reason'])}")
    if all(isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])
    out = []
    for choice in choices:
        message = choice["message"]
        reasoning, answer = _split(_reasoning_of(message), message.get("content") or "")
        out.append(Completion(reasoning=reasoning, answer=answer, finish_reason=choice.get("finish_reason"),
                              usage=usage or {}, request=body))
    return out


async def _from_stream(response: httpx.Response, body: dict, on_delta, url: str) -> list[Completion]:
    """Read ``data: {...}`` server-sent events up to ``data: [DONE]`` (or the end of the stream),
    each checked; a stream that carries no ``data:`` line at all is a :class:`BadReply`."""
    reasoning_parts, content_parts, chunks, head = [], [], [], bytearray()
    finish_reason, usage, saw_reasoning = None, {}, False

    def bad(got: str, received) -> BadReply:
        return BadReply(_unexpected(url, _CHUNK_EXPECTED, got, received))

    lines = response.aiter_lines()
    while True:
        try:
            line = await lines.__anext__()
        except StopAsyncIteration:
            break
        except (httpx.RemoteProtocolError, httpx.ReadError) as e:
            if not chunks:
                raise  # nothing delivered yet: worth a retry
            raise BackendError(f"the stream from {url} broke after {len(chunks)} events "
                               f"({type(e).__name__}: {e})") from None
        if len(head) < 200:
            head += line.encode() + b"\n"
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            break
        try:
            event = json.loads(payload)
        except ValueError:
            raise bad("a data: line that is not JSON", payload) from None
        if not isinstance(event, dict):
            raise bad(f"an event that is a JSON {type(event).__name__}", payload)
        if "error" in event:
            error = event["error"]
            raise BackendError(f"the server at {url} reported an error mid-stream: "
                               f"{error.get('message', error) if isinstance(error, dict) else error}")
        choices = event.get("choices") or []
        if not isinstance(choices, list):
            raise bad(f"choices = {_short(choices)}", payload)
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict) or _bad_text_field(delta) is not None:
                raise bad(f"a choice whose delta is {_short(delta)}", payload)
        chunks.append(event)
        if isinstance(event.get("usage"), dict):
            usage = event["usage"]
        for choice in choices:
            delta = choice["delta"]
            piece = _reasoning_of(delta)
            if piece:
                saw_reasoning = True
                reasoning_parts.append(piece)
                if on_delta is not None:
                    on_delta("reasoning", piece)
            if delta.get("content"):
                content_parts.append(delta["content"])
                if on_delta is not None:
                    on_delta("content", delta["content"])
            if choice.get("finish_reason"):
                finish_reason = choice["finish_reason"]
    if not chunks:
        raise bad("a stream without any 'data:' event", head)
    reasoning, answer = _split("".join(reasoning_parts) if saw_reasoning else None, "".join(content_parts))
    return [Completion(reasoning=reasoning, answer=answer, finish_reason=finish_reason, usage=usage, request=body,
                       chunks=chunks)]
