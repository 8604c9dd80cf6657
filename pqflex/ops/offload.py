"""offload_gather: the rows a decode step attends, each from the GPU part of an offloaded KV store or from CPU memory.

Same contract as :func:`pqflex.ops.portable.offload_gather`. On CUDA, ``host_rows`` is a device view of pinned
CPU memory (:func:`pqflex.kvstore.device_view`: under unified addressing a kernel reads host memory by address),
and the Triton kernel (one row per program) reads each row from exactly one source, so a row served on the GPU
costs no PCIe traffic and a miss costs one row over PCIe. The plain-torch version (any device) reads both and
picks, which is exact but moves every row; it serves the CPU, where both sources are host memory anyway. What a
gather of host rows reaches over PCIe: ``benchmarks/bench_host_memory.py``, BENCHMARKS.md.
"""

from __future__ import annotations

import torch

from pqflex.ops import portable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

def _check(device_rows, host_rows, row, pos) -> None:
    if device_rows.dim() != 4 or host_rows.dim() != 4:
        raise ValueError(f"device_rows and host_rows must be [B, Hkv, R, D] and [B, Hkv, C, D], got "
                         f"{tuple(device_rows.shape)} and {tuple(host_rows.shape)}")
    if device_rows.shape[:2] != host_rows.shape[:2] or device_rows.shape[3] != host_rows.shape[3]:
        raise ValueError(f"device_rows {tuple(device_rows.shape)} and host_rows {tuple(host_rows.shape)} must share "
                         "B, Hkv and D")
    if device_rows.dtype != host_rows.dtype:
        raise TypeError(f"device_rows and host_rows must share a dtype, got {device_rows.dtype} and {host_rows.dtype}")
    if row.shape != pos.shape or row.dim() != 3 or row.shape[:2] != device_rows.shape[:2]:
        raise ValueError(f"row and pos must be [B, Hkv, T] with B, Hkv = {tuple(device_rows.shape[:2])}, got "
                         f"{tuple(row.shape)} and {tuple(pos.shape)}")
    if row.dtype not in (torch.int32, torch.int64) or pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"row and pos must be int32 or int64, got {row.dtype} and {pos.dtype}")


if triton is not None:

    @triton.jit
    def _offload_gather_kernel(dev_ptr, host_ptr, row_ptr, pos_ptr, out_ptr, Hkv, T, D,
                               s_d_b, s_d_h, s_d_n, s_h_b, s_h_h, s_h_n, s_r_b, s_r_h, s_p_b, s_p_h,
                               D_PAD: tl.constexpr):
        """One listed row per program: from the device rows, or (a miss) from host memory."""
        r = tl.program_id(0).to(tl.int64)
        t = r % T
        b = r // T // Hkv
        h = r // T % Hkv
        d = tl.arange(0, D_PAD)
        d_ok = d < D
        row = tl.load(row_ptr + b * s_r_b + h * s_r_h + t).to(tl.int64)
        if row >= 0:
            x = tl.load(dev_ptr + b * s_d_b + h * s_d_h + row * s_d_n + d, mask=d_ok)
        else:
            pos = tl.load(pos_ptr + b * s_p_b + h * s_p_h + t).to(tl.int64)
            x = tl.load(host_ptr + b * s_h_b + h * s_h_h + pos * s_h_n + d, mask=d_ok)
        tl.store(out_ptr + r * D + d, x, mask=d_ok)


@torch.library.triton_op("pqflex::offload_gather", mutates_args=())
def offload_gather(device_rows: torch.Tensor, host_rows: torch.Tensor, row: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
    """``torch.ops.pqflex.offload_gather``: Triton on CUDA, plain torch elsewhere."""
    _check(device_rows, host_rows, row, pos)
    if triton is None or device_rows.device.type != "cuda":
        return portable.offload_gather(device_rows, host_rows, row, pos)
    B, Hkv, T = row.shape
    D = device_rows.shape[-1]
    device_rows, host_rows = (t if t.stride(-1) == 1 else t.contiguous() for t in (device_rows, host_rows))
    row, pos = row.contiguous(), pos.contiguous()
    out = torch.empty(B, Hkv, T, D, dtype=device_rows.dtype, device=device_rows.device)
    if out.numel():
        torch.library.wrap_triton(_offload_gather_kernel)[(B * Hkv * T,)](
            device_rows, host_rows, row, pos, out, Hkv, T, D,
            device_rows.stride(0), device_rows.stride(1), device_rows.stride(2),
            host_rows.stride(0), host_rows.stride(1), host_rows.stride(2), row.stride(0), row.stride(1),
            pos.stride(0), pos.stride(1), D_PAD=max(16, triton.next_power_of_2(D)), num_warps=1)
    return out


@offload_gather.register_kernel("cpu")
def _offload_gather_cpu(device_rows, host_rows, row, pos):
    _check(device_rows, host_rows, row, pos)
    return portable.offload_gather(device_rows, host_rows, row, pos)
