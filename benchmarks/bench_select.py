"""Benchmark of pq_select over PQ settings: the radix path, the cells path (where it applies) and plain torch.

Shapes: Llama-3.1-8B attention (Hkv=8, G=4, D=128), batch 1 and 8, contexts 32K and 128K, candidates
``[32, N - N/20)`` (sink 32, recent window N/20) and top-k N/20. Keys are clustered random vectors, quantized by
:class:`pqflex.quantizer.ProductQuantizer` (5 k-means iterations on the first 8192 keys). The GPU tests of
``tests/test_pq_select.py`` run first; every timing follows a correctness check against the reference. Times are
medians of CUDA-graph replays (what a compiled decode step pays). Usage::

    PYTHONPATH=. python benchmarks/bench_select.py [--out results.json] [--no-tests]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys

import torch
import triton

from benchmarks.bench_ops import torch_select
from benchmarks.bench_sparse_attention import kernel_breakdown
from pqflex.ops import portable
from pqflex.ops.pq_select import pq_select_cells, pq_select_radix, pq_select_triton, use_cells
from pqflex.quantizer import ProductQuantizer

HKV, G, D, SINK = 8, 4, 128, 32
SCALE = D ** -0.5
SETTINGS = [(2, 6), (4, 4), (4, 6), (4, 8), (8, 6), (8, 8), (16, 8)]
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, datasheet
PROFILED = [(2, 6), (8, 8), (16, 8)]  # settings whose kernels are timed one by one


def graph_us(fn, budget_ms: float = 3.0, replays: int = 25) -> float:
    """Median time of one call of ``fn``: CUDA-graph replays of as many calls as fit in ``budget_ms``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
    end.synchronize()
    torch.cuda.current_stream().wait_stream(stream)
    calls = max(1, min(20, int(budget_ms / max(start.elapsed_time(end) / 3, 1e-3))))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def check_selection(out, args):
    """Same number selected per row and the same multiset of reference scores as the reference (ties aside)."""
    ip_table, codes, lo, hi, topk, k_max, scale = args
    ref = portable.pq_select(*args)
    scores = portable.adc_scores(ip_table, codes)[:, :, :, None] * scale
    pos = torch.arange(codes.shape[2], device=codes.device)
    cand = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None]
    agg = portable.gqa_scores(scores, cand)[:, :, 0]  # [B, Hkv, N]
    assert torch.equal((out >= 0).sum(-1), (ref >= 0).sum(-1))
    for row_out, row_ref, row_s in zip(out.flatten(0, 1), ref.flatten(0, 1), agg.flatten(0, 1)):
        a, b = row_out[row_out >= 0].long(), row_ref[row_ref >= 0].long()
        assert a.unique().numel() == a.numel() and (row_s[a] >= 0).all()
        torch.testing.assert_close(row_s[a].sort().values, row_s[b].sort().values, rtol=1e-4, atol=1e-6)


