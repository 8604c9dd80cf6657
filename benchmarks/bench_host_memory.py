"""Bearings for offload (issue #14, CUDA only): GPU kernels reading CPU memory, bulk copies, and allocation cost.

- a device view of pinned CPU memory (:func:`pqflex.kvstore.device_view`) read by index: 256-byte rows (a bf16
  key of head dim 128) gathered with ``index_select`` for 256 / 2,048 / 6,538 rows per head x 8 heads, GB/s;
  checked against the CPU gather, and once under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
- bulk pinned host-to-device and device-to-host copies of those 256 MiB, GB/s;
- allocating 4 GiB of page-locked memory: ``torch.empty(..., pin_memory=True)`` in 64 blocks (then again, from
  torch's cache) and as one block, against pageable ``torch.empty`` + first touch + ``cudaHostRegister`` (what
  :class:`pqflex.kvstore.HostBuffer` does). Usage::

    python benchmarks/bench_host_memory.py
"""

from __future__ import annotations

import time

import torch

from pqflex.kvstore import device_view


def gpu_us(fn, n: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n * 1e3


def wall_s(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    dev = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    host = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16).pin_memory()
    rows = device_view(host, dev).view(-1, 128)
    for per_head in (256, 2048, 6538):
        idx = torch.randint(0, rows.shape[0], (8 * per_head,), device=dev)
        out = torch.empty(idx.numel(), 128, dtype=torch.bfloat16, device=dev)
        us = gpu_us(lambda: torch.index_select(rows, 0, idx, out=out))
        assert torch.equal(out.cpu(), host.view(-1, 128)[idx.cpu()])
        print(f"gather from CPU memory, {per_head} rows/head x 8: {us:.1f} us, {idx.numel() * 256 / us / 1e3:.1f} GB/s")
    torch._dynamo.mark_static_address(rows)
    compiled = torch.compile(lambda i: rows.index_select(0, i).float().sum(-1), mode="reduce-overhead")
    for _ in range(3):
        got = compiled(idx)
    print("compiled with CUDA graphs equals the CPU gather:",
          torch.allclose(got.cpu(), host.view(-1, 128)[idx.cpu()].float().sum(-1), rtol=1e-2))
    on_gpu = torch.empty_like(host, device=dev)
    back = torch.empty_like(host).pin_memory()
    nbytes = host.numel() * host.element_size()
    print(f"bulk H2D {nbytes / gpu_us(lambda: on_gpu.copy_(host, non_blocking=True), 5) / 1e3:.1f} GB/s, "
          f"D2H {nbytes / gpu_us(lambda: back.copy_(on_gpu, non_blocking=True), 5) / 1e3:.1f} GB/s")
    n = 8 * 32896 * 128  # one layer's keys at 32K (bf16): 64 MiB; 64 of them = 4 GiB
    dt, blocks = wall_s(lambda: [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(64)])
    print(f"pinned, 64 x 64 MiB: {dt:.2f} s")
    del blocks
    dt, blocks = wall_s(lambda: [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for _ in range(64)])
    print(f"pinned again (torch's host cache): {dt:.2f} s")
    dt, one = wall_s(lambda: torch.empty(64 * n, dtype=torch.bfloat16, pin_memory=True))
    print(f"pinned, one 4 GiB block: {dt:.2f} s")
    dt, pageable = wall_s(lambda: torch.empty(64 * n, dtype=torch.bfloat16))
    touch, _ = wall_s(lambda: pageable.fill_(0))
    reg, _ = wall_s(lambda: torch.cuda.cudart().cudaHostRegister(pageable.data_ptr(), pageable.numel() * 2, 0))
    print(f"pageable 4 GiB: alloc {dt:.3f} s, first touch {touch:.2f} s, cudaHostRegister {reg:.2f} s")
    torch.cuda.cudart().cudaHostUnregister(pageable.data_ptr())


if __name__ == "__main__":
    main()
