"""Time the gated delta rule and the attention summaries: transformers' torch path, ours, fla.

    python benchmarks/kernels.py                 # CPU, B=1 H=16 T=4096 K=V=128 fp32, 2 threads
    python benchmarks/kernels.py --quick         # T=1024, fewer repeats
    python benchmarks/kernels.py --device cuda   # GPU: Triton kernels, fla 0.6, HF's torch path, bf16
    python benchmarks/kernels.py --device cuda --quick   # T=2048 only

CPU: candidates run round-robin (one call each per round, after a warm-up call) so that a busy
machine slows them alike; the table reports the median and the minimum. Results go to
``benchmarks/results/kernels_cpu.json``.

GPU (``--device cuda``): B=1, H=16 key heads, HV=16 and 32 value heads, K=V=128, bf16 inputs (g in
fp32, as the Qwen3.5 layer makes it), T = 2K, 8K, 32K. Candidates: our Triton kernels with and
without chunk states, flash-linear-attention's ``chunk_gated_delta_rule`` (fla 0.6; skipped with a
note when fla is not installed), transformers' ``torch_chunk_gated_delta_rule`` and our torch
reference. fla and transformers take q and k repeated to HV heads, as transformers' layer does
before calling them (the repeat is not timed). Also the single-token decode step and the attention
summaries. Each candidate: warm-up calls (compilation, autotuning), then CUDA-event timings; the
median is reported with the achieved bandwidth and FLOP rate of a minimal traffic / work model, next
to an H100 SXM's peaks. Results go to ``benchmarks/results/kernels_gpu.json``. Nothing here asserts
on time.
"""

from __future__ import annotations

import argparse
import json
import math
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
    """The CPU comparison (also runs on CUDA with the same torch candidates; ``run_gpu`` is the GPU one)."""
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


# ----------------------------------------------------------------------------- GPU

H100_SXM = {"hbm_tb_per_s": 3.35, "bf16_dense_tflops": 989.0}  # the peaks printed next to ours
GPU_LENGTHS = (2048, 8192, 32768)  # T; --quick keeps the first
GPU_HEADS = dict(B=1, H=16, K=128, V=128)  # the gated delta rule, with HV in GPU_VALUE_HEADS
GPU_VALUE_HEADS = (16, 32)
DECODE_BATCHES = (1, 16)  # decode step at H=16, HV=32
ATTENTION_HEADS = dict(B=1, Hq=16, Hkv=4, D=256)  # Qwen3.5-9B's full-attention layers
TORCH_ATTENTION_MAX_T = 8192  # the torch reference loops over (T / 256)² / 2 block pairs in Python


def cuda_time(fn: Callable[[], object], repeats: int, warmup: int = 3) -> dict:
    """Median / min milliseconds of ``fn`` by CUDA events, after ``warmup`` calls; peak extra memory."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return {
        "median_ms": statistics.median(times), "min_ms": min(times), "all_ms": times,
        "peak_extra_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }


def load_fla():
    """fla's chunk and fused-recurrent gated delta rule, or None (with a printed note)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except ImportError as e:
        print(f"note: flash-linear-attention is not importable ({e}); its columns are skipped "
              f"(pip install flash-linear-attention==0.6.* on the GPU machine)")
        return None
    try:
        import importlib.metadata

        version = importlib.metadata.version("flash-linear-attention")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"chunk": fla_chunk, "recurrent": fla_recurrent, "version": version}


def rates(seconds: float, bytes_moved: float, flops: float) -> dict:
    tb_per_s = bytes_moved / seconds / 1e12
    tflops = flops / seconds / 1e12
    return {
        "tb_per_s": tb_per_s, "tflops": tflops,
        "bandwidth_of_h100_peak": tb_per_s / H100_SXM["hbm_tb_per_s"],
        "flops_of_h100_peak": tflops / H100_SXM["bf16_dense_tflops"],
    }


def chunk_work(B, T, H, HV, K, V, C, chunk_states: bool) -> tuple[float, float]:
    """Minimal bytes (read q, k, v, g, beta; write o, final state, chunk states) and chunked FLOPs."""
    NT = math.ceil(T / C)
    bytes_moved = 2 * (2 * B * T * H * K + 2 * B * T * HV * V) + 4 * B * T * HV + 2 * B * T * HV
    bytes_moved += 4 * B * HV * K * V + (4 * B * NT * HV * K * V if chunk_states else 0)
    # per chunk and value head: k kᵀ, q kᵀ, w (C·C·K each); u, (q kᵀ) v_new (C·C·V); w S, kᵀ v_new, q S (C·K·V)
    flops = 2 * B * HV * NT * (3 * C * C * K + 2 * C * C * V + 3 * C * K * V)
    return bytes_moved, flops


