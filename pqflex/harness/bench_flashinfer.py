"""The ``flashinfer`` row of ``pqflex bench``: dense decode attention by FlashInfer (the decode kernel vLLM and SGLang
run) inside the same compiled, CUDA-graphed whole-model step as pqflex's rows.

The cache is transformers' ``StaticCache``: each layer's ``[B, Hkv, C, D]`` key and value buffers are FlashInfer's
paged KV cache in ``HND`` layout with one page of ``C`` tokens per sequence. Before every decode step the host plans
FlashInfer's decode for the new length (:meth:`FlashInferDecode.advance`: ``plan()`` writes the page table and the
split of the work into the wrapper's fixed buffers, which a captured CUDA graph then reads), as serving engines do
before each replay; the timed step includes that host call. The attention function calls FlashInfer through a
``torch.library`` op (:func:`flashinfer_decode`), so the step compiles with ``fullgraph=True`` around it. The prompt,
and any forward that is not a one-token step over the planned cache, runs transformers' SDPA.

Needs the ``flashinfer-python`` package (its JIT builds the decode kernel with the machine's ``nvcc`` at first use)
and CUDA; :func:`unavailable` says why a machine cannot run the row.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTN = "fi_decode"  # the row's attention implementation: a name holding "flash" sends transformers to its kernel hub
WORKSPACE_BYTES = 256 << 20  # FlashInfer's float workspace (split-KV partial outputs)
PAGE = 16  # tokens per page of the paged view of the cache (the page size vLLM and SGLang default to)


def pages_capacity(capacity: int) -> int:
    """``capacity`` rounded up to whole pages: the ``StaticCache`` length the row allocates."""
    return -(-capacity // PAGE) * PAGE

_PLANNED: dict[int, "FlashInferDecode"] = {}  # live planners by id: the op's int argument names one
_ids = itertools.count()


def unavailable(device: str) -> str | None:
    """Why the ``flashinfer`` row cannot run on ``device`` (None: it can)."""
    if not device.startswith("cuda"):
        return f"FlashInfer decodes on CUDA only, the bench runs on {device}"
    try:
        import flashinfer  # noqa: F401
    except ImportError as e:
        return f"the flashinfer-python package is not installed ({e})"
    return None


def page_view(buffer: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[B, Hkv, C, D]`` buffer (``C`` whole pages) as FlashInfer's ``HND`` pages
    ``[pages, Hkv, PAGE, D]``, without a copy: page ``q`` starts ``q * PAGE`` rows into the flat buffer and the head
    stride is a whole sequence's rows, so sequence ``b``'s ``i``-th page is page ``b * Hkv * C / PAGE + i``."""
    B, Hkv, C, D = buffer.shape
    if not buffer.is_contiguous() or C % PAGE:
        raise ValueError(f"the FlashInfer row pages contiguous buffers of whole {PAGE}-token pages, got "
                         f"{tuple(buffer.shape)} with strides {buffer.stride()}")
    count = (B - 1) * Hkv * (C // PAGE) + C // PAGE  # the last sequence's last page (at head 0) ends the view
    return buffer.as_strided((count, Hkv, PAGE, D), (PAGE * D, C * D, D, 1))


def page_table(batch: int, kv_heads: int, capacity: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page table of :func:`page_view` for ``n`` tokens per sequence: ``indptr [batch + 1]``,
    ``indices`` (each sequence's pages in order) and each sequence's ``last_page_len``, int32 on the host."""
    used = -(-n // PAGE)
    first = torch.arange(batch, dtype=torch.int32) * (kv_heads * (capacity // PAGE))
    indptr = torch.arange(batch + 1, dtype=torch.int32) * used
    indices = (first[:, None] + torch.arange(used, dtype=torch.int32)).flatten()
    return indptr, indices, torch.full((batch,), n - (used - 1) * PAGE, dtype=torch.int32)


class FlashInferDecode:
    """FlashInfer's batch decode over ``[batch, kv_heads, capacity, head_dim]`` key and value buffers: ``start(n)``
    after the prompt, then ``advance()`` before each decode step (the step writes token ``n`` and attends all
    ``n + 1``). :meth:`for_model` attaches one to a model's attention modules.

    The buffers are read in place as FlashInfer's paged cache (``HND``): pages of :data:`PAGE` tokens, viewed by
    :meth:`pages` with strides, so that FlashInfer splits a long sequence over its pages (one page per sequence
    leaves one thread block per KV head walking the whole context: 400 ms a step at 128K on the H200)."""

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        import flashinfer

        if capacity % PAGE:
            raise ValueError(f"the FlashInfer row pages its cache by {PAGE} tokens: capacity {capacity} is not a "
                             f"multiple of {PAGE} (see pages_capacity)")
        self.batch, self.heads, self.kv_heads, self.head_dim = batch, heads, kv_heads, head_dim
        self.capacity, self.dtype = capacity, dtype
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        per_sequence = capacity // PAGE
        self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "HND", use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(batch + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.zeros(batch * per_sequence, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(batch, dtype=torch.int32, device=device))
        self.n = 0
        self.id = next(_ids)
        _PLANNED[self.id] = self

    def pages(self, buffer: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, C, D]`` (contiguous) as ``[pages, Hkv, PAGE, D]`` without a copy (see the class)."""
        if tuple(buffer.shape[:3]) != (self.batch, self.kv_heads, self.capacity):
            raise ValueError(f"the FlashInfer row reads [{self.batch}, {self.kv_heads}, {self.capacity}, D] buffers, "
                             f"got {tuple(buffer.shape)}")
        return page_view(buffer)

    def advance(self) -> None:
        """Plan the next step: it writes one token, then attends all ``n + 1``."""
        self.n += 1
        if self.n > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} tokens per sequence; step {self.n} does not fit")
        indptr, indices, last = page_table(self.batch, self.kv_heads, self.capacity, self.n)
        self.wrapper.plan(indptr, indices, last, self.heads, self.kv_heads, self.head_dim, PAGE,
                          q_data_type=self.dtype, kv_data_type=self.dtype)

    def close(self) -> None:
        _PLANNED.pop(self.id, None)


@torch.library.custom_op("pqflex::flashinfer_decode", mutates_args=())
def flashinfer_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, planner: int) -> torch.Tensor:
    """Decode attention ``[B, H, D]`` of ``query [B, H, D]`` over the planned length of the ``[B, Hkv, C, D]``
    buffers, by the :class:`FlashInferDecode` numbered ``planner``."""
    plan = _PLANNED[planner]
    return plan.wrapper.run(query, (plan.pages(key), plan.pages(value)))


@flashinfer_decode.register_fake
def _(query, key, value, planner):
    return torch.empty_like(query)


def flashinfer_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function ``"fi_decode"``: FlashInfer for a one-token step over the planned cache,
    SDPA otherwise (a prompt from position 0, unpadded: causal over its rows; one token over a growing cache)."""
    planner = _PLANNED.get(getattr(module, "flashinfer_decode", -1))
    B, H, S, D = query.shape
    if S == 1 and planner is not None and key.shape[2] == planner.capacity:
        out = flashinfer_decode(query[:, :, 0].contiguous(), key, value, planner.id)
        return out[:, None], None
    if attention_mask is not None:
        raise NotImplementedError("the flashinfer bench row takes unpadded prompts only")
    rows = S if S > 1 else key.shape[2]  # a prompt fills the buffer from row 0; one token sees every row
    out = F.scaled_dot_product_attention(query, key[:, :, :rows], value[:, :, :rows], is_causal=S > 1,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def register() -> None:
    """Register ``"fi_decode"`` with transformers' attention and mask interfaces (the mask: none)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN, flashinfer_attention)
    AttentionMaskInterface.register(ATTN, lambda **kwargs: None)


def layer_decode_us(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, n: int) -> float:
    """One layer's FlashInfer decode (µs, CUDA-graphed): ``query [B, H, 1, D]`` over the first ``n`` rows of the
    ``[B, Hkv, C, D]`` buffers."""
    from pqflex.harness.bench_measure import graph_time_us

    B, H, _, D = query.shape
    planner = FlashInferDecode(B, H, key.shape[1], D, key.shape[2], query.dtype, query.device)
    try:
        planner.start(n - 1)
        planner.advance()
        q = query[:, :, 0].contiguous()
        pages = planner.pages(key), planner.pages(value)
        return graph_time_us(lambda: planner.wrapper.run(q, pages))
    finally:
        planner.close()
