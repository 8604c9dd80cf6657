"""Plain-torch implementation of every pqflex op: what runs where no kernel serves (a device without one, a shape
beyond a kernel's limits, the CPU without the native library), and the building blocks the index uses (the
inner-product table, PQCache's GQA aggregation, top-k). The kernels are tested against it, and it is tested against
the brute-force oracle of ``tests/oracle.py``, which no production code calls.

Shapes use the house letters: ``L`` independent problems (flattened leading dims), ``N`` points or cached
tokens, ``R`` query rows, ``M`` sub-quantizers, ``ksub`` centroids per sub-space, ``dsub`` sub-vector dims,
``B`` batch, ``Hkv`` KV heads, ``G`` query heads per KV head, ``S`` query length. Everything accumulates in fp32,
runs on any device and keeps no state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kmeans(x: torch.Tensor, mask: torch.Tensor | None, ksub: int, niter: int, seed: int = 0,
           tol: float = 0.0, init: torch.Tensor | None = None) -> torch.Tensor:
    """Batched Lloyd k-means with a seeded, batch-independent initialization and no dead clusters.

    Initialization is stratified sampling: centroid ``j`` starts at the valid point of rank
    ``floor((j + r_j) / ksub * n_valid)`` with ``r_j ~ U[0, 1)`` drawn from ``seed``. The draw is shared by all
    rows, so a row's result depends only on its own points (a padded batch equals its rows run one by one).
    A cluster left empty by an update is re-seeded at the valid points farthest from their centroid.

    Args:
        x: points ``[L, N, dsub]``.
        mask: ``[L, N]`` bool, True for points that take part; None means all.
        ksub: number of centroids.
        niter: Lloyd iterations.
        seed: initialization seed.
        tol: stop when the mean squared centroid shift is below ``tol`` times the data variance (host sync per
            iteration); 0 runs exactly ``niter`` iterations.
        init: ``[L, ksub, dsub]`` centroids to start from (a warm start, e.g. an index refreshed over more keys);
            None draws them from ``seed`` as above. A row with no valid point keeps its ``init``.

    Returns:
        centroids ``[L, ksub, dsub]`` fp32.
    """
    w = kmeans_weights(x, mask)
    xf = torch.where(w[..., None] > 0, x.float(), 0.0)  # masked points never reach the arithmetic (0 * nan)
    x_sq = xf.pow(2).sum(-1)  # [L, N]

    def step(centroids: torch.Tensor):
        assign, partial = nearest(xf, centroids)
        sums, counts = _cluster_sums(xf, w, assign, ksub)
        return sums, counts, partial + x_sq  # [L, N] squared distance to its centroid

    return lloyd(xf, w, ksub, niter, seed, tol, step, init)


def nearest(x: torch.Tensor, centroids: torch.Tensor,
            block_bytes: int = 8 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Index ``[L, N]`` of each point's nearest centroid and ``||c||^2 - 2 x.c`` for it (ties: lowest index).

    ``||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2``; the argmin needs the last two terms only. The ``[L, n, ksub]``
    distance block is computed for a slice of the points at a time (about ``block_bytes``), so it stays in the
    cache instead of a full ``[L, N, ksub]`` matrix going through memory three times.
    """
    L, N, _ = x.shape
    c = centroids.float()
    c_t, c_sq = c.transpose(1, 2), c.pow(2).sum(-1)[:, None, :]  # [L, dsub, ksub], [L, 1, ksub]
    chunk = max(1, block_bytes // (4 * L * c.shape[1]))
    assign = torch.empty(L, N, dtype=torch.long, device=x.device)
    partial = torch.empty(L, N, device=x.device)
    for lo in range(0, N, chunk):
        block = torch.baddbmm(c_sq, x[:, lo:lo + chunk], c_t, alpha=-2)  # [L, n, ksub]
        partial[:, lo:lo + chunk], assign[:, lo:lo + chunk] = block.min(-1)
    return assign, partial


def kmeans_weights(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[L, N]`` fp32 weights (1 for points that take part) of ``x [L, N, dsub]``."""
    return torch.ones(x.shape[:2], device=x.device) if mask is None else mask.to(torch.float32)


def check_init(init: torch.Tensor | None, x: torch.Tensor, ksub: int) -> None:
    """Raise ``ValueError`` unless ``init`` is None or floating-point ``[L, ksub, dsub]`` for ``x [L, N, dsub]``."""
    if init is not None and (not init.is_floating_point() or init.shape != (x.shape[0], ksub, x.shape[2])):
        raise ValueError(f"init must be floating-point centroids {(x.shape[0], ksub, x.shape[2])}, got {init.dtype} "
                         f"{tuple(init.shape)}")


def lloyd(x: torch.Tensor, w: torch.Tensor, ksub: int, niter: int, seed: int, tol: float, step,
          init: torch.Tensor | None = None) -> torch.Tensor:
    """The Lloyd loop shared by every k-means backend: seeded (or given) init, ``step``, mean update, empty
    re-seeding.

    ``step(centroids)`` returns the per-cluster weighted sums ``[L, ksub, dsub]`` and counts ``[L, ksub]`` of the
    points assigned to each centroid, and each point's squared distance to its centroid ``[L, N]``. With ``init``
    (``[L, ksub, dsub]``), the loop starts from it, and a row without a valid point returns it unchanged.
    """
    L, N, dsub = x.shape
    n_valid = w.sum(-1)  # [L]
    if init is not None:
        check_init(init, x, ksub)
        start = init.to(x.device, torch.float32)
        centroids = _lloyd_iterations(x, w, ksub, niter, tol, step, start.clone(), n_valid)
        return torch.where((n_valid > 0)[:, None, None], centroids, start)
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(ksub, generator=gen, dtype=torch.float64)
    # Pinned and asynchronous on CUDA: the host does not wait for the stream (a build overlapping the prefill).
    r = r.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else r.to(x.device)
    frac = (torch.arange(ksub, device=x.device, dtype=torch.float64) + r) / ksub  # [ksub] in [0, 1)
    rank = (frac[None, :] * n_valid[:, None].double()).floor().long()  # [L, ksub]
    rank = torch.minimum(rank, (n_valid.long() - 1).clamp_min(0)[:, None])
    pos = torch.searchsorted(w.cumsum(-1).contiguous(), (rank + 1).float())  # index of the rank-th valid point
    centroids = torch.gather(x, 1, pos.clamp_max(N - 1)[..., None].expand(L, ksub, dsub)).float()
    return _lloyd_iterations(x, w, ksub, niter, tol, step, centroids, n_valid)


def _lloyd_iterations(x: torch.Tensor, w: torch.Tensor, ksub: int, niter: int, tol: float, step,
                      centroids: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    L, N, dsub = x.shape
    kk = min(ksub, N)
    variance = None
    for _ in range(niter):
        sums, counts, dist = step(centroids)
        new = sums / counts.clamp_min(1)[..., None]  # [L, ksub, dsub]
        empty = counts == 0
        far = dist.masked_fill(w == 0, -1.0).topk(kk, dim=-1).indices  # [L, kk]
        slot = (empty.long().cumsum(-1) - 1).clamp(0, kk - 1)  # r-th empty cluster takes the r-th farthest point
        far_pts = torch.gather(x, 1, far.gather(1, slot)[..., None].expand(L, ksub, dsub)).float()
        new = torch.where(empty[..., None], far_pts, new)
        if tol > 0:
            if variance is None:
                mean = (x * w[..., None]).sum(1, keepdim=True) / n_valid.clamp_min(1)[:, None, None]
                variance = (((x - mean) ** 2).sum(-1) * w).sum() / w.sum().clamp_min(1)
            shift = (new - centroids).pow(2).sum(-1).mean()
            centroids = new
            if shift <= tol * variance:
                break
        else:
            centroids = new
    return centroids


def _cluster_sums(x: torch.Tensor, w: torch.Tensor, assign: torch.Tensor,
                  ksub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums ``[L, ksub, dsub]`` and counts ``[L, ksub]`` of the points of each cluster.

    On CUDA a one-hot matmul (deterministic, unlike atomic adds); elsewhere an index add, which is deterministic
    on the CPU and avoids the ``[L, N, ksub]`` one-hot tensor.
    """
    L, N, dsub = x.shape
    if x.is_cuda:
        onehot = F.one_hot(assign, ksub).float() * w[..., None]  # [L, N, ksub]
        return onehot.transpose(1, 2) @ x, onehot.sum(1)
    flat = (assign + ksub * torch.arange(L, device=x.device)[:, None]).reshape(-1)  # [L * N]
    sums = torch.zeros(L * ksub, dsub, device=x.device).index_add_(0, flat, (x * w[..., None]).reshape(-1, dsub))
    counts = torch.zeros(L * ksub, device=x.device).index_add_(0, flat, w.reshape(-1))
    return sums.view(L, ksub, dsub), counts.view(L, ksub)


def encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest-centroid code of every point.

    Args:
        x: ``[L, N, dsub]``.
        centroids: ``[L, ksub, dsub]``.

    Returns:
        ``[L, N]`` int64 codes (ties go to the lowest index).
    """
    return nearest(x.float(), centroids)[0]


def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Codes of vectors split into ``M`` sub-vectors, each coded by its own sub-space's centroids.

    Args:
        x: ``[L, N, M * dsub]``.
        centroids: ``[L, M, ksub, dsub]``.

    Returns:
        ``[L, N, M]`` uint8 codes.
    """
    L, N, _ = x.shape
    M, ksub, dsub = centroids.shape[1:]
    sub = x.reshape(L, N, M, dsub).transpose(1, 2).reshape(L * M, N, dsub)  # [L * M, N, dsub]
    codes = encode(sub, centroids.reshape(L * M, ksub, dsub))  # [L * M, N]
    return codes.view(L, M, N).transpose(1, 2).to(torch.uint8).contiguous()


def compute_ip_table(query: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Inner products of each query sub-vector with the centroids of its sub-space.

    Args:
        query: ``[..., R, M * dsub]``.
        centroids: ``[..., M, ksub, dsub]`` (same leading dims).

    Returns:
        ``ip_table [..., R, M, ksub]`` fp32 with ``ip_table[..., r, m, c] = q[r, m] . centroids[m, c]``.
    """
    M, _, dsub = centroids.shape[-3:]
    q = query.float().unflatten(-1, (M, dsub)).transpose(-2, -3)  # [..., M, R, dsub]
    return torch.matmul(q, centroids.float().transpose(-1, -2)).transpose(-2, -3)  # one batched GEMM per sub-space


def adc_scores(ip_table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Asymmetric distance computation: approximate ``q . k`` of every coded key.

    Args:
        ip_table: ``[..., R, M, ksub]``.
        codes: ``[..., N, M]`` uint8 (same leading dims).

    Returns:
        ``adc_scores [..., R, N]`` fp32, ``sum_m ip_table[..., r, m, codes[..., n, m]]``.
    """
    R, M, _ = ip_table.shape[-3:]
    N = codes.shape[-2]
    table = ip_table.transpose(-3, -2)  # [..., M, R, ksub]
    idx = codes.long().transpose(-1, -2).unsqueeze(-2)  # [..., M, 1, N]
    idx = idx.expand(*idx.shape[:-2], R, N)  # [..., M, R, N]
    return torch.gather(table, -1, idx).sum(-3)


def gqa_scores(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Aggregate the scaled scores of the ``G`` query heads of each KV head into one score per token.

    PQCache's rule: a softmax over the candidate tokens per query head, summed over the group.

    Args:
        scores: ``[B, Hkv, G, S, N]`` scaled approximate logits.
        candidates: ``[B, S, N]`` bool, the tokens each query may select.

    Returns:
        ``[B, Hkv, S, N]`` fp32 in ``[0, G]`` for candidates, ``-1`` elsewhere.
    """
    cand = candidates[:, None, None]  # [B, 1, 1, S, N]
    probs = torch.softmax(scores.float().masked_fill(~cand, -math.inf), dim=-1).nan_to_num(0.0)
    return probs.sum(2).masked_fill(~candidates[:, None], -1.0)


def select_topk(scores: torch.Tensor, topk: torch.Tensor, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``topk[b]`` candidates of each sequence, KV head and query; ties go to the later token.

    Args:
        scores: ``[B, Hkv, S, N]`` from :func:`gqa_scores` (non-candidates are negative).
        topk: ``[B]`` int64, tokens to keep per sequence, at most ``k_max``.
        k_max: static width of the result.

    Returns:
        ``indices [B, Hkv, S, k_max]`` int64 and ``valid`` bool of the same shape: rank below ``topk[b]`` and a
        real candidate.
    """
    B, _, _, N = scores.shape
    k = min(k_max, N)
    # Equal scores are common (tokens with equal codes): break ties toward the later token, so the selection
    # depends on positions relative to each other only (a padded row selects what it selects alone). The k-th
    # largest score is the threshold; all tokens above it and the latest of those equal to it are the top k, then
    # only those k are ordered (best first, later first among equals): no sort of all N scores.
    kth = scores.topk(k, dim=-1).values[..., -1:]  # [B, Hkv, S, 1]
    above, equal = scores > kth, scores == kth
    need = k - above.sum(-1, keepdim=True)
    later = equal.flip(-1).cumsum(-1).flip(-1)  # 1 at the last tied token, 2 at the one before, ...
    take = above | (equal & (later <= need))  # exactly k tokens
    pos = torch.arange(N, device=scores.device)
    indices = torch.where(take, pos, -1).topk(k, dim=-1).values  # the k taken positions, latest first
    values = scores.gather(-1, indices)
    values, order = values.sort(dim=-1, descending=True, stable=True)
    indices = indices.gather(-1, order)
    ranks = torch.arange(k, device=scores.device)
    valid = (ranks < topk.view(B, 1, 1, 1)) & (values >= 0)
    if k < k_max:
        pad = (0, k_max - k)
        indices, valid = F.pad(indices, pad), F.pad(valid, pad)
    return indices, valid


def select_from_scores(scores: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, topk: torch.Tensor,
                       k_max: int) -> torch.Tensor:
    """The top-k middle tokens of one decode step from per-head scaled scores (exact or approximate).

    Args:
        scores: ``[B, Hkv, G, N]`` scaled logits of each query head of a KV head.
        lo, hi: ``[B]`` int64, candidate range ``[lo, hi)``; topk: ``[B]`` tokens to keep, at most ``k_max``.

    Returns:
        ``[B, Hkv, k_max]`` int32 token indices, best first (GQA rule of :func:`gqa_scores`; ties to the later
        token); ``-1`` past ``min(topk, #candidates)``.
    """
    pos = torch.arange(scores.shape[-1], device=scores.device)
    candidates = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, :]  # [B, 1, N]
    agg = gqa_scores(scores[:, :, :, None], candidates)  # [B, Hkv, 1, N]
    indices, valid = select_topk(agg, topk, k_max)
    return torch.where(valid, indices, -1)[:, :, 0].to(torch.int32)


def count_argument(n: torch.Tensor | int, rows: int, device: torch.device) -> torch.Tensor | None:
    """The ``n`` argument of the decode ops: a 0-d tensor as given, None where ``n`` equals ``rows`` (the tensors
    hold exactly the cached tokens), else a 0-d tensor of it on ``device``."""
    if torch.is_tensor(n):
        return n
    return None if n == rows else torch.full((), n, dtype=torch.int64, device=device)


def candidate_range(spans: torch.Tensor, n: torch.Tensor | int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The middle (candidate) tokens ``[lo, hi)`` of each sequence: after its sink, before its recent window.

    ``spans [B, 3]`` holds (start, sink budget, recent budget) per sequence; ``n`` the tokens cached (an int or a
    0-d tensor; None: ``N``). Returns ``lo = start + sink`` and ``hi = max(n - recent, 0)``, ``[B]`` int64.
    """
    return spans[:, 0] + spans[:, 1], ((N if n is None else n) - spans[:, 2]).clamp(min=0)


def pq_select(ip_table: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
              topk: torch.Tensor, k_max: int, scale: float) -> torch.Tensor:
    """GQA-aggregated ADC scores of the middle tokens and their exact top-k (``pqflex.ops.pq_select``'s math).

    Ties go to the later token.

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
    return select_from_scores(adc_scores(ip_table, codes) * scale, lo, hi, topk, k_max)


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attend: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Exact attention of each query over the tokens ``attend`` marks, per KV head.

    Args:
        query: ``[B, H, S, D]``.
        key, value: ``[B, Hkv, N, D]``.
        attend: ``[B, Hkv, S, N]`` bool.
        scale: softmax scale.

    Returns:
        ``[B, H, S, D]`` in the query dtype; rows that attend nothing are zero.
    """
    G = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(G, dim=1)  # [B, H, N, D]
    v = value.repeat_interleave(G, dim=1)
    mask = attend.repeat_interleave(G, dim=1)  # [B, H, S, N]
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def decode_token_list(selected: torch.Tensor, start: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor,
                      n: torch.Tensor | int, sink_max: int, recent_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions attended by the query at position ``n - 1`` of each sequence, and which of them are real.

    Args:
        selected: ``[B, Hkv, W]`` int positions of the middle (top-k) slots, ``-1`` for empty slots.
        start: ``[B]`` first valid position; ``sink``, ``recent``: ``[B]`` budgets.
        n: tokens cached, the new one included (an int or a 0-d tensor: the same for every sequence).
        sink_max, recent_max: static widths of the sink and recent parts.

    Returns:
        ``idx [B, Hkv, sink_max + W + recent_max]`` int64 positions in ``[0, n)`` (0 in empty slots) and ``valid``
        bool of the same shape: sink ``[start, start + sink)``, the selected slots, recent ``[n - recent, n)`` past
        the sink (the valid positions are distinct when the selected ones lie between sink and recent).
    """
    B, Hkv, _ = selected.shape
    dev = selected.device
    start, sink, recent = start[:, None], sink[:, None], recent[:, None]  # [B, 1]
    sink_pos = start + torch.arange(sink_max, device=dev)  # [B, sink_max]
    sink_ok = (sink_pos < start + sink) & (sink_pos < n)
    recent_pos = n - recent_max + torch.arange(recent_max, device=dev)[None, :]  # [1, recent_max]
    recent_ok = (recent_pos >= n - recent) & (recent_pos >= start + sink) & (recent_pos >= 0)
    idx = torch.cat([sink_pos[:, None].expand(B, Hkv, sink_max), selected.long(),
                     recent_pos[:, None].expand(B, Hkv, recent_max)], dim=-1)
    valid = torch.cat([sink_ok[:, None].expand(B, Hkv, sink_max), selected >= 0,
                       recent_ok[:, None].expand(B, Hkv, recent_max)], dim=-1)
    return torch.where(valid, idx, 0), valid  # empty slots read row 0 (in bounds), never attended


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor | None, scale: float, spans: torch.Tensor | None = None,
                            n: torch.Tensor | None = None, sink: int = 0, recent: int = 0) -> torch.Tensor:
    """Exact attention of one query per sequence over the tokens listed for its KV head, by index.

    The ``G = H // Hkv`` query heads of KV head ``h`` attend the keys at ``idx[b, h, t]`` for the slots ``t`` with
    ``idx >= 0`` and ``valid[b, h, t]``; the same as :func:`masked_attention` with the token bitmap of the list.
    With ``spans``, a decode step's whole list without building it: ``sink`` slots before ``idx`` and ``recent``
    slots after it, as :func:`decode_token_list` places them.

    Args:
        query: ``[B, H, 1, D]``.
        key, value: ``[B, Hkv, C, D]`` (``C`` cached tokens or a static buffer's capacity).
        idx: ``[B, Hkv, W]`` int32 or int64 positions in ``[0, C)``, negative for an empty slot; the real ones are
            distinct (and, with ``spans``, between the sink and the recent window).
        valid: ``[B, Hkv, W]`` bool, or None when every non-negative slot is real.
        scale: softmax scale.
        spans: ``[B, 3]`` int (start, sink budget, recent budget) of each sequence, or None (no sink or recent
            slots: ``sink = recent = 0``).
        n: 0-d int tensor, tokens cached (the new one included); None: ``C``, the keys hold exactly the cache.
        sink, recent: static widths of the sink and recent parts.

    Returns:
        ``[B, H, 1, D]`` in the query dtype; a query whose list has no valid token gets zeros; a NaN or infinite
        query or attended key gives NaN, as SDPA does.
    """
    if spans is not None:
        spans = spans.to(idx.device)
        idx, valid = decode_token_list(torch.where(idx >= 0 if valid is None else valid & (idx >= 0), idx, -1),
                                       spans[:, 0], spans[:, 1], spans[:, 2], key.shape[2] if n is None else n,
                                       sink, recent)
    else:
        valid = idx >= 0 if valid is None else valid & (idx >= 0)
    B, H, _, D = query.shape
    _, Hkv, T = idx.shape
    rows = idx.long().clamp(min=0)[..., None].expand(B, Hkv, T, D)
    k = key.gather(2, rows).float()  # [B, Hkv, T, D]
    v = value.gather(2, rows).float()
    q = query.float().reshape(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
    logits = (q @ k.transpose(-1, -2)) * scale  # [B, Hkv, G, T]
    probs = torch.softmax(logits.masked_fill(~valid[:, :, None, :], -math.inf), dim=-1)
    probs = torch.where(valid.any(-1)[:, :, None, None], probs, 0.0)  # no valid token: zeros (NaN inputs stay NaN)
    return (probs @ v).reshape(B, H, 1, D).to(query.dtype)  # [B, H, 1, D]


def offload_gather(device_rows: torch.Tensor, host_rows: torch.Tensor, row: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
    """Rows ``[B, Hkv, T, D]`` from two sources: ``device_rows[b, h, row]`` where ``row >= 0``, else
    ``host_rows[b, h, pos]``.

    Args:
        device_rows: ``[B, Hkv, R, D]`` (the GPU part of an offloaded KV store); host_rows: ``[B, Hkv, C, D]``
            (every cached token, in CPU memory); row, pos: ``[B, Hkv, T]`` integer (``pos`` is read where
            ``row < 0`` only and must be in ``[0, C)`` there).
    """
    D = device_rows.shape[-1]
    here = device_rows.gather(2, row.clamp(min=0).long()[..., None].expand(*row.shape, D))
    there = host_rows.gather(2, torch.where(row < 0, pos, 0).long()[..., None].expand(*row.shape, D))
    return torch.where((row >= 0)[..., None], here, there)
