"""Train the task organisms (``recall``, ``recall-linear``, ``passkey``) from a seed on CPU.

``python -m qwen35_lab.organisms train recall`` regenerates
``data/organisms/recall/`` in minutes on 2 CPU cores. Everything random —
initialisation, the curriculum, the training data — comes from the seed
(one ``torch.Generator`` and one ``random.Random``), data are generated in
this process, and the algorithms are deterministic, so a run is repeatable
on one machine.

What makes these tiny models learn quickly (measured, see the cards):

- a curriculum: each batch draws its length (pairs for recall, filler tokens
  and needle depth for passkey) at random up to the training length;
- loss on the answers only;
- the decay init of the Gated DeltaNet paper (``A ~ U(1, 16)``, ``dt``
  log-uniform in ``[1e-3, 0.1]``, ``dt_bias = softplus⁻¹(dt)``) instead of
  HF's, which makes most heads forget almost every step;
- fp32 on one thread: on CPUs without bf16 instructions bf16 autocast was
  about 8× slower for these shapes, and two OpenMP threads on a shared 2-core
  machine were far slower than one.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import checks
from .._io import atomic_directory
from ..chat_format import TEMPLATES, template_for
from . import tasks

__all__ = ["Recipe", "RECIPES", "model_config", "train"]


@dataclass(frozen=True)
class Recipe:
    """How one organism is built and trained."""

    name: str
    task: str
    layer_types: tuple[str, ...]
    train_length: int  # recall: pairs; passkey: filler tokens
    min_length: int  # the curriculum draws lengths in [min_length, train_length]
    hidden_size: int = 128
    intermediate_size: int = 256
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 2
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    rope_theta: float = 10_000.0
    partial_rotary_factor: float = 0.25
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    batch_size: int = 64
    max_steps: int = 3000
    eval_every: int = 100
    eval_n: int = 200
    target_accuracy: float = 0.99  # stop once an evaluation at train_length reaches it ...
    min_steps: int = 0  # ... but not before this step
    length_step: int = 1  # passkey lengths are drawn in multiples of this
    description: str = ""
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "recall": Recipe(
        name="recall", task="recall",
        layer_types=("linear_attention",) * 3 + ("full_attention",),
        train_length=8, min_length=2, batch_size=32, max_steps=2500, eval_every=50, target_accuracy=0.98,
        description="multi-query associative recall, 8 pairs; one [3 × Gated DeltaNet, 1 × gated attention] group",
    ),
    "recall-linear": Recipe(
        name="recall-linear", task="recall",
        layer_types=("linear_attention",) * 2,
        train_length=8, min_length=2, batch_size=32, max_steps=3000, eval_every=100, target_accuracy=0.98,
        linear_key_head_dim=128,  # the real models' key size: 8 stored keys barely overlap a random one
        description="multi-query associative recall, 8 pairs; two Gated DeltaNet layers, no attention",
    ),
    "passkey": Recipe(
        name="passkey", task="passkey",
        layer_types=("linear_attention", "full_attention"),
        train_length=256, min_length=16, length_step=16, rope_theta=1000.0, partial_rotary_factor=0.5,
        batch_size=32, max_steps=1000, min_steps=600, eval_every=50, target_accuracy=1.0,
        description="one key word hidden in 256 filler tokens; Gated DeltaNet + gated attention",
    ),
    "needles": Recipe(
        name="needles", task="needles",
        layer_types=("linear_attention",) * 3 + ("full_attention",),
        train_length=256, min_length=32, length_step=16,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_key_head_dim=8, rope_theta=1000.0, partial_rotary_factor=0.25,
        lr=1e-3, batch_size=32, max_steps=4000, eval_every=200, target_accuracy=0.99, min_steps=2500,
        description="16 one-token key → value needles (`k12:v7`) in a 256-token haystack, the asked key assigned "
                    "twice (the later value counts); one [3 × Gated DeltaNet, 1 × gated attention] group whose "
                    "look-up goes through the attention layer and tells the copies apart by RoPE",
        # Earlier designs, measured and not shipped: needles written as two words (`v7 k12` or `k12 v7`),
        # lr 3e-3, default initialisation. Value-then-key stopped at 11% after 8,000 steps (66 min) with the
        # attention reading the values present, never the key's neighbour; key-then-value was solved by the
        # Gated DeltaNet state at its 8-dim-key capacity (23-33% at every length, attention ablation -> 32%).
        # Small probes on 64-token haystacks then showed why the attention never took over: at lr 3e-3 even a
        # one-layer attention model stays at chance, and in this layout the random DeltaNet outputs and the
        # needle words' unrelated embeddings keep it there for 600+ steps at lr 1e-3 (see init_needles).
        extra={"min_needles": 4, "max_needles": 16, "ramp_steps": 1200},
    ),
}


def model_config(recipe: Recipe, vocab_size: int):
    """The ``Qwen3_5TextConfig`` of an organism (gated attention, partial RoPE, tied embeddings)."""
    from transformers import Qwen3_5TextConfig

    n = len(recipe.layer_types)
    return Qwen3_5TextConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=n,
        layer_types=list(recipe.layer_types),
        full_attention_interval=4,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        attn_output_gate=True,
        linear_num_key_heads=recipe.linear_num_key_heads,
        linear_num_value_heads=recipe.linear_num_value_heads,
        linear_key_head_dim=recipe.linear_key_head_dim,
        linear_value_head_dim=recipe.linear_value_head_dim,
        linear_conv_kernel_dim=4,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        # transformers' hybrid cache needs at least one attention layer
        use_cache="full_attention" in recipe.layer_types,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": recipe.rope_theta,
                         "partial_rotary_factor": recipe.partial_rotary_factor},
    )


def init_decay(model, generator: torch.Generator) -> None:
    """Gated DeltaNet paper init: ``A ~ U(1, 16)``, ``dt`` log-uniform [1e-3, 0.1], ``dt_bias = softplus⁻¹(dt)``."""
    for layer in model.model.layers:
        if not hasattr(layer, "linear_attn"):
            continue
        attn = layer.linear_attn
        n = attn.A_log.numel()
        attn.A_log.data = torch.empty(n).uniform_(1, 16, generator=generator).log()
        lo, hi = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.empty(n).uniform_(0, 1, generator=generator) * (hi - lo) + lo)
        attn.dt_bias.data = dt + torch.log(-torch.expm1(-dt))


def init_needles(model, tokenizer) -> None:
    """The needles organism's start: each one-token needle ``k12:v7`` begins as the (rescaled) sum of the
    ``k12`` and ``v7`` embeddings, and every Gated DeltaNet output projection at zero.

    Measured on 64-token haystacks (8 needles, lr 1e-3): from the default initialisation the loss stays at
    chance (ln 16) for 600+ steps — 512 needle words must each discover that they share a key with the
    question's word — and with random DeltaNet outputs in the residual stream the attention layer does not
    find the look-up either; with both changes the look-up forms within ~150 steps on 32-token haystacks.
    """
    vocab = tokenizer.get_vocab()
    emb = model.get_input_embeddings().weight  # tied: also the output rows
    with torch.no_grad():
        for k in range(tasks.NEEDLES_NUM_KEYS):
            for v in range(tasks.NEEDLES_NUM_VALUES):
                emb[vocab[tasks.needle_word(k, v)]] = (emb[vocab[f"k{k}"]] + emb[vocab[f"v{v}"]]) / math.sqrt(2)
    zero_deltanet_out(model.model.layers)


def zero_deltanet_out(layers) -> None:
    """Start every Gated DeltaNet output projection in ``layers`` at zero.

    The residual stream then begins without random DeltaNet outputs, and the attention layer finds
    content look-ups far sooner (measured on the needles organism, and in a pilot of the chat
    organism's image questions).
    """
    with torch.no_grad():
        for layer in layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.out_proj.weight.zero_()


def _batch_kwargs(recipe: Recipe, rng: random.Random, length: int) -> dict:
    """Task arguments of one training batch: for needles, the number of needles (curriculum) and every key asked."""
    if recipe.task != "needles":
        return {}
    hi = min(recipe.extra["max_needles"], length // 4)
    n = rng.randint(min(recipe.extra["min_needles"], hi), hi)
    return {"num_needles": n, "queries": None, "stale": rng.randint(0, n // 2)}


def _draw_length(recipe: Recipe, rng: random.Random, step: int = 0) -> int:
    """The curriculum: a length uniform up to the training length (``ramp_steps``: up to a limit
    that grows linearly from ``min_length`` to the training length over those first steps)."""
    if recipe.task == "recall":
        return rng.randint(recipe.min_length, recipe.train_length)
    top = recipe.train_length
    ramp = recipe.extra.get("ramp_steps", 0)
    if ramp and step < ramp:
        top = recipe.min_length + (recipe.train_length - recipe.min_length) * step / ramp
    steps = int((top - recipe.min_length) // recipe.length_step)
    return recipe.min_length + recipe.length_step * rng.randint(0, steps)


def train(name: str, *, seed: int = 0, out_dir: str | Path | None = None, minutes: float = 55.0,
          threads: int = 1, max_steps: int | None = None, progress: bool = True,
          evaluate_after: bool = True, init_from: str | Path | None = None, lr: float | None = None) -> Path:
    """Train organism ``name`` from ``seed`` and save it (atomically) to ``out_dir``.

    Stops when an evaluation at the training length reaches the recipe's
    ``target_accuracy``, after ``max_steps``, or after ``minutes`` (a safety
    cap: a run stopped by it is not step-for-step repeatable).
    Writes the HF checkpoint, the tokenizer, ``qwen35_lab.json``,
    ``train_log.jsonl``, ``training_curve.png`` and the ``README.md`` card
    (``evaluate_after=False`` skips the card's evaluation and card, for quick checks).
    ``threads`` defaults to 1: on a shared 2-core machine two OpenMP threads
    slow these small matmuls down many times over.
    ``init_from``: continue from a saved run of the same organism (a second
    stage: its weights, a fresh optimiser and schedule of ``max_steps`` at peak
    ``lr``, data from ``seed`` + the number of earlier stages); its log and steps are carried into this one.
    """
    from transformers import GenerationConfig, Qwen3_5ForCausalLM
    from tqdm.auto import tqdm

    from . import organisms_dir

    if name not in RECIPES:
        raise ValueError(f"unknown organism {name!r}; trainable organisms: {', '.join(RECIPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise ValueError(f"minutes must be a positive number, got {minutes!r}")
    recipe = RECIPES[name]
    steps_cap = recipe.max_steps if max_steps is None else checks.check_int("max_steps", max_steps, lo=1)
    peak_lr = recipe.lr if lr is None else checks.check_float("lr", lr, lo=0.0, lo_open=True, hi=1.0)
    source = _init_source(name, init_from) if init_from is not None else None
    out = Path(out_dir) if out_dir is not None else organisms_dir() / name

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    data_seed = seed if source is None else seed + len(source["stages"])  # each stage draws its own data
    rng = random.Random(data_seed)
    tokenizer = tasks.build_tokenizer(recipe.task)
    config = model_config(recipe, len(tokenizer))
    if source is None:
        model = Qwen3_5ForCausalLM(config).float()
        init_decay(model, torch.Generator().manual_seed(seed))
        if recipe.task == "needles":
            init_needles(model, tokenizer)
    else:
        model = Qwen3_5ForCausalLM.from_pretrained(source["path"], dtype=torch.float32)
        _check_same_shape(model.config, config, source["path"])
    model.train()

    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in pname or pname.endswith(("A_log", "dt_bias")) else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        return peak_lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, steps_cap) / steps_cap))

    log: list[dict] = []
    start = time.time()
    bar = tqdm(range(steps_cap), desc=f"train {name}", disable=not progress, mininterval=2.0)
    ema = None
    stopped = "max_steps"
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        length = _draw_length(recipe, rng, step + (source["steps"] if source else 0))  # a second stage: no new ramp
        input_ids, labels = tasks.make_batch(recipe.task, tokenizer, rng, length, recipe.batch_size,
                                             **_batch_kwargs(recipe, rng, length))
        logits = model(input_ids=input_ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == steps_cap:
            acc = _quick_eval(model, tokenizer, recipe, seed)
            row = {"step": step + 1, "loss": round(ema, 4), "accuracy": round(acc, 4),
                   "seconds": round(time.time() - start, 1), "lr": lr_at(step)}
            log.append(row)
            bar.set_postfix(loss=f"{ema:.3f}", acc=f"{acc:.3f}")
            if acc >= recipe.target_accuracy and step + 1 >= recipe.min_steps:
                stopped = "target_accuracy"
                break
            if time.time() - start > minutes * 60:
                stopped = "minutes"
                break
    bar.close()
    seconds = time.time() - start
    model.eval()

    with atomic_directory(out) as tmp:
        model = model.to(torch.bfloat16)
        model.generation_config = GenerationConfig(pad_token_id=0, eos_token_id=2, do_sample=False)
        model.save_pretrained(tmp)
        variant = template_for(model.config)
        tokenizer.chat_template = TEMPLATES[variant]  # written as chat_template.jinja: apply_chat_template works
        tokenizer.save_pretrained(tmp)
        if source is not None:  # one log and step count over both stages
            log = source["log"] + [{**row, "step": row["step"] + source["steps"],
                                    "seconds": round(row["seconds"] + source["train_seconds"], 1)} for row in log]
            seconds += source["train_seconds"]
        meta = {"organism": name, "task": recipe.task, "seed": seed, "train_length": recipe.train_length,
                "chat_template": variant,
                "recipe": asdict(recipe), "steps": log[-1]["step"] if log else 0,
                "train_seconds": round(seconds, 1), "stopped": stopped, "torch": torch.__version__}
        if source is not None:
            meta["stages"] = source["stages"] + [{"steps": meta["steps"] - source["steps"], "lr": peak_lr,
                                                  "data_seed": data_seed, "stopped": stopped}]
        (tmp / "qwen35_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with open(tmp / "train_log.jsonl", "w") as f:
            for row in log:
                f.write(json.dumps(row) + "\n")
        if evaluate_after:
            meta["evaluation"] = _evaluate_saved(tmp, recipe, seed)
            (tmp / "qwen35_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _plot_curve(tmp / "training_curve.png", recipe, log)
            (tmp / "README.md").write_text(card(recipe, meta, log))
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out


def _init_source(name: str, init_from) -> dict:
    """The saved run a second stage continues: its folder, steps, time and log (checked before any work)."""
    path = Path(init_from)
    meta_file = path / "qwen35_lab.json"
    if not meta_file.is_file() or not (path / "model.safetensors").is_file():
        raise checks.BadValue(f"init_from={str(init_from)!r} is not a saved organism (no qwen35_lab.json and "
                              f"model.safetensors there)")
    meta = json.loads(meta_file.read_text())
    if meta.get("organism") != name:
        raise checks.BadValue(f"init_from={str(init_from)!r} holds organism {meta.get('organism')!r}, not {name!r}")
    log = [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines() if line.strip()]
    stages = meta.get("stages") or [{"steps": meta["steps"], "lr": meta["recipe"]["lr"], "data_seed": meta["seed"],
                                     "stopped": meta["stopped"]}]
    return {"path": str(path), "steps": int(meta["steps"]), "train_seconds": float(meta["train_seconds"]),
            "log": log, "stages": stages}


def _check_same_shape(loaded, wanted, path: str) -> None:
    keys = ("layer_types", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "linear_key_head_dim", "linear_value_head_dim", "vocab_size")
    differ = {k: (getattr(loaded, k), getattr(wanted, k)) for k in keys if getattr(loaded, k) != getattr(wanted, k)}
    if differ:
        raise checks.BadValue(f"init_from={path!r} has another shape than this recipe: {differ} (saved, recipe)")


def _quick_eval(model, tokenizer, recipe: Recipe, seed: int) -> float:
    """Accuracy at the training length on data no training batch uses (its own seed)."""
    model.eval()
    rng = random.Random(10_000_019 + seed)
    with torch.no_grad():
        kwargs = ({"num_needles": recipe.extra["max_needles"], "stale": tasks.NEEDLES_STALE_DEFAULT}
                  if recipe.task == "needles" else {})
        input_ids, labels = tasks.make_batch(recipe.task, tokenizer, rng, recipe.train_length, recipe.eval_n, **kwargs)
        acc = tasks.accuracy_from_logits(model(input_ids=input_ids).logits.float(), input_ids, labels)
    model.train()
    return acc




EVAL_SEED = 777
EVAL_LENGTHS = {"recall": [2, 4, 8, 12, 16, 24, 32], "passkey": [64, 128, 256, 512, 1024, 2048],
                "needles": [64, 128, 256, 512, 1024, 2048, 4096]}  # needles: prompt tokens (haystack + 2)


def _evaluate_saved(folder: Path, recipe: Recipe, seed: int) -> dict:
    """Measure the saved (bf16) checkpoint, loaded back as users load it, for the card."""
    from .. import load
    from . import passkey, recall

    lab = load(str(folder), dtype="float32", device="cpu")
    lab.meta = {**(lab.meta or {}), "train_length": recipe.train_length}
    if recipe.task == "needles":
        return _evaluate_needles(lab, recipe)
    n = 200 if recipe.task == "recall" else 100
    table = [tasks.evaluate(lab, recipe.task, length=length, n=n, seed=EVAL_SEED, batch_size=25)
             for length in EVAL_LENGTHS[recipe.task]]
    result: dict = {"seed": EVAL_SEED, "by_length": table}
    if recipe.task == "recall":
        readout = recall.state_readout(lab, n=100, seed=EVAL_SEED, writes="both")
        result["state_readout"] = {k: readout[k] for k in ("accuracy", "chance", "layer", "head", "read", "writes", "n",
                                                           "queries")}
        result["state_readout"]["per_head"] = {f"{layer}.{head}": round(a, 4) for (layer, head), a in readout["per_head"].items()}
        result["beta_ablation"] = recall.beta_ablation(lab, readout["layer"], n=100, seed=EVAL_SEED)
    else:
        result["needle_attention"] = [passkey.needle_attention(lab, length=length, n=50, seed=EVAL_SEED)
                                      for length in (256, 1024, 2048)]
        result["attention_ablation"] = [passkey.attention_ablation(lab, length=length, n=100, seed=EVAL_SEED)
                                        for length in (256, 2048)]
        result["deltanet_ablation"] = [passkey.deltanet_ablation(lab, length=length, n=100, seed=EVAL_SEED)
                                       for length in (256, 2048)]
    return result


def _evaluate_needles(lab, recipe: Recipe) -> dict:
    """The card's numbers for a needles organism: accuracy against length with the default RoPE and with
    YaRN (factor 8, original = the training length), the causal controls, the attention at the question."""
    from .. import longctx
    from . import needles

    L = recipe.train_length
    hay = lambda tokens: tokens - 2  # noqa: E731 - a prompt is the haystack, "?" and the asked key
    result: dict = {"seed": EVAL_SEED, "n": 200}
    result["by_length"] = [needles.accuracy(lab, hay(x), n=200, seed=EVAL_SEED) for x in EVAL_LENGTHS["needles"]]
    result["controls"] = {
        "attention_ablation": [needles.attention_ablation(lab, hay(x), n=200, seed=EVAL_SEED) for x in (L, 8 * L)],
        "deltanet_ablation": [needles.deltanet_ablation(lab, hay(x), n=200, seed=EVAL_SEED) for x in (L, 8 * L)],
    }
    result["attention"] = {"default": [needles.attention_at_question(lab, hay(x), n=50, seed=EVAL_SEED)
                                       for x in (L, 8 * L)]}
    rope = longctx.yarn_for_context(8 * L, original=L)
    longctx.set_rope(lab, rope)
    result["yarn_x8"] = {"rope": rope,
                         "by_length": [needles.accuracy(lab, hay(x), n=200, seed=EVAL_SEED) for x in (L, 8 * L)]}
    result["attention"]["yarn x8"] = [needles.attention_at_question(lab, hay(x), n=50, seed=EVAL_SEED)
                                      for x in (L, 8 * L)]
    longctx.set_rope(lab, None)
    return result


def _plot_curve(path: Path, recipe: Recipe, log: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, [r["loss"] for r in log], color="tab:blue", label="loss (answers, EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["accuracy"] for r in log], color="tab:red", label="held-out accuracy")
    ax2.set_ylabel("accuracy", color="tab:red")
    ax2.set_ylim(0, 1.02)
    ax.set_title(f"{recipe.name}: training curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _example_text(task: str) -> str:
    rng = random.Random(1)
    if task == "needles":
        return tasks.needles_example(rng, 40, 4, queries=None, stale=2).text
    return tasks.recall_example(rng, 4).text if task == "recall" else tasks.passkey_example(rng, 24).text


def card(recipe: Recipe, meta: dict, log: list[dict]) -> str:
    """The organism's README.md."""
    ev = meta["evaluation"]
    lines = [f"# `{recipe.name}` — {recipe.description}", ""]
    stages = meta.get("stages") or []
    how = (f"in {len(stages)} stages (" + "; ".join(f"{st['steps']} steps at peak lr {st['lr']:g}, stopped by "
                                                   f"{st['stopped']}" for st in stages) + "; commands under Reproduce)"
           if stages else f"by `python -m qwen35_lab.organisms train {recipe.name} --seed {meta['seed']}`")
    lines += [f"Trained {how} in {meta['train_seconds']:.0f} s ({meta['steps']} steps, stopped by {meta['stopped']}) "
              f"on one CPU thread, torch {meta['torch']}. Load it with `qwen35_lab.load({recipe.name!r})`.", ""]
    lines += ["## Task and prompt format", ""]
    if recipe.task == "needles":
        lines += _needles_task_lines(recipe)
    elif recipe.task == "recall":
        lines += [
            "Multi-query associative recall. `N` distinct keys (`k0`–`k63`) are each paired with a value",
            "(`v0`–`v63`); after `?` every key is asked again, in a shuffled order, and followed by its value.",
            "Plain text, no chat template; tokens are separated by single spaces:", "",
            "```", _example_text("recall"), "```", "",
            "Loss and accuracy count the values after `?` only (teacher forced: each answer is predicted",
            f"from the logits at its query key). Training length: `N = {recipe.train_length}` pairs "
            f"(`4N + 1 = {4 * recipe.train_length + 1}` tokens); "
            f"`evaluate(lab, 'recall', length=N)` takes `N` from 1 to {tasks.RECALL_NUM_KEYS}.",
        ]
    else:
        lines += [
            "One key word (32 possible: `apple`, `river`, … `walnut`) hidden in filler sentences at a",
            "random sentence boundary, asked for at the end. Plain text, no chat template:", "",
            "```", _example_text("passkey"), "```", "",
            "The needle is `the key is W .`, the question `what is the key ?`, and the answer the one",
            f"word after it (loss on that word only). Training length: {recipe.train_length} filler tokens "
            f"(prompt = filler + 10 tokens); `evaluate(lab, 'passkey', length=L)` builds prompts of any "
            "length `L` (filler tokens), far beyond training. Chance is 1/32.",
            "",
            "A key word is a single token that never appears in the filler, so the answer is one",
            "prediction and the task isolates the long-range look-up itself (a multi-digit key adds",
            "an in-order copy of several tokens, which is much slower to learn).",
        ]
    c = recipe
    lines += ["", "## Model", "", "| | |", "|---|---|",
              "| class | `Qwen3_5ForCausalLM` (`Qwen3_5TextConfig`, model_type `qwen3_5_text`) |",
              f"| layers | {len(c.layer_types)}: {', '.join(c.layer_types)} |",
              f"| hidden / FFN | {c.hidden_size} / {c.intermediate_size} |"]
    if "full_attention" in c.layer_types:
        rot = int(c.head_dim * c.partial_rotary_factor)
        lines += [f"| gated attention | {c.num_attention_heads} query heads, {c.num_key_value_heads} KV head, head_dim "
                  f"{c.head_dim}, output gate; partial RoPE: {rot} of {c.head_dim} dims "
                  f"(partial_rotary_factor {c.partial_rotary_factor}), rope_theta {c.rope_theta:g} |"]
    lines += [f"| Gated DeltaNet | {c.linear_num_key_heads} q/k heads, {c.linear_num_value_heads} value heads, head dims "
              f"{c.linear_key_head_dim}/{c.linear_value_head_dim}, conv kernel 4 |",
              f"| vocabulary | {len(tasks.vocabulary(c.task))} words (WordLevel tokenizer, whitespace split) |",
              "| weights | bfloat16 safetensors, tied embeddings |", ""]
    lines += ["## Training", "",
              f"Seed {meta['seed']}; AdamW lr {c.lr:g} (betas 0.9/0.98, weight decay {c.weight_decay}, "
              f"{c.warmup_steps} warm-up steps, cosine over {c.max_steps} steps), batch {c.batch_size}, "
              "grad clip 1, fp32. Curriculum: each batch draws its length "
              f"uniformly in [{c.min_length}, {c.train_length}]"
              + {"passkey": f" (steps of {c.length_step} tokens; the needle at a uniformly random depth)",
                 "needles": f" haystack tokens (steps of {c.length_step}; see above)"}.get(c.task, " pairs")
              + ". Decay init of the Gated DeltaNet paper: `A ~ U(1, 16)`, `dt` log-uniform in [1e-3, 0.1], "
              "`dt_bias = softplus⁻¹(dt)` (HF's default init makes most heads forget almost every step). "
              f"Training stops when the held-out accuracy at the training length reaches {c.target_accuracy:g}"
              + (f" after step {c.min_steps}" if c.min_steps else "") + ".", "",
              "![training curve](training_curve.png)", "",
              "| step | loss (EMA) | held-out accuracy | seconds |", "|---:|---:|---:|---:|"]
    stride = max(1, len(log) // 12)
    shown = log[::stride] + ([log[-1]] if (len(log) - 1) % stride else [])
    lines += [f"| {r['step']} | {r['loss']:.3f} | {r['accuracy']:.3f} | {r['seconds']:.0f} |" for r in shown]
    lines += ["", "The full log is `train_log.jsonl`.", "", "## Evaluation", "",
              f"`qwen35_lab.organisms.evaluate(lab, {c.task!r}, length=L, n=..., seed={ev['seed']})` on the saved "
              "bf16 weights (loaded in fp32), fresh data:", ""]
    if c.task == "needles":
        return "\n".join(lines[:-4] + _needles_card_lines(c, meta) + _reproduce_lines(recipe, meta))
    unit = "pairs" if c.task == "recall" else "filler tokens"
    lines += [f"| length ({unit}) | accuracy | answers scored |", "|---:|---:|---:|"]
    lines += [f"| {r['length']}{' (training)' if r['length'] == c.train_length else ''} | {r['accuracy']:.3f} | {r['answers']} |"
              for r in ev["by_length"]]
    if c.task == "recall":
        ro, ab = ev["state_readout"], ev["beta_ablation"]
        lines += ["", "## Mechanism: the association is in the DeltaNet state", "",
                  "`qwen35_lab.organisms.recall.state_readout(lab)`: for each query key at position `t`, capture "
                  "`layers.*.deltanet.state` and read `r = S_tᵀ q_t` (`q_t` the normalised query of each value "
                  "head, from `tr.state_inputs(layer)`); the decoded pair is the one with a write vector `v_p` "
                  "nearest to `r` (cosine), taking each pair's writes at its value token `2j+1` and at the next "
                  "token `2j+2` (the conv, kernel 4, still holds both there; `writes=\"both\"`). No training, no "
                  "probe fitting.", "",
                  f"**State readout: {ro['accuracy']:.3f}** at layer {ro['layer']}, value head {ro['head']} "
                  f"({ro['queries']} queries; chance {ro['chance']:.3f}, i.e. picking one of the {c.train_length} "
                  "values of the prompt).", "",
                  "| layer.head | readout accuracy |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in ro["per_head"].items()]
        lines += ["", f"Causal check (`recall.beta_ablation`): with `β = 0` at layer {ab['layer']} "
                  f"(edit `layers.{ab['layer']}.deltanet.beta`: nothing is written to its state) recall accuracy "
                  f"falls from {ab['accuracy']:.3f} to {ab['ablated_accuracy']:.3f} (guessing one of the prompt's "
                  f"{c.train_length} values gives {ro['chance']:.3f}; the {tasks.RECALL_NUM_VALUES} values "
                  f"{1 / tasks.RECALL_NUM_VALUES:.3f})."]
    else:
        lines += ["", "## Mechanism: the key travels through the DeltaNet state", "",
                  "`qwen35_lab.organisms.passkey.needle_attention(lab, length=L)`: attention probability from the "
                  "final `?` to the key word (best head):", "",
                  "| filler tokens | attention on the key word | head |", "|---:|---:|---:|"]
        lines += [f"| {r['length']} | {r['attention']:.4f} | {r['head']} |" for r in ev["needle_attention"]]
        lines += ["", "Causal checks (`passkey.attention_ablation`, `passkey.deltanet_ablation`):", "",
                  "| filler tokens | unedited | attention output = 0 | DeltaNet β = 0 |", "|---:|---:|---:|---:|"]
        for at, dn in zip(ev["attention_ablation"], ev["deltanet_ablation"]):
            lines += [f"| {at['length']} | {at['accuracy']:.3f} | {at['ablated_accuracy']:.3f} | {dn['ablated_accuracy']:.3f} |"]
        at, dn = ev["attention_ablation"][0], ev["deltanet_ablation"][0]
        if dn["ablated_accuracy"] < 0.5 <= at["ablated_accuracy"]:
            lines += ["", "The Gated DeltaNet layer does the retrieval on its own: with its writes stopped the answer "
                      f"is near chance ({dn['ablated_accuracy']:.2f}; chance 1/32), with the attention layer "
                      "silenced nothing changes. A key word is the "
                      "only one of its kind in the prompt, so writing it into a head that barely decays and "
                      "reading it back at `?` solves the task with no notion of position — which is why accuracy "
                      "holds at 8× the training length. The attention head still looks at the needle, less and "
                      "less as the prompt grows past the training length; RoPE / YaRN changes act on that head "
                      "(rope_theta " f"{c.rope_theta:g}, {int(c.head_dim * c.partial_rotary_factor)} rotary dims) "
                      "and show in its attention, not in the answer (an attention-only variant of this recipe "
                      "stayed at chance for its first 125 steps, so the short budget went to the hybrid)."]
        elif at["ablated_accuracy"] < 0.5:
            lines += ["", "The attention layer does the retrieval: without it the answer is lost."]
        else:
            lines += ["", "Either layer alone carries the key: the organism has two routes to the answer."]
    return "\n".join(lines + _reproduce_lines(recipe, meta))


def _reproduce_lines(recipe: Recipe, meta: dict) -> list[str]:
    first = meta["stages"][0]["steps"] if meta.get("stages") else None
    more = [f"python -m qwen35_lab.organisms train {recipe.name} --seed {meta['seed']} --init-from "
            f"data/organisms/{recipe.name} --max-steps {st['steps']} --lr {st['lr']:g}"
            for st in meta.get("stages", [])[1:]]
    return ["", "## Reproduce", "", "```",
            f"python -m qwen35_lab.organisms train {recipe.name} --seed {meta['seed']}"
            + (f"   # stage 1: {first} steps" if more else ""), *more,
            f"python -m qwen35_lab.organisms evaluate {recipe.name} --length {recipe.train_length}", "```", "",
            "Data come from `random.Random(seed)` in this process and initialisation from `torch.manual_seed(seed)`; "
            "deterministic algorithms are on, so a run repeats on one machine (other CPUs or torch versions may "
            "differ in the last bits and so in the exact step count).", ""]


def _needles_task_lines(recipe: Recipe) -> list[str]:
    ex = recipe.extra
    return [
        "Many key → value needles in a haystack of filler sentences, one of them asked at the end. A needle is",
        f"one word `k12:v7` (key 12 holds value 7); keys are `k0`–`k{tasks.NEEDLES_NUM_KEYS - 1}`, values "
        f"`v0`–`v{tasks.NEEDLES_NUM_VALUES - 1}`. Some keys were",
        "assigned twice: a *stale* needle with another value sits somewhere before the current one, and the",
        "answer is always the **later** value. After `?` the keys are asked, each followed by its value. Plain",
        "text, no chat template (two keys below are each assigned twice):", "",
        "```", _example_text("needles"), "```", "",
        f"`length` counts the haystack tokens (filler + 1 per needle). Training: haystacks of {recipe.min_length}–"
        f"{recipe.train_length} tokens (the upper limit grows linearly to {recipe.train_length} over the first "
        f"{ex.get('ramp_steps', 0)} steps), {ex['min_needles']}–{ex['max_needles']} distinct keys (at most one per 4 "
        "tokens), up to half of them with a stale copy, every key asked (loss on the values after `?` only). "
        "Evaluation: 16 needles, the asked one with a stale copy before it, **one** query, the prompt ends at "
        f"`? kX` and the answer is the next token (chance 1/{tasks.NEEDLES_NUM_VALUES}; answering the stale value "
        "is counted as `stale_rate`). `evaluate(lab, 'needles', length=L)` and "
        "`qwen35_lab.organisms.needles.accuracy(lab, L, depth=...)` build prompts of any length.",
        "",
        "Why this task: the final `kX` finds the needle `kX:v…` by content and reads its value — an attention",
        "look-up — while the Gated DeltaNet heads, with 8-dim keys, cannot hold 16 associations in their",
        "state. Two needles of `kX` match equally by content; only their positions — the rotary part of the",
        "attention's query and key — say which is the later one. So the look-up depends on the attention layer",
        "and on its RoPE, unlike `passkey`, whose single key is carried by the position-free DeltaNet state.",
        "",
        "Initialisation (`train.init_needles`): each needle word's embedding starts as the sum of its key's and",
        "its value's (divided by √2), and the Gated DeltaNet output projections start at zero. From the default",
        "initialisation the loss stayed at chance for 600+ steps in probes on 64-token haystacks (the 512",
        "needle words must each find out that they share a key with the question's word, through random",
        "DeltaNet outputs); with it the look-up forms within a few hundred steps.",
    ]


def _fmt_ci(r: dict, key: str = "accuracy", ci: str = "ci95") -> str:
    lo, hi = r[ci]
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _needles_card_lines(c: Recipe, meta: dict) -> list[str]:
    ev = meta["evaluation"]
    L = c.train_length
    lines = ["## Evaluation", "",
             f"`qwen35_lab.organisms.needles.accuracy(lab, L, n=200, seed={ev['seed']})` on the saved bf16 weights "
             "(loaded in fp32), fresh data, 16 needles, the asked one with a stale copy, one query; accuracy with "
             "its 95% Wilson interval, and the share answered with the stale value:", "",
             "| prompt tokens | × training | default RoPE | stale | YaRN ×8 (original " + f"{L}) | stale |",
             "|---:|---:|---:|---:|---:|---:|"]
    yarn = {r["tokens"]: r for r in ev["yarn_x8"]["by_length"]}
    stale = lambda r: f"{r['stale_rate']:.3f}" if r and "stale_rate" in r else ""  # noqa: E731
    for r in ev["by_length"]:
        y = yarn.get(r["tokens"])
        lines.append(f"| {r['tokens']} | {r['tokens'] / (L + 2):.2g} | {_fmt_ci(r)} | {stale(r)} | "
                     f"{_fmt_ci(y) if y else ''} | {stale(y)} |")
    ctl = ev["controls"]
    lines += ["", "## The look-up goes through the attention layer (causal controls)", "",
              "`needles.attention_ablation` zeroes the attention layer's output (`layers.3.attn.out`); "
              "`needles.deltanet_ablation` sets `β = 0` in every Gated DeltaNet layer (nothing is written to "
              "their states). Same prompts, n = 200, default RoPE:", "",
              "| prompt tokens | unedited | attention output = 0 | DeltaNet β = 0 |", "|---:|---:|---:|---:|"]
    for at, dn in zip(ctl["attention_ablation"], ctl["deltanet_ablation"]):
        lines.append(f"| {at['length'] + 2} | {_fmt_ci(at)} | {_fmt_ci(at, 'ablated_accuracy', 'ablated_ci95')} | "
                     f"{_fmt_ci(dn, 'ablated_accuracy', 'ablated_ci95')} |")
    at, dn = ctl["attention_ablation"][0], ctl["deltanet_ablation"][0]
    lost = lambda r: r["ablated_ci95"][1] < 2.5 * r["chance"]  # noqa: E731 - the ablated accuracy is near chance
    verdict = ("The organism does not solve the task at the training length, so the controls say nothing."
               if at["accuracy"] < 0.5 else
               f"Without the attention output the answer is lost (near chance, 1/{tasks.NEEDLES_NUM_VALUES}): the "
               "look-up goes through the attention layer." if lost(at) else
               "Silencing the attention layer does not remove the answer: part of the look-up runs elsewhere.")
    verdict += "" if at["accuracy"] < 0.5 else (
        " Without DeltaNet writes it is lost too: the attention layer reads something those layers compute."
        if lost(dn) else
        f" With no DeltaNet writes the accuracy falls to {dn['ablated_accuracy']:.2f} (unedited "
        f"{dn['accuracy']:.2f}): the DeltaNet layers help, but the answer is read through the attention layer.")
    lines += ["", verdict, "",
              "## What the attention layer does at the question", "",
              "`needles.attention_at_question(lab, L, n=50)`: at the final `kX`, the attention probability on "
              "the asked needle (best head) and on its stale copy, and that head's entropy and "
              "mean distance (`layers.3.attn.summary`):", "",
              "| RoPE | prompt tokens | mass on the needle | on the stale copy | entropy (nats; uniform) | "
              "mean distance | head |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, rows in ev["attention"].items():
        for r in rows:
            lines.append(f"| {name} | {r['tokens']} | {r['needle_mass']:.3f} | {r.get('stale_mass', float('nan')):.3f} "
                         f"| {r['entropy']:.2f} ({r['uniform_entropy']:.2f}) | {r['mean_distance']:.0f} | {r['head']} |")
    lines += ["", "The full experiment (¼× to 16× the training length, YaRN at several factors, linear "
              "interpolation and dynamic NTK, the short-input penalty, the probes against length, heatmaps) is `benchmarks/long_context_experiments.py`, "
              "its results `benchmarks/results/long_context_experiments.json`, and notebook 06 reads them."]
    return lines


def rewrite_card(folder: str | Path) -> Path:
    """Re-render ``README.md`` and ``training_curve.png`` of a trained organism from its saved meta and log."""
    folder = Path(folder)
    meta = json.loads((folder / "qwen35_lab.json").read_text())
    recipe = Recipe(**{**meta["recipe"], "layer_types": tuple(meta["recipe"]["layer_types"])})
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    _plot_curve(folder / "training_curve.png", recipe, log)
    (folder / "README.md").write_text(card(recipe, meta, log))
    return folder


def refresh_evaluation(folder: str | Path) -> Path:
    """Recompute the card's evaluation from the saved weights and re-render the card (no training)."""
    folder = Path(folder)
    meta = json.loads((folder / "qwen35_lab.json").read_text())
    recipe = Recipe(**{**meta["recipe"], "layer_types": tuple(meta["recipe"]["layer_types"])})
    meta["evaluation"] = _evaluate_saved(folder, recipe, meta["seed"])
    (folder / "qwen35_lab.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return rewrite_card(folder)
