"""Decode attention of one layer on one GPU: pqcache's PQ settings and backends against dense SDPA.

Per context (Llama-3.1-8B attention: Hkv=8, G=4, D=128, bf16) and PQ setting (M, nbits): pqcache's whole
compiled step (encode the new key, score + select, attend) with each backend, after a correctness check against
masked SDPA over the same plan; the selection alone; dense SDPA over the context; and the byte
floor of select + attend (the codes of every token and the K/V rows of the attended ones, once, at the card's
bandwidth). Times are medians of CUDA-graph replays. Usage::

    PYTHONPATH=. python benchmarks/bench_attention.py --contexts 32768,131072 --settings 2x6,8x8 \
        --backends fused,gather --blocks 8x8
"""

from __future__ import annotations

import argparse
import json

import torch

from pqflex import PQConfig, PQIndex, ResidentKV, attention_backend
from pqflex.harness.bench import environment, graph_time_us, layer_attention_us

PRESET = "llama-3.1-8b"
HKV, H, D = 8, 32, 128
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, datasheet
# Block-selection variants (FlexAttention judged at its best: its KV block = the selection's block)
BLOCK_VARIANTS = {"flex_block64": dict(backend="flex", selection="block", block_size=64),
                  "fused_block64": dict(backend="fused", selection="block", block_size=64)}


def _inputs(batch: int, context: int, seed: int):
    cap = -(-(context + 1) // 128) * 128
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return cap, q, k, v


def check(batch: int, context: int, config: PQConfig) -> float:
    """Max error of the compiled step against masked SDPA over the same plan (fp32)."""
    cap, q, k, v = _inputs(batch, context, 1)
    index = PQIndex.build(k[:, :, :context - 1], config, capacity=cap)
    n = torch.tensor(context, device="cuda")
    index.append(k[:, :, context - 1:context], n - 1)
    kv = ResidentKV(k, v, attention_backend(config))
    out = torch.compile(lambda: kv.attend(q, index.plan(q, n, D ** -0.5), D ** -0.5), fullgraph=True,
                        dynamic=False)()
    selection = index.plan(q, n, D ** -0.5)
    tokens = torch.where(selection.valid, selection.tokens, context)  # invalid slots point past the context
    plan = torch.zeros(*tokens.shape[:2], 1, context + 1, dtype=torch.bool, device="cuda")
    plan = plan.scatter_(-1, tokens[:, :, None], True)[..., :context].repeat_interleave(H // HKV, dim=1)
    kk, vv = (t[:, :, :context].float().repeat_interleave(H // HKV, dim=1) for t in (k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=plan, scale=D ** -0.5)
    return (out.float() - want).abs().max().item()


def select_us(batch: int, context: int, config: PQConfig) -> float:
    cap, q, k, _ = _inputs(batch, context, 2)
    index = PQIndex.build(k[:, :, :context - 1], config, capacity=cap)
    n = torch.tensor(context, device="cuda")
    return graph_time_us(torch.compile(lambda: index.plan(q, n, D ** -0.5), fullgraph=True, dynamic=False))


def floor_us(batch: int, context: int, config: PQConfig) -> float:
    """Bytes that select + attend must read once (codes of all tokens, K and V of the attended) over bandwidth."""
    name = torch.cuda.get_device_name()
    bandwidth = next((bw for card, bw in BANDWIDTH.items() if card in name), BANDWIDTH["H100"])
    attended = config.resolve_budget(context).total
    nbytes = batch * HKV * (context * config.M + attended * D * 2 * 2)
    return nbytes / bandwidth * 1e6


def _setting(text: str) -> tuple[int, int]:
    m, nbits = text.split("x")
    return int(m), int(nbits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="32768,131072")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--settings", default="2x6,8x8", help="comma-separated MxNBITS")
    parser.add_argument("--backends", default="fused,gather", help="comma-separated token-selection backends")
    parser.add_argument("--blocks", default="", help="MxNBITS settings that also run the block-selection variants")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 1024  # one lambda code object is compiled for every variant and context
    rows = []
    for context in map(int, args.contexts.split(",")):
        sdpa = layer_attention_us(PRESET, "sdpa", args.batch, context, args.budget, torch.bfloat16)
        for M, nbits in map(_setting, args.settings.split(",")):
            variants = {b: dict(backend=b) for b in args.backends.split(",")}
            if f"{M}x{nbits}" in args.blocks.split(","):
                variants.update(BLOCK_VARIANTS)
            base = PQConfig(M=M, nbits=nbits, budget=args.budget, niter=10)
            row = {"batch": args.batch, "context": context, "M": M, "nbits": nbits, "budget": args.budget,
                   "sdpa_us": sdpa, "floor_us": floor_us(args.batch, context, base),
                   "select_us": select_us(args.batch, context, base), "max_err": {}, "step_us": {}}
            for name, options in variants.items():
                config = base.replace(**options)
                row["max_err"][name] = check(args.batch, context, config)
                row["step_us"][name] = layer_attention_us(PRESET, "pqcache", args.batch, context, args.budget,
                                                          torch.bfloat16, dict(M=M, nbits=nbits, **options))
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = list(dict.fromkeys(n for r in rows for n in r["step_us"]))
    print("| B | context | M x nbits | SDPA µs | floor µs | select µs | "
          + " | ".join(f"{n} µs (x SDPA)" for n in names) + " | max err |")
    print("|---" * (7 + len(names)) + "|")
    for r in rows:
        s = r["sdpa_us"]
        print(f"| {r['batch']} | {r['context']} | {r['M']}x{r['nbits']} | {s:.1f} | {r['floor_us']:.1f} | "
              f"{r['select_us']:.1f} | "
              + " | ".join(f"{r['step_us'][n]:.1f} ({r['step_us'][n] / s:.2f})" if n in r["step_us"] else "-"
                           for n in names)
              + f" | {max(r['max_err'].values()):.1e} |")
    print(" ".join(f"{k}={v}" for k, v in environment("cuda").items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
