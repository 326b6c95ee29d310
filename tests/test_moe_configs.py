"""The Mixture-of-Experts members: known configs against the checkpoints' facts, parameter counts (total and
active), random real-shape models, the `tiny-moe` organism, and loading both checkpoint expert layouts
through transformers' own path (facts in ``tests/data/moe_facts.json``, each with its status and source)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import configs, organisms
from qwen35_lab.checks import BadValue, OverBudget

MOE = ["Qwen3.5-35B-A3B", "Qwen3.5-122B-A10B", "Qwen3.5-397B-A17B", "Qwen3.6-35B-A3B"]
STATUS_WORDS = {"verified", "corroborated", "derived", "unsure"}
TINY_MOE = organisms.organisms_dir() / "tiny-moe"


def _ours(text, field):
    if field == "full_attention_layer_indices":
        return [i for i, t in enumerate(text.layer_types) if t == "full_attention"]
    if field == "rope_parameters":
        return dict(text.rope_parameters)
    return getattr(text, field, "absent")


def test_the_facts_carry_a_status_and_a_source(moe_facts):
    assert set(moe_facts["models"]) == set(MOE)
    for name, m in moe_facts["models"].items():
        for section in ("text_config", "vision_config", "param_counts"):
            for field, fact in m[section].items():
                assert fact["status"] in STATUS_WORDS, (name, field)
                assert fact["source"] or fact["status"] == "derived", (name, field)
    # where a config.json copy or transcription was seen, the MoE dimensions are verified
    for name in ("Qwen3.5-35B-A3B", "Qwen3.6-35B-A3B", "Qwen3.5-122B-A10B"):
        for field in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                      "moe_intermediate_size", "shared_expert_intermediate_size", "linear_num_value_heads"):
            assert moe_facts["models"][name]["text_config"][field]["status"] == "verified", (name, field)


@pytest.mark.parametrize("name", MOE)
def test_moe_text_configs_equal_the_facts(moe_facts, name):
    fact = moe_facts["models"][name]
    config = configs.config_for(name)
    text = config.get_text_config()
    diffs = []
    for field, f in fact["text_config"].items():
        ref = f["value"]
        ours = _ours(text, field)
        if ref == "absent":  # not in config.json: transformers' class has no such field, or its default None
            ok = ours in ("absent", None)
        else:
            ok = ours == ref
        if not ok:
            diffs.append(f"{field}: ours {ours!r} != {ref!r} ({f['status']}: {f['source']})")
    assert diffs == []
    assert config.model_type == fact["top_level"]["model_type"] == "qwen3_5_moe"
    assert config.architectures == fact["top_level"]["architectures"]
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                "tie_word_embeddings"):
        assert getattr(config, key) == fact["top_level"][key], key
    assert configs.resolve_known(fact["hub_id"]).is_moe


@pytest.mark.parametrize("name", MOE)
def test_moe_vision_configs_equal_the_facts(moe_facts, name):
    vision = configs.config_for(name).vision_config
    for field, f in moe_facts["models"][name]["vision_config"].items():
        assert getattr(vision, field) == f["value"], (field, f["status"], f["source"])


@pytest.mark.parametrize("name", MOE)
def test_total_and_active_parameters_equal_the_derived_counts(moe_facts, name):
    counts = moe_facts["models"][name]["param_counts"]
    assert configs.count_parameters(name, text_only=True) == counts["total_text_excl_mtp_and_vision"]["value"]
    assert configs.count_active_parameters(name, text_only=True) == counts["active_text_per_token_excl_mtp"]["value"]
    # the names' A3B / A10B / A17B
    billions = {"35B": 3, "122B": 10, "397B": 17}[name.split("-")[1]]
    assert abs(configs.count_active_parameters(name, text_only=True) / 1e9 - billions) < 0.8


def test_moe_weights_reports_resident_and_offloaded_bytes():
    w = configs.moe_weights("Qwen3.6-35B-A3B", "bfloat16", link_gb_per_s=25.0)
    s = configs.resolve_known("Qwen3.6-35B-A3B")
    one_expert = 3 * s.moe_intermediate_size * s.hidden_size
    assert w["expert_params"] == s.num_hidden_layers * s.num_experts * one_expert
    assert w["total_bytes"] == 2 * configs.count_parameters("Qwen3.6-35B-A3B")
    assert w["total_bytes"] == configs.estimate_weight_bytes("Qwen3.6-35B-A3B", "bfloat16")
    assert w["resident_bytes"] + w["expert_bytes"] == w["total_bytes"]
    assert w["offload_bytes_per_token"] == 40 * 8 * one_expert * 2
    assert w["offload_seconds_per_token"] == pytest.approx(w["offload_bytes_per_token"] / 25e9)
    dense = configs.moe_weights("Qwen3.5-0.8B")
    assert not dense["moe"] and dense["active_params"] == dense["total_params"] and dense["expert_bytes"] == 0
    with pytest.raises(BadValue, match="link_gb_per_s"):
        configs.moe_weights("Qwen3.6-35B-A3B", link_gb_per_s=0)


def test_expert_tensor_shapes_equal_the_facts(moe_facts):
    shapes = moe_facts["models"]["Qwen3.5-35B-A3B"]["tensor_shapes"]
    with torch.device("meta"):
        model = configs._model_class(True, True)(configs.config_for("Qwen3.5-35B-A3B").text_config)
    mlp = model.model.layers[0].mlp
    assert list(mlp.gate.weight.shape) == shapes["mlp.gate.weight [E,H]"]
    assert list(mlp.experts.gate_up_proj.shape) == shapes["mlp.experts.gate_up_proj [E,2I,H]"]
    assert list(mlp.experts.down_proj.shape) == shapes["mlp.experts.down_proj [E,H,I]"]
    assert list(mlp.shared_expert_gate.weight.shape) == shapes["mlp.shared_expert_gate.weight [1,H]"]


def test_build_random_shrinks_layers_and_experts_keeping_real_widths():
    from transformers import Qwen3_5MoeForCausalLM

    model = configs.build_random("Qwen3.6-35B-A3B", dtype="float32", text_only=True, num_hidden_layers=4,
                                 num_experts=8)
    assert isinstance(model, Qwen3_5MoeForCausalLM)
    t = model.config
    assert (t.num_hidden_layers, t.num_experts, t.num_experts_per_tok, t.hidden_size, t.moe_intermediate_size) == \
        (4, 8, 8, 2048, 512)
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 1024, 2048)
    with pytest.raises(BadValue, match="top-k of Qwen3.6-35B-A3B is 8"):
        configs.build_random("Qwen3.6-35B-A3B", text_only=True, num_hidden_layers=4, num_experts=4)
    with pytest.raises(BadValue, match="dense model"):
        configs.build_random("Qwen3.5-0.8B", text_only=True, num_hidden_layers=4, num_experts=4)


def test_plan_memory_of_a_moe_model_counts_every_expert():
    from qwen35_lab.longctx import plan_memory

    plan = plan_memory("Qwen3.6-35B-A3B", context=32_768, text_only=True)
    assert plan.weights == configs.estimate_weight_bytes("Qwen3.6-35B-A3B", "bfloat16", text_only=True)
    assert plan.active_weights == 2 * configs.count_active_parameters("Qwen3.6-35B-A3B", text_only=True)
    assert plan.layers == {"full_attention": 10, "linear_attention": 30}


# ------------------------------------------------------------------------------------------ tiny-moe
def test_tiny_moe_is_small_and_loads_as_a_qwen3_5_moe():
    from transformers import Qwen3_5MoeForConditionalGeneration

    assert sum(p.stat().st_size for p in TINY_MOE.iterdir()) < 40e6
    assert json.loads((TINY_MOE / "config.json").read_text())["model_type"] == "qwen3_5_moe"
    lab = ql.load("tiny-moe", dtype="float32", device="cpu")
    assert isinstance(lab.model, Qwen3_5MoeForConditionalGeneration)
    assert lab.processor is not None and lab.tokenizer.convert_tokens_to_ids("<|im_start|>") == 248045
    t = lab.text_config
    assert (t.num_experts, t.num_experts_per_tok, t.vocab_size) == (8, 2, 248_320)
    text = ql.load("tiny-moe", dtype="float32", device="cpu", text_only=True)
    assert type(text.model).__name__ == "Qwen3_5MoeForCausalLM"
    ids = lab.encode("Hello there")
    with torch.no_grad():
        assert torch.equal(text.model(input_ids=ids).logits, lab.model(input_ids=ids).logits)


@pytest.mark.slow
def test_tiny_moe_build_is_bit_for_bit_reproducible(tmp_path):
    out = organisms.build("tiny-moe", tmp_path / "tiny-moe")
    for f in sorted(TINY_MOE.iterdir()):
        assert hashlib.sha256((out / f.name).read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest(), f.name


def _per_expert_checkpoint(src, dst):
    """Rewrite a fused checkpoint with one tensor per expert, as the FP8 / NVFP4 releases store them."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                tensors[f"{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                tensors[f"{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                tensors[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            tensors[name] = t
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return tensors


def test_per_expert_checkpoints_load_through_transformers_conversion(tmp_path):
    fused = ql.load("tiny-moe", dtype="float32", device="cpu")
    tensors = _per_expert_checkpoint(TINY_MOE, tmp_path / "per-expert")
    assert any(".mlp.experts.7.up_proj.weight" in n for n in tensors)
    assert not any(n.endswith("gate_up_proj") for n in tensors)
    lab = ql.load(tmp_path / "per-expert", dtype="float32", device="cpu")  # strict: every tensor covered
    ref = dict(fused.model.named_parameters())
    for name, p in lab.model.named_parameters():
        assert torch.equal(p, ref[name]), name
    text = ql.load(tmp_path / "per-expert", dtype="float32", device="cpu", text_only=True)
    assert torch.equal(text.model.model.layers[3].mlp.experts.down_proj,
                       fused.model.model.language_model.layers[3].mlp.experts.down_proj)


def test_a_text_only_moe_checkpoint_loads_as_causal_lm(tmp_path):
    lab = ql.load("tiny-moe", dtype="float32", device="cpu", text_only=True)
    lab.model.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["model_type"] == "qwen3_5_moe_text"
    again = ql.load(tmp_path / "text", dtype="float32", device="cpu")
    assert type(again.model).__name__ == "Qwen3_5MoeForCausalLM" and again.processor is None
    ids = lab.encode("one two three")
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, lab.model(input_ids=ids).logits)


def test_resolve_knows_the_moe_hub_ids():
    from qwen35_lab.loading import resolve

    for name in MOE:
        src = resolve(f"Qwen/{name}")
        assert src.kind == "hub" and src.spec.is_moe and src.location == f"Qwen/{name}"


def test_memory_check_names_the_experts_before_any_download(monkeypatch):
    import qwen35_lab.loading as loading

    monkeypatch.setattr(loading, "free_memory_bytes", lambda device: 8 * 10**9)
    with pytest.raises(OverBudget) as e:
        ql.load("Qwen/Qwen3.5-397B-A17B", device="cpu")
    msg = str(e.value)
    assert "793.6 GB" in msg and "routed experts" in msg and "8.0 GB" in msg and "resident" in msg
