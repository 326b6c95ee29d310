"""The DeltaNet state as an editable memory, on the `recall` organisms: transplant, erase, overwrite, attribution.

For each organism (``recall-linear``: 2 DeltaNet layers; ``recall``: 3 DeltaNet + 1 gated attention),
on ``--n`` fresh prompts of 8 pairs (``k v k v … ? k v …``), edits of layer 0's state at the ``?``
position with :func:`~qwen35_lab.instrument.write_memory` / :func:`~qwen35_lab.instrument.erase_memory`:

- **transplant**: a pair ``kX vY`` absent from the prompt is taken from a donor prompt (its keys and
  values as the model wrote them there) and written at ``?``; the sequence then asks ``kX`` first
  (``… ? kX vY`` followed by the prompt's own queries). Success: the answer at ``kX`` is ``vY``.
- **erase**: one stored pair is erased at ``?``; its query should fall to chance, the other seven keep
  their accuracy. Two erasures: ``by="key"`` projects the pair's key directions out of the state
  (everything stored along them goes, the neighbours' share included), ``by="write"`` removes what the
  pair's writes still hold there (``S ← S − Σ_s C_s``, the attribution's terms: the state as if those
  tokens had written nothing). Chance is reported three ways: one of all 64 values, one of the prompt's
  8 values, and the model's own rate with layer 0 writing nothing (``β = 0``).
- **overwrite**: a stored pair's keys get a new value (a donor pair's value vectors); the answer
  should change to it.
- **attribution**: at each query, the share of the state's mass (``Σ_s ‖C_s‖``) held by the pair
  tokens, and how much of each pair's write is left against what the head's decay alone would leave.

Where the pair is written: the causal conv (kernel 4) mixes each token with the three before it,
so the pair ``k_j v_j`` (tokens ``2j``, ``2j+1``) reaches the state through the writes at ``2j+1``
(the value token) and ``2j+2`` (the next token, whose window still holds both). Variants: ``main``
uses the write at ``2j+2`` only, ``both`` the two writes (each taken from the same position of the
donor). Every edit has three controls: ``random_control``, a random rank-one change of the same Frobenius
norm (``edit.random_control(seed)``), ``random_control_x0.25``, the same at a quarter of the norm
(``scale=0.25``: how large a random change the head tolerates), and ``random_key_control``, the same write /
erase with a random unit key (``edit.random_control(seed, match="key")``). Erasing by write has a fourth,
``absent_pair_control``: remove the writes of a pair this prompt does not hold (its donor's pair, as the
donor wrote it): a change of the same kind and size that is not this prompt's association. The erase also
reports how far each edit moves the other keys' reads at ``?`` (``‖ΔSᵀq̂‖ / ‖Sᵀq̂‖``, queries of the
other seven pairs). Rates come with 95% bootstrap intervals over prompts.

Run:  python benchmarks/state_memory.py [--n 600] [--seed 20250] [--out benchmarks/results/state_memory.json]
      [--organisms recall-linear --keep-others]   # re-measure one organism, keep the others' results
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

# benchmarks/kernels.py would shadow HF's kernel-hub package `kernels`, which transformers probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import qwen35_lab as ql  # noqa: E402
from qwen35_lab._io import atomic_file  # noqa: E402
from qwen35_lab.instrument import erase_memory, key_from, value_from, write_memory  # noqa: E402
from qwen35_lab.organisms import tasks  # noqa: E402

LAYER = 0
N_PAIRS = 8
STATE = f"layers.{LAYER}.deltanet.state"
VARIANTS = {"main": (2,), "both": (1, 2)}  # offsets of the pair's writes after its key token
ERASE_BY = ("key", "write")


# ----------------------------------------------------------------------------- statistics

def bootstrap_ci(per_prompt_hits: list[list[int]], *, reps: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Rate and 95% percentile interval, resampling prompts (answers of one prompt stay together)."""
    hits = [sum(h) for h in per_prompt_hits]
    counts = [len(h) for h in per_prompt_hits]
    total = sum(counts)
    rate = sum(hits) / total
    rng = random.Random(seed)
    n = len(hits)
    stats = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        c = sum(counts[i] for i in idx)
        stats.append(sum(hits[i] for i in idx) / c if c else 0.0)
    stats.sort()
    return rate, stats[int(0.025 * reps)], stats[int(0.975 * reps) - 1]


def summary(per_prompt_hits) -> dict:
    rate, lo, hi = bootstrap_ci(per_prompt_hits)
    return {"rate": round(rate, 4), "ci95": [round(lo, 4), round(hi, 4)],
            "answers": sum(len(h) for h in per_prompt_hits)}


