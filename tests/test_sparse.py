"""Sparse decode attention backends against the reference masked attention, and the decode token list."""

import pytest
import torch

from pqflex import PQConfig, PQIndex, Selection, attention_backend
from pqflex.index import decode_token_list
from pqflex.ops import portable
from pqflex.ops.backends import flex_block_mask

from tests.helpers import assert_close_rule, decode, dense_causal, selection_mask


def sparse_decode_attention(q, k, v, idx, valid, scale, backend="gather", all_valid=False):
    """The backend over a plain list (a Selection without spans: the slots are the list, -1 = empty)."""
    listed = Selection(idx if all_valid else torch.where(valid, idx, -1), None, None, 0, 0, all_valid, False,
                       torch.zeros(idx.shape[0], dtype=torch.long), k.shape[2])
    return attention_backend(PQConfig(backend=backend))(q, k, v, listed, scale)


def token_list_case(B=2, Hkv=2, k_max=5, n=300, sink_max=4, recent_max=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor([0, 37])[:B]
    sink = torch.tensor([4, 3])[:B]
    recent = torch.tensor([8, 6])[:B]
    lo, hi = start + sink, n - recent
    selected = torch.stack([torch.stack([torch.randperm(int(hi[b] - lo[b]), generator=g)[:k_max] + lo[b]
                                         for _ in range(Hkv)]) for b in range(B)]).int()
    selected[0, 1, -2:] = -1  # empty slots
    return decode_token_list(selected, start, sink, recent, n, sink_max, recent_max), (start, sink, recent, selected)


def test_token_list_holds_sink_selected_recent_once():
    (idx, valid), (start, sink, recent, selected) = token_list_case()
    n = 300
    for b in range(2):
        for h in range(2):
            got = sorted(idx[b, h][valid[b, h]].tolist())
            want = list(range(int(start[b]), int(start[b] + sink[b])))
            want += [int(t) for t in selected[b, h] if t >= 0] + list(range(n - int(recent[b]), n))
            assert got == sorted(want) and len(set(got)) == len(got)


def test_token_list_short_context_does_not_repeat_the_sink():
    """Recent positions inside the sink and positions before 0 are not listed twice or at all."""
    selected = torch.full((1, 1, 2), -1, dtype=torch.int32)
    idx, valid = decode_token_list(selected, torch.tensor([0]), torch.tensor([4]), torch.tensor([8]), 6, 4, 8)
    assert sorted(idx[0, 0][valid[0, 0]].tolist()) == list(range(6))


def reference_attention(q, k, v, idx, valid, scale):
    B, Hkv, _ = idx.shape
    attend = torch.zeros(B, Hkv, 1, k.shape[2], dtype=torch.int32)
    attend = attend.scatter_add_(-1, idx[:, :, None], valid[:, :, None].int()) > 0
    return portable.masked_attention(q, k, v, attend, scale)


@pytest.mark.parametrize("backend", ["fused", "gather", "flex"])
@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_reference(backend, G, dtype):
    (idx, valid), _ = token_list_case()
    B, Hkv, D, L = 2, 2, 32, 384  # a buffer larger than the 300 cached tokens, as in a static cache
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    ref32 = reference_attention(q, k, v, idx, valid, D ** -0.5)
    lp = [t.to(dtype) for t in (q, k, v)]
    ref_lp = reference_attention(*lp, idx, valid, D ** -0.5)
    out = sparse_decode_attention(*lp, idx, valid, D ** -0.5, backend)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rule(out, ref_lp, ref32)


@pytest.mark.parametrize("backend", ["fused", "gather", "flex"])
@pytest.mark.parametrize("n_as_tensor", [False, True])
def test_a_decode_selection_with_spans_attends_its_whole_token_list(backend, n_as_tensor):
    """The compact plan (top-k slots + spans + widths, no list built) attends exactly the list that
    decode_token_list builds; also in a buffer larger than the cache (n given as a tensor), and for a short
    context where the recent window reaches into the sink."""
    for n in (300, 14, 9):
        sink_max, recent_max = 4, 8
        _, (start, sink, recent, selected) = token_list_case()
        if n < 300:  # sink [0, 4) or [0, 3); recent [6, 14) or [8, 14) at n = 14, reaching into the sink at n = 9
            start, selected = torch.zeros_like(start), torch.full_like(selected, -1)
            selected[:, :, 0] = 5 if n == 14 else -1
        idx, valid = decode_token_list(selected, start, sink, recent, n, sink_max, recent_max)
        g = torch.Generator().manual_seed(3)
        L = 384 if n_as_tensor else n
        q = torch.randn(2, 8, 1, 32, generator=g)
        k, v = torch.randn(2, 2, L, 32, generator=g), torch.randn(2, 2, L, 32, generator=g)
        plan = Selection(selected, torch.stack([start, sink, recent], -1), None, sink_max, recent_max, False, False,
                         start, torch.tensor(n) if n_as_tensor else n)
        torch.testing.assert_close(plan.token_list()[0], idx)
        out = attention_backend(PQConfig(backend=backend))(q, k, v, plan, 32 ** -0.5)
        torch.testing.assert_close(out, reference_attention(q, k, v, idx, valid, 32 ** -0.5), atol=1e-5, rtol=1e-5)
        op = torch.ops.pqflex.sparse_decode_attention
        n_arg = torch.tensor(n) if n_as_tensor else None
        torch.testing.assert_close(op(q, k, v, selected, None, 32 ** -0.5, plan.spans, n_arg, sink_max, recent_max),
                                   portable.sparse_decode_attention(q, k, v, idx, valid, 32 ** -0.5),
                                   atol=1e-5, rtol=1e-5)


def test_sparse_decode_attention_refuses_bad_spans():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 32, 16)
    idx = torch.zeros(1, 1, 4, dtype=torch.int32)
    op = torch.ops.pqflex.sparse_decode_attention
    with pytest.raises(ValueError, match="need spans"):
        op(q, k, k, idx, None, 0.25, None, None, 2, 0)
    with pytest.raises(ValueError, match="spans must be an int tensor"):
        op(q, k, k, idx, None, 0.25, torch.zeros(2, 3, dtype=torch.long), None, 2, 0)
    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        op(q, k, k, idx, None, 0.25, torch.zeros(1, 3, dtype=torch.long), None, -1, 0)
    with pytest.raises(IndexError, match="outside"):
        op(q, k, k, torch.full((1, 1, 4), 40, dtype=torch.int32), None, 0.25)
    spans = torch.tensor([[0, 2, 4]])
    with pytest.raises(IndexError, match="outside"):  # n past the buffer: recent rows that do not exist
        op(q, k, k, idx, None, 0.25, spans, torch.tensor(40), 2, 4)


