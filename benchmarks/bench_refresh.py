"""Cost of an index refresh (``PQConfig(refresh=N)``, issue #29 item 4): :meth:`pqflex.PQIndex.refresh` of one layer.

A refresh retrains a layer's centroids on its cached keys (warm-started k-means, ``refresh_niter`` iterations on at
most ``train_points * ksub`` keys per KV head) and encodes every cached key again; it runs between two decode steps,
for every layer. This times one layer's refresh over ``[B, Hkv, N, D]`` clustered random keys (the default model
shape: Llama-3.1-8B's 8 KV heads of 128 dims, 32 layers), the median of ``--repeats`` after one untimed call, then
:meth:`pqflex.PQIndex.refresh_layers` of ``--layers`` such indexes at once (one batched k-means: what a
``DecodeGraph`` step runs when every layer is due), and reports what the whole model pays per refresh both ways,
and per decoded token at each interval (batched). Usage::

    PYTHONPATH=. python benchmarks/bench_refresh.py --device cuda --contexts 32768 131072 --json refresh.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pqflex import PQConfig, PQIndex
from tests.helpers import clustered_keys


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def refresh_seconds(key: torch.Tensor, config: PQConfig, repeats: int) -> float:
    """Median seconds of one refresh over every key of ``key`` (the last ``new`` tokens appended after the prompt)."""
    N = key.shape[2]
    index = PQIndex.build(key, config)
    index.refresh(key, N)  # untimed: Triton JIT, allocator
    times = []
    for _ in range(repeats):
        sync(key.device)
        t0 = time.perf_counter()
        index.refresh(key, N)
        sync(key.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def refresh_layers_seconds(key: torch.Tensor, config: PQConfig, layers: int, repeats: int) -> float:
    """Median seconds of one :meth:`PQIndex.refresh_layers` over ``layers`` indexes of the same keys (what a
    :class:`pqflex.DecodeGraph` step runs when every layer is due)."""
    N = key.shape[2]
    keys = [key] * layers
    indexes = PQIndex.build_layers(keys, config)
    PQIndex.refresh_layers(indexes, keys, N)  # untimed
    times = []
    for _ in range(repeats):
        sync(key.device)
        t0 = time.perf_counter()
        PQIndex.refresh_layers(indexes, keys, N)
        sync(key.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--niters", type=int, nargs="+", default=[3, 10], help="refresh_niter values to time")
    p.add_argument("--intervals", type=int, nargs="+", default=[256, 512], help="refresh intervals to report")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rows = []
    for N in a.contexts:
        key = clustered_keys(1, a.kv_heads, N, a.head_dim, generator=torch.Generator().manual_seed(N)).to(device, dtype)
        for niter in a.niters:
            config = PQConfig(refresh=a.intervals[0], refresh_niter=niter)
            layer_s = refresh_seconds(key, config, a.repeats)
            batched_ms = 1e3 * refresh_layers_seconds(key, config, a.layers, a.repeats)
            model_ms = 1e3 * layer_s * a.layers
            rows.append(dict(context=N, refresh_niter=niter, layer_ms=1e3 * layer_s, model_ms=model_ms,
                             batched_ms=batched_ms, per_token_ms={R: batched_ms / R for R in a.intervals}))
            per_token = ", ".join(f"every {R}: {batched_ms / R:.3f} ms/token" for R in a.intervals)
            print(f"context {N}, refresh_niter {niter}: {1e3 * layer_s:.2f} ms a layer, {model_ms:.1f} ms for "
                  f"{a.layers} layers one by one, {batched_ms:.1f} ms batched ({per_token})", flush=True)
    if a.json:
        env = dict(torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == "cuda"
                   else "cpu", threads=torch.get_num_threads(), dtype=str(dtype), kv_heads=a.kv_heads,
                   head_dim=a.head_dim, layers=a.layers, repeats=a.repeats)
        with open(a.json, "w") as f:
            json.dump(dict(environment=env, rows=rows,
                           command="python benchmarks/bench_refresh.py " + " ".join(
                               argv if argv is not None else __import__("sys").argv[1:])), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