# ----------------------------------------------------------------------------- data

def ids_of(lab, rows: list[list[str]]) -> torch.Tensor:
    vocab = lab.tokenizer.get_vocab()
    return torch.tensor([[vocab[w] for w in r] for r in rows])


def make_prompts(n: int, seed: int):
    """Recipients, a donor per recipient with a pair whose key the recipient lacks, and a pair to erase."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        ex = tasks.recall_example(rng, N_PAIRS)
        w = ex.words
        keys = set(w[0:2 * N_PAIRS:2])
        while True:
            d = tasks.recall_example(rng, N_PAIRS)
            dw = d.words
            fresh = [j for j in range(N_PAIRS) if dw[2 * j] not in keys and dw[2 * j + 1] not in w]
            if fresh:
                break
        items.append({"words": w, "answers": list(zip(ex.answer_positions, ex.answers)), "donor": dw,
                      "donor_pair": rng.choice(fresh), "target": rng.randrange(N_PAIRS)})
    return items


def answer_hits(lab, logits: torch.Tensor, rows: list[list[str]], queries: list[list[tuple[int, str]]]):
    """``hits[b][i]``: whether the argmax at query ``i`` of prompt ``b`` (answer position p, read at p − 1) is right."""
    vocab = lab.tokenizer.get_vocab()
    pred = logits.argmax(-1)  # [B, T]
    return [[int(pred[b, p - 1]) == vocab[a] for p, a in q] for b, q in enumerate(queries)]


def run_logits(lab, ids, edits=None) -> torch.Tensor:
    return lab.run(ids, capture="logits", edits=edits)["logits"].float()


# ----------------------------------------------------------------------------- experiments

def edit_table(lab, ids, make_edit, name: str, seed: int, measure, extra=None) -> dict:
    """``measure(logits)`` under the edit and its controls, for every variant and head set.

    ``extra(offsets, heads, edit)``: more (condition, edit) pairs, and a dict of further numbers."""
    out = {}
    for variant, offsets in VARIANTS.items():
        for heads_name, heads in _head_sets(lab):
            edit = make_edit(offsets, heads)
            conds = [(name, edit), ("random_control", edit.random_control(seed)),
                     ("random_control_x0.25", edit.random_control(seed, scale=0.25)),
                     ("random_key_control", edit.random_control(seed, match="key"))]
            more = extra(offsets, heads, edit) if extra else ([], {})
            row = {c: measure(run_logits(lab, ids, {STATE: e})) for c, e in conds + more[0]}
            row.update(more[1])
            out[f"{variant}/{heads_name}"] = row
    return out


def transplant(lab, items, donor_tr) -> dict:
    """Write a donor's pair at ``?`` and ask for its key first."""
    q_pos = 2 * N_PAIRS  # the '?'
    rows, first, others = [], [], []
    for it in items:
        w, dw, j = it["words"], it["donor"], it["donor_pair"]
        rows.append(w[:q_pos + 1] + [dw[2 * j], dw[2 * j + 1]] + w[q_pos + 1:])
        first.append([(q_pos + 2, dw[2 * j + 1])])
        others.append([(p + 2, a) for p, a in it["answers"]])
    ids = ids_of(lab, rows)
    out = {}
    base = run_logits(lab, ids)
    out["no_edit"] = {"written_answer": summary(answer_hits(lab, base, rows, first)),
                      "other_keys": summary(answer_hits(lab, base, rows, others))}
    def make(offsets, heads):
        pos = [[2 * it["donor_pair"] + o for it in items] for o in offsets]
        return write_memory([key_from(donor_tr, p) for p in pos], [value_from(donor_tr, p) for p in pos],
                            positions=[q_pos], heads=heads)

    out.update(edit_table(lab, ids, make, "write", 1, lambda lg: {
        "written_answer": summary(answer_hits(lab, lg, rows, first)),
        "other_keys": summary(answer_hits(lab, lg, rows, others))}))
    return out


