"""Synthetic conversations of the ``chat`` organism, rendered through our own Qwen3.5 template.

Every conversation is a :class:`Conversation`: the prompt's messages (OpenAI-style, as a user
would pass them to ``lab.chat``), the tools offered, the thinking mode, and the reply the
organism is trained to write (``reasoning`` in thinking mode, then ``answer``), plus what an
evaluation checks. :func:`encode` renders it exactly as inference does — the ``qwen3.5-small``
template with ``add_generation_prompt=True`` and ``enable_thinking`` on or off, images and video
through :func:`qwen35_lab.multimodal.build_inputs` — and appends the reply's tokens::

    <|im_start|>user\\nWhat is 7 + 5?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n12<|im_end|>
    <|im_start|>user\\nWhat is 7 + 5?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n7 + 5 = 12.\\n</think>\\n\\n12<|im_end|>

Kinds (:data:`KINDS`):

- ``arithmetic`` ``after`` ``count`` ``copy`` — short tasks with checkable answers; in thinking mode
  the reasoning writes the steps (partial sums, a running count, the list read back);
- ``tool_call`` — with ``tools`` in the system prompt, a question that needs one of them is answered
  by a qwen3_coder ``<tool_call>``; ``tool_answer`` — after the ``tool`` message, an answer that
  uses its content; ``no_tool`` — a question the tools do not serve, answered directly;
- ``image`` — colour / shape / position of one shape drawn on a 96×96 image (9 vision tokens);
  ``video`` — direction of a moving ball, how many frames show it, its colour (64×64 frames);
- ``name`` ``three`` ``list`` — open prompts: one item drawn from a fixed Zipf-like distribution,
  three distinct items, and lists whose next item follows a 3-cycle with probability 0.6 and which
  stop with probability 0.3 after the second item, so greedy decoding loops and the presence
  penalty breaks the loop;
- ``unknown`` — a question about something outside this world (words the organism never saw):
  ``I don't know.``

Generators are pure functions of a ``random.Random``: data are reproducible from a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import checks

__all__ = [
    "KINDS", "WEIGHTS", "Conversation", "make_conversation", "encode", "draw_image", "draw_video",
    "COLOURS", "ANIMALS", "FRUITS", "CITIES", "CURRENCIES", "SHAPES", "POSITIONS", "DIRECTIONS", "TOOLS",
    "collect_vocabulary",
]

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "brown"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow", "lion", "tiger", "bear", "fox"]
FRUITS = ["apple", "banana", "pear", "grape", "lemon", "cherry", "peach", "mango", "plum", "melon"]
CATEGORIES = {"colour": COLOURS, "animal": ANIMALS, "fruit": FRUITS}
PLURAL = {"colour": "colours", "animal": "animals", "fruit": "fruits"}
ARTICLE = {"colour": "a", "animal": "an", "fruit": "a"}
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Rome", "Madrid", "Cairo", "Lima", "Oslo", "Dublin",
          "Vienna", "Prague", "Delhi", "Sydney", "Toronto", "Boston"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]

# Drawn colours (RGB) of the image and video questions: the first six colour words.
RGB = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (235, 210, 40),
       "purple": (140, 60, 180), "orange": (240, 140, 30)}
SHAPES = ["circle", "square", "triangle"]
# 3 × 3 cells of 32 px on a 96 × 96 image: one merged vision token (2 × 2 patches of 16 px) per cell.
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
DIRECTIONS = ["left", "right", "up", "down"]
IMAGE_SIZE = 96
FRAME_SIZE = 64
VIDEO_FPS = 2.0

# Zipf-like preferences of the open prompts: item r (in this fixed order) has weight 1 / (r + 1).
PREFERENCE = {
    "colour": ["blue", "red", "green", "yellow", "purple", "orange", "black", "pink", "white", "brown"],
    "animal": ["cat", "dog", "lion", "horse", "bird", "tiger", "fox", "bear", "fish", "cow"],
    "fruit": ["apple", "banana", "mango", "cherry", "grape", "pear", "peach", "lemon", "plum", "melon"],
}
# The list prompts' 3-cycles: after item a, the next item is CYCLE[a] with probability LIST_FOLLOW.
CYCLE = {"colour": ["red", "blue", "green"], "animal": ["cat", "dog", "bird"], "fruit": ["apple", "pear", "plum"]}
LIST_FOLLOW = 0.6
LIST_STOP = 0.3  # probability of ending the list after each item from the second on
LIST_MAX = 12

TOOLS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name."}},
                       "required": ["city"]}}},
    "get_time": {"type": "function", "function": {
        "name": "get_time", "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name."}},
                       "required": ["city"]}}},
    "convert_currency": {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money from one currency to another.",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number", "description": "The amount to convert."},
            "from_currency": {"type": "string", "description": "The currency code to convert from."},
            "to_currency": {"type": "string", "description": "The currency code to convert to."}},
            "required": ["amount", "from_currency", "to_currency"]}}},
}

SYSTEM_PROMPTS = [None, None, None, None, None, "You are a helpful assistant.", "You are a helpful assistant.",
                  "You are a concise assistant."]

# Words the organism never sees outside ``unknown`` questions (most of their tokens stay untrained).
FOREIGN = ["delta rule", "state", "gravity", "the moon", "a galaxy", "photosynthesis", "democracy", "a volcano",
           "the internet", "music", "a poem", "quantum physics", "history", "a computer", "philosophy",
           "the ocean", "electricity", "a novel", "language", "economics", "memory", "the brain", "a rocket",
           "chess", "the weather tomorrow", "your name", "love", "a bridge", "the law", "medicine"]
UNKNOWN_ANSWER = "I don't know."
UNKNOWN_REASONING = "This is not something I know."
UNKNOWN_TEMPLATES = ["What is {w}?", "Tell me about {w}.", "Explain {w}.", "Why does {w} matter?",
                     "What does {w} do?", "Write something about {w}.", "How does {w} work?",
                     "What does the delta rule write into the state?", "Hello! Who are you?"]

#: Conversation kinds and their share of the training mixture.
WEIGHTS = {
    "arithmetic": 0.11, "after": 0.10, "count": 0.08, "copy": 0.06,
    "tool_call": 0.12, "tool_answer": 0.05, "no_tool": 0.015,
    "image": 0.14, "video": 0.12,
    "name": 0.05, "three": 0.035, "list": 0.06,
    "unknown": 0.03,
}
KINDS = tuple(WEIGHTS)


@dataclass
class Conversation:
    """One training / evaluation conversation.

    ``messages`` end with the turn the organism answers (a user or tool message);
    ``reasoning`` (thinking mode only) and ``answer`` are the reply it is trained to write;
    ``check`` is what an evaluation compares with (``{"answer": "12"}``,
    ``{"tool": name, "arguments": {...}}``, ``{"contains": [...]}``, ...).
    ``earlier`` holds earlier assistant replies of the conversation (their rendered text is in the
    prompt and is trained on too).
    """

    kind: str
    messages: list[dict]
    thinking: bool
    answer: str
    reasoning: str | None = None
    tools: list[dict] | None = None
    check: dict = field(default_factory=dict)
    earlier: list[str] = field(default_factory=list)

    @property
    def completion(self) -> str:
        """The text generated after the prompt (the prompt ends in ``<think>\\n`` in thinking mode)."""
        head = f"{self.reasoning}\n</think>\n\n" if self.thinking else ""
        return head + self.answer + "<|im_end|>"


# ------------------------------------------------------------------------------- helpers

def _zipf(rng: random.Random, items: list[str]) -> str:
    return rng.choices(items, weights=[1.0 / (r + 1) for r in range(len(items))])[0]


def _zipf_distinct(rng: random.Random, items: list[str], k: int) -> list[str]:
    pool, out = list(items), []
    for _ in range(k):
        pick = _zipf(rng, pool)
        out.append(pick)
        pool.remove(pick)
    return out


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(words: list[str]) -> str:
    return ", ".join(words)


def _user(content, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def _number(x: float):
    return int(x) if float(x).is_integer() else x


# ------------------------------------------------------------------------------- text tasks

def _arithmetic(rng, thinking, system):
    form = rng.random()
    if form < 0.4:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        q, result, steps = rng.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"]).format(a=a, b=b), \
            a + b, f"{a} + {b} = {a + b}."
    elif form < 0.6:
        a = rng.randint(0, 20)
        b = rng.randint(0, a)
        q, result, steps = rng.choice(["What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?"]).format(a=a, b=b), \
            a - b, f"{a} - {b} = {a - b}."
    else:
        a, b, c = rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)
        q = rng.choice(["What is {a} + {b} + {c}?", "Compute {a} + {b} + {c}.", "{a} + {b} + {c} = ?"]).format(a=a, b=b, c=c)
        result, steps = a + b + c, f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}."
    return Conversation("arithmetic", _user(q, system), thinking, str(result), steps if thinking else None,
                        check={"answer": str(result)})


def _words(rng, n, distinct=True):
    category = rng.choice(list(CATEGORIES))
    words = rng.sample(CATEGORIES[category], n) if distinct else [rng.choice(CATEGORIES[category]) for _ in range(n)]
    return category, words


def _after(rng, thinking, system):
    n = rng.randint(3, 6)
    _, words = _words(rng, n)
    i = rng.randrange(n - 1)
    q = rng.choice(["Here is a list: {l}. Which word comes after {x}?", "{l}. What comes after {x}?",
                    "In the list {l}, which word follows {x}?"]).format(l=_join(words), x=words[i])
    steps = f"The list is {_join(words)}. After {words[i]} comes {words[i + 1]}."
    return Conversation("after", _user(q, system), thinking, _cap(words[i + 1]) + ".", steps if thinking else None,
                        check={"answer": words[i + 1]})


def _count(rng, thinking, system):
    n = rng.randint(2, 8)
    _, words = _words(rng, n, distinct=False)
    q = rng.choice(["How many words are in this list: {l}?", "Count the words: {l}.",
                    "How many items does this list have: {l}?"]).format(l=_join(words))
    steps = ", ".join(f"{k + 1} {w}" for k, w in enumerate(words)) + f". That is {n}."
    return Conversation("count", _user(q, system), thinking, str(n), steps if thinking else None,
                        check={"answer": str(n)})


def _copy(rng, thinking, system):
    n = rng.randint(2, 6)
    _, words = _words(rng, n, distinct=False)
    q = rng.choice(["Repeat this list: {l}.", "Copy the list: {l}.", "Say these words back: {l}."]).format(l=_join(words))
    steps = f"The list has {n} words."
    return Conversation("copy", _user(q, system), thinking, _cap(_join(words)) + ".", steps if thinking else None,
                        check={"answer": _join(words)})


# ------------------------------------------------------------------------------- tools

def _tool_request(rng):
    """(tool name, arguments, question, tool result dict, final answer, contains, reasoning pieces)."""
    name = rng.choice(list(TOOLS))
    city = rng.choice(CITIES)
    if name == "get_weather":
        q = rng.choice(["What is the weather in {c}?", "How is the weather in {c} today?",
                        "Is it sunny in {c}?", "Weather in {c}, please."]).format(c=city)
        t, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        result = {"city": city, "temperature": t, "condition": cond}
        final = f"It is {t} degrees and {cond} in {city}."
        return name, {"city": city}, q, result, final, [str(t), cond], f"the weather in {city}"
    if name == "get_time":
        q = rng.choice(["What time is it in {c}?", "What is the time in {c} now?", "Tell me the time in {c}."]).format(c=city)
        hhmm = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        result = {"city": city, "time": hhmm}
        return name, {"city": city}, q, result, f"It is {hhmm} in {city}.", [hhmm], f"the time in {city}"
    amount = rng.choice([rng.randint(1, 100), rng.randint(1, 20) * 50])
    src, dst = rng.sample(CURRENCIES, 2)
    q = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "What is {a} {s} in {d}?"]).format(
        a=amount, s=src, d=dst)
    value = round(amount * rng.uniform(0.5, 1.5), 2)
    result = {"amount": amount, "from": src, "to": dst, "result": value}
    return (name, {"amount": amount, "from_currency": src, "to_currency": dst}, q, result,
            f"{amount} {src} is {_number(value)} {dst}.", [str(_number(value))], f"{amount} {src} in {dst}")


def tool_call_text(name: str, arguments: dict) -> str:
    """The qwen3_coder XML of one call, as the template renders an assistant's ``tool_calls``."""
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in arguments.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def _offered(rng, needed: str | None) -> list[dict]:
    names = [n for n in TOOLS if n != needed]
    chosen = rng.sample(names, rng.randint(0 if needed else 1, len(names)))
    if needed:
        chosen.insert(rng.randint(0, len(chosen)), needed)
    return [TOOLS[n] for n in chosen]


