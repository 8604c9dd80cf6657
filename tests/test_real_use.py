"""Real use never breaks (issue #25): repeated generate() calls on one model, speculative decoding, edge prompts,
numerical faults and the cache operations' atomicity."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

import pqflex
from pqflex import PQCache, PQConfig, PQStaticCache

from tests.helpers import decode
from tests.test_transformers import CACHE_KW, SPARSE, generate, make, prompt, twins

# Three prompt lengths, two batch sizes, two budgets (a ratio: its top-k width changes with the length; a token
# count), all sparse (above min_context).
LENGTHS = (300, 520, 760)
BATCHES = (1, 2)
BUDGETS = (PQConfig(budget=0.1, sink_size=4, min_context=256, niter=4),
           PQConfig(budget=48, sink_size=4, min_context=256, niter=4))
# What one model compiles over all of them (measured: 3 on the CPU and on an H200): the first graph has static
# shapes; the next prompt length makes Dynamo mark the changed sizes dynamic (capacity, top-k width, recent
# window), the next batch size the batch. README.md states it.
MAX_GRAPHS = 3


def _compile_config(device):
    if device == "cuda":
        return None  # generate()'s own default: inductor, CUDA graphs ("reduce-overhead"), dynamic=None
    config = CompileConfig(backend="eager", mode=None)  # Dynamo's tracing and guards, without code generation
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def _run(model, device, cfg, batch, n):
    """The three ways to generate after configure(): a PQStaticCache (compiled), a PQCache and plain generate()."""
    pqflex.configure(model, cfg)
    ids = prompt(n, batch=batch, seed=n + batch).to(device)
    kw = dict(compile_config=_compile_config(device)) if device != "cuda" else {}
    static = generate(model, ids, n=6, **{CACHE_KW: PQStaticCache(model, n + 6)}, **kw)
    return static, generate(model, ids, n=6, **{CACHE_KW: PQCache(model)}), generate(model, ids, n=6)


def repeated_use(device):
    cases = [(cfg, b, n) for cfg in BUDGETS for b in BATCHES for n in LENGTHS]
    torch._dynamo.reset()
    counters.clear()
    model = make("llama").to(device)
    used = {case: _run(model, device, *case) for case in cases}
    graphs = counters["stats"]["unique_graphs"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    for case in cases:  # each equals a fresh model's (new weights object, new compilation)
        torch._dynamo.reset()
        fresh = _run(make("llama").to(device), device, *case)
        for kind, got, want in zip(("PQStaticCache", "PQCache", "plain"), used[case], fresh):
            assert torch.equal(got, want), f"{kind}, budget {case[0].budget}, batch {case[1]}, length {case[2]}"
    torch._dynamo.reset()
    assert 2 <= graphs <= MAX_GRAPHS, graphs


def test_repeated_generate_at_many_lengths_batches_and_budgets():
    repeated_use("cpu")


@pytest.mark.gpu
def test_cuda_repeated_generate_at_many_lengths_batches_and_budgets():
    """On CUDA, generate() compiles the static cache's step itself (inductor, CUDA graphs): before the fix the
    second prompt length failed in Dynamo (the top-k width became symbolic)."""
    repeated_use("cuda")


def _faulty_step(fault, backend, dtype, device="cpu"):
    """One decode step of a sparse index over inputs with a numerical fault, and SDPA's output over the same.

    ``fault``: ``"query"`` (a NaN in one query head), ``"sink"`` (a NaN in a sink key of KV head 0) or
    ``"selected"`` (an inf in a key that the step selects for KV head 1). Returns ``(out, dense)`` ``[B, H, 1, D]``.
    """
    from tests.helpers import dense_causal

    g = torch.Generator().manual_seed(4)
    B, H, Hkv, N, D = 1, 4, 2, 600, 16
    q = torch.randn(B, H, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    cfg = PQConfig(budget=60, sink_size=4, min_context=0, niter=2, backend=backend)
    q, k, v = (t.to(device, dtype) for t in (q, k, v))
    index = pqflex.PQIndex.build(k[:, :, :N - 1], cfg)  # the prompt, clean; the step encodes key N - 1
    if fault == "query":
        q[0, 1, 0, 3] = float("nan")
    elif fault == "sink":
        k[0, 0, 2, 5] = float("nan")
    else:
        probe = pqflex.PQIndex.build(k[:, :, :N - 1], cfg)  # the same index: which tokens the step selects
        probe.append(k[:, :, N - 1:])
        chosen = int(probe.topk_tokens(q, N, D ** -0.5)[0, 1, 0])
        assert 4 <= chosen < N - 30  # a middle token
        k[0, 1, chosen] = float("inf")
    index.append(k[:, :, N - 1:])
    out = decode(index, q, k, v, N, D ** -0.5)
    return out, dense_causal(q, k, v, scale=D ** -0.5)


@pytest.mark.parametrize("fault", ["query", "sink", "selected"])
@pytest.mark.parametrize("backend,dtype", [("fused", torch.float32), ("fused", torch.bfloat16),
                                           ("gather", torch.float32), ("flex", torch.float32)])
def test_a_numerical_fault_gives_nan_as_sdpa_does(fault, backend, dtype):
    """NaN or inf inputs give NaN in exactly the query heads where SDPA gives NaN, never a finite-looking 0.0."""
    out, dense = _faulty_step(fault, backend, dtype)
    assert torch.isnan(dense).any()
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(dense).any(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("fault", ["query", "sink", "selected"])
@pytest.mark.parametrize("backend", ["fused", "gather", "flex"])
def test_cuda_numerical_fault_gives_nan_as_sdpa_does(fault, backend):
    out, dense = _faulty_step(fault, backend, torch.bfloat16, "cuda")
    assert torch.isnan(dense).any()
    assert torch.equal(torch.isnan(out).any(-1), torch.isnan(dense).any(-1))


def _spy_attended():
    """Counts the tokens each query attends per sequence and KV head, on both decode paths: one-token steps (the
    token list) and multi-token steps such as a speculative verification (the planned mask)."""
    from unittest import mock

    from pqflex import index as pq_index
    from pqflex import kvstore

    counts = []
    plan, masked = pq_index.PQIndex.plan, kvstore.masked_attention

    def spy_plan(self, *args, **kwargs):
        selection = plan(self, *args, **kwargs)
        if selection.middle is not None:  # a token list (a mask is counted where it is attended)
            counts.append(selection.token_list()[1].sum(-1).flatten())
        return selection

    def spy_masked(query, key, value, attend, scale):
        counts.append(attend.sum(-1).flatten())
        return masked(query, key, value, attend, scale)

    return counts, (mock.patch.object(pq_index.PQIndex, "plan", spy_plan),
                    mock.patch.object(kvstore, "masked_attention", spy_masked))


@pytest.mark.parametrize("how", ["prompt_lookup", "assistant"])
def test_speculative_decoding(how):
    """Assisted and prompt-lookup decoding verify several tokens per forward and crop the rejected ones (transformers
    >= 5.24: crop(0) when none is rejected). Full budget: SDPA's tokens. Sparse: every verification query attends
    exactly the budget, so the forwards after the first crop are decode steps, not prompt chunks."""
    pq, dense = twins("llama")
    ids = prompt(300)
    ids[0, 150:160] = ids[0, 290:300]  # something for prompt lookup to find
    kw = (dict(prompt_lookup_num_tokens=4) if how == "prompt_lookup"
          else dict(assistant_model=make("llama", "sdpa", seed=3)))
    pqflex.configure(pq, PQConfig(budget=1.0))
    assert torch.equal(generate(pq, ids, **kw), generate(dense, ids, **kw))
    pqflex.configure(pq, SPARSE)
    counts, patches = _spy_attended()
    with patches[0], patches[1]:
        out = generate(pq, ids, **kw)
        cache = PQCache(pq)
        assert torch.equal(generate(pq, ids, **kw, **{CACHE_KW: cache}), out)
    assert counts and all((c == SPARSE.budget).all() for c in counts), [c.tolist() for c in counts]
    assert all(layer.index.codes.shape[2] == cache.get_seq_length() for layer in cache.pq_layers)


def _state(cache):
    """What a cache operation may change: per layer the keys, values and PQ codes, and each runtime's counters."""
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    pq = [(r.prompt_tokens, r.decoding, None if r.index is None else r.index.codes.clone()) for r in cache.pq_layers]
    return layers, pq


