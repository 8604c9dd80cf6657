"""retrieval_attention: PQCache attention as one stateless function, the reference semantics of pqflex."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pqflex.config import PQConfig
from pqflex.index import PQIndex, check_attention_inputs
from pqflex.kvstore import ResidentKV
from pqflex.ops.backends import attention_backend

def retrieval_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: PQConfig, *,
                        kv_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """PQCache retrieval attention, like ``F.scaled_dot_product_attention(..., is_causal)`` for the last queries.

    Builds the PQ index of the middle keys (per sequence and KV head), scores the middle tokens by ADC with the
    GQA aggregation of PQCache, keeps the top-k per KV head and attends exactly over sink + selected + recent.
    Query ``i`` sits at position ``N - S + i``. With a budget covering the context this is dense causal attention.

    Args:
        query: ``[B, H, S, D]`` post-RoPE queries.
        key, value: ``[B, Hkv, N, D]``, not repeated for GQA.
        config: PQ settings.
        kv_mask: ``[B, N]`` bool left-padding mask, True for real tokens; padded tokens are never attended.
        scale: softmax scale; default ``D ** -0.5``.

    Returns:
        ``[B, H, S, D]`` in the query dtype.
    """
    check_attention_inputs(query, key, value, config)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    index = PQIndex.build(key, config, kv_mask)
    selection = index.plan(query, key.shape[-2], scale, key)
    return ResidentKV(key, value, attention_backend(config)).attend(query, selection, scale)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Dense causal attention of the last ``S`` of ``N`` positions (a prompt, or a chunk of one), with GQA.

    Args:
        query: ``[B, H, S, D]`` at positions ``N - S .. N - 1``; key, value: ``[B, Hkv, N, D]``.
        kv_mask: ``[B, N]`` bool left-padding mask (True = token) or None.
        scale: softmax scale.

    Returns:
        ``[B, H, S, D]``. A padding query attends itself only (its output is unused but finite, so it never
        poisons later layers).
    """
    S, N = query.shape[-2], key.shape[-2]
    if kv_mask is None and S == N:  # a whole unpadded prompt: SDPA's causal kernels, no mask tensor
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
    pos = torch.arange(N, device=query.device)
    qpos = torch.arange(N - S, N, device=query.device)[:, None]  # [S, 1]
    allowed = pos <= qpos  # [S, N]
    if kv_mask is not None:
        allowed = (allowed & kv_mask[:, None, :]) | (pos == qpos)  # [B, S, N]
    mask = allowed if allowed.dim() == 3 else allowed[None]
    G = query.shape[1] // key.shape[1]  # SDPA's masked kernels take no GQA: repeat the KV heads (as transformers)
    key, value = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scale)
