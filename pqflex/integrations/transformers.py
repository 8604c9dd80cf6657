"""transformers glue: the ``"pqcache"`` attention implementation and :class:`PQCache`.

Importing pqflex registers ``"pqcache"`` in transformers' attention and mask registries, so
``from_pretrained(..., attn_implementation="pqcache")`` and ``model.set_attn_implementation("pqcache")`` work.
The attention function is an adapter: the first forward of a sequence (no past tokens) is a dense prefill that
builds the layer's :class:`pqflex.PQIndex`; every later forward encodes its new keys and runs PQ retrieval attention.

Where the per-layer PQ state lives:

- with a :class:`PQCache` passed to ``generate``, the cache owns it (one :class:`PQLayerState` per layer) and binds
  each layer's state to its attention module on ``update``, through weak references;
- with transformers' own cache (plain ``generate()``, lm-eval), each attention module keeps one state for the
  batch in flight, rebuilt at every prefill.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
import transformers
from packaging.version import Version
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import causal_mask_function, sdpa_mask

from pqflex.config import PQConfig
from pqflex.index import PQIndex

ATTN_IMPLEMENTATION = "pqcache"
# The keyword that passes a cache to ``generate``: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

_CONFIG_ATTR = "_pqflex_config"  # PQConfig set by configure() on attention modules
_STATE_ATTR = "_pqflex_state"  # the module's own PQLayerState (transformers' caches)
_BOUND_ATTR = "_pqflex_bound"  # weakref to the PQLayerState a PQCache bound for the current forward

# Keyword arguments that ask the attention function for something pqflex does not implement.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")
_UNSUPPORTED_CONFIG = {
    "is_encoder_decoder": "encoder-decoder models",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "attn_logit_softcapping": "attention logit soft-capping",
}


class PQLayerState:
    """The PQ state of one attention layer for the batch of sequences in flight.

    Attributes:
        config: the settings of a :class:`PQCache`'s layers; None uses the module's (see :func:`configure`).
        index: the layer's :class:`PQIndex`, built at prefill; None before.
        bound_key: weak reference to the key tensor the owning :class:`PQCache` returned for this forward.
    """

    def __init__(self, config: PQConfig | None = None, layer: StaticLayer | None = None) -> None:
        self.config = config
        self.index: PQIndex | None = None
        self.bound_key: weakref.ref | None = None
        self.layer = layer  # the fixed-capacity cache layer of a PQStaticCache, None for growing caches

    def reset(self) -> None:
        self.index, self.bound_key = None, None


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise NotImplementedError(
            f"{type(model).__name__} has no transformers attention layers (modules with layer_idx and "
            "num_key_value_groups); pqcache supports decoder models with standard (GQA) attention"
        )
    return modules


_CHECKED_ATTR = "_pqflex_checked"  # set once a module's class and config passed check_supported


def check_supported(module: nn.Module, attention_kwargs: dict[str, Any] | None = None) -> None:
    """Raise ``NotImplementedError`` naming the class if pqcache cannot serve this attention layer correctly.

    The module's config is checked once; the attention keyword arguments on every call.
    """
    name = type(module).__name__
    for key in _UNSUPPORTED_KWARGS:
        if (attention_kwargs or {}).get(key) is not None:
            raise NotImplementedError(
                f"pqcache does not support attention with {key}={attention_kwargs[key]!r} ({name})"
            )
    if getattr(module, _CHECKED_ATTR, False):
        return
    config = getattr(module, "config", None)
    for attr, what in _UNSUPPORTED_CONFIG.items():
        if getattr(config, attr, None):
            raise NotImplementedError(f"pqcache does not support {what} ({name}, config.{attr})")
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"pqcache supports causal self-attention only; {name} is not causal")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            f"pqcache supports full-attention layers only; {name} has layer types {sorted(set(layer_types))}"
        )
    # Without layer types (Mistral), a configured window means every layer slides.
    window = getattr(config, "sliding_window", None)
    if layer_types is None and window is not None:
        raise NotImplementedError(f"pqcache does not support attention with sliding_window={window!r} ({name})")
    setattr(module, _CHECKED_ATTR, True)


def configure(model: nn.Module, config: PQConfig | None = None) -> nn.Module:
    """Make ``model`` use pqcache attention with ``config`` (default: ``PQConfig()``); returns the model.

    Checks that the model is supported, switches its attention implementation to ``"pqcache"`` if it uses another
    one, sets the config on every attention layer and drops any PQ state of an earlier sequence.
    """
    config = PQConfig() if config is None else config
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    modules = _attention_modules(model)
    for module in modules:
        setattr(module, _CHECKED_ATTR, False)  # the config may have changed since the last check
        check_supported(module)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for module in modules:
        setattr(module, _CONFIG_ATTR, config)
        setattr(module, _STATE_ATTR, PQLayerState())
    return model


def get_config(model: nn.Module) -> PQConfig:
    """The :class:`PQConfig` the model's attention layers use."""
    return getattr(_attention_modules(model)[0], _CONFIG_ATTR, None) or PQConfig()


