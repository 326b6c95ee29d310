"""load(): organisms, local directories, hub ids, and every bad input it must refuse clearly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import organisms
from qwen35_lab.loading import resolve

TINY = organisms.organisms_dir() / "tiny"


def _ids(lab, text="The Gated DeltaNet state"):
    return lab.encode(text)


def test_tiny_loads_through_from_pretrained_with_the_real_tokenizer(tiny):
    from transformers import Qwen3_5ForConditionalGeneration

    assert isinstance(tiny.model, Qwen3_5ForConditionalGeneration)
    assert tiny.tokenizer.convert_tokens_to_ids("<|im_start|>") == 248045
    assert tiny.processor is not None and tiny.chat_variant == "qwen3.5-small"
    c = tiny.text_config
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
    assert c.vocab_size == 248320 and c.linear_num_value_heads > c.linear_num_key_heads
    assert sum(c.rope_parameters["mrope_section"]) * 2 == int(c.head_dim * c.partial_rotary_factor) \
        if hasattr(c, "partial_rotary_factor") else sum(c.rope_parameters["mrope_section"]) * 2 == int(
            c.head_dim * c.rope_parameters["partial_rotary_factor"])


def test_tiny_is_small_and_has_hf_files():
    names = {p.name for p in TINY.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "preprocessor_config.json",
            "video_preprocessor_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY.iterdir()) < 40e6


@pytest.mark.slow
def test_tiny_build_is_bit_for_bit_reproducible(tmp_path):
    out = organisms.build("tiny", tmp_path / "tiny")
    for f in sorted(TINY.iterdir()):
        assert hashlib.sha256((out / f.name).read_bytes()).hexdigest() == hashlib.sha256(f.read_bytes()).hexdigest(), f.name


def test_save_and_reload_gives_identical_logits(tiny, tmp_path):
    ids = _ids(tiny)
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
    tiny.model.save_pretrained(tmp_path / "copy")
    again = ql.load(tmp_path / "copy", dtype="float32", device="cpu")
    with torch.no_grad():
        after = again.model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_text_only_and_multimodal_give_identical_logits_on_text(tiny, tiny_text):
    from transformers import Qwen3_5ForCausalLM

    assert isinstance(tiny_text.model, Qwen3_5ForCausalLM) and tiny_text.processor is None
    assert not any("visual" in n for n, _ in tiny_text.model.named_parameters())
    ids = _ids(tiny)
    with torch.no_grad():
        a = tiny.model(input_ids=ids).logits
        b = tiny_text.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_offloaded_load_gives_the_same_logits(tiny, tmp_path):
    """device='auto' with a small max_memory: accelerate offloads layers to disk; logits must not change."""
    lab = ql.load("tiny", dtype="float32", device="auto", max_memory={"cpu": "20MB"},
                  offload_folder=tmp_path / "offload")
    assert getattr(lab.model, "hf_device_map", None), "accelerate did not dispatch the model"
    assert "disk" in set(lab.model.hf_device_map.values())
    ids = _ids(tiny)
    with torch.no_grad():
        torch.testing.assert_close(lab.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_resolve_kinds():
    assert resolve("tiny").kind == "organism"
    assert resolve("Qwen3.5-0.8B").location == "Qwen/Qwen3.5-0.8B"
    assert resolve("Qwen/Qwen3.5-9B").kind == "hub"
    assert resolve("someone/Qwen3.5-finetune").kind == "hub"
    assert resolve(str(TINY)).kind == "local"


# ------------------------------------------------------------------ bad inputs
def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'Qwen3.5-08B'.*Did you mean 'Qwen3.5-0.8B'"):
        ql.load("Qwen3.5-08B")
    with pytest.raises(ValueError, match=r"unknown model 'tinny'.*'tiny'"):
        ql.load("tinny")


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match=r"no directory './no/such/model'"):
        ql.load("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        ql.load(tmp_path)


def test_directory_without_weights(tmp_path):
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights"):
        ql.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "empty"])
def test_corrupt_safetensors_is_refused_before_loading(tmp_path, damage):
    d = tmp_path / "broken"
    shutil.copytree(TINY, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        f.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"corrupt.*model\.safetensors"):
        ql.load(d)


def test_wrong_model_type(tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model of type 'llama'.*qwen3_5"):
        ql.load(d)


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match=r"unknown dtype 'float8'.*valid"):
        ql.load("tiny", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available"):
            ql.load("tiny", device="cuda")
    with pytest.raises(ValueError, match=r"unknown device 'gpu0'"):
        ql.load("tiny", device="gpu0")


def test_not_enough_memory_is_refused_with_numbers(monkeypatch):
    from qwen35_lab import loading

    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 1_000_000_000)
    with pytest.raises(MemoryError, match=r"Qwen3.5-9B needs about 18\.\d GB.*only 1\.0 GB"):
        ql.load("Qwen/Qwen3.5-9B", dtype="bfloat16", device="cpu")
    with pytest.raises(MemoryError, match=r"tiny needs about"):
        monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 1000)
        ql.load("tiny")


def test_offline_hub_error_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match=r"huggingface-cli download Qwen/Qwen3.5-0.8B --local-dir"):
        ql.load("Qwen/Qwen3.5-0.8B", check_memory=False)