def _tool_call(rng, thinking, system):
    name, args, q, *_rest, what = _tool_request(rng)
    reasoning = f"The user asks for {what}. I call {name}."
    return Conversation("tool_call", _user(q, system), thinking, tool_call_text(name, args),
                        reasoning if thinking else None, tools=_offered(rng, name),
                        check={"tool": name, "arguments": args})


def _tool_answer(rng, thinking, system):
    name, args, q, result, final, contains, what = _tool_request(rng)
    call_reasoning = f"The user asks for {what}. I call {name}."
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": name, "arguments": args}}]}
    if thinking:
        call["reasoning_content"] = call_reasoning
    messages = _user(q, system) + [call, {"role": "tool", "content": json.dumps(result)}]
    earlier = (f"{call_reasoning}\n</think>\n\n" if thinking else "") + tool_call_text(name, args) + "<|im_end|>"
    reasoning = f"{name} answered. {final}"
    return Conversation("tool_answer", messages, thinking, final, reasoning if thinking else None,
                        tools=_offered(rng, name), check={"contains": contains}, earlier=[earlier])


def _no_tool(rng, thinking, system):
    base = rng.choice([_arithmetic, _after, _count])(rng, thinking, system)
    base.kind, base.tools = "no_tool", _offered(rng, None)
    return base


