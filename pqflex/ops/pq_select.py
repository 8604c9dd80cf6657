"""pq_select: GQA-aggregated ADC scores of the middle tokens and their exact top-k, per sequence and KV head.

Math (matches :func:`pqflex.ops.reference.gqa_scores` + :func:`pqflex.ops.reference.select_topk`): for query
head ``g`` of a KV head, ``s_g[n] = scale * sum_m ip_table[g, m, codes[n, m]]``; over the candidate tokens
``n in [lo, hi)`` the aggregated score is ``p[n] = sum_g softmax_n(s_g)[n]``, and the ``topk`` tokens with the
largest ``p`` are returned.

The Triton kernels use that a token's score depends on its code tuple only. With ``M * nbits <= 12`` there are at
most 4096 tuples ("cells"), so one program per (sequence, KV head) takes the histogram of the candidates' cells,
scores every cell (softmax normalizers weighted by the histogram), and finds the exact threshold score of the
top-k by bisection over the float bits. Three launches: a histogram of the candidates' cells (one atomic add per
token), the per-cell plan, and a scan that emits the tokens above the threshold (and enough of those equal to it).
Both scans read 1 byte per code; no per-token score is ever written. Shapes with
more than 12 code bits fall back to the reference on the device. Among tokens whose scores tie at the threshold
the kernel takes any (the reference takes the latest); the selected set is otherwise exact.
"""

from __future__ import annotations

import torch

from pqflex.ops import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None

MAX_CELL_BITS = 12


def pq_select_reference(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                        topk: torch.Tensor, k_max: int, scale: float) -> torch.Tensor:
    """Plain-torch pq_select; see the module docstring. Ties go to the later token.

    Args:
        ip_table: ``[B, Hkv, G, M, ksub]``.
        codes: ``[B, Hkv, N, M]`` uint8.
        lo, hi: ``[B]`` int64, candidate range ``[lo, hi)`` of each sequence.
        topk: ``[B]`` int64 tokens to keep, at most ``k_max``.
        k_max: width of the result.
        scale: softmax scale.

    Returns:
        ``[B, Hkv, k_max]`` int32 token indices, best first; ``-1`` past ``min(topk, #candidates)``.
    """
    return reference.select_from_scores(reference.adc_scores(ip_table, codes) * scale, lo, hi, topk, k_max)


def _check(ip_table, codes, lo, hi, topk, k_max) -> None:
    if ip_table.dim() != 5:
        raise ValueError(f"ip_table must be [B, Hkv, G, M, ksub], got shape {tuple(ip_table.shape)}")
    if not ip_table.is_floating_point():
        raise TypeError(f"ip_table must be floating point, got {ip_table.dtype}")
    B, Hkv, G, M, ksub = ip_table.shape
    if ksub & (ksub - 1) or not 2 <= ksub <= 256:
        raise ValueError(f"ip_table ksub={ksub} must be a power of two in [2, 256]")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 4 or codes.shape[:2] != (B, Hkv) or codes.shape[3] != M:
        raise ValueError(f"codes must be [B, Hkv, N, M] = [{B}, {Hkv}, N, {M}], got {tuple(codes.shape)}")
    for name, t in (("lo", lo), ("hi", hi), ("topk", topk)):
        if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
    devices = {t.device for t in (ip_table, codes, lo, hi, topk)}
    if len(devices) != 1:
        raise ValueError(f"pq_select inputs must be on one device, got {sorted(map(str, devices))}")


