"""``python -m qwen35_lab.organisms build|train|evaluate ...``.

    build tiny [--out DIR]
    train NAME [--seed S] [--out DIR] [--minutes M]
    evaluate NAME_OR_DIR [--length L] [--n N] [--seed S]

``train chat`` trains the chat organism (``qwen35_lab.organisms.chat``); ``evaluate chat``
generates replies to fresh conversations (``chat_eval.evaluate``, ``--n`` per cell).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import BUILDERS, TRAINABLE, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen35_lab.organisms")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a random-weight organism")
    b.add_argument("name", choices=sorted(BUILDERS))
    b.add_argument("--out", default=None, help="output directory (default: data/organisms/NAME)")
    t = sub.add_parser("train", help="train a task organism from a seed (CPU)")
    t.add_argument("name", choices=sorted(set(TRAINABLE) | {"chat", "moe-mix"}))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="output directory (default: data/organisms/NAME)")
    t.add_argument("--init-from", default=None, help="continue a saved run of the same organism (a second stage; "
                                                     "task organisms only)")
    t.add_argument("--max-steps", type=int, default=None, help="steps of this run (default: the recipe's)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock cap in minutes (default 55; chat: 70; needles: 75; moe-mix: 30)")
    e = sub.add_parser("evaluate", help="accuracy of a trained organism on fresh data")
    e.add_argument("name", help="organism name or checkpoint directory")
    e.add_argument("--length", type=int, default=None, help="recall: pairs; passkey: filler tokens; needles: haystack tokens "
                                                            "(default: the training length)")
    e.add_argument("--n", type=int, default=200, help="number of prompts (default 200)")
    e.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    if args.command == "build":
        path = build(args.name, args.out)
        print(f"built {args.name} in {path}")
    elif args.command == "train":
        if args.name in ("chat", "moe-mix") and any(v is not None for v in (args.init_from, args.max_steps, args.lr)):
            parser.error(f"--init-from, --max-steps and --lr apply to the task organisms, not {args.name!r}")
        if args.name == "chat":
            from .chat import train as train_chat

            path = train_chat(seed=args.seed, out_dir=args.out, **({} if args.minutes is None else {"minutes": args.minutes}))
        elif args.name == "moe-mix":
            from .moe_mix import train as train_moe_mix

            path = train_moe_mix(seed=args.seed, out_dir=args.out, **({} if args.minutes is None else {"minutes": args.minutes}))
        else:
            from .train import train

            path = train(args.name, seed=args.seed, out_dir=args.out,
                         minutes={"needles": 75.0}.get(args.name, 55.0) if args.minutes is None else args.minutes,
                         init_from=args.init_from, max_steps=args.max_steps, lr=args.lr)
        print(f"trained {args.name} in {path}")
    else:
        from .. import load
        from .tasks import evaluate

        lab = load(args.name, dtype="float32", device="cpu")
        task = (lab.meta or {}).get("task")
        if task is None:
            parser.error(f"{args.name!r} is not a trained task organism (no 'task' in its qwen35_lab.json)")
        if task == "moe-mix":
            from .moe_mix import TASKS, evaluate as evaluate_moe_mix

            print(json.dumps({t: evaluate_moe_mix(lab, t, n=args.n, seed=args.seed) for t in TASKS}))
            return 0
        if task == "chat":
            from .chat_eval import evaluate as evaluate_chat

            print(json.dumps(evaluate_chat(lab, n=args.n, seed=args.seed)))
            return 0
        print(json.dumps(evaluate(lab, task, length=args.length, n=args.n, seed=args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
