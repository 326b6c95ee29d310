"""`moe-mix`: a small Qwen3.5 MoE trained on a mixture of two tasks, whose experts specialise.

Every sequence starts with a task token and is one of our synthetic tasks
(:mod:`qwen35_lab.organisms.tasks`)::

    <recall> k12 v7 k3 v40 ? k3 v41 k12 v8
    <passkey> the sky is blue . the key is lemon . the sun is warm . what is the key ? cloud

Each answer is not the stored word itself but its successor in a fixed cyclic order (:data:`SUCCESSOR`:
recall's values v0 … v63, the passkey's 32 key words in ``tasks.PASSKEY_WORDS`` order): finding the stored
word is the token mixers' job, the per-word map is a lookup that only FFN weights can store, so each task
needs the experts that hold its map.

The model is a ``Qwen3_5MoeForCausalLM`` (one [3 × Gated DeltaNet, 1 × gated
attention] group; every FFN a sparse block of 8 experts, top-2, with a small gated
shared expert), trained with the answer-only loss plus transformers'
load-balancing loss taken over the mixture (both tasks' tokens together, so
the experts are balanced overall while each task may keep its own). :func:`routing_specialisation` measures, per layer, the
mutual information between the task and each token's top-1 expert on fresh
data, against the same statistic with the task labels shuffled between
sequences; :func:`removal_experiment` removes the experts each task prefers
(``ql.remove_experts`` on every layer) and measures both tasks' accuracy.

``python -m qwen35_lab.organisms train moe-mix --seed 0`` rebuilds it.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from .._io import atomic_directory
from ..chat_format import TEMPLATES
from . import tasks

__all__ = ["NAME", "TASKS", "SUCCESSOR", "vocabulary", "build_tokenizer", "make_batch", "model_config", "train",
           "evaluate", "routing_specialisation", "preferred_experts", "removal_experiment"]

NAME = "moe-mix"
TASKS = ("recall", "passkey")
TASK_TOKENS = {"recall": "<recall>", "passkey": "<passkey>"}
RECALL_PAIRS = (2, 8)  # pairs drawn per batch
PASSKEY_FILLER = (16, 64)  # filler tokens drawn per batch (multiples of 16)
EVAL_LENGTHS = {"recall": 8, "passkey": 64}
EVAL_SEED = 4242
# each task's answer: the stored word's successor in a fixed cyclic order (recall's values; the passkey's words)
_CYCLES = {"recall": [f"v{i}" for i in range(tasks.RECALL_NUM_VALUES)], "passkey": list(tasks.PASSKEY_WORDS)}
SUCCESSOR = {task: {w: cycle[(i + 1) % len(cycle)] for i, w in enumerate(cycle)} for task, cycle in _CYCLES.items()}
CONFIG = dict(
    hidden_size=128, num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
    full_attention_interval=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32, attn_output_gate=True,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
    linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
    shared_expert_intermediate_size=16, router_aux_loss_coef=0.01, hidden_act="silu", rms_norm_eps=1e-6,
    max_position_embeddings=4096, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5},
)
TRAIN = dict(lr=3e-3, warmup_steps=50, weight_decay=0.1, batch_size={"recall": 32, "passkey": 16}, max_steps=4000,
             eval_every=50, target_accuracy=0.97, min_steps=400)  # recall, the harder task, gets the larger batch


def vocabulary() -> list[str]:
    """Specials, the two task tokens, then the recall words and the passkey words (no repeats)."""
    words = tasks.SPECIAL_TOKENS + list(TASK_TOKENS.values())
    for task in TASKS:
        words += [w for w in tasks.vocabulary(task) if w not in words]
    return words


def build_tokenizer():
    """The word-level tokenizer of both tasks and their task tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary())}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", clean_up_tokenization_spaces=False)


def make_batch(task: str, tokenizer, rng: random.Random, length: int, batch_size: int):
    """``(input_ids, labels)`` ``[B, 1 + T]``: the task token, then :func:`tasks.make_batch`'s sequences
    (labels -100 except at the answers), each answer replaced by its :data:`SUCCESSOR`."""
    ids, labels = tasks.make_batch(task, tokenizer, rng, length, batch_size)
    vocab = tokenizer.get_vocab()
    succ = torch.arange(len(vocab))
    for w, nxt in SUCCESSOR[task].items():
        succ[vocab[w]] = vocab[nxt]
    at = labels != -100
    ids[at] = succ[ids[at]]
    labels[at] = ids[at]
    marker = torch.full((ids.shape[0], 1), vocab[TASK_TOKENS[task]])
    return torch.cat([marker, ids], 1), torch.cat([torch.full_like(marker, -100), labels], 1)


