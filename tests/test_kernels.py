"""pq_encode and k-means kernels against the reference; Triton under the interpreter on CPU, compiled on CUDA."""

import pytest
import torch

from pqflex.ops import portable
from pqflex.ops.kmeans import kmeans, kmeans_triton
from pqflex.ops.pq_encode import pq_encode, pq_encode_triton
from tests.helpers import clustered_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sub_distance(x, centroids, codes):
    """Squared distance of each sub-vector to the centroid its code names, ``[L, N, M]``."""
    L, N, _ = x.shape
    M, _, dsub = centroids.shape[1:]
    sub = x.float().view(L, N, M, dsub)
    chosen = torch.gather(centroids[:, None].expand(L, N, M, -1, dsub), 3,
                          codes.long()[..., None, None].expand(L, N, M, 1, dsub)).squeeze(3)
    return (sub - chosen).pow(2).sum(-1)


def assert_codes_match(x, centroids, out):
    ref = portable.pq_encode(x, centroids)
    assert out.shape == ref.shape and out.dtype == torch.uint8
    # Equal codes, except where two centroids are equally near up to float rounding.
    d_out, d_ref = sub_distance(x, centroids, out), sub_distance(x, centroids, ref)
    torch.testing.assert_close(d_out, d_ref, rtol=1e-5, atol=1e-5)
    assert (out == ref).float().mean() > 0.999


@pytest.mark.parametrize("L,N,M,nbits,dsub,dtype", [
    (3, 257, 2, 6, 32, torch.float32),
    (2, 100, 4, 4, 16, torch.bfloat16),
    (1, 65, 1, 8, 64, torch.float16),
    (2, 33, 8, 5, 8, torch.float32),
])
def test_encode_matches_reference(L, N, M, nbits, dsub, dtype):
    g = torch.Generator().manual_seed(L * N)
    x = torch.randn(L, N, M * dsub, generator=g).to(dtype).to(DEVICE)
    centroids = torch.randn(L, M, 1 << nbits, dsub, generator=g).to(DEVICE)
    assert_codes_match(x, centroids, pq_encode_triton(x, centroids))


def test_encode_op_and_validation():
    x, c = torch.randn(2, 40, 64), torch.randn(2, 2, 64, 32)
    assert torch.equal(pq_encode(x, c), portable.pq_encode(x, c))
    with pytest.raises(ValueError, match="does not match centroids"):
        pq_encode(x[:, :, :60], c)
    with pytest.raises(TypeError, match="floating point"):
        pq_encode(x.long(), c)
    with pytest.raises(ValueError, match="ksub >= 16"):
        pq_encode_triton(x, c[:, :, :8])


