"""lm-eval glue: ``lm_eval --model hf --model_args pretrained=PATH,attn_implementation=pqcache,pq_budget=0.1``.

Loaded inside lm-eval's process by the start-up hook ``_pqflex_lm_eval_hook`` (installed with pqflex as a ``.pth``
file) when lm-eval imports its Hugging Face model class: importing pqflex registers ``"pqcache"`` with
transformers, and :func:`patch` lets ``HFLM`` take pqflex's settings from ``--model_args``:

- ``pq_method``: ``pqcache`` (default), ``full``, ``streaming`` or ``oracle`` (see :meth:`PQConfig.for_method`);
- ``pq_<field>`` for any :class:`pqflex.PQConfig` field: ``pq_budget=0.1`` (or ``pq_budget=2048`` tokens),
  ``pq_M=2``, ``pq_nbits=6``, ``pq_sink_size=32``, ``pq_recent_ratio=0.5``, ``pq_min_context=1024``, ...

The settings are popped before the model is loaded (transformers would reject them) and applied with
:func:`pqflex.configure` after. ``pq_*`` settings without ``attn_implementation=pqcache`` raise ``ValueError``.
pqcache changes decoding only: loglikelihood requests run one dense forward, exactly like full attention, so
compare methods on ``generate_until`` tasks.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

from torch import nn

from pqflex.config import PQConfig
from pqflex.integrations.model import ATTN_IMPLEMENTATION, configure

PREFIX = "pq_"
_PATCHED = "_pqflex_patched"
logger = logging.getLogger("pqflex")


def pop_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the ``pq_*`` entries of lm-eval's model arguments; returns them without the prefix."""
    return {key[len(PREFIX):]: kwargs.pop(key) for key in list(kwargs) if key.startswith(PREFIX)}


def apply(model: nn.Module, settings: dict[str, Any]) -> PQConfig | None:
    """Configure a model loaded by lm-eval; returns the :class:`PQConfig`, or None if it does not use pqcache."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        if settings:
            raise ValueError(f"model_args {sorted(PREFIX + k for k in settings)} need "
                             f"attn_implementation={ATTN_IMPLEMENTATION}")
        return None
    settings = dict(settings)
    config = PQConfig.for_method(settings.pop("method", "pqcache"), **settings)
    configure(model, config)
    logger.warning("pqflex: %s attention with %s", ATTN_IMPLEMENTATION, config)
    return config


def patch(module: ModuleType) -> None:
    """Let ``module.HFLM`` (``lm_eval.models.huggingface``) take ``pq_*`` model arguments; idempotent."""
    hflm = module.HFLM
    if getattr(hflm._create_model, _PATCHED, False):
        return
    original = hflm._create_model

    @functools.wraps(original)
    def _create_model(self, *args: Any, **kwargs: Any) -> None:
        settings = pop_settings(kwargs)
        original(self, *args, **kwargs)
        apply(self._model, settings)

    setattr(_create_model, _PATCHED, True)
    hflm._create_model = _create_model