def clustered_keys(B: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, Hkv, n, D]`` bf16 keys around 256 centers per head (real keys cluster; scores are skewed)."""
    centers = torch.randn(B, HKV, 256, D, device="cuda", generator=gen) * 2
    assign = torch.randint(256, (B, HKV, n), device="cuda", generator=gen)
    keys = centers.gather(2, assign[..., None].expand(B, HKV, n, D))
    return (keys + torch.randn(B, HKV, n, D, device="cuda", generator=gen)).to(torch.bfloat16)


def bucket_sizes(args) -> dict:
    """Mean sizes per row of the radix lists (from the reference's scores): tokens in the k-th key's 12-bit
    bucket (list 1), in its 24-bit bucket (list 2), and tied with it."""
    ip_table, codes, lo, hi, topk, k_max, scale = args
    scores = portable.adc_scores(ip_table, codes)[:, :, :, None] * scale
    pos = torch.arange(codes.shape[2], device=codes.device)
    cand = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None]
    agg = portable.gqa_scores(scores, cand)[:, :, 0]  # [B, Hkv, N], -1 outside
    key = agg.clamp(min=0).view(torch.int32).masked_fill(agg < 0, -1)
    kth = key.topk(k_max, dim=-1).values[..., -1:]  # [B, Hkv, 1]
    sizes = {}
    for name, shift in (("list1", 19), ("list2", 7), ("ties", 0)):
        sizes[name] = ((key >= 0) & ((key >> shift) == (kth >> shift))).sum(-1).float().mean().item()
    return sizes


def bench(n: int, batch: int, codes: torch.Tensor, ip_table: torch.Tensor, M: int, nbits: int, bw: float) -> dict:
    codes, ip_table = codes[:batch].contiguous(), ip_table[:batch].contiguous()
    k = n // 20
    lo = torch.full((batch,), SINK, device="cuda")
    hi = torch.full((batch,), n - n // 20, device="cuda")
    topk = torch.full((batch,), k, device="cuda")
    args = (ip_table, codes, lo, hi, topk, k, SCALE)
    row = dict(N=n, B=batch, M=M, nbits=nbits, topk=k)
    variants = {"op": lambda: pq_select_triton(*args), "radix": lambda: pq_select_radix(*args)}
    if M * nbits <= 12:
        variants["cells"] = lambda: pq_select_cells(*args)
    for name, fn in variants.items():
        check_selection(fn(), args)
        row[f"{name}_us"] = graph_us(fn)
    row["torch_us"] = graph_us(lambda: torch_select(ip_table, codes, lo, hi, k))
    cand_bytes = batch * HKV * (n - n // 20 - SINK) * M
    row["floor_us"] = (cand_bytes + batch * HKV * k * 4) / bw * 1e6
    row["op_GBps"] = cand_bytes / (row["op_us"] * 1e-6) / 1e9
    row["dispatch"] = "cells" if use_cells(M, nbits) else "radix"
    if batch == 1:
        row.update(bucket_sizes(args))
    if (M, nbits) in PROFILED:
        row["kernels_us"] = kernel_breakdown(lambda: pq_select_radix(*args))
    if (M, nbits) == (8, 8):  # the knobs of the radix path
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for per_sm in (2, 8):
            split = max(1, per_sm * sms // (batch * HKV))
            row[f"split_{per_sm}_per_sm_us"] = graph_us(lambda: pq_select_radix(*args, split=split))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--no-tests", action="store_true", help="skip the GPU tests")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--test-timeout", type=int, default=600, help="seconds for the GPU tests")
    args = parser.parse_args()
    tests = "skipped"
    if not args.no_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", "tests/test_pq_select.py"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.test_timeout)
            tests = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
            print(proc.stdout[-3000:], proc.stderr[-2000:], flush=True)
        except subprocess.TimeoutExpired as e:
            tests = f"timed out after {args.test_timeout} s"
            print(tests, (e.stdout or b"")[-3000:], flush=True)
    card = torch.cuda.get_device_name()
    bw = next((v for name, v in BANDWIDTH.items() if name in card), 3.35e12)
    env = dict(card=card, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               bandwidth_TBps=bw / 1e12, gpu_tests=tests)
    print(json.dumps(env), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        keys = clustered_keys(8, n, gen)  # [8, Hkv, N, D]
        query = torch.randn(8, HKV, G, D, device="cuda", generator=gen).to(torch.bfloat16)
        for M, nbits in SETTINGS:
            pq = ProductQuantizer(D, M, nbits).train(keys[:, :, :8192], niter=5)
            codes, ip_table = pq.encode(keys), pq.compute_ip_table(query)  # [8, Hkv, N, M], [8, Hkv, G, M, ksub]
            for batch in (1, 8):
                rows.append(bench(n, batch, codes, ip_table, M, nbits, bw))
                print(json.dumps(rows[-1]), flush=True)
            del codes, pq
        del keys
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=2)
    for r in rows:
        if "kernels_us" in r:
            print(r["N"], r["B"], r["M"], r["nbits"], json.dumps({k: round(v, 1) for k, v in r["kernels_us"].items()}))
        if "list1" in r:
            print(r["N"], r["B"], r["M"], r["nbits"], "lists", round(r["list1"]), round(r["list2"]), round(r["ties"]))
        knobs = {k: round(v, 1) for k, v in r.items() if k.startswith("split_")}
        if knobs:
            print(r["N"], r["B"], r["M"], r["nbits"], "knobs", json.dumps(knobs))
    print(json.dumps(env))
    print("us per call (CUDA-graph replays); x = torch / best path; floor = codes bytes / bandwidth")
    print(f"{'N':>7} {'B':>2} {'M':>3} {'nb':>3} {'op':>7} {'radix':>7} {'cells':>7} {'torch':>8} {'x':>5} "
          f"{'floor':>6} {'GB/s':>6} dispatch")
    for r in rows:
        best = min(r["radix_us"], r.get("cells_us", float("inf")))
        print(f"{r['N']:>7} {r['B']:>2} {r['M']:>3} {r['nbits']:>3} {r['op_us']:>7.1f} {r['radix_us']:>7.1f} "
              f"{r.get('cells_us', float('nan')):>7.1f} {r['torch_us']:>8.1f} {r['torch_us'] / best:>5.1f} "
              f"{r['floor_us']:>6.2f} {r['op_GBps']:>6.0f} {r['dispatch']}")


if __name__ == "__main__":
    main()
