"""How a KV source attends: one object per attention backend, chosen once when a layer is built.

A backend attends one query per sequence ``[B, H, 1, D]`` over the rows of ``key``/``value`` ``[B, Hkv, C, D]``
that a decode step's :class:`pqflex.index.Selection` names per KV head: its top-k slots (``-1`` = empty) and, where
it has ``spans``, the sink and recent slots around them (:meth:`pqflex.index.Selection.token_list` builds the whole
list for a backend that needs it):

- :class:`FusedAttention` (``"fused"``, the default): ``torch.ops.pqflex.sparse_decode_attention`` reads the rows
  straight from the cache by index (no copy, no token list: the kernels compute the sink and recent positions): a
  split-T Triton kernel with a combine step on CUDA, the native C kernel on the CPU (fp32), plain torch elsewhere.
- :class:`GatherAttention` (``"gather"``): copy the listed keys and values into a compact ``[B, Hkv, T, D]`` buffer
  and run SDPA with the ``G`` query heads of each KV head packed as query rows (what the original PQCache does).
- :class:`FlexAttention` (``"flex"``): no copy; a token bitmap of the list drives FlexAttention through a
  ``BlockMask`` built on the device (blocks holding a listed token, the bitmap as ``mask_mod``). Fast only under
  ``torch.compile``; eager FlexAttention evaluates the mask over every token.

All three are exact attention over the listed tokens (``tests/test_sparse.py`` checks them against masked
attention). :func:`masked_attention` (plain torch, :mod:`pqflex.ops.portable`) serves several queries with a mask
each. A dense step (every token of ``[start, n)``) is a span to the fused kernel, which reads it like a recent window
(dense flash-decoding: each row read once); for the two backends that would list every token, :func:`range_attention`
attends the range (``reads_spans`` says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pqflex.config import ATTENTION_BACKENDS, PQConfig
from pqflex.ops import portable, sparse_attention  # noqa: F401  (registers torch.ops.pqflex.sparse_decode_attention)
from pqflex.ops.portable import masked_attention  # noqa: F401  (several queries with a token mask each)

FLEX_KV_BLOCK = 128  # FlexAttention KV block size of the sparse decode mask


def _pack_query(query: torch.Tensor, Hkv: int) -> torch.Tensor:
    B, H, S, D = query.shape
    if S != 1:
        raise ValueError(f"sparse decode attention takes one query per sequence, got S={S}")
    return query.reshape(B, Hkv, H // Hkv, D)  # the G query heads of a KV head as query rows


class Backend:
    """What the KV sources ask of every backend besides the call itself."""

    @staticmethod
    def reads_spans(query: torch.Tensor, key: torch.Tensor) -> bool:
        """Whether a dense step (one span ``[start, n)`` per sequence) goes to the backend: only where it reads
        spans without listing every token; else :func:`range_attention` attends the range."""
        return False


class FusedAttention(Backend):
    """``"fused"``: :func:`torch.ops.pqflex.sparse_decode_attention` over the selection, read by index."""

    name = "fused"

    @staticmethod
    def reads_spans(query: torch.Tensor, key: torch.Tensor) -> bool:
        """Where a kernel reads the spans itself: a dense step is one span, every row read once (dense
        flash-decoding); plain torch would list every token."""
        return sparse_attention.reads_spans(query, key)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection,
                 scale: float) -> torch.Tensor:
        """Attention ``[B, H, 1, D]`` of one query per sequence over a decode step's :class:`Selection`."""
        return torch.ops.pqflex.sparse_decode_attention(query, key, value, selection.middle, None, scale,
                                                        selection.spans,
                                                        portable.count_argument(selection.n, key.shape[2], key.device),
                                                        selection.sink, selection.recent)


class GatherAttention(Backend):
    """``"gather"``: a compact copy of the listed keys and values, then SDPA (unmasked when the list is full, which
    lets SDPA take its fast decode kernels)."""

    name = "gather"

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection,
                 scale: float) -> torch.Tensor:
        tokens, valid = selection.token_list()
        B, Hkv, T = tokens.shape
        D = key.shape[-1]
        q = _pack_query(query, Hkv)  # checks S == 1
        rows = tokens[..., None].expand(B, Hkv, T, D)
        k, v = key.gather(2, rows), value.gather(2, rows)
        if selection.full:
            return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :], scale=scale)
        return out.reshape(query.shape)