# ------------------------------------------------------------------------------- images and video

def draw_image(colour: str, shape: str, position: str, *, rng: random.Random | None = None) -> np.ndarray:
    """uint8 ``[96, 96, 3]``: one ``shape`` of ``colour`` in cell ``position`` of a 3 × 3 grid, on grey."""
    rng = rng or random.Random(0)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = rng.randint(190, 240)
    cell = POSITIONS.index(position)
    cy = 16 + 32 * (cell // 3) + rng.randint(-3, 3)
    cx = 16 + 32 * (cell % 3) + rng.randint(-3, 3)
    r = rng.randint(9, 13)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        s = round(r * 0.85)
        mask = (abs(x - cx) <= s) & (abs(y - cy) <= s)
    else:  # triangle pointing up
        mask = (y >= cy - r) & (y <= cy + r) & (abs(x - cx) <= (y - (cy - r)) / 2)
    rgb = np.array(RGB[colour], np.float32) + np.array([rng.randint(-20, 20) for _ in range(3)], np.float32)
    img[mask] = rgb
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def draw_video(colour: str, direction: str, frames: int, visible: tuple[int, int] | None = None, *,
               rng: random.Random | None = None) -> np.ndarray:
    """uint8 ``[frames, 64, 64, 3]``: a ball of ``colour`` crossing the frame towards ``direction``.

    ``visible = (first, stop)``: the ball is drawn only in frames ``first .. stop - 1`` (all if None).
    """
    rng = rng or random.Random(0)
    grey = rng.randint(190, 240)
    video = np.empty((frames, FRAME_SIZE, FRAME_SIZE, 3), np.float32)
    video[:] = grey
    r = rng.randint(6, 8)
    across = rng.randint(16, 48)
    start, end = 10, FRAME_SIZE - 10
    y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]
    rgb = np.array(RGB[colour], np.float32) + np.array([rng.randint(-20, 20) for _ in range(3)], np.float32)
    first, stop = visible if visible is not None else (0, frames)
    for f in range(frames):
        along = start + (end - start) * f / max(frames - 1, 1)
        cx, cy = {"right": (along, across), "left": (FRAME_SIZE - along, across),
                  "down": (across, along), "up": (across, FRAME_SIZE - along)}[direction]
        if first <= f < stop:
            video[f][(x - cx) ** 2 + (y - cy) ** 2 <= r * r] = rgb
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 6, video.shape)
    return np.clip(video + noise, 0, 255).astype(np.uint8)


