"""transformers glue: the ``"pqcache"`` attention implementation, :class:`PQCache` and :class:`PQStaticCache`.

Importing pqflex registers ``"pqcache"`` in transformers' attention and mask registries, so
``from_pretrained(..., attn_implementation="pqcache")`` and ``model.set_attn_implementation("pqcache")`` work.
The attention function is an adapter: it finds the :class:`pqflex.PQLayer` that belongs to this forward's cache
and layer, calls it and returns transformers' layout. The runtime decides prefill vs decode; nothing here does.

Where the PQ state lives: with the cache object that holds the keys, one :class:`pqflex.PQLayer` per layer.
A forward pre-hook on each attention module passes the forward's cache to the attention function as a keyword
(``pqflex_cache``), so concurrent requests on one model, each with its own cache, never share state. A
:class:`PQCache` or :class:`PQStaticCache` owns its runtimes; transformers' own ``DynamicCache`` (plain
``generate()``, lm-eval) is adopted on first sight: its class becomes :class:`PQCache`, so beam search's reorder,
cropping and ``reset()`` carry the PQ state along with the keys. Other transformers caches raise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
import transformers
from packaging.version import Version
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import causal_mask_function, sdpa_mask

from pqflex.attention import causal_attention
from pqflex.config import PQConfig
from pqflex.kvstore import OffloadedKV
from pqflex.layer import PQCacheState, PQLayer

ATTN_IMPLEMENTATION = "pqcache"
# The keyword that passes a cache to ``generate``: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

_CONFIG_ATTR = "_pqflex_config"  # PQConfig set by configure() on attention modules (settings, not state)
_HOOK_ATTR = "_pqflex_hook"  # the handle of the module's forward pre-hook (see _pass_cache)
CACHE_ARG = "pqflex_cache"  # the attention keyword that carries the forward's cache
_NO_HOOK = object()  # CACHE_ARG's value when the module's hook did not run (its first pqcache forward)

# Keyword arguments that ask the attention function for something pqflex does not implement.
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")
_UNSUPPORTED_CONFIG = {
    "is_encoder_decoder": "encoder-decoder models",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "attn_logit_softcapping": "attention logit soft-capping",
    "alibi": "ALiBi position bias (added to the attention mask)",
}


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
        value = (attention_kwargs or {}).get(key)
        if value is not None:
            shown = f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) else repr(value)
            raise NotImplementedError(f"pqcache does not support attention with {key}={shown} ({name})")
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

    Checks that the model and the config are supported, switches its attention implementation to ``"pqcache"``
    if it uses another one and sets the config on every attention layer (caches created afterwards use it).
    """
    config = PQConfig() if config is None else config
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    modules = _attention_modules(model)
    for module in modules:
        setattr(module, _CHECKED_ATTR, False)  # the config may have changed since the last check
        check_supported(module)
    check_config(config, modules)
    check_tensor_parallel(model)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for module in modules:
        setattr(module, _CONFIG_ATTR, config)
        _install_hook(module)
    return model


def get_config(model: nn.Module) -> PQConfig:
    """The :class:`PQConfig` the model's attention layers use."""
    return getattr(_attention_modules(model)[0], _CONFIG_ATTR, None) or PQConfig()


def check_tensor_parallel(model: nn.Module) -> int:
    """The model's tensor-parallel degree (1 without TP); raise ``NotImplementedError`` unless it divides the KV
    heads: each rank runs pqcache over its own KV heads, and a head split across ranks has no PQ index of its own."""
    tp = getattr(model, "tp_size", None) or 1
    if tp > 1:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if kv % tp:
            allowed = [d for d in range(1, kv + 1) if kv % d == 0]
            raise NotImplementedError(
                f"tensor parallelism over tp_size={tp} ranks splits the {kv} KV head(s) of {type(model).__name__} "
                f"inside a head; pqcache runs each rank over whole KV heads: use tp_size in {allowed}"
            )
    return tp