def model_config(vocab_size: int):
    from transformers import Qwen3_5MoeTextConfig

    return Qwen3_5MoeTextConfig(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=None,
                                **{k: (list(v) if isinstance(v, list) else v) for k, v in CONFIG.items()})


def _draw(task: str, rng: random.Random) -> int:
    if task == "recall":
        return rng.randint(*RECALL_PAIRS)
    return 16 * rng.randint(PASSKEY_FILLER[0] // 16, PASSKEY_FILLER[1] // 16)


def _accuracy(model, tokenizer, task: str, n: int, seed: int, length: int | None = None) -> float:
    rng = random.Random(seed)
    ids, labels = make_batch(task, tokenizer, rng, length or EVAL_LENGTHS[task], n)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return tasks.accuracy_from_logits(logits, ids, labels)


def train(*, seed: int = 0, out_dir: str | Path | None = None, minutes: float = 30.0, threads: int = 1,
          max_steps: int | None = None, progress: bool = True) -> Path:
    """Train `moe-mix` from ``seed`` and save it, its card, training log and measurements, atomically."""
    from transformers import GenerationConfig, Qwen3_5MoeForCausalLM
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import load_balancing_loss_func
    from tqdm.auto import tqdm

    from . import organisms_dir
    from .train import init_decay

    from ..checks import check_float, check_int

    check_int("seed", seed)
    check_float("minutes", minutes, lo=0, lo_open=True)
    steps_cap = TRAIN["max_steps"] if max_steps is None else check_int("max_steps", max_steps, lo=1)
    out = Path(out_dir) if out_dir is not None else organisms_dir() / NAME
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(seed)
    tokenizer = build_tokenizer()
    model = Qwen3_5MoeForCausalLM(model_config(len(tokenizer))).float()
    init_decay(model, torch.Generator().manual_seed(seed))
    model.train()
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in pname or pname.endswith(("A_log", "dt_bias")) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / TRAIN["warmup_steps"])
        return TRAIN["lr"] * warm * 0.5 * (1 + math.cos(math.pi * min(step, steps_cap) / steps_cap))

    log, start, ema, stopped = [], time.time(), None, "max_steps"
    bar = tqdm(range(steps_cap), desc=f"train {NAME}", disable=not progress, mininterval=5.0)
    coef = CONFIG["router_aux_loss_coef"]
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss, router_logits = 0.0, []
        for task in TASKS:  # one batch of each task per step
            ids, labels = make_batch(task, tokenizer, rng, _draw(task, rng), TRAIN["batch_size"][task])
            out_ = model(input_ids=ids, output_router_logits=True)
            ce = torch.nn.functional.cross_entropy(out_.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
            loss = loss + ce
            router_logits.append(out_.router_logits)  # per layer [B * T, E]
        # balance the experts over the mixture, not within each task (that would forbid specialisation)
        mixed = tuple(torch.cat(per_layer) for per_layer in zip(*router_logits))
        loss = loss + coef * load_balancing_loss_func(mixed, CONFIG["num_experts"], CONFIG["num_experts_per_tok"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % TRAIN["eval_every"] == 0 or step + 1 == steps_cap:
            model.eval()
            acc = {t: _accuracy(model, tokenizer, t, 100, 10_000_019 + seed) for t in TASKS}
            model.train()
            row = {"step": step + 1, "loss": round(ema, 4), **{f"accuracy_{t}": round(a, 4) for t, a in acc.items()},
                   "seconds": round(time.time() - start, 1), "lr": lr_at(step)}
            log.append(row)
            bar.set_postfix(loss=f"{ema:.3f}", **{t: f"{a:.2f}" for t, a in acc.items()})
            if min(acc.values()) >= TRAIN["target_accuracy"] and step + 1 >= TRAIN["min_steps"]:
                stopped = "target_accuracy"
                break
            if time.time() - start > minutes * 60:
                stopped = "minutes"
                break
    bar.close()
    seconds = time.time() - start
    model.eval()

    from .. import load

    with atomic_directory(out) as tmp:
        model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=2, do_sample=False)
        model.save_pretrained(tmp)  # fp32: the organism is small and the measurements are exact
        tokenizer.chat_template = TEMPLATES["qwen3.5"]  # apply_chat_template works, as lab.render
        tokenizer.save_pretrained(tmp)
        meta = {"organism": NAME, "task": "moe-mix", "tasks": list(TASKS), "seed": seed, "chat_template": "qwen3.5",
                "eval_lengths": EVAL_LENGTHS, "config": CONFIG, "train": TRAIN, "steps": log[-1]["step"] if log else 0,
                "train_seconds": round(seconds, 1), "stopped": stopped, "torch": torch.__version__}
        (tmp / "qwen35_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with open(tmp / "train_log.jsonl", "w") as f:
            for row in log:
                f.write(json.dumps(row) + "\n")
        lab = load(tmp, dtype="float32", device="cpu")
        meta["evaluation"] = {t: evaluate(lab, t, n=200, seed=EVAL_SEED) for t in TASKS}
        meta["specialisation"] = routing_specialisation(lab, n=100, seed=EVAL_SEED + 1)
        meta["removal"] = removal_experiment(lab, n=200, seed=EVAL_SEED + 2, stats_seed=EVAL_SEED + 1)
        (tmp / "qwen35_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(card(meta, log))
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


# ---------------------------------------------------------------------------------- measurements
def _check_lab(lab) -> None:
    from ..checks import BadValue

    if set(vocabulary()) - set(lab.tokenizer.get_vocab()):
        raise BadValue(f"{getattr(lab, 'name', lab)!r} is not the moe-mix organism: its tokenizer lacks the task "
                       "tokens <recall> / <passkey>")


def evaluate(lab, task: str, *, n: int = 200, seed: int = 12345, length: int | None = None, edits=None,
             batch_size: int = 100) -> dict:
    """Accuracy on ``n`` fresh sequences of ``task`` (teacher-forced answers), optionally under ``edits``
    (e.g. ``{"layers.*.moe.router_logits": ql.remove_experts([3])}``). Returns ``accuracy``, ``answers``, ``ci95``."""
    from ..checks import check_choice, check_int

    check_choice("task", task, TASKS)
    check_int("n", n, lo=1)
    check_int("batch_size", batch_size, lo=1)
    _check_lab(lab)
    rng = random.Random(seed)
    correct = total = 0
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        ids, labels = make_batch(task, lab.tokenizer, rng, length or EVAL_LENGTHS[task], b)
        with lab.trace(edits=edits) if edits else _null():
            with torch.no_grad():
                logits = lab.model(input_ids=ids).logits.float()
        answers = int((labels != -100).sum())
        correct += round(tasks.accuracy_from_logits(logits, ids, labels) * answers)
        total += answers
        done += b
    return {"accuracy": correct / total, "answers": total, "n": n, "ci95": list(tasks.wilson_interval(correct, total))}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _routing(lab, n: int, seed: int) -> dict:
    """Top-1 experts ``[layer][task] -> [n, T]`` and routing mass per expert on fresh data of both tasks."""
    rng = random.Random(seed)
    out = {}
    for task in TASKS:
        ids, _ = make_batch(task, lab.tokenizer, rng, EVAL_LENGTHS[task], n)
        tr = lab.run({"input_ids": ids}, capture=["layers.*.moe.topk_ids", "layers.*.moe.topk_weights"])
        out[task] = tr
    return out


def routing_specialisation(lab, *, n: int = 100, seed: int = 777, shuffles: int = 20) -> dict:
    """Per layer: I(task; top-1 expert) in bits over the tokens after the task token of ``n`` fresh sequences
    of each task, and the same with the task labels shuffled between sequences (mean and max of
    ``shuffles`` permutations); plus each task's share of routing mass per expert."""
    from ..moe import expert_load, mutual_information

    _check_lab(lab)
    traces = _routing(lab, n, seed)
    layers = sorted({int(k.split(".")[1]) for k in traces["recall"].names})
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for L in layers:
        experts, seq_task, seq_len = [], [], []
        for t_i, task in enumerate(TASKS):
            top1 = traces[task][f"layers.{L}.moe.topk_ids"][:, 1:, 0]  # [n, T] (the task token left out)
            experts.append(top1.reshape(-1))
            seq_task += [t_i] * top1.shape[0]
            seq_len += [top1.shape[1]] * top1.shape[0]
        experts = torch.cat(experts)
        seq_task, seq_len = torch.tensor(seq_task), torch.tensor(seq_len)
        labels = seq_task.repeat_interleave(seq_len)
        mi = mutual_information(experts, labels)
        null = []
        for _ in range(shuffles):  # the sequences' task labels permuted (each sequence keeps one label)
            perm = seq_task[torch.randperm(len(seq_task), generator=gen)]
            null.append(mutual_information(experts, perm.repeat_interleave(seq_len)))
        E = lab.text_config.num_experts
        mass = {task: expert_load(traces[task], L, num_experts=E)[L]["mass"] for task in TASKS}
        result[str(L)] = {"mi_bits": round(mi, 4), "shuffled_mean_bits": round(sum(null) / len(null), 4),
                          "shuffled_max_bits": round(max(null), 4),
                          "mass_share": {t: [round(float(x), 4) for x in m / m.sum()] for t, m in mass.items()}}
    return result


def preferred_experts(lab, *, n: int = 100, seed: int = 777, per_layer: int = 2) -> dict[str, dict[int, list[int]]]:
    """``{task: {layer: experts}}``: per layer, the ``per_layer`` experts whose routing mass is most
    specific to the task (its share minus the other task's share), measured on fresh data."""
    from ..moe import expert_load

    traces = _routing(lab, n, seed)
    out = {t: {} for t in TASKS}
    for L in sorted({int(k.split(".")[1]) for k in traces["recall"].names}):
        E = lab.text_config.num_experts
        share = {t: (lambda m: m / m.sum())(expert_load(traces[t], L, num_experts=E)[L]["mass"]) for t in TASKS}
        for t in TASKS:
            other = [o for o in TASKS if o != t][0]
            out[t][L] = torch.argsort(share[t] - share[other], descending=True)[:per_layer].tolist()
    return out


def removal_experiment(lab, *, n: int = 200, seed: int = 999, stats_seed: int = 777, per_layer: int = 2) -> dict:
    """Remove, in every layer, the experts one task prefers (from :func:`preferred_experts` on other data),
    and measure both tasks' accuracy on fresh data against the unedited model."""
    from ..instrument import remove_experts

    prefs = preferred_experts(lab, n=100, seed=stats_seed, per_layer=per_layer)
    base = {t: evaluate(lab, t, n=n, seed=seed) for t in TASKS}
    result = {"baseline": {t: round(base[t]["accuracy"], 4) for t in TASKS}, "removed": {}}
    for removed_for in TASKS:
        edits = {f"layers.{L}.moe.router_logits": remove_experts(ex) for L, ex in prefs[removed_for].items()}
        acc = {t: evaluate(lab, t, n=n, seed=seed, edits=edits) for t in TASKS}
        result["removed"][removed_for] = {"experts": {str(L): ex for L, ex in prefs[removed_for].items()},
                                          **{t: round(acc[t]["accuracy"], 4) for t in TASKS}}
    return result


def card(meta: dict, log: list[dict]) -> str:
    ev, spec, rem = meta["evaluation"], meta["specialisation"], meta["removal"]
    lines = [
        f"# `{NAME}` — a Qwen3.5 MoE whose experts specialise on two tasks", "",
        f"Trained by `python -m qwen35_lab.organisms train {NAME} --seed {meta['seed']}` "
        f"({meta['steps']} steps, {meta['train_seconds']:.0f} s on one CPU thread, stopped by {meta['stopped']}).", "",
        "| | |", "|---|---|",
        "| class | `Qwen3_5MoeForCausalLM` (`model_type` `qwen3_5_moe_text`), fp32 safetensors |",
        "| layers | 4: 3 × Gated DeltaNet, 1 × gated attention; every FFN a sparse MoE block |",
        f"| MoE block | {CONFIG['num_experts']} experts (width {CONFIG['moe_intermediate_size']}), "
        f"top-{CONFIG['num_experts_per_tok']} renormalised, shared expert "
        f"(width {CONFIG['shared_expert_intermediate_size']}) with a sigmoid gate |",
        "| hidden | 128; attention 2 heads / 1 KV head, head_dim 32, RoPE θ 1000 on half the dims |",
        "| data | every sequence starts with a task token: `<recall>` (MQAR, 2–8 pairs) or `<passkey>` "
        "(16–64 filler tokens); each answer is the stored word's successor in a fixed cyclic order (recall: "
        "v0…v63; passkey: its 32 key words), a per-word map only FFN weights can store; per step "
        f"{TRAIN['batch_size']['recall']} recall and {TRAIN['batch_size']['passkey']} passkey sequences |",
        f"| loss | cross-entropy on the answers + {CONFIG['router_aux_loss_coef']} × transformers' load-balancing "
        "loss over both tasks' tokens together |", "",
        "## Accuracy on fresh data", "",
        "| task | length | accuracy | 95% CI | answers |", "|---|---|---|---|---|",
    ]
    for t in TASKS:
        r = ev[t]
        lines.append(f"| {t} | {EVAL_LENGTHS[t]} | {r['accuracy']:.3f} | {r['ci95'][0]:.3f}–{r['ci95'][1]:.3f} | "
                     f"{r['answers']} |")
    lines += ["", "## Routing specialises by task", "",
              "Mutual information between the task and each token's top-1 expert (100 fresh sequences per task, "
              "task token left out), against the task labels shuffled between sequences (20 permutations). "
              "The tasks use different words, so part of this follows the tokens themselves: "
              "what matters for the model is the causal test below.", "",
              "| layer | I(task; expert) bits | shuffled mean | shuffled max |", "|---|---|---|---|"]
    for L, r in spec.items():
        lines.append(f"| {L} | {r['mi_bits']:.3f} | {r['shuffled_mean_bits']:.4f} | {r['shuffled_max_bits']:.4f} |")
    drops = {t: {u: rem["baseline"][u] - rem["removed"][t][u] for u in TASKS} for t in TASKS}
    lines += ["", "## Removing a task's preferred experts", "",
              "Per layer the two experts whose routing share is most specific to a task (measured on other data) "
              "are removed (`ql.remove_experts`: their router logits set to -inf before the top-k) in every layer; "
              "accuracy on 200 fresh sequences per task:", "",
              "| removed experts of | recall | passkey |", "|---|---|---|",
              f"| none | {rem['baseline']['recall']:.3f} | {rem['baseline']['passkey']:.3f} |"]
    for t in TASKS:
        r = rem["removed"][t]
        lines.append(f"| {t} ({', '.join(f'L{L}: {ex}' for L, ex in r['experts'].items())}) | {r['recall']:.3f} | "
                     f"{r['passkey']:.3f} |")
    lines += [""] + [f"Removing {t}'s experts costs {t} {drops[t][t]:+.3f} and the other task "
                     f"{drops[t][[u for u in TASKS if u != t][0]]:+.3f} accuracy (drops; positive = worse)." for t in TASKS]
    holds = [t for t in TASKS if drops[t][t] >= 0.1 and drops[t][t] >= drops[t][[u for u in TASKS if u != t][0]] + 0.1]
    lines += ["", ("The causal asymmetry holds in both directions: removing the experts a task prefers costs that task "
                   "at least 0.1 more accuracy than the other task." if len(holds) == len(TASKS) else
                   f"The causal asymmetry (own drop ≥ 0.1 and ≥ the other task's drop + 0.1) holds for "
                   f"{', '.join(holds) or 'neither task'}'s experts only."),
              "Chance is 1/64 per recall answer and 1/32 per passkey answer; recall is learnt to "
              f"{ev['recall']['accuracy']:.0%} in this budget (still rising slowly when the learning rate reaches 0, "
              "see `train_log.jsonl`).", ""]
    lines += ["", "`train_log.jsonl` has the loss and both accuracies every 50 steps; "
              "`qwen35_lab.organisms.moe_mix.routing_specialisation` and `removal_experiment` recompute the numbers.",
              ""]
    return "\n".join(lines)
