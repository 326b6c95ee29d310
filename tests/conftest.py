"""Shared fixtures: the `tiny` organism loaded once per session, on CPU, in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"

# The test models are tiny: one thread is faster than two (no oversubscription) and deterministic.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference() -> Path:
    if not REFERENCE.is_dir():
        raise RuntimeError(f"the reference files are expected beside the repository at {REFERENCE}")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny():
    import qwen35_lab as ql

    return ql.load("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_text():
    import qwen35_lab as ql

    return ql.load("tiny", dtype="float32", device="cpu", text_only=True)