@contextlib.contextmanager
def tp_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each ``nn.Linear`` that transformers' tensor parallelism sharded computes from this rank's
    local shard held as a plain tensor, not a DTensor; the DTensors are put back when the block ends.

    With grad disabled transformers' TP forward of a ``Linear`` already runs on the local shards (it unwraps the
    DTensor weights at every call), so the tokens are the same. What changes is a compiled decode step: each DTensor
    weight is a graph input whose guards (placements, device mesh) Dynamo checks in Python, and which the compiled
    wrapper unwraps, at every step, before the step's CUDA graph is launched. On two H100s (Llama-3.1-8B shape)
    that was ~9 ms of host time a token, while the GPU waited.

    For inference only: calling the model with grad enabled inside the block raises (``generate()`` runs without
    grad). A model without tensor parallelism passes through unchanged. Yields the model.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed: nothing can be sharded
        yield model
        return
    swapped = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name, param in module._parameters.items():
                if isinstance(param, DTensor):
                    swapped.append((module, name, param))
    for module, name, param in swapped:
        module._parameters[name] = nn.Parameter(param.to_local(), requires_grad=False)  # the same storage
    handle = model.register_forward_pre_hook(_no_grad_only) if swapped else None
    try:
        yield model
    finally:
        if handle is not None:
            handle.remove()
        for module, name, param in swapped:
            module._parameters[name] = param


def _no_grad_only(module: nn.Module, args: tuple) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} runs inside pqflex.tp_inference(), which serves inference only: "
                           "call it under torch.no_grad() or torch.inference_mode() (generate() does), or outside "
                           "the block")


def check_config(config: PQConfig, modules: list[nn.Module]) -> None:
    """Raise ``ValueError`` unless ``config`` fits the model's attention layers (``M`` divides the head dim)."""
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    for module in modules:
        head_dim = getattr(module, "head_dim", None)
        if isinstance(head_dim, int) and head_dim % config.M:
            raise ValueError(f"PQConfig.M={config.M} does not divide the head dim {head_dim} of "
                             f"{type(module).__name__}; allowed: a divisor of {head_dim}")


def _pass_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an attention module: hand this forward's cache to the attention function."""
    if getattr(module.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return None
    # Found by type, not by name: `cache` (transformers >= 5.24), `past_key_values` before, `layer_past` (Falcon).
    cache = next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)
    return args, {**kwargs, CACHE_ARG: cache}


def _install_hook(module: nn.Module) -> None:
    if getattr(module, _HOOK_ATTR, None) is None:
        setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(_pass_cache, with_kwargs=True))


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
    check_supported(module, kwargs)
    if cache is _NO_HOOK:  # from_pretrained(attn_implementation="pqcache"): the module's first forward
        _install_hook(module)
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
        out = _pq_state(cache).pq_forward(module, query, key, value, kv_mask, scaling)
    return out.transpose(1, 2).contiguous(), None


_EAGER = ("pqflex runs prompt forwards (more than one new token) eagerly; compile with fullgraph=False, or prefill "
          "without compile")


@torch.compiler.disable(reason=_EAGER)
def _prompt_forward(state: PQCacheState, *args: Any) -> torch.Tensor:
    """:meth:`PQCacheState.forward` of a prompt forward, eager even when called from a compiled forward.

    transformers' ``generate(prefill_chunk_size=...)`` sends every prompt chunk through the compiled forward that
    it also decodes with; pqflex's prompt work (dense attention over a host-known length, index builds, copies to
    CPU memory on a side stream) runs eagerly, so the chunk's graph breaks around it. A ``fullgraph=True`` compile
    cannot break and fails with :data:`_EAGER` as the reason.
    """
    return state.forward(*args)


