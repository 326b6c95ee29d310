"""What the ``chat`` organism does, measured on fresh conversations by generating replies.

:func:`evaluate` runs ``lab.chat`` (greedy unless said otherwise) on conversations from
:mod:`chat_data` drawn with their own seed, and scores the parsed replies
(:func:`qwen35_lab.chat_format.parse_output`, the same parser users get):

``tasks``   answer accuracy of arithmetic / after / count / copy with thinking off and on, the
            rate of replies that open a think block, and a majority-answer baseline;
``tools``   tool-call replies that parse, name the right function, and carry the right arguments;
            answers after a ``tool`` message that use its content; tool-free questions answered
            without a call;
``image``   colour / shape / position questions on drawn shapes, against chance and against the
            same questions with the image replaced by flat grey (vision ablated);
``video``   direction / frame count / colour of a moving ball, the same controls;
``open``    the next-token distribution of "Name a colour." (top tokens, entropy) and the distinct
            answers of sampled replies;
``loops``   greedy replies to list prompts that are repetition loops (seq-rep-4 ≥ 0.3: a third of
            their 4-grams repeat an earlier one), and those cut off by ``max_new_tokens``, without
            and with ``presence_penalty``.

:func:`refresh_card` writes the evaluation into ``qwen35_lab.json`` and renders the card.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path

import torch

from .. import checks
from . import chat_data

__all__ = ["PARTS", "evaluate", "refresh_card", "card", "normalise", "TASK_KINDS"]

PARTS = ("tasks", "tools", "image", "video", "open", "loops")
TASK_KINDS = ("arithmetic", "after", "count", "copy")
LIST_PROMPTS = ["List some colours.", "List some animals.", "List some fruits.", "List colours.", "List animals.",
                "List fruits.", "Give me a list of colours.", "Give me a list of animals.", "Give me a list of fruits.",
                "Write a list of colours.", "Write a list of animals.", "Write a list of fruits."]
LOOP_MAX_NEW_TOKENS = 48
LOOP_THRESHOLD = 0.3
PRESENCE_PENALTY = 1.5  # the Qwen3.5 instruct-general preset's value
CARD_EVAL_SEED = 777
CARD_N = 40


def normalise(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: ``"Top left."`` → ``"top left"``."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".").strip()


def _check_lab(lab) -> None:
    if not hasattr(lab, "model") or not hasattr(lab, "tokenizer") or not hasattr(lab, "chat"):
        raise checks.BadType(f"evaluate() takes a Lab (qwen35_lab.load('chat')), got {type(lab).__name__}")
    meta = getattr(lab, "meta", None) or {}
    if meta.get("task") not in (None, "chat"):
        raise checks.BadValue(f"organism {meta.get('organism')!r} was trained on {meta['task']!r}, not 'chat'; "
                              "evaluate(lab, 'chat') needs the chat organism (qwen35_lab.load('chat'))")


def _reply(lab, conv, *, max_new_tokens: int, **sampling):
    sampling = sampling or {"temperature": 0.0}
    return lab.chat(conv.messages, enable_thinking=conv.thinking, tools=conv.tools, max_new_tokens=max_new_tokens,
                    **sampling)


def _majority(answers: list[str]) -> float:
    return collections.Counter(answers).most_common(1)[0][1] / len(answers) if answers else float("nan")


def _tasks(lab, rng, n, bar) -> dict:
    out = {}
    for kind in TASK_KINDS:
        row = {}
        for thinking in (False, True):
            convs = [chat_data.make_conversation(rng, kind, thinking=thinking) for _ in range(n)]
            right = think = 0
            examples = []
            for conv in convs:
                reply = _reply(lab, conv, max_new_tokens=96 if thinking else 40)
                ok = normalise(reply.answer) == normalise(conv.check["answer"])
                right += ok
                think += reply.reasoning is not None and reply.reasoning != ""
                if len(examples) < 2:
                    examples.append({"prompt": conv.messages[-1]["content"], "reasoning": reply.reasoning,
                                     "answer": reply.answer, "expected": conv.check["answer"]})
                bar.update(1)
            row["thinking" if thinking else "non_thinking"] = {
                "accuracy": right / n, "think_block_rate": think / n, "n": n,
                "majority_baseline": _majority([normalise(c.check["answer"]) for c in convs]), "examples": examples}
        out[kind] = row
    for mode in ("non_thinking", "thinking"):
        out[f"mean_{mode}"] = sum(out[k][mode]["accuracy"] for k in TASK_KINDS) / len(TASK_KINDS)
    return out


def _same(value, expected) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(value, expected)
    return value == expected


def _tools(lab, rng, n, bar) -> dict:
    calls = [chat_data.make_conversation(rng, "tool_call") for _ in range(n)]
    parsed = right_name = right_args = 0
    examples, wrong = [], []
    by_tool: dict[str, list[int]] = collections.defaultdict(list)
    for conv in calls:
        reply = _reply(lab, conv, max_new_tokens=80)
        want = conv.check
        parsed += len(reply.tool_calls) >= 1
        one = reply.tool_calls[0] if len(reply.tool_calls) == 1 else None
        name_ok = one is not None and one["name"] == want["tool"]
        args_ok = name_ok and set(one["arguments"]) == set(want["arguments"]) and all(
            _same(one["arguments"][k], v) for k, v in want["arguments"].items())
        right_name += name_ok
        right_args += args_ok
        by_tool[want["tool"]].append(int(args_ok))
        if len(examples) < 2:
            examples.append({"prompt": conv.messages[-1]["content"], "tool_calls": reply.tool_calls, "expected": want})
        if not args_ok and len(wrong) < 6:
            wrong.append({"prompt": conv.messages[-1]["content"], "thinking": conv.thinking, "reasoning": reply.reasoning,
                          "tool_calls": reply.tool_calls, "expected": want})
        bar.update(1)
    answers = [chat_data.make_conversation(rng, "tool_answer") for _ in range(n)]
    used = 0
    answer_examples = []
    for conv in answers:
        reply = _reply(lab, conv, max_new_tokens=80)
        ok = not reply.tool_calls and all(c in reply.answer for c in conv.check["contains"])
        used += ok
        if len(answer_examples) < 2:
            answer_examples.append({"tool_response": conv.messages[-1]["content"], "answer": reply.answer})
        bar.update(1)
    free = [chat_data.make_conversation(rng, "no_tool") for _ in range(n)]
    no_call = free_right = 0
    for conv in free:
        reply = _reply(lab, conv, max_new_tokens=96 if conv.thinking else 40)
        no_call += not reply.tool_calls
        free_right += not reply.tool_calls and normalise(reply.answer) == normalise(conv.check["answer"])
        bar.update(1)
    return {"n": n, "call_parsed": parsed / n, "call_right_function": right_name / n,
            "call_right_arguments": right_args / n, "answer_uses_tool_response": used / n,
            "right_arguments_by_tool": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_tool.items())},
            "calls_by_tool": {k: len(v) for k, v in sorted(by_tool.items())}, "wrong_calls": wrong,
            "no_tool_without_call": no_call / n, "no_tool_accuracy": free_right / n,
            "examples": examples, "answer_examples": answer_examples}


def _chance(kind: str, check: dict) -> float:
    if kind == "image":
        return {"colour": 1 / len(chat_data.RGB), "shape": 1 / len(chat_data.SHAPES),
                "position": 1 / len(chat_data.POSITIONS),
                "describe": 1 / (len(chat_data.RGB) * len(chat_data.SHAPES) * len(chat_data.POSITIONS))}[check["ask"]]
    return {"direction": 1 / len(chat_data.DIRECTIONS), "colour": 1 / len(chat_data.RGB),
            "count": 1 / (check["frames"] // 2)}[check["ask"]]


def _vision(lab, kind, seed, n, bar) -> dict:
    result = {"n": n}
    for label, blank in (("accuracy", False), ("ablated_accuracy", True)):
        rng = random.Random(seed)  # the same questions, with and without the pixels
        by_ask: dict[str, list[int]] = collections.defaultdict(list)
        chance = []
        for _ in range(n):
            conv = chat_data.make_conversation(rng, kind, thinking=False, blank=blank)
            reply = _reply(lab, conv, max_new_tokens=24)
            by_ask[conv.check["ask"]].append(int(normalise(reply.answer) == normalise(conv.check["answer"])))
            chance.append(_chance(kind, conv.check))
            bar.update(1)
        hits = [h for v in by_ask.values() for h in v]
        result[label] = sum(hits) / len(hits)
        result[f"{label}_by_question" if not blank else "ablated_by_question"] = {
            k: round(sum(v) / len(v), 4) for k, v in sorted(by_ask.items())}
        result["chance"] = sum(chance) / len(chance)
    result["questions"] = {k: len(v) for k, v in sorted(by_ask.items())}
    return result


def _open(lab, seed, n, bar) -> dict:
    messages = [{"role": "user", "content": "Name a colour."}]
    inputs = lab.prepare(messages, enable_thinking=False)
    with torch.no_grad():
        logits = lab.model(**inputs).logits[0, -1].float()
    probs = logits.softmax(-1)
    top = probs.topk(10)
    entropy = float(torch.special.entr(probs).sum())
    # every untrained row of the tied embedding is one shared vector: their logits are all equal
    colour_ids = {lab.tokenizer(w.capitalize(), add_special_tokens=False)["input_ids"][0] for w in chat_data.COLOURS}
    answers = collections.Counter()
    for i in range(n):
        reply = lab.chat(messages, enable_thinking=False, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0,
                         seed=seed + i)
        answers[normalise(reply.answer)] += 1
        bar.update(1)
    return {"prompt": "Name a colour.",
            "top": [{"token": lab.tokenizer.decode([int(i)]), "p": round(float(p), 4)} for p, i in zip(*top)],
            "entropy_nats": entropy, "p_colour_words": float(probs[list(colour_ids)].sum()),
            "p_untrained_tail": float(probs[logits == logits.mode().values].sum()),
            "sampled": dict(answers.most_common()), "n_sampled": n, "distinct_sampled": len(answers)}


def _loops(lab, n, bar) -> dict:
    from ..sampling import repetition_rate

    eos = set(lab.model.generation_config.eos_token_id if isinstance(lab.model.generation_config.eos_token_id, list)
              else [lab.model.generation_config.eos_token_id])
    out = {"n": n, "max_new_tokens": LOOP_MAX_NEW_TOKENS, "threshold": LOOP_THRESHOLD,
           "presence_penalty": PRESENCE_PENALTY}
    for label, penalty in (("greedy", 0.0), ("greedy_presence_penalty", PRESENCE_PENALTY)):
        loops = rates = unfinished = items = 0.0
        examples = []
        for i in range(n):
            messages = [{"role": "user", "content": LIST_PROMPTS[i % len(LIST_PROMPTS)]}]
            gen = lab.generate(messages, enable_thinking=False, max_new_tokens=LOOP_MAX_NEW_TOKENS, temperature=0.0,
                               presence_penalty=penalty)
            ids = gen.ids[0].tolist()
            finished = bool(ids) and ids[-1] in eos
            rate = repetition_rate(ids[:-1] if finished else ids, 4)
            loops += rate >= LOOP_THRESHOLD
            unfinished += not finished
            items += len([w for w in gen.text.split("<|im_end|>")[0].split(",") if w.strip()])
            rates += rate
            if len(examples) < 3:
                examples.append(gen.text)
            bar.update(1)
        out[label] = {"loop_rate": loops / n, "unfinished_rate": unfinished / n, "mean_items": items / n,
                      "mean_repetition_rate": rates / n,
                      "examples": examples}
    return out


def evaluate(lab, *, n: int = 40, seed: int = 12345, parts=None, progress: bool = True) -> dict:
    """Measure the ``chat`` organism on ``n`` fresh conversations per cell (see the module docstring).

    Args:
        lab: ``qwen35_lab.load("chat")``.
        n: conversations per measured cell (per task and thinking mode, per tool case, per
            vision condition, list prompts per penalty, samples of the open prompt).
        seed: seed of the conversations (training used other seeds).
        parts: a subset of :data:`PARTS` (default all).

    Returns ``{part: {...}}`` with rates in [0, 1]; see :data:`PARTS`.
    """
    from tqdm.auto import tqdm

    _check_lab(lab)
    n = checks.check_int("n", n, lo=1, hi=100_000)
    seed = checks.check_int("seed", seed, lo=0, hi=2**63 - 1)
    checks.check_bool("progress", progress)
    if parts is None:
        parts = PARTS
    elif isinstance(parts, str):
        parts = [parts]
    if not isinstance(parts, (list, tuple)) or not parts:
        raise checks.BadType(f"parts must be a non-empty list of {', '.join(PARTS)} or None, got {parts!r}")
    for part in parts:
        checks.check_choice("part", part, PARTS)
    if not getattr(lab, "is_multimodal", False) and ({"image", "video"} & set(parts)):
        raise checks.BadValue("the image / video parts need the multimodal model; load('chat') without text_only")
    sizes = {"tasks": 2 * len(TASK_KINDS) * n, "tools": 3 * n, "image": 2 * n, "video": 2 * n, "open": n, "loops": 2 * n}
    bar = tqdm(total=sum(sizes[p] for p in parts), desc="evaluate chat", disable=not progress, mininterval=2.0)
    result: dict = {"n": n, "seed": seed}
    for part in PARTS:
        if part not in parts:
            continue
        rng = random.Random(f"{seed}-{part}")
        if part == "tasks":
            result[part] = _tasks(lab, rng, n, bar)
        elif part == "tools":
            result[part] = _tools(lab, rng, n, bar)
        elif part in ("image", "video"):
            result[part] = _vision(lab, part, 2 * seed + (part == "video"), n, bar)
        elif part == "open":
            result[part] = _open(lab, seed, n, bar)
        else:
            result[part] = _loops(lab, n, bar)
    bar.close()
    return result


# ----------------------------------------------------------------------------------- the card

def refresh_card(folder, *, n: int = CARD_N, seed: int = CARD_EVAL_SEED, progress: bool = True) -> Path:
    """Evaluate the saved checkpoint in ``folder`` (loaded as users load it) and write the card."""
    from .. import load

    folder = checks.check_path("folder", folder)
    lab = load(str(folder), dtype="float32", device="cpu")
    meta = json.loads((folder / "qwen35_lab.json").read_text())
    meta["evaluation"] = evaluate(lab, n=n, seed=seed, progress=progress)
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    _write(folder / "qwen35_lab.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _plot_curve(folder / "training_curve.png", log)
    _write(folder / "README.md", card(meta, log, size_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors"))))
    return folder


def rewrite_card(folder) -> Path:
    """Re-render ``README.md`` and ``training_curve.png`` from the saved meta and log (no evaluation)."""
    folder = checks.check_path("folder", folder)
    meta = json.loads((folder / "qwen35_lab.json").read_text())
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    _plot_curve(folder / "training_curve.png", log)
    _write(folder / "README.md", card(meta, log, size_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors"))))
    return folder


def _write(path: Path, text: str) -> None:
    from .._io import atomic_file

    with atomic_file(path, "w") as f:
        f.write(text)
    path.chmod(0o644)


_CURVE_KINDS = [("arithmetic", "tab:blue"), ("count", "tab:cyan"), ("after", "tab:green"), ("tool_call", "tab:orange"),
                ("image", "tab:red"), ("video", "tab:purple"), ("list", "tab:gray")]


def _plot_curve(path: Path, log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    ax.plot(steps, [r["loss"] for r in log], color="tab:blue", label="training (EMA)")
    ax.plot(steps, [r["held_out_loss"] for r in log], color="tab:red", label="held-out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per reply token (nats)")
    ax.legend(fontsize=9)
    ax.set_title("chat: loss", fontsize=10)
    for kind, colour in _CURVE_KINDS:
        ax2.plot(steps, [r["exact"].get(kind, float("nan")) for r in log], color=colour, label=kind)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_xlabel("step")
    ax2.set_ylabel("whole reply right (teacher forced)")
    ax2.legend(fontsize=8, ncol=2)
    ax2.set_title("chat: held-out replies", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cell(text, limit: int = 90) -> str:
    """Text for one line of a markdown table: newlines as ⏎, pipes and backticks escaped, cut at ``limit``."""
    text = str(text).replace("\n", "⏎").replace("|", "\\|").replace("`", "'")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _threads(n: int) -> str:
    return "one CPU thread" if n == 1 else f"{n} CPU threads"


def _args(arguments: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in arguments.items())


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def card(meta: dict, log: list[dict], *, size_bytes: int) -> str:
    """The organism's README.md, from its meta (with ``evaluation``) and training log."""
    r = meta["recipe"]
    ev = meta["evaluation"]
    n = ev["n"]
    lines = ["# `chat` — a tiny Qwen3.5 that speaks the chat format: thinks when asked, calls tools, sees images and video", ""]
    lines += [f"Trained by `python -m qwen35_lab.organisms train chat --seed {meta['seed']}` in "
              f"{meta['train_seconds'] / 60:.0f} min ({meta['steps']} steps, {meta['tokens_seen'] / 1e6:.1f} M tokens, "
              f"stopped by {meta['stopped']}) on {_threads(meta.get('threads', 1))}, torch {meta['torch']}. "
              "Load it with `qwen35_lab.load('chat')`; it is the default model of notebooks 00, 04 and 05.", ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              "| class | `Qwen3_5ForConditionalGeneration` (HF transformers), a normal checkpoint |",
              f"| layers | {r['num_layers']}: " + ", ".join(_layer_types(r['num_layers'])) + " (one group of the released layout) |",
              f"| hidden / FFN | {r['hidden_size']} / {r['intermediate_size']} |",
              "| gated attention | 4 query heads, 2 KV heads, head_dim 64, output gate, partial RoPE 16 dims, M-RoPE sections [3, 3, 2], rope_theta 1e7 |",
              "| Gated DeltaNet | 2 q/k heads, 4 value heads, head dims 32, conv kernel 4; decay init A ~ U(1, 16), dt log-uniform [1e-3, 0.1] |",
              "| vision tower | depth 2, hidden 64, patch 16, temporal patch 2, merge 2; images 64²–256² px (a 96×96 drawing is 9 tokens), video frames from 64² px |",
              f"| vocabulary | the real 248,320-entry Qwen3.5 vocabulary and ids (the real tokenizer); {meta['sub_vocabulary']} ids trained, every other row one shared vector |",
              f"| weights | bfloat16 safetensors, tied embeddings, {size_bytes / 1e6:.1f} MB |", ""]
    lines += ["## Training data", "",
              "Synthetic conversations rendered through our own `qwen3.5-small` template (`qwen35_lab.chat_format.render`, "
              "images and video through `multimodal.build_inputs`), thinking on or off at random, a system prompt "
              "sometimes; the loss is on the assistant replies only (`qwen35_lab.organisms.chat_data`). Share of the mixture:", "",
              "| kind | share | example (non-thinking unless marked) |", "|---|---:|---|"]
    examples = _examples()
    for kind, weight in chat_data.WEIGHTS.items():
        lines.append(f"| `{kind}` | {weight / sum(chat_data.WEIGHTS.values()):.0%} | {examples[kind]} |")
    lines += ["", "In thinking mode the reply is `steps\\n</think>\\n\\nanswer<|im_end|>` after the prompt's `<think>\\n` "
              "(for example `7 + 5 = 12. 12 + 3 = 15.` before `15`; `1 cat, 2 dog, 3 cat. That is 3.` before `3`). "
              f"List prompts: the next item follows a 3-cycle (red → blue → green) with probability {chat_data.LIST_FOLLOW}, "
              f"and the list stops with probability {chat_data.LIST_STOP} after each item from the second on — so "
              "the most likely continuation is always another item on the cycle.", "",
              "Only the token ids these conversations use are trained. The loss is the exact full-vocabulary "
              "cross-entropy: every untrained row of the tied embedding is one shared vector `u`, trained as one "
              "\"other\" class whose logit carries `+ log(N_other)`; the saved checkpoint writes `u` into all "
              f"{248320 - meta['sub_vocabulary']:,} other rows. Any token the organism never saw reads as `u`, "
              "and the `unknown` conversations teach it to answer those with `I don't know.`", ""]
    lines += ["## Training", "",
              f"Seed {meta['seed']}; AdamW lr {r['lr']} (betas 0.9/0.98, weight decay {r['weight_decay']}, "
              f"{r['warmup_steps']} warm-up steps, cosine to {r['min_lr_ratio']}× over {r['max_steps']} steps), "
              f"batches of up to {r['token_budget']} padded tokens (conversations sorted by length), grad clip 1, fp32."
              + ("" if r.get("train_vision", True) else
                 " The vision tower keeps its random initialisation (frozen"
                 + (" except the merger, which learns" if r.get("train_merger") else "")
                 + "): in an earlier run that trained all of it, "
                 "its output for a drawing and for flat grey became the same, and the image answers fell to chance.")
              + ("" if not r.get("zero_deltanet_out") else
                 " Every Gated DeltaNet output projection starts at zero, so the attention layer's look-ups "
                 "(a city name into a tool argument, an image token into an answer) form early."), "",
              "![training curve](training_curve.png)", "",
              "| step | loss (EMA) | held-out loss | arithmetic | count | tool_call | image | video | minutes |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    every = max(1, len(log) // 12)
    for row in log[::every] + ([log[-1]] if (len(log) - 1) % every else []):
        e = row["exact"]
        lines.append(f"| {row['step']} | {row['loss']:.3f} | {row['held_out_loss']:.3f} | {e.get('arithmetic', 0):.2f} | "
                     f"{e.get('count', 0):.2f} | {e.get('tool_call', 0):.2f} | {e.get('image', 0):.2f} | "
                     f"{e.get('video', 0):.2f} | {row['seconds'] / 60:.0f} |")
    lines += ["", "(Per-kind columns: share of held-out replies with every token right under teacher forcing.) "
              "The full log is `train_log.jsonl`.", ""]

    t = ev["tasks"]
    lines += ["## Evaluation", "",
              f"`qwen35_lab.organisms.evaluate(lab, 'chat', n={n}, seed={ev['seed']})` on the saved bf16 weights "
              f"(loaded in fp32): fresh conversations, replies generated by `lab.chat` (greedy unless said) and split "
              f"by `chat_format.parse_output`. {n} conversations per cell.", "",
              "### Tasks, thinking off and on", "",
              "| task | non-thinking | thinking | majority answer | think block (off / on) |", "|---|---:|---:|---:|---:|"]
    for kind in TASK_KINDS:
        off, on = t[kind]["non_thinking"], t[kind]["thinking"]
        lines.append(f"| {kind} | {_pct(off['accuracy'])} | {_pct(on['accuracy'])} | {_pct(off['majority_baseline'])} | "
                     f"{_pct(off['think_block_rate'])} / {_pct(on['think_block_rate'])} |")
    lines.append(f"| **mean** | **{_pct(t['mean_non_thinking'])}** | **{_pct(t['mean_thinking'])}** | | |")
    ex = t["count"]["thinking"]["examples"][0]
    lines += ["", f"A thinking reply (count): `{_cell(ex['prompt'])}` → reasoning `{_cell(ex['reasoning'])}`, answer "
              f"`{_cell(ex['answer'])}` (expected `{ex['expected']}`).", ""]
    to = ev["tools"]
    lines += ["### Tools", "", "| | rate |", "|---|---:|",
              f"| tool-call replies that parse (`parse_output`) | {_pct(to['call_parsed'])} |",
              f"| … with the right function | {_pct(to['call_right_function'])} |",
              f"| … with the right function and arguments | {_pct(to['call_right_arguments'])} |",
              f"| answers after the `tool` message that use its values | {_pct(to['answer_uses_tool_response'])} |",
              f"| tool-free questions (tools offered) answered without a call | {_pct(to['no_tool_without_call'])} |",
              f"| … and answered right | {_pct(to['no_tool_accuracy'])} |", ""]
    if to.get("right_arguments_by_tool"):
        lines += ["Right arguments by tool: " + ", ".join(
            f"`{k}` {_pct(v)} ({to['calls_by_tool'][k]} calls)" for k, v in to["right_arguments_by_tool"].items()) + ".", ""]
    if to.get("wrong_calls"):
        lines += ["Wrong calls (the first few):", ""]
        for w in to["wrong_calls"]:
            got = "; ".join(f"{c['name']}({_args(c['arguments'])})" for c in w["tool_calls"]) or "no call"
            lines.append(f"- `{_cell(w['prompt'])}` ({'thinking' if w['thinking'] else 'non-thinking'}) → `{_cell(got)}`, "
                         f"expected `{w['expected']['tool']}({_args(w['expected']['arguments'])})`")
        lines.append("")
    if to["examples"]:
        e0 = to["examples"][0]
        lines += [f"Example: `{_cell(e0['prompt'])}` → `{_cell(json.dumps(e0['tool_calls']))}`.", ""]
    lines += ["### Images and video", "",
              "| | accuracy | chance | vision ablated (flat grey pixels) |", "|---|---:|---:|---:|"]
    for part in ("image", "video"):
        v = ev[part]
        lines.append(f"| {part} | {_pct(v['accuracy'])} | {_pct(v['chance'])} | {_pct(v['ablated_accuracy'])} |")
        for ask, acc in v["accuracy_by_question"].items():
            lines.append(f"| · {ask} ({v['questions'][ask]}) | {_pct(acc)} | | {_pct(v['ablated_by_question'].get(ask, float('nan')))} |")
    lines += ["", "Chance: one of 6 colours, 3 shapes, 9 positions (image); 4 directions, 6 colours, 2–4 frame pairs (video).", ""]
    im, vi = ev["image"], ev["video"]
    for part, v in (("Image", im), ("Video", vi)):
        seen = v["accuracy"] >= v["chance"] + 0.15 and v["ablated_accuracy"] <= v["chance"] + 0.15
        lines.append(f"{part} answers: {_pct(v['accuracy'])} against chance {_pct(v['chance'])}; with the pixels "
                     f"replaced by flat grey, {_pct(v['ablated_accuracy'])} — "
                     + ("the answer comes from the vision tokens." if seen else
                        "the answers do not depend on what the model is shown."))
    lines.append("")
    o = ev["open"]
    lines += ["### Open prompts and sampling", "",
              f"Next-token distribution after `{o['prompt']}` (non-thinking): entropy {o['entropy_nats']:.2f} nats, "
              f"{_pct(o['p_colour_words'])} on the ten capitalised colour words, {o['p_untrained_tail']:.1e} on the "
              "untrained tail altogether.", "",
              "| token | p |", "|---|---:|"]
    lines += [f"| `{_cell(x['token'])}` | {x['p']:.3f} |" for x in o["top"][:6]]
    lines += ["", f"{o['n_sampled']} replies sampled at temperature 1 (no top-k/p): {o['distinct_sampled']} distinct — "
              + ", ".join(f"`{_cell(k)}` ×{v}" for k, v in o["sampled"].items()) + ".", ""]
    lo = ev["loops"]
    lines += ["### Repetition loops and the presence penalty", "",
              f"{lo['n']} list prompts (`List some colours.` …), greedy, {lo['max_new_tokens']} new tokens at most; a loop = "
              f"a reply whose seq-rep-4 is ≥ {lo['threshold']} (that share of its 4-grams repeats an earlier one).", "",
              "| decoding | loop rate | cut off at max_new_tokens | mean seq-rep-4 | example |", "|---|---:|---:|---:|---|"]
    for label, name in (("greedy", "greedy"), ("greedy_presence_penalty", f"greedy, presence_penalty {lo['presence_penalty']}")):
        x = lo[label]
        lines.append(f"| {name} | {_pct(x['loop_rate'])} | {_pct(x.get('unfinished_rate', float('nan')))} | "
                     f"{x['mean_repetition_rate']:.2f} | `{_cell(x['examples'][0])}` |")
    g = lo["greedy"]
    if g["loop_rate"] >= 0.5 and g.get("unfinished_rate", 1.0) < 0.5 and "mean_items" in g:
        lines += ["", f"Greedy replies go round the 3-cycle and end after {g['mean_items']:.1f} items on average; the "
                  f"longest training lists have {chat_data.LIST_MAX}. The loop ends where the training lists end, not "
                  f"at `max_new_tokens`. With the presence penalty the replies have {lo['greedy_presence_penalty']['mean_items']:.1f} "
                  "items on average."]
    lines += ["", "## Reproduce", "", "```", f"python -m qwen35_lab.organisms train chat --seed {meta['seed']}",
              f"python -m qwen35_lab.organisms evaluate chat --n {n} --seed {ev['seed']}", "```", "",
              "Data come from `random.Random(seed)` in this process and initialisation from `torch.manual_seed(seed)`; "
              "the run stops at a fixed step count unless the wall-clock cap hits first.", ""]
    return "\n".join(lines)


def _layer_types(n: int) -> list[str]:
    from .. import configs

    return configs.layer_types(n)


def _examples() -> dict:
    rng = random.Random(3)
    out = {}
    for kind in chat_data.KINDS:
        conv = chat_data.make_conversation(rng, kind, thinking=False, system=False)
        last = conv.messages[-1]["content"]
        if isinstance(last, list):
            media = "[image]" if last[0]["type"] == "image" else "[video]"
            last = f"{media} {last[1]['text']}"
        reply = conv.answer.replace("\n", "⏎")
        if kind == "tool_answer":
            last = f"tool: {last}"
        out[kind] = f"`{last[:70]}` → `{reply[:80]}`"
    return out
