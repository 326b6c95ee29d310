"""The real Qwen3.5 / Qwen3.6 configurations, usable without their weights.

Each known model is a :class:`ModelSpec` of the dimensions published on its
model card; :func:`config_for` turns it into the ``Qwen3_5Config`` the real
``config.json`` holds, :func:`build_random` into a random-weight model of the
real shape (for benchmarks and memory checks), and :func:`count_parameters` /
:func:`estimate_weight_bytes` into sizes without allocating anything.

Shared by every size: vocabulary 248,320 (padded), ``head_dim`` 256 for gated
attention, 128-dim DeltaNet heads with 16 query/key heads, conv kernel 4,
layout ``L/4 × (3 × linear_attention → 1 × full_attention)``, native context
262,144, ``rope_theta`` 1e7, ``partial_rotary_factor`` 0.25 (64 of 256 dims),
interleaved M-RoPE sections ``[11, 11, 10]``, and a vision tower with patch
16, temporal patch 2 and a 2×2 merge.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

import torch
from .checks import BadValue

__all__ = [
    "KNOWN_MODELS",
    "ModelSpec",
    "VisionSpec",
    "build_random",
    "config_for",
    "count_active_parameters",
    "count_parameters",
    "estimate_weight_bytes",
    "moe_weights",
    "resolve_known",
]

VOCAB_SIZE = 248_320
NATIVE_CONTEXT = 262_144
IMAGE_TOKEN_ID = 248_056
VIDEO_TOKEN_ID = 248_057
VISION_START_TOKEN_ID = 248_053
VISION_END_TOKEN_ID = 248_054
EOS_TOKEN_ID = 248_044  # <|endoftext|>, the text config's eos
IM_END_TOKEN_ID = 248_046  # <|im_end|>, where a chat turn stops


@dataclass(frozen=True)
class VisionSpec:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of one released model (from its model card / config.json)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    linear_num_value_heads: int
    tie_word_embeddings: bool
    vision: VisionSpec
    template: str  # chat-template variant, see qwen35_lab.chat_format
    note: str = ""
    # Mixture-of-Experts members (model_type qwen3_5_moe): routed experts, top-k, expert and shared-expert widths
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    bos_token_id: int | None | str = "absent"  # the text config's bos_token_id ("absent": not in config.json)

    @property
    def hub_id(self) -> str:
        return f"Qwen/{self.name}"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


_VISION_SMALL = VisionSpec(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12)
_VISION_4B = VisionSpec(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16)
_VISION_LARGE = VisionSpec(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16)

KNOWN_MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("Qwen3.5-0.8B", 1024, 3584, 24, 8, 2, 16, True, _VISION_SMALL, "qwen3.5-small"),
        ModelSpec(
            "Qwen3.5-2B", 2048, 6144, 24, 8, 2, 16, True, _VISION_SMALL, "qwen3.5-small",
            note="vision tower assumed equal to 0.8B's (2B's vision config is unpublished)",
        ),
        ModelSpec("Qwen3.5-4B", 2560, 9216, 32, 16, 4, 32, True, _VISION_4B, "qwen3.5"),
        ModelSpec("Qwen3.5-9B", 4096, 12288, 32, 16, 4, 32, False, _VISION_LARGE, "qwen3.5"),
        ModelSpec("Qwen3.5-27B", 5120, 17408, 64, 24, 4, 48, False, _VISION_LARGE, "qwen3.5"),
        ModelSpec("Qwen3.6-27B", 5120, 17408, 64, 24, 4, 48, False, _VISION_LARGE, "qwen3.6"),
        # MoE: every layer's FFN is a sparse block (E experts, top-k, a gated shared expert); intermediate_size
        # is the expert width (the config.json has no dense intermediate_size). Sources: tests/data/moe_facts.json.
        ModelSpec("Qwen3.5-35B-A3B", 2048, 512, 40, 16, 2, 32, False, _VISION_LARGE, "qwen3.5",
                  num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                  shared_expert_intermediate_size=512),
        ModelSpec("Qwen3.5-122B-A10B", 3072, 1024, 48, 32, 2, 64, False, _VISION_LARGE, "qwen3.5",
                  num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
                  shared_expert_intermediate_size=1024, bos_token_id=None),
        ModelSpec("Qwen3.5-397B-A17B", 4096, 1024, 60, 32, 2, 64, False, _VISION_LARGE, "qwen3.5",
                  num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
                  shared_expert_intermediate_size=1024, bos_token_id=None,
                  note="no config.json copy seen: dimensions corroborated by NVIDIA Megatron-LM's config and the "
                       "mlx-community card; bos_token_id assumed null as in 122B"),
        ModelSpec("Qwen3.6-35B-A3B", 2048, 512, 40, 16, 2, 32, False, _VISION_LARGE, "qwen3.6",
                  num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
                  shared_expert_intermediate_size=512, bos_token_id=EOS_TOKEN_ID),
    ]
}
MOE_MODELS = tuple(n for n, s in KNOWN_MODELS.items() if s.is_moe)


def resolve_known(name: str) -> ModelSpec | None:
    """The spec for ``"Qwen3.5-9B"`` or ``"Qwen/Qwen3.5-9B"`` (case-insensitive), else None."""
    key = name.split("/")[-1].lower()
    for spec in KNOWN_MODELS.values():
        if spec.name.lower() == key:
            return spec
    return None


def _spec(name: str) -> ModelSpec:
    spec = resolve_known(name)
    if spec is None:
        close = difflib.get_close_matches(name.split("/")[-1], list(KNOWN_MODELS), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise BadValue(f"unknown model {name!r}; known models are {', '.join(KNOWN_MODELS)}.{hint}")
    return spec


def default_rope_parameters() -> dict:
    return {
        "mrope_interleaved": True,
        "mrope_section": [11, 11, 10],
        "rope_type": "default",
        "rope_theta": 10_000_000,
        "partial_rotary_factor": 0.25,
    }


def layer_types(num_layers: int, full_attention_interval: int = 4) -> list[str]:
    """``[linear, linear, linear, full] * (L / 4)``: every 4th layer is gated attention."""
    return [
        "full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
        for i in range(num_layers)
    ]


def config_for(name: str):
    """The ``Qwen3_5Config`` (text + vision) of a known model, as in its ``config.json``; a
    ``Qwen3_5MoeConfig`` for the Mixture-of-Experts members."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    s = _spec(name)
    text = dict(
        attention_bias=False,
        attention_dropout=0.0,
        attn_output_gate=True,
        dtype="bfloat16",
        eos_token_id=EOS_TOKEN_ID,
        full_attention_interval=4,
        head_dim=256,
        hidden_act="silu",
        hidden_size=s.hidden_size,
        initializer_range=0.02,
        intermediate_size=s.intermediate_size,
        layer_types=layer_types(s.num_hidden_layers),
        linear_conv_kernel_dim=4,
        linear_key_head_dim=128,
        linear_num_key_heads=16,
        linear_num_value_heads=s.linear_num_value_heads,
        linear_value_head_dim=128,
        max_position_embeddings=NATIVE_CONTEXT,
        mlp_only_layers=[],
        model_type="qwen3_5_text",
        mtp_num_hidden_layers=1,
        mtp_use_dedicated_embeddings=False,
        num_attention_heads=s.num_attention_heads,
        num_hidden_layers=s.num_hidden_layers,
        num_key_value_heads=s.num_key_value_heads,
        rms_norm_eps=1e-6,
        tie_word_embeddings=s.tie_word_embeddings,
        use_cache=True,
        vocab_size=VOCAB_SIZE,
        mamba_ssm_dtype="float32",
        rope_parameters=default_rope_parameters(),
    )
    if s.is_moe:
        del text["intermediate_size"]
        text.update(model_type="qwen3_5_moe_text", num_experts=s.num_experts,
                    num_experts_per_tok=s.num_experts_per_tok, moe_intermediate_size=s.moe_intermediate_size,
                    shared_expert_intermediate_size=s.shared_expert_intermediate_size,
                    router_aux_loss_coef=0.001, output_router_logits=False)
        if s.bos_token_id != "absent":
            text["bos_token_id"] = s.bos_token_id
    vision = dict(
        deepstack_visual_indexes=[],
        depth=s.vision.depth,
        hidden_act="gelu_pytorch_tanh",
        hidden_size=s.vision.hidden_size,
        in_channels=3,
        initializer_range=0.02,
        intermediate_size=s.vision.intermediate_size,
        model_type="qwen3_5_moe" if s.is_moe else "qwen3_5",
        num_heads=s.vision.num_heads,
        num_position_embeddings=2304,
        out_hidden_size=s.hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = (Qwen3_5MoeConfig if s.is_moe else Qwen3_5Config)(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=s.tie_word_embeddings,
    )
    config.architectures = ["Qwen3_5MoeForConditionalGeneration" if s.is_moe else "Qwen3_5ForConditionalGeneration"]
    config.name_or_path = s.hub_id
    return config


def is_moe_config(config) -> bool:
    """Whether a (full or text) config describes a Mixture-of-Experts model (``qwen3_5_moe``)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_experts", 0) > 0 and hasattr(text, "num_experts_per_tok")


def _model_class(text_only: bool, moe: bool = False):
    from transformers import (Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeForCausalLM,
                              Qwen3_5MoeForConditionalGeneration)

    if moe:
        return Qwen3_5MoeForCausalLM if text_only else Qwen3_5MoeForConditionalGeneration
    return Qwen3_5ForCausalLM if text_only else Qwen3_5ForConditionalGeneration


@lru_cache(maxsize=None)
def count_parameters(name: str, text_only: bool = False) -> int:
    """Exact parameter count of the HF model of that shape (built on the meta device)."""
    config = config_for(name)
    with torch.device("meta"):
        model = _model_class(text_only, is_moe_config(config))(config.text_config if text_only else config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def estimate_weight_bytes(name: str, dtype: str | torch.dtype = torch.bfloat16, text_only: bool = False) -> int:
    """Bytes the weights take in ``dtype``, with or without the vision tower (all experts of a MoE model)."""
    return count_parameters(_spec(name).name, text_only) * _dtype(dtype).itemsize


def expert_parameters(name: str) -> int:
    """Parameters of the routed experts of a MoE model, all layers (``3 · I · D`` per expert); 0 for dense."""
    s = _spec(name)
    return s.num_hidden_layers * s.num_experts * 3 * s.moe_intermediate_size * s.hidden_size if s.is_moe else 0


def count_active_parameters(name: str, text_only: bool = False) -> int:
    """Parameters one token uses: everything but the ``E - k`` routed experts it is not sent to in each
    layer (embeddings, ``lm_head``, the shared expert and the router included); the total for dense models."""
    s = _spec(name)
    total = count_parameters(s.name, text_only)
    if not s.is_moe:
        return total
    return total - expert_parameters(s.name) * (s.num_experts - s.num_experts_per_tok) // s.num_experts


def moe_weights(name: str, dtype: str | torch.dtype = torch.bfloat16, *, text_only: bool = False,
                link_gb_per_s: float = 25.0) -> dict:
    """Total and active weights of a known model, and what keeping the routed experts off the GPU costs.

    Returns ``total_params``, ``active_params`` (per token), ``expert_params`` (routed experts, all
    layers), their bytes in ``dtype`` (``total_bytes``, ``active_bytes``, ``expert_bytes``),
    ``resident_bytes`` (what stays on the accelerator when the experts live in CPU RAM or on disk:
    everything but the routed experts) and, for such offloading, the worst case of one decode step
    that finds none of its experts on the GPU: ``offload_bytes_per_token`` = layers × k × one expert,
    and ``offload_seconds_per_token`` at ``link_gb_per_s`` GB/s (PCIe 4 x16 ≈ 25; NVMe ≈ 3–7).
    """
    from .checks import check_float

    s = _spec(name)
    check_float("link_gb_per_s", link_gb_per_s, lo=0, lo_open=True)
    b = _dtype(dtype).itemsize
    total, active, experts = count_parameters(s.name, text_only), count_active_parameters(s.name, text_only), \
        expert_parameters(s.name)
    one_expert = 3 * s.moe_intermediate_size * s.hidden_size if s.is_moe else 0
    per_token = s.num_hidden_layers * s.num_experts_per_tok * one_expert * b
    return {
        "model": s.name, "dtype": str(_dtype(dtype)).replace("torch.", ""), "moe": s.is_moe,
        "num_experts": s.num_experts, "num_experts_per_tok": s.num_experts_per_tok,
        "total_params": total, "active_params": active, "expert_params": experts,
        "total_bytes": total * b, "active_bytes": active * b, "expert_bytes": experts * b,
        "resident_bytes": (total - experts) * b,
        "offload_bytes_per_token": per_token, "offload_seconds_per_token": per_token / (link_gb_per_s * 1e9),
    }


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    valid = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype not in valid:
        raise BadValue(f"unknown dtype {dtype!r}; valid: {', '.join(valid)} or a torch.dtype")
    return valid[dtype]


def build_random(
    name: str,
    *,
    dtype: str | torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    text_only: bool = False,
    num_hidden_layers: int | None = None,
    num_experts: int | None = None,
    seed: int = 0,
):
    """A random-weight model of a known model's real shape (HF classes, eval mode).

    ``num_hidden_layers`` keeps the real widths but fewer layers (a multiple of
    4), for quick experiments on a laptop. ``num_experts`` (MoE models) keeps the
    real expert width and top-k but fewer routed experts (at least top-k).
    """
    from .checks import check_int

    config = config_for(name)
    text = config.text_config
    if num_hidden_layers is not None:
        check_int("num_hidden_layers", num_hidden_layers, lo=4)
        if num_hidden_layers % 4:
            raise BadValue(f"num_hidden_layers must be a positive multiple of 4, got {num_hidden_layers}")
        text.num_hidden_layers = num_hidden_layers
        text.layer_types = layer_types(num_hidden_layers)
    if num_experts is not None:
        if not is_moe_config(config):
            raise BadValue(f"num_experts={num_experts!r}: {name} is a dense model (no routed experts); MoE models: "
                           f"{', '.join(MOE_MODELS)}")
        check_int(f"num_experts (top-k of {name} is {text.num_experts_per_tok})", num_experts,
                  lo=text.num_experts_per_tok)
        text.num_experts = num_experts
    torch.manual_seed(seed)
    cls = _model_class(text_only, is_moe_config(config))
    model = cls._from_config(config.text_config if text_only else config, dtype=_dtype(dtype))
    return model.to(device).eval()