def _same(a, b):
    for (k1, v1), (k2, v2) in zip(a[0], b[0]):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    for (n1, d1, c1), (n2, d2, c2) in zip(a[1], b[1]):
        assert n1 == n2 and d1 == d2 and (c1 is None) == (c2 is None) and (c1 is None or torch.equal(c1, c2))


@torch.no_grad()
def test_crop_follows_transformers_and_is_atomic():
    from tests.test_cache_state import _steps
    from tests.test_transformers import pq_tf

    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids, t = prompt(300, seed=9), prompt(6, seed=10)
    cache = PQCache(pq)
    pq(ids, use_cache=True, **{CACHE_KW: cache})
    _steps(pq, cache, t[:, :4])
    before = _state(cache)
    cache.crop(0)  # nothing to remove (it raised "cannot crop to 0 tokens")
    _same(_state(cache), before)
    with pytest.raises(NotImplementedError, match="inside the indexed prompt of 300"):
        cache.crop(-5)
    _same(_state(cache), before)
    if pq_tf.CACHE_KWARG == "cache":  # transformers >= 5.24 refuses a positive value: refused before any change
        with pytest.raises(ValueError, match="positive value"):
            cache.crop(302)
        _same(_state(cache), before)
    else:  # before 5.24 a positive value is the length to keep
        cache.crop(302)
        assert cache.get_seq_length() == 302 and all(r.index.codes.shape[2] == 302 for r in cache.pq_layers)
        cache.crop(0)
    with pytest.raises(ValueError, match="crop takes an int"):
        cache.crop(-1.0)
    length = cache.get_seq_length()
    cache.crop(torch.tensor(-1))  # transformers 5.17's assisted decoding passes a 0-d tensor
    assert cache.get_seq_length() == length - 1
    assert all(r.index.codes.shape[2] == length - 1 for r in cache.pq_layers)