@torch.compiler.disable(reason=_EAGER)
def _prompt_store_update(layer: _OffloadLayer, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`_OffloadLayer.store_update` of prompt rows (copies to CPU memory on a side stream), always eager."""
    return layer.store_update(*args)


@torch.compiler.disable(reason=_EAGER)
def _initialize(layer: StaticLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Allocate a static layer's buffers eagerly, also from a compiled forward (the first chunk of a prompt under
    ``generate(prefill_chunk_size=...)``): allocated inside a CUDA-graphed region they would be the graph's outputs,
    which its next replay overwrites, and they could not be marked static addresses."""
    layer.lazy_initialization(key_states, value_states)


def _pq_state(cache: Cache) -> PQCacheMixin:
    if type(cache) is DynamicCache:  # transformers' own: adopt it, so its PQ state lives and moves with it
        cache.__class__ = PQCache
    if not isinstance(cache, PQCacheMixin):
        raise NotImplementedError(
            f"pqcache works with transformers' DynamicCache, pqflex.PQCache or pqflex.PQStaticCache; got "
            f"{type(cache).__name__}"
        )
    return cache


class PQCacheMixin:
    """What :class:`PQCache` and :class:`PQStaticCache` share: a :class:`pqflex.PQCacheState` (one
    :class:`pqflex.PQLayer` per layer), and the cache operations (reset, beam reorder, batch selection, crop)
    applied to keys and PQ state alike."""

    pq_config: PQConfig | None = None  # None: each layer takes what configure() set on its module

    def _setup(self, model: nn.Module, config: PQConfig | None) -> None:
        modules = _attention_modules(model)
        for module in modules:
            check_supported(module)
            _install_hook(module)
        self.pq_config = get_config(model) if config is None else config
        check_config(self.pq_config, modules)
        self.tp_size = check_tensor_parallel(model)

    @property
    def pq_state(self) -> PQCacheState:
        """The PQ state of this cache (created on first use: an adopted DynamicCache starts without one)."""
        if "_pqflex_state" not in self.__dict__:
            self.__dict__["_pqflex_state"] = self._new_state()
        return self.__dict__["_pqflex_state"]

    @property
    def pq_layers(self) -> list[PQLayer]:
        """The layer runtimes created so far, by layer index."""
        return [self.pq_state.layers[i] for i in sorted(self.pq_state.layers)]

    @property
    def pq_nbytes(self) -> int:
        """Bytes of PQ state (codes and centroids) over all layers."""
        return self.pq_state.nbytes

    def _new_state(self) -> PQCacheState:
        return PQCacheState()

    def _filled(self, layer_idx: int) -> torch.Tensor | None:
        return None

    def pq_forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   kv_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """The attention of ``module``'s layer through this cache's PQ state."""
        config = self.pq_config or getattr(module, _CONFIG_ATTR, None) or PQConfig()
        args = (module.layer_idx, config, query, key, value, kv_mask, scale, self._filled(module.layer_idx))
        if query.shape[-2] > 1 and torch.compiler.is_compiling():  # generate(prefill_chunk_size=...) compiles it
            return _prompt_forward(self.pq_state, *args)
        return self.pq_state.forward(*args)

    def reset(self) -> None:
        super().reset()
        self.pq_state.reset()

    # Each operation below checks what the PQ state would refuse before the keys change, and the keys' own checks
    # run before the PQ state changes: it happens to the keys, values and PQ state together, or raises and changes
    # nothing.

    def _check_batch_indices(self, indices: torch.Tensor, what: str) -> None:
        layer = self.layers[0] if self.layers else None
        batch = layer.keys.shape[0] if layer is not None and getattr(layer, "keys", None) is not None else None
        if not torch.is_tensor(indices) or indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            shown = f"{indices.dtype} {tuple(indices.shape)}" if torch.is_tensor(indices) else type(indices).__name__
            raise ValueError(f"{what} must be a 1-D integer tensor of sequence indices, got {shown}")
        if batch is not None and indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < batch):
            raise IndexError(f"{what} holds {indices.tolist()[:8]}...; allowed: sequence indices in [0, {batch})")
        self.pq_state.check_select_batch()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._check_batch_indices(beam_idx, "beam_idx")
        super().reorder_cache(beam_idx)
        self.pq_state.select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._check_batch_indices(indices, "indices")
        super().batch_select_indices(indices)
        self.pq_state.select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
        batch = self.layers[0].keys.shape[0] if self.layers and self.layers[0].keys is not None else 0
        self.pq_state.check_select_batch()
        super().batch_repeat_interleave(repeats)
        self.pq_state.select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Forget cached tokens: ``max_length < 0`` removes that many; ``0`` removes none; ``> 0`` is the length to
        keep where the installed transformers still accepts that (before 5.24; it raises from 5.24 on). The PQ state
        forgets the same tokens; only decoded tokens can go (cropping into an indexed prompt raises).

        A crop, even of 0 tokens, ends the prompt: ``generate()`` crops after each verification forward of assisted
        or prompt-lookup decoding, and the multi-token forwards after it are decode steps, not prompt chunks."""
        if torch.is_tensor(max_length) and max_length.dim() == 0 and not max_length.is_floating_point():
            max_length = int(max_length)  # transformers 5.17's assisted decoding passes a 0-d tensor
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"crop takes an int (tokens to remove as a negative number), got {max_length!r}")
        seq = int(self.get_seq_length())
        n = max(seq + max_length, 0) if max_length < 0 else (max_length if max_length > 0 else seq)
        if n < seq:
            self.pq_state.check_crop(n)
        super().crop(max_length)  # raises where transformers refuses the value, before anything changed
        if n < seq:
            self.pq_state.crop(n)
        self.pq_state.end_prompt()


class PQCache(PQCacheMixin, DynamicCache):
    """transformers cache that owns the PQ state of every layer: ``generate(..., past_key_values=PQCache(model))``.

    It stores keys and values like :class:`transformers.DynamicCache` and holds one :class:`pqflex.PQLayer` per
    layer. Beam search, contrastive search and cropping carry the PQ state along. The model's attention layers
    must use ``attn_implementation="pqcache"``.

    Args:
        model: the model it serves.
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
    """

    def __init__(self, model: nn.Module, config: PQConfig | None = None) -> None:
        super().__init__(config=model.config)
        self._setup(model, config)

    @classmethod
    def from_prefill(cls, model: nn.Module, cache: Cache, config: PQConfig | None = None,
                     kv_mask: torch.Tensor | None = None) -> PQCache:
        """A :class:`PQCache` holding a copy of a prefilled cache's keys and values, each layer's prompt indexed.

        Lets one dense prefill serve several decodes (full attention and pqcache from the same prompt).

        Args:
            model: the model it serves.
            cache: a transformers cache filled by a prefill (any attention implementation), left untouched.
            config: PQ settings (default as in the constructor).
            kv_mask: ``[B, N]`` bool left-padding mask of the prompt, True for real tokens; None = no padding.
        """
        out = cls(model, config)
        for layer_idx, layer in enumerate(cache.layers):
            keys, values = out.update(layer.keys.clone(), layer.values.clone(), layer_idx)
            out.pq_state.layer(layer_idx, out.pq_config).prefill(keys, values, kv_mask)
        out.pq_state.build_pending()
        return out


class PQStaticCache(PQCacheMixin, Cache):
    """Fixed-capacity cache for compiled decoding: ``generate(..., past_key_values=PQStaticCache(model, 40_000))``.

    Like transformers' ``StaticCache`` it preallocates keys and values ``[B, Hkv, capacity, D]`` at the first
    forward and writes each step in place; its layer runtimes hold codes for the whole capacity. Its decode step
    has static shapes and no host synchronization, so ``generate`` compiles it (on CUDA, with CUDA graphs:
    transformers compiles decoding automatically for this cache class). The prefill runs eagerly; call
    :meth:`reset` before reusing the cache for a new batch.

    With ``PQConfig(offload=True)`` the keys and values live in CPU memory (:class:`pqflex.OffloadedKV`); give
    ``max_batch_size`` to allocate that memory here rather than in the first prefill.

    Args:
        model: the model it serves (attention implementation ``"pqcache"``).
        max_cache_len: tokens to hold per sequence (prompt + new tokens); rounded up to a multiple of 128.
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
        max_batch_size: offload only: the batch size, to allocate the CPU memory up front.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, config: PQConfig | None = None,
                 max_batch_size: int | None = None) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")
        capacity = -(-max_cache_len // 128) * 128
        chosen = get_config(model) if config is None else config
        offload = isinstance(chosen, PQConfig) and chosen.offload  # _setup names a wrong type
        kind = _OffloadLayer if offload else StaticLayer
        layers = [kind(capacity) for _ in range(max(m.layer_idx for m in _attention_modules(model)) + 1)]
        super().__init__(layers=layers)
        self._setup(model, config)
        if offload and max_batch_size is not None:
            self._allocate_stores(model, max_batch_size)

    def _allocate_stores(self, model: nn.Module, batch: int) -> None:
        """Offload: allocate every layer's CPU memory now (seconds for long caches), not in the first prefill."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        Hkv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // self.tp_size  # this rank's
        for module in _attention_modules(model):
            weight = next(module.parameters())
            D = getattr(module, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            layer = self.pq_state.layer(module.layer_idx, self.pq_config)
            layer.store = OffloadedKV(self.pq_config, (batch, Hkv, self.layers[0].max_cache_len, D), weight.dtype,
                                      weight.device)

    @property
    def offload(self) -> bool:
        """Keys and values live in CPU memory (``PQConfig(offload=True)``): see :class:`pqflex.OffloadedKV`."""
        return isinstance(self.layers[0], _OffloadLayer)

    @property
    def kv_device_nbytes(self) -> int:
        """Bytes of key/value state on the model's device: the dense buffers, or an offloaded store's GPU rows."""
        if self.offload:
            return sum(layer.store.device_nbytes for layer in self.pq_layers if layer.store is not None)
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers if layer.is_initialized)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        self._check_update(layer, key_states)
        if not layer.is_initialized and torch.compiler.is_compiling():  # a compiled first prompt chunk
            _initialize(layer, key_states, value_states)
        if isinstance(layer, _OffloadLayer):
            args = (self.pq_state, layer_idx, self.pq_config, key_states, value_states)
            if key_states.shape[-2] > 1 and torch.compiler.is_compiling():  # a compiled prompt chunk
                return _prompt_store_update(layer, *args)
            return layer.store_update(*args)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_update(self, layer: StaticLayer, key_states: torch.Tensor) -> None:
        batch, new = key_states.shape[0], key_states.shape[-2]
        if not layer.is_initialized and new > layer.max_cache_len:  # shapes only: checked even when compiling
            raise ValueError(f"this PQStaticCache holds {layer.max_cache_len} tokens per sequence: a prompt of {new} "
                             "does not fit; create it with max_cache_len >= prompt + max_new_tokens")
        if layer.is_initialized and not torch.compiler.is_compiling() and not _capturing():  # eager: say what's wrong
            if batch != layer.keys.shape[0]:
                raise ValueError(f"this PQStaticCache holds batches of {layer.keys.shape[0]} sequences, got "
                                 f"{batch}; create a new PQStaticCache for another batch size")
            cached = int(layer.cumulative_length)
            if cached + new > layer.max_cache_len:
                raise ValueError(f"this PQStaticCache holds {layer.max_cache_len} tokens per sequence: {cached} "
                                 f"cached + {new} new do not fit; create it with max_cache_len >= prompt + "
                                 "max_new_tokens, or call cache.reset() before a new prompt")

    def _new_state(self) -> PQCacheState:
        return PQCacheState(self.layers[0].max_cache_len, len(self.layers))

    def _filled(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].cumulative_length


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (an eager step captured by :class:`pqflex.DecodeGraph`):
    no host synchronization allowed."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class _OffloadLayer(StaticLayer):
    """A :class:`transformers.cache_utils.StaticLayer` whose keys and values live in the layer runtime's
    :class:`pqflex.OffloadedKV` (CPU memory): it counts the cached tokens and hands the rows to the store.
    ``keys``/``values`` are device views of the whole store (reads go over PCIe)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def store_update(self, state: PQCacheState, layer_idx: int, config: PQConfig, key_states: torch.Tensor,
                     value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        out = state.update_kv(layer_idx, config, key_states, value_states, self.cumulative_length)
        self.cumulative_length.add_(key_states.shape[-2])
        store = state.layers[layer_idx].store
        self.keys, self.values = store.keys, store.values
        return out

    def update(self, *args: Any, **kwargs: Any):
        raise RuntimeError("an offloaded PQStaticCache layer is updated through PQStaticCache.update")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("pqflex: beam search is not supported with PQConfig(offload=True)")

    def crop(self, max_length: int) -> None:
        """Forget cached tokens: ``max_length < 0`` removes that many, else keeps the first ``max_length`` (the
        store forgets them through the cache's PQ state). transformers 5.17's ``StaticLayer`` has no ``crop``."""
        n = int(self.cumulative_length)
        self.cumulative_length.fill_(max(n + max_length, 0) if max_length < 0 else min(max_length, n))


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
