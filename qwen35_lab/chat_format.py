"""Chat templates for Qwen3.5 / Qwen3.6 and a parser for what the models write back.

The three templates in ``qwen35_lab/templates/`` render the same text as the official
ones shipped with the checkpoints:

============== ======================================= ==========================================
name           models                                  differs from "qwen3.5" in
============== ======================================= ==========================================
qwen3.5        Qwen3.5-4B / 9B / 27B / MoE             (the base)
qwen3.5-small  Qwen3.5-0.8B / 2B, small organisms      thinking is off unless enable_thinking=True
qwen3.6        Qwen3.6                                 preserve_thinking; non-string tool-call
                                                       argument values written as JSON
============== ======================================= ==========================================

They are rendered by transformers' own chat-template renderer (a sandboxed Jinja
environment with trim_blocks, lstrip_blocks, a non-escaping ``tojson`` and
``raise_exception``), so ``render`` gives exactly what ``tokenizer.apply_chat_template``
gives with the same template.

Model output looks like ``reasoning\\n</think>\\n\\nanswer<tool_call>...</tool_call>``
(the generation prompt already wrote ``<think>\\n``); ``parse_output`` splits it into
reasoning, answer and tool calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from transformers.utils.chat_template_utils import render_jinja_template
from .checks import BadType, BadValue

__all__ = ["TEMPLATES", "ParsedOutput", "parse_output", "render", "template_for", "validate_messages"]

_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

#: Template name -> Jinja source.
TEMPLATES: dict[str, str] = {
    name: (_TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
    for name in ("qwen3.5", "qwen3.5-small", "qwen3.6")
}

ROLES = ("system", "user", "assistant", "tool")
CONTENT_TYPES = ("text", "image", "image_url", "video", "video_url")
_MEDIA_TYPES = ("image", "image_url", "video", "video_url")

# Largest hidden_size that gets the small-model template (Qwen3.5-2B has 2048, 4B has 2560).
SMALL_HIDDEN_SIZE = 2048


# --------------------------------------------------------------------------------------
# Picking a template
# --------------------------------------------------------------------------------------

_NAME_RULES = (  # (pattern on the lower-cased name, template), first match wins
    (re.compile(r"qwen3\.6"), "qwen3.6"),
    (re.compile(r"qwen3\.5-(0\.8|2)b(?![0-9.])"), "qwen3.5-small"),
    (re.compile(r"organism|(?<![a-z])tiny"), "qwen3.5-small"),
    (re.compile(r"qwen3\.5"), "qwen3.5"),
)


def _template_for_name(name: str) -> str | None:
    lowered = name.lower()
    return next((template for pattern, template in _NAME_RULES if pattern.search(lowered)), None)


def _config_field(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def template_for(model_name_or_config: Any) -> str:
    """Name of the chat template (a key of ``TEMPLATES``) for a model.

    A name (hub id or local path, case-insensitive) is matched in this order:

    - contains ``qwen3.6``                        -> ``"qwen3.6"``
    - contains ``qwen3.5-0.8b`` or ``qwen3.5-2b``   -> ``"qwen3.5-small"``
    - contains ``organism`` or a word ``tiny...``  -> ``"qwen3.5-small"``
    - contains ``qwen3.5`` (4B, 9B, 27B, MoE)       -> ``"qwen3.5"``

    A config (a transformers config or its dict) is matched by its ``_name_or_path`` when
    that is a name as above, else by size: ``hidden_size`` (or ``text_config.hidden_size``)
    <= 2048 -> ``"qwen3.5-small"``, larger -> ``"qwen3.5"``. A config cannot tell Qwen3.6
    from Qwen3.5; pass the name for Qwen3.6.
    """
    if isinstance(model_name_or_config, (str, Path)):
        name = str(model_name_or_config)
        template = _template_for_name(name)
        if template is None:
            raise BadValue(
                f"cannot tell the chat template from the name {name!r}: expected a name containing "
                "'Qwen3.6', 'Qwen3.5-0.8B', 'Qwen3.5-2B', 'Qwen3.5' (4B and larger), 'organism' or "
                f"'tiny'; or pass the model config. Templates: {sorted(TEMPLATES)}"
            )
        return template

    config = model_name_or_config
    for key in ("_name_or_path", "name_or_path"):
        name = _config_field(config, key)
        if isinstance(name, str) and (template := _template_for_name(name)) is not None:
            return template
    hidden_size = _config_field(config, "hidden_size")
    if hidden_size is None and _config_field(config, "text_config") is not None:
        hidden_size = _config_field(_config_field(config, "text_config"), "hidden_size")
    if not isinstance(hidden_size, int) or isinstance(hidden_size, bool):
        raise BadType(
            "template_for expects a model name (str) or a config with a Qwen model name in "
            "_name_or_path or an int hidden_size (top level or in text_config); got "
            f"{type(model_name_or_config).__name__} with hidden_size={hidden_size!r}"
        )
    return "qwen3.5-small" if hidden_size <= SMALL_HIDDEN_SIZE else "qwen3.5"


# --------------------------------------------------------------------------------------
# Checking and rendering messages
# --------------------------------------------------------------------------------------


def _part_type(part: Mapping, where: str) -> str:
    """The type of one content part: its "type" field, else the known key it carries."""
    if "type" in part:
        part_type = part["type"]
        if part_type not in CONTENT_TYPES:
            raise BadValue(f"{where} has unknown type {part_type!r}; valid types: {list(CONTENT_TYPES)}")
        return part_type
    keys = [key for key in CONTENT_TYPES if key in part]
    if len(keys) != 1:
        raise BadValue(
            f"{where} has no 'type' and {'no' if not keys else 'more than one'} content key "
            f"(keys: {sorted(part)}); give 'type', one of {list(CONTENT_TYPES)}"
        )
    return keys[0]


def _check_tool_calls(tool_calls: Any, where: str) -> None:
    if not isinstance(tool_calls, list):
        raise BadType(f"{where}['tool_calls'] must be a list, got {type(tool_calls).__name__}")
    for j, call in enumerate(tool_calls):
        call_where = f"{where}['tool_calls'][{j}]"
        if not isinstance(call, dict):
            raise BadType(f"{call_where} must be a dict, got {type(call).__name__}")
        function = call.get("function", call)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadValue(
                f"{call_where} needs a string 'name', as {{'name': ..., 'arguments': {{...}}}} or "
                f"{{'type': 'function', 'function': {{'name': ..., 'arguments': {{...}}}}}}; got {call!r}"
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise BadValue(f"{call_where} arguments are a string but not JSON ({error}): {arguments!r}") from None
        if not isinstance(arguments, dict):
            raise BadType(
                f"{call_where} arguments must be a dict or a JSON object string, got {type(arguments).__name__}"
            )


def validate_messages(messages: Any) -> None:
    """Raise a clear error if ``messages`` is not a chat the templates can render.

    A chat is a non-empty list of dicts with ``role`` in ``system, user, assistant, tool``
    (a system message only first) and ``content`` a string or a list of parts whose type is
    one of ``text, image, image_url, video, video_url`` (an assistant's content may be None
    or absent, e.g. when it only calls tools). System messages hold text only.
    """
    if not isinstance(messages, list):
        raise BadType(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise BadValue("messages is empty; give at least one user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadType(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise BadValue(f"messages[{i}] has unknown role {role!r}; valid roles: {list(ROLES)}")
        where = f"messages[{i}] ({role})"
        if role == "system" and i != 0:
            raise BadValue(f"{where}: a system message must be the first message")
        content = message.get("content")
        if content is None and role == "assistant":
            pass
        elif isinstance(content, list):
            for j, part in enumerate(content):
                part_where = f"{where} content[{j}]"
                if not isinstance(part, dict):
                    raise BadType(f"{part_where} must be a dict like {{'type': 'text', 'text': ...}}, got {part!r}")
                part_type = _part_type(part, part_where)
                if part_type == "text" and not isinstance(part.get("text"), str):
                    raise BadValue(f"{part_where} is a text part without a string 'text': {part!r}")
                if role == "system" and part_type in _MEDIA_TYPES:
                    raise BadValue(f"{part_where} is {part_type!r}; system messages hold text only")
        elif not isinstance(content, str):
            raise BadType(
                f"{where} content must be a str or a list of parts, got {type(content).__name__}: {content!r}"
            )
        reasoning = message.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise BadType(f"{where} reasoning_content must be a str, got {type(reasoning).__name__}")
        if "tool_calls" in message and message["tool_calls"] is not None:
            if role != "assistant":
                raise BadValue(f"{where} has tool_calls; only assistant messages make tool calls")
            _check_tool_calls(message["tool_calls"], where)


def _for_template(messages: list[dict]) -> list[dict]:
    """Copy of OpenAI-style messages in the form the official templates read.

    Tool-call arguments given as a JSON string are decoded (the templates iterate over a
    dict), and ``video_url`` parts become ``video`` parts (the templates know only ``video``).
    """
    converted = []
    for message in messages:
        message = dict(message)
        if isinstance(message.get("content"), list):
            message["content"] = [
                {"type": "video", "video": part.get("video_url")} if part.get("type") == "video_url" else part
                for part in message["content"]
            ]
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = call.get("function", call)
                if isinstance(function.get("arguments"), str):
                    function = {**function, "arguments": json.loads(function["arguments"])}
                    call = {**call, "function": function} if "function" in call else function
                calls.append(call)
            message["tool_calls"] = calls
        converted.append(message)
    return converted


def render(
    messages: list[dict],
    *,
    variant: str = "qwen3.5",
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    enable_thinking: bool | None = None,
    preserve_thinking: bool | None = None,
    add_vision_id: bool = False,
) -> str:
    """The prompt text for ``messages`` with the ``variant`` template (see ``TEMPLATES``).

    ``enable_thinking=None`` keeps the model's default (thinking for qwen3.5 / qwen3.6, not
    for qwen3.5-small). ``preserve_thinking=True`` (qwen3.6 only) keeps the reasoning of
    every assistant turn. Messages are checked with ``validate_messages`` first. OpenAI-style
    input is accepted: tool-call arguments as a JSON string are decoded, and ``video_url``
    parts are passed to the template as ``video`` parts (the official templates know only
    ``video``). The caller's messages are not modified.
    """
    if variant not in TEMPLATES:
        raise BadValue(f"unknown template variant {variant!r}; valid: {sorted(TEMPLATES)}")
    for flag_name, flag in (("enable_thinking", enable_thinking), ("preserve_thinking", preserve_thinking)):
        if flag is not None and not isinstance(flag, bool):
            raise BadType(f"{flag_name} must be True, False or None, got {flag!r}")
    if preserve_thinking and variant != "qwen3.6":
        raise BadValue(f"preserve_thinking is read only by the 'qwen3.6' template, not by {variant!r}")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
        raise BadType(f"tools must be a list of JSON-schema dicts or None, got {tools!r}")
    validate_messages(messages)

    kwargs: dict[str, Any] = {"add_vision_id": add_vision_id}
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if preserve_thinking is not None:
        kwargs["preserve_thinking"] = preserve_thinking
    try:
        rendered, _ = render_jinja_template(
            [_for_template(messages)],
            tools=tools or None,
            chat_template=TEMPLATES[variant],
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except jinja2.TemplateError as error:  # e.g. "No user query found in messages."
        raise BadValue(f"chat template {variant!r} rejected the messages: {error}") from error
    return rendered[0]


# --------------------------------------------------------------------------------------
# Parsing model output
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOutput:
    """One assistant reply split into its parts.

    reasoning: the text inside <think>...</think> (None when there was no think block).
    answer: the reply without reasoning and tool calls.
    tool_calls: ``[{"name": str, "arguments": dict}, ...]`` in order.
    finished_thinking: False when the reasoning was cut off before ``</think>``.
    """

    reasoning: str | None
    answer: str
    tool_calls: list[dict] = field(default_factory=list)
    finished_thinking: bool = True


_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_TOOL_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)


def _parameter_value(text: str) -> Any:
    """A parameter's value: JSON when it parses (numbers, objects, lists, true/false/null), else the string."""
    text = text.removeprefix("\n").removesuffix("\n")  # the template writes "<parameter=K>\nV\n</parameter>"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_output(text: str, *, prompt_opened_think: bool = False) -> ParsedOutput:
    """Split generated text into reasoning, answer and qwen3_coder XML tool calls.

    Handles a reply that starts inside the reasoning (the generation prompt ended in
    ``<think>\\n``, so only ``</think>`` appears), a full ``<think>...</think>`` block, no
    think block, and reasoning cut off before ``</think>`` (then ``answer`` is empty and
    ``finished_thinking`` False). Text with neither tag is an answer, unless
    ``prompt_opened_think`` says the prompt opened a think block: then it is unfinished
    reasoning. A trailing ``<|im_end|>`` or ``<|endoftext|>`` is dropped.

    Tool calls ``<tool_call>\\n<function=NAME>\\n<parameter=K>\\nV\\n</parameter>\\n</function>\\n</tool_call>``
    become ``{"name": NAME, "arguments": {K: V}}``, V decoded as JSON when it is valid JSON.
    """
    if not isinstance(text, str):
        raise BadType(f"parse_output expects the generated text as a str, got {type(text).__name__}")
    text = text.rstrip()
    for end in _END_TOKENS:
        text = text.removesuffix(end)

    if "</think>" in text:
        reasoning, body = text.split("</think>", 1)
        reasoning = reasoning.split("<think>", 1)[-1].strip()
    elif "<think>" in text or prompt_opened_think:
        reasoning = text.split("<think>", 1)[-1].strip()
        return ParsedOutput(reasoning=reasoning, answer="", tool_calls=[], finished_thinking=False)
    else:
        reasoning, body = None, text

    tool_calls = [
        {
            "name": name.strip(),
            "arguments": {key.strip(): _parameter_value(value) for key, value in _PARAMETER.findall(parameters)},
        }
        for name, parameters in _TOOL_CALL.findall(body)
    ]
    answer = _TOOL_CALL.sub("", body).strip()
    return ParsedOutput(reasoning=reasoning, answer=answer, tool_calls=tool_calls)
