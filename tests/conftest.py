"""Shared fixtures: the real models' facts (``tests/data/``), the official chat templates (an external
oracle, found where a user has them), and the `tiny` organism loaded once per session, on CPU, in fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from official_templates import OFFICIAL_TEMPLATES_MISSING, TEMPLATE_VARIANTS, find_official_template


ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "tests" / "data" / "model_facts.json"
MOE_FACTS = ROOT / "tests" / "data" / "moe_facts.json"

# The test models are tiny: one thread is faster than two (no oversubscription) and deterministic.
torch.set_num_threads(1)


@pytest.fixture
def facts() -> dict:
    """Facts about the real checkpoints (configs, cards' presets, YaRN, M-RoPE, tokenizer ids), each
    with its source: ``tests/data/model_facts.json``. Read afresh for each test: a test that hands a
    dict to transformers (which pops keys) cannot change what the next one sees."""
    return json.loads(FACTS.read_text(encoding="utf-8"))


@pytest.fixture
def moe_facts() -> dict:
    """Facts about the Mixture-of-Experts checkpoints (text and vision configs, parameter counts, expert
    layouts, routing), each with its status and source: ``tests/data/moe_facts.json``. Read afresh per test."""
    return json.loads(MOE_FACTS.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny():
    import qwen35_lab as ql

    return ql.load("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_text():
    import qwen35_lab as ql

    return ql.load("tiny", dtype="float32", device="cpu", text_only=True)


# ----------------------------------------------------------------------------- official chat templates
# Qwen's own templates are an external oracle, found where a user has them: see official_templates.py.
@pytest.fixture(scope="session")
def official_templates() -> dict[str, str]:
    """variant -> the official template's text; skips the test (one reason for all) when absent."""
    import os

    found = {variant: find_official_template(variant) for variant in TEMPLATE_VARIANTS}
    missing = [variant for variant, v in found.items() if v is None]
    if missing and os.environ.get("QWEN35_LAB_REFERENCE"):  # asked for explicitly: never skip silently
        pytest.fail(f"QWEN35_LAB_REFERENCE={os.environ['QWEN35_LAB_REFERENCE']!r} holds no official template for "
                    f"{missing}; expected chat_templates/<variant>.jinja there")
    if missing:
        pytest.skip(OFFICIAL_TEMPLATES_MISSING)
    return {variant: text for variant, (text, _) in found.items()}
