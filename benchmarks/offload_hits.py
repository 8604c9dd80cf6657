"""Offload's hot-token cache on the real default model: hit rate per cache size and unit, and exactness (issue #14).

Random weights make every step's query unrelated to the last, so their hit rate says nothing about a real model;
this runs SmolLM2-135M-Instruct (the embedded default model, fp32, CPU is fine) on passkey prompts and generates
``--new-tokens`` greedy tokens with a :class:`pqflex.PQStaticCache` in offload mode for each ``hot_block`` x
``hot_ratio``, and once GPU-resident. Per row: the hit rate (hot-cache hits per selected token, all layers and
heads), the share of the selected tokens read from CPU memory per step, and whether the tokens equal the resident
cache's (they must: offload changes where rows come from, not what is attended).

``--simulate`` also records every step's selection (one run without a hot cache) and replays it through cache
policies in plain Python, per layer and KV head: the direct-mapped frequency cache pqflex uses (its replay must
reproduce the measured rate), a fully associative LFU, an LRU, and "the previous step's selection" (the share of
each selection that the last one already held: the reuse there is). Usage::

    python benchmarks/offload_hits.py --context 4096 --simulate --json benchmarks/results/offload_hits_4k.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import OrderedDict

import torch

import pqflex
from pqflex import CACHE_KWARG, OffloadedKV, PQConfig, PQStaticCache
from pqflex.harness.bench import environment
from pqflex.harness.models import load_default_model
from pqflex.harness.prompts import passkey_prompt


def record_selections(model, ids, kw, config) -> list[list[list[int]]]:
    """Every step's selected positions, as lists per (layer, KV head) of steps (sequence 0)."""
    traces: dict[int, list] = {}
    attend = OffloadedKV.attend

    def spy(store, query, selected, index, n, scale):
        traces.setdefault(id(store), []).append(selected[0].tolist())
        return attend(store, query, selected, index, n, scale)

    OffloadedKV.attend = spy
    try:
        with torch.no_grad():
            model.generate(ids, **kw, **{CACHE_KWARG: PQStaticCache(model, ids.shape[1] + kw["max_new_tokens"],
                                                                    config.replace(hot_ratio=0.0))})
    finally:
        OffloadedKV.attend = attend
    return [[[p for p in step[h] if p >= 0] for step in steps] for steps in traces.values()
            for h in range(len(steps[0]))]


def replay(streams: list[list[list[int]]], policy: str, size: int) -> float:
    """Hit rate of a cache of ``size`` tokens under ``policy`` over the recorded selections (one cache per stream)."""
    hits = total = 0
    for steps in streams:
        freq: dict[int, int] = {}
        cache: OrderedDict[int, None] = OrderedDict()
        tags = [-1] * max(size, 1)
        prev: set[int] = set()
        for sel in steps:
            total += len(sel)
            for p in sel:
                freq[p] = freq.get(p, 0) + 1
            if policy == "previous selection":
                hits += sum(p in prev for p in sel)
                prev = set(sel)
            elif policy == "direct-mapped LFU":  # what OffloadedKV does (hot_block=1)
                hits += sum(size > 0 and tags[p % size] == p for p in sel)
                for p in sel:
                    s = p % size if size else 0
                    if size and tags[s] != p and (tags[s] < 0 or freq[p] > freq[tags[s]]):
                        tags[s] = p
            else:
                for p in sel:
                    if p in cache:
                        hits += 1
                        cache.move_to_end(p)
                for p in sel:
                    if p in cache or size == 0:
                        continue
                    if len(cache) < size:
                        cache[p] = None
                    elif policy == "LRU":
                        cache.popitem(last=False)
                        cache[p] = None
                    else:  # LFU, fully associative
                        victim = min(cache, key=freq.__getitem__)
                        if freq[p] > freq[victim]:
                            del cache[victim]
                            cache[p] = None
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, nargs="+", default=[4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--simulate", action="store_true", help="replay the selections through other policies")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tok = load_default_model("pqcache", progress=False)
    base = PQConfig(budget=args.budget)
    pqflex.configure(model, base)
    rows, sims = [], []
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
                save(args, rows, sims, n)
        if args.simulate:
            streams = record_selections(model, ids, kw, base.replace(offload=True))
            k = max(len(sel) for steps in streams for sel in steps)
            print(f"\n| context | policy | " + " | ".join(f"hot = {r} x top-k" for r in args.ratios) + " |")
            print("|---|---|" + "---|" * len(args.ratios))
            for policy in ("direct-mapped LFU", "LFU", "LRU", "previous selection"):
                rates = [replay(streams, policy, k if policy == "previous selection" else int(r * k))
                         for r in args.ratios]
                sims.append(dict(context=ids.shape[1], policy=policy, topk=k, ratios=args.ratios, hit_rates=rates))
                print(f"| {ids.shape[1]} | {policy} | " + " | ".join(f"{x:.1%}" for x in rates) + " |")
            save(args, rows, sims, n)


def save(args, rows, sims, n) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment("cpu"), "budget": args.budget, "new_tokens": n, "rows": rows,
                       "simulated": sims}, f, indent=1)


if __name__ == "__main__":
    main()
