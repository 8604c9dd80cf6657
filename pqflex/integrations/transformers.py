"""transformers glue, one import: the ``"pqcache"`` attention implementation (:mod:`.attention`, registered when
imported), the caches (:mod:`.caches`), the model checks and :func:`configure` (:mod:`.model`) and tensor
parallelism (:mod:`.tensor_parallel`)."""

from pqflex.integrations.attention import pqcache_attention_forward, pqcache_mask  # noqa: F401  (registers)
from pqflex.integrations.caches import CACHE_KWARG, PQCache, PQDynamicLayer, PQStaticCache, adopt  # noqa: F401
from pqflex.integrations.model import ATTN_IMPLEMENTATION, check_supported, configure, get_config  # noqa: F401
from pqflex.integrations.tensor_parallel import check_tensor_parallel, tp_inference  # noqa: F401
