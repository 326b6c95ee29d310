"""What capturing ``layers.*.attn.summary`` costs at long context, against the plain forward (CPU).

The summaries (entropy, max probability, sink mass, mean distance of every
query's attention distribution) come, on CPU, from
:func:`qwen35_lab.ops.attention.causal_attention_with_summaries`: PyTorch's flash
kernel as in the plain forward (output and per-row log-sum-exp), then one exact
blockwise pass over the causal tiles (``p = exp2`` of the log-probabilities in bits),
never forming the ``T × T`` map. The pass costs about as much as the kernel, so the
capture stays under twice the plain forward: 1.47× at 16K and 1.93× at 64K tokens on
``passkey`` (one thread, with other jobs on the 2 cores, load average about 3; an
earlier run under the same load gave 1.49× and 1.70×). This script
runs an organism on ``T`` random tokens in a fresh subprocess per length (one
thread), once plainly (``lab.run(ids)``) and once capturing the summaries of
its attention layer (``max_position_embeddings`` raised to ``T``: only the cost is measured, not
what the organism answers), and records wall time and the growth of peak resident
memory (``VmHWM``, reset through ``/proc/self/clear_refs``) of each.

    python benchmarks/attention_summaries.py            # 16K and 64K tokens (~5 min on 2 busy cores)
    python benchmarks/attention_summaries.py --quick    # 4K tokens

Writes ``benchmarks/results/attention_summaries.json``.
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

from qwen35_lab._io import atomic_file

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "attention_summaries.json"
ORGANISM = "passkey"
LENGTHS = [16_384, 65_536]
QUICK = [4096]


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def worker(organism: str, T: int) -> dict:
    import gc

    import torch

    import qwen35_lab as ql

    torch.set_num_threads(1)
    lab = ql.load(organism, dtype="float32", device="cpu")
    from qwen35_lab.longctx.rope import text_config_of

    text = text_config_of(lab.model)  # a timing run: let the default RoPE run past the organism's 32K
    text.max_position_embeddings = max(text.max_position_embeddings, T)
    layer = [i for i, kind in enumerate(lab.layer_types) if kind == "full_attention"][-1]
    probe = f"layers.{layer}.attn.summary"
    vocab = lab.text_config.vocab_size
    ids = torch.randint(3, vocab, (1, T), generator=torch.Generator().manual_seed(0))
    lab.run(ids[:, :512])
    lab.run(ids[:, :512], capture=probe)
    out = {}
    for name, capture in (("plain", None), ("summary", probe), ("plain_again", None)):
        gc.collect()
        base = _kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        tr = lab.run(ids, capture=capture)
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 3)
        out[f"{name}_peak_growth"] = _kib("VmHWM") - base
        if capture:
            out["summary_shape"] = list(tr[probe]["entropy"].shape)
        del tr
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short length")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--organism", default=ORGANISM)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    import torch

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    load_before = os.getloadavg()[0]  # other jobs on the machine, recorded with the result
    rows = []
    print(f"{'tokens':>8} {'plain s':>8} {'summary s':>10} {'ratio':>6} {'plain MB':>9} {'summary MB':>11}")
    for T in (QUICK if args.quick else LENGTHS):
        cmd = [sys.executable, __file__, "--worker", json.dumps([args.organism, T])]
        run = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise RuntimeError(f"worker at {T} tokens failed:\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        plain = min(r["plain_seconds"], r["plain_again_seconds"])
        r.update(tokens=T, plain_best_seconds=plain, ratio=round(r["summary_seconds"] / plain, 3))
        rows.append(r)
        print(f"{T:>8} {plain:>8.1f} {r['summary_seconds']:>10.1f} {r['ratio']:>6.2f} "
              f"{r['plain_peak_growth'] / 1e6:>9.1f} {r['summary_peak_growth'] / 1e6:>11.1f}", flush=True)
    result = {
        "what": "wall time and peak-RSS growth of lab.run(ids) against lab.run(ids, capture='layers.i.attn.summary')",
        "organism": args.organism, "threads": 1, "dtype": "float32", "torch": torch.__version__,
        "machine": platform.machine(), "cpu": platform.processor() or platform.machine(),
        "method": "subprocess per length; warm-up on 512 tokens; plain forward timed before and after the "
                  "capture (the faster one is the baseline); VmHWM reset via /proc/self/clear_refs; other "
                  "jobs may share the machine's cores, equally for the plain and the capture runs",
        "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2),
                              "cpus": os.cpu_count()},
        "rows": rows, "max_ratio": max(r["ratio"] for r in rows),
    }
    out = Path(args.out)
    with atomic_file(out, "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; largest ratio {result['max_ratio']:.2f}")


if __name__ == "__main__":
    main()
