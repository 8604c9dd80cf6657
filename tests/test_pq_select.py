"""pq_select (score + top-k) against the reference; Triton under the interpreter on CPU, compiled on CUDA."""

import pytest
import torch

from pqflex.ops import native, portable
from pqflex.ops.pq_select import (MAX_CELL_BITS, pq_select, pq_select_cells, pq_select_radix,
                                  pq_select_triton, use_cells)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, Hkv, G, M, nbits, N, frac, dtype=torch.float32, seed=0, device=DEVICE, distinct=None,
                edge_rows=False):
    """Random inputs; ``distinct`` limits the codes to that many values (many exact ties); ``edge_rows`` makes
    row 0 select nothing (topk 0), row 1 ask for more than its candidates and row 2 have none."""
    g = torch.Generator().manual_seed(seed)
    ksub = 1 << nbits
    ip = torch.randn(B, Hkv, G, M, ksub, generator=g).to(dtype)
    # Skewed codes, as real keys cluster: some cells are common, many are rare.
    probs = torch.rand(distinct or ksub, generator=g) ** 3
    codes = torch.multinomial(probs, B * Hkv * N * M, replacement=True, generator=g).to(torch.uint8)
    codes = codes.view(B, Hkv, N, M)
    lo = torch.randint(0, max(1, N // 8), (B,), generator=g)
    hi = torch.maximum(lo + 1, N - torch.randint(0, max(1, N // 8), (B,), generator=g))
    topk = torch.clamp((frac * (hi - lo).float()).long(), min=1)
    if edge_rows:
        topk[0] = 0
        topk[1] = hi[1] - lo[1] + 7
        lo[2:3], hi[2:3] = hi[2:3], lo[2:3]
    k_max = int(topk.max())
    return [t.to(device) for t in (ip, codes, lo, hi, topk)] + [k_max, 0.125]


def make_op_inputs(B, Hkv, G, M, nbits, N, frac, dtype=torch.float32, seed=0, device=DEVICE, edge_rows=False,
                   dsub=4):
    """Inputs of the registered op ``(query, centroids, codes, spans, topk, n, k_max, scale)`` and the kernels'
    inputs it stands for ``(ip_table, codes, lo, hi, topk, k_max, scale)`` (the table ``q . centroids``; spans
    with ``sink = 0`` put the candidates at ``[lo, hi)``)."""
    ip, codes, lo, hi, topk, k_max, scale = make_inputs(B, Hkv, G, M, nbits, N, frac, seed=seed, device="cpu",
                                                        edge_rows=edge_rows)
    g = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(B, Hkv, G, M * dsub, generator=g).to(dtype)
    centroids = torch.randn(B, Hkv, M, 1 << nbits, dsub, generator=g).to(dtype)
    spans = torch.stack([lo, torch.zeros_like(lo), N - hi], dim=-1)  # start = lo, sink 0, recent N - hi
    table = portable.compute_ip_table(query.float(), centroids.float())
    op = [t.to(device) for t in (query, centroids, codes, spans, topk)] + [None, k_max, scale]
    return op, [t.to(device) for t in (table, codes, lo, hi, topk)] + [k_max, scale]


def check_op(op_args, ref_args, fn=None):
    """``torch.ops.pqflex.pq_select`` (or ``fn``) of ``op_args`` against the reference of the table they give."""
    out = (fn or torch.ops.pqflex.pq_select)(*op_args)
    assert_same_selection(out, portable.pq_select(*ref_args), agg_scores(*ref_args[:4], ref_args[6]))
    return out


def agg_scores(ip, codes, lo, hi, scale):
    """The reference's aggregated scores ``[B, Hkv, N]`` (-1 for non-candidates)."""
    N = codes.shape[2]
    s = portable.adc_scores(ip, codes)[:, :, :, None] * scale  # [B, Hkv, G, 1, N]
    pos = torch.arange(N, device=codes.device)
    cand = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None]
    return portable.gqa_scores(s, cand)[:, :, 0]


def assert_same_selection(out, ref, scores):
    """Equal as sets up to ties: same count per row, and the same multiset of scores."""
    assert out.shape == ref.shape and out.dtype == torch.int32
    assert torch.equal((out >= 0).sum(-1), (ref >= 0).sum(-1)), "different number of selected tokens"
    assert torch.equal((out >= 0), (out >= 0).sort(-1, descending=True).values), "-1 before a selection"
    assert ((out >= -1) & (out < scores.shape[-1])).all(), "a slot holds garbage"
    for row_out, row_ref, row_s in zip(out.flatten(0, 1), ref.flatten(0, 1), scores.flatten(0, 1)):
        sel_out, sel_ref = row_out[row_out >= 0].long(), row_ref[row_ref >= 0].long()
        assert sel_out.unique().numel() == sel_out.numel(), "a token selected twice"
        assert (row_s[sel_out] >= 0).all(), "a non-candidate was selected"
        # Near-ties: the kernels sum in another float order than the reference.
        torch.testing.assert_close(row_s[sel_out].sort().values, row_s[sel_ref].sort().values, rtol=1e-4,
                                   atol=1e-6)


def check(fn, args, **kw):
    """``fn`` against the fp32 reference: the kernels accumulate a bf16/fp16 ip table in fp32, the reference in
    the table's dtype would round the scores first."""
    out = fn(*args, **kw)
    args32 = [args[0].float()] + list(args[1:])
    assert_same_selection(out, portable.pq_select(*args32), agg_scores(*args32[:4], args[6]))
    return out


@pytest.mark.parametrize("B,Hkv,G,M,nbits,N,frac", [
    (1, 2, 4, 2, 6, 1000, 0.1),
    (3, 1, 1, 1, 8, 777, 0.05),
    (2, 3, 2, 2, 4, 333, 1.0),
    (1, 2, 8, 3, 4, 2049, 0.2),
    (2, 1, 4, 2, 6, 50, 0.5),
])
def test_cells_match_reference(B, Hkv, G, M, nbits, N, frac):
    check(pq_select_cells, make_inputs(B, Hkv, G, M, nbits, N, frac))


@pytest.mark.parametrize("B,Hkv,G,M,nbits,N,frac,split", [
    (1, 2, 4, 8, 8, 1000, 0.1, None),
    (3, 1, 1, 1, 8, 777, 0.05, 2),
    (2, 2, 2, 4, 4, 333, 1.0, 3),
    (1, 2, 8, 16, 6, 2049, 0.2, 5),
    (2, 1, 3, 6, 8, 300, 0.3, 1),  # G not a power of two, M not a power of two
    (1, 1, 4, 2, 6, 50, 0.5, 4),  # more programs than tokens
])
def test_radix_matches_reference(B, Hkv, G, M, nbits, N, frac, split):
    check(pq_select_radix, make_inputs(B, Hkv, G, M, nbits, N, frac), split=split)


@pytest.mark.parametrize("distinct,nbits", [(1, 8), (2, 4), (3, 6)])
def test_radix_exact_ties(distinct, nbits):
    """Few distinct codes: most scores tie exactly, and the threshold falls inside a large tie."""
    args = make_inputs(3, 2, 4, 4, nbits, 700, 0.3, distinct=distinct)
    check(pq_select_radix, args, split=3)


def test_edge_rows():
    """topk 0, topk above the candidates, no candidates: per row, both paths."""
    args = make_inputs(3, 2, 4, 2, 6, 400, 0.2, edge_rows=True)
    want = torch.tensor([0, int(args[3][1] - args[2][1]), 0], dtype=torch.int32)
    for fn in (pq_select_radix, pq_select_cells):
        out = check(fn, args)
        assert torch.equal((out >= 0).sum(-1).cpu(), want[:, None].expand(3, 2))


def test_topk_one_and_all_candidates():
    ip, codes, lo, hi, _, _, scale = make_inputs(2, 2, 4, 2, 6, 500, 0.1)
    cand = hi - lo
    for topk in (torch.ones_like(lo), cand, cand + 5):
        k_max = int(topk.max())
        for fn in (pq_select_cells, pq_select_radix):
            out = check(fn, [ip, codes, lo, hi, topk, k_max, scale])
            assert torch.equal((out >= 0).sum(-1), torch.minimum(topk, cand)[:, None].expand(2, 2).int())


def test_registered_op_cpu_is_native_or_the_reference(monkeypatch):
    """The CPU kernel: one native C call for fp32 (table, range, selection; tests/test_native.py), the reference
    otherwise."""
    op, ref = make_op_inputs(2, 2, 4, 2, 6, 300, 0.1, device="cpu", edge_rows=False)
    check_op(op, ref)
    check_op([op[0].double(), op[1].double()] + op[2:], ref)
    monkeypatch.setattr(native, "usable", lambda *tensors: False)
    assert torch.equal(torch.ops.pqflex.pq_select(*op), portable.pq_select(*ref))


@pytest.mark.parametrize("G,M,nbits,dsub", [(1, 8, 8, 8), (3, 8, 8, 8), (4, 2, 1, 3), (2, 4, 2, 5), (8, 16, 4, 4),
                                            (3, 1, 6, 1), (2, 3, 3, 10)])
def test_cpu_op_tables_every_setting(G, M, nbits, dsub):
    """The CPU op computes each KV head's table ``q . centroids`` in C (four centroids a time in SSE lanes, plain C
    for the rest): the reference's selection for sub-spaces of any width and 2 to 256 centroids; B = 3 adds a
    topk-0 row, a row asking for more than its candidates and one without candidates."""
    check_op(*make_op_inputs(3, 2, G, M, nbits, 700, 0.1, seed=G + M + nbits + dsub, device="cpu", edge_rows=True,
                             dsub=dsub))


def test_op_candidates_follow_the_spans_and_n():
    """Candidates [start + sink, n - recent): n given as a tensor (a fixed-capacity cache) or None (= N)."""
    op, _ = make_op_inputs(2, 2, 4, 2, 6, 300, 1.0, device="cpu")
    query, centroids, codes = op[:3]
    spans = torch.tensor([[3, 4, 10], [0, 2, 250]])
    topk = torch.tensor([400, 400])
    for n in (None, torch.tensor(200)):
        out = torch.ops.pqflex.pq_select(query, centroids, codes, spans, topk, n, 400, 0.125)
        end = 300 if n is None else 200
        for b, (lo, hi) in enumerate(((7, end - 10), (2, max(end - 250, 0)))):
            got = sorted(out[b, 0][out[b, 0] >= 0].tolist())
            assert got == list(range(lo, max(hi, lo))), (n, b)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda a: a.__setitem__(2, a[2].long()), TypeError, "codes must be uint8"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "query must be a float tensor"),
    (lambda a: a.__setitem__(1, a[1][..., :3]), ValueError, "M \\* dsub"),
    (lambda a: a.__setitem__(3, a[3][:1]), ValueError, "spans must be an int tensor"),
    (lambda a: a.__setitem__(4, a[4][:1]), ValueError, "topk must be an int tensor of shape"),
    (lambda a: a.__setitem__(5, torch.ones(2, dtype=torch.long)), ValueError, "n must be a 0-d int tensor"),
    (lambda a: a.__setitem__(6, 0), ValueError, "k_max must be an int >= 1"),
])
def test_bad_inputs_raise_before_launch(bad, exc, match):
    op, _ = make_op_inputs(2, 2, 4, 2, 6, 300, 0.1, device="cpu")
    bad(op)
    with pytest.raises(exc, match=match):
        pq_select(*op)


def test_dispatch_rule():
    """Cells where the code tuples fit a 4096-cell table (measured faster there), radix beyond."""
    assert use_cells(2, 6) and use_cells(1, 8) and use_cells(3, 4)
    assert not use_cells(4, 4) and not use_cells(8, 8) and not use_cells(16, 8)


def test_too_many_code_bits_for_the_cells():
    args = make_inputs(1, 1, 1, 4, 4, 100, 0.1)
    with pytest.raises(ValueError, match="M \\* nbits <= 12"):
        pq_select_cells(*args)


def test_compiled_op_never_recompiles():
    """fullgraph compile of the op; new codes, ranges and top-k (same shapes) reuse the graph."""
    fn = torch.compile(torch.ops.pqflex.pq_select, fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (0, 1):
            op, ref = make_op_inputs(2, 2, 4, 8, 8, 600, 0.1 + 0.1 * seed, seed=seed)
            op[6] = ref[5] = 128  # static k_max
            check_op(op, ref, fn)
    torch._dynamo.reset()


GRID = [(B, G, M, nbits) for B in (1, 3) for G in (1, 2, 4, 8) for M in (1, 2, 4, 8, 16) for nbits in (4, 6, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,M,nbits", GRID)
def test_cuda_grid(B, G, M, nbits):
    """Every PQ setting, both paths where they apply; B=3 adds a topk-0 row, a row asking for more than its
    candidates and a row without candidates."""
    seed = B * 100 + G * 10 + M + nbits
    args = make_inputs(B, 2, G, M, nbits, 3001, 0.1, seed=seed, edge_rows=B == 3)
    check_op(*make_op_inputs(B, 2, G, M, nbits, 3001, 0.1, seed=seed, edge_rows=B == 3))
    check(pq_select_radix, args)
    if M * nbits <= MAX_CELL_BITS:
        check(pq_select_cells, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,M,nbits", [(4, 2, 6), (4, 8, 8), (8, 16, 4)])
def test_cuda_low_precision_tables(dtype, G, M, nbits):
    check(pq_select_triton, make_inputs(3, 2, G, M, nbits, 3001, 0.1, dtype=dtype, seed=7))
    check_op(*make_op_inputs(3, 2, G, M, nbits, 3001, 0.1, dtype=dtype, seed=7))


@pytest.mark.gpu
@pytest.mark.parametrize("M,nbits", [(2, 6), (8, 8), (16, 4)])
@pytest.mark.parametrize("distinct", [1, 3])
def test_cuda_ties_and_long_rows(M, nbits, distinct):
    """Exact ties at scale (many programs append to the tie lists at once), and a 64K-token row; both paths."""
    for fn in (pq_select_radix, pq_select_cells) if M * nbits <= MAX_CELL_BITS else (pq_select_radix,):
        check(fn, make_inputs(3, 2, 4, M, nbits, 20000, 0.1, distinct=distinct, edge_rows=True))
        check(fn, make_inputs(1, 2, 4, M, nbits, 65536, 0.05, seed=distinct))