def flex_block_mask(tokens: torch.Tensor, valid: torch.Tensor, n_queries: int, kv_len: int,
                    kv_block: int = FLEX_KV_BLOCK):
    """A FlexAttention ``BlockMask`` (one mask head per KV head) of the listed tokens ``[B, Hkv, T]`` of each KV
    head. The ``mask_mod`` reads a token bitmap of the list, so eager and compiled FlexAttention agree."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hkv, _ = tokens.shape
    nblk = -(-kv_len // kv_block)
    hits = torch.zeros(B, Hkv, nblk * kv_block, dtype=torch.int32, device=tokens.device)
    bitmap = hits.scatter_add_(-1, tokens, valid.int()) > 0  # [B, Hkv, nblk * kv_block]
    blocks = bitmap.view(B, Hkv, nblk, kv_block).any(-1)  # [B, Hkv, nblk]
    num = blocks.sum(-1, dtype=torch.int32)[:, :, None]  # [B, Hkv, 1]
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
    indices = order.to(torch.int32)[:, :, None, :]  # [B, Hkv, 1, nblk]: listed blocks first, in order

    def mask_mod(b, h, q_idx, kv_idx):
        return bitmap[b, h, kv_idx]

    return BlockMask.from_kv_blocks(num, indices, torch.zeros_like(num), torch.zeros_like(indices),
                                    BLOCK_SIZE=(128, kv_block), mask_mod=mask_mod,
                                    seq_lengths=(n_queries, kv_len), compute_q_blocks=False)


class FlexAttention(Backend):
    """``"flex"``: FlexAttention with a block mask of the list (no copy). ``kv_block``: its KV block size (the
    selection's block size for block selection, so that whole unselected blocks are skipped)."""

    name = "flex"

    def __init__(self, kv_block: int = FLEX_KV_BLOCK) -> None:
        self.kv_block = kv_block

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection,
                 scale: float) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        tokens, valid = selection.token_list()
        Hkv, L = key.shape[1], key.shape[2]
        q = _pack_query(query, Hkv)
        mask = flex_block_mask(tokens, valid, q.shape[2], L, self.kv_block)
        return flex_attention(q, key, value, block_mask=mask, scale=scale).reshape(query.shape)


def attention_backend(config: PQConfig) -> FusedAttention | GatherAttention | FlexAttention:
    """The backend object of ``config.backend`` (flex's KV block follows a block selection of multiples of 16)."""
    if config.backend == "fused":
        return FusedAttention()
    if config.backend == "gather":
        return GatherAttention()
    if config.backend == "flex":
        block = config.block_size
        return FlexAttention(block if config.selection == "block" and block % 16 == 0 else FLEX_KV_BLOCK)
    raise ValueError(f"sparse attention backend {config.backend!r} is not supported; allowed: {ATTENTION_BACKENDS}")


def range_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor,
                    n: torch.Tensor | int, scale: float) -> torch.Tensor:
    """Dense attention ``[B, H, 1, D]`` of one query per sequence over its tokens ``[start, n)`` of ``key``/``value``
    ``[B, Hkv, C, D]`` (``start`` ``[B]``): masked SDPA over the whole buffer, static shapes."""
    B, H, _, D = query.shape
    C, Hkv = key.shape[-2], key.shape[1]
    pos = torch.arange(C, device=key.device)
    valid = (pos >= start[:, None]) & (pos < n)  # [B, C]
    q = query.reshape(B, Hkv, H // Hkv, D)
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(query.shape)


def kernel_path(device: torch.device | str) -> str:
    """Which implementation the decode ops run on ``device``: ``"Triton kernels"`` (CUDA), ``"native C kernels"``
    (the CPU, fp32, when the native library loads) or ``"plain torch"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "Triton kernels"
    from pqflex.ops import native

    return "native C kernels" if device.type == "cpu" and native.library() is not None else "plain torch"
