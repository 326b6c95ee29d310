"""Long-context experiments on the trained organisms: default RoPE against static YaRN.

On the ``needles`` organism (16 key → value needles, the asked key assigned
twice so that only word order — RoPE — tells which value is current; trained
on 256-token haystacks), whose look-up goes through its gated-attention layer:

1. accuracy from ¼× to 16× the training length (n = 200 fresh prompts per
   point, 95% Wilson intervals) with the default RoPE, YaRN ×2/×4/×8/×16
   (``original`` = the training length), linear position interpolation
   ×8 and ×16 and dynamic NTK ×8 (transformers scales it past the config's
   ``max_position_embeddings``, which is set to the training length for it),
   plus the rate of answering with the stale value; ``verify_rope`` checks
   each setting is what the rotary module really applies;
2. the static-YaRN penalty on short inputs: accuracy and the change of the
   answer distribution (KL against the default RoPE) at ¼×–1× the training
   length;
3. attention probes at the question: the best head's mass on the asked
   needle and on its stale copy, entropy and mean distance, against length,
   with each RoPE setting;
4. the causal controls (attention output zeroed, β = 0) at 1× and 8×;
5. needle-in-a-haystack grids (depth × length), default RoPE beside YaRN ×8.

On the ``passkey`` organism (one key word hidden in filler, trained on 256
filler tokens; ``recall`` or ``tiny`` stand in when it is missing) this
measures, for the default RoPE and YaRN at several factors with
``original_max_position_embeddings`` = the training length:

1. passkey accuracy against prompt length, from below the training length to
   16× it (``qwen35_lab.organisms.evaluate``);
2. the same with nothing written to the Gated DeltaNet state (β = 0), so that
   only the attention layer can retrieve the key;
3. what the attention layer does at the question mark: the probability it puts
   on the key word (best head), and its entropy, sink mass and mean distance
   (``layers.i.attn.summary``), against length;
4. the answer's loss against the needle's position in a prompt of 8× the
   training length, for the whole model and for attention alone;
5. what static YaRN costs on short inputs: the change of the answer's
   distribution (KL, top-1 agreement, largest logit change) against the
   default RoPE, for the whole model and for attention alone.

Also ``recall`` (multi-query associative recall, lengths in key-value pairs)
accuracy against length with and without YaRN, when that organism exists.

    python benchmarks/long_context_experiments.py           # ~25 min on 2 cores
    python benchmarks/long_context_experiments.py --only needles   # keep the other entries of the JSON
    python benchmarks/long_context_experiments.py --quick   # a smoke run

Writes ``benchmarks/results/long_context_experiments.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

# This folder holds a script named kernels.py; transformers probes for HF's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import qwen35_lab as ql  # noqa: E402
from qwen35_lab import longctx as lc  # noqa: E402
from qwen35_lab import organisms  # noqa: E402
from qwen35_lab.longctx.rope import text_config_of  # noqa: E402
from qwen35_lab.organisms import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_context_experiments.json"
SEED = 4242


def _ropes(train_length: int, factors) -> dict[str, dict | None]:
    """``{"default": None, "yarn x2": {...}, ...}`` with original = the training length."""
    out: dict[str, dict | None] = {"default": None}
    for f in factors:
        out[f"yarn x{f}"] = lc.yarn_for_context(train_length * f, original=train_length)
    return out


def _attention_layer(lab) -> int:
    return [i for i, k in enumerate(lab.layer_types) if k == "full_attention"][-1]


def passkey_prompts(lab, length: int, n: int, seed: int, depth: float | None = None):
    """``n`` passkey prompts of ``length`` filler tokens (needle at ``depth``, random if None):
    ids [n, T], answer ids [n], key positions [n]."""
    rng = random.Random(seed)
    examples = [tasks.passkey_example(rng, length, depth=depth) for _ in range(n)]
    vocab = lab.tokenizer.get_vocab()
    ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])
    answers = torch.tensor([vocab[ex.answers[0]] for ex in examples])
    key_pos = torch.tensor([ex.words.index("key") + 2 for ex in examples])  # "the key is W": W is 2 after "key"
    return ids, answers, key_pos


def attention_at_question(lab, length: int, n: int, seed: int) -> dict:
    """At the final ``?``: needle attention (best head), entropy, sink mass, mean distance; and accuracy."""
    layer = _attention_layer(lab)
    ids, answers, key_pos = passkey_prompts(lab, length, n, seed)
    T = ids.shape[1]
    tr = lab.run(ids, capture=[f"layers.{layer}.attn.probs", f"layers.{layer}.attn.summary"], positions=[T - 1])
    probs = tr[f"layers.{layer}.attn.probs"][:, :, -1].float()  # [n, Hq, Tk]
    on_key = probs[torch.arange(n), :, key_pos].mean(0)  # [Hq]
    summary = {k: v[:, :, -1].float().mean(0) for k, v in tr[f"layers.{layer}.attn.summary"].items()}  # [Hq]
    head = int(on_key.argmax())
    pred = tr.meta["last_logits"].argmax(-1)
    return {"length": length, "tokens": T, "n": n, "layer": layer, "head": head,
            "needle_attention": float(on_key[head]), "needle_attention_per_head": on_key.tolist(),
            **{k: float(v.mean()) for k, v in summary.items()},
            "per_head": {k: v.tolist() for k, v in summary.items()},
            "accuracy_at_question": float((pred == answers).float().mean())}


def attention_only_accuracy(lab, length: int, n: int, seed: int) -> dict:
    """Accuracy with nothing written to the DeltaNet state (β = 0): what the attention layer alone retrieves."""
    ids, answers, _ = passkey_prompts(lab, length, n, seed)
    tr = lab.run(ids, edits=_beta_zero(lab))
    pred = tr.meta["last_logits"].argmax(-1)
    return {"length": length, "tokens": ids.shape[1], "n": n, "accuracy": float((pred == answers).float().mean())}


def _beta_zero(lab) -> dict:
    """Edits that write nothing to any Gated DeltaNet state (β = 0): only attention can carry the key."""
    return {f"layers.{i}.deltanet.beta": 0.0 for i, k in enumerate(lab.layer_types) if k == "linear_attention"}


def loss_by_needle_position(lab, length: int, depths, n: int, seed: int) -> dict:
    """The answer's loss (-log p(key), nats) against where the needle sits in a prompt of ``length``
    filler tokens, for the whole model and with β = 0 (attention alone)."""
    rows = []
    for d in depths:
        ids, answers, key_pos = passkey_prompts(lab, length, n, seed, depth=d)
        row = {"depth": d, "tokens": ids.shape[1], "distance": float((ids.shape[1] - 1 - key_pos).float().mean())}
        for key, edits in (("loss", None), ("loss_attention_only", _beta_zero(lab))):
            logits = lab.run(ids, edits=edits).meta["last_logits"].double()
            row[key] = float(-logits.log_softmax(-1).gather(-1, answers[:, None]).mean())
        rows.append(row)
    return {"length": length, "n": n, "rows": rows}


def short_input_change(lab, rope: dict, length: int, n: int, seed: int) -> dict:
    """How static YaRN changes the answer distribution on short prompts: KL(default ‖ YaRN), top-1 agreement."""
    ids, answers, _ = passkey_prompts(lab, length, n, seed)
    out = {"length": length, "tokens": ids.shape[1], "n": n}
    for suffix, edits in (("", None), ("_attention_only", _beta_zero(lab))):
        lc.set_rope(lab, None)
        base = lab.run(ids, edits=edits).meta["last_logits"].double()
        lc.set_rope(lab, rope)
        new = lab.run(ids, edits=edits).meta["last_logits"].double()
        lc.set_rope(lab, None)
        lp, lq = base.log_softmax(-1), new.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
        out.update({f"kl_default_to_yarn{suffix}": float(kl.mean()),
                    f"max_abs_logit_change{suffix}": float((new - base).abs().max()),
                    f"top1_agreement{suffix}": float((new.argmax(-1) == base.argmax(-1)).float().mean()),
                    f"accuracy_default{suffix}": float((base.argmax(-1) == answers).float().mean()),
                    f"accuracy_yarn{suffix}": float((new.argmax(-1) == answers).float().mean())})
    return out


def run_passkey(lab, quick: bool) -> dict:
    L = int(lab.meta.get("train_length", 256))
    factors = [2, 4, 8] if not quick else [4]
    ropes = _ropes(L, factors)
    lengths = [L // 4, L // 2, L, 2 * L, 4 * L, 8 * L] if not quick else [L // 2, L, 4 * L]
    long_lengths = [16 * L] if not quick else []
    n_for = (lambda T: 48 if T <= 2 * L else 24 if T <= 8 * L else 12) if not quick else (lambda T: 8)
    out: dict = {"organism": lab.name, "train_length": L, "ropes": ropes, "accuracy": {}, "attention": {},
                 "loss_by_needle_position": {}, "short_inputs": {}}
    t0 = time.perf_counter()
    for name, rope in ropes.items():
        lc.set_rope(lab, rope)
        print(f"[passkey] {name}: {lc.rope_info(lab).max_context:,} max context", flush=True)
        rows = []
        for length in lengths + (long_lengths if name in ("default", f"yarn x{max(factors)}") else []):
            r = organisms.evaluate(lab, "passkey", length=length, n=n_for(length), seed=SEED, batch_size=12)
            rows.append({"length": length, "tokens": length + 10, "accuracy": r["accuracy"], "n": r["n"]})
            print(f"    accuracy @ {length:>5}: {r['accuracy']:.3f} (n={r['n']})", flush=True)
        out["accuracy"][name] = rows
        out.setdefault("attention_only_accuracy", {})[name] = [
            attention_only_accuracy(lab, length, 2 * n_for(length), SEED + 3) for length in lengths]
        print("    attention only (β = 0): " + ", ".join(
            f"{r['length']}:{r['accuracy']:.2f}" for r in out["attention_only_accuracy"][name]), flush=True)
        att_lengths = [L, 4 * L, 8 * L] if not quick else [L, 4 * L]
        out["attention"][name] = [attention_at_question(lab, length, 12 if not quick else 4, SEED + 1)
                                  for length in att_lengths]
        if name in ("default", f"yarn x{max(factors)}"):
            out["loss_by_needle_position"][name] = loss_by_needle_position(
                lab, 8 * L if not quick else 2 * L, [0.0, 0.25, 0.5, 0.75, 1.0], 16 if not quick else 4, SEED + 4)
    lc.set_rope(lab, None)
    for name, rope in ropes.items():
        if rope is not None:
            out["short_inputs"][name] = [short_input_change(lab, rope, length, 48 if not quick else 8, SEED + 2)
                                         for length in ([L // 8, L // 4, L // 2, L] if not quick else [L // 2])]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_recall(lab, quick: bool) -> dict:
    """Recall accuracy against the number of pairs; YaRN's original = the training prompt in tokens."""
    pairs = int(lab.meta.get("train_length", 8))
    tokens = 4 * pairs + 1
    ropes = _ropes(tokens, [2, 4, 8] if not quick else [4])
    lengths = [p for p in (pairs // 2, pairs, 2 * pairs, 4 * pairs, 8 * pairs) if 1 <= p <= tasks.RECALL_NUM_KEYS]
    out: dict = {"organism": lab.name, "train_length_pairs": pairs, "train_tokens": tokens, "ropes": ropes,
                 "accuracy": {}}
    t0 = time.perf_counter()
    for name, rope in ropes.items():
        lc.set_rope(lab, rope)
        rows = []
        for p in lengths:
            r = organisms.evaluate(lab, "recall", length=p, n=48 if not quick else 8, seed=SEED, batch_size=48)
            rows.append({"length": p, "tokens": 4 * p + 1, "accuracy": r["accuracy"], "n": r["n"],
                         "answers": r["answers"]})
        out["accuracy"][name] = rows
        print(f"[recall] {name}: " + ", ".join(f"{r['length']}:{r['accuracy']:.2f}" for r in rows), flush=True)
    lc.set_rope(lab, None)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_needles(lab, quick: bool) -> dict:
    """The experiment of the module docstring on a ``needles`` organism (lengths in haystack tokens)."""
    from qwen35_lab.organisms import needles

    L = int(lab.meta.get("train_length", 256))
    factors = [2, 4, 8, 16] if not quick else [8]
    ropes = _ropes(L, factors)
    for f in ([8, 16] if not quick else [8]):
        ropes[f"linear x{f}"] = {"rope_type": "linear", "factor": float(f)}
    ropes["dynamic x8"] = {"rope_type": "dynamic", "factor": 8.0}
    lengths = [L // 4, L // 2, L, 2 * L, 4 * L, 8 * L, 16 * L] if not quick else [L // 2, L, 4 * L]
    n = 200 if not quick else 16
    out: dict = {"organism": lab.name, "train_length": L, "n": n, "ropes": ropes, "accuracy": {}, "attention": {},
                 "short_inputs": {}, "controls": {}, "heatmap": None,
                 "lengths_note": "length = haystack tokens; a prompt adds '?' and the asked key"}
    t0 = time.perf_counter()
    att_lengths = [L // 2, L, 2 * L, 4 * L, 8 * L, 16 * L] if not quick else [L, 4 * L]
    text = text_config_of(lab.model)
    native = text.max_position_embeddings

    def use(name: str, rope) -> None:
        # dynamic NTK rescales past max_position_embeddings (not original_max_position_embeddings)
        text.max_position_embeddings = L if name.startswith("dynamic") else native
        lc.set_rope(lab, rope)

    out["verify_rope"] = {}
    for name, rope in ropes.items():
        use(name, rope)
        check = lc.verify_rope(lab, positions=[0, L - 1, 16 * L + 1])
        out["verify_rope"][name] = {"ok": check["ok"], "differences": check["differences"]}
        rows = []
        for length in lengths:
            r = needles.accuracy(lab, length, n=n, seed=SEED, batch_size=25)
            rows.append({k: r[k] for k in ("length", "tokens", "accuracy", "correct", "n", "ci95", "stale_rate",
                                           "answer_nll")})
        out["accuracy"][name] = rows
        print(f"[needles] {name:>10}: " + "  ".join(f"{r['length']}:{r['accuracy']:.2f}" for r in rows), flush=True)
        # the Lab refuses a probe past the context the active RoPE allows (accuracy above reads the logits)
        limit = lc.max_context(lab)
        out["attention"][name] = [needles.attention_at_question(lab, length, n=50 if not quick else 4, seed=SEED + 1)
                                  for length in att_lengths if length + 2 <= limit]
        print("    needle / stale mass: " + "  ".join(
            f"{a['length']}:{a['needle_mass']:.2f}/{a['stale_mass']:.2f}" for a in out["attention"][name]), flush=True)
    use("default", None)
    for name, rope in ropes.items():
        if rope is not None and name.startswith("yarn"):
            out["short_inputs"][name] = [_needles_short_input(lab, rope, length, n, SEED + 2)
                                         for length in ([L // 4, L // 2, L] if not quick else [L // 2])]
    lc.set_rope(lab, None)
    for at in ([L, 8 * L] if not quick else [L]):
        out["controls"].setdefault("attention_ablation", []).append(
            needles.attention_ablation(lab, at, n=n, seed=SEED + 5))
        out["controls"].setdefault("deltanet_ablation", []).append(
            needles.deltanet_ablation(lab, at, n=n, seed=SEED + 5))
    heat = lc.needle_heatmap(lab, [L // 2, L, 2 * L, 4 * L, 8 * L] if not quick else [L, 2 * L],
                             [0.0, 0.25, 0.5, 0.75, 1.0] if not quick else [0.0, 1.0],
                             ropes={"default": None, "yarn x8": ropes["yarn x8"]},
                             n=40 if not quick else 4, seed=SEED + 6, budget_seconds=3600)
    out["heatmap"] = heat.as_dict()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _needles_short_input(lab, rope: dict, length: int, n: int, seed: int) -> dict:
    """What static YaRN costs on a short needles prompt: accuracy beside the default RoPE's (same prompts),
    KL(default ‖ YaRN) of the answer distribution and top-1 agreement."""
    from qwen35_lab.organisms import needles

    p = needles.prompts(lab, length, n, seed)
    logits = {}
    for name, r in (("default", None), ("yarn", rope)):
        lc.set_rope(lab, r)
        logits[name] = needles._logits_last(lab, p.ids, None, 25).double()  # the helper accuracy() scores with
    lc.set_rope(lab, rope)
    lp, lq = logits["default"].log_softmax(-1), logits["yarn"].log_softmax(-1)
    out = {"length": length, "tokens": int(p.ids.shape[1]), "n": n,
           "kl_default_to_yarn": float((lp.exp() * (lp - lq)).sum(-1).clamp_min(0).mean()),
           "top1_agreement": float((lp.argmax(-1) == lq.argmax(-1)).float().mean())}
    for name, lg in logits.items():
        correct = int((lg.argmax(-1) == p.answers).sum())
        out[f"accuracy_{name}"] = correct / n
        out[f"ci95_{name}"] = list(tasks.wilson_interval(correct, n))
        out[f"stale_rate_{name}"] = float((lg.argmax(-1) == p.stale_answers).float().mean())
    return out


def run_tiny(lab, quick: bool) -> dict:
    """Without a trained organism: the logit change static YaRN makes on random-weight `tiny`."""
    L = 256
    rope = lc.yarn_for_context(4 * L, original=L)
    ids = lc.long_document(lab, L, seed=SEED).input_ids
    base = lab.run(ids, capture=f"layers.{_attention_layer(lab)}.attn.summary")
    lc.set_rope(lab, rope)
    new = lab.run(ids, capture=f"layers.{_attention_layer(lab)}.attn.summary")
    lc.set_rope(lab, None)
    lp, lq = base.meta["last_logits"].log_softmax(-1), new.meta["last_logits"].log_softmax(-1)
    return {"organism": lab.name, "kl_default_to_yarn": float((lp.exp() * (lp - lq)).sum(-1).mean()),
            "note": "random weights: only the plumbing and the size of the change mean something"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny n")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", choices=["needles", "passkey", "recall"], action="append",
                        help="run only these organisms and keep the other entries of an existing --out file")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2; 1 beside a training run)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    have = organisms.available()
    result: dict = {"what": "default RoPE against static YaRN (original = training length) on the organisms",
                    "torch": torch.__version__, "organisms": have, "quick": args.quick, "seed": SEED}
    out = Path(args.out)
    wanted = set(args.only or ("needles", "passkey", "recall"))
    if args.only and out.is_file():
        kept = json.loads(out.read_text())
        result.update({k: v for k, v in kept.items() if k in ("needles", "passkey", "recall") and k not in wanted})
    t0 = time.perf_counter()
    runs = {"needles": run_needles, "passkey": run_passkey, "recall": run_recall}
    for name, run in runs.items():
        if name in have and name in wanted:
            result[name] = run(ql.load(name, dtype="float32", device="cpu"), args.quick)
    if not any(name in have for name in runs):
        result["tiny"] = run_tiny(ql.load("tiny", dtype="float32", device="cpu"), args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
