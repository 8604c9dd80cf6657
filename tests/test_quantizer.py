import pytest
import torch

from pqflex import ProductQuantizer
from tests.helpers import clustered_keys


def test_constructor_validation():
    with pytest.raises(ValueError, match="dim=64 is not divisible by M=3"):
        ProductQuantizer(64, 3, 6)
    with pytest.raises(ValueError, match=r"nbits=9 .*\[1, 8\]"):
        ProductQuantizer(64, 2, 9)
    with pytest.raises(ValueError, match="M must be an int >= 1"):
        ProductQuantizer(64, 0, 6)


def test_input_validation():
    pq = ProductQuantizer(8, 2, 2)
    with pytest.raises(ValueError, match="not trained"):
        pq.encode(torch.randn(5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        pq.train(torch.ones(5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[\.\.\., N, 8\]"):
        pq.train(torch.randn(5, 6))
    with pytest.raises(ValueError, match="mask must be bool"):
        pq.train(torch.randn(5, 8), mask=torch.ones(4, dtype=torch.bool))
    pq.train(torch.randn(3, 20, 8))
    with pytest.raises(ValueError, match="leading dims"):
        pq.encode(torch.randn(2, 20, 8))
    with pytest.raises(TypeError, match="uint8"):
        pq.decode(torch.zeros(3, 4, 2, dtype=torch.long))


def test_shapes_and_dtypes():
    pq = ProductQuantizer(64, 4, 5).train(torch.randn(2, 3, 100, 64), niter=3)
    assert pq.centroids.shape == (2, 3, 4, 32, 16)
    codes = pq.encode(torch.randn(2, 3, 7, 64))
    assert codes.shape == (2, 3, 7, 4) and codes.dtype == torch.uint8
    assert int(codes.max()) < 32
    assert pq.decode(codes).shape == (2, 3, 7, 64)
    assert pq.compute_ip_table(torch.randn(2, 3, 5, 64)).shape == (2, 3, 5, 4, 32)
    assert pq.adc_scores(torch.randn(2, 3, 5, 64), codes).shape == (2, 3, 5, 7)


def test_encoding_the_centroids_round_trips_exactly():
    pq = ProductQuantizer(32, 4, 4).train(clustered_keys(2, 1, 400, 32, generator=torch.Generator().manual_seed(1)))
    c = pq.centroids  # [2, 1, M, ksub, dsub]
    x = c.permute(0, 1, 3, 2, 4).reshape(2, 1, pq.ksub, 32)  # vector j = centroid j of every sub-space
    codes = pq.encode(x)
    expected = torch.arange(pq.ksub, dtype=torch.uint8)[:, None].expand(pq.ksub, pq.M)
    assert torch.equal(codes, expected.expand_as(codes))
    assert torch.equal(pq.decode(codes), x)


def test_reconstruction_error_falls_with_nbits():
    x = clustered_keys(1, 2, 2000, 64, generator=torch.Generator().manual_seed(0))
    errors = []
    for nbits in (1, 2, 4, 6, 8):
        pq = ProductQuantizer(64, 2, nbits).train(x)
        errors.append((pq.decode(pq.encode(x)) - x).pow(2).mean().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_adc_equals_inner_product_with_reconstruction():
    x = torch.randn(2, 300, 32)
    pq = ProductQuantizer(32, 4, 4).train(x)
    q = torch.randn(2, 5, 32)
    codes = pq.encode(x)
    expected = q @ pq.decode(codes).transpose(-1, -2)
    torch.testing.assert_close(pq.adc_scores(q, codes), expected, rtol=1e-5, atol=1e-4)


def test_no_dead_clusters_even_with_duplicate_points():
    g = torch.Generator().manual_seed(3)
    # 12 distinct points repeated many times, plus spread-out points: a sampled init lands on duplicates.
    dup = torch.randn(12, 16, generator=g).repeat(40, 1)
    x = torch.cat([dup, 3 * torch.randn(200, 16, generator=g)])[None]
    pq = ProductQuantizer(16, 1, 6).train(x, niter=10)
    counts = torch.bincount(pq.encode(x)[0, :, 0].long(), minlength=64)
    assert (counts > 0).all(), counts


def test_deterministic_for_a_seed():
    x = torch.randn(2, 500, 16)
    a = ProductQuantizer(16, 2, 4).train(x, seed=7).centroids
    b = ProductQuantizer(16, 2, 4).train(x, seed=7).centroids
    c = ProductQuantizer(16, 2, 4).train(x, seed=8).centroids
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_masked_batch_equals_rows_trained_alone():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 16, generator=g)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, 50:250] = True
    mask[1, 10:] = True
    batched = ProductQuantizer(16, 2, 5).train(x, mask, niter=8).centroids
    for row, (lo, hi) in enumerate([(50, 250), (10, 300)]):
        alone = ProductQuantizer(16, 2, 5).train(x[row:row + 1, lo:hi], niter=8).centroids
        torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-5)


def test_tolerance_keeps_reconstruction_quality():
    x = clustered_keys(1, 1, 1000, 16, n_clusters=8, generator=torch.Generator().manual_seed(2))
    full = ProductQuantizer(16, 2, 3).train(x, niter=50)
    early = ProductQuantizer(16, 2, 3).train(x, niter=50, tol=1e-3)
    err = [(pq.decode(pq.encode(x)) - x).pow(2).mean().item() for pq in (full, early)]
    assert err[1] <= err[0] * 1.05


@pytest.mark.gpu
def test_cuda_trains_as_well_as_cpu():
    """The CUDA k-means (Triton, tf32 distances) reconstructs as well as the CPU reference at the same settings."""
    x = clustered_keys(2, 3, 2000, 64, generator=torch.Generator().manual_seed(0))
    cpu = ProductQuantizer(64, 2, 6).train(x)
    gpu = ProductQuantizer(64, 2, 6).train(x.cuda())
    err_cpu = (cpu.decode(cpu.encode(x)) - x).pow(2).mean().item()
    err_gpu = (gpu.decode(gpu.encode(x.cuda())).cpu() - x).pow(2).mean().item()
    assert err_gpu <= err_cpu * 1.01