def _image(rng, thinking, system, *, blank: bool = False):
    colour, shape, position = rng.choice(list(RGB)), rng.choice(SHAPES), rng.choice(POSITIONS)
    image = draw_image(colour, shape, position, rng=rng)
    if blank:
        image = _blank_like(image)
    ask = rng.choice(["colour", "shape", "position", "describe"])
    q = {"colour": ["What colour is the shape?", "Which colour do you see?", "What colour is it?"],
         "shape": ["What shape is this?", "Which shape is in the image?", "What shape do you see?"],
         "position": ["Where is the shape?", "Where in the image is the shape?", "Which part of the image is it in?"],
         "describe": ["Describe the image.", "What do you see?"]}[ask]
    answer = {"colour": colour, "shape": shape, "position": position,
              "describe": f"a {colour} {shape} {'in the centre' if position == 'centre' else 'at the ' + position}"}[ask]
    where = "in the centre" if position == "centre" else f"at the {position}"
    content = [{"type": "image", "image": image}, {"type": "text", "text": rng.choice(q)}]
    return Conversation("image", _user(content, system), thinking, _cap(answer) + ".",
                        f"I see a {colour} {shape} {where}." if thinking else None,
                        check={"answer": answer, "ask": ask, "colour": colour, "shape": shape, "position": position})


