"""PQStaticCache: fixed-capacity decoding that compiles once (no graph break, no recompilation across steps)."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import pqflex
from pqflex import PQStaticCache

from tests.test_transformers import CACHE_KW, SPARSE, generate, make, prompt


def compile_config(backend):
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield counters
    torch._dynamo.reset()


def padded_prompt():
    ids = prompt(300, batch=2)
    mask = torch.ones_like(ids)
    ids[1, :23], mask[1, :23] = 0, 0  # left padding
    return ids, dict(attention_mask=mask)


def test_static_cache_matches_growing_cache_eager():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids, mask = padded_prompt()
    want = generate(pq, ids, **mask, **{CACHE_KW: pqflex.PQCache(pq)})
    cache = PQStaticCache(pq, 320)
    got = generate(pq, ids, **mask, **{CACHE_KW: cache}, disable_compile=True)
    assert torch.equal(got, want)
    assert all(s.index.num_tokens == 384 for s in cache.pq_layers)  # capacity rounded up to 128
    cache.reset()  # the cache serves a new batch after a reset
    again = generate(pq, ids, **mask, **{CACHE_KW: cache}, disable_compile=True)
    assert torch.equal(again, want)


@pytest.mark.parametrize("selection,backend", [("token", "gather"), ("block", "gather"), ("token", "fused")])
def test_compiled_decode_has_one_graph_and_never_recompiles(no_recompile, selection, backend):
    """generate() compiles the decode step with fullgraph=True: one graph for all steps and for a second run."""
    pq = make("llama")
    pqflex.configure(pq, SPARSE.replace(selection=selection, block_size=8, backend=backend))
    ids, mask = padded_prompt()
    want = generate(pq, ids, **mask, **{CACHE_KW: pqflex.PQCache(pq)})
    cache = PQStaticCache(pq, 320)
    got = generate(pq, ids, **mask, **{CACHE_KW: cache}, compile_config=compile_config("eager"))
    assert no_recompile["stats"]["unique_graphs"] == 1 and not no_recompile["graph_break"]
    assert torch.equal(got, want)
    cache.reset()
    assert torch.equal(generate(pq, ids, **mask, **{CACHE_KW: cache}, compile_config=compile_config("eager")), want)
    assert no_recompile["stats"]["unique_graphs"] == 1


def test_inductor_compiled_decode_matches_eager(no_recompile):
    pq = make("qwen2")
    pqflex.configure(pq, SPARSE)
    ids = prompt(300)
    want = generate(pq, ids, n=6, **{CACHE_KW: pqflex.PQCache(pq)})
    got = generate(pq, ids, n=6, **{CACHE_KW: PQStaticCache(pq, 310)}, compile_config=compile_config("inductor"))
    assert torch.equal(got, want)
    assert no_recompile["stats"]["unique_graphs"] == 1


def test_static_cache_errors():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    with pytest.raises(ValueError, match="max_cache_len must be an int >= 1"):
        PQStaticCache(pq, 0)
    with pytest.raises(TypeError, match="config must be a pqflex.PQConfig"):
        PQStaticCache(pq, 100, config={"budget": 0.1})
    cache = PQStaticCache(pq, 400)
    ids = prompt(300)
    with torch.no_grad():
        pq(ids, **{CACHE_KW: cache})
        pq(ids[:, :1], **{CACHE_KW: cache})  # decoding starts
        with pytest.raises(NotImplementedError, match="decodes one token per forward, got 2"):
            pq(ids[:, :2], **{CACHE_KW: cache})
    cache.reset()
    with torch.no_grad():  # a prompt in two chunks
        pq(ids[:, :100], **{CACHE_KW: cache})
        pq(ids[:, 100:200], **{CACHE_KW: cache})
    assert all(layer.prompt_tokens == 200 and layer.index.num_tokens == 512 for layer in cache.pq_layers)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fused", "gather", "flex"])
def test_cuda_generate_compiles_with_cuda_graphs(backend):
    """On CUDA, generate() auto-compiles (reduce-overhead: CUDA graphs) and gives the eager tokens."""
    pq = make("qwen3").cuda()  # head dim 16: FlexAttention's smallest
    cfg = SPARSE.replace(backend=backend)
    pqflex.configure(pq, cfg)
    ids = prompt(300, batch=2).cuda()
    want = generate(pq, ids, n=16, **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    got = generate(pq, ids, n=16, **{CACHE_KW: PQStaticCache(pq, 320)})
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert (got == want).float().mean() >= 0.9  # compiled kernels may round differently
    torch._dynamo.reset()
