"""pqflex: PQCache retrieval attention for PyTorch 2 and transformers.

Importing pqflex registers the ``"pqcache"`` attention implementation with transformers.
"""

from pqflex.attention import retrieval_attention
from pqflex.config import METHODS, Budget, PQConfig
from pqflex.index import PQIndex
from pqflex.integrations.graphs import DecodeGraph
from pqflex.integrations.transformers import (CACHE_KWARG, PQCache, PQStaticCache, configure, get_config,
                                              tp_inference)
from pqflex.kvstore import OffloadedKV
from pqflex.layer import PQCacheState, PQLayer
from pqflex.quantizer import ProductQuantizer

__all__ = ["CACHE_KWARG", "METHODS", "Budget", "DecodeGraph", "OffloadedKV", "PQCache", "PQCacheState", "PQConfig",
           "PQIndex", "PQLayer", "PQStaticCache", "ProductQuantizer", "configure", "get_config", "retrieval_attention",
           "tp_inference"]
__version__ = "0.1.0"
