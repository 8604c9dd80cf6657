"""PQConfig(refresh=N): every N decoded tokens each layer's index is retrained on the keys cached so far and every key
encoded again (issue #29, item 4), on every decode route: eager growing and fixed-capacity caches, DecodeGraph,
PQStaticCache(graph=True)."""

import pytest
import torch

import pqflex
from pqflex import DecodeGraph, PQCache, PQConfig, PQIndex, PQStaticCache
from pqflex.index import middle_tokens, training_sample
from pqflex.quantizer import ProductQuantizer

from tests.helpers import clustered_keys
from tests.test_transformers import CACHE_KW, SPARSE, generate, make, prompt

CFG = PQConfig(budget=64, sink_size=4, min_context=0, niter=6, M=4, nbits=4, refresh=8)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles the model's forward anew: earlier tests' compilations of the same code object must not
    count against Dynamo's recompile limit (a fullgraph compile fails when it is hit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def shifted_keys(B=2, Hkv=2, prompt_len=600, new=300, D=32, seed=0):
    """Prompt keys from one mixture, then generated keys from another (far from the prompt's centroids)."""
    g = torch.Generator().manual_seed(seed)
    first = clustered_keys(B, Hkv, prompt_len, D, generator=g)
    later = clustered_keys(B, Hkv, new, D, generator=g) + 3.0
    return torch.cat([first, later], dim=2)


def test_refresh_retrains_from_the_current_centroids_and_encodes_every_key_in_place():
    key = shifted_keys()
    n0, n = 600, 900
    index = PQIndex.build(key[:, :, :n0], CFG, capacity=1024)
    for p in range(n0, n):
        index.append(key[:, :, p:p + 1], p)
    centroids, codes = index.quantizer.centroids, index.codes
    before = centroids.clone()
    index.refresh(key, n)
    assert index.quantizer.centroids is centroids and index.codes is codes  # the buffers a graph reads
    # What it must equal, written out: the build's sample over [0, n), k-means from the old centroids, encode.
    order, mask = training_sample(middle_tokens(index.start, index.sink, index.recent, n),
                                  CFG.train_points * CFG.ksub)
    sample = key[:, :, :n].gather(2, order[:, None, :, None].expand(2, 2, order.shape[-1], 32))
    want = ProductQuantizer(32, CFG.M, CFG.nbits).train(sample, mask[:, None].expand(2, 2, -1),
                                                        niter=CFG.refresh_niter, init=before)
    torch.testing.assert_close(centroids, want.centroids)
    assert torch.equal(codes[:, :, :n], want.encode(key[:, :, :n]))
    assert not torch.equal(centroids, before)


def test_refresh_fits_the_generated_keys_and_finds_their_top_k():
    """Generated keys far from the prompt's centroids: after a refresh their reconstruction error falls, and queries
    that point at some of them get more of their exact top-k (16 queries)."""
    key = shifted_keys()
    n0, n = 600, 900
    index = PQIndex.build(key[:, :, :n0], CFG.replace(M=8, nbits=6))
    index.append(key[:, :, n0:n])
    pq = index.quantizer

    def gen_error():
        return (pq.decode(index.codes[:, :, n0:n]) - key[:, :, n0:n]).pow(2).mean().item()

    def recall():
        found = 0.0
        for r in range(16):
            g = torch.Generator().manual_seed(r)
            query = 2 * key[:, :, n0 + 17 * r].repeat_interleave(2, 1)[:, :, None] + 0.3 * torch.randn(
                2, 4, 1, 32, generator=g)  # [B, H=4, 1, D] near a generated key
            got = index.topk_tokens(query, n, 32 ** -0.5)
            exact = torch.einsum("bhgd,bhnd->bhgn", query.reshape(2, 2, 2, 32), key[:, :, :n]) * 32 ** -0.5
            lo, hi = pqflex.ops.portable.candidate_range(index.spans, n, n)
            want = pqflex.ops.portable.select_from_scores(exact, lo, hi, index.topk, index.k_max)
            found += sum(len(set(a.tolist()) & set(b.tolist()))
                         for a, b in zip(got.flatten(0, 1), want.flatten(0, 1))) / want.numel()
        return found / 16

    err_before, recall_before = gen_error(), recall()
    index.refresh(key, n)
    assert gen_error() < 0.7 * err_before
    assert recall() > recall_before + 0.1  # measured: 0.25 -> 0.42


