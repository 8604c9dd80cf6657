"""kmeans: batched Lloyd k-means on the GPU, same contract as :func:`pqflex.ops.portable.kmeans`.

One Triton launch per iteration does the heavy part of a Lloyd step for ``L`` independent problems: each program
takes a slice of one problem's points, assigns every point to its nearest centroid (tf32 tensor-core dot), and
accumulates the slice's per-cluster sums and counts with a second dot (one-hot^T @ x); it writes those partials
and each point's squared distance to its centroid. The partials are summed in a fixed order by torch (so a run is
deterministic), and the shared :func:`pqflex.ops.portable.lloyd` loop does the seeded initialization, the mean
update and the re-seeding of empty clusters.
"""

from __future__ import annotations

import torch

from pqflex.ops import native, portable
from pqflex.ops.pq_encode import _nearest_tile

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# Points per tile and warps of the step kernel: a tile's [points x ksub] distances live in registers; 128 x 256 with
# 4 warps spilled (benchmarks/bench_build.py; BENCHMARKS.md, "Index build").
BLOCK_N = 32
NUM_WARPS = 4
PROGRAMS_PER_PROBLEM = 16


def _check(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int,
           init: torch.Tensor | None = None) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point [L, N, dsub] tensor, got {x.dtype} {tuple(x.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:2]):
        raise ValueError(f"mask must be bool {tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    if ksub & (ksub - 1) or not 1 <= ksub <= 256:
        raise ValueError(f"ksub={ksub} must be a power of two in [1, 256]")
    if niter < 1:
        raise ValueError(f"niter={niter} must be >= 1")
    portable.check_init(init, x, ksub)


if triton is not None:

    @triton.jit
    def _kmeans_step_kernel(x_ptr, w_ptr, c_ptr, sums_ptr, counts_ptr, dist_ptr, N, dsub, tiles_per_program,
                            s_x_l, s_x_n, s_w_l,
                            KSUB: tl.constexpr, DSUB_P: tl.constexpr, BLOCK_N: tl.constexpr):
        l = tl.program_id(0)
        prog = tl.program_id(1)
        n_programs = tl.num_programs(1)
        k = tl.arange(0, KSUB)
        d = tl.arange(0, DSUB_P)
        sums = tl.zeros([KSUB, DSUB_P], dtype=tl.float32)
        counts = tl.zeros([KSUB], dtype=tl.float32)
        for t in range(tiles_per_program):
            offs_n = (prog * tiles_per_program + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            assign, dist, x = _nearest_tile(x_ptr + l * s_x_l, offs_n, n_mask, s_x_n, c_ptr + l * KSUB * dsub,
                                            dsub, KSUB, DSUB_P, "tf32")
            w = tl.load(w_ptr + l * s_w_l + offs_n, mask=n_mask, other=0.0)
            onehot = tl.where(assign[:, None] == k[None, :], w[:, None], 0.0)  # [BLOCK_N, KSUB]
            sums += tl.dot(tl.trans(onehot), x, input_precision="tf32")
            counts += tl.sum(onehot, axis=0)
            x_sq = tl.sum(x * x, axis=1)
            tl.store(dist_ptr + l * N + offs_n, dist + x_sq, mask=n_mask)
        part = l * n_programs + prog
        tl.store(sums_ptr + part * KSUB * dsub + k[:, None] * dsub + d[None, :], sums, mask=d[None, :] < dsub)
        tl.store(counts_ptr + part * KSUB + k, counts)


def kmeans_triton(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0,
                  tol: float = 0.0, init: torch.Tensor | None = None, *, block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                  programs_per_problem: int = PROGRAMS_PER_PROBLEM) -> torch.Tensor:
    """Batched k-means of ``x [L, N, dsub]`` on the GPU; returns centroids ``[L, ksub, dsub]`` fp32.

    ``block_n`` points per tile, ``num_warps`` and ``programs_per_problem``: the step kernel's tiling (the defaults
    are the measured best; ``benchmarks/bench_build.py`` times others)."""
    _check(x, mask, ksub, niter, init)
    if ksub < 16:
        raise ValueError(f"kmeans_triton needs ksub >= 16 (nbits >= 4), got ksub={ksub}")
    L, N, dsub = x.shape
    w = portable.kmeans_weights(x, mask).contiguous()
    xf = torch.where(w[..., None] > 0, x.float(), 0.0).contiguous()  # masked points never reach the arithmetic
    tiles = triton.cdiv(N, block_n)
    programs = min(programs_per_problem, tiles)
    tiles_per_program = triton.cdiv(tiles, programs)
    sums = torch.empty(L, programs, ksub, dsub, device=x.device)
    counts = torch.empty(L, programs, ksub, device=x.device)
    dist = torch.empty(L, N, device=x.device)
    kernel = torch.library.wrap_triton(_kmeans_step_kernel)

    def step(centroids: torch.Tensor):
        kernel[(L, programs)](xf, w, centroids.contiguous(), sums, counts, dist, N, dsub, tiles_per_program,
                              xf.stride(0), xf.stride(1), w.stride(0),
                              KSUB=ksub, DSUB_P=max(16, triton.next_power_of_2(dsub)), BLOCK_N=block_n,
                              num_warps=num_warps)
        return sums.sum(1), counts.sum(1), dist

    return portable.lloyd(xf, w, ksub, niter, seed, tol, step, init)


@torch.library.custom_op("pqflex::kmeans", mutates_args=())
def kmeans(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0,
           tol: float = 0.0, init: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.pqflex.kmeans``: :func:`pqflex.ops.portable.kmeans` on any device, Triton on CUDA (ksub >= 16),
    the C Lloyd step on the CPU over torch's intra-op threads (:func:`pqflex.ops.native.kmeans`, where it builds).
    ``init``: centroids to start from (a warm start), as in :func:`pqflex.ops.portable.kmeans`."""
    _check(x, mask, ksub, niter, init)
    return portable.kmeans(x, mask, ksub, niter, seed, tol, init)


@kmeans.register_kernel("cpu")
def _kmeans_cpu(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0,
                tol: float = 0.0, init: torch.Tensor | None = None) -> torch.Tensor:
    _check(x, mask, ksub, niter, init)
    if native.library() is None:
        return portable.kmeans(x, mask, ksub, niter, seed, tol, init)
    return native.kmeans(x, mask, ksub, niter, seed, tol, threads=torch.get_num_threads(), init=init)


@kmeans.register_kernel("cuda")
def _kmeans_cuda(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0,
                 tol: float = 0.0, init: torch.Tensor | None = None) -> torch.Tensor:
    if triton is None or ksub < 16:
        _check(x, mask, ksub, niter, init)
        return portable.kmeans(x, mask, ksub, niter, seed, tol, init)
    return kmeans_triton(x, mask, ksub, niter, seed, tol, init)


@kmeans.register_fake
def _kmeans_fake(x, mask, ksub, niter, seed=0, tol=0.0, init=None):
    return x.new_empty(x.shape[0], ksub, x.shape[2], dtype=torch.float32)
