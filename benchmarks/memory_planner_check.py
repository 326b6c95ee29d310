"""Check the memory planner against measured peak memory of real prefills on CPU.

Each run builds a random-weight Qwen3.5-0.8B of the real widths with 4 layers
(3 Gated DeltaNet + 1 gated attention, text only), or loads an organism, in a
fresh subprocess, warms it up on a short input, then prefills ``context``
tokens through a ``DynamicCache`` (whole, or in chunks) keeping the last
logits — in chunks either with transformers' sdpa (a ``[chunk, context]``
mask and K/V repeated per query head) or with the chunked attention
``chunked_prefill`` runs (``longctx.attention``: neither) — and records the
growth of the process's peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` just before the run). glibc's mmap threshold is fixed
at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the system
and resident memory follows live tensors. The planner's ``runtime`` (KV cache
+ DeltaNet and conv states + the largest per-layer working set) is set beside
each measurement.

    python benchmarks/memory_planner_check.py            # all runs (~25 min on 2 busy cores)
    python benchmarks/memory_planner_check.py --quick    # three short runs
    python benchmarks/memory_planner_check.py --attention-only   # only the chunked-prefill rows

Writes ``benchmarks/results/memory_planner_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# This folder holds a script named kernels.py; transformers probes for HF's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory_planner_check.json"
MODEL = "Qwen3.5-0.8B"
NUM_LAYERS = 4
ORGANISM = "passkey"
RUNS = [  # (dtype, context, prefill_chunk): the 0.8B shape with transformers' sdpa
    ("float32", 512, None),
    ("float32", 2048, None),
    ("float32", 8192, None),
    ("float32", 8192, 1024),
    ("bfloat16", 2048, None),
    ("bfloat16", 8192, 2048),
]
ATTENTION_RUNS = [  # (model, dtype, context, prefill_chunk, attention): chunked prefill, sdpa against ours
    (MODEL, "float32", 8192, 1024, "chunked"),
    (MODEL, "float32", 32768, 2048, "chunked"),
    (ORGANISM, "float32", 16384, 2048, "sdpa"),
    (ORGANISM, "float32", 16384, 2048, "chunked"),
    (ORGANISM, "float32", 65536, 4096, "chunked"),
]
QUICK = [("float32", 512, None)]
QUICK_ATTENTION = [(MODEL, "float32", 2048, 512, "chunked"), (ORGANISM, "float32", 4096, 1024, "chunked")]
TOLERANCE = 0.15


def planner_config(model: str):
    """The text config of the measured model: the real 0.8B widths with 4 layers, or the organism's."""
    from qwen35_lab import configs

    if model != MODEL:
        return model
    config = configs.config_for(MODEL).text_config
    config.num_hidden_layers = NUM_LAYERS
    config.layer_types = configs.layer_types(NUM_LAYERS)
    return config


def plan(dtype: str, context: int, chunk: int | None, attention: str = "sdpa", model: str = MODEL):
    from qwen35_lab.longctx import plan_memory
    from qwen35_lab.longctx.attention import ATTN_IMPLEMENTATION

    attn = ATTN_IMPLEMENTATION if attention == "chunked" else attention
    return plan_memory(planner_config(model), context, dtype=dtype, text_only=True, prefill_chunk=chunk,
                       attn_implementation=attn, logits="last")


