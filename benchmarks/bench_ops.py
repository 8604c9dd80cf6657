"""Benchmark of pqflex's ops on one GPU: score + select (pq_select), encode and k-means.

Shapes: Llama-3.1-8B attention (Hkv=8, G=4, D=128), M=2, nbits=6, bf16, B=1. Every timing follows a correctness
check. Times are medians of CUDA-graph replays (what a compiled decode step pays) and of eager calls
(``triton.testing.do_bench``, launch overhead included). Usage::

    python benchmarks/bench_ops.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import triton
import transformers

from pqflex.harness.bench import graph_time_us
from pqflex.ops import portable
from pqflex.ops.kmeans import kmeans_triton
from pqflex.ops.pq_select import pq_select_cells
from pqflex.quantizer import ProductQuantizer

B, HKV, G, D, M, NBITS = 1, 8, 4, 128, 2, 6
SINK, SCALE = 32, D ** -0.5
DENSE_PREFILL_S = {32768: 1.40, 131072: 11.7}  # Llama-3.1-8B, H100, transformers SDPA (issue #4)


def eager_time_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def torch_select(ip_table, codes, lo, hi, k):
    """Plain torch: ADC scores, per-head softmax over the candidates, group sum, torch.topk."""
    scores = portable.adc_scores(ip_table, codes) * SCALE  # [B, Hkv, G, N]
    pos = torch.arange(codes.shape[2], device=codes.device)
    cand = (pos >= lo[:, None, None, None]) & (pos < hi[:, None, None, None])
    probs = torch.softmax(scores.masked_fill(~cand, float("-inf")), dim=-1).sum(2)  # [B, Hkv, N]
    return probs.topk(k, dim=-1).indices


def check_selection(out, ref, ip_table, codes, lo, hi):
    """Same number selected and the same multiset of scores as the reference (ties aside)."""
    scores = portable.adc_scores(ip_table, codes)[:, :, :, None] * SCALE
    pos = torch.arange(codes.shape[2], device=codes.device)
    cand = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None]
    agg = portable.gqa_scores(scores, cand)[:, :, 0]  # [B, Hkv, N]
    for row_out, row_ref, row_s in zip(out.flatten(0, 1), ref.flatten(0, 1), agg.flatten(0, 1)):
        a, b = row_out[row_out >= 0].long(), row_ref[row_ref >= 0].long()
        assert a.numel() == b.numel() and a.unique().numel() == a.numel()
        torch.testing.assert_close(row_s[a].sort().values, row_s[b].sort().values, rtol=1e-4, atol=1e-6)


def bench_select(n: int, frac: float, gen: torch.Generator) -> dict:
    dev = "cuda"
    keys = torch.randn(B, HKV, n, D, generator=gen).to(dev, torch.bfloat16)
    pq = ProductQuantizer(D, M, NBITS).train(keys[:, :, : min(n, 8192)], niter=5)
    codes = pq.encode(keys)  # [B, Hkv, N, M]
    query = torch.randn(B, HKV, G, D, generator=gen).to(dev, torch.bfloat16)
    ip_table = pq.compute_ip_table(query)  # [B, Hkv, G, M, ksub] fp32
    k = int(n * frac)
    lo = torch.full((B,), SINK, device=dev)
    hi = torch.full((B,), n - k, device=dev)  # the recent window holds as many tokens as the top-k
    topk = torch.full((B,), k, device=dev)
    spans = torch.tensor([[0, SINK, k]] * B, device=dev)  # candidates [SINK, n - k), as lo and hi say

    out = torch.ops.pqflex.pq_select(query, pq.centroids, codes, spans, topk, None, k, SCALE)
    check_selection(out, portable.pq_select(ip_table, codes, lo, hi, topk, k, SCALE), ip_table, codes, lo, hi)

    def fast():
        torch.ops.pqflex.pq_select(query, pq.centroids, codes, spans, topk, None, k, SCALE)

    def plain():
        torch_select(ip_table, codes, lo, hi, k)

    t_fast_graph, t_fast = graph_time_us(fast), eager_time_us(fast)
    warps = {w: graph_time_us(lambda: pq_select_cells(ip_table, codes, lo, hi, topk, k, SCALE, plan_warps=w))
             for w in (4, 16)}
    t_plain_graph, t_plain = graph_time_us(plain), eager_time_us(plain)
    bytes_moved = codes.numel() + B * HKV * k * 4 + ip_table.numel() * 4
    return dict(N=n, topk=k, select_graph_us=t_fast_graph, select_eager_us=t_fast,
                torch_graph_us=t_plain_graph, torch_eager_us=t_plain, speedup_graph=t_plain_graph / t_fast_graph,
                plan_warps4_graph_us=warps[4], plan_warps16_graph_us=warps[16], bytes=bytes_moved,
                floor_us=bytes_moved / 3.0e12 * 1e6,
                achieved_GBps=bytes_moved / (t_fast_graph * 1e-6) / 1e9)


def bench_index_build(n: int, gen: torch.Generator, layers: int = 32, niter: int = 20) -> dict:
    """k-means (Triton) on the middle keys + encode of all keys, one layer, times 32 layers."""
    dev = "cuda"
    centers = torch.randn(HKV, 64, D, generator=gen)
    keys = centers.gather(1, torch.randint(64, (HKV, n, 1), generator=gen).expand(HKV, n, D))
    keys = (keys + 0.5 * torch.randn(HKV, n, D, generator=gen))[None].to(dev, torch.bfloat16)
    mask = torch.zeros(B, HKV, n, dtype=torch.bool, device=dev)
    mask[..., SINK: n - n // 20] = True

    def build():
        pq = ProductQuantizer(D, M, NBITS).train(keys, mask, niter=niter)
        return pq, pq.encode(keys)

    build()
    torch.cuda.synchronize()
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        pq, codes = build()
    torch.cuda.synchronize()
    per_layer_s = (time.perf_counter() - t0) / reps

    # Reconstruction error of the Triton k-means vs the reference k-means at the same settings (same init).
    sub = keys[0].float().view(HKV, n, M, D // M).transpose(1, 2).reshape(HKV * M, n, D // M)
    sub_mask = mask[0][:, None].expand(HKV, M, n).reshape(HKV * M, n)
    errors = {}
    for name, c in (("triton", kmeans_triton(sub, sub_mask, 1 << NBITS, niter)),
                    ("reference", portable.kmeans(sub, sub_mask, 1 << NBITS, niter))):
        assign = portable.encode(sub, c)
        recon = torch.gather(c, 1, assign[..., None].expand(-1, -1, D // M))
        errors[name] = ((sub - recon).pow(2).sum(-1) * sub_mask).sum().item() / sub_mask.sum().item()
    total = per_layer_s * layers
    row = dict(N=n, niter=niter, per_layer_ms=per_layer_s * 1e3, all_layers_ms=total * 1e3,
               recon_err_triton=errors["triton"], recon_err_reference=errors["reference"])
    if n in DENSE_PREFILL_S:
        row["pct_of_dense_prefill"] = 100 * total / DENSE_PREFILL_S[n]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--no-build", action="store_true", help="skip the index-build (k-means + encode) rows")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one index build")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.profile:
        keys = torch.randn(B, HKV, 32768, D, device="cuda", dtype=torch.bfloat16)
        ProductQuantizer(D, M, NBITS).train(keys).encode(keys)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            ProductQuantizer(D, M, NBITS).train(keys).encode(keys)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))
    env = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, python=platform.python_version())
    lengths = [int(x) for x in args.lengths.split(",")]
    select = [bench_select(n, frac, gen) for n in lengths for frac in (0.05, 0.1)]
    build = [bench_index_build(n, gen, niter=it) for n in lengths if n >= 32768 and not args.no_build
             for it in (10, 20)]
    result = dict(env=env, shape=dict(B=B, Hkv=HKV, G=G, D=D, M=M, nbits=NBITS, dtype="bfloat16"),
                  select=select, index_build=build)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(env))
    print(f"{'N':>7} {'topk':>6} {'select us (graph/eager)':>24} {'torch us (graph/eager)':>23} {'x':>5} "
          f"{'floor us':>8} {'GB/s':>6} {'4w/16w us':>12}")
    for r in select:
        print(f"{r['N']:>7} {r['topk']:>6} {r['select_graph_us']:>11.1f} / {r['select_eager_us']:<10.1f}"
              f"{r['torch_graph_us']:>11.1f} / {r['torch_eager_us']:<9.1f}{r['speedup_graph']:>5.1f} "
              f"{r['floor_us']:>8.2f} {r['achieved_GBps']:>6.0f} {r['plan_warps4_graph_us']:>5.1f}/"
              f"{r['plan_warps16_graph_us']:<5.1f}")
    print(f"{'N':>7} {'niter':>5} {'kmeans+encode ms/layer':>23} {'32 layers ms':>13} {'% dense prefill':>16} "
          f"{'recon err triton/ref':>22}")
    for r in build:
        print(f"{r['N']:>7} {r['niter']:>5} {r['per_layer_ms']:>23.2f} {r['all_layers_ms']:>13.1f} "
              f"{r.get('pct_of_dense_prefill', float('nan')):>16.2f} "
              f"{r['recon_err_triton']:>10.4f} / {r['recon_err_reference']:<10.4f}")


if __name__ == "__main__":
    main()
