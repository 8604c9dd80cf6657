"""PQConfig: every knob of pqflex in one frozen, validated dataclass.

The budget is the number of tokens each query attends per KV head: ``sink_size`` first tokens, the
``recent_size`` latest tokens and the ``topk`` middle tokens chosen by PQ scores. A ratio budget is turned into
tokens in exactly one place, :meth:`PQConfig.resolve_budget`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

# Recent-window size that marks a sequence as attended densely: larger than any context.
DENSE_WINDOW = 1 << 40

KMEANS_DEVICES = ("auto", "cpu")
ATTENTION_BACKENDS = ("fused", "gather", "flex")  # see pqflex.ops.backends
SELECTIONS = ("token", "block")  # see pqflex.index
SCORERS = ("pq", "exact")
# Methods compared under one budget accounting (sink + recent + selected = budget); see PQConfig.for_method.
METHODS = ("full", "pqcache", "streaming", "oracle")


class Budget(NamedTuple):
    """Token budget of one sequence, per KV head and query.

    ``dense`` sequences attend every token: their ``recent_size`` is :data:`DENSE_WINDOW` and ``topk`` is 0.
    """

    sink_size: int
    recent_size: int
    topk: int
    dense: bool

    @property
    def total(self) -> int:
        return self.sink_size + self.recent_size + self.topk


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"PQConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"PQConfig.{name}={value} is out of range; allowed: {allowed}")


def _check_float(name: str, value: object, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"PQConfig.{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ValueError(f"PQConfig.{name}={value} is out of range; allowed: {bracket}{low}, {high}]")


def parse_budget(text: str) -> float | int:
    """A budget as written on a command line: ``"0.1"`` -> 0.1 (a fraction of the context), ``"2048"`` -> 2048
    tokens. Raises ``ValueError`` naming the text otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0 or (value > 1 and value != int(value)):
        raise ValueError(f"budget must be a fraction of the context in (0, 1] or a whole number of tokens, got {text!r}")
    return int(value) if value > 1 else value


