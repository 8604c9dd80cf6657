"""pqflex.DecodeGraph: decode steps replayed from a captured CUDA graph (on a CPU: the compiled step)."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import pqflex
from pqflex import DecodeGraph, PQStaticCache

from tests.test_transformers import CACHE_KW, SPARSE, generate, make, prompt

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def prefill(model, cache, ids):
    with torch.no_grad():
        return model(ids, **{CACHE_KW: cache}, logits_to_keep=1).logits[:, -1:].argmax(-1)


def greedy(step, token, n):
    """``n`` greedy tokens from ``step(token) -> logits``; the logits of every step, cloned."""
    tokens, logits = [], []
    for _ in range(n):
        out = step(token)
        logits.append(out.clone())
        token = out[:, -1:].argmax(-1)
        tokens.append(token)
    return torch.cat(tokens, 1), torch.cat(logits, 1)


def plain_step(model, cache):
    def step(token):
        with torch.no_grad():
            return model(token, **{CACHE_KW: cache}, logits_to_keep=1).logits
    return step


def models(device="cpu"):
    pq = make("llama").to(device)
    pqflex.configure(pq, SPARSE)
    dense = make("llama", "sdpa").to(device)
    return pq, dense


def cache_maker(which, pq, dense):
    """The model and a fresh-cache factory of a kind: ``pqcache``, ``offload`` (KV in CPU memory) or ``sdpa``."""
    return {"pqcache": (pq, lambda: PQStaticCache(pq, 330)),
            "offload": (pq, lambda: PQStaticCache(pq, 330, SPARSE.replace(offload=True), max_batch_size=2)),
            "sdpa": (dense, lambda: StaticCache(config=dense.config, max_cache_len=330))}[which]


@pytest.mark.parametrize("which", ["pqcache", "offload", "sdpa"])
def test_decode_graph_on_the_cpu_decodes_like_the_plain_forward(which):
    pq, dense = models()
    model, new_cache = cache_maker(which, pq, dense)
    ids = prompt(300, batch=2)
    cache = new_cache()
    want = greedy(plain_step(model, cache), prefill(model, cache, ids), 8)[0]
    cache = new_cache()
    graph = DecodeGraph(model, cache, backend="eager")
    assert torch.equal(greedy(graph, prefill(model, cache, ids), 8)[0], want)
    assert not graph.captured  # no CUDA: every call runs the compiled step
    cache.reset()  # a new prompt in the same cache
    assert torch.equal(greedy(graph, prefill(model, cache, ids), 8)[0], want)


def test_decode_graph_errors():
    pq, _ = models()
    cache = PQStaticCache(pq, 330)
    with pytest.raises(TypeError, match="fixed-capacity cache .* got DynamicCache"):
        DecodeGraph(pq, DynamicCache(config=pq.config))
    with pytest.raises(ValueError, match="warmup must be an int >= 1 .* got 0"):
        DecodeGraph(pq, cache, warmup=0)
    graph = DecodeGraph(pq, cache, backend="eager")
    with pytest.raises(RuntimeError, match="the cache is empty; prefill it"):
        graph(torch.zeros(1, 1, dtype=torch.long))
    token = prefill(pq, cache, prompt(300))
    with pytest.raises(ValueError, match=r"input_ids must be a \[batch, 1\] tensor .* got \(1, 2\)"):
        graph(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids, got torch.float32"):
        graph(token.float())
    assert graph(token).shape == (1, 1, pq.config.vocab_size)
    for _ in range(384 - 301):  # the capacity, rounded up to 128, minus the prompt and the step above
        graph(token)
    with pytest.raises(ValueError, match=r"the cache is full \(384 tokens per sequence\)"):
        graph(token)


def test_decode_graph_counts_the_free_positions_of_each_new_prompt():
    """A short prompt decoded a little, then a longer one in the same cache: the longer one's free positions count."""
    pq, _ = models()
    cache = PQStaticCache(pq, 384)
    graph = DecodeGraph(pq, cache, backend="eager")
    token = prefill(pq, cache, prompt(100))
    for _ in range(10):
        graph(token)
    cache.reset()
    token = prefill(pq, cache, prompt(380))
    for _ in range(4):
        graph(token)
    with pytest.raises(ValueError, match=r"the cache is full \(384 tokens per sequence\)"):
        graph(token)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("which,compiled", [("pqcache", True), ("offload", True), ("sdpa", True),
                                            ("pqcache", False), ("sdpa", False)])
