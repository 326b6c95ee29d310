"""A private `tiny` for the bad-input tests (they check that refused calls leave it untouched) and
its plain logits on a module's ``IDS``."""

from __future__ import annotations

import pytest

import qwen35_lab as ql


@pytest.fixture(scope="module")
def lab():
    return ql.load("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def plain(lab, request):
    return lab.run(request.module.IDS).meta["last_logits"]
