"""`tiny-moe`: a deterministic random-weight Qwen3.5 Mixture-of-Experts with the real vocabulary.

The `tiny` organism's hybrid stack (two groups of ``[3 × Gated DeltaNet,
1 × gated attention]``, the same heads, M-RoPE sections and small vision tower)
with the sparse FFN of the ``qwen3_5_moe`` models in every layer: a softmax
router over 8 experts, top-2 renormalised, fused expert weights, and a shared
expert scaled by its sigmoid gate. It is saved as a normal
``Qwen3_5MoeForConditionalGeneration`` checkpoint (``model_type``
``qwen3_5_moe``) and loads through transformers like the real 35B-A3B. It
exercises every MoE code path (text, images, video, routing probes and edits);
its outputs mean nothing. The router is initialised wider than HF's default
(std 0.5 instead of 0.02) so that routing is not uniform noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .._io import atomic_directory
from . import tiny

SEED = 0
NAME = "tiny-moe"

TEXT_CONFIG = {k: v for k, v in tiny.TEXT_CONFIG.items() if k != "intermediate_size"}
TEXT_CONFIG.update(
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=64,
    router_aux_loss_coef=0.001,
    output_router_logits=False,
)
VISION_CONFIG = dict(tiny.VISION_CONFIG)
ROUTER_STD = 0.5


def tiny_moe_config():
    """`tiny`'s configuration with the MoE FFN (``Qwen3_5MoeConfig``, model_type ``qwen3_5_moe``)."""
    from transformers import Qwen3_5MoeConfig

    outer = {k: v for k, v in tiny.tiny_config().to_dict().items()
             if k.endswith("token_id") and not k.startswith(("bos", "eos", "pad"))}
    config = Qwen3_5MoeConfig(text_config=dict(TEXT_CONFIG), vision_config=dict(VISION_CONFIG),
                              tie_word_embeddings=True, **outer)
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    return config


def build_tiny_moe(out_dir: str | Path) -> Path:
    """Write the `tiny-moe` organism to ``out_dir`` (replaced atomically); bit-for-bit reproducible."""
    from types import SimpleNamespace

    from transformers import GenerationConfig, Qwen3_5MoeForConditionalGeneration

    from .train import init_decay

    torch.manual_seed(SEED)
    model = Qwen3_5MoeForConditionalGeneration._from_config(tiny_moe_config(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(SEED)
    init_decay(SimpleNamespace(model=model.model.language_model), gen)  # the Gated DeltaNet paper's decay init
    for layer in model.model.language_model.layers:
        router = layer.mlp.gate
        router.weight.data = torch.randn(router.weight.shape, generator=gen) * ROUTER_STD
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(**tiny.GENERATION_CONFIG)

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name, content in [
            ("preprocessor_config.json", tiny.PREPROCESSOR_CONFIG),
            ("video_preprocessor_config.json", tiny.VIDEO_PREPROCESSOR_CONFIG),
            ("qwen35_lab.json", ORGANISM_META),
        ]:
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(CARD)
        for f in tmp.iterdir():
            f.chmod(0o644)
    return Path(out_dir)


ORGANISM_META = {"tokenizer": "qwen3.5", "chat_template": "qwen3.5-small", "organism": NAME, "seed": SEED}

CARD = """\
# `tiny-moe` — a random-weight Qwen3.5 Mixture-of-Experts for plumbing

Built by `python -m qwen35_lab.organisms build tiny-moe` (seed 0, bit-for-bit reproducible).

| | |
|---|---|
| class | `Qwen3_5MoeForConditionalGeneration` (HF transformers, `model_type` `qwen3_5_moe`) |
| layers | 8: 2 × [3 × Gated DeltaNet, 1 × gated attention], every FFN a sparse MoE block |
| MoE block | router over 8 experts, top-2 renormalised; expert width 32 (fused `gate_up_proj [8, 64, 64]`, `down_proj [8, 64, 32]`); shared expert width 64 with a sigmoid gate |
| hidden | 64 |
| gated attention | 4 query heads, 2 KV heads, head_dim 64, partial RoPE 16 dims, M-RoPE sections [3, 3, 2] |
| Gated DeltaNet | 2 q/k heads, 4 value heads, head dims 32, conv kernel 4 |
| vision tower | depth 2, hidden 64, patch 16, temporal patch 2, merge 2 |
| vocabulary | the real 248,320-entry Qwen3.5 vocabulary and token ids (embeddings tied to keep it small) |
| weights | bfloat16 safetensors; router weights N(0, 0.5²); decay init A ~ U(1, 16), dt log-uniform [1e-3, 0.1] |

The weights are random: `tiny-moe` exercises every MoE code path (text, images, video, router probes,
routing edits) but its outputs and its routing mean nothing. The trained `moe-mix` organism shows
experts that specialise.
"""