if triton is not None:

    @triton.jit
    def _candidate_cells(codes_ptr, lo_ptr, hi_ptr, Hkv, s_c_b, s_c_h, s_c_n, M: tl.constexpr,
                         NBITS: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's (sequence x KV head) index, token offsets, candidate mask and code-tuple cells."""
        pid = tl.program_id(0)
        b = pid // Hkv
        h = pid % Hkv
        lo = tl.load(lo_ptr + b).to(tl.int32)
        hi = tl.load(hi_ptr + b).to(tl.int32)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inr = (offs >= lo) & (offs < hi)
        codes_bh = codes_ptr + b * s_c_b + h * s_c_h
        cell = tl.zeros([BLOCK_N], dtype=tl.int32)
        for m in tl.static_range(M):
            code = tl.load(codes_bh + offs * s_c_n + m, mask=inr, other=0).to(tl.int32)
            cell += code << (NBITS * m)
        return pid, offs, inr, cell

    @triton.jit
    def _pq_select_hist_kernel(codes_ptr, lo_ptr, hi_ptr, hist_ptr, Hkv, s_c_b, s_c_h, s_c_n,
                               M: tl.constexpr, NBITS: tl.constexpr, NCELLS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Histogram of the candidates' code tuples ("cells"), one atomic add per token."""
        pid, offs, inr, cell = _candidate_cells(codes_ptr, lo_ptr, hi_ptr, Hkv, s_c_b, s_c_h, s_c_n, M, NBITS,
                                                BLOCK_N)
        if tl.sum(inr.to(tl.int32), axis=0) > 0:
            tl.atomic_add(hist_ptr + pid * NCELLS + cell, 1, mask=inr, sem="relaxed")

    @triton.jit
    def _pq_select_plan_kernel(ip_ptr, hist_ptr, topk_ptr, table_ptr, meta_ptr, out_ptr,
                               Hkv, k_max, scale, s_ip_b, s_ip_h, s_ip_g, s_ip_m,
                               G: tl.constexpr, M: tl.constexpr, NBITS: tl.constexpr, NCELLS: tl.constexpr,
                               BLOCK_K: tl.constexpr):
        """Per (sequence, KV head): score every cell, find the exact top-k threshold."""
        pid = tl.program_id(0)
        b = pid // Hkv
        h = pid % Hkv
        k = tl.load(topk_ptr + b).to(tl.int32)

        cells = tl.arange(0, NCELLS)
        hist = tl.load(hist_ptr + pid * NCELLS + cells)
        total = tl.sum(hist, axis=0)
        present = hist > 0

        # Aggregated score of every cell: sum over the group of softmax over the candidates.
        ip_bh = ip_ptr + b * s_ip_b + h * s_ip_h
        score = tl.zeros([NCELLS], dtype=tl.float32)
        for g in tl.static_range(G):
            s = tl.zeros([NCELLS], dtype=tl.float32)
            for m in tl.static_range(M):
                c = (cells >> (NBITS * m)) & ((1 << NBITS) - 1)
                s += tl.load(ip_bh + g * s_ip_g + m * s_ip_m + c).to(tl.float32)
            s = tl.where(present, (s * scale).to(tl.float32), float("-inf"))  # scale arrives as fp64 under inductor
            s_max = tl.maximum(tl.max(s, axis=0), -1e30)
            e = tl.exp(s - s_max)
            z = tl.maximum(tl.sum(hist.to(tl.float32) * e, axis=0), 1e-30)
            score += e / z
        bits = tl.where(present, score.to(tl.int32, bitcast=True), -1)  # scores >= 0: int order = float order
        tl.store(table_ptr + pid * NCELLS + cells, bits)

        # Exact threshold: the largest T with #(candidates with bits >= T) >= k_eff, by bisection on the bits.
        # (A 4-bits-a-round radix search over [NCELLS, 16] pivots measured 8x slower on an H200.)
        k_eff = tl.minimum(k, total)
        t_lo = tl.zeros([], dtype=tl.int32)
        t_hi = tl.full([], 0x7F800000, dtype=tl.int32)
        for _ in tl.static_range(31):
            mid = t_lo + (t_hi - t_lo + 1) // 2
            count = tl.sum(tl.where(bits >= mid, hist, 0), axis=0)
            ok = count >= k_eff
            t_lo = tl.where(ok, mid, t_lo)
            t_hi = tl.where(ok, t_hi, mid - 1)
        threshold = tl.where(k_eff > 0, t_lo, 0x7F800000)
        count_gt = tl.sum(tl.where(bits > threshold, hist, 0), axis=0)
        tl.store(meta_ptr + pid * 4 + 0, threshold)
        tl.store(meta_ptr + pid * 4 + 1, count_gt)
        tl.store(meta_ptr + pid * 4 + 2, k_eff - count_gt)  # tokens to take among the threshold ties
        tl.store(meta_ptr + pid * 4 + 3, 0)  # emit counter of the ties
        # Slots past k_eff stay -1; slots below are written by the emit kernel.
        for j0 in range(0, k_max, BLOCK_K):
            offs = j0 + tl.arange(0, BLOCK_K)
            tl.store(out_ptr + pid * k_max + offs, -1, mask=(offs >= k_eff) & (offs < k_max))

    @triton.jit
    def _pq_select_emit_kernel(codes_ptr, lo_ptr, hi_ptr, table_ptr, meta_ptr, gt_count_ptr, out_ptr,
                               Hkv, k_max, s_c_b, s_c_h, s_c_n,
                               M: tl.constexpr, NBITS: tl.constexpr, NCELLS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Write the tokens above the threshold, and as many threshold ties as the top-k still needs."""
        pid, offs, inr, cell = _candidate_cells(codes_ptr, lo_ptr, hi_ptr, Hkv, s_c_b, s_c_h, s_c_n, M, NBITS,
                                                BLOCK_N)
        if tl.sum(inr.to(tl.int32), axis=0) > 0:
            bits = tl.load(table_ptr + pid * NCELLS + cell, mask=inr, other=-1)
            threshold = tl.load(meta_ptr + pid * 4 + 0)
            count_gt = tl.load(meta_ptr + pid * 4 + 1)
            n_ties = tl.load(meta_ptr + pid * 4 + 2)
            out_bh = out_ptr + pid * k_max

            gt = inr & (bits > threshold)
            n_gt = tl.sum(gt.to(tl.int32), axis=0)
            if n_gt > 0:
                base = tl.atomic_add(gt_count_ptr + pid, n_gt)
                slot = base + tl.cumsum(gt.to(tl.int32), axis=0) - 1
                tl.store(out_bh + slot, offs, mask=gt)
            tie = inr & (bits == threshold)
            n_tie = tl.sum(tie.to(tl.int32), axis=0)
            if n_tie > 0:
                base_t = tl.atomic_add(meta_ptr + pid * 4 + 3, n_tie)
                slot_t = base_t + tl.cumsum(tie.to(tl.int32), axis=0) - 1
                tl.store(out_bh + count_gt + slot_t, offs, mask=tie & (slot_t < n_ties))


def pq_select_triton(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     topk: torch.Tensor, k_max: int, scale: float, plan_warps: int = 8) -> torch.Tensor:
    """Launch the Triton pq_select (same contract as :func:`pq_select_reference`, ties aside).

    ``plan_warps`` sets the warps of the per-cell plan program (a tuning knob for benchmarks).
    """
    _check(ip_table, codes, lo, hi, topk, k_max)
    B, Hkv, G, M, ksub = ip_table.shape
    nbits = ksub.bit_length() - 1
    if M * nbits > MAX_CELL_BITS:
        raise ValueError(f"pq_select_triton needs M * nbits <= {MAX_CELL_BITS}, got M={M}, nbits={nbits}")
    N = codes.shape[2]
    ncells = 1 << max(M * nbits, 4)
    codes = codes if codes.stride(3) == 1 else codes.contiguous()
    ip_table = ip_table if ip_table.stride(4) == 1 else ip_table.contiguous()
    out = torch.empty(B, Hkv, k_max, dtype=torch.int32, device=codes.device)
    table = torch.empty(B * Hkv, ncells, dtype=torch.int32, device=codes.device)
    meta = torch.empty(B * Hkv, 4, dtype=torch.int32, device=codes.device)
    gt_count = torch.zeros(B * Hkv, dtype=torch.int32, device=codes.device)
    hist = torch.zeros(B * Hkv, ncells, dtype=torch.int32, device=codes.device)
    block = 1024
    scan_grid = (B * Hkv, triton.cdiv(N, block))
    launch = torch.library.wrap_triton
    launch(_pq_select_hist_kernel)[scan_grid](
        codes, lo, hi, hist, Hkv, codes.stride(0), codes.stride(1), codes.stride(2),
        M=M, NBITS=nbits, NCELLS=ncells, BLOCK_N=block, num_warps=4)
    launch(_pq_select_plan_kernel)[(B * Hkv,)](
        ip_table, hist, topk, table, meta, out, Hkv, k_max, float(scale),
        ip_table.stride(0), ip_table.stride(1), ip_table.stride(2), ip_table.stride(3),
        G=G, M=M, NBITS=nbits, NCELLS=ncells, BLOCK_K=1024, num_warps=plan_warps)
    launch(_pq_select_emit_kernel)[scan_grid](
        codes, lo, hi, table, meta, gt_count, out, Hkv, k_max,
        codes.stride(0), codes.stride(1), codes.stride(2),
        M=M, NBITS=nbits, NCELLS=ncells, BLOCK_N=block, num_warps=4)
    return out


@torch.library.triton_op("pqflex::pq_select", mutates_args=())
def pq_select(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              topk: torch.Tensor, k_max: int, scale: float) -> torch.Tensor:
    """``torch.ops.pqflex.pq_select``: Triton on CUDA (reference beyond 12 code bits), reference on the CPU."""
    _check(ip_table, codes, lo, hi, topk, k_max)
    M, ksub = ip_table.shape[-2:]
    # The device test also keeps torch.compile on the CPU tracing the reference instead of Triton kernels.
    if triton is None or codes.device.type != "cuda" or M * (ksub.bit_length() - 1) > MAX_CELL_BITS:
        return pq_select_reference(ip_table, codes, lo, hi, topk, k_max, scale)
    return pq_select_triton(ip_table, codes, lo, hi, topk, k_max, scale)


@pq_select.register_kernel("cpu")
def _pq_select_cpu(ip_table, codes, lo, hi, topk, k_max, scale):
    _check(ip_table, codes, lo, hi, topk, k_max)
    return pq_select_reference(ip_table, codes, lo, hi, topk, k_max, scale)