def erase(lab, items, own_tr, donor_tr) -> dict:
    """Erase pair ``target`` at ``?`` (by its keys, or by its writes): its query against the other seven."""
    q_pos = 2 * N_PAIRS
    rows = [it["words"] for it in items]
    ids = ids_of(lab, rows)
    target_q, other_q = [], []
    for it in items:
        key = it["words"][2 * it["target"]]
        target_q.append([(p, a) for p, a in it["answers"] if it["words"][p - 1] == key])
        other_q.append([(p, a) for p, a in it["answers"] if it["words"][p - 1] != key])
    chance = sum(sum(1 for i in range(N_PAIRS) if it["words"][2 * i + 1] == it["words"][2 * it["target"] + 1])
                 / N_PAIRS for it in items) / len(items)
    out = {"chance_prompt_values": round(chance, 4), "chance_all_values": round(1 / tasks.RECALL_NUM_VALUES, 4)}
    base = run_logits(lab, ids)
    out["no_edit"] = {"erased_key": summary(answer_hits(lab, base, rows, target_q)),
                      "other_keys": summary(answer_hits(lab, base, rows, other_q))}
    nothing = run_logits(lab, ids, {f"layers.{LAYER}.deltanet.beta": 0.0})
    out["chance_layer_writes_nothing"] = {"erased_key": summary(answer_hits(lab, nothing, rows, target_q)),
                                          "other_keys": summary(answer_hits(lab, nothing, rows, other_q))}
    measure = lambda lg: {"erased_key": summary(answer_hits(lab, lg, rows, target_q)),  # noqa: E731
                          "other_keys": summary(answer_hits(lab, lg, rows, other_q)),
                          "matched_chance": round(_matched_chance(lab, lg, items, target_q), 4)}
    q_other = _other_queries(own_tr, items)  # [B, 7, HV, K]
    for by in ERASE_BY:
        def make(offsets, heads, by=by):
            pos = [[2 * it["target"] + o for it in items] for o in offsets]
            return erase_memory([key_from(own_tr, p) for p in pos], positions=[q_pos], heads=heads, by=by)

        def extra(offsets, heads, edit, by=by):
            conds = []
            if by == "write":  # the same kind of change, from a pair this prompt does not hold
                dpos = [[2 * it["donor_pair"] + o for it in items] for o in offsets]
                conds.append(("absent_pair_control", erase_memory([key_from(donor_tr, p) for p in dpos],
                                                                  positions=[q_pos], heads=heads, by="write")))
            moved = {c: _read_change(lab, ids, own_tr, e, q_other, q_pos)
                     for c, e in [("erase", edit), ("random_control", edit.random_control(2))] + conds}
            return conds, {"other_reads_moved": moved}

        for k, v in edit_table(lab, ids, make, "erase", 2, measure, extra).items():
            out[f"by_{by}/{k}"] = v
    return out


def _other_queries(own_tr, items) -> torch.Tensor:
    """The normalised queries of the seven pairs that are not erased ``[B, 7, HV, K]``."""
    q = own_tr.state_inputs(LAYER)["q"].float()  # [B, T, HV, K]
    rows = []
    for b, it in enumerate(items):
        key = it["words"][2 * it["target"]]
        rows.append(torch.stack([q[b, p - 1] for p, _ in it["answers"] if it["words"][p - 1] != key]))
    q = torch.stack(rows)
    return q / q.norm(dim=-1, keepdim=True)


def _read_change(lab, ids, own_tr, edit, q_other, t: int) -> list[float]:
    """Per head: mean over prompts and the other keys of ``‖ΔSᵀq̂‖ / ‖Sᵀq̂‖`` for the edit at ``t``."""
    S = own_tr.state(LAYER, t).float()  # [B, HV, K, V]
    S_edit = lab.run(ids[:, : t + 1], capture=STATE, edits={STATE: edit}).state(LAYER, t).float()
    before = torch.einsum("bhkv,bqhk->bqhv", S, q_other).norm(dim=-1)
    moved = torch.einsum("bhkv,bqhk->bqhv", S_edit - S, q_other).norm(dim=-1)
    return [round(float(x), 4) for x in (moved / before.clamp_min(1e-12)).mean((0, 1))]


def _matched_chance(lab, logits, items, target_q) -> float:
    """How often the answer at the erased key names one given *other* value of the prompt (averaged over them):
    the rate the erased value would have if the answer held no information about it."""
    vocab = lab.tokenizer.get_vocab()
    total = 0.0
    for b, (it, q) in enumerate(zip(items, target_q)):
        (p, _), = q
        pred = int(logits[b, p - 1].argmax())
        others = [it["words"][2 * i + 1] for i in range(N_PAIRS) if i != it["target"]]
        total += sum(vocab[o] == pred for o in others) / len(others)
    return total / len(items)


