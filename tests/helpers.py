"""Shared test helpers: the float tolerance rule and synthetic attention data."""

import torch
import torch.nn.functional as F


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_close_rule(out: torch.Tensor, ref_lp: torch.Tensor, ref32: torch.Tensor, atol_floor: float = 1e-5):
    """flash-attention's rule: ``err(out, ref32) <= 2 * err(ref_lp, ref32) + atol_floor``."""
    e_out, e_lp = err(out, ref32), err(ref_lp, ref32)
    assert e_out <= 2 * e_lp + atol_floor, f"err {e_out:.3g} > 2 * {e_lp:.3g} + {atol_floor:g}"


def dense_causal(query, key, value, kv_mask=None, scale=None):
    """SDPA of the last S positions over N cached tokens, GQA by repetition, padding masked."""
    B, H, S, D = query.shape
    N = key.shape[-2]
    G = H // key.shape[1]
    qpos = torch.arange(N - S, N, device=query.device)[:, None]
    mask = (torch.arange(N, device=query.device)[None, :] <= qpos)[None, None]  # [1, 1, S, N]
    if kv_mask is not None:
        mask = mask & kv_mask[:, None, None, :]
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale)


def clustered_keys(B, Hkv, N, D, n_clusters=32, spread=0.35, generator=None):
    """Keys drawn from a Gaussian mixture, as attention keys cluster in practice. ``[B, Hkv, N, D]``."""
    centers = torch.randn(B, Hkv, n_clusters, D, generator=generator)
    assign = torch.randint(n_clusters, (B, Hkv, N), generator=generator)
    base = torch.gather(centers, 2, assign[..., None].expand(B, Hkv, N, D))
    return base + spread * torch.randn(B, Hkv, N, D, generator=generator)


def selection_mask(selection, N: int) -> torch.Tensor:
    """``[B, Hkv, S, N]`` bool of the tokens a :class:`pqflex.Selection` attends (its mask, or its token list)."""
    if selection.mask is not None:
        return selection.mask[..., :N]
    tokens, valid = selection.token_list()
    B, Hkv, _ = tokens.shape
    hits = torch.zeros(B, Hkv, 1, max(N, int(tokens.max()) + 1), dtype=torch.int32, device=tokens.device)
    hits = hits.scatter_add_(-1, tokens[:, :, None], valid[:, :, None].int())
    return hits[..., :N] > 0


def decode(index, query, key, value, n, scale, backend=None):
    """One decode step of ``index`` over ``key``/``value`` (its newest key indexed already): plan, then attend."""
    from pqflex import ResidentKV, attention_backend

    kv = ResidentKV(key, value, attention_backend(index.config if backend is None else backend))
    return kv.attend(query, index.plan(query, n, scale, key), scale)