def test_flex_block_mask_lists_exactly_the_blocks_with_tokens():
    (idx, valid), _ = token_list_case()
    mask = flex_block_mask(idx, valid, 4, 384, kv_block=128)
    for b in range(2):
        for h in range(2):
            want = sorted({int(t) // 128 for t, ok in zip(idx[b, h], valid[b, h]) if ok})
            num = int(mask.kv_num_blocks[b, h, 0])
            assert sorted(mask.kv_indices[b, h, 0, :num].tolist()) == want
    assert flex_block_mask(idx, valid, 4, 300).kv_indices.shape[-1] == 3  # a partial last block


def test_bad_backend_and_query_length_raise():
    (idx, valid), _ = token_list_case()
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 384, 16)
    with pytest.raises(ValueError, match="one query per sequence"):
        sparse_decode_attention(torch.randn(2, 4, 2, 16), k, k, idx, valid, 0.25)
    with pytest.raises(ValueError, match="PQConfig.backend='dense'"):
        PQConfig(backend="dense")


@pytest.mark.parametrize("backend,selection", [("gather", "token"), ("flex", "token"), ("fused", "token"),
                                               ("gather", "block"), ("flex", "block"), ("fused", "block")])
def test_index_decode_in_a_fixed_capacity_buffer_equals_growing_cache(backend, selection):
    """append at row n - 1 + plan + attend on a static buffer == the same on the exact-size cache == reference."""
    cfg = PQConfig(budget=48, sink_size=4, min_context=0, niter=6, backend=backend, selection=selection,
                   block_size=8)
    B, H, Hkv, N, D, C = 2, 8, 2, 260, 16, 384
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(B, Hkv, N + 3, D, generator=g), torch.randn(B, Hkv, N + 3, D, generator=g)
    kv_mask = torch.arange(N)[None, :] >= torch.tensor([0, 21])[:, None]
    grow = PQIndex.build(k[:, :, :N], cfg, kv_mask)
    static = PQIndex.build(k[:, :, :N], cfg, kv_mask, capacity=C)
    kbuf, vbuf = torch.zeros(B, Hkv, C, D), torch.zeros(B, Hkv, C, D)
    kbuf[:, :, :N + 3], vbuf[:, :, :N + 3] = k, v
    for step in range(3):
        n = N + step + 1
        q = torch.randn(B, H, 1, D, generator=g)
        grow.append(k[:, :, n - 1:n])
        static.append(kbuf[:, :, n - 1:n], torch.tensor(n - 1))
        assert torch.equal(static.codes[:, :, :n], grow.codes)
        want = decode(grow, q, k[:, :, :n], v[:, :, :n], n, D ** -0.5)
        got = decode(static, q, kbuf, vbuf, torch.tensor(n), D ** -0.5)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        plan = selection_mask(grow.plan(q, n, D ** -0.5), n)
        torch.testing.assert_close(want, portable.masked_attention(q, k[:, :, :n], v[:, :, :n], plan, D ** -0.5),
                                   atol=1e-5, rtol=1e-5)


def test_dense_decode_in_a_fixed_capacity_buffer_is_causal_sdpa():
    cfg = PQConfig(budget=1.0)
    B, H, Hkv, N, D, C = 2, 4, 2, 50, 16, 128
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    kv_mask = torch.arange(N)[None, :] >= torch.tensor([0, 7])[:, None]
    index = PQIndex.build(k[:, :, :N - 1], cfg, kv_mask[:, :N - 1], capacity=C)
    kbuf, vbuf = torch.zeros(B, Hkv, C, D), torch.zeros(B, Hkv, C, D)
    kbuf[:, :, :N], vbuf[:, :, :N] = k, v
    q = torch.randn(B, H, 1, D, generator=g)
    index.append(kbuf[:, :, N - 1:N], torch.tensor(N - 1))
    got = decode(index, q, kbuf, vbuf, torch.tensor(N), D ** -0.5)
    torch.testing.assert_close(got, dense_causal(q, k, v, kv_mask), atol=1e-5, rtol=1e-5)


def test_full_lists_means_every_slot_is_real():
    """A shared sparse budget fills every slot (more candidates than top-k), so the unmasked path is exact."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 400, 16, generator=g), torch.randn(2, 2, 400, 16, generator=g)
    kv_mask = torch.arange(399)[None, :] >= torch.tensor([0, 30])[:, None]
    index = PQIndex.build(k[:, :, :399], PQConfig(budget=48, sink_size=4, min_context=0, niter=4), kv_mask)
    assert index.full_lists
    q = torch.randn(2, 8, 1, 16, generator=g)
    idx, valid = decode_token_list(index.topk_tokens(q, 400, 0.25), index.start, index.sink, index.recent, 400,
                                   index.sink_max, index.recent_max)
    assert valid.all() and valid.shape[-1] == 48
    masked = sparse_decode_attention(q, k, v, idx, valid, 0.25, "gather")
    torch.testing.assert_close(sparse_decode_attention(q, k, v, idx, valid, 0.25, "gather", all_valid=True), masked)
    ratio = PQIndex.build(k[:, :, :399], PQConfig(budget=0.2, sink_size=4, min_context=200, niter=4), kv_mask)
    assert not ratio.full_lists  # budgets of 79 and 73 tokens: padded slots in the shorter row


def test_select_blocks_takes_the_whole_blocks_with_the_most_mass():
    """Brute force: the aggregated softmax mass of every whole candidate block, the best topk // block of them."""
    g = torch.Generator().manual_seed(6)
    B, Hkv, G, N, D, block = 2, 2, 4, 600, 16, 16
    k = torch.randn(B, Hkv, N, D, generator=g)
    kv_mask = torch.arange(N)[None, :] >= torch.tensor([0, 45])[:, None]
    cfg = PQConfig(budget=120, sink_size=5, min_context=0, niter=4, selection="block", block_size=block)
    index = PQIndex.build(k, cfg, kv_mask)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    got = index.topk_tokens(q, N, 0.25)
    kb = int(index.topk[0]) // block
    assert got.shape == (B, Hkv, (index.k_max // block) * block) and index.full_lists
    lo, hi = index.start + index.sink, N - index.recent
    ip = portable.compute_ip_table(q.view(B, Hkv, G, D), index.quantizer.centroids)
    scores = portable.adc_scores(ip, index.codes) * 0.25  # [B, Hkv, G, N]
    for b in range(B):
        s = int(index.start[b])  # blocks are aligned to the row's first token
        cand = torch.zeros(1, 1, N, dtype=torch.bool)
        cand[..., lo[b]:hi[b]] = True
        probs = portable.gqa_scores(scores[b:b + 1, :, :, None], cand)[0, :, 0]  # [Hkv, N]
        whole = [j for j in range((N - s) // block) if s + j * block >= lo[b] and s + (j + 1) * block <= hi[b]]
        for h in range(Hkv):
            mass = torch.stack([probs[h, s + j * block:s + (j + 1) * block].sum() for j in whole])
            want = {whole[i] for i in mass.topk(kb).indices.tolist()}
            tokens = got[b, h][got[b, h] >= 0] - s
            assert len(tokens) == kb * block and set((tokens // block).tolist()) == want
            assert all((tokens[i * block:(i + 1) * block] % block == torch.arange(block)).all() for i in range(kb))


def test_block_selection_of_a_padded_row_equals_the_row_alone():
    g = torch.Generator().manual_seed(9)
    B, Hkv, G, N, D = 2, 2, 2, 500, 16
    k = torch.randn(B, Hkv, N, D, generator=g)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    pad = 37
    kv_mask = torch.arange(N)[None, :] >= torch.tensor([0, pad])[:, None]
    cfg = PQConfig(budget=100, sink_size=5, min_context=0, niter=4, selection="block", block_size=16)
    batched = PQIndex.build(k, cfg, kv_mask).topk_tokens(q, N, 0.25)
    alone = PQIndex.build(k[1:, :, pad:], cfg).topk_tokens(q[1:], N - pad, 0.25)
    got = batched[1].sort(-1).values
    want = alone[0].sort(-1).values
    assert torch.equal(torch.where(got >= 0, got - pad, -1), want)


def test_select_blocks_with_a_budget_below_one_block_selects_nothing():
    k = torch.randn(1, 1, 300, 8, generator=torch.Generator().manual_seed(7))
    cfg = PQConfig(budget=40, sink_size=4, min_context=0, niter=2, selection="block", block_size=32)
    index = PQIndex.build(k, cfg)  # top-k of 18 tokens: no whole block fits
    q = torch.randn(1, 2, 1, 8)
    assert index.topk_tokens(q, 300, 0.3).shape == (1, 1, 0)
    attend = selection_mask(index.plan(q, 300, 0.3), 300)[0, 0, 0]  # the sink and the recent window only
    want = torch.zeros(300, dtype=torch.bool)
    want[:4] = want[300 - int(index.recent[0]):] = True
    assert torch.equal(attend, want)


def test_bad_selection_settings_raise():
    with pytest.raises(ValueError, match="PQConfig.selection='tokens'"):
        PQConfig(selection="tokens")
    with pytest.raises(ValueError, match="PQConfig.block_size=0 is out of range"):
        PQConfig(selection="block", block_size=0)


def test_streaming_budget_attends_sink_and_recent_only():
    """recent_ratio=1.0 (StreamingLLM) leaves no top-k: the decode step must not fall back to dense attention."""
    g = torch.Generator().manual_seed(8)
    B, H, Hkv, N, D, C = 1, 4, 2, 400, 16, 512
    k, v = torch.randn(B, Hkv, C, D, generator=g), torch.randn(B, Hkv, C, D, generator=g)
    index = PQIndex.build(k[:, :, :N - 1], PQConfig(budget=40, sink_size=4, min_context=0, recent_ratio=1.0),
                          capacity=C)
    assert index.k_max == 0 and not index.dense
    index.append(k[:, :, N - 1:N], torch.tensor(N - 1))
    q = torch.randn(B, H, 1, D, generator=g)
    attend = torch.zeros(B, Hkv, 1, N, dtype=torch.bool)
    attend[..., :4] = attend[..., N - 36:] = True
    want = portable.masked_attention(q, k[:, :, :N], v[:, :, :N], attend, D ** -0.5)
    torch.testing.assert_close(decode(index, q, k, v, torch.tensor(N), D ** -0.5), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 3])
def test_exact_scorer_selects_the_true_top_k(G):
    """The oracle: the middle tokens with the largest group-summed softmax of the exact q.k, by brute force."""
    g = torch.Generator().manual_seed(9)
    B, Hkv, N, D = 2, 2, 300, 16
    k = torch.randn(B, Hkv, N, D, generator=g)
    index = PQIndex.build(k, PQConfig(budget=50, sink_size=4, min_context=0, scorer="exact"))
    assert index.quantizer is None and index.codes.shape == (B, Hkv, N, 0)
    q = torch.randn(B, Hkv * G, 1, D, generator=g)
    got = index.topk_tokens(q, N, 0.25, k)
    lo, hi = int(index.sink[0]), N - int(index.recent[0])
    for b in range(B):
        for h in range(Hkv):
            logits = (q[b, h * G:(h + 1) * G, 0] @ k[b, h, lo:hi].T) * 0.25  # [G, hi - lo]
            mass = logits.softmax(-1).sum(0)
            want = set((mass.topk(int(index.topk[b])).indices + lo).tolist())
            assert set(got[b, h].tolist()) == want
    with pytest.raises(ValueError, match="the exact scorer needs the keys"):
        index.topk_tokens(q, N, 0.25)
    with pytest.raises(ValueError, match="PQConfig.scorer='oracle'"):
        PQConfig(scorer="oracle")
