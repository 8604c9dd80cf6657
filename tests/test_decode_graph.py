"""pqflex.DecodeGraph: decode steps replayed from a captured CUDA graph (on a CPU: the compiled step)."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

import pqflex
from pqflex import DecodeGraph, PQStaticCache

from tests.test_transformers import CACHE_KW, SPARSE, make, prompt

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