def _video(rng, thinking, system, *, blank: bool = False):
    colour, direction = rng.choice(list(RGB)), rng.choice(DIRECTIONS)
    frames = rng.choice([4, 6, 8])
    ask = rng.choice(["direction", "direction", "count", "colour"])
    visible = None
    if ask == "count":
        pairs = frames // 2
        shown = rng.randint(1, pairs)
        first = 2 * rng.randint(0, pairs - shown)
        visible = (first, first + 2 * shown)
    video = draw_video(colour, direction, frames, visible, rng=rng)
    if blank:
        video = _blank_like(video)
    q = {"direction": ["Which way does the ball move?", "In which direction does the ball go?", "Where is the ball going?"],
         "count": ["How many frames show the ball?", "In how many frames is the ball visible?"],
         "colour": ["What colour is the ball?", "Which colour is the ball?"]}[ask]
    n_shown = frames if visible is None else visible[1] - visible[0]
    answer = {"direction": direction, "count": str(n_shown), "colour": colour}[ask]
    steps = {"direction": f"The {colour} ball moves {direction}.",
             "count": f"The ball shows in {n_shown // 2} of {frames // 2} frame pairs, two frames each.",
             "colour": f"The ball is {colour}."}[ask]
    part = {"type": "video", "video": video, "video_fps": VIDEO_FPS, "do_sample_frames": False}
    return Conversation("video", _user([part, {"type": "text", "text": rng.choice(q)}], system), thinking,
                        _cap(answer) + ("." if ask != "count" else ""), steps if thinking else None,
                        check={"answer": answer, "ask": ask, "frames": frames, "shown": n_shown})


def _blank_like(pixels: np.ndarray) -> np.ndarray:
    """The same size, one flat grey: vision tokens that carry nothing about the object."""
    return np.full_like(pixels, 215)


# ------------------------------------------------------------------------------- open prompts

def _name(rng, thinking, system):
    category = rng.choice(list(CATEGORIES))
    q = rng.choice(["Name {a} {c}.", "Say {a} {c}.", "Tell me {a} {c}."]).format(a=ARTICLE[category], c=category)
    item = _zipf(rng, PREFERENCE[category])
    return Conversation("name", _user(q, system), thinking, _cap(item) + ".",
                        f"Any {category} will do." if thinking else None, check={"category": category})


