"""transformers caches that carry pqflex's PQ state: :class:`PQCache` (growing), :class:`PQStaticCache` (fixed
capacity, compiled decoding, offload), and :func:`adopt`, which gives transformers' own ``DynamicCache`` (plain
``generate()``, lm-eval) a PQ state through the cache's public layer list.

Every cache operation (reset, beam reorder, batch selection, crop) applies to the keys, the values and the PQ state
together, or raises and changes nothing.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from pqflex.config import PQConfig
from pqflex.integrations.model import attention_modules, check_config, check_supported, get_config, install_hook
from pqflex.integrations.tensor_parallel import check_tensor_parallel
from pqflex.kvstore import OffloadedKV
from pqflex.layer import PQCacheState, PQLayer

# The keyword that passes a cache to ``generate``: ``cache`` from transformers 5.24, ``past_key_values`` before.
CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


EAGER_REASON = ("pqflex runs prompt forwards (more than one new token) eagerly; compile with fullgraph=False, or prefill "
          "without compile")


@torch.compiler.disable(reason=EAGER_REASON)
def _prompt_store_update(layer: _OffloadLayer, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`_OffloadLayer.store_update` of prompt rows (copies to CPU memory on a side stream), always eager."""
    return layer.store_update(*args)


@torch.compiler.disable(reason=EAGER_REASON)
def _initialize(layer: StaticLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
    """Allocate a static layer's buffers eagerly, also from a compiled forward (the first chunk of a prompt under
    ``generate(prefill_chunk_size=...)``): allocated inside a CUDA-graphed region they would be the graph's outputs,
    which its next replay overwrites, and they could not be marked static addresses."""
    layer.lazy_initialization(key_states, value_states)

def check_batch_indices(indices: torch.Tensor, batch: int | None, what: str) -> None:
    """Raise unless ``indices`` is a 1-D integer tensor of sequence indices in ``[0, batch)``."""
    if not torch.is_tensor(indices) or indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
        shown = f"{indices.dtype} {tuple(indices.shape)}" if torch.is_tensor(indices) else type(indices).__name__
        raise ValueError(f"{what} must be a 1-D integer tensor of sequence indices, got {shown}")
    if batch is not None and indices.numel() and not (0 <= int(indices.min()) and int(indices.max()) < batch):
        raise IndexError(f"{what} holds {indices.tolist()[:8]}...; allowed: sequence indices in [0, {batch})")


def check_repeats(repeats: int) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")


def crop_argument(max_length: int | torch.Tensor) -> int:
    """``crop``'s argument as an int (transformers 5.17's assisted decoding passes a 0-d tensor)."""
    if torch.is_tensor(max_length) and max_length.dim() == 0 and not max_length.is_floating_point():
        max_length = int(max_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"crop takes an int (tokens to remove as a negative number), got {max_length!r}")
    return max_length


def crop_length(max_length: int, seq: int) -> int:
    """Tokens left by ``crop(max_length)`` of ``seq``: ``< 0`` removes that many; ``0`` none; ``> 0`` is the length
    to keep (transformers before 5.24; it raises from 5.24 on)."""
    return max(seq + max_length, 0) if max_length < 0 else (max_length if max_length > 0 else seq)


def _batch(layer) -> int | None:
    keys = getattr(layer, "keys", None) if layer is not None else None
    return keys.shape[0] if torch.is_tensor(keys) and keys.dim() == 4 else None


class PQDynamicLayer(DynamicLayer):
    """A transformers ``DynamicLayer`` whose cache operations carry its layer's PQ runtime along: beam search's
    reorder, batch selection and repetition, cropping and reset apply to the keys, the values and the PQ index
    together, or raise and change nothing (each checks every layer's PQ state before its first change).

    Args:
        state: the :class:`pqflex.PQCacheState` of the whole cache (shared by its layers).
        layer_idx: this layer's index.
    """

    def __init__(self, state: PQCacheState, layer_idx: int) -> None:
        super().__init__()
        self.pq_state, self.layer_idx = state, layer_idx

    @classmethod
    def replacing(cls, layer: DynamicLayer, state: PQCacheState, layer_idx: int) -> PQDynamicLayer:
        """This class in the place of a filled ``DynamicLayer``: the same tensors and attributes."""
        new = cls(state, layer_idx)
        new.__dict__.update({k: v for k, v in vars(layer).items() if k not in ("pq_state", "layer_idx")})
        return new

    def _runtime(self) -> PQLayer | None:
        return self.pq_state.layers.get(self.layer_idx)

    def reset(self) -> None:
        super().reset()
        if self._runtime() is not None:
            self._runtime().reset()

    def _select(self, indices: torch.Tensor, what: str, apply) -> None:
        check_batch_indices(indices, _batch(self), what)
        self.pq_state.check_select_batch()
        apply(indices)
        if self._runtime() is not None:
            self._runtime().select_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx, "beam_idx", super().reorder_cache)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices, "indices", super().batch_select_indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        check_repeats(repeats)
        batch = _batch(self) or 0
        self.pq_state.check_select_batch()
        super().batch_repeat_interleave(repeats)
        if self._runtime() is not None:
            self._runtime().select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Forget cached tokens (see :func:`crop_length`); the PQ state forgets the same ones, and only decoded
        tokens can go (cropping into an indexed prompt raises, before any layer changed). A crop, even of 0 tokens,
        ends the prompt: ``generate()`` crops after each verification forward of assisted or prompt-lookup
        decoding, and the multi-token forwards after it are decode steps, not prompt chunks."""
        max_length = crop_argument(max_length)
        seq = self.get_seq_length()
        n = crop_length(max_length, seq)
        if n < seq:
            self.pq_state.check_crop(n)  # every layer: the first layer's crop refuses before anything changed
        super().crop(max_length)  # raises where transformers refuses the value, before anything changed
        runtime = self._runtime()
        if runtime is not None:
            if n < seq:
                runtime.crop(n)
            runtime.end_prompt()


ADOPTABLE = (DynamicLayer,)  # a layer of exactly these classes is adopted; see adopt()


def adopt(cache: Cache) -> PQCacheState:
    """Give transformers' own ``DynamicCache`` a PQ state, through its public layer list: each ``DynamicLayer`` is
    replaced by a :class:`PQDynamicLayer` holding the same tensors, and layers added later are created as one. The
    state is ``cache.pq_state``. Any other cache without a PQ state raises ``NotImplementedError``."""
    if not isinstance(cache, DynamicCache) or (type(cache) is not DynamicCache and not isinstance(cache, PQCache)):
        raise NotImplementedError(
            f"pqcache works with transformers' DynamicCache, pqflex.PQCache or pqflex.PQStaticCache; got "
            f"{type(cache).__name__}"
        )
    state = getattr(cache, "pq_state", None)
    if state is None:
        state = cache.pq_state = PQCacheState()
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = PQDynamicLayer.replacing(layer, state, i)
        elif not isinstance(layer, PQDynamicLayer):
            raise NotImplementedError(f"pqcache serves full-attention layers; layer {i} of this cache is a "
                                      f"{type(layer).__name__}")
    if cache.layer_class_to_replicate is not None:  # layers created lazily by update()
        cache.layer_class_to_replicate = functools.partial(_next_layer, cache)
    return state


def _next_layer(cache: Cache) -> PQDynamicLayer:
    return PQDynamicLayer(cache.pq_state, len(cache.layers))


class PQCacheMixin:
    """What :class:`PQCache` and :class:`PQStaticCache` share: the model checks, their settings and their
    :class:`pqflex.PQCacheState` (``pq_state``: one :class:`pqflex.PQLayer` per layer)."""

    pq_config: PQConfig | None = None  # None: each layer takes what configure() set on its module

    def _setup(self, model: nn.Module, config: PQConfig | None) -> None:
        modules = attention_modules(model)
        for module in modules:
            check_supported(module)
            install_hook(module)
        self.pq_config = get_config(model) if config is None else config
        check_config(self.pq_config, modules)
        self.tp_size = check_tensor_parallel(model)
        self.pq_state = self._new_state()

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

    def reset(self) -> None:
        super().reset()
        self.pq_state.reset()


class PQCache(PQCacheMixin, DynamicCache):
    """transformers cache that owns the PQ state of every layer: ``generate(..., past_key_values=PQCache(model))``.

    It stores keys and values like :class:`transformers.DynamicCache`, in :class:`PQDynamicLayer` layers, and holds
    one :class:`pqflex.PQLayer` per layer. Beam search, contrastive search and cropping carry the PQ state along.
    The model's attention layers must use ``attn_implementation="pqcache"``.

    Args:
        model: the model it serves.
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
    """

    def __init__(self, model: nn.Module, config: PQConfig | None = None) -> None:
        super().__init__(config=model.config)
        self._setup(model, config)
        adopt(self)

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

    With ``graph=True`` the decode steps of ``generate()`` (and of any forward of one token over this cache) replay
    the cache's own :class:`pqflex.DecodeGraph` (:meth:`decode_graph`): compiled at the first step, captured as a
    CUDA graph at the second, then replayed without Dynamo's guards, CUDA-graph trees or the 4-D mask that
    ``generate()`` otherwise builds every step. transformers then does not compile this cache's forwards itself
    (:attr:`is_compileable` is False); prompt forwards run eagerly. See
    :func:`pqflex.integrations.graphs.route_decode_steps` for what goes through the graph.

    Args:
        model: the model it serves (attention implementation ``"pqcache"``).
        max_cache_len: tokens to hold per sequence (prompt + new tokens); rounded up to a multiple of 128.
        config: PQ settings; default: what :func:`configure` set on the model, else ``PQConfig()``.
        max_batch_size: offload only: the batch size, to allocate the CPU memory up front.
        graph: decode steps through the cache's :class:`pqflex.DecodeGraph` (see above). With
            ``PQConfig(refresh=...)`` it is the compiled route: without it such a cache's steps run eagerly.
    """

    def __init__(self, model: nn.Module, max_cache_len: int, config: PQConfig | None = None,
                 max_batch_size: int | None = None, graph: bool = False) -> None:
        if not isinstance(graph, bool):
            raise ValueError(f"graph must be True or False, got {graph!r}")
        self.graph, self._model, self._decode_graph = graph, model, None  # before Cache's init reads is_compileable
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")
        capacity = -(-max_cache_len // 128) * 128
        chosen = get_config(model) if config is None else config
        offload = isinstance(chosen, PQConfig) and chosen.offload  # _setup names a wrong type
        kind = _OffloadLayer if offload else StaticLayer
        layers = [kind(capacity) for _ in range(max(m.layer_idx for m in attention_modules(model)) + 1)]
        super().__init__(layers=layers)
        self._setup(model, config)
        if offload and max_batch_size is not None:
            self._allocate_stores(model, max_batch_size)
        if graph:
            from pqflex.integrations.graphs import route_decode_steps  # graphs imports this module

            route_decode_steps(model)

    @property
    def is_compileable(self) -> bool:
        """Whether transformers' ``generate()`` compiles this cache's forwards itself: not with ``graph=True``
        (the cache's :class:`pqflex.DecodeGraph` compiles and captures the decode step), nor with
        ``PQConfig(refresh=...)`` without it (the refresh runs between steps on the host: eager steps)."""
        return not self.graph and not (isinstance(self.pq_config, PQConfig) and self.pq_config.refresh)

    def decode_graph(self):
        """The :class:`pqflex.DecodeGraph` of this cache and its model (made at the first call): what a
        ``graph=True`` cache's decode steps replay."""
        if self._decode_graph is None:
            from pqflex.integrations.graphs import COMPILE_BACKEND, DecodeGraph

            self._decode_graph = DecodeGraph(self._model, self, backend=COMPILE_BACKEND)
        return self._decode_graph

    def _allocate_stores(self, model: nn.Module, batch: int) -> None:
        """Offload: allocate every layer's CPU memory now (seconds for long caches), not in the first prefill."""
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        Hkv = (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // self.tp_size  # this rank's
        for module in attention_modules(model):
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

    # Each operation below checks what the PQ state would refuse before the keys change, and the keys' own checks
    # run before the PQ state changes: it happens to the keys, values and PQ state together, or raises and changes
    # nothing.

    def _check_batch_indices(self, indices: torch.Tensor, what: str) -> None:
        layer = self.layers[0] if self.layers else None
        check_batch_indices(indices, _batch(layer), what)
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
        check_repeats(repeats)
        batch = _batch(self.layers[0] if self.layers else None) or 0
        self.pq_state.check_select_batch()
        super().batch_repeat_interleave(repeats)
        self.pq_state.select_batch(torch.arange(batch).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Forget cached tokens: ``max_length < 0`` removes that many; ``0`` removes none; ``> 0`` is the length to
        keep where the installed transformers still accepts that (before 5.24; it raises from 5.24 on). The PQ state
        forgets the same tokens; only decoded tokens can go (cropping into an indexed prompt raises).

        A crop, even of 0 tokens, ends the prompt: ``generate()`` crops after each verification forward of assisted
        or prompt-lookup decoding, and the multi-token forwards after it are decode steps, not prompt chunks."""
        max_length = crop_argument(max_length)
        seq = int(self.get_seq_length())
        n = crop_length(max_length, seq)
        if n < seq:
            self.pq_state.check_crop(n)
        super().crop(max_length)  # raises where transformers refuses the value, before anything changed
        if n < seq:
            self.pq_state.crop(n)
        self.pq_state.end_prompt()

    def _new_state(self) -> PQCacheState:
        return PQCacheState(self.layers[0].max_cache_len, len(self.layers))


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
