"""pqflex: PQCache retrieval attention for PyTorch 2 and transformers.

Importing pqflex registers the ``"pqcache"`` attention implementation with transformers.
"""

from pqflex.attention import retrieval_attention
from pqflex.config import Budget, PQConfig
from pqflex.index import PQIndex
from pqflex.integrations.transformers import PQCache, PQStaticCache, configure, get_config
from pqflex.quantizer import ProductQuantizer

__all__ = ["Budget", "PQCache", "PQConfig", "PQStaticCache", "PQIndex", "ProductQuantizer", "configure", "get_config",
           "retrieval_attention"]
__version__ = "0.1.0"
