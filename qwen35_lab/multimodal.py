"""Images and video in chat messages: model inputs, frame sampling and inspection.

``build_inputs(lab, messages, ...)`` turns OpenAI-style messages (text, images, videos) into the
model's inputs. This first version handles text-only messages; vision content is added by the
multimodal work.
"""

from __future__ import annotations

import torch

__all__ = ["build_inputs", "has_vision"]


def has_vision(messages) -> bool:
    """Whether any message carries an image or a video part."""
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image", "image_url", "video", "video_url"):
                    return True
    return False


def build_inputs(lab, messages, *, enable_thinking=None, tools=None, add_generation_prompt=True, **media) -> dict:
    """Model inputs (``input_ids``, ``attention_mask`` and vision tensors) for chat ``messages``."""
    if has_vision(messages):
        raise NotImplementedError("image and video messages are not supported yet")
    prompt = lab.render(messages, enable_thinking=enable_thinking, tools=tools,
                        add_generation_prompt=add_generation_prompt)
    ids = lab.encode(prompt)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
