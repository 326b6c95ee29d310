"""Sweeps at serving scale: concurrency that keeps the rows and seeds of a sequential sweep, vLLM's n,
failed rows, datasets as prompts, and output that a sweep killed with SIGKILL resumes from.

The served sweeps run against the local FakeServer, whose answers spell out what was asked
(``"<prompt> | seed=<seed> T=<temperature>"``), so every row is checked against its own key; one
sweep runs against a real `transformers serve` (the fixture of test_backends) and is checked
against local greedy generation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest
from datasets import Dataset

from qwen35_lab import checks, sweeps
from qwen35_lab import sampling as S
from qwen35_lab.backends import OpenAIBackend, RateLimited, RetryPolicy
from qwen35_lab.testing import FakeServer

from test_backends import served  # noqa: F401  (the `transformers serve` fixture, started once here too)

PROMPTS = [f"Name {i} colours." for i in range(1, 6)]
GRID = {"temperature": [0.5, 1.0]}
FAST = RetryPolicy(retries=2, backoff=0.01, max_backoff=0.05, budget=10)


def _backend(server: FakeServer, profile: str = "sglang", **kwargs) -> OpenAIBackend:
    return OpenAIBackend(server.url, server=profile, **{"model": "fake/qwen3.5", "retry": FAST, **kwargs})


def _frame(rows) -> pd.DataFrame:
    return rows.to_pandas()


def _expected_answer(row) -> str:
    """What the FakeServer answers for this row's key: the sweep's seeds are seed + sample."""
    return f"{row['prompt']} | seed={row['seed']} T={row['temperature']}"


# ============================================================================ concurrency

def test_concurrent_rows_are_the_sequential_rows():
    with FakeServer(latency=0.2) as server:
        concurrent = S.sweep(_backend(server), PROMPTS, grid=GRID, n=2, seed=10, concurrency=4, progress=False)
        assert server.most_in_flight == 4  # four at once, never more
        server.most_in_flight = 0
        sequential = S.sweep(_backend(server), PROMPTS, grid=GRID, n=2, seed=10, concurrency=1, progress=False)
        assert server.most_in_flight == 1
    pd.testing.assert_frame_equal(_frame(concurrent), _frame(sequential))
    df = _frame(concurrent)
    keys = list(zip(df.setting, df.prompt_index, df["sample"]))
    assert keys == [(s, p, j) for s in range(2) for p in range(5) for j in range(2)]  # the sweep's order
    assert (df.seed == 10 + df["sample"]).all() and df.error.isna().all()
    assert all(row["answer"] == _expected_answer(row) for row in concurrent)
    assert len(server.requests) == 2 * 20 and all("n" not in body for body in server.requests)


def test_vllm_gets_a_settings_samples_as_n_and_the_same_rows():
    """vLLM seeds choice i of a request with seed + i (vllm/v1/engine/parallel_sampling.py,
    ParentRequest._get_child_sampling_params), the sweep's per-sample seeds; greedy requests
    must keep n = 1 (SamplingParams._verify_greedy_sampling)."""
    grid = {"temperature": [0.0, 0.7]}
    with FakeServer(latency=0.01) as server:
        batched = S.sweep(_backend(server, "vllm"), PROMPTS, grid=grid, n=3, seed=4, concurrency=8, progress=False)
        bodies = list(server.requests)
        single = S.sweep(_backend(server, "sglang"), PROMPTS, grid=grid, n=3, seed=4, concurrency=8, progress=False)
    sampled = [b for b in bodies if b["temperature"] == 0.7]
    greedy = [b for b in bodies if b["temperature"] == 0.0]
    assert len(sampled) == 5 and all(b["n"] == 3 and b["seed"] == 4 for b in sampled)
    assert len(greedy) == 15 and all("n" not in b for b in greedy)
    pd.testing.assert_frame_equal(_frame(batched).drop(columns=["generated_tokens"]),
                                  _frame(single).drop(columns=["generated_tokens"]))
    assert all(row["answer"] == _expected_answer(row) for row in batched)
    df = _frame(batched)
    # one choice of several: its own tokens, counted with the tokenizer (the server's usage is for all n)
    assert (df[df.temperature == 0.7].generated_tokens == df[df.temperature == 0.7].ids.map(len)).all()


def test_prompts_from_a_dataset_column():
    data = Dataset.from_dict({"id": list(range(5)), "question": PROMPTS})
    with FakeServer() as server:
        from_data = S.sweep(_backend(server), data, column="question", grid=GRID, progress=False)
        from_list = S.sweep(_backend(server), PROMPTS, grid=GRID, progress=False)
        pd.testing.assert_frame_equal(_frame(from_data), _frame(from_list))
        with pytest.raises(checks.BadValue, match=r"unknown column 'questions'; valid: 'id', 'question'"):
            S.sweep(_backend(server), data, column="questions", grid=GRID, progress=False)
        with pytest.raises(checks.BadValue, match=r"name the column that holds them.*its columns: id, question"):
            S.sweep(_backend(server), data, grid=GRID, progress=False)
        with pytest.raises(checks.BadValue, match=r"prompt 0 is 0; a prompt is a non-empty str"):
            S.sweep(_backend(server), data, column="id", grid=GRID, progress=False)
        assert len(server.requests) == 20  # the refused sweeps sent nothing


# ============================================================================ failures

def test_a_failed_row_is_kept_with_its_error_and_summed_up(capsys):
    script = {"Name 2 ": ["500"] * 3, "Name 4 ": ["html"]}  # prompts 1 and 3: one request each
    with FakeServer(script=script) as server:
        with pytest.warns(RuntimeWarning, match=r"2 of 5 row\(s\) failed .*'error' column \(1 × (BadReply: sent a "
                                                r"body that is not JSON; 1 × BackendError: answered HTTP 500 to all 3 "
                                                r"tries|BackendError: answered HTTP 500 to all 3 tries; 1 × BadReply: "
                                                r"sent a body that is not JSON)\)"):
            rows = S.sweep(_backend(server), PROMPTS, grid={"temperature": [0.5]}, concurrency=3)
    df = _frame(rows)
    failed = df[df.error.notna()]
    assert list(zip(failed.setting, failed.prompt_index)) == [(0, 1), (0, 3)]
    assert failed.error.iloc[0].startswith("BackendError: the server at") and "HTTP 500" in failed.error.iloc[0]
    assert failed.error.iloc[1].startswith("BadReply: ") and "<!DOCTYPE html>" in failed.error.iloc[1]
    assert failed.text.isna().all() and failed.temperature.tolist() == [0.5, 0.5]  # what was asked stays
    ok = df[df.error.isna()]
    assert len(ok) == 3 and all(a == _expected_answer(r) for a, (_, r) in zip(ok.answer, ok.iterrows()))
    err = capsys.readouterr().err
    assert "5/5" in err and "row/s" in err and "failed=2" in err  # rows done, rate, failures


def test_a_timed_out_row_says_so():
    with FakeServer(script={"Name 1 ": ["stall"]}, stall=5) as server:
        with pytest.warns(RuntimeWarning, match=r"1 of 2 row\(s\) failed .*TimedOut"):
            rows = S.sweep(_backend(server, timeout=0.3), PROMPTS[:2], grid={"temperature": [1.0]}, progress=False)
    assert rows[0]["error"].startswith("TimedOut: the server at") and "timeout=1.2" in rows[0]["error"]
    assert rows[1]["error"] is None


def test_a_server_that_keeps_answering_429_stops_the_sweep(tmp_path):
    out = tmp_path / "limited.parquet"
    with FakeServer(script={"Name 3 ": ["429"] * 50}) as server:
        with pytest.raises(RateLimited, match=r"HTTP 429 .* to all 3 tries.*last reply: scripted HTTP 429") as e:
            S.sweep(_backend(server), PROMPTS, grid=GRID, concurrency=1, output=out, progress=False)
    assert e.value.tries == 3
    assert any("rows are saved in" in note and "again to finish it" for note in getattr(e.value, "__notes__", []))
    assert sweeps._Store(out, sweeps.load_manifest(out)).done() == {(0, 0, 0), (0, 1, 0)}  # kept before the stop


# ============================================================================ resumable output

def test_rerun_retries_only_failed_rows_and_ends_as_a_clean_run(tmp_path):
    out, grid = tmp_path / "colours.parquet", {"temperature": [0.5]}  # one request per prompt
    with FakeServer(script={"Name 5 ": ["503"] * 3}) as server:
        with pytest.warns(RuntimeWarning, match="1 of 5"):
            first = S.sweep(_backend(server), PROMPTS, grid=grid, output=out, progress=False)
        assert sum(r["error"] is not None for r in first) == 1 and out.is_file()
        before = len(server.requests)
        again = S.sweep(_backend(server), PROMPTS, grid=grid, output=out, progress=False)
        assert len(server.requests) - before == 1  # only the failed row went out again
        again_unchanged = S.sweep(_backend(server), PROMPTS, grid=grid, output=out, progress=False)
        assert len(server.requests) - before == 1  # a finished sweep is read back, not re-run
        clean = S.sweep(_backend(server), PROMPTS, grid=grid, progress=False)
    pd.testing.assert_frame_equal(_frame(again), _frame(clean))
    pd.testing.assert_frame_equal(_frame(again_unchanged), _frame(clean))


def test_arrow_and_parquet_outputs_hold_the_same_rows(tmp_path):
    with FakeServer() as server:
        arrow = S.sweep(_backend(server), PROMPTS, grid=GRID, output=tmp_path / "a.arrow", progress=False)
        parquet = S.sweep(_backend(server), PROMPTS, grid=GRID, output=tmp_path / "a.parquet", progress=False)
    pd.testing.assert_frame_equal(_frame(arrow), _frame(parquet))
    assert arrow.cache_files and arrow.cache_files[0]["filename"].endswith("a.arrow")  # memory-mapped
    manifest = sweeps.load_manifest(tmp_path / "a.parquet")
    assert manifest["model"] == "fake/qwen3.5" and manifest["settings"] == [{"temperature": 0.5},
                                                                            {"temperature": 1.0}]
    assert not (tmp_path / "a.parquet.partial").exists()


@pytest.mark.parametrize("change,pattern", [
    (dict(grid={"temperature": [0.5, 0.9]}), r"grid: setting 1 is \{'temperature': 1.0\} there, "
                                             r"\{'temperature': 0.9\} here"),
    (dict(grid={"temperature": [0.5]}), r"grid: it holds 2 setting\(s\) .*this sweep has 1"),
    (dict(model="other/model"), r"model: it holds 'fake/qwen3.5', this sweep runs 'other/model'"),
    (dict(n=3), r"n: 1 there, 3 here"),
    (dict(prompts=PROMPTS[:2] + ["Name 9 colours."] + PROMPTS[3:]), r"prompts: prompt 2 differs"),
])
def test_an_output_holding_another_sweep_is_refused(tmp_path, change, pattern):
    out, change = tmp_path / "held.parquet", dict(change)
    with FakeServer() as server:
        S.sweep(_backend(server), PROMPTS, grid=GRID, output=out, progress=False)
        sent = len(server.requests)
        backend = _backend(server, model=change.pop("model", "fake/qwen3.5"))
        args = dict(prompts=PROMPTS, grid=GRID, n=1) | change
        with pytest.raises(checks.BadValue, match=rf"output '.*held.parquet' holds a different sweep \({pattern}"):
            S.sweep(backend, args.pop("prompts"), output=out, progress=False, **args)
        assert len(server.requests) == sent


def test_bad_sweep_settings_are_refused(tmp_path, tiny):
    backend = OpenAIBackend("http://127.0.0.1:9/v1", model="m")
    for concurrency, pattern in [(0, r"concurrency=0 is out of range; valid: 1..1024"),
                                 (5000, r"concurrency=5000 is out of range; valid: 1..1024"),
                                 (2.5, r"concurrency must be an int")]:
        with pytest.raises((checks.BadValue, checks.BadType), match=pattern):
            S.sweep(backend, PROMPTS, grid=GRID, concurrency=concurrency)
    with pytest.raises(checks.BadValue, match=r"concurrency=4 is for served models"):
        S.sweep(tiny, PROMPTS, grid=GRID, concurrency=4)
    with pytest.raises(checks.BadValue, match=r"must name a .parquet or .arrow file"):
        S.sweep(backend, PROMPTS, grid=GRID, output=tmp_path / "rows.csv")
    (tmp_path / "other.parquet").write_bytes(b"not a sweep")
    with pytest.raises(checks.BadValue, match=r"output '.*other.parquet' exists and is not a .parquet file of a sweep"):
        S.sweep(tiny, PROMPTS, grid=GRID, output=tmp_path / "other.parquet")


_CHILD = """
import json, sys
from qwen35_lab import sampling, sweeps
from qwen35_lab.backends import OpenAIBackend
url, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sweeps.FLUSH_ROWS = 2  # a shard every two rows, so a kill leaves several
sampling.sweep(OpenAIBackend(url, model="fake/qwen3.5", server="sglang"), output=out, progress=False, **args)
"""


def test_a_sweep_killed_mid_way_resumes_to_exactly_the_uninterrupted_rows(tmp_path):
    args = dict(prompts=PROMPTS * 2, grid={"temperature": [0.5, 1.0], "top_p": [0.9]}, n=2, seed=3,
                concurrency=2, max_new_tokens=16)  # 40 rows, 2 at a time, 0.2 s each: ~4 s of requests
    out = tmp_path / "killed.parquet"
    partial = tmp_path / "killed.parquet.partial"
    with FakeServer(latency=0.2) as server:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, server.url, str(out), json.dumps(args)],
                                 cwd=tmp_path, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while len(list(partial.glob("part-*.arrow"))) < 4:  # eight rows or more on disk
                assert child.poll() is None, "the sweep ended before it could be killed"
                assert time.monotonic() < deadline, "the sweep wrote nothing in 120 s"
                time.sleep(0.02)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL and not out.exists()
        sent_before = len(server.requests)
        done = sweeps._Store(out, sweeps.load_manifest(out)).done()
        assert 8 <= len(done) < 40

        backend = OpenAIBackend(server.url, model="fake/qwen3.5", server="sglang")
        resumed = S.sweep(backend, output=out, progress=False, **args)
        assert len(server.requests) - sent_before == 40 - len(done)  # only the rows that were missing
        whole = S.sweep(backend, output=tmp_path / "whole.parquet", progress=False, **args)
    assert not partial.exists() and len(resumed) == 40
    pd.testing.assert_frame_equal(_frame(resumed), _frame(whole))
    assert all(row["answer"] == _expected_answer(row) for row in resumed)


def test_a_local_sweep_resumes_too(tiny, tmp_path, monkeypatch):
    args = dict(grid={"temperature": [0.0, 1.0]}, n=2, seed=5, max_new_tokens=3, progress=False)
    out = tmp_path / "local.arrow"
    monkeypatch.setattr(sweeps, "FLUSH_ROWS", 1)
    calls = []
    real = sweeps.sample

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the cell after two rows
        return real(*a, **k)

    monkeypatch.setattr(sweeps, "sample", flaky)
    with pytest.raises(KeyboardInterrupt) as e:
        S.sweep(tiny, PROMPTS[:1], output=out, **args)
    assert any("2 of 4 rows are saved" in note for note in e.value.__notes__)
    monkeypatch.setattr(sweeps, "sample", real)
    calls.clear()
    monkeypatch.setattr(sweeps, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = S.sweep(tiny, PROMPTS[:1], output=out, **args)
    assert len(calls) == 2  # the two missing rows
    whole = S.sweep(tiny, PROMPTS[:1], **args)
    pd.testing.assert_frame_equal(_frame(resumed), _frame(whole))
    for row in resumed:  # each row is what lab.generate gives with its seed
        gen = tiny.generate([{"role": "user", "content": PROMPTS[0]}], max_new_tokens=3, seed=row["seed"],
                            temperature=row["temperature"])
        assert row["ids"] == gen.ids[0].tolist()


# ============================================================================ a real server

def test_a_concurrent_sweep_against_transformers_serve(served, tiny):  # noqa: F811
    backend = OpenAIBackend(served, server="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no failed rows
        rows = S.sweep(backend, [PROMPTS[0], PROMPTS[2]], grid={"temperature": [0.0], "enable_thinking": [False]},
                       max_new_tokens=4, concurrency=2, progress=False)
    assert [r["prompt_index"] for r in rows] == [0, 1]
    for row in rows:
        want = tiny.generate([{"role": "user", "content": row["prompt"]}], max_new_tokens=4, do_sample=False,
                             enable_thinking=False).text.strip()
        assert row["answer"] == want and row["error"] is None
