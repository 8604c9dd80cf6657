"""pq_encode: nearest-centroid codes of vectors, per sub-space (matches :func:`pqflex.ops.portable.pq_encode`).

``codes[l, n, m] = argmin_c ||x[l, n, m*dsub:(m+1)*dsub] - centroids[l, m, c]||^2``; with the squared norm of
``x`` dropped, ``||c||^2 - 2 x.c`` is minimized, accumulating in fp32 (IEEE dot, so codes equal the reference's
except at float near-ties).
"""

from __future__ import annotations

import torch

from pqflex.ops import native, portable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def _check(x: torch.Tensor, centroids: torch.Tensor) -> None:
    if not x.is_floating_point() or not centroids.is_floating_point():
        raise TypeError(f"x and centroids must be floating point, got {x.dtype} and {centroids.dtype}")
    if x.dim() != 3 or centroids.dim() != 4:
        raise ValueError(f"x must be [L, N, D] and centroids [L, M, ksub, dsub], got {tuple(x.shape)} and "
                         f"{tuple(centroids.shape)}")
    L, M, ksub, dsub = centroids.shape
    if x.shape[0] != L or x.shape[2] != M * dsub:
        raise ValueError(f"x {tuple(x.shape)} does not match centroids {tuple(centroids.shape)}: need [L, N, M*dsub]")
    if ksub > 256 or ksub & (ksub - 1):
        raise ValueError(f"ksub={ksub} must be a power of two <= 256 (uint8 codes)")
    if x.device != centroids.device:
        raise ValueError(f"x on {x.device} and centroids on {centroids.device}")


if triton is not None:

    @triton.jit
    def _nearest_tile(x_ptr, offs_n, n_mask, s_x_n, c_ptr, dsub, KSUB: tl.constexpr, DSUB_P: tl.constexpr,
                      PRECISION: tl.constexpr):
        """Nearest centroid of a tile of points: (argmin [BLOCK_N], min of ||c||^2 - 2 x.c, x tile fp32)."""
        d = tl.arange(0, DSUB_P)
        d_mask = d < dsub
        x = tl.load(x_ptr + offs_n[:, None] * s_x_n + d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_N, DSUB_P]
        k = tl.arange(0, KSUB)
        c = tl.load(c_ptr + k[:, None] * dsub + d[None, :], mask=d_mask[None, :], other=0.0).to(tl.float32)
        c_sq = tl.sum(c * c, axis=1)  # [KSUB]
        dot = tl.dot(x, tl.trans(c), input_precision=PRECISION)  # [BLOCK_N, KSUB]
        dist = c_sq[None, :] - 2.0 * dot
        return tl.argmin(dist, axis=1), tl.min(dist, axis=1), x

    @triton.jit
    def _pq_encode_kernel(x_ptr, c_ptr, codes_ptr, N, dsub, s_x_l, s_x_n, s_c_l, s_c_m, s_o_l, s_o_n,
                          M: tl.constexpr, KSUB: tl.constexpr, DSUB_P: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        l = pid // M
        m = pid % M
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        code, _, _ = _nearest_tile(x_ptr + l * s_x_l + m * dsub, offs_n, n_mask, s_x_n,
                                   c_ptr + l * s_c_l + m * s_c_m, dsub, KSUB, DSUB_P, "ieee")
        tl.store(codes_ptr + l * s_o_l + offs_n * s_o_n + m, code.to(tl.uint8), mask=n_mask)


def pq_encode_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Launch the Triton pq_encode (same contract as :func:`pqflex.ops.portable.pq_encode`)."""
    _check(x, centroids)
    L, N, _ = x.shape
    M, ksub, dsub = centroids.shape[1:]
    if ksub < 16:
        raise ValueError(f"pq_encode_triton needs ksub >= 16 (nbits >= 4), got ksub={ksub}")
    x = x if x.stride(2) == 1 else x.contiguous()
    centroids = centroids.contiguous()
    codes = torch.empty(L, N, M, dtype=torch.uint8, device=x.device)
    block = 64
    grid = (L * M, triton.cdiv(N, block))
    torch.library.wrap_triton(_pq_encode_kernel)[grid](
        x, centroids, codes, N, dsub, x.stride(0), x.stride(1), centroids.stride(0), centroids.stride(1),
        codes.stride(0), codes.stride(1),
        M=M, KSUB=ksub, DSUB_P=max(16, triton.next_power_of_2(dsub)), BLOCK_N=block, num_warps=4)
    return codes


@torch.library.custom_op("pqflex::pq_encode", mutates_args=())
def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``torch.ops.pqflex.pq_encode``: :func:`pqflex.ops.portable.pq_encode` on any device, Triton on CUDA."""
    _check(x, centroids)
    return portable.pq_encode(x, centroids)


NATIVE_MAX_POINTS = 64  # beyond this many vectors per problem (prefill), the reference's matmuls are faster


def _pq_encode_cpu(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    _check(x, centroids)
    # A decode step's new keys: one C pass instead of the chunked matmul. Non-finite keys keep the reference's
    # arithmetic (its ||c||^2 - 2 x.c distances), so that their codes match it exactly.
    codes = native.pq_encode(x, centroids) if encodes_natively(x, centroids) else None
    return portable.pq_encode(x, centroids) if codes is None else codes


native.register_cpu("pq_encode", _pq_encode_cpu)


def encodes_natively(x: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether :func:`pqflex.ops.native.pq_encode` serves these vectors (few of them, fp32, on the CPU)."""
    return x.shape[-2] <= NATIVE_MAX_POINTS and centroids.dtype == torch.float32 and native.usable(x, centroids)


@pq_encode.register_kernel("cuda")
def _pq_encode_cuda(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    if triton is None or centroids.shape[2] < 16:
        _check(x, centroids)
        return portable.pq_encode(x, centroids)
    return pq_encode_triton(x, centroids)


@pq_encode.register_fake
def _pq_encode_fake(x, centroids):
    return x.new_empty(x.shape[0], x.shape[1], centroids.shape[1], dtype=torch.uint8)
