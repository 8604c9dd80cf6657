"""Demos behind ``pqflex demo``."""

from __future__ import annotations

import time

import torch

from pqflex.config import PQConfig
from pqflex.index import PQIndex
from pqflex.ops import reference


def synthetic_demo(n_ctx: int = 8192, budget: float | int = 0.1, seed: int = 0) -> dict:
    """PQ retrieval on synthetic clustered keys with a planted needle; prints the selection and the error.

    Shapes follow Llama-3.1-8B's attention (8 KV heads, 4 query heads each, head dim 128), one layer.
    """
    B, Hkv, G, D = 1, 8, 4, 128
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(Hkv, 64, D, generator=g)
    key = centers.gather(1, torch.randint(64, (Hkv, n_ctx, 1), generator=g).expand(Hkv, n_ctx, D))
    key = (key + 0.4 * torch.randn(Hkv, n_ctx, D, generator=g))[None]  # [B, Hkv, N, D]
    value = torch.randn(B, Hkv, n_ctx, D, generator=g)
    query = torch.randn(B, Hkv * G, 1, D, generator=g)
    needle = n_ctx // 3
    direction = query[0, :, 0].reshape(Hkv, G, D).mean(1)  # [Hkv, D]
    key[0, :, needle] = 2.5 * direction / direction.norm(dim=-1, keepdim=True) * key[0].norm(dim=-1).mean()

    config = PQConfig(budget=budget)
    scale = D ** -0.5
    t0 = time.perf_counter()
    index = PQIndex.build(key, config)
    t1 = time.perf_counter()
    attend = index.plan(query, scale)  # [B, Hkv, 1, N]
    out = reference.masked_attention(query, key, value, attend, scale)
    t2 = time.perf_counter()
    dense = reference.masked_attention(query, key, value, torch.ones_like(attend), scale)

    b = config.resolve_budget(n_ctx)
    rel_err = ((out - dense).norm() / dense.norm()).item()
    found = attend[0, :, 0, needle].tolist()
    print(f"context {n_ctx} tokens, {Hkv} KV heads x {G} query heads, head dim {D}")
    print(f"config: M={config.M} nbits={config.nbits} budget={budget} -> sink {b.sink_size} + recent "
          f"{b.recent_size} + top-k {b.topk} = {b.total} tokens per KV head ({b.total / n_ctx:.1%})")
    print(f"index build (k-means {config.niter} iters + encode): {t1 - t0:.2f} s; select + attend: "
          f"{(t2 - t1) * 1e3:.1f} ms (CPU reference)")
    print(f"PQ codes: {index.codes.numel()} bytes vs {key.numel() * 2} bytes of bf16 keys")
    print(f"needle at position {needle} selected by {sum(found)}/{Hkv} KV heads")
    print(f"relative error vs dense attention: {rel_err:.4f}")
    return {"rel_err": rel_err, "needle_found": found, "budget": b._asdict()}
