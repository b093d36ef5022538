"""The ``normlab`` command: ``list`` the norms (``study``, ``report`` and ``bench`` join as
their subsystems land)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import describe_norms

    entries = describe_norms()
    width = max(len(e.name) for e in entries)
    for e in entries:
        arg = f" (:{e.arg})" if e.arg else ""
        print(f"{e.name:<{width}}  {e.description}{arg}")
        if args.verbose:
            print(f"{'':<{width}}    normalizes over: {e.axes}")
            print(f"{'':<{width}}    paper: {e.paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description="Neural-network normalization: layers, studies, benchmarks.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every registered norm with its description")
    p.add_argument("-v", "--verbose", action="store_true", help="also the axes each norm normalizes over and its paper")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
