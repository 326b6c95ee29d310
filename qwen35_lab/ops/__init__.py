"""Ops of the Qwen3.5 layers: the gated delta rule and softmax-attention summaries.

Every public name here is the op a caller should use. Four of them have a Triton kernel
(``kernels/``, installed as ``qwen35_lab._kernels``) with the same signature and semantics and
dispatch by device: CUDA tensors run the kernel, CPU tensors the torch reference;
``QWEN35_LAB_OPS=torch|triton|auto`` (default auto) forces either (see ``dispatch.py``).
``ops.BACKEND`` reads that setting. Importing the modules directly
(``qwen35_lab.ops.gated_delta``, ``qwen35_lab.ops.attention``) always gives the torch reference.

=============================  ==============================  =========================
op                             torch reference                 Triton kernel
=============================  ==============================  =========================
chunk_gated_delta_rule         gated_delta.py                  gated_delta_chunk.py
recurrent_gated_delta_step     gated_delta.py                  gated_delta_step.py
attention_summaries            attention.py                    attention_summary.py
attention_probs_rows           attention.py                    attention_summary.py
the others                     gated_delta.py                  (torch only)
=============================  ==============================  =========================
"""

from . import attention as _attention_torch
from . import dispatch
from . import gated_delta as _gated_delta_torch

chunk_gated_delta_rule = dispatch.dispatched(_gated_delta_torch.chunk_gated_delta_rule, "gated_delta_chunk")
recurrent_gated_delta_step = dispatch.dispatched(_gated_delta_torch.recurrent_gated_delta_step, "gated_delta_step")
attention_summaries = dispatch.dispatched(_attention_torch.attention_summaries, "attention_summary")
attention_probs_rows = dispatch.dispatched(_attention_torch.attention_probs_rows, "attention_summary")

naive_recurrent_gated_delta_rule = _gated_delta_torch.naive_recurrent_gated_delta_rule
replay_state = _gated_delta_torch.replay_state
replay_states = _gated_delta_torch.replay_states
deltanet_effective_attention = _gated_delta_torch.deltanet_effective_attention


def __getattr__(name: str):
    if name == "BACKEND":  # "auto", "torch" or "triton": the current QWEN35_LAB_OPS
        return dispatch.mode()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND",
    "attention_probs_rows",
    "attention_summaries",
    "chunk_gated_delta_rule",
    "deltanet_effective_attention",
    "naive_recurrent_gated_delta_rule",
    "recurrent_gated_delta_step",
    "replay_state",
    "replay_states",
]