def _layer_state(module: nn.Module, key: torch.Tensor) -> PQLayerState:
    bound = getattr(module, _BOUND_ATTR, None)
    state = bound() if bound is not None else None
    if state is not None and state.bound_key is not None and state.bound_key() is key:
        return state
    own = getattr(module, _STATE_ATTR, None)
    if own is None:
        own = PQLayerState()
        setattr(module, _STATE_ATTR, own)
    return own


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
    """transformers attention function: dense prefill that builds the index, PQ retrieval attention after.

    Args:
        module: the attention layer (gives ``layer_idx``, ``config`` and the PQ state).
        query: ``[B, H, S, D]`` post-RoPE.
        key, value: ``[B, Hkv, N, D]``, all cached tokens including the ``S`` new ones.
        attention_mask: transformers' 4-D bool mask ``[B, 1, S, N]`` or None (no padding).

    Returns:
        ``([B, S, H, D], None)``.
    """
    check_supported(module, kwargs)
    S, N = query.shape[-2], key.shape[-2]
    state = _layer_state(module, key)
    config = state.config or getattr(module, _CONFIG_ATTR, None) or PQConfig()
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if state.layer is not None:
        return _static_forward(module, state, config, query, key, value, attention_mask, scale, dropout, kwargs)
    if S == N:  # first forward of a sequence: dense prefill, then index the prompt
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                        scaling=scaling, **kwargs)
        state.index = PQIndex.build(key, config, _padding_mask(attention_mask))
        return out, None

    index = state.index
    if index is None or index.num_tokens != N - S or index.codes.shape[0] != key.shape[0]:
        have = "no index" if index is None else f"an index of {index.num_tokens} tokens"
        raise RuntimeError(
            f"pqcache layer {module.layer_idx}: {N - S} cached tokens but {have}. pqcache needs the prefill to run "
            "through it first, with transformers' dynamic cache or a pqflex.PQCache (static caches, cache cropping "
            "and beam search are not supported)"
        )
    index.append(key[:, :, N - S:])
    return index.attend(query, key, value, scale).transpose(1, 2).contiguous(), None