def test_refresh_keeps_a_dense_index_and_checks_its_arguments():
    key = shifted_keys(prompt_len=100, new=0)
    dense = PQIndex.build(key, CFG.replace(budget=1.0))
    dense.refresh(key, 100)  # nothing quantized: nothing to do
    index = PQIndex.build(key, CFG)
    with pytest.raises(ValueError, match="n=101"):
        index.refresh(key, 101)
    with pytest.raises(ValueError, match=r"B, Hkv = \(2, 2\)"):
        index.refresh(key[:1], 50)


def test_config_refresh_validation():
    assert PQConfig().refresh == 0
    with pytest.raises(ValueError, match="PQConfig.refresh=-1 is out of range"):
        PQConfig(refresh=-1)
    with pytest.raises(ValueError, match="refresh_niter=0"):
        PQConfig(refresh_niter=0)
    with pytest.raises(ValueError, match="refresh=64 is not supported with offload=True"):
        PQConfig(refresh=64, offload=True)


def spy_refreshes(monkeypatch, trainings=None):
    """The ``n`` of every layer's refresh (PQIndex.refresh and refresh_layers alike); ``trainings``: a list that
    gets one entry per k-means a refresh runs."""
    seen = []
    real = PQIndex.refresh_layers
    train = ProductQuantizer.train

    def refresh_layers(indexes, keys, n, niter=None, **kwargs):
        seen.extend([n] * len(indexes))
        return real(indexes, keys, n, niter, **kwargs)

    def counted(self, *args, **kwargs):
        if trainings is not None and kwargs.get("init") is not None:
            trainings.append(args[0].shape[0] if args[0].dim() == 5 else 1)  # layers in this k-means
        return train(self, *args, **kwargs)

    monkeypatch.setattr(PQIndex, "refresh_layers", staticmethod(refresh_layers))
    monkeypatch.setattr(ProductQuantizer, "train", counted)
    return seen


