"""Bad inputs to ``load()`` and half-broken checkpoints: refused before (or instead of) a
half-loaded model, with the value and what is valid. Each case would load silently, crash from
deep inside, or give a vague error without the checks in ``loading`` / ``checkpoint_files``."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen35_lab as ql
from qwen35_lab.checks import BadIndex, BadType, BadValue, InputError, MissingFile

ORGANISMS = Path(__file__).resolve().parents[2] / "data" / "organisms"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A private copy of the `recall` organism (1 MB), free to break."""
    out = tmp_path / "recall"
    shutil.copytree(ORGANISMS / "recall", out)
    return out


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "model.safetensors")


def _write_header(file: Path, header, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def test_the_copy_loads(ckpt):
    lab = ql.load(ckpt, device="cpu")
    assert lab.text_config.num_hidden_layers == 4


# ----------------------------------------------------------------------------- weights that do not cover the model

def test_missing_embed_tokens_is_refused_naming_the_key(ckpt):
    w = _weights(ckpt)
    name = next(k for k in w if "embed_tokens" in k)
    del w[name]
    save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadValue, match=r"does not cover the model.*missing \(\d+\):.*embed_tokens.*strict=False"):
        ql.load(ckpt, device="cpu")


def test_strict_false_loads_and_warns_with_the_list(ckpt):
    w = _weights(ckpt)
    name = next(k for k in w if "embed_tokens" in k)
    del w[name]
    save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"strict=False.*missing \(\d+\).*embed_tokens"):
        lab = ql.load(ckpt, device="cpu", strict=False)
    assert lab.text_config.num_hidden_layers == 4


def test_config_with_fewer_layers_than_the_weights_is_refused(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config["layer_types"] = config["layer_types"][:2]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadValue, match=r"unexpected \(\d+\):.*layers\.[23]\."):
        ql.load(ckpt, device="cpu")


