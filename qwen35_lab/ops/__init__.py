"""Ops of the Qwen3.5 layers: the gated delta rule and softmax-attention summaries.

Every public name here is the op a caller should use. Today each one is bound to its torch
reference (``gated_delta.py``, ``attention.py``); the Triton kernels (``kernels/``) share the
signatures and will be bound here by device, CPU keeping torch. Importing the modules directly
(``qwen35_lab.ops.gated_delta``) always gives the torch reference.
"""

from . import attention as _attention_torch
from . import gated_delta as _gated_delta_torch

BACKEND = "torch"  # which implementation the names below are bound to

naive_recurrent_gated_delta_rule = _gated_delta_torch.naive_recurrent_gated_delta_rule
chunk_gated_delta_rule = _gated_delta_torch.chunk_gated_delta_rule
recurrent_gated_delta_step = _gated_delta_torch.recurrent_gated_delta_step
replay_state = _gated_delta_torch.replay_state
replay_states = _gated_delta_torch.replay_states
deltanet_effective_attention = _gated_delta_torch.deltanet_effective_attention
attention_summaries = _attention_torch.attention_summaries
attention_probs_rows = _attention_torch.attention_probs_rows

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
