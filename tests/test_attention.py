import pytest
import torch

from pqflex import PQConfig, PQIndex, retrieval_attention
from tests.helpers import assert_close_rule, clustered_keys, dense_causal, selection_mask

SPARSE = PQConfig(budget=64, sink_size=4, min_context=0, niter=8)


def qkv(B, H, Hkv, S, N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k = clustered_keys(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("S", [1, 4])
@pytest.mark.parametrize("budget", [1.0, 301])
def test_budget_covering_context_is_dense_sdpa(dtype, G, S, budget):
    B, Hkv, N, D = 2, 2, 301, 32
    q, k, v = qkv(B, G * Hkv, Hkv, S, N, D, dtype)
    out = retrieval_attention(q, k, v, PQConfig(budget=budget, min_context=0, sink_size=4))
    ref32 = dense_causal(q.float(), k.float(), v.float())
    assert out.dtype == dtype and out.shape == (B, G * Hkv, S, D)
    assert_close_rule(out, dense_causal(q, k, v), ref32)


def test_min_context_keeps_short_contexts_dense():
    q, k, v = qkv(1, 4, 2, 1, 500, 32)
    out = retrieval_attention(q, k, v, PQConfig(budget=64, min_context=501))
    torch.testing.assert_close(out, dense_causal(q, k, v))
    assert not torch.allclose(retrieval_attention(q, k, v, SPARSE), out, atol=1e-4)


@pytest.mark.parametrize("S", [1, 3])
def test_sink_recent_always_attended_and_count_equals_budget(S):
    B, H, Hkv, N, D = 2, 8, 2, 777, 32
    q, k, _ = qkv(B, H, Hkv, S, N, D)
    index = PQIndex.build(k, SPARSE)
    budget = SPARSE.resolve_budget(N)
    attend = selection_mask(index.plan(q, N, D ** -0.5), N)  # [B, Hkv, S, N]
    assert attend.shape == (B, Hkv, S, N)
    last = attend[:, :, -1]
    assert (last.sum(-1) == budget.total).all()
    assert last[..., : budget.sink_size].all()
    assert last[..., N - budget.recent_size:].all()
    for i in range(S):  # earlier queries: causal, recent window ending at their own position
        p = N - S + i
        assert not attend[:, :, i, p + 1:].any()
        assert attend[:, :, i, p - budget.recent_size + 1: p + 1].all()
        assert (attend[:, :, i].sum(-1) == budget.total).all()
    assert not (attend[0, 0, -1] == attend[0, 1, -1]).all(), "KV heads should select independently"


def test_multi_token_step_equals_single_steps():
    """Query i of an S-query step plans exactly like a one-query step at context N - S + i + 1."""
    B, H, Hkv, S, N, D = 2, 4, 2, 4, 400, 32
    q, k, _ = qkv(B, H, Hkv, S, N, D)
    index = PQIndex.build(k, SPARSE)
    attend = selection_mask(index.plan(q, N, D ** -0.5), N)
    for i in range(S):
        n = N - S + i + 1
        step = PQIndex(SPARSE, index.quantizer, index.codes[:, :, :n], index.start, index.sink, index.recent,
                       index.topk, index.k_max, index.sink_max, index.recent_max)
        single = selection_mask(step.plan(q[:, :, i: i + 1], n, D ** -0.5), n)
        assert torch.equal(single[:, :, 0], attend[:, :, i, :n])


def test_append_encodes_with_existing_centroids():
    q, k, _ = qkv(1, 4, 2, 1, 300, 32)
    index = PQIndex.build(k[:, :, :200], SPARSE)
    centroids = index.quantizer.centroids.clone()
    index.append(k[:, :, 200:])
    assert index.num_tokens == 300
    assert torch.equal(index.quantizer.centroids, centroids)
    assert torch.equal(index.codes[:, :, 200:], index.quantizer.encode(k[:, :, 200:]))
    with pytest.raises(ValueError, match="new keys"):
        index.append(k[:, :1])



def test_growing_index_appends_in_place_and_survives_truncate():
    """A growing index keeps room for the next codes: the decode steps append without copying all codes (one
    storage across steps, doubling when full), and a truncate (Cache.crop) followed by appends overwrites the dropped
    rows, giving the codes an index built step by step from scratch has."""
    _, k, _ = qkv(1, 4, 2, 1, 600, 32)
    index = PQIndex.build(k[:, :, :200], SPARSE)
    expected = index.quantizer.encode(k)
    index.append(k[:, :, 200:201])
    storage = index.codes.untyped_storage().data_ptr()
    for t in range(201, 260):
        index.append(k[:, :, t:t + 1])
    assert index.codes.untyped_storage().data_ptr() == storage  # no copy per step
    assert torch.equal(index.codes, expected[:, :, :260])
    held = index.nbytes
    index.truncate(230)
    index.append(k[:, :, 300:320])  # other keys into the dropped rows
    assert index.num_tokens == 250 and index.nbytes == held
    assert torch.equal(index.codes[:, :, :230], expected[:, :, :230])
    assert torch.equal(index.codes[:, :, 230:], expected[:, :, 300:320])
    index.append(k[:, :, 320:])  # past the room: a larger storage, the same codes
    assert torch.equal(index.codes, torch.cat([expected[:, :, :230], expected[:, :, 300:]], dim=2))
    assert index.nbytes > held

def test_left_padded_batch_equals_rows_alone():
    cfg = PQConfig(budget=0.25, sink_size=4, min_context=200, niter=6)
    H, Hkv, S, D = 4, 2, 1, 32
    lengths = [500, 330, 150]  # the last one is below min_context: dense
    N = max(lengths)
    q, k, v = qkv(len(lengths), H, Hkv, S, N, D, seed=4)
    kv_mask = torch.arange(N)[None, :] >= torch.tensor([N - n for n in lengths])[:, None]
    out = retrieval_attention(q, k, v, cfg, kv_mask=kv_mask)
    for b, n in enumerate(lengths):
        alone = retrieval_attention(q[b:b + 1], k[b:b + 1, :, N - n:], v[b:b + 1, :, N - n:], cfg)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    index = PQIndex.build(k, cfg, kv_mask)
    attend = selection_mask(index.plan(q, N, D ** -0.5), N)
    assert not (attend & ~kv_mask[:, None, None, :]).any(), "a padded token was attended"
    for b, n in enumerate(lengths):
        assert (attend[b, :, -1].sum(-1) == min(cfg.resolve_budget(n).total, n)).all()


def test_planted_needle_is_always_selected():
    B, H, Hkv, N, D = 1, 4, 1, 2048, 64
    cfg = PQConfig(budget=0.1, sink_size=16, min_context=0 + 512)
    hits = 0
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        k = clustered_keys(B, Hkv, N, D, generator=g)
        q = torch.randn(B, H, 1, D, generator=g)
        pos = int(torch.randint(200, N - 400, (1,), generator=g))
        direction = q[0, :, 0].mean(0)
        k[0, 0, pos] = 3.0 * direction / direction.norm() * k[0, 0].norm(dim=-1).mean()
        attend = selection_mask(PQIndex.build(k, cfg).plan(q, N, D ** -0.5), N)
        hits += bool(attend[0, 0, 0, pos])
    assert hits == 10


def test_adc_topk_recall_against_exact_topk():
    """Recall of the PQ top-k vs the exact q.k top-k of the middle tokens at a 1/10 budget (G = 1).

    Floor: 0.5 on clustered keys with the paper's M=2, nbits=6 (measured ~0.6-0.7 on this data); the default
    M=8, nbits=8 must do better.
    """
    B, Hkv, N, D = 2, 4, 4096, 64
    cfg = PQConfig(M=2, nbits=6, budget=0.1, min_context=1024)
    g = torch.Generator().manual_seed(9)
    k = clustered_keys(B, Hkv, N, D, generator=g)
    q = clustered_keys(B, Hkv, 1, D, generator=g)
    index = PQIndex.build(k, cfg)
    b = cfg.resolve_budget(N)
    attend = selection_mask(index.plan(q, N, D ** -0.5), N)[:, :, 0]  # [B, Hkv, N]
    lo, hi = b.sink_size, N - b.recent_size
    exact = (q @ k.transpose(-1, -2))[:, :, 0, lo:hi].topk(b.topk, dim=-1).indices + lo  # [B, Hkv, topk]
    recall = attend.gather(-1, exact).float().mean().item()
    print(f"ADC top-k recall at 1/10 budget: {recall:.3f}")
    assert recall >= 0.5
    default = PQIndex.build(k, PQConfig(budget=0.1, min_context=1024))
    attend = selection_mask(default.plan(q, N, D ** -0.5), N)[:, :, 0]
    assert attend.gather(-1, exact).float().mean().item() > recall


@pytest.mark.parametrize("args,exc,match", [
    (dict(q=(2, 4, 1, 32), k=(2, 2, 50, 32)), None, None),
    (dict(q=(2, 4, 32), k=(2, 2, 50, 32)), ValueError, "query must be 4-D"),
    (dict(q=(2, 5, 1, 32), k=(2, 2, 50, 32)), ValueError, "H=5 must be a multiple of KV heads Hkv=2"),
    (dict(q=(2, 4, 51, 32), k=(2, 2, 50, 32)), ValueError, r"S=51 must be in \[1, N=50\]"),
    (dict(q=(3, 4, 1, 32), k=(2, 2, 50, 32)), ValueError, "does not match query"),
    (dict(q=(2, 4, 1, 30), k=(2, 2, 50, 30)), ValueError, "D=30 is not divisible by PQConfig.M=4"),
])
def test_invalid_shapes(args, exc, match):
    cfg = PQConfig(M=4, budget=1.0)
    q, k = torch.randn(*args["q"]), torch.randn(*args["k"])
    if exc is None:
        retrieval_attention(q, k, k, cfg)
        return
    with pytest.raises(exc, match=match):
        retrieval_attention(q, k, k, cfg)


def test_invalid_dtypes_config_and_mask():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 40, 8)
    with pytest.raises(TypeError, match="key dtype torch.int64"):
        retrieval_attention(q, k.long(), k, PQConfig())
    with pytest.raises(TypeError, match="dtypes differ"):
        retrieval_attention(q, k.half(), k.half(), PQConfig())
    with pytest.raises(TypeError, match="pqflex.PQConfig"):
        retrieval_attention(q, k, k, {"budget": 0.1})
    with pytest.raises(ValueError, match="value .* shapes differ"):
        retrieval_attention(q, k, k[:, :, :30], PQConfig())
    right_padded = torch.ones(1, 40, dtype=torch.bool)
    right_padded[0, -3:] = False
    with pytest.raises(ValueError, match="left padding"):
        retrieval_attention(q, k, k, PQConfig(), kv_mask=right_padded)
    with pytest.raises(ValueError, match=r"kv_mask must be bool of shape \(1, 40\)"):
        retrieval_attention(q, k, k, PQConfig(), kv_mask=torch.ones(1, 39, dtype=torch.bool))


@pytest.mark.gpu
def test_cuda_dense_matches_sdpa():
    q, k, v = (t.cuda() for t in qkv(2, 8, 2, 1, 999, 64, torch.bfloat16))
    out = retrieval_attention(q, k, v, PQConfig(budget=1.0))
    assert_close_rule(out, dense_causal(q, k, v), dense_causal(q.float(), k.float(), v.float()))


@pytest.mark.parametrize("backend,kernel", [("fused", "sparse_decode_attention"), ("gather", "range_attention"),
                                            ("flex", "range_attention")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dense_decode_step_of_a_fixed_capacity_cache(monkeypatch, backend, kernel, dtype, device):
    """A dense step (budget 1.0; a left-padded row, a buffer larger than the cache) attends exactly [start, n):
    the fused backend through its kernel where one reads spans (Triton on CUDA, C for fp32 on the CPU; the span
    [start, n) read as a recent window: dense flash-decoding), else, as for the backends that would list every
    token, masked SDPA over the range."""
    import pqflex.kvstore
    from pqflex.layer import PQLayer
    from pqflex.ops import backends

    B, G, Hkv, N, D, C = 2, 4, 2, 300, 32, 340
    q, k, v = (t.to(device) for t in qkv(B, G * Hkv, Hkv, 1, C, D, dtype, seed=3))
    kv_mask = torch.ones(B, C, dtype=torch.bool, device=device)
    kv_mask[1, :37] = False  # sequence 1 starts at 37
    layer = PQLayer(PQConfig(budget=1.0, backend=backend), capacity=C)
    layer.forward(q.expand(B, G * Hkv, N - 1, D), k, v, kv_mask, n=torch.tensor(N - 1, device=device))  # prompt
    calls = []
    real_op, real_range = torch.ops.pqflex.sparse_decode_attention, backends.range_attention
    monkeypatch.setattr(pqflex.kvstore, "range_attention",
                        lambda *a, **kw: calls.append("range_attention") or real_range(*a, **kw))
    monkeypatch.setattr(backends.torch.ops.pqflex, "sparse_decode_attention",
                        lambda *a, **kw: calls.append("sparse_decode_attention") or real_op(*a, **kw), raising=False)
    out = layer.forward(q, k, v, kv_mask, n=torch.tensor(N, device=device))
    spans_read = dtype == torch.float32 or device == "cuda"  # where the fused backend's op runs a kernel
    assert calls == [kernel if spans_read or backend != "fused" else "range_attention"]
    ref = dense_causal(q.float(), k[:, :, :N].float(), v[:, :, :N].float(), kv_mask[:, :N])
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                               atol=2e-2 if dtype != torch.float32 else 1e-5)
