"""Benchmark of the fused sparse decode attention (``torch.ops.pqflex.sparse_decode_attention``) on one GPU.

First runs the gpu tests of the op, then times, for the Llama-3.1-8B attention shape (Hkv=8, G=4, D=128, bf16) at
B in {1, 8} and cache length C in {32768, 131072} with T = C // 10 listed tokens (random distinct positions):

- ``op``: the new op (valid=None), and ``op+mask`` with an all-True ``valid``;
- ``gather``: :class:`pqflex.ops.backends.GatherAttention` (copy the listed rows, then SDPA; valid=None);
- ``sdpa``: dense ``F.scaled_dot_product_attention`` over the whole cache (``enable_gqa``);
- ``select``: :func:`pqflex.ops.pq_select.pq_select_triton` at the same shape (M=2, nbits=6, random codes), so
  that select + attend can be read against the issue's target;

and sweeps the op's tuning knobs (splits, BLOCK_T, warps, stages); it also prints the device time of each kernel
of one op call (profiler) and the cost of one tiny kernel in a CUDA graph. Every timing follows a correctness
check. Times are medians of CUDA-graph replays (:func:`pqflex.harness.bench.graph_time_us`); the op and gather
calls rotate over 10 disjoint token lists, whose rows together exceed the L2 cache, so the numbers are DRAM
numbers. The byte floor is the listed K and V rows plus the indices over the card's datasheet bandwidth. Usage::

    PYTHONPATH=. python benchmarks/bench_sparse_attention.py [--no-tests] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton

from pqflex.harness.bench import graph_time_us
from pqflex.ops import portable
from pqflex.ops.pq_select import pq_select_triton
from pqflex.ops.sparse_attention import sparse_decode_attention_triton, tokens_per_split
from pqflex.ops.backends import GatherAttention

HKV, G, D, DTYPE = 8, 4, 128, torch.bfloat16
SCALE = D ** -0.5
ROTATE = 10  # disjoint token lists per timing
DATASHEET_TBPS = {"H200": 4.8, "H100": 3.35}
# (block_t, num_warps, num_stages) x splits (None: the launcher's choice)
SWEEP_KERNEL = [(64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 8, 2)]
SWEEP_SPLITS = {1: [None, 16, 32, 64, 128], 8: [None, 4, 8, 16]}


def run_tests(timeout_s: float = 200) -> int:
    """The op's gpu tests, output to $OUT/pytest.log when set; returns pytest's exit code."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-n", "4",
                               "tests/test_sparse_attention.py"], capture_output=True, text=True, timeout=timeout_s)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log, rc = f"{exc.stdout or ''}\n{exc.stderr or ''}\ngpu tests: timed out after {timeout_s} s", -1
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "pytest.log"), "w") as f:
            f.write(log)
    print("\n".join(log.strip().splitlines()[-25:]))
    print(f"gpu tests: exit code {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return rc


def card_bandwidth() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    tbps = next((v for k, v in DATASHEET_TBPS.items() if k in name), None)
    return name, tbps


def rotating(fns):
    """One callable that runs ``fns`` in turn (each CUDA-graph capture then holds all of them)."""
    state = itertools.count()
    return lambda: fns[next(state) % len(fns)]()


def kernel_breakdown(fn, calls: int = 20) -> dict[str, float]:
    """Mean device time (us) of each kernel that ``calls`` eager calls of ``fn`` launch, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total and e.count:
            times[e.key[:48]] = total / calls
    return times


def err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def bench_shape(B: int, C: int, tbps: float | None, sweep: bool) -> tuple[list[dict], list[dict]]:
    T = C // 10
    gen = torch.Generator(device="cuda").manual_seed(B * C)
    dev = "cuda"
    key = torch.randn(B, HKV, C, D, device=dev, dtype=DTYPE, generator=gen)
    value = torch.randn(B, HKV, C, D, device=dev, dtype=DTYPE, generator=gen)
    query = torch.randn(B, 1, HKV * G, D, device=dev, dtype=DTYPE, generator=gen).transpose(1, 2)  # [B, H, 1, D]
    perm = torch.rand(B, HKV, C, device=dev, generator=gen).argsort(-1)  # [B, HKV, C]
    lists = [perm[..., i * T:(i + 1) * T].contiguous() for i in range(ROTATE)]  # disjoint [B, HKV, T] lists
    all_valid = torch.ones(B, HKV, T, dtype=torch.bool, device=dev)

    # Correctness first: the 2x rule against the fp32 reference, on the first list.
    idx = lists[0]
    ref32 = portable.sparse_decode_attention(query.float(), key.float(), value.float(), idx, None, SCALE)
    ref_lp = portable.sparse_decode_attention(query, key, value, idx, None, SCALE)
    out = torch.ops.pqflex.sparse_decode_attention(query, key, value, idx, None, SCALE)
    out_mask = torch.ops.pqflex.sparse_decode_attention(query, key, value, idx, all_valid, SCALE)
    out_gather = GatherAttention()(query, key, value, idx, None, SCALE)
    e_lp = err(ref_lp, ref32)
    errors = {"op": err(out, ref32), "op+mask": err(out_mask, ref32), "gather": err(out_gather, ref32)}
    for name, e in errors.items():
        assert e <= 2 * e_lp + 1e-5, f"{name}: err {e:.3g} > 2 * {e_lp:.3g} + 1e-5 at B={B} C={C}"

    floor_bytes = B * HKV * T * (2 * D * key.element_size() + idx.element_size())
    dense_bytes = 2 * B * HKV * C * D * key.element_size()
    floor_us = floor_bytes / (tbps * 1e12) * 1e6 if tbps else None

    def row(method, us, nbytes=floor_bytes, **extra):
        return dict(B=B, C=C, T=T, method=method, us=us, GBps=nbytes / (us * 1e-6) / 1e9, floor_us=floor_us,
                    **extra)

    op = torch.ops.pqflex.sparse_decode_attention
    rows = [
        row("op", graph_time_us(rotating([lambda i=i: op(query, key, value, i, None, SCALE) for i in lists])),
            err=errors["op"], splits=triton.cdiv(T, tokens_per_split(T, B * HKV, 64, key.device))),
        row("op+mask", graph_time_us(rotating([lambda i=i: op(query, key, value, i, all_valid, SCALE)
                                               for i in lists])), err=errors["op+mask"]),
        row("gather", graph_time_us(rotating([lambda i=i: GatherAttention()(query, key, value, i, None, SCALE)
                                              for i in lists])), err=errors["gather"]),
        row("sdpa", graph_time_us(lambda: F.scaled_dot_product_attention(query, key, value, scale=SCALE,
                                                                         enable_gqa=True)), nbytes=dense_bytes),
    ]

    # pq_select at this shape: random codes, top-k of the middle tokens.
    M, nbits, sink = 2, 6, 32
    codes = torch.randint(0, 1 << nbits, (B, HKV, C, M), device=dev, dtype=torch.uint8, generator=gen)
    ip_table = torch.randn(B, HKV, G, M, 1 << nbits, device=dev, generator=gen)
    k = T - 2 * sink
    lo, hi = torch.full((B,), sink, device=dev), torch.full((B,), C - sink, device=dev)
    topk = torch.full((B,), k, device=dev)
    sel = pq_select_triton(ip_table, codes, lo, hi, topk, k, SCALE)
    assert ((sel >= 0).sum(-1) == k).all()
    select_bytes = codes.numel() + B * HKV * k * 4
    rows.append(row("select", graph_time_us(lambda: pq_select_triton(ip_table, codes, lo, hi, topk, k, SCALE)),
                    nbytes=select_bytes))

    breakdown = kernel_breakdown(rotating([lambda i=i: op(query, key, value, i, None, SCALE) for i in lists]))
    print(f"B={B} C={C} kernels of one op call (profiler, eager):",
          ", ".join(f"{k}: {v:.1f} us" for k, v in breakdown.items()), flush=True)

    tuned = []
    if sweep:
        for (block_t, warps, stages), splits in itertools.product(SWEEP_KERNEL, SWEEP_SPLITS[B]):
            def call(i, block_t=block_t, warps=warps, stages=stages, splits=splits):
                return sparse_decode_attention_triton(query, key, value, i, None, SCALE, num_splits=splits,
                                                      block_t=block_t, num_warps=warps, num_stages=stages)
            cfg = dict(block_t=block_t, warps=warps, stages=stages, splits=splits)
            try:
                e = err(call(idx), ref32)
                assert e <= 2 * e_lp + 1e-5, f"err {e:.3g}"
                tuned.append(row("op", graph_time_us(rotating([lambda i=i: call(i) for i in lists])), err=e, **cfg))
            except Exception as exc:  # e.g. out of shared memory: report and go on
                print(f"  sweep B={B} C={C} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
    del key, value
    torch.cuda.empty_cache()
    return rows, tuned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-tests", action="store_true", help="skip the gpu tests")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tuning sweep")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    rc = None if args.no_tests else run_tests()
    card, tbps = card_bandwidth()
    env = dict(card=card, torch=torch.__version__, triton=triton.__version__,
               sms=torch.cuda.get_device_properties(0).multi_processor_count, datasheet_TBps=tbps, tests_rc=rc)
    print(env, flush=True)
    tiny = torch.zeros(1, device="cuda")
    env["graph_tiny_kernel_us"] = graph_time_us(lambda: tiny.add_(1))
    print(f"one tiny kernel in a CUDA graph: {env['graph_tiny_kernel_us']:.2f} us", flush=True)
    out = args.out or (os.path.join(os.environ["OUT"], "bench_sparse_attention.json") if os.environ.get("OUT")
                       else None)
    rows, tuned = [], []
    for B, C in [(1, 32768), (1, 131072), (8, 32768), (8, 131072)]:
        r, t = bench_shape(B, C, tbps, sweep=not args.no_sweep)
        rows += r
        tuned += t
        print(f"B={B} C={C} done", flush=True)
        if out:  # after every shape, so a run cut short keeps what it measured
            with open(out, "w") as f:
                json.dump(dict(environment=env, rows=rows, sweep=tuned), f, indent=1)

    if tuned:
        print("\nsweep (op, valid=None): the 4 fastest settings of each shape, and the default (splits=None)")
        for (B, C), group in itertools.groupby(tuned, key=lambda r: (r["B"], r["C"])):
            group = sorted(group, key=lambda r: r["us"])
            default = [r for r in group if r["splits"] is None and r["block_t"] == 64 and r["stages"] == 2]
            for r in group[:4] + [r for r in default if r not in group[:4]]:
                print(f"  B={B} C={C:6d} block_t={r['block_t']:3d} warps={r['warps']} stages={r['stages']} "
                      f"splits={r['splits']!s:4s} {r['us']:7.1f} us {r['GBps']:6.0f} GB/s")
    print(f"\n{card}, torch {torch.__version__}, triton {triton.__version__}, datasheet {tbps} TB/s; "
          f"Hkv={HKV} G={G} D={D} bf16, T = C // 10; gpu tests exit code {rc}")
    print(f"{'B':>2} {'C':>7} {'T':>6} {'method':8s} {'us':>8} {'GB/s':>7} {'floor us':>8} {'max err':>9}")
    for r in rows:
        floor = f"{r['floor_us']:8.1f}" if r["floor_us"] else "       -"
        e = f"{r['err']:9.2e}" if "err" in r else "        -"
        print(f"{r['B']:2d} {r['C']:7d} {r['T']:6d} {r['method']:8s} {r['us']:8.1f} {r['GBps']:7.0f} {floor} {e}")


if __name__ == "__main__":
    main()