def test_decode_graph_replays_the_step_exactly(which, compiled):
    """The captured graph gives the compiled (or eager) step's logits bit for bit, and captures again after a new
    prefill."""
    pq, dense = models("cuda")
    model, new_cache = cache_maker(which, pq, dense)
    ids = prompt(300, batch=2).cuda()
    cache = new_cache()
    forward = torch.compile(model.forward, fullgraph=True, dynamic=False) if compiled else model.forward
    with torch.no_grad():
        want = greedy(lambda t: forward(t, **{CACHE_KW: cache}, logits_to_keep=1).logits, prefill(model, cache, ids),
                      10)
    cache = new_cache()
    graph = DecodeGraph(model, cache, warmup=2, compile=compiled)
    got = greedy(graph, prefill(model, cache, ids), 10)
    assert graph.captured
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    cache.reset()
    again = greedy(graph, prefill(model, cache, ids), 10)
    assert torch.equal(again[0], want[0]) and torch.equal(again[1], want[1])
    with pytest.raises(ValueError, match=r"captured for \(2, 1\)"):
        graph(want[0][:1, :1])


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on the ops that read a device value on the host (a sync on CUDA, an error inside a CUDA graph capture).
    pqflex's own ops are opaque here: their CUDA kernels run the same launchers under torch.compile's CUDA graphs."""

    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            raise AssertionError(f"host sync in the decode step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("which", ["pqcache", "sdpa"])
def test_the_eager_decode_step_reads_nothing_back_while_a_graph_is_captured(which, monkeypatch):
    """What DecodeGraph(compile=False) captures on CUDA: the eager step, checked on the CPU with the C kernels (a CPU
    fast path that reads the position) off and a capture simulated."""
    from pqflex.integrations import caches as glue
    from pqflex.ops import native

    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    pq, dense = models()
    model, new_cache = cache_maker(which, pq, dense)
    cache = new_cache()
    token = prefill(model, cache, prompt(300, batch=2))
    with torch.no_grad():
        model(token, **{CACHE_KW: cache}, logits_to_keep=1)  # the eager step checks the position on the host
        monkeypatch.setattr(glue, "_capturing", lambda: True)
        with _NoHostSync():
            model(token, **{CACHE_KW: cache}, logits_to_keep=1)
    if which == "pqcache":  # the capacity check the capture skips is a sync, which the mode sees
        monkeypatch.setattr(glue, "_capturing", lambda: False)
        with torch.no_grad(), pytest.raises(AssertionError, match="host sync"), _NoHostSync():
            model(token, **{CACHE_KW: cache}, logits_to_keep=1)


def _padded(n, batch=2):
    """Prompt ids ``[batch, n]`` whose first sequence has 17 tokens of left padding, and its attention mask."""
    ids = prompt(n, batch=batch)
    mask = torch.ones_like(ids)
    mask[0, :17] = 0
    return ids, mask


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_generate_through_the_caches_decode_graph(device, monkeypatch):
    """``PQStaticCache(graph=True)``: generate()'s decode steps replay the cache's DecodeGraph (on a CPU its compiled
    step; on CUDA a captured graph), with the same tokens as the plain forward, a left-padded sequence's positions
    included, over two prompts of different lengths on one cache (reset between) and a fresh cache after them."""
    from pqflex.integrations import graphs

    if device == "cpu":
        monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")  # Dynamo's capture and guards, no code generation
    pq = make("llama").to(device)
    pqflex.configure(pq, SPARSE)
    own = pq.forward
    calls = []
    monkeypatch.setattr(DecodeGraph, "__call__", lambda self, *a, _f=DecodeGraph.__call__: calls.append(a[0].shape)
                        or _f(self, *a))
    cache = PQStaticCache(pq, 330, graph=True)
    assert pq.forward.pqflex_own_forward == own and not cache.is_compileable
    assert PQStaticCache(pq, 330).is_compileable  # graph=False: transformers compiles it, as before
    for n in (300, 260):
        ids, mask = (t.to(device) for t in _padded(n))
        want = generate(pq, ids, n=8, attention_mask=mask, **{CACHE_KW: PQStaticCache(pq, 330)},
                        disable_compile=True)
        calls.clear()
        cache.reset()
        got = generate(pq, ids, n=8, attention_mask=mask, **{CACHE_KW: cache})
        assert torch.equal(got, want), n
        assert calls == [(2, 1)] * 7  # every decode step: the first token is the prompt's
    assert cache.decode_graph().captured == (device == "cuda")
    ids, mask = (t.to(device) for t in _padded(280))
    assert torch.equal(generate(pq, ids, n=5, attention_mask=mask, **{CACHE_KW: PQStaticCache(pq, 300, graph=True)}),
                       generate(pq, ids, n=5, attention_mask=mask, **{CACHE_KW: PQStaticCache(pq, 300)},
                                disable_compile=True))
    PQStaticCache(pq, 330, graph=True)
    assert pq.forward.pqflex_own_forward == own  # wrapped once


def test_graph_routing_leaves_every_other_forward_to_the_model():
    """One-token forwards that want more than logits, forwards over other caches and prompts run the model's own
    forward; a user's DecodeGraph over a routed model compiles the model's own forward, not the router."""
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    cache = PQStaticCache(pq, 330, graph=True)
    with pytest.raises(ValueError, match="graph must be True or False, got 1"):
        PQStaticCache(pq, 330, graph=1)
    ids = prompt(300)
    token = prefill(pq, cache, ids)
    with torch.no_grad():
        out = pq(token, **{CACHE_KW: cache}, output_hidden_states=True)  # not routed: hidden states come back
    assert out.hidden_states is not None and cache.decode_graph()._calls == 0
    assert pq(token, **{CACHE_KW: cache}).logits.requires_grad  # grad mode on: the model's own forward
    with torch.no_grad():
        routed = pq(token, **{CACHE_KW: cache})
    assert routed.hidden_states is None and cache.decode_graph()._calls == 1
    assert getattr(routed, graphs_output_field()) is cache
    other = PQStaticCache(pq, 330)
    prefill(pq, other, ids)
    graph = DecodeGraph(pq, other, backend="eager")
    assert graph._forward._torchdynamo_orig_callable == pq.forward.pqflex_own_forward


def graphs_output_field():
    from pqflex.integrations import graphs

    return graphs._OUTPUT_CACHE_FIELD


def test_beam_search_and_sampling_through_the_caches_decode_graph(monkeypatch):
    """Beam search (the cache reorders its sequences in place between replays) and sampling give what the plain
    step gives."""
    from pqflex.integrations import graphs

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "eager")
    pq = make("llama")
    pqflex.configure(pq, SPARSE)
    ids = prompt(300, batch=2)
    for kw in (dict(num_beams=2, do_sample=False), dict(do_sample=True, top_k=20)):
        outs = []
        for graph in (False, True):
            torch.manual_seed(3)
            with torch.no_grad():
                outs.append(pq.generate(ids, max_new_tokens=6, min_new_tokens=6, **kw, disable_compile=True,
                                        **{CACHE_KW: PQStaticCache(pq, 330, graph=graph)}))
        assert torch.equal(*outs), kw