def test_an_extra_tensor_is_refused(ckpt):
    w = _weights(ckpt)
    w["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadValue, match=r"unexpected \(1\): .*layers\.9\.mlp\.up_proj"):
        ql.load(ckpt, device="cpu")


def test_a_mis_shaped_tensor_is_refused(ckpt):
    w = _weights(ckpt)
    name = next(k for k in w if k.endswith("mlp.down_proj.weight"))
    w[name] = torch.zeros(w[name].shape[0], w[name].shape[1] + 1, dtype=w[name].dtype)
    save_file(w, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BadValue, match=r"mlp\.down_proj"):
        ql.load(ckpt, device="cpu")


# ----------------------------------------------------------------------------- broken files

def test_a_safetensors_file_with_no_tensors_is_refused(ckpt):
    save_file({}, ckpt / "model.safetensors")
    with pytest.raises(BadValue, match=r"holds no tensors"):
        ql.load(ckpt, device="cpu")


@pytest.mark.parametrize("header, match", [
    ([1, 2, 3], r"header is a JSON list, not an object"),
    ("weights", r"header is a JSON str"),
    ({"w": {"dtype": "F32", "shape": [2]}}, r"header entry of 'w'.*expected"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, r"header entry of 'w'"),
    ({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, r"header entry of 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, r"header entry of 'w'"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 80]}}, r"truncated.*describes"),
    ({"w": None}, r"header entry of 'w' is None"),
])
def test_malformed_safetensors_headers_are_named(ckpt, header, match):
    _write_header(ckpt / "model.safetensors", header, payload=b"\0" * 8)
    with pytest.raises(BadValue, match=match):
        ql.load(ckpt, device="cpu")


def test_a_header_length_past_the_file_is_refused(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(BadValue, match=r"header of 1000000 bytes in a file of 10 bytes"):
        ql.load(ckpt, device="cpu")


def test_a_tiny_file_is_refused(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(BadValue, match=r"3 bytes, too short"):
        ql.load(ckpt, device="cpu")


def test_a_header_that_is_not_json_is_refused(ckpt):
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
    with pytest.raises(BadValue, match=r"not valid JSON"):
        ql.load(ckpt, device="cpu")


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", r"holds a JSON list; a config.json is an object"),
    ('"qwen3_5"', r"holds a JSON str"),
    ("{not json", r"is not valid JSON"),
    ('{"model_type": "llama"}', r"model of type 'llama'.*qwen3_5"),
    ("{}", r"model of type None"),
])
def test_bad_config_json(ckpt, content, match):
    (ckpt / "config.json").write_text(content)
    with pytest.raises(BadValue, match=match):
        ql.load(ckpt, device="cpu")


def test_no_config_and_no_weights(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(MissingFile, match=r"has no config.json"):
        ql.load(ckpt, device="cpu")


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(MissingFile, match=r"no \*\.safetensors"):
        ql.load(ckpt, device="cpu")


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, error, match", [
    ({"device": "gpu"}, BadValue, r"unknown device 'gpu'"),
    ({"device": "cuda"}, BadValue, r"device 'cuda' is not available: no CUDA GPU"),
    ({"device": "tpu:0"}, BadValue, r"device 'tpu:0'"),
    ({"device": 0}, BadType, r"device must be a string"),
    ({"dtype": "int8"}, BadValue, r"unknown dtype 'int8'.*valid: 'auto', float32, bfloat16, float16"),
    ({"dtype": torch.int8}, BadValue, r"dtype torch.int8 is not supported"),
    ({"dtype": 32}, BadType, r"dtype must be a torch.dtype"),
    ({"text_only": "yes"}, BadType, r"text_only must be True or False, got 'yes'"),
    ({"check_memory": 1}, BadType, r"check_memory must be True or False"),
    ({"strict": None}, BadType, r"strict must be True or False"),
    ({"max_memory": "lots"}, BadType, r"max_memory must be a dict such as"),
    ({"max_memory": {}}, BadType, r"max_memory must be a dict"),
    ({"max_memory": {"cpu": "lots"}}, BadValue, r"max_memory\['cpu'\] = 'lots' is not a size"),
    ({"max_memory": {"gpu": "2GB"}}, BadValue, r"max_memory key 'gpu' is not a device"),
    ({"max_memory": {"cpu": -5}}, BadValue, r"max_memory\['cpu'\] = -5 is not a size"),
    ({"offload_folder": 3}, BadType, r"offload_folder must be a path"),
    ({"rope": "yarn"}, BadType, r"rope must be a rope_parameters dict"),
    ({"attn_implementation": "flash"}, BadValue, r"unknown attn_implementation 'flash'.*'sdpa'"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ql.load("recall", **kwargs)


@pytest.mark.parametrize("name, error, match", [
    ("", BadValue, r"needs a model name or path"),
    ("   ", BadValue, r"needs a model name or path"),
    (42, BadType, r"takes a model name or path as a string, got int"),
    (None, BadType, r"got NoneType"),
    ("./no/such/dir", MissingFile, r"no directory './no/such/dir'"),
    ("Qwen3.5-9b-instruct", BadValue, r"unknown model 'Qwen3.5-9b-instruct'.*Did you mean"),
    ("recal", BadValue, r"unknown model 'recal'.*'recall'"),
])
def test_bad_names(name, error, match):
    with pytest.raises(error, match=match):
        ql.load(name)


def test_a_file_is_not_a_checkpoint_directory(ckpt):
    with pytest.raises(BadValue, match=r"is a file; load\(\) takes a checkpoint directory"):
        ql.load(ckpt / "config.json")


def test_every_refusal_is_an_input_error():
    for error in (BadValue, BadType, BadIndex, MissingFile):
        assert issubclass(error, InputError)
    assert issubclass(BadValue, ValueError) and issubclass(BadType, TypeError)
    assert issubclass(BadIndex, IndexError) and issubclass(MissingFile, FileNotFoundError)
