"""One decode step captured as a CUDA graph and replayed: :class:`DecodeGraph`; ``generate()`` through one
(:func:`route_decode_steps`, for ``PQStaticCache(..., graph=True)``).

``torch.compile(mode="reduce-overhead")`` (what ``generate()`` uses for a static cache) already replays a CUDA graph,
but every call first evaluates Dynamo's guards in Python and the CUDA-graph tree's input checks: host time the GPU
waits through when each token is read back (BENCHMARKS.md, "Tensor parallelism"). A :class:`DecodeGraph` captures
the compiled step once, for one model and one static cache, and then only copies the new token in and replays the
graph.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from pqflex.integrations.caches import CACHE_KWARG, PQStaticCache

# The output field of the cache: ``cache`` from transformers 5.24, ``past_key_values`` before.
_OUTPUT_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else \
    "past_key_values"


def _captured(cache: Cache) -> list[Any]:
    """The objects a captured step reads from ``cache`` whose replacement would leave the graph reading stale memory:
    each layer's key/value buffers and position counter; a pqflex cache's PQ indexes and offload stores too."""
    found = []
    for layer in cache.layers:
        found += [getattr(layer, name, None) for name in ("keys", "values", "cumulative_length")]
    for pq_layer in getattr(cache, "pq_layers", ()):
        found += [pq_layer.index, pq_layer.store]
    return found


class DecodeGraph:
    """Decode steps of ``model`` over ``cache``, replayed from a captured CUDA graph.

    ``graph(input_ids)`` runs one decode step, like ``model(input_ids, cache=cache, logits_to_keep=1).logits``:
    ``input_ids`` is ``[B, 1]``, the cache advances by one token and the logits ``[B, 1, vocab]`` come back in a
    buffer that the next step overwrites (clone it to keep it). ``graph(input_ids, position_ids)`` passes the
    positions ``[B, 1]`` too (``generate()`` numbers a left-padded sequence's tokens from its first real one); a
    graph takes positions at every call or at none (fixed by its first call).

    The forward is compiled (``fullgraph=True, dynamic=False``) unless ``compile=False``. On CUDA, the first ``warmup``
    calls run the step as it is (compilation, Triton autotuning); the next one captures it as a CUDA graph and every
    call after that copies ``input_ids`` into the graph's input and replays it, without Dynamo's guards. On a CPU
    every call runs the step. ``compile=False`` captures the eager forward: no compile time (minutes for a large
    model), more and unfused kernels in the graph.

    The cache must be prefilled before the first call and have a fixed capacity (:class:`pqflex.PQStaticCache`, or
    transformers' ``StaticCache`` for dense attention). When a new prefill replaces the buffers the graph reads (a
    PQ cache builds new indexes), the next call captures again. The graph reads the model's weights where they were
    at capture: update them in place, and under tensor parallelism call it inside the same
    :func:`pqflex.tp_inference` block that captured it. The batch size is fixed by the first call. A step past the
    cache's capacity raises ``ValueError``: the steps count down on the host the free positions read from the cache
    (one sync) at the first call, after a new prefill replaced the buffers, and when the count runs out; no other
    step synchronizes. (A transformers ``StaticCache`` reset in place keeps its buffers: after a longer new prompt the
    count runs out late.)

    Args:
        model: a transformers causal LM.
        cache: the static cache the steps decode into.
        warmup: calls before capturing (at least 1: compilation and autotuning must not run during a capture).
        backend: ``torch.compile``'s backend.
        compile: compile the forward (``False``: capture the eager one).
    """

    def __init__(self, model: nn.Module, cache: Cache, warmup: int = 1, backend: str = "inductor",
                 compile: bool = True) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (calls before the capture), got {warmup!r}")
        if not isinstance(cache, Cache) or not all(hasattr(layer, "max_cache_len") for layer in cache.layers):
            raise TypeError(f"DecodeGraph needs a fixed-capacity cache (pqflex.PQStaticCache or transformers' "
                            f"StaticCache), got {type(cache).__name__}")
        self.model, self.cache, self.warmup = model, cache, warmup
        forward = getattr(model.forward, "pqflex_own_forward", model.forward)  # the model's, not a router
        self._forward = (torch.compile(forward, fullgraph=True, dynamic=False, backend=backend) if compile
                         else forward)
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self._takes_positions: bool | None = None  # fixed by the first call
        self._logits: torch.Tensor | None = None
        self._reads: list[Any] = []  # what the cache held at the last count (and capture): see _captured
        self._left = 0  # free positions in the cache, counted down on the host
        state = getattr(cache, "pq_state", None)
        if state is not None:
            state.host_steps = True  # each call counts the step and refreshes indexes (PQConfig.refresh) first

    def _free_positions(self) -> int:
        layer = self.cache.layers[0]
        return layer.max_cache_len - int(layer.cumulative_length)

    @property
    def captured(self) -> bool:
        """A CUDA graph of the step exists and replays it."""
        return self._graph is not None

    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        extra = {} if position_ids is None else {"position_ids": position_ids}
        return self._forward(input_ids, **{CACHE_KWARG: self.cache}, logits_to_keep=1, **extra).logits

    def _check(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            shown = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [batch, 1] tensor of token ids (one decode step), got {shown}")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if self._ids is not None and (input_ids.shape != self._ids.shape or input_ids.device != self._ids.device):
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} on {input_ids.device}: this graph was "
                             f"captured for {tuple(self._ids.shape)} on {self._ids.device}; make a new DecodeGraph "
                             "for another batch size")
        takes = position_ids is not None
        if self._takes_positions is not None and takes != self._takes_positions:
            raise ValueError("this DecodeGraph was first called " + ("with" if self._takes_positions else "without")
                             + " position_ids; pass them at every call or at none")
        if takes and (not torch.is_tensor(position_ids) or position_ids.shape != input_ids.shape
                      or position_ids.device != input_ids.device or position_ids.is_floating_point()):
            shown = (f"{position_ids.dtype} {tuple(position_ids.shape)} on {position_ids.device}"
                     if torch.is_tensor(position_ids) else type(position_ids).__name__)
            raise ValueError(f"position_ids must be an integer tensor shaped like input_ids "
                             f"{tuple(input_ids.shape)} on {input_ids.device}, got {shown}")
        if not self.cache.layers[0].is_initialized:
            raise RuntimeError("DecodeGraph: the cache is empty; prefill it (a forward of the prompt) before "
                               "decoding")

    def _capture(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        self._graph = None  # release the last capture's memory first
        self._ids = input_ids.clone()
        self._positions = None if position_ids is None else position_ids.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step(self._ids, self._positions)
        self._graph = graph

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._check(input_ids, position_ids)
        self._takes_positions = position_ids is not None
        reads = _captured(self.cache)
        stale = len(reads) != len(self._reads) or any(a is not b for a, b in zip(reads, self._reads))
        if stale:  # a new prefill (or the first call): the graph, if any, reads freed buffers
            self._reads = reads
        if stale or not self._left:  # a new prompt, or the count ran out: read what is free
            self._left = self._free_positions()
            if self._left < 1:
                raise ValueError(f"the cache is full ({self.cache.layers[0].max_cache_len} tokens per sequence); "
                                 "create it with max_cache_len >= prompt + new tokens, or reset() it and prefill "
                                 "a new prompt")
        cached = self.cache.layers[0].max_cache_len - self._left  # tokens before this step
        self._left -= 1
        self._calls += 1
        state = getattr(self.cache, "pq_state", None)
        if state is not None:  # outside the graph: an index refresh (PQConfig.refresh) runs eagerly, all layers at once
            state.begin_step({i: self.cache.layers[i].keys for i in state.layers}, cached)
        try:
            if input_ids.device.type != "cuda" or self._calls <= self.warmup:
                if input_ids.device.type == "cuda":
                    self._ids = input_ids.new_empty(input_ids.shape)  # fixes the batch size and device
                return self._step(input_ids, position_ids)
            if self._graph is None or stale:
                self._capture(input_ids, position_ids)
            else:
                self._ids.copy_(input_ids)
                if position_ids is not None:
                    self._positions.copy_(position_ids)
            self._graph.replay()
            return self._logits
        finally:
            if state is not None:
                for layer in state.layers.values():
                    layer.length = cached + 1


COMPILE_BACKEND = "inductor"  # torch.compile's backend for the graphs of route_decode_steps
_ROUTED_KWARGS = {"input_ids", "position_ids", "attention_mask", "cache_position", "use_cache", "return_dict",
                  "logits_to_keep", "past_key_values", "cache", "output_attentions", "output_hidden_states"}


def route_decode_steps(model: nn.Module) -> None:
    """Send ``model``'s one-token forwards over a ``PQStaticCache(..., graph=True)`` through that cache's
    :class:`DecodeGraph` (``cache.decode_graph()``), so that ``generate()`` replays a captured CUDA graph per token
    instead of running the compiled step under Dynamo's guards and CUDA-graph trees (on a CPU: the compiled step).

    It wraps ``model.forward`` (once; the model's own forward stays ``model.forward.pqflex_own_forward``, and
    ``inspect.signature`` still reads its parameters). Every other forward, and a one-token forward that asks for
    anything a decode graph does not return (attentions, hidden states, embeddings as input, a loss, gradients),
    runs the model's own forward unchanged. A routed forward reads ``input_ids`` and ``position_ids`` and returns
    the logits ``[B, 1, vocab]`` (in the graph's buffer, which the next step overwrites: ``generate()`` copies them)
    and the cache; the attention mask is not read (a decode step of a fixed-capacity pqflex cache takes the padding
    from its PQ index).
    """
    if getattr(model.forward, "pqflex_own_forward", None) is not None:
        return
    own = model.forward

    @functools.wraps(own)
    def forward(*args: Any, **kwargs: Any) -> Any:
        graph = None if torch.compiler.is_compiling() else _routed_graph(args, kwargs)
        if graph is None:
            return own(*args, **kwargs)
        ids = args[0] if args else kwargs["input_ids"]
        logits = graph(ids, kwargs.get("position_ids"))
        return CausalLMOutputWithPast(logits=logits, **{_OUTPUT_CACHE_FIELD: graph.cache})

    forward.pqflex_own_forward = own
    model.forward = forward


def _routed_graph(args: tuple, kwargs: dict[str, Any]) -> DecodeGraph | None:
    """The decode graph a forward goes to, or None for the model's own forward."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if (not isinstance(cache, PQStaticCache) or not cache.graph or len(args) > 1 or set(kwargs) - _ROUTED_KWARGS
            or torch.is_grad_enabled()):
        return None
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states") or kwargs.get("logits_to_keep") not in (
            None, 0, 1) or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False:
        return None
    ids = args[0] if args else kwargs.get("input_ids")
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[1] != 1 or not cache.layers[0].is_initialized:
        return None  # a prompt (also a one-token one: the cache is empty then)
    if any(layer.index is None for layer in cache.pq_layers) or len(cache.pq_layers) != len(cache.layers):
        return None  # an index still to build (a deferred build): the eager step builds it
    positions = kwargs.get("position_ids")
    if positions is not None and (not torch.is_tensor(positions) or positions.shape != ids.shape):
        return None
    return cache.decode_graph()
