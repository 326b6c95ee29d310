"""Long-context experiments: RoPE failing past the training length, and YaRN bringing it back.

On the ``needles`` organism (16 key → value needles in a haystack; the
look-up goes through its one gated-attention layer, trained on haystacks of
up to ``L = 256`` tokens) this measures, with fresh prompts and 95% Wilson
intervals:

1. accuracy against prompt length from ¼× to 16× ``L``, n = 200 per point, with
   the default RoPE, static YaRN at factors 4, 8 and 16 (``original`` = ``L``),
   linear interpolation ×8 and dynamic NTK ×8 — the static-YaRN penalty on
   short inputs is the left part of the same curves (plus the answer's loss);
2. what the attention layer does at the question, against length, for the
   default RoPE and YaRN: mass on the asked needle, entropy, mean distance;
3. the causal controls at 1× and 8×: the attention output zeroed, and β = 0 in
   every Gated DeltaNet layer;
4. the needle-in-a-haystack heatmap (depth × length), default RoPE beside YaRN ×8;
5. on ``passkey`` (one key word, carried by the DeltaNet state): accuracy at
   1× and 8× with and without YaRN, and with β = 0 — the position-free path.

    python benchmarks/long_context_needles.py           # ~30 min on 2 busy cores (needs the trained organism)
    python benchmarks/long_context_needles.py --quick --organism DIR   # a smoke run (n = 8)

Writes ``benchmarks/results/long_context_needles.json``. The needles organism is not shipped yet: train it
first (``qwen35_lab.organisms.train.train("needles")``, about an hour on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

# This folder holds a script named kernels.py; transformers probes for HF's `kernels` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import qwen35_lab as ql  # noqa: E402
from qwen35_lab import longctx as lc  # noqa: E402
from qwen35_lab._io import atomic_file  # noqa: E402
from qwen35_lab.longctx.rope import text_config_of  # noqa: E402
from qwen35_lab.organisms import needles, tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_context_needles.json"
SEED = 4242
MULTIPLES = [0.25, 0.5, 1, 2, 4, 8, 16]


def ropes_for(L: int) -> dict[str, dict | None]:
    """The RoPE settings compared (``original`` = the training length ``L``)."""
    return {
        "default": None,
        "yarn x4": lc.yarn_for_context(4 * L, original=L),
        "yarn x8": lc.yarn_for_context(8 * L, original=L),
        "yarn x16": lc.yarn_for_context(16 * L, original=L),
        "linear x8": {"rope_type": "linear", "factor": 8.0},
        "dynamic x8": {"rope_type": "dynamic", "factor": 8.0},
    }


def apply(lab, name: str, rope, L: int, native: int) -> None:
    """Set ``rope``; dynamic NTK scales past ``max_position_embeddings``, so that is set to ``L`` for it."""
    text_config_of(lab.model).max_position_embeddings = L if name.startswith("dynamic") else native
    lc.set_rope(lab, rope)


def run_needles(lab, quick: bool) -> dict:
    L = int(lab.meta["train_length"])
    native = int(text_config_of(lab.model).max_position_embeddings)
    ropes = ropes_for(L)
    n = 8 if quick else 200
    multiples = [0.25, 1, 8] if quick else MULTIPLES
    # the longest length each setting is run at (the costly part of the grid)
    top = {"default": 16, "yarn x4": 8, "yarn x8": 16, "yarn x16": 16, "linear x8": 8, "dynamic x8": 8}
    out: dict = {"organism": lab.name, "train_length": L, "n": n, "seed": SEED, "ropes": ropes,
                 "what": "prompt tokens = multiple × training length; haystack = prompt - 2 (the '?' and the key)",
                 "accuracy": {}, "attention": {}, "controls": {}, "verify_rope": {}}
    t0 = time.perf_counter()
    for name, rope in ropes.items():
        apply(lab, name, rope, L, native)
        check = lc.verify_rope(lab, positions=[0, L - 1, 16 * L - 1])
        out["verify_rope"][name] = {"ok": check.ok, "differences": check.differences}
        rows = []
        for m in multiples:
            if m > top[name]:
                continue
            tokens = int(m * L)
            r = needles.accuracy(lab, tokens - 2, n=n, seed=SEED)
            r["multiple"] = m
            rows.append(r)
            print(f"[needles] {name:>10} {tokens:>5} tokens ({m:g}×): {r['accuracy']:.3f} "
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  nll {r['answer_nll']:.3f}", flush=True)
        out["accuracy"][name] = rows
        if name in ("default", "yarn x8", "yarn x16"):
            att = [needles.attention_at_question(lab, int(m * L) - 2, n=8 if quick else 50, seed=SEED + 1)
                   for m in ([1, 8] if quick else [1, 2, 4, 8, 16]) if m * L <= lc.max_context(lab)]
            out["attention"][name] = att
            print(f"    attention: " + ", ".join(f"{a['tokens']}: mass {a['needle_mass']:.3f} H {a['entropy']:.2f}"
                                                 for a in att), flush=True)
    apply(lab, "default", None, L, native)
    for m in [1, 8]:
        tokens = int(m * L)
        for name in (("default",) if m == 1 else ("default", "yarn x8")):
            apply(lab, name, ropes[name], L, native)
            out["controls"].setdefault(name, []).append({
                "tokens": tokens,
                "attention_ablation": needles.attention_ablation(lab, tokens - 2, n=n, seed=SEED + 2),
                "deltanet_ablation": needles.deltanet_ablation(lab, tokens - 2, n=n, seed=SEED + 2)})
        print(f"[needles] controls at {tokens}: " + json.dumps(
            {k: [round(v[-1]["attention_ablation"]["ablated_accuracy"], 3),
                 round(v[-1]["deltanet_ablation"]["ablated_accuracy"], 3)] for k, v in out["controls"].items()}),
            flush=True)
    apply(lab, "default", None, L, native)
    hm_lengths = [L // 2, L, 2 * L, 4 * L, 8 * L] if not quick else [L, 4 * L]
    hm = lc.needle_heatmap(lab, [x - 2 for x in hm_lengths], [0.0, 0.25, 0.5, 0.75, 1.0],
                           ropes={"default": None, "yarn x8": ropes["yarn x8"]}, n=8 if quick else 40,
                           seed=SEED + 3, budget_seconds=7200)
    out["heatmap"] = hm.as_dict()
    out["heatmap"]["prompt_tokens"] = hm_lengths
    apply(lab, "default", None, L, native)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run_passkey(lab, quick: bool) -> dict:
    """The position-free control: one key word, carried by the DeltaNet state, at 1× and 8×."""
    L = int(lab.meta.get("train_length", 256))
    n = 8 if quick else 200
    beta0 = {f"layers.{i}.deltanet.beta": 0.0 for i, k in enumerate(lab.layer_types) if k == "linear_attention"}
    out: dict = {"organism": lab.name, "train_length": L, "n": n, "rows": []}
    for name, rope in (("default", None), ("yarn x8", lc.yarn_for_context(8 * L, original=L))):
        lc.set_rope(lab, rope)
        for m in (1, 8):
            rng = random.Random(SEED + m)
            examples = [tasks.passkey_example(rng, m * L - 10) for _ in range(n)]
            vocab = lab.tokenizer.get_vocab()
            ids = torch.tensor([[vocab[w] for w in ex.words[:-1]] for ex in examples])
            answers = torch.tensor([vocab[ex.answers[0]] for ex in examples])
            row = {"rope": name, "tokens": int(ids.shape[1]), "multiple": m}
            for key, edits in (("accuracy", None), ("accuracy_beta0", beta0)):
                hits = 0
                for b0 in range(0, n, 50):
                    logits = lab.run(ids[b0:b0 + 50], edits=edits).meta["last_logits"]
                    hits += int((logits.argmax(-1) == answers[b0:b0 + 50]).sum())
                row[key], row[key + "_ci95"] = hits / n, list(tasks.wilson_interval(hits, n))
            out["rows"].append(row)
            print(f"[passkey] {name:>8} {row['tokens']:>5} tokens: {row['accuracy']:.3f}, β = 0: "
                  f"{row['accuracy_beta0']:.3f}", flush=True)
    lc.set_rope(lab, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run with n = 8")
    parser.add_argument("--organism", default="needles")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"what": "RoPE past the training length and its repairs, on the needles organism; passkey as "
                            "the position-free control", "torch": torch.__version__, "quick": args.quick,
                    "machine": platform.machine(), "threads": args.threads}
    t0 = time.perf_counter()
    result["needles"] = run_needles(ql.load(args.organism, dtype="float32", device="cpu"), args.quick)
    result["passkey"] = run_passkey(ql.load("passkey", dtype="float32", device="cpu"), args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    with atomic_file(out, "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