def run_gpu(quick: bool, repeats: int | None) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    import triton

    from qwen35_lab._kernels.attention_summary import attention_summaries as triton_summaries
    from qwen35_lab._kernels.gated_delta_chunk import chunk_gated_delta_rule as triton_chunk
    from qwen35_lab._kernels.gated_delta_step import recurrent_gated_delta_step as triton_step
    from qwen35_lab.ops.attention import attention_summaries as torch_summaries
    from qwen35_lab.ops.gated_delta import recurrent_gated_delta_step as torch_step
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    transformers.logging.set_verbosity_error()
    fla = load_fla()
    device, dtype, C = "cuda", torch.bfloat16, 64
    repeats = repeats or (5 if quick else 10)
    lengths = GPU_LENGTHS[:1] if quick else GPU_LENGTHS
    name = torch.cuda.get_device_name()
    print(f"device {name}; peaks shown are an H100 SXM's: {H100_SXM['hbm_tb_per_s']} TB/s HBM3, "
          f"{H100_SXM['bf16_dense_tflops']:.0f} TFLOP/s dense bf16")
    result = {
        "device": "cuda", "device_name": name, "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "fla": fla["version"] if fla else None,
        "h100_sxm_peaks": H100_SXM, "dtype": "bfloat16", "chunk_size": C, "repeats": repeats, "quick": quick,
        "gated_delta_chunk": [], "decode_step": [], "attention_summaries": [],
    }
    header = f"{'candidate':<34}{'median ms':>11}{'TB/s':>8}{'TFLOP/s':>9}{'peak GiB':>10}{'rel err':>10}"

    print("\nchunked gated delta rule, forward (o and final state; chunk states where named)")
    for HV in GPU_VALUE_HEADS:
        for T in lengths:
            B, H, K, V = (GPU_HEADS[n] for n in "BHKV")
            q, k, v, g, beta = make_inputs(B, T, H, HV, K, V, dtype, device)
            g, beta = g.float(), beta.to(dtype)  # the layer's dtypes: g fp32, beta like the activations
            G = HV // H
            q_rep, k_rep = q.repeat_interleave(G, 2), k.repeat_interleave(G, 2)  # what fla and HF are given
            o_ref = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=C)[0].float()  # fp32 math, torch
            candidates = {
                "triton": lambda: triton_chunk(q, k, v, g, beta, chunk_size=C)[0],
                "triton_with_chunk_states": lambda: triton_chunk(q, k, v, g, beta, chunk_size=C,
                                                                 output_chunk_states=True)[0],
                "hf_torch_chunk": lambda: torch_chunk_gated_delta_rule(
                    q_rep, k_rep, v, g, beta, chunk_size=C, output_final_state=True, use_qk_l2norm_in_kernel=True)[0],
                "torch_reference_with_chunk_states": lambda: chunk_gated_delta_rule(
                    q, k, v, g, beta, chunk_size=C, output_chunk_states=True)[0],
            }
            if fla:
                candidates["fla_chunk"] = lambda: fla["chunk"](
                    q_rep, k_rep, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True)[0]
            print(f"-- B={B} T={T} H={H} HV={HV} K={K} V={V}")
            print(header)
            row = {"shape": dict(B=B, T=T, H=H, HV=HV, K=K, V=V), "candidates": {}}
            for cand, fn in candidates.items():
                slow = cand in ("hf_torch_chunk", "torch_reference_with_chunk_states")
                timing = cuda_time(fn, max(3, repeats // 3) if slow else repeats, warmup=1 if slow else 3)
                err = ((fn().float() - o_ref).norm() / o_ref.norm()).item()
                moved, flops = chunk_work(B, T, H, HV, K, V, C, chunk_states="chunk_states" in cand)
                entry = {**timing, **rates(timing["median_ms"] / 1e3, moved, flops), "rel_err_vs_fp32_torch": err}
                row["candidates"][cand] = entry
                print(f"{cand:<34}{entry['median_ms']:>11.3f}{entry['tb_per_s']:>8.2f}{entry['tflops']:>9.1f}"
                      f"{entry['peak_extra_gib']:>10.2f}{err:>10.1e}")
            result["gated_delta_chunk"].append(row)
            del candidates, q, k, v, g, beta, q_rep, k_rep, o_ref
            torch.cuda.empty_cache()

    print("\nsingle-token decode step (state fp32 [B, HV, K, V], updated in place where the op allows)")
    for B in DECODE_BATCHES:
        H, HV, K, V = GPU_HEADS["H"], 2 * GPU_HEADS["H"], GPU_HEADS["K"], GPU_HEADS["V"]
        q, k, v, g, beta = (x[:, 0] for x in make_inputs(B, 1, H, HV, K, V, dtype, device))
        g, beta = g.float(), beta.to(dtype)
        state = torch.randn(B, HV, K, V, device=device) * 0.1
        _, state_ref = torch_step(q, k, v, g, beta, state, in_place=False)
        G = HV // H
        q_rep, k_rep = q.repeat_interleave(G, 1)[:, None], k.repeat_interleave(G, 1)[:, None]
        work = state.clone()
        candidates = {
            "triton_step_in_place": lambda: triton_step(q, k, v, g, beta, work),
            "torch_reference_step_in_place": lambda: torch_step(q, k, v, g, beta, work),
            "hf_torch_recurrent": lambda: torch_recurrent_gated_delta_rule(
                q_rep, k_rep, v[:, None], g[:, None], beta[:, None], initial_state=state,
                output_final_state=True, use_qk_l2norm_in_kernel=True),
        }
        if fla:
            candidates["fla_fused_recurrent"] = lambda: fla["recurrent"](
                q_rep, k_rep, v[:, None], g[:, None], beta[:, None], initial_state=state,
                output_final_state=True, use_qk_l2norm_in_kernel=True)
        _, new_state = triton_step(q, k, v, g, beta, state, in_place=False)
        err = ((new_state - state_ref).norm() / state_ref.norm()).item()
        print(f"-- B={B} H={H} HV={HV} K={K} V={V}; triton new state vs torch: rel err {err:.1e}")
        print(f"{'candidate':<34}{'median ms':>11}{'TB/s':>8}")
        row = {"shape": dict(B=B, H=H, HV=HV, K=K, V=V), "triton_state_rel_err": err, "candidates": {}}
        for cand, fn in candidates.items():
            timing = cuda_time(fn, repeats * 5)
            entry = {**timing, **rates(timing["median_ms"] / 1e3, 2 * 4 * B * HV * K * V, 6 * B * HV * K * V)}
            row["candidates"][cand] = entry
            print(f"{cand:<34}{entry['median_ms']:>11.4f}{entry['tb_per_s']:>8.2f}")
        result["decode_step"].append(row)

    print("\nattention summaries (entropy, max prob, sink mass, mean distance), causal, O(T) memory")
    for T in lengths:
        B, Hq, Hkv, D = (ATTENTION_HEADS[n] for n in ("B", "Hq", "Hkv", "D"))
        gen = torch.Generator(device="cpu").manual_seed(T)
        q = torch.randn(B, Hq, T, D, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(B, Hkv, T, D, generator=gen).to(device=device, dtype=dtype)
        candidates = {"triton": lambda: triton_summaries(q, k)}
        if T <= TORCH_ATTENTION_MAX_T:
            candidates["torch_reference"] = lambda: torch_summaries(q, k)
        reference = torch_summaries(q, k) if T <= TORCH_ATTENTION_MAX_T else None
        print(f"-- B={B} T=Tk={T} Hq={Hq} Hkv={Hkv} D={D}")
        print(f"{'candidate':<34}{'median ms':>11}{'TFLOP/s':>9}{'max err':>10}")
        row = {"shape": dict(B=B, T=T, Tk=T, Hq=Hq, Hkv=Hkv, D=D), "candidates": {}}
        for cand, fn in candidates.items():
            timing = cuda_time(fn, repeats if cand == "triton" else 3, warmup=2 if cand == "triton" else 1)
            flops = 2 * B * Hq * D * T * (T + 1) / 2  # q·k over the causal half
            err = None
            if reference is not None:
                got = fn()
                err = max((got[n] - reference[n]).abs().nan_to_num(0).max().item() for n in got)
            entry = {**timing, **rates(timing["median_ms"] / 1e3, 2 * B * (Hq + Hkv) * T * D + 16 * B * Hq * T, flops),
                     "max_abs_err_vs_torch": err}
            row["candidates"][cand] = entry
            print(f"{cand:<34}{entry['median_ms']:>11.3f}{entry['tflops']:>9.1f}"
                  f"{'' if err is None else f'{err:>10.1e}'}")
        result["attention_summaries"].append(row)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="T=1024 and 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/kernels_<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")

    if args.device == "cuda":
        result = run_gpu(args.quick, args.repeats)
    else:
        result = run(args.device, args.quick, args.repeats, args.threads)
    kind = "gpu" if args.device == "cuda" else "cpu"
    out = args.out or RESULTS / f"kernels_{kind}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
