"""The project's chat templates render the same bytes as the official Qwen3.5 / 3.6 templates.

Oracle: Qwen's official templates, found where a user has them (the ``official_templates``
fixture in conftest: ``QWEN35_LAB_REFERENCE``, the Hugging Face cache, the hub; skipped with one
reason when absent), rendered with transformers' own chat-template renderer
(``render_jinja_template``, what ``tokenizer.apply_chat_template`` calls). Every conversation in
the battery is rendered with ours and theirs, for each variant and every combination of the
template switches, and the results (text, or exception type and message) must be equal.

Everywhere, with no oracle: tests written from the documented format (think blocks, tool-call
XML, vision placeholders, ``enable_thinking``, ``preserve_thinking``), and a mutation test that
proves the battery notices a change to any output statement or condition of our templates.

Also: ``render``, ``validate_messages``, ``template_for`` and ``parse_output`` (including a
render -> parse round trip of tool calls).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from qwen35_lab.chat_format import TEMPLATES, ParsedOutput, parse_output, render, template_for, validate_messages

VARIANTS = ("qwen3.5", "qwen3.5-small", "qwen3.6")


def outcome(template: str, messages, tools=None, **kwargs) -> tuple:
    """("ok", text) or ("error", exception type, message), as apply_chat_template would give."""
    try:
        rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template, **kwargs)
        return ("ok", rendered[0])
    except Exception as error:  # noqa: BLE001 - the exception itself is what is compared
        return ("error", type(error).__name__, str(error))


# Every combination of the switches the templates read; None = not passed at all.
SWITCHES = {
    "add_generation_prompt": (False, True),
    "enable_thinking": (None, True, False),
    "add_vision_id": (None, True),
    "preserve_thinking": (None, True, False),
}
KWARG_COMBOS = [
    {name: value for name, value in zip(SWITCHES, values) if value is not None}
    for values in itertools.product(*SWITCHES.values())
]

# --------------------------------------------------------------------------------------
# The battery
# --------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city — température, 天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}},
]
IMAGE = {"type": "image", "image": "cat.png"}
VIDEO = {"type": "video", "video": "clip.mp4"}
ARGS = {"city": "Paris, France", "days": 3, "scale": 0.5, "tags": ["a", "b"], "opts": {"unit": "C"},
        "exact": True, "limit": None, "note": "two\nlines", "quoted": "42"}


def user(content):
    return {"role": "user", "content": content}


def assistant(content, **fields):
    return {"role": "assistant", "content": content, **fields}


def tool(content):
    return {"role": "tool", "content": content}


def call(name, arguments, wrapped=True):
    function = {"name": name, "arguments": arguments}
    return {"type": "function", "function": function} if wrapped else function


# (id, messages, tools, expected reference result: "ok" or the start of its error message)
CONVERSATIONS = [
    ("user_only", [user("Hello!")], None, "ok"),
    ("system_string", [{"role": "system", "content": "You are terse."}, user("Hi")], None, "ok"),
    ("system_list", [{"role": "system", "content": [{"type": "text", "text": "You are "},
                                                   {"type": "text", "text": "terse. "}]}, user("Hi")], None, "ok"),
    ("system_blank", [{"role": "system", "content": " \n "}, user("Hi")], None, "ok"),
    ("system_blank_tools", [{"role": "system", "content": ""}, user("Hi")], TOOLS, "ok"),
    ("system_with_tools", [{"role": "system", "content": "  Be brief.\n"}, user("Weather?")], TOOLS, "ok"),
    ("tools_no_system", [user("Weather in Paris?")], TOOLS, "ok"),
    ("padded_user_text", [user("\n  spaced out  \n")], None, "ok"),
    ("multi_turn_plain", [user("Hi"), assistant("Hello."), user("How are you?")], None, "ok"),
    ("history_ends_with_assistant", [user("Hi"), assistant("Hello, how can I help?")], None, "ok"),
    ("reasoning_field", [user("2+2?"), assistant("4", reasoning_content="\nadd them\n"), user("3+3?"),
                         assistant("6", reasoning_content="add again")], None, "ok"),
    ("reasoning_field_then_query", [user("2+2?"), assistant("4", reasoning_content="add"), user("thanks")],
     None, "ok"),
    ("inline_think", [user("Q1"), assistant("<think>\nold plan\n</think>\n\nA1"), user("Q2"),
                      assistant("<think>\nnew plan\n</think>\n\nA2")], None, "ok"),
    ("inline_close_only", [user("Q"), assistant("plan without open tag</think>\n\nanswer")], None, "ok"),
    ("field_wins_over_inline", [user("Q"), assistant("<think>inline</think>text", reasoning_content="field")],
     None, "ok"),
    ("empty_reasoning_field", [user("Q"), assistant("<think>kept</think>x", reasoning_content="")], None, "ok"),
    ("thinking_alias_field", [user("Q"), assistant("A", thinking="aliased by transformers")], None, "ok"),
    ("preserve_history", [user("Q1"), assistant("A1", reasoning_content="r1"), user("Q2"),
                          assistant("<think>r2</think>A2"), user("Q3")], None, "ok"),
    ("image", [user([IMAGE, {"type": "text", "text": "What is this?"}])], None, "ok"),
    ("image_url", [user([{"type": "image_url", "image_url": {"url": "https://x/cat.png"}},
                         {"type": "text", "text": "Describe."}])], None, "ok"),
    ("image_key_without_type", [user([{"image": "cat.png"}, {"text": "and?"}])], None, "ok"),
    ("video", [user([VIDEO, {"type": "text", "text": "What happens?"}])], None, "ok"),
    ("media_counted_across_turns", [user([IMAGE, IMAGE, {"type": "text", "text": "Compare."}]),
                                    assistant("Two cats."),
                                    user([VIDEO, IMAGE, VIDEO, {"type": "text", "text": "Now?"}])], None, "ok"),
    ("media_in_assistant_and_tool", [user([IMAGE, {"type": "text", "text": "Crop it."}]),
                                     assistant([{"type": "text", "text": "Done: "}, IMAGE]),
                                     user("and the video?"), assistant("", tool_calls=[call("search", {"q": "v"})]),
                                     tool([VIDEO, {"type": "text", "text": "found"}])], TOOLS, "ok"),
    ("tool_call_values", [user("Weather?"), assistant("", tool_calls=[call("get_weather", ARGS)])], TOOLS, "ok"),
    ("tool_call_after_text", [user("Weather?"),
                              assistant("Let me check.", tool_calls=[call("get_weather", {"city": "Oslo"})])],
     TOOLS, "ok"),
    ("tool_call_content_none", [user("Weather?"),
                                assistant(None, tool_calls=[call("get_weather", {"city": "Oslo"})])], TOOLS, "ok"),
    ("tool_call_flat_format", [user("Weather?"),
                               assistant("", tool_calls=[call("get_weather", {"city": "Rome"}, wrapped=False)])],
     TOOLS, "ok"),
    ("tool_call_no_arguments", [user("Search"), assistant("", tool_calls=[{"name": "search"}])], TOOLS, "ok"),
    ("parallel_tool_calls", [user("Two cities"), assistant("Checking both.", tool_calls=[
        call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Rome", "days": 2})])], TOOLS, "ok"),
    ("tool_response", [user("Weather?"), assistant("", tool_calls=[call("get_weather", {"city": "Oslo"})]),
                       tool('{"temp": 3}'), assistant("It is 3 degrees.")], TOOLS, "ok"),
    ("consecutive_tool_responses", [user("Two cities"), assistant("", tool_calls=[
        call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Rome"})]),
        tool("3 C"), tool("18 C"), tool([{"type": "text", "text": "done"}])], TOOLS, "ok"),
    ("multi_step_agent", [{"role": "system", "content": "Use tools."}, user("Plan a trip"),
                          assistant("", reasoning_content="need weather",
                                    tool_calls=[call("get_weather", {"city": "Oslo"})]),
                          tool("3 C"),
                          assistant("<think>\nand search\n</think>\n\nSearching.",
                                    tool_calls=[call("search", {"q": "Oslo"})]),
                          tool("museums"), tool("parks"), assistant("Go in summer.", reasoning_content="summary")],
     TOOLS, "ok"),
    ("tool_results_as_user", [user("Weather?"), assistant("", tool_calls=[call("get_weather", {"city": "Oslo"})]),
                              user("<tool_response>\n3 C\n</tool_response>"),
                              assistant("Cold.", reasoning_content="r")], TOOLS, "ok"),
    ("tool_message_first", [tool("stale result"), user("Hi")], None, "ok"),
    ("unicode_and_markup", [user("héllo 你好 <b>&amp;</b> {{ not jinja }}"), assistant("ok ✓")], None, "ok"),
    # Inputs the official templates reject; ours must reject them the same way.
    ("error_no_messages", [], None, "No messages provided."),
    ("error_system_image", [{"role": "system", "content": [IMAGE]}, user("Hi")], None,
     "System message cannot contain images."),
    ("error_system_video_with_tools", [{"role": "system", "content": [VIDEO]}, user("Hi")], TOOLS,
     "System message cannot contain videos."),
    ("error_no_user_query", [{"role": "system", "content": "S"}, assistant("Hello")], None,
     "No user query found in messages."),
    ("error_only_tool_results", [user("<tool_response>\nx\n</tool_response>"), tool("y")], None,
     "No user query found in messages."),
    ("error_system_not_first", [user("Hi"), {"role": "system", "content": "late"}], None,
     "System message must be at the beginning."),
    ("error_unknown_role", [user("Hi"), {"role": "bot", "content": "beep"}], None, "Unexpected message role."),
    ("error_content_number", [user(42)], None, "Unexpected content type."),
    ("error_unknown_part", [user([{"type": "audio", "audio": "a.wav"}])], None, "Unexpected item type in content."),
    ("error_video_url_part", [user([{"type": "video_url", "video_url": {"url": "v.mp4"}}])], None,
     "Unexpected item type in content."),
    ("error_arguments_json_string", [user("Weather?"), assistant("", tool_calls=[
        call("get_weather", json.dumps({"city": "Oslo"}))])], None, "Can only get item pairs from a mapping."),
]
CONVERSATION_IDS = [conversation[0] for conversation in CONVERSATIONS]


_OUTCOMES: dict = {}


def outcomes_of(template: str) -> dict:
    """(conversation id, combo index) -> outcome of ``template``, for the whole battery (cached)."""
    if template not in _OUTCOMES:
        _OUTCOMES[template] = {
            (name, k): outcome(template, messages, tools, **kwargs)
            for name, messages, tools, _ in CONVERSATIONS
            for k, kwargs in enumerate(KWARG_COMBOS)
        }
    return _OUTCOMES[template]


def test_battery_is_large():
    assert len([c for c in CONVERSATIONS if c[3] == "ok"]) >= 30
    assert len(set(CONVERSATION_IDS)) == len(CONVERSATIONS)


def test_the_oracles_are_the_official_files(official_templates):
    for variant in VARIANTS:
        assert "raise_exception" in official_templates[variant]
        assert TEMPLATES[variant] != official_templates[variant]  # the project's own text


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("name", "messages", "tools", "expected"), CONVERSATIONS, ids=CONVERSATION_IDS)
def test_same_bytes_as_official_template(official_templates, variant, name, messages, tools, expected):
    reference = outcomes_of(official_templates[variant])
    for k, kwargs in enumerate(KWARG_COMBOS):
        ours = outcome(TEMPLATES[variant], messages, tools, **kwargs)
        assert ours == reference[(name, k)], f"{variant} {name} {kwargs}"
    # The reference does what the table says, so error rows really test the error paths.
    first = reference[(name, 0)]
    if expected == "ok":
        assert first[0] == "ok"
    else:
        assert first[0] == "error" and first[2].startswith(expected), first


def test_variants_differ_where_the_models_differ():
    messages = [user("Q1"), assistant("A1", reasoning_content="r1"), user("Q2"),
                assistant("", tool_calls=[call("get_weather", {"exact": True, "limit": None})])]
    text = {variant: render(messages, variant=variant) for variant in VARIANTS}
    assert text["qwen3.5"].endswith("<|im_start|>assistant\n<think>\n")
    assert text["qwen3.5-small"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<parameter=exact>\nTrue\n" in text["qwen3.5"] and "<parameter=limit>\nNone\n" in text["qwen3.5"]
    assert "<parameter=exact>\ntrue\n" in text["qwen3.6"] and "<parameter=limit>\nnull\n" in text["qwen3.6"]
    assert "r1" not in text["qwen3.6"]
    assert "<think>\nr1\n</think>\n\nA1" in render(messages, variant="qwen3.6", preserve_thinking=True)


# --------------------------------------------------------------------------------------
# The documented format, checked everywhere (no oracle needed)
# --------------------------------------------------------------------------------------
# Written from the format the model cards and the official templates document: ChatML turns,
# generation prompts that open or close a think block, qwen3_coder tool-call XML, tool results
# in a user turn, vision placeholders, reasoning kept only after the last real user query.

WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}},
                                                             "required": ["city"]}}}]


@pytest.mark.parametrize("variant, thinking_by_default", [("qwen3.5", True), ("qwen3.5-small", False),
                                                          ("qwen3.6", True)])
def test_generation_prompt_opens_or_closes_the_think_block(variant, thinking_by_default):
    think, no_think = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    text = render([user("Hi")], variant=variant)
    assert text == "<|im_start|>user\nHi<|im_end|>\n" + (think if thinking_by_default else no_think)
    assert render([user("Hi")], variant=variant, enable_thinking=True).endswith(think)
    assert render([user("Hi")], variant=variant, enable_thinking=False).endswith(no_think)
    assert not render([user("Hi")], variant=variant, add_generation_prompt=False).endswith("assistant\n")


def test_system_message_comes_first_as_chatml():
    text = render([{"role": "system", "content": "Be brief."}, user("Hi")], variant="qwen3.5", enable_thinking=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tools_calls_and_responses_follow_the_qwen3_coder_format(variant):
    messages = [user("Weather in Oslo?"),
                assistant("", tool_calls=[call("get_weather", {"city": "Oslo"})]),
                {"role": "tool", "content": "sunny"}]
    text = render(messages, variant=variant, tools=WEATHER, enable_thinking=False)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools\n")
    tools_json = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(tools_json) == WEATHER[0]
    assert ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n"
            "</tool_call><|im_end|>") in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_placeholders_and_vision_ids(variant):
    messages = [user([{"type": "image"}, {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Q"}])]
    plain = render(messages, variant=variant)
    image, video = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
    assert f"<|im_start|>user\n{image}{video}{image}Q<|im_end|>" in plain
    numbered = render(messages, variant=variant, add_vision_id=True)
    assert f"Picture 1: {image}Video 1: {video}Picture 2: {image}Q" in numbered


@pytest.mark.parametrize("variant", VARIANTS)
def test_reasoning_is_kept_only_after_the_last_user_query(variant):
    messages = [user("Q1"), assistant("A1", reasoning_content="r1"), user("Q2"),
                assistant("A2", reasoning_content="r2")]
    text = render(messages, variant=variant, add_generation_prompt=False)
    assert "<|im_start|>assistant\nA1<|im_end|>" in text and "r1" not in text
    assert "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>" in text
    # reasoning written inline in the content is split out the same way
    inline = [user("Q1"), assistant("<think>\nr1\n</think>\n\nA1"), user("Q2")]
    assert "r1" not in render(inline, variant=variant)


def test_preserve_thinking_keeps_every_turns_reasoning_on_qwen3_6_only():
    messages = [user("Q1"), assistant("A1", reasoning_content="r1"), user("Q2")]
    kept = render(messages, variant="qwen3.6", preserve_thinking=True)
    assert "<|im_start|>assistant\n<think>\nr1\n</think>\n\nA1<|im_end|>" in kept
    assert "r1" not in render(messages, variant="qwen3.6", preserve_thinking=False)
    with pytest.raises(ValueError, match="preserve_thinking"):
        render(messages, variant="qwen3.5", preserve_thinking=True)


def test_tool_argument_values_are_written_per_variant():
    messages = [user("Q"), assistant("", tool_calls=[call("f", {"n": 3, "flag": False, "obj": {"a": 1}})])]
    v35 = render(messages, variant="qwen3.5", add_generation_prompt=False)
    v36 = render(messages, variant="qwen3.6", add_generation_prompt=False)
    assert "<parameter=n>\n3\n</parameter>" in v35 and "<parameter=n>\n3\n</parameter>" in v36
    assert "<parameter=flag>\nFalse\n" in v35 and "<parameter=flag>\nfalse\n" in v36
    assert '<parameter=obj>\n{"a": 1}\n' in v35 and '<parameter=obj>\n{"a": 1}\n' in v36


# --------------------------------------------------------------------------------------
# Mutation test: every output statement and every condition of our templates matters
# --------------------------------------------------------------------------------------

_CONDITION = re.compile(r"^(\s*\{%-\s*(?:el)?if )(.*)( %\})\s*$")


def _mutant_family(template: str) -> tuple[str, list[int]]:
    """One template holding many one-point mutants, switched on by the variable `mutant` (a line number).

    Mutant N adds one character to the output statement on line N (to the message, for a
    raise_exception), or negates the condition of the if/elif on line N. Compiling once and
    switching at render time keeps the test fast.
    """
    lines, mutated_lines = template.split("\n"), []
    for i, line in enumerate(lines):
        n = i + 1
        if "raise_exception('" in line:
            lines[i] = line.replace("raise_exception('", f"raise_exception(('#' if mutant == {n} else '') ~ '", 1)
        elif "{{-" in line:
            lines[i] = line.replace("{{-", f"{{%- if mutant == {n} %}}{{{{- '#' }}}}{{%- endif %}}{{{{-", 1)
        elif match := _CONDITION.match(line):
            head, condition, tail = match.groups()
            lines[i] = f"{head}(not ({condition})) == (mutant == {n}){tail}"
        else:
            continue
        mutated_lines.append(n)
    return "\n".join(lines), mutated_lines


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_statement_and_condition_is_checked_by_the_battery(variant):
    """Standard mutation testing: each one-point mutant must change some outcome of the battery
    against our unmutated template (which the byte-identity tests tie to the official one)."""
    reference = outcomes_of(TEMPLATES[variant])
    by_name = {name: (messages, tools) for name, messages, tools, _ in CONVERSATIONS}
    family, mutated_lines = _mutant_family(TEMPLATES[variant])
    assert len(mutated_lines) >= 60
    for key in reference:  # with no mutant switched on, the family is our template
        assert outcome(family, *by_name[key[0]], mutant=0, **KWARG_COMBOS[key[1]]) == reference[key], key

    detectors = []  # cases that caught earlier mutants: neighbouring lines are often caught by the same
    undetected = []
    for n in mutated_lines:
        for name, k in detectors + sorted(reference, key=lambda key: key[1]):
            if outcome(family, *by_name[name], mutant=n, **KWARG_COMBOS[k]) != reference[(name, k)]:
                detectors.insert(0, (name, k))
                break
        else:
            undetected.append(n)
    assert not undetected, f"{variant}.jinja lines {undetected} can change without any conversation noticing"


# --------------------------------------------------------------------------------------
# render(): the public entry point
# --------------------------------------------------------------------------------------

RENDERABLE = [c for c in CONVERSATIONS if c[3] == "ok"]


@pytest.mark.parametrize(("name", "messages", "tools", "expected"), RENDERABLE, ids=[c[0] for c in RENDERABLE])
def test_render_equals_official_template(official_templates, name, messages, tools, expected):
    validate_messages(messages)
    for variant in VARIANTS:
        for kwargs in ({"enable_thinking": True}, {"enable_thinking": False, "add_vision_id": True}, {}):
            reference = outcome(official_templates[variant], messages, tools, add_generation_prompt=True, **kwargs)
            assert ("ok", render(messages, variant=variant, tools=tools, **kwargs)) == reference
        if variant == "qwen3.6":
            reference = outcome(official_templates[variant], messages, tools, preserve_thinking=True)
            assert ("ok", render(messages, variant=variant, tools=tools, add_generation_prompt=False,
                                 preserve_thinking=True)) == reference


def test_render_accepts_openai_style_arguments_and_video_url():
    as_dict = [user([VIDEO, {"type": "text", "text": "Weather there?"}]),
               assistant(None, tool_calls=[call("get_weather", ARGS)])]
    openai_style = [user([{"type": "video_url", "video_url": "clip.mp4"}, {"type": "text", "text": "Weather there?"}]),
                    assistant(None, tool_calls=[call("get_weather", json.dumps(ARGS))])]
    before = copy.deepcopy(openai_style)
    for variant in VARIANTS:
        expected = ("ok", render(as_dict, variant=variant, tools=TOOLS))
        assert ("ok", render(openai_style, variant=variant, tools=TOOLS)) == expected
    assert openai_style == before  # the caller's messages are not changed


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"variant": "qwen3"}, ValueError, r"unknown template variant 'qwen3'.*qwen3\.5-small"),
        ({"variant": "qwen3.5", "preserve_thinking": True}, ValueError, r"preserve_thinking.*'qwen3\.6'"),
        ({"enable_thinking": "yes"}, TypeError, r"enable_thinking must be True, False or None, got 'yes'"),
        ({"tools": {"name": "f"}}, TypeError, r"tools must be a list"),
    ],
)
def test_render_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        render([user("Hi")], **kwargs)


def test_render_reports_template_errors_as_value_errors():
    with pytest.raises(ValueError, match="No user query found in messages"):
        render([user("<tool_response>\nx\n</tool_response>")])


# --------------------------------------------------------------------------------------
# validate_messages
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "error", "match"),
    [
        ({"role": "user", "content": "Hi"}, TypeError, r"messages must be a list of dicts, got dict"),
        ([], ValueError, r"messages is empty"),
        ([user("Hi"), "Hello"], TypeError, r"messages\[1\] must be a dict.*got str"),
        ([user("Hi"), {"role": "bot", "content": "x"}], ValueError,
         r"messages\[1\] has unknown role 'bot'; valid roles: \['system', 'user', 'assistant', 'tool'\]"),
        ([{"content": "Hi"}], ValueError, r"messages\[0\] has unknown role None"),
        ([user([{"type": "audio", "audio": "a.wav"}])], ValueError,
         r"messages\[0\] \(user\) content\[0\] has unknown type 'audio'; valid types: "
         r"\['text', 'image', 'image_url', 'video', 'video_url'\]"),
        ([user([{"type": "text", "text": "a"}, {"url": "x"}])], ValueError,
         r"content\[1\] has no 'type' and no content key.*give 'type'"),
        ([user(["plain string part"])], TypeError, r"messages\[0\] \(user\) content\[0\] must be a dict"),
        ([user([{"type": "text"}])], ValueError, r"content\[0\] is a text part without a string 'text'"),
        ([user(42)], TypeError, r"messages\[0\] \(user\) content must be a str or a list of parts, got int: 42"),
        ([user({"type": "text", "text": "Hi"})], TypeError, r"content must be a str or a list of parts, got dict"),
        ([user(None)], TypeError, r"messages\[0\] \(user\) content must be a str or a list of parts, got NoneType"),
        ([{"role": "system", "content": [IMAGE]}, user("Hi")], ValueError,
         r"messages\[0\] \(system\) content\[0\] is 'image'; system messages hold text only"),
        ([{"role": "system", "content": [{"type": "video_url", "video_url": "v.mp4"}]}, user("Hi")], ValueError,
         r"content\[0\] is 'video_url'; system messages hold text only"),
        ([user("Hi"), {"role": "system", "content": "late"}], ValueError,
         r"messages\[1\] \(system\): a system message must be the first message"),
        ([user("Q"), assistant("A", reasoning_content=["r"])], TypeError,
         r"messages\[1\].*reasoning_content must be a str"),
        ([user("Q"), assistant("", tool_calls={"name": "f"})], TypeError, r"\['tool_calls'\] must be a list, got dict"),
        ([user("Q"), assistant("", tool_calls=[{"arguments": {}}])], ValueError,
         r"messages\[1\] \(assistant\)\['tool_calls'\]\[0\] needs a string 'name'"),
        ([user("Q"), assistant("", tool_calls=[call("f", "{not json")])], ValueError,
         r"\['tool_calls'\]\[0\] arguments are a string but not JSON"),
        ([user("Q"), assistant("", tool_calls=[call("f", "[1, 2]")])], TypeError,
         r"arguments must be a dict or a JSON object string, got list"),
        ([user("Q"), {"role": "user", "content": "x", "tool_calls": [call("f", {})]}], ValueError,
         r"messages\[1\] \(user\) has tool_calls; only assistant messages make tool calls"),
    ],
)
def test_validate_messages_errors(messages, error, match):
    with pytest.raises(error, match=match):
        validate_messages(messages)
    with pytest.raises(error, match=match):  # render checks before rendering
        render(messages)


# --------------------------------------------------------------------------------------
# template_for
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "variant"),
    [
        ("Qwen/Qwen3.6-27B", "qwen3.6"),
        ("Qwen/Qwen3.6-35B-A3B", "qwen3.6"),
        ("Qwen/Qwen3.5-0.8B", "qwen3.5-small"),
        ("/models/qwen3.5-2b-base", "qwen3.5-small"),
        ("Qwen/Qwen3.5-4B", "qwen3.5"),
        ("Qwen/Qwen3.5-9B", "qwen3.5"),
        ("Qwen/Qwen3.5-27B", "qwen3.5"),
        ("Qwen/Qwen3.5-35B-A3B", "qwen3.5"),
        ("data/organisms/mqar", "qwen3.5-small"),
        ("tiny-random-qwen3.5", "qwen3.5-small"),
        ("org/destiny-qwen3.5-9b", "qwen3.5"),
        (Path("data/organisms/tiny"), "qwen3.5-small"),
        ({"_name_or_path": "Qwen/Qwen3.6-27B", "hidden_size": 5120}, "qwen3.6"),
        ({"text_config": {"hidden_size": 1024}}, "qwen3.5-small"),
        ({"hidden_size": 2048}, "qwen3.5-small"),
        ({"hidden_size": 2560}, "qwen3.5"),
    ],
)
def test_template_for(model, variant):
    assert template_for(model) == variant


def test_template_for_reads_a_transformers_config(facts):
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5Config

    config = Qwen3_5Config(**facts["config_json"]["Qwen3.5-0.8B"]["config"])
    assert template_for(config) == "qwen3.5-small"
    config.text_config.hidden_size = 4096
    assert template_for(config) == "qwen3.5"


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        ("meta-llama/Llama-3-8B", ValueError, r"cannot tell the chat template from the name 'meta-llama/Llama-3-8B'"),
        ({"vocab_size": 10}, TypeError, r"int hidden_size.*hidden_size=None"),
        (7, TypeError, r"got int"),
    ],
)
def test_template_for_errors(model, error, match):
    with pytest.raises(error, match=match):
        template_for(model)


# --------------------------------------------------------------------------------------
# parse_output
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kwargs", "expected"),
    [
        ("The model thinks.\n</think>\n\nParis.<|im_end|>", {},
         ParsedOutput("The model thinks.", "Paris.", [], True)),
        ("<think>\nfull block\n</think>\n\nParis.", {}, ParsedOutput("full block", "Paris.", [], True)),
        ("\n</think>\n\nNo thoughts.", {}, ParsedOutput("", "No thoughts.", [], True)),
        ("Just an answer.<|endoftext|>", {}, ParsedOutput(None, "Just an answer.", [], True)),
        ("<think>\nran out of tok", {}, ParsedOutput("ran out of tok", "", [], False)),
        ("ran out of tokens before closing", {"prompt_opened_think": True},
         ParsedOutput("ran out of tokens before closing", "", [], False)),
        ("thought\n</think>\n\nanswer", {"prompt_opened_think": True}, ParsedOutput("thought", "answer", [], True)),
    ],
    ids=["prompt_opened_think", "full_block", "empty_reasoning", "no_think", "unterminated_block",
         "unterminated_after_prompt", "finished_after_prompt"],
)
def test_parse_output_reasoning(text, kwargs, expected):
    assert parse_output(text, **kwargs) == expected


def test_parse_output_tool_calls():
    text = (
        "check the weather\n</think>\n\nI will look it up.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco, CA\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=scale>\n-0.5\n</parameter>\n"
        "<parameter=flags>\n[\"a\", 1]\n</parameter>\n<parameter=opts>\n{\"unit\": \"C\"}\n</parameter>\n"
        "<parameter=exact>\ntrue\n</parameter>\n<parameter=python_bool>\nTrue\n</parameter>\n"
        "<parameter=note>\nline one\nline two\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=search>\n</function>\n</tool_call><|im_end|>"
    )
    parsed = parse_output(text)
    assert parsed.reasoning == "check the weather"
    assert parsed.answer == "I will look it up."
    assert parsed.finished_thinking
    assert parsed.tool_calls == [
        {"name": "get_weather", "arguments": {
            "city": "San Francisco, CA", "days": 3, "scale": -0.5, "flags": ["a", 1], "opts": {"unit": "C"},
            "exact": True, "python_bool": "True", "note": "line one\nline two"}},
        {"name": "search", "arguments": {}},
    ]


def test_parse_output_rejects_non_text():
    with pytest.raises(TypeError, match="expects the generated text as a str, got list"):
        parse_output([1, 2])


ROUND_TRIP_ARGS = {"city": "Paris, France", "days": 3, "scale": 0.25, "tags": ["a", "b"],
                   "opts": {"unit": "C", "nested": [1, {"x": None}]}, "note": "two\nlines"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_tool_calls_round_trip(variant):
    """Render a turn with the template, cut the part a model would generate, parse it back."""
    arguments = dict(ROUND_TRIP_ARGS)
    if variant == "qwen3.6":  # 3.6 writes true/null as JSON; 3.5 writes Python's True/None
        arguments.update(exact=False, limit=None)
    calls = [call("get_weather", arguments), call("search", {"query": "museums"}, wrapped=False)]
    reasoning = "" if variant == "qwen3.5-small" else "I need the weather."
    history = [{"role": "system", "content": "Use tools."}, user("Plan my trip")]
    turn = assistant("Let me check.", reasoning_content=reasoning, tool_calls=calls)

    prompt = render(history, variant=variant, tools=TOOLS)
    full = render(history + [turn], variant=variant, tools=TOOLS, add_generation_prompt=False)
    assert full.startswith(prompt)
    generated = full[len(prompt):]
    parsed = parse_output(generated, prompt_opened_think=prompt.endswith("<think>\n"))

    assert parsed.tool_calls == [{"name": "get_weather", "arguments": arguments},
                                 {"name": "search", "arguments": {"query": "museums"}}]
    assert parsed.answer == "Let me check."
    assert parsed.reasoning == (reasoning if reasoning else None)
    assert parsed.finished_thinking


# --------------------------------------------------------------------------------------
# The tokenizer carries the chat template
# --------------------------------------------------------------------------------------

ORGANISMS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "data" / "organisms").iterdir()
                   if (p / "config.json").is_file())
CHATS = [
    ([user("What is 2 + 3?")], None),
    ([user("Q1"), assistant("A1", reasoning_content="r1"), user("Weather in Oslo?")], WEATHER),
    ([user("Weather?"), assistant("", tool_calls=[call("get_weather", {"city": "Oslo"})]),
      {"role": "tool", "content": "sunny"}], WEATHER),
]


def _same_as_render(lab, holder) -> None:
    for messages, tools in CHATS:
        for thinking in (True, False):
            want = lab.render(messages, enable_thinking=thinking, tools=tools)
            got = holder.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=thinking, tools=tools)
            assert got == want, (lab.name, thinking, tools is not None)


@pytest.mark.parametrize("name", ORGANISMS)
def test_tokenizer_apply_chat_template_equals_lab_render(name):
    import qwen35_lab as ql

    lab = ql.load(name, dtype="float32", device="cpu")
    _same_as_render(lab, lab.tokenizer)
    if lab.processor is not None:
        _same_as_render(lab, lab.processor)
    folder = Path(__file__).resolve().parents[1] / "data" / "organisms" / name
    if (folder / "tokenizer_config.json").is_file():  # an organism with tokenizer files carries the template in them
        assert (folder / "chat_template.jinja").read_text() == TEMPLATES[lab.chat_variant]


def test_a_checkpoint_without_a_template_gets_ours(tiny, tmp_path):
    import qwen35_lab as ql

    tiny.model.save_pretrained(tmp_path)
    tokenizer = copy.deepcopy(tiny.tokenizer)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    lab = ql.load(tmp_path, dtype="float32", device="cpu", text_only=True)
    assert lab.chat_variant == "qwen3.5-small"
    _same_as_render(lab, lab.tokenizer)


def test_saving_a_trained_organism_writes_its_template(tmp_path):
    from transformers import AutoTokenizer

    from qwen35_lab.organisms.train import train

    out = train("recall", seed=0, out_dir=tmp_path / "recall", max_steps=1, progress=False, evaluate_after=False)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.chat_template == TEMPLATES["qwen3.5-small"]


def test_official_templates_are_found_where_a_user_has_them(tmp_path, monkeypatch):
    """The oracle's finder: QWEN35_LAB_REFERENCE first, then any Qwen checkpoint in the HF cache
    (chat_template.jinja or tokenizer_config.json's chat_template); offline, nothing."""
    from official_templates import find_official_template

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("QWEN35_LAB_REFERENCE", raising=False)
    assert find_official_template("qwen3.5") is None
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen3.5-4B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'cached' }}"}))
    assert find_official_template("qwen3.5") == ("{{ 'cached' }}", str(snapshot))
    (snapshot / "chat_template.jinja").write_text("{{ 'jinja' }}")
    assert find_official_template("qwen3.5")[0] == "{{ 'jinja' }}"
    assert find_official_template("qwen3.6") is None  # a 3.5 checkpoint does not stand in for 3.6
    folder = tmp_path / "reference" / "chat_templates"
    folder.mkdir(parents=True)
    (folder / "qwen3.5.jinja").write_text("{{ 'named' }}")
    monkeypatch.setenv("QWEN35_LAB_REFERENCE", str(tmp_path / "reference"))
    assert find_official_template("qwen3.5") == ("{{ 'named' }}", str(folder / "qwen3.5.jinja"))
