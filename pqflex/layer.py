"""PQLayer: the PQ runtime of one attention layer over one batch of sequences.

It owns the layer's config, its :class:`pqflex.PQIndex` and the lifecycle of a sequence, and knows nothing of
any model library. An integration finds the runtime that belongs to the cache holding the keys (one per cache and
layer) and calls :meth:`PQLayer.forward` with the tensors; the runtime decides the rest:

- **prefill**: every forward before the first decode step belongs to the prompt, however many chunks it takes.
  Each attends densely (causal, over every cached token). The index of the prompt is built once the prompt is
  complete: at the first decode step for a growing cache, or at the end of each prompt forward for a
  fixed-capacity cache (its decode step is compiled and must not build anything). Inside a
  :class:`PQCacheState` (a cache) the runtimes only record their prompt and the state indexes all layers in one
  batched k-means: at the first decode step, or after the last layer's prompt forward of a fixed-capacity cache.
- **step**: a forward after the prompt. Its new keys are encoded with the prompt's centroids, and each query
  attends its sink + top-k + recent tokens. A forward of one token after the prompt is a decode step; so a
  prompt chunk of a single token is taken for one. A crop also ends the prompt: ``generate()`` crops only to take
  back speculative tokens (assisted and prompt-lookup decoding), whose verification forwards hold several tokens
  and are steps.

The KV store is the caller's: ``key``/``value`` hold exactly the cached tokens (a growing cache) or a
fixed-capacity buffer whose first ``n`` rows are filled (``n`` a 0-d device tensor, so a decode step never syncs).
With ``PQConfig(offload=True)`` the runtime owns it instead: an :class:`pqflex.OffloadedKV` that the caller fills
through :meth:`PQLayer.update_kv`, and ``key``/``value`` are what that returned (the prompt so far, or the new
token of a decode step).
"""

from __future__ import annotations

import concurrent.futures

import torch

from pqflex.attention import causal_attention
from pqflex.config import PQConfig
from pqflex.index import PQIndex, check_attention_inputs
from pqflex.kvstore import OffloadedKV, ResidentKV
from pqflex.ops.backends import attention_backend
from pqflex.quantizer import ProductQuantizer


