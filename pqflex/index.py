"""PQIndex: the PQ state of one attention layer, and the token selection it plans for each query.

Per sequence and KV head it holds the centroids trained on the middle keys at build time (prefill) and the codes
of every cached token; per sequence it holds the first valid position (left padding) and the token budget.
Generated tokens are encoded with the existing centroids as they arrive, so the middle region never holds an
un-indexed token.

Query ``i`` of a step with ``S`` queries over ``N`` cached tokens sits at position ``p = N - S + i`` and behaves
exactly like a single decode step at context ``p + 1``: it attends the sink ``[start, start + sink_size)``, the
recent window ``(p - recent_size, p]`` and the ``topk`` middle tokens with the best PQ scores in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pqflex.config import PQConfig
from pqflex.ops import pq_encode, pq_select, portable  # noqa: F401  (register torch.ops.pqflex.pq_encode, pq_select)
from pqflex.ops.portable import decode_token_list
from pqflex.quantizer import ProductQuantizer


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_attention_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: PQConfig) -> None:
    """Raise ``TypeError``/``ValueError`` unless the tensors are SDPA-style ``[B, H, S, D]`` / ``[B, Hkv, N, D]``."""
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} dtype {t.dtype} is not supported; allowed: {_FLOAT_DTYPES}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value dtypes differ: {query.dtype}, {key.dtype}, {value.dtype}")
    B, H, S, D = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} shapes differ")
    Bk, Hkv, N, Dk = key.shape
    if Bk != B or Dk != D:
        raise ValueError(f"key [B, Hkv, N, D] = {tuple(key.shape)} does not match query [B, H, S, D] = "
                         f"{tuple(query.shape)} in B or D")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    if not 1 <= S <= N:
        raise ValueError(f"query length S={S} must be in [1, N={N}] (queries are the last S cached positions)")
    if D % config.M != 0:
        raise ValueError(f"head dim D={D} is not divisible by PQConfig.M={config.M}")


def left_padding_start(kv_mask: torch.Tensor | None, B: int, N: int, device: torch.device) -> torch.Tensor:
    """First valid position of each sequence, ``[B]`` int64, from a left-padding mask ``[B, N]`` (True = token).

    Raises ``ValueError`` unless every row is some ``False`` followed by at least one ``True``.
    """
    if kv_mask is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    if kv_mask.dtype != torch.bool or kv_mask.shape != (B, N):
        raise ValueError(f"kv_mask must be bool of shape {(B, N)}, got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    start = N - kv_mask.sum(-1)  # [B]
    expected = torch.arange(N, device=kv_mask.device)[None, :] >= start[:, None]
    if not torch.equal(expected, kv_mask) or bool((start >= N).any()):
        raise ValueError("kv_mask must be left padding: each row False...False then at least one True")
    return start.to(device)


def sequence_budgets(config: PQConfig, kv_mask: torch.Tensor | None, B: int, N: int,
                     device: torch.device) -> tuple[torch.Tensor, list[int], list]:
    """First valid position ``[B]``, valid lengths and :class:`pqflex.Budget` of each of ``B`` sequences of ``N``
    cached tokens (a left-padding mask ``[B, N]`` or None): what an index and an offloaded KV store share."""
    start = left_padding_start(kv_mask, B, N, device)
    lengths = [N] * B if kv_mask is None else (N - start).tolist()
    return start, lengths, [config.resolve_budget(n) for n in lengths]


def middle_tokens(start: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor, N: int) -> torch.Tensor:
    """``[B, N]`` bool: the tokens top-k may select (past each sequence's sink, before its recent window)."""
    pos = torch.arange(N, device=start.device)
    return (pos >= (start + sink)[:, None]) & (pos < N - recent[:, None])


def training_groups(keys: list[torch.Tensor], order: torch.Tensor, mask: torch.Tensor, max_train_bytes: int,
                    cpu: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Several layers' k-means problems, batched in groups of at most ``max_train_bytes`` of fp32 training keys.

    ``keys``: each layer's ``[B, Hkv, N, D]``; ``order``/``mask``: the shared sample positions and validity
    ``[B, T]`` (:func:`training_sample`). Yields ``(first, sample, mask)`` for each group: the index of its first
    layer, its keys at the sample positions ``[L, B, Hkv, T, D]`` and their mask ``[L, B, Hkv, T]``, moved to the
    CPU when ``cpu``."""
    B, Hkv, _, D = keys[0].shape
    T = order.shape[-1]
    rows = order[:, None, :, None].expand(B, Hkv, T, D)
    group = max(1, max_train_bytes // (B * Hkv * T * D * 4))
    for g in range(0, len(keys), group):
        sample = torch.stack([k.gather(2, rows) for k in keys[g:g + group]])
        sample_mask = mask[None, :, None, :].expand(sample.shape[:4])
        yield g, (sample.cpu() if cpu else sample), (sample_mask.cpu() if cpu else sample_mask)


def training_sample(middle: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys k-means trains on: at most ``cap`` middle tokens of each sequence, an even stride through them.

    Args:
        middle: ``[B, N]`` bool, the tokens top-k may select; cap: 0 keeps them all.

    Returns:
        ``order [B, T]`` positions (each sequence's sample first, in position order) and ``mask [B, T]`` (True for
        the sample). A sequence's sample depends on its own tokens only (a padded row samples what it does alone).
    """
    N = middle.shape[-1]
    if cap > 0:
        count = middle.sum(-1)  # [B]
        stride = (-(-count // cap)).clamp(min=1)  # [B]
        rank = middle.long().cumsum(-1) - 1  # [B, N] rank of each middle token
        middle = middle & (rank % stride[:, None] == 0)
    T = min(N, cap) if cap > 0 else N  # static: no host sync
    order = torch.argsort((~middle).to(torch.int8), dim=-1, stable=True)[:, :T]  # [B, T] sampled positions first
    return order, middle.gather(-1, order)


def select_blocks(scores: torch.Tensor, start: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  topk: torch.Tensor, k_max: int, block: int) -> torch.Tensor:
    """Block-granular selection: the tokens of the ``topk // block`` blocks with the most estimated attention mass.

    Blocks are aligned to each sequence's first token: ``[start + j * block, start + (j + 1) * block)``, so a
    sequence selects the same tokens whatever its left padding (a padded batch equals its rows alone). A block is
    a candidate when all of its tokens lie in ``[lo, hi)``. A block's mass is the sum over its tokens of the
    GQA-aggregated softmax of the scores (:func:`pqflex.ops.portable.gqa_scores` over the candidate tokens), so
    the chosen blocks carry the most approximate attention among whole blocks. Plain torch: a few fused kernels
    under ``torch.compile``.

    Args:
        scores: ``[B, Hkv, G, N]`` scaled scores of each query head (PQ or exact); start, lo, hi, topk: ``[B]``
            int64 (first token, candidate range, tokens to keep).
        k_max: the largest ``topk``; the result holds ``k_max // block`` blocks.
        block: tokens per block.

    Returns:
        ``[B, Hkv, (k_max // block) * block]`` int32 token positions, ``-1`` for empty slots.
    """
    B, Hkv, _, N = scores.shape
    nblk, slots = N // block, k_max // block
    k = min(slots, nblk)
    if k == 0:
        return torch.full((B, Hkv, slots * block), -1, dtype=torch.int32, device=scores.device)
    pos = torch.arange(N, device=scores.device)
    candidates = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None, :]  # [B, 1, N]
    probs = portable.gqa_scores(scores[:, :, :, None], candidates)[:, :, 0].clamp(min=0)  # [B, Hkv, N]
    blk = ((pos[None, :] - start[:, None]).clamp(min=0) // block).clamp(max=nblk - 1)  # [B, N] each token's block
    mass = probs.new_zeros(B, Hkv, nblk).scatter_add_(-1, blk[:, None, :].expand(B, Hkv, N), probs)
    first = start[:, None] + torch.arange(nblk, device=scores.device) * block  # [B, nblk]
    whole = (first >= lo[:, None]) & (first + block <= hi[:, None])  # [B, nblk]
    mass = mass.masked_fill(~whole[:, None], -1.0)
    value, order = mass.topk(k, dim=-1)  # [B, Hkv, k]
    ok = (value >= 0) & (torch.arange(k, device=scores.device) < (topk // block)[:, None, None])
    tokens = first[:, None, :].expand(B, Hkv, nblk).gather(-1, order)[..., None] + torch.arange(
        block, device=scores.device)  # [B, Hkv, k, block]
    out = torch.where(ok[..., None], tokens, -1).flatten(-2).to(torch.int32)
    return F.pad(out, (0, (slots - k) * block), value=-1)


class Selection(NamedTuple):
    """The plan of one step: which cached tokens each query attends, per KV head (see :meth:`PQIndex.plan`).

    A decode step (one query per sequence) attends a list of static width ``T = sink + W + recent`` per KV head:
    the sink positions, the ``W`` top-k slots and the recent window. The plan holds the top-k slots and each
    sequence's spans; the sink and recent positions follow from them, so no list is built unless a consumer asks
    (:meth:`token_list`). Several queries get a mask per query instead.

    Attributes:
        middle: ``[B, Hkv, W]`` int32 top-k positions, ``-1`` for an empty slot; None with a mask.
        spans: ``[B, 3]`` int64 (start, sink budget, recent budget) of each sequence; None with a mask, or for a
            plain list (``sink = recent = 0``, ``middle`` is the whole list).
        mask: ``[B, Hkv, S, N]`` bool, the tokens each of ``S > 1`` queries attends; None for a decode step.
        sink, recent: static widths of the sink and recent parts of the list.
        full: every slot of the list is a real token, so attention needs no mask.
        dense: every sequence attends all of its tokens ``[start, n)``: a KV source may attend that range instead.
        start: ``[B]`` first valid position of each sequence; n: tokens cached (int or 0-d tensor).
    """

    middle: torch.Tensor | None
    spans: torch.Tensor | None
    mask: torch.Tensor | None
    sink: int
    recent: int
    full: bool
    dense: bool
    start: torch.Tensor
    n: torch.Tensor | int

    def token_list(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's list as tensors: positions ``[B, Hkv, T]`` int64 (0 in empty slots) and ``valid``."""
        if self.middle is None:
            raise ValueError("a selection of several queries is a mask, not a token list")
        if self.spans is None:  # a plain list: the slots themselves
            return self.middle.long().clamp(min=0), self.middle >= 0
        return decode_token_list(self.middle, self.spans[:, 0], self.spans[:, 1], self.spans[:, 2], self.n,
                                 self.sink, self.recent)


class PQIndex:
    """PQ index of one layer over ``[B, Hkv, N, D]`` keys.

    Attributes:
        config: the :class:`PQConfig` it was built with.
        quantizer: trained :class:`ProductQuantizer`, centroids ``[B, Hkv, M, ksub, dsub]``; None for the
            ``"exact"`` scorer, which scores the keys themselves.
        codes: ``[B, Hkv, N, M]`` uint8, one row per cached token (sink, recent and padding rows are unused);
            ``M = 0`` for the ``"exact"`` scorer (the rows only count tokens).
        start: ``[B]`` first valid position; ``sink``, ``recent``, ``topk``: ``[B]`` per-sequence budgets.
        k_max: the largest ``topk`` of the batch, the static width of a selection.
        sink_max, recent_max: the largest ``sink`` and ``recent`` of the batch.
        full_lists: every sequence has the same sparse budget, so every slot of a decode step's token list is
            a real token (there are always more candidates than ``topk``) and attention needs no mask.
        dense: every sequence attends all of its tokens (short contexts, or a budget covering them).
    """

    def __init__(self, config: PQConfig, quantizer: ProductQuantizer | None, codes: torch.Tensor,
                 start: torch.Tensor, sink: torch.Tensor, recent: torch.Tensor, topk: torch.Tensor, k_max: int,
                 sink_max: int, recent_max: int, full_lists: bool = False, dense: bool = False) -> None:
        self.config, self.quantizer, self.codes = config, quantizer, codes
        self.start, self.sink, self.recent, self.topk, self.k_max = start, sink, recent, topk, k_max
        self.sink_max, self.recent_max, self.full_lists, self.dense = sink_max, recent_max, full_lists, dense
        self._rows: torch.Tensor | None = None  # a growing index's code rows with room to append (see append)
        self.spans = torch.stack([start, sink, recent], dim=-1).to(torch.int64)  # [B, 3], what attention reads

    @property
    def num_tokens(self) -> int:
        """Rows of ``codes``: the cached tokens, or the capacity of an index built with one."""
        return self.codes.shape[-2]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """The tensors a decode step reads or writes (for ``torch._dynamo.mark_static_address``)."""
        centroids = () if self.quantizer is None else (self.quantizer.centroids,)
        return (self.codes, *centroids, self.start, self.sink, self.recent, self.topk, self.spans)

    @classmethod
    def build(cls, key: torch.Tensor, config: PQConfig, kv_mask: torch.Tensor | None = None,
              capacity: int | None = None) -> PQIndex:
        """Train on the middle keys of each sequence and encode all keys.

        Args:
            key: ``[B, Hkv, N, D]`` post-RoPE keys.
            config: settings; the budget is resolved on each sequence's valid length.
            kv_mask: ``[B, N]`` bool left-padding mask, True for real tokens; None means no padding.
            capacity: allocate ``codes`` for this many tokens (a static cache; see :meth:`store`); the first
                ``N`` rows hold the prompt. None sizes ``codes`` to the prompt (a growing cache; see :meth:`append`).
        """
        return cls.build_layers([key], config, kv_mask, capacity)[0]

    @classmethod
    def build_layers(cls, keys: list[torch.Tensor], config: PQConfig, kv_mask: torch.Tensor | None = None,
                     capacity: int | None = None, max_train_bytes: int = 1 << 30,
                     centroids: list[torch.Tensor] | None = None) -> list[PQIndex]:
        """:meth:`build` for several layers over the same sequences, with one k-means for them all.

        The budgets and the training sample's positions depend on the sequences only, so every layer shares
        them; the layers' k-means problems run batched (a few launches per Lloyd iteration for all layers
        instead of per layer), in groups of at most ``max_train_bytes`` of fp32 training keys.

        Args:
            keys: ``[B, Hkv, N, D]`` post-RoPE keys of each layer (same shape).
            config, kv_mask, capacity: as in :meth:`build`.
            centroids: each layer's trained centroids ``[B, Hkv, M, ksub, dsub]`` (k-means run elsewhere, e.g. on
                the CPU from :meth:`training_keys`); the keys are only encoded.
        """
        if not keys or any(k.shape != keys[0].shape for k in keys):
            raise ValueError(f"keys must be a non-empty list of equal shapes, got {[tuple(k.shape) for k in keys]}")
        B, Hkv, N, D = keys[0].shape
        device = keys[0].device
        if capacity is not None and capacity < N:
            raise ValueError(f"capacity={capacity} is smaller than the prompt ({N} tokens)")
        start, lengths, budgets = sequence_budgets(config, kv_mask, B, N, device)
        sink, recent, topk = (torch.tensor(col, dtype=torch.long, device=device) for col in list(zip(*budgets))[:3])
        middle = middle_tokens(start, sink, recent, N)

        dense = all(b.dense for b in budgets)
        if config.scorer == "exact" or dense:  # nothing to quantize: the oracle scores the keys, dense rows no one
            quantizers = [None] * len(keys)
            codes = [torch.zeros(B, Hkv, N, 0, dtype=torch.uint8, device=device) for _ in keys]
        elif centroids is not None:
            if len(centroids) != len(keys):
                raise ValueError(f"centroids must hold one tensor per layer ({len(keys)}), got {len(centroids)}")
            quantizers, codes = [], []
            for c, k in zip(centroids, keys):
                layer_pq = ProductQuantizer(D, config.M, config.nbits)
                layer_pq.centroids = c.to(device, non_blocking=True)
                quantizers.append(layer_pq)
                codes.append(layer_pq.encode(k))
        else:
            order, train_mask = training_sample(middle, config.train_points * config.ksub)
            quantizers, codes = [], []
            for g, sample, mask in training_groups(keys, order, train_mask, max_train_bytes,
                                                   config.kmeans_device == "cpu"):
                pq = ProductQuantizer(D, config.M, config.nbits).train(sample, mask, niter=config.niter,
                                                                        seed=config.seed, tol=config.tol)
                for i, k in enumerate(keys[g:g + len(sample)]):
                    layer_pq = ProductQuantizer(D, config.M, config.nbits)
                    layer_pq.centroids = pq.centroids[i].to(device)
                    quantizers.append(layer_pq)
                    codes.append(layer_pq.encode(k))
        if capacity is not None:
            codes = [torch.cat([c, c.new_zeros(B, Hkv, capacity - N, c.shape[-1])], dim=-2) for c in codes]
        full_lists = len(set(budgets)) == 1 and not budgets[0].dense
        if config.selection == "block" and full_lists:  # enough whole middle blocks for every slot
            b, size = budgets[0], config.block_size  # whole blocks from a row's start in [sink, n - recent)
            full_lists = all((n - b.recent_size) // size - -(-b.sink_size // size) >= b.topk // size
                             for n in lengths)
        widths = dict(k_max=max(b.topk for b in budgets), sink_max=max(b.sink_size for b in budgets),
                      recent_max=max(b.recent_size for b in budgets), full_lists=full_lists, dense=dense)
        return [cls(config, pq, c, start, sink, recent, topk, **widths) for pq, c in zip(quantizers, codes)]

    @staticmethod
    def training_keys(key: torch.Tensor, config: PQConfig,
                      kv_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The keys k-means trains on for :meth:`build` (``[B, Hkv, T, D]``) and their mask (``[B, Hkv, T]``),
        or None when nothing is quantized (the exact scorer, or every sequence dense)."""
        B, Hkv, N, D = key.shape
        start, _, budgets = sequence_budgets(config, kv_mask, B, N, key.device)
        if config.scorer == "exact" or all(b.dense for b in budgets):
            return None
        sink, recent = (torch.tensor(col, dtype=torch.long, device=key.device) for col in list(zip(*budgets))[:2])
        order, train_mask = training_sample(middle_tokens(start, sink, recent, N), config.train_points * config.ksub)
        T = order.shape[-1]
        sample = key.gather(2, order[:, None, :, None].expand(B, Hkv, T, D))
        return sample, train_mask[:, None, :].expand(B, Hkv, T)

    def append(self, key: torch.Tensor, position: torch.Tensor | int | None = None) -> None:
        """Encode new keys ``[B, Hkv, S, D]`` with the existing centroids; they become cached tokens.

        ``position=None``: a growing index, the codes are appended. Else a fixed-capacity index: the one new key
        (``S = 1``) is encoded into row ``position`` (a 0-d device tensor or an int), with no host sync.
        """
        if key.shape[:2] != self.codes.shape[:2] or key.dim() != 4:
            raise ValueError(f"new keys must be [B, Hkv, S, D] with B, Hkv = {tuple(self.codes.shape[:2])}, "
                             f"got {tuple(key.shape)}")
        if position is not None:
            if key.shape[2] != 1:
                raise ValueError(f"a fixed-capacity index stores one new key per step, got {key.shape[2]}")
            if self.quantizer is None:  # the exact scorer reads the keys themselves
                return
            pos = (position if torch.is_tensor(position) else torch.tensor(position, device=key.device)).reshape(1)
            self.codes.index_copy_(2, pos.to(self.codes.device), self._encode(key))
            return
        new = key.new_zeros(*key.shape[:3], 0, dtype=torch.uint8) if self.quantizer is None else self._encode(key)
        N, S = self.codes.shape[2], key.shape[2]
        spare = self._rows
        if spare is None or spare.shape[2] < N + S or spare.shape[:2] != self.codes.shape[:2] \
                or spare[:, :, :N].data_ptr() != self.codes.data_ptr():
            # Room for the next steps' codes (a growing cache appends every step): no copy of all the codes per
            # step. Doubling keeps the copies at O(1) per token; the codes take M bytes per token and KV head.
            spare = self.codes.new_empty(*self.codes.shape[:2], max(2 * (N + S), 64), self.codes.shape[3])
            spare[:, :, :N] = self.codes
            self._rows = spare
        spare[:, :, N:N + S] = new
        self.codes = spare[:, :, :N + S]

    def refresh(self, key: torch.Tensor, n: int, niter: int | None = None) -> None:
        """Retrain the centroids on the middle keys of the first ``n`` cached tokens and encode those ``n`` keys again,
        in place (a compiled or CUDA-graphed step keeps reading the same buffers).

        Each sequence trains on its tokens in ``[start + sink, n - recent)``, at most ``config.train_points * ksub``
        of them at an even stride (as :meth:`build` does), starting from its current centroids; a sequence without
        such a token (dense) keeps its centroids. The budgets do not change. ``n`` is a host int (no sync).
        :meth:`refresh_layers` does this for several layers with one k-means.

        Args:
            key: ``[B, Hkv, >= n, D]`` the cached keys (a growing cache's, or a fixed-capacity buffer).
            n: tokens cached and indexed so far.
            niter: Lloyd iterations; default ``config.refresh_niter``.
        """
        PQIndex.refresh_layers([self], [key], n, niter)

    @staticmethod
    def refresh_layers(indexes: list[PQIndex], keys: list[torch.Tensor], n: int, niter: int | None = None,
                       max_train_bytes: int = 1 << 30) -> None:
        """:meth:`refresh` of several layers' indexes, each over its layer's ``keys``, with one batched k-means
        (a few launches per Lloyd iteration for all of them, as :meth:`build_layers`).

        Layers train together where their indexes share the sequences' spans (the same ``start``, ``sink`` and
        ``recent`` tensors, as :meth:`build_layers` makes them) and the config; any other layer trains apart.
        The fp32 training keys of one k-means stay under ``max_train_bytes`` (more layers: several k-means).
        An exact or dense index is left as it is.
        """
        if len(indexes) != len(keys):
            raise ValueError(f"refresh_layers needs one key tensor per index, got {len(indexes)} indexes and "
                             f"{len(keys)} key tensors")
        groups: dict[tuple, list[tuple[PQIndex, torch.Tensor]]] = {}
        for index, key in zip(indexes, keys):
            if index.quantizer is None or index.dense:  # the exact scorer reads the keys; a dense index has no codes
                continue
            if key.dim() != 4 or key.shape[:2] != index.codes.shape[:2] or \
                    not 1 <= n <= min(key.shape[2], index.num_tokens):
                raise ValueError(f"refresh needs keys [B, Hkv, >= n, D] with B, Hkv = {tuple(index.codes.shape[:2])} "
                                 f"and 1 <= n <= {index.num_tokens} indexed rows, got {tuple(key.shape)} and n={n}")
            shared = (id(index.start), id(index.sink), id(index.recent), id(index.config), key.shape[-1])
            groups.setdefault(shared, []).append((index, key))
        for layers in groups.values():
            first, key = layers[0]
            config = first.config
            D = key.shape[-1]
            cpu = config.kmeans_device == "cpu"
            order, mask = training_sample(middle_tokens(first.start, first.sink, first.recent, n),
                                          config.train_points * config.ksub)  # positions in [0, n)
            for g, sample, train_mask in training_groups([k for _, k in layers], order, mask, max_train_bytes, cpu):
                chunk = layers[g:g + len(sample)]
                init = torch.stack([index.quantizer.centroids for index, _ in chunk])
                pq = ProductQuantizer(D, config.M, config.nbits).train(
                    sample, train_mask, niter=config.refresh_niter if niter is None else niter, seed=config.seed,
                    init=init.cpu() if cpu else init)
                for i, (index, k) in enumerate(chunk):
                    index.quantizer.centroids.copy_(pq.centroids[i])
                    index.codes[:, :, :n].copy_(index._encode(k[:, :, :n]))

    def _encode(self, key: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Hkv, S, M]`` of keys ``[B, Hkv, S, D]`` with each head's centroids: the ``pq_encode`` op
        (:meth:`ProductQuantizer.encode`'s math, called here so that a decode step reaches the op directly)."""
        B, Hkv, S, D = key.shape
        c = self.quantizer.centroids  # [B, Hkv, M, ksub, dsub]
        codes = torch.ops.pqflex.pq_encode(key.reshape(B * Hkv, S, D), c.reshape(B * Hkv, *c.shape[2:]))
        return codes.reshape(B, Hkv, S, c.shape[2])

    def select_batch(self, indices: torch.Tensor) -> PQIndex:
        """The index of the sequences ``indices`` ``[B']`` (int64; repeats allowed), e.g. beams reordered.

        Per-sequence state (centroids, codes, start, budgets) follows its sequence; the static widths stay, so a
        compiled decode step keeps its shapes.
        """
        idx = indices.to(self.start.device)
        pq = None
        if self.quantizer is not None:
            pq = ProductQuantizer(self.quantizer.dim, self.quantizer.M, self.quantizer.nbits)
            pq.centroids = self.quantizer.centroids.index_select(0, idx)
        return PQIndex(self.config, pq, self.codes.index_select(0, idx), self.start.index_select(0, idx),
                       self.sink.index_select(0, idx), self.recent.index_select(0, idx),
                       self.topk.index_select(0, idx), self.k_max, self.sink_max, self.recent_max, self.full_lists,
                       self.dense)

    def truncate(self, n: int) -> None:
        """Forget the tokens from position ``n`` on (a growing cache cropped to ``n`` tokens)."""
        self.codes = self.codes[:, :, :n]

    @property
    def nbytes(self) -> int:
        """Bytes held by the codes (with a growing index's room to append) and centroids."""
        held = self.buffers()[:2 if self.quantizer is not None else 1]
        if self._rows is not None and self._rows[:, :, :self.num_tokens].data_ptr() == self.codes.data_ptr():
            held = (self._rows, *held[1:])
        return sum(t.numel() * t.element_size() for t in held)

    def scores(self, query: torch.Tensor, scale: float, key: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled scores ``[B, Hkv, R, N]`` of query rows ``[B, Hkv, R, D]`` against the ``N`` indexed tokens.

        PQ scores from the codes, or exact ``q . k`` from ``key [B, Hkv, >= N, D]`` for the ``"exact"`` scorer.
        """
        if self.quantizer is None:
            if key is None:
                raise ValueError("the exact scorer needs the keys: pass key")
            k = key[:, :, :self.num_tokens]
            return torch.einsum("bhrd,bhnd->bhrn", query.float(), k.float()) * scale
        ip_table = portable.compute_ip_table(query, self.quantizer.centroids)  # [B, Hkv, R, M, ksub]
        return portable.adc_scores(ip_table, self.codes) * scale

    def topk_tokens(self, query: torch.Tensor, n: torch.Tensor | int, scale: float,
                    key: torch.Tensor | None = None) -> torch.Tensor:
        """The selected middle tokens (``[B, Hkv, W]`` int32, ``-1`` = empty) of a decode step at ``n - 1``.

        ``W`` is ``k_max`` for token selection and ``k_max`` rounded down to whole blocks for block selection.
        ``key`` is needed by the ``"exact"`` scorer only.
        """
        B, H, _, D = query.shape
        Hkv = self.codes.shape[1]
        q = query.reshape(B, Hkv, H // Hkv, D)  # the G query heads of each KV head
        if self.k_max == 0:  # sink + recent only
            return torch.empty(B, Hkv, 0, dtype=torch.int32, device=query.device)
        if self.quantizer is not None and self.config.selection == "token":  # scores, range and top-k in one op
            count = portable.count_argument(n, self.num_tokens, q.device)
            return torch.ops.pqflex.pq_select(q, self.quantizer.centroids, self.codes, self.spans, self.topk, count,
                                              self.k_max, scale)
        lo, hi = portable.candidate_range(self.spans, n, self.num_tokens)
        if self.config.selection == "block":
            return select_blocks(self.scores(q, scale, key), self.start, lo, hi, self.topk, self.k_max,
                                 self.config.block_size)
        return portable.select_from_scores(self.scores(q, scale, key), lo, hi, self.topk, self.k_max)


    def plan(self, query: torch.Tensor, n: torch.Tensor | int, scale: float,
             key: torch.Tensor | None = None) -> Selection:
        """Which cached tokens each query attends, per KV head: the first half of a step (no key or value is read).

        Args:
            query: ``[B, H, S, D]``, the queries of the last ``S`` of the ``n`` cached positions (their keys are
                indexed already: :meth:`append`).
            n: tokens cached, the new ones included (an int, or a 0-d device tensor in a fixed-capacity cache).
            scale: softmax scale of the scores.
            key: ``[B, Hkv, >= n, D]``, for the ``"exact"`` scorer only (the oracle scores the keys themselves).

        Returns:
            A :class:`Selection`: the token list of a decode step (``S = 1``; static widths, no host sync) or a
            token mask per query (``S > 1``).
        """
        S = query.shape[-2]
        if S > 1:
            return Selection(None, None, self._plan_mask(query, int(n), scale, key), 0, 0, False, False, self.start,
                             n)
        return Selection(self.topk_tokens(query, n, scale, key), self.spans, None, self.sink_max,
                         min(self.recent_max, self.num_tokens), self.full_lists, self.dense, self.start, n)

    def _plan_mask(self, query: torch.Tensor, N: int, scale: float, key: torch.Tensor | None) -> torch.Tensor:
        """``attend [B, Hkv, S, N]`` bool of queries at positions ``N - S ..``: sink + recent + top-k, causal."""
        B, H, S, D = query.shape
        Hkv = self.codes.shape[1]
        G = H // Hkv
        pos = torch.arange(N, device=query.device)
        qpos = torch.arange(N - S, N, device=query.device)[:, None]  # [S, 1]
        start = self.start[:, None, None]  # [B, 1, 1]
        valid = (pos >= start) & (pos <= qpos)  # [B, S, N]
        sink = valid & (pos < start + self.sink[:, None, None])
        recent = valid & (pos > qpos - self.recent[:, None, None])

        if self.k_max == 0:  # no top-k: dense sequences, or sink + recent only (StreamingLLM)
            return (sink | recent)[:, None].expand(B, Hkv, S, N)
        if self.config.selection == "block":  # each query as a decode step at its position
            idx = torch.stack([self.topk_tokens(query[:, :, i:i + 1], N - S + i + 1, scale, key) for i in range(S)],
                              dim=2)
            indices, ok = idx.long().clamp(min=0), idx >= 0  # [B, Hkv, S, W]
        else:
            q = query.reshape(B, Hkv, G * S, D)  # [B, Hkv, G * S, D]
            candidates = valid & ~sink & ~recent  # [B, S, N]
            scores = self.scores(q, scale, key)[..., :N].view(B, Hkv, G, S, N)
            agg = portable.gqa_scores(scores, candidates)  # [B, Hkv, S, N]
            indices, ok = portable.select_topk(agg, self.topk, self.k_max)  # [B, Hkv, S, k_max]
        selected = torch.zeros(B, Hkv, S, N, dtype=torch.int32, device=query.device)
        selected = selected.scatter_add_(-1, indices, ok.int()) > 0
        return (sink | recent)[:, None] | selected
