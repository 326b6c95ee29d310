"""Triton kernels of qwen35_lab, installed as ``qwen35_lab._kernels``.

Never import this folder as a top-level package named ``kernels``: that is the
name of HF's kernel-hub package, which transformers probes for. Use the ops in
``qwen35_lab.ops``; they dispatch CUDA tensors here (``qwen35_lab/ops/dispatch.py``).
This file imports nothing, so importing the package never imports triton.

- ``gated_delta_chunk.py``: ``chunk_gated_delta_rule``, the chunked gated delta rule (WY/UT form),
  three kernels: per-chunk WY transform, the state scan that stores the chunk states, the outputs.
- ``gated_delta_step.py``: ``recurrent_gated_delta_step``, one fused decode step on the fp32 state.
- ``attention_summary.py``: ``attention_summaries`` (online softmax over key blocks, O(T) memory)
  and ``attention_probs_rows`` (exact probability rows for chosen heads and rows).
- ``_common.py``: autotune configurations (a single one under ``TRITON_INTERPRET=1``), kernel limits.

Each op has the signature and semantics of its torch reference in ``qwen35_lab/ops/``.
"""
