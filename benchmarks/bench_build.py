"""Index build time on the GPU: `PQIndex.build_layers` for all layers of a Llama-3.1-8B-shaped prompt (issue #12).

What a cache pays once per prompt, between the prefill and the first decode step (TTFT). Keys: clustered random
vectors (:func:`tests.helpers.clustered_keys`), bf16, ``[1, 8, N, 128]`` per layer, 32 layers. One untimed build
first (Triton JIT), then the median of ``--repeats`` builds per variant of ``train_points`` x ``niter``; the
default variant is also profiled (``torch.profiler``, CUDA time per kernel; the top rows are printed). Usage::

    PYTHONPATH=. python benchmarks/bench_build.py --contexts 32768 131072 --json build.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pqflex import PQConfig
from pqflex.index import PQIndex
from tests.helpers import clustered_keys

LAYERS, HKV, D = 32, 8, 128
VARIANTS = [dict(train_points=64, niter=10), dict(train_points=32, niter=10), dict(train_points=64, niter=5),
            dict(train_points=16, niter=10)]


def build_seconds(keys: list[torch.Tensor], config: PQConfig, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        PQIndex.build_layers(keys, config)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(keys: list[torch.Tensor], config: PQConfig, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        PQIndex.build_layers(keys, config)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def kernel_tiles(keys: list[torch.Tensor], repeats: int) -> list[dict]:
    """The default build's k-means (every layer's training keys, one batched call) with other tiles of the step
    kernel (points per tile x warps x programs per problem)."""
    from pqflex.ops.kmeans import kmeans_triton

    config = PQConfig()
    samples = [PQIndex.training_keys(k, config) for k in keys]
    dsub = keys[0].shape[-1] // config.M
    x = torch.stack([s[0] for s in samples])  # [L, B, Hkv, T, D] -> problems of dsub dims per sub-space
    mask = torch.stack([s[1] for s in samples])
    T = x.shape[-2]
    x = x.reshape(-1, T, config.M, dsub).transpose(1, 2).reshape(-1, T, dsub)
    mask = mask.reshape(-1, 1, T).expand(-1, config.M, T).reshape(-1, T)
    rows = []
    for block, warps, programs in [(128, 4, 16), (32, 4, 16), (32, 2, 16), (16, 4, 16), (16, 2, 16), (32, 4, 64)]:
        def run():
            kmeans_triton(x, mask, config.ksub, config.niter, config.seed, config.tol, block_n=block,
                          num_warps=warps, programs_per_problem=programs)
            torch.cuda.synchronize()

        run()  # JIT of this tile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        rows.append(dict(block_n=block, num_warps=warps, programs=programs, kmeans_seconds=s))
        print(f"| tile {block} points, {warps} warps, {programs} programs/problem | {s * 1e3:.1f} ms |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiles", action="store_true", help="also time other k-means kernel tiles")
    parser.add_argument("--json")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    rows, tiles = [], []
    for n in args.contexts:
        keys = [clustered_keys(1, HKV, n, D, generator=g).to("cuda", torch.bfloat16) for _ in range(LAYERS)]
        PQIndex.build_layers(keys, PQConfig())  # JIT
        print(f"context {n}: default build profile\n{profile(keys, PQConfig())}", flush=True)
        if args.tiles:
            tiles.extend(dict(context=n, **r) for r in kernel_tiles(keys, args.repeats))
        for variant in VARIANTS:
            s = build_seconds(keys, PQConfig(**variant), args.repeats)
            rows.append(dict(context=n, **variant, seconds=s))
            print(f"| {n} | {variant['train_points']} | {variant['niter']} | {s * 1e3:.1f} ms |", flush=True)
        del keys
        torch.cuda.empty_cache()
    print("| context | train_points | niter | build (32 layers) |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['context']} | {r['train_points']} | {r['niter']} | {r['seconds'] * 1e3:.1f} ms |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "tiles": tiles}, f,
                      indent=1)


if __name__ == "__main__":
    main()
