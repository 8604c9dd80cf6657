"""pq_select: GQA-aggregated ADC scores of the middle tokens and their exact top-k, per sequence and KV head.

Math (matches :func:`pqflex.ops.portable.gqa_scores` + :func:`pqflex.ops.portable.select_topk`): for query
head ``g`` of a KV head, ``s_g[n] = scale * sum_m ip_table[g, m, codes[n, m]]``; over the candidate tokens
``n in [lo, hi)`` the aggregated score is ``p[n] = sum_g exp(s_g[n] - max_g) / Z_g`` with ``max_g`` and
``Z_g = sum_n exp(s_g[n] - max_g)`` taken over the candidates, and the ``k = min(topk, #candidates, k_max)``
tokens with the largest ``p`` are returned. Among tokens whose scores tie at the k-th score the kernels take any
(the reference takes the latest); the selected set is otherwise exact.

The registered op ``torch.ops.pqflex.pq_select(query, centroids, codes, spans, topk, n, k_max, scale)`` takes a
decode step's inputs: it forms ``ip_table = q . centroids`` (one batched matmul; in C on the CPU) and the candidates
``[lo, hi) = [start + sink, n - recent)`` of each sequence from its ``spans``, then runs the kernels below
(:func:`pq_select_triton` and its two paths take the table and the range, as the tests and benchmarks call them).

Two Triton paths, both without a host sync and with static shapes (``torch.compile(fullgraph=True)`` + CUDA
graphs):

**radix** (any ``M`` and ``nbits``). ``p >= 0``, so its float bits order like int32 keys, and the k-th largest key
``T`` is found digit by digit from the top, as in a radix select over the digits ``key >> 23`` (the exponent),
``key >> 11 & 4095`` and ``key & 2047``; no sort, no ``torch.topk``. Every pass runs ``split`` programs per
(sequence, KV head) over contiguous shares of the candidates (about four programs per SM: N reaches 128K+ while
``B * Hkv`` is 8 at batch 1). A pass that needs a sequence-wide result of the previous one gets it from that pass's
last program (a done counter per (sequence, KV head): the program that brings it to ``split`` sees the others'
writes and does the small serial step), so no program rescans a histogram.

1. stats: ADC scores from the ip table transposed to ``[M, ksub, G]``, so that one 16-byte gather brings a code's
   entries for the ``G`` query heads (the table is L1-resident); codes are read 8 bytes at a time. The scores are
   stored (``4 G`` bytes a token; recomputing them in pass 2 measured slower) with per-program online softmax
   normalizers ``(max_g, Z_g)``. Also zeroes the later passes' scratch and writes the ``-1`` slots past ``k``.
2. score: combines the ``(max_g, Z_g)`` partials, computes ``p[n]``, stores its key (4 bytes a token) and adds a
   per-program histogram of digit 0 (``tl.histogram``) to the sequence's with one atomic per nonzero bin. Last
   program: the bucket ``d0`` holding the k-th key and the rank ``k1`` of that key in it.
3. top: emits the tokens of buckets above ``d0`` (certainly selected), lists those of bucket ``d0`` and histograms
   their digit 1 (one atomic per listed token). A first sweep counts, one 64-bit atomic reserves the program's
   slots in the output and in the list, a second sweep writes. Last program: bucket ``d1`` and rank ``k2``.
4. rest: the same over list 1 for digit 1 (list 2 holds bucket ``d1``; digit 2 histogrammed). Last program: the
   bucket ``d2`` fixes ``T`` and the number ``r`` of ties needed; it emits list 2's tokens above ``T`` and the
   first ``r`` equal to it (slots ``k - r ..``; those above ``T`` fill the slots before them).

Four Triton launches plus the transpose of the ip table. Bytes per token: the codes once, ``4 G`` bytes of scores
written and read back, 4 bytes of key written and read (twice in pass 3), and the lists (in the benchmark bucket
``d0`` held about 1% of the candidates and bucket ``d1`` just the ties at ``T``). The stats pass is bound by the
table gathers (it grows with M); the last three passes by chains of dependent memory round trips, not by bytes
(BENCHMARKS.md, "The selection kernel for every setting", has the times per pass).

**cells** (``M * nbits <= 12``). A token's score depends on its code tuple only, so one program per (sequence, KV
head) takes the histogram of the candidates' cells (at most 4096 code tuples), scores every cell, and finds the
threshold by bisection over the float bits; then a scan emits the tokens above it. Three launches.

Dispatch (:func:`use_cells`): the cells path for ``M * nbits <= 12``, the radix path beyond: at the largest cell
table (M=2, nbits=6) the cells path was the faster at every context and batch measured (``benchmarks/
bench_select.py``, BENCHMARKS.md), so the rule is by code bits alone. Both paths are tested against
:mod:`pqflex.ops.portable` over the whole grid.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pqflex.ops import native, portable

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton run plain torch
    triton = None

MAX_CELL_BITS = 12

# Radix digits of the key (the float bits of p, < 2**31): bits 30..23 (the exponent), 22..11, 10..0.
_BINS0, _BINS1, _BINS2 = 256, 4096, 2048
# Per (sequence, KV head) int32 scratch: the three histograms, then 16 counters (see the kernels' C_* names).
_H0, _H1, _H2 = 0, _BINS0, _BINS0 + _BINS1
_CTR = _BINS0 + _BINS1 + _BINS2
_SCRATCH = _CTR + 16


def _check_codes(codes, B: int, Hkv: int, M: int, ksub: int, source: str) -> None:
    """``ksub`` (taken from ``source``) a power of two in [2, 256] and ``codes`` uint8 ``[B, Hkv, N, M]``."""
    if ksub & (ksub - 1) or not 2 <= ksub <= 256:
        raise ValueError(f"{source} ksub={ksub} must be a power of two in [2, 256]")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.dim() != 4 or codes.shape[:2] != (B, Hkv) or codes.shape[3] != M:
        raise ValueError(f"codes must be [B, Hkv, N, M] = [{B}, {Hkv}, N, {M}], got {tuple(codes.shape)}")


def _check(ip_table, codes, lo, hi, topk, k_max) -> None:
    if ip_table.dim() != 5:
        raise ValueError(f"ip_table must be [B, Hkv, G, M, ksub], got shape {tuple(ip_table.shape)}")
    if not ip_table.is_floating_point():
        raise TypeError(f"ip_table must be floating point, got {ip_table.dtype}")
    B, Hkv, G, M, ksub = ip_table.shape
    _check_codes(codes, B, Hkv, M, ksub, "ip_table")
    for name, t in (("lo", lo), ("hi", hi), ("topk", topk)):
        if t.shape != (B,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int tensor of shape ({B},), got {t.dtype} {tuple(t.shape)}")
    if isinstance(k_max, bool) or not isinstance(k_max, (int, torch.SymInt)) or k_max < 1:  # symbolic when compiled
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
        k_eff = tl.minimum(tl.minimum(k, total), k_max)
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
                base = tl.atomic_add(gt_count_ptr + pid, n_gt, sem="relaxed")
                slot = base + tl.cumsum(gt.to(tl.int32), axis=0) - 1
                tl.store(out_bh + slot, offs, mask=gt)
            tie = inr & (bits == threshold)
            n_tie = tl.sum(tie.to(tl.int32), axis=0)
            if n_tie > 0:
                base_t = tl.atomic_add(meta_ptr + pid * 4 + 3, n_tie, sem="relaxed")
                slot_t = base_t + tl.cumsum(tie.to(tl.int32), axis=0) - 1
                tl.store(out_bh + count_gt + slot_t, offs, mask=tie & (slot_t < n_ties))

    # The radix path's layout, as constants the kernels can read.
    BINS0, BINS1, BINS2 = tl.constexpr(_BINS0), tl.constexpr(_BINS1), tl.constexpr(_BINS2)
    H0, H1, H2, CTR, SCRATCH_SIZE = (tl.constexpr(v) for v in (_H0, _H1, _H2, _CTR, _SCRATCH))
    # Counters: (slots above T taken by pass 3, list 1 length) and (by pass 4, list 2 length) as 8-byte pairs,
    # the done counts of passes 2-4, then the buckets and ranks found by their last programs.
    C_GT1, C_L1, C_GT2, C_L2, C_DONE0, C_DONE1, C_DONE2, C_D0, C_K1, C_D1, C_K2 = (
        tl.constexpr(v) for v in range(11))
    FILL = tl.constexpr(2048)

    @triton.jit
    def _row(lo_ptr, hi_ptr, topk_ptr, b, N, k_max):
        """Candidate range ``[lo, hi)`` clamped to the buffer, its size and the number of tokens to select."""
        lo = tl.maximum(tl.load(lo_ptr + b).to(tl.int32), 0)
        hi = tl.minimum(tl.load(hi_ptr + b).to(tl.int32), N)
        n_cand = tl.maximum(hi - lo, 0)
        k = tl.minimum(tl.minimum(tl.maximum(tl.load(topk_ptr + b).to(tl.int32), 0), n_cand), k_max)
        return lo, n_cand, k

    @triton.jit
    def _share(start, count, j, split, BLOCK: tl.constexpr):
        """Program ``j``'s share ``[begin, end)`` of ``count`` items from ``start``, in whole blocks."""
        per = ((count + split - 1) // split + BLOCK - 1) // BLOCK * BLOCK
        begin = start + j * per
        return begin, tl.minimum(begin + per, start + count)

    @triton.jit
    def _scores(codes_bh, table_bh, offs, inr, ksub, s_c_n, scale, BLOCK_N: tl.constexpr, M: tl.constexpr,
                WB: tl.constexpr, GP: tl.constexpr):
        """Scaled ADC scores ``[BLOCK_N, GP]`` of tokens ``offs``: codes read ``WB`` bytes at a time, the ``GP``
        heads' entries of a code gathered at once from the ``[M, ksub, GP]`` table."""
        g = tl.arange(0, GP)
        s = tl.zeros([BLOCK_N, GP], dtype=tl.float32)
        for w in tl.static_range(M // WB):
            word = tl.load(codes_bh + offs * s_c_n + w, mask=inr, other=0)
            if WB == 8:
                word = word.to(tl.int64)
            else:
                word = word.to(tl.int32)
            for i in tl.static_range(WB):
                code = ((word >> (8 * i)) & (ksub - 1)).to(tl.int32)  # masked: never outside the table
                row = tl.multiple_of(((w * WB + i) * ksub + code) * GP, GP)  # GP-aligned: one vector load
                s += tl.load(table_bh + row[:, None] + g[None, :])
        return (s * scale).to(tl.float32)  # scale arrives as fp64 under inductor

    @triton.jit
    def _put(dst_ptr, at, values, take):
        """Write ``values[take]`` to ``dst_ptr[at:]`` in order; returns the next free slot."""
        take = take.to(tl.int32)
        tl.store(dst_ptr + at + tl.cumsum(take, axis=0) - 1, values, mask=take > 0)
        return at + tl.sum(take, axis=0)

    @triton.jit
    def _reserve_pair(counter_ptr, n_lo, n_hi):
        """Reserve ``n_lo`` slots of the int32 counter at ``counter_ptr`` (8-byte aligned) and ``n_hi`` of the next
        one with a single 64-bit atomic; returns the first slot of each."""
        pair = counter_ptr.to(tl.pointer_type(tl.int64))
        old = tl.atomic_add(pair, n_lo.to(tl.int64) + (n_hi.to(tl.int64) << 32), sem="relaxed")
        return (old & 0xFFFFFFFF).to(tl.int32), (old >> 32).to(tl.int32)  # little-endian: the first is the low word

    @triton.jit
    def _bucket(hist, k, bins):
        """Digit of the k-th largest key (k >= 1) and that key's rank among the keys with this digit."""
        ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= d
        d = tl.max(tl.where(ge >= k, bins, -1), axis=0)
        return d, k - tl.sum(tl.where(bins > d, hist, 0), axis=0)

    @triton.jit
    def _bucket_2d(hist_ptr, k, ROWS: tl.constexpr, COLS: tl.constexpr):
        """:func:`_bucket` of a ``ROWS * COLS``-bin histogram in memory: the row first, then the bin in it."""
        r = tl.arange(0, ROWS)
        c = tl.arange(0, COLS)
        hist = tl.load(hist_ptr + r[:, None] * COLS + c[None, :], volatile=True)  # written by other programs
        dr, k_row = _bucket(tl.sum(hist, axis=1), k, r)
        dc, k_bin = _bucket(tl.sum(tl.where(r[:, None] == dr, hist, 0), axis=0), k_row, c)
        return dr * COLS + dc, k_bin

    @triton.jit
    def _last_done(counter_ptr, split):
        """True in the last program of a (sequence, KV head) to get here; it then sees the others' writes."""
        tl.debug_barrier()  # this program's writes are issued before its release
        return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == split - 1

    @triton.jit
    def _pq_select_stats_kernel(codes_ptr, table_ptr, lo_ptr, hi_ptr, topk_ptr, part_ptr, scores_ptr,
                                scratch_ptr, out_ptr, Hkv, N, ksub, k_max, split, scale, s_c_b, s_c_h, s_c_n,
                                M: tl.constexpr, WB: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr):
        """Pass 1: scores, per-program softmax normalizers ``(max_g, Z_g)``; zero the scratch, ``-1`` past k."""
        bh = tl.program_id(0)
        j = tl.program_id(1)
        b = bh // Hkv
        lo, n_cand, k = _row(lo_ptr, hi_ptr, topk_ptr, b, N, k_max)

        # (Blocks of FILL, not BLOCK_N: a shared arange would give the token loads below this loop's layout.)
        zeros = tl.zeros([FILL], dtype=tl.int32)
        z0, z1 = _share(0, SCRATCH_SIZE, j, split, FILL)
        for i0 in range(z0, z1, FILL):
            i = i0 + tl.arange(0, FILL)
            tl.store(scratch_ptr + bh * SCRATCH_SIZE + i, zeros, mask=i < z1)
        f0, f1 = _share(k, k_max - k, j, split, FILL)
        for i0 in range(f0, f1, FILL):
            i = i0 + tl.arange(0, FILL)
            tl.store(out_ptr + bh * k_max + i, zeros - 1, mask=i < f1)

        g = tl.arange(0, GP)
        codes_bh = codes_ptr + b * s_c_b + (bh % Hkv) * s_c_h
        table_bh = table_ptr + bh * (M * ksub * GP)
        # Online softmax normalizers per token slot (no block reduction in the loop), reduced once at the end.
        m_acc = tl.full([BLOCK_N, GP], -1e30, dtype=tl.float32)
        z_acc = tl.zeros([BLOCK_N, GP], dtype=tl.float32)
        n0, n1 = _share(lo, n_cand, j, split, BLOCK_N)
        for t0 in range(n0, n1, BLOCK_N):
            offs = t0 + tl.arange(0, BLOCK_N)
            inr = offs < n1
            s = _scores(codes_bh, table_bh, offs, inr, ksub, s_c_n, scale, BLOCK_N, M, WB, GP)
            tl.store(scores_ptr + (bh * N + offs)[:, None] * GP + g[None, :], s, mask=inr[:, None])
            s = tl.where(inr[:, None], s, float("-inf"))
            m_new = tl.maximum(m_acc, s)
            z_acc = z_acc * tl.exp(m_acc - m_new) + tl.exp(s - m_new)
            m_acc = m_new
        m_run = tl.max(m_acc, axis=0)
        z_run = tl.sum(z_acc * tl.exp(m_acc - m_run[None, :]), axis=0)
        part = part_ptr + (bh * split + j) * 2 * GP
        tl.store(part + g, m_run)
        tl.store(part + GP + g, z_run)

    @triton.jit
    def _pq_select_score_kernel(lo_ptr, hi_ptr, topk_ptr, part_ptr, scores_ptr, keys_ptr, scratch_ptr,
                                Hkv, N, G, k_max, split, GP: tl.constexpr, SPLIT_P: tl.constexpr,
                                BLOCK_N: tl.constexpr):
        """Pass 2: ``p[n]`` and its key (float bits); histogram of digit 0; the last program finds bucket d0."""
        bh = tl.program_id(0)
        j = tl.program_id(1)
        lo, n_cand, k = _row(lo_ptr, hi_ptr, topk_ptr, bh // Hkv, N, k_max)
        if k > 0:
            g = tl.arange(0, GP)
            jj = tl.arange(0, SPLIT_P)
            part = part_ptr + (bh * split + jj[:, None]) * 2 * GP + g[None, :]
            m_j = tl.load(part, mask=jj[:, None] < split, other=-1e30)
            z_j = tl.load(part + GP, mask=jj[:, None] < split, other=0.0)
            mx = tl.max(m_j, axis=0)
            z = tl.sum(z_j * tl.exp(m_j - mx[None, :]), axis=0)  # >= 1: the max candidate adds exp(0)
            w = tl.where(g < G, 1.0 / z, 0.0)

            scratch = scratch_ptr + bh * SCRATCH_SIZE
            bins = tl.arange(0, BINS0)
            hist = tl.zeros([BINS0], dtype=tl.int32)
            n0, n1 = _share(lo, n_cand, j, split, BLOCK_N)
            for t0 in range(n0, n1, BLOCK_N):
                offs = t0 + tl.arange(0, BLOCK_N)
                inr = offs < n1
                s = tl.load(scores_ptr + (bh * N + offs)[:, None] * GP + g[None, :], mask=inr[:, None], other=0.0)
                p = tl.sum(tl.exp(s - mx[None, :]) * w[None, :], axis=1)
                key = p.to(tl.int32, bitcast=True)  # p >= 0: int order = float order
                tl.store(keys_ptr + bh * N + offs, key, mask=inr)
                hist += tl.histogram(tl.where(inr, key >> 23, 0), BINS0)
            mine = tl.maximum(n1 - n0, 0)
            outside = (mine + BLOCK_N - 1) // BLOCK_N * BLOCK_N - mine  # the tail block's masked slots, counted
            hist -= tl.where(bins == 0, outside, 0)  # in bin 0
            tl.atomic_add(scratch + H0 + bins, hist, mask=hist > 0, sem="relaxed")
            if _last_done(scratch + CTR + C_DONE0, split):
                d0, k1 = _bucket_2d(scratch + H0, k, 16, 16)
                tl.store(scratch + CTR + C_D0, d0)
                tl.store(scratch + CTR + C_K1, k1)

    @triton.jit
    def _pq_select_top_kernel(lo_ptr, hi_ptr, topk_ptr, keys_ptr, scratch_ptr, list_ptr, out_ptr, Hkv, N, k_max,
                              split, BLOCK: tl.constexpr):
        """Pass 3: emit the tokens above bucket d0, list bucket d0 and histogram its digit 1; the last program
        finds bucket d1. Two sweeps (count, then write) reserve the output slots with one atomic."""
        bh = tl.program_id(0)
        j = tl.program_id(1)
        lo, n_cand, k = _row(lo_ptr, hi_ptr, topk_ptr, bh // Hkv, N, k_max)
        scratch = scratch_ptr + bh * SCRATCH_SIZE
        d0 = tl.load(scratch + CTR + C_D0)
        n0, n1 = _share(lo, n_cand, j, split, BLOCK)
        if k > 0:
            n_gt = tl.zeros([], dtype=tl.int32)
            n_same = tl.zeros([], dtype=tl.int32)
            for t0 in range(n0, n1, BLOCK):
                offs = t0 + tl.arange(0, BLOCK)
                digit = tl.load(keys_ptr + bh * N + offs, mask=offs < n1, other=-1) >> 23
                n_gt += tl.sum((digit > d0).to(tl.int32), axis=0)
                n_same += tl.sum((digit == d0).to(tl.int32), axis=0)
            gt_at, same_at = _reserve_pair(scratch + CTR + C_GT1, n_gt, n_same)
            for t0 in range(n0, n1, BLOCK):
                offs = t0 + tl.arange(0, BLOCK)
                key = tl.load(keys_ptr + bh * N + offs, mask=offs < n1, other=-1)
                gt_at = _put(out_ptr + bh * k_max, gt_at, offs, (key >> 23) > d0)
                same = (key >> 23) == d0
                same_at = _put(list_ptr + bh * N, same_at, offs, same)
                tl.atomic_add(scratch + H1 + ((key >> 11) & (BINS1 - 1)), 1, mask=same, sem="relaxed")
            if _last_done(scratch + CTR + C_DONE1, split):
                d1, k2 = _bucket_2d(scratch + H1, tl.load(scratch + CTR + C_K1), 64, 64)
                tl.store(scratch + CTR + C_D1, d1)
                tl.store(scratch + CTR + C_K2, k2)

    @triton.jit
    def _pq_select_rest_kernel(lo_ptr, hi_ptr, topk_ptr, keys_ptr, scratch_ptr, list1_ptr, list2_ptr, out_ptr,
                               Hkv, N, k_max, split, BLOCK: tl.constexpr):
        """Pass 4: over list 1, emit above bucket d1, list bucket d1 and histogram its digit 2; the last program
        fixes the threshold key T and emits the listed tokens above T and the ties still needed."""
        bh = tl.program_id(0)
        j = tl.program_id(1)
        lo, n_cand, k = _row(lo_ptr, hi_ptr, topk_ptr, bh // Hkv, N, k_max)
        scratch = scratch_ptr + bh * SCRATCH_SIZE
        out_bh = out_ptr + bh * k_max
        d1 = tl.load(scratch + CTR + C_D1)
        above_top = tl.load(scratch + CTR + C_GT1)  # slots taken by pass 3; this pass's go after them
        i0, i1 = _share(0, tl.load(scratch + CTR + C_L1), j, split, BLOCK)
        if k > 0:
            n_gt = tl.zeros([], dtype=tl.int32)
            n_same = tl.zeros([], dtype=tl.int32)
            for t0 in range(i0, i1, BLOCK):
                pos = t0 + tl.arange(0, BLOCK)
                idx = tl.load(list1_ptr + bh * N + pos, mask=pos < i1, other=0)
                key = tl.load(keys_ptr + bh * N + idx, mask=pos < i1, other=0)
                digit = tl.where(pos < i1, (key >> 11) & (BINS1 - 1), -1)
                n_gt += tl.sum((digit > d1).to(tl.int32), axis=0)
                n_same += tl.sum((digit == d1).to(tl.int32), axis=0)
            gt_at, same_at = _reserve_pair(scratch + CTR + C_GT2, n_gt, n_same)
            gt_at += above_top
            for t0 in range(i0, i1, BLOCK):
                pos = t0 + tl.arange(0, BLOCK)
                idx = tl.load(list1_ptr + bh * N + pos, mask=pos < i1, other=0)
                key = tl.load(keys_ptr + bh * N + idx, mask=pos < i1, other=0)
                digit = tl.where(pos < i1, (key >> 11) & (BINS1 - 1), -1)
                gt_at = _put(out_bh, gt_at, idx, digit > d1)
                same = digit == d1
                same_at = _put(list2_ptr + bh * N, same_at, idx, same)
                tl.atomic_add(scratch + H2 + (key & (BINS2 - 1)), 1, mask=same, sem="relaxed")
            if _last_done(scratch + CTR + C_DONE2, split):
                d2, n_ties = _bucket_2d(scratch + H2, tl.load(scratch + CTR + C_K2), 32, 64)
                gt_at = above_top + tl.load(scratch + CTR + C_GT2, volatile=True)
                tie_at = k - n_ties
                n2 = tl.load(scratch + CTR + C_L2, volatile=True)
                for t0 in range(0, n2, BLOCK):
                    pos = t0 + tl.arange(0, BLOCK)
                    idx = tl.load(list2_ptr + bh * N + pos, mask=pos < n2, other=0, volatile=True)
                    key = tl.load(keys_ptr + bh * N + idx, mask=pos < n2, other=0)
                    digit = tl.where(pos < n2, key & (BINS2 - 1), -1)
                    gt_at = _put(out_bh, gt_at, idx, digit > d2)
                    tie = (digit == d2) & (tie_at + tl.cumsum((digit == d2).to(tl.int32), axis=0) <= k)
                    tie_at = _put(out_bh, tie_at, idx, tie)


def pq_select_cells(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     topk: torch.Tensor, k_max: int, scale: float, plan_warps: int = 8) -> torch.Tensor:
    """The cells path of :func:`pq_select_triton` (``M * nbits <= 12``); see the module docstring.

    ``plan_warps`` sets the warps of the per-cell plan program (a tuning knob for benchmarks).
    """
    _check(ip_table, codes, lo, hi, topk, k_max)
    B, Hkv, G, M, ksub = ip_table.shape
    nbits = ksub.bit_length() - 1
    if M * nbits > MAX_CELL_BITS:
        raise ValueError(f"pq_select_cells needs M * nbits <= {MAX_CELL_BITS}, got M={M}, nbits={nbits}")
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


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _code_words(codes: torch.Tensor) -> torch.Tensor:
    """``codes [B, Hkv, N, M]`` uint8 viewed as ``M // WB`` words of ``WB`` bytes per token (``WB`` up to 8)."""
    M = codes.shape[3]
    wb = min(M & -M, 8)
    if codes.stride(3) != 1 or any(s % wb for s in codes.stride()[:3]) or codes.storage_offset() % wb:
        codes = codes.contiguous()
    return codes.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[wb])


def pq_select_radix(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    topk: torch.Tensor, k_max: int, scale: float, split: int | None = None) -> torch.Tensor:
    """The radix path of :func:`pq_select_triton` (any ``M``, ``nbits``); see the module docstring.

    ``split`` (programs per sequence and KV head; None: about four programs per SM) is a knob for benchmarks.
    """
    _check(ip_table, codes, lo, hi, topk, k_max)
    B, Hkv, G, M, ksub = ip_table.shape
    N = codes.shape[2]
    BH = B * Hkv
    dev = codes.device
    gp = triton.next_power_of_2(G)
    words = _code_words(codes)
    table = ip_table.to(torch.float32).permute(0, 1, 3, 4, 2)  # [B, Hkv, M, ksub, G]
    if gp != G:
        table = F.pad(table, (0, gp - G))  # [B, Hkv, M, ksub, gp]
    table = table.contiguous()
    block_n = 512
    most = 4 * _num_sms(dev)
    if split is None:  # about four programs per SM, each at least one block of tokens (sym_*: see below)
        split = torch.sym_max(1, torch.sym_min(triton.cdiv(N, block_n), triton.cdiv(most, BH)))
    # Symbolic under torch.compile's dynamic shapes (another prompt length or batch size): the compile-time
    # bound of the split count is then its largest value, so one graph serves every size.
    split_p = triton.next_power_of_2(split) if isinstance(split, int) else triton.next_power_of_2(most)
    out = torch.empty(B, Hkv, k_max, dtype=torch.int32, device=dev)
    scratch = torch.empty(BH, _SCRATCH, dtype=torch.int32, device=dev)
    # [BH, split, 2, gp], [BH, N, gp] and [BH, N] buffers, flat (the kernels index them by hand): a symbolic dim of
    # a multi-dim buffer would make inductor specialize on its being 1 (one more graph per such case).
    part = torch.empty(BH * split * 2 * gp, dtype=torch.float32, device=dev)
    scores = torch.empty(BH * N * gp, dtype=torch.float32, device=dev)
    keys = torch.empty(BH * N, dtype=torch.int32, device=dev)
    list1 = torch.empty(BH * N, dtype=torch.int32, device=dev)
    list2 = torch.empty(BH * N, dtype=torch.int32, device=dev)
    grid = (BH, split)
    launch = torch.library.wrap_triton
    launch(_pq_select_stats_kernel)[grid](
        words, table, lo, hi, topk, part, scores, scratch, out, Hkv, N, ksub, k_max, split, float(scale),
        words.stride(0), words.stride(1), words.stride(2), M=M, WB=M // words.shape[3], GP=gp, BLOCK_N=block_n,
        num_warps=4)
    launch(_pq_select_score_kernel)[grid](
        lo, hi, topk, part, scores, keys, scratch, Hkv, N, G, k_max, split, GP=gp,
        SPLIT_P=split_p, BLOCK_N=1024, num_warps=4)
    launch(_pq_select_top_kernel)[grid](
        lo, hi, topk, keys, scratch, list1, out, Hkv, N, k_max, split, BLOCK=1024, num_warps=4)
    launch(_pq_select_rest_kernel)[grid](
        lo, hi, topk, keys, scratch, list1, list2, out, Hkv, N, k_max, split, BLOCK=1024, num_warps=4)
    return out


def use_cells(M: int, nbits: int) -> bool:
    """The dispatch rule of :func:`pq_select_triton` (measured: see the module docstring)."""
    return M * nbits <= MAX_CELL_BITS


def pq_select_triton(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     topk: torch.Tensor, k_max: int, scale: float) -> torch.Tensor:
    """Launch the Triton pq_select (same contract as :func:`pqflex.ops.portable.pq_select`, ties aside), by
    :func:`use_cells` the cells or the radix path."""
    M, ksub = ip_table.shape[-2:]
    if use_cells(M, ksub.bit_length() - 1):
        return pq_select_cells(ip_table, codes, lo, hi, topk, k_max, scale)
    return pq_select_radix(ip_table, codes, lo, hi, topk, k_max, scale)


def _check_op(query, centroids, codes, spans, topk, n, k_max) -> None:
    if query.dim() != 4 or not query.is_floating_point():
        raise ValueError(f"query must be a float tensor [B, Hkv, G, D], got {query.dtype} {tuple(query.shape)}")
    B, Hkv, G, D = query.shape
    if centroids.dim() != 5 or centroids.shape[:2] != (B, Hkv) or not centroids.is_floating_point():
        raise ValueError(f"centroids must be a float tensor [B, Hkv, M, ksub, dsub] = [{B}, {Hkv}, ...], got "
                         f"{centroids.dtype} {tuple(centroids.shape)}")
    M, ksub, dsub = centroids.shape[2:]
    if M * dsub != D:
        raise ValueError(f"query head dim {D} != M * dsub = {M} * {dsub} of the centroids")
    _check_codes(codes, B, Hkv, M, ksub, "centroids")
    if spans.shape != (B, 3) or spans.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"spans must be an int tensor [B, 3] = [{B}, 3], got {spans.dtype} {tuple(spans.shape)}")
    if topk.shape != (B,) or topk.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk must be an int tensor of shape ({B},), got {topk.dtype} {tuple(topk.shape)}")
    if n is not None and (n.dim() != 0 or n.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"n must be a 0-d int tensor or None, got {n.dtype} {tuple(n.shape)}")
    if isinstance(k_max, bool) or not isinstance(k_max, (int, torch.SymInt)) or k_max < 1:  # symbolic when compiled
        raise ValueError(f"k_max must be an int >= 1, got {k_max!r}")
    devices = {t.device for t in (query, centroids, codes, spans, topk) + (() if n is None else (n,))}
    if len(devices) != 1:
        raise ValueError(f"pq_select inputs must be on one device, got {sorted(map(str, devices))}")


@torch.library.triton_op("pqflex::pq_select", mutates_args=())
def pq_select(query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, spans: torch.Tensor,
              topk: torch.Tensor, n: torch.Tensor | None, k_max: int, scale: float) -> torch.Tensor:
    """``torch.ops.pqflex.pq_select``: the top-k middle tokens of a decode step from the query itself.

    ``query [B, Hkv, G, D]`` (the G query heads of each KV head), ``centroids [B, Hkv, M, ksub, dsub]``, ``codes
    [B, Hkv, N, M]``, ``spans [B, 3]`` (start, sink, recent budgets), ``topk [B]``, ``n`` the tokens cached (a 0-d
    tensor; None: ``N``): :func:`pqflex.ops.portable.pq_select` of the table ``q . centroids`` over the candidates
    :func:`pqflex.ops.portable.candidate_range`. Triton on CUDA (the table and the range are traced with the
    kernels), on the CPU the table, the range and the selection in one native C call, plain torch elsewhere.
    """
    _check_op(query, centroids, codes, spans, topk, n, k_max)
    ip_table = portable.compute_ip_table(query, centroids)  # [B, Hkv, G, M, ksub]
    lo, hi = portable.candidate_range(spans, n, codes.shape[2])
    # The device test also keeps torch.compile on the CPU tracing plain torch instead of Triton kernels.
    if triton is None or codes.device.type != "cuda":
        return portable.pq_select(ip_table, codes, lo, hi, topk, k_max, scale)
    return pq_select_triton(ip_table, codes, lo, hi, topk, k_max, scale)


def _pq_select_cpu(query, centroids, codes, spans, topk, n, k_max, scale):
    _check_op(query, centroids, codes, spans, topk, n, k_max)
    if native.usable(query, centroids):  # fp32: the table, the range and the selection in one C call
        return native.pq_select_query(query, centroids, codes, spans, topk, n, k_max, scale)
    lo, hi = portable.candidate_range(spans, n, codes.shape[2])
    return portable.pq_select(portable.compute_ip_table(query, centroids), codes, lo, hi, topk, k_max, scale)


native.register_cpu("pq_select", _pq_select_cpu)
