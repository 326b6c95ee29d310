"""Time the gated delta rule: transformers' torch path against ours.

    python benchmarks/kernels.py                 # CPU, B=1 H=16 T=4096 K=V=128 fp32, 2 threads
    python benchmarks/kernels.py --quick         # T=1024, fewer repeats
    python benchmarks/kernels.py --device cuda   # the same candidates on a GPU

Candidates run round-robin (one call each per round, after a warm-up call) so that a busy machine
slows them alike; the table reports the median and the minimum. Results go to
``benchmarks/results/kernels_<device>.json``. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This script is called kernels.py, and transformers probes for the hub package "kernels" with
# `import kernels`: keep the script's own folder off the import path so that probe misses it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule  # noqa: E402

from qwen35_lab.ops.gated_delta import chunk_gated_delta_rule  # noqa: E402

RESULTS = _HERE / "results"


def make_inputs(B, T, H, HV, K, V, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = -0.5 * torch.rand(B, T, HV, generator=gen)  # log decay
    beta = torch.rand(B, T, HV, generator=gen)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [x.to(device) for x in (g, beta)]


def gated_delta_candidates(q, k, v, g, beta) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> a call returning the output ``o``. A GPU section adds Triton and fla here."""
    return {
        "hf_torch_chunk": lambda: torch_chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=64, output_final_state=False, use_qk_l2norm_in_kernel=True
        )[0],
        "ours_chunk": lambda: chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64)[0],
        "ours_chunk_with_states": lambda: chunk_gated_delta_rule(
            q, k, v, g, beta, chunk_size=64, output_chunk_states=True
        )[0],
    }


def time_round_robin(candidates, repeats: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    times = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(device: str, quick: bool, repeats: int | None, threads: int) -> dict:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # the "flash-linear-attention is not installed" note
    shape = dict(B=1, T=1024 if quick else 4096, H=16, HV=16, K=128, V=128)
    repeats = repeats or (3 if quick else 7)
    dtype = torch.float32
    q, k, v, g, beta = make_inputs(**shape, dtype=dtype, device=device)
    candidates = gated_delta_candidates(q, k, v, g, beta)

    reference = candidates["hf_torch_chunk"]().float()
    errors = {
        name: ((fn().float() - reference).norm() / reference.norm()).item() for name, fn in candidates.items()
    }
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0]
    times = time_round_robin(candidates, repeats, sync)
    load_after = os.getloadavg()[0]
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians["hf_torch_chunk"]

    print(f"gated delta rule, {shape}, {dtype}, device {device}, threads {threads}, {repeats} repeats")
    print(f"1-minute load average {load_before:.2f} before, {load_after:.2f} after (other processes skew times)")
    print(f"{'candidate':<26}{'median s':>10}{'min s':>10}{'vs hf':>8}{'rel err':>10}")
    for name, ts in times.items():
        print(f"{name:<26}{medians[name]:>10.3f}{min(ts):>10.3f}{medians[name] / base:>8.2f}{errors[name]:>10.1e}")

    result = {
        "op": "chunk_gated_delta_rule",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after": load_after},
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "shape": shape,
        "chunk_size": 64,
        "repeats": repeats,
        "quick": quick,
        "median_s": medians,
        "min_s": {name: min(ts) for name, ts in times.items()},
        "all_s": times,
        "rel_err_vs_hf": errors,
        "ratio_vs_hf": {name: medians[name] / base for name in medians},
    }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="T=1024 and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels_<device>.json)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    result = run(args.device, args.quick, args.repeats, args.threads)
    out = args.out or RESULTS / f"kernels_{args.device}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