def _static_forward(module: nn.Module, state: PQLayerState, config: PQConfig, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, scale: float, dropout: float,
                    kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """pqcache attention over the fixed-capacity buffers of a :class:`PQStaticCache` layer.

    The prefill (eager) attends densely over the prompt and builds the index with the buffer's capacity; each
    decode step (one query per sequence) encodes the new key and attends its sink + top-k + recent tokens with
    static shapes and the token count read from the device, so it compiles once and replays as a CUDA graph.
    """
    S, capacity = query.shape[-2], key.shape[-2]
    if state.index is None:  # prefill: the cache held no token before this forward
        if torch.compiler.is_compiling():
            raise RuntimeError("pqcache: run the prefill of a PQStaticCache eagerly (generate() does); only the "
                               "decode step compiles")
        cached = int(state.layer.cumulative_length)
        if cached != S:
            raise NotImplementedError(
                f"pqcache layer {module.layer_idx}: a PQStaticCache must be prefilled in one forward from empty "
                f"(it holds {cached} tokens after a forward of {S}); call cache.reset() before a new sequence"
            )
        mask = None if attention_mask is None else attention_mask[..., :S]
        out, _ = sdpa_attention_forward(module, query, key[:, :, :S], value[:, :, :S], mask, dropout=dropout,
                                        scaling=scale, **kwargs)
        state.index = PQIndex.build(key[:, :, :S], config, _padding_mask(mask), capacity=capacity)
        for buffer in state.index.buffers():
            torch._dynamo.mark_static_address(buffer)
        return out, None
    if S != 1:
        raise NotImplementedError(
            f"pqcache layer {module.layer_idx}: after the prefill a PQStaticCache decodes one token per forward, "
            f"got {S}"
        )
    n = state.layer.cumulative_length  # tokens cached, the new one included (a device scalar)
    state.index.store(key, n)
    out = state.index.decode(query, key, value, n, scale)
    return out.transpose(1, 2), None


class PQCache(DynamicCache):
    """transformers cache that owns the PQ state of every layer, for ``generate(past_key_values=PQCache(model))``.

    It stores keys and values like :class:`transformers.DynamicCache` and holds one :class:`PQLayerState` per layer
    (``pq_layers``). The attention layers must use ``attn_implementation="pqcache"``.

    Args:
        model: the model it serves (its attention layers receive the PQ state).
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
    """

    def __init__(self, model: nn.Module, config: PQConfig | None = None) -> None:
        super().__init__(config=model.config)
        modules = _attention_modules(model)
        for module in modules:
            check_supported(module)
        self.pq_config = get_config(model) if config is None else config
        if not isinstance(self.pq_config, PQConfig):
            raise TypeError(f"config must be a pqflex.PQConfig, got {type(self.pq_config).__name__}")
        self._modules = {m.layer_idx: weakref.ref(m) for m in modules}
        self.pq_layers = [PQLayerState(self.pq_config) for _ in range(max(self._modules) + 1)]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        module = self._modules[layer_idx]()
        if module is not None:
            state = self.pq_layers[layer_idx]
            state.bound_key = weakref.ref(keys)
            setattr(module, _BOUND_ATTR, weakref.ref(state))
        return keys, values

    def reset(self) -> None:
        super().reset()
        for state in self.pq_layers:
            state.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PQCache does not support beam search (reorder_cache)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PQCache does not support cropping (assisted generation)")


class PQStaticCache(Cache):
    """Fixed-capacity cache for compiled decoding: ``generate(..., past_key_values=PQStaticCache(model, 40_000))``.

    Like transformers' ``StaticCache`` it preallocates keys and values ``[B, Hkv, capacity, D]`` at the first
    forward and writes each step in place; it also owns the PQ state of every layer (codes for the whole capacity,
    centroids, budgets). Its decode step has static shapes and no host synchronization, so ``generate`` compiles
    it (on CUDA, with CUDA graphs: transformers compiles decoding automatically for this cache class). The prefill
    must be one forward from empty; call :meth:`reset` before reusing the cache for a new batch.

    Args:
        model: the model it serves (attention implementation ``"pqcache"``).
        max_cache_len: tokens to hold per sequence (prompt + new tokens); rounded up to a multiple of 128.
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, config: PQConfig | None = None) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        modules = _attention_modules(model)
        for module in modules:
            check_supported(module)
        self.pq_config = get_config(model) if config is None else config
        if not isinstance(self.pq_config, PQConfig):
            raise TypeError(f"config must be a pqflex.PQConfig, got {type(self.pq_config).__name__}")
        capacity = -(-max_cache_len // 128) * 128
        layers = [StaticLayer(capacity) for _ in range(max(m.layer_idx for m in modules) + 1)]
        super().__init__(layers=layers)
        self._modules = {m.layer_idx: weakref.ref(m) for m in modules}
        self.pq_layers = [PQLayerState(self.pq_config, layer) for layer in layers]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        module = self._modules[layer_idx]()
        if module is not None and not torch.compiler.is_compiling():  # bound at prefill; decode steps reuse it
            state = self.pq_layers[layer_idx]
            state.bound_key = weakref.ref(keys)
            setattr(module, _BOUND_ATTR, weakref.ref(state))
        return keys, values

    def reset(self) -> None:
        super().reset()
        for state in self.pq_layers:
            state.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("PQStaticCache does not support beam search (reorder_cache)")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("PQStaticCache does not support cropping (assisted generation)")


def pqcache_mask(**kwargs: Any) -> torch.Tensor | None:
    """transformers mask function of ``"pqcache"``: sdpa's mask, or None for an unpadded causal prefill.

    The prefill runs sdpa and reads the left padding from this mask; decode steps take the padding from the index
    and ignore it. An eager forward of several queries without padding gets None (causal SDPA), so a long prefill
    into a fixed-capacity cache never materializes a ``[B, 1, S, capacity]`` mask.
    """
    padding = kwargs.get("attention_mask")
    if (kwargs.get("q_length", 1) > 1 and kwargs.get("mask_function") is causal_mask_function
            and kwargs.get("kv_offset", 0) == 0 and not torch.compiler.is_compiling()
            and (padding is None or bool(padding.all()))):
        return None
    return sdpa_mask(**kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, pqcache_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, pqcache_mask)
