"""PQ state lives with the cache: interleaved requests, threads, beam search, chunked prefill, the layer runtime."""

import threading
from unittest import mock

import pytest
import torch
from transformers import DynamicCache

import pqflex
from pqflex import PQCache, PQConfig, PQLayer
from pqflex.attention import causal_attention

from tests.helpers import dense_causal
from tests.test_transformers import CACHE_KW, SPARSE, _spy_plan, generate, make, prompt, twins


def _cache(out):
    return out.past_key_values


def runtimes(cache):
    """The layer runtimes of a pqflex cache or of an adopted DynamicCache, by layer index."""
    return [cache.pq_state.layers[i] for i in sorted(cache.pq_state.layers)]


def _steps(model, cache, tokens):
    """Logits of one decode step per token column of ``tokens`` ``[B, T]``, through ``cache``."""
    logits = []
    for t in range(tokens.shape[1]):
        out = model(tokens[:, t:t + 1], use_cache=True, **{CACHE_KW: cache})
        logits.append(out.logits)
        cache = _cache(out)
    return torch.cat(logits, 1)


@torch.no_grad()
def test_interleaved_requests_keep_their_own_state():
    """Two prompts of one length decoded in turns on one model equal each decoded alone."""
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    p1, p2 = prompt(300, seed=1), prompt(300, seed=2)
    t1, t2 = prompt(4, seed=3), prompt(4, seed=4)
    want1 = _steps(pq, _cache(pq(p1, use_cache=True)), t1)
    want2 = _steps(pq, _cache(pq(p2, use_cache=True)), t2)
    c1, c2 = _cache(pq(p1, use_cache=True)), _cache(pq(p2, use_cache=True))
    got1, got2 = [], []
    for t in range(4):  # each cache's first step comes after the other prompt's prefill
        got1.append(_steps(pq, c1, t1[:, t:t + 1]))
        got2.append(_steps(pq, c2, t2[:, t:t + 1]))
    assert torch.equal(torch.cat(got1, 1), want1)
    assert torch.equal(torch.cat(got2, 1), want2)
    assert c1.pq_state.layers[0].index is not c2.pq_state.layers[0].index  # each adopted cache its own state


def test_threads_generating_on_one_model():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    prompts = [prompt(300 + 20 * i, seed=10 + i) for i in range(4)]
    want = [generate(pq, p) for p in prompts]
    got, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(2):
                got[i] = generate(pq, prompts[i])
        except Exception as e:  # reported below, with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        assert torch.equal(got[i], want[i]), f"thread {i}"


@pytest.mark.parametrize("own_cache", [False, True])
@torch.no_grad()
def test_beam_reorder_carries_the_codes(own_cache):
    """A reordered cache decodes as a fresh run of the reordered prompts (whose index is built anew)."""
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    prompts, t1, t2 = prompt(300, batch=3, seed=5), prompt(2, batch=3, seed=6), prompt(3, batch=3, seed=7)
    beams = torch.tensor([2, 0, 0])

    def start(ids):
        cache = PQCache(pq) if own_cache else DynamicCache(config=pq.config)
        pq(ids, use_cache=True, **{CACHE_KW: cache})
        return cache

    cache = start(prompts)
    _steps(pq, cache, t1)
    cache.reorder_cache(beams)
    got = _steps(pq, cache, t2)
    fresh = start(prompts[beams])
    _steps(pq, fresh, t1[beams])
    want = _steps(pq, fresh, t2)
    assert torch.equal(got, want)
    for a, b in zip(runtimes(cache), runtimes(fresh)):
        assert torch.equal(a.index.codes, b.index.codes)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_beam_search_generate(arch):
    pq, dense = twins(arch)
    ids = prompt(300, batch=2, seed=8)
    pqflex.configure(pq, PQConfig(budget=1.0))
    assert torch.equal(generate(pq, ids, num_beams=3), generate(dense, ids, num_beams=3))
    pqflex.configure(pq, SPARSE)
    counts, spy = _spy_plan()
    with spy:
        out = generate(pq, ids, num_beams=3)
    assert counts and all((c == SPARSE.budget).all() for c in counts)  # the beams decoded sparsely
    assert torch.equal(out, generate(pq, ids, num_beams=3, **{CACHE_KW: PQCache(pq)}))


@torch.no_grad()
def test_crop_then_decode_equals_a_run_that_never_went_there():
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids, t = prompt(300, seed=9), prompt(6, seed=10)
    cache = _cache(pq(ids, use_cache=True))
    _steps(pq, cache, t[:, :4])
    cache.crop(-2)  # keep 2 of the 4 decoded tokens
    got = _steps(pq, cache, t[:, 4:])
    fresh = _cache(pq(ids, use_cache=True))
    _steps(pq, fresh, t[:, :2])
    assert torch.equal(got, _steps(pq, fresh, t[:, 4:]))
    with pytest.raises(NotImplementedError, match="inside the indexed prompt of 300"):
        cache.crop(-54)
    assert cache.get_seq_length() == 304


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_equals_one_shot(padded):
    pq = make("llama")
    pqflex.configure(pq, SPARSE.replace(budget=200, sink_size=8))  # min_context=0: any chunk could go sparse
    ids = prompt(2000, batch=2, seed=11)
    kw = {}
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :300] = 0
        kw = dict(attention_mask=mask)
    counts, spy = _spy_plan()
    with spy:
        want = generate(pq, ids, n=8, **kw)
    assert counts and all((c == 200).all() for c in counts[:2])  # one-shot: the decode steps are sparse
    assert torch.equal(generate(pq, ids, n=8, prefill_chunk_size=512, **kw), want)
    assert torch.equal(generate(pq, ids, n=8, prefill_chunk_size=700, **{CACHE_KW: PQCache(pq)}, **kw), want)


