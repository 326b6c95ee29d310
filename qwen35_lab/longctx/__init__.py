"""Long context: RoPE / YaRN configuration and analysis, the memory planner, chunked prefill.

>>> import qwen35_lab as ql
>>> from qwen35_lab import longctx
>>> rope = longctx.yarn_for_context(1_010_000)      # the cards' YaRN: factor 4.0, original 262,144
>>> lab = ql.load("Qwen/Qwen3.5-9B", rope=rope)      # or longctx.set_rope(lab, rope) on a loaded model
>>> longctx.rope_info(lab)                            # active RoPE and its maximum context
>>> longctx.rope_table(lab)                           # per frequency: wavelength, keep / ramp / interpolate
>>> longctx.plan_memory("Qwen3.5-9B", 262_144)        # KV cache 8.6 GB in bf16; the DeltaNet state is constant
>>> longctx.chunked_prefill(lab, ids, chunk_size=4096, capture="layers.*.deltanet.beta")
"""

from .analysis import (
    RopeCheck,
    RopeTable,
    mrope_axes,
    plot_rope_decay,
    plot_rope_frequencies,
    rope_frequencies,
    rope_table,
    rotated_similarity,
    yarn_attention_factor,
    verify_rope,
    yarn_inv_freq,
)
from .memory import MemoryPlan, check_fits, format_memory_table, memory_table, plan_memory, plot_memory
from .attention import chunk_attention, chunked_attention
from .needles import NeedleHeatmap, needle_heatmap, plot_needle_heatmap
from .plots import (
    format_needles_short_inputs,
    format_short_inputs,
    plot_answer_loss,
    plot_attention_at_question,
    plot_length_accuracy,
    plot_needles_accuracy,
    plot_needles_attention,
    plot_prefill_summary,
)
from .prefill import LongDocument, PrefillResult, chunked_prefill, long_document
from .rope import (
    ROPE_TYPES,
    RopeInfo,
    apply_rope_to_config,
    check_context,
    max_context,
    rope_info,
    set_rope,
    yarn_for_context,
)

__all__ = [
    "ROPE_TYPES", "RopeInfo", "apply_rope_to_config", "check_context", "max_context", "rope_info", "set_rope",
    "yarn_for_context",
    "RopeTable", "mrope_axes", "plot_rope_decay", "plot_rope_frequencies", "rope_frequencies", "rope_table",
    "rotated_similarity", "yarn_attention_factor", "yarn_inv_freq", "RopeCheck", "verify_rope",
    "MemoryPlan", "check_fits", "format_memory_table", "memory_table", "plan_memory", "plot_memory",
    "LongDocument", "PrefillResult", "chunked_prefill", "long_document",
    "chunk_attention", "chunked_attention", "NeedleHeatmap", "needle_heatmap", "plot_needle_heatmap",
    "plot_prefill_summary", "plot_length_accuracy", "plot_attention_at_question", "plot_answer_loss",
    "format_short_inputs", "plot_needles_accuracy", "plot_needles_attention", "format_needles_short_inputs",
]
