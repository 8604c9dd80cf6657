"""Math on tensors: one file per op (a ``torch.library`` op with its Triton and native C kernels), a plain-torch
implementation of every op (``portable``) and the attention backends (``backends``).

Importing this package registers the ``torch.ops.pqflex`` ops (``kmeans``, ``pq_encode``, ``pq_select``,
``sparse_decode_attention``, ``offload_gather``); ``import pqflex`` alone does not, so that it stays light.
"""

from pqflex.ops import kmeans, offload, pq_encode, pq_select, sparse_attention  # noqa: F401  (registers the ops)
