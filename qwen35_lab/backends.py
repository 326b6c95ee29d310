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
"""

from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, field

import httpx

from . import chat_format, sampling

__all__ = ["SERVERS", "BackendError", "Completion", "OpenAIBackend", "ServerUnreachableError",
           "UnsupportedFieldError"]

# Sampling fields, as (request field, SamplingParams attribute).
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty")
_BASE_FIELDS = {"model", "messages", "max_tokens", "stream", "seed", "chat_template_kwargs"}

#: What each server profile accepts, and why it refuses the rest.
SERVERS: dict[str, dict] = {
    "vllm": {"fields": _BASE_FIELDS | set(_SAMPLING_FIELDS) | {"mm_processor_kwargs"}, "why": {}},
    "sglang": {"fields": _BASE_FIELDS | set(_SAMPLING_FIELDS),
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
                             "mm_processor_kwargs": "transformers serve rejects it (HTTP 422)"}},
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
    SGLang needs it); ``server``: the profile, a key of ``SERVERS``; ``timeout`` in seconds.
    """

    def __init__(self, base_url: str = "http://localhost:8000/v1", *, model: str | None = None,
                 server: str = "vllm", api_key: str | None = None, timeout: float = 300.0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://localhost:8000/v1', got {base_url!r}")
        if server not in SERVERS:
            raise ValueError(f"unknown server {server!r}; valid: {', '.join(SERVERS)}")
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be the served model's name (str) or None, got {model!r}")
        if not isinstance(timeout, numbers.Real) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if model is None and server == "sglang":
            raise ValueError("SGLang needs the model name: "
                             "OpenAIBackend(url, model='Qwen/Qwen3.5-9B', server='sglang')")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.server = server
        self.timeout = float(timeout)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.base_url!r}, model={self.model!r}, server={self.server!r})"

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    # ------------------------------------------------------------------ requests
    def request_body(self, messages, *, max_tokens: int = 256, stream: bool = False, seed: int | None = None,
                     enable_thinking: bool | None = None, preserve_thinking: bool | None = None,
                     mm_processor_kwargs: dict | None = None, preset: str | None = None, **params) -> dict:
        """The JSON body for ``messages`` and the sampling arguments (checked; nothing is sent).

        Only the parameters given (directly or through ``preset``) are sent: the rest keep the
        server's defaults. A preset brings its ``enable_thinking`` unless one is given.
        """
        chat_format.validate_messages(messages)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, numbers.Integral) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if not isinstance(stream, bool):
            raise TypeError(f"stream must be True or False, got {stream!r}")
        unknown = set(params) - set(_SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown argument(s) {', '.join(sorted(unknown))}; sampling parameters: "
                            f"{', '.join(_SAMPLING_FIELDS)}; also preset, seed, enable_thinking, "
                            f"preserve_thinking, mm_processor_kwargs")
        # Validate with the local sampler's rules; send only what was asked for.
        checked, preset_thinking, seed = sampling.resolve({**params, "preset": preset, "seed": seed,
                                                           "enable_thinking": enable_thinking})
        asked = dict(sampling.get_preset(preset).params.as_dict()) if preset is not None else {}
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
                raise TypeError(f"preserve_thinking must be True, False or None, got {preserve_thinking!r}")
            template_kwargs["preserve_thinking"] = preserve_thinking
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        if mm_processor_kwargs is not None:
            _check_mm_kwargs(mm_processor_kwargs)
            body["mm_processor_kwargs"] = dict(mm_processor_kwargs)
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
        ``kwargs``: as :meth:`request_body`.
        """
        stream = stream or on_delta is not None
        body = self.request_body(messages, max_tokens=max_tokens, stream=stream, **kwargs)
        try:
            with httpx.Client(timeout=self.timeout, headers=self._headers) as client:
                if not stream:
                    response = client.post(self.url, json=body)
                    self._raise_for(response, body)
                    return _from_response(response.json(), body)
                with client.stream("POST", self.url, json=body) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise_for(response, body)
                    return _from_stream(response.iter_lines(), body, on_delta)
        except httpx.TransportError as e:
            raise ServerUnreachableError(
                f"cannot reach the server at {self.url} ({type(e).__name__}: {e}). Is it running? e.g. "
                f"`vllm serve Qwen/Qwen3.5-0.8B --port 8000` serves http://localhost:8000/v1") from None

    def models(self) -> list[str]:
        """The model names the server lists (``GET /models``)."""
        try:
            response = httpx.get(f"{self.base_url}/models", timeout=self.timeout, headers=self._headers)
        except httpx.TransportError as e:
            raise ServerUnreachableError(f"cannot reach the server at {self.base_url}/models "
                                         f"({type(e).__name__}: {e}). Is it running?") from None
        self._raise_for(response, {})
        return [m["id"] for m in response.json().get("data", [])]

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


def _check_mm_kwargs(kwargs) -> None:
    if not isinstance(kwargs, dict):
        raise TypeError(f"mm_processor_kwargs must be a dict such as {{'fps': 2, 'do_sample_frames': True}}, "
                        f"got {kwargs!r}")
    fps = kwargs.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, numbers.Real) or fps <= 0):
        raise ValueError(f"mm_processor_kwargs['fps'] must be a positive number of frames per second, got {fps!r}")


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


def _from_response(data: dict, body: dict) -> Completion:
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise BackendError(f"the server's answer has no choices[0].message: {json.dumps(data)[:300]}") from None
    reasoning, answer = _split(_reasoning_of(message), message.get("content") or "")
    return Completion(reasoning=reasoning, answer=answer, finish_reason=choice.get("finish_reason"),
                      usage=data.get("usage") or {}, request=body)


def _from_stream(lines, body: dict, on_delta) -> Completion:
    """Read ``data: {...}`` server-sent events up to ``data: [DONE]`` (or the end of the stream)."""
    reasoning_parts, content_parts, chunks = [], [], []
    finish_reason, usage, saw_reasoning = None, {}, False
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        chunks.append(event)
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
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
    reasoning, answer = _split("".join(reasoning_parts) if saw_reasoning else None, "".join(content_parts))
    return Completion(reasoning=reasoning, answer=answer, finish_reason=finish_reason, usage=usage, request=body,
                      chunks=chunks)