def overwrite(lab, items, own_tr, donor_tr) -> dict:
    """Write a donor pair's value under a stored key at ``?``: does the answer follow?"""
    q_pos = 2 * N_PAIRS
    rows = [it["words"] for it in items]
    ids = ids_of(lab, rows)
    new_q, old_q, other_q = [], [], []
    for it in items:
        w, key = it["words"], it["words"][2 * it["target"]]
        new_value = it["donor"][2 * it["donor_pair"] + 1]
        (p,) = [p for p, a in it["answers"] if w[p - 1] == key]
        new_q.append([(p, new_value)])
        old_q.append([(p, w[p])])
        other_q.append([(p2, a) for p2, a in it["answers"] if w[p2 - 1] != key])
    out = {}
    base = run_logits(lab, ids)
    out["no_edit"] = {"new_value": summary(answer_hits(lab, base, rows, new_q)),
                      "old_value": summary(answer_hits(lab, base, rows, old_q)),
                      "other_keys": summary(answer_hits(lab, base, rows, other_q))}
    def make(offsets, heads):
        kpos = [[2 * it["target"] + o for it in items] for o in offsets]
        vpos = [[2 * it["donor_pair"] + o for it in items] for o in offsets]
        return write_memory([key_from(own_tr, p) for p in kpos], [value_from(donor_tr, p) for p in vpos],
                            positions=[q_pos], heads=heads)

    out.update(edit_table(lab, ids, make, "overwrite", 3, lambda lg: {
        "new_value": summary(answer_hits(lab, lg, rows, new_q)),
        "old_value": summary(answer_hits(lab, lg, rows, old_q)),
        "other_keys": summary(answer_hits(lab, lg, rows, other_q))}))
    return out


def attribution(lab, items, own_tr) -> dict:
    """At every query: the pair tokens' share of ``Σ_s ‖C_s‖``, and what is left of each pair's writes."""
    x = own_tr.state_inputs(LAYER)
    HV = x["g"].shape[2]
    g = x["g"].double()  # [B, T, HV]
    half_life = (math.log(2) / (-g.mean((0, 1))).clamp_min(1e-30)).tolist()
    q_positions = [p - 1 for p, _ in items[0]["answers"]]
    pair_share = torch.zeros(HV)
    held_ratio, decay_ratio, distance = [], [], []
    for t in sorted(q_positions):
        c = own_tr.state_contributions(LAYER, t)
        share = c.share()  # [B, HV, S]
        pair_share += share[:, :, : 2 * N_PAIRS].sum(-1).mean(0) / len(q_positions)
        # the pair's main write (2j+2) for every pair: what is left of it, and what decay alone would leave
        for j in range(N_PAIRS):
            s = 2 * j + 2
            held_ratio.append(c.held[:, :, s] / c.written[:, :, s])  # [B, HV]
            decay_ratio.append(c.decayed[:, :, s] / c.written[:, :, s])
            distance.append(t - s)
    held = torch.stack(held_ratio, -1)  # [B, HV, Q*N]
    decay = torch.stack(decay_ratio, -1)
    dist = torch.tensor(distance, dtype=torch.float64)
    by_distance = {}
    for d in sorted(set(distance)):
        m = dist == d
        by_distance[int(d)] = {"held_over_written": [round(float(v), 4) for v in held[:, :, m].mean((0, 2))],
                               "decay_only": [round(float(v), 4) for v in decay[:, :, m].mean((0, 2))]}
    # per head: log(held / written) against distance (least squares slope, tokens⁻¹) -> an effective half-life
    slopes = []
    for h in range(HV):
        y = held[:, h].double().clamp_min(1e-12).log().mean(0)  # [Q*N]
        xm, ym = dist.mean(), y.mean()
        slope = float(((dist - xm) * (y - ym)).sum() / ((dist - xm) ** 2).sum())
        slopes.append(slope)
    return {"pair_tokens_share_of_mass": [round(float(v), 4) for v in pair_share],
            "pair_tokens_fraction_of_tokens": round(2 * N_PAIRS / (sum(q_positions) / len(q_positions) + 1), 4),
            "head_half_life_tokens": [round(h, 1) for h in half_life],
            "effective_half_life_tokens": [round(math.log(2) / -s, 1) if s < 0 else None for s in slopes],
            "held_over_written_by_distance": by_distance,
            "mean_held_over_written": [round(float(v), 4) for v in held.mean((0, 2))],
            "mean_decay_only": [round(float(v), 4) for v in decay.mean((0, 2))]}


