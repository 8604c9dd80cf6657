"""Decode attention of one layer on one GPU: pqcache's backends against dense SDPA, after a correctness check.

Per context (Llama-3.1-8B attention: Hkv=8, G=4, D=128, bf16): dense SDPA over the context; pqcache's whole
compiled step (encode the new key, score + select, attend) with the ``gather`` and ``flex`` backends, with token
and block selection; the selection alone; and ``pqflex-dense`` (budget 1.0 in the same machinery). Times are
medians of CUDA-graph replays. Usage::

    PYTHONPATH=. python benchmarks/bench_attention.py --contexts 32768,131072 --batch 1 --budget 0.1
"""

from __future__ import annotations

import argparse
import json

import torch

from pqflex import PQConfig, PQIndex
from pqflex.harness.bench import environment, graph_time_us, layer_attention_us
from pqflex.ops import reference

PRESET = "llama-3.1-8b"
HKV, H, D = 8, 32, 128
# (name, PQConfig settings) of every pqcache variant
VARIANTS = {
    "gather": dict(backend="gather"),
    "flex": dict(backend="flex"),
    "gather_block64": dict(backend="gather", selection="block", block_size=64),
    "gather_block128": dict(backend="gather", selection="block", block_size=128),
    "flex_block128": dict(backend="flex", selection="block", block_size=128),
}


def check(batch: int, context: int, budget: float) -> dict[str, float]:
    """Max error of each compiled backend against the reference masked attention over the same plan."""
    cap = -(-(context + 1) // 128) * 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    errors = {}
    for name, options in VARIANTS.items():
        index = PQIndex.build(k[:, :, :context - 1], PQConfig(budget=budget, niter=10, **options), capacity=cap)
        n = torch.tensor(context, device="cuda")
        index.store(k, n)
        out = torch.compile(lambda: index.step(q, k, v, n, D ** -0.5), fullgraph=True, dynamic=False)()
        grow = PQIndex(index.config, index.quantizer, index.codes[:, :, :context], index.start, index.sink,
                       index.recent, index.topk, index.k_max, index.sink_max, index.recent_max)
        plan = grow.plan(q, D ** -0.5)
        want = reference.masked_attention(q.float(), k[:, :, :context].float(), v[:, :, :context].float(), plan,
                                          D ** -0.5)
        errors[name] = (out.float() - want).abs().max().item()
    return errors


def select_us(batch: int, context: int, budget: float, **options) -> float:
    cap = -(-(context + 1) // 128) * 128
    k = torch.randn(batch, HKV, cap, D, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16)
    index = PQIndex.build(k[:, :, :context - 1], PQConfig(budget=budget, niter=10, **options), capacity=cap)
    n = torch.tensor(context, device="cuda")
    return graph_time_us(torch.compile(lambda: index.select(q, n, D ** -0.5), fullgraph=True, dynamic=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 256  # one lambda code object is compiled for every variant and context
    rows = []
    for context in map(int, args.contexts.split(",")):
        errors = check(args.batch, context, args.budget)
        row = {"batch": args.batch, "context": context, "budget": args.budget, "max_err": errors,
               "sdpa_us": layer_attention_us(PRESET, "sdpa", args.batch, context, args.budget, torch.bfloat16),
               "select_us": select_us(args.batch, context, args.budget),
               "select_block64_us": select_us(args.batch, context, args.budget, selection="block", block_size=64),
               "select_block128_us": select_us(args.batch, context, args.budget, selection="block",
                                               block_size=128)}
        for name, options in VARIANTS.items():
            row[f"pqcache_{name}_us"] = layer_attention_us(PRESET, "pqcache", args.batch, context, args.budget,
                                                           torch.bfloat16, options)
        row["pqflex_dense_us"] = layer_attention_us(PRESET, "pqflex-dense", args.batch, context, args.budget,
                                                    torch.bfloat16)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| B | context | SDPA µs | select token / block64 / block128 µs | "
          + " | ".join(f"pqcache {name} µs (x SDPA)" for name in VARIANTS) + " | pqflex-dense µs | max err |")
    print("|---" * (5 + len(VARIANTS)) + "|")
    for r in rows:
        s = r["sdpa_us"]
        print(f"| {r['batch']} | {r['context']} | {s:.1f} | {r['select_us']:.1f} / {r['select_block64_us']:.1f} / "
              f"{r['select_block128_us']:.1f} | "
              + " | ".join(f"{r[f'pqcache_{n}_us']:.1f} ({r[f'pqcache_{n}_us'] / s:.2f})" for n in VARIANTS)
              + f" | {r['pqflex_dense_us']:.1f} | {max(r['max_err'].values()):.1e} |")
    print(" ".join(f"{k}={v}" for k, v in environment("cuda").items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
