"""The ``"pqcache"`` attention implementation of transformers: the attention function and the mask function.

Importing this module registers both in transformers' registries (``import pqflex`` does it as soon as transformers'
model code is loaded), so ``from_pretrained(..., attn_implementation="pqcache")`` and
``model.set_attn_implementation("pqcache")`` work. The attention function is an adapter: it finds the
:class:`pqflex.PQCacheState` of this forward's cache (one :class:`pqflex.PQLayer` per layer), calls it and returns
transformers' layout. The runtime decides prefill vs decode; nothing here does.

Where the PQ state lives: with the cache object that holds the keys. A forward pre-hook on each attention module
passes the forward's cache to the attention function as a keyword (``pqflex_cache``), so concurrent requests on one
model, each with its own cache, never share state. A :class:`pqflex.PQCache` or :class:`pqflex.PQStaticCache` owns
its state; transformers' own ``DynamicCache`` (plain ``generate()``, lm-eval) is adopted on first sight through the
cache's public layer list (:func:`pqflex.integrations.caches.adopt`). Other transformers caches raise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function, sdpa_mask

from pqflex.attention import causal_attention
from pqflex.config import PQConfig
from pqflex.integrations.caches import ADOPTABLE, EAGER_REASON, PQStaticCache, adopt
from pqflex.integrations.model import (ATTN_IMPLEMENTATION, CACHE_ARG, CHECKED_ATTR, CONFIG_ATTR, UNSUPPORTED_KWARGS,
                                       check_supported, install_hook)
from pqflex.layer import PQCacheState

_NO_HOOK = object()  # CACHE_ARG's value when the module's hook did not run (its first pqcache forward)


def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, N]`` bool of real tokens from transformers' 4-D mask (the last query sees every valid token)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(f"pqcache expects a 4-D attention mask, got shape {tuple(attention_mask.shape)}")
    last = attention_mask[:, 0, -1, :]  # [B, N]
    return last if last.dtype == torch.bool else last == 0


def pqcache_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: the layer runtime of this forward's cache attends.

    Args:
        module: the attention layer (gives ``layer_idx`` and ``config``).
        query: ``[B, H, S, D]`` post-RoPE.
        key, value: ``[B, Hkv, N, D]``, what the cache returned (all cached tokens, or a static buffer).
        attention_mask: transformers' 4-D mask ``[B, 1, S, N]`` or None (no padding).
        kwargs: ``pqflex_cache`` (the forward's cache, from the module's pre-hook) and transformers' own.

    Returns:
        ``([B, S, H, D], None)``.
    """
    cache = kwargs.pop(CACHE_ARG, _NO_HOOK)
    for name in UNSUPPORTED_KWARGS:  # asked per call; the module's class and config once (check_supported)
        asked = kwargs.get(name)
        if asked is not None:
            shown = f"a tensor of shape {tuple(asked.shape)}" if torch.is_tensor(asked) else repr(asked)
            raise NotImplementedError(f"pqcache does not support attention with {name}={shown} "
                                      f"({type(module).__name__})")
    if not getattr(module, CHECKED_ATTR, False):
        check_supported(module)
    if cache is _NO_HOOK:  # from_pretrained(attn_implementation="pqcache"): the module's first forward
        install_hook(module)
    kv_mask = _padding_mask(attention_mask)
    if cache is None or cache is _NO_HOOK:
        if query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                f"pqcache layer {module.layer_idx}: the first pqcache forward of this model came with a cache of "
                f"{key.shape[-2]} slots for {query.shape[-2]} new tokens, which pqcache cannot see yet (a cache filled "
                "before switching to pqcache, or a fixed-size cache); call pqflex.configure(model) once before "
                "such a forward"
            )
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = causal_attention(query, key, value, kv_mask, scale)  # no cache: nothing to index
    else:
        state = getattr(cache, "pq_state", None)
        if state is None or type(cache.layers[module.layer_idx]) in ADOPTABLE:
            state = adopt(cache)  # transformers' own DynamicCache, or a layer it added since
        config = getattr(cache, "pq_config", None) or getattr(module, CONFIG_ATTR, None) or PQConfig()
        n = cache.layers[module.layer_idx].cumulative_length if isinstance(cache, PQStaticCache) else None
        args = (module.layer_idx, config, query, key, value, kv_mask, scaling, n)
        if query.shape[-2] > 1 and torch.compiler.is_compiling():  # generate(prefill_chunk_size=...) compiles it
            out = _prompt_forward(state, *args)
        else:
            out = state.forward(*args)
    return out.transpose(1, 2).contiguous(), None


@torch.compiler.disable(reason=EAGER_REASON)
def _prompt_forward(state: PQCacheState, *args: Any) -> torch.Tensor:
    """:meth:`PQCacheState.forward` of a prompt forward, eager even when called from a compiled forward.

    transformers' ``generate(prefill_chunk_size=...)`` sends every prompt chunk through the compiled forward that
    it also decodes with; pqflex's prompt work (dense attention over a host-known length, index builds, copies to
    CPU memory on a side stream) runs eagerly, so the chunk's graph breaks around it. A ``fullgraph=True`` compile
    cannot break and fails with :data:`EAGER_REASON` as the reason.
    """
    return state.forward(*args)


def pqcache_mask(**kwargs: Any) -> torch.Tensor | None:
    """transformers mask function of ``"pqcache"``: sdpa's mask, or None for an unpadded causal prefill.

    The prefill runs sdpa and reads the left padding from this mask; decode steps take the padding from the index
    and ignore it. An eager forward of several queries without padding gets None (causal SDPA), so a long prefill
    into a fixed-capacity cache never materializes a ``[B, 1, S, capacity]`` mask, unless the model asks for the
    mask itself (``allow_is_causal_skip=False``: Falcon adds ALiBi onto it).
    """
    padding = kwargs.get("attention_mask")
    if (kwargs.get("allow_is_causal_skip", True) and kwargs.get("q_length", 1) > 1
            and kwargs.get("mask_function") is causal_mask_function
            and kwargs.get("kv_offset", 0) == 0 and not torch.compiler.is_compiling()
            and (padding is None or bool(padding.all()))):
        return None
    return sdpa_mask(**kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, pqcache_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, pqcache_mask)