def test_refresh_layers_is_each_layer_refreshed_alone():
    """One batched k-means for three layers (and in chunks of one layer's training keys) gives each layer the
    centroids and codes of its own refresh."""
    key = shifted_keys()
    keys = [key, key.flip(1), 0.5 * key]
    n0, n = 600, 900

    def built():
        indexes = PQIndex.build_layers([k[:, :, :n0] for k in keys], CFG, capacity=1024)
        for index, k in zip(indexes, keys):
            for p in range(n0, n):
                index.append(k[:, :, p:p + 1], p)
        return indexes

    alone, together, chunked = built(), built(), built()
    for index, k in zip(alone, keys):
        index.refresh(k, n)
    PQIndex.refresh_layers(together, keys, n)
    one_layer = 2 * 2 * CFG.train_points * CFG.ksub * 32 * 4  # B * Hkv * T * D fp32 bytes, T at its cap
    PQIndex.refresh_layers(chunked, keys, n, max_train_bytes=one_layer)
    for a, b, c in zip(alone, together, chunked):
        torch.testing.assert_close(b.quantizer.centroids, a.quantizer.centroids, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(c.quantizer.centroids, a.quantizer.centroids, atol=1e-6, rtol=1e-6)
        assert torch.equal(b.codes, a.codes) and torch.equal(c.codes, a.codes)
    with pytest.raises(ValueError, match="one key tensor per index"):
        PQIndex.refresh_layers(together, keys[:2], n)


def test_every_decode_route_refreshes_at_the_same_tokens_and_generates_alike(monkeypatch):
    """A 300-token prompt, 12 new tokens (11 decode steps over 300..310 cached), refresh=4: every layer refreshes
    before the steps at 304 and 308, whichever route runs the steps, and the routes generate the same tokens."""
    import pqflex.integrations.graphs as graphs

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")
    model = make("llama")
    pqflex.configure(model, SPARSE.replace(refresh=4))
    layers = model.config.num_hidden_layers
    ids = prompt(300, batch=2)
    trainings = []
    seen = spy_refreshes(monkeypatch, trainings)
    routes = {"growing": lambda: PQCache(model), "static": lambda: PQStaticCache(model, 330),
              "graph": lambda: PQStaticCache(model, 330, graph=True)}
    out = {}
    for name, cache in routes.items():
        seen.clear()
        out[name] = generate(model, ids, 12, past_key_values=cache())
        assert seen == [304] * layers + [308] * layers, name
    assert torch.equal(out["growing"], out["static"]) and torch.equal(out["static"], out["graph"])
    seen.clear()
    cache = PQStaticCache(model, 330)
    with torch.no_grad():
        token = model(ids, **{CACHE_KW: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)
    step = DecodeGraph(model, cache, backend="eager")
    trainings.clear()
    for _ in range(11):
        token = step(token)[:, -1:].argmax(-1)
    assert seen == [304] * layers + [308] * layers
    assert trainings == [layers, layers]  # a DecodeGraph refreshes every layer in one k-means
    assert [layer.length for layer in cache.pq_layers] == [311] * layers


def test_refresh_changes_what_is_selected_on_a_real_step(monkeypatch):
    """A growing cache decodes; with refresh the centroids move after the refresh point and not before."""
    model = make("llama")
    pqflex.configure(model, SPARSE.replace(refresh=4))
    cache = PQCache(model)
    ids = prompt(300)
    with torch.no_grad():
        token = model(ids, **{CACHE_KW: cache}).logits[:, -1:].argmax(-1)
        token = model(token, **{CACHE_KW: cache}).logits[:, -1:].argmax(-1)  # builds the index, step at 300
        first = cache.pq_layers[0].index.quantizer.centroids.clone()
        for _ in range(3):  # steps at 301..303
            token = model(token, **{CACHE_KW: cache}).logits[:, -1:].argmax(-1)
        assert torch.equal(cache.pq_layers[0].index.quantizer.centroids, first)
        model(token, **{CACHE_KW: cache})  # the step at 304 refreshes first
    assert not torch.equal(cache.pq_layers[0].index.quantizer.centroids, first)
    assert cache.pq_layers[0].refreshed_at == 304 and cache.pq_layers[0].length == 305


def test_a_crop_takes_the_counts_back(monkeypatch):
    model = make("llama")
    pqflex.configure(model, SPARSE.replace(refresh=4))
    cache = PQCache(model)
    generate(model, prompt(300), 8, past_key_values=cache)  # steps over 300..306: refreshed at 304
    layer = cache.pq_layers[0]
    assert (layer.length, layer.refreshed_at) == (307, 304)
    cache.crop(-5)  # 302 tokens left
    assert (layer.length, layer.refreshed_at) == (302, 302)


def test_a_compiled_step_without_a_host_caller_refuses_refresh():
    """transformers compiles a static cache's step itself unless told not to: a cache with refresh is not
    compileable (its steps run eagerly) unless graph=True; a step compiled any other way raises."""
    model = make("llama")
    pqflex.configure(model, SPARSE.replace(refresh=4))
    assert not PQStaticCache(model, 330).is_compileable
    assert PQStaticCache(model, 330, SPARSE).is_compileable
    cache = PQStaticCache(model, 330)
    with torch.no_grad():
        token = model(prompt(300), **{CACHE_KW: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)
        step = torch.compile(model.forward, fullgraph=True, backend="eager")
        with pytest.raises(Exception, match=r"PQConfig\(refresh=4\) refreshes the index between decode steps"):
            step(token, **{CACHE_KW: cache}, logits_to_keep=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [True, False])
def test_a_captured_graph_replays_over_refreshed_indexes(monkeypatch, compiled):
    """On CUDA a DecodeGraph captures the step once and replays it; the refreshes run between replays, in place,
    so the replayed step reads the refreshed centroids and codes: fed the eager steps' tokens, it refreshes at the
    same tokens and gives their logits (bit for bit when it captured the eager step, within float error when the
    compiled one)."""
    model = make("llama").cuda()
    pqflex.configure(model, SPARSE.replace(refresh=4))
    ids = prompt(300, batch=2).cuda()
    seen = spy_refreshes(monkeypatch)

    def prefilled():
        cache = PQStaticCache(model, 330)
        with torch.no_grad():
            token = model(ids, **{CACHE_KW: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)
        return cache, token

    cache, token = prefilled()
    tokens, want = [token], []
    with torch.no_grad():
        for _ in range(11):  # eager steps, greedy
            want.append(model(tokens[-1], **{CACHE_KW: cache}, logits_to_keep=1).logits)
            tokens.append(want[-1][:, -1:].argmax(-1))
    assert seen == [304] * 2 + [308] * 2
    seen.clear()
    cache, _ = prefilled()
    graph = DecodeGraph(model, cache, warmup=2, compile=compiled)
    got = [graph(t).clone() for t in tokens[:-1]]  # teacher-forced on the eager steps' tokens
    assert graph.captured and seen == [304] * 2 + [308] * 2
    if compiled:
        torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=2e-3, rtol=2e-3)
    else:
        assert torch.equal(torch.cat(got, 1), torch.cat(want, 1))
