"""PQLayer: the PQ runtime of one attention layer over one batch of sequences.

It owns the layer's config, its :class:`pqflex.PQIndex` and the lifecycle of a sequence, and knows nothing of
any model library. An integration finds the runtime that belongs to the cache holding the keys (one per cache and
layer) and calls :meth:`PQLayer.forward` with the tensors; the runtime decides the rest:

- **prefill**: every forward before the first decode step belongs to the prompt, however many chunks it takes.
  Each attends densely (causal, over every cached token). The index of the prompt is built once the prompt is
  complete: at the first decode step for a growing cache, or at the end of each prompt forward for a
  fixed-capacity cache (its decode step is compiled and must not build anything).
- **step**: a forward after the prompt. Its new keys are encoded with the prompt's centroids, and each query
  attends its sink + top-k + recent tokens. A forward of one token after the prompt is a decode step; so a
  prompt chunk of a single token is taken for one.

The KV store is the caller's: ``key``/``value`` hold exactly the cached tokens (a growing cache) or a
fixed-capacity buffer whose first ``n`` rows are filled (``n`` a 0-d device tensor, so a decode step never syncs).
"""

from __future__ import annotations

import torch

from pqflex.attention import causal_attention, check_attention_inputs
from pqflex.config import PQConfig
from pqflex.index import PQIndex


class PQLayer:
    """PQ state and lifecycle of one attention layer.

    Args:
        config: PQ settings.
        capacity: tokens of a fixed-capacity KV buffer (a static cache); None for a growing cache.

    Attributes:
        index: the :class:`PQIndex` of the prompt (and the tokens decoded since), None before it is built.
        prompt_tokens: tokens of the prompt so far (0 before the first prefill).
        decoding: True once a decode step ran; later multi-token forwards are steps, not prompt chunks.
    """

    def __init__(self, config: PQConfig, capacity: int | None = None) -> None:
        if not isinstance(config, PQConfig):
            raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be None (growing cache) or an int >= 1, got {capacity!r}")
        self.config, self.capacity = config, capacity
        self.index: PQIndex | None = None
        self.prompt_tokens = 0
        self.decoding = False

    def __repr__(self) -> str:
        state = "decoding" if self.decoding else f"prompt of {self.prompt_tokens} tokens"
        return f"PQLayer({state}, index={'built' if self.index is not None else None}, capacity={self.capacity})"

    def reset(self) -> None:
        """Forget the sequence: the next forward starts a new prompt."""
        self.index, self.prompt_tokens, self.decoding = None, 0, False

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
        if query.shape[-2] > 1 and not self.decoding:  # S first: a compiled step never guards on `decoding`
            return self.prefill(key, value, kv_mask, query=query, scale=scale, n=n)
        return self.step(query, key, value, kv_mask, scale, n)

    def prefill(self, key: torch.Tensor, value: torch.Tensor, kv_mask: torch.Tensor | None = None, *,
                query: torch.Tensor | None = None, scale: float | None = None,
                n: torch.Tensor | None = None) -> torch.Tensor | None:
        """A prompt forward: dense causal attention of ``query`` (if given) over the cached tokens.

        The cached tokens so far are the prompt. A fixed-capacity cache builds their index now; a growing one at
        the first decode step. Without ``query`` (a cache filled elsewhere, e.g. copied from a dense prefill) the
        index is built now and nothing is attended. Runs eagerly (it reads the prompt length on the host).
        """
        if self.decoding:
            raise RuntimeError("PQLayer.prefill after decoding started: reset() before a new prompt")
        if torch.compiler.is_compiling():
            raise RuntimeError("pqflex: run the prefill eagerly (generate() does); only decode steps compile")
        N = self._filled(key, n)
        key_n, value_n = key[:, :, :N], value[:, :, :N]
        mask_n = None if kv_mask is None else kv_mask[:, :N]
        self.prompt_tokens, self.index = N, None
        if self.capacity is not None or query is None:
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
            if self.index is None:
                raise RuntimeError("pqflex: a fixed-capacity cache must be prefilled (a forward of the prompt) "
                                   "before its first decode step")
            if S != 1:
                raise NotImplementedError(f"a fixed-capacity cache decodes one token per forward, got {S}")
            self.decoding = True
            self.index.store(key, n)
            return self.index.step(query, key, value, n, scale)
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
        index.append(key[:, :, N - S:])
        return index.attend(query, key, value, scale)

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep the sequences ``indices`` ``[B']`` in that order (beam search reorders, contrastive search picks)."""
        if self.index is None:
            return
        new = self.index.select_batch(indices)
        if self.capacity is not None and new.codes.shape == self.index.codes.shape:
            for old, buffer in zip(self.index.buffers(), new.buffers()):
                old.copy_(buffer)  # in place: a compiled decode step keeps reading the same addresses
        else:
            self._mark_static(new)
            self.index = new

    def crop(self, n: int) -> None:
        """Forget the tokens from position ``n`` on; once indexed, only decoded tokens can go."""
        if self.index is None:
            self.prompt_tokens = min(self.prompt_tokens, n)
            return
        if n < self.prompt_tokens:
            raise NotImplementedError(f"pqflex: cannot crop to {n} tokens, inside the indexed prompt of "
                                      f"{self.prompt_tokens}; reset() and prefill again")
        if self.capacity is None:
            self.index.truncate(n)

    @property
    def nbytes(self) -> int:
        """Bytes of PQ state (codes and centroids) this layer holds."""
        return 0 if self.index is None else self.index.nbytes

    def _build(self, key: torch.Tensor, kv_mask: torch.Tensor | None) -> None:
        self.index = PQIndex.build(key, self.config, kv_mask, capacity=self.capacity)
        self._mark_static(self.index)

    def _mark_static(self, index: PQIndex) -> None:
        if self.capacity is not None:
            for buffer in index.buffers():  # read by the compiled decode step: no copies under CUDA graphs
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
