"""Sweeps at serving scale: many requests in flight, failures kept as rows, and output that a
killed sweep resumes from. :func:`qwen35_lab.sampling.sweep` is the entry point; this module is
its engine.

A sweep is a list of rows keyed by ``(setting, prompt_index, sample)``, always returned in that
order, whatever order the answers came in.

**Served** (an :class:`~qwen35_lab.backends.OpenAIBackend`): up to ``concurrency`` requests in
flight on one ``httpx.AsyncClient``. With ``server="vllm"`` the samples of one prompt × setting go
out as one request with ``n`` choices (vLLM seeds choice i with ``seed + i``: exactly this sweep's
per-sample seeds; greedy settings, which vLLM refuses with n > 1, and other servers get one
request per sample). Retries are the backend's
(:class:`~qwen35_lab.backends.RetryPolicy`). A request that still fails (an HTTP 500 past the
retries, a timeout, a reply that is not a chat completion) becomes a row with its ``error`` and the
sweep goes on; the failures are summed up at the end. A server that keeps answering 429, refuses a
field, or cannot be reached stops the sweep: every later row would fail the same way.

**Local** (a ``Lab``): the rows are generated one after another, each with its own seed, as
:func:`~qwen35_lab.sampling.sample` does.

**Output** (``output="runs/colours.parquet"`` or ``.arrow``): rows stream as they arrive into
``<output>.partial/``, a shard (``part-NNNNNN.arrow``, written by ``datasets``' ``ArrowWriter``,
each shard atomic) every ``FLUSH_ROWS`` rows or ``FLUSH_SECONDS`` seconds, beside a
``manifest.json`` of what the sweep is (model, settings, prompts, n, seed, max_new_tokens). When
every row is there, they are written in order to ``output`` (atomically, with the manifest in the
file's schema metadata) and the partial folder goes. Running the same sweep with the same output
again skips the rows already there (failed rows are tried again) and finishes the rest; a
different sweep at that path is refused, naming the difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import numbers
import re
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features, List, Value

from . import checks
from ._io import atomic_file
from .sampler import (PARAMETERS, _checkpoint_defaults, _row, distinct_n, repeated_tokens, repetition_rate,
                       resolve, sample)

__all__ = ["DEFAULT_CONCURRENCY", "FEATURES", "FLUSH_ROWS", "FLUSH_SECONDS", "MAX_CONCURRENCY", "load_manifest"]

#: Requests in flight at most: beyond this a client spends its time scheduling, not waiting.
MAX_CONCURRENCY = 1024
#: Requests in flight when a served sweep does not say (a local one generates one row at a time).
DEFAULT_CONCURRENCY = 16
#: A shard is written after this many new rows …
FLUSH_ROWS = 256
#: … or this many seconds after the first unwritten row, whichever comes first.
FLUSH_SECONDS = 10.0

_POOL = 16  # connections per httpx client at most (see _serve)
FORMAT = "qwen35_lab.sweep/1"
_META_KEY = b"qwen35_lab.sweep"
_FLOAT, _INT, _BOOL, _STR = Value("float64"), Value("int64"), Value("bool"), Value("string")

#: The columns of every sweep, local or served (None where a value is unknown or a row failed).
FEATURES = Features({
    "prompt_index": _INT, "prompt": _STR, "setting": _INT, "preset": _STR,
    **{name: (_INT if name == "top_k" else _FLOAT) for name in PARAMETERS},
    "enable_thinking": _BOOL, "sample": _INT, "seed": _INT,
    "text": _STR, "ids": List(_INT), "reasoning": _STR, "answer": _STR, "finished": _BOOL,
    "finished_thinking": _BOOL, "prompt_tokens": _INT, "generated_tokens": _INT, "reasoning_tokens": _INT,
    "distinct_1": _FLOAT, "distinct_2": _FLOAT, "repetition_rate": _FLOAT, "repeated_tokens": _INT,
    "entropy": _FLOAT, "entropy_raw": _FLOAT, "thinking_loop": _BOOL, "error": _STR,
})
_KEY = ("setting", "prompt_index", "sample")


# ============================================================================ what a sweep is

def _jsonable(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise checks.BadType(f"a sweep setting must hold numbers, strings or booleans, got {value!r}")


def _digest(prompt) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def manifest(*, model: str, settings: list[dict], prompts: list, n: int, seed: int, max_new_tokens: int,
             chat: bool, loop_threshold: float) -> dict:
    """What identifies a sweep: resuming is allowed only into an output with the same manifest."""
    return {"format": FORMAT, "model": model,
            "settings": [{k: _jsonable(v) for k, v in s.items()} for s in settings],
            "n": n, "seed": seed, "max_new_tokens": max_new_tokens, "chat": chat, "loop_threshold": loop_threshold,
            "prompts": [_digest(p) for p in prompts]}


def _difference(stored: dict, wanted: dict) -> str | None:
    """The first way two manifests differ, in words (None: the same sweep)."""
    if stored.get("format") != wanted["format"]:
        return f"format: {stored.get('format')!r}, this sweep writes {wanted['format']!r}"
    if stored["model"] != wanted["model"]:
        return f"model: it holds {stored['model']!r}, this sweep runs {wanted['model']!r}"
    a, b = stored["settings"], wanted["settings"]
    if a != b:
        if len(a) != len(b):
            return (f"grid: it holds {len(a)} setting(s) ({_settings_text(a)}), this sweep has {len(b)} "
                    f"({_settings_text(b)})")
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        return f"grid: setting {i} is {a[i]} there, {b[i]} here"
    for name in ("n", "seed", "max_new_tokens", "chat", "loop_threshold"):
        if stored[name] != wanted[name]:
            return f"{name}: {stored[name]!r} there, {wanted[name]!r} here"
    a, b = stored["prompts"], wanted["prompts"]
    if len(a) != len(b):
        return f"prompts: it holds {len(a)}, this sweep has {len(b)}"
    if a != b:
        return f"prompts: prompt {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)} differs"
    return None


def _settings_text(settings: list[dict], most: int = 4) -> str:
    shown = ", ".join(json.dumps(s) for s in settings[:most])
    return shown + (f", … {len(settings) - most} more" if len(settings) > most else "")


def load_manifest(output) -> dict | None:
    """The manifest of the sweep stored at ``output`` (finished or partial), or None."""
    output = checks.check_path("output", output)
    partial = _partial_dir(output)
    if (partial / "manifest.json").is_file():
        return json.loads((partial / "manifest.json").read_text())
    if output.is_file():
        try:
            schema = _read_schema(output)
        except (pa.ArrowException, OSError) as e:
            raise checks.BadValue(f"output {str(output)!r} exists and is not a {output.suffix} file of a sweep "
                                  f"({type(e).__name__}: {e}); give a new path") from None
        if schema.metadata and _META_KEY in schema.metadata:
            return json.loads(schema.metadata[_META_KEY])
        raise checks.BadValue(f"output {str(output)!r} exists but holds no sweep (its schema has no "
                              f"{_META_KEY.decode()!r} metadata); give a new path")
    return None


# ============================================================================ the store

def _partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _read_schema(path: Path) -> pa.Schema:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(path)
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_stream(f).schema


def _read_table(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    with pa.OSFile(str(path)) as f:
        return pa.ipc.open_stream(f).read_all()


class _Store:
    """The rows of one sweep: kept in memory, and with an ``output`` streamed to disk (see the
    module docstring)."""

    def __init__(self, output: Path | None, wanted: dict):
        self.output, self.manifest = output, wanted
        self.schema = FEATURES.arrow_schema
        self.tables: list[pa.Table] = []  # rows read back or flushed, oldest first
        self.buffer: list[dict] = []
        self.first_unwritten = None
        self.flushes = 0
        self.partial = _partial_dir(output) if output is not None else None
        if output is None:
            return
        stored = load_manifest(output)
        if stored is not None:
            difference = _difference(stored, wanted)
            if difference is not None:
                held = " and ".join(repr(str(p)) for p in (output, self.partial) if p.exists())
                raise checks.BadValue(f"output {str(output)!r} holds a different sweep ({difference}); give another "
                                      f"output path, or delete {held} to start over")
        if output.is_file():
            self.tables.append(_read_table(output).select(list(self.schema.names)).cast(self.schema))
        if self.partial.is_dir():
            for stale in self.partial.glob(".*"):  # temporary files of a writer killed mid-shard
                stale.unlink(missing_ok=True)
            for shard in sorted(self.partial.glob("part-*.arrow")):
                self.tables.append(_read_table(shard).cast(self.schema))
            self.flushes = len(self.tables)

    def done(self) -> set[tuple]:
        """Keys of the rows stored without an error."""
        latest = {}
        for table in self.tables:
            keys = zip(*(table.column(k).to_pylist() for k in _KEY))
            for key, error in zip(keys, table.column("error").to_pylist()):
                latest[key] = error is None
        return {key for key, ok in latest.items() if ok}

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if self.output is None:
            return
        now = time.monotonic()
        if self.first_unwritten is None:
            self.first_unwritten = now
        if len(self.buffer) >= FLUSH_ROWS or now - self.first_unwritten >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one more shard (atomically), through ``datasets``' ArrowWriter."""
        if not self.buffer:
            return
        if self.output is None:
            self.tables.append(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.buffer = []
            return
        from datasets.arrow_writer import ArrowWriter

        self.partial.mkdir(parents=True, exist_ok=True)
        if not (self.partial / "manifest.json").is_file():
            with atomic_file(self.partial / "manifest.json", "w") as f:
                json.dump(self.manifest, f)
        shard = self.partial / f"part-{self.flushes:06d}.arrow"
        with atomic_file(shard) as f:
            writer = ArrowWriter(features=FEATURES, stream=pa.PythonFile(f, mode="w"))
            writer.write_batch(_columns(self.buffer))
            writer.finalize(close_stream=False)
        self.flushes += 1
        self.tables.append(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer, self.first_unwritten = [], None

    def finish(self) -> Dataset:
        """Every row, one per key (the latest), in key order; with an output, written there."""
        self.flush()
        table = pa.concat_tables(self.tables) if self.tables else self.schema.empty_table()
        keys = list(zip(*(table.column(k).to_pylist() for k in _KEY)))
        latest = {key: i for i, key in enumerate(keys)}
        table = table.take([latest[key] for key in sorted(latest)])
        if self.output is None:
            return Dataset(_in_memory(table))
        if self.partial.is_dir() or not self.output.is_file():
            metadata = {**(self.schema.metadata or {}), _META_KEY: json.dumps(self.manifest).encode()}
            table = table.replace_schema_metadata(metadata)
            with atomic_file(self.output) as f:
                if self.output.suffix == ".parquet":
                    import pyarrow.parquet as pq

                    pq.write_table(table, f)
                else:
                    with pa.ipc.new_stream(f, table.schema) as writer:
                        writer.write_table(table)
            shutil.rmtree(self.partial, ignore_errors=True)
        if self.output.suffix == ".arrow":
            return Dataset.from_file(str(self.output))  # memory-mapped
        return Dataset(_in_memory(table))


def _columns(rows: list[dict]) -> dict:
    return {name: [row.get(name) for row in rows] for name in FEATURES}


def _in_memory(table: pa.Table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


# ============================================================================ running it

@dataclass
class _Job:
    """One request: a prompt × setting and the samples it asks for (several with the server's ``n``)."""

    setting: int
    prompt_index: int
    samples: list[int]


def _jobs(pending: list[tuple], batch: set[int]) -> list[_Job]:
    """The pending keys, in key order, as requests; for the settings in ``batch``, runs of
    consecutive samples of one prompt × setting share a request."""
    jobs: list[_Job] = []
    for s, p, j in pending:
        last = jobs[-1] if jobs else None
        if s in batch and last and (last.setting, last.prompt_index) == (s, p) and last.samples[-1] == j - 1:
            last.samples.append(j)
        else:
            jobs.append(_Job(s, p, [j]))
    return jobs


def run(lab, prompts: list, settings: list[dict], *, n: int, seed: int, max_new_tokens: int, chat: bool,
        progress: bool, loop_threshold: float, concurrency: int, output: Path | None) -> Dataset:
    """Run (or finish) a sweep whose arguments :func:`~qwen35_lab.sampling.sweep` has checked."""
    from tqdm.auto import tqdm

    from .backends import OpenAIBackend

    remote = isinstance(lab, OpenAIBackend)
    wanted = manifest(model=_model_name(lab, remote) if output is not None else "", settings=settings,
                      prompts=prompts, n=n, seed=seed, max_new_tokens=max_new_tokens, chat=chat,
                      loop_threshold=loop_threshold)
    store = _Store(output, wanted)
    done = store.done()
    keys = [(s, p, j) for s in range(len(settings)) for p in range(len(prompts)) for j in range(n)]
    pending = [k for k in keys if k not in done]
    bar = tqdm(total=len(keys), initial=len(keys) - len(pending), desc="sweep", unit="row", disable=not progress)
    failures: list[str] = []
    try:
        if remote:
            from .backends import run_sync

            # vLLM's n: choice i is seeded seed + i, as sample i here; greedy requests must have n = 1
            batch = {i for i, s in enumerate(settings) if lab.server == "vllm" and not resolve(s)[0].greedy}

            run_sync(_serve(lab, prompts, settings, _jobs(pending, batch), store, bar, failures, seed=seed,
                            max_new_tokens=max_new_tokens, loop_threshold=loop_threshold, concurrency=concurrency))
        else:
            resolved = [resolve(s, defaults=_checkpoint_defaults(lab.model)) for s in settings]
            for s, p, j in pending:
                params, enable_thinking, _ = resolved[s]
                row = _row(settings[s], params, enable_thinking, p, prompts[p], j, seed + j)
                got = sample(lab, prompts[p], max_new_tokens=max_new_tokens, seed=seed + j, chat=chat, **settings[s])
                row.update(setting=s, enable_thinking=got.enable_thinking, text=got.text, ids=list(got.ids),
                           reasoning=got.reasoning, answer=got.answer, finished=got.finished,
                           finished_thinking=got.finished_thinking, prompt_tokens=got.prompt_tokens,
                           generated_tokens=len(got.ids), reasoning_tokens=got.reasoning_tokens,
                           **got.metrics(loop_threshold=loop_threshold), entropy=got.entropy,
                           entropy_raw=got.entropy_raw, error=None)
                store.add(row)
                bar.update(1)
    except BaseException as e:
        store.flush()  # nothing done is lost
        if output is not None and hasattr(e, "add_note"):
            e.add_note(f"{len(store.done())} of {len(keys)} rows are saved in {str(store.partial)!r}; run the "
                       f"same sweep with output={str(output)!r} again to finish it")
        raise
    finally:
        bar.close()
    rows = store.finish()
    if failures:
        common = "; ".join(f"{count} × {text}" for text, count in Counter(failures).most_common(3))
        again = (f"Run the same sweep with output={str(output)!r} again to retry only them" if output is not None
                 else "With an output= path, running the sweep again retries only them")
        warnings.warn(f"{len(failures)} of {len(pending)} row(s) failed and are kept with their error in the "
                      f"'error' column ({common}). {again}.", RuntimeWarning, stacklevel=3)
    return rows


def _model_name(lab, remote: bool) -> str:
    if not remote:
        return str(lab.name)
    if lab.model is not None:
        return lab.model
    served = lab.models()
    return served[0] if served else lab.base_url


async def _serve(backend, prompts, settings, jobs: list[_Job], store: _Store, bar, failures: list, *, seed: int,
                 max_new_tokens: int, loop_threshold: float, concurrency: int) -> None:
    """Up to ``concurrency`` requests in flight; each answer's rows go to the store as they come."""
    from .tokenizer import get_tokenizer

    todo = iter(jobs)
    resolved = [resolve(s) for s in settings]
    tokenizer = get_tokenizer()  # the served texts are counted with it

    async def worker(client):
        for job in todo:  # one shared iterator: each job is taken once
            for row in await _served_rows(backend, client, job, prompts, settings, resolved, tokenizer, seed=seed,
                                          max_new_tokens=max_new_tokens, loop_threshold=loop_threshold):
                store.add(row)
                if row["error"] is not None:
                    failures.append(_gist(row["error"]))
                    bar.set_postfix(failed=len(failures), refresh=False)
                bar.update(1)

    workers = min(concurrency, len(jobs))
    # httpcore checks every pooled connection on every request: pools of at most _POOL connections
    # keep that cost flat as the concurrency grows (one pool of 64 ran at less than half the rate)
    pools = -(-workers // _POOL)
    sizes = [len(range(i, workers, pools)) for i in range(pools)]  # worker i uses client i % pools
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(backend.async_client(size)) for size in sizes]
        tasks = [asyncio.create_task(worker(clients[i % pools])) for i in range(workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _gist(error: str, most: int = 80) -> str:
    """An error without its URL, timings and details, so that alike failures are counted together."""
    text = re.sub(r"the server at \S+ |the connection to \S+ | in [\d.]+ s\b", "", error)
    text = re.split(r" \(|; |\. ", text, maxsplit=1)[0]
    return text[:most] + ("…" if len(text) > most else "")


async def _served_rows(backend, client, job: _Job, prompts, settings, resolved, tokenizer, *, seed: int,
                       max_new_tokens: int, loop_threshold: float) -> list[dict]:
    from .backends import BackendError, RateLimited, ServerUnreachableError, UnsupportedFieldError

    prompt, setting = prompts[job.prompt_index], settings[job.setting]
    params, enable_thinking, _ = resolved[job.setting]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    first = job.samples[0]
    body = backend.request_body(messages, max_tokens=max_new_tokens, seed=seed + first, n=len(job.samples),
                                **setting)
    try:
        completions = await backend.complete(body, client=client)
        error = None
    except (UnsupportedFieldError, RateLimited, ServerUnreachableError):
        raise  # every later request would fail the same way: stop
    except (BackendError, checks.TimedOut) as e:
        completions, error = [None] * len(job.samples), f"{type(e).__name__}: {e}"
    rows = []
    for j, completion in zip(job.samples, completions):
        row = _row(setting, params, enable_thinking, job.prompt_index, prompt, j, seed + j)
        row.update({name: body.get(name) for name in PARAMETERS})  # what the server was told (None: its default)
        row.update(setting=job.setting, error=error)
        if completion is not None:
            row.update(_served_measures(completion, tokenizer, loop_threshold, shared_usage=len(job.samples) > 1))
        rows.append(row)
    return rows


def _served_measures(result, tok, loop_threshold: float, *, shared_usage: bool) -> dict:
    """A served completion's measures (tokens counted with ``tok``, the Qwen3.5 tokenizer).
    ``shared_usage``: the server's token counts cover several choices, so the count of this one is
    the tokenizer's."""
    reasoning_ids = tok(result.reasoning or "", add_special_tokens=False)["input_ids"]
    ids = reasoning_ids + tok(result.answer, add_special_tokens=False)["input_ids"]
    finished = result.finish_reason == "stop"
    unfinished_thinking = result.reasoning is not None and not result.answer and not finished
    rate = repetition_rate(ids, 4)
    usage = result.usage or {}
    generated = len(ids) if shared_usage else int(usage.get("completion_tokens", len(ids)))
    return {"text": result.text, "ids": ids, "reasoning": result.reasoning, "answer": result.answer,
            "finished": finished, "finished_thinking": not unfinished_thinking,
            "prompt_tokens": int(usage.get("prompt_tokens", -1)), "generated_tokens": generated,
            "reasoning_tokens": len(reasoning_ids) if result.reasoning is not None else 0,
            "distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2), "repetition_rate": rate,
            "repeated_tokens": repeated_tokens(ids), "entropy": math.nan, "entropy_raw": math.nan,
            "thinking_loop": bool(unfinished_thinking and rate >= loop_threshold)}