def _three(rng, thinking, system):
    category = rng.choice(list(CATEGORIES))
    q = rng.choice(["Name three {p}.", "Give me three {p}."]).format(p=PLURAL[category])
    items = _zipf_distinct(rng, PREFERENCE[category], 3)
    return Conversation("three", _user(q, system), thinking, _cap(_join(items)) + ".",
                        f"Three {PLURAL[category]}." if thinking else None, check={"category": category})


def list_items(rng: random.Random, category: str) -> list[str]:
    """A list as the ``list`` prompts are trained on: a Zipf first item, then the 3-cycle or a jump."""
    items = [_zipf(rng, PREFERENCE[category])]
    cycle = CYCLE[category]
    while len(items) < LIST_MAX:
        if len(items) >= 2 and rng.random() < LIST_STOP:
            break
        last = items[-1]
        if last in cycle and rng.random() < LIST_FOLLOW:
            items.append(cycle[(cycle.index(last) + 1) % len(cycle)])
        elif last not in cycle and rng.random() < LIST_FOLLOW:
            items.append(cycle[0])
        else:
            items.append(rng.choice([w for w in CATEGORIES[category] if w != last]))
    return items


def _list(rng, thinking, system):
    category = rng.choice(list(CATEGORIES))
    q = rng.choice(["List some {p}.", "List {p}.", "Give me a list of {p}.", "Write a list of {p}."]).format(
        p=PLURAL[category])
    items = list_items(rng, category)
    return Conversation("list", _user(q, system), thinking, _cap(_join(items)) + ".",
                        f"A list of {PLURAL[category]}." if thinking else None, check={"category": category})


def _unknown(rng, thinking, system):
    q = rng.choice(UNKNOWN_TEMPLATES).format(w=rng.choice(FOREIGN))
    return Conversation("unknown", _user(q, system), thinking, UNKNOWN_ANSWER,
                        UNKNOWN_REASONING if thinking else None, check={"answer": UNKNOWN_ANSWER})


_MAKERS = {"arithmetic": _arithmetic, "after": _after, "count": _count, "copy": _copy, "tool_call": _tool_call,
           "tool_answer": _tool_answer, "no_tool": _no_tool, "image": _image, "video": _video, "name": _name,
           "three": _three, "list": _list, "unknown": _unknown}


def make_conversation(rng: random.Random, kind: str | None = None, *, thinking: bool | None = None,
                      system: bool = True, blank: bool = False) -> Conversation:
    """One conversation of ``kind`` (drawn by :data:`WEIGHTS` if None); thinking on/off drawn 50/50 if None.

    ``system=False`` never adds a system prompt; ``blank=True`` (image / video only) replaces the
    pixels by flat grey, the vision-ablation control.
    """
    if kind is None:
        kind = rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]
    checks.check_choice("conversation kind", kind, KINDS)
    if thinking is None:
        thinking = rng.random() < 0.5
    sys_prompt = rng.choice(SYSTEM_PROMPTS) if system else None
    if kind in ("image", "video"):
        return _MAKERS[kind](rng, thinking, sys_prompt, blank=blank)
    return _MAKERS[kind](rng, thinking, sys_prompt)


# ------------------------------------------------------------------------------- encoding

class PromptBuilder:
    """What :func:`qwen35_lab.multimodal.build_inputs` needs of a Lab, without a model.

    ``processor``: a ``Qwen3VLProcessor`` with the organism's image / video settings.
    """

    is_multimodal = True

    def __init__(self, tokenizer, processor, variant: str = "qwen3.5-small", max_positions: int = 262_144):
        from types import SimpleNamespace

        self.tokenizer, self.processor, self.chat_variant = tokenizer, processor, variant
        self.text_config = SimpleNamespace(max_position_embeddings=max_positions)
        self.name = "chat (builder)"

    def render(self, messages, **kwargs) -> str:
        from .. import chat_format

        return chat_format.render(messages, variant=self.chat_variant, **kwargs)


