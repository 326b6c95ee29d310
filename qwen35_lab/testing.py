"""A local OpenAI-compatible server for tests and benchmarks: fixed latency, a cap on requests in
flight, and scripted faults.

>>> with FakeServer(latency=0.05, capacity=16) as server:            # http://127.0.0.1:PORT/v1
...     rows = sampling.sweep(OpenAIBackend(server.url), prompts, grid=grid, concurrency=16)
>>> FakeServer(script={"colours": ["429", "reset", "html"]})      # the first three requests about colours

It stands in for vLLM where none runs: each request waits ``latency`` seconds while holding one
of ``capacity`` slots (further requests queue, as in an engine whose batch is full), then gets an
answer made from the request itself, so tests can check what was asked:

    ``answer``  ``"<prompt> | seed=<seed + i> T=<temperature>"`` for choice ``i`` of ``n``
                (vLLM seeds choice i with ``seed + i``, and refuses n > 1 when greedy);
    ``reasoning`` ``"thinking about <prompt>"`` when ``chat_template_kwargs.enable_thinking``.

``script`` maps a piece of the last user message (``"*"``: any request) to the faults the next
matching requests get, in order; after them, requests are answered normally:

    ``"429"``, ``"500"``, ``"502"``, ``"503"`` …  that HTTP status with an OpenAI error body
    ``"reset"``      the connection is cut before any answer
    ``"html"``       HTTP 200 with a proxy's HTML error page
    ``"bad-types"``  HTTP 200 whose ``choices[0].message.content`` is a number
    ``"no-choices"`` HTTP 200 ``{"object": "chat.completion"}``
    ``"no-data"``    a stream (``text/event-stream``) with comments but no ``data:`` line
    ``"stall"``      no answer for ``stall`` seconds (longer than a client's timeout)

It binds 127.0.0.1 only, and stops by itself: after ``max_requests`` requests or ``lifetime``
seconds, whichever comes first; each connection serves a bounded number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time

from . import checks

__all__ = ["FakeServer"]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
_HTML = (b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
         b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n")
_FAULTS = ("reset", "html", "bad-types", "no-choices", "no-data", "stall")
_PER_CONNECTION = 10_000  # requests one keep-alive connection may carry


class FakeServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (see the module docstring).

    Use it as a context manager (or :meth:`start` / :meth:`stop`); ``url`` is its API root.
    ``requests`` lists the JSON bodies received, in arrival order.
    """

    def __init__(self, *, latency: float = 0.0, capacity: int | None = None, script: dict | None = None,
                 stall: float = 30.0, model: str = "fake/qwen3.5", reasoning_key: str = "reasoning",
                 max_requests: int = 100_000, lifetime: float = 600.0, port: int = 0):
        self.latency = checks.check_float("latency", latency, lo=0)
        self.capacity = None if capacity is None else checks.check_int("capacity", capacity, lo=1)
        self.stall = checks.check_float("stall", stall, lo=0)
        self.model = checks.check_str("model", model)
        self.reasoning_key = checks.check_choice("reasoning_key", reasoning_key, ("reasoning", "reasoning_content"))
        self.max_requests = checks.check_int("max_requests", max_requests, lo=1)
        self.lifetime = checks.check_float("lifetime", lifetime, lo=0, lo_open=True)
        self.port = checks.check_int("port", port, lo=0, hi=65535)
        self.script = {}
        for key, faults in (script or {}).items():
            checks.check_str("script key", key)
            for fault in faults:
                if not (fault in _FAULTS or (isinstance(fault, str) and fault.isdigit() and 400 <= int(fault) < 600)):
                    raise checks.BadValue(f"unknown fault {fault!r} in script[{key!r}]; valid: an HTTP error "
                                          f"status as a string ('429', '503' …) or one of {', '.join(_FAULTS)}")
            self.script[key] = list(faults)
        self.requests: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self._loop = self._thread = self._server = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ---------------------------------------------------------------- life cycle
    def start(self) -> FakeServer:
        self._thread = threading.Thread(target=self._run, name="FakeServer", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._finish.set)
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # reported to start()
            self._error = e
            self._started.set()

    async def serve_forever(self) -> None:
        """Serve in the running event loop (the command line's way) until it stops by itself."""
        await self._serve()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._finish = asyncio.Event()
        self._slots = asyncio.Semaphore(self.capacity) if self.capacity else None
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await asyncio.wait_for(self._finish.wait(), timeout=self.lifetime)
        except asyncio.TimeoutError:
            pass
        finally:
            self._server.close()
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()

    # ---------------------------------------------------------------- HTTP
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(_PER_CONNECTION):
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, body = request
                if len(self.requests) >= self.max_requests:
                    self._finish.set()
                    break
                keep = await self._answer(method, path, body, writer)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str, raw: bytes, writer) -> bool:
        if method == "GET" and path.rstrip("/").endswith("/models"):
            _write(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
            return True
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            _write(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return True
        try:
            body = json.loads(raw)
            prompt = _last_user_text(body["messages"])
        except (ValueError, KeyError, TypeError) as e:
            _write(writer, 400, {"error": {"message": f"bad request body: {e}"}})
            return True
        self.requests.append(body)
        if int(body.get("n", 1)) > 1 and body.get("temperature") == 0:  # as vLLM's SamplingParams
            _write(writer, 400, {"error": {"message": f"n must be 1 when using greedy sampling, got {body['n']}."}})
            return True
        fault = self._next_fault(prompt)
        if fault == "reset":
            writer.transport.abort()
            return False
        if fault == "stall":
            await asyncio.sleep(self.stall)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self._slots is not None:
                async with self._slots:
                    await asyncio.sleep(self.latency)
            elif self.latency:
                await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        if fault is not None and fault.isdigit():
            _write(writer, int(fault), {"error": {"message": f"scripted HTTP {fault}", "code": int(fault)}})
            return True
        if fault == "html":
            _write(writer, 200, _HTML, content_type="text/html")
            return True
        if fault == "bad-types":
            _write(writer, 200, {"object": "chat.completion", "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": 42}}]})
            return True
        if fault == "no-choices":
            _write(writer, 200, {"object": "chat.completion"})
            return True
        if body.get("stream") or fault == "no-data":
            await self._stream(writer, body, prompt, fault == "no-data")
            return False
        _write(writer, 200, self.completion(body, prompt))
        return True

    def _next_fault(self, prompt: str) -> str | None:
        for key, faults in self.script.items():
            if faults and (key == "*" or key in prompt):
                return faults.pop(0)
        return None

    def completion(self, body: dict, prompt: str) -> dict:
        """The answer to ``body`` (one choice per ``n``), as described in the module docstring."""
        n, seed = int(body.get("n", 1)), body.get("seed")
        thinking = (body.get("chat_template_kwargs") or {}).get("enable_thinking")
        choices, words = [], 0
        for i in range(n):
            answer = f"{prompt} | seed={None if seed is None else seed + i} T={body.get('temperature')}"
            message = {"role": "assistant", "content": answer}
            if thinking:
                message[self.reasoning_key] = f"thinking about {prompt}"
            words += len(answer.split()) + (len(message.get(self.reasoning_key, "").split()) if thinking else 0)
            choices.append({"index": i, "finish_reason": "stop", "message": message})
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "model": self.model,
                "created": int(time.time()), "choices": choices,
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": words,
                          "total_tokens": len(prompt.split()) + words}}

    async def _stream(self, writer, body: dict, prompt: str, without_data: bool) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        if without_data:
            writer.write(b": keep-alive\n\nevent: ping\n\n")
        else:
            message = self.completion({**body, "n": 1}, prompt)["choices"][0]["message"]
            deltas = [{"role": "assistant"}]
            if self.reasoning_key in message:
                deltas.append({self.reasoning_key: message[self.reasoning_key]})
            deltas += [{"content": word + " "} for word in message["content"].split()]
            for i, delta in enumerate(deltas):
                choice = {"index": 0, "delta": delta, "finish_reason": "stop" if i == len(deltas) - 1 else None}
                writer.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            writer.write(b"data: [DONE]\n\n")
        await writer.drain()


async def _read_request(reader: asyncio.StreamReader):
    """``(method, path, body)`` of the next HTTP/1.1 request, or None when the client closed."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path = lines[0].split(" ")[:2]
    headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    length = int({k.strip().lower(): v.strip() for k, v in headers.items()}.get("content-length", 0))
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def _write(writer, status: int, payload, *, content_type: str = "application/json") -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n".encode() + data)


def _last_user_text(messages) -> str:
    content = [m for m in messages if m.get("role") == "user"][-1]["content"]
    if isinstance(content, list):
        content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def main(argv=None) -> None:
    """``python -m qwen35_lab.testing --latency 0.1 --capacity 16``: serve until ``--lifetime`` ends;
    prints the API root on its first line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    server = FakeServer(latency=args.latency, capacity=args.capacity, lifetime=args.lifetime,
                        max_requests=args.max_requests)

    async def run():
        task = asyncio.create_task(server.serve_forever())
        await asyncio.to_thread(server._started.wait, 30)
        print(server.url, flush=True)
        await task

    asyncio.run(run())
    sys.exit(0)


if __name__ == "__main__":
    main()
