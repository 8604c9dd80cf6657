"""pq_select (score + top-k) against the reference; Triton under the interpreter on CPU, compiled on CUDA."""

import pytest
import torch

from pqflex.ops import reference
from pqflex.ops.pq_select import pq_select, pq_select_reference, pq_select_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, Hkv, G, M, nbits, N, frac, dtype=torch.float32, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    ksub = 1 << nbits
    ip = torch.randn(B, Hkv, G, M, ksub, generator=g).to(dtype)
    # Skewed codes, as real keys cluster: some cells are common, many are rare.
    probs = torch.rand(ksub, generator=g) ** 3
    codes = torch.multinomial(probs, B * Hkv * N * M, replacement=True, generator=g).to(torch.uint8)
    codes = codes.view(B, Hkv, N, M)
    lo = torch.randint(0, max(1, N // 8), (B,), generator=g)
    hi = torch.maximum(lo + 1, N - torch.randint(0, max(1, N // 8), (B,), generator=g))
    topk = torch.clamp((frac * (hi - lo).float()).long(), min=1)
    k_max = int(topk.max())
    return [t.to(device) for t in (ip, codes, lo, hi, topk)] + [k_max, 0.125]


def agg_scores(ip, codes, lo, hi, scale):
    """The reference's aggregated scores ``[B, Hkv, N]`` (-1 for non-candidates)."""
    N = codes.shape[2]
    s = reference.adc_scores(ip, codes)[:, :, :, None] * scale  # [B, Hkv, G, 1, N]
    pos = torch.arange(N, device=codes.device)
    cand = ((pos >= lo[:, None]) & (pos < hi[:, None]))[:, None]
    return reference.gqa_scores(s, cand)[:, :, 0]


def assert_same_selection(out, ref, scores):
    """Equal as sets up to ties: same count per row, and the same multiset of scores."""
    assert out.shape == ref.shape and out.dtype == torch.int32
    assert torch.equal((out >= 0).sum(-1), (ref >= 0).sum(-1)), "different number of selected tokens"
    assert torch.equal((out >= 0), (out >= 0).sort(-1, descending=True).values), "-1 before a selection"
    for row_out, row_ref, row_s in zip(out.flatten(0, 1), ref.flatten(0, 1), scores.flatten(0, 1)):
        sel_out, sel_ref = row_out[row_out >= 0].long(), row_ref[row_ref >= 0].long()
        assert sel_out.unique().numel() == sel_out.numel(), "a token selected twice"
        assert (row_s[sel_out] >= 0).all(), "a non-candidate was selected"
        # Near-ties: the kernel scores a code tuple once, the reference each token, in another float order.
        torch.testing.assert_close(row_s[sel_out].sort().values, row_s[sel_ref].sort().values, rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("B,Hkv,G,M,nbits,N,frac", [
    (1, 2, 4, 2, 6, 1000, 0.1),
    (3, 1, 1, 1, 8, 777, 0.05),
    (2, 3, 2, 2, 4, 333, 1.0),
    (1, 2, 8, 3, 4, 2049, 0.2),
    (2, 1, 4, 2, 6, 50, 0.5),
])
def test_triton_matches_reference(B, Hkv, G, M, nbits, N, frac):
    args = make_inputs(B, Hkv, G, M, nbits, N, frac)
    out = pq_select_triton(*args)
    ref = pq_select_reference(*args)
    assert_same_selection(out, ref, agg_scores(args[0], args[1], args[2], args[3], args[6]))


def test_topk_one_and_all_candidates():
    ip, codes, lo, hi, _, _, scale = make_inputs(2, 2, 4, 2, 6, 500, 0.1)
    cand = hi - lo
    for topk in (torch.ones_like(lo), cand, cand + 5):
        k_max = int(topk.max())
        out = pq_select_triton(ip, codes, lo, hi, topk, k_max, scale)
        ref = pq_select_reference(ip, codes, lo, hi, topk, k_max, scale)
        assert_same_selection(out, ref, agg_scores(ip, codes, lo, hi, scale))
        assert torch.equal((out >= 0).sum(-1), torch.minimum(topk, cand)[:, None].expand(2, 2).int())


def test_registered_op_cpu_is_the_reference():
    args = make_inputs(2, 2, 4, 2, 6, 300, 0.1, device="cpu")
    assert torch.equal(torch.ops.pqflex.pq_select(*args), pq_select_reference(*args))


@pytest.mark.parametrize("bad,exc,match", [
    (lambda a: a.__setitem__(1, a[1].long()), TypeError, "codes must be uint8"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "ip_table must be"),
    (lambda a: a.__setitem__(2, a[2][:1]), ValueError, "lo must be an int tensor of shape"),
    (lambda a: a.__setitem__(5, 0), ValueError, "k_max must be an int >= 1"),
])
def test_bad_inputs_raise_before_launch(bad, exc, match):
    args = make_inputs(2, 2, 4, 2, 6, 300, 0.1, device="cpu")
    bad(args)
    with pytest.raises(exc, match=match):
        pq_select(*args)


def test_too_many_code_bits_for_the_kernel():
    args = make_inputs(1, 1, 1, 4, 4, 100, 0.1)
    with pytest.raises(ValueError, match="M \\* nbits <= 12"):
        pq_select_triton(*args)


GRID = [(B, G, M, nbits) for B in (1, 3) for G in (1, 2, 4, 8) for M in (1, 2, 4, 8, 16) for nbits in (4, 6, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("B,G,M,nbits", GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_grid(B, G, M, nbits, dtype):
    args = make_inputs(B, 2, G, M, nbits, 3001, 0.1, dtype=dtype, seed=B * 100 + G * 10 + M + nbits)
    out = torch.ops.pqflex.pq_select(*args)
    ref = pq_select_reference(*args)
    assert_same_selection(out, ref, agg_scores(args[0], args[1], args[2], args[3], args[6]))
