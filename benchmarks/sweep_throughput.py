"""Throughput of served sweeps: concurrency against a server that batches, and the cost of the
resumable writer.

* ``concurrency`` — rows per second of ``sampling.sweep(backend, ..., concurrency=N)`` for N in
  1, 4, 16, 64, against the local fake OpenAI server (``python -m qwen35_lab.testing``, its own
  process) that answers each request after a fixed ``latency`` and serves up to ``capacity`` at
  once, like an engine whose batch holds C sequences. Goal: rows/s >= 0.8 × min(N, C) × the
  single-request rate. One request per row (``server="sglang"``), plus one run with vLLM's ``n``
  (several rows per request).
* ``writer`` — seconds per row that streaming rows to a Parquet file costs over keeping them in
  memory (``sweeps._Store``: shards through datasets' ArrowWriter, then the final file), with the
  default shard size and with a shard per row (the worst case); and the same sweep end to end with
  and without ``output=``.
* ``transformers_serve`` — one run against a real ``transformers serve`` of the ``tiny`` organism
  on CPU (started as tests/test_backends.py starts it), concurrency 1 and 4.

Prints a table and writes ``benchmarks/results/sweep_throughput.json``.

    python benchmarks/sweep_throughput.py              # latency 0.1 s, capacity 16
    python benchmarks/sweep_throughput.py --parts serve      # one part, merged into the JSON there
    python benchmarks/sweep_throughput.py --quick      # fewer rows, no transformers serve
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# This folder holds kernels.py; keep it off the import path so transformers' probe for HF's
# `kernels` package does not find it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import httpx  # noqa: E402

from qwen35_lab import sampling, sweeps  # noqa: E402
from qwen35_lab._io import atomic_file  # noqa: E402
from qwen35_lab.backends import OpenAIBackend  # noqa: E402
from qwen35_lab.tokenizer import get_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRID = {"temperature": [0.7]}


def start_fake_server(latency: float, capacity: int, lifetime: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "qwen35_lab.testing", "--latency", str(latency), "--capacity",
                             str(capacity), "--lifetime", str(lifetime)], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"the fake server did not start (it printed {url!r})")
    return proc, url


def rows_per_second(backend, rows: int, concurrency: int, *, n: int = 1, output=None) -> float:
    prompts = [f"Question {i}: name three colours." for i in range(rows // n)]
    start = time.perf_counter()
    result = sampling.sweep(backend, prompts, grid=GRID, n=n, concurrency=concurrency, progress=False,
                            output=output)
    seconds = time.perf_counter() - start
    assert len(result) == rows and all(r["error"] is None for r in result)
    return rows / seconds


def bench_concurrency(args) -> dict:
    proc, url = start_fake_server(args.latency, args.capacity, lifetime=1800)
    try:
        backend = OpenAIBackend(url, model="fake/qwen3.5", server="sglang")  # one request per row
        vllm = OpenAIBackend(url, model="fake/qwen3.5", server="vllm")  # n rows per request
        rows_per_second(backend, 16, 16)  # warm: tokenizer, connections
        single = 1.0 / args.latency
        out = {"latency_s": args.latency, "capacity": args.capacity, "ideal_single_rows_per_s": single, "runs": []}
        for concurrency in (1, 4, 16, 64):
            # about args.seconds of requests at the ideal rate
            rows = max(8, int(args.seconds * min(concurrency, args.capacity) * single))
            rates = [rows_per_second(backend, rows, concurrency) for _ in range(args.repeats)]
            out["runs"].append({"concurrency": concurrency, "rows": rows, "rows_per_s": rates,
                                "median_rows_per_s": statistics.median(rates)})
        base = out["runs"][0]["median_rows_per_s"]
        for run in out["runs"]:
            run["goal_rows_per_s"] = 0.8 * min(run["concurrency"], args.capacity) * base
            run["speedup"] = run["median_rows_per_s"] / base
            run["goal_met"] = run["median_rows_per_s"] >= run["goal_rows_per_s"]
        rows = max(8, int(args.seconds * args.capacity * single)) // 4 * 4
        rates = [rows_per_second(vllm, rows, args.capacity, n=4) for _ in range(args.repeats)]
        out["vllm_n4"] = {"concurrency": args.capacity, "n": 4, "rows": rows, "rows_per_s": rates,
                          "median_rows_per_s": statistics.median(rates),
                          "note": "4 rows per request: up to 4 × the rows/s of one request per row"}
        with tempfile.TemporaryDirectory() as tmp:
            rows = max(8, int(args.seconds * args.capacity * single))
            plain = [rows_per_second(backend, rows, args.capacity) for _ in range(args.repeats)]
            written = [rows_per_second(backend, rows, args.capacity, output=Path(tmp) / f"r{i}.parquet")
                       for i in range(args.repeats)]
        out["end_to_end_output"] = {"concurrency": args.capacity, "rows": rows,
                                    "median_rows_per_s_in_memory": statistics.median(plain),
                                    "median_rows_per_s_to_parquet": statistics.median(written)}
        return out
    finally:
        proc.kill()
        proc.wait()


def _served_row(i: int) -> dict:
    """A row as a served sweep writes it (short texts, a few dozen ids)."""
    text = f"Question {i}: name three colours. | Red, green and blue are three colours; seed={i}"
    return {"prompt_index": i, "prompt": f"Question {i}: name three colours.", "setting": 0, "preset": None,
            "temperature": 0.7, "top_p": None, "top_k": None, "min_p": None, "presence_penalty": None,
            "frequency_penalty": None, "repetition_penalty": None, "enable_thinking": None, "sample": 0, "seed": i,
            "text": text, "ids": list(range(i, i + 30)), "reasoning": None, "answer": text, "finished": True,
            "finished_thinking": True, "prompt_tokens": 12, "generated_tokens": 30, "reasoning_tokens": 0,
            "distinct_1": 1.0, "distinct_2": 1.0, "repetition_rate": 0.0, "repeated_tokens": 0,
            "entropy": float("nan"), "entropy_raw": float("nan"), "thinking_loop": False, "error": None}


def _store_seconds(rows: list[dict], output) -> float:
    manifest = sweeps.manifest(model="m", settings=[{"temperature": 0.7}], prompts=[r["prompt"] for r in rows], n=1, seed=0,
                               max_new_tokens=64, chat=True, loop_threshold=0.3)
    start = time.perf_counter()
    store = sweeps._Store(output, manifest)
    for row in rows:
        store.add(row)
    store.finish()
    return time.perf_counter() - start


def bench_writer(args) -> dict:
    n = args.writer_rows
    rows = [_served_row(i) for i in range(n)]
    out = {"rows": n, "flush_rows_default": sweeps.FLUSH_ROWS, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, flush in (("default_shards", sweeps.FLUSH_ROWS), ("shard_per_row", 1)):
            sweeps.FLUSH_ROWS = flush
            count = n if flush > 1 else min(n, 500)
            memory = [_store_seconds(rows[:count], None) for _ in range(args.repeats)]
            disk = [_store_seconds(rows[:count], Path(tmp) / f"{label}{i}.parquet") for i in range(args.repeats)]
            out["runs"][label] = {"flush_rows": flush, "rows": count,
                                  "median_s_in_memory": statistics.median(memory),
                                  "median_s_to_parquet": statistics.median(disk),
                                  "overhead_us_per_row": 1e6 * (statistics.median(disk) - statistics.median(memory))
                                  / count}
        sweeps.FLUSH_ROWS = out["flush_rows_default"]
    return out


def bench_transformers_serve(args) -> dict:
    """`transformers serve` of the tiny organism, started as tests/test_backends.py starts it (tests/serving.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from serving import transformers_serve

    out = {"model": "tiny organism (data/organisms/tiny), float32, CPU", "max_new_tokens": args.serve_tokens,
           "runs": []}
    with tempfile.TemporaryDirectory() as tmp, transformers_serve(Path(tmp)) as url:
        backend = OpenAIBackend(url, server="transformers")
        prompts = [f"Question {i}: name three colours." for i in range(args.serve_rows)]
        grid = {"temperature": [0.0], "enable_thinking": [False]}
        sampling.sweep(backend, prompts[:2], grid=grid, max_new_tokens=4, progress=False)  # warm
        for concurrency in (1, 4):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                rows = sampling.sweep(backend, prompts, grid=grid, max_new_tokens=args.serve_tokens,
                                      concurrency=concurrency, progress=False)
            seconds = time.perf_counter() - start
            out["runs"].append({"concurrency": concurrency, "rows": len(rows), "seconds": seconds,
                                "rows_per_s": len(rows) / seconds,
                                "generated_tokens": int(sum(r["generated_tokens"] for r in rows))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", type=float, default=0.1, help="seconds the fake server takes per request")
    ap.add_argument("--capacity", type=int, default=16, help="requests the fake server serves at once")
    ap.add_argument("--seconds", type=float, default=3.0, help="about how long each throughput run lasts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writer-rows", type=int, default=5000)
    ap.add_argument("--serve-rows", type=int, default=8)
    ap.add_argument("--serve-tokens", type=int, default=16)
    ap.add_argument("--parts", default="concurrency,writer,serve",
                    help="comma-separated parts to run; the others are kept from the JSON at --out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "sweep_throughput.json"))
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeats, args.writer_rows = 1.0, 1, 1000
    get_tokenizer()  # built once, before any timing

    parts = set(args.parts.split(","))
    unknown = parts - {"concurrency", "writer", "serve"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; valid: concurrency, writer, serve")
    result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() and parts != {
        "concurrency", "writer", "serve"} else {}
    result.update({"benchmark": "sweep_throughput", "cpu": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "python": platform.python_version(), "httpx": httpx.__version__,
                   "note": "client and fake server share the machine's cores with other work; medians of repeats",
                   "notes": {
                       "concurrency": "one request per row; goal_rows_per_s = 0.8 x min(concurrency, capacity) x "
                                      "the measured concurrency-1 rate",
                       "writer": "overhead of streaming rows to Parquet over keeping them in memory: shards of "
                                 "FLUSH_ROWS rows (each an atomic file, fsynced), then the final file; "
                                 "shard_per_row is the worst case",
                       "transformers_serve": "transformers serve as the test fixture starts it (no "
                                             "--continuous-batching) generates one request at a time on CPU, so "
                                             "concurrency cannot raise its rate; vLLM / SGLang batch"}})
    if "concurrency" in parts:
        result["concurrency"] = bench_concurrency(args)
    if "writer" in parts:
        result["writer"] = bench_writer(args)
    if "serve" in parts and not args.quick:
        result["transformers_serve"] = bench_transformers_serve(args)

    with atomic_file(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    c = result.get("concurrency")
    if c is None:
        ap.error("no concurrency results yet: run the concurrency part first")
    print(f"fake server: latency {c['latency_s']} s, capacity {c['capacity']}")
    print(f"{'concurrency':>11} {'rows':>6} {'rows/s':>8} {'goal':>8} {'speedup':>8}  met")
    for run in c["runs"]:
        print(f"{run['concurrency']:>11} {run['rows']:>6} {run['median_rows_per_s']:>8.1f} "
              f"{run['goal_rows_per_s']:>8.1f} {run['speedup']:>8.2f}  {run['goal_met']}")
    v = c["vllm_n4"]
    print(f"vLLM profile, n=4, concurrency {v['concurrency']}: {v['median_rows_per_s']:.1f} rows/s")
    e = c["end_to_end_output"]
    print(f"end to end, concurrency {e['concurrency']}: {e['median_rows_per_s_in_memory']:.1f} rows/s in memory, "
          f"{e['median_rows_per_s_to_parquet']:.1f} rows/s to Parquet")
    for label, run in result.get("writer", {}).get("runs", {}).items():
        print(f"writer ({label}, {run['rows']} rows): {run['overhead_us_per_row']:.0f} µs per row over memory")
    for run in result.get("transformers_serve", {}).get("runs", []):
        print(f"transformers serve (tiny, CPU), concurrency {run['concurrency']}: {run['rows_per_s']:.2f} rows/s "
              f"({run['rows']} rows of {args.serve_tokens} tokens in {run['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
