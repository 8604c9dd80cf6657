"""pqflex: PQCache retrieval attention for PyTorch 2 and transformers."""

from pqflex.attention import retrieval_attention
from pqflex.config import Budget, PQConfig
from pqflex.index import PQIndex
from pqflex.quantizer import ProductQuantizer

__all__ = ["Budget", "PQConfig", "PQIndex", "ProductQuantizer", "retrieval_attention"]
__version__ = "0.1.0"