class PQLayer:
    """PQ state and lifecycle of one attention layer.

    Args:
        config: PQ settings.
        capacity: tokens of a fixed-capacity KV buffer (a static cache); None for a growing cache.
        deferred: the owner builds the index (a :class:`PQCacheState` indexes the prompts of all its layers in
            one batched k-means); the prefill only records the prompt.

    Attributes:
        index: the :class:`PQIndex` of the prompt (and the tokens decoded since), None before it is built.
        prompt_tokens: tokens of the prompt so far (0 before the first prefill).
        decoding: True once a decode step ran or the cache was cropped; later multi-token forwards are steps, not
            prompt chunks.
        length: tokens indexed, counted on the host (the prompt, plus every step's tokens: see :meth:`begin_step`).
        refreshed_at: ``length`` when the index was built or last refreshed (``PQConfig.refresh``).
    """

    def __init__(self, config: PQConfig, capacity: int | None = None, deferred: bool = False) -> None:
        if not isinstance(config, PQConfig):
            raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be None (growing cache) or an int >= 1, got {capacity!r}")
        if config.offload and capacity is None:
            raise NotImplementedError("PQConfig(offload=True) needs a fixed-capacity cache: give generate() a "
                                      "pqflex.PQStaticCache(model, max_cache_len)")
        self.config, self.capacity, self.deferred = config, capacity, deferred
        self.backend = attention_backend(config)  # how the resident KV attends a token list
        self.store: OffloadedKV | None = None  # offload: every cached key and value
        self.job: concurrent.futures.Future | None = None  # CPU k-means of the prompt, collected by the owner
        self.index: PQIndex | None = None
        self.prompt_tokens = 0
        self.decoding = False
        self.prompt: tuple[torch.Tensor, torch.Tensor | None] | None = None  # keys and padding not yet indexed
        self.length = self.refreshed_at = 0

    def __repr__(self) -> str:
        state = "decoding" if self.decoding else f"prompt of {self.prompt_tokens} tokens"
        return f"PQLayer({state}, index={'built' if self.index is not None else None}, capacity={self.capacity})"

    def reset(self) -> None:
        """Forget the sequence: the next forward starts a new prompt (an offloaded store keeps its memory)."""
        self.index, self.prompt_tokens, self.decoding, self.prompt, self.job = None, 0, False, None, None
        self.length = self.refreshed_at = 0

    def update_kv(self, key: torch.Tensor, value: torch.Tensor, cached: torch.Tensor | int,
                  stream: torch.cuda.Stream | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Offload: store new keys and values ``[B, Hkv, S, D]`` after the ``cached`` tokens (a 0-d tensor or int).

        Returns what attention reads: the prompt so far for a prompt forward, the new token for a decode step.
        The store (:class:`pqflex.OffloadedKV`, CPU memory pinned on CUDA) is created at the first prompt;
        ``stream`` carries its prompt copies.
        """
        if not self.config.offload:
            raise RuntimeError("PQLayer.update_kv is the KV store of an offloaded cache (PQConfig(offload=True))")
        S = key.shape[-2]
        if self.takes_prompt(S):
            if torch.compiler.is_compiling():
                raise RuntimeError("pqflex: run the prefill eagerly (generate() does); only decode steps compile")
            first = int(cached)
            if first == 0 and (self.store is None or self.store.shape[:2] != tuple(key.shape[:2])
                               or self.store.shape[3] != key.shape[3] or self.store.device != key.device
                               or self.store.dtype != key.dtype):
                self.store = OffloadedKV(self.config, (*key.shape[:2], self.capacity, key.shape[3]), key.dtype,
                                         key.device, stream)
            return self.store.write_prompt(key, value, first)
        if self.store is None or self.store.rows_k is None:
            raise RuntimeError("pqflex: an offloaded cache must be prefilled (a forward of the prompt) before its "
                               "first decode step")
        self.store.write(key, value, cached + S)
        return key, value

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_mask: torch.Tensor | None = None, scale: float | None = None,
                n: torch.Tensor | None = None) -> torch.Tensor:
        """Attention ``[B, H, S, D]`` of one forward: a prompt chunk goes to :meth:`prefill`, the rest to :meth:`step`.

        Args:
            query: ``[B, H, S, D]`` post-RoPE queries of the ``S`` newest cached positions.
            key, value: ``[B, Hkv, N, D]`` every cached token, the ``S`` new ones included (a growing cache), or
                ``[B, Hkv, capacity, D]`` with ``n`` tokens filled (a fixed-capacity cache).
            kv_mask: ``[B, N]`` (or ``[B, capacity]``) bool left-padding mask, True for real tokens; None = none.
            scale: softmax scale; default ``D ** -0.5``.
            n: 0-d int tensor, tokens cached in a fixed-capacity buffer (the new ones included); None otherwise.
        """
        if self.takes_prompt(query.shape[-2]):
            return self.prefill(key, value, kv_mask, query=query, scale=scale, n=n)
        return self.step(query, key, value, kv_mask, scale, n)

    def takes_prompt(self, S: int) -> bool:
        """Whether a forward of ``S`` new tokens is (a chunk of) the prompt: several tokens before decoding
        started, or the first forward of the sequence whatever its length (a one-token prompt)."""
        # S and is_compiling() first: a compiled decode step never guards on the Python state below.
        return ((S > 1 or (not torch.compiler.is_compiling() and self.index is None and self.prompt is None
                           and self.prompt_tokens == 0)) and not self.decoding)

    def prefill(self, key: torch.Tensor, value: torch.Tensor, kv_mask: torch.Tensor | None = None, *,
                query: torch.Tensor | None = None, scale: float | None = None,
                n: torch.Tensor | None = None) -> torch.Tensor | None:
        """A prompt forward: dense causal attention of ``query`` (if given) over the cached tokens.

        The cached tokens so far are the prompt. A fixed-capacity cache builds their index now; a growing one at
        the first decode step; a deferred runtime leaves it to its owner. Without ``query`` (a cache filled
        elsewhere, e.g. copied from a dense prefill) the index is built now and nothing is attended. Runs eagerly
        (it reads the prompt length on the host).
        """
        if self.decoding:
            raise RuntimeError("PQLayer.prefill after decoding started: reset() before a new prompt")
        if torch.compiler.is_compiling():
            raise RuntimeError("pqflex: run the prefill eagerly (generate() does); only decode steps compile")
        N = self._filled(key, n)
        key_n, value_n = key[:, :, :N], value[:, :, :N]
        mask_n = None if kv_mask is None else kv_mask[:, :N]
        self.prompt_tokens, self.index, self.prompt = N, None, (key_n, mask_n)
        if self.config.offload:
            if self.store is None or self.store.filled != N:  # a prompt handed over whole, not stored yet
                self.update_kv(key_n, value_n, 0)
            self.store.setup(key_n, value_n, mask_n)
        if not self.deferred and (query is None or self.capacity is not None):
            self._build(key_n, mask_n)
        if query is None:
            return None
        check_attention_inputs(query, key_n, value_n, self.config)
        return causal_attention(query, key_n, value_n, mask_n, self._scale(query, scale))

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             kv_mask: torch.Tensor | None = None, scale: float | None = None,
             n: torch.Tensor | None = None) -> torch.Tensor:
        """A forward after the prompt: encode the ``S`` new keys, attend sink + top-k + recent for each query.

        A growing cache builds the prompt's index here at the first step (the ``N - S`` tokens cached before it
        are the prompt). A fixed-capacity cache takes one query per step, with static shapes and no host sync.
        """
        S = query.shape[-2]
        scale = self._scale(query, scale)
        if self.capacity is not None:
            if self.index is None and self.prompt is not None and not torch.compiler.is_compiling():
                self._build(*self.prompt)
            if self.index is None:
                raise RuntimeError("pqflex: a fixed-capacity cache must be prefilled (a forward of the prompt) "
                                   "before its first decode step")
            if S != 1:
                raise NotImplementedError(f"a fixed-capacity cache decodes one token per forward, got {S} after "
                                          "decoding started; to start a new prompt, call cache.reset() first")
            self.decoding = True
            if self.store is not None:  # offload: key/value are the new token, already in the store
                new, kv, keys = key, self.store, self.store.keys
            else:
                new, kv, keys = key.index_select(2, (n - 1).reshape(1)), ResidentKV(key, value, self.backend), key
            eager = not torch.compiler.is_compiling()  # a compiled step's count is kept by its caller
            if eager:
                self.begin_step(keys, self.length)
            self.index.append(new, n - 1)
            if eager:
                self.length += 1
            return kv.attend(query, self.index.plan(query, n, scale, keys), scale)
        N = key.shape[-2]
        check_attention_inputs(query, key, value, self.config)
        if self.index is None:
            if not self.decoding and self.prompt_tokens not in (0, N - S):
                raise RuntimeError(f"pqflex: the cache holds {N - S} tokens before this step but its prompt had "
                                   f"{self.prompt_tokens}; it was changed outside pqflex")
            self.prompt_tokens = N - S
            if torch.compiler.is_compiling():
                raise RuntimeError("pqflex: the first decode step of a growing cache builds the index and cannot "
                                   "be compiled; use pqflex.PQStaticCache for compiled decoding")
            self._build(key[:, :, :N - S], None if kv_mask is None else kv_mask[:, :N - S])
        index = self.index
        if index.num_tokens != N - S or index.codes.shape[0] != key.shape[0]:
            raise RuntimeError(f"pqflex: the cache holds {N - S} tokens of {key.shape[0]} sequences before this "
                               f"step but the PQ index covers {index.num_tokens} tokens of {index.codes.shape[0]}; "
                               "the cache was changed outside pqflex (reset() it for a new sequence)")
        self.decoding = True
        if not torch.compiler.is_compiling():
            self.begin_step(key, N - S)
        index.append(key[:, :, N - S:])
        self.length = N
        return ResidentKV(key, value, self.backend).attend(query, index.plan(query, N, scale, key), scale)

    def begin_step(self, key: torch.Tensor, cached: int) -> None:
        """Host bookkeeping before a step over ``cached`` indexed tokens (``key [B, Hkv, >= cached, D]``): refresh the
        index (:meth:`pqflex.PQIndex.refresh`) once ``config.refresh`` tokens were decoded since it was built or last
        refreshed. The same ``cached`` twice refreshes at most once. Eager steps call it themselves; the caller of a
        compiled or captured step calls it before the step (:class:`pqflex.DecodeGraph` does) and sets
        :attr:`length` after it.
        """
        self.length = cached
        if self.refresh_due(cached):
            self.index.refresh(key, cached)
            self.refreshed_at = cached

    def refresh_due(self, cached: int) -> bool:
        """Whether the step over ``cached`` tokens refreshes the index first (``PQConfig.refresh`` tokens decoded
        since the index was built or last refreshed)."""
        every = self.config.refresh
        return bool(every) and self.index is not None and cached - self.refreshed_at >= every

    def check_select_batch(self) -> None:
        """Raise (changing nothing) if :meth:`select_batch` would refuse."""
        if self.config.offload:
            raise NotImplementedError("pqflex: reordering or selecting sequences (beam search, contrastive search) "
                                      "is not supported with PQConfig(offload=True); use greedy or sampling")

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep the sequences ``indices`` ``[B']`` in that order (beam search reorders, contrastive search picks)."""
        self.check_select_batch()
        if self.index is None:
            if self.prompt is not None:
                key, mask = self.prompt
                idx = indices.to(key.device)
                self.prompt = key.index_select(0, idx), None if mask is None else mask.index_select(0, idx)
            return
        new = self.index.select_batch(indices)
        if self.capacity is not None and new.codes.shape == self.index.codes.shape:
            for old, buffer in zip(self.index.buffers(), new.buffers()):
                old.copy_(buffer)  # in place: a compiled decode step keeps reading the same addresses
        else:
            self._mark_static(new)
            self.index = new

    def check_crop(self, n: int) -> None:
        """Raise (changing nothing) if :meth:`crop` to ``n`` tokens would refuse: into an indexed prompt."""
        if self.index is not None and n < self.prompt_tokens:
            static = ("; a fixed-capacity cache decodes one token per forward: for assisted or prompt-lookup decoding "
                      "pass a pqflex.PQCache" if self.capacity is not None else "")
            raise NotImplementedError(f"pqflex: cannot crop to {n} tokens, inside the indexed prompt of "
                                      f"{self.prompt_tokens}; reset() and prefill again{static}")

    def end_prompt(self) -> None:
        """The prompt is complete: the next forward, of any length, is a step (the cache was cropped)."""
        if self.prompt_tokens or self.index is not None:
            self.decoding = True

    def crop(self, n: int) -> None:
        """Forget the tokens from position ``n`` on; once indexed, only decoded tokens can go."""
        self.check_crop(n)
        if self.index is None:
            self.prompt_tokens = min(self.prompt_tokens, n)
            if self.prompt is not None:
                key, mask = self.prompt
                self.prompt = key[:, :, :n], None if mask is None else mask[:, :n]
            return
        if self.capacity is None:
            self.index.truncate(n)
        if self.store is not None:
            self.store.crop(n)
        self.length, self.refreshed_at = min(self.length, n), min(self.refreshed_at, n)

    @property
    def nbytes(self) -> int:
        """Bytes of PQ state (codes and centroids) this layer holds."""
        return 0 if self.index is None else self.index.nbytes

    def set_index(self, index: PQIndex) -> None:
        """Take the index of the recorded prompt (built by the owner of a deferred runtime)."""
        self.index, self.prompt = index, None
        self.length = self.refreshed_at = self.prompt_tokens
        self._mark_static(index)

    def _build(self, key: torch.Tensor, kv_mask: torch.Tensor | None) -> None:
        self.set_index(PQIndex.build(key, self.config, kv_mask, capacity=self.capacity))

    def _mark_static(self, index: PQIndex) -> None:
        if self.capacity is not None:
            store = () if self.store is None else self.store.buffers()
            for buffer in (*index.buffers(), *store):  # read by the compiled decode step: no copies under CUDA graphs
                torch._dynamo.mark_static_address(buffer)

    def _filled(self, key: torch.Tensor, n: torch.Tensor | None) -> int:
        if self.capacity is None:
            return key.shape[-2]
        if n is None:
            raise ValueError("a fixed-capacity PQLayer needs n, the tokens filled in the buffer")
        N = int(n)
        if not 1 <= N <= key.shape[-2]:
            raise ValueError(f"n={N} tokens filled is out of range for a buffer of {key.shape[-2]}")
        return N

    @staticmethod
    def _scale(query: torch.Tensor, scale: float | None) -> float:
        return query.shape[-1] ** -0.5 if scale is None else scale