# ------------------------------------------------------------------ worker
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(model_name: str, dtype: str, context: int, chunk: int | None, attention: str) -> dict:
    import contextlib
    import gc

    import torch
    from transformers import DynamicCache

    from qwen35_lab.configs import build_random
    from qwen35_lab.longctx.attention import chunked_attention

    torch.set_num_threads(1)
    before_model = _status("VmRSS")
    if model_name == MODEL:
        model = build_random(MODEL, num_hidden_layers=NUM_LAYERS, text_only=True, dtype=dtype)
    else:
        import qwen35_lab as ql

        model = ql.load(model_name, dtype=dtype, device="cpu").model
    model.config._attn_implementation = "sdpa"
    weights_rss = _status("VmRSS") - before_model
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, max(2, vocab - 1000), (1, context), generator=torch.Generator().manual_seed(0))

    def prefill(x, step):
        cache = DynamicCache(config=model.config)
        switch = chunked_attention(model) if attention == "chunked" else contextlib.nullcontext()
        with torch.no_grad(), switch:
            for s in range(0, x.shape[1], step):
                out = model(input_ids=x[:, s:s + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
        return out.logits, cache

    warm = min(256, context)
    prefill(ids[:, :warm], warm if chunk is None else max(1, warm // 4))  # first-call allocations, kernels
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    if _status("VmHWM") > base + (8 << 20):
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    t0 = time.perf_counter()
    logits, cache = prefill(ids, chunk or context)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"measured_peak_growth": peak - base, "measured_weights_rss": weights_rss, "seconds": round(seconds, 2),
            "cached_tokens": int(cache.get_seq_length())}


# ------------------------------------------------------------------ driver
def run_one(model: str, dtype: str, context: int, chunk: int | None, attention: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", json.dumps([model, dtype, context, chunk, attention])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {model} {dtype} {context} {chunk} {attention} failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    p = plan(dtype, context, chunk, attention, model)
    dense = plan(dtype, context, chunk, "sdpa", model)
    ratio = measured["measured_peak_growth"] / p["runtime"]
    return {
        "model": model, "dtype": dtype, "context": context, "prefill_chunk": chunk, "attention": attention,
        "planned_runtime_sdpa": dense["runtime"],
        "planned_runtime": p["runtime"], "planned_kv_cache": p["kv_cache"],
        "planned_deltanet_state": p["deltanet_state"], "planned_conv_state": p["conv_state"],
        "planned_activations": p["activations"], "planned_peak_layer": p["peak_layer"],
        "planned_weights": p["weights"],
        **measured,
        "measured_over_planned": round(ratio, 4),
        "within_tolerance": abs(ratio - 1) <= TOLERANCE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three short runs")
    parser.add_argument("--attention-only", action="store_true",
                        help="run only the chunked-prefill attention comparison; keep the rows already in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    import torch
    import transformers

    rows, attention_rows = [], []
    print(f"{'model':<13} {'dtype':<9} {'context':>8} {'chunk':>6} {'attention':>9} {'planned':>10} "
          f"{'measured':>10} {'ratio':>6} {'sdpa plan':>10} {'time':>7}")
    kept = []
    if args.attention_only:
        kept = json.loads(Path(args.out).read_text())["rows"]
    runs = [] if args.attention_only else [(MODEL, *r, "sdpa") for r in (QUICK if args.quick else RUNS)]
    runs += QUICK_ATTENTION if args.quick else ATTENTION_RUNS
    for i, (model, dtype, context, chunk, attention) in enumerate(runs):
        r = run_one(model, dtype, context, chunk, attention)
        (rows if i < len(runs) - len(QUICK_ATTENTION if args.quick else ATTENTION_RUNS) else attention_rows).append(r)
        print(f"{model:<13} {dtype:<9} {context:>8} {str(chunk or '-'):>6} {attention:>9} "
              f"{r['planned_runtime'] / 1e6:>8.1f}MB {r['measured_peak_growth'] / 1e6:>8.1f}MB "
              f"{r['measured_over_planned']:>6.3f} {r['planned_runtime_sdpa'] / 1e6:>8.1f}MB {r['seconds']:>6.1f}s",
              flush=True)
    result = {
        "what": "peak resident-memory growth of a prefill against plan_memory(...)['runtime']",
        "models": {MODEL: f"{MODEL} widths, {NUM_LAYERS} layers (3 Gated DeltaNet + 1 gated attention), random "
                          f"weights, text only", ORGANISM: f"the {ORGANISM} organism (data/organisms/{ORGANISM})"},
        "attention": {"sdpa": "transformers' sdpa: in chunks a [chunk, context] mask and K/V repeated per query head",
                      "chunked": "longctx.attention.chunk_attention (what chunked_prefill runs): neither"},
        "method": "subprocess per run; warm-up on 256 tokens; VmHWM reset via /proc/self/clear_refs; "
                  "MALLOC_MMAP_THRESHOLD_=65536; 1 thread; sdpa attention; DynamicCache; logits_to_keep=1",
        "tolerance": TOLERANCE,
        "torch": torch.__version__, "transformers": transformers.__version__, "machine": platform.machine(),
        "rows": kept + rows,
        "attention_rows": attention_rows,
        "all_within_tolerance": all(r["within_tolerance"] for r in kept + rows + attention_rows),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}; "
          f"all within {TOLERANCE:.0%}: {result['all_within_tolerance']}")


if __name__ == "__main__":
    main()
