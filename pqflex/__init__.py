"""pqflex: PQCache retrieval attention for PyTorch 2 and transformers.

Importing pqflex registers the ``"pqcache"`` attention implementation with transformers: at once if transformers'
model code is loaded already, else the moment it is (``from_pretrained(..., attn_implementation="pqcache")`` finds
it either way). The public names load on first use, so ``import pqflex`` itself costs no torch import (the
``pqflex`` command answers ``--help`` at once).
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "retrieval_attention": "pqflex.attention",
    "METHODS": "pqflex.config", "Budget": "pqflex.config", "PQConfig": "pqflex.config",
    "parse_budget": "pqflex.config",
    "PQIndex": "pqflex.index", "Selection": "pqflex.index",
    "attention_backend": "pqflex.ops.backends", "kernel_path": "pqflex.ops.backends",
    "DecodeGraph": "pqflex.integrations.graphs",
    "CACHE_KWARG": "pqflex.integrations.caches", "PQCache": "pqflex.integrations.caches",
    "PQStaticCache": "pqflex.integrations.caches", "configure": "pqflex.integrations.model",
    "get_config": "pqflex.integrations.model", "tp_inference": "pqflex.integrations.tensor_parallel",
    "OffloadedKV": "pqflex.kvstore", "ResidentKV": "pqflex.kvstore",
    "PQCacheState": "pqflex.layer", "PQLayer": "pqflex.layer",
    "ProductQuantizer": "pqflex.quantizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pqflex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


_TRIGGER = "transformers.modeling_utils"  # defines AttentionInterface: registering needs it loaded
_GLUE = "pqflex.integrations.attention"  # registers "pqcache" when imported


class _RegisterWithTransformers:
    """A meta path finder (duck-typed) that imports pqflex's transformers glue right after transformers' model code
    is executed, so ``"pqcache"`` is registered before any model is built. (``_pqflex_lm_eval_hook`` has its own
    finder of the same shape: it runs at every interpreter start-up and may not import pqflex there.)"""

    def find_spec(self, name, path, target=None):
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # the real spec, from the other finders; once
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            importlib.import_module(_GLUE)

        spec.loader.exec_module = exec_and_register
        return spec


if _TRIGGER in sys.modules:
    importlib.import_module(_GLUE)
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