OVERLAP_GROUPS = 4  # a fixed-capacity cache on CUDA indexes its layers in this many groups during the prefill


class PQCacheState:
    """The PQ state of one cache: a :class:`PQLayer` per layer, whose prompts are indexed together.

    Once the prompt is complete (the first decode step of a growing cache; the prefill forward of the last layer
    of a fixed-capacity one) every layer's prompt is indexed by one batched k-means
    (:meth:`pqflex.PQIndex.build_layers`): a few launches per Lloyd iteration for the whole model. A
    fixed-capacity cache on CUDA indexes its layers in :data:`OVERLAP_GROUPS` groups instead, each on a side stream
    as soon as its layers' prompt forwards are queued, so the k-means overlaps the rest of the prefill; the main
    stream waits for the last group after the last layer.

    Args:
        capacity: tokens of each layer's fixed-capacity buffer; None for a growing cache.
        num_layers: layers of the model (needed with ``capacity``: the last one completes the prompt).
    """

    def __init__(self, capacity: int | None = None, num_layers: int | None = None) -> None:
        if capacity is not None and num_layers is None:
            raise ValueError("a fixed-capacity PQCacheState needs num_layers")
        self.capacity, self.num_layers = capacity, num_layers
        self.layers: dict[int, PQLayer] = {}
        # A caller keeps each layer's step count and refresh on the host (PQLayer.begin_step) around compiled steps:
        # set by pqflex.DecodeGraph. Without one, a compiled step refuses a config with PQConfig.refresh.
        self.host_steps = False
        self._stream: torch.cuda.Stream | None = None  # k-means beside the prefill
        self._copy_stream: torch.cuda.Stream | None = None  # offload: prompt rows to CPU memory
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # CPU k-means

    def begin_step(self, keys: dict[int, torch.Tensor], cached: int) -> None:
        """:meth:`PQLayer.begin_step` of every layer before a compiled or captured step over ``cached`` tokens
        (``keys``: each layer's cached keys by layer index), the due refreshes in one batched k-means
        (:meth:`pqflex.PQIndex.refresh_layers`)."""
        due = []
        for i, layer in self.layers.items():
            layer.length = cached
            if layer.refresh_due(cached):
                due.append(i)
        if due:
            PQIndex.refresh_layers([self.layers[i].index for i in due], [keys[i] for i in due], cached)
            for i in due:
                self.layers[i].refreshed_at = cached

    def layer(self, layer_idx: int, config: PQConfig) -> PQLayer:
        """The runtime of layer ``layer_idx``, created with ``config`` on first use."""
        if layer_idx not in self.layers:
            self.layers[layer_idx] = PQLayer(config, self.capacity, deferred=True)
        return self.layers[layer_idx]

    def forward(self, layer_idx: int, config: PQConfig, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_mask: torch.Tensor | None = None, scale: float | None = None,
                n: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`PQLayer.forward` of layer ``layer_idx``, indexing every layer's prompt once it is complete."""
        layer = self.layer(layer_idx, config)
        S = query.shape[-2]
        prompt = layer.takes_prompt(S)
        if config.refresh and not prompt and torch.compiler.is_compiling() and not self.host_steps:
            raise RuntimeError(f"pqflex: PQConfig(refresh={config.refresh}) refreshes the index between decode steps "
                               "on the host, which a compiled step skips; decode through pqflex.DecodeGraph or "
                               "PQStaticCache(..., graph=True), or eagerly")
        if not prompt and layer.index is None and not torch.compiler.is_compiling():
            self.build_pending()
        out = layer.forward(query, key, value, kv_mask, scale, n)
        if self.capacity is not None and prompt:
            last = layer_idx == self.num_layers - 1
            group = -(-self.num_layers // OVERLAP_GROUPS)
            if key.is_cuda and config.kmeans_device == "cpu":  # each layer's k-means on the CPU as it comes
                self._submit_kmeans(layer)
                if last:
                    for other in self.layers.values():
                        if other.store is not None:
                            other.store.sync()  # the codes are read from CPU memory, and so are misses
                    self.build_pending()
            elif key.is_cuda and ((layer_idx + 1) % group == 0 or last):
                self.build_pending(overlap=True)  # these layers' k-means runs beside the next layers' prefill
                if last:  # whatever runs after the prompt forward waits for the last group
                    torch.cuda.current_stream(key.device).wait_stream(self._side_stream(key.device))
                    for other in self.layers.values():
                        if other.store is not None:
                            other.store.sync()
            elif last:
                self.build_pending()
        return out

    def update_kv(self, layer_idx: int, config: PQConfig, key: torch.Tensor, value: torch.Tensor,
                  cached: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`PQLayer.update_kv` of layer ``layer_idx`` (offload), its prompt copies on this state's copy stream."""
        stream = None
        if key.shape[-2] > 1 and key.is_cuda:  # a prompt forward (eager); a compiled step never sees streams
            if self._copy_stream is None or self._copy_stream.device != key.device:
                self._copy_stream = torch.cuda.Stream(key.device)
            stream = self._copy_stream
        return self.layer(layer_idx, config).update_kv(key, value, cached, stream)

    def _submit_kmeans(self, layer: PQLayer) -> None:
        """Start the CPU k-means of a layer's recorded prompt on the worker thread; its GPU keys can go."""
        key, mask = layer.prompt
        config = layer.config.replace(niter=layer.config.cpu_niter, train_points=layer.config.cpu_train_points)
        sample = PQIndex.training_keys(key, config, mask)
        if sample is None:  # nothing to train (dense, exact scorer): built as usual
            return
        x, m = sample
        x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x, non_blocking=True)
        m_host = torch.empty(m.shape, dtype=m.dtype, pin_memory=True).copy_(m, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pqflex-kmeans")
        layer.job = self._pool.submit(_train_on_cpu, x_host, m_host, ready, config)
        if layer.store is not None:  # the codes are computed from CPU memory at collection
            layer.prompt = (layer.store.keys[:, :, :key.shape[-2]], mask)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def build_pending(self, overlap: bool = False) -> None:
        """Index the recorded prompts of the layers not indexed yet, one batched k-means per (config, prompt) group.

        ``overlap=True`` (CUDA): on a side stream that first waits for the work queued so far (these layers' keys),
        so the build runs while the next layers prefill; the caller makes the main stream wait before the
        indexes are read.
        """
        if overlap:
            device = next((layer.prompt[0].device for layer in self.layers.values()
                           if layer.index is None and layer.prompt is not None), None)
            if device is None:
                return
            stream = self._side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.build_pending()
            return
        groups: dict[tuple, list[PQLayer]] = {}
        for layer in self.layers.values():
            if layer.index is None and layer.prompt is not None:
                key, mask = layer.prompt
                groups.setdefault((layer.config, key.shape, key.device, key.dtype, layer.job is None),
                                  []).append(layer)
        for (config, *_, train), layers in groups.items():
            mask = layers[0].prompt[1]
            centroids = None if train else [layer.job.result() for layer in layers]
            indexes = PQIndex.build_layers([layer.prompt[0] for layer in layers], config, mask, self.capacity,
                                           centroids=centroids)
            for layer, index in zip(layers, indexes):
                layer.set_index(index)
                layer.job = None

    def reset(self) -> None:
        for layer in self.layers.values():
            layer.reset()

    def check_select_batch(self) -> None:
        """Raise (changing nothing) if :meth:`select_batch` would refuse."""
        for layer in self.layers.values():
            layer.check_select_batch()

    def select_batch(self, indices: torch.Tensor) -> None:
        self.check_select_batch()  # every layer first: a refused selection changes nothing
        for layer in self.layers.values():
            layer.select_batch(indices)

    def check_crop(self, n: int) -> None:
        """Raise (changing nothing) if :meth:`crop` to ``n`` tokens would refuse."""
        for layer in self.layers.values():
            layer.check_crop(n)

    def crop(self, n: int) -> None:
        self.check_crop(n)  # every layer first: a refused crop changes nothing
        for layer in self.layers.values():
            layer.crop(n)

    def end_prompt(self) -> None:
        """Every layer's prompt is complete (see :meth:`PQLayer.end_prompt`)."""
        for layer in self.layers.values():
            layer.end_prompt()

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())


def _train_on_cpu(x: torch.Tensor, mask: torch.Tensor, ready: torch.cuda.Event | None,
                  config: PQConfig) -> torch.Tensor:
    """A worker's job: k-means (``torch.ops.pqflex.kmeans``, its CPU kernel) on a layer's training keys
    ``[B, Hkv, T, D]`` once their copy to CPU memory is done; returns the centroids ``[B, Hkv, M, ksub, dsub]``."""
    if ready is not None:
        ready.synchronize()
    pq = ProductQuantizer(x.shape[-1], config.M, config.nbits)
    return pq.train(x, mask, niter=config.niter, seed=config.seed, tol=config.tol).centroids
