"""Tensor parallelism: the degree pqcache can serve, and :func:`tp_inference` (a TP model's linear layers on their
local shards while decoding)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def check_tensor_parallel(model: nn.Module) -> int:
    """The model's tensor-parallel degree (1 without TP); raise ``NotImplementedError`` unless it divides the KV
    heads: each rank runs pqcache over its own KV heads, and a head split across ranks has no PQ index of its own."""
    tp = getattr(model, "tp_size", None) or 1
    if tp > 1:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if kv % tp:
            allowed = [d for d in range(1, kv + 1) if kv % d == 0]
            raise NotImplementedError(
                f"tensor parallelism over tp_size={tp} ranks splits the {kv} KV head(s) of {type(model).__name__} "
                f"inside a head; pqcache runs each rank over whole KV heads: use tp_size in {allowed}"
            )
    return tp


@contextlib.contextmanager
def tp_inference(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, each ``nn.Linear`` that transformers' tensor parallelism sharded computes from this rank's
    local shard held as a plain tensor, not a DTensor; the DTensors are put back when the block ends.

    With grad disabled transformers' TP forward of a ``Linear`` already runs on the local shards (it unwraps the
    DTensor weights at every call), so the tokens are the same. What changes is a compiled decode step: each DTensor
    weight is a graph input whose guards (placements, device mesh) Dynamo checks in Python, and which the compiled
    wrapper unwraps, at every step, before the step's CUDA graph is launched: host time a token while the GPU waits
    (BENCHMARKS.md, "Tensor parallelism").

    For inference only: calling the model with grad enabled inside the block raises (``generate()`` runs without
    grad). A model without tensor parallelism passes through unchanged. Yields the model.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed: nothing can be sharded
        yield model
        return
    swapped = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for name, param in module._parameters.items():
                if isinstance(param, DTensor):
                    swapped.append((module, name, param))
    for module, name, param in swapped:
        module._parameters[name] = nn.Parameter(param.to_local(), requires_grad=False)  # the same storage
    handle = model.register_forward_pre_hook(_no_grad_only) if swapped else None
    try:
        yield model
    finally:
        if handle is not None:
            handle.remove()
        for module, name, param in swapped:
            module._parameters[name] = param


def _no_grad_only(module: nn.Module, args: tuple) -> None:
    if torch.is_grad_enabled():
        raise RuntimeError(f"{type(module).__name__} runs inside pqflex.tp_inference(), which serves inference only: "
                           "call it under torch.no_grad() or torch.inference_mode() (generate() does), or outside "
                           "the block")