def _head_sets(lab):
    HV = lab.text_config.linear_num_value_heads
    return [("all_heads", None)] + [(f"head_{h}", [h]) for h in range(HV)]


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--seed", type=int, default=20250)
    ap.add_argument("--organisms", nargs="+", default=["recall-linear", "recall"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "state_memory.json"))
    ap.add_argument("--keep-others", action="store_true",
                    help="keep the other organisms' results already in --out (run with the same --n and --seed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    result = {"benchmark": "state_memory", "n_prompts": args.n, "seed": args.seed, "layer": LAYER,
              "pairs": N_PAIRS, "variants": {k: [f"2j+{o}" for o in v] for k, v in VARIANTS.items()},
              "edit_position": "the '?' token (2N)", "ci": "95% bootstrap over prompts (1000 resamples)",
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(), "organisms": {}}
    out = Path(args.out)
    if args.keep_others and out.exists():
        old = json.loads(out.read_text())
        if (old.get("n_prompts"), old.get("seed")) != (args.n, args.seed):
            raise SystemExit(f"--keep-others: {out} holds n={old.get('n_prompts')}, seed={old.get('seed')}; "
                             f"this run has n={args.n}, seed={args.seed}")
        result["organisms"] = {k: v for k, v in old["organisms"].items() if k not in args.organisms}
    for org in args.organisms:
        t0 = time.time()
        lab = ql.load(org)
        items = make_prompts(args.n, args.seed)
        own_tr = lab.run(ids_of(lab, [it["words"] for it in items]), capture=STATE)
        donor_tr = lab.run(ids_of(lab, [it["donor"] for it in items]), capture=STATE)
        r = {"transplant": transplant(lab, items, donor_tr), "erase": erase(lab, items, own_tr, donor_tr),
             "overwrite": overwrite(lab, items, own_tr, donor_tr), "attribution": attribution(lab, items, own_tr)}
        r["seconds"] = round(time.time() - t0, 1)
        result["organisms"][org] = r
        _print(org, r)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w") as f:
        f.write(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def _fmt(s: dict) -> str:
    return f"{s['rate']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"


def _print(org: str, r: dict) -> None:
    print(f"\n== {org}  ({r['seconds']} s)")
    for exp, main_key, cond in (("transplant", "written_answer", "write"), ("erase", "erased_key", "erase"),
                                ("overwrite", "new_value", "overwrite")):
        res = r[exp]
        print(f"{exp:<10} {'variant':<26} {main_key + ' (edit)':<30} {'(random control)':<26} "
              f"{'other keys (edit)':<26} {'other keys (control)':<26} {'(x0.25) main / others':<22} "
              f"{'(random key): main / others'}")
        print(f"{'':<10} {'no_edit':<26} {_fmt(res['no_edit'][main_key]):<30} {'':<26} "
              f"{_fmt(res['no_edit']['other_keys']):<26}")
        for v, d in res.items():
            if not isinstance(d, dict) or cond not in d:
                continue
            q = d["random_control_x0.25"]
            print(f"{'':<10} {v:<26} {_fmt(d[cond][main_key]):<30} {_fmt(d['random_control'][main_key]):<26} "
                  f"{_fmt(d[cond]['other_keys']):<26} {_fmt(d['random_control']['other_keys']):<26} "
                  f"{q[main_key]['rate']:.3f} / {q['other_keys']['rate']:.3f}{'':<8} "
                  f"{d['random_key_control'][main_key]['rate']:.3f} / {d['random_key_control']['other_keys']['rate']:.3f}")
            if "absent_pair_control" in d:
                a = d["absent_pair_control"]
                print(f"{'':<37} absent pair control: {_fmt(a[main_key])} / others {_fmt(a['other_keys'])}")
            if "other_reads_moved" in d:
                print(f"{'':<37} other keys' reads moved (per head): {d['other_reads_moved']}")
        if exp == "erase":
            print(f"{'':<10} chance: {res['chance_prompt_values']} (one of the prompt's values), "
                  f"{res['chance_all_values']} (one of all values), "
                  f"{_fmt(res['chance_layer_writes_nothing']['erased_key'])} (layer {LAYER} writes nothing)")
    a = r["attribution"]
    print(f"attribution: pair tokens' share of the state's mass at the queries, per head: "
          f"{a['pair_tokens_share_of_mass']} (they are {a['pair_tokens_fraction_of_tokens']} of the tokens); "
          f"held/written {a['mean_held_over_written']} vs decay alone {a['mean_decay_only']}; "
          f"half-life {a['head_half_life_tokens']} (decay) vs {a['effective_half_life_tokens']} (measured)")


if __name__ == "__main__":
    main(sys.argv[1:])
