"""Math on tensors: a plain-torch reference for every op (``reference``); fast kernels register beside it.

Importing this package registers the ``torch.ops.pqflex`` ops (``kmeans``, ``pq_encode``, ``pq_select``,
``sparse_decode_attention``, ``offload_gather``); ``import pqflex`` alone does not, so that it stays light.
"""

from pqflex.ops import kmeans, offload, pq_encode, pq_select, sparse_attention  # noqa: F401  (registers the ops)