def prompt_inputs(builder, conv: Conversation) -> dict:
    """Model inputs of the prompt, exactly as ``lab.chat(conv.messages, tools=..., enable_thinking=...)`` builds them."""
    from .. import multimodal

    return multimodal.build_inputs(builder, conv.messages, enable_thinking=conv.thinking, tools=conv.tools)


def encode(builder, conv: Conversation) -> dict:
    """Token ids of prompt + reply, the loss mask (reply tokens, earlier replies too) and the vision tensors.

    Returns ``{"input_ids": [T] list, "loss": [T] list of bool, "pixel_values", "image_grid_thw",
    "pixel_values_videos", "video_grid_thw", "mm_token_type_ids" (tensors or None)}``.
    """
    inputs = prompt_inputs(builder, conv)
    prompt = inputs["input_ids"][0].tolist()
    reply = builder.tokenizer(conv.completion, add_special_tokens=False)["input_ids"]
    loss = [False] * len(prompt)
    for text in conv.earlier:  # earlier assistant turns, rendered into the prompt
        piece = builder.tokenizer(text, add_special_tokens=False)["input_ids"]
        start = _find(prompt, piece)
        if start < 0:
            raise AssertionError(f"an earlier reply is not in the rendered prompt as its own tokens: {text!r}")
        loss[start:start + len(piece)] = [True] * len(piece)
    mm = inputs.get("mm_token_type_ids")
    mm = None if mm is None else torch.cat([mm[0], torch.zeros(len(reply), dtype=mm.dtype)])
    return {"input_ids": prompt + reply, "loss": loss + [True] * len(reply), "prompt_length": len(prompt),
            "pixel_values": inputs.get("pixel_values"), "image_grid_thw": inputs.get("image_grid_thw"),
            "pixel_values_videos": inputs.get("pixel_values_videos"), "video_grid_thw": inputs.get("video_grid_thw"),
            "mm_token_type_ids": mm}


def _find(seq: list[int], piece: list[int]) -> int:
    n = len(piece)
    for i in range(len(seq) - n, -1, -1):  # the last occurrence
        if seq[i:i + n] == piece:
            return i
    return -1


def collect_vocabulary(tokenizer, n: int = 6000, seed: int = 99) -> list[int]:
    """Sorted real token ids the conversations use (``unknown`` prompts excluded): the trained sub-vocabulary.

    Texts are rendered without pixel work (media parts become their placeholder), and every word
    list and number is added explicitly, so the set does not depend on luck.
    """
    from .. import chat_format

    rng = random.Random(seed)
    texts = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "unknown":
            continue
        conv = make_conversation(rng, kind, thinking=bool(i % 2))
        messages = [{**m, "content": [p if p.get("type") == "text" else {"type": p["type"], p["type"]: "x"}
                                      for p in m["content"]]} if isinstance(m["content"], list) else m
                    for m in conv.messages]
        texts.append(chat_format.render(messages, variant="qwen3.5-small", tools=conv.tools,
                                        enable_thinking=conv.thinking) + conv.completion)
    words = COLOURS + ANIMALS + FRUITS + CITIES + CURRENCIES + CONDITIONS + SHAPES + POSITIONS + DIRECTIONS
    for w in words:
        texts += [w, " " + w, _cap(w), " " + _cap(w), f"{w}.", f" {w}.", f"{_cap(w)}.", f"{w},"]
    texts += [str(i) for i in range(0, 1000)] + [f" {i}" for i in range(1000)] + [f"{i:02d}:{j:02d}" for i in range(24) for j in range(60)]
    texts += [f"<{t / 10:.1f} seconds>" for t in range(0, 200)]
    texts += ["<think>\n" + UNKNOWN_REASONING + "\n</think>\n\n" + UNKNOWN_ANSWER + "<|im_end|>", "<|vision_start|><|image_pad|><|video_pad|><|vision_end|>", "<|endoftext|>"]
    ids = set()
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sorted(ids)
