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
    "count_parameters",
    "estimate_weight_bytes",
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

    @property
    def hub_id(self) -> str:
        return f"Qwen/{self.name}"


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
    ]
}


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
    """The ``Qwen3_5Config`` (text + vision) of a known model, as in its ``config.json``."""
    from transformers import Qwen3_5Config

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
    vision = dict(
        deepstack_visual_indexes=[],
        depth=s.vision.depth,
        hidden_act="gelu_pytorch_tanh",
        hidden_size=s.vision.hidden_size,
        in_channels=3,
        initializer_range=0.02,
        intermediate_size=s.vision.intermediate_size,
        model_type="qwen3_5",
        num_heads=s.vision.num_heads,
        num_position_embeddings=2304,
        out_hidden_size=s.hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        tie_word_embeddings=s.tie_word_embeddings,
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    config.name_or_path = s.hub_id
    return config


def _model_class(text_only: bool):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration

    return Qwen3_5ForCausalLM if text_only else Qwen3_5ForConditionalGeneration


@lru_cache(maxsize=None)
def count_parameters(name: str, text_only: bool = False) -> int:
    """Exact parameter count of the HF model of that shape (built on the meta device)."""
    config = config_for(name)
    with torch.device("meta"):
        model = _model_class(text_only)(config.text_config if text_only else config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied embeddings count once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def estimate_weight_bytes(name: str, dtype: str | torch.dtype = torch.bfloat16, text_only: bool = False) -> int:
    """Bytes the weights take in ``dtype``, with or without the vision tower."""
    return count_parameters(_spec(name).name, text_only) * _dtype(dtype).itemsize


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
    seed: int = 0,
):
    """A random-weight model of a known model's real shape (HF classes, eval mode).

    ``num_hidden_layers`` keeps the real widths but fewer layers (a multiple of
    4), for quick experiments on a laptop.
    """
    config = config_for(name)
    if num_hidden_layers is not None:
        if num_hidden_layers < 4 or num_hidden_layers % 4:
            raise BadValue(f"num_hidden_layers must be a positive multiple of 4, got {num_hidden_layers}")
        config.text_config.num_hidden_layers = num_hidden_layers
        config.text_config.layer_types = layer_types(num_hidden_layers)
    torch.manual_seed(seed)
    cls = _model_class(text_only)
    model = cls._from_config(config.text_config if text_only else config, dtype=_dtype(dtype))
    return model.to(device).eval()
