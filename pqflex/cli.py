"""The ``pqflex`` command line."""

from __future__ import annotations

import argparse
import sys


def _budget(text: str) -> float | int:
    value = float(text)
    return int(value) if value > 1 or text.isdigit() else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqflex", description="PQCache retrieval attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show PQ retrieval attention at work")
    demo.add_argument("--length", type=int, default=8192, help="context length in tokens")
    demo.add_argument("--budget", type=_budget, default=0.1, help="tokens (int) or fraction of the context")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from pqflex.demo import synthetic_demo

        synthetic_demo(args.length, args.budget, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