def test_layer_runtime_chunked_prefill_and_steps():
    """PQLayer alone: prompt chunks attend densely and index once; steps equal a one-shot prefill's."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, N, D = 2, 4, 2, 400, 16
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (H, Hkv, Hkv))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :50] = False
    cfg = PQConfig(budget=60, sink_size=4, min_context=0, niter=4)
    one, chunked = PQLayer(cfg), PQLayer(cfg)
    out = one.forward(q[:, :, :300], k[:, :, :300], v[:, :, :300], mask[:, :300])
    torch.testing.assert_close(out, causal_attention(q[:, :, :300], k[:, :, :300], v[:, :, :300], mask[:, :300],
                                                     D ** -0.5))
    for lo, hi in ((0, 120), (120, 250), (250, 300)):
        part = chunked.forward(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, :hi])
        want = dense_causal(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, :hi], D ** -0.5)
        torch.testing.assert_close(part[1, :, max(0, 50 - lo):], want[1, :, max(0, 50 - lo):])
        torch.testing.assert_close(part[0], want[0])
    assert chunked.index is None and chunked.prompt_tokens == 300  # a growing cache indexes at the first step
    for n in range(301, 306):
        a = one.forward(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], mask[:, :n])
        b = chunked.forward(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n], mask[:, :n])
        assert torch.equal(a, b)
    assert chunked.decoding and torch.equal(chunked.index.codes, one.index.codes)
    with pytest.raises(RuntimeError, match="reset\\(\\) before a new prompt"):
        chunked.prefill(k[:, :, :10], v[:, :, :10])
    chunked.reset()
    assert chunked.index is None and not chunked.decoding


def test_layer_runtime_detects_a_cache_changed_behind_its_back():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 300, 8, generator=g), torch.randn(1, 1, 300, 8, generator=g), \
        torch.randn(1, 1, 300, 8, generator=g)
    layer = PQLayer(PQConfig(budget=40, sink_size=4, min_context=0, niter=2))
    layer.forward(q[:, :, :200], k[:, :, :200], v[:, :, :200])
    layer.forward(q[:, :, 200:201], k[:, :, :201], v[:, :, :201])
    with pytest.raises(RuntimeError, match="changed outside pqflex"):
        layer.forward(q[:, :, 250:251], k[:, :, :251], v[:, :, :251])


@pytest.mark.parametrize("static", [False, True])
def test_all_layers_indexed_by_one_batched_build(static):
    """The prompt of every layer is indexed by one build_layers call, equal to per-layer builds."""
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids = prompt(300, seed=12)
    calls = []
    original = pqflex.PQIndex.build_layers.__func__

    def spy(cls, keys, *args, **kwargs):
        calls.append(len(keys))
        return original(cls, keys, *args, **kwargs)

    cache = pqflex.PQStaticCache(pq, 320) if static else PQCache(pq)
    with mock.patch.object(pqflex.PQIndex, "build_layers", classmethod(spy)):
        generate(pq, ids, n=4, **{CACHE_KW: cache}, disable_compile=True)
    assert calls == [2]  # one call for the model's 2 layers
    for layer in cache.pq_layers:
        alone = pqflex.PQIndex.build(_prompt_keys(cache, layer), SPARSE)
        assert torch.equal(layer.index.quantizer.centroids, alone.quantizer.centroids)


def _prompt_keys(cache, layer):
    i = next(i for i, runtime in cache.pq_state.layers.items() if runtime is layer)
    return cache.layers[i].keys[:, :, :layer.prompt_tokens]


@pytest.mark.gpu
def test_cuda_static_cache_builds_beside_the_prefill_and_equals_one_build(monkeypatch):
    """On CUDA a fixed-capacity cache indexes its layers in groups on a side stream during the prefill: the same
    indexes and tokens as one build after it (and as a growing cache's build at the first step)."""
    from pqflex import layer as pq_layer

    pq = make("llama").cuda()
    pqflex.configure(pq, SPARSE)
    ids = prompt(300, seed=13).cuda()
    runs = {}
    for groups in (1, 4):
        monkeypatch.setattr(pq_layer, "OVERLAP_GROUPS", groups)
        calls = []
        original = pqflex.PQIndex.build_layers.__func__

        def spy(cls, keys, *args, **kwargs):
            calls.append((len(keys), torch.cuda.current_stream() != torch.cuda.default_stream()))
            return original(cls, keys, *args, **kwargs)

        cache = pqflex.PQStaticCache(pq, 320)
        with mock.patch.object(pqflex.PQIndex, "build_layers", classmethod(spy)):
            out = generate(pq, ids, n=6, **{CACHE_KW: cache}, disable_compile=True)
        assert calls == ([(2, True)] if groups == 1 else [(1, True), (1, True)])  # side stream
        runs[groups] = out, [layer.index.quantizer.centroids for layer in cache.pq_layers]
    assert torch.equal(runs[1][0], runs[4][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[4][1]))
    assert torch.equal(generate(pq, ids, n=6, **{CACHE_KW: PQCache(pq)}), runs[4][0])
