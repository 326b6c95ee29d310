"""What the Triton kernels share: launch configurations, dot precision, kernel limits."""

from __future__ import annotations

import torch
import triton

from qwen35_lab.ops.dispatch import UnsupportedByKernel, interpreting

HALF_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def device_function(fn):
    """``triton.jit`` for a function that kernels call.

    Under the interpreter a jitted device function re-patches ``triton.language`` on every call,
    which costs milliseconds each time; the kernel launch has already patched it, so there the
    interpreter's own rewrite of the function is called directly (same code, same semantics).
    """
    jitted = triton.jit(fn)
    if interpreting() and hasattr(jitted, "rewrite"):
        return jitted.rewrite()
    return jitted


def configs(options: list[dict], warps: tuple[int, ...] = (4, 8), stages: tuple[int, ...] = (2,)) -> list:
    """Autotune configurations: every option × warps × stages on a GPU; the first one alone under the
    interpreter (the autotuner needs a driver to time several)."""
    if interpreting():
        return [triton.Config(dict(options[0]), num_warps=warps[0], num_stages=stages[0])]
    return [triton.Config(dict(o), num_warps=w, num_stages=s) for o in options for w in warps for s in stages]


def block(n: int) -> int:
    """A power-of-two tile at least ``n`` wide and at least 16 (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(n))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of the kernels' scratch tensors: the inputs' half dtype when all share one, else fp32."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 and tensors[0].dtype in HALF_DTYPES else torch.float32


def fp32_dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands: ``tf32x3`` (three TF32 products, about fp32 accuracy)
    for fp32 inputs, plain TF32 for half inputs, whose own rounding is coarser. Accumulation is fp32
    either way; the interpreter computes exact fp32 products."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def check_kernel_dtypes(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise UnsupportedByKernel(
                f"the Triton kernel takes float32, float16 or bfloat16 tensors, got {name} of dtype {t.dtype}; "
                f"QWEN35_LAB_OPS=torch runs the torch reference"
            )


def check_head_dim(name: str, size: int, limit: int = 256) -> None:
    if size > limit:
        raise UnsupportedByKernel(
            f"the Triton kernel keeps a whole head in registers and takes {name} <= {limit}, got {name} = {size}; "
            f"QWEN35_LAB_OPS=torch runs the torch reference"
        )


def check_device(*tensors: torch.Tensor) -> None:
    """The kernels read CUDA memory, or CPU memory under the interpreter."""
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"a Triton kernel got a tensor on {t.device}; Triton runs CUDA tensors, or CPU tensors "
                f"under TRITON_INTERPRET=1"
            )
