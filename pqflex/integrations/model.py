"""What pqflex needs of a transformers model: its attention layers, the checks that pqcache can serve them, and
:func:`configure` / :func:`get_config` (the PQ settings set on the attention modules, not state)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.cache_utils import Cache

from pqflex.config import PQConfig
from pqflex.integrations.tensor_parallel import check_tensor_parallel

ATTN_IMPLEMENTATION = "pqcache"
CONFIG_ATTR = "_pqflex_config"  # PQConfig set by configure() on attention modules (settings, not state)
_HOOK_ATTR = "_pqflex_hook"  # the handle of the module's forward pre-hook (see pass_cache)
CACHE_ARG = "pqflex_cache"  # the attention keyword that carries the forward's cache

# Keyword arguments that ask the attention function for something pqflex does not implement.
UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")
_UNSUPPORTED_CONFIG = {
    "is_encoder_decoder": "encoder-decoder models",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "attn_logit_softcapping": "attention logit soft-capping",
    "alibi": "ALiBi position bias (added to the attention mask)",
}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and hasattr(m, "num_key_value_groups")]
    if not modules:
        raise NotImplementedError(
            f"{type(model).__name__} has no transformers attention layers (modules with layer_idx and "
            "num_key_value_groups); pqcache supports decoder models with standard (GQA) attention"
        )
    return modules


CHECKED_ATTR = "_pqflex_checked"  # set once a module's class and config passed check_supported


def check_supported(module: nn.Module) -> None:
    """Raise ``NotImplementedError`` naming the class if pqcache cannot serve this attention layer correctly (its
    class and config; checked once per module until :func:`configure` runs again)."""
    name = type(module).__name__
    if getattr(module, CHECKED_ATTR, False):
        return
    config = getattr(module, "config", None)
    for attr, what in _UNSUPPORTED_CONFIG.items():
        if getattr(config, attr, None):
            raise NotImplementedError(f"pqcache does not support {what} ({name}, config.{attr})")
    if getattr(module, "is_causal", True) is False:
        raise NotImplementedError(f"pqcache supports causal self-attention only; {name} is not causal")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            f"pqcache supports full-attention layers only; {name} has layer types {sorted(set(layer_types))}"
        )
    # Without layer types (Mistral), a configured window means every layer slides.
    window = getattr(config, "sliding_window", None)
    if layer_types is None and window is not None:
        raise NotImplementedError(f"pqcache does not support attention with sliding_window={window!r} ({name})")
    setattr(module, CHECKED_ATTR, True)


def configure(model: nn.Module, config: PQConfig | None = None) -> nn.Module:
    """Make ``model`` use pqcache attention with ``config`` (default: ``PQConfig()``); returns the model.

    Checks that the model and the config are supported, switches its attention implementation to ``"pqcache"``
    if it uses another one and sets the config on every attention layer (caches created afterwards use it).
    """
    config = PQConfig() if config is None else config
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    modules = attention_modules(model)
    for module in modules:
        setattr(module, CHECKED_ATTR, False)  # the config may have changed since the last check
        check_supported(module)
    check_config(config, modules)
    check_tensor_parallel(model)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for module in modules:
        setattr(module, CONFIG_ATTR, config)
        install_hook(module)
    return model


def get_config(model: nn.Module) -> PQConfig:
    """The :class:`PQConfig` the model's attention layers use."""
    return getattr(attention_modules(model)[0], CONFIG_ATTR, None) or PQConfig()


def check_config(config: PQConfig, modules: list[nn.Module]) -> None:
    """Raise ``ValueError`` unless ``config`` fits the model's attention layers (``M`` divides the head dim)."""
    if not isinstance(config, PQConfig):
        raise TypeError(f"config must be a pqflex.PQConfig, got {type(config).__name__}")
    for module in modules:
        head_dim = getattr(module, "head_dim", None)
        if isinstance(head_dim, int) and head_dim % config.M:
            raise ValueError(f"PQConfig.M={config.M} does not divide the head dim {head_dim} of "
                             f"{type(module).__name__}; allowed: a divisor of {head_dim}")


def pass_cache(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an attention module: hand this forward's cache to the attention function."""
    if getattr(module.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        return None
    # Found by type, not by name: `cache` (transformers >= 5.24), `past_key_values` before, `layer_past` (Falcon).
    cache = next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)
    return args, {**kwargs, CACHE_ARG: cache}


def install_hook(module: nn.Module) -> None:
    if getattr(module, _HOOK_ATTR, None) is None:
        setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(pass_cache, with_kwargs=True))