@torch.no_grad()
def test_refused_reorders_change_nothing():
    from tests.test_cache_state import _steps

    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    cache = PQCache(pq)
    pq(prompt(300, batch=2), use_cache=True, **{CACHE_KW: cache})
    _steps(pq, cache, prompt(2, batch=2))
    before = _state(cache)
    for bad, error in ((torch.tensor([0, 2]), IndexError), (torch.tensor([0.0, 1.0]), ValueError)):
        for op in (cache.reorder_cache, cache.batch_select_indices):
            with pytest.raises(error, match="sequence indices"):
                op(bad)
            _same(_state(cache), before)
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        cache.batch_repeat_interleave(0)
    offload = PQStaticCache(pq, 320, SPARSE.replace(offload=True))
    pq(prompt(300, batch=2), use_cache=True, **{CACHE_KW: offload})
    counted = [int(layer.cumulative_length) for layer in offload.layers]
    for op in (lambda: offload.reorder_cache(torch.tensor([1, 0])), lambda: offload.batch_repeat_interleave(2)):
        with pytest.raises(NotImplementedError, match="not supported with PQConfig\\(offload=True\\)"):
            op()
        assert [int(layer.cumulative_length) for layer in offload.layers] == counted


@pytest.mark.parametrize("offload", [False, True])
def test_one_token_prompt_and_a_prompt_longer_than_the_cache(offload):
    pq, dense = twins("llama")
    cfg = SPARSE.replace(offload=offload)
    pqflex.configure(pq, cfg)
    one = prompt(1)
    want = generate(dense, one)
    assert torch.equal(generate(pq, one, **{CACHE_KW: PQStaticCache(pq, 20)}, disable_compile=True), want)
    if not offload:  # offload needs a fixed-capacity cache
        assert torch.equal(generate(pq, one, **{CACHE_KW: PQCache(pq)}), want)
        assert torch.equal(generate(pq, one), want)
    with pytest.raises(ValueError, match="holds 128 tokens per sequence: a prompt of 200 does not fit"):
        generate(pq, prompt(200), **{CACHE_KW: PQStaticCache(pq, 100)}, disable_compile=True)


def test_speculative_decoding_with_a_static_cache_says_what_to_use():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    with pytest.raises(NotImplementedError, match="for assisted or prompt-lookup decoding pass a pqflex.PQCache"):
        generate(pq, prompt(300), assistant_model=make("llama", "sdpa", seed=3),
                 **{CACHE_KW: PQStaticCache(pq, 320)}, disable_compile=True)
