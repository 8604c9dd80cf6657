"""Sparse decode attention: the one new query of each sequence attends sink + selected + recent tokens per KV head.

The token list of a step has a static width ``T = sink_max + k_max + recent_max``: the sink positions, the
``k_max`` slots of :func:`pqflex.ops.pq_select` (``-1`` = empty) and the recent window, each with a validity
mask, so a decode step has the same shapes at every position and compiles once (no host sync, no data-dependent
shape). Three backends attend over that list:

- ``"fused"``: :func:`torch.ops.pqflex.sparse_decode_attention` reads the listed rows straight from the cache by
  index (no copy): a split-T Triton kernel with a combine step on CUDA, the reference elsewhere.

- ``"gather"``: copy the listed keys and values into a compact ``[B, Hkv, T, D]`` buffer and run SDPA with the
  ``G`` query heads of each KV head packed as query rows (what the original PQCache does).
- ``"flex"``: no copy; a token bitmap of the list drives FlexAttention through a ``BlockMask`` built on the device
  (blocks holding at least one listed token, the bitmap as ``mask_mod``). Fast only under ``torch.compile``;
  eager FlexAttention evaluates the mask over every token.

Both are exact attention over the listed tokens; ``tests/test_sparse.py`` checks them against
:func:`pqflex.ops.reference.masked_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pqflex.config import ATTENTION_BACKENDS
from pqflex.ops import sparse_attention
FLEX_KV_BLOCK = 128  # FlexAttention KV block size of the sparse decode mask


def decode_token_list(selected: torch.Tensor, start: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor,
                      n: torch.Tensor | int, sink_max: int, recent_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions attended by the query at position ``n - 1`` of each sequence, and which of them are real.

    Args:
        selected: ``[B, Hkv, k_max]`` int32 middle-token positions, ``-1`` for empty slots.
        start: ``[B]`` first valid position; ``sink``, ``recent``: ``[B]`` budgets (see :class:`pqflex.PQIndex`).
        n: tokens cached, the new one included (an int or a 0-d tensor: the same for every sequence).
        sink_max, recent_max: static widths, at least ``max(sink)`` and ``min(max(recent), n)``.

    Returns:
        ``idx [B, Hkv, T]`` int64 positions in ``[0, n)`` (0 in empty slots) and ``valid [B, Hkv, T]`` bool; the valid positions are
        distinct: sink ``[start, start + sink)``, the selected slots, recent ``[n - recent, n)`` past the sink.
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


def _pack_query(query: torch.Tensor, Hkv: int) -> torch.Tensor:
    B, H, S, D = query.shape
    if S != 1:
        raise ValueError(f"sparse decode attention takes one query per sequence, got S={S}")
    return query.reshape(B, Hkv, H // Hkv, D)  # the G query heads of a KV head as query rows


def gather_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                     valid: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention ``[B, H, 1, D]`` over the listed tokens, through a compact copy of their keys and values.

    Args:
        query: ``[B, H, 1, D]``; key, value: ``[B, Hkv, L, D]``; idx, valid: ``[B, Hkv, T]`` from
            :func:`decode_token_list`. ``valid=None`` states that every listed token is real (a batch whose
            sequences share one sparse budget): SDPA then runs unmasked, on its fast decode kernels.
    """
    B, Hkv, T = idx.shape
    D = key.shape[-1]
    _pack_query(query, Hkv)  # checks S == 1
    rows = idx[..., None].expand(B, Hkv, T, D)
    k, v = key.gather(2, rows), value.gather(2, rows)
    if valid is None:
        return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)
    q = _pack_query(query, Hkv)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :], scale=scale)
    return out.reshape(query.shape)


def flex_block_mask(idx: torch.Tensor, valid: torch.Tensor, n_queries: int, kv_len: int,
                    kv_block: int = FLEX_KV_BLOCK):
    """A FlexAttention ``BlockMask`` (one mask head per KV head) of the listed tokens of each KV head.

    The ``mask_mod`` reads a token bitmap of the list, so eager and compiled FlexAttention agree.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, _ = idx.shape
    nblk = -(-kv_len // kv_block)
    hits = torch.zeros(B, Hkv, nblk * kv_block, dtype=torch.int32, device=idx.device)
    bitmap = hits.scatter_add_(-1, idx, valid.int()) > 0  # [B, Hkv, nblk * kv_block]
    blocks = bitmap.view(B, Hkv, nblk, kv_block).any(-1)  # [B, Hkv, nblk]
    num = blocks.sum(-1, dtype=torch.int32)[:, :, None]  # [B, Hkv, 1]
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    indices = order.to(torch.int32)[:, :, None, :]  # [B, Hkv, 1, nblk]: listed blocks first, in order

    def mask_mod(b, h, q_idx, kv_idx):
        return bitmap[b, h, kv_idx]

    return BlockMask.from_kv_blocks(num, indices, torch.zeros_like(num), torch.zeros_like(indices),
                                    BLOCK_SIZE=(128, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(n_queries, kv_len), compute_q_blocks=False)


def flex_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                          valid: torch.Tensor, scale: float, kv_block: int = FLEX_KV_BLOCK) -> torch.Tensor:
    """Attention ``[B, H, 1, D]`` over the listed tokens with FlexAttention and a block mask (no copy)."""
    from torch.nn.attention.flex_attention import flex_attention

    Hkv, L = key.shape[1], key.shape[2]
    q = _pack_query(query, Hkv)
    mask = flex_block_mask(idx, valid, q.shape[2], L, kv_block)
    return flex_attention(q, key, value, block_mask=mask, scale=scale).reshape(query.shape)


def sparse_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor,
                            valid: torch.Tensor, scale: float, backend: str = "gather",
                            all_valid: bool = False, kv_block: int = FLEX_KV_BLOCK) -> torch.Tensor:
    """Exact attention ``[B, H, 1, D]`` of one query per sequence over the tokens of :func:`decode_token_list`.

    ``all_valid=True`` promises that ``valid`` is all True (see :attr:`pqflex.PQIndex.full_lists`), which lets
    the fused and gather backends skip the mask. ``kv_block``: FlexAttention's KV block size (the selection's
    block size for block selection, so that flex skips whole unselected blocks).
    """
    if backend == "fused":
        return sparse_attention.sparse_decode_attention(query, key, value, idx, None if all_valid else valid, scale)
    if backend == "gather":
        return gather_attention(query, key, value, idx, None if all_valid else valid, scale)
    if backend == "flex":
        return flex_sparse_attention(query, key, value, idx, valid, scale, kv_block)
    raise ValueError(f"sparse attention backend {backend!r} is not supported; allowed: {ATTENTION_BACKENDS}")
