"""Passkey retrieval on the default model: full attention vs pqcache at several budgets, one shared prefill per prompt.

Usage::

    python evals/passkey.py --lengths 2048,4096 --budgets 0.2,0.1 --out passkey.json

For each length and depth (0.1, 0.3, 0.5, 0.7, 0.9; seed = depth index) the prompt is prefilled once densely;
full attention and pqcache at each budget then decode greedily from that prefill (8 new tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import DynamicCache

from pqflex import CACHE_KWARG, PQConfig, configure
from pqflex.harness.demo import greedy_decode, index_prefilled
from pqflex.harness.models import load_default_model
from pqflex.harness.prompts import passkey_found, passkey_prompt

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--budgets", default="0.2,0.1")
    parser.add_argument("--selection", default="token", choices=["token", "block"])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    model, tokenizer = load_default_model("sdpa", progress=False)
    stop = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = []
    for n in lengths:
        for i, depth in enumerate(DEPTHS):
            t0 = time.perf_counter()
            prompt = passkey_prompt(tokenizer, n, depth, seed=i)
            model.set_attn_implementation("sdpa")
            dense_cache = DynamicCache(config=model.config)
            with torch.no_grad():
                first = model(prompt.input_ids, use_cache=True, **{CACHE_KWARG: dense_cache}).logits[:, -1]
            answers = {}
            for budget in budgets:
                config = PQConfig(budget=budget, selection=args.selection, block_size=args.block_size)
                cache, _ = index_prefilled(model, dense_cache, config)
                configure(model, config)
                tokens, _ = greedy_decode(model, first, cache, 8, stop)
                answers[f"pqcache {budget}"] = tokenizer.decode(tokens, skip_special_tokens=True)
            model.set_attn_implementation("sdpa")
            tokens, _ = greedy_decode(model, first, dense_cache, 8, stop)
            answers["full"] = tokenizer.decode(tokens, skip_special_tokens=True)
            row = dict(n_tokens=prompt.n_tokens, depth=depth, passkey=prompt.passkey,
                       found={k: passkey_found(v, prompt.passkey) for k, v in answers.items()}, answers=answers,
                       seconds=time.perf_counter() - t0)
            rows.append(row)
            print(json.dumps(row), flush=True)
    methods = ["full"] + [f"pqcache {b}" for b in budgets]
    print(f"{'tokens':>7} " + " ".join(f"{m:>14}" for m in methods))
    for n in lengths:
        sel = [r for r in rows if abs(r["n_tokens"] - n) <= n * 0.02]
        print(f"{n:>7} " + " ".join(f"{sum(r['found'][m] for r in sel):>12}/{len(sel)}" for m in methods))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
