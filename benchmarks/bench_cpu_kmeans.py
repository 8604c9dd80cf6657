"""Time one layer's CPU k-means job at 128K: the C kernel over 1..T threads against the torch reference.

A Llama-3.1-8B layer at 128K trains 64 problems (8 KV heads x M=8 sub-spaces) of ``train_points * 256`` keys
(16,384 at ``train_points=64``), 16 dims, 256 centroids, ``--niter`` iterations. Usage::

    PYTHONPATH=. python benchmarks/bench_cpu_kmeans.py [--points 16384] [--niter 10] [--threads 1,8,15,16]
"""

from __future__ import annotations

import argparse
import time

import torch

from pqflex.ops import native, portable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64, help="KV heads x sub-quantizers of one layer")
    parser.add_argument("--points", type=int, default=16384, help="training keys per problem")
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--threads", default="1,8,15,16", help="thread counts of the C kernel")
    parser.add_argument("--no-reference", action="store_true", help="skip the torch reference")
    args = parser.parse_args()
    if native.library() is None:
        raise SystemExit("the native CPU kernels are unavailable (no C compiler?)")
    x = torch.randn(args.problems, args.points, 16)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        native.kmeans(x, None, 256, args.niter, 0, threads=threads)
        print(f"C kernel, {threads} threads: {time.perf_counter() - t0:.3f} s", flush=True)
    if not args.no_reference:
        threads = max(int(t) for t in args.threads.split(","))
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        portable.kmeans(x, None, 256, args.niter, 0)
        print(f"torch reference, {threads} threads: {time.perf_counter() - t0:.3f} s")


if __name__ == "__main__":
    main()
