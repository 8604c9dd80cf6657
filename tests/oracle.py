"""The test oracle: each op's contract written the slowest, plainest way (Python loops over sequences, heads and
tokens; whole-vector arithmetic; full sorts). Nothing in pqflex calls it. ``tests/test_oracle.py`` checks the
plain-torch implementations (:mod:`pqflex.ops.portable`) against it, and the kernel tests check the kernels against
those, so every kernel answers to the oracle."""

import math

import torch


def pq_encode(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``[L, N, M]`` codes of ``x [L, N, M * dsub]``: per sub-space the centroid at the least squared distance
    (ties to the lowest index)."""
    L, N, _ = x.shape
    M, ksub, dsub = centroids.shape[1:]
    out = torch.empty(L, N, M, dtype=torch.uint8)
    for l in range(L):
        for n in range(N):
            for m in range(M):
                sub = x[l, n, m * dsub:(m + 1) * dsub].double()
                dist = ((centroids[l, m].double() - sub) ** 2).sum(-1)
                out[l, n, m] = int(torch.nonzero(dist == dist.min())[0])
    return out


def decoded_keys(centroids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The keys ``[B, Hkv, N, D]`` the codes ``[B, Hkv, N, M]`` stand for: each sub-vector its centroid."""
    B, Hkv, N, M = codes.shape
    out = torch.empty(B, Hkv, N, M * centroids.shape[-1], dtype=centroids.dtype)
    for b in range(B):
        for h in range(Hkv):
            for n in range(N):
                out[b, h, n] = torch.cat([centroids[b, h, m, int(codes[b, h, n, m])] for m in range(M)])
    return out


def pq_select(queries: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, lo: torch.Tensor,
              hi: torch.Tensor, topk: torch.Tensor, scale: float) -> list[list[list[int]]]:
    """The selected tokens of one decode step, per sequence and KV head, best first.

    ``queries [B, Hkv, G, D]``: the scores are ``q . k_hat`` with ``k_hat`` the decoded keys; PQCache's GQA rule sums
    over the ``G`` query heads each head's softmax over the candidates ``[lo, hi)``; the ``topk`` best candidates
    (ties to the later token) are selected.
    """
    keys = decoded_keys(centroids.double(), codes)
    B, Hkv, G, _ = queries.shape
    out = []
    for b in range(B):
        cand = list(range(int(lo[b]), int(hi[b])))
        rows = []
        for h in range(Hkv):
            total = {t: 0.0 for t in cand}
            for g in range(G):
                logits = {t: float(queries[b, h, g].double() @ keys[b, h, t]) * scale for t in cand}
                peak = max(logits.values(), default=0.0)
                z = sum(math.exp(v - peak) for v in logits.values())
                for t in cand:
                    total[t] += math.exp(logits[t] - peak) / z
            ranked = sorted(cand, key=lambda t: (total[t], t), reverse=True)
            rows.append(ranked[:int(topk[b])])
        out.append(rows)
    return out


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention ``[B, H, 1, D]`` of each query head over the listed valid rows of its KV head, in float64 (a list
    with no valid token gives zeros)."""
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, 1, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // G
            rows = [int(t) for j, t in enumerate(idx[b, kv]) if valid is None or bool(valid[b, kv, j])]
            if not rows:
                continue
            k, v = key[b, kv, rows].double(), value[b, kv, rows].double()
            weights = torch.softmax(k @ query[b, h, 0].double() * scale, dim=0)
            out[b, h, 0] = weights @ v
    return out


def offload_gather(device_rows: torch.Tensor, host_rows: torch.Tensor, row: torch.Tensor,
                   pos: torch.Tensor) -> torch.Tensor:
    """Each listed row from exactly one place: ``device_rows`` at ``row`` where ``row >= 0``, else ``host_rows`` at
    ``pos``."""
    B, Hkv, T = row.shape
    out = torch.empty(B, Hkv, T, device_rows.shape[-1], dtype=device_rows.dtype)
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                r = int(row[b, h, t])
                out[b, h, t] = device_rows[b, h, r] if r >= 0 else host_rows[b, h, int(pos[b, h, t])]
    return out
