"""``python -m qwen35_lab.organisms build NAME [--out DIR]``."""

from __future__ import annotations

import argparse
import sys

from . import BUILDERS, build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen35_lab.organisms")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a random-weight organism")
    b.add_argument("name", choices=sorted(BUILDERS))
    b.add_argument("--out", default=None, help="output directory (default: data/organisms/NAME)")
    args = parser.parse_args(argv)
    if args.command == "build":
        path = build(args.name, args.out)
        print(f"built {args.name} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