@pytest.mark.parametrize("L,N,ksub,dsub,masked", [(4, 700, 16, 32, False), (2, 1500, 64, 16, True)])
def test_kmeans_triton_matches_reference_quality(L, N, ksub, dsub, masked):
    g = torch.Generator().manual_seed(N)
    x = clustered_keys(1, L, N, dsub, n_clusters=ksub // 2, generator=g)[0].to(DEVICE)
    mask = (torch.rand(L, N, generator=g) > 0.2).to(DEVICE) if masked else None
    fast = kmeans_triton(x, mask, ksub, niter=8, seed=3)
    ref = portable.kmeans(x, mask, ksub, niter=8, seed=3)
    assert fast.shape == ref.shape == (L, ksub, dsub)
    w = torch.ones(L, N, device=DEVICE) if mask is None else mask.float()

    def error(c):
        codes = portable.encode(x, c)
        return ((x - torch.gather(c, 1, codes[..., None].expand(L, N, dsub))).pow(2).sum(-1) * w).sum()

    assert error(fast) <= error(ref) * 1.01
    counts = torch.stack([torch.bincount(portable.encode(x, fast)[i][w[i] > 0], minlength=ksub) for i in range(L)])
    assert (counts > 0).all(), "a dead cluster"
    assert torch.equal(fast, kmeans_triton(x, mask, ksub, niter=8, seed=3)), "not deterministic"


@pytest.mark.parametrize("L,N,ksub,dsub,masked", [(4, 700, 16, 32, False), (3, 1500, 256, 16, True),
                                                   (2, 500, 8, 8, True)])
def test_native_kmeans_matches_reference(L, N, ksub, dsub, masked):
    from pqflex.ops import native

    if native.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(N)
    x = clustered_keys(1, L, N, dsub, n_clusters=ksub // 2, generator=g)[0]
    mask = torch.rand(L, N, generator=g) > 0.2 if masked else None
    ref = portable.kmeans(x, mask, ksub, niter=8, seed=3)
    fast = native.kmeans(x, mask, ksub, niter=8, seed=3, threads=1)
    # The same Lloyd loop; only the distances' float rounding differs (a near-tie may go to the other centroid).
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(fast, native.kmeans(x, mask, ksub, niter=8, seed=3, threads=3)), "depends on the threads"
    assert torch.equal(fast, torch.ops.pqflex.kmeans(x, mask, ksub, 8, 3, 0.0)), "the op's CPU kernel is not native"


def test_native_kmeans_step_is_the_reference_step(monkeypatch):
    from pqflex.ops import native

    if native.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3, 257, 16, generator=g), torch.randn(3, 64, 16, generator=g)
    w = (torch.rand(3, 257, generator=g) > 0.3).float()
    captured = {}

    def capture(xf, w_, ksub, niter, seed, tol, step, init=None):  # run the step native k-means hands to Lloyd
        captured["out"] = step(c)
        return c

    monkeypatch.setattr(portable, "lloyd", capture)  # native.kmeans calls portable.lloyd through the module
    native.kmeans(x, w > 0, 64, 1, threads=2)
    sums, counts, dist = captured["out"]
    xf = x * w[..., None]
    assign, partial = portable.nearest(xf, c)
    want_sums, want_counts = portable._cluster_sums(xf, w, assign, 64)
    torch.testing.assert_close(sums, want_sums, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, want_counts)
    valid = w > 0
    torch.testing.assert_close(dist[valid], (partial + xf.pow(2).sum(-1))[valid], atol=1e-4, rtol=1e-5)


def test_kmeans_op_checks_its_arguments_on_cpu():
    x = torch.randn(2, 300, 16)
    with pytest.raises(ValueError, match="ksub=12"):
        kmeans(x, None, 12, 5)
    with pytest.raises(ValueError, match=r"init must be floating-point centroids \(2, 16, 16\)"):
        kmeans(x, None, 16, 5, init=torch.zeros(2, 8, 16))


def plain_lloyd(x, w, centroids, niter):
    """Lloyd iterations from ``centroids`` written plainly (full distances, a loop over problems and clusters);
    for data where no cluster empties."""
    c = centroids.clone()
    for _ in range(niter):
        for i in range(x.shape[0]):
            pts = x[i][w[i] > 0]
            assign = torch.cdist(pts.double(), c[i].double()).argmin(-1)
            c[i] = torch.stack([pts[assign == j].mean(0) for j in range(c.shape[1])])
    return c


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_kmeans_warm_start_iterates_from_the_given_centroids(device):
    """``init``: the op (native C on the CPU, Triton on CUDA), the reference and a plain loop run the same Lloyd
    iterations from the given centroids; a problem without a valid point returns its init unchanged."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(5)
    L, N, ksub, dsub = 3, 900, 16, 8
    centers = torch.randn(L, ksub, dsub, generator=g) * 4
    x = centers.gather(1, torch.randint(ksub, (L, N, 1), generator=g).expand(L, N, dsub))
    x = x + 0.5 * torch.randn(L, N, dsub, generator=g)
    init = centers + 0.8 * torch.randn(L, ksub, dsub, generator=g)  # near, not at, the clusters
    mask = torch.rand(L, N, generator=g) > 0.25
    mask[2] = False  # nothing to train on: keeps its init
    want = plain_lloyd(x, mask.float(), init, 3).float()
    want[2] = init[2]
    torch.testing.assert_close(portable.kmeans(x, mask, ksub, 3, init=init), want, atol=1e-4, rtol=1e-4)
    # The Triton step multiplies in TF32 (10-bit mantissa): its sums of ~45 points of size ~4 carry ~1e-3 of error.
    tol = 1e-4 if device == "cpu" else 1e-2
    out = kmeans(x.to(device), mask.to(device), ksub, 3, init=init.to(device)).cpu()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    cold = portable.kmeans(x, mask, ksub, 3)
    assert not torch.allclose(cold[:2], want[:2], atol=1e-2), "init ignored"


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("nbits", [4, 6, 8])
def test_cuda_encode_grid(M, nbits):
    x = torch.randn(16, 3001, 128, device="cuda", dtype=torch.bfloat16)
    centroids = torch.randn(16, M, 1 << nbits, 128 // M, device="cuda")
    assert_codes_match(x, centroids, torch.ops.pqflex.pq_encode(x, centroids))
