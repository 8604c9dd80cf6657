"""ProductQuantizer: faiss-style product quantization, batched over leading dims (batch, KV head).

A vector of ``dim`` values is split into ``M`` sub-vectors of ``dsub = dim // M``; each sub-space has its own
``ksub = 2**nbits`` k-means centroids, and a vector is stored as ``M`` uint8 codes.
"""

from __future__ import annotations

import torch

from pqflex.ops import kmeans, portable  # noqa: F401  (kmeans registers torch.ops.pqflex.kmeans)
from pqflex.ops.pq_encode import pq_encode


class ProductQuantizer:
    """Product quantizer over ``[..., N, dim]`` tensors; every leading index has its own centroids.

    Args:
        dim: vector length ``D``; must be divisible by ``M``.
        M: number of sub-quantizers.
        nbits: bits per code, 1..8.

    Attributes:
        centroids: ``[..., M, ksub, dsub]`` fp32 after :meth:`train` (or assigned directly), else None.
    """

    def __init__(self, dim: int, M: int, nbits: int) -> None:
        for name, value in (("dim", dim), ("M", M), ("nbits", nbits)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ProductQuantizer {name} must be an int >= 1, got {value!r}")
        if nbits > 8:
            raise ValueError(f"ProductQuantizer nbits={nbits} is out of range; allowed: [1, 8] (uint8 codes)")
        if dim % M != 0:
            raise ValueError(f"ProductQuantizer dim={dim} is not divisible by M={M}; allowed: M dividing dim")
        self.dim, self.M, self.nbits = dim, M, nbits
        self.ksub = 1 << nbits
        self.dsub = dim // M
        self.centroids: torch.Tensor | None = None

    def __repr__(self) -> str:
        shape = None if self.centroids is None else tuple(self.centroids.shape)
        return f"ProductQuantizer(dim={self.dim}, M={self.M}, nbits={self.nbits}, centroids={shape})"

    def _check(self, x: torch.Tensor, name: str) -> None:
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() < 2 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., N, {self.dim}], got {tuple(x.shape)}")

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., N, dim]`` -> ``[L * M, N, dsub]`` with the sub-space index next to the flattened leading dims."""
        N = x.shape[-2]
        sub = x.reshape(-1, N, self.M, self.dsub)  # [L, N, M, dsub]
        return sub.transpose(1, 2).reshape(-1, N, self.dsub)  # [L * M, N, dsub]

    def _require_trained(self, lead: torch.Size) -> torch.Tensor:
        if self.centroids is None:
            raise ValueError("ProductQuantizer is not trained; call train(x) first")
        if self.centroids.shape[:-3] != lead:
            raise ValueError(
                f"leading dims {tuple(lead)} do not match the trained centroids' {tuple(self.centroids.shape[:-3])}"
            )
        return self.centroids

    def train(self, x: torch.Tensor, mask: torch.Tensor | None = None, *, niter: int = 20, seed: int = 0,
              tol: float = 0.0, init: torch.Tensor | None = None) -> ProductQuantizer:
        """Run k-means per leading index and sub-space; deterministic for a seed.

        Args:
            x: training vectors ``[..., N, dim]``.
            mask: ``[..., N]`` bool, True for the vectors to train on; None trains on all. Vectors with a NaN or
                infinite value never train.
            niter, seed, tol: see :func:`pqflex.ops.portable.kmeans`.
            init: ``[..., M, ksub, dsub]`` centroids to start from (a warm start); a leading index with no
                vector to train on keeps its ``init``. None: seeded initialization.

        Returns:
            self, with ``centroids`` ``[..., M, ksub, dsub]`` on ``x.device``.
        """
        self._check(x, "x")
        lead, N = x.shape[:-2], x.shape[-2]
        if N < 1:
            raise ValueError(f"cannot train on {N} vectors; need at least 1")
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be bool of shape {tuple(x.shape[:-1])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        # Non-finite vectors never train, and masked-out values never reach the arithmetic (selection, not
        # multiplication: 0 * nan is nan).
        finite = torch.isfinite(x).all(-1)
        mask = finite if mask is None else mask & finite
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        m = mask.reshape(-1, 1, N).expand(-1, self.M, N).reshape(-1, N)  # [L * M, N]
        if init is not None:
            expected = (*lead, self.M, self.ksub, self.dsub)
            if init.shape != expected or not init.is_floating_point():
                raise ValueError(f"init must be floating-point centroids {expected}, got {init.dtype} "
                                 f"{tuple(init.shape)}")
            init = init.reshape(-1, self.ksub, self.dsub)  # [L * M, ksub, dsub]
        c = torch.ops.pqflex.kmeans(self._split(x), m, self.ksub, niter, seed, tol, init)  # [L * M, ksub, dsub]
        self.centroids = c.reshape(*lead, self.M, self.ksub, self.dsub)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of ``x [..., N, dim]`` as uint8 ``[..., N, M]``."""
        self._check(x, "x")
        lead, N = x.shape[:-2], x.shape[-2]
        c = self._require_trained(lead).reshape(-1, self.M, self.ksub, self.dsub)  # [L, M, ksub, dsub]
        codes = pq_encode(x.reshape(-1, N, self.dim), c)  # [L, N, M]
        return codes.reshape(*lead, N, self.M)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., N, dim]`` (fp32) of uint8 codes ``[..., N, M]``."""
        if codes.dtype != torch.uint8:
            raise TypeError(f"codes must be uint8, got {codes.dtype}")
        if codes.dim() < 2 or codes.shape[-1] != self.M:
            raise ValueError(f"codes must have shape [..., N, {self.M}], got {tuple(codes.shape)}")
        lead, N = codes.shape[:-2], codes.shape[-2]
        c = self._require_trained(lead).reshape(-1, self.M, self.ksub, self.dsub)  # [L, M, ksub, dsub]
        idx = codes.reshape(-1, N, self.M).long().transpose(1, 2)  # [L, M, N]
        sub = torch.gather(c, 2, idx[..., None].expand(-1, -1, -1, self.dsub))  # [L, M, N, dsub]
        return sub.permute(0, 2, 1, 3).reshape(*lead, N, self.dim)

    def compute_ip_table(self, query: torch.Tensor) -> torch.Tensor:
        """``ip_table [..., S, M, ksub]`` (fp32) of queries ``[..., S, dim]``."""
        self._check(query, "query")
        return portable.compute_ip_table(query, self._require_trained(query.shape[:-2]))

    def adc_scores(self, query: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Approximate ``q . k`` ``[..., S, N]`` (fp32) of queries ``[..., S, dim]`` against codes ``[..., N, M]``."""
        return portable.adc_scores(self.compute_ip_table(query), codes)
