"""Offload's hot-token cache on the real default model: hit rate per cache size and unit, and exactness (issue #14).

Random weights make every step's query unrelated to the last, so their hit rate says nothing about a real model;
this runs SmolLM2-135M-Instruct (the embedded default model, fp32, CPU is fine) on passkey prompts and generates
``--new-tokens`` greedy tokens with a :class:`pqflex.PQStaticCache` in offload mode for each ``hot_block`` x
``hot_ratio``, and once GPU-resident. Per row: the hit rate (hot-cache hits per selected token, all layers and
heads), the share of the selected tokens read from CPU memory per step, and whether the tokens equal the resident
cache's (they must: offload changes where rows come from, not what is attended). Usage::

    python benchmarks/offload_hits.py --context 4096 8192 --json benchmarks/results/offload_hits.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import pqflex
from pqflex import CACHE_KWARG, PQConfig, PQStaticCache
from pqflex.harness.bench import environment
from pqflex.harness.models import load_default_model
from pqflex.harness.prompts import passkey_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, nargs="+", default=[4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tok = load_default_model("pqcache", progress=False)
    base = PQConfig(budget=args.budget)
    pqflex.configure(model, base)
    rows = []
    print("| context | hot_block | hot_ratio | hot tokens/head | hit rate | from CPU per step | tokens equal |")
    print("|---|---|---|---|---|---|---|")
    for context in args.context:
        ids = passkey_prompt(tok, context, depth=0.5, seed=context).input_ids
        n = args.new_tokens
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids),
                  disable_compile=True)
        with torch.no_grad():
            want = model.generate(ids, **kw, **{CACHE_KWARG: PQStaticCache(model, ids.shape[1] + n)})
        for block in args.blocks:
            for ratio in args.ratios:
                config = base.replace(offload=True, hot_block=block, hot_ratio=ratio)
                cache = PQStaticCache(model, ids.shape[1] + n, config)
                t0 = time.perf_counter()
                with torch.no_grad():
                    got = model.generate(ids, **kw, **{CACHE_KWARG: cache})
                stores = [layer.store for layer in cache.pq_layers]
                hits, lookups = sum(int(s.hits) for s in stores), sum(int(s.lookups) for s in stores)
                steps = n - 1
                row = dict(context=ids.shape[1], hot_block=block, hot_ratio=ratio, hot_tokens=stores[0].hot,
                           hit_rate=hits / lookups, cpu_rows_per_step=(lookups - hits) / steps,
                           equal=bool(torch.equal(got, want)), seconds=time.perf_counter() - t0)
                rows.append(row)
                print(f"| {row['context']} | {block} | {ratio} | {row['hot_tokens']} | {row['hit_rate']:.1%} | "
                      f"{row['cpu_rows_per_step']:.0f} | {row['equal']} |", flush=True)
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump({"environment": environment("cpu"), "budget": args.budget,
                                   "new_tokens": n, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
