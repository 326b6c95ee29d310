"""Known model configs against the real config.json, the real dimensions and the model cards
(facts in ``tests/data/model_facts.json``, each with its source)."""

from __future__ import annotations


import pytest
import torch

from qwen35_lab import configs


def _compare(ours: dict, ref: dict, path=""):
    diffs = []
    for k, v in ref.items():
        if k in ("transformers_version",):
            continue
        if k not in ours:
            diffs.append(f"missing {path}{k}")
        elif isinstance(v, dict):
            diffs += _compare(ours[k], v, f"{path}{k}.")
        elif ours[k] != v:
            diffs.append(f"{path}{k}: ours {ours[k]!r} != {v!r}")
    return diffs


def test_0_8b_config_equals_the_real_config_json(facts):
    ref = facts["config_json"]["Qwen3.5-0.8B"]["config"]
    ours = configs.config_for("Qwen3.5-0.8B").to_dict()
    diffs = _compare(ours, ref)
    # HF names the vision sub-config's type itself; the checkpoint says "qwen3_5"
    assert diffs == ["vision_config.model_type: ours 'qwen3_5_vision' != 'qwen3_5'"]


@pytest.mark.parametrize("name", ["Qwen3.5-0.8B", "Qwen3.5-2B", "Qwen3.5-4B", "Qwen3.5-9B", "Qwen3.5-27B"])
def test_dimensions_equal_the_real_configs(facts, name):
    sizes = facts["dimensions"][name]
    t = configs.config_for(name).get_text_config()
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "linear_num_value_heads"):
        assert getattr(t, key) == sizes[key], key
    if isinstance(sizes["tie_word_embeddings"], bool):
        assert t.tie_word_embeddings == sizes["tie_word_embeddings"]
    if isinstance(sizes["vision"], dict):
        v = configs.config_for(name).vision_config
        for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size"):
            assert getattr(v, key) == sizes["vision"][key], key
    assert t.layer_types == ["linear_attention"] * 3 + ["full_attention"] + t.layer_types[4:]
    assert t.layer_types.count("full_attention") == t.num_hidden_layers // 4


def test_qwen3_6_27b_matches_its_card(facts):
    card = facts["card_dimensions"]["Qwen3.6-27B"]
    t = configs.config_for("Qwen3.6-27B").get_text_config()
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "linear_num_value_heads",
                "linear_num_key_heads", "num_attention_heads", "num_key_value_heads"):
        assert getattr(t, key) == card[key], key


@pytest.mark.parametrize("name,billions", [("Qwen3.5-0.8B", 0.8), ("Qwen3.5-2B", 2), ("Qwen3.5-4B", 4),
                                           ("Qwen3.5-9B", 9), ("Qwen3.5-27B", 27)])
def test_parameter_counts_match_the_names(name, billions):
    n = configs.count_parameters(name) / 1e9
    assert abs(n - billions) / billions < 0.15, n  # names are rounded (4B has 4.5B with vision)
    assert configs.count_parameters(name, text_only=True) < configs.count_parameters(name)


def test_weight_bytes_follow_dtype():
    n = configs.count_parameters("Qwen3.5-0.8B")
    assert configs.estimate_weight_bytes("Qwen3.5-0.8B", torch.bfloat16) == 2 * n
    assert configs.estimate_weight_bytes("Qwen3.5-0.8B", "float32") == 4 * n
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        configs.estimate_weight_bytes("Qwen3.5-0.8B", "int3")


def test_build_random_has_the_real_shape():
    model = configs.build_random("Qwen3.5-0.8B", dtype=torch.bfloat16, num_hidden_layers=4, text_only=True)
    t = model.config
    assert t.hidden_size == 1024 and t.num_hidden_layers == 4
    attn = model.model.layers[3].self_attn
    assert attn.q_proj.weight.shape == (8 * 256 * 2, 1024)  # query and output gate
    dn = model.model.layers[0].linear_attn
    assert dn.in_proj_qkv.weight.shape == (128 * 16 * 2 + 128 * 16, 1024)
    assert model.dtype == torch.bfloat16


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'Qwen3.5-9b-instruct'.*Did you mean"):
        configs.config_for("Qwen3.5-9b-instruct")
    with pytest.raises(ValueError, match="multiple of 4"):
        configs.build_random("Qwen3.5-0.8B", num_hidden_layers=6)


def test_card_layout_line_matches_layer_types(facts):
    groups = facts["layout"]["Qwen3.5-9B"]["groups"]
    t = configs.config_for("Qwen3.5-9B").get_text_config()
    assert t.num_hidden_layers == 4 * groups
