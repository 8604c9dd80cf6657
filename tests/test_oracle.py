"""The plain-torch implementations of :mod:`pqflex.ops.portable` against the brute-force oracle of tests/oracle.py."""

import pytest
import torch

from pqflex.ops import portable
from tests import oracle


@pytest.mark.parametrize("M,nbits", [(2, 4), (4, 6), (8, 8)])
def test_pq_encode_is_the_nearest_centroid(M, nbits):
    g = torch.Generator().manual_seed(M)
    x, c = torch.randn(2, 30, 16, generator=g), torch.randn(2, M, 1 << nbits, 16 // M, generator=g)
    x[0, 0] = torch.cat([c[0, m, 3] for m in range(M)])  # a point on a centroid
    assert torch.equal(portable.pq_encode(x, c), oracle.pq_encode(x, c))


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_pq_select_selects_the_oracles_tokens(G, ties):
    g = torch.Generator().manual_seed(G)
    B, Hkv, N, M, ksub, D = 2, 2, 90, 4, 8, 16
    centroids = torch.randn(B, Hkv, M, ksub, D // M, generator=g)
    codes = torch.randint(0, 2 if ties else ksub, (B, Hkv, N, M), dtype=torch.uint8, generator=g)  # 2: many ties
    q = torch.randn(B, Hkv, G, D, generator=g)
    lo, hi, topk = torch.tensor([4, 11]), torch.tensor([80, 70]), torch.tensor([12, 9])
    got = portable.pq_select(portable.compute_ip_table(q, centroids), codes, lo, hi, topk, 12, 0.3)
    want = oracle.pq_select(q, centroids, codes, lo, hi, topk, 0.3)
    for b in range(B):
        for h in range(Hkv):
            assert [int(t) for t in got[b, h] if t >= 0] == want[b][h]  # equal codes tie exactly: later first


@pytest.mark.parametrize("masked", [False, True])
def test_sparse_decode_attention_is_attention_over_the_listed_rows(masked):
    g = torch.Generator().manual_seed(5)
    B, Hkv, G, C, T, D = 2, 2, 3, 50, 9, 8
    q, k, v = torch.randn(B, Hkv * G, 1, D, generator=g), torch.randn(B, Hkv, C, D, generator=g), torch.randn(
        B, Hkv, C, D, generator=g)
    idx = torch.stack([torch.stack([torch.randperm(C, generator=g)[:T] for _ in range(Hkv)]) for _ in range(B)])
    valid = torch.rand(B, Hkv, T, generator=g) > 0.3 if masked else None
    if masked:
        valid[1, 0] = False  # nothing to attend: zeros
    got = portable.sparse_decode_attention(q, k, v, idx, valid, 0.4)
    torch.testing.assert_close(got.double(), oracle.sparse_decode_attention(q, k, v, idx, valid, 0.4),
                               atol=1e-6, rtol=1e-5)


def test_offload_gather_reads_each_row_from_one_place():
    g = torch.Generator().manual_seed(6)
    dev, host = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 40, 4, generator=g)
    row = torch.randint(-1, 5, (2, 2, 7), generator=g)
    pos = torch.randint(0, 40, (2, 2, 7), generator=g)
    assert torch.equal(portable.offload_gather(dev, host, row, pos), oracle.offload_gather(dev, host, row, pos))
