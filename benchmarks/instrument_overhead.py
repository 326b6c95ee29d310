"""Cost of instrumentation against plain HF, on a random-weight model of a real shape.

Times one prefill forward (no cache) three ways, interleaved so drift hits all alike:

* ``plain``     — HF's model, not instrumented;
* ``off``       — instrumented, nothing captured (goal ≤ 1.03 × plain);
* ``gates+``    — β and g of every DeltaNet layer, attention summaries of every
                  attention layer and DeltaNet state checkpoints of every layer
                  (goal ≤ 1.15 × plain).

Prints a table and writes ``benchmarks/results/instrument_overhead.json``.

    python benchmarks/instrument_overhead.py                 # Qwen3.5-0.8B shape, bf16, T=1024
    python benchmarks/instrument_overhead.py --quick         # 4 layers, T=256: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# This folder holds kernels.py; keep it off the import path so transformers' probe for HF's
# `kernels` package does not find it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import qwen35_lab as ql  # noqa: E402
from qwen35_lab import configs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="Qwen3.5-0.8B")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (multiple of 4) for a quick look")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.length, args.repeats = 4, 256, 3
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    model = configs.build_random(args.model, dtype=dtype, device=args.device, text_only=True,
                                 num_hidden_layers=args.layers)
    lab = ql.Lab(model=model, tokenizer=None, processor=None, name=f"random {args.model}")
    ids = torch.randint(0, 200_000, (1, args.length), generator=torch.Generator().manual_seed(0)).to(args.device)
    capture = ["layers.*.deltanet.beta", "layers.*.deltanet.g", "layers.*.attn.summary", "layers.*.deltanet.state"]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def off():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def gates():
        with lab.trace(capture) as tr, torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return tr

    load_before = os.getloadavg()[0]  # timings mean little on a busy machine: record how busy it was
    runs = {"plain": [], "off": [], "gates+": []}
    tr = gates()  # warm-up and a check that the capture happened
    n_state_layers = len([n for n in tr.names if n.endswith("deltanet.state")])
    plain()
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("off", None), ("gates+", gates)):
            if name == "off":
                lab.instrument()
                sync(); t = time.perf_counter(); off(); sync()
                runs[name].append(time.perf_counter() - t)
                lab.uninstrument()
                continue
            sync(); t = time.perf_counter(); fn(); sync()
            runs[name].append(time.perf_counter() - t)

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {"off": med["off"] / med["plain"], "gates+": med["gates+"] / med["plain"]}
    goals = {"off": 1.03, "gates+": 1.15}
    print(f"{args.model} ({model.config.num_hidden_layers} layers), {args.dtype}, T={args.length}, "
          f"{args.device}, {args.threads} threads, median of {args.repeats}")
    print(f"{'run':<8} {'median s':>9} {'× plain':>8} {'goal':>6}")
    for k in runs:
        r = med[k] / med["plain"]
        print(f"{k:<8} {med[k]:>9.3f} {r:>8.3f} {goals.get(k, float('nan')):>6}")
    result = {
        "benchmark": "instrument_overhead", "model": args.model, "layers": model.config.num_hidden_layers,
        "dtype": args.dtype, "length": args.length, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "capture": capture, "state_layers_captured": n_state_layers,
        "seconds": runs, "median_seconds": med, "ratio_vs_plain": ratios, "goal": goals,
        "meets_goal": {k: ratios[k] <= goals[k] for k in goals},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"instrument_overhead{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
