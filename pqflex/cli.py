"""The ``pqflex`` command line."""

from __future__ import annotations

import argparse
import sys


def _budget(text: str) -> float | int:
    """``"0.1"`` -> 0.1 (a fraction of the context); ``"2048"`` -> 2048 tokens."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number of tokens or a fraction in (0, 1], got {text!r}")
    return int(value) if value > 1 else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pqflex", description="PQCache retrieval attention")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="find a hidden passkey with full attention and with pqcache")
    demo.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default 4096)")
    demo.add_argument("--budget", type=_budget, default=0.1,
                      help="tokens attended per KV head: a count, or a fraction of the prompt (default 0.1)")
    demo.add_argument("--depth", type=float, default=0.5, help="relative position of the passkey (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the passkey and filler")
    demo.add_argument("--model", default=None, help="a Hugging Face model directory (default: the embedded "
                                                    "SmolLM2-135M-Instruct)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--synthetic", action="store_true",
                      help="no model: PQ retrieval on synthetic keys of Llama-3.1-8B's attention shape")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from pqflex import demo as demos

        if args.synthetic:
            demos.synthetic_demo(args.length, args.budget, args.seed)
        else:
            demos.passkey_demo(args.length, args.budget, args.depth, args.seed, args.model, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