@dataclasses.dataclass(frozen=True)
class PQConfig:
    """Settings of PQCache retrieval attention.

    The defaults (M=8 sub-quantizers of 256 centroids, 10 Lloyd iterations on at most 64 keys per centroid, the
    fused attention kernel) are the fastest measured setting that keeps >= 95% of full attention's suite score at
    1/10 of the tokens (EVALS.md); the paper's M=2, nbits=6 is faster to build and as fast to decode but keeps
    40-78% (BENCHMARKS.md has the frontier).

    Args:
        M: sub-quantizers per key; the head dim ``D`` must be divisible by ``M`` (``dsub = D // M``).
        nbits: bits per code, 1..8; each sub-space has ``ksub = 2**nbits`` centroids.
        sink_size: first tokens of each sequence that are always attended.
        budget: tokens attended per KV head and query. An ``int`` is a token count; a ``float`` in (0, 1] is a
            fraction of the context length at index-build time (prefill). ``1.0`` means dense attention.
        recent_ratio: share of ``budget - sink_size`` given to the recent window; the rest goes to top-k.
            ``1.0`` gives sink + recent only (StreamingLLM); the recent window always holds at least 1 token.
        min_context: contexts shorter than this are attended densely.
        niter: Lloyd iterations of k-means.
        train_points: k-means trains on at most ``train_points * ksub`` middle keys per sequence and KV head, an
            even stride through them (faiss's ``max_points_per_centroid``: 256 there; faiss warns below 39); 0
            trains on all. It bounds the index build at long contexts (16K training keys at the default).
        seed: seed of the k-means initialization.
        tol: stop k-means early when the mean squared centroid shift falls below ``tol`` times the data variance;
            ``0.0`` runs exactly ``niter`` iterations with no host synchronization.
        kmeans_device: ``"auto"`` trains where the keys are; ``"cpu"`` trains on the CPU.
        cpu_niter: Lloyd iterations of k-means on the CPU beside a GPU prefill (``kmeans_device="cpu"`` with a
            CUDA :class:`pqflex.PQStaticCache`), in place of ``niter``.
        cpu_train_points: ``train_points`` of that CPU k-means. Each layer's job must keep pace with the GPU's
            prefill of a layer; the defaults do a quarter of the GPU build's work (BENCHMARKS.md "CPU k-means").
        backend: how a decode step attends its tokens: ``"fused"`` (the default: the listed rows read by index in
            one Triton kernel, no copy), ``"gather"`` (compact copy + SDPA) or ``"flex"`` (FlexAttention with a
            block mask; fast only under ``torch.compile``). BENCHMARKS.md compares them.
        selection: what a decode step selects: ``"token"`` (the exact top-k tokens by PQ score, PQCache's rule) or
            ``"block"`` (the ``topk // block_size`` whole blocks of ``block_size`` middle tokens that hold the most
            PQ-estimated attention mass; cheaper to select, coarser; the top-k budget rounds down to whole blocks).
        block_size: tokens per block of ``selection="block"``.
        scorer: how middle tokens are scored: ``"pq"`` (PQ codes, the method) or ``"exact"`` (exact ``q . k`` of
            every cached key, no k-means: the oracle top-k, the ceiling of any top-k retriever; an evaluation
            baseline that reads every key, not a speed-up).
        offload: keep every cached key and value in (pinned) CPU memory; the GPU holds the PQ codes and
            centroids, the sink, the recent window and a cache of hot tokens (:class:`pqflex.OffloadedKV`). Needs a
            fixed-capacity cache (:class:`pqflex.PQStaticCache`) and token selection with the PQ scorer.
        hot_ratio: offload only: the hot-token cache of each layer and KV head holds ``hot_ratio * topk`` tokens
            (rounded to whole ``hot_block`` units); ``0`` disables it (every selected token is read from CPU memory).
        hot_block: offload only: tokens per unit of the hot cache; a selected token that misses brings its whole
            unit in (1 = single tokens; the original PQCache caches 128-token blocks).
        refresh: every ``refresh`` decoded tokens, each layer's index is refreshed: its centroids retrained on the
            middle keys cached so far, the prompt's and the generated ones (warm-started from the current
            centroids, ``refresh_niter`` Lloyd iterations, the same training sample cap), and every cached key
            encoded again (:meth:`pqflex.PQIndex.refresh`). Generated keys are otherwise encoded with centroids
            trained on the prompt, and the selection's recall decays over long generations (EVALS.md, "Long
            generations"). The budget stays the one resolved at the prompt. ``0`` never refreshes. It runs on the
            host between decode steps: eager steps, :class:`pqflex.DecodeGraph` and ``PQStaticCache(graph=True)``
            do it; a decode step compiled any other way refuses a config with ``refresh``. Not with ``offload``.
        refresh_niter: Lloyd iterations of a refresh.
    """

    M: int = 8
    nbits: int = 8
    sink_size: int = 32
    budget: float | int = 0.1
    recent_ratio: float = 0.5
    min_context: int = 1024
    niter: int = 10
    train_points: int = 64
    seed: int = 0
    tol: float = 0.0
    kmeans_device: Literal["auto", "cpu"] = "auto"
    cpu_niter: int = 5
    cpu_train_points: int = 32
    backend: Literal["fused", "gather", "flex"] = "fused"
    selection: Literal["token", "block"] = "token"
    block_size: int = 64
    scorer: Literal["pq", "exact"] = "pq"
    offload: bool = False
    hot_ratio: float = 0.45
    hot_block: int = 1
    refresh: int = 0
    refresh_niter: int = 3

    def __post_init__(self) -> None:
        _check_int("M", self.M, 1)
        _check_int("nbits", self.nbits, 1, 8)
        _check_int("sink_size", self.sink_size, 0)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)):
            raise ValueError(f"PQConfig.budget must be an int (tokens) or a float in (0, 1], got {self.budget!r}")
        if isinstance(self.budget, int):
            _check_int("budget", self.budget, 1)
        else:
            _check_float("budget", self.budget, 0.0, 1.0, low_open=True)
        _check_float("recent_ratio", self.recent_ratio, 0.0, 1.0)
        _check_int("min_context", self.min_context, 0)
        _check_int("niter", self.niter, 1)
        _check_int("train_points", self.train_points, 0)
        _check_int("cpu_niter", self.cpu_niter, 1)
        _check_int("cpu_train_points", self.cpu_train_points, 0)
        _check_int("seed", self.seed, 0, 2**63 - 1)  # the k-means op's int64 argument
        _check_float("tol", self.tol, 0.0, math.inf)
        if self.kmeans_device not in KMEANS_DEVICES:
            raise ValueError(f"PQConfig.kmeans_device={self.kmeans_device!r}; allowed: {KMEANS_DEVICES}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"PQConfig.backend={self.backend!r}; allowed: {ATTENTION_BACKENDS}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"PQConfig.selection={self.selection!r}; allowed: {SELECTIONS}")
        _check_int("block_size", self.block_size, 1, 4096)
        if self.scorer not in SCORERS:
            raise ValueError(f"PQConfig.scorer={self.scorer!r}; allowed: {SCORERS}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"PQConfig.offload must be a bool, got {self.offload!r}")
        _check_float("hot_ratio", self.hot_ratio, 0.0, 4.0)
        _check_int("hot_block", self.hot_block, 1, 4096)
        _check_int("refresh", self.refresh, 0)
        _check_int("refresh_niter", self.refresh_niter, 1)
        if self.offload and self.refresh:
            raise ValueError(f"PQConfig.refresh={self.refresh} is not supported with offload=True (the keys live in "
                             "CPU memory); allowed there: refresh=0")
        if self.offload and (self.scorer != "pq" or self.selection != "token"):
            raise ValueError(f"PQConfig.offload=True needs scorer='pq' and selection='token', got "
                             f"scorer={self.scorer!r}, selection={self.selection!r}")
        # The budget must leave room for sink + 1 recent + 1 top-k token at the shortest sparse context.
        smallest = self.budget if isinstance(self.budget, int) else int(self.budget * self.min_context)
        dense_only = isinstance(self.budget, float) and self.budget == 1.0
        if not dense_only and smallest < self.sink_size + 2:
            where = "" if isinstance(self.budget, int) else f" at min_context={self.min_context}"
            raise ValueError(
                f"PQConfig.budget={self.budget} gives {smallest} tokens{where}, fewer than "
                f"sink_size + 2 = {self.sink_size + 2}; raise budget or min_context, or lower sink_size"
            )

    @property
    def ksub(self) -> int:
        return 1 << self.nbits

    @classmethod
    def for_method(cls, method: str, **settings: object) -> PQConfig:
        """The settings of an evaluation method, with ``settings`` (any field) on top.

        ``"pqcache"``: PQ retrieval as configured; ``"full"``: ``budget=1.0`` (dense); ``"streaming"``: sink +
        recent only (``recent_ratio=1.0``, StreamingLLM); ``"oracle"``: exact top-k (``scorer="exact"``).
        """
        fixed = {"full": {"budget": 1.0}, "pqcache": {}, "streaming": {"recent_ratio": 1.0},
                 "oracle": {"scorer": "exact"}}
        if method not in fixed:
            raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown PQConfig setting(s) {unknown}; allowed: {sorted(fields)}")
        clash = sorted(k for k in fixed[method] if k in settings and settings[k] != fixed[method][k])
        if clash:
            raise ValueError(f"method {method!r} fixes {clash}; drop them or choose another method")
        return cls(**{**settings, **fixed[method]})

    def replace(self, **changes: object) -> PQConfig:
        """A copy with ``changes`` applied and validated (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def resolve_budget(self, n_ctx: int) -> Budget:
        """The token budget of a sequence whose context at index-build time has ``n_ctx`` tokens.

        The one place where a ratio budget becomes tokens. Dense when the context is below ``min_context`` or the
        budget covers it; otherwise ``sink_size + recent_size + topk == budget`` tokens, ``recent_size >= 1``.
        """
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0:
            raise ValueError(f"n_ctx must be an int >= 0, got {n_ctx!r}")
        total = self.budget if isinstance(self.budget, int) else int(self.budget * n_ctx)
        if n_ctx < self.min_context or total >= n_ctx:
            return Budget(self.sink_size, DENSE_WINDOW, 0, True)
        if total < self.sink_size + 2:
            raise ValueError(
                f"PQConfig.budget={self.budget} gives {total} tokens for a context of {n_ctx}, fewer than "
                f"sink_size + 2 = {self.sink_size + 2}; allowed: a budget of at least {self.sink_size + 2} tokens"
            )
        rest = total - self.sink_size
        recent = min(rest, max(1, int(rest * self.recent_ratio)))
        return Budget(self.sink_size, recent, rest - recent, False)
