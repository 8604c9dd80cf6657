"""CPU decode: dense SDPA vs pqcache through the ops' native C kernels vs pqcache in plain torch (issues #13, #27).

A random-weight model of the default model's shape (``smollm2-135m``: SmolLM2-135M, 30 layers, 9 query / 3 KV
heads, head dim 64, fp32) prefills ``--context`` random tokens once into transformers' ``DynamicCache``;
``PQCache.from_prefill`` copies and indexes it (``PQConfig(budget=...)``, the default M=8, nbits=8). Then decode
steps of the same token alternate between the methods in ``--rounds`` rounds of ``--steps`` steps each, so drift
of a shared machine hits every method alike; each row is the median over its steps of

- ``ms/token``: one ``model(...)`` decode forward;
- ``attention``: the part of it spent inside the 30 attention layers (projections included; forward hooks, see
  :class:`pqflex.harness.demo.AttentionTimer`).

``pqcache (ops)`` is the same cache with the native kernels switched off (``PQFLEX_NATIVE=0``): plain torch. Both caches grow one token per step (``DynamicCache`` appends by concatenation, a copy of every
layer's keys and values per token: the same cost for every method). Usage::

    python benchmarks/bench_cpu_decode.py --context 4096 8192 --json benchmarks/results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from pqflex import CACHE_KWARG, PQCache, PQConfig
from pqflex.harness.bench import build_model, environment
from pqflex.harness.demo import AttentionTimer
from pqflex.ops import native

METHODS = ("sdpa", "pqcache", "pqcache (ops)")


def use_native(enabled: bool) -> None:
    os.environ["PQFLEX_NATIVE"] = "1" if enabled else "0"
    native.library.cache_clear()


def measure(context: int, budget: float, rounds: int, steps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    torch.manual_seed(seed)
    model = build_model("smollm2-135m", "sdpa", torch.float32, "cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    timer = AttentionTimer(model)
    times = {m: ([], []) for m in METHODS}
    with torch.no_grad():
        dense = DynamicCache(config=model.config)
        token = model(ids, use_cache=True, **{CACHE_KWARG: dense}).logits[:, -1:].argmax(-1)
        caches = {"sdpa": dense, "pqcache": PQCache.from_prefill(model, dense, PQConfig(budget=budget))}
        caches["pqcache (ops)"] = PQCache.from_prefill(model, dense, PQConfig(budget=budget))
        for _ in range(rounds):
            for method in METHODS:
                model.set_attn_implementation("sdpa" if method == "sdpa" else "pqcache")
                use_native(method != "pqcache (ops)")
                for _ in range(steps):
                    before, t0 = timer.spent, time.perf_counter()
                    model(token, use_cache=True, **{CACHE_KWARG: caches[method]})
                    times[method][0].append(time.perf_counter() - t0)
                    times[method][1].append(timer.spent - before)
    use_native(True)
    timer.remove()
    return {m: {"ms_per_token": statistics.median(t) * 1e3, "attention_ms": statistics.median(a) * 1e3}
            for m, (t, a) in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per method and round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if native.library() is None:
        print("the native kernels are unavailable (no C compiler?): nothing to compare", file=sys.stderr)
        return 1
    rows = []
    print(f"| context | method | ms/token | attention ms/token | attention vs sdpa |\n|---:|---|---:|---:|---:|")
    for context in args.context:
        result = measure(context, args.budget, args.rounds, args.steps)
        for method, r in result.items():
            ratio = r["attention_ms"] / result["sdpa"]["attention_ms"]
            print(f"| {context} | {method} | {r['ms_per_token']:.1f} | {r['attention_ms']:.1f} | {ratio:.2f}x |",
                  flush=True)
            rows.append({"context": context, "method": method, **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment("cpu"), "budget": args.budget, "rounds": args.rounds,
                       "steps": args.steps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
