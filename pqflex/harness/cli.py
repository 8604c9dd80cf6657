"""The ``pqflex`` command line."""

from __future__ import annotations

import argparse
import sys

from pqflex import METHODS
from pqflex.harness.suite import TASKS


def _budget(text: str) -> float | int:
    """``"0.1"`` -> 0.1 (a fraction of the context); ``"2048"`` -> 2048 tokens."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number of tokens or a fraction in (0, 1], got {text!r}")
    return int(value) if value > 1 else value


def _settings(text: str) -> dict[str, object]:
    """``"M=4,nbits=8,backend=flex"`` -> ``{"M": 4, "nbits": 8, "backend": "flex"}`` (numbers parsed)."""
    out: dict[str, object] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected key=value pairs of PQConfig fields, got {item!r}")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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

    bench = sub.add_parser("bench", help="decode speed (TTFT, TPOT, attention per layer) vs dense attention",
                           description="Random-weight models of real shapes; see pqflex/bench.py and BENCHMARKS.md")
    bench.add_argument("--preset", default="llama-3.1-8b",
                       help="model shape: llama-3.1-8b, mistral-7b, qwen2.5-7b, smollm2-135m or tiny (CPU smoke)")
    bench.add_argument("--contexts", type=_ints, default=[8192, 32768], help="prompt lengths, comma-separated")
    bench.add_argument("--batch", type=_ints, default=[1], help="batch sizes, comma-separated")
    bench.add_argument("--budget", type=_budget, default=0.1, help="pqcache budget (tokens or fraction)")
    bench.add_argument("--methods", type=lambda t: t.split(","), default=["pqcache", "pqflex-dense", "sdpa-static",
                                                                         "sdpa"],
                       help="comma-separated: pqcache, pqflex-dense, sdpa-static, sdpa")
    bench.add_argument("--backend", default=None, choices=["fused", "gather", "flex"],
                       help="pqcache attention backend (default: PQConfig's)")
    bench.add_argument("--pq", type=_settings, default={}, help="more PQConfig settings of pqcache, e.g. M=8,nbits=8")
    bench.add_argument("--selection", default="token", choices=["token", "block"], help="pqcache selection")
    bench.add_argument("--block-size", type=int, default=64, help="tokens per block of --selection block")
    bench.add_argument("--new-tokens", type=int, default=32, help="timed decode steps (default 32)")
    bench.add_argument("--warmup", type=int, default=5, help="decode steps before timing (compile, CUDA graphs)")
    bench.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                       help="default: bf16 on CUDA, fp32 on the CPU")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--no-layer-attention", action="store_true", help="skip the per-layer attention timing")
    bench.add_argument("--no-generate", action="store_true",
                       help="skip the TTFT/TPOT measurement through model.generate()")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")
    bench.add_argument("--plot", default=None, help="write a PNG of TPOT vs context (needs matplotlib)")
    bench.add_argument("--from-json", default=None, help="print (and --plot) the results of an earlier --json")
    ev = sub.add_parser("eval", help="the offline long-context suite: full attention, pqcache, streaming, oracle",
                        description="Synthetic long-context tasks built with the model's tokenizer; see "
                                    "pqflex/suite.py, pqflex/evaluate.py and EVALS.md")
    ev.add_argument("--tasks", type=lambda t: list(TASKS) if t == "all" else t.split(","), default=list(TASKS),
                    help=f"comma-separated, or all (default): {', '.join(TASKS)}")
    ev.add_argument("--lengths", type=_ints, default=[2048, 4096], help="prompt lengths in tokens, comma-separated")
    ev.add_argument("--budgets", type=lambda t: [_budget(x) for x in t.split(",")], default=[0.2, 0.1, 0.05],
                    help="budgets (fractions or token counts), comma-separated (default 0.2,0.1,0.05)")
    ev.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS),
                    help=f"comma-separated: {', '.join(METHODS)}")
    ev.add_argument("--pq", type=_settings, default={}, help="more PQConfig settings of the sparse methods, e.g. "
                                                          "M=4,nbits=8 (default: PQConfig's)")
    ev.add_argument("--samples", type=int, default=5, help="prompts per task and length (default 5)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i uses seed + i)")
    ev.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (left padding)")
    ev.add_argument("--model", default=None, help="a Hugging Face model directory (default: the embedded "
                                                  "SmolLM2-135M-Instruct)")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", default="fp32", choices=["bf16", "fp16", "fp32"], help="model dtype (default fp32)")
    ev.add_argument("--json", default=None, help="write every prediction and score to this JSON file")
    ev.add_argument("--plot", default=None, help="write a PNG of the average score vs budget (needs matplotlib)")
    ev.add_argument("--from-json", default=None, help="print (and --plot) the results of an earlier --json")
    ev.add_argument("--resume", action="store_true", help="keep the complete cells of an interrupted --json run")
    args = parser.parse_args(argv)

    if args.command == "eval":
        from pqflex.harness import evaluate

        if args.samples < 1 or args.batch_size < 1:
            parser.error(f"--samples and --batch-size must be >= 1, got {args.samples} and {args.batch_size}")
        if args.resume and not args.json:
            parser.error("--resume needs --json (the file of the interrupted run)")
        return evaluate.main(args)
    if args.command == "bench":
        from pqflex.harness import bench as benchmark

        if args.dtype is None:
            cuda = (args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")).startswith("cuda")
            args.dtype = "bf16" if cuda else "fp32"
        return benchmark.main(args)
    if args.command == "demo":
        from pqflex.harness import demo as demos

        if args.synthetic:
            demos.synthetic_demo(args.length, args.budget, args.seed)
        else:
            demos.passkey_demo(args.length, args.budget, args.depth, args.seed, args.model, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
